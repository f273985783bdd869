"""Prometheus metrics of one gateway process, served at `/metrics`.

Labels are bounded by construction: the route is the matched route template (never the raw
path) and the status is the HTTP code, so no client input can create new series. The policy
metrics carry the policy id (a bundle's @ids: published by operators, not sent by clients)
and the tenant, which is bounded here by `BoundedLabel`: the first `TENANT_SERIES` tenants a
process sees get their own series, every later one is counted as "_other". Exact per-tenant
figures come from the ClickHouse projections (policy_decided), not from here. Redactions are
counted by kind (`domain.redaction.ALL_KINDS`, a fixed set). Families whose label values are
known in advance (rate-limit kinds, redaction kinds) start at 0, so a scrape shows every
series before the first event.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from domain.policy import Decision, PolicyBundle
from domain.redaction import ALL_KINDS
from streams.metrics import OTHER, BoundedLabel

__all__ = ["OTHER", "TENANT_SERIES", "BoundedLabel", "GatewayMetrics"]

BUCKETS = (0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 1.2, 2.5, 5.0, 10.0)
DECISION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)
TENANT_SERIES = 100
RATE_LIMIT_KINDS = ("requests", "tokens", "unavailable")


def _kinds(bundle: PolicyBundle, policy: str) -> list[str]:
    ob = bundle.obligations_of(policy)
    return [
        kind
        for kind, present in (("redact", bool(ob.redact)), ("region", ob.regions is not None),
                              ("max_cost", ob.max_cost is not None))
        if present
    ]  # fmt: skip


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
        for kind in RATE_LIMIT_KINDS:
            self.rate_limited.labels(kind)
        self.redactions = Counter(
            "ledgerflow_gateway_redactions_total",
            "Spans masked in prompts and memory turns before anything else saw them, by kind.",
            ["kind"], registry=self.registry,
        )  # fmt: skip
        for kind in sorted(ALL_KINDS):
            self.redactions.labels(kind)
        self.publish_failures = Counter(
            "ledgerflow_gateway_publish_failures_total", "Requests answered 503 because Kafka did not take the facts.",
            registry=self.registry,
        )  # fmt: skip
        self.tenant = BoundedLabel(TENANT_SERIES)
        self.policy_decisions = Counter(
            "ledgerflow_gateway_policy_decisions_total", "Policy decisions enforced, by decision and tenant.",
            ["decision", "tenant"], registry=self.registry,
        )  # fmt: skip
        self.policy_denials = Counter(
            "ledgerflow_gateway_policy_denials_total",
            "Denied requests by determining policy and tenant (one count per determining policy).",
            ["policy", "tenant"], registry=self.registry,
        )  # fmt: skip
        self.policy_obligations = Counter(
            "ledgerflow_gateway_policy_obligations_total",
            "Obligations imposed on allowed requests, by policy, obligation kind and tenant.",
            ["policy", "kind", "tenant"], registry=self.registry,
        )  # fmt: skip
        self.policy_refusals = Counter(
            "ledgerflow_gateway_policy_refusals_total",
            "Allowed requests the gateway refused because an obligation could not be met, by reason and tenant.",
            ["reason", "tenant"], registry=self.registry,
        )  # fmt: skip
        self.policy_seconds = Histogram(
            "ledgerflow_gateway_policy_decision_seconds", "Time to decide one request in process (shadow included).",
            buckets=DECISION_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.shadow_divergences = Counter(
            "ledgerflow_gateway_policy_shadow_divergences_total",
            "Requests the shadow bundle would have decided differently, by kind.",
            ["kind"], registry=self.registry,
        )  # fmt: skip

    def observe_policy(self, decision: Decision, tenant: str, bundle: PolicyBundle, seconds: float) -> None:
        """Count one enforced decision: its outcome, the denying policies or the obligations imposed."""
        t = self.tenant(tenant)
        self.policy_seconds.observe(seconds)
        self.policy_decisions.labels(decision.decision, t).inc()
        if not decision.allow:
            for policy in decision.determining_policies or ("(no policy)",):
                self.policy_denials.labels(policy, t).inc()
            return
        if decision.obligations.empty:
            return
        for policy in decision.determining_policies:
            for kind in _kinds(bundle, policy):
                self.policy_obligations.labels(policy, kind, t).inc()

    def observe_redactions(self, counts: Iterable[tuple[str, int]]) -> None:
        """Count masked spans by kind (`counts`: kind → spans, as `domain.redaction` reports them)."""
        for kind, n in counts:
            if n:
                self.redactions.labels(kind if kind in ALL_KINDS else OTHER).inc(n)

    def observe_refusal(self, reason: str, tenant: str) -> None:
        self.policy_refusals.labels(reason, self.tenant(tenant)).inc()

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
