"""Prometheus metrics of the agent processes: events by outcome, processing time, consumer lag.

Where they are served: the Faust worker on its own web server (`/metrics` on
worker_web_port + i, `add_metrics_page`); the transactional workers (ledger, dp-budget,
routing-priors) on prometheus_client's server at `--metrics-port` (`streams.metrics.serve`).

Families (labels are catalogue names, code-defined enums or partition numbers; no tenant):
- `ledgerflow_agent_events_total{agent, outcome}`: records handled. outcome is `ok` (folded,
  state or output changed), `unchanged` (folded, nothing new: a redelivery), `skipped`
  (undecodable, left to the record's dead-lettering consumer) or `dead_letter`;
- `ledgerflow_agent_processing_seconds{agent, unit}`: unit `event` (a Faust agent, one record
  from receipt to the next one asked for) or `batch` (a transactional worker, one consumed
  batch from its arrival to its commit);
- `ledgerflow_agent_consumer_lag{group, topic, partition}`: offsets this process has still to
  handle on each partition it owns, sampled every few seconds. See `lag_of` for how a
  transaction's trailing commit marker is kept from reading as lag 1 forever.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
OUTCOMES = ("ok", "unchanged", "skipped", "dead_letter")
LAG_EVERY_S = 5.0
Partition = tuple[str, int]


def lag_of(end: int, handled: int, fetched: int | None = None) -> int:
    """Offsets left on one partition: `end` (high watermark) minus `handled` (next offset to handle).

    A transactional producer ends each transaction with a commit marker that takes an offset
    but is never delivered, so a caught-up consumer of a transactional topic has handled
    everything but the last offset. When the fetcher has passed the end (`fetched` >= `end`)
    and exactly one offset is left, that offset is the marker: lag 0. (Were it a record, it
    is in the worker's hands already, for milliseconds.)
    """
    left = max(0, end - handled)
    if left == 1 and fetched is not None and fetched >= end:
        return 0
    return left


class _LagCollector(Collector):
    def __init__(self, owner: AgentMetrics) -> None:
        self._owner = owner

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "ledgerflow_agent_consumer_lag",
            "Offsets this process has still to handle, per owned partition (sampled every few seconds).",
            labels=["group", "topic", "partition"],
        )
        for group, lags in sorted(self._owner.lags().items()):
            for (topic, partition), lag in sorted(lags.items()):
                family.add_metric([group, topic, str(partition)], lag)
        yield family


class AgentMetrics:
    """One process's agent metrics (its own registry: tests run several in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.events = Counter(
            "ledgerflow_agent_events_total", "Records handled by each agent, by outcome.",
            ["agent", "outcome"], registry=self.registry,
        )  # fmt: skip
        self.seconds = Histogram(
            "ledgerflow_agent_processing_seconds",
            "Time to handle one record (unit=event, Faust agents) or one batch to its commit (unit=batch).",
            ["agent", "unit"], buckets=BUCKETS, registry=self.registry,
        )  # fmt: skip
        self._lags: dict[str, dict[Partition, int]] = {}
        self._lock = threading.Lock()
        self.trackers: list[EventTracker] = []  # the Faust agents' (for the lag sampler)
        self.registry.register(_LagCollector(self))

    def declare(self, agent: str, unit: str) -> None:
        """Create an agent's series at 0, so a scrape shows them before its first record."""
        for outcome in OUTCOMES:
            self.events.labels(agent, outcome)
        self.seconds.labels(agent, unit)

    def set_lag(self, group: str, lags: Mapping[Partition, int]) -> None:
        """Replace the group's lag snapshot (partitions no longer owned disappear)."""
        with self._lock:
            self._lags[group] = dict(lags)

    def lags(self) -> dict[str, dict[Partition, int]]:
        with self._lock:
            return {g: dict(v) for g, v in self._lags.items()}

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # --- Faust agents: one record at a time -----------------------------------------------

    def tracker(self, agent: str) -> EventTracker:
        self.declare(agent, "event")
        tracker = EventTracker(self, agent)
        self.trackers.append(tracker)
        return tracker

    # --- transactional workers: one batch per transaction ----------------------------------

    def batches(self, agent: str, group: str) -> BatchTracker:
        self.declare(agent, "batch")
        return BatchTracker(self, agent, group)


class EventTracker:
    """Wraps a Faust agent's `stream.events()`: times each record, counts its outcome.

    The agent sets `outcome` when a record is not a plain fold (`dead_letter`, `skipped`,
    `unchanged`); the tracker records it when the agent asks for the next record, and
    remembers the next offset to handle per partition for the lag sampler.
    """

    def __init__(self, metrics: AgentMetrics, agent: str) -> None:
        self.agent = agent
        self.outcome = "ok"
        self.handled: dict[Partition, int] = {}
        self._counters = {o: metrics.events.labels(agent, o) for o in OUTCOMES}
        self._seconds = metrics.seconds.labels(agent, "event")

    async def events(self, stream: Any) -> AsyncIterator[Any]:
        """`stream.events()`, measured; each event is yielded unchanged."""
        async for event in stream.events():
            msg = event.message
            self.outcome = "ok"
            started = time.perf_counter()
            yield event
            self._seconds.observe(time.perf_counter() - started)
            self._counters.get(self.outcome, self._counters["ok"]).inc()
            self.handled[(msg.topic, msg.partition)] = msg.offset + 1


class BatchTracker:
    """For a consume → fold → commit loop: `dead_letter()` per poison record, `committed()` per batch."""

    def __init__(self, metrics: AgentMetrics, agent: str, group: str) -> None:
        self._metrics = metrics
        self.group = group
        self._counters = {o: metrics.events.labels(agent, o) for o in OUTCOMES}
        self._seconds = metrics.seconds.labels(agent, "batch")
        self._pending: dict[str, int] = {}
        self._lag_at = 0.0

    def count(self, outcome: str, n: int = 1) -> None:
        """Note `n` records of this batch with `outcome` (recorded only if the batch commits)."""
        self._pending[outcome] = self._pending.get(outcome, 0) + n

    def committed(self, records: int, started: float) -> None:
        """The batch of `records` consumed at `started` (perf_counter) is committed: count and time it."""
        others = sum(self._pending.values())
        for outcome, n in self._pending.items():
            self._counters[outcome].inc(n)
        if records > others:
            self._counters["ok"].inc(records - others)
        self._pending.clear()
        self._seconds.observe(time.perf_counter() - started)

    def aborted(self) -> None:
        """The batch's transaction aborted: it is read again, and counted then."""
        self._pending.clear()

    def sample_lag(self, consumer: Any, every_s: float = LAG_EVERY_S) -> None:
        """At most every `every_s`: lag of each assigned partition from the client's own state.

        confluent-kafka: the position moves past transaction markers, and the cached high
        watermark comes with every fetch response, so this costs no broker round trip.
        Call it from the thread that drives the consumer.
        """
        now = time.monotonic()
        if now < self._lag_at:
            return
        self._lag_at = now + every_s
        try:
            lags: dict[Partition, int] = {}
            for tp in consumer.position(consumer.assignment()):
                _low, high = consumer.get_watermark_offsets(tp, cached=True)
                if tp.offset >= 0 and high >= 0 and tp.topic is not None:
                    lags[(tp.topic, tp.partition)] = lag_of(high, tp.offset)
        except Exception as exc:  # a closed or rebalancing consumer: try again next time
            log.debug("consumer lag not sampled: %s", exc)
            return
        self._metrics.set_lag(self.group, lags)


# --- the Faust worker -------------------------------------------------------------------------

_BY_APP: weakref.WeakKeyDictionary[Any, AgentMetrics] = weakref.WeakKeyDictionary()


def metrics_of(app: Any) -> AgentMetrics:
    """The metrics of one Faust app (made on first use): agents register without a new parameter."""
    found = _BY_APP.get(app)
    if found is None:
        found = _BY_APP[app] = AgentMetrics()
    return found


def add_metrics_page(app: Any, metrics: AgentMetrics) -> None:
    """`GET /metrics` on the Faust worker's web server."""
    import faust

    @app.page("/metrics")
    class MetricsView(faust.web.View):
        async def get(self, request: Any) -> Any:
            return self.bytes(metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_lag_sampler(
    app: Any, metrics: AgentMetrics, trackers: list[EventTracker], topics: set[str], every_s: float = LAG_EVERY_S
) -> None:
    """Every `every_s`: lag of each owned partition of `topics`, as the slowest agent on it sees it."""

    @app.timer(interval=every_s)
    async def sample_consumer_lag() -> None:
        consumer = app.consumer
        lags: dict[Partition, int] = {}
        for tp in list(consumer.assignment()):
            if tp.topic not in topics:
                continue
            try:
                end = consumer.highwater(tp)
                fetched = await consumer.position(tp)
            except Exception:  # not fetched yet, or revoked meanwhile
                continue
            key = (tp.topic, tp.partition)
            handled = [t.handled[key] for t in trackers if key in t.handled]
            start = min(handled) if handled else app.monitor.tp_committed_offsets.get(tp)
            if end is None or start is None:
                continue
            lags[(tp.topic, tp.partition)] = lag_of(end, start, fetched)
        metrics.set_lag(app.conf.id, lags)
