"""Two Faust workers in one consumer group against the real broker: they split the charges
topic's partitions, fold every charge exactly once into the totals, and keep folding after
partitions are added (with the documented restart, see docs/operations.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from streams.admin import GroupDescription, add_partitions, admin, describe_group
from streams.codec import Codec
from streams.events import TenantTotalsUpdated
from streams.topics import Topics
from tests import factories
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.kafka
CHARGE_TABLES = ("tenant-totals", "savings-rollups", "cost-anomalies")  # agents co-partitioned with the charges
HOLD_TABLES = ("spend-forecasts",)  # agents co-partitioned with the budget holds (issue 7)
SLO_TABLES = ("slo-burn",)  # agents co-partitioned with the request completions (issue 11)
CODEC = Codec()


class Workers:
    """N `python -m agents worker` processes sharing one app id (= consumer group)."""

    def __init__(self, bootstrap: str, topics: Topics, tmp: Path, group: str) -> None:
        self.bootstrap, self.topics, self.tmp, self.group = bootstrap, topics, tmp, group
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, n: int, partitions: int) -> None:
        for i in range(n):
            (self.tmp / "agents" / str(i)).mkdir(parents=True, exist_ok=True)  # Faust makes only the leaf
            env = dict(os.environ)
            env.update(
                {
                    "LEDGERFLOW_KAFKA_BOOTSTRAP": self.bootstrap,
                    "LEDGERFLOW_TOPIC_PREFIX": self.topics.prefix,
                    "LEDGERFLOW_PARTITIONS": str(partitions),
                    "LEDGERFLOW_WORKER_ID": self.group,
                    "LEDGERFLOW_WORKER_WEB_PORT": str(free_port()),
                    "LEDGERFLOW_DATA_DIR": str(self.tmp / "agents" / str(i)),  # own Faust datadir
                }
            )
            log = (self.tmp / f"worker-{i}.log").open("ab")
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "agents", "worker", "--loglevel", "warn"],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
            log.close()

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        self.procs.clear()

    def logs(self) -> str:
        return "\n".join(
            f"--- {f.name}\n{f.read_text(errors='replace')[-3000:]}" for f in self.tmp.glob("worker-*.log")
        )


@contextmanager
def workers(bootstrap: str, topics: Topics, tmp: Path) -> Iterator[Workers]:
    w = Workers(bootstrap, topics, tmp, f"agents-{uuid.uuid4().hex[:8]}")
    try:
        yield w
    finally:
        w.stop()


def wait_split(w: Workers, topic: str, partitions: int, timeout: float = 60.0) -> GroupDescription:
    """Until two members each own some of `topic`'s partitions and every partition is owned."""
    bootstrap, group = w.bootstrap, w.group
    deadline = time.monotonic() + timeout
    desc = None
    while time.monotonic() < deadline:
        assert all(p.poll() is None for p in w.procs), "a worker exited"
        try:
            desc = describe_group(bootstrap, group, [topic])
        except Exception:  # group not formed yet
            time.sleep(0.5)
            continue
        owned = [p for p in desc.partitions if p.member_id != "-"]
        if desc.members == 2 and len(owned) == partitions and len({p.member_id for p in owned}) == 2:
            return desc
        time.sleep(0.5)
    raise AssertionError(f"partitions of {topic} not split between two members in {timeout} s: {desc}")


class TotalsReader:
    """Follows the tenant-totals topic; keeps the latest (highest `requests`) update per tenant."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": f"reader-{uuid.uuid4().hex}",
                "auto.offset.reset": "earliest",
                "enable.auto.commit": False,
                "isolation.level": "read_committed",
            }
        )
        self.consumer.subscribe([topic])
        self.latest: dict[str, TenantTotalsUpdated] = {}

    def until(self, expected: dict[str, tuple[int, Decimal]], timeout: float) -> dict[str, tuple[int, Decimal]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.seen() != expected:
            for msg in self.consumer.consume(500, 0.2):
                if msg.error() is not None:
                    continue
                update = CODEC.decode(msg.value() or b"")
                assert isinstance(update, TenantTotalsUpdated)
                tenant = update.envelope.tenant
                if tenant not in self.latest or update.requests > self.latest[tenant].requests:
                    self.latest[tenant] = update
        return self.seen()

    def seen(self) -> dict[str, tuple[int, Decimal]]:
        return {t: (u.requests, u.cost) for t, u in self.latest.items()}

    def close(self) -> None:
        self.consumer.close()


def produce(bootstrap: str, topic: str, charges: list[tuple[str, int, str]]) -> None:
    """(tenant, partition, cost) charges; the partition is explicit so the test knows where each tenant lives."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
    for tenant, partition, cost in charges:
        producer.produce(
            topic, key=tenant.encode(), value=CODEC.encode(factories.charge(tenant, cost)), partition=partition
        )
    assert producer.flush(30) == 0


def expect(charges: list[tuple[str, int, str]]) -> dict[str, tuple[int, Decimal]]:
    out: dict[str, tuple[int, Decimal]] = {}
    for tenant, _, cost in charges:
        n, total = out.get(tenant, (0, Decimal(0)))
        out[tenant] = (n + 1, total + Decimal(cost))
    return out


def test_two_workers_split_partitions_then_fold_across_added_partitions(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    source = topics.name("token-charges")
    reader = TotalsReader(kafka_bootstrap, topics.name("tenant-totals"))
    tenants = [f"tenant-{i}" for i in range(6)]
    home = {t: i % topics.partitions for i, t in enumerate(tenants)}  # 2 tenants per partition
    with workers(kafka_bootstrap, topics, tmp_path) as w:
        try:
            # (a) two workers, one group: the three partitions are split, every charge folded once
            w.start(2, topics.partitions)
            desc = wait_split(w, source, topics.partitions)
            assert {p.partition for p in desc.partitions} == set(range(topics.partitions))
            batch1 = [(t, home[t], f"0.{k + 1:03d}000000001") for k in range(10) for t in tenants]
            produce(kafka_bootstrap, source, batch1)
            assert reader.until(expect(batch1), 60) == expect(batch1)

            # (b) add a partition to the charges topic and its co-partitioned changelog, restart
            # the workers with the new count (Faust checks source == changelog partitions and
            # only reads new partitions after a metadata refresh), then fold on old and new ones.
            # Every agent reading the charges keeps a co-partitioned table: all of them grow.
            changelogs = [f"{w.group}-{t}-state-changelog" for t in CHARGE_TABLES + HOLD_TABLES + SLO_TABLES]
            existing = admin(kafka_bootstrap).list_topics(timeout=10).topics
            assert all(c in existing for c in changelogs), sorted(t for t in existing if "changelog" in t)
            grown = topics.partitions + 1
            holds = topics.name("budget-holds")  # the forecast's source grows with its changelog
            completions = topics.name("request-completions")  # the slo-burn table's source, likewise
            add_partitions(
                kafka_bootstrap, {source: grown, holds: grown, completions: grown, **dict.fromkeys(changelogs, grown)}
            )
            w.stop()
            w.start(2, grown)
            desc = wait_split(w, source, grown)
            assert {p.partition for p in desc.partitions} == set(range(grown))
            newcomers = [f"new-{i}" for i in range(3)]
            batch2 = [(t, home[t], "0.5") for t in tenants] + [
                (t, grown - 1, "0.25") for t in newcomers for _ in range(4)
            ]
            produce(kafka_bootstrap, source, batch2)
            want = expect(batch1 + batch2)
            assert reader.until(want, 60) == want
            # the group commits every partition it read, the new one included: lag reaches 0
            deadline = time.monotonic() + 20
            while True:
                rows = describe_group(kafka_bootstrap, w.group, [source]).partitions
                if len(rows) == grown and all(p.committed >= 0 and p.lag == 0 for p in rows):
                    break
                assert time.monotonic() < deadline, f"lag not 0 after 20 s: {rows}"
                time.sleep(0.5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{w.logs()}") from None
        finally:
            reader.close()


def test_supervisor_resizes_pool_from_control_file(tmp_path: Path) -> None:
    """The `scale` control file grows the pool with new numbers and shrinks it from the top."""
    from ledgerflow.supervisor import Child, Pool, Supervisor, read_state, write_scale

    def make(i: int) -> Child:
        argv = [sys.executable, "-c", "import time; time.sleep(120)"]
        return Child(f"agents-{i}", argv, tmp_path / f"agents-{i}.log", dict(os.environ))

    control = tmp_path / "scale.json"
    gateway = Child("gateway", [sys.executable, "-c", "import time; time.sleep(120)"], tmp_path / "g.log", {})
    sup = Supervisor(
        [make(0), gateway], tmp_path / "up.json", pools=[Pool("agents", "workers", make, 1)], control_file=control
    )
    sup.init_pools()
    try:
        sup.start_all()
        assert [c.name for c in sup.children] == ["agents-0", "gateway"]
        write_scale(control, "workers", 3)
        assert sup.apply_scale()
        assert [c.name for c in sup.children] == ["agents-0", "agents-1", "agents-2", "gateway"]
        assert all(c.alive for c in sup.children)
        first = sup.children[0].proc
        write_scale(control, "workers", 1)
        assert sup.apply_scale() and not sup.apply_scale()
        assert [c.name for c in sup.children] == ["agents-0", "gateway"] and sup.children[0].proc is first
        state = read_state(tmp_path / "up.json")
        assert state is not None and [c["name"] for c in state["children"]] == ["agents-0", "gateway"]
    finally:
        sup.stop_all()
    assert not control.exists()
