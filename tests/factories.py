"""Builders of valid events for tests."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from streams.events import AuditRecorded, Envelope, PolicyDecided, RequestReceived, TokensCharged
from streams.ids import derived_uuid7, uuid7


def envelope(event_type: str, tenant: str = "acme", request_id: str | None = None) -> Envelope:
    rid = request_id or str(uuid7())
    return Envelope(
        event_id=str(derived_uuid7(rid, event_type)),
        event_type=event_type,
        schema_version=1,
        tenant=tenant,
        occurred_at=datetime.now(UTC).replace(microsecond=123456),
        correlation_id=rid,
        producer="test",
    )


def charge(tenant: str = "acme", cost: str = "0.000123450000", prompt: int = 10, completion: int = 20) -> TokensCharged:
    rid = str(uuid7())
    return TokensCharged(
        envelope=envelope("TokensCharged", tenant, rid),
        request_id=rid,
        model="sim-small",
        prompt_tokens=prompt,
        completion_tokens=completion,
        input_price_per_mtok=Decimal("0.15"),
        output_price_per_mtok=Decimal("0.60"),
        price_list_version="v1",
        currency="USD",
        cost=Decimal(cost),
    )


def request(tenant: str = "acme") -> RequestReceived:
    rid = str(uuid7())
    return RequestReceived(
        envelope=envelope("RequestReceived", tenant, rid),
        request_id=rid,
        route="/v1/ask",
        api_key_id="k1",
        message_count=1,
        prompt_chars=5,
        prompt_sha256="0" * 64,
        model_hint=None,
    )


def decision(tenant: str = "acme") -> PolicyDecided:
    rid = str(uuid7())
    return PolicyDecided(
        envelope=envelope("PolicyDecided", tenant, rid),
        request_id=rid,
        decision="allow",
        policy_version="p1",
        determining_policies=["default-allow"],
        input_sha256="f" * 64,
    )


def audit(tenant: str = "acme") -> AuditRecorded:
    rid = str(uuid7())
    return AuditRecorded(
        envelope=envelope("AuditRecorded", tenant, rid),
        action="request.completed",
        actor="k1",
        subject=rid,
        outcome="success",
        details={"model": "sim-small"},
    )
