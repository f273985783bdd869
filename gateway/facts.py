"""The facts one answered request records, built purely from what happened.

All of a request's facts share the request id as correlation id and derive their event ids
from it (`derived_uuid7(request_id, type)`), so re-sending a request's facts produces
identical ids, which downstream collapses. A plain answer publishes all four in one Kafka
transaction (`streams.publisher`), so it is never half-recorded; a streamed answer publishes
the opening facts before its first byte and the closing facts before its final frame.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime

import orjson

from domain.pricing import Price, cost
from domain.redaction import RULESET_VERSION
from gateway.adapters import Completion
from gateway.auth import Principal
from gateway.models import Message
from streams.events import (
    AuditRecorded,
    Envelope,
    Event,
    FeedbackReceived,
    PolicyDecided,
    RequestReceived,
    RequestRedacted,
    TokensCharged,
)
from streams.ids import derived_uuid7, uuid7

PRODUCER = "gateway"
POLICY_VERSION = "builtin-allow-1"


@dataclass(frozen=True)
class CallContext:
    """What is known about a call before the model answers."""

    request_id: str
    at: datetime
    principal: Principal
    route: str
    messages: list[Message]
    model_hint: str | None
    model: str
    trace_parent: str | None = None
    redact_kinds: frozenset[str] = frozenset()  # what the tenant's policy masks, in prompts and answers
    redactions: tuple[tuple[str, int], ...] = ()  # spans masked in the prompt, by kind
    redacted_chars: int = 0

    def envelope(self, event_type: str, causation: str | None = None) -> Envelope:
        return Envelope(
            event_id=str(derived_uuid7(self.request_id, event_type)),
            event_type=event_type,
            schema_version=1,
            tenant=self.principal.tenant,
            occurred_at=self.at,
            correlation_id=self.request_id,
            causation_id=causation,
            trace_parent=self.trace_parent,
            producer=PRODUCER,
        )


def prompt_hash(messages: list[Message]) -> str:
    canonical = orjson.dumps([[m.role, m.content] for m in messages])
    return hashlib.sha256(canonical).hexdigest()


def opening_facts(ctx: CallContext) -> list[Event]:
    """RequestReceived and PolicyDecided: recorded before any of the answer is sent."""
    received = RequestReceived(
        envelope=ctx.envelope("RequestReceived"),
        request_id=ctx.request_id,
        route=ctx.route,
        api_key_id=ctx.principal.key_id,
        model_hint=ctx.model_hint,
        message_count=len(ctx.messages),
        prompt_chars=sum(len(m.content) for m in ctx.messages),
        prompt_sha256=prompt_hash(ctx.messages),
    )
    decision_input = orjson.dumps(
        {"tenant": ctx.principal.tenant, "roles": list(ctx.principal.roles), "route": ctx.route, "model": ctx.model},
        option=orjson.OPT_SORT_KEYS,
    )
    decided = PolicyDecided(
        envelope=ctx.envelope("PolicyDecided", received.envelope.event_id),
        request_id=ctx.request_id,
        decision="allow",
        policy_version=POLICY_VERSION,
        determining_policies=["default-allow"],
        input_sha256=hashlib.sha256(decision_input).hexdigest(),
    )
    if not ctx.redactions:
        return [received, decided]
    redacted = RequestRedacted(
        envelope=ctx.envelope("RequestRedacted", received.envelope.event_id),
        request_id=ctx.request_id,
        counts_by_kind=dict(ctx.redactions),
        redacted_chars=ctx.redacted_chars,
        action="masked",
        ruleset_version=RULESET_VERSION,
    )
    return [received, redacted, decided]


def closing_facts(ctx: CallContext, completion: Completion, price: Price) -> tuple[TokensCharged, AuditRecorded]:
    """TokensCharged and AuditRecorded: recorded before the answer (or its last frame) is sent."""
    charged = TokensCharged(
        envelope=ctx.envelope("TokensCharged", str(derived_uuid7(ctx.request_id, "PolicyDecided"))),
        request_id=ctx.request_id,
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
        envelope=ctx.envelope("AuditRecorded", charged.envelope.event_id),
        action="request.completed",
        actor=ctx.principal.key_id,
        subject=ctx.request_id,
        outcome="success",
        details={"model": completion.model, "cost": str(charged.cost), "decision": "allow", "route": ctx.route},
    )
    return charged, audited


def feedback_fact(
    principal: Principal, request_id: str, score: float, label: str | None, trace_parent: str | None = None
) -> FeedbackReceived:
    """FeedbackReceived for the caller's tenant; each piece of feedback is its own fact."""
    event_id = str(uuid7())
    return FeedbackReceived(
        envelope=Envelope(
            event_id=event_id,
            event_type="FeedbackReceived",
            schema_version=1,
            tenant=principal.tenant,
            occurred_at=datetime.now(UTC),
            correlation_id=request_id,
            trace_parent=trace_parent,
            producer=PRODUCER,
        ),
        request_id=request_id,
        api_key_id=principal.key_id,
        score=score,
        label=label,
    )
