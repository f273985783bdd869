"""Metrics through the real broker and real chDB.

1. The lag sampler: lag rows land in `consumer_lag` (through the sink, like any event), read
   > 0 while the measured group is behind and 0 once it caught up; a poison record bumps the
   sink's dead-letter counter.
2. The whole platform (`ledgerflow up`'s processes): after a short run that exercises every
   family (answers, a denial, a redaction, rate-limit rejections, a poison record, a DP grant,
   routing), `/metrics` of the gateway, the Faust worker, the ledger, dp-budget and
   routing-priors workers and the read side each show non-zero samples for every family the
   issue lists, lag gauges read 0 once caught up, and the read side's takes only the operator token.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import Producer
from prometheus_client.parser import text_string_to_metric_families

from ledgerflow import readside
from ledgerflow.cli import children, state_file, wait_ready
from ledgerflow.demo import probe, produce_poison
from ledgerflow.settings import DEMO_KEYS, load
from ledgerflow.supervisor import Supervisor
from projections.lag import LagSampler, WatchedGroup
from projections.metrics import ReadSideMetrics
from projections.sink import Sink
from streams.admin import ensure_topics
from streams.codec import Codec
from streams.ids import uuid7
from streams.topics import Topics
from tests import factories
from tests.platform import Platform, platform_env

pytestmark = pytest.mark.kafka
CODEC = Codec()
Samples = list[tuple[str, dict[str, str], float]]


def parse(text: str) -> Samples:
    return [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def total(samples: Samples, name: str, **match: str) -> float:
    return sum(v for n, lbl, v in samples if n == name and all(lbl.get(k) == m for k, m in match.items()))


def series(samples: Samples, name: str, **match: str) -> list[tuple[dict[str, str], float]]:
    return [(lbl, v) for n, lbl, v in samples if n == name and all(lbl.get(k) == m for k, m in match.items())]


def wait_for(predicate: Callable[[], bool], timeout: float = 90.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def produce_charges(bootstrap: str, topics: Topics, n: int) -> None:
    """n TokensCharged in transactions (markers on the log, as the gateway leaves them)."""
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"t-{uuid.uuid4().hex[:8]}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    for i in range(n):
        base = factories.charge(["acme", "globex", "initech"][i % 3])
        event = replace(base, envelope=replace(base.envelope, event_id=str(uuid7()), correlation_id=str(uuid7())))
        producer.produce(topics.name("token-charges"), key=event.tenant.encode(), value=CODEC.encode(event))
        if i % 5 == 4:
            producer.commit_transaction(30)
            producer.begin_transaction()
    producer.commit_transaction(30)


def count(store: Client, sql: str) -> int:
    return int(str(store.command(sql)))


def drive(sink: Sink, until: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        sink.poll_once(0.2)


def test_lag_rows_land_in_consumer_lag_and_drop_to_zero_and_poison_is_counted(
    kafka_bootstrap: str, topics: Topics, store: Client, new_sink: Callable[..., Sink]
) -> None:
    group = f"sink-{uuid.uuid4().hex[:8]}"
    metrics = ReadSideMetrics()
    sink = new_sink(group=group)
    sink.hooks = metrics
    charges = topics.name("token-charges")
    produce_charges(kafka_bootstrap, topics, 30)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(charges, key=b"acme", value=b'{"json": "where Avro belongs"}')
    producer.flush(10)
    drive(sink, lambda: count(store, "SELECT count() FROM tokens_charged") == 30, "30 charges")
    drive(sink, lambda: count(store, "SELECT count() FROM dead_letters") == 1, "the poison record")
    idle_until = time.monotonic() + 2.5  # the sink commits past the last transaction marker once idle
    drive(sink, lambda: time.monotonic() > idle_until, "idle commits")

    sampler = LagSampler(kafka_bootstrap, topics, [WatchedGroup(group, (charges,))], 0.0, metrics)
    try:
        produce_charges(kafka_bootstrap, topics, 12)  # the sink does not poll: its group falls behind
        assert sampler.run_once() > 0
        behind = metrics.lags()
        assert sum(lag for (g, t, _), lag in behind.items() if g == group and t == charges) == 12
        drive(sink, lambda: count(store, "SELECT count() FROM tokens_charged") == 42, "12 more charges")
        idle_until = time.monotonic() + 2.5
        drive(sink, lambda: time.monotonic() > idle_until, "idle commits")
        assert sampler.run_once() > 0
        assert sum(lag for (g, t, _), lag in metrics.lags().items() if g == group and t == charges) == 0
        drive(sink, lambda: count(store, "SELECT uniqExact(correlation_id) FROM consumer_lag") == 2, "both rounds")
    finally:
        sampler.close()

    rounds = store.query(
        "SELECT correlation_id, min(occurred_at) AS at, sum(lag), countIf(owner != ''), count(), "
        "groupUniqArray(group_id), groupUniqArray(topic), groupUniqArray(tenant) "
        "FROM consumer_lag GROUP BY correlation_id ORDER BY at"
    ).result_rows
    assert [r[2] for r in rounds] == [12, 0]  # behind, then caught up
    for _corr, _at, _lag, owned, n, groups, topics_seen, tenants in rounds:
        assert n == 3 and owned == 3  # one row per partition, each owned by the sink's member
        assert groups == [group] and topics_seen == [charges] and tenants == ["_platform"]
    cols = store.query(
        "SELECT name, type FROM system.columns WHERE database = currentDatabase() AND table = 'consumer_lag' "
        "AND name IN ('group_id', 'topic', 'partition', 'owner', 'committed', 'end_offset', 'lag') ORDER BY position"
    ).result_rows
    assert [tuple(c) for c in cols] == [
        ("group_id", "String"), ("topic", "String"), ("partition", "Int32"), ("owner", "String"),
        ("committed", "Int64"), ("end_offset", "Int64"), ("lag", "Int64"),
    ]  # fmt: skip

    got = parse(_exposition(metrics))
    assert total(got, "ledgerflow_sink_dead_letters_total", topic=charges) == 1
    assert total(got, "ledgerflow_sink_rows_total", table="tokens_charged") == 42
    assert total(got, "ledgerflow_sink_rows_total", table="consumer_lag") == 6
    assert total(got, "ledgerflow_sink_batch_rows_count") > 0 and total(got, "ledgerflow_sink_insert_seconds_count") > 0
    assert total(got, "ledgerflow_lag_samples_total", outcome="ok") == 6


def _exposition(metrics: ReadSideMetrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.registry).decode()


# --- the whole platform --------------------------------------------------------------------------


def free_block(n: int) -> int:
    """The first of n consecutive free loopback ports."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n > 65535:
            continue
        held = []
        try:
            for p in range(base, base + n):
                sock = socket.socket()
                held.append(sock)
                sock.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for sock in held:
                sock.close()
    raise RuntimeError("no block of free ports")


def scrape(url: str, token: str | None = None) -> Samples:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as resp:
        assert resp.status == 200
        return parse(resp.read().decode())


@pytest.fixture(scope="module")
def platform(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    """tests/platform.py's platform with metrics ports, a 1 s lag sampler, a low rate limit and routing on."""
    env = platform_env(kafka_bootstrap, tmp_path_factory.mktemp("metrics"))
    env.update(
        {
            "LEDGERFLOW_AGENT_METRICS_PORT": str(free_block(3)),
            "LEDGERFLOW_LAG_SAMPLE_INTERVAL_S": "1",
            "LEDGERFLOW_RATE_REQUESTS_PER_MIN": "40",
            "LEDGERFLOW_ROUTING_ENABLED": "1",
            "LEDGERFLOW_PUBLISH_TIMEOUT_S": "20",  # a loaded CI box must not turn the denial into a 503
        }
    )
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        settings = load()
        ensure_topics(settings.bootstrap, Topics(settings.topic_prefix, settings.partitions))
        sup = Supervisor(children(settings), state_file(settings))
        try:
            sup.start_all()
            wait_ready(sup)
            yield Platform(settings, sup)
        finally:
            sup.stop_all()


async def traffic(url: str) -> dict[int, int]:
    """Answers (some with an address to redact), a tool the policy denies, and a burst over the rate limit."""
    tenants = sorted(DEMO_KEYS)
    statuses: dict[int, int] = {}
    async with aiohttp.ClientSession() as session:

        async def post(path: str, tenant: str, body: dict[str, Any]) -> None:
            headers = {"Authorization": f"Bearer {DEMO_KEYS[tenant]}"}
            async with session.post(url + path, json=body, headers=headers) as resp:
                await resp.read()
                statuses[resp.status] = statuses.get(resp.status, 0) + 1

        # within each tenant's burst (7 at 40/min) however fast the box: the denials must not be 429s
        chat = {"model": "sim-small", "messages": [{"role": "user", "content": "run it"}]}
        chat["tools"] = [{"type": "function", "function": {"name": "code_exec"}}]
        await post("/v1/chat/completions", "acme", chat)
        others = [t for t in tenants if t != "acme"]  # acme keeps its burst for the probe after this
        for i in range(12):
            prompt = f"question {i}" + (" - reply to jane.doe@example.com" if i % 3 == 0 else "")
            await post("/v1/ask", others[i % len(others)], {"prompt": prompt, "model": "sim-small"})
        await asyncio.gather(*(post("/v1/ask", "globex", {"prompt": f"burst {i}"}) for i in range(45)))
    return statuses


@pytest.mark.slow
def test_every_family_is_non_zero_after_a_run_and_lag_reaches_zero(platform: Platform) -> None:
    from ledgerflow import dp as dp_cli

    settings = platform.settings
    produce_poison(settings)
    dp_cli.grant(settings, "acme", "usage", 1.0, 1e-6, "basic", "month", "metrics-test")
    statuses = asyncio.run(traffic(settings.gateway_url))
    assert statuses.get(403) == 1 and statuses.get(429, 0) > 0, statuses
    assert asyncio.run(probe(settings)) == (200, 403)  # what `ledgerflow demo` adds for these families
    answered = statuses[200] + 1
    wait_for(lambda: int(platform.scalar("SELECT count() FROM tokens_charged")) == answered, what="charges landed")
    wait_for(lambda: int(platform.scalar("SELECT count() FROM dead_letters")) >= 1, what="the poison dead letter")

    urls = {c.name: c.metrics for c in platform.supervisor.children}
    assert set(urls) >= {"gateway", "agents-0", "projections", "ledger", "dp-budget", "routing-priors"}
    assert all(urls.values()), urls

    gw = scrape(urls["gateway"])
    assert total(gw, "ledgerflow_gateway_request_seconds_count", route="/v1/ask", status="200") == answered
    assert series(gw, "ledgerflow_gateway_in_flight")
    assert total(gw, "ledgerflow_gateway_rate_limited_total", kind="requests") == statuses[429]
    assert total(gw, "ledgerflow_gateway_policy_denials_total", policy="tool-scope-required", tenant="acme") == 2
    assert total(gw, "ledgerflow_gateway_redactions_total", kind="email") == 5  # 4 asks + the probe

    token = readside.operator_token(settings)
    with pytest.raises(urllib.error.HTTPError) as refused:
        scrape(urls["projections"])
    assert refused.value.code == 401
    charges = platform.topics.name("token-charges")

    def read_side_caught_up() -> bool:
        rs = scrape(urls["projections"], token)
        return total(rs, "ledgerflow_sink_rows_total", table="tokens_charged") == answered

    wait_for(read_side_caught_up, what="the sink's counters")
    rs = scrape(urls["projections"], token)
    assert total(rs, "ledgerflow_sink_batch_rows_count") > 0
    assert total(rs, "ledgerflow_sink_insert_seconds_count") > 0
    assert total(rs, "ledgerflow_sink_dead_letters_total", topic=charges) == 1
    assert series(rs, "ledgerflow_sink_paused_partitions") and series(rs, "ledgerflow_sink_pending_rows")
    assert total(rs, "ledgerflow_read_request_seconds_count") > 0
    wait_for(  # the sampler's newest round names the sink's group once the group has committed offsets
        lambda: bool(
            series(scrape(urls["projections"], token), "ledgerflow_consumer_group_lag", group=settings.sink_group)
        ),
        what="the sink group's lag gauge",
    )

    workers = {
        "agents-0": ("tenant-totals", "event"),
        "ledger": ("audit-ledger", "batch"),
        "dp-budget": ("dp-budget", "batch"),
        "routing-priors": ("routing-priors", "batch"),
    }
    for child, (agent, unit) in workers.items():

        def handled(child: str = child, agent: str = agent) -> bool:
            return total(scrape(urls[child]), "ledgerflow_agent_events_total", agent=agent, outcome="ok") > 0

        wait_for(handled, what=f"{agent} counted events")
        got = scrape(urls[child])
        assert total(got, "ledgerflow_agent_processing_seconds_count", agent=agent, unit=unit) > 0, child
    totals = scrape(urls["agents-0"])
    assert total(totals, "ledgerflow_agent_events_total", agent="tenant-totals", outcome="dead_letter") == 1
    assert total(totals, "ledgerflow_agent_events_total", agent="tenant-totals") == answered + 1

    def lag_zero(child: str) -> bool:
        lags = series(scrape(urls[child]), "ledgerflow_agent_consumer_lag")
        return bool(lags) and all(v == 0 for _, v in lags)

    for child in workers:
        wait_for(lambda child=child: lag_zero(child), what=f"{child}'s lag gauge at 0")  # type: ignore[misc]
    assert {lbl["topic"] for lbl, _ in series(scrape(urls["agents-0"]), "ledgerflow_agent_consumer_lag")} == {charges}

    def newest_rounds_zero() -> bool:
        rows = platform.sql(
            "SELECT group_id, argMax(correlation_id, occurred_at) AS newest FROM consumer_lag GROUP BY group_id"
        )
        groups = {g for g, _ in rows}
        if not {settings.sink_group, settings.worker_id, f"{settings.worker_id}-ledger"} <= groups:
            return False
        sums = platform.sql(
            "SELECT group_id, sum(lag) FROM consumer_lag WHERE correlation_id IN "
            "(SELECT argMax(correlation_id, occurred_at) FROM consumer_lag GROUP BY group_id) GROUP BY group_id"
        )
        return all(int(s) == 0 for _, s in sums)

    wait_for(newest_rounds_zero, what="consumer_lag's newest rounds at 0 for every group")
    owned = dict(platform.sql("SELECT group_id, countIf(owner != '') FROM consumer_lag GROUP BY group_id"))
    assert int(owned[settings.sink_group]) > 0 and int(owned[settings.worker_id]) > 0
