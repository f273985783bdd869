"""Poison never stops a consumer: random and mutated payloads through the codec, the sink and the agent.

Expected outcomes come from the codec itself (a mutated payload can still be a valid event:
then it must land, not be dead-lettered). What is checked is that nothing crashes, every
invalid record is dead-lettered with a reason, and no valid record is lost or doubled.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from projections.sink import Sink
from streams.codec import Codec, PoisonEvent
from streams.events import Event, TokensCharged
from streams.topics import Topics
from tests import factories
from tests.conftest import REPO, free_port
from tests.kafka_helpers import read_all
from tests.test_projections_sink import produce, run_until

CODEC = Codec()
GOOD = [CODEC.encode(make()) for make in (factories.charge, factories.request, factories.decision, factories.audit)]


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One random corruption of a valid encoding: flip, truncate, extend, splice or re-header."""
    b = bytearray(data)
    match rng.randrange(6):
        case 0:
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        case 1:
            del b[rng.randrange(len(b)) :]
        case 2:
            b += rng.randbytes(rng.randint(1, 20))
        case 3:
            i = rng.randrange(10, len(b))
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        case 4:
            b[2:10] = rng.randbytes(8)
        case _:
            b = bytearray(rng.randbytes(rng.randint(0, 300)))
    return bytes(b)


@settings(max_examples=10_000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.binary(max_size=400),
        st.tuples(st.sampled_from(GOOD), st.integers(0, 2**32)).map(lambda t: mutate(random.Random(t[1]), t[0])),
        st.sampled_from(GOOD).map(lambda g: g[:2] + g[2:10] + g[10:]),
    )
)
def test_decode_returns_an_event_or_raises_poison_never_anything_else(payload: bytes) -> None:
    try:
        event = CODEC.decode(payload)
    except PoisonEvent as exc:
        assert exc.reason
        return
    assert isinstance(event, Event) and event.tenant.strip()
    assert CODEC.decode(CODEC.encode(event)) == event


def classify(payloads: list[bytes]) -> tuple[list[bytes], list[Event]]:
    bad, good = [], []
    for p in payloads:
        try:
            good.append(CODEC.decode(p))
        except PoisonEvent:
            bad.append(p)
    return bad, good


@pytest.mark.kafka
def test_ten_thousand_poison_records_through_the_sink_and_the_agent(
    kafka_bootstrap: str,
    topics: Topics,
    store: Client,
    new_sink: Callable[..., Sink],
    tmp_path: Path,
) -> None:
    rng = random.Random(20261128)
    records: list[tuple[str, bytes | None, bytes | None]] = []
    expected_dead: dict[str, int] = {}
    expected_rows: dict[str, int] = {}
    folded: dict[str, int] = {}  # valid USD charges per tenant: what the agent folds
    refused = 0  # valid charges the fold refuses (a currency change): dead-lettered by the agent only
    currency_of: dict[str, str] = {}  # tenant -> the currency its totals are kept in
    total_poison = 0
    for block in range(210):  # blocks of poison with valid neighbours on both sides
        make = (factories.charge, factories.request, factories.decision, factories.audit)[block % 4]
        topic = topics.for_event(make().event_type)
        payloads = [mutate(rng, CODEC.encode(make())) for _ in range(51)]
        bad, good = classify(payloads)
        neighbours = [CODEC.encode(make()) for _ in range(3)]
        for v in [neighbours[0], *payloads[:25], neighbours[1], *payloads[25:], neighbours[2]]:
            records.append((topic, b"acme", v))
        table = {
            "token-charges": "tokens_charged",
            "requests": "request_received",
            "policy-decisions": "policy_decided",
            "audit": "audit_recorded",
        }[topic.removeprefix(topics.prefix)]
        expected_dead[topic] = expected_dead.get(topic, 0) + len(bad)
        # A valid-looking mutant of another type on this topic is dead-lettered as wrong-topic.
        on_topic = [e for e in good if topics.for_event(e.event_type) == topic]
        expected_dead[topic] += len(good) - len(on_topic)
        expected_rows[table] = expected_rows.get(table, 0) + 3 + len(on_topic)
        if topic == topics.name("token-charges"):
            # What the agent's fold does, in log order: a tenant's first charge sets its
            # currency, a later charge in another currency is refused. A mutated tenant name
            # is a new tenant, so its first charge is folded whatever its currency.
            for v in [neighbours[0], *payloads[:25], neighbours[1], *payloads[25:], neighbours[2]]:
                try:
                    e = CODEC.decode(v)
                except PoisonEvent:
                    continue
                if not isinstance(e, TokensCharged):
                    continue
                if currency_of.setdefault(e.tenant, e.currency) == e.currency:
                    folded[e.tenant] = folded.get(e.tenant, 0) + 1
                else:
                    refused += 1
        total_poison += len(bad)
    assert total_poison >= 10_000
    produce(kafka_bootstrap, records)

    sink = new_sink(batch_max=1000, batch_ms=50)
    dead_total = sum(expected_dead.values())
    run_until(sink, lambda: store.query("SELECT count() FROM dead_letters").result_rows[0][0] == dead_total, 180)
    for table, n in expected_rows.items():
        assert store.query(f"SELECT count() FROM {table}").result_rows[0][0] == n, table
    reasons = {r[0] for r in store.query("SELECT DISTINCT reason FROM dead_letters").result_rows}
    assert "" not in reasons and reasons <= {
        "not-single-object-encoding", "unknown-fingerprint", "undecodable-body", "trailing-bytes",
        "missing-tenant", "malformed-id", "insane-time", "type-mismatch", "wrong-topic", "schema-mismatch",
    }  # fmt: skip

    # The agent reads the charges topic: same poison, same outcome, and it keeps folding.
    env = dict(os.environ)
    env.update({
        "LEDGERFLOW_KAFKA_BOOTSTRAP": kafka_bootstrap, "LEDGERFLOW_TOPIC_PREFIX": topics.prefix,
        "LEDGERFLOW_PARTITIONS": str(topics.partitions), "LEDGERFLOW_WORKER_ID": f"fuzz-{uuid.uuid4().hex[:8]}",
        "LEDGERFLOW_WORKER_WEB_PORT": str(free_port()), "LEDGERFLOW_DATA_DIR": str(tmp_path),
    })  # fmt: skip
    with (tmp_path / "worker.log").open("wb") as log:
        worker = subprocess.Popen([sys.executable, "-m", "agents", "worker", "--loglevel", "warn"],
                                  cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
        try:
            totals = read_all(kafka_bootstrap, [topics.name("tenant-totals")], expect=sum(folded.values()), timeout=120)
            charge_dlq = topics.dlq(topics.name("token-charges"))
            sink_dead = expected_dead[topics.name("token-charges")]
            dlq = read_all(kafka_bootstrap, [charge_dlq], expect=2 * sink_dead + refused, timeout=180)
        finally:
            worker.terminate()
            worker.wait(30)
    assert worker.returncode == 0 or worker.returncode == -15, (tmp_path / "worker.log").read_text()[-2000:]
    by_consumer: dict[bytes, int] = {}
    for m in dlq:
        consumer = dict(m.headers() or [])["lf.dlq.consumer"]
        by_consumer[consumer] = by_consumer.get(consumer, 0) + 1
    assert by_consumer[b"tenant-totals"] == sink_dead + refused
    final: dict[str, int] = {}
    for m in totals:
        update = CODEC.decode(m.value())
        final[update.tenant] = max(final.get(update.tenant, 0), update.requests)  # type: ignore[attr-defined]
    assert final == folded
