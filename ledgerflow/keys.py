"""`ledgerflow keys issue | revoke | list`: API keys as events on the compacted api-keys topic.

The secret is printed once and never stored or recorded: the event carries its SHA-256.
Every gateway replica follows the topic, so a key works (or stops working) everywhere
within about a second.
"""

from __future__ import annotations

import hashlib
import secrets

from ledgerflow import admin
from ledgerflow.settings import Settings
from streams.admin import read_to_end
from streams.codec import Codec
from streams.events import ApiKeyIssued, ApiKeyRevoked
from streams.ids import uuid7
from streams.topics import Topics


def issue(settings: Settings, tenant: str, roles: list[str], label: str | None, by: str = "cli") -> tuple[str, str]:
    """Record a new key; return (key_id, secret). The secret exists only in this return value."""
    secret = f"lf_{tenant}_{secrets.token_urlsafe(24)}"
    key_id = f"key-{uuid7().hex[-12:]}"
    event = ApiKeyIssued(
        envelope=admin.envelope("ApiKeyIssued", tenant),
        key_id=key_id,
        key_sha256=hashlib.sha256(secret.encode()).hexdigest(),
        roles=roles,
        issued_by=by,
        label=label,
    )
    admin.publish(settings, [event, admin.audit_of(event, "key.issued", by, key_id, {"roles": ",".join(roles)})])
    return key_id, secret


def revoke(settings: Settings, key_id: str, reason: str, by: str = "cli") -> bool:
    """Record a revocation for a key issued through the topic; False if there is no such key."""
    issued = {k.key_id: k for k in list_keys(settings)}
    if key_id not in issued:
        return False
    event = ApiKeyRevoked(
        envelope=admin.envelope("ApiKeyRevoked", issued[key_id].tenant), key_id=key_id, reason=reason, revoked_by=by
    )
    admin.publish(settings, [event, admin.audit_of(event, "key.revoked", by, key_id, {"reason": reason})])
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
