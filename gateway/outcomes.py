"""Adapter outcome facts: `AdapterCalled` when a model answered, `AdapterFailed` when it did not.

Why facts: the router's latency term and the operators' view of each upstream come from what
the adapters actually did, not from a config value. The priors agent folds `AdapterCalled`
latency into its per-model statistics (`domain.routing_priors`), and every gateway replica
then routes with it.

Both are built from what the gateway saw: the wall time from handing the call to the adapter
until the answer was complete (for a stream, also until its first piece), the completion's
usage and finish reason, and the attempts the upstream client made (`UpstreamCompletion.
attempts`, `UpstreamError.attempts`; a simulator makes one). Ids derive from the request id
like every other fact of the request, so re-sending the request's transaction is idempotent;
they ride in the same transaction as the request's charge (a whole answer, a stream's closing
facts) and, for a failure, in a transaction of their own (nothing else of the call is
recorded then). No provider message is ever recorded: `error_kind` is a stable class.
"""

from __future__ import annotations

from gateway.adapters import Adapter, Completion
from gateway.facts import CallContext
from gateway.upstream import (
    EgressRefused,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from streams.events import AdapterCalled, AdapterFailed
from streams.ids import derived_uuid7


def adapter_name(adapter: Adapter, model: str) -> str:
    """The name of the adapter that serves `model` (the registry's, else the adapter's class)."""
    registry = getattr(adapter, "registry", None)
    info = registry.lookup(model) if registry is not None else None
    if info is not None:
        return str(info.adapter_name)
    return type(adapter).__name__.removesuffix("Adapter").lower() or "adapter"


def error_kind(exc: UpstreamError) -> str:
    """A stable class for a failure (the schema's list), never the provider's text."""
    if isinstance(exc, UpstreamTimeout):
        return "timeout"
    if isinstance(exc, UpstreamUnavailable | EgressRefused):
        return "connection"
    if isinstance(exc, UpstreamHTTPError):
        status = exc.upstream_status or 0
        if status == 429:
            return "rate_limited"
        if status in (401, 403):
            return "auth"
        if 400 <= status < 500:
            return "bad_request"
    return "server_error"


def called(
    ctx: CallContext,
    adapter: str,
    completion: Completion,
    latency_ms: float,
    *,
    streamed: bool,
    first_token_ms: float | None = None,
) -> AdapterCalled:
    """The outcome of a call the model answered (after any retries)."""
    attempts = int(getattr(completion, "attempts", 1) or 1)
    return AdapterCalled(
        envelope=ctx.envelope("AdapterCalled", str(derived_uuid7(ctx.request_id, "RequestReceived"))),
        request_id=ctx.request_id,
        model=ctx.model,
        adapter=adapter,
        status=200,
        retries=max(0, attempts - 1),
        latency_ms=max(0, round(latency_ms)),
        first_token_ms=None if first_token_ms is None else max(0, round(first_token_ms)),
        streamed=streamed,
        # an upstream says (or not: None); the simulator always finishes its answer
        finish_reason=getattr(completion, "finish_reason", None) if hasattr(completion, "finish_reason") else "stop",
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
    )


def failed(
    ctx: CallContext, adapter: str, exc: UpstreamError, latency_ms: float, *, will_fall_back: bool = False
) -> AdapterFailed:
    """The outcome of a call the adapter gave up on (the gateway has no fallback yet: `will_fall_back` False)."""
    return AdapterFailed(
        envelope=ctx.envelope("AdapterFailed"),  # nothing else of a failed call is recorded: no cause to cite
        request_id=ctx.request_id,
        model=ctx.model,
        adapter=adapter,
        error_kind=error_kind(exc),
        status=exc.upstream_status,
        retries=max(0, exc.attempts - 1),
        latency_ms=max(0, round(latency_ms)),
        will_fall_back=will_fall_back,
    )
