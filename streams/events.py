"""Python shapes of the events in `schemas/avro/`: one frozen dataclass per record.

Field names and order mirror the .avsc files exactly (a test holds them together), so the
codec can move between dicts and dataclasses without a mapping table.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar


@dataclass(frozen=True, slots=True)
class Envelope:
    event_id: str
    event_type: str
    schema_version: int
    tenant: str
    occurred_at: datetime
    correlation_id: str
    producer: str
    trace_parent: str | None = None
    causation_id: str | None = None


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event; `envelope` is always the first field."""

    envelope: Envelope
    SCHEMA_VERSION: ClassVar[int] = 1

    @property
    def event_type(self) -> str:
        return type(self).__name__

    @property
    def tenant(self) -> str:
        return self.envelope.tenant

    def to_record(self) -> dict[str, Any]:
        """Plain dict in Avro field layout (the envelope as a nested dict)."""
        record: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        env = self.envelope
        record["envelope"] = {f.name: getattr(env, f.name) for f in fields(env)}
        return record


@dataclass(frozen=True, slots=True)
class RequestReceived(Event):
    request_id: str
    route: str
    api_key_id: str
    message_count: int
    prompt_chars: int
    prompt_sha256: str
    model_hint: str | None = None


@dataclass(frozen=True, slots=True)
class PolicyDecided(Event):
    request_id: str
    decision: str
    policy_version: str
    determining_policies: list[str]
    input_sha256: str


@dataclass(frozen=True, slots=True)
class TokensCharged(Event):
    request_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    input_price_per_mtok: Decimal
    output_price_per_mtok: Decimal
    price_list_version: str
    currency: str
    cost: Decimal


@dataclass(frozen=True, slots=True)
class AuditRecorded(Event):
    action: str
    actor: str
    subject: str
    outcome: str
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TenantTotalsUpdated(Event):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal
    currency: str
    source_partition: int
    source_offset: int


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls for cls in (RequestReceived, PolicyDecided, TokensCharged, AuditRecorded, TenantTotalsUpdated)
}
