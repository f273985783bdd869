"""The facts one answered request records, built purely from what happened.

All four share the request id as correlation id and derive their event ids from it
(`derived_uuid7(request_id, type)`), so a re-sent request (same Idempotency-Key) records
identical facts, which downstream collapses; and they are published in one Kafka
transaction (`streams.publisher`), so a request is never half-recorded.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime

import orjson

from domain.pricing import Price, cost
from gateway.adapters import Completion
from gateway.auth import Principal
from gateway.models import Message
from streams.events import AuditRecorded, Envelope, Event, PolicyDecided, RequestReceived, TokensCharged
from streams.ids import derived_uuid7

PRODUCER = "gateway"
POLICY_VERSION = "builtin-allow-1"


@dataclass(frozen=True)
class Recorded:
    events: list[Event]
    charge: TokensCharged


def prompt_hash(messages: list[Message]) -> str:
    canonical = orjson.dumps([[m.role, m.content] for m in messages])
    return hashlib.sha256(canonical).hexdigest()


def request_facts(
    *,
    request_id: str,
    at: datetime,
    principal: Principal,
    route: str,
    messages: list[Message],
    model_hint: str | None,
    completion: Completion,
    price: Price,
    trace_parent: str | None = None,
) -> Recorded:
    """RequestReceived, PolicyDecided, TokensCharged and AuditRecorded for one answered call."""

    def envelope(event_type: str, causation: str | None = None) -> Envelope:
        return Envelope(
            event_id=str(derived_uuid7(request_id, event_type)),
            event_type=event_type,
            schema_version=1,
            tenant=principal.tenant,
            occurred_at=at,
            correlation_id=request_id,
            causation_id=causation,
            trace_parent=trace_parent,
            producer=PRODUCER,
        )

    received = RequestReceived(
        envelope=envelope("RequestReceived"),
        request_id=request_id,
        route=route,
        api_key_id=principal.key_id,
        model_hint=model_hint,
        message_count=len(messages),
        prompt_chars=sum(len(m.content) for m in messages),
        prompt_sha256=prompt_hash(messages),
    )
    decision_input = orjson.dumps(
        {"tenant": principal.tenant, "roles": list(principal.roles), "route": route, "model": completion.model},
        option=orjson.OPT_SORT_KEYS,
    )
    decided = PolicyDecided(
        envelope=envelope("PolicyDecided", received.envelope.event_id),
        request_id=request_id,
        decision="allow",
        policy_version=POLICY_VERSION,
        determining_policies=["default-allow"],
        input_sha256=hashlib.sha256(decision_input).hexdigest(),
    )
    charged = TokensCharged(
        envelope=envelope("TokensCharged", decided.envelope.event_id),
        request_id=request_id,
        model=completion.model,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        input_price_per_mtok=price.input_per_mtok,
        output_price_per_mtok=price.output_per_mtok,
        price_list_version=price.version,
        currency=price.currency,
        cost=cost(completion.prompt_tokens, completion.completion_tokens, price),
    )
    audited = AuditRecorded(
        envelope=envelope("AuditRecorded", charged.envelope.event_id),
        action="request.completed",
        actor=principal.key_id,
        subject=request_id,
        outcome="success",
        details={"model": completion.model, "cost": str(charged.cost), "decision": "allow", "route": route},
    )
    return Recorded([received, decided, charged, audited], charged)
