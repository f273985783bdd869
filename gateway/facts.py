"""The facts one request records, built purely from what happened.

Every request that reaches the policy decision point records its `PolicyDecided` (the
engine's decision as `Decision.decided_fields()` gives it, so policy version, determining
policies, input hash and obligations are the engine's own). An answered request records
RequestReceived, (RequestRedacted,) PolicyDecided, TokensCharged and AuditRecorded
"request.completed"; a refused one records RequestReceived, (RequestRedacted,) PolicyDecided
and AuditRecorded "request.denied" (outcome "denied"). Either audit record carries the
decision input (`DecisionInput.canonical_json()`) in `details["policy_input"]`, so a dry-run
can rebuild the inputs of recorded decisions without a schema change. A shadow divergence
adds PolicyShadowDiverged to the same transaction.

All of a request's facts share the request id as correlation id and derive their event ids
from it (`derived_uuid7(request_id, type)`), so re-sending a request's facts produces
identical ids, which downstream collapses. A plain answer publishes all four in one Kafka
transaction (`streams.publisher`), so it is never half-recorded; a streamed answer publishes
the opening facts before its first byte and the closing facts before its final frame. A
stream that breaks after its first byte (upstream error, client gone) still closes: its
TokensCharged charges the usage so far and its AuditRecorded "request.completed" has
outcome "failed" with details reason and partial "true" (`partial_closing_facts`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson

from domain.policy import Decision, DecisionInput, Divergence
from domain.pricing import Price, cost, savings
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
    PolicyShadowDiverged,
    RequestReceived,
    RequestRedacted,
    RouteChosen,
    TokensCharged,
)
from streams.ids import derived_uuid7, uuid7

if TYPE_CHECKING:
    from gateway.budgets import Hold

PRODUCER = "gateway"
POLICY_INPUT = "policy_input"  # AuditRecorded.details key holding the decision input (canonical JSON)


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
    decision: Decision  # the engine's decision for `policy_input`
    policy_input: DecisionInput
    divergence: Divergence | None = None  # how the shadow bundle would have decided, when it differs
    trace_parent: str | None = None
    redact_kinds: frozenset[str] = frozenset()  # what the tenant's policy masks, in prompts and answers
    redactions: tuple[tuple[str, int], ...] = ()  # spans masked in the prompt, by kind
    redacted_chars: int = 0
    reserved_tokens: int = 0  # tokens taken from the rate limit up front (reconciled with the real usage)
    baseline: Price | None = None  # the tenant's baseline price in force (issue 7): savings = its cost - cost
    budget_hold: Hold | None = None  # what the call holds on its budgets (gateway.budgets), if any apply
    session: str | None = None  # memory session: its window leads `messages`, the rest are new turns
    remembered: int = 0  # how many of `messages` came from the session's window
    route_chosen: RouteChosen | None = None  # the router's choice (issue 9), recorded with the opening facts
    max_tokens: int | None = None  # answer bound the budget hold and cost cap assume; passed to the adapter (issue 7)

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
    decided = PolicyDecided(
        envelope=ctx.envelope("PolicyDecided", received.envelope.event_id),
        request_id=ctx.request_id,
        **ctx.decision.decided_fields(),
    )
    shadow = shadow_fact(ctx, decided.envelope.event_id)
    tail: list[Event] = [decided] if shadow is None else [decided, shadow]
    if ctx.route_chosen is not None:
        tail.append(ctx.route_chosen)
    if not ctx.redactions:
        return [received, *tail]
    redacted = RequestRedacted(
        envelope=ctx.envelope("RequestRedacted", received.envelope.event_id),
        request_id=ctx.request_id,
        counts_by_kind=dict(ctx.redactions),
        redacted_chars=ctx.redacted_chars,
        action="masked",
        ruleset_version=RULESET_VERSION,
    )
    return [received, redacted, *tail]


def shadow_fact(ctx: CallContext, decided_id: str) -> PolicyShadowDiverged | None:
    """PolicyShadowDiverged when the shadow bundle would have enforced something else."""
    if ctx.divergence is None:
        return None
    return PolicyShadowDiverged(
        envelope=ctx.envelope("PolicyShadowDiverged", decided_id),
        request_id=ctx.request_id,
        **ctx.divergence.shadow_fields(),
    )


def policy_details(ctx: CallContext) -> dict[str, str]:
    """What an audit record says about the decision: version, policies, and the input to replay it."""
    d = ctx.decision
    out = {
        "decision": d.decision,
        "policy_version": d.policy_version,
        "determining_policies": ",".join(d.determining_policies),
        POLICY_INPUT: ctx.policy_input.canonical_json().decode(),
    }
    if d.obligation_list:
        out["obligations"] = ";".join(d.obligation_list)
    return out


def refusal_facts(ctx: CallContext, code: str, reason: str) -> list[Event]:
    """The facts of a request refused at the policy point: its opening facts and a "denied" audit record.

    `code` says why (policy_denied, tool_not_permitted, model_not_permitted, cost_cap_exceeded);
    the PolicyDecided among them is the engine's decision, which is "allow" when the gateway
    refused because an obligation (region, cost cap) could not be met.
    """
    opening = opening_facts(ctx)
    details = {**policy_details(ctx), "route": ctx.route, "model": ctx.model, "refusal": code, "reason": reason}
    if ctx.decision.denied_tool:
        details["denied_tool"] = ctx.decision.denied_tool
    audited = AuditRecorded(
        envelope=ctx.envelope("AuditRecorded", str(derived_uuid7(ctx.request_id, "PolicyDecided"))),
        action="request.denied",
        actor=ctx.principal.key_id,
        subject=ctx.request_id,
        outcome="denied",
        details=details,
    )
    return [*opening, audited]


def closing_facts(ctx: CallContext, completion: Completion, price: Price) -> tuple[TokensCharged, AuditRecorded]:
    """TokensCharged and AuditRecorded: recorded before the answer (or its last frame) is sent."""
    return _closing(ctx, completion, price, "success", {})


def partial_closing_facts(
    ctx: CallContext, completion: Completion, price: Price, reason: str
) -> tuple[TokensCharged, AuditRecorded]:
    """The closing facts of a streamed answer that broke after its first piece.

    `completion` holds the usage so far (the prompt and the tokens produced); it is charged
    like any answer, and the audit record says honestly that the request failed and why
    (`reason`: upstream_error, client_disconnected, cancelled, internal_error), with partial "true". Same ids
    as `closing_facts`, so a request has exactly one TokensCharged however it ended.
    """
    return _closing(ctx, completion, price, "failed", {"reason": reason, "partial": "true"})


def _closing(
    ctx: CallContext, completion: Completion, price: Price, outcome: str, extra: dict[str, str]
) -> tuple[TokensCharged, AuditRecorded]:
    spent = cost(completion.prompt_tokens, completion.completion_tokens, price)
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
        cost=spent,
        **_savings(ctx, completion, spent),
    )
    details = {**policy_details(ctx), "model": completion.model, "cost": str(charged.cost), "route": ctx.route}
    audited = AuditRecorded(
        envelope=ctx.envelope("AuditRecorded", charged.envelope.event_id),
        action="request.completed",  # the request ended; `outcome` says how (dry-runs replay its decision)
        actor=ctx.principal.key_id,
        subject=ctx.request_id,
        outcome=outcome,
        details={**details, **extra},
    )
    return charged, audited


def _savings(ctx: CallContext, completion: Completion, spent: Decimal) -> dict[str, Any]:
    """The charge's baseline fields: the same tokens at the tenant's baseline price, and the difference."""
    saved = savings(completion.prompt_tokens, completion.completion_tokens, spent, ctx.baseline)
    if saved is None:
        return {}
    return {"baseline_model": saved.baseline_model, "baseline_cost": saved.baseline_cost, "savings": saved.savings}


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
