"""Released schema versions (`schemas/fixtures/`) and the rules a new version must keep.

Each released version of an event schema is frozen as `schemas/fixtures/<Event>/v<N>.avsc`
(envelope inlined: what `streams.schemas.load_all()[name].raw` was at release) with a sample
written by it, `v<N>.bin` (single-object encoding). `schemas/avro/EVOLUTION.md` states the
policy; this module is what the tests and `scripts/freeze_schemas.py` check it with:

- `fixture_problems`: a schema with no fixture, or one that differs from its latest fixture.
- `breaking_changes`: static rules Avro resolution does not catch (a removed field that had a
  default, a changed logical type, union or enum).
- `resolve`: decode bytes written by one version with another version as reader.

`released_writers()` is the fingerprint → schema map of every released version, for a
codec that must read history written before today's schema.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from fastavro import schemaless_reader, schemaless_writer
from fastavro.schema import to_parsing_canonical_form

from streams.schemas import SCHEMA_DIR, EventSchema, build

FIXTURE_DIR = SCHEMA_DIR.parent / "fixtures"
FREEZE_HINT = "run scripts/freeze_schemas.py and commit the fixture"
SINGLE_OBJECT_MAGIC = b"\xc3\x01"  # the same header streams.codec writes
_HEADER_LEN = 10

_PRIMITIVES = frozenset({"null", "boolean", "int", "long", "float", "double", "bytes", "string"})
_NAMED = frozenset({"record", "error", "enum", "fixed"})
_LOGICAL_KEYS = ("logicalType", "precision", "scale")
SAMPLE_TIME = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
_SAMPLE_IDS = ("0194a3e2-7b1c-7def-8abc-0123456789ab", "0194a3e2-7b1c-7def-8abc-0123456789ac")


@dataclass(frozen=True)
class Fixture:
    """One released version of one event schema."""

    name: str
    version: int
    schema: EventSchema
    sample: bytes | None  # None when v<N>.bin is missing (a fixture problem)

    @property
    def raw(self) -> dict[str, Any]:
        return self.schema.raw


# --- loading ----------------------------------------------------------------------------


def schema_from_raw(raw: dict[str, Any]) -> EventSchema:
    """EventSchema of a fixture: its envelope is already inlined, so there is nothing to add."""
    return build(raw, {})


def load_fixtures(directory: Path = FIXTURE_DIR) -> dict[str, list[Fixture]]:
    """Every released version, by event name, oldest first."""
    out: dict[str, list[Fixture]] = {}
    if not directory.is_dir():
        return out
    for event_dir in sorted(p for p in directory.iterdir() if p.is_dir()):
        versions: list[Fixture] = []
        for avsc in event_dir.glob("v*.avsc"):
            number = avsc.stem[1:]
            if not number.isdigit():
                continue
            raw = json.loads(avsc.read_text())
            bin_path = avsc.with_suffix(".bin")
            sample = bin_path.read_bytes() if bin_path.exists() else None
            versions.append(Fixture(event_dir.name, int(number), schema_from_raw(raw), sample))
        if versions:
            out[event_dir.name] = sorted(versions, key=lambda f: f.version)
    return out


def released_writers(directory: Path = FIXTURE_DIR) -> dict[bytes, EventSchema]:
    """Fingerprint → writer schema of every released version (for reading old bytes)."""
    return {f.schema.fingerprint: f.schema for versions in load_fixtures(directory).values() for f in versions}


# --- comparing a schema with its latest release -----------------------------------------


def _strip_docs(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _strip_docs(v) for k, v in schema.items() if k != "doc"}
    if isinstance(schema, list):
        return [_strip_docs(v) for v in schema]
    return schema


def difference(current: dict[str, Any], released: dict[str, Any]) -> str | None:
    """Why `current` is not the `released` version, or None when it is.

    The parsing canonical form (what the fingerprint hashes) decides first. It leaves out
    defaults, aliases and logical types, yet those change how data is read (a decimal's scale,
    a new field's default), so they count too. Docs alone never make a new version.
    """
    if to_parsing_canonical_form(current) != to_parsing_canonical_form(released):
        return "its parsing canonical form differs"
    if _strip_docs(current) != _strip_docs(released):
        return "defaults, aliases or logical types differ (the canonical form leaves them out)"
    return None


def fixture_problems(
    schemas: dict[str, EventSchema], fixtures: dict[str, list[Fixture]], directory: Path = FIXTURE_DIR
) -> list[str]:
    """What CI refuses: unreleased schemas, changes without a new fixture, incomplete fixtures."""
    problems: list[str] = []
    for name, schema in sorted(schemas.items()):
        versions = fixtures.get(name)
        if not versions:
            problems.append(f"{name}: no fixture in {directory.name}/{name}/; {FREEZE_HINT}")
            continue
        numbers = [f.version for f in versions]
        if numbers != list(range(1, len(numbers) + 1)):
            problems.append(f"{name}: fixture versions {numbers} are not v1..v{len(numbers)}")
        problems.extend(f"{name}: v{f.version}.bin is missing; {FREEZE_HINT}" for f in versions if f.sample is None)
        latest = versions[-1]
        why = difference(schema.raw, latest.raw)
        if why:
            where = f"schemas/avro/{name}.avsc differs from fixture v{latest.version}"
            problems.append(f"{name}: {where}: {why}; {FREEZE_HINT}")
    for name in sorted(set(fixtures) - set(schemas)):
        problems.append(f"{name}: released (has fixtures) but schemas/avro/{name}.avsc is gone; never remove an event")
    return problems


# --- static compatibility rules ----------------------------------------------------------


def _kind(schema: Any) -> str:
    if isinstance(schema, list):
        return "union"
    if isinstance(schema, dict):
        t = schema["type"]
        return t if isinstance(t, str) else _kind(t)
    return str(schema)


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _logical(schema: Any) -> tuple[Any, ...]:
    return tuple(schema.get(k) for k in _LOGICAL_KEYS) if isinstance(schema, dict) else (None, None, None)


def _describe(schema: Any) -> str:
    if isinstance(schema, list):
        return "[" + ", ".join(_describe(s) for s in schema) + "]"
    if isinstance(schema, dict) and schema.get("name"):
        return str(schema["name"])
    if isinstance(schema, dict) and schema.get("logicalType"):
        return f"{schema['type']}/{schema['logicalType']}"
    return _kind(schema)


class _Walker:
    """Walks an old and a new schema side by side, collecting what breaks either reader."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self._old_named: dict[str, Any] = {}
        self._new_named: dict[str, Any] = {}

    def _deref(self, schema: Any, named: dict[str, Any]) -> Any:
        if isinstance(schema, str) and schema not in _PRIMITIVES:
            return named.get(_short(schema), schema)
        if isinstance(schema, dict) and isinstance(schema.get("type"), dict | list):
            return self._deref(schema["type"], named)  # {"type": {...}} wrapping
        if isinstance(schema, dict) and schema.get("type") in _NAMED:
            named.setdefault(_short(schema["name"]), schema)
        return schema

    def compare(self, old: Any, new: Any, path: str) -> None:
        old, new = self._deref(old, self._old_named), self._deref(new, self._new_named)
        old_kind, new_kind = _kind(old), _kind(new)
        if old_kind != new_kind:
            self.problems.append(f"{path}: type changed from {_describe(old)} to {_describe(new)}")
            return
        if old_kind in _PRIMITIVES:
            if _logical(old) != _logical(new):
                was, now = _logical(old), _logical(new)
                self.problems.append(f"{path}: logical type changed from {was} to {now}")
        elif old_kind == "union":
            if len(old) != len(new):
                self.problems.append(f"{path}: union changed from {_describe(old)} to {_describe(new)}")
            else:
                for i, (o, n) in enumerate(zip(old, new, strict=True)):
                    self.compare(o, n, f"{path}<{i}>")
        elif old_kind == "array":
            self.compare(old["items"], new["items"], f"{path}[]")
        elif old_kind == "map":
            self.compare(old["values"], new["values"], f"{path}{{}}")
        elif old_kind == "enum":
            if old["symbols"] != new["symbols"]:
                self.problems.append(f"{path}: enum symbols changed from {old['symbols']} to {new['symbols']}")
        elif old_kind == "fixed":
            if old["size"] != new["size"]:
                self.problems.append(f"{path}: fixed size changed from {old['size']} to {new['size']}")
        elif old_kind in ("record", "error"):
            self._compare_records(old, new, path)

    def _compare_records(self, old: dict[str, Any], new: dict[str, Any], path: str) -> None:
        new_names = {_short(new["name"]), *map(_short, new.get("aliases", []))}
        if _short(old["name"]) not in new_names:
            self.problems.append(f"{path}: record renamed from {old['name']} to {new['name']} without an alias")
        matched: set[str] = set()
        for of in old["fields"]:
            nf = next((f for f in new["fields"] if f["name"] == of["name"]), None)
            nf = nf or next((f for f in new["fields"] if of["name"] in f.get("aliases", [])), None)
            if nf is None:
                self.problems.append(f"{path}.{of['name']}: field removed")
                continue
            matched.add(nf["name"])
            self.compare(of["type"], nf["type"], f"{path}.{of['name']}")
        for nf in new["fields"]:
            if nf["name"] not in matched and "default" not in nf:
                self.problems.append(f"{path}.{nf['name']}: field added without a default")


def breaking_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Changes from `old` to `new` that EVOLUTION.md forbids within one record name.

    Stricter than Avro resolution on purpose: a field removed while it had a default, or a
    changed decimal scale, still resolves but silently loses or misreads data.
    """
    walker = _Walker()
    walker.compare(old, new, _short(old["name"]))
    return walker.problems


# --- samples and resolution ----------------------------------------------------------------


def _sample_envelope(event_type: str) -> dict[str, Any]:
    return {
        "event_id": _SAMPLE_IDS[0],
        "event_type": event_type,
        "schema_version": 1,
        "tenant": "acme",
        "occurred_at": SAMPLE_TIME,
        "trace_parent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "correlation_id": _SAMPLE_IDS[1],
        "causation_id": _SAMPLE_IDS[0],
        "producer": "fixture",
    }


def _sample(schema: Any, hint: str, named: dict[str, Any], event_type: str) -> Any:
    """A deterministic value for `schema`: every optional set, every array and map non-empty.

    Fully populated on purpose: an empty array or a null union never exercises the schema
    of what it would hold, so resolution would pass over a broken nested change.
    """
    if isinstance(schema, list):
        branch = next((s for s in schema if s != "null"), "null")
        return _sample(branch, hint, named, event_type)
    if isinstance(schema, str):
        if schema in _PRIMITIVES:
            return {
                "null": None,
                "boolean": True,
                "int": 7,
                "long": 42,
                "float": 0.5,
                "double": 0.25,
                "bytes": b"\x01\x02",
                "string": f"{hint}-sample",
            }[schema]
        return _sample(named[_short(schema)], hint, named, event_type)
    kind = schema["type"]
    if isinstance(kind, dict | list):
        return _sample(kind, hint, named, event_type)
    logical = schema.get("logicalType")
    if logical == "decimal":
        scale = int(schema.get("scale", 0))
        return Decimal(12345).scaleb(-scale) if int(schema["precision"]) >= 5 else Decimal(1)
    if logical == "timestamp-micros":
        return SAMPLE_TIME
    if logical == "timestamp-millis":
        return SAMPLE_TIME.replace(microsecond=678000)
    if logical == "date":
        return date(2025, 1, 2)
    if logical == "uuid":
        return _SAMPLE_IDS[0]
    if kind in _NAMED:
        named.setdefault(_short(schema["name"]), schema)
    if kind in ("record", "error"):
        if _short(schema["name"]) == "Envelope":
            return _sample_envelope(event_type)
        return {f["name"]: _sample(f["type"], f["name"], named, event_type) for f in schema["fields"]}
    if kind == "array":
        return [_sample(schema["items"], hint, named, event_type)]
    if kind == "map":
        return {"key": _sample(schema["values"], hint, named, event_type)}
    if kind == "enum":
        return schema["symbols"][0]
    if kind == "fixed":
        return bytes(int(schema["size"]))
    return _sample(kind, hint, named, event_type)


def sample_record(schema: EventSchema) -> dict[str, Any]:
    """A fully populated, valid, deterministic record of `schema` (envelope included)."""
    return _sample(schema.raw, schema.name, {}, schema.name)  # type: ignore[no-any-return]


def encode(schema: EventSchema, record: dict[str, Any]) -> bytes:
    """Single-object encoding of `record` written with `schema`."""
    buf = io.BytesIO()
    buf.write(SINGLE_OBJECT_MAGIC)
    buf.write(schema.fingerprint)
    schemaless_writer(buf, schema.parsed, record)
    return buf.getvalue()


def resolve(data: bytes, writer: EventSchema, reader: EventSchema) -> dict[str, Any]:
    """Decode `data` written by `writer` as `reader` sees it (Avro schema resolution).

    Raises ValueError when the header does not name `writer`, and fastavro's errors
    (SchemaResolutionError and friends) when the reader cannot read what the writer wrote.
    """
    if data[:2] != SINGLE_OBJECT_MAGIC or data[2:_HEADER_LEN] != writer.fingerprint:
        raise ValueError(f"bytes are not single-object encoded by {writer.name} {writer.fingerprint.hex()}")
    buf = io.BytesIO(data)
    buf.seek(_HEADER_LEN)
    record = schemaless_reader(buf, writer.parsed, reader.parsed)
    if buf.tell() != len(data):
        raise ValueError(f"{len(data) - buf.tell()} bytes left after the record")
    return record  # type: ignore[return-value]
