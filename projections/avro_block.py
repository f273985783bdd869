"""The sink's fast path: ClickHouse reads the records' Avro itself, Python never decodes them.

Why: decoding Avro in Python tops out near 190k records/s per core, while ClickHouse parses
an Avro object-container block of the same records several times faster. So the sink
strips each record's single-object header (`C3 01` + fingerprint), groups a partition's run by
writer schema, and sends the bodies as one container block whose header carries a writer
schema of our making. Each body is followed by a suffix the sink appends: `_topic`,
`_partition`, `_offset`. Avro's binary encoding of a record is its fields' encodings
back to back, so the container schema can be the writer schema *flattened* (the envelope's
fields inlined; a nested record is encoded exactly like its fields in a row) plus the three
suffix fields: the bytes are the same, only the description changes. Column names then
equal the table's, and the Kafka coordinates come from the data, so no per-row parameter is
needed.

Exactness. The insert is `INSERT INTO t (cols) SETTINGS insert_deduplication_token = ...
SELECT ... FROM <source> WHERE throwIf(NOT (checks)) = 0`, parameterised, with `<source>` =
`input(structure)` + `FORMAT Avro` and the block as the request body on a ClickHouse server,
or `file(path, 'Avro', structure)` on chDB (which has no request body: the block goes to a
temporary file); the statement is otherwise the same plain SQL on both. Only the chDB form
is exercised by the tests (no ClickHouse server here). ClickHouse refuses the whole insert
(nothing lands: an INSERT SELECT below `min_insert_block_size_rows` is squashed into one
block, written only at the end) when any row fails a check, and the sink then decodes that
run record by record with the Codec (`projections/sink.py`), which decides, as before, what
is a row and what a dead letter. The checks therefore refuse everything the Codec refuses,
never less; where matching the Codec exactly is hard they refuse more (a false alarm only
costs a decode):

- envelope: event_type equals the writer's record name; tenant holds a printable ASCII
  non-space character (the Codec refuses an empty or all-whitespace tenant); event_id and
  correlation_id are canonical 8-4-4-4-12 hex (the Codec accepts more: those go the slow way);
  occurred_at in [2020-01-01, now + 23 h] (the Codec: now + 24 h);
- every string, array element and map key/value is valid UTF-8 (ClickHouse stores any
  bytes; Python's strict decoder refuses surrogates, overlongs, > U+10FFFF, as does
  `isValidUTF8`); map keys are distinct (a Python dict keeps only the last duplicate).
  Not checked again where a check above already passes only ASCII: event_type (equal to a
  literal), event_id and correlation_id (the hex pattern);
- decimals lie within their precision (ClickHouse fits up to 2**127 in a Decimal(38, _));
- a `["null", T]` union is described as `["null", T, <empty record>]` and read as
  `Variant(T, Tuple())`: ClickHouse reads any index other than T's as NULL, so without the
  third branch a corrupted index 2 would land a NULL; now it shows as `Tuple()` (refused),
  and an index past 2 or negative makes ClickHouse fail the block;
- alignment: the suffix must read back as the block's topic, one of its partitions and an
  offset within that partition's run (a block may hold the runs of several partitions, one
  writer schema). A record with trailing or missing bytes shifts every later field, so its
  suffix does not parse back (ClickHouse does not check that a block ends where its size
  says, so this check is what catches a record of the wrong length).

Each field is read as its column's type without `LowCardinality` (ClickHouse's Avro reader
fills such a column value by value through its dictionary: a third of an insert's CPU); the
INSERT converts to the column's type, so the same values land.

ClickHouse itself fails the block on an int outside 32 bits, a varint over 10 bytes, a
boolean byte other than 0/1, a decimal over 16 bytes. Older writer versions (schemas/fixtures)
take the fast path too: reader fields they lack are filled with the reader's Avro default as a
literal, as Avro resolution does.

Native form (`native_plan`, `native_block`, `insert_native`): the same records transcoded to
RowBinary rows by the C extension `projections/_rowbinary.c`, which performs the checks above
itself (same bounds or stricter) and names the first record it refuses; the insert is then a
plain `INSERT ... FORMAT RowBinary` without check expressions. `encode_row` is its Python
reference (tests/test_sink_native.py holds the C output to it byte for byte). Off when the
extension is not built or `LEDGERFLOW_NATIVE=0`; the Avro block stays the fallback.

Everything here is pure except `insert_block` and `insert_native` (one ClickHouse call each).
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal, Inexact
from functools import cache
from itertools import islice
from operator import itemgetter, lt
from typing import Any

from clickhouse_connect.driver.client import Client

from projections.schema import columns_for, table_for
from streams.codec import HEADER_LEN, MAGIC
from streams.evolution import released_writers
from streams.schemas import EventSchema, load_all

try:  # the C transcoder (projections/_rowbinary.c); without it every block is an Avro block
    from projections import _rowbinary
except ImportError:  # pragma: no cover - a build without the extension
    _rowbinary = None  # type: ignore[assignment]

META_FIELDS: tuple[tuple[str, str], ...] = (("_topic", "string"), ("_partition", "int"), ("_offset", "long"))
_UUID = "^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
_DEC_MAX = {38: "99999999999999999999999999.999999999999"}  # precision 38, scale 12: 26 + 12 nines
# Columns whose envelope check passes only ASCII text (a literal type name, canonical hex ids),
# so a UTF-8 check on them would never refuse anything the first did not.
_ASCII_CHECKED = frozenset({"event_type", "event_id", "correlation_id"})
REFUSED = "ledgerflow fast path: a record needs the codec"
# The insert reads its block in chunks of this many rows: one chunk for any block the sink
# makes (at most 200,000 rows), instead of ClickHouse's 65,409-row chunks squashed together
# again before the write (9-17% less CPU per 200,000-row block, BENCHMARKS.md round three).
# Still below `min_insert_block_size_rows` (1,048,449), so a block lands whole or not at all.
READ_BLOCK_ROWS = 1_000_000
# The statement also turns off ClickHouse's JIT compilation of expressions: the checks' constants
# (each block's offsets) differ from insert to insert, so it compiled them anew every time, on a
# background thread: 30-70 ms of CPU per 20,000-row insert, none saved at 200,000 rows
# (BENCHMARKS.md, round three). Same results either way; only how the expressions run changes.


def varint(n: int) -> bytes:
    """Avro's zigzag varint of a long."""
    return _uvarint((n << 1) ^ (n >> 63))


def _string(data: bytes) -> bytes:
    return varint(len(data)) + data


class Unsupported(ValueError):
    """A schema or table the fast path cannot carry exactly: its records take the Codec path."""


@dataclass(frozen=True)
class Writer:
    """One writer schema seen in record headers, flattened, and what the reader adds to it."""

    event_type: str
    header: bytes  # MAGIC + fingerprint: the first HEADER_LEN bytes of its records
    fields: tuple[dict[str, Any], ...]  # flat Avro fields in writer order (envelope inlined)
    defaults: Mapping[str, Any]  # reader fields the writer lacks → their Avro default


def _flat_fields(raw: Mapping[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in raw["fields"]:
        if f["name"] == "envelope":
            env = f["type"]
            if not isinstance(env, dict) or env.get("type") != "record":
                raise Unsupported("envelope not inlined")
            out.extend(env["fields"])
        else:
            out.append(f)
    return out


def writers(
    schemas: Mapping[str, EventSchema] | None = None, released: Mapping[bytes, EventSchema] | None = None
) -> dict[bytes, Writer]:
    """Header → Writer for today's schemas and every released version the Codec reads.

    Mirrors `Codec`: a fingerprint of today's schema is read as today's; a released one is
    resolved to today's schema of the same name (reader fields it lacks take their default).
    A released version that does more than add fields with defaults is left out (Codec path).
    With neither argument the answer comes from a per-process cache (a fresh dict each call):
    the schemas and fixtures on disk do not change while a process runs, and reading the
    released ones again (47 Rabin fingerprints, ~0.05-0.09 s) was a fixed cost of every Sink,
    so of every replay.
    """
    if schemas is None and released is None:
        return dict(_default_writers())
    return _writers(schemas, released)


@cache
def _default_writers() -> dict[bytes, Writer]:
    return _writers(None, None)


@cache
def default_headers() -> frozenset[bytes]:
    """The headers of `writers()` with its defaults: today's schemas and the released ones a
    default `Codec` also reads (both read the same files), so a default Codec knows each."""
    return frozenset(_default_writers())


def _writers(
    schemas: Mapping[str, EventSchema] | None, released: Mapping[bytes, EventSchema] | None
) -> dict[bytes, Writer]:
    today = dict(schemas) if schemas is not None else load_all()
    old = dict(released) if released is not None else released_writers()
    out: dict[bytes, Writer] = {}
    for s in today.values():
        try:
            out[MAGIC + s.fingerprint] = Writer(s.name, MAGIC + s.fingerprint, tuple(_flat_fields(s.raw)), {})
        except Unsupported:
            continue
    for fp, w in old.items():
        reader = today.get(w.name)
        if reader is None or MAGIC + fp in out:
            continue
        try:
            wf, rf = _flat_fields(w.raw), _flat_fields(reader.raw)
        except Unsupported:
            continue
        by_name = {f["name"]: f for f in wf}
        if any(f.get("aliases") for f in rf) or any(f["name"] not in {r["name"] for r in rf} for f in wf):
            continue  # renames and removed fields: leave resolution to the Codec
        if any(f["name"] in by_name and by_name[f["name"]]["type"] != f["type"] for f in rf):
            continue
        missing = [f for f in rf if f["name"] not in by_name]
        if any("default" not in f for f in missing):
            continue
        out[MAGIC + fp] = Writer(w.name, MAGIC + fp, tuple(wf), {f["name"]: f["default"] for f in missing})
    return out


# --- one table + writer: the container header and the INSERT ... SELECT --------------------


def _quote_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _inner(ch_type: str) -> str:
    """The Variant member for a nullable column: `LowCardinality(Nullable(T))` → `T`.

    ClickHouse reads an Avro timestamp-micros in a union as `DateTime64(6)`, without a zone
    (the zone only changes how the same number is shown; the insert's cast keeps it).
    """
    t = ch_type
    for wrap in ("LowCardinality(", "Nullable("):
        if t.startswith(wrap) and t.endswith(")"):
            t = t[len(wrap) : -1]
    if t.startswith("DateTime64(6,"):
        t = "DateTime64(6)"
    return t


def _read_type(ch_type: str) -> str:
    """The type a non-union field is read as: the column's type without `LowCardinality`.

    Why: ClickHouse's Avro reader fills a LowCardinality column one value at a time through
    its dictionary, which cost a quarter to a third of a whole insert's CPU (one 50,000-row
    block, BENCHMARKS.md, round three); read as plain `String` and converted by the INSERT
    to the column's type, the same values land. Only a top-level wrapper appears in our tables.
    """
    if ch_type.startswith("LowCardinality(") and ch_type.endswith(")"):
        return ch_type[len("LowCardinality(") : -1]
    return ch_type


def _default_literal(value: Any, ch_type: str) -> str:
    if value is None:
        if not ch_type.startswith(("Nullable(", "LowCardinality(Nullable(")):
            raise Unsupported(f"null default for non-nullable {ch_type}")
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return _quote_string(value)
    if value == [] and ch_type.startswith("Array("):
        return "[]"
    if value == {} and ch_type.startswith("Map("):
        return "map()"
    raise Unsupported(f"default {value!r} for {ch_type}")


def _is_string(avro: Any) -> bool:
    return avro == "string" or (isinstance(avro, dict) and avro.get("type") == "string" and "logicalType" not in avro)


def _is_decimal(avro: Any) -> bool:
    return isinstance(avro, dict) and avro.get("logicalType") == "decimal"


def _value_checks(name: str, avro: Any, ch_type: str, expr: str) -> list[str]:
    """Checks on one column's value `expr` that the Codec would also refuse (see module doc)."""
    if _is_string(avro):
        return [f"isValidUTF8({expr})"]
    if _is_decimal(avro):
        limit = _DEC_MAX.get(int(avro.get("precision", 0))) if int(avro.get("scale", -1)) == 12 else None
        if limit is None:
            raise Unsupported(f"{name}: decimal other than (38, 12)")
        return [f"{expr} <= toDecimal128('{limit}', 12)", f"{expr} >= toDecimal128('-{limit}', 12)"]
    if isinstance(avro, dict) and avro.get("type") == "array":
        items = avro["items"]
        if _is_string(items):
            return [f"arrayAll(s -> isValidUTF8(s), {expr})"]
        if items in ("int", "long", "double", "boolean"):
            return []
        raise Unsupported(f"{name}: array of {items}")
    if isinstance(avro, dict) and avro.get("type") == "map":
        values = avro["values"]
        checks = [
            f"arrayAll(s -> isValidUTF8(s), mapKeys({expr}))",
            f"length(arrayDistinct(mapKeys({expr}))) = length({expr})",
        ]
        if _is_string(values):
            checks.append(f"arrayAll(s -> isValidUTF8(s), mapValues({expr}))")
        elif values not in ("int", "long", "double", "boolean"):
            raise Unsupported(f"{name}: map of {values}")
        return checks
    if avro == "int" and ch_type == "UInt32":  # ClickHouse would read a negative int as 2**32 - n
        return [f"{expr} < 2147483648"]
    if avro in ("int", "long", "double", "boolean", "float"):
        return []
    if isinstance(avro, dict) and avro.get("logicalType") == "timestamp-micros" and avro.get("type") == "long":
        return []
    raise Unsupported(f"{name}: Avro type {avro!r}")


@dataclass(frozen=True)
class Plan:
    """How one writer's records land in one table: container header and the INSERT ... SELECT."""

    event_type: str
    table: str
    columns: tuple[str, ...]
    header: bytes  # container file header: magic, metadata (schema, null codec), sync marker
    sync: bytes
    structure: str  # input()/file() structure: the flat fields' ClickHouse types
    select: str  # INSERT INTO ... SELECT ... FROM {source} WHERE throwIf(...) = 0
    native: Native | None = None  # the RowBinary form of the same insert, when `native_plan` can make one

    def sql(self, source: str) -> str:
        return self.select.replace("{source}", source)


def plan(writer: Writer, table_types: Mapping[str, str], sync: bytes | None = None) -> Plan:
    """The Plan of `writer` into its table, whose columns and types are `table_types`.

    Raises Unsupported when the table lacks a column or a field's type is one the fast path
    does not carry exactly (its records then take the Codec path).
    """
    columns = columns_for(writer.event_type)
    table = table_for(writer.event_type)
    missing = [c for c in columns if c not in table_types]
    if missing:
        raise Unsupported(f"{table} lacks columns {missing}")
    sync = sync if sync is not None else os.urandom(16)
    avro_fields: list[dict[str, Any]] = []
    structure: list[str] = []
    exprs: dict[str, str] = {}
    checks: list[str] = [
        f"event_type = {_quote_string(writer.event_type)}",
        "match(tenant, '[!-~]')",
        f"match(event_id, '{_UUID}')",
        f"match(correlation_id, '{_UUID}')",
        "occurred_at >= toDateTime64('2020-01-01 00:00:00', 6, 'UTC')",
        "occurred_at <= now64(6, 'UTC') + INTERVAL 23 HOUR",
    ]
    for i, f in enumerate(writer.fields):
        name, avro = f["name"], f["type"]
        ch_type = table_types[name]
        if name in _ASCII_CHECKED and _is_string(avro):  # its check above passes only ASCII: valid UTF-8
            avro_fields.append({"name": name, "type": avro})
            structure.append(f"{name} {_read_type(ch_type)}")
            exprs[name] = name
            continue
        if isinstance(avro, list):
            if len(avro) != 2 or avro[0] != "null":
                raise Unsupported(f"{name}: union {avro!r}")
            inner = _inner(ch_type)
            bad = {"type": "record", "name": f"LedgerflowBadIndex{i}", "fields": []}
            avro_fields.append({"name": name, "type": ["null", avro[1], bad]})
            structure.append(f"{name} Variant({inner}, Tuple())")
            value = f"variantElement({name}, {_quote_string(inner)})"
            exprs[name] = value
            checks.append(f"variantType({name}) != 'Tuple()'")
            checks.extend(f"ifNull({c}, true)" for c in _value_checks(name, avro[1], inner, value))
        else:
            avro_fields.append({"name": name, "type": avro})
            structure.append(f"{name} {_read_type(ch_type)}")
            exprs[name] = name
            checks.extend(_value_checks(name, avro, ch_type, name))
    for name, default in writer.defaults.items():
        exprs[name] = _default_literal(default, table_types[name])
    for name, avro in META_FIELDS:
        avro_fields.append({"name": name, "type": avro})
        structure.append(f"{name} {_read_type(table_types[name])}")
        exprs[name] = name
    # alignment: each row's coordinates are one of the block's runs (a partition and its range).
    # `transform` maps the row's partition to its run's first and last offset; a partition not
    # in the block gets the empty range [1, 0], so it is refused as `indexOf(...) > 0` did
    # (half the cost of the indexOf/arrayElement form; partitions in a block are distinct).
    checks += [
        "_topic = {lf_topic:String}",
        "_offset BETWEEN transform(_partition, {lf_partitions:Array(UInt16)}, {lf_firsts:Array(UInt64)}, 1) "
        "AND transform(_partition, {lf_partitions:Array(UInt16)}, {lf_lasts:Array(UInt64)}, 0)",
    ]
    unknown = [c for c in columns if c not in exprs]
    if unknown:
        raise Unsupported(f"no value for {unknown}")
    schema = {"type": "record", "name": "LedgerflowRow", "namespace": "ledgerflow.sink", "fields": avro_fields}
    meta = {b"avro.schema": json.dumps(schema, separators=(",", ":")).encode(), b"avro.codec": b"null"}
    header = b"Obj\x01" + varint(len(meta)) + b"".join(_string(k) + _string(v) for k, v in meta.items())
    header += varint(0) + sync
    cols = ", ".join(columns)
    select = (
        f"INSERT INTO {table} ({cols}) SETTINGS insert_deduplication_token = {{lf_token:String}}, "
        f"max_block_size = {READ_BLOCK_ROWS}, min_insert_block_size_bytes = 0, compile_expressions = 0 "
        f"SELECT {', '.join(exprs[c] for c in columns)} FROM {{source}} "
        f"WHERE throwIf(NOT ({' AND '.join(checks)}), {_quote_string(REFUSED)}) = 0"
    )
    try:
        native = native_plan(writer, table_types)
    except Unsupported:
        native = None
    return Plan(writer.event_type, table, columns, header, sync, ", ".join(structure), select, native)


# --- the native form: RowBinary rows transcoded and checked in C (projections/_rowbinary.c) ----
#
# Why: ClickHouse parses RowBinary at about half the CPU of the Avro container block, and the
# Avro insert evaluated its checks per row on top. The C transcoder reads each record once,
# performs every check listed in the module doc (same bounds, or stricter: a false alarm only
# costs a decode) and writes the row; a record it refuses stops the block, and the sink then
# decodes the run with the Codec exactly as after ClickHouse refused an Avro block. The insert is
# a plain `INSERT INTO t (cols) ... FORMAT RowBinary`: no check expressions. The columns are
# listed in the writer's field order, then the reader defaults the writer lacks (constant bytes
# per row), then `_topic, _partition, _offset`. Only the Avro types and column types below are
# carried; anything else keeps the Avro block (`native_plan` raises Unsupported). Stricter than
# the SQL checks (false alarms, decoded by the Codec): any timestamp outside DateTime64(6)'s
# 1900-2299, an array or map block with a negative count, a map of more than 64 keys, a
# decimal of more than 16 or of 0 bytes.

NATIVE_ENV = "LEDGERFLOW_NATIVE"
_K_STRING, _K_EVTYPE, _K_TENANT, _K_UUID = 1, 2, 3, 4
_K_INT32, _K_UINT32, _K_INT64, _K_TS, _K_TS_ENV = 5, 6, 7, 8, 9
_K_DOUBLE, _K_BOOL, _K_DECIMAL = 10, 11, 12
_K_ARRAY, _K_MAP, _K_NULLABLE = 0x20, 0x40, 0x80
_ENVELOPE_KINDS = {"event_type": _K_EVTYPE, "tenant": _K_TENANT, "event_id": _K_UUID, "correlation_id": _K_UUID}
# Avro item type → (kind, ClickHouse type) inside an array or map
_ITEM_KINDS: dict[str, tuple[int, str]] = {
    "string": (_K_STRING, "String"),
    "int": (_K_INT32, "Int32"),
    "long": (_K_INT64, "Int64"),
    "double": (_K_DOUBLE, "Float64"),
    "boolean": (_K_BOOL, "Bool"),
}
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_EXACT = Context(prec=80, traps=[Inexact])  # scaleb in the default context rounds to 28 digits
OCCURRED_MIN_US = 1_577_836_800_000_000  # 2020-01-01 00:00:00 UTC, the Codec's lower bound
OCCURRED_AHEAD_US = 23 * 3600 * 1_000_000  # now + 23 h (the Codec: now + 24 h), as the Avro checks
_TS_LO_US, _TS_HI_US = -2_208_988_800_000_000, 10_413_791_999_999_999  # DateTime64(6): 1900 .. 2299


def native_available() -> bool:
    """The C transcoder is built (`pip install -e .` or `setup.py build_ext --inplace`)."""
    return _rowbinary is not None


def native_enabled() -> bool:
    """The C transcoder is built and not turned off (`LEDGERFLOW_NATIVE=0` forces the Avro blocks)."""
    return _rowbinary is not None and os.environ.get(NATIVE_ENV, "1").strip() != "0"


class NativeRefused(ValueError):
    """The C transcoder refused record `index` of run `run` (the sink decodes the block with the Codec)."""

    def __init__(self, run: int, index: int) -> None:
        super().__init__(f"{REFUSED} (native check, run {run}, record {index})")
        self.run = run
        self.index = index


@dataclass(frozen=True)
class Native:
    """How one writer's records become RowBinary rows of its table (see `native_plan`)."""

    writer_header: bytes  # MAGIC + fingerprint every record must start with
    event_type: bytes
    program: bytes  # one op per writer field, for _rowbinary.transcode
    defaults: bytes  # the reader defaults' RowBinary bytes, appended to every row
    columns: tuple[str, ...]  # insert order: writer fields, defaulted fields, _topic, _partition, _offset
    structure: str  # file() structure on chDB: the columns' types without LowCardinality
    insert: str  # INSERT INTO t (cols) SETTINGS ... {source}


def _unwrap(ch_type: str, wrapper: str) -> str | None:
    if ch_type.startswith(wrapper + "(") and ch_type.endswith(")"):
        return ch_type[len(wrapper) + 1 : -1]
    return None


def _native_kind(name: str, avro: Any, ch_type: str) -> int:
    """The op of one non-union field of Avro type `avro` into a column of type `ch_type` (unwrapped)."""
    # the envelope checks apply by column name, as in `plan`
    if _is_string(avro) and ch_type == "String":
        return _ENVELOPE_KINDS.get(name, _K_STRING)
    if name in _ENVELOPE_KINDS:
        raise Unsupported(f"{name}: envelope field of type {avro!r}")
    if avro == "int" and ch_type in ("Int32", "UInt32"):
        return _K_INT32 if ch_type == "Int32" else _K_UINT32
    if avro == "long" and ch_type == "Int64":
        return _K_INT64
    if avro == "double" and ch_type == "Float64":
        return _K_DOUBLE
    if avro == "boolean" and ch_type == "Bool":
        return _K_BOOL
    if (
        isinstance(avro, dict)
        and avro.get("type") == "long"
        and avro.get("logicalType") == "timestamp-micros"
        and ch_type == "DateTime64(6, 'UTC')"
    ):
        return _K_TS_ENV if name == "occurred_at" else _K_TS
    if name == "occurred_at":
        raise Unsupported(f"occurred_at of type {avro!r}")
    if (
        _is_decimal(avro)
        and avro.get("type") == "bytes"
        and int(avro.get("precision", 0)) == 38
        and int(avro.get("scale", -1)) == 12
        and ch_type == "Decimal(38, 12)"
    ):
        return _K_DECIMAL
    if isinstance(avro, dict) and avro.get("type") in ("array", "map"):
        inner = avro["items"] if avro["type"] == "array" else avro["values"]
        item = _ITEM_KINDS.get(inner) if isinstance(inner, str) else None
        want = f"Array({item[1]})" if avro["type"] == "array" and item else f"Map(String, {item[1]})" if item else None
        if item is None or ch_type != want:
            raise Unsupported(f"{name}: {avro!r} into {ch_type}")
        return item[0] | (_K_ARRAY if avro["type"] == "array" else _K_MAP)
    raise Unsupported(f"{name}: Avro type {avro!r} into {ch_type}")


def _field_op(name: str, avro: Any, ch_type: str) -> int:
    ch = _unwrap(ch_type, "LowCardinality") or ch_type
    if isinstance(avro, list):
        inner = _unwrap(ch, "Nullable")
        if len(avro) != 2 or avro[0] != "null" or inner is None or isinstance(avro[1], list):
            raise Unsupported(f"{name}: union {avro!r} into {ch_type}")
        op = _native_kind(name, avro[1], inner)
        if op & (_K_ARRAY | _K_MAP) or name in _ENVELOPE_KINDS or name == "occurred_at":
            raise Unsupported(f"{name}: nullable {avro!r}")
        return op | _K_NULLABLE
    if ch.startswith("Nullable("):
        raise Unsupported(f"{name}: non-union {avro!r} into {ch_type}")
    return _native_kind(name, avro, ch)


def _uleb(n: int) -> bytes:
    return _uvarint(n) if n > 0 else b"\x00"


def encode_value(value: Any, ch_type: str) -> bytes:
    """`value` (a row value as the row path inserts it) in RowBinary as column type `ch_type`.

    The reference the C transcoder is held to (tests/test_sink_native.py): a record it accepts
    must give `encode_row` of the row the Codec decodes, byte for byte. Also encodes defaults.
    """
    t = _unwrap(ch_type, "LowCardinality") or ch_type
    inner = _unwrap(t, "Nullable")
    if inner is not None:
        return b"\x01" if value is None else b"\x00" + encode_value(value, inner)
    if t == "String":
        data = value.encode() if isinstance(value, str) else bytes(value)
        return _uleb(len(data)) + data
    if t == "Bool":
        if not isinstance(value, bool):
            raise Unsupported(f"{value!r} for Bool")
        return b"\x01" if value else b"\x00"
    ints = {"Int32": "<i", "UInt32": "<I", "Int64": "<q", "UInt16": "<H", "UInt64": "<Q", "Float64": "<d"}
    if t in ints:
        if t != "Float64" and (isinstance(value, bool) or not isinstance(value, int)):
            raise Unsupported(f"{value!r} for {t}")
        return struct.pack(ints[t], value)
    if t == "Decimal(38, 12)":
        if not isinstance(value, Decimal):
            raise Unsupported(f"{value!r} for {t}")
        return int(value.scaleb(12, _EXACT)).to_bytes(16, "little", signed=True)
    if t == "DateTime64(6, 'UTC')":
        if not isinstance(value, datetime):
            raise Unsupported(f"{value!r} for {t}")
        return struct.pack("<q", (value - _EPOCH) // timedelta(microseconds=1))
    item = _unwrap(t, "Array")
    if item is not None:
        return _uleb(len(value)) + b"".join(encode_value(v, item) for v in value)
    kv = _unwrap(t, "Map")
    if kv is not None and kv.startswith("String, "):
        vt = kv[len("String, ") :]
        return _uleb(len(value)) + b"".join(encode_value(k, "String") + encode_value(v, vt) for k, v in value.items())
    raise Unsupported(f"column type {ch_type}")


def encode_row(row: Sequence[Any], types: Sequence[str]) -> bytes:
    """A row's RowBinary bytes (values in the columns' order, `types` theirs)."""
    return b"".join(encode_value(v, t) for v, t in zip(row, types, strict=True))


def native_plan(writer: Writer, table_types: Mapping[str, str]) -> Native:
    """The RowBinary form of `writer`'s insert into its table; Unsupported when a field is not carried."""
    table = table_for(writer.event_type)
    wanted = set(columns_for(writer.event_type))
    names = [f["name"] for f in writer.fields]
    order = [*names, *writer.defaults, *(m for m, _ in META_FIELDS)]
    if len(set(order)) != len(order) or set(order) != wanted or any(c not in table_types for c in order):
        raise Unsupported(f"{writer.event_type}: writer fields and defaults do not cover {table}'s columns")
    checked = {*_ENVELOPE_KINDS, "occurred_at"}.intersection(writer.defaults)
    if checked:  # a default is written as is: one of these would skip the checks the Codec makes on it
        raise Unsupported(f"{writer.event_type}: an older writer without {sorted(checked)}")
    program = bytes(_field_op(f["name"], f["type"], table_types[f["name"]]) for f in writer.fields)
    try:
        defaults = b"".join(encode_value(v, table_types[n]) for n, v in writer.defaults.items())
    except (TypeError, ValueError, AttributeError, struct.error) as exc:
        raise Unsupported(f"defaults of {writer.event_type}: {exc}") from None
    meta = {m: table_types[m] for m, _ in META_FIELDS}
    if meta != {"_topic": "LowCardinality(String)", "_partition": "UInt16", "_offset": "UInt64"}:
        raise Unsupported(f"{table}: meta columns {meta}")
    # read as the column's type without LowCardinality (converted by the INSERT), as the Avro
    # block is: RowBinary into LowCardinality costs about twice the CPU of the whole plain insert
    structure = ", ".join(f"{c} {_read_type(table_types[c])}" for c in order)
    insert = (
        f"INSERT INTO {table} ({', '.join(order)}) SETTINGS insert_deduplication_token = {{lf_token:String}}, "
        f"max_block_size = {READ_BLOCK_ROWS}, min_insert_block_size_rows = {READ_BLOCK_ROWS + 1}, "
        f"min_insert_block_size_bytes = 0 {{source}}"
    )
    return Native(writer.header, writer.event_type.encode(), program, defaults, tuple(order), structure, insert)


def native_block(p: Plan, topic: str, runs: Sequence[Run], now_us: int | None = None) -> bytes:
    """The RowBinary rows of every run's records (one writer schema), or NativeRefused.

    `now_us` (µs since the epoch, default the clock) sets occurred_at's upper bound, now + 23 h.
    """
    n = p.native
    if n is None or _rowbinary is None:
        raise Unsupported(f"no native form for {p.event_type}")
    now = time.time_ns() // 1000 if now_us is None else now_us
    prefix = n.defaults + _uleb(len(topic.encode())) + topic.encode()
    parts: list[bytes] = []
    for i, r in enumerate(runs):
        tail = prefix + struct.pack("<H", r.partition)
        out = _rowbinary.transcode(
            n.program,
            n.writer_header,
            n.event_type,
            r.values,
            r.offsets,
            tail,
            OCCURRED_MIN_US,
            now + OCCURRED_AHEAD_US,
        )
        if isinstance(out, int):
            raise NativeRefused(i, out)
        parts.append(out)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def insert_native(client: Client, p: Plan, data: bytes, tok: str, settings: Mapping[str, Any] | None = None) -> None:
    """Insert `native_block`'s rows with deduplication token `tok`: nothing to check any more.

    A server gets them as the request body of `... FORMAT RowBinary`; chDB reads them from a
    temporary file through `SELECT * FROM file(path, 'RowBinary', structure)`. `max_block_size`
    and `min_insert_block_size_rows` above any block the sink makes keep the insert one block:
    all of it lands or none (step 4's guarantee)."""
    n = p.native
    if n is None:
        raise Unsupported(f"no native form for {p.event_type}")
    if is_chdb(client):
        fd, path = tempfile.mkstemp(prefix="lf-sink-", suffix=".rowbinary")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            client.command(
                n.insert.replace(
                    "{source}", "SELECT * FROM file({lf_path:String}, 'RowBinary', {lf_structure:String})"
                ),
                parameters={"lf_token": tok, "lf_path": path, "lf_structure": n.structure},
                settings=dict(settings or {}),
            )
        finally:
            os.unlink(path)
    else:
        client.command(
            n.insert.replace("{source}", "FORMAT RowBinary"),
            parameters={"lf_token": tok},
            data=data,
            settings=dict(settings or {}),
        )


def suffix_prefix(topic: str, partition: int) -> bytes:
    """The `_topic`, `_partition` part of every record's suffix in a run (then `_offset`)."""
    return _string(topic.encode()) + varint(partition)


def suffixes(topic: str, partition: int, offsets: Sequence[int]) -> list[bytes]:
    """Each record's suffix (`_topic`, `_partition`, `_offset`), built per window of 64 offsets.

    Why windows: the hot path runs once per record, and encoding a varint in Python costs
    more than the rest of the record's handling; a run's offsets are (nearly) consecutive,
    so each window of 64 is encoded once and every record then costs two list lookups.
    """
    pre = suffix_prefix(topic, partition)
    if not offsets:
        return []
    first, last = offsets[0], offsets[-1]
    if last - first + 1 == len(offsets) and all(map(lt, offsets, islice(offsets, 1, None))):
        # consecutive (the usual run): whole slices of windows, no Python step per record
        out: list[bytes] = []
        for w in range(first >> 6, (last >> 6) + 1):
            lo, hi = max(first - (w << 6), 0), min(last - (w << 6), 63) + 1
            out += _window(pre, w)[lo:hi]
        return out
    windows = {w: _window(pre, w) for w in {o >> 6 for o in offsets}}
    return [windows[o >> 6][o & 63] for o in offsets]


_BODY = itemgetter(slice(HEADER_LEN, None))  # a record without its single-object header


# Offset o = 64w + i (o >= 64) is the zigzag long 2o = 128w + 2i: its varint is one byte
# (2i | 0x80) then the varint of w. So a window shares its tail and differs in one byte.
_LOW = [bytes(((2 * i) | 0x80,)) for i in range(64)]


def _window(pre: bytes, w: int) -> list[bytes]:
    """Suffixes of offsets 64w .. 64w+63."""
    if w <= 0:
        return [pre + varint(x) for x in range(64)]
    tail = _uvarint(w)
    return [pre + low + tail for low in _LOW]


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@dataclass(frozen=True)
class Run:
    """One partition's records in a block: their offsets (ascending) and single-object bytes."""

    partition: int
    offsets: Sequence[int]
    values: Sequence[bytes]


def block(p: Plan, topic: str, partition: int, offsets: Sequence[int], values: Sequence[bytes]) -> bytes:
    """A whole Avro container file: `p.header`, one block of the records' bodies + suffixes."""
    return block_of_runs(p, topic, [Run(partition, offsets, values)])


def block_of_runs(p: Plan, topic: str, runs: Sequence[Run]) -> bytes:
    """One container file holding the runs of several partitions of `topic` (one writer): one insert."""
    parts: list[bytes] = []
    count = 0
    for r in runs:
        if len(r.offsets) != len(r.values):
            raise ValueError("one offset per record")
        chunk: list[bytes] = [b""] * (2 * len(r.values))
        chunk[0::2] = map(_BODY, r.values)
        chunk[1::2] = suffixes(topic, r.partition, r.offsets)
        parts += chunk
        count += len(r.values)
    body = b"".join(parts)
    return b"".join((p.header, varint(count), varint(len(body)), body, p.sync))


def token(topic: str, spans: Sequence[tuple[int, int, int]]) -> str:
    """The deduplication token of a block of (partition, first, last) runs of `topic`.

    One run: `topic-partition-first-last` (issue 10's token); several: those joined by `+`,
    in partition order, so the same runs always give the same token.
    """
    return "+".join(f"{topic}-{p}-{first}-{last}" for p, first, last in sorted(spans))


def parameters(topic: str, partition: int, first: int, last: int, token: str | None = None) -> dict[str, Any]:
    """The INSERT's parameters for one run (see `parameters_of_runs`)."""
    return parameters_of_runs(topic, [(partition, first, last)], token)


def parameters_of_runs(topic: str, spans: Sequence[tuple[int, int, int]], tok: str | None = None) -> dict[str, Any]:
    """The INSERT's parameters: the runs' coordinates (checked per row) and the deduplication token.

    `spans` are (partition, first, last), one per partition. The token rides in the
    statement's SETTINGS clause, not as a client setting: chDB's client applies those with
    SET before and after every call (extra engine calls per insert).
    """
    if len({s[0] for s in spans}) != len(spans):
        raise ValueError("one run per partition in a block")
    return {
        "lf_topic": topic,
        "lf_partitions": [s[0] for s in spans],
        "lf_firsts": [s[1] for s in spans],
        "lf_lasts": [s[2] for s in spans],
        "lf_token": tok if tok is not None else token(topic, spans),
    }


def is_chdb(client: Client) -> bool:
    """chDB has no request body: its inserts read the block from a temporary file instead.

    Also through a wrapper that forwards attributes (projections.faults.OutageClient).
    """
    if type(client).__name__ == "ChdbClient":
        return True
    return type(getattr(client, "_backend", None)).__name__ == "ChdbBackend"


def insert_block(
    client: Client,
    p: Plan,
    data: bytes,
    params: Mapping[str, Any],
    settings: Mapping[str, Any] | None = None,
) -> None:
    """Run `p`'s INSERT with `data` (a container file from `block`) as its input.

    A server gets the block as the request body of `... FROM input(structure) FORMAT Avro`;
    chDB reads it from a temporary file through `file(path, 'Avro', structure)`.
    """
    args = dict(params, lf_structure=p.structure)
    if is_chdb(client):
        fd, path = tempfile.mkstemp(prefix="lf-sink-", suffix=".avro")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            args["lf_path"] = path
            client.command(
                p.sql("file({lf_path:String}, 'Avro', {lf_structure:String})"),
                parameters=args,
                settings=dict(settings or {}),
            )
        finally:
            os.unlink(path)
    else:
        client.command(
            p.sql("input({lf_structure:String})") + " FORMAT Avro",
            parameters=args,
            data=data,
            settings=dict(settings or {}),
        )


TABLE_TYPES_SQL = (
    "SELECT table, name, type FROM system.columns "
    "WHERE database = currentDatabase() AND table IN {tables:Array(String)}"
)
"""table, column, ClickHouse type of the tables named by the `tables` parameter (see `table_types`)."""


def table_types(rows: Sequence[Sequence[Any]]) -> dict[str, dict[str, str]]:
    """table → column → ClickHouse type, from the rows of TABLE_TYPES_SQL."""
    out: dict[str, dict[str, str]] = {}
    for table, name, ch_type in rows:
        out.setdefault(str(table), {})[str(name)] = str(ch_type)
    return out


# --- replay's time filter without decoding ---------------------------------------------------


def occurred_at_micros(value: bytes) -> int | None:
    """The envelope's occurred_at (µs since the epoch) read from the record prefix, None if malformed.

    The envelope is every event's first field: event_id, event_type (strings), schema_version
    (int), tenant (string), occurred_at (long). A replay with `since` needs only this.
    """
    try:
        pos = HEADER_LEN
        for kind in ("s", "s", "i", "s"):
            n, pos = _read_long(value, pos)
            if kind == "s":
                if n < 0:
                    return None
                pos += n
        t, pos = _read_long(value, pos)
        return t if pos <= len(value) else None
    except IndexError:
        return None


def _read_long(data: bytes, pos: int) -> tuple[int, int]:
    b = data[pos]
    n = b & 0x7F
    shift = 7
    pos += 1
    while b & 0x80:
        if shift > 63:
            raise IndexError("varint too long")
        b = data[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        shift += 7
    return (n >> 1) ^ -(n & 1), pos
