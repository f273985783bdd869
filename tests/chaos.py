"""The chaos run (issue 10): the whole platform under SIGKILLs, a broker restart and a store outage.

Used by `tests/test_chaos_kafka.py` (a short run in CI) and `bench/chaos.py` (the full
100k-event run, on demand). Bounded in count and time, loopback only, stops by itself.

What it does, on its own broker (it is restarted, so never the shared test broker):
1. starts the processes `ledgerflow up` starts (sink, agent workers, ledger, gateway);
2. produces `requests` requests' facts (request, decision, charge, audit record) at a steady
   pace with an idempotent producer that rides out the broker restart;
3. meanwhile: cuts the sink off from ClickHouse once (`POST /faults/store-outage`), restarts
   the broker once, and every `kill_every_s` SIGKILLs a random consumer process (sink, agent
   worker, ledger), restarting it at once as the supervisor would;
4. afterwards waits for every count to converge, then checks: every fact table holds exactly
   one row per produced fact (0 lost, 0 doubled), the agents' totals equal the sum of the
   charges to the last digit, the ledger verifies from the log and from ClickHouse, and a
   replay of the log into a fresh database has the same per-table checksums as the live one.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import KafkaError

from infra.kafka.runner import KafkaConfig, start, stop
from ledgerflow import readside, replay
from ledgerflow.cli import children, query_text, state_file, wait_ready
from ledgerflow.settings import Settings, load
from ledgerflow.supervisor import Child, Supervisor
from streams.admin import ensure_topics
from streams.clients import Producer
from streams.codec import Codec
from streams.events import Event
from streams.topics import Topics
from tests import factories
from tests.platform import platform_env

FACT_TABLES = ("request_received", "policy_decided", "tokens_charged", "audit_recorded")
VICTIM_PREFIXES = ("projections", "agents", "ledger")


@dataclass(frozen=True)
class ChaosPlan:
    requests: int = 25_000  # four facts each: 100k events
    tenants: int = 5
    produce_s: float = 90.0  # production is spread over this long
    kill_every_s: float = 4.0
    outage_s: float = 30.0
    outage_at_s: float = 5.0
    broker_restart_at_s: float | None = 40.0
    converge_timeout_s: float = 600.0
    seed: int = 7


@dataclass
class ChaosReport:
    plan: ChaosPlan
    kills: Counter[str] = field(default_factory=Counter)
    broker_restarts: int = 0
    outage_refused_calls: int = 0
    produce_s: float = 0.0
    produce_errors: list[str] = field(default_factory=list)  # deliveries the broker never acknowledged
    producers_replaced: int = 0  # the harness's producer wedged (librdkafka#5430) and was replaced
    converge_s: float = 0.0
    rows: dict[str, int] = field(default_factory=dict)
    distinct: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    totals_disagree: list[str] = field(default_factory=list)
    ledger_verify_rc: int = -1
    ledger_verify_out: str = ""
    replay_check_rc: int = -1
    replay_check_out: str = ""
    nemesis_error: str | None = None

    @property
    def events(self) -> int:
        return self.plan.requests * len(FACT_TABLES)

    @property
    def lost(self) -> int:
        return sum(max(0, self.plan.requests - self.distinct.get(t, 0)) for t in FACT_TABLES)

    @property
    def doubled(self) -> int:
        return sum(self.rows.get(t, 0) - self.distinct.get(t, 0) for t in FACT_TABLES)

    @property
    def ok(self) -> bool:
        return (
            self.nemesis_error is None
            and not self.produce_errors
            and self.lost == 0
            and self.doubled == 0
            and self.dead_letters == 0
            and not self.totals_disagree
            and self.ledger_verify_rc == 0
            and self.replay_check_rc == 0
        )

    def render(self) -> str:
        p = self.plan
        killed = ", ".join(f"{k} {v}" for k, v in sorted(self.kills.items()))
        lines = [
            f"events produced:     {self.events:,} ({p.requests:,} requests x 4 facts, {p.tenants} tenants) "
            f"in {self.produce_s:.1f}s",
            f"delivery errors:     {len(self.produce_errors)} {self.produce_errors[:3]}"
            f" (producer replaced {self.producers_replaced}x)",
            f"SIGKILLs:            {sum(self.kills.values())} ({killed})",
            f"broker restarts:     {self.broker_restarts}"
            + (f" (fault injection failed: {self.nemesis_error})" if self.nemesis_error else ""),
            f"store outage:        {p.outage_s:.0f}s ({self.outage_refused_calls} store calls refused)",
            f"converged after:     {self.converge_s:.1f}s after the last event",
            f"rows per table:      {self.rows}",
            f"lost / doubled:      {self.lost} / {self.doubled}; dead letters {self.dead_letters}",
            f"totals vs charges:   {'equal for every tenant' if not self.totals_disagree else self.totals_disagree}",
            f"ledger verify:       exit {self.ledger_verify_rc}",
            f"replay --check:      exit {self.replay_check_rc}",
            f"verdict:             {'OK' if self.ok else 'FAILED'}",
        ]
        return "\n".join(lines)


@contextlib.contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def request_facts(i: int, tenant: str) -> list[Event]:
    """One request's four facts; costs vary so a wrong sum cannot pass by symmetry."""
    cost = (Decimal(i % 997) + 1) / Decimal(10**9)
    return [
        factories.request(tenant),
        factories.decision(tenant),
        factories.charge(tenant, str(cost)),
        factories.audit(tenant),
    ]


class Chaos:
    def __init__(
        self, plan: ChaosPlan, broker: KafkaConfig, settings: Settings, sup: Supervisor, log: Callable[[str], None]
    ):
        self.plan, self.broker, self.settings, self.sup, self.log = plan, broker, settings, sup, log
        self.rng = random.Random(plan.seed)
        self.topics = Topics(settings.topic_prefix, settings.partitions)
        self.report = ChaosReport(plan)
        self.done = threading.Event()
        self.outage_ends = 0.0
        self.outage_counted = False
        self.state = ""
        self.restarting = False
        self.nemesis_error: str | None = None

    # --- the faults ---------------------------------------------------------------------

    def cut_store(self) -> None:
        url = f"{self.settings.projections_url}/faults/store-outage?seconds={self.plan.outage_s}"
        req = urllib.request.Request(url, method="POST", headers=readside.auth_headers(self.settings))
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 202
        self.outage_ends = time.monotonic() + self.plan.outage_s
        self.log(f"store outage: {self.plan.outage_s:.0f}s")

    def kill(self, child: Child) -> None:
        """SIGKILL (no flush, no commit, maybe mid-transaction), then start again at once."""
        if child.proc is None or child.proc.poll() is not None:
            return
        child.proc.send_signal(signal.SIGKILL)
        child.proc.wait(10)
        self.report.kills[child.name] += 1
        child.start()
        self.log(f"SIGKILL {child.name}")

    def restart_broker(self) -> None:
        self.log("broker: stopping")
        self.restarting = True
        try:
            self._restart_broker()
        finally:
            self.restarting = False

    def _restart_broker(self) -> None:
        stop(self.broker)
        for attempt in range(5):  # its ports may take a moment to be free again
            try:
                start(self.broker)
                break
            except Exception as exc:
                self.log(f"broker: start attempt {attempt + 1} failed: {exc}")
                time.sleep(2.0)
        else:
            raise RuntimeError("the broker did not come back after 5 attempts")
        self.report.broker_restarts += 1
        self.log("broker: back")

    def victims(self) -> list[Child]:
        chosen = [c for c in self.sup.children if c.name.startswith(VICTIM_PREFIXES)]
        if not self.outage_counted:  # killing the sink would end the outage early (and lose its count)
            chosen = [c for c in chosen if c.name != "projections"]
        return chosen

    def nemesis(self, t0: float) -> None:
        try:
            self._nemesis(t0)
        except Exception as exc:  # a fault that cannot be injected must fail the run, loudly
            self.nemesis_error = f"{type(exc).__name__}: {exc}"
            self.log(f"nemesis failed: {self.nemesis_error}")

    def _nemesis(self, t0: float) -> None:
        outage_done = broker_done = False
        next_kill = t0 + self.plan.kill_every_s
        while not self.done.is_set():
            now = time.monotonic()
            if not outage_done and now - t0 >= self.plan.outage_at_s:
                self.cut_store()
                outage_done = True
            if outage_done and not self.outage_counted and now > self.outage_ends + 2:
                self.report.outage_refused_calls = outage_refused(self.settings)
                self.outage_counted = True
            at = self.plan.broker_restart_at_s
            if not broker_done and at is not None and now - t0 >= at:
                self.restart_broker()
                broker_done = True
            if now >= next_kill:
                victims = self.victims()
                if victims:
                    self.kill(self.rng.choice(victims))
                next_kill = now + self.plan.kill_every_s
            time.sleep(0.2)

    # --- the traffic --------------------------------------------------------------------

    def produce(self) -> None:
        codec = Codec()
        conf: dict[str, Any] = {
            "bootstrap.servers": self.settings.bootstrap,
            "enable.idempotence": True,  # retries across the broker restart never duplicate
            "acks": "all",
            "linger.ms": 20,
            "message.timeout.ms": 600_000,
            "reconnect.backoff.max.ms": 500,
        }
        producer = Producer(conf)
        errors = self.report.produce_errors
        unsent: list[tuple[str, bytes | None, bytes | None]] = []

        def delivered(err: Any, msg: Any) -> None:
            if err is None:
                return
            if err.code() == KafkaError._PURGE_QUEUE:  # purged before it was ever sent: send again
                unsent.append((msg.topic(), msg.key(), msg.value()))
            elif len(errors) < 20:
                errors.append(str(err))

        def send(topic: str, key: bytes | None, value: bytes | None) -> None:
            while True:
                try:
                    producer.produce(topic, key=key, value=value, on_delivery=delivered)
                    return
                except BufferError:  # local queue full while the broker is away
                    producer.poll(0.1)

        tenants = [f"chaos{t}" for t in range(self.plan.tenants)]
        started = time.monotonic()
        per_request_s = self.plan.produce_s / max(1, self.plan.requests)
        for i in range(self.plan.requests):
            for e in request_facts(i, tenants[i % len(tenants)]):
                send(self.topics.for_event(e.event_type), self.topics.key_for(e), codec.encode(e))
            producer.poll(0)
            ahead = started + (i + 1) * per_request_s - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        self.log(f"produced {self.plan.requests * len(FACT_TABLES):,} events; flushing")
        deadline = time.monotonic() + 300
        last_left, moved_at = len(producer), time.monotonic()
        while (left := producer.flush(5.0)) and time.monotonic() < deadline and self.nemesis_error is None:
            # in steps: a failed fault injection (the broker did not come back) ends the wait
            if left < last_left or self.restarting:  # the broker being away is not a wedge
                last_left, moved_at = left, time.monotonic()
            elif time.monotonic() - moved_at > 30:
                # librdkafka#5430: a leader=-1 metadata update during the broker restart can
                # leave a partition leaderless in this producer for good ("new leader-1 not
                # found in cache"). Its records were never sent: purge them and send them on
                # a new producer (no duplicate: only never-sent records are purged).
                self.log(f"producer: {left} records stuck for 30 s (librdkafka#5430); re-sending them")
                producer.purge(in_queue=True, in_flight=False)
                producer.flush(30.0)  # in-flight ones finish; purged ones report _PURGE_QUEUE
                producer = Producer(conf)
                self.report.producers_replaced += 1
                for record in unsent:
                    send(*record)
                unsent.clear()
                last_left, moved_at = len(producer), time.monotonic()
        if left:
            raise RuntimeError(f"{left} records not acknowledged ({self.nemesis_error or 'after 300 s'})")
        if errors:
            self.log(f"producer: deliveries failed, e.g. {errors[:3]}")
        self.report.produce_s = time.monotonic() - started

    # --- the checks ---------------------------------------------------------------------

    def scalar(self, sql: str) -> str:
        return query_text(self.settings, sql, "TabSeparated").strip()

    def converged(self) -> bool:
        n = self.plan.requests
        try:
            counts = [int(self.scalar(f"SELECT uniqExact(event_id) FROM {t}")) for t in FACT_TABLES]
            chained = int(self.scalar("SELECT uniqExact(tenant, seq) FROM ledger_entry_chained"))
        except Exception as exc:  # the sink may be restarting
            self.state = f"read side not answering: {exc}"
            return False
        disagree = self.totals_disagreeing()
        self.state = f"distinct facts {counts} (want {n}), chained {chained}, totals disagreeing {len(disagree)}"
        return counts == [n] * len(FACT_TABLES) and chained == n and not disagree

    def totals_disagreeing(self) -> list[str]:
        rows = query_text(
            self.settings,
            "SELECT c.tenant, toString(c.spent), toString(t.folded) FROM "
            "(SELECT tenant, sum(cost) AS spent FROM tokens_charged GROUP BY tenant) AS c LEFT JOIN "
            "(SELECT tenant, argMax(cost, requests) AS folded FROM tenant_totals_updated GROUP BY tenant) AS t "
            "ON t.tenant = c.tenant ORDER BY c.tenant",
            "TabSeparated",
        )
        bad = []
        for line in rows.splitlines():
            tenant, spent, folded = line.split("\t")
            if Decimal(spent) != Decimal(folded or "0"):
                bad.append(f"{tenant}: charges {spent} != totals {folded}")
        return bad

    def check(self) -> None:
        r = self.report
        for t in FACT_TABLES:
            r.rows[t] = int(self.scalar(f"SELECT count() FROM {t}"))
            r.distinct[t] = int(self.scalar(f"SELECT uniqExact(event_id) FROM {t}"))
        r.dead_letters = int(self.scalar("SELECT count() FROM dead_letters"))
        r.totals_disagree = self.totals_disagreeing()
        self.log("checks: audit verify")
        verify = subprocess.run(
            [sys.executable, "-m", "ledgerflow", "audit", "verify"],
            capture_output=True,
            text=True,
            env=dict(os.environ),
            timeout=300,  # 6k entries take seconds; the test's own timeout must not fire first
        )
        r.ledger_verify_rc, r.ledger_verify_out = verify.returncode, verify.stdout + verify.stderr
        self.log(f"checks: audit verify exit {verify.returncode}; replay")
        into = f"chaos_{uuid.uuid4().hex[:8]}"
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            replay.run(self.settings, into, out=out)
            self.log("checks: replay --check")
            r.replay_check_rc = replay.run_check(self.settings, query_text, into)
        r.replay_check_out = out.getvalue()


def run(
    plan: ChaosPlan,
    workdir: Path,
    cache: Path,
    ports: tuple[int, int, int, int, int],
    log: Callable[[str], None] = print,
) -> ChaosReport:
    """The whole chaos run on a broker of its own under `workdir`; returns the report."""
    kafka_port, controller_port, gateway_port, projections_port, worker_port = ports
    broker = KafkaConfig(home=workdir / "kafka", cache=cache, port=kafka_port, controller_port=controller_port)
    start(broker)
    try:
        env = platform_env(broker.bootstrap, workdir / "data")
        env.update(
            {
                "LEDGERFLOW_GATEWAY_PORT": str(gateway_port),
                "LEDGERFLOW_PROJECTIONS_PORT": str(projections_port),
                "LEDGERFLOW_WORKER_WEB_PORT": str(worker_port),
                "LEDGERFLOW_FAULT_INJECTION": "1",
                "LEDGERFLOW_LEDGER_CHECKPOINT_EVERY": "500",
            }
        )
        with patched_environ(env):
            settings = load()
            ensure_topics(settings.bootstrap, Topics(settings.topic_prefix, settings.partitions))
            sup = Supervisor(children(settings), state_file(settings))
            try:
                sup.start_all()
                wait_ready(sup)
                chaos = Chaos(plan, broker, settings, sup, log)
                t0 = time.monotonic()
                nemesis = threading.Thread(target=chaos.nemesis, args=(t0,), daemon=True)
                nemesis.start()
                try:
                    chaos.produce()
                finally:
                    chaos.done.set()
                    nemesis.join(120)
                    chaos.report.nemesis_error = chaos.nemesis_error
                if chaos.nemesis_error is not None:  # the run is void: no point checking it
                    return chaos.report
                converge_from = time.monotonic()
                deadline = converge_from + plan.converge_timeout_s
                last_log = 0.0
                while not chaos.converged():
                    if time.monotonic() > deadline:
                        log(f"did not converge in time ({chaos.state}); checking what there is")
                        log(f"read side status: {read_status(settings).get('sink')}")
                        break
                    if time.monotonic() - last_log > 10:
                        log(f"converging: {chaos.state}")
                        last_log = time.monotonic()
                    for c in sup.children:  # a victim that died on its own is restarted, as `up` would
                        if not c.alive:
                            c.start()
                    time.sleep(1.0)
                chaos.report.converge_s = time.monotonic() - converge_from
                log(f"converged ({chaos.state}); checks")
                chaos.check()
                return chaos.report
            finally:
                log("stopping the platform")
                sup.stop_all()
    finally:
        stop(broker)


def read_status(settings: Settings) -> dict[str, Any]:
    """The read side's /status ({} when it does not answer)."""
    req = urllib.request.Request(f"{settings.projections_url}/status", headers=readside.auth_headers(settings))
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return dict(orjson.loads(resp.read()))
    except OSError:
        return {}


def outage_refused(settings: Settings) -> int:
    """How many store calls the injected outage refused (0 if the sink restarted since)."""
    return int((read_status(settings).get("store_outage") or {}).get("refused_calls", 0))
