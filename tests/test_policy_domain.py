"""The policy decision point's pure core: bundles, attributes, decisions, swaps and diffs.

No broker, no gateway: these run Cedar (cedarpy) in process against the shipped default
bundle and schema, and against small bundles written for one behaviour each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import cedarpy
import pytest

from domain import policy_engine
from domain.policy import (
    ALLOW_TO_DENY,
    DENY_TO_ALLOW,
    OBLIGATIONS_CHANGED,
    AttributeChange,
    AttributesInvalid,
    BundleInvalid,
    DecisionInput,
    EntityStore,
    EntityView,
    Obligations,
    PolicyBundle,
    PolicyEngine,
    allowed_models,
    apply_attributes,
    canonical_text,
    compare,
    default_bundle,
    default_bundle_text,
    diff,
    evaluate,
    fold_attributes,
    shadow,
)
from domain.policy_entities import cedar_decimal

ASK = 'Ledgerflow::Action::"Ask"'
ALLOW_ALL = '@id("all") permit (principal, action, resource);\n'
DENY_ALL = '@id("none") forbid (principal, action, resource);\n' + ALLOW_ALL

ATTRIBUTES = [
    AttributeChange("Tenant", "acme", {"tier": "standard"}),
    AttributeChange("Tenant", "eu-co", {"residency": "eu"}),
    AttributeChange("Tenant", "trial-co", {"tier": "trial"}),
    AttributeChange("Tenant", "lab", {"allowed_classifications": ["public", "internal"]}),
    AttributeChange("Principal", "alice", {"tool_scopes": ["web_search", "calculator"], "region": "eu"}),
    AttributeChange("Principal", "root", {"tool_scopes": ["*"], "roles": ["admin"]}),
    AttributeChange("Principal", "mallory", {"roles": ["suspended"]}),
    AttributeChange("Model", "sim-small", {"region": "us", "provider": "sim"}),
    AttributeChange("Model", "sim-large", {"region": "us", "provider": "sim"}),
    AttributeChange("Model", "sim-eu", {"region": "eu", "provider": "sim"}),
    AttributeChange("Tool", "shell", {"requires_role": "admin"}),
]
MODELS = {"sim-small": "us", "sim-large": "us", "sim-eu": "eu"}


@pytest.fixture(scope="module")
def bundle() -> PolicyBundle:
    return default_bundle()


@pytest.fixture(scope="module")
def store() -> EntityStore:
    out, rejected = fold_attributes(EntityStore(), ATTRIBUTES)
    assert rejected == []
    return out


@pytest.fixture
def engine(bundle: PolicyBundle, store: EntityStore) -> PolicyEngine:
    return PolicyEngine(bundle, store)


def ask(tenant: str = "acme", principal: str = "bob", **kw: Any) -> DecisionInput:
    return DecisionInput(tenant, principal, **kw)


# --- the default bundle --------------------------------------------------------------------


@pytest.mark.parametrize(
    "inp",
    [
        ask(),
        ask(data_classification="public", route="/v1/ask"),
        ask(data_classification="confidential", model="sim-large", estimated_cost=Decimal("3.2")),
        ask("globex", "someone-new", roles={"dev"}, region="us"),  # neither tenant nor principal in the store
        ask(principal="alice", tools={"web_search", "calculator"}),
        ask(principal="root", tools={"shell", "anything"}),
    ],
)
def test_default_bundle_allows_normal_traffic(engine: PolicyEngine, inp: DecisionInput) -> None:
    d = engine.decide(inp)
    assert d.allow and d.decision == "allow", d.reasons
    assert d.determining_policies[0] == "ask-allowed"
    assert d.obligation_list == [] and d.errors == () and d.denied_tool is None
    assert d.policy_version == engine.bundle.version and d.input_sha256 == inp.sha256()


def test_explicit_forbid_beats_permit(store: EntityStore) -> None:
    b = PolicyBundle.parse(
        ALLOW_ALL
        + '@id("no-interns") forbid (principal, action, resource) when { principal.roles.contains("intern") };',
        "forbid-1",
    )
    engine = PolicyEngine(b, store)
    assert engine.decide(ask(roles={"dev"})).allow
    d = engine.decide(ask(roles={"dev", "intern"}))
    assert not d.allow and d.determining_policies == ("no-interns",)
    assert d.reasons == ("Ask: forbidden by no-interns",)


def test_stored_role_forbids_whatever_the_request_says(engine: PolicyEngine) -> None:
    d = engine.decide(ask(principal="mallory", roles={"admin"}))
    assert not d.allow and d.determining_policies == ("suspended-principal",)


def test_no_permit_is_deny_without_policies(store: EntityStore) -> None:
    b = PolicyBundle.parse('@id("tools") permit (principal, action == Ledgerflow::Action::"UseTool", resource);', "x")
    d = PolicyEngine(b, store).decide(ask())
    assert not d.allow and d.determining_policies == () and d.reasons == ("Ask: no permit policy applies",)


# --- residency -----------------------------------------------------------------------------


def test_eu_tenant_obliged_to_eu_models(engine: PolicyEngine) -> None:
    d = engine.decide(ask("eu-co"))
    assert d.allow and d.obligation_list == ["region:eu"]
    assert "residency-eu" in d.determining_policies
    assert allowed_models(d, MODELS) == ["sim-eu"]
    assert allowed_models(d, [("b-eu", "eu"), ("a-us", "us"), ("c-eu", "eu")]) == ["b-eu", "c-eu"]
    other = engine.decide(ask("acme"))
    assert allowed_models(other, MODELS) == list(MODELS)


@pytest.mark.parametrize("model", ["sim-small", "not-in-store"])
def test_eu_tenant_cannot_pin_a_non_eu_model(engine: PolicyEngine, model: str) -> None:
    d = engine.decide(ask("eu-co", model=model))
    assert not d.allow and d.determining_policies == ("residency-eu-pinned-model",)
    assert allowed_models(d, MODELS) == []
    assert engine.decide(ask("eu-co", model="sim-eu")).allow
    assert engine.decide(ask("acme", model=model)).allow


def test_conflicting_region_obligations_deny(store: EntityStore) -> None:
    b = PolicyBundle.parse(
        ALLOW_ALL
        + '@id("eu") @obligation("region:eu,ch") permit (principal, action, resource);\n'
        + '@id("ch") @obligation("region:ch") permit (principal, action, resource) when { context.route == "/ch" };\n'
        + '@id("us") @obligation("region:us") permit (principal, action, resource) when { context.route == "/us" };\n',
        "regions-1",
    )
    engine = PolicyEngine(b, store)
    assert engine.decide(ask()).obligation_list == ["region:ch,eu"]
    assert engine.decide(ask(route="/ch")).obligation_list == ["region:ch"]  # the strictest
    d = engine.decide(ask(route="/us"))
    assert not d.allow and "leave no region" in d.reasons[0]


# --- tool scopes ---------------------------------------------------------------------------


def test_tool_outside_scopes_is_refused_by_name(engine: PolicyEngine) -> None:
    d = engine.decide(ask(principal="alice", tools={"web_search", "code_exec", "calculator"}))
    assert not d.allow and d.denied_tool == "code_exec"
    assert d.determining_policies == ("tool-scope-required",)
    assert d.reasons == ("tool 'code_exec' refused: forbidden by tool-scope-required",)
    none = engine.decide(ask(principal="bob", tools={"web_search"}))
    assert none.denied_tool == "web_search"


def test_every_refused_tool_is_reported(engine: PolicyEngine) -> None:
    d = engine.decide(ask(principal="alice", tools={"shell", "zzz"}))
    assert d.denied_tool == "shell"  # the first, in name order
    assert len(d.reasons) == 2 and "'zzz'" in d.reasons[1]


def test_tool_requiring_a_role(engine: PolicyEngine) -> None:
    assert engine.decide(ask(principal="root", tools={"shell"})).allow
    d = engine.decide(ask(principal="bob", roles={"dev"}, tools={"shell"}))
    assert not d.allow and d.determining_policies == ("tool-scope-required", "tool-role-required")


# --- obligations ---------------------------------------------------------------------------


def test_restricted_data_gets_a_redact_obligation(engine: PolicyEngine) -> None:
    d = engine.decide(ask(data_classification="restricted"))
    assert d.allow and d.determining_policies == ("ask-allowed", "restricted-redact")
    assert d.obligations.redact == {"email", "phone", "card_number", "iban", "ip_address"}
    assert d.obligation_list == ["redact:card_number,email,iban,ip_address,phone"]
    assert engine.decide(ask(data_classification="internal")).obligations.redact == frozenset()


def test_cost_cap_obligation_and_ceiling(engine: PolicyEngine) -> None:
    d = engine.decide(ask("trial-co", estimated_cost=Decimal("0.05")))
    assert d.allow and d.obligations.max_cost == Decimal("0.05") and d.obligation_list == ["max_cost:0.05"]
    over = engine.decide(ask("trial-co", estimated_cost=Decimal("0.06")))
    assert not over.allow and over.determining_policies == ("trial-cost-ceiling",)
    # Cedar's decimal has 4 places: the estimate is rounded up, so the cap is never exceeded.
    barely = engine.decide(ask("trial-co", estimated_cost=Decimal("0.050000001")))
    assert not barely.allow
    assert engine.decide(ask("acme", estimated_cost=Decimal("7"))).obligations.max_cost is None


def test_obligations_from_every_determining_permit_merge(engine: PolicyEngine) -> None:
    d = engine.decide(ask("eu-co", data_classification="restricted"))
    assert d.determining_policies == ("ask-allowed", "restricted-redact", "residency-eu")
    assert d.obligation_list == ["redact:card_number,email,iban,ip_address,phone", "region:eu"]


def test_obligations_merge_conservatively() -> None:
    a = Obligations.parse("redact:email;region:eu,ch;max_cost:0.50")
    b = Obligations.parse("redact:phone; region:eu ; max_cost:0.05")
    m = a.merge(b)
    assert m == Obligations(frozenset({"email", "phone"}), frozenset({"eu"}), Decimal("0.05"))
    assert m == b.merge(a)
    assert m.as_strings() == ["max_cost:0.05", "redact:email,phone", "region:eu"]
    assert Obligations.from_strings(m.as_strings()) == m
    assert Obligations().merge(a) == a and Obligations().empty
    assert Obligations.parse("region:us").merge(Obligations.parse("region:eu")).conflicting


@pytest.mark.parametrize(
    "text", ["", "redact:emial", "region:EU", "max_cost:cheap", "max_cost:-1", "max_cost:NaN", "colour:red", "redact"]
)
def test_malformed_obligations_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Obligations.parse(text)


# --- bundles -------------------------------------------------------------------------------


def test_syntax_error_refuses_the_bundle() -> None:
    with pytest.raises(BundleInvalid) as info:
        PolicyBundle.parse(ALLOW_ALL + "permit (principal, action, resource) when {", "broken-1")
    assert info.value.version == "broken-1"
    assert info.value.errors and "unexpected end of input" in info.value.errors[0]


def test_schema_violations_are_all_reported() -> None:
    text = (
        ALLOW_ALL
        + '@id("typo") forbid (principal, action == Ledgerflow::Action::"Ask", resource) '
        + 'when { resource.residence == "eu" };\n'
        + '@id("wrong-type") forbid (principal, action == Ledgerflow::Action::"Ask", resource) '
        + "when { context.estimated_cost > 3 };\n"
        + '@id("all") @obligation("redact:emial") permit (principal, action, resource);\n'
        + '@id("obliging-forbid") @obligation("region:eu") forbid (principal, action, resource) when { false };\n'
    )
    with pytest.raises(BundleInvalid) as info:
        PolicyBundle.parse(text, "bad-2")
    errors = "\n".join(info.value.errors)
    assert "typo (policy1)" in errors and "residence" in errors
    assert "wrong-type (policy2)" in errors
    assert "unknown redaction kinds ['emial']" in errors
    assert "'all' is also the id of policy0" in errors
    assert "obliging-forbid (policy4): @obligation on a forbid" in errors
    assert str(info.value).startswith("policy bundle 'bad-2' is invalid")


@pytest.mark.parametrize(
    "text",
    [
        "",
        "// only a comment\n",
        '@id("t") permit (principal == ?principal, action, resource);',
    ],
)
def test_empty_or_template_bundles_are_refused(text: str) -> None:
    with pytest.raises(BundleInvalid):
        PolicyBundle.parse(text, "v1")


def test_invalid_bundle_leaves_the_engine_as_it_was(engine: PolicyEngine) -> None:
    before = engine.snapshot
    with pytest.raises(BundleInvalid):
        engine.activate(PolicyBundle.parse(ALLOW_ALL + "forbid (principal, action, resource) when { x };", "v9"))
    assert engine.snapshot is before
    assert engine.decide(ask()).policy_version == before.bundle.version


def test_bundle_identity_and_event_payload(bundle: PolicyBundle) -> None:
    assert bundle.policy_ids[:2] == ("ask-allowed", "classification-known") and len(bundle.policy_ids) == 12
    fields = bundle.published_fields()
    assert fields["policy_count"] == 12 and fields["policy_ids"] == list(bundle.policy_ids)
    again = PolicyBundle.from_published(fields["version"], fields["bundle"], fields["content_sha256"])
    assert again.content_sha256 == bundle.content_sha256 and again.policy_ids == bundle.policy_ids
    # Line ends and trailing blanks are not content; anything else is.
    noisy = default_bundle_text().replace("\n", "  \r\n")
    assert PolicyBundle.parse(noisy, "v2").content_sha256 == bundle.content_sha256
    assert canonical_text(noisy) == bundle.text
    edited = PolicyBundle.parse(default_bundle_text().replace("0.05", "0.06"), "v3")
    assert edited.content_sha256 != bundle.content_sha256
    with pytest.raises(BundleInvalid, match="does not match"):
        PolicyBundle.from_published("v4", fields["bundle"], "0" * 64)


def test_policies_without_id_fall_back_to_cedar_ids(store: EntityStore) -> None:
    b = PolicyBundle.parse(
        "permit (principal, action, resource);\nforbid (principal, action, resource) when { false };", "v"
    )
    assert b.policy_ids == ("policy0", "policy1")
    assert PolicyEngine(b, store).decide(ask()).determining_policies == ("policy0",)


# --- attributes ----------------------------------------------------------------------------


def test_attribute_fold_set_overwrite_delete() -> None:
    s0 = EntityStore()
    s1 = apply_attributes(s0, AttributeChange("Tenant", "acme", {"tier": "trial", "residency": "eu"}))
    assert s1.version == 1 and s1.get("Tenant", "acme") == {"tier": "trial", "residency": "eu"}
    s2 = apply_attributes(s1, AttributeChange("Tenant", "acme", {"tier": "enterprise"}))  # replaces the whole entity
    assert s2.version == 2 and s2.get("Tenant", "acme") == {"tier": "enterprise"}
    s3 = apply_attributes(s2, AttributeChange("Model", "m", {"region": "eu", "provider": "sim"}))
    s4 = apply_attributes(s3, AttributeChange("Tenant", "acme", deleted=True))
    assert s4.version == 4 and s4.get("Tenant", "acme") is None and s4.get("Model", "m") is not None
    assert s0.version == 0 and s0.get("Tenant", "acme") is None  # earlier snapshots untouched
    assert s1.get("Tenant", "acme") == {"tier": "trial", "residency": "eu"}
    assert apply_attributes(s4, AttributeChange("Tenant", "acme", deleted=True)) is s4  # nothing to delete
    assert apply_attributes(s3, AttributeChange("Model", "m", {"provider": "sim", "region": "eu"})) is s3
    with pytest.raises(TypeError):
        s4.entities["Tenant"]["x"] = {}  # type: ignore[index]


def test_attribute_values_are_normalised_and_hashed_by_content() -> None:
    a, _ = fold_attributes(
        EntityStore(),
        [
            AttributeChange.from_json("Principal", "p", '{"roles": ["b", "a", "b"], "tool_scopes": []}'),
            AttributeChange("Tenant", "t", {"tier": "x"}),
            AttributeChange("Tenant", "gone", {}),
            AttributeChange("Tenant", "gone", deleted=True),
        ],
    )
    b, _ = fold_attributes(
        EntityStore(),
        [
            AttributeChange("Tenant", "t", {"tier": "x"}),
            AttributeChange("Principal", "p", {"roles": ["a", "b"], "tool_scopes": []}),
        ],
    )
    assert a.get("Principal", "p") == {"roles": ("a", "b"), "tool_scopes": ()}
    assert a.version != b.version and a.digest == b.digest and len(a) == len(b) == 2
    c = apply_attributes(b, AttributeChange("Tenant", "t", {"tier": "y"}))
    assert c.digest != b.digest
    change = AttributeChange("Principal", "p", {"roles": ["b", "a"]})
    assert change.attributes_json() == '{"roles":["a","b"]}'
    assert AttributeChange.from_json("Principal", "p", change.attributes_json()) == AttributeChange(
        "Principal", "p", {"roles": ["a", "b"]}
    )


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (AttributeChange("Tenant", "t", {"residence": "eu"}), "unknown attribute 'residence'"),
        (AttributeChange("Tenant", "t", {"residency": 3}), "expected a string"),
        (AttributeChange("Tenant", "t", {"allowed_classifications": "public"}), "expected an array"),
        (AttributeChange("Principal", "p", {"roles": ["a", 1]}), "expected a string"),
        (AttributeChange("Model", "m", {"region": "eu"}), "missing required attributes ['provider']"),
        (AttributeChange("Robot", "r", {}), "unknown entity type 'Robot'"),
        (AttributeChange("Robot", "r", deleted=True), "unknown entity type 'Robot'"),
        (AttributeChange("Tenant", "", {}), "entity id is empty"),
    ],
)
def test_attribute_records_that_do_not_fit_the_schema_are_refused(change: AttributeChange, needle: str) -> None:
    store = EntityStore()
    with pytest.raises(AttributesInvalid) as info:
        apply_attributes(store, change)
    assert any(needle in e for e in info.value.errors), info.value.errors
    after, rejected = fold_attributes(store, [change, AttributeChange("Tenant", "ok", {})])
    assert [c for c, _ in rejected] == [change] and after.get("Tenant", "ok") == {} and after.version == 1


def test_cedar_decimals_are_exact_and_never_float() -> None:
    assert cedar_decimal("0.05") == Decimal("0.05") and cedar_decimal(3) == Decimal(3)
    assert cedar_decimal(Decimal("0.12340")) == Decimal("0.1234")  # trailing zeros are not places
    for bad in (0.05, "0.00001", "cheap", "1e30", True, None):
        with pytest.raises(ValueError):
            cedar_decimal(bad)


def test_attributes_json_must_be_an_object() -> None:
    with pytest.raises(AttributesInvalid):
        AttributeChange.from_json("Tenant", "t", "[1, 2]")
    with pytest.raises(AttributesInvalid):
        AttributeChange.from_json("Tenant", "t", "{nope")
    assert AttributeChange.from_json("Tenant", "t", "garbage", deleted=True).deleted


def test_engine_applies_attribute_events(bundle: PolicyBundle) -> None:
    engine = PolicyEngine(bundle)
    assert engine.decide(ask("newco")).obligation_list == []
    rejected = engine.apply([AttributeChange("Tenant", "newco", {"residency": "eu"}), AttributeChange("Nope", "x", {})])
    assert len(rejected) == 1 and engine.store.version == 1
    d = engine.decide(ask("newco"))
    assert d.obligation_list == ["region:eu"] and d.attributes_version == 1
    engine.apply(AttributeChange("Tenant", "newco", deleted=True))
    assert engine.decide(ask("newco")).obligation_list == []


def test_principal_is_completed_from_the_request(store: EntityStore) -> None:
    view = EntityView(store)
    alice = view.principal_attributes(ask("acme", "alice", roles={"dev"}, region="us"))
    assert alice == {"tenant": "acme", "roles": ["dev"], "tool_scopes": ["calculator", "web_search"], "region": "eu"}
    stranger = view.principal_attributes(ask("acme", "nobody", roles={"dev"}, region="us"))
    assert stranger == {"tenant": "acme", "roles": ["dev"], "tool_scopes": [], "region": "us"}
    root = view.principal_attributes(ask("acme", "root", roles={"dev"}))
    assert root["roles"] == ["admin", "dev"]


# --- inputs --------------------------------------------------------------------------------

BASE_INPUT = DecisionInput(
    tenant="acme",
    principal="alice",
    roles=frozenset({"dev"}),
    region="eu",
    data_classification="internal",
    tools=frozenset({"web_search"}),
    model="sim-small",
    estimated_cost=Decimal("0.0123"),
    route="/v1/ask",
)
CHANGED: dict[str, Any] = {
    "tenant": "acme2",
    "principal": "alice2",
    "roles": frozenset({"dev", "ops"}),
    "region": "us",
    "data_classification": "restricted",
    "tools": frozenset({"web_search", "calculator"}),
    "model": "sim-large",
    "estimated_cost": Decimal("0.0124"),
    "route": "/v1/chat/completions",
}


def test_input_hash_is_stable() -> None:
    # Any collection of names is taken (and held as a frozenset); the cost is compared by value.
    roles: Any = ["dev"]
    tools: Any = ("web_search",)
    same = DecisionInput("acme", "alice", roles, "eu", "internal", tools, "sim-small", Decimal("0.01230"), "/v1/ask")
    assert same.roles == frozenset({"dev"}) and same.tools == frozenset({"web_search"})
    assert same.sha256() == BASE_INPUT.sha256()
    assert BASE_INPUT.sha256() == hashlib.sha256(BASE_INPUT.canonical_json()).hexdigest()
    assert DecisionInput.from_json(BASE_INPUT.canonical_json()) == BASE_INPUT
    assert BASE_INPUT.canonical_json() == (
        b'{"data_classification":"internal","estimated_cost":"0.0123","model":"sim-small","principal":"alice",'
        b'"region":"eu","roles":["dev"],"route":"/v1/ask","tenant":"acme","tools":["web_search"],"v":1}'
    )


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(DecisionInput)])
def test_input_hash_is_sensitive_to_every_field(name: str) -> None:
    assert set(CHANGED) == {f.name for f in dataclasses.fields(DecisionInput)}
    changed = dataclasses.replace(BASE_INPUT, **{name: CHANGED[name]})
    assert changed.sha256() != BASE_INPUT.sha256()


def test_inputs_refuse_floats_and_bare_strings() -> None:
    with pytest.raises(TypeError, match="never float"):
        DecisionInput("a", "p", estimated_cost=0.01)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        DecisionInput("a", "p", roles="admin")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        DecisionInput("a", "p", estimated_cost=Decimal("-1"))
    with pytest.raises(ValueError):
        DecisionInput("a", "p", estimated_cost=Decimal("1e30"))
    with pytest.raises(ValueError):
        DecisionInput("", "p")
    assert DecisionInput("a", "p", estimated_cost=2).estimated_cost == Decimal(2)  # type: ignore[arg-type]


# --- pre-parsing and atomic swaps ----------------------------------------------------------


class _CountingPolicySet:
    """Stands in for cedarpy.PolicySet to count parses (the real type is a Rust class)."""

    real = cedarpy.PolicySet
    parses = 0

    @classmethod
    def from_str(cls, text: str) -> Any:
        cls.parses += 1
        return cls.real.from_str(text)

    @classmethod
    def from_json_str(cls, text: str) -> Any:
        cls.parses += 1
        return cls.real.from_json_str(text)


def test_policies_and_entities_are_parsed_once(monkeypatch: pytest.MonkeyPatch, store: EntityStore) -> None:
    monkeypatch.setattr(cedarpy, "PolicySet", _CountingPolicySet)
    _CountingPolicySet.parses = 0
    entity_parses: list[str] = []
    real_entities, real_added = cedarpy.Entities.from_json_str, cedarpy.Entities.with_added_json_str

    def counting_entities(s: str, *a: Any, **kw: Any) -> cedarpy.Entities:
        entity_parses.append(s)
        return real_entities(s, *a, **kw)

    def counting_added(self: cedarpy.Entities, delta: str, *a: Any, **kw: Any) -> cedarpy.Entities:
        entity_parses.append(delta)
        return real_added(self, delta, *a, **kw)

    monkeypatch.setattr(cedarpy.Entities, "from_json_str", staticmethod(counting_entities))
    monkeypatch.setattr(cedarpy.Entities, "with_added_json_str", counting_added)
    seen: list[tuple[Any, Any]] = []
    real_batch = cedarpy.is_authorized_batch

    def spy(requests: list[dict[str, Any]], policies: Any, entities: Any, *a: Any, **kw: Any) -> Any:
        seen.append((policies, entities))
        return real_batch(requests, policies, entities, *a, **kw)

    monkeypatch.setattr(cedarpy, "is_authorized_batch", spy)
    engine = PolicyEngine(default_bundle("counted-1"), store)
    parsed = _CountingPolicySet.parses
    assert parsed == 3  # the whole set, and the Ask and UseTool slices
    assert len(entity_parses) == 1  # the models and tools every caller shares
    for cost in range(50):
        assert engine.decide(ask(principal="alice", estimated_cost=Decimal(cost) / 100, tools={"web_search"})).allow
    assert _CountingPolicySet.parses == parsed and len(entity_parses) == 2
    slices = engine.bundle.slices.generic
    assert {id(p) for p, _ in seen} == {id(slices["Ask"]), id(slices["UseTool"])}
    assert len({id(e) for _, e in seen}) == 1 and isinstance(seen[0][1], cedarpy.Entities)
    engine.decide(ask(principal="carol"))
    assert len(entity_parses) == 3 and engine.snapshot.view.parses == 2
    engine.apply(AttributeChange("Tenant", "acme", {"tier": "trial"}))  # a new attribute version: new entities
    engine.decide(ask(principal="alice", tools={"web_search"}))
    assert len(entity_parses) == 5 and _CountingPolicySet.parses == parsed


def test_slices_decide_as_the_whole_set(store: EntityStore) -> None:
    """Cutting the bundle by action and `resource ==` scope changes no decision, reason or error."""
    text = default_bundle_text() + "".join(
        [
            '@id("acme-no-large") forbid (principal, action == Ledgerflow::Action::"Ask",'
            ' resource == Ledgerflow::Tenant::"acme") when { context.model_hint == "sim-large" };\n',
            '@id("acme-cap") @obligation("max_cost:1") permit (principal,'
            ' action in [Ledgerflow::Action::"Ask"], resource == Ledgerflow::Tenant::"acme");\n',
            '@id("eu-only-calc") forbid (principal, action == Ledgerflow::Action::"UseTool",'
            ' resource == Ledgerflow::Tool::"calculator") when { context.route == "/eu" };\n',
            '@id("both") forbid (principal, action in [Ledgerflow::Action::"Ask", Ledgerflow::Action::"UseTool"],'
            ' resource) when { context.route == "/blocked" };\n',
            '@id("errs") forbid (principal, action, resource == Ledgerflow::Tenant::"eu-co")'
            ' when { 9223372036854775807 + (if context.route == "/overflow" then 1 else 0) < 0 };\n',
        ]
    )
    b = PolicyBundle.parse(text, "sliced-1")
    assert ("Ask", "Ledgerflow::Tenant", "acme") in b.slices.specific
    assert ("UseTool", "Ledgerflow::Tool", "calculator") in b.slices.specific
    view = EntityView(store)
    checked = 0
    for tenant in ("acme", "eu-co", "trial-co", "other"):
        for route in ("/v1/ask", "/eu", "/blocked", "/overflow"):
            for model in ("", "sim-large", "sim-eu"):
                inp = ask(tenant, "alice", route=route, model=model, tools={"calculator", "web_search"})
                requests = policy_engine.cedar_requests(inp)
                whole = cedarpy.is_authorized_batch(requests, b.policy_set, view.entities_for(inp))
                sliced = policy_engine._authorize(b, requests, view.entities_for(inp))
                for w, s in zip(whole, sliced, strict=True):
                    assert w.decision == s.decision
                    assert sorted(w.diagnostics.reasons) == sorted(s.diagnostics.reasons)
                    assert sorted(w.diagnostics.errors) == sorted(s.diagnostics.errors)
                checked += 1
    assert checked == 48


def test_a_decision_reads_one_snapshot(monkeypatch: pytest.MonkeyPatch, store: EntityStore) -> None:
    """A swap landing in the middle of a decision does not mix the old bundle with the new attributes."""
    a = PolicyBundle.parse(ALLOW_ALL, "a")
    b = PolicyBundle.parse(DENY_ALL, "b")
    engine = PolicyEngine(a, store)
    store_b = apply_attributes(store, AttributeChange("Tenant", "acme", {"residency": "eu"}))
    real_batch = cedarpy.is_authorized_batch
    swapped: list[bool] = []

    def swap_midway(*args: Any, **kw: Any) -> Any:
        if not swapped:
            swapped.append(True)
            engine.swap(bundle=b, store=store_b)
        return real_batch(*args, **kw)

    monkeypatch.setattr(cedarpy, "is_authorized_batch", swap_midway)
    first = engine.decide(ask(tools={"x"}))
    assert swapped and first.allow and (first.policy_version, first.attributes_version) == ("a", store.version)
    second = engine.decide(ask(tools={"x"}))
    assert not second.allow and (second.policy_version, second.attributes_version) == ("b", store_b.version)


def test_concurrent_swaps_never_show_a_half_swapped_engine(store: EntityStore) -> None:
    a = PolicyBundle.parse(ALLOW_ALL, "a")
    b = PolicyBundle.parse(DENY_ALL, "b")
    store_b = apply_attributes(store, AttributeChange("Tenant", "acme", {"residency": "eu"}))
    pairs = {("a", store.version): True, ("b", store_b.version): False}
    engine = PolicyEngine(a, store)
    stop = threading.Event()

    def flip() -> None:
        while not stop.is_set():
            engine.swap(bundle=b, store=store_b)
            engine.swap(bundle=a, store=store)

    writer = threading.Thread(target=flip)
    writer.start()
    try:
        seen = set()
        for i in range(1500):
            d = engine.decide(ask(principal=f"p{i % 7}"))
            key = (d.policy_version, d.attributes_version)
            assert key in pairs and d.allow is pairs[key], key
            seen.add(key)
    finally:
        stop.set()
        writer.join()
    assert seen == set(pairs)  # both states were observed, so the swaps did interleave


def test_hot_reload_and_rollback(engine: PolicyEngine, bundle: PolicyBundle) -> None:
    strict = PolicyBundle.parse(default_bundle_text() + "\n" + DENY_ALL.replace('"all"', '"all-2"'), "strict-2")
    assert engine.decide(ask()).allow
    engine.activate(strict)
    d = engine.decide(ask())
    assert not d.allow and d.policy_version == "strict-2" and d.determining_policies == ("none",)
    engine.activate(PolicyBundle.from_published(bundle.version, bundle.text, bundle.content_sha256))  # rollback
    assert engine.decide(ask()).allow and engine.policy_version == bundle.version


def test_evaluation_errors_fail_closed(store: EntityStore) -> None:
    overflow = (
        ALLOW_ALL + '@id("overflows") forbid (principal, action, resource) '
        'when { 9223372036854775807 + (if context.route == "/overflow" then 1 else 0) < 0 };'
    )
    b = PolicyBundle.parse(overflow, "err-1")
    closed = PolicyEngine(b, store).decide(ask(route="/overflow"))
    assert not closed.allow and closed.determining_policies == ("overflows",)
    assert closed.errors and "overflows" in closed.errors[0] and "failing closed" in closed.reasons[0]
    opened = PolicyEngine(b, store, fail_closed=False).decide(ask(route="/overflow"))
    assert opened.allow and opened.errors
    assert PolicyEngine(b, store).decide(ask()).allow


# --- dry-run, diff and shadow --------------------------------------------------------------

CLASSES = ("public", "internal", "confidential", "restricted")
COSTS = (Decimal("0.01"), Decimal("0.2"))


def generated_inputs(n: int) -> Iterator[DecisionInput]:
    for i in range(n):
        yield DecisionInput(
            tenant=("acme", "trial-co", "eu-co")[i % 3],
            principal=f"user-{i % 11}",
            roles=frozenset({"dev"}),
            data_classification=CLASSES[i % 4],
            estimated_cost=COSTS[(i // 4) % 2],
            route="/v1/ask",
        )


def candidate_bundle() -> PolicyBundle:
    text = default_bundle_text()
    text = text.replace('greaterThan(decimal("0.05"))', 'greaterThan(decimal("0.5"))')  # trial ceiling raised
    text = text.replace('@obligation("redact:email,phone,card_number,iban,ip_address")', '@obligation("redact:email")')
    text += (
        '\n@id("no-confidential")\nforbid (principal, action == Ledgerflow::Action::"Ask", resource)\n'
        'when { context.data_classification == "confidential" };\n'
    )
    return PolicyBundle.parse(text, "candidate-2")


def expected_flips(inputs: list[DecisionInput]) -> dict[str, int]:
    """The flips the candidate's three edits must cause, counted from the inputs alone."""
    trial_over = [i for i in inputs if i.tenant == "trial-co" and i.estimated_cost > Decimal("0.05")]
    return {
        ALLOW_TO_DENY: sum(1 for i in inputs if i.data_classification == "confidential" and i not in trial_over),
        DENY_TO_ALLOW: sum(1 for i in trial_over if i.data_classification != "confidential"),
        OBLIGATIONS_CHANGED: sum(1 for i in inputs if i.data_classification == "restricted" and i not in trial_over),
    }


def test_diff_reports_expected_flips(bundle: PolicyBundle, store: EntityStore) -> None:
    inputs = list(generated_inputs(360))
    expected = expected_flips(inputs)
    assert all(expected.values())
    report = diff(bundle, candidate_bundle(), inputs, store, examples=4)
    assert report.evaluated == 360 and dict(report.counts) == expected
    assert report.flipped == sum(expected.values()) and report.unchanged == 360 - report.flipped
    assert dict(report.by_policy[ALLOW_TO_DENY]) == {"no-confidential": expected[ALLOW_TO_DENY]}
    assert dict(report.by_policy[DENY_TO_ALLOW]) == {"trial-cost-ceiling": expected[DENY_TO_ALLOW]}
    assert dict(report.by_policy[OBLIGATIONS_CHANGED]) == {"restricted-redact": expected[OBLIGATIONS_CHANGED]}
    for kind, examples in report.examples.items():
        assert len(examples) == 4
        for ex in examples:
            assert ex.divergence.kind == kind and ex.divergence.active.input_sha256 == ex.input.sha256()
            again = evaluate(bundle, EntityView(store), ex.input)
            assert again.allow == ex.divergence.active.allow and again.obligations == ex.divergence.active.obligations
    restricted = report.examples[OBLIGATIONS_CHANGED][0].divergence
    assert restricted.candidate.obligation_list == ["redact:email"] + (
        ["region:eu"] if restricted.candidate.obligations.regions else []
    )
    doc = report.to_dict()
    assert doc["counts"] == expected and len(doc["examples"][ALLOW_TO_DENY]) == 4
    assert "no-confidential" in "\n".join(report.lines())


def test_diff_of_a_bundle_with_itself_is_empty(bundle: PolicyBundle, store: EntityStore) -> None:
    report = diff(bundle, default_bundle("same-again"), generated_inputs(120), store)
    assert report.evaluated == 120 and report.flipped == 0 and all(not v for v in report.examples.values())


def test_shadow_reports_divergence_or_none(bundle: PolicyBundle, store: EntityStore) -> None:
    cand = candidate_bundle()
    assert shadow(bundle, cand, store, ask(data_classification="internal")) is None
    div = shadow(bundle, cand, store, ask(data_classification="confidential"))
    assert div is not None and div.kind == ALLOW_TO_DENY and div.policies == ("no-confidential",)
    engine = PolicyEngine(bundle, store, shadow=cand)
    inp = ask(data_classification="confidential")
    active, found = engine.decide_with_shadow(inp)
    assert active.allow and found is not None
    fields = found.shadow_fields()
    assert fields["active_decision"] == "allow" and fields["candidate_decision"] == "deny"
    assert fields["candidate_policies"] == ["no-confidential"] and fields["input_sha256"] == inp.sha256()
    assert fields["active_version"] == bundle.version and fields["candidate_version"] == "candidate-2"
    engine.set_shadow(None)
    assert engine.decide_with_shadow(inp)[1] is None


def test_compare_ignores_explanation_only_changes(engine: PolicyEngine) -> None:
    d = engine.decide(ask())
    renamed = dataclasses.replace(d, determining_policies=("other-name",), policy_version="v2")
    assert compare(d, renamed) is None
    denied = dataclasses.replace(d, allow=False, determining_policies=())
    assert compare(denied, dataclasses.replace(denied, reasons=("x",))) is None
    flip = compare(d, denied)
    assert flip is not None and flip.policies == ("(no policy)",)


def test_entity_view_cache_is_keyed_by_what_entities_depend_on(store: EntityStore) -> None:
    view = EntityView(store)
    first = view.entities_for(ask(principal="alice", route="/a"))
    same = [
        ask(principal="alice", data_classification=cls, estimated_cost=Decimal(cost), route="/r")
        for cost in ("0.01", "0.02")
        for cls in CLASSES
    ]
    # The context, a stored model, the tools, and the region of a principal with a stored one do not matter.
    same += [
        ask(principal="alice", model="sim-eu"),
        ask(principal="alice", tools={"shell"}),
        ask(principal="alice", region="us"),
    ]
    assert all(view.entities_for(inp) is first for inp in same) and view.parses == 1
    others = [ask(principal="alice", model="not-in-store"), ask(principal="alice", roles={"x"}), ask("t2", "alice")]
    others += [
        ask(principal="bob"),
        ask(principal="bob", region="us"),
    ]  # bob has no stored region: the request's counts
    assert all(view.entities_for(inp) is not first for inp in others) and view.parses == 6
