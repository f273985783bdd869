"""`ledgerflow keys issue | revoke | list`: API keys as events on the compacted api-keys topic.

The secret is printed once and never stored or recorded: the event carries its SHA-256.
Every gateway replica follows the topic, so a key works (or stops working) everywhere
within about a second.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from datetime import UTC, datetime

from ledgerflow.settings import Settings
from streams.admin import read_to_end
from streams.codec import Codec
from streams.events import ApiKeyIssued, ApiKeyRevoked, Envelope, Event
from streams.ids import uuid7
from streams.publisher import FactPublisher
from streams.topics import Topics

PRODUCER = "cli"


def _envelope(event_type: str, tenant: str) -> Envelope:
    eid = str(uuid7())
    return Envelope(
        event_id=eid, event_type=event_type, schema_version=1, tenant=tenant,
        occurred_at=datetime.now(UTC), correlation_id=eid, producer=PRODUCER,
    )  # fmt: skip


def _publish(settings: Settings, event: Event) -> None:
    topics = Topics(settings.topic_prefix, settings.partitions)
    publisher = FactPublisher(settings.bootstrap, f"ledgerflow-cli-{uuid7()}", topics)
    publisher.start()
    try:
        asyncio.run(publisher.publish([event], timeout=30))
    finally:
        publisher.close()


def issue(settings: Settings, tenant: str, roles: list[str], label: str | None, by: str = "cli") -> tuple[str, str]:
    """Record a new key; return (key_id, secret). The secret exists only in this return value."""
    secret = f"lf_{tenant}_{secrets.token_urlsafe(24)}"
    key_id = f"key-{uuid7().hex[-12:]}"
    event = ApiKeyIssued(
        envelope=_envelope("ApiKeyIssued", tenant),
        key_id=key_id,
        key_sha256=hashlib.sha256(secret.encode()).hexdigest(),
        roles=roles,
        issued_by=by,
        label=label,
    )
    _publish(settings, event)
    return key_id, secret


def revoke(settings: Settings, key_id: str, reason: str, by: str = "cli") -> bool:
    """Record a revocation for a key issued through the topic; False if there is no such key."""
    issued = {k.key_id: k for k in list_keys(settings)}
    if key_id not in issued:
        return False
    event = ApiKeyRevoked(
        envelope=_envelope("ApiKeyRevoked", issued[key_id].tenant), key_id=key_id, reason=reason, revoked_by=by
    )
    _publish(settings, event)
    return True


def list_keys(settings: Settings) -> list[ApiKeyIssued]:
    """Keys currently issued (issued and not revoked), from the topic."""
    topics = Topics(settings.topic_prefix, settings.partitions)
    codec = Codec()
    live: dict[str, ApiKeyIssued] = {}
    for _t, _o, msg in read_to_end(settings.bootstrap, [topics.name("api-keys")], 10.0):
        event = codec.decode(msg.value())
        if isinstance(event, ApiKeyIssued):
            live[event.key_id] = event
        elif isinstance(event, ApiKeyRevoked):
            live.pop(event.key_id, None)
    return list(live.values())
