"""Daily savings rollups (issue 7, part 4): the pure fold, the agent, and the three-way reconciliation.

Reconciliation, through the real broker, the real Faust worker (SIGKILLed and restarted
mid-run) and chDB: the agent's rollup (newest SavingsSnapshotted per tenant, day, model) =
the SQL rollup over raw charges (the `charges_daily` materialized view) = the projection of
the snapshots (`savings_daily`) = the sums of the charges produced, exactly. CI runs a short
version; `bench/bench_accounting_rollups.py` runs the 100k-charge one on demand.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from domain.pricing import DEFAULT_PRICES, cost, savings
from domain.rollups import DailyTotals, day_of, fold, key_of
from streams.codec import Codec
from streams.events import Envelope, SavingsSnapshotted, TokensCharged
from streams.ids import uuid7
from streams.topics import Topics
from tests import factories
from tests.conftest import REPO, free_port

CODEC = Codec()
Key = tuple[str, date, str]
Totals = tuple[int, int, int, Decimal, Decimal, Decimal]  # requests, prompt, completion, cost, baseline, savings


# --- the fold -------------------------------------------------------------------------------------


def test_fold_totals_per_tenant_day_and_model_and_skips_redelivery() -> None:
    a = factories.charge("acme", cost="0.000123450000")
    state, out = fold(None, a, 2, 10)
    assert out is not None and (out.requests, out.cost, out.savings) == (1, a.cost, a.savings)
    assert out.day_start == day_of(a.envelope.occurred_at) and out.envelope.causation_id == a.envelope.event_id
    again, none = fold(state, a, 2, 10)
    assert none is None and again == state  # redelivered: nothing changes
    old = replace(factories.charge("acme", cost="0.5"), baseline_model=None, baseline_cost=None, savings=None)
    state, out = fold(state, old, 2, 11)  # a charge from before baselines: its cost is its baseline
    assert out is not None and out.requests == 2
    assert (out.cost, out.baseline_cost, out.savings) == (
        a.cost + Decimal("0.5"),
        a.baseline_cost + Decimal("0.5"),  # type: ignore[operator]
        a.savings,
    )
    assert DailyTotals.from_json(state.to_json()) == state
    with pytest.raises(ValueError):
        fold(state, replace(a, currency="EUR"), 2, 12)


def test_key_is_the_utc_day_of_the_charge() -> None:
    c = factories.charge("acme")
    late = replace(c, envelope=replace(c.envelope, occurred_at=datetime(2026, 11, 29, 23, 59, 59, tzinfo=UTC)))
    assert key_of(late) == "acme|2026-11-29|sim-small"


# --- the reconciliation harness (shared with bench/bench_accounting_rollups.py) --------------------


@dataclass
class Workload:
    charges: list[TokensCharged] = field(default_factory=list)

    def expected(self) -> dict[Key, Totals]:
        out: dict[Key, list[Any]] = {}
        for c in self.charges:
            k = (c.tenant, c.envelope.occurred_at.date(), c.model)
            t = out.setdefault(k, [0, 0, 0, Decimal(0), Decimal(0), Decimal(0)])
            t[0] += 1
            t[1] += c.prompt_tokens
            t[2] += c.completion_tokens
            t[3] += c.cost
            t[4] += c.baseline_cost if c.baseline_cost is not None else c.cost
            t[5] += c.savings if c.savings is not None else Decimal(0)
        return {k: (v[0], v[1], v[2], v[3], v[4], v[5]) for k, v in out.items()}


def make_workload(n: int, seed: int = 7, tenants: int = 5) -> Workload:
    """`n` charges over `tenants` tenants, both models, three UTC days (some at 23:59:59.999999),
    a quarter recorded before baselines (no baseline fields); deterministic for a seed."""
    rnd = random.Random(seed)
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    w = Workload()
    for i in range(n):
        tenant = f"t{i % tenants}"
        price = DEFAULT_PRICES[rnd.choice(["sim-small", "sim-large"])]
        day = today - timedelta(days=rnd.randrange(3))
        at = (
            day + timedelta(microseconds=rnd.randrange(86_400_000_000))
            if i % 50
            else day + timedelta(days=1, microseconds=-1)
        )
        prompt, completion = rnd.randrange(1, 4000), rnd.randrange(1, 2000)
        spent = cost(prompt, completion, price)
        saved = savings(prompt, completion, spent, DEFAULT_PRICES["sim-large"]) if i % 4 else None
        rid = str(uuid7())
        env = Envelope(
            event_id=str(uuid7()), event_type="TokensCharged", schema_version=1, tenant=tenant, occurred_at=at,
            correlation_id=rid, producer="bench",
        )  # fmt: skip
        w.charges.append(
            TokensCharged(
                envelope=env,
                request_id=rid,
                model=price.model,
                prompt_tokens=prompt,
                completion_tokens=completion,
                input_price_per_mtok=price.input_per_mtok,
                output_price_per_mtok=price.output_per_mtok,
                price_list_version=price.version,
                currency=price.currency,
                cost=spent,
                baseline_model=saved.baseline_model if saved else None,
                baseline_cost=saved.baseline_cost if saved else None,
                savings=saved.savings if saved else None,
            )
        )
    return w


def produce(bootstrap: str, topics: Topics, charges: list[TokensCharged], batch: int = 2000) -> None:
    """The charges in transactions of `batch`, keyed by tenant (as the gateway does)."""
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"acc-{uuid.uuid4().hex}", "linger.ms": 5})
    producer.init_transactions(30)
    topic = topics.name("token-charges")
    for i in range(0, len(charges), batch):
        producer.begin_transaction()
        for c in charges[i : i + batch]:
            producer.produce(topic, key=c.tenant.encode(), value=CODEC.encode(c))
        producer.commit_transaction(60)


class Worker:
    """The agent worker process (`python -m agents worker`), restartable, killable with SIGKILL."""

    def __init__(self, bootstrap: str, topics: Topics, data_dir: Path) -> None:
        self.env = dict(os.environ)
        self.env.update(
            {
                "LEDGERFLOW_KAFKA_BOOTSTRAP": bootstrap,
                "LEDGERFLOW_TOPIC_PREFIX": topics.prefix,
                "LEDGERFLOW_PARTITIONS": str(topics.partitions),
                "LEDGERFLOW_WORKER_ID": f"agents-{uuid.uuid4().hex[:8]}",
                "LEDGERFLOW_WORKER_WEB_PORT": str(free_port()),
                "LEDGERFLOW_DATA_DIR": str(data_dir),
            }
        )
        self.log = data_dir / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agents", "worker", "--loglevel", "warn"],
                cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def kill(self) -> None:
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


class SnapshotReader:
    """Follows the savings-snapshots topic; the newest snapshot per key (by source offset) is the agent's rollup."""

    def __init__(self, bootstrap: str, topics: Topics) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"snap-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        topic = topics.name("savings-snapshots")
        self.consumer.assign([TopicPartition(topic, p, 0) for p in range(topics.partitions)])
        self.newest: dict[Key, SavingsSnapshotted] = {}
        self.read = 0

    def poll(self, seconds: float = 0.5) -> int:
        """Read for up to `seconds`; the number of snapshots read so far."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            msgs = self.consumer.consume(5000, 0.2)
            for m in msgs:
                if m.error() is not None:
                    continue
                s = CODEC.decode(m.value())
                assert isinstance(s, SavingsSnapshotted)
                self.read += 1
                k = (s.tenant, s.day_start.date(), s.model)
                old = self.newest.get(k)
                if old is None or s.source_offset > old.source_offset:
                    self.newest[k] = s
        return self.read

    def rollup(self) -> dict[Key, Totals]:
        return {
            k: (s.requests, s.prompt_tokens, s.completion_tokens, s.cost, s.baseline_cost, s.savings)
            for k, s in self.newest.items()
        }

    def close(self) -> None:
        self.consumer.close()


def sql_rollup(store: Any, table: str) -> dict[Key, Totals]:
    rows = store.query(
        f"SELECT tenant, day, model, sum(requests), sum(prompt_tokens), sum(completion_tokens), sum(cost), "
        f"sum(baseline_cost), sum(savings) FROM {table} GROUP BY tenant, day, model"
    ).result_rows
    return {(r[0], r[1], r[2]): (int(r[3]), int(r[4]), int(r[5]), r[6], r[7], r[8]) for r in rows}


def raw_rollup(store: Any) -> dict[Key, Totals]:
    rows = store.query(
        "SELECT tenant, toDate(occurred_at, 'UTC') AS day, model, count(), sum(prompt_tokens), "
        "sum(completion_tokens), sum(cost), sum(ifNull(baseline_cost, cost)), "
        "sum(ifNull(savings, toDecimal128(0, 12))) FROM tokens_charged GROUP BY tenant, day, model"
    ).result_rows
    return {(r[0], r[1], r[2]): (int(r[3]), int(r[4]), int(r[5]), r[6], r[7], r[8]) for r in rows}


def wait_for(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            tail = log.read_text()[-3000:] if log is not None and log.exists() else ""
            raise AssertionError(f"{what}: not reached in {timeout:.0f} s\n{tail}")
        time.sleep(0.05)


def reconcile(
    bootstrap: str, topics: Topics, store: Any, make_sink: Callable[[], Any], data_dir: Path, n: int, kills: int,
    timeout: float = 300.0,
) -> dict[str, float]:  # fmt: skip
    """Produce `n` charges, fold them with a worker SIGKILLed `kills` times mid-run, sink everything, and
    assert the four rollups equal each other exactly; returns timings for the benchmark."""
    work = make_workload(n)
    expected = work.expected()
    started = time.monotonic()
    produce(bootstrap, topics, work.charges)
    produced = time.monotonic()
    worker = Worker(bootstrap, topics, data_dir)
    reader = SnapshotReader(bootstrap, topics)
    try:
        worker.start()
        for k in range(kills):  # kill once a share of the snapshots has appeared, restart at once
            goal = n * (k + 1) // (kills + 1)
            wait_for(lambda g=goal: reader.poll() >= g, timeout, "snapshots before a kill", worker.log)  # type: ignore[misc]
            worker.kill()
            worker.start()
        wait_for(
            lambda: reader.poll() >= 0 and reader.rollup() == expected, timeout, "agent rollup = charges", worker.log
        )
        folded = time.monotonic()
    finally:
        worker.stop()
        reader.close()
    sink = make_sink()
    wanted = {"tokens_charged": n}

    def landed() -> bool:
        sink.run_once()
        got = store.query("SELECT count() FROM tokens_charged").result_rows[0][0]
        return bool(got >= wanted["tokens_charged"] and sql_rollup(store, "savings_daily") == expected)

    wait_for(landed, timeout, "charges and snapshots in ClickHouse")
    sunk = time.monotonic()
    assert raw_rollup(store) == expected
    assert sql_rollup(store, "charges_daily") == expected
    assert sql_rollup(store, "savings_daily") == expected
    assert reader.rollup() == expected
    total = sum((c.cost for c in work.charges), Decimal(0))
    assert store.query("SELECT sum(cost) FROM charges_daily").result_rows[0][0] == total
    return {"produce_s": produced - started, "fold_s": folded - produced, "sink_s": sunk - folded}


@pytest.mark.kafka
def test_agent_rollup_equals_sql_rollup_equals_sum_of_charges_after_a_worker_kill(
    kafka_bootstrap: str, topics: Topics, store: Any, new_sink: Callable[..., Any], tmp_path: Path
) -> None:
    reconcile(kafka_bootstrap, topics, store, lambda: new_sink(batch_max=2000), tmp_path, n=600, kills=1)
