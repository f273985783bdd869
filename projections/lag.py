"""Consumer-lag sampler: every N seconds, one `ConsumerLagSampled` per group, topic and partition.

Why here: the portal and Grafana read lag from ClickHouse, and nothing but the sink writes
ClickHouse; the projections service already holds Kafka admin access. So the sampler asks
Kafka (`streams.admin.describe_group`: owner, committed offset, end offset, and a lag that
does not count transaction markers when the gap is small) and publishes the answer as events
on the `consumer-lag` topic; the sink lands them in `consumer_lag` like any other event.

What a round guarantees: all its events share one `occurred_at` (the sample time) and one
correlation id, are produced by an idempotent producer and flushed before the next round.
A group Kafka does not know (state DEAD) yields no rows; a partition that never held a record
and was never committed yields none either (no information, many rows). A group that cannot
be described this round is skipped and counted as failed; the next round tries again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from projections.metrics import ReadSideMetrics
from streams.admin import GroupDescription, describe_group
from streams.clients import Producer
from streams.codec import Codec
from streams.events import ConsumerLagSampled, Envelope
from streams.ids import uuid7
from streams.topics import Topics

log = logging.getLogger(__name__)

PRODUCER = "projections.lag-sampler"
PLATFORM_TENANT = "_platform"  # lag is the platform's, not a tenant's


@dataclass(frozen=True)
class WatchedGroup:
    """A consumer group and the topics whose partitions are reported for it (full names)."""

    group: str
    topics: tuple[str, ...]

    @classmethod
    def parse(cls, spec: str, topics: Topics) -> WatchedGroup:
        """`GROUP=key1,key2` (catalogue keys, no prefix) or `GROUP=*` (every catalogue topic)."""
        group, sep, keys = spec.partition("=")
        if not sep or not group.strip() or not keys.strip():
            raise ValueError(f"--lag-group wants GROUP=topic-key,... or GROUP=*, got {spec!r}")
        if keys.strip() == "*":
            return cls(group.strip(), tuple(topics.all()))
        names = tuple(topics.name(k.strip()) for k in keys.split(",") if k.strip())
        unknown = [n for n in names if topics.spec_for(n) is None]
        if unknown:
            raise ValueError(f"--lag-group {group}: not catalogue topics: {unknown}")
        return cls(group.strip(), names)


def events_of(desc: GroupDescription, at: datetime, correlation_id: str) -> list[ConsumerLagSampled]:
    """One event per reported partition of one group description (see the module doc for what is left out)."""
    if desc.state.upper() == "DEAD":
        return []
    out = []
    for row in desc.partitions:
        committed = row.committed if row.committed >= 0 else -1
        if row.end <= 0 and committed < 0:
            continue
        envelope = Envelope(
            event_id=str(uuid7()),
            event_type="ConsumerLagSampled",
            schema_version=1,
            tenant=PLATFORM_TENANT,
            occurred_at=at,
            correlation_id=correlation_id,
            producer=PRODUCER,
        )
        owner = row.member_id if row.member_id != "-" else ""
        out.append(
            ConsumerLagSampled(envelope, desc.group, row.topic, row.partition, owner, committed, row.end, row.lag)
        )
    return out


Describe = Callable[[str, str, list[str]], GroupDescription]


class LagSampler:
    """Samples `groups` every `interval_s` in a daemon thread and publishes the events."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        groups: Sequence[WatchedGroup],
        interval_s: float,
        metrics: ReadSideMetrics | None = None,
        describe: Describe = describe_group,
        flush_timeout_s: float = 10.0,
    ) -> None:
        self.bootstrap = bootstrap
        self.topic = topics.for_event("ConsumerLagSampled")
        self.groups = list(groups)
        self.interval_s = interval_s
        self.metrics = metrics
        self._describe = describe
        self.flush_timeout_s = flush_timeout_s
        self._codec = Codec()
        self._conf: dict[str, object] = {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all"}
        self._producer = Producer(dict(self._conf))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rounds = 0
        self.published = 0

    def sample(self, at: datetime | None = None) -> list[ConsumerLagSampled]:
        """One round's events (no publishing): every group described now."""
        at = at or datetime.now(UTC)
        correlation = str(uuid7())
        out: list[ConsumerLagSampled] = []
        for watched in self.groups:
            try:
                desc = self._describe(self.bootstrap, watched.group, list(watched.topics))
            except Exception as exc:  # Kafka busy or down: this group waits for the next round
                log.warning("lag of group %s not sampled: %s", watched.group, exc)
                if self.metrics is not None:
                    self.metrics.lag_samples.labels("failed").inc()
                continue
            out.extend(events_of(desc, at, correlation))
        return out

    def run_once(self) -> int:
        """Sample and publish one round; the number of events published."""
        events = self.sample()
        errors: list[str] = []

        def delivered(err: object, _msg: object) -> None:
            if err is not None:
                errors.append(str(err))

        for event in events:
            self._producer.produce(
                self.topic, key=event.group_id.encode(), value=self._codec.encode(event), on_delivery=delivered
            )
        left = self._producer.flush(self.flush_timeout_s)
        if left or errors:
            log.warning("lag samples not all acknowledged: %d pending, errors %s", left, errors[:3])
        if left:
            self._replace_producer()
        ok = len(events) - left - len(errors)
        if self.metrics is not None:
            self.metrics.lag_samples.labels("ok").inc(max(ok, 0))
            self.metrics.lag_samples.labels("failed").inc(len(events) - max(ok, 0))
            self.metrics.set_lags(
                [g.group for g in self.groups], {(e.group_id, e.topic, e.partition): e.lag for e in events}
            )
        self.rounds += 1
        self.published += max(ok, 0)
        return max(ok, 0)

    def _replace_producer(self) -> None:
        """Drop a producer that could not deliver within the flush timeout for a new one.

        Why: after a broker restart librdkafka can leave a partition without a leader for good
        (confluentinc/librdkafka#5430, "new leader-1 not found in cache"): its records wait
        forever and every later sample would queue behind them. This round's samples are
        purged unsent (the next round measures again); a new producer looks the leaders up anew.
        """
        self._producer.purge(in_queue=True, in_flight=False)
        self._producer.flush(1.0)
        self._producer = Producer(dict(self._conf))

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="lag-sampler", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception:  # the sampler must never take the read side down
                log.exception("lag sampling round failed")

    def close(self, timeout: float = 15.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self._producer.flush(5.0)
