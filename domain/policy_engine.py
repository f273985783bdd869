"""The policy decision point's pure core: one decision from a bundle, the attributes and an input.

Responsibilities:
- `DecisionInput`: what the gateway knows about a call, and its canonical hash, so a recorded
  decision can be reproduced from (policy version, attributes, input);
- `EntityView`: the Cedar entities a decision needs, built from one `EntityStore` version.
  A call needs few entities (its principal and tenant, the models and tools), so the view
  parses just those into a `cedarpy.Entities` and caches the handle per distinct caller
  (tenant, principal, roles): in steady state no decision parses anything;
- `evaluate`: Ask plus one UseTool per declared tool, each against the bundle's pre-parsed
  slice for its action and resource (one Cedar batch per slice), then deny-wins,
  obligations merged from every determining permit, ids in bundle order;
- `PolicyEngine`: the bundle and the view in force, swapped together as one immutable
  snapshot (a reader takes the snapshot once and sees either the old pair or the new);
- `compare`: how a candidate's decision differs from the active one's (shadow mode, diffs).

Semantics beyond Cedar's own:
- Fail closed: a policy that errors at evaluation (Cedar skips it) makes the decision deny
  by default, because a skipped forbid or a skipped obligation would let a call through
  with less protection than the bundle says.
- Obligations whose regions do not intersect leave no model to serve the call: deny.
- The principal is completed from the request: tenant and (when the store has none) region
  come from the authenticated call; roles are the store's plus the request's; tool scopes
  come from the store only (a caller cannot grant itself a tool).
- A requested model the store does not know is given region and provider "unknown", so a
  residency forbid still applies to it.
- Cedar's decimal holds 4 places: the estimated cost is rounded up (ROUND_CEILING) to 4
  places for Cedar, so a cost cap can only be met more strictly, never less.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal
from functools import lru_cache
from typing import Any

import cedarpy
import orjson

from domain.policy_bundle import ASK, NAMESPACE, NO_OBLIGATIONS, USE_TOOL, Obligations, PolicyBundle, decimal_text
from domain.policy_entities import (
    CEDAR_DECIMAL_MAX,
    CEDAR_DECIMAL_PLACES,
    AttributeChange,
    AttributesInvalid,
    EntityStore,
    cedar_value,
    fold_attributes,
)

T_PRINCIPAL = f"{NAMESPACE}::Principal"
T_TENANT = f"{NAMESPACE}::Tenant"
T_MODEL = f"{NAMESPACE}::Model"
T_TOOL = f"{NAMESPACE}::Tool"
_ACTION_ASK = {"type": f"{NAMESPACE}::Action", "id": ASK}
_ACTION_TOOL = {"type": f"{NAMESPACE}::Action", "id": USE_TOOL}
UNKNOWN_MODEL: Mapping[str, str] = {"region": "unknown", "provider": "unknown"}
DATA_CLASSIFICATIONS = ("public", "internal", "confidential", "restricted")
INPUT_FORMAT = 1
_CEDAR_QUANTUM = Decimal(1).scaleb(-CEDAR_DECIMAL_PLACES)
_POLICY_IN_ERROR = re.compile(r"policy `([^`]+)`")


def _names(value: Iterable[str] | None, what: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        raise TypeError(f"{what} must be a collection of strings, not one string")
    out = frozenset(value)
    if not all(isinstance(v, str) and v for v in out):
        raise TypeError(f"{what} must hold non-empty strings")
    return out


@dataclass(frozen=True, slots=True)
class DecisionInput:
    """Everything a decision depends on besides the bundle and the attributes.

    `model` is the model the client asked for ("" when the router chooses); `estimated_cost`
    is the gateway's estimate for the call (Decimal, never float). `tools` and `roles` accept
    any collection of names and are held as frozensets (their order is not part of the input).
    """

    tenant: str
    principal: str
    roles: frozenset[str] = frozenset()
    region: str = ""
    data_classification: str = "internal"
    tools: frozenset[str] = frozenset()
    model: str = ""
    estimated_cost: Decimal = Decimal(0)
    route: str = ""

    def __post_init__(self) -> None:
        if not self.tenant or not self.principal:
            raise ValueError("a decision input needs a tenant and a principal")
        object.__setattr__(self, "roles", _names(self.roles, "roles"))
        object.__setattr__(self, "tools", _names(self.tools, "tools"))
        cost = self.estimated_cost
        if isinstance(cost, int) and not isinstance(cost, bool):
            cost = Decimal(cost)
        if not isinstance(cost, Decimal):
            raise TypeError(f"estimated_cost must be a Decimal (money is never float), got {type(cost).__name__}")
        if not cost.is_finite() or cost < 0:
            raise ValueError(f"estimated_cost must be a finite amount >= 0, got {cost}")
        if cost > CEDAR_DECIMAL_MAX - 1:
            raise ValueError(f"estimated_cost {cost} is beyond Cedar's decimal range")
        object.__setattr__(self, "estimated_cost", cost)

    def to_dict(self) -> dict[str, Any]:
        """Canonical dict: sorted name lists, the cost as exact decimal text."""
        return {
            "v": INPUT_FORMAT,
            "tenant": self.tenant,
            "principal": self.principal,
            "roles": sorted(self.roles),
            "region": self.region,
            "data_classification": self.data_classification,
            "tools": sorted(self.tools),
            "model": self.model,
            "estimated_cost": decimal_text(self.estimated_cost),
            "route": self.route,
        }

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> DecisionInput:
        """Inverse of `to_dict` (replaying recorded inputs for a dry-run)."""
        if doc.get("v", INPUT_FORMAT) != INPUT_FORMAT:
            raise ValueError(f"decision input format {doc.get('v')!r} is not {INPUT_FORMAT}")
        return cls(
            tenant=doc["tenant"],
            principal=doc["principal"],
            roles=frozenset(doc.get("roles", ())),
            region=doc.get("region", ""),
            data_classification=doc.get("data_classification", "internal"),
            tools=frozenset(doc.get("tools", ())),
            model=doc.get("model", ""),
            estimated_cost=Decimal(str(doc.get("estimated_cost", "0"))),
            route=doc.get("route", ""),
        )

    def canonical_json(self) -> bytes:
        """The bytes `input_sha256` hashes: `to_dict` as JSON with sorted keys, no spaces."""
        return orjson.dumps(self.to_dict(), option=orjson.OPT_SORT_KEYS)

    @classmethod
    def from_json(cls, data: bytes | str) -> DecisionInput:
        return cls.from_dict(orjson.loads(data))

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical_json()).hexdigest()

    def cedar_cost(self) -> str:
        """The estimated cost as Cedar decimal text: rounded up to 4 places (conservative for caps)."""
        return format(self.estimated_cost.quantize(_CEDAR_QUANTUM, rounding=ROUND_CEILING), "f")


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision and why: the determining policies (stable ids, bundle order) explain it."""

    allow: bool
    policy_version: str
    determining_policies: tuple[str, ...]
    obligations: Obligations
    input_sha256: str
    attributes_version: int = 0
    reasons: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    denied_tool: str | None = None

    @property
    def decision(self) -> str:
        return "allow" if self.allow else "deny"

    @property
    def obligation_list(self) -> list[str]:
        """Obligations as sorted `kind:value` strings (the PolicyDecided form)."""
        return self.obligations.as_strings()

    def decided_fields(self) -> dict[str, Any]:
        """The PolicyDecided fields this decision fills (the gateway adds envelope and request_id)."""
        return {
            "decision": self.decision,
            "policy_version": self.policy_version,
            "determining_policies": list(self.determining_policies),
            "input_sha256": self.input_sha256,
            "obligations": self.obligation_list,
            "denied_tool": self.denied_tool,
        }

    def permits_model(self, region: str) -> bool:
        """May a model in `region` serve this call? (False for every model when denied.)"""
        return self.allow and self.obligations.permits_region(region)


def allowed_models(decision: Decision, models: Mapping[str, str] | Iterable[tuple[str, str]]) -> list[str]:
    """The candidate models (name → region) the decision lets the router use, in the given order."""
    pairs = models.items() if isinstance(models, Mapping) else models
    return [name for name, region in pairs if decision.permits_model(region)]


# --- entities ------------------------------------------------------------------------------

# (tenant, principal, roles, region if the store has none for the principal, model if the store does not know it)
EntityKey = tuple[str, str, frozenset[str], str, str]


class EntityView:
    """The Cedar entities of one `EntityStore` version, parsed once per distinct caller.

    Each entity set holds the caller's principal and tenant, every stored Model and Tool (few,
    and shared by all callers, so the requested model and the declared tools do not split the
    cache; parsed once per view), and a placeholder for a requested model the store does not
    know. The cache is per store version (a new version gets a new view), bounded by
    `cache_size` and safe to share between threads (functools.lru_cache).
    """

    def __init__(self, store: EntityStore, cache_size: int = 4096) -> None:
        self.store = store
        self.parses = 0  # caller entity sets built so far: one per cache miss
        shared = [
            _entity(kind, eid, _cedar_attrs(store.get(name, eid)))
            for name, kind in (("Model", T_MODEL), ("Tool", T_TOOL))
            for eid in store.ids(name)
        ]
        # Parsed once per store version; each caller's entities are added to a clone of it,
        # which costs a fraction of parsing the shared entities again (about 45 against 130 µs
        # for 11 shared entities on the development VM).
        self._base = cedarpy.Entities.from_json_str(orjson.dumps(shared).decode()) if shared else None
        self._cached = lru_cache(maxsize=cache_size)(self._build)

    @property
    def version(self) -> int:
        return self.store.version

    def key(self, inp: DecisionInput) -> EntityKey:
        """What of an input its entities depend on: inputs with equal keys share one parsed entity set."""
        stored = self.store.get("Principal", inp.principal)
        region = "" if stored is not None and stored.get("region") else inp.region
        model = inp.model if inp.model and self.store.get("Model", inp.model) is None else ""
        return (inp.tenant, inp.principal, inp.roles, region, model)

    def entities_for(self, inp: DecisionInput) -> cedarpy.Entities:
        return self._cached(self.key(inp))

    def cache_info(self) -> Any:
        """Hits, misses and size of the entity cache (functools' CacheInfo), for metrics and benchmarks."""
        return self._cached.cache_info()

    def principal_attributes(self, inp: DecisionInput) -> dict[str, Any]:
        """The principal as the policies see it: the store's attributes completed from the request."""
        stored = self.store.get("Principal", inp.principal) or {}
        attrs = {k: cedar_value(v) for k, v in stored.items()}
        attrs["tenant"] = inp.tenant
        attrs["roles"] = sorted(set(stored.get("roles", ())) | inp.roles)  # type: ignore[arg-type]
        attrs.setdefault("tool_scopes", [])
        attrs["region"] = stored.get("region") or inp.region
        return attrs

    def _build(self, key: EntityKey) -> cedarpy.Entities:
        tenant, principal, roles, region, unknown_model = key
        inp = DecisionInput(tenant, principal, roles=roles, region=region)
        docs: list[dict[str, Any]] = [
            _entity(T_PRINCIPAL, principal, self.principal_attributes(inp)),
            _entity(T_TENANT, tenant, _cedar_attrs(self.store.get("Tenant", tenant))),
        ]
        if unknown_model:
            docs.append(_entity(T_MODEL, unknown_model, dict(UNKNOWN_MODEL)))
        self.parses += 1
        delta = orjson.dumps(docs).decode()
        return cedarpy.Entities.from_json_str(delta) if self._base is None else self._base.with_added_json_str(delta)


def _cedar_attrs(attrs: Mapping[str, Any] | None) -> dict[str, Any]:
    return {} if attrs is None else {k: cedar_value(v) for k, v in attrs.items()}


def _entity(kind: str, eid: str, attrs: dict[str, Any]) -> dict[str, Any]:
    return {"uid": {"type": kind, "id": eid}, "attrs": attrs, "parents": []}


# --- evaluation ----------------------------------------------------------------------------


def cedar_requests(inp: DecisionInput) -> list[dict[str, Any]]:
    """Ask, then one UseTool per declared tool (sorted): the batch one decision evaluates."""
    principal = {"type": T_PRINCIPAL, "id": inp.principal}
    ctx: dict[str, Any] = {
        "data_classification": inp.data_classification,
        "region": inp.region,
        "tools": sorted(inp.tools),
        "estimated_cost": {"__extn": {"fn": "decimal", "arg": inp.cedar_cost()}},
        "model_hint": inp.model,
        "route": inp.route,
    }
    if inp.model:
        ctx["model"] = {"__entity": {"type": T_MODEL, "id": inp.model}}
    out = [
        {
            "principal": principal,
            "action": _ACTION_ASK,
            "resource": {"type": T_TENANT, "id": inp.tenant},
            "context": orjson.dumps(ctx).decode(),
        }
    ]
    for tool in sorted(inp.tools):
        tool_ctx = {"tool": tool, "data_classification": inp.data_classification, "route": inp.route}
        out.append(
            {
                "principal": principal,
                "action": _ACTION_TOOL,
                "resource": {"type": T_TOOL, "id": tool},
                "context": orjson.dumps(tool_ctx).decode(),
            }
        )
    return out


def evaluate(
    bundle: PolicyBundle,
    view: EntityView,
    inp: DecisionInput,
    *,
    input_sha256: str | None = None,
    fail_closed: bool = True,
    requests: list[dict[str, Any]] | None = None,
) -> Decision:
    """Decide one call under `bundle` and the attributes of `view`. Pure apart from the view's cache.

    `input_sha256` and `requests` (= `cedar_requests(inp)`) may be passed in when the caller
    evaluates the same input under several bundles.
    """
    digest = input_sha256 if input_sha256 is not None else inp.sha256()
    tools = sorted(inp.tools)
    batch = requests if requests is not None else cedar_requests(inp)
    results = _authorize(bundle, batch, view.entities_for(inp))
    labels = [ASK, *(f"{USE_TOOL} {tool!r}" for tool in tools)]
    errors = tuple(
        f"{label}: {_with_stable_ids(bundle, err)}"
        for label, result in zip(labels, results, strict=True)
        for err in result.diagnostics.errors
    )

    def deny(ids: tuple[str, ...], reasons: tuple[str, ...], denied_tool: str | None = None) -> Decision:
        return Decision(False, bundle.version, ids, NO_OBLIGATIONS, digest, view.version, reasons, errors, denied_tool)

    ask = results[0]
    if not ask.allowed:
        return deny(_stable_ids(bundle, ask.diagnostics.reasons), (f"{ASK}: {_why_denied(bundle, ask)}",))
    refused = [(tool, r) for tool, r in zip(tools, results[1:], strict=True) if not r.allowed]
    if refused:
        tool, result = refused[0]
        reasons = tuple(f"tool {t!r} refused: {_why_denied(bundle, r)}" for t, r in refused)
        return deny(_stable_ids(bundle, result.diagnostics.reasons), reasons, tool)
    if errors and fail_closed:
        failing = _stable_ids_in_errors(bundle, [e for r in results for e in r.diagnostics.errors])
        return deny(failing, ("a policy failed to evaluate; failing closed",))
    cedar_ids = [pid for r in results for pid in r.diagnostics.reasons]
    obligations = NO_OBLIGATIONS
    for cedar_id in cedar_ids:
        info = bundle.policies.get(cedar_id)
        if info is not None and not info.obligations.empty:
            obligations = obligations.merge(info.obligations)
    ids = _stable_ids(bundle, cedar_ids)
    if obligations.conflicting:
        return deny(ids, ("region obligations leave no region: " + ", ".join(obligations.as_strings()),))
    return Decision(True, bundle.version, ids, obligations, digest, view.version, (), errors, None)


def _authorize(
    bundle: PolicyBundle, requests: list[dict[str, Any]], entities: cedarpy.Entities
) -> list[cedarpy.AuthzResult]:
    """Cedar over each request with the bundle's slice for its action and resource, one batch per slice."""
    slices = [bundle.policy_set_for(r["action"]["id"], r["resource"]["type"], r["resource"]["id"]) for r in requests]
    if all(s is slices[0] for s in slices):
        return cedarpy.is_authorized_batch(requests, slices[0], entities)
    groups: dict[int, list[int]] = {}
    for i, s in enumerate(slices):
        groups.setdefault(id(s), []).append(i)
    out: list[cedarpy.AuthzResult | None] = [None] * len(requests)
    for indices in groups.values():
        batch = cedarpy.is_authorized_batch([requests[i] for i in indices], slices[indices[0]], entities)
        for i, result in zip(indices, batch, strict=True):
            out[i] = result
    return [r for r in out if r is not None]


def _why_denied(bundle: PolicyBundle, result: cedarpy.AuthzResult) -> str:
    if result.decision is cedarpy.Decision.NoDecision:
        return "could not be evaluated: " + "; ".join(result.diagnostics.errors)
    ids = _stable_ids(bundle, result.diagnostics.reasons)
    return f"forbidden by {', '.join(ids)}" if ids else "no permit policy applies"


def _stable_ids(bundle: PolicyBundle, cedar_ids: Iterable[str]) -> tuple[str, ...]:
    """Stable ids of the given Cedar ids, without duplicates, in bundle order (Cedar's is not fixed)."""
    infos = {bundle.policies[c] for c in cedar_ids if c in bundle.policies}
    return tuple(p.id for p in sorted(infos, key=lambda p: p.position))


def _stable_ids_in_errors(bundle: PolicyBundle, errors: Iterable[str]) -> tuple[str, ...]:
    return _stable_ids(bundle, (m.group(1) for e in errors for m in _POLICY_IN_ERROR.finditer(e)))


def _with_stable_ids(bundle: PolicyBundle, message: str) -> str:
    def sub(m: re.Match[str]) -> str:
        info = bundle.policies.get(m.group(1))
        return f"policy `{info.id}`" if info is not None else m.group(0)

    return _POLICY_IN_ERROR.sub(sub, message)


# --- comparing two decisions ---------------------------------------------------------------

ALLOW_TO_DENY = "allow_to_deny"
DENY_TO_ALLOW = "deny_to_allow"
OBLIGATIONS_CHANGED = "obligations_changed"
FLIP_KINDS = (ALLOW_TO_DENY, DENY_TO_ALLOW, OBLIGATIONS_CHANGED)
NO_POLICY = "(no policy)"


@dataclass(frozen=True, slots=True)
class Divergence:
    """A candidate bundle decided an input differently from the active one.

    `policies` are the ones the change is put down to: for allow→deny the candidate's
    determining policies (what denies now), for deny→allow the active's (what no longer
    denies), for changed obligations the policies that determine in one bundle only, or,
    when the same policies determine, those whose obligations were edited.
    """

    kind: str
    active: Decision
    candidate: Decision
    policies: tuple[str, ...]

    def shadow_fields(self) -> dict[str, Any]:
        """The PolicyShadowDiverged fields (the gateway adds envelope and request_id)."""
        return {
            "active_version": self.active.policy_version,
            "candidate_version": self.candidate.policy_version,
            "active_decision": self.active.decision,
            "candidate_decision": self.candidate.decision,
            "active_policies": list(self.active.determining_policies),
            "candidate_policies": list(self.candidate.determining_policies),
            "active_obligations": self.active.obligation_list,
            "candidate_obligations": self.candidate.obligation_list,
            "input_sha256": self.active.input_sha256,
        }


def compare(
    active: Decision,
    candidate: Decision,
    active_bundle: PolicyBundle | None = None,
    candidate_bundle: PolicyBundle | None = None,
) -> Divergence | None:
    """How `candidate` differs from `active` in what is enforced (decision or obligations), or None."""
    if active.allow and not candidate.allow:
        return Divergence(ALLOW_TO_DENY, active, candidate, candidate.determining_policies or (NO_POLICY,))
    if candidate.allow and not active.allow:
        return Divergence(DENY_TO_ALLOW, active, candidate, active.determining_policies or (NO_POLICY,))
    if not active.allow or active.obligations == candidate.obligations:
        return None
    a, c = set(active.determining_policies), set(candidate.determining_policies)
    moved = a ^ c
    if not moved and active_bundle is not None and candidate_bundle is not None:
        moved = {p for p in c if active_bundle.obligations_of(p) != candidate_bundle.obligations_of(p)}
    order = {p: i for i, p in enumerate((*active.determining_policies, *candidate.determining_policies))}
    policies = tuple(sorted(moved, key=order.__getitem__)) or candidate.determining_policies or (NO_POLICY,)
    return Divergence(OBLIGATIONS_CHANGED, active, candidate, policies)


# --- the engine ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EngineSnapshot:
    """What one decision reads: a bundle, the entity view of one attribute version, a shadow."""

    bundle: PolicyBundle
    view: EntityView
    shadow: PolicyBundle | None = None

    @property
    def store(self) -> EntityStore:
        return self.view.store


class _Keep:
    """Marker: leave this part of the snapshot as it is."""


KEEP = _Keep()


class PolicyEngine:
    """The bundle and attributes in force, swapped atomically; decisions never re-parse.

    Readers take `self._snapshot` once per decision (one attribute read, atomic in Python)
    and use nothing else, so a decision sees one bundle and one attribute version even while
    a writer swaps them. Writers (hot reload, attribute events) build the new snapshot
    outside any reader's path and serialise among themselves with a lock, so two concurrent
    updates cannot lose one another.
    """

    def __init__(
        self,
        bundle: PolicyBundle,
        store: EntityStore | None = None,
        *,
        shadow: PolicyBundle | None = None,
        fail_closed: bool = True,
        cache_size: int = 4096,
    ) -> None:
        self.fail_closed = fail_closed
        self.cache_size = cache_size
        self._lock = threading.Lock()
        self._snapshot = EngineSnapshot(bundle, EntityView(store or EntityStore(), cache_size), shadow)

    @property
    def snapshot(self) -> EngineSnapshot:
        return self._snapshot

    @property
    def bundle(self) -> PolicyBundle:
        return self._snapshot.bundle

    @property
    def store(self) -> EntityStore:
        return self._snapshot.store

    @property
    def policy_version(self) -> str:
        return self._snapshot.bundle.version

    @property
    def shadow(self) -> PolicyBundle | None:
        return self._snapshot.shadow

    def swap(
        self,
        bundle: PolicyBundle | _Keep = KEEP,
        store: EntityStore | _Keep = KEEP,
        shadow: PolicyBundle | _Keep | None = KEEP,
    ) -> EngineSnapshot:
        """Put a new bundle, store and/or shadow in force at once (KEEP leaves a part as it is)."""
        with self._lock:
            old = self._snapshot
            view = old.view
            if isinstance(store, EntityStore) and store is not old.store:
                view = EntityView(store, self.cache_size)
            new = EngineSnapshot(
                bundle=old.bundle if isinstance(bundle, _Keep) else bundle,
                view=view,
                shadow=old.shadow if isinstance(shadow, _Keep) else shadow,
            )
            self._snapshot = new
            return new

    def activate(self, bundle: PolicyBundle) -> EngineSnapshot:
        """Hot reload (or rollback): the bundle decides every call from now on."""
        return self.swap(bundle=bundle)

    def set_shadow(self, bundle: PolicyBundle | None) -> EngineSnapshot:
        """Evaluate `bundle` beside the active one in `decide_with_shadow`; None stops shadowing."""
        return self.swap(shadow=bundle)

    def apply(
        self, changes: AttributeChange | Iterable[AttributeChange]
    ) -> list[tuple[AttributeChange, AttributesInvalid]]:
        """Fold attribute records into the store in force; returns the records refused (skipped)."""
        batch = [changes] if isinstance(changes, AttributeChange) else list(changes)
        with self._lock:
            old = self._snapshot
            store, rejected = fold_attributes(old.store, batch)
            if store is not old.store:
                self._snapshot = EngineSnapshot(old.bundle, EntityView(store, self.cache_size), old.shadow)
        return rejected

    def decide(self, inp: DecisionInput) -> Decision:
        snap = self._snapshot
        return evaluate(snap.bundle, snap.view, inp, fail_closed=self.fail_closed)

    def decide_with_shadow(self, inp: DecisionInput) -> tuple[Decision, Divergence | None]:
        """The enforced decision, and how the shadow bundle (if any) would have differed on the same snapshot."""
        snap = self._snapshot
        digest = inp.sha256()
        active = evaluate(snap.bundle, snap.view, inp, input_sha256=digest, fail_closed=self.fail_closed)
        if snap.shadow is None:
            return active, None
        candidate = evaluate(snap.shadow, snap.view, inp, input_sha256=digest, fail_closed=self.fail_closed)
        return active, compare(active, candidate, snap.bundle, snap.shadow)

    def decide_many(self, inputs: Iterable[DecisionInput]) -> Iterator[Decision]:
        """Decisions for many inputs against one snapshot (a consistent batch, e.g. for a report)."""
        snap = self._snapshot
        for inp in inputs:
            yield evaluate(snap.bundle, snap.view, inp, fail_closed=self.fail_closed)
