"""Prometheus metrics of one gateway process, served at `/metrics`.

Labels are bounded by construction: the route is the matched route template (never the raw
path) and the status is the HTTP code, so no client input can create new series. Tenants
are deliberately not a label here; per-tenant figures come from the ClickHouse projections.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.2, 2.5, 5.0, 10.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "ledgerflow_gateway_request_seconds", "Time to answer, by route and status.",
            ["route", "status"], buckets=BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.in_flight = Gauge("ledgerflow_gateway_in_flight", "Requests being handled.", registry=self.registry)
        self.rate_limited = Counter(
            "ledgerflow_gateway_rate_limited_total", "Requests refused by a rate limit, by kind.",
            ["kind"], registry=self.registry,
        )  # fmt: skip
        self.publish_failures = Counter(
            "ledgerflow_gateway_publish_failures_total", "Requests answered 503 because Kafka did not take the facts.",
            registry=self.registry,
        )  # fmt: skip

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        @web.middleware
        async def measure(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            info = request.match_info.route.resource
            route = info.canonical if info is not None else "unmatched"
            started = time.perf_counter()
            self.in_flight.inc()
            status = 500
            try:
                response = await handler(request)
                status = response.status
                return response
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                self.in_flight.dec()
                self.latency.labels(route, str(status)).observe(time.perf_counter() - started)

        return measure

    async def handler(self, _: web.Request) -> web.Response:
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
