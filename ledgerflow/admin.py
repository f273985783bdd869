"""Administrative commands record their fact and its audit record in one transaction.

Key issuance, revocation, policy publishes and attribute changes are auditable actions: the
ledger chains every `AuditRecorded`, so a command that changes state records both together
(never the change without its audit entry, never the reverse).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from ledgerflow.settings import Settings
from streams.events import AuditRecorded, Envelope, Event
from streams.ids import uuid7
from streams.publisher import FactPublisher
from streams.topics import Topics

PRODUCER = "cli"


def envelope(event_type: str, tenant: str) -> Envelope:
    eid = str(uuid7())
    return Envelope(
        event_id=eid, event_type=event_type, schema_version=1, tenant=tenant,
        occurred_at=datetime.now(UTC), correlation_id=eid, producer=PRODUCER,
    )  # fmt: skip


def audit_of(
    event: Event, action: str, actor: str, subject: str, details: dict[str, str] | None = None
) -> AuditRecorded:
    """The audit record of an administrative fact: same tenant and time, id derived from it."""
    return AuditRecorded(
        envelope=event.envelope.caused_by("AuditRecorded", event.envelope.producer),
        action=action,
        actor=actor,
        subject=subject,
        outcome="success",
        details=details or {},
    )


def publish(settings: Settings, events: list[Event], timeout: float = 30.0) -> None:
    """Publish `events` in one transaction from a short-lived publisher."""
    topics = Topics(settings.topic_prefix, settings.partitions)
    publisher = FactPublisher(settings.bootstrap, f"ledgerflow-cli-{uuid7()}", topics)
    publisher.start()
    try:
        asyncio.run(publisher.publish(events, timeout=timeout))
    finally:
        publisher.close()
