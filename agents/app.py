"""The Faust application: one worker process hosts every agent; scale by adding workers.

Settings that matter and why:
- at-least-once processing (Faust's default) with idempotent folds: each fold remembers the
  last source offset it applied, so a redelivered event changes nothing;
- `concurrency=1` per agent: with more, Faust can commit an offset past an event still in
  flight, and a crash would then skip it;
- table store `memory://` by default: the only table today holds one small row per tenant,
  so restoring it from its compacted changelog takes a moment and needs no native
  dependency or per-worker data directory; set `LEDGERFLOW_AGENT_STORE=rocksdb://` (with
  faust's rocksdict extra) once tables outgrow memory.
"""

from __future__ import annotations

import logging
import os
import time

import faust

from agents.metrics import add_lag_sampler, add_metrics_page, metrics_of
from agents.transport import broker_url
from streams.admin import create_missing
from streams.codec import Codec
from streams.topics import Topics


def create_app(
    app_id: str,
    bootstrap: str,
    topics: Topics,
    *,
    data_dir: str = ".ledgerflow/agents",
    web_port: int = 6066,
    store: str | None = None,
) -> faust.App:
    app = faust.App(
        app_id,
        broker=broker_url(bootstrap),
        store=store or os.environ.get("LEDGERFLOW_AGENT_STORE", "memory://"),
        datadir=data_dir,
        web_port=web_port,
        web_host="127.0.0.1",
        topic_partitions=topics.partitions,
        topic_replication_factor=1,
        topic_allow_declare=True,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_commit_every=100,
        broker_commit_interval=1.0,
        # a worker that died is noticed in ~10 s (Faust's 60 s default would stall its
        # partitions for a minute after a crash before a surviving worker takes them)
        broker_session_timeout=10.0,
        broker_heartbeat_interval=3.0,
        # A group that rebalanced while the broker was coming back gets an assignment without
        # the topics its metadata lacked then ("Ignoring missing topic"), and aiokafka asks the
        # group to rejoin only when a metadata refresh shows them: at the 5 min default the
        # worker sat idle that long (seen in the chaos test). A refresh costs one small request.
        consumer_metadata_max_age_ms=15_000,
        stream_wait_empty=True,
        table_cleanup_interval=60.0,
        web_enabled=True,
    )
    from agents import anomalies, forecast, rollups, slo, totals  # agents register themselves on the app

    totals.register(app, topics, Codec())
    rollups.register(app, topics, Codec())  # issue 7: per-tenant, per-day, per-model savings
    anomalies.register(app, topics, Codec())  # issue 7: spikes in a tenant's hourly spend
    forecast.register(app, topics, Codec())  # issue 7: month-end spend forecast per monthly budget
    slo.register(app, topics, Codec())  # issue 11: error-budget burn-rate alerts per tenant
    add_producer_watchdog(app)
    # issue 11: Prometheus /metrics on this worker's web port, and the lag of the partitions it owns
    metrics = metrics_of(app)
    add_metrics_page(app, metrics)
    add_lag_sampler(app, metrics, metrics.trackers, {topics.name("token-charges")})
    return app


PRODUCER_STUCK_S = 60.0
log = logging.getLogger(__name__)


def add_producer_watchdog(app: faust.App, stuck_s: float = PRODUCER_STUCK_S, every_s: float = 2.0) -> None:
    """Exit the worker when its producer has made no room for `stuck_s`, so the supervisor
    restarts a clean one.

    Why: after a broker restart, aiokafka's producer can stay wedged for good (the chaos test
    saw "producer buffer full" for minutes): the agents, blocked on a full buffer, stop
    folding while the process looks alive. A full buffer that never once drops back to its
    limit in `stuck_s` is that state; a healthy producer drains it in milliseconds. Exiting is
    safe: folds are idempotent on source offsets and resume from the committed ones.
    """
    full_since: list[float] = []

    @app.timer(interval=every_s)
    async def producer_watchdog() -> None:
        buffer = app.producer.buffer
        if buffer.size <= buffer.max_messages:
            full_since.clear()
            return
        now = time.monotonic()
        if not full_since:
            full_since.append(now)
        elif now - full_since[0] >= stuck_s:
            log.error(
                "producer stuck for %.0fs with %d messages buffered; exiting so the supervisor restarts the worker",
                now - full_since[0],
                buffer.size,
            )
            os._exit(70)


def ensure_internal_topics(app: faust.App, bootstrap: str) -> list[str]:
    """Create the tables' changelog topics before the worker starts.

    Faust declares them itself, but on a broker without topic auto-creation its first
    metadata read can miss a topic it has just created, and the agent then crashes on a
    partition-count check. Creating them up front (compacted, co-partitioned with the
    source) removes the race.
    """
    wanted = []
    for table in app.tables.values():
        changelog = table.changelog_topic
        wanted.append(
            (changelog.get_topic_name(), table.partitions or app.conf.topic_partitions, {"cleanup.policy": "compact"})
        )
    return create_missing(bootstrap, wanted)
