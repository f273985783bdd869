"""The policy decision point's public face: import from here, not from the parts.

- `policy_bundle`: the platform schema, `PolicyBundle` (validated, pre-parsed Cedar text),
  `BundleInvalid`, `Obligations` and the `@obligation` annotation format;
- `policy_entities`: ABAC attributes as a pure fold into an immutable `EntityStore`;
- `policy_engine`: `DecisionInput`, `Decision`, `evaluate`, the `PolicyEngine` that swaps
  bundle and attributes atomically, `compare` / `Divergence` for shadow mode;
- `policy_diff`: dry-run of a candidate bundle over recorded inputs (`diff`, `shadow`).
"""

from domain.policy_bundle import (
    DEFAULT_BUNDLE_VERSION,
    NAMESPACE,
    NO_OBLIGATIONS,
    BundleInvalid,
    Obligations,
    PolicyBundle,
    PolicyInfo,
    canonical_text,
    content_sha256,
    default_bundle,
    default_bundle_text,
    schema,
    schema_cedar_text,
    schema_json,
)
from domain.policy_diff import DiffReport, FlipExample, diff, shadow
from domain.policy_engine import (
    ALLOW_TO_DENY,
    DATA_CLASSIFICATIONS,
    DENY_TO_ALLOW,
    FLIP_KINDS,
    KEEP,
    OBLIGATIONS_CHANGED,
    Decision,
    DecisionInput,
    Divergence,
    EngineSnapshot,
    EntityView,
    PolicyEngine,
    allowed_models,
    compare,
    evaluate,
)
from domain.policy_entities import (
    AttributeChange,
    AttributesInvalid,
    EntityStore,
    apply_attributes,
    entity_attribute_types,
    fold_attributes,
    normalize_attributes,
)

__all__ = [
    "ALLOW_TO_DENY",
    "DATA_CLASSIFICATIONS",
    "DEFAULT_BUNDLE_VERSION",
    "DENY_TO_ALLOW",
    "FLIP_KINDS",
    "KEEP",
    "NAMESPACE",
    "NO_OBLIGATIONS",
    "OBLIGATIONS_CHANGED",
    "AttributeChange",
    "AttributesInvalid",
    "BundleInvalid",
    "Decision",
    "DecisionInput",
    "DiffReport",
    "Divergence",
    "EngineSnapshot",
    "EntityStore",
    "EntityView",
    "FlipExample",
    "Obligations",
    "PolicyBundle",
    "PolicyEngine",
    "PolicyInfo",
    "allowed_models",
    "apply_attributes",
    "canonical_text",
    "compare",
    "content_sha256",
    "default_bundle",
    "default_bundle_text",
    "diff",
    "entity_attribute_types",
    "evaluate",
    "fold_attributes",
    "normalize_attributes",
    "schema",
    "schema_cedar_text",
    "schema_json",
    "shadow",
]
