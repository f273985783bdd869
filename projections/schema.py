"""Event → ClickHouse row mapping, pure: which table an event lands in and its column values.

Why derived from the .avsc files: the Avro schemas are the single source of truth, so the
payload columns are read from them in field order; a schema change then fails loudly at
insert (unknown column) and in CI (the migrations test), never silently drops a field.
"""

from __future__ import annotations

import base64
import re
from datetime import datetime
from functools import cache
from typing import Any

from streams.deadletter import DeadLetter
from streams.events import EVENT_TYPES, Event
from streams.schemas import load_all
from streams.topics import CATALOGUE

ENVELOPE_COLUMNS: tuple[str, ...] = (
    "event_id",
    "event_type",
    "schema_version",
    "tenant",
    "occurred_at",
    "trace_parent",
    "correlation_id",
    "causation_id",
    "producer",
)
META_COLUMNS: tuple[str, ...] = ("_topic", "_partition", "_offset")
DEAD_LETTERS = "dead_letters"
DEAD_LETTER_COLUMNS: tuple[str, ...] = (
    "reason",
    "detail",
    "source_topic",
    "source_partition",
    "source_offset",
    "consumer",
    "first_seen",
    "key_base64",
    "value_base64",
    "value_size",
    *META_COLUMNS,
)
MAX_DETAIL = 4000  # a detail is a diagnostic, not a payload; cap it so one bad record stays small


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


# Tables not named after their event type (the name the read side asked for)
TABLE_NAMES: dict[str, str] = {
    "ConsumerLagSampled": "consumer_lag",  # issue 11: the portal and Grafana query this name
    "LedgerVerified": "ledger_verifications",
    "SpendForecasted": "spend_forecasts",  # issue 7: the portal draws them against the budget
    "BudgetVarianceAlerted": "budget_variance_alerts",
}


def table_for(event_type: str) -> str:
    """Table holding `event_type` (RequestReceived → request_received); KeyError if unknown."""
    if event_type not in EVENT_TYPES:
        raise KeyError(f"no projection table for unknown event type {event_type!r}")
    return TABLE_NAMES.get(event_type) or _snake(event_type)


def event_tables() -> dict[str, str]:
    """Every projected event type and its table: those on a catalogue topic, which the sink reads.

    An event type defined in `schemas/avro/` but on no topic yet (nothing records it) has no
    table; the issue that gives it a topic adds its migration.
    """
    return {name: table_for(name) for spec in CATALOGUE for name in spec.events}


@cache
def payload_fields(event_type: str) -> tuple[str, ...]:
    """Payload field names of `event_type` in .avsc order (the envelope excluded)."""
    raw = load_all()[event_type].raw
    return tuple(f["name"] for f in raw["fields"] if f["name"] != "envelope")


def columns_for(event_type: str) -> tuple[str, ...]:
    """Insert column order of `event_type`'s table (everything but defaulted `_ingested_at`)."""
    return ENVELOPE_COLUMNS + payload_fields(event_type) + META_COLUMNS


def event_to_row(event: Event, topic: str, partition: int, offset: int) -> list[Any]:
    """Values for `columns_for(event.event_type)`, in that order."""
    env = event.envelope
    row: list[Any] = [getattr(env, c) for c in ENVELOPE_COLUMNS]
    row.extend(_column_value(getattr(event, f)) for f in payload_fields(event.event_type))
    row.extend((topic, partition, offset))
    return row


def _column_value(value: Any) -> Any:
    """An array of nested Avro records (PriceListPublished.prices) goes to an Array(Tuple(...)) column as tuples."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return [tuple(item.values()) for item in value]
    return value


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


def dead_letter_row(dl: DeadLetter, topic: str, partition: int, offset: int) -> list[Any]:
    """Values for `DEAD_LETTER_COLUMNS`; the raw key/value are kept base64 so any output format stays text."""
    first_seen: datetime = dl.first_seen
    return [
        dl.reason,
        dl.detail[:MAX_DETAIL],
        dl.topic,
        dl.partition,
        dl.offset,
        dl.consumer,
        first_seen,
        _b64(dl.key),
        _b64(dl.value),
        len(dl.value or b""),
        topic,
        partition,
        offset,
    ]
