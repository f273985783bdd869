"""The compiled decoder (streams.avro_fast) against fastavro, value for value; poison rules unchanged.

Three kinds of input, for every schema in `load_all()` and for synthetic schemas covering the
Avro types the events do not use yet (enums, fixed, recursion, float, other logical types):
- random valid encodings, including legal oddities (overlong varints, arrays and maps in
  several blocks, negative block counts with byte sizes): both readers must agree exactly;
- random events written by fastavro: the fast codec and the reference codec must agree;
- random corruptions: the fast path raises PoisonEvent and nothing else, with the reference's
  reason, except where it is stricter on purpose (see streams.avro_fast) and says so.
"""

from __future__ import annotations

import dataclasses
import io
import json
import pickle
import struct
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from datetime import time as dtime
from decimal import Decimal
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_reader, schemaless_writer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streams.avro_fast import AvroDecodeError, Build, compile_reader
from streams.codec import HEADER_LEN, MAGIC, Codec, PoisonEvent, validate_envelope
from streams.events import EVENT_TYPES, Envelope, Event, TokensCharged
from streams.schemas import SCHEMA_DIR, build, load_all
from tests import factories

SCHEMAS = load_all()
FAST = Codec()
REF = Codec(fast=False)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
MIN_US = (datetime(1, 1, 1, tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)
MAX_US = (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC) - EPOCH) // timedelta(microseconds=1)
# the details of the fast path's deliberate strictness (where fastavro accepts malformed Avro)
STRICTER = (
    *("union index -", "enum index -", "varint longer than 10 bytes", "varint above 64 bits", "exceeds precision"),
    "int out of range",
    "bytes left",  # a block count above the bytes left: only zero-byte items (array of null) could fit it
)
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=70)  # up to 280 UTF-8 bytes
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- strict comparison: same types, same Decimal strict, same float bits ------------------


def same(a: Any, b: Any, strict: bool = True) -> bool:
    """Equal, of the same types, floats bit for bit (NaNs too); strict: Decimal strict and dict order too."""
    if type(a) is not type(b):
        return False
    if isinstance(a, Event):
        return type(a.envelope) is type(b.envelope) is Envelope and same(a.to_record(), b.to_record(), strict)
    if isinstance(a, float):
        return struct.pack("<d", a) == struct.pack("<d", b)
    if isinstance(a, Decimal):
        return a == b and (not strict or (a.as_tuple() == b.as_tuple() and str(a) == str(b)))
    if isinstance(a, datetime):
        return a == b and a.tzinfo is b.tzinfo and a.utcoffset() == b.utcoffset()
    if isinstance(a, dict):
        keys_match = list(a) == list(b) if strict else sorted(a) == sorted(b)
        return keys_match and all(same(a[k], b[k], strict) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y, strict) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def fastavro_read(parsed: Any, body: bytes) -> Any:
    buf = io.BytesIO(body)
    value = schemaless_reader(buf, parsed, None)
    if buf.tell() != len(body):
        raise EOFError(f"{len(body) - buf.tell()} trailing bytes")
    return value


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except PoisonEvent as exc:
        return exc.reason, exc.detail
    except Exception as exc:  # the reference reader raises EOFError, ValueError, ...
        return "error", f"{type(exc).__name__}: {exc}"


# --- valid encodings, written by hand (so legal oddities are covered too) --------------------


def uvarint(u: int, pad: int = 0) -> bytes:
    """Varint of unsigned `u`; `pad` extra zero groups make it overlong (never past 10 bytes)."""
    out = bytearray()
    while True:
        b, u = u & 0x7F, u >> 7
        if not u:
            out.append(b)
            break
        out.append(b | 0x80)
    pad = min(pad, 10 - len(out))
    if pad > 0:
        out[-1] |= 0x80
        out += b"\x80" * (pad - 1) + b"\x00"
    return bytes(out)


def zigzag(n: int) -> int:
    return (n << 1) ^ (n >> 63)


def long_bytes(draw: st.DrawFn, n: int) -> bytes:
    return uvarint(zigzag(n), draw(st.sampled_from([0, 0, 0, 0, 1, 3, 9])))


def signed_be(n: int, extra: int = 0) -> bytes:
    size = (n.bit_length() + 8) // 8 + extra  # minimal two's complement, optionally sign-extended
    return n.to_bytes(size, "big", signed=True)


def encode_value(draw: st.DrawFn, schema: Any, named: dict[str, Any], depth: int = 0) -> bytes:
    """A random valid Avro binary encoding of some value of `schema`."""
    if isinstance(schema, list):
        i = 0 if depth > 8 else draw(st.integers(0, len(schema) - 1))  # deep: the first branch (null) ends it
        return long_bytes(draw, i) + encode_value(draw, schema[i], named, depth)
    if isinstance(schema, str):
        if schema in named:
            return encode_value(draw, named[schema], named, depth + 1)
        match schema:
            case "null":
                return b""
            case "boolean":
                return bytes([draw(st.sampled_from([0, 1, 1, 2, 255]))])  # any non-zero byte is true
            case "int":
                return long_bytes(draw, draw(st.integers(-(2**31), 2**31 - 1)))
            case "long":
                return long_bytes(draw, draw(st.integers(-(2**63), 2**63 - 1)))
            case "float":
                return draw(st.binary(min_size=4, max_size=4))  # every bit pattern, NaNs too
            case "double":
                return draw(st.binary(min_size=8, max_size=8))
            case "bytes":
                b = draw(st.binary(max_size=140))
                return long_bytes(draw, len(b)) + b
            case "string":
                b = draw(TEXT).encode()
                return long_bytes(draw, len(b)) + b
        raise AssertionError(schema)
    t, logical = schema["type"], schema.get("logicalType")
    if logical == "decimal" and t in ("bytes", "fixed"):
        p = schema["precision"]
        n = draw(st.integers(-(10**p) + 1, 10**p - 1) | st.sampled_from([0, 1, -1, 10**p - 1, -(10**p) + 1]))
        if t == "fixed":
            size = schema["size"]
            n = max(min(n, 2 ** (8 * size - 1) - 1), -(2 ** (8 * size - 1)))
            return n.to_bytes(size, "big", signed=True)
        raw = signed_be(n, draw(st.sampled_from([0, 0, 0, 1, 5])))
        return long_bytes(draw, len(raw)) + raw
    if logical in ("timestamp-micros", "timestamp-millis", "local-timestamp-micros") and t == "long":
        scale = 1000 if logical == "timestamp-millis" else 1
        return long_bytes(draw, draw(st.integers(MIN_US // scale, MAX_US // scale)))
    if logical == "date" and t == "int":
        return long_bytes(draw, draw(st.integers(-719162, 2932896)))
    if logical == "time-millis" and t == "int":
        return long_bytes(draw, draw(st.integers(0, 86_399_999)))
    if logical == "time-micros" and t == "long":
        return long_bytes(draw, draw(st.integers(0, 86_399_999_999)))
    if logical == "uuid" and t == "string":
        b = str(draw(st.uuids())).encode()
        return long_bytes(draw, len(b)) + b
    match t:
        case "record" | "error":
            return b"".join(encode_value(draw, f["type"], named, depth + 1) for f in schema["fields"])
        case "enum":
            return long_bytes(draw, draw(st.integers(0, len(schema["symbols"]) - 1)))
        case "fixed":
            return draw(st.binary(min_size=schema["size"], max_size=schema["size"]))
        case "array" | "map":
            n = draw(st.integers(0, 5 if depth < 4 else 0))
            items = []
            for _ in range(n):
                key = b""
                if t == "map":
                    k = draw(st.text(max_size=8)).encode()
                    key = long_bytes(draw, len(k)) + k
                items.append(key + encode_value(draw, schema["items" if t == "array" else "values"], named, depth + 1))
            return blocks(draw, items)
    return encode_value(draw, t, named, depth)


def blocks(draw: st.DrawFn, items: list[bytes]) -> bytes:
    """Items in random blocks, some with a negative count and a byte size; then a zero count."""
    out, i = b"", 0
    while i < len(items):
        k = draw(st.integers(1, len(items) - i))
        chunk = b"".join(items[i : i + k])
        if draw(st.booleans()):
            out += long_bytes(draw, -k) + long_bytes(draw, len(chunk)) + chunk
        else:
            out += long_bytes(draw, k) + chunk
        i += k
    return out + long_bytes(draw, 0)


def named_types(schema: Any, out: dict[str, Any] | None = None) -> dict[str, Any]:
    out = {} if out is None else out
    if isinstance(schema, list):
        for s in schema:
            named_types(s, out)
    elif isinstance(schema, dict):
        if schema.get("type") in ("record", "error", "enum", "fixed") and "name" in schema:
            out.setdefault(schema["name"], schema)
        for f in schema.get("fields", []):
            named_types(f["type"], out)
        for key in ("items", "values", "type"):
            if isinstance(schema.get(key), dict | list):
                named_types(schema[key], out)
    return out


# --- synthetic schemas: what the events do not use (yet) ---------------------------------------

SYNTHETIC: dict[str, Any] = {
    "enum_fixed_float": {
        "type": "record",
        "name": "a.Misc",
        "fields": [
            {"name": "colour", "type": {"type": "enum", "name": "Colour", "symbols": ["RED", "GREEN", "BLUE"]}},
            {"name": "again", "type": "a.Colour"},
            {"name": "digest", "type": {"type": "fixed", "name": "Digest", "size": 4}},
            {"name": "ratio", "type": "float"},
            {"name": "flag", "type": "boolean"},
            {"name": "blob", "type": ["null", "bytes", "a.Digest"]},
            {
                "name": "money",
                "type": {
                    "type": "fixed",
                    "name": "M",
                    "size": 9,
                    "logicalType": "decimal",
                    "precision": 20,
                    "scale": 4,
                },
            },
            {"name": "small", "type": {"type": "bytes", "logicalType": "decimal", "precision": 5, "scale": 0}},
        ],
    },
    "recursive": {
        "type": "record",
        "name": "Node",
        "fields": [
            {"name": "value", "type": "long"},
            {"name": "next", "type": ["null", "Node"]},
            {"name": "children", "type": {"type": "array", "items": "Node"}},
        ],
    },
    "nested": {
        "type": "record",
        "name": "Outer",
        "fields": [
            {
                "name": "m",
                "type": {
                    "type": "map",
                    "values": {
                        "type": "array",
                        "items": {
                            "type": "record",
                            "name": "Inner",
                            "fields": [
                                {"name": "x", "type": ["null", "int", "string", "double"]},
                                {"name": "when", "type": ["null", {"type": "long", "logicalType": "timestamp-micros"}]},
                            ],
                        },
                    },
                },
            },
            {"name": "inners", "type": {"type": "array", "items": "Inner"}},
        ],
    },
    "nulls": {"type": "array", "items": "null"},
    "deep": {
        "type": "array",
        "items": [{"type": "map", "values": "null"}] * 1,
    },  # zero-byte items: fastavro allocates any count it reads
    "logical": {
        "type": "record",
        "name": "Logical",
        "fields": [
            {"name": "d", "type": {"type": "int", "logicalType": "date"}},
            {"name": "tm", "type": {"type": "int", "logicalType": "time-millis"}},
            {"name": "tu", "type": {"type": "long", "logicalType": "time-micros"}},
            {"name": "ms", "type": {"type": "long", "logicalType": "timestamp-millis"}},
            {"name": "local", "type": {"type": "long", "logicalType": "local-timestamp-micros"}},
            {"name": "id", "type": {"type": "string", "logicalType": "uuid"}},
            {"name": "unknown", "type": {"type": "string", "logicalType": "not-a-logical-type"}},
        ],
    },
    "bare_union": ["null", "string", "long"],
    "bare_map": {"type": "map", "values": "double"},
}


def deep_schema(levels: int) -> Any:
    """Arrays in maps in unions, `levels` deep: more nested blocks than Python compiles inline."""
    schema: Any = ["null", "long"]
    for i in range(levels):
        schema = {"type": "array", "items": schema} if i % 2 else {"type": "map", "values": ["null", schema]}
    return schema


def deep_value(levels: int) -> Any:
    value: Any = 7
    for i in range(levels):
        value = [value, value] if i % 2 else {"a": None, "b": value}
    return value


SYNTHETIC["deep"] = deep_schema(24)
PARSED = {**{f"event:{k}": s.parsed for k, s in SCHEMAS.items()}, **{k: parse_schema(v) for k, v in SYNTHETIC.items()}}
READERS = {k: compile_reader(v) for k, v in PARSED.items()}


@pytest.mark.parametrize("name", sorted(PARSED))
@SETTINGS
@given(data=st.data())
def test_valid_encodings_decode_exactly_as_fastavro(name: str, data: st.DataObject) -> None:
    parsed = PARSED[name]
    body = data.draw(st.composite(encode_value_strategy)(parsed))
    want = fastavro_read(parsed, body)
    try:
        got = READERS[name](body, 0)
    except AvroDecodeError as exc:  # the one limit on valid input: zero-byte items cannot outnumber the bytes
        assert name == "nulls" and "bytes left" in str(exc), (exc, want)
        return
    assert same(got, want), (got, want)


def encode_value_strategy(draw: st.DrawFn, parsed: Any) -> bytes:
    return encode_value(draw, parsed, named_types(parsed))


@pytest.mark.parametrize("name", sorted(PARSED))
@SETTINGS
@given(data=st.data())
def test_corrupted_encodings_fail_as_in_fastavro_or_stricter(name: str, data: st.DataObject) -> None:
    parsed = PARSED[name]
    if name == "nulls":
        return  # a corrupted count would make fastavro allocate up to 2**63 Nones
    body = bytearray(data.draw(st.composite(encode_value_strategy)(parsed)))
    for _ in range(data.draw(st.integers(1, 3))):
        match data.draw(st.integers(0, 3)) if body else 3:
            case 0:
                body[data.draw(st.integers(0, len(body) - 1))] ^= 1 << data.draw(st.integers(0, 7))
            case 1:
                del body[data.draw(st.integers(0, len(body) - 1)) :]
            case 2:
                i = data.draw(st.integers(0, len(body)))
                body[i:i] = data.draw(st.binary(min_size=1, max_size=6))
            case _:
                body += data.draw(st.binary(min_size=1, max_size=6))
    compare_raw(name, bytes(body))


def compare_raw(name: str, body: bytes) -> None:
    want = outcome(lambda: fastavro_read(PARSED[name], body))
    try:
        got = READERS[name](body, 0)
    except AvroDecodeError as exc:
        if want[0] == "ok":
            assert any(s in str(exc) for s in STRICTER), (str(exc), want)
        return
    assert want[0] == "ok" and same(got, want[1]), (got, want)


def test_deeply_nested_values_are_read_by_helper_functions() -> None:
    buf = io.BytesIO()
    schemaless_writer(buf, PARSED["deep"], deep_value(24))
    assert "_value0" in READERS["deep"].__avro_source__  # type: ignore[attr-defined]
    assert same(READERS["deep"](buf.getvalue(), 0), fastavro_read(PARSED["deep"], buf.getvalue()))


def test_synthetic_schemas_compile_with_recursion_and_named_references() -> None:
    read = compile_reader(PARSED["recursive"])
    leaf = b"\x04\x00\x00"  # value 2, next null, no children
    body = b"\x02" + b"\x02" + leaf + b"\x02" + leaf + b"\x00"  # value 1, next → leaf, children [leaf]
    assert read(body, 0) == {"value": 1, "next": {"value": 2, "next": None, "children": []}, "children": [
        {"value": 2, "next": None, "children": []}]}  # fmt: skip
    assert read(body, 0) == fastavro_read(PARSED["recursive"], body)


# --- events: the fast codec against the reference codec ---------------------------------------


def values(schema: Any, named: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Python values fastavro's writer accepts for `schema`."""
    if isinstance(schema, list):
        return st.one_of([values(s, named) for s in schema])
    if isinstance(schema, str):
        if schema in named:
            return values(named[schema], named)
        return {
            "null": st.none(),
            "boolean": st.booleans(),
            "int": st.integers(-(2**31), 2**31 - 1),
            "long": st.integers(-(2**63), 2**63 - 1),
            "float": st.floats(width=32),
            "double": st.floats(),
            "bytes": st.binary(max_size=100),
            "string": TEXT,
        }[schema]
    t, logical = schema["type"], schema.get("logicalType")
    if logical == "decimal":
        p, s = schema["precision"], schema.get("scale", 0)
        return st.integers(-(10**p) + 1, 10**p - 1).map(lambda n: Decimal(n).scaleb(-s))
    if logical == "timestamp-micros":
        return st.integers(MIN_US, MAX_US).map(lambda us: EPOCH + timedelta(microseconds=us))
    if t == "record":
        return st.fixed_dictionaries({f["name"]: values(f["type"], named) for f in schema["fields"]})
    if t == "array":
        return st.lists(values(schema["items"], named), max_size=4)
    if t == "map":
        return st.dictionaries(st.text(max_size=8), values(schema["values"], named), max_size=4)
    return values(t, named)


UUIDS = st.uuids().map(str)
NOW = datetime.now(UTC)
ENVELOPES = st.fixed_dictionaries(
    {
        "event_id": UUIDS,
        "schema_version": st.integers(1, 3),
        "tenant": st.text(min_size=1, max_size=20).filter(lambda s: s.strip()),
        "occurred_at": st.datetimes(datetime(2020, 1, 1), NOW.replace(tzinfo=None), timezones=st.just(UTC)),
        "correlation_id": UUIDS,
        "producer": TEXT,
        "trace_parent": st.none() | TEXT,
        "causation_id": st.none() | UUIDS,
    }
)


def event_of(name: str, record: dict[str, Any], env: dict[str, Any]) -> Event:
    record = dict(record)
    record.pop("envelope")
    return EVENT_TYPES[name](envelope=Envelope(event_type=name, **env), **record)


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@SETTINGS
@given(data=st.data())
def test_random_events_decode_as_with_fastavro(name: str, data: st.DataObject) -> None:
    parsed = SCHEMAS[name].parsed
    event = event_of(name, data.draw(values(parsed, named_types(parsed))), data.draw(ENVELOPES))
    encoded = FAST.encode(event)
    got, want = FAST.decode(encoded), REF.decode(encoded)
    assert same(got, want) and same(got, event, strict=False)  # the writer rescales to the schema's scale
    assert type(got) is EVENT_TYPES[name] and type(got.envelope) is Envelope


def test_every_schema_gets_a_compiled_reader() -> None:
    assert FAST.fast_schemas == set(SCHEMAS) and not REF.fast_schemas


@pytest.mark.parametrize("name", sorted(factories.BUILDERS))
def test_factory_events_decode_as_with_fastavro(name: str) -> None:
    event = factories.BUILDERS[name]()
    data = FAST.encode(event)
    assert same(FAST.decode(data), REF.decode(data)) and same(FAST.decode(data), event, strict=False)
    assert same(FAST.decode(bytearray(data)), REF.decode(data)) and same(
        FAST.decode(memoryview(data)), REF.decode(data)
    )


def test_decoded_events_are_ordinary_frozen_dataclasses() -> None:
    event = factories.charge()
    got = FAST.decode(FAST.encode(event))
    assert type(got) is TokensCharged and type(got.envelope) is Envelope
    assert got == event and hash(got) == hash(event)
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.model = "x"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        got.envelope.tenant = "x"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(got)) == event
    assert dataclasses.replace(got, model="m").model == "m"
    assert dataclasses.asdict(got) == dataclasses.asdict(event)


def test_a_dataclass_with_post_init_is_built_through_its_init() -> None:
    seen: list[int] = []

    @dataclasses.dataclass(frozen=True, slots=True)
    class Point:
        x: int
        y: int

        def __post_init__(self) -> None:
            seen.append(self.x)

    parsed = parse_schema(
        {"type": "record", "name": "P", "fields": [{"name": "y", "type": "int"}, {"name": "x", "type": "int"}]}
    )
    point = compile_reader(parsed, Build(Point))(b"\x04\x06", 0)
    assert point == Point(x=3, y=2) and seen == [3, 3]


def test_a_schema_that_does_not_match_its_dataclass_falls_back_to_the_reference_path() -> None:
    raw = json.loads((SCHEMA_DIR / "TokensCharged.avsc").read_text())
    raw["fields"].append({"name": "region", "type": ["null", "string"], "default": None, "doc": "d"})
    schema = build(raw, json.loads((SCHEMA_DIR / "Envelope.avsc").read_text()))
    codec = Codec({"TokensCharged": schema})
    assert codec.fast_schemas == set()
    buf = io.BytesIO()
    schemaless_writer(buf, schema.parsed, {**factories.charge().to_record(), "region": "eu"})
    with pytest.raises(PoisonEvent) as exc:
        codec.decode(MAGIC + schema.fingerprint + buf.getvalue())
    assert exc.value.reason == "schema-mismatch"


# --- poison: same reasons as the reference -------------------------------------------------------

GOOD = [FAST.encode(make()) for make in factories.BUILDERS.values()]


def compare_codecs(payload: bytes) -> None:
    want = outcome(lambda: REF.decode(payload))
    got = outcome(lambda: FAST.decode(payload))
    assert got[0] != "error", got  # PoisonEvent and nothing else
    if got[0] == want[0] == "ok":
        assert same(got[1], want[1])
    elif got[0] != want[0]:
        assert got[0] == "undecodable-body" and any(s in got[1] for s in STRICTER), (got, want)


EDIT = st.tuples(st.integers(0, 3), st.integers(0, 2**16), st.binary(min_size=1, max_size=8))  # (kind, where, bytes)
EDITS = st.lists(EDIT, min_size=1, max_size=4)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    payload=st.one_of(
        st.binary(max_size=300),
        st.sampled_from(GOOD).flatmap(lambda g: st.binary(max_size=300).map(lambda b: g[:HEADER_LEN] + b)),
        st.tuples(st.sampled_from(GOOD), EDITS),
    )
)
def test_corrupted_payloads_get_the_reference_reason(payload: Any) -> None:
    if isinstance(payload, tuple):
        good, edits = payload
        b = bytearray(good)
        for kind, where, junk in edits:
            i = HEADER_LEN + where % max(len(b) - HEADER_LEN, 1)
            if kind == 0 and i < len(b):
                b[i] ^= junk[0] or 1
            elif kind == 1:
                del b[i:]
            elif kind == 2:
                b[i:i] = junk
            else:
                b[i : i + len(junk)] = junk
        payload = bytes(b)
    compare_codecs(payload)


@pytest.mark.parametrize("good", GOOD[:8])
def test_every_truncation_and_every_extension_is_poison_with_the_reference_reason(good: bytes) -> None:
    for n in range(len(good)):
        compare_codecs(good[:n])
    for junk in (b"\x00", b"\x02a", b"\xff" * 12):
        compare_codecs(good + junk)
        assert outcome(lambda j=junk: FAST.decode(good + j))[0] == "trailing-bytes"  # type: ignore[misc]


def envelope_field_positions(payload: bytes) -> dict[str, tuple[int, int]]:
    """(start, end) of the value bytes of the envelope's string fields in a TokensCharged (no nulls)."""
    pos, out = HEADER_LEN, {}
    for name in ("event_id", "event_type", "schema_version", "tenant", "occurred_at", "trace_parent"):
        if name == "schema_version":
            pos += 1
        elif name == "occurred_at":
            while payload[pos] & 0x80:
                pos += 1
            pos += 1
        elif name == "trace_parent":
            out["trace_parent_index"] = (pos, pos + 1)
            pos += 1
        else:
            n = payload[pos] >> 1
            out[name] = (pos + 1, pos + 1 + n)
            pos += 1 + n
    return out


CHARGE = FAST.encode(factories.charge())  # trace_parent and causation_id are null
AT = envelope_field_positions(CHARGE)


def splice(start: int, end: int, new: bytes, data: bytes = CHARGE) -> bytes:
    return data[:start] + new + data[end:]


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (splice(*AT["tenant"], b"\xff\xfe\xfd\xfc"), "undecodable-body"),  # invalid UTF-8
        (splice(*AT["tenant"], b"\xed\xa0\x80\x41"), "undecodable-body"),  # an encoded surrogate
        (splice(AT["tenant"][0] - 1, AT["tenant"][0], b"\x03"), "undecodable-body"),  # length -2
        (splice(AT["tenant"][0] - 1, AT["tenant"][0], uvarint(2**62)), "undecodable-body"),  # absurd length
        (splice(*AT["trace_parent_index"], b"\x04"), "undecodable-body"),  # union index 2 of 2 branches
        (splice(*AT["trace_parent_index"], b"\x7e"), "undecodable-body"),
        (splice(*AT["trace_parent_index"], b"\xff" * 9 + b"\x01"), "undecodable-body"),
        (splice(*AT["tenant"], b"    "), "missing-tenant"),
        (splice(AT["tenant"][0] - 1, AT["tenant"][1], b"\x0c" + "\u3000\u2003".encode()), "missing-tenant"),
        (splice(*AT["event_type"], b"TokensCharges"), "type-mismatch"),
        (splice(*AT["event_id"], b"x" * 36), "malformed-id"),
        (splice(*AT["event_id"], b"-" * 36), "malformed-id"),
        (splice(AT["event_id"][0], AT["event_id"][0] + 1, b"x"), "malformed-id"),  # "x" is not hex
        (splice(AT["event_id"][1] - 1, AT["event_id"][1], b"?"), "malformed-id"),
        (splice(AT["event_id"][0] + 8, AT["event_id"][0] + 9, b"0"), "malformed-id"),  # hyphen moved
        (CHARGE[:-1], "undecodable-body"),
        (CHARGE + b"\x00", "trailing-bytes"),
        (b"\xc3\x01", "not-single-object-encoding"),
        (b"\xc3\x02" + CHARGE[2:], "not-single-object-encoding"),
        (CHARGE[:2] + b"\x00" * 8 + CHARGE[10:], "unknown-fingerprint"),
    ],
)
def test_poison_reasons(payload: bytes, reason: str) -> None:
    with pytest.raises(PoisonEvent) as exc:
        FAST.decode(payload)
    assert exc.value.reason == reason
    with pytest.raises(PoisonEvent) as ref:
        REF.decode(payload)
    assert ref.value.reason == reason


def test_none_is_poison() -> None:
    with pytest.raises(PoisonEvent) as exc:
        FAST.decode(None)
    assert exc.value.reason == "not-single-object-encoding"


@pytest.mark.parametrize(
    "uid",
    [
        "{12345678-1234-5678-1234-567812345678}",
        "urn:uuid:12345678-1234-5678-1234-567812345678",
        "12345678123456781234567812345678",
        "12345678-1234-5678-1234-56781234567F",
        "1234-5678-1234-5678-1234-5678-1234-5678",
        "١٢٣٤٥٦٧٨١٢٣٤٥٦٧٨١٢٣٤٥٦٧٨١٢٣٤٥٦٧٨",  # Arabic-Indic digits: uuid.UUID takes them
    ],
)
def test_ids_that_uuid_accepts_in_other_shapes_still_pass(uid: str) -> None:
    event = factories.charge()
    odd = dataclasses.replace(event, envelope=dataclasses.replace(event.envelope, correlation_id=uid))
    data = FAST.encode(odd)
    assert FAST.decode(data) == REF.decode(data) == odd


@settings(max_examples=400, deadline=None)
@given(
    ids=st.lists(
        st.one_of(
            UUIDS,
            UUIDS.map(str.upper),
            UUIDS.map(lambda u: u.replace("-", "")),
            UUIDS.map(lambda u: "{" + u + "}"),
            UUIDS.map(lambda u: "urn:uuid:" + u),
            UUIDS.map(lambda u: u[:-1] + "g"),
            UUIDS.map(lambda u: "x" + u[1:]),
            st.text("0123456789abcdefABCDEFxX-?", min_size=36, max_size=36),
            UUIDS.map(lambda u: u + " "),
            st.text(max_size=40),
            st.text("0123456789abcdef-_ {}", min_size=30, max_size=40),
        ),
        min_size=2,
        max_size=2,
    ),
    tenant=st.text(max_size=6),
    event_type=st.sampled_from(["TokensCharged", "tokenscharged", "RequestReceived"]),
    when=st.one_of(
        st.datetimes(datetime(1, 1, 1), datetime(9999, 1, 1), timezones=st.just(UTC)),
        st.sampled_from([-1, 0, 1]).map(lambda d: datetime(2020, 1, 1, tzinfo=UTC) + timedelta(microseconds=d)),
        st.integers(-5, 5).map(lambda s: NOW + timedelta(days=1, seconds=s * 60)),
    ),
)
def test_envelope_checks_give_the_reference_reason(
    ids: list[str], tenant: str, event_type: str, when: datetime
) -> None:
    event = factories.charge()
    env = dataclasses.replace(
        event.envelope, event_id=ids[0], correlation_id=ids[1], tenant=tenant, event_type=event_type, occurred_at=when
    )
    data = FAST.encode(dataclasses.replace(event, envelope=env))
    want, got = outcome(lambda: REF.decode(data)), outcome(lambda: FAST.decode(data))
    assert got[0] == want[0], (got, want)
    if got[0] == "ok":
        assert same(got[1], want[1])
    if got[0] not in ("ok", "insane-time"):
        with pytest.raises(PoisonEvent, match=got[0]):
            validate_envelope(env, "TokensCharged")


def test_the_future_bound_moves_with_the_clock() -> None:
    codec = Codec()
    event = factories.charge()
    soon = dataclasses.replace(
        event, envelope=dataclasses.replace(event.envelope, occurred_at=NOW + timedelta(hours=2))
    )
    codec._latest[0] = NOW - timedelta(days=30)  # as if the codec had been built a month ago
    assert codec.decode(codec.encode(soon)) == soon  # the stale bound is refreshed, not trusted
    late = dataclasses.replace(
        event,
        envelope=dataclasses.replace(event.envelope, occurred_at=datetime.now(UTC) + timedelta(days=1, minutes=1)),
    )
    with pytest.raises(PoisonEvent) as exc:
        codec.decode(codec.encode(late))
    assert exc.value.reason == "insane-time"


# --- stricter than fastavro, on purpose ---------------------------------------------------------

NULLABLE = parse_schema(["null", "string"])


@pytest.mark.parametrize(
    ("schema", "body", "fastavro_gives"),
    [
        (NULLABLE, b"\x01\x02a", "a"),  # index -1: fastavro takes the last branch
        (NULLABLE, b"\x03", None),  # index -2: the first
        (parse_schema({"type": "enum", "name": "E", "symbols": ["A", "B"]}), b"\x01", "B"),
        (parse_schema("long"), b"\xff" * 10 + b"\x01", -(2**63)),  # 11 bytes, wrapped
        (parse_schema("long"), b"\x80" * 9 + b"\x02", 0),  # bit 64 dropped
        (parse_schema("int"), b"\x80\x80\x80\x80\x10", 2**31),  # an int beyond 32 bits
        (
            parse_schema({"type": "bytes", "logicalType": "decimal", "precision": 4, "scale": 2}),
            b"\x06\x01\x86\xa1",  # 100001 has 6 significant digits: fastavro rounds it to 1.000E+3
            Decimal("1.000E+3"),
        ),
    ],
)
def test_malformed_avro_that_fastavro_accepts_is_refused(schema: Any, body: bytes, fastavro_gives: Any) -> None:
    assert fastavro_read(schema, body) == fastavro_gives
    with pytest.raises(AvroDecodeError, match="|".join(STRICTER)):
        compile_reader(schema)(body, 0)


def test_a_decimal_beyond_its_precision_but_exact_reads_as_in_fastavro() -> None:
    schema = parse_schema({"type": "bytes", "logicalType": "decimal", "precision": 38, "scale": 12})
    for value in (Decimal("1E+26"), Decimal("-123456789012345678901234567.5"), Decimal("9" * 38 + "E+40")):
        buf = io.BytesIO()
        schemaless_writer(buf, schema, value)  # fastavro's writer takes these: it checks the digits given
        got, want = compile_reader(schema)(buf.getvalue(), 0), fastavro_read(schema, buf.getvalue())
        assert same(got, want) and got == value


def test_huge_counts_and_lengths_neither_allocate_nor_loop() -> None:
    huge = uvarint(zigzag(2**62))
    cases = [
        (compile_reader(PARSED["nulls"]), huge + b"\x00"),  # 2**62 nulls in 10 bytes: fastavro would try
        (compile_reader(PARSED["nested"]), b"\x00" + huge + b"\x00"),  # 2**62 records
        (compile_reader(parse_schema({"type": "map", "values": "string"})), huge + b"\x02a\x02b" * 5),
        (compile_reader(parse_schema("string")), huge + b"abc"),
        (compile_reader(parse_schema("bytes")), huge),
    ]
    tracemalloc.start()
    try:
        for read, body in cases:
            start = time.perf_counter()
            with pytest.raises(AvroDecodeError):
                read(body, 0)
            assert time.perf_counter() - start < 0.5
        assert tracemalloc.get_traced_memory()[1] < 1_000_000
    finally:
        tracemalloc.stop()


def test_a_huge_decimal_is_refused_before_it_is_converted() -> None:
    read = compile_reader(parse_schema({"type": "bytes", "logicalType": "decimal", "precision": 38, "scale": 12}))
    body = uvarint(zigzag(4_000_000)) + b"\x7f" * 4_000_000
    start = time.perf_counter()
    with pytest.raises(AvroDecodeError, match="exceeds precision"):
        read(body, 0)
    assert time.perf_counter() - start < 0.5
    padded = b"\xff" * 40 + b"\x85"  # -123 sign-extended over 41 bytes: still 3 digits
    assert read(uvarint(zigzag(len(padded))) + padded, 0) == Decimal("-123E-12")


def test_other_logical_types_match_fastavro() -> None:
    parsed = PARSED["logical"]
    body = b"".join(
        [uvarint(zigzag(19000)), uvarint(zigzag(3_600_000)), uvarint(zigzag(5)), uvarint(zigzag(1_700_000_000_000)),
         uvarint(zigzag(1_700_000_000_000_000)), b"\x48" + b"12345678-1234-5678-1234-567812345678", b"\x02z"]
    )  # fmt: skip
    got = compile_reader(parsed)(body, 0)
    assert same(got, fastavro_read(parsed, body))
    assert isinstance(got["d"], date) and isinstance(got["tm"], dtime) and got["local"].tzinfo is None
