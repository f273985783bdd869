"""Avro single-object encoding for events: `C3 01`, 8-byte fingerprint, Avro binary body.

The fingerprint names the writer schema, so no registry server is needed: a reader keeps a
fingerprint → schema map built from `schemas/avro/` (and, later, older released versions).
Anything that does not decode into a valid event raises `PoisonEvent` with a reason fit
for a dead-letter record.
"""

from __future__ import annotations

import io
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from fastavro import schemaless_reader, schemaless_writer

from streams.events import EVENT_TYPES, Envelope, Event
from streams.schemas import EventSchema, load_all

MAGIC = b"\xc3\x01"
HEADER_LEN = 10
MONEY_QUANTUM = Decimal("1e-12")  # scale of every Avro decimal money field
_MAX_FUTURE = timedelta(days=1)
_MIN_TIME = datetime(2020, 1, 1, tzinfo=UTC)


class PoisonEvent(ValueError):
    """Bytes that are not a valid event; `reason` is short and stable enough to group by."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Codec:
    """Encodes and decodes events; one instance per process is enough (it caches schemas)."""

    def __init__(self, schemas: dict[str, EventSchema] | None = None) -> None:
        self._by_name = schemas if schemas is not None else load_all()
        self._by_fingerprint = {s.fingerprint: s for s in self._by_name.values()}

    def encode(self, event: Event) -> bytes:
        schema = self._by_name[event.event_type]
        buf = io.BytesIO()
        buf.write(MAGIC)
        buf.write(schema.fingerprint)
        schemaless_writer(buf, schema.parsed, event.to_record())
        return buf.getvalue()

    def decode(self, data: bytes | None) -> Event:
        """Decode and validate; raises PoisonEvent on anything wrong."""
        if data is None or len(data) < HEADER_LEN or data[:2] != MAGIC:
            raise PoisonEvent("not-single-object-encoding", "missing C3 01 header")
        schema = self._by_fingerprint.get(bytes(data[2:HEADER_LEN]))
        if schema is None:
            raise PoisonEvent("unknown-fingerprint", data[2:HEADER_LEN].hex())
        buf = io.BytesIO(data)
        buf.seek(HEADER_LEN)
        try:
            record: dict[str, Any] = schemaless_reader(buf, schema.parsed, None)  # type: ignore[assignment]
        except Exception as exc:  # fastavro raises EOFError, ValueError, UnicodeDecodeError...
            raise PoisonEvent("undecodable-body", f"{type(exc).__name__}: {exc}") from None
        if buf.tell() != len(data):
            raise PoisonEvent("trailing-bytes", f"{len(data) - buf.tell()} bytes after the record")
        return self._to_event(schema.name, record)

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


def validate_envelope(env: Envelope, expected_type: str) -> None:
    """The checks every consumer relies on: a tenant, well-formed ids, a sane time."""
    if not env.tenant or not env.tenant.strip():
        raise PoisonEvent("missing-tenant")
    if env.event_type != expected_type:
        raise PoisonEvent("type-mismatch", f"envelope says {env.event_type}, schema is {expected_type}")
    for name in ("event_id", "correlation_id"):
        try:
            uuid.UUID(str(getattr(env, name)))
        except ValueError:
            raise PoisonEvent("malformed-id", f"{name}={getattr(env, name)!r}") from None
    ts = env.occurred_at
    if ts.tzinfo is None or ts < _MIN_TIME or ts > datetime.now(UTC) + _MAX_FUTURE:
        raise PoisonEvent("insane-time", ts.isoformat())


def money(value: Decimal) -> Decimal:
    """Quantize to the scale every money field is stored at; raise if that loses digits."""
    q = value.quantize(MONEY_QUANTUM)
    if q != value:
        raise ValueError(f"{value} has more than 12 decimal places")
    return q
