"""The compiled encoder (streams.avro_write) against fastavro's writer, byte for byte.

- random events of every schema: `Codec.encode` (compiled) gives the bytes of
  `Codec.encode_reference` (fastavro over `to_record()`), and they decode back to the event;
- synthetic schemas (enums, fixed, floats, decimals, other logical types, maps, arrays of
  records, unions) with random values: the compiled writer against `schemaless_writer`;
  what it does not compile (multi-branch unions, recursion) says NotCompilable;
- odd values the compiled writer refuses (a bool or a float for an int, an int for a double,
  a naive or non-UTC time, bytearray, a union value in tuple notation, a missing key):
  `Codec.encode` still gives exactly fastavro's bytes, or fastavro's exception.
"""

from __future__ import annotations

import dataclasses
import io
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.avro_write import NotCompilable, compile_writer
from streams.codec import Codec
from streams.events import EVENT_TYPES, Event
from streams.schemas import load_all
from tests import factories
from tests.test_codec_fast import ENVELOPES, SYNTHETIC, event_of, named_types, same, values

SCHEMAS = load_all()
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FAST = Codec()
REF = Codec(fast=False)


def fastavro_bytes(parsed: Any, value: Any) -> bytes:
    buf = io.BytesIO()
    schemaless_writer(buf, parsed, value)
    return buf.getvalue()


def outcome(fn: Any) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except Exception as exc:
        return "error", type(exc)


def test_every_event_schema_gets_a_compiled_writer_and_the_reference_codec_none() -> None:
    assert set(FAST._writers) == set(SCHEMAS)
    assert not REF._writers


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@SETTINGS
@given(data=st.data())
def test_random_events_encode_exactly_as_with_fastavro(name: str, data: st.DataObject) -> None:
    parsed = SCHEMAS[name].parsed
    event = event_of(name, data.draw(values(parsed, named_types(parsed))), data.draw(ENVELOPES))
    compiled = FAST._writers[name](event)  # the compiled writer itself: no silent fallback
    assert compiled == REF.encode(event) == FAST.encode(event)
    assert same(REF.decode(compiled), event, strict=False)  # the writer rescales decimals to the schema's scale


@pytest.mark.parametrize("name", sorted(factories.BUILDERS))
def test_factory_events_encode_exactly_as_with_fastavro(name: str) -> None:
    event = factories.BUILDERS[name]()
    assert FAST._writers[event.event_type](event) == REF.encode(event)


# --- synthetic schemas: the Avro the events do not use yet ---------------------------------

MORE: dict[str, Any] = {
    "arrays_and_maps": {
        "type": "record",
        "name": "b.Lists",
        "fields": [
            {"name": "names", "type": {"type": "array", "items": "string"}},
            {"name": "scores", "type": {"type": "map", "values": "double"}},
            {"name": "rows", "type": {"type": "array", "items": {"type": "record", "name": "Row", "fields": [
                {"name": "k", "type": "string"}, {"name": "v", "type": ["null", "long"]},
            ]}}},
            {"name": "again", "type": {"type": "array", "items": "b.Row"}},
            {"name": "when", "type": ["null", {"type": "long", "logicalType": "timestamp-micros"}]},
            {"name": "price", "type": ["null", {
                "type": "bytes", "logicalType": "decimal", "precision": 10, "scale": 4,
            }]},
            {"name": "blob", "type": "bytes"},
            {"name": "big", "type": "long"},
        ],
    },
}  # fmt: skip
COMPILABLE = {"enum_fixed_float": False, "recursive": False, "nested": False, "nulls": True, "deep": False}
COMPILABLE.update({"logical": True, "bare_union": False, "bare_map": True, "arrays_and_maps": True})
SYNTH = {k: parse_schema(v) for k, v in {**SYNTHETIC, **MORE}.items()}


def test_what_does_not_compile_says_so() -> None:
    for name, parsed in SYNTH.items():
        if COMPILABLE[name]:
            compile_writer(parsed)
        else:
            with pytest.raises(NotCompilable):
                compile_writer(parsed)
    enum_fixed_float = {**SYNTHETIC["enum_fixed_float"]}
    enum_fixed_float["fields"] = [f for f in enum_fixed_float["fields"] if f["name"] != "blob"]
    compile_writer(parse_schema(enum_fixed_float))  # without its ["null", "bytes", Digest] union it does


ENUM_FIXED = parse_schema({**SYNTHETIC["enum_fixed_float"], "name": "a.Misc2", "fields": [
    f for f in SYNTHETIC["enum_fixed_float"]["fields"] if f["name"] != "blob"
]})  # fmt: skip


@pytest.mark.parametrize("name", [n for n, ok in COMPILABLE.items() if ok] + ["enum_fixed_float"])
@SETTINGS
@given(data=st.data())
def test_synthetic_values_encode_exactly_as_with_fastavro(name: str, data: st.DataObject) -> None:
    parsed = ENUM_FIXED if name == "enum_fixed_float" else SYNTH[name]
    if name == "enum_fixed_float":  # values() draws neither enums nor fixed: draw them here
        value: Any = {
            "colour": data.draw(st.sampled_from(["RED", "GREEN", "BLUE"])),
            "again": data.draw(st.sampled_from(["RED", "GREEN", "BLUE"])),
            "digest": data.draw(st.binary(min_size=4, max_size=4)),
            "ratio": data.draw(st.floats(width=32)),
            "flag": data.draw(st.booleans()),
            "money": Decimal(data.draw(st.integers(-(10**19), 10**19))).scaleb(-4),
            "small": Decimal(data.draw(st.integers(-99999, 99999))),
        }
    else:
        value = data.draw(values(parsed, named_types(parsed)))
    write = compile_writer(parsed)
    got, want = outcome(lambda: write(value)), outcome(lambda: fastavro_bytes(parsed, value))
    assert got[0] == "ok", (got, value)  # values() draws only what the compiled writer takes
    assert got == want


# --- odd values: refused by the compiled writer, so fastavro decides ------------------------

CHARGE = factories.charge()
ODD: list[tuple[str, Event]] = [
    ("bool for an int", dataclasses.replace(CHARGE, prompt_tokens=True)),
    ("float for an int", dataclasses.replace(CHARGE, prompt_tokens=2.0)),  # type: ignore[arg-type]
    ("huge int", dataclasses.replace(CHARGE, prompt_tokens=2**70)),
    ("str for an int", dataclasses.replace(CHARGE, prompt_tokens="7")),  # type: ignore[arg-type]
    ("naive time", dataclasses.replace(CHARGE, envelope=dataclasses.replace(
        CHARGE.envelope, occurred_at=datetime(2026, 1, 2, 3, 4, 5, 6)))),
    ("non-UTC time", dataclasses.replace(CHARGE, envelope=dataclasses.replace(
        CHARGE.envelope, occurred_at=datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=2)))))),
    ("int for a time", dataclasses.replace(CHARGE, envelope=dataclasses.replace(
        CHARGE.envelope, occurred_at=1_700_000_000_000_000))),  # type: ignore[arg-type]
    ("tuple union notation", dataclasses.replace(CHARGE, envelope=dataclasses.replace(
        CHARGE.envelope, trace_parent=("string", "00-abc")))),  # type: ignore[arg-type]
    ("int in a string union", dataclasses.replace(CHARGE, envelope=dataclasses.replace(
        CHARGE.envelope, trace_parent=5))),  # type: ignore[arg-type]
    ("float for a decimal", dataclasses.replace(CHARGE, cost=0.5)),  # type: ignore[arg-type]
    ("str subclass", dataclasses.replace(CHARGE, model=type("S", (str,), {})("gpt"))),
]  # fmt: skip


@pytest.mark.parametrize(("label", "event"), ODD, ids=[label for label, _ in ODD])
def test_odd_values_get_fastavros_bytes_or_fastavros_error(label: str, event: Event) -> None:
    got, want = outcome(lambda: FAST.encode(event)), outcome(lambda: REF.encode(event))
    assert got == want, label


def test_a_utc_time_from_another_tzinfo_object_writes_the_same_micros() -> None:
    at = datetime(2026, 11, 29, 1, 2, 3, 456789, tzinfo=UTC)
    for tz in (UTC, UTC, timezone(timedelta(0))):
        event = dataclasses.replace(
            CHARGE, envelope=dataclasses.replace(CHARGE.envelope, occurred_at=at.replace(tzinfo=tz))
        )
        assert FAST.encode(event) == REF.encode(event)


def test_every_event_type_class_is_encoded_by_its_own_writer() -> None:
    for name, cls in EVENT_TYPES.items():
        assert FAST._writers[name].__avro_source__.startswith("def write(")  # type: ignore[attr-defined]
        assert cls.__name__ == name
