"""HTTP routes of the gateway and the request path of `POST /v1/ask`.

Order on the request path: authenticate → validate → redact → rate-limit → ask the policy
decision point → enforce its obligations → complete → build facts → publish them in one
transaction → answer. The answer is sent only after Kafka committed the facts; if Kafka
cannot take them within the budget the client gets 503 with Retry-After and the answer is
withheld, so no answered call goes unrecorded.

The policy point (`gateway.policy.PolicyPoint`) is asked in process for every request that
gets that far, and every such request records its PolicyDecided: allowed ones with their
answer, refused ones (403) with RequestReceived and an AuditRecorded "request.denied" in one
transaction before the 403 is sent. Obligations of an allowed call are enforced here:
redaction kinds are added to the tenant's, a region obligation restricts the models (a
pinned model outside it is refused naming the allowed ones; a defaulted one is rerouted to
the first allowed), and a cost cap refuses a call whose estimate exceeds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import functools
import logging
import math
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

import orjson
from aiohttp import web
from pydantic import BaseModel, ValidationError

from domain.policy import DATA_CLASSIFICATIONS, DecisionInput, Obligations
from domain.policy import Decision as PolicyDecision
from domain.pricing import DEFAULT_PRICES, Price, cost
from domain.redaction import ALL_KINDS, StreamRedactor, redact
from gateway import outcomes
from gateway.adapters import Adapter, Completion, SimulatedAdapter
from gateway.auth import KeyStore, Principal, presented_key
from gateway.budgets import Accounting, BudgetExhausted, BudgetUnavailable
from gateway.completions import ERROR_KIND, REQUEST_ID, TENANT, CompletionRecorder
from gateway.facts import (
    CallContext,
    closing_facts,
    feedback_fact,
    opening_facts,
    partial_closing_facts,
    refusal_facts,
)
from gateway.frames import AskFrames, ChatFrames, Frames
from gateway.limits import Decision, RateLimiter
from gateway.memory import SESSION_ID, MemoryFabric, Turn
from gateway.metrics import GatewayMetrics
from gateway.models import (
    AskRequest,
    ChatCompletionRequest,
    FeedbackRequest,
    FeedbackResponse,
    MemoryEraseResponse,
    MemoryTurn,
    MemoryTurnRequest,
    MemoryWindowResponse,
    MemoryWriteResponse,
    Message,
    PolicyCheckRequest,
    PolicyCheckResponse,
)
from gateway.oidc import OidcVerifier, TokenRejected
from gateway.openapi import render as render_openapi
from gateway.policy import PolicyPoint, seeds_from_regions
from gateway.registry import default_registry
from gateway.upstream import UpstreamError
from streams import telemetry
from streams.events import Event
from streams.ids import uuid7
from streams.publisher import PublishFailed

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20
M = TypeVar("M", bound=BaseModel)
OPENAPI = render_openapi()
RETRY_AFTER_S = "1"
DEFAULT_CLASSIFICATION_HEADER = "X-Data-Classification"
DEFAULT_MAX_TOKENS = 1024
_STRICTNESS = {c: i for i, c in enumerate(DATA_CLASSIFICATIONS)}  # public < internal < confidential < restricted

if TYPE_CHECKING:  # the router pulls in river and numpy: only gateways that route load them
    from gateway.router import Router


class Publisher(Protocol):
    async def publish(self, events: Sequence[Event], timeout: float = ...) -> None: ...


ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]


@dataclass
class GatewayState:
    keys: KeyStore
    publisher: Publisher
    adapter: Adapter
    prices: Mapping[str, Price]  # a PriceBook when accounting follows the price-lists topic
    default_model: str
    publish_timeout: float
    ready_check: ReadyCheck
    oidc: OidcVerifier | None = None
    limiter: RateLimiter | None = None
    redaction: Callable[[str], frozenset[str]] = lambda _tenant: ALL_KINDS
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    policy: PolicyPoint = field(default_factory=PolicyPoint)
    classification_header: str = DEFAULT_CLASSIFICATION_HEADER
    default_max_tokens: int = DEFAULT_MAX_TOKENS  # completion tokens assumed for the cost estimate
    memory: MemoryFabric | None = None
    accounting: Accounting | None = None  # baselines and budget holds (issue 7); None: neither
    router: Router | None = None  # picks the model of unpinned calls (issue 9); None: the default model

    def candidate_models(self) -> list[str]:
        """Models the router may choose from, in registry order: served and priced."""
        return [m for m in self.adapter.models if m in self.prices]


STATE = web.AppKey("state", GatewayState)


def error(
    status: int, code: str, message: str, fields: Sequence[str] = (), headers: dict[str, str] | None = None
) -> web.Response:
    body = {"error": {"code": code, "message": message, "fields": list(fields)}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data, default=str), content_type="application/json")


@web.middleware
async def trace_requests(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Issue 11: one server span per request, named by its route template (a client traceparent is
    its parent), and a fresh log context carrying the route; tenant and request id join after auth."""
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    with telemetry.log_context(route=route):
        if not telemetry.enabled():
            return await handler(request)
        attributes = {"http.request.method": request.method, "http.route": route, "url.scheme": request.scheme}
        with telemetry.server_span(f"{request.method} {route}", request.headers, attributes):
            response = await handler(request)
            telemetry.mark_error(response.status)
            return response


@web.middleware
async def errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure is a JSON error body; internals never leak into a response."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
    except Exception:
        log.exception("unhandled error on %s", request.path)
        return error(500, "internal_error", "the gateway failed unexpectedly; the request was not recorded")


async def authenticate(request: web.Request) -> Principal | web.Response:
    """An API key, or an OIDC bearer JWT when an issuer is configured."""
    state = request.app[STATE]
    secret = presented_key(request)
    if secret is None:
        return error(401, "missing_credentials", "send 'Authorization: Bearer <API key or JWT>' or 'X-API-Key: <key>'")
    if state.oidc is not None and state.oidc.looks_like_jwt(secret):
        try:
            principal = await state.oidc.verify(secret)
        except TokenRejected as exc:
            return error(401, "invalid_token", str(exc))
    else:
        found = state.keys.lookup(secret)
        if found is None:
            return error(
                401, "unknown_api_key", "the API key is not known or was revoked; check the key or ask for a new one"
            )
        principal = found
    telemetry.annotate(tenant=principal.tenant)  # on the request's span and its later log lines
    request[TENANT] = principal.tenant  # issue 11: the tenant its RequestCompleted is recorded under
    return principal


async def read_json(request: web.Request, empty: Any = None) -> Any | web.Response:
    """The JSON body; `empty` (when given) stands for an empty body instead of a 400."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return error(413, "body_too_large", f"the body is over {MAX_BODY_BYTES} bytes; send a shorter prompt")
    raw = await request.read()
    if not raw and empty is not None:
        return empty
    if not raw:
        return error(400, "empty_body", "send a JSON object with 'prompt' or 'messages'")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return error(400, "malformed_json", f"the body is not valid JSON: {exc}")


def validation_error(exc: ValidationError) -> web.Response:
    fields = []
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        fields.append(loc)
        parts.append(f"{loc}: {err['msg']}")
    return error(422, "invalid_request", "; ".join(parts), fields)


class Rejected(Exception):
    """A request refused before the model is called; carries the response to send."""

    def __init__(self, response: web.Response) -> None:
        self.response = response


def data_classification(request: web.Request, state: GatewayState, declared: str | None) -> str:
    """The request's classification: the stricter of the body field and the header; "internal" if neither.

    Why the stricter: a classifying proxy may set the header, and a client must not be able
    to lower it in the body.
    """
    given = [declared] if declared else []
    header = request.headers.get(state.classification_header, "").strip().lower()
    if header:
        if header not in _STRICTNESS:
            raise Rejected(
                error(
                    422,
                    "invalid_request",
                    f"header {state.classification_header}: {header!r} is not one of {', '.join(DATA_CLASSIFICATIONS)}",
                    [state.classification_header],
                )
            )
        given.append(header)
    return max(given, key=_STRICTNESS.__getitem__) if given else "internal"


def mask(messages: list[Message], kinds: frozenset[str]) -> tuple[list[Message], Counter[str], int]:
    """Messages with `kinds` masked, the spans masked by kind, and the characters masked."""
    counts: Counter[str] = Counter()
    chars = 0
    if not kinds:
        return messages, counts, chars
    masked = []
    for m in messages:
        r = redact(m.content, kinds)
        counts.update(r.counts)
        chars += r.redacted_chars
        masked.append(Message(role=m.role, content=r.text) if r.counts else m)
    return masked, counts, chars


def estimate_cost(prompt_tokens: int, max_tokens: int, price: Price) -> Decimal:
    """The most the call can cost: the prompt estimate plus the answer bound, at the model's price."""
    return cost(prompt_tokens, max_tokens, price)


async def begin_call(
    request: web.Request, model_cls: type[M], route: str, started: float | None = None
) -> tuple[M, CallContext, Price]:
    """Authenticate, parse, validate, rate-limit and ask the policy; raise Rejected with a clear 4xx otherwise.

    A refusal at or after the policy point is recorded (see `refuse`) before Rejected is raised.
    """
    state = request.app[STATE]
    started = time.monotonic() if started is None else started
    principal = await authenticate(request)
    if isinstance(principal, web.Response):
        raise Rejected(principal)
    body = await read_json(request)
    if isinstance(body, web.Response):
        raise Rejected(body)
    if not isinstance(body, dict):
        raise Rejected(error(400, "invalid_request", "the body must be a JSON object"))
    try:
        req = model_cls.model_validate(body)
    except ValidationError as exc:
        raise Rejected(validation_error(exc)) from None
    hint: str | None = getattr(req, "model", None)
    model = hint or state.default_model
    price = state.prices.get(model)
    if model not in state.adapter.models or price is None:
        known = ", ".join(state.candidate_models())
        raise Rejected(error(400, "unknown_model", f"model {model!r} is not available; use one of: {known}", ["model"]))
    classification = data_classification(request, state, getattr(req, "data_classification", None))
    tools: frozenset[str] = req.tool_names() if isinstance(req, ChatCompletionRequest) else frozenset()
    max_tokens: int = getattr(req, "max_tokens", None) or state.default_max_tokens
    kinds = state.redaction(principal.tenant)
    # masked before anything else sees the prompt: events, logs, the adapter
    messages, counts, chars = mask(req.as_messages(), kinds)  # type: ignore[attr-defined]
    state.metrics.observe_redactions(counts.items())
    session: str | None = getattr(req, "session", None)
    remembered: list[Message] = []
    if session is not None:
        remembered = await session_window(state, principal.tenant, session)
        messages = [*remembered, *messages]
    prompt_tokens = estimate_tokens(messages)
    if state.limiter is not None:
        decision = await state.limiter.acquire(principal.tenant, tokens=prompt_tokens)
        if not decision.allowed:
            state.metrics.rate_limited.labels(decision.limit_kind or "unknown").inc()
            raise Rejected(rate_limited(decision))
    inp = DecisionInput(
        tenant=principal.tenant,
        principal=principal.key_id,
        roles=frozenset(principal.roles),
        region=state.policy.principal_region(principal.key_id),
        data_classification=classification,
        tools=tools,
        model=hint or "",
        estimated_cost=estimate_cost(prompt_tokens, max_tokens, price),
        route=route,
    )
    clock = time.perf_counter()
    verdict, divergence = state.policy.decide(inp)
    state.metrics.observe_policy(verdict, principal.tenant, state.policy.engine.bundle, time.perf_counter() - clock)
    if divergence is not None:
        state.metrics.shadow_divergences.labels(divergence.kind).inc()
    ctx = CallContext(
        request_id=str(uuid7()),
        at=datetime.now(UTC),
        principal=principal,
        route=route,
        messages=messages,
        model_hint=hint,
        model=model,
        decision=verdict,
        policy_input=inp,
        divergence=divergence,
        trace_parent=telemetry.trace_parent_for(request.headers.get("traceparent")),
        redact_kinds=kinds,
        redactions=tuple(sorted(counts.items())),
        redacted_chars=chars,
        reserved_tokens=prompt_tokens,
        session=session,
        remembered=len(remembered),
        max_tokens=max_tokens,
    )
    telemetry.annotate(request_id=ctx.request_id)
    request[REQUEST_ID] = ctx.request_id
    if not verdict.allow:
        code, message, fields = refusal_of(state, verdict, inp)
        raise Rejected(await refuse(state, ctx, started, prompt_tokens, code, message, fields))
    ctx = await enforce_obligations(state, ctx, started, prompt_tokens, max_tokens)
    if state.router is not None:  # issue 9: an unpinned call goes where the router sends it
        allowed = state.policy.allowed_models(ctx.decision, state.candidate_models())
        decide = functools.partial(
            state.router.route, ctx, state.candidate_models(), allowed, state.prices, prompt_tokens, max_tokens
        )
        # With a sentence embedding a decision is tens of ms of numpy (which releases the GIL):
        # off the event loop, so other requests go on meanwhile. The cheap features stay inline.
        if state.router.slow:
            loop = asyncio.get_running_loop()
            ctx = await loop.run_in_executor(state.router.executor, contextvars.copy_context().run, decide)
        else:
            ctx = decide()
    price = state.prices[ctx.model]  # one price for the whole call: its budget hold, its charge, its answer
    return req, await account(state, ctx, price, started, prompt_tokens, max_tokens), price


async def account(
    state: GatewayState, ctx: CallContext, price: Price, started: float, prompt_tokens: int, max_tokens: int
) -> CallContext:
    """Issue 7: the tenant's baseline (for the savings on the charge) and a hold on its budgets.

    An exhausted budget is refused like a policy refusal (recorded) but with 402 and a message
    naming the budget, what is left and when it resets; budgets that cannot be checked fail
    closed with 503 unless configured to fail open.
    """
    acc = state.accounting
    if acc is None:
        return ctx
    try:
        held = await acc.hold(
            ctx.principal.tenant, ctx.principal.key_id, ctx.request_id, ctx.at, ctx.trace_parent, price,
            ctx.messages, max_tokens,
        )  # fmt: skip
    except BudgetUnavailable:
        if state.limiter is not None:
            await state.limiter.reconcile(ctx.principal.tenant, prompt_tokens, 0)
        message = "budgets cannot be checked right now; retry shortly"
        raise Rejected(error(503, "budget_unavailable", message, headers={"Retry-After": RETRY_AFTER_S})) from None
    if isinstance(held, BudgetExhausted):
        raise Rejected(
            await refuse(state, ctx, started, prompt_tokens, "budget_exhausted", held.message, ["max_tokens"], 402)
        )
    return dataclasses.replace(ctx, baseline=acc.baseline(ctx.principal.tenant), budget_hold=held)


async def release_hold(state: GatewayState, ctx: CallContext, reason: str) -> None:
    """Give a failed call's budget hold back (nothing of the call was recorded), recording that."""
    if ctx.budget_hold is not None and state.accounting is not None:
        await state.accounting.release(
            ctx.budget_hold, reason, lambda events: state.publisher.publish(events, timeout=state.publish_timeout)
        )


async def session_window(state: GatewayState, tenant: str, session: str) -> list[Message]:
    """The session's window as messages to prepend (stored masked, so not masked again)."""
    if state.memory is None:
        raise Rejected(no_memory())
    try:
        turns = await state.memory.read(tenant, session)
    except PublishFailed as exc:
        log.warning("memory window of a session not readable: %s", exc)
        raise Rejected(log_unavailable("the memory window could not be read")) from None
    return [Message(role=t.role, content=t.content) for t in turns]  # type: ignore[arg-type]


async def remember(state: GatewayState, ctx: CallContext, answer: str) -> bool:
    """Append a call's new messages and its (masked) answer to its session, in one transaction; False if not."""
    if ctx.session is None or state.memory is None:
        return True
    turns = [(m.role, m.content) for m in ctx.messages[ctx.remembered :]] + [("assistant", answer)]
    try:
        await state.memory.append_many(
            ctx.principal, ctx.session, turns, request_id=ctx.request_id, trace_parent=ctx.trace_parent
        )
    except PublishFailed as exc:
        log.warning("request %s answered but its turns were not stored in memory: %s", ctx.request_id, exc)
        return False
    return True


def refusal_of(state: GatewayState, verdict: PolicyDecision, inp: DecisionInput) -> tuple[str, str, list[str]]:
    """Code, message and fields of a policy denial.

    When the client pinned a model and the same call without the pin would be allowed but
    not on that model (a residency rule), the code is model_not_permitted and the message
    names the models that could serve it: one extra decision, on the refusal path only.
    """
    message = denial_message(verdict)
    if verdict.denied_tool:
        return "tool_not_permitted", message, ["tools"]
    if inp.model:
        unpinned = state.policy.engine.decide(dataclasses.replace(inp, model=""))
        allowed = state.policy.allowed_models(unpinned, state.candidate_models()) if unpinned.allow else []
        if unpinned.allow and inp.model not in allowed:
            others = ", ".join(allowed) or "none is configured"
            return (
                "model_not_permitted",
                f"{message}; model {inp.model!r} may not serve this request: use one of {others}, or send no model",
                ["model"],
            )
    return "policy_denied", message, []


def denial_message(verdict: PolicyDecision) -> str:
    """Why the policy refused, naming the determining policies (and the tool for a tool refusal)."""
    why = "; ".join(verdict.reasons) or "no permit policy applies"
    policies = ", ".join(verdict.determining_policies) or "no permit policy"
    head = f"policy bundle {verdict.policy_version} denied this request"
    if verdict.denied_tool:
        head += f": tool {verdict.denied_tool!r} is not permitted"
    return f"{head} (determining policies: {policies}): {why}"


async def enforce_obligations(
    state: GatewayState, ctx: CallContext, started: float, prompt_tokens: int, max_tokens: int
) -> CallContext:
    """Apply an allowed decision's obligations to the call; refuse (recorded, 403) what cannot meet them."""
    verdict = ctx.decision
    ob = verdict.obligations
    extra = ob.redact - ctx.redact_kinds
    if extra:
        messages, more, chars = mask(ctx.messages, extra)
        state.metrics.observe_redactions(more.items())
        counts = Counter(dict(ctx.redactions))
        counts.update(more)
        ctx = dataclasses.replace(
            ctx,
            messages=messages,
            redact_kinds=ctx.redact_kinds | extra,
            redactions=tuple(sorted(counts.items())),
            redacted_chars=ctx.redacted_chars + chars,
        )
    if ob.regions is not None:
        allowed = state.policy.allowed_models(verdict, state.candidate_models())
        imposing = _imposing(state, verdict, "region")
        if ctx.model_hint and ctx.model not in allowed:
            region = state.policy.model_region(ctx.model)
            regions = ", ".join(sorted(ob.regions))
            message = (
                f"model {ctx.model!r} (region {region}) may not serve this request: {imposing} restricts it to "
                f"region {regions}; use one of: {', '.join(allowed) or 'none is configured'}"
            )
            raise Rejected(await refuse(state, ctx, started, prompt_tokens, "model_not_permitted", message, ["model"]))
        if ctx.model not in allowed:
            if not allowed:
                message = (
                    f"no configured model is in region {', '.join(sorted(ob.regions))}, "
                    f"which {imposing} requires for this request"
                )
                raise Rejected(await refuse(state, ctx, started, prompt_tokens, "model_not_permitted", message))
            ctx = dataclasses.replace(ctx, model=allowed[0])  # rerouted: the first allowed in registry order
    if ob.max_cost is not None:
        estimate = estimate_cost(prompt_tokens, max_tokens, state.prices[ctx.model])
        if estimate > ob.max_cost:
            message = (
                f"the call may cost up to {estimate} ({prompt_tokens} prompt + {max_tokens} answer tokens on "
                f"{ctx.model}), over the cap of {ob.max_cost} set by {_imposing(state, verdict, 'max_cost')}; "
                "send a shorter prompt or a lower max_tokens"
            )
            raise Rejected(
                await refuse(state, ctx, started, prompt_tokens, "cost_cap_exceeded", message, ["max_tokens"])
            )
    return ctx


def _imposing(state: GatewayState, verdict: PolicyDecision, kind: str) -> str:
    """The determining policies that carry an obligation of `kind`, for messages and metrics."""
    bundle = state.policy.engine.bundle
    ids = [p for p in verdict.determining_policies if _carries(bundle.obligations_of(p), kind)]
    return "policy " + ", ".join(ids) if ids else "the policy"


def _carries(ob: Obligations, kind: str) -> bool:
    if kind == "redact":
        return bool(ob.redact)
    if kind == "region":
        return ob.regions is not None
    return ob.max_cost is not None


async def refuse(
    state: GatewayState,
    ctx: CallContext,
    started: float,
    prompt_tokens: int,
    code: str,
    message: str,
    fields: Sequence[str] = (),
    status: int = 403,
) -> web.Response:
    """Record a refusal (its PolicyDecided among its facts) in one transaction, then the 403 (or `status`) to send.

    A refused call uses no tokens, so the tokens taken from the rate limit are given back.
    """
    if state.limiter is not None:
        await state.limiter.reconcile(ctx.principal.tenant, prompt_tokens, 0)
    if ctx.decision.allow:  # refused by the gateway for an obligation it could not meet
        state.metrics.observe_refusal(code, ctx.principal.tenant)
    failed = await record(state, refusal_facts(ctx, code, message), started, ctx.request_id)
    if failed is not None:
        return failed
    return error(status, code, message, fields, headers={"X-Request-Id": ctx.request_id})


def estimate_tokens(messages: Sequence[Message]) -> int:
    """Prompt tokens charged against tokens/min up front; reconciled with the real usage after."""
    return sum(len(m.content) for m in messages) // 4 + 3 * len(messages)


def rate_limited(decision: Decision) -> web.Response:
    if decision.limit_kind == "unavailable":
        return error(503, "rate_limiter_unavailable", "rate limits cannot be checked right now; retry shortly",
                     headers=decision.headers())  # fmt: skip
    if math.isinf(decision.retry_after_s):
        return error(
            413,
            "request_too_large_for_limit",
            "this request alone needs more tokens than your per-minute limit; shorten it",
        )
    return error(
        429,
        "rate_limited",
        f"{decision.limit_kind} per minute limit reached for your tenant; retry after {decision.retry_after_header} s",
        headers=decision.headers(),
    )


async def settle_usage(state: GatewayState, ctx: CallContext, completion: Completion) -> None:
    """Reconcile the rate limit and the budget hold with the real usage: what was reserved against what was used."""
    if state.limiter is not None:
        actual = completion.prompt_tokens + completion.completion_tokens
        await state.limiter.reconcile(ctx.principal.tenant, ctx.reserved_tokens, actual)
    if ctx.budget_hold is not None and state.accounting is not None:
        await state.accounting.settle(ctx.budget_hold, completion)


def upstream_error(exc: UpstreamError) -> web.Response:
    """The model's upstream failed: its status and code, and when to retry if known."""
    headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))} if exc.retry_after_s is not None else None
    return error(exc.status, exc.code, exc.message, headers=headers)


async def record(state: GatewayState, events: Sequence[Event], started: float, request_id: str) -> web.Response | None:
    """Publish facts within what is left of the budget; a 503 response if Kafka did not take them."""
    budget = max(0.05, state.publish_timeout - (time.monotonic() - started))
    try:
        await state.publisher.publish(events, timeout=budget)
    except PublishFailed as exc:
        state.metrics.publish_failures.inc()
        log.warning("request %s not recorded: %s", request_id, exc)
        return error(
            503,
            "event_log_unavailable",
            "the event log did not accept the request in time; nothing was charged, retry later",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    return None


async def answer_whole(
    state: GatewayState, ctx: CallContext, price: Price, started: float
) -> Completion | web.Response:
    """Call the model, then record all four facts in one transaction; the caller answers after."""
    calling = time.monotonic()
    try:
        completion = await state.adapter.complete(ctx.model, ctx.messages, ctx.max_tokens)
    except UpstreamError as exc:
        await release_hold(state, ctx, "failed")
        await record_failure(state, ctx, exc, calling)
        return upstream_error(exc)
    outcome = outcomes.called(
        ctx, outcomes.adapter_name(state.adapter, ctx.model), completion, ms_since(calling), streamed=False
    )
    if ctx.redact_kinds:
        completion = dataclasses.replace(completion, text=redact(completion.text, ctx.redact_kinds).text)
    await settle_usage(state, ctx, completion)
    charged, audited = closing_facts(ctx, completion, price)
    facts = Accounting.facts_for(ctx.budget_hold, [*opening_facts(ctx), charged, audited, outcome])
    unrecorded = await record(state, facts, started, ctx.request_id)
    return unrecorded or completion


def ms_since(t0: float) -> float:
    return (time.monotonic() - t0) * 1000.0


async def record_failure(state: GatewayState, ctx: CallContext, exc: UpstreamError, calling: float) -> None:
    """AdapterFailed in a transaction of its own (nothing else of a failed call is recorded); best effort."""
    try:
        event = outcomes.failed(ctx, outcomes.adapter_name(state.adapter, ctx.model), exc, ms_since(calling))
        await state.publisher.publish([event], timeout=state.publish_timeout)
    except PublishFailed as err:
        state.metrics.publish_failures.inc()
        log.warning("request %s: its adapter failure was not recorded: %s", ctx.request_id, err)


async def ask(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    started = time.monotonic()
    try:
        req, ctx, price = await begin_call(request, AskRequest, "/v1/ask", started)
    except Rejected as r:
        return r.response
    if req.stream:
        return await stream_answer(request, ctx, price, started, AskFrames(ctx))
    result = await answer_whole(state, ctx, price, started)
    if isinstance(result, web.Response):
        return result
    headers = None if await remember(state, ctx, result.text) else {"X-Memory-Stored": "false"}
    body = AskFrames(ctx).whole(result, price).model_dump_json()
    return web.Response(body=body, content_type="application/json", headers=headers)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    started = time.monotonic()
    try:
        req, ctx, price = await begin_call(request, ChatCompletionRequest, "/v1/chat/completions", started)
    except Rejected as r:
        return r.response
    frames = ChatFrames(ctx, include_usage=bool(req.stream_options and req.stream_options.include_usage))
    if req.stream:
        return await stream_answer(request, ctx, price, started, frames)
    result = await answer_whole(state, ctx, price, started)
    if isinstance(result, web.Response):
        return result
    return web.Response(body=frames.whole(result).model_dump_json(), content_type="application/json")


async def stream_answer(
    request: web.Request, ctx: CallContext, price: Price, started: float, frames: Frames
) -> web.StreamResponse:
    """Server-sent events: opening facts recorded before the first byte, closing facts before the last frame.

    The first piece is awaited before anything is recorded, so an upstream that fails at once
    gets a proper status and records nothing, exactly like a whole answer. From the first
    byte on, every exit records closing facts: a stream broken by the upstream or by the
    client still charges the tokens produced so far (`partial_usage`) with an audit record
    "failed", so no request is left with opening facts and no closing ones.
    """
    state = request.app[STATE]
    calling = time.monotonic()
    stream = state.adapter.stream(ctx.model, ctx.messages, ctx.max_tokens)
    try:
        first = await anext(stream, None)
    except UpstreamError as exc:
        await release_hold(state, ctx, "failed")
        await record_failure(state, ctx, exc, calling)
        return upstream_error(exc)
    first_token_ms = ms_since(calling)
    # the Kafka budget starts now: the model's time to first token is not the event log's
    failed = await record(state, Accounting.facts_for(ctx.budget_hold, opening_facts(ctx)), time.monotonic(),
                          ctx.request_id)  # fmt: skip
    if failed is not None:
        await close_stream(stream)
        await release_hold(state, ctx, "failed")
        return failed
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    pieces: list[str] = []  # what the model produced (usage is counted on it), sent or not
    masker = StreamRedactor(ctx.redact_kinds) if ctx.redact_kinds else None

    async def send(piece: str) -> None:
        safe = masker.feed(piece) if masker else piece  # a secret split across pieces is still caught
        if safe:
            await resp.write(frames.delta(safe))

    try:
        if first is not None:
            pieces.append(first)
        await resp.prepare(request)
        if first is not None:
            await send(first)
        async for piece in stream:
            pieces.append(piece)
            await send(piece)
        if masker is not None and (rest := masker.flush()):
            await resp.write(frames.delta(rest))
    except UpstreamError as exc:
        log.warning("request %s: upstream stream broke after %d pieces: %s", ctx.request_id, len(pieces), exc.code)
        request[ERROR_KIND] = "upstream_error"
        lost = outcomes.failed(ctx, outcomes.adapter_name(state.adapter, ctx.model), exc, ms_since(calling))
        charged = await close_broken(state, ctx, price, "".join(pieces), "upstream_error", [lost])
        with contextlib.suppress(ConnectionError):  # the client may be gone too
            if masker is not None and (rest := masker.flush()):
                await resp.write(frames.delta(rest))  # charged for, so shown (masked)
            note = "" if charged else "; the event log did not accept the charge"
            message = f"the model stopped answering ({exc.code}); the answer is incomplete{note}"
            await resp.write(frames.failure(message, exc.code))
            await resp.write_eof()
        return resp
    except ConnectionError:  # the client went away: stop the model, charge what it produced
        log.info("request %s: client disconnected after %d pieces", ctx.request_id, len(pieces))
        request[ERROR_KIND] = "client_disconnected"
        await close_stream(stream)
        await close_broken(state, ctx, price, "".join(pieces), "client_disconnected")
        return resp
    except asyncio.CancelledError:  # a server with handler_cancellation, or shutdown: still charge, then stop
        gone = request.transport is None or request.transport.is_closing()
        await asyncio.shield(close_stream(stream))
        reason = "client_disconnected" if gone else "cancelled"
        await asyncio.shield(close_broken(state, ctx, price, "".join(pieces), reason))
        raise
    except Exception:  # a bug, not a break: the opening facts still get their closing ones
        log.exception("request %s: stream failed after %d pieces", ctx.request_id, len(pieces))
        request[ERROR_KIND] = "internal_error"
        await close_stream(stream)
        await close_broken(state, ctx, price, "".join(pieces), "internal_error")
        with contextlib.suppress(Exception):  # best effort: the client may be gone, the response unprepared
            await resp.write(
                frames.failure("the gateway failed mid-answer; the answer is incomplete", "internal_error")
            )
            await resp.write_eof()
        return resp
    completion = state.adapter.usage(ctx.model, ctx.messages, "".join(pieces), ctx.max_tokens)
    await settle_usage(state, ctx, completion)
    outcome = outcomes.called(
        ctx, outcomes.adapter_name(state.adapter, ctx.model), completion, ms_since(calling), streamed=True,
        first_token_ms=first_token_ms,
    )  # fmt: skip
    closing = [*closing_facts(ctx, completion, price), outcome]
    try:  # shielded: a handler cancelled now (client gone) must not drop the charge of a whole answer
        facts = Accounting.facts_for(ctx.budget_hold, closing)
        await asyncio.shield(state.publisher.publish(facts, timeout=state.publish_timeout))
    except PublishFailed as exc:
        state.metrics.publish_failures.inc()
        log.error("request %s streamed but its charge was not recorded: %s", ctx.request_id, exc)
        request[ERROR_KIND] = "charge_not_recorded"
        with contextlib.suppress(ConnectionError):
            await resp.write(frames.failure("the event log did not accept the charge; the answer is incomplete"))
            await resp.write_eof()
        return resp
    shown = "".join(pieces) if masker is None else redact(completion.text, ctx.redact_kinds).text
    await remember(state, ctx, shown)
    with contextlib.suppress(ConnectionError):  # charged in full: a client gone before the last frame changes nothing
        await resp.write(frames.done(dataclasses.replace(completion, text=shown), price))
        await resp.write_eof()
    return resp


def partial_usage(state: GatewayState, ctx: CallContext, produced: str) -> Completion:
    """Usage of a broken stream: the prompt, and the completion tokens of the text produced so far.

    The adapter counts (`usage` on the partial text), capped at ~4 characters per token of
    that text: an adapter that only knows whole answers (the simulator) would otherwise charge
    the whole answer for a part of it.
    """
    counted = state.adapter.usage(ctx.model, ctx.messages, produced, ctx.max_tokens)
    completion_tokens = min(counted.completion_tokens, (len(produced) + 3) // 4)
    return Completion(counted.model, produced, counted.prompt_tokens, completion_tokens)


async def close_broken(
    state: GatewayState, ctx: CallContext, price: Price, produced: str, reason: str, extra: Sequence[Event] = ()
) -> bool:
    """Record the closing facts of a stream that ended early (charge the partial usage); True if Kafka took them.

    Ids derive from the request id as for any closing, so a re-sent publish is identical and
    a request has one TokensCharged whichever way it ended.
    """
    completion = partial_usage(state, ctx, produced)
    await settle_usage(state, ctx, completion)
    try:
        await state.publisher.publish(
            Accounting.facts_for(ctx.budget_hold, [*partial_closing_facts(ctx, completion, price, reason), *extra]),
            timeout=state.publish_timeout,
        )
    except PublishFailed as exc:
        state.metrics.publish_failures.inc()
        log.error("request %s broke (%s) and its partial charge was not recorded: %s", ctx.request_id, reason, exc)
        return False
    return True


async def close_stream(stream: AsyncIterator[str]) -> None:
    """Stop an upstream stream we no longer read, so the model stops generating."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


async def feedback(request: web.Request) -> web.Response:
    """Record a quality signal. The tenant is always the caller's: feedback naming another
    tenant's request id joins nothing, because every join is on (tenant, request_id)."""
    state = request.app[STATE]
    started = time.monotonic()
    principal = await authenticate(request)
    if isinstance(principal, web.Response):
        return principal
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    if not isinstance(body, dict):
        return error(400, "invalid_request", "the body must be a JSON object with request_id and score")
    try:
        req = FeedbackRequest.model_validate(body)
    except ValidationError as exc:
        return validation_error(exc)
    trace_parent = telemetry.trace_parent_for(request.headers.get("traceparent"))
    event = feedback_fact(principal, req.request_id, req.score, req.label, trace_parent)
    failed = await record(state, [event], started, req.request_id)
    if failed is not None:
        return failed
    out = FeedbackResponse(feedback_id=event.envelope.event_id, request_id=req.request_id)
    return web.Response(status=202, body=out.model_dump_json(), content_type="application/json")


def no_memory() -> web.Response:
    return error(501, "memory_not_configured", "this gateway runs without the memory fabric; ask the operator")


def log_unavailable(what: str) -> web.Response:
    return error(
        503, "event_log_unavailable", f"{what}: the event log did not answer in time; retry later",
        headers={"Retry-After": RETRY_AFTER_S},
    )  # fmt: skip


async def memory_call(request: web.Request) -> tuple[MemoryFabric, Principal, str] | web.Response:
    """Authenticate and check the session id; the session is always the caller's tenant's."""
    state = request.app[STATE]
    principal = await authenticate(request)
    if isinstance(principal, web.Response):
        return principal
    if state.memory is None:
        return no_memory()
    session = request.match_info["session"]
    if not SESSION_ID.match(session):
        return error(422, "invalid_request", "session: 1-128 of letters, digits and . _ : @ -", ["session"])
    return state.memory, principal, session


async def memory_append(request: web.Request) -> web.Response:
    """Append a turn (masked as the tenant's policy asks); answered once Kafka committed it."""
    state = request.app[STATE]
    call = await memory_call(request)
    if isinstance(call, web.Response):
        return call
    memory, principal, session = call
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    if not isinstance(body, dict):
        return error(400, "invalid_request", 'the body must be a JSON object, e.g. {"role": "user", "content": "hi"}')
    try:
        req = MemoryTurnRequest.model_validate(body)
    except ValidationError as exc:
        return validation_error(exc)
    masked = redact(req.content, state.redaction(principal.tenant))
    state.metrics.observe_redactions(masked.counts.items())
    try:
        stored = await memory.append(
            principal, session, req.role, masked.text,
            request_id=req.request_id, trace_parent=telemetry.trace_parent_for(request.headers.get("traceparent")),
        )  # fmt: skip
    except PublishFailed as exc:
        state.metrics.publish_failures.inc()
        log.warning("memory turn not stored: %s", exc)
        return log_unavailable("the turn was not stored")
    out = MemoryWriteResponse(
        session=session,
        turn_index=stored.turn.index,
        chars=stored.fact.chars,
        content_sha256=stored.fact.content_sha256,
        redactions=dict(masked.counts),
        event_id=stored.fact.envelope.event_id,
    )
    return web.Response(status=201, body=out.model_dump_json(), content_type="application/json")


def _bound(request: web.Request, name: str) -> int | web.Response | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or int(raw) < 1:
        return error(422, "invalid_request", f"{name}: a positive integer", [name])
    return int(raw)


async def memory_read(request: web.Request) -> web.Response:
    """The session's window: the newest whole turns within `turns` and `chars` (capped by settings)."""
    call = await memory_call(request)
    if isinstance(call, web.Response):
        return call
    memory, principal, session = call
    turns, chars = _bound(request, "turns"), _bound(request, "chars")
    if isinstance(turns, web.Response):
        return turns
    if isinstance(chars, web.Response):
        return chars
    try:
        window: list[Turn] = await memory.read(principal.tenant, session, turns, chars)
    except PublishFailed as exc:
        log.warning("memory window not readable: %s", exc)
        return log_unavailable("the window could not be read")
    out = MemoryWindowResponse(
        session=session,
        turns=[MemoryTurn(index=t.index, role=t.role, content=t.content, at=t.at, request_id=t.request_id)
               for t in window],
        chars=sum(len(t.content) for t in window),
    )  # fmt: skip
    return web.Response(body=out.model_dump_json(), content_type="application/json")


async def memory_erase(request: web.Request) -> web.Response:
    """Erase the session: its key and turns tombstoned and MemoryErased recorded in one transaction."""
    state = request.app[STATE]
    call = await memory_call(request)
    if isinstance(call, web.Response):
        return call
    memory, principal, session = call
    try:
        trace_parent = telemetry.trace_parent_for(request.headers.get("traceparent"))
        fact = await memory.erase(principal, session, trace_parent=trace_parent)
    except PublishFailed as exc:
        state.metrics.publish_failures.inc()
        log.warning("memory erase not recorded: %s", exc)
        return log_unavailable("the session was not erased")
    out = MemoryEraseResponse(session=session, turns_erased=fact.turns_erased, event_id=fact.envelope.event_id)
    return web.Response(body=out.model_dump_json(), content_type="application/json")


async def policy_check(request: web.Request) -> web.Response:
    """What-if: the decision the gateway would enforce now for a call of the caller's own.

    Nothing is recorded: no call is made and nothing is allowed or refused, so there is no
    fact to keep (and a what-if probe must not count as a request in the coverage figures).
    Tenant, principal, roles and region come from the credential and the attributes only,
    so a caller can never evaluate another tenant's input.
    """
    state = request.app[STATE]
    principal = await authenticate(request)
    if isinstance(principal, web.Response):
        return principal
    body = await read_json(request, empty={})
    if isinstance(body, web.Response):
        return body
    if not isinstance(body, dict):
        return error(400, "invalid_request", 'the body must be a JSON object, e.g. {"tools": ["web_search"]}')
    try:
        req = PolicyCheckRequest.model_validate(body)
    except ValidationError as exc:
        return validation_error(exc)
    inp = DecisionInput(
        tenant=principal.tenant,
        principal=principal.key_id,
        roles=frozenset(principal.roles),
        region=state.policy.principal_region(principal.key_id),
        data_classification=req.data_classification,
        tools=frozenset(req.tools),
        model=req.model or "",
        estimated_cost=req.estimated_cost,
        route=req.route,
    )
    verdict = state.policy.engine.decide(inp)
    ob = verdict.obligations
    out = PolicyCheckResponse(
        tenant=principal.tenant,
        principal=principal.key_id,
        decision="allow" if verdict.allow else "deny",
        policy_version=verdict.policy_version,
        determining_policies=list(verdict.determining_policies),
        obligations=verdict.obligation_list,
        redact=sorted(ob.redact),
        regions=sorted(ob.regions) if ob.regions is not None else None,
        max_cost=ob.max_cost,
        allowed_models=state.policy.allowed_models(verdict, state.candidate_models()),
        denied_tool=verdict.denied_tool,
        reasons=list(verdict.reasons),
        input_sha256=verdict.input_sha256,
    )
    return web.Response(body=out.model_dump_json(), content_type="application/json")


async def openapi(_: web.Request) -> web.Response:
    return web.Response(body=OPENAPI, content_type="application/json")


async def healthz(_: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ok, detail = await request.app[STATE].ready_check()
    return json_response({"ready": ok, "detail": detail}, status=200 if ok else 503)


def create_app(
    keys: KeyStore,
    publisher: Publisher,
    ready_check: ReadyCheck,
    *,
    adapter: Adapter | None = None,
    prices: Mapping[str, Price] | None = None,
    default_model: str = "sim-small",
    publish_timeout: float = 1.8,
    oidc: OidcVerifier | None = None,
    limiter: RateLimiter | None = None,
    redaction: Callable[[str], frozenset[str]] | None = None,
    policy: PolicyPoint | None = None,
    classification_header: str = DEFAULT_CLASSIFICATION_HEADER,
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
    memory: MemoryFabric | None = None,
    accounting: Accounting | None = None,
    record_completions: bool = False,
) -> web.Application:
    """The gateway app. Without `policy`, the shipped default bundle decides, with the default
    registry's models seeded as Model entities (what tests and single-process use need).
    `record_completions` publishes a RequestCompleted per public request (issue 11; the server does)."""
    metrics = GatewayMetrics()
    adapter = adapter or SimulatedAdapter()
    if policy is None:
        served = [m for m in default_registry().models() if m.name in adapter.models]
        policy = PolicyPoint(seeds=seeds_from_regions({m.name: (m.region, m.adapter_name) for m in served}))
    completions = CompletionRecorder(publisher, metrics.registry, timeout=max(5.0, publish_timeout))
    middlewares = [trace_requests, metrics.middleware(), errors_as_json]
    if record_completions:  # outside errors_as_json: it sees the status the client gets
        middlewares.insert(-1, completions.middleware())
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[STATE] = GatewayState(
        metrics=metrics,
        keys=keys,
        publisher=publisher,
        adapter=adapter,
        prices=accounting.prices if accounting is not None else (prices or dict(DEFAULT_PRICES)),
        default_model=default_model,
        publish_timeout=publish_timeout,
        ready_check=ready_check,
        oidc=oidc,
        limiter=limiter,
        redaction=redaction or (lambda _tenant: ALL_KINDS),
        policy=policy,
        classification_header=classification_header,
        default_max_tokens=default_max_tokens,
        memory=memory,
        accounting=accounting,
    )
    app.router.add_post("/v1/ask", ask)
    app.router.add_post("/v1/memory/{session}", memory_append)
    app.router.add_get("/v1/memory/{session}", memory_read)
    app.router.add_delete("/v1/memory/{session}", memory_erase)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/feedback", feedback)
    app.router.add_post("/v1/policy/check", policy_check)
    app.router.add_get("/metrics", metrics.handler)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if record_completions:

        async def drain_completions(_: web.Application) -> None:  # before the server closes the publisher
            await completions.drain()

        app.on_cleanup.append(drain_completions)
    return app


async def always_ready() -> tuple[bool, str]:
    return True, "no checks"
