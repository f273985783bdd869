from __future__ import annotations

import dataclasses
from decimal import Decimal

import pytest

from streams.codec import MAGIC, Codec, PoisonEvent
from streams.events import EVENT_TYPES, PolicyDecided
from streams.schemas import load_all
from tests import factories

CODEC = Codec()


def test_every_schema_has_a_dataclass_with_the_same_fields() -> None:
    schemas = load_all()
    assert set(schemas) == set(EVENT_TYPES)
    for name, schema in schemas.items():
        avro_fields = [f["name"] for f in schema.raw["fields"]]
        py_fields = [f.name for f in dataclasses.fields(EVENT_TYPES[name])]
        assert sorted(avro_fields) == sorted(py_fields), name
        for f in schema.raw["fields"]:
            assert f.get("doc"), f"{name}.{f['name']} has no doc"


@pytest.mark.parametrize("make", [factories.charge, factories.request, factories.decision, factories.audit])
def test_round_trip(make: object) -> None:
    event = make()  # type: ignore[operator]
    data = CODEC.encode(event)
    assert data[:2] == MAGIC
    assert CODEC.decode(data) == event


def test_money_is_exact_decimal() -> None:
    event = factories.charge(cost="12345678901234567890.123456789012")
    back = CODEC.decode(CODEC.encode(event))
    assert isinstance(back.cost, Decimal)  # type: ignore[attr-defined]
    assert back.cost == Decimal("12345678901234567890.123456789012")  # type: ignore[attr-defined]


def test_more_than_12_places_is_refused_not_rounded() -> None:
    with pytest.raises(ValueError):
        CODEC.encode(factories.charge(cost="0.0000000000001"))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b"", "not-single-object-encoding"),
        (lambda b: b"{}", "not-single-object-encoding"),
        (lambda b: b[:2] + b"\x00" * 8 + b[10:], "unknown-fingerprint"),
        (lambda b: b[:-5], "undecodable-body"),
        (lambda b: b + b"\x00", "trailing-bytes"),
    ],
)
def test_poison_has_a_reason(mutate: object, reason: str) -> None:
    good = CODEC.encode(factories.charge())
    with pytest.raises(PoisonEvent) as exc:
        CODEC.decode(mutate(good))  # type: ignore[operator]
    assert exc.value.reason == reason


def test_missing_tenant_is_poison() -> None:
    event = factories.charge(tenant=" ")
    with pytest.raises(PoisonEvent) as exc:
        CODEC.decode(CODEC.encode(event))
    assert exc.value.reason == "missing-tenant"


def test_malformed_id_is_poison() -> None:
    event = factories.charge()
    bad = dataclasses.replace(event, envelope=dataclasses.replace(event.envelope, event_id="nope"))
    with pytest.raises(PoisonEvent) as exc:
        CODEC.decode(CODEC.encode(bad))
    assert exc.value.reason == "malformed-id"


def test_ids_of_35_and_37_characters_are_poison_though_they_join_into_two_canonical_ones() -> None:
    """Review finding: the fast check compared event_id + correlation_id as one 72-character
    string, so a 35- and a 37-character id that line up passed (the reference path refuses)."""
    event = factories.charge()
    env = dataclasses.replace(
        event.envelope,
        event_id="12345678-1234-1234-1234-12345678901",
        correlation_id="a12345678-1234-1234-1234-123456789012",
    )
    bad = CODEC.encode(dataclasses.replace(event, envelope=env))
    for codec in (CODEC, Codec(fast=False)):
        with pytest.raises(PoisonEvent) as exc:
            codec.decode(bad)
        assert exc.value.reason == "malformed-id"


def test_bytes_of_an_earlier_release_decode_into_todays_event() -> None:
    """Facts are kept forever: PolicyDecided v1 bytes (before obligations) still read, with defaults."""
    from streams.evolution import load_fixtures

    v1 = load_fixtures()["PolicyDecided"][0]
    assert v1.version == 1 and v1.schema.fingerprint != load_all()["PolicyDecided"].fingerprint
    event = Codec().decode(v1.sample)
    assert isinstance(event, PolicyDecided)
    assert event.obligations == [] and event.denied_tool is None
    assert event.decision  # the v1 payload itself came through
    with pytest.raises(PoisonEvent, match="unknown-fingerprint"):
        Codec(released={}).decode(v1.sample)


def test_an_events_own_check_failing_is_poison_not_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    """An event's `__post_init__` runs after its body is read; a ValueError or TypeError it raises
    must reach consumers as PoisonEvent (dead-lettered with a reason), on the compiled path too."""
    from streams import codec as codec_module
    from streams.events import ConsumerLagSampled

    good = CODEC.encode(factories.consumer_lag())

    @dataclasses.dataclass(frozen=True, slots=True)
    class Checked(ConsumerLagSampled):
        def __post_init__(self) -> None:
            if self.lag >= 0:
                raise ValueError("lag must not be negative")

    monkeypatch.setitem(codec_module.EVENT_TYPES, "ConsumerLagSampled", Checked)
    codec = codec_module.Codec()  # compiles its readers against the checked class
    for data in (good, bytearray(good)):
        with pytest.raises(PoisonEvent) as exc:
            codec.decode(data)  # type: ignore[arg-type]
        assert exc.value.reason == "invalid-value" and "lag must not be negative" in str(exc.value)
