"""RequestCompleted: how each request to a public route ended, recorded after the answer (issue 11).

Why a middleware: it sees every request of every route the same way (status, the time to the
answer's end) without each handler having to remember. Handlers only leave notes on the
request: the authenticated tenant (`TENANT`), the call's request id (`REQUEST_ID`) and how a
stream that already answered 200 broke (`ERROR_KIND`).

Why fire-and-forget: the fact is about the answer, so it must never delay or change it. The
event is queued in process and the answer goes out at once; a task publishes what queued up
every `linger` seconds (50 ms) as one call to the process's transactional publisher, so a busy
gateway pays one publish per batch, not per request. A publish that fails is logged and
counted (`ledgerflow_gateway_completion_publish_failures_total`) and its events are kept, up
to `backlog_max`, to ride along with the next completion: so the 503s of a Kafka outage are
recorded once Kafka is back, which is when the availability SLO needs them. Kept events that
overflow the backlog are dropped and counted (`..._completions_dropped_total`). A commit whose
outcome is unknown can be re-sent; the event ids derive from the request id, so such a
duplicate carries the same event id.

Tenant: the authenticated caller's tenant, or `_anonymous` for a request nobody authenticated
(a 401): never a string the client sent.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Protocol

import orjson
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from domain.slo import ANONYMOUS_TENANT
from streams.events import Envelope, Event, RequestCompleted
from streams.ids import derived_uuid7, uuid7

log = logging.getLogger(__name__)

TENANT = web.RequestKey("ledgerflow_tenant", str)
REQUEST_ID = web.RequestKey("ledgerflow_request_id", str)
ERROR_KIND = web.RequestKey("ledgerflow_error_kind", str)
PUBLIC_PREFIX = "/v1/"  # /metrics, /healthz, /readyz, /openapi.json are not requests of the product
PRODUCER = "gateway"
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


class Publisher(Protocol):
    async def publish(self, events: Sequence[Event], timeout: float = ...) -> None: ...


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def error_code(response: web.StreamResponse) -> str | None:
    """The `error.code` of a JSON error body (the gateway's stable codes), else None."""
    if response.status < 400 or not isinstance(response, web.Response):
        return None
    body = response.body
    if not isinstance(body, bytes | bytearray):
        return None
    try:
        code = orjson.loads(body)["error"]["code"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return f"http_{response.status}"
    return code if isinstance(code, str) else f"http_{response.status}"


class CompletionRecorder:
    """Builds each public request's RequestCompleted and publishes it without waiting."""

    def __init__(
        self,
        publisher: Publisher,
        registry: CollectorRegistry,
        *,
        timeout: float = 5.0,
        backlog_max: int = 10_000,
        linger: float = 0.05,
    ) -> None:
        self._publisher = publisher
        self._timeout = timeout
        self._backlog_max = backlog_max
        self._linger = linger
        self._backlog: deque[RequestCompleted] = deque()  # queued, or kept from a failed publish
        self._tasks: set[asyncio.Task[None]] = set()
        self._flushing = False
        self.failures = Counter(
            "ledgerflow_gateway_completion_publish_failures_total",
            "RequestCompleted publishes that failed (their events are retried with the next one).",
            registry=registry,
        )
        self.dropped = Counter(
            "ledgerflow_gateway_completions_dropped_total",
            "RequestCompleted events dropped because the retry backlog was full.",
            registry=registry,
        )

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def record_completion(request: web.Request, handler: Handler) -> web.StreamResponse:
            resource = request.match_info.route.resource
            route = resource.canonical if resource is not None else None
            if route is None or not route.startswith(PUBLIC_PREFIX):
                return await handler(request)
            started = time.monotonic()
            try:
                response = await handler(request)
            except asyncio.CancelledError:
                self.record(request, route, 499, started, "client_disconnected", streamed=False)
                raise
            except web.HTTPException as exc:  # errors_as_json turns these into responses; a 3xx passes
                self.record(request, route, exc.status, started, None, streamed=False)
                raise
            except Exception:
                self.record(request, route, 500, started, "internal_error", streamed=False)
                raise
            streamed = not isinstance(response, web.Response)
            kind = request.get(ERROR_KIND) or error_code(response)
            self.record(request, route, response.status, started, kind, streamed=streamed)
            return response

        return record_completion

    def record(
        self, request: web.Request, route: str, status: int, started: float, error_kind: str | None, *, streamed: bool
    ) -> None:
        request_id = request.get(REQUEST_ID) or str(uuid7())
        header = request.headers.get("traceparent", "").strip().lower()
        event = RequestCompleted(
            envelope=Envelope(
                event_id=str(derived_uuid7(request_id, "RequestCompleted")),
                event_type="RequestCompleted",
                schema_version=RequestCompleted.SCHEMA_VERSION,
                tenant=request.get(TENANT) or ANONYMOUS_TENANT,
                occurred_at=datetime.now(UTC),
                correlation_id=request_id,
                producer=PRODUCER,
                trace_parent=header if _TRACEPARENT.match(header) else None,
            ),
            request_id=request_id,
            route=route,
            method=request.method,
            status=status,
            latency_ms=max(0, round((time.monotonic() - started) * 1000)),
            streamed=streamed,
            error_kind=error_kind,
        )
        self.submit(event)

    def submit(self, event: RequestCompleted) -> None:
        """Queue `event`; a flush task publishes the queue (and what failed before) within `linger`."""
        self._backlog.append(event)
        overflow = len(self._backlog) - self._backlog_max
        for _ in range(max(0, overflow)):
            self._backlog.popleft()
            self.dropped.inc()
        if not self._flushing:
            self._flushing = True
            task = asyncio.get_running_loop().create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _flush(self) -> None:
        try:
            await asyncio.sleep(self._linger)
        finally:
            self._flushing = False  # events queued from now on start the next flush
        batch = list(self._backlog)
        self._backlog.clear()
        await self._publish(batch)

    async def _publish(self, batch: list[RequestCompleted]) -> None:
        try:
            await self._publisher.publish(batch, timeout=self._timeout)
        except Exception as exc:  # PublishFailed, or anything else: never the client's problem
            self.failures.inc()
            kept = [*batch, *self._backlog]
            overflow = max(0, len(kept) - self._backlog_max)
            if overflow:
                self.dropped.inc(overflow)
            self._backlog = deque(kept[overflow:])
            log.warning("%d RequestCompleted not recorded yet (kept for the next publish): %s", len(batch), exc)

    async def drain(self, timeout: float = 5.0) -> None:
        """Publish what is queued and wait for the publishes in flight (at shutdown, before the publisher closes)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)
        if self._backlog:
            batch = list(self._backlog)
            self._backlog.clear()
            await asyncio.wait_for(self._publish(batch), timeout)
