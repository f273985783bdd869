"""Policy bundles: Cedar policy text, validated against the platform schema, with obligations.

Responsibilities:
- the platform schema (`policies/schema.cedarschema.json`), parsed once per process: bundles
  carry policies only, so every replica validates and evaluates against the same schema;
- `PolicyBundle.parse`: canonical text → content hash, schema validation, our own checks
  (stable `@id`s, well-formed `@obligation`s, no templates), and the pre-parsed
  `cedarpy.PolicySet` that every decision reuses. A bundle is whole or refused: any error
  raises `BundleInvalid` carrying every error found, never a partly usable bundle;
- `Obligations`: what an allowed call must honour, and how several merge (conservatively).

Obligation annotation format, on permit policies only (a forbid cannot oblige anything):
    @obligation("redact:email,phone")       kinds from domain.redaction.ALL_KINDS
    @obligation("region:eu")                 the call may reach models of these regions only
    @obligation("max_cost:0.05")             cap on the call's cost (Decimal)
    @obligation("redact:email;max_cost:1")   several, separated by ";"
Merged across every determining permit: redact kinds unite, regions intersect (the
strictest wins; an empty intersection means no model may serve the call), the smallest cap
wins.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from functools import cache
from importlib import resources
from types import MappingProxyType
from typing import Any

import cedarpy

from domain.redaction import ALL_KINDS

NAMESPACE = "Ledgerflow"
ASK = "Ask"
USE_TOOL = "UseTool"
_POLICY_DIR = "policies"
SCHEMA_FILE = "schema.cedarschema.json"
DEFAULT_BUNDLE_FILE = "default.cedar"
DEFAULT_BUNDLE_VERSION = "default-1"

_REGION = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,127}$")
OBLIGATION_KINDS = ("redact", "region", "max_cost")


def _policy_file(name: str) -> str:
    return (resources.files("domain") / _POLICY_DIR / name).read_text(encoding="utf-8")


@cache
def schema_json() -> str:
    """The platform schema as Cedar JSON text (the one source for entity attribute types too)."""
    return _policy_file(SCHEMA_FILE)


@cache
def schema() -> cedarpy.Schema:
    """The platform schema, parsed once per process (parsing costs ~1 ms; validation reuses it)."""
    return cedarpy.Schema.from_json_str(schema_json())


def schema_cedar_text() -> str:
    """The schema in Cedar's human syntax, for `ledgerflow policy schema` and for policy authors."""
    return str(schema())


def default_bundle_text() -> str:
    return _policy_file(DEFAULT_BUNDLE_FILE)


def canonical_text(text: str) -> str:
    """The form a bundle is hashed and shipped in: LF line ends, no trailing blanks, one final newline.

    Whitespace-only edits (an editor's CRLF, trailing spaces) must not make a new content hash;
    anything else, comments included, does, because the text is what an auditor reads.
    """
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(lines).strip("\n") + "\n"


def content_sha256(text: str) -> str:
    return hashlib.sha256(canonical_text(text).encode("utf-8")).hexdigest()


# --- obligations ---------------------------------------------------------------------------


def decimal_text(value: Decimal) -> str:
    """Canonical text of a Decimal: `0.050` and `0.05` read the same, never in exponent form."""
    text = format(value.normalize(), "f")
    return "0" if text in ("-0", "") else text


@dataclass(frozen=True, slots=True)
class Obligations:
    """What an allowed call must honour. `regions=None` means any region."""

    redact: frozenset[str] = frozenset()
    regions: frozenset[str] | None = None
    max_cost: Decimal | None = None

    @classmethod
    def parse(cls, annotation: str) -> Obligations:
        """Parse one `@obligation` annotation; raises ValueError naming what is wrong."""
        out = cls()
        items = [item.strip() for item in annotation.split(";")]
        if not any(items):
            raise ValueError("empty @obligation")
        for item in items:
            if not item:
                continue
            kind, sep, value = item.partition(":")
            kind, value = kind.strip(), value.strip()
            if not sep or not value:
                raise ValueError(f"obligation {item!r} is not kind:value")
            if kind == "redact":
                kinds = frozenset(k.strip() for k in value.split(","))
                unknown = sorted(kinds - ALL_KINDS)
                if unknown:
                    raise ValueError(f"unknown redaction kinds {unknown}; known: {sorted(ALL_KINDS)}")
                out = out.merge(cls(redact=kinds))
            elif kind == "region":
                regions = frozenset(r.strip() for r in value.split(","))
                bad = sorted(r for r in regions if not _REGION.match(r))
                if bad:
                    raise ValueError(f"bad region names {bad} (lower-case letters, digits, '-')")
                out = out.merge(cls(regions=regions))
            elif kind == "max_cost":
                try:
                    cap = Decimal(value)
                except InvalidOperation:
                    raise ValueError(f"max_cost {value!r} is not a decimal number") from None
                if not cap.is_finite() or cap < 0:
                    raise ValueError(f"max_cost {value!r} must be a finite amount >= 0")
                out = out.merge(cls(max_cost=cap))
            else:
                raise ValueError(f"unknown obligation kind {kind!r}; known: {list(OBLIGATION_KINDS)}")
        return out

    def merge(self, other: Obligations) -> Obligations:
        """Both sets of obligations at once: union of redactions, intersection of regions, lower cap."""
        if self.regions is None:
            regions = other.regions
        elif other.regions is None:
            regions = self.regions
        else:
            regions = self.regions & other.regions
        if self.max_cost is None:
            cap = other.max_cost
        elif other.max_cost is None:
            cap = self.max_cost
        else:
            cap = min(self.max_cost, other.max_cost)
        return Obligations(self.redact | other.redact, regions, cap)

    @property
    def empty(self) -> bool:
        return not self.redact and self.regions is None and self.max_cost is None

    @property
    def conflicting(self) -> bool:
        """True when the region obligations leave no region at all: no model may serve the call."""
        return self.regions is not None and not self.regions

    def permits_region(self, region: str) -> bool:
        return self.regions is None or region in self.regions

    def as_strings(self) -> list[str]:
        """The obligations as sorted `kind:value` strings (the form PolicyDecided records)."""
        out: list[str] = []
        if self.max_cost is not None:
            out.append(f"max_cost:{decimal_text(self.max_cost)}")
        if self.redact:
            out.append("redact:" + ",".join(sorted(self.redact)))
        if self.regions is not None:
            out.append("region:" + ",".join(sorted(self.regions)))
        return out

    @classmethod
    def from_strings(cls, items: Iterable[str]) -> Obligations:
        """Inverse of `as_strings` (to read obligations back from a recorded decision)."""
        out = cls()
        for item in items:
            out = out.merge(cls.parse(item))
        return out


NO_OBLIGATIONS = Obligations()


# --- bundles -------------------------------------------------------------------------------


class BundleInvalid(ValueError):
    """A bundle failed to parse or validate; `errors` holds every problem found, one per line."""

    def __init__(self, version: str, errors: Iterable[str]) -> None:
        self.version = version
        self.errors: tuple[str, ...] = tuple(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"policy bundle {version!r} is invalid ({len(self.errors)} errors):\n{lines}")


@dataclass(frozen=True, slots=True)
class PolicyInfo:
    """One policy of a bundle: Cedar's positional id, our stable id, its effect and obligations."""

    cedar_id: str
    id: str
    effect: str
    position: int
    obligations: Obligations = NO_OBLIGATIONS


@cache
def schema_actions() -> tuple[str, ...]:
    """The actions the platform schema declares (Ask, UseTool)."""
    return tuple(json.loads(schema_json())[NAMESPACE]["actions"])


@dataclass(frozen=True, eq=False)
class PolicySlices:
    """The bundle cut by scope: per action, the policies whose scope can match it.

    Why: cedarpy's cost per request grows with the size of the policy set, scope mismatches
    included (on the development VM two UseTool requests took 167 µs against a 36-policy set
    and 64 µs against its 4 UseTool policies). A policy whose scope names another action, or
    `resource == X` for another resource, can never apply, so leaving it out changes neither
    the decision nor the determining policies nor the errors. Slices keep Cedar's policy ids
    and annotations, and are parsed once with the bundle.
    """

    generic: Mapping[str, cedarpy.PolicySet]  # action → policies with no `resource ==` scope
    specific: Mapping[tuple[str, str, str], cedarpy.PolicySet]  # (action, type, id) → generic + `resource ==` it

    def get(self, action: str, resource_type: str, resource_id: str) -> cedarpy.PolicySet:
        found = self.specific.get((action, resource_type, resource_id))
        return found if found is not None else self.generic[action]

    @classmethod
    def build(cls, static: Mapping[str, Any], order: list[str]) -> PolicySlices:
        actions = schema_actions()
        generic: dict[str, cedarpy.PolicySet] = {}
        specific: dict[tuple[str, str, str], cedarpy.PolicySet] = {}
        for action in actions:
            mine = [cid for cid in order if action in _scope_actions(static[cid]["action"], actions)]
            shared = [cid for cid in mine if _resource_eq(static[cid]["resource"]) is None]
            generic[action] = _policy_set(static, shared)
            targets = {r for cid in mine if (r := _resource_eq(static[cid]["resource"])) is not None}
            for rtype, rid in sorted(targets):
                chosen = {cid for cid in mine if cid in shared or _resource_eq(static[cid]["resource"]) == (rtype, rid)}
                specific[(action, rtype, rid)] = _policy_set(static, [cid for cid in order if cid in chosen])
        return cls(MappingProxyType(generic), MappingProxyType(specific))


def _scope_actions(scope: Mapping[str, Any], actions: tuple[str, ...]) -> frozenset[str]:
    """The actions a policy's action scope can match (all of them when in doubt)."""
    every = frozenset(actions)
    action_type = f"{NAMESPACE}::Action"
    if scope.get("op") == "==" or (scope.get("op") == "in" and "entity" in scope):
        named = [scope["entity"]]
    elif scope.get("op") == "in" and "entities" in scope:
        named = list(scope["entities"])
    else:
        return every
    ids = {e.get("id") for e in named if e.get("type") == action_type}
    # The schema declares no action groups, so `in` names concrete actions; anything else: keep it everywhere.
    return frozenset(ids) if len(ids) == len(named) and ids <= every else every


def _resource_eq(scope: Mapping[str, Any]) -> tuple[str, str] | None:
    if scope.get("op") == "==" and "entity" in scope:
        return (scope["entity"]["type"], scope["entity"]["id"])
    return None


def _policy_set(static: Mapping[str, Any], ids: list[str]) -> cedarpy.PolicySet:
    doc = {"staticPolicies": {cid: static[cid] for cid in ids}, "templates": {}, "templateLinks": []}
    return cedarpy.PolicySet.from_json_str(json.dumps(doc))


@dataclass(frozen=True, eq=False)
class PolicyBundle:
    """A validated, pre-parsed policy set. Immutable; build with `parse` (or the helpers below)."""

    version: str
    text: str = field(repr=False)  # canonical text: what is hashed, shipped and audited
    content_sha256: str
    policy_ids: tuple[str, ...]  # stable ids in bundle order: the @id, else Cedar's positional id
    policy_set: cedarpy.PolicySet = field(repr=False)  # the whole set
    policies: Mapping[str, PolicyInfo] = field(repr=False)  # by Cedar id (policy0, policy1, ...)
    by_id: Mapping[str, PolicyInfo] = field(repr=False)  # by stable id
    slices: PolicySlices = field(repr=False)

    @property
    def policy_count(self) -> int:
        return len(self.policies)

    def info(self, cedar_id: str) -> PolicyInfo | None:
        return self.policies.get(cedar_id)

    def policy_set_for(self, action: str, resource_type: str, resource_id: str) -> cedarpy.PolicySet:
        """The pre-parsed slice that decides `action` on this resource exactly as the whole set would."""
        return self.slices.get(action, resource_type, resource_id)

    def obligations_of(self, policy_id: str) -> Obligations:
        """Obligations of the policy with this stable id (none when absent)."""
        info = self.by_id.get(policy_id)
        return info.obligations if info is not None else NO_OBLIGATIONS

    @classmethod
    def parse(cls, text: str, version: str) -> PolicyBundle:
        """Validate `text` against the platform schema and pre-parse it; raises BundleInvalid."""
        canonical = canonical_text(text)
        errors: list[str] = []
        if not _VERSION.match(version):
            errors.append(f"version {version!r}: 1-128 characters of letters, digits and ._:+- expected")
        result = cedarpy.validate_policies(canonical, schema())
        id_notes: dict[str, str] = result.id_annotations_by_policy_id
        for err in result.errors:
            where = err.policy_id
            label = f"{id_notes[where]} ({where})" if where in id_notes else where
            errors.append(f"{label}: {err.error}" if label else err.error)
        try:
            est = json.loads(cedarpy.policies_to_json_str(canonical))
        except ValueError as exc:  # a syntax error: already reported by validation
            if not errors:
                errors.append(f"parse error: {exc}")
            raise BundleInvalid(version, errors) from None
        policies, more = _policy_infos(est)
        errors.extend(more)
        if errors:
            raise BundleInvalid(version, errors)
        policy_set = cedarpy.PolicySet.from_str(canonical)
        ordered = sorted(policies.values(), key=lambda p: p.position)
        slices = PolicySlices.build(est["staticPolicies"], [p.cedar_id for p in ordered])
        return cls(
            version=version,
            text=canonical,
            content_sha256=hashlib.sha256(canonical.encode("utf-8")).hexdigest(),
            policy_ids=tuple(p.id for p in ordered),
            policy_set=policy_set,
            policies=MappingProxyType(policies),
            by_id=MappingProxyType({p.id: p for p in ordered}),
            slices=slices,
        )

    @classmethod
    def from_published(cls, version: str, bundle: str, content_sha256: str | None = None) -> PolicyBundle:
        """Rebuild a bundle from a PolicyPublished event; refuses it if the text does not match the hash."""
        out = cls.parse(bundle, version)
        if content_sha256 is not None and out.content_sha256 != content_sha256:
            raise BundleInvalid(
                version, [f"content_sha256 {content_sha256} does not match the bundle text ({out.content_sha256})"]
            )
        return out

    def published_fields(self) -> dict[str, Any]:
        """The PolicyPublished fields this bundle fills (the publisher adds author, notes, envelope)."""
        return {
            "version": self.version,
            "content_sha256": self.content_sha256,
            "policy_count": self.policy_count,
            "policy_ids": list(self.policy_ids),
            "bundle": self.text,
        }


def default_bundle(version: str = DEFAULT_BUNDLE_VERSION) -> PolicyBundle:
    """The bundle ledgerflow ships (`policies/default.cedar`), in force until one is published."""
    return PolicyBundle.parse(default_bundle_text(), version)


def _policy_infos(est: Mapping[str, Any]) -> tuple[dict[str, PolicyInfo], list[str]]:
    """Our checks over Cedar's JSON form of the set: ids unique, obligations valid, no templates."""
    errors: list[str] = []
    templates = est.get("templates") or {}
    for cedar_id, tpl in templates.items():
        name = (tpl.get("annotations") or {}).get("id") or cedar_id
        errors.append(f"{name} ({cedar_id}): templates are not supported in bundles; write a static policy")
    static: Mapping[str, Any] = est.get("staticPolicies") or {}
    if not static and not templates:
        errors.append("the bundle holds no policies (it would deny everything); publish at least one")
    infos: dict[str, PolicyInfo] = {}
    seen: dict[str, str] = {}
    # Cedar numbers surface-syntax policies policy0, policy1, ... in text order.
    ordered = sorted(static.items(), key=lambda kv: _position(kv[0]))
    for position, (cedar_id, body) in enumerate(ordered):
        notes: Mapping[str, str] = body.get("annotations") or {}
        pid = notes.get("id", cedar_id)
        label = f"{pid} ({cedar_id})" if pid != cedar_id else cedar_id
        if not pid:
            errors.append(f"{cedar_id}: @id is empty")
            pid = cedar_id
        if pid in seen:
            errors.append(f"{label}: @id {pid!r} is also the id of {seen[pid]}; ids must be unique")
        seen[pid] = cedar_id
        effect = body.get("effect", "")
        obligations = NO_OBLIGATIONS
        if "obligation" in notes:
            if effect != "permit":
                errors.append(f"{label}: @obligation on a {effect}; only a permit can oblige")
            try:
                obligations = Obligations.parse(notes["obligation"])
            except ValueError as exc:
                errors.append(f"{label}: @obligation: {exc}")
        infos[cedar_id] = PolicyInfo(cedar_id, pid, effect, position, obligations)
    return infos, errors


def _position(cedar_id: str) -> tuple[int, str]:
    digits = cedar_id[len("policy") :] if cedar_id.startswith("policy") else ""
    return (int(digits), "") if digits.isdigit() else (1 << 30, cedar_id)
