"""Prometheus metrics of the read side: the sink's inserts, its dead letters, its partitions, the
read side's own requests, and the consumer lag the sampler (`projections/lag.py`) measured.

Served at `/metrics` of the projections service, behind the operator's read token like every
route but `/ping` and `/readyz` (Prometheus: `authorization: {type: Bearer, credentials_file: ...}`).

How the sink reports: the sink calls one hook, `SinkHooks.landed`, after each insert that
landed (from its inserter thread). `SinkHooks` does nothing; the service gives the live sink
a `ReadSideMetrics`. Paused partitions and pending rows are read from `Sink.status()` at
scrape time, so the sink keeps no metric state of its own.

Labels (docs/observability.md): `table` and `topic` are catalogue names, `path` is fast|row,
`route` the matched route template, `status` the HTTP code; a dead letter's `reason` is a
code-defined PoisonEvent reason, still passed through a `BoundedLabel` because it travels
with the data.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from streams.metrics import BoundedLabel

ROW_BUCKETS = (1, 10, 50, 100, 500, 1000, 5000, 10_000, 20_000, 50_000, 100_000, 200_000)
SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
REQUEST_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 120.0)
REASON_SERIES = 32  # PoisonEvent reasons are a handful; the rest would be a bug, counted as "_other"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
LagKey = tuple[str, str, int]  # group, topic, partition


class SinkHooks:
    """What the sink tells an observer; this one does nothing (replay's sinks, tests)."""

    def landed(
        self, topic: str, table: str, rows: int, seconds: float, fast: bool, reasons: Sequence[str] = ()
    ) -> None:
        """One insert of `rows` rows from `topic` landed in `table` after `seconds` (dead letters
        produced first, if any); `reasons` has one entry per dead letter in it."""


class _StatusCollector(Collector):
    """Gauges read from the live sink's `status()` at scrape time."""

    def __init__(self, status: Callable[[], Mapping[str, Any] | None]) -> None:
        self._status = status

    def collect(self) -> Iterable[GaugeMetricFamily]:
        st = self._status() or {}
        paused = GaugeMetricFamily(
            "ledgerflow_sink_paused_partitions", "Partitions the sink stopped fetching (inserts failing)."
        )
        paused.add_metric([], len(st.get("paused", ())))
        assigned = GaugeMetricFamily("ledgerflow_sink_assigned_partitions", "Partitions the sink owns.")
        assigned.add_metric([], len(st.get("assigned", ())))
        pending = GaugeMetricFamily("ledgerflow_sink_pending_rows", "Rows consumed and not yet landed.")
        pending.add_metric([], float(st.get("pending_rows", 0)))
        yield from (paused, assigned, pending)


class _LagCollector(Collector):
    def __init__(self, owner: ReadSideMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "ledgerflow_consumer_group_lag",
            "Records each sampled consumer group has still to read, per partition (the consumer_lag rows' source).",
            labels=["group", "topic", "partition"],
        )
        for (group, topic, partition), lag in sorted(self._owner.lags().items()):
            family.add_metric([group, topic, str(partition)], lag)
        yield family


class ReadSideMetrics(SinkHooks):
    """The projections service's registry: sink, dead letters, lag samples, HTTP requests."""

    def __init__(self, sink_status: Callable[[], Mapping[str, Any] | None] = lambda: None) -> None:
        self.registry = CollectorRegistry()
        self.batch_rows = Histogram(
            "ledgerflow_sink_batch_rows", "Rows per ClickHouse insert, by path (fast: Avro block, row: decoded).",
            ["path"], buckets=ROW_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.insert_seconds = Histogram(
            "ledgerflow_sink_insert_seconds", "Time to land one insert (dead letters produced first, if any), by path.",
            ["path"], buckets=SECONDS_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.rows = Counter(
            "ledgerflow_sink_rows_total", "Rows landed in ClickHouse, by table (dead_letters included).",
            ["table"], registry=self.registry,
        )  # fmt: skip
        self.dead_letters = Counter(
            "ledgerflow_sink_dead_letters_total", "Records the sink dead-lettered, by reason and source topic.",
            ["reason", "topic"], registry=self.registry,
        )  # fmt: skip
        self._reason = BoundedLabel(REASON_SERIES)
        for path in ("fast", "row"):
            self.batch_rows.labels(path)
            self.insert_seconds.labels(path)
        self.requests = Histogram(
            "ledgerflow_read_request_seconds", "Time to answer a read-side request, by route template and status.",
            ["route", "status"], buckets=REQUEST_BUCKETS, registry=self.registry,
        )  # fmt: skip
        self.in_flight = Gauge("ledgerflow_read_in_flight", "Read-side requests being handled.", registry=self.registry)
        self.lag_samples = Counter(
            "ledgerflow_lag_samples_total", "ConsumerLagSampled events published, by outcome (ok, failed).",
            ["outcome"], registry=self.registry,
        )  # fmt: skip
        for outcome in ("ok", "failed"):
            self.lag_samples.labels(outcome)
        self._lags: dict[LagKey, int] = {}
        self._lock = threading.Lock()
        self.registry.register(_StatusCollector(sink_status))
        self.registry.register(_LagCollector(self))

    # --- the sink's hook ------------------------------------------------------------------

    def landed(
        self, topic: str, table: str, rows: int, seconds: float, fast: bool, reasons: Sequence[str] = ()
    ) -> None:
        path = "fast" if fast else "row"
        self.batch_rows.labels(path).observe(rows)
        self.insert_seconds.labels(path).observe(seconds)
        self.rows.labels(table).inc(rows)
        for reason in reasons:
            self.dead_letters.labels(self._reason(reason), topic).inc()

    # --- the lag sampler --------------------------------------------------------------------

    def set_lags(self, groups: Iterable[str], lags: Mapping[LagKey, int]) -> None:
        """Replace the sampled groups' lags (partitions no longer reported disappear)."""
        wanted = set(groups)
        with self._lock:
            kept = {k: v for k, v in self._lags.items() if k[0] not in wanted}
            kept.update(lags)
            self._lags = kept

    def lags(self) -> dict[LagKey, int]:
        with self._lock:
            return dict(self._lags)

    # --- HTTP -------------------------------------------------------------------------------

    def middleware(self) -> Callable[..., Awaitable[web.StreamResponse]]:
        """Time every request (the ones the guard refuses too) by route template and status."""

        @web.middleware
        async def measure(request: web.Request, handler: Handler) -> web.StreamResponse:
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
                self.requests.labels(route, str(status)).observe(time.perf_counter() - started)

        return measure

    async def handler(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})
