"""The event catalogue and its evolution policy (schemas/avro/EVOLUTION.md), enforced.

(a) every released version's sample decodes with today's reader; (b) today's events decode
with every released reader; (c) a schema that differs from its latest fixture, or has none,
fails here; (d) breaking changes made to in-memory copies are caught.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import itertools
import json
import shutil
import typing
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from streams import events
from streams.codec import MAGIC, Codec, validate_envelope
from streams.events import EVENT_TYPES, Envelope, Event
from streams.evolution import (
    FREEZE_HINT,
    SINGLE_OBJECT_MAGIC,
    Fixture,
    breaking_changes,
    difference,
    encode,
    fixture_problems,
    load_fixtures,
    released_writers,
    resolve,
    sample_record,
    schema_from_raw,
)
from streams.schemas import SCHEMA_DIR, EventSchema, load_all
from tests import factories

REPO = Path(__file__).resolve().parents[1]
CODEC = Codec()
SCHEMAS = load_all()
FIXTURES = load_fixtures()
RELEASES = [(name, f.version) for name, versions in sorted(FIXTURES.items()) for f in versions]
ENVELOPE_FIELD = {"name": "envelope", "type": "ledgerflow.events.Envelope", "doc": "Common header."}
IRREGULAR_PAST = {"RouteChosen", "BudgetSet", "MemoryWritten", "PolicyAttributesSet"}
SECRET_NAMES = {"secret", "password", "api_key", "key", "token", "prompt", "content", "text", "email", "message"}


def _fixture(name: str, version: int) -> Fixture:
    return next(f for f in FIXTURES[name] if f.version == version)


def _to_event(name: str, record: dict[str, Any]) -> Event:
    """What the codec builds from a decoded record (kept here so the test does not reach into it)."""
    record = dict(record)
    env = Envelope(**record.pop("envelope"))
    validate_envelope(env, name)
    return EVENT_TYPES[name](envelope=env, **record)


# --- the catalogue --------------------------------------------------------------------------


def test_issue_3_catalogue_is_complete() -> None:
    wanted = {
        *("RequestReceived", "RequestRedacted", "PolicyDecided", "PolicyPublished", "RouteChosen"),
        *("AdapterCalled", "AdapterFailed", "TokensCharged", "PriceListPublished", "BudgetSet"),
        *("BudgetReserved", "BudgetSettled", "BudgetReleased", "BudgetThresholdCrossed", "AuditRecorded"),
        *("LedgerEntryChained", "LedgerCheckpointSigned", "DpBudgetGranted", "DpQueryCharged"),
        *("DpReleasePublished", "RoutingPriorsPublished", "FeedbackReceived", "MemoryWritten"),
        *("MemoryErased", "ApiKeyIssued", "ApiKeyRevoked", "SubjectErasureRequested", "TenantTotalsUpdated"),
        *("PolicyAttributesSet", "PolicyShadowDiverged"),  # issue 5
        *("SavingsSnapshotted", "CostAnomalyDetected", "SpendForecasted", "BudgetVarianceAlerted"),  # issue 7
        *("DpQueryRequested", "DpQueryRefused"),  # issue 8
        "RoutingRegretRecorded",  # issue 9
        "ConsumerLagSampled",  # issue 11 (metrics)
        *("RequestCompleted", "SloBurnRateAlerted"),  # issue 11 (SLOs)
        "LedgerVerified",  # issue 6 (audit verify results)
    }
    assert set(SCHEMAS) == wanted == set(EVENT_TYPES) == set(factories.BUILDERS)


def _walk_records(schema: Any) -> typing.Iterator[dict[str, Any]]:
    if isinstance(schema, list):
        for s in schema:
            yield from _walk_records(s)
    elif isinstance(schema, dict):
        if schema.get("type") == "record":
            yield schema
            for f in schema["fields"]:
                yield from _walk_records(f["type"])
        else:
            for key in ("type", "items", "values"):
                if isinstance(schema.get(key), dict | list):
                    yield from _walk_records(schema[key])


def _walk_types(schema: Any) -> typing.Iterator[Any]:
    yield schema
    if isinstance(schema, list):
        for s in schema:
            yield from _walk_types(s)
    elif isinstance(schema, dict):
        for f in schema.get("fields", []):
            yield from _walk_types(f["type"])
        for key in ("type", "items", "values"):
            if isinstance(schema.get(key), dict | list):
                yield from _walk_types(schema[key])


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_schema_follows_the_conventions(name: str) -> None:
    raw = json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())
    assert raw["namespace"] == "ledgerflow.events"
    assert raw["name"] == name and (name.endswith("ed") or name in IRREGULAR_PAST), "past tense"
    first = raw["fields"][0]
    assert first == ENVELOPE_FIELD or (name == "TenantTotalsUpdated" and first["type"] == ENVELOPE_FIELD["type"])
    for record in _walk_records(SCHEMAS[name].raw):
        assert record.get("doc"), f"{record['name']} has no doc"
        for f in record["fields"]:
            assert f.get("doc"), f"{record['name']}.{f['name']} has no doc"
            assert f["name"] not in SECRET_NAMES, f"{record['name']}.{f['name']}: events carry hashes, not secrets"
            if isinstance(f["type"], list):
                assert f["type"][0] == "null" and len(f["type"]) == 2, f"{f['name']}: optional is [null, X]"
                assert f.get("default", "missing") is None, f"{f['name']}: optional defaults to null"
    for t in _walk_types(SCHEMAS[name].raw):
        if isinstance(t, dict) and t.get("logicalType") == "decimal":
            assert (t["type"], t["precision"], t["scale"]) == ("bytes", 38, 12), "money is decimal(38, 12)"
        if isinstance(t, dict) and t.get("logicalType", "").startswith("timestamp"):
            assert (t["type"], t["logicalType"]) == ("long", "timestamp-micros")
        assert _kind_name(t) != "enum", "strings, not enums: a new symbol would break old readers"


def _kind_name(t: Any) -> str:
    return str(t.get("type")) if isinstance(t, dict) else str(t)


@pytest.mark.parametrize("name", sorted(EVENT_TYPES))
def test_every_event_type_round_trips(name: str) -> None:
    event = factories.BUILDERS[name]()
    assert type(event) is EVENT_TYPES[name] and event.event_type == name
    data = CODEC.encode(event)
    assert data[:2] == MAGIC
    assert CODEC.decode(data) == event


@pytest.mark.parametrize(
    ("typed", "record"), [(events.RouteCandidate, "RouteCandidate"), (events.ModelPrice, "ModelPrice")]
)
def test_nested_records_match_their_typed_dicts(typed: type, record: str) -> None:
    found = [r for s in SCHEMAS.values() for r in _walk_records(s.raw) if r["name"] == record]
    assert found
    assert list(typing.get_type_hints(typed)) == [f["name"] for f in found[0]["fields"]]


# --- (c) a changed or unreleased schema fails CI ------------------------------------------


def test_every_schema_matches_its_latest_fixture() -> None:
    problems = fixture_problems(SCHEMAS, FIXTURES)
    assert not problems, "\n".join(problems)


def test_fixtures_are_what_the_freezer_writes() -> None:
    for name, versions in FIXTURES.items():
        for f in versions:
            assert f.raw["name"] == name
            assert f.sample is not None and f.sample[2:10] == f.schema.fingerprint
    assert SINGLE_OBJECT_MAGIC == MAGIC
    assert set(released_writers()) >= {s.fingerprint for s in SCHEMAS.values()}


def _with(name: str, raw: dict[str, Any]) -> dict[str, EventSchema]:
    return {**SCHEMAS, name: schema_from_raw(raw)}


def test_a_changed_schema_without_a_new_fixture_fails() -> None:
    raw = copy.deepcopy(SCHEMAS["TokensCharged"].raw)
    raw["fields"].append({"name": "region", "type": ["null", "string"], "default": None, "doc": "d"})
    problems = fixture_problems(_with("TokensCharged", raw), FIXTURES)
    assert len(problems) == 1
    assert "TokensCharged" in problems[0] and "canonical form" in problems[0] and FREEZE_HINT in problems[0]


def test_a_logical_type_change_fails_though_the_canonical_form_is_the_same() -> None:
    raw = copy.deepcopy(SCHEMAS["TokensCharged"].raw)
    cost = next(f for f in raw["fields"] if f["name"] == "cost")
    cost["type"] = dict(cost["type"], scale=6)
    assert schema_from_raw(raw).fingerprint == SCHEMAS["TokensCharged"].fingerprint  # Avro cannot tell
    problems = fixture_problems(_with("TokensCharged", raw), FIXTURES)
    assert len(problems) == 1 and "logical types" in problems[0] and FREEZE_HINT in problems[0]


def test_a_doc_change_is_not_a_new_version() -> None:
    raw = copy.deepcopy(SCHEMAS["TokensCharged"].raw)
    raw["fields"][1]["doc"] = "Reworded."
    assert difference(raw, FIXTURES["TokensCharged"][-1].raw) is None


def test_a_schema_without_fixture_fails_and_a_fixture_without_schema_too() -> None:
    fixtures = {k: v for k, v in FIXTURES.items() if k != "RouteChosen"}
    problems = fixture_problems(SCHEMAS, fixtures)
    assert problems == [f"RouteChosen: no fixture in fixtures/RouteChosen/; {FREEZE_HINT}"]
    schemas = {k: v for k, v in SCHEMAS.items() if k != "MemoryErased"}
    assert ["never remove an event" in p for p in fixture_problems(schemas, FIXTURES)] == [True]


# --- (a) old data, today's reader; (b) today's data, old readers --------------------------


@pytest.mark.parametrize(("name", "version"), RELEASES)
def test_released_sample_decodes_with_todays_reader(name: str, version: int) -> None:
    fixture = _fixture(name, version)
    assert fixture.sample is not None
    record = resolve(fixture.sample, fixture.schema, SCHEMAS[name])
    event = _to_event(name, record)
    assert event.envelope.event_type == name


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_todays_events_decode_with_every_released_reader(name: str) -> None:
    today = SCHEMAS[name]
    samples = [encode(today, sample_record(today)), CODEC.encode(factories.BUILDERS[name]())]
    for fixture in FIXTURES[name]:
        for data in samples:
            record = resolve(data, today, fixture.schema)
            assert record["envelope"]["event_type"] == name


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_each_release_keeps_the_static_rules(name: str) -> None:
    chain = [f.raw for f in FIXTURES[name]] + [SCHEMAS[name].raw]
    for old, new in itertools.pairwise(chain):
        assert breaking_changes(old, new) == []


# --- (d) breaking changes are caught (on in-memory copies) ----------------------------------


def _released() -> Fixture:
    return FIXTURES["TokensCharged"][-1]


def _edited(edit: typing.Callable[[list[dict[str, Any]]], None]) -> EventSchema:
    raw = copy.deepcopy(SCHEMAS["TokensCharged"].raw)
    edit(raw["fields"])
    return schema_from_raw(raw)


def _field(fields: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(f for f in fields if f["name"] == name)


def _resolution_failures(new: EventSchema) -> list[str]:
    """The two checks the tests above run for a release, applied to a candidate `new`."""
    old = _released()
    assert old.sample is not None
    failures = []
    for label, data, writer, reader in (
        ("old data, new reader", old.sample, old.schema, new),
        ("new data, old reader", encode(new, sample_record(new)), new, old.schema),
    ):
        try:
            resolve(data, writer, reader)
        except Exception as exc:
            failures.append(f"{label}: {exc}")
    return failures


def test_removing_a_field_breaks_old_readers() -> None:
    new = _edited(lambda fs: fs.remove(_field(fs, "currency")))
    failures = _resolution_failures(new)
    assert len(failures) == 1 and failures[0].startswith("new data, old reader") and "currency" in failures[0]
    assert breaking_changes(_released().raw, new.raw) == ["TokensCharged.currency: field removed"]


def test_changing_a_type_breaks_new_readers() -> None:
    new = _edited(lambda fs: _field(fs, "prompt_tokens").update(type="string"))
    failures = _resolution_failures(new)
    assert failures and failures[0].startswith("old data, new reader")
    assert breaking_changes(_released().raw, new.raw) == [
        "TokensCharged.prompt_tokens: type changed from int to string"
    ]


def test_promoting_a_type_still_breaks_old_readers() -> None:
    new = _edited(lambda fs: _field(fs, "prompt_tokens").update(type="long"))  # Avro-legal promotion
    failures = _resolution_failures(new)
    assert [f.split(":")[0] for f in failures] == ["new data, old reader"]
    assert breaking_changes(_released().raw, new.raw) == ["TokensCharged.prompt_tokens: type changed from int to long"]


def test_adding_a_field_without_default_breaks_new_readers() -> None:
    new = _edited(lambda fs: fs.append({"name": "region", "type": "string", "doc": "d"}))
    failures = _resolution_failures(new)
    assert [f.split(":")[0] for f in failures] == ["old data, new reader"] and "region" in failures[0]
    assert breaking_changes(_released().raw, new.raw) == ["TokensCharged.region: field added without a default"]


def test_renaming_with_an_alias_still_breaks_old_readers_of_a_required_field() -> None:
    new = _edited(lambda fs: _field(fs, "model").update(name="model_name", aliases=["model"]))
    failures = _resolution_failures(new)
    assert [f.split(":")[0] for f in failures] == ["new data, old reader"]
    assert breaking_changes(_released().raw, new.raw) == []  # the alias is honoured; (b) is what catches it


def test_removing_a_defaulted_field_resolves_but_the_static_rule_catches_it() -> None:
    audit = FIXTURES["AuditRecorded"][-1]
    raw = copy.deepcopy(SCHEMAS["AuditRecorded"].raw)
    raw["fields"] = [f for f in raw["fields"] if f["name"] != "details"]
    new = schema_from_raw(raw)
    assert audit.sample is not None
    resolve(audit.sample, audit.schema, new)  # silently drops details
    assert resolve(encode(new, sample_record(new)), new, audit.schema)["details"] == {}  # old reader: default
    assert breaking_changes(audit.raw, raw) == ["AuditRecorded.details: field removed"]


def test_a_decimal_scale_change_misreads_money_silently_but_is_caught() -> None:
    new = _edited(lambda fs: _field(fs, "cost").update(type=dict(_field(fs, "cost")["type"], scale=6)))
    old = _released()
    assert old.sample is not None
    assert new.fingerprint == old.schema.fingerprint  # so a reader cannot tell which version wrote the bytes
    before = resolve(old.sample, old.schema, old.schema)["cost"]
    after = resolve(old.sample, new, new)["cost"]  # no error...
    assert after == before * Decimal(10) ** 6  # ...a million times the money
    assert breaking_changes(old.raw, new.raw) == [
        "TokensCharged.cost: logical type changed from ('decimal', 38, 12) to ('decimal', 38, 6)"
    ]


def test_a_nested_record_change_is_caught_because_samples_are_fully_populated() -> None:
    raw = copy.deepcopy(SCHEMAS["RouteChosen"].raw)
    candidate = _field(raw["fields"], "candidates")["type"]["items"]
    _field(candidate["fields"], "score").update(type="string")
    old = FIXTURES["RouteChosen"][-1]
    assert old.sample is not None
    with pytest.raises(Exception, match="double is not string"):
        resolve(old.sample, old.schema, schema_from_raw(raw))
    assert breaking_changes(old.raw, raw) == ["RouteChosen.candidates[].score: type changed from double to string"]


def test_adding_a_field_with_a_default_is_compatible() -> None:
    new = _edited(lambda fs: fs.append({"name": "region", "type": ["null", "string"], "default": None, "doc": "d"}))
    assert _resolution_failures(new) == []
    assert breaking_changes(_released().raw, new.raw) == []
    assert difference(new.raw, _released().raw) == "its parsing canonical form differs"


# --- the freezer ----------------------------------------------------------------------------


def _freezer() -> Any:
    spec = importlib.util.spec_from_file_location("freeze_schemas", REPO / "scripts" / "freeze_schemas.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _schema_dir(tmp: Path, name: str, edit: typing.Callable[[dict[str, Any]], None] | None = None) -> Path:
    out = tmp / name
    out.mkdir()
    shutil.copy(SCHEMA_DIR / "Envelope.avsc", out)
    raw = json.loads((SCHEMA_DIR / "FeedbackReceived.avsc").read_text())
    if edit:
        edit(raw)
    (out / "FeedbackReceived.avsc").write_text(json.dumps(raw))
    return out


def test_freezer_releases_compatible_changes_and_refuses_breaking_ones(tmp_path: Path) -> None:
    freeze = _freezer().main
    fixtures = tmp_path / "fixtures"
    v1 = _schema_dir(tmp_path, "v1")
    assert freeze(["--schemas", str(v1), "--fixtures", str(fixtures), "--check"]) == 1
    assert freeze(["--schemas", str(v1), "--fixtures", str(fixtures)]) == 0
    assert sorted(p.name for p in (fixtures / "FeedbackReceived").iterdir()) == ["v1.avsc", "v1.bin"]
    assert freeze(["--schemas", str(v1), "--fixtures", str(fixtures), "--check"]) == 0

    def add(raw: dict[str, Any]) -> None:
        raw["fields"].append({"name": "model", "type": ["null", "string"], "default": None, "doc": "d"})

    v2 = _schema_dir(tmp_path, "v2", add)
    assert freeze(["--schemas", str(v2), "--fixtures", str(fixtures)]) == 0
    released = load_fixtures(fixtures)["FeedbackReceived"]
    assert [f.version for f in released] == [1, 2] and released[1].raw == load_all(v2)["FeedbackReceived"].raw

    def drop(raw: dict[str, Any]) -> None:
        raw["fields"] = [f for f in raw["fields"] if f["name"] != "score"]

    v3 = _schema_dir(tmp_path, "v3", drop)
    assert freeze(["--schemas", str(v3), "--fixtures", str(fixtures)]) == 1
    assert not (fixtures / "FeedbackReceived" / "v3.avsc").exists()


def test_event_dataclasses_are_frozen_and_slotted() -> None:
    for cls in EVENT_TYPES.values():
        params = cls.__dataclass_params__  # type: ignore[attr-defined]
        assert params.frozen and hasattr(cls, "__slots__"), cls.__name__
        assert dataclasses.fields(cls)[0].name == "envelope"
