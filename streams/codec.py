"""Avro single-object encoding for events: `C3 01`, 8-byte fingerprint, Avro binary body.

The fingerprint names the writer schema, so no registry server is needed: a reader keeps a
fingerprint → schema map built from `schemas/avro/` and from every released version in
`schemas/fixtures/`, whose bytes are resolved (Avro schema resolution) to today's schema.
Anything that does not decode into a valid event raises `PoisonEvent` with a reason fit
for a dead-letter record.

Decoding runs a reader compiled per writer schema (`streams.avro_fast`) that builds the event
dataclass straight from the bytes, then checks the envelope: the same event, or the same
PoisonEvent reason, as fastavro's `schemaless_reader` plus the dataclass constructors and
`validate_envelope` gave, about 4x faster (bench/bench_codec.py, BENCHMARKS.md). It refuses a
few malformed inputs fastavro let through (see streams.avro_fast) as "undecodable-body".
`Codec(fast=False)` keeps the fastavro path (the reference in tests and the benchmark); a
schema whose fields do not match its dataclass falls back to it by itself (`fast_schemas`).

Encoding likewise runs a writer compiled per schema (`streams.avro_write`) that reads the
event's attributes directly (no `to_record()` dicts) and gives fastavro's bytes, ~4x
faster; a value it does not take exactly as fastavro would (odd types, naive times...) is
handed to fastavro, so the bytes, or the error, are fastavro's (tests/test_avro_write.py).
`encode_reference` is the fastavro path itself.
"""

from __future__ import annotations

import contextlib
import io
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from fastavro import schemaless_reader, schemaless_writer

from streams.avro_fast import Build, compile_reader
from streams.avro_write import NotCompilable, compile_writer
from streams.events import EVENT_TYPES, Envelope, Event
from streams.evolution import released_writers
from streams.schemas import ENVELOPE_NAME, EventSchema, load_all

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
MONEY_QUANTUM = Decimal("1e-12")  # scale of every Avro decimal money field
_MAX_FUTURE = timedelta(days=1)
_MIN_TIME = datetime(2020, 1, 1, tzinfo=UTC)
# byte → "x" for a hex digit, "-" for itself, "?" for anything else (an "x" too)
_HEX_TO_X = bytes(b"x"[0] if chr(b) in "0123456789abcdefABCDEF" else b if b == b"-"[0] else b"?"[0] for b in range(256))
_TWO_UUIDS = b"xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" * 2  # two canonical ids, after _HEX_TO_X


class PoisonEvent(ValueError):
    """Bytes that are not a valid event; `reason` is short and stable enough to group by."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Codec:
    """Encodes and decodes events; one instance per process is enough (it caches schemas and readers)."""

    def __init__(
        self,
        schemas: dict[str, EventSchema] | None = None,
        *,
        fast: bool = True,
        released: dict[bytes, EventSchema] | None = None,
    ) -> None:
        self._by_name = schemas if schemas is not None else load_all()
        self._latest = [datetime.now(UTC) + _MAX_FUTURE]  # a past bound is lower, so only ever re-checked
        # MAGIC + fingerprint → read(data, HEADER_LEN) → validated event
        self._readers: dict[bytes, Callable[[bytes, int], Event]] = {}
        self.fast_schemas: set[str] = set()  # names decoded by a compiled reader
        # event type → compiled writer of header + body (streams.avro_write); none: fastavro
        self._writers: dict[str, Callable[[Event], bytes]] = {}
        for schema in self._by_name.values():
            if fast:
                with contextlib.suppress(NotCompilable):
                    self._writers[schema.name] = compile_writer(
                        schema.parsed,
                        attr_records={schema.parsed["name"], ENVELOPE_NAME},
                        prefix=MAGIC + schema.fingerprint,
                    )
            reader = self._compile(schema) if fast else None
            if reader is None:
                reader = self._reference_reader(schema)
            else:
                self.fast_schemas.add(schema.name)
            self._readers[MAGIC + schema.fingerprint] = reader
        # Bytes written by an earlier release of a schema (facts are kept forever): read with
        # the writer's schema, resolved to today's, so old records never become poison.
        writers = released if released is not None else (released_writers() if schemas is None else {})
        for fingerprint, writer in writers.items():
            today = self._by_name.get(writer.name)
            if today is not None and MAGIC + fingerprint not in self._readers:
                self._readers[MAGIC + fingerprint] = self._reference_reader(today, writer)

    def encode(self, event: Event) -> bytes:
        """Header + Avro body. The compiled writer gives fastavro's bytes for the values it
        takes; anything else it refuses (a raise), and fastavro writes it or raises as before."""
        write = self._writers.get(event.event_type)
        if write is not None:
            try:
                return write(event)
            except Exception:  # an unusual value: fastavro has the last word, bytes or error
                pass
        return self.encode_reference(event)

    def encode_reference(self, event: Event) -> bytes:
        """fastavro's writer over `Event.to_record()`: the reference the compiled writer matches."""
        schema = self._by_name[event.event_type]
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(schema.fingerprint)
        schemaless_writer(buf, schema.parsed, event.to_record())
        return buf.getvalue()

    def decode(self, data: bytes | None) -> Event:
        """Decode and validate; raises PoisonEvent on anything wrong."""
        if type(data) is bytes:
            read = self._readers.get(data[:HEADER_LEN])
            if read is not None:
                return _guarded(read, data)
        if data is None or len(data) < HEADER_LEN or data[:2] != MAGIC:
            raise PoisonEvent("not-single-object-encoding", "missing C3 01 header")
        data = bytes(data)  # bytearray, memoryview...
        read = self._readers.get(data[:HEADER_LEN])
        if read is None:
            raise PoisonEvent("unknown-fingerprint", data[2:HEADER_LEN].hex())
        return _guarded(read, data)

    # -- the compiled path --

    def _compile(self, schema: EventSchema) -> Callable[[bytes, int], Event] | None:
        cls = EVENT_TYPES.get(schema.name)
        if cls is None:
            return None  # the reference path says unknown-event-type after decoding, as before
        build = Build(cls, fields={"envelope": Build(Envelope, check=self._envelope_check(schema.name))})
        try:
            return compile_reader(schema.parsed, build, on_error=_body_error)
        except (ValueError, TypeError, KeyError, SyntaxError, RecursionError):
            return None  # fields that do not match the dataclass: the reference path says schema-mismatch

    def _envelope_check(self, expected_type: str) -> Callable[[Envelope], None]:
        """`validate_envelope(env, expected_type)`, same outcome and reason, with fast paths.

        Ids: two canonical 8-4-4-4-12 hex ids pass on one translate; anything else goes to
        `uuid.UUID()` as before (it also takes braces, "urn:uuid:", no hyphens...). Time: the
        `now + 1 day` bound is cached and recomputed only when an event lies beyond it; a past
        bound is lower than the true one, so that is the same test as recomputing it each time
        (unless the wall clock steps back: then, until an event beyond the old bound comes,
        events up to that step further ahead still pass).
        """
        latest = self._latest

        def check(env: Envelope) -> None:
            tenant = env.tenant
            if not tenant or tenant.isspace():
                raise PoisonEvent("missing-tenant")
            if env.event_type != expected_type:
                raise PoisonEvent("type-mismatch", f"envelope says {env.event_type}, schema is {expected_type}")
            try:  # both 36 long: a 35 + 37 pair would line up as two canonical ids in the join
                canonical = (
                    len(env.event_id) == 36
                    and (env.event_id + env.correlation_id).encode().translate(_HEX_TO_X) == _TWO_UUIDS
                )
            except (TypeError, AttributeError, ValueError):
                canonical = False
            if not canonical:
                _check_ids(env)  # anything uuid.UUID() accepts is still fine
            ts = env.occurred_at
            if ts.tzinfo is None or ts < _MIN_TIME or ts > latest[0]:
                latest[0] = datetime.now(UTC) + _MAX_FUTURE
                if ts.tzinfo is None or ts < _MIN_TIME or ts > latest[0]:
                    raise PoisonEvent("insane-time", ts.isoformat())

        return check

    # -- the reference path: fastavro, then the dataclasses --

    def _reference_reader(
        self, schema: EventSchema, writer: EventSchema | None = None
    ) -> Callable[[bytes, int], Event]:
        writer_schema = (writer or schema).parsed
        reader_schema = schema.parsed if writer is not None else None

        def read(data: bytes, pos: int) -> Event:
            buf = io.BytesIO(data)
            buf.seek(pos)
            try:
                record: dict[str, Any] = schemaless_reader(buf, writer_schema, reader_schema)  # type: ignore[assignment]
            except Exception as exc:  # fastavro raises EOFError, ValueError, UnicodeDecodeError...
                raise PoisonEvent("undecodable-body", f"{type(exc).__name__}: {exc}") from None
            if buf.tell() != len(data):
                raise PoisonEvent("trailing-bytes", f"{len(data) - buf.tell()} bytes after the record")
            return self._to_event(schema.name, record)

        return read

    def _to_event(self, name: str, record: dict[str, Any]) -> Event:
        cls = EVENT_TYPES.get(name)
        if cls is None:
            raise PoisonEvent("unknown-event-type", name)
        env = Envelope(**record.pop("envelope"))
        validate_envelope(env, name)
        try:
            return cls(envelope=env, **record)
        except TypeError as exc:
            raise PoisonEvent("schema-mismatch", str(exc)) from None


def _guarded(read: Callable[[bytes, int], Event], data: bytes) -> Event:
    """An event's own checks (`__post_init__`) run after the body is read and may raise
    ValueError or TypeError: that is a poison record too, never an error its consumer must know."""
    try:
        return read(data, HEADER_LEN)
    except PoisonEvent:
        raise
    except (ValueError, TypeError) as exc:
        raise PoisonEvent("invalid-value", f"{type(exc).__name__}: {exc}") from None


def _body_error(exc: BaseException | None, pos: int, end: int) -> PoisonEvent:
    if exc is not None:
        return PoisonEvent("undecodable-body", f"{type(exc).__name__}: {exc}")
    if pos < end:
        return PoisonEvent("trailing-bytes", f"{end - pos} bytes after the record")
    return PoisonEvent("undecodable-body", f"EOFError: the record needs more than the {end} bytes given")


def _check_ids(env: Envelope) -> None:
    for name in ("event_id", "correlation_id"):
        try:
            uuid.UUID(str(getattr(env, name)))
        except ValueError:
            raise PoisonEvent("malformed-id", f"{name}={getattr(env, name)!r}") from None


def validate_envelope(env: Envelope, expected_type: str) -> None:
    """The checks every consumer relies on: a tenant, well-formed ids, a sane time."""
    if not env.tenant or not env.tenant.strip():
        raise PoisonEvent("missing-tenant")
    if env.event_type != expected_type:
        raise PoisonEvent("type-mismatch", f"envelope says {env.event_type}, schema is {expected_type}")
    _check_ids(env)
    ts = env.occurred_at
    if ts.tzinfo is None or ts < _MIN_TIME or ts > datetime.now(UTC) + _MAX_FUTURE:
        raise PoisonEvent("insane-time", ts.isoformat())


def money(value: Decimal) -> Decimal:
    """Quantize to the scale every money field is stored at; raise if that loses digits."""
    q = value.quantize(MONEY_QUANTUM)
    if q != value:
        raise ValueError(f"{value} has more than 12 decimal places")
    return q
