"""The audit ledger through the real broker: one LedgerWorker's chaining rate, `audit verify`
from the log, and an inclusion proof (issue 6, Performance).

Run: .venv/bin/python bench/bench_ledger_kafka.py [--entries 100000] [--bootstrap 127.0.0.1:19192]
     [--batch-max 500,2000,5000] [--rounds 2] [--tenants 5] [--checkpoint-every 1000]
     [--profile-entries 30000] [--chain-only] [--paths native,python]
Each run of the defaults takes ~2.5 min on a 2-core VM (1 GiB RSS); 250k entries with
`--batch-max 2000 --rounds 1 --profile-entries 0` about the same (2.3 GiB).

Needs a running broker; creates its own topics under a unique prefix (`bench-ledger-<hex>-`)
and deletes them, and its consumer groups, at the end (also on Ctrl-C or failure).

1. Pre-produce `--entries` AuditRecorded across `--tenants` tenants (tenant i always on
   partition i % 3, the single writer per chain) with a fast NON-transactional idempotent
   producer (acks=all, linger 20 ms): they are visible to the worker's read_committed
   consumer at once. The encoded records are produced once per batch_max and round, each into
   its own set of topics, so every configuration chains the same N records from offset 0.
2. For each batch_max and fold (`--paths`: `native`, the C fold `domain._ledger_native`, the
   worker's default when built; `python`, the record-by-record fold `LEDGERFLOW_NATIVE=0`
   runs; `native,python` measures both side by side on the same broker and records),
   `--rounds` times in alternating order (ABC CBA ...): one
   `agents.ledger.LedgerWorker` (transactional consume-transform-produce, checkpoint every
   `--checkpoint-every` entries, Ed25519-signed) runs in this process's main thread; the rate
   is its steady state, from its first commit (group join and head rebuild behind; a batch
   already chained then, its commit in flight, counts as before the window) to the commit of
   the transaction holding the last entry. Reported too: CPU of the worker thread and of the
   whole process (librdkafka's threads included), and the worker thread's wall time inside
   consume, produce, begin_transaction and waiting for a commit (the worker's client objects
   are wrapped); the rest is the fold's Python. send_offsets + commit run on the worker's
   helper thread, overlapping the next batch (their wall time is reported apart). With both
   folds: the native/Python ratios of entries/s and CPU per entry, round by round. Then the
   fold's pure stages (decode, chain, checkpoint, encode) timed record by record without
   Kafka or a profiler, and the C fold over the same records (`ChainBatch.run` + signing).
3. cProfile of one more worker over `--profile-entries` (the default batch_max), its main
   thread's time split into consume, decode, chain fold, checkpoint signing, encode, produce
   and the transaction calls; the top functions by own time are printed. (cProfile sees one
   thread: the commits on the helper thread are not in it.)
4. `audit verify` from the log on the default-batch_max topics: raw read (`read_to_end` of the
   audit, ledger and checkpoint topics), then `ledgerflow.audit.from_log` (read + decode +
   group), then `ledgerflow.audit.verify` (every entry hash, link, audit record re-hashed,
   every checkpoint signature and root); also decode alone over the raw records, from_log
   with the cyclic GC off, from_log for one tenant (what `audit prove` reads), and
   `verify_log(jobs=2)` (the partitions read and verified in 2 processes).
5. The worker's head rebuild on assignment (`LedgerWorker._rebuild`, every partition), i.e.
   what a restart or rebalance costs before the first new entry.
6. `ledgerflow.audit.prove` at the largest chain's newest checkpoint (its last entry when the
   chain size is a multiple of --checkpoint-every), split into tree build and path; a second
   proof of the same chain (its tree kept); the proof file's offline check.

For the old and new code side by side on the same records, see bench/bench_ledger_ab.py.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import os
import platform
import pstats
import resource
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from agents.ledger import LedgerConfig, LedgerWorker, native_chainer
from domain.checkpoint import SigningKey, generate_key
from domain.ledger import ChainHead, check_proof_file, tree_of
from domain.ledger_replay import collapse_redeliveries
from ledgerflow import audit
from ledgerflow.settings import load
from streams.admin import create_missing, read_to_end
from streams.codec import Codec
from streams.events import AuditRecorded, Envelope
from streams.ids import derived_uuid7
from streams.topics import Topics

PARTITIONS = 3
ACTIONS = ["request.completed", "policy.decided", "tokens.charged", "key.issued", "policy.published"]
GOAL_CHAIN = 20_000.0  # entries/s per worker
GOAL_VERIFY_1M = 10.0  # seconds
GOAL_PROOF = 1e-3  # seconds


def audits(n: int, tenants: Sequence[str]) -> list[AuditRecorded]:
    """n distinct, realistic audit records, round-robin over tenants, event times 50 µs apart."""
    base = "01930000-0000-7000-8000-000000000000"
    t0 = datetime.now(UTC) - timedelta(seconds=60)
    out = []
    for i in range(n):
        rid = str(derived_uuid7(base, str(i)))
        out.append(
            AuditRecorded(
                envelope=Envelope(
                    event_id=str(derived_uuid7(rid, "AuditRecorded")),
                    event_type="AuditRecorded",
                    schema_version=1,
                    tenant=tenants[i % len(tenants)],
                    occurred_at=t0 + timedelta(microseconds=i * 50 + 1),
                    correlation_id=rid,
                    causation_id=str(derived_uuid7(rid, "TokensCharged")),
                    trace_parent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    producer="gateway",
                ),
                action=ACTIONS[i % len(ACTIONS)],
                actor=f"key_{i * 7919 % 500:04d}",
                subject=rid,
                outcome="success" if i % 33 else "denied",
                details={"model": "sim-small", "cost": f"0.{i * 104729 % 10**9:09d}", "tokens": str(i * 31 % 9999)},
            )
        )
    return out


def encode_audits(codec: Codec, n: int, tenants: Sequence[str]) -> list[tuple[bytes, bytes, int]]:
    """(key, value, partition) of n audit records; tenant i is always on partition i % 3."""
    part_of = {t: i % PARTITIONS for i, t in enumerate(tenants)}
    return [(r.tenant.encode(), codec.encode(r), part_of[r.tenant]) for r in audits(n, tenants)]


def stage_costs(
    codec: Codec, values: Sequence[bytes], key: SigningKey, every_n: int, rounds: int = 3
) -> dict[str, float]:
    """Seconds per record of the worker's pure stages as `_chain` runs them, record by record
    (nothing kept, like the worker), unprofiled, no Kafka; the best of `rounds` per stage."""
    best: dict[str, float] = {}
    clock = time.perf_counter
    for _ in range(rounds):
        gc.collect()
        spent = {"decode": 0.0, "chain": 0.0, "checkpoint": 0.0, "encode": 0.0}
        heads: dict[str, ChainHead] = {}
        for offset, value in enumerate(values):
            t0 = clock()
            rec = codec.decode(value)
            t1 = clock()
            assert isinstance(rec, AuditRecorded)
            head = heads.get(rec.tenant)
            if head is None:
                head = heads[rec.tenant] = ChainHead(rec.tenant)
            entry = head.append(rec, 0, offset)
            t2 = clock()
            assert entry is not None
            codec.encode(entry)
            t3 = clock()
            if head.due(rec.envelope.occurred_at, every_n, 3600.0):
                codec.encode(head.checkpoint(key, f"ledgerflow.bench/{head.tenant}"))
            t4 = clock()
            spent["decode"] += t1 - t0
            spent["chain"] += t2 - t1
            spent["encode"] += t3 - t2
            spent["checkpoint"] += t4 - t3
        for k, v in spent.items():
            best[k] = min(best.get(k, v), v / len(values))
    return best


def native_stage_cost(values: Sequence[bytes], key: SigningKey, every_n: int, rounds: int = 3) -> float | None:
    """Seconds per record of the C fold as `LedgerWorker._chain_native` runs it (ChainBatch over
    the records as one batch, heads written back, checkpoints signed), no Kafka; best of `rounds`.
    None when the C fold is not in use."""
    found = native_chainer()
    if found is None:
        return None
    module, headers = found
    records = [(v, 0, offset) for offset, v in enumerate(values)]
    best = float("inf")
    for _ in range(rounds):
        gc.collect()
        heads: dict[str, ChainHead] = {}

        def head_for(_partition: int, tenant: str, heads: dict[str, ChainHead] = heads) -> Any:
            head = heads.get(tenant)
            if head is None:
                head = heads[tenant] = ChainHead(tenant)
            return head.native_state(0) or False

        t0 = time.perf_counter()
        batch = module.ChainBatch(records, *headers)
        i, made = 0, 0
        max_us = (datetime.now(UTC) + timedelta(days=1) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
        while i < len(records):
            i, due, entries, changed = batch.run(i, head_for, every_n, 3600.0, max_us, False)
            for head, *state in changed:
                head.native_applied(*state)
            made += sum(len(v) for _p, v, _k, _t in entries)
            if due is not None:
                due[0].checkpoint(key, f"ledgerflow.bench/{due[0].tenant}")
            elif i < len(records):
                raise RuntimeError(f"record {i} was not handled by the C fold")
        best = min(best, (time.perf_counter() - t0) / len(values))
        assert made == len(values)
    return best


def make_topics(bootstrap: str, prefix: str) -> Topics:
    """Only the ledger's topics (audit, its dead-letter topic, ledger, checkpoints), catalogue configs."""
    topics = Topics(prefix=prefix, partitions=PARTITIONS)
    wanted = []
    for key in ("audit", "ledger", "ledger-checkpoints"):
        name = topics.name(key)
        spec = topics.spec_for(name)
        assert spec is not None
        wanted.append((name, topics.partitions_of(name), spec.configs()))
    wanted.append((topics.dlq(topics.name("audit")), 1, {"retention.ms": "-1"}))
    create_missing(bootstrap, wanted)
    return topics


def produce_audits(bootstrap: str, topic: str, records: Sequence[tuple[bytes, bytes, int]]) -> float:
    """Non-transactional idempotent producer; seconds until all are acknowledged."""
    p = Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 20,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 2_000_000,
            "queue.buffering.max.kbytes": 2_000_000,
        }
    )
    start = time.perf_counter()
    for key, value, partition in records:
        while True:
            try:
                p.produce(topic, key=key, value=value, partition=partition)
                break
            except BufferError:
                p.poll(0.05)
    left = p.flush(120)
    if left:
        raise RuntimeError(f"{left} audit records not acknowledged")
    return time.perf_counter() - start


class _Timed:
    """Forwards every attribute to `inner`, adding the wall time of the named methods to `spent`."""

    def __init__(self, inner: Any, timed_methods: dict[str, str], spent: dict[str, float]) -> None:
        self._inner, self._methods, self._spent = inner, timed_methods, spent

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        bucket = self._methods.get(name)
        if bucket is None:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            t = time.perf_counter()
            try:
                return attr(*args, **kwargs)
            finally:
                self._spent[bucket] = self._spent.get(bucket, 0.0) + time.perf_counter() - t

        return call


TXN_CALLS = {
    "begin_transaction": "begin",
    # on the worker's helper thread when commits overlap the next batch (LedgerConfig.overlap)
    "send_offsets_to_transaction": "commit",
    "commit_transaction": "commit",
    "produce": "produce",
}
MAIN_THREAD = ("consume", "produce", "begin", "waiting for a commit")  # what the fold's Python is the rest of


class TimedWorker(LedgerWorker):
    """A LedgerWorker that stops itself after `target` records and times the chaining window."""

    def __init__(
        self, *args: Any, target: int, stop: threading.Event, prof: cProfile.Profile | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.target = target
        self.stop = stop
        self.prof = prof  # profiles the steady state: from after the first batch to the last
        # wall time inside consume() and inside the transaction calls, steady state only
        self.spent: dict[str, float] = {}
        self._consumer = _Timed(self._consumer, {"consume": "consume"}, self.spent)  # type: ignore[assignment]
        self._producer = _Timed(self._producer, TXN_CALLS, self.spent)  # type: ignore[assignment]
        self.profiled_from = 0
        self.first: float | None = None
        self.first_batch = 0
        self.spent_final: dict[str, float] = {}
        self.last = 0.0
        self.n_batches = 0
        self.cpu_thread0 = 0.0
        self.cpu_proc0 = 0.0
        self.cpu_thread = 0.0
        self.cpu_proc = 0.0

    def _settle(self, later: Any = None) -> int | None:
        t = time.perf_counter()
        try:
            return super()._settle(later)
        finally:
            self.spent["waiting for a commit"] = self.spent.get("waiting for a commit", 0.0) + time.perf_counter() - t

    def step(self) -> int:
        # step() returns the records committed during the call: with overlapping commits the
        # batch before the one it consumed and chained
        n = super().step()
        if n:
            now = time.perf_counter()
            if self.first is None:  # steady state from here: group join and head rebuild are behind
                # a batch chained but not yet committed at this point counts as before the window
                flying = self._inflight.records if self._inflight is not None else 0
                self.first, self.first_batch = now, self.chained + flying
                self.cpu_thread0, self.cpu_proc0 = time.thread_time(), _proc_cpu()
                self.spent.clear()
            else:
                self.n_batches += 1
                self.last = now
                self.cpu_thread, self.cpu_proc = time.thread_time() - self.cpu_thread0, _proc_cpu() - self.cpu_proc0
        if self.chained >= self.target:
            self.spent_final = dict(self.spent)
            self.stop.set()
            if self.prof is not None and self.profiled_from:
                self.prof.disable()
        elif n and self.prof is not None and not self.profiled_from:
            self.profiled_from = self.chained
            self.prof.enable()
        return n


def _proc_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


@dataclass
class ChainRun:
    batch_max: int
    entries: int
    seconds: float
    batches: int
    cpu_thread: float
    cpu_proc: float
    group: str
    profiled: int = 0  # entries chained while the profiler ran
    spent: dict[str, float] = field(default_factory=dict)  # wall s in consume, produce, begin, commit...

    @property
    def rate(self) -> float:
        return self.entries / self.seconds


def run_worker(
    bootstrap: str,
    topics: Topics,
    key: SigningKey,
    n: int,
    batch_max: int,
    every_n: int,
    prof: cProfile.Profile | None,
    native: bool = True,
) -> ChainRun:
    group = f"{topics.prefix}g{batch_max}"
    stop = threading.Event()
    config = LedgerConfig(
        key=key, origin="ledgerflow.bench", every_n=every_n, every_s=3600.0, batch_max=batch_max, native=native
    )
    worker = TimedWorker(bootstrap, group, topics, config, target=n, stop=stop, prof=prof)
    if native and worker._native is None:
        raise RuntimeError("the C fold is not in use (not built, or LEDGERFLOW_NATIVE=0): use --paths python")
    # a safety net: never hang the shared box on a broker problem
    watchdog = threading.Timer(170.0, stop.set)
    watchdog.daemon = True
    watchdog.start()
    gc.collect()
    try:
        worker.run(stop)
    finally:
        watchdog.cancel()
    if worker.first is None or worker.chained < n or not worker.n_batches:
        raise RuntimeError(f"worker chained {worker.chained} of {n} records in {worker.n_batches + 1} batches")
    return ChainRun(
        batch_max,
        worker.chained - worker.first_batch,
        worker.last - worker.first,
        worker.n_batches,
        worker.cpu_thread,
        worker.cpu_proc,
        group,
        worker.chained - worker.profiled_from if worker.profiled_from else 0,
        worker.spent_final,
    )


# cProfile buckets: (label, predicate on (filename, funcname)); cumulative time of each match.
BUCKETS: list[tuple[str, Callable[[str, str], bool]]] = [
    ("consume (librdkafka fetch queue → Python Messages)", lambda f, n: "'consume' of 'cimpl.Consumer'" in n),
    ("decode AuditRecorded (Codec.decode)", lambda f, n: f.endswith("streams/codec.py") and n == "decode"),
    ("chain fold (domain.ledger.ChainHead.append)", lambda f, n: f.endswith("domain/ledger.py") and n == "append"),
    ("checkpoint due (ChainHead.due)", lambda f, n: f.endswith("domain/ledger.py") and n == "due"),
    ("sign checkpoints (make_checkpoint)", lambda f, n: f.endswith("domain/ledger.py") and n == "make_checkpoint"),
    ("encode entries + checkpoints (Codec.encode)", lambda f, n: f.endswith("streams/codec.py") and n == "encode"),
    ("produce (Producer.produce)", lambda f, n: "'produce' of 'cimpl.Producer'" in n),
    ("begin_transaction", lambda f, n: "'begin_transaction' of" in n),
    ("position + group metadata", lambda f, n: "'position' of" in n or "'consumer_group_metadata' of" in n),
    ("send_offsets_to_transaction", lambda f, n: "'send_offsets_to_transaction' of" in n),
    ("commit_transaction", lambda f, n: "'commit_transaction' of" in n),
]


def profile_split(prof: cProfile.Profile) -> tuple[float, list[tuple[str, float]], str]:
    stats = pstats.Stats(prof)
    raw: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    step_total = sum(
        ct for (f, _l, n), (_cc, _nc, _tt, ct, _c) in raw.items() if n == "step" and f.endswith("agents/ledger.py")
    )
    out = []
    for label, match in BUCKETS:
        out.append((label, sum(ct for (f, _l, n), (_cc, _nc, _tt, ct, _c) in raw.items() if match(f, n))))
    buf = _StringSink()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)  # type: ignore[arg-type]
    return step_total, out, buf.text()


class _StringSink:
    def __init__(self) -> None:
        self.parts: list[str] = []

    def write(self, s: str) -> int:
        self.parts.append(s)
        return len(s)

    def text(self) -> str:
        return "".join(self.parts)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def best_per_call(fn: Callable[[], Any], reps: int, rounds: int = 5) -> float:
    """Seconds per call in the fastest of `rounds` rounds of `reps` calls (a shared box is noisy)."""
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t) / reps)
    return best


def cleanup(bootstrap: str, topic_names: list[str], groups: list[str]) -> None:
    client = AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 5000})
    if groups:
        for _g, fut in client.delete_consumer_groups(groups, request_timeout=30).items():
            with contextlib.suppress(Exception):
                fut.result(30)
    existing = set(client.list_topics(timeout=30).topics)
    mine = [t for t in topic_names if t in existing]
    if mine:
        for name, fut in client.delete_topics(mine, operation_timeout=30).items():
            try:
                fut.result(60)
            except Exception as exc:
                print(f"could not delete {name}: {exc}", file=sys.stderr)
    print(f"cleaned up: {len(mine)} topics, {len(groups)} consumer groups deleted", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--bootstrap", default="127.0.0.1:19192")
    parser.add_argument(
        "--batch-max", default="500,2000,5000", help="comma list; verify and prove run on 2000 (else the first)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="chaining runs per batch_max, order alternating")
    parser.add_argument("--tenants", type=int, default=5)
    parser.add_argument("--checkpoint-every", type=int, default=1000)
    parser.add_argument("--profile-entries", type=int, default=30_000, help="0 skips the cProfile run")
    parser.add_argument("--chain-only", action="store_true", help="only steps 1-3: skip verify, rebuild and proofs")
    parser.add_argument(
        "--paths",
        default="native" if native_chainer() is not None else "python",
        help="comma list of folds, run alternately: native (C, the default when built), python (LEDGERFLOW_NATIVE=0)",
    )
    args = parser.parse_args()
    n = args.entries
    batch_maxes = [int(b) for b in args.batch_max.split(",") if b]
    paths = [p for p in args.paths.split(",") if p]
    if not paths or set(paths) - {"native", "python"}:
        parser.error("--paths takes native and/or python")
    default_bm = 2000 if 2000 in batch_maxes else batch_maxes[0]
    run_id = uuid.uuid4().hex[:8]
    rows: list[tuple[str, str, str]] = []

    def row(label: str, value: str, goal: str = "") -> None:
        rows.append((label, value, goal))
        print(f"{label:<66} {value}  {goal}", flush=True)

    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cpus; run {run_id}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    tenants = [f"bench-tenant-{i}" for i in range(args.tenants)]
    key = generate_key("ledgerflow.bench/audit")
    created: list[str] = []
    groups: list[str] = []

    def new_topics(tag: str) -> Topics:
        topics = make_topics(args.bootstrap, f"bench-ledger-{run_id}-{tag}-")
        created.extend([*(topics.name(k) for k in ("audit", "ledger", "ledger-checkpoints"))])
        created.append(topics.dlq(topics.name("audit")))
        created.append(topics.ledger_heads())
        return topics

    try:
        codec = Codec()
        secs, encoded = timed(lambda: encode_audits(codec, n, tenants))
        size = sum(len(v) for _k, v, _p in encoded) / n
        print(f"built and encoded {n:,} AuditRecorded in {secs:.1f} s ({size:.0f} B each)", flush=True)
        per_partition = [sum(1 for _k, _v, p in encoded if p == q) for q in range(PARTITIONS)]
        by_tenant = {t: sum(1 for k, _v, _p in encoded if k == t.encode()) for t in tenants}

        # 1. chaining, one worker per batch_max, fold and round (ABC CBA ...), each on its own copy of the log
        combos = [(bm, path) for bm in batch_maxes for path in paths]
        runs: dict[tuple[int, str], list[ChainRun]] = {c: [] for c in combos}
        topics_of: dict[int, Topics] = {}
        for rnd in range(args.rounds):
            for bm, path in combos if rnd % 2 == 0 else combos[::-1]:
                topics = new_topics(f"b{bm}{path[0]}r{rnd}")
                topics_of.setdefault(bm, topics)
                psecs = produce_audits(args.bootstrap, topics.name("audit"), encoded)
                print(
                    f"batch_max {bm}, {path}: produced {n:,} in {psecs:.1f} s ({n / psecs:,.0f}/s); chaining "
                    f"(load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
                groups.append(f"{topics.prefix}g{bm}")
                r = run_worker(args.bootstrap, topics, key, n, bm, args.checkpoint_every, None, path == "native")
                runs[(bm, path)].append(r)
                print(
                    f"batch_max {bm}, {path}: {r.rate:,.0f} entries/s ({r.seconds:.2f} s, {r.batches} txns; "
                    f"{r.cpu_thread * 1e6 / r.entries:.1f} thread CPU-µs, {r.cpu_proc * 1e6 / r.entries:.1f} "
                    f"process CPU-µs per entry; load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
        best: dict[int, ChainRun] = {}
        for (bm, path), rs in runs.items():
            r = max(rs, key=lambda x: x.rate)
            if path == paths[0]:
                best[bm] = r
            mark = "**" if bm == default_bm else ""
            row(
                f"one LedgerWorker, {path} fold, batch_max {bm}: {r.entries:,} entries, {r.batches} transactions "
                f"(best of {len(rs)}: {' / '.join(f'{x.rate:,.0f}' for x in rs)})",
                f"{mark}{r.rate:,.0f} entries/s{mark} ({r.seconds:.2f} s; worker thread CPU "
                f"{r.cpu_thread / r.seconds:.0%}, process CPU {r.cpu_proc / r.seconds:.0%} of one core; "
                f"{r.cpu_thread * 1e6 / r.entries:.1f} thread CPU-µs per entry; worker thread's wall in "
                + ", ".join(f"{k} {r.spent.get(k, 0.0) / r.seconds:.0%}" for k in MAIN_THREAD)
                + f", the fold's Python {1 - sum(r.spent.get(k, 0.0) for k in MAIN_THREAD) / r.seconds:.0%}; "
                f"send_offsets + commit {r.spent.get('commit', 0.0) / r.seconds:.0%} of wall, "
                f"{r.spent.get('commit', 0.0) * 1e3 / max(r.batches, 1):.0f} ms per transaction, on the helper thread "
                "when commits overlap)",
                f"≥ 20k/s: {r.rate / GOAL_CHAIN:.2f}× goal",
            )
        if "native" in paths and "python" in paths:
            for bm in batch_maxes:
                nat, py = runs[(bm, "native")], runs[(bm, "python")]
                per_round = [a.rate / b.rate for a, b in zip(nat, py, strict=True)]
                cpu = [(a.cpu_proc / a.entries) / (b.cpu_proc / b.entries) for a, b in zip(nat, py, strict=True)]
                row(
                    f"native / python, batch_max {bm}, round by round (alternating order)",
                    "entries/s "
                    + " / ".join(f"{x:.2f}×" for x in per_round)
                    + f" (best {max(a.rate for a in nat) / max(b.rate for b in py):.2f}×); process CPU per entry "
                    + " / ".join(f"{x:.2f}×" for x in cpu),
                )

        sn = min(n, 20_000)
        stages = stage_costs(codec, [v for _k, v, _p in encoded[:sn]], key, args.checkpoint_every)
        pure = sum(stages.values())
        py_runs = runs.get((default_bm, "python"))  # the Python stages against the Python fold's wall
        per_entry = 1 / max(r.rate for r in py_runs) if py_runs else 1 / best[default_bm].rate
        c_fold = native_stage_cost([v for _k, v, _p in encoded[:sn]], key, args.checkpoint_every)
        if c_fold is not None:
            nat_runs = runs.get((default_bm, "native"))
            of_wall = f"; {c_fold * max(r.rate for r in nat_runs):.0%} of the native worker's wall" if nat_runs else ""
            row(
                f"the C fold alone, no Kafka (ChainBatch.run over {sn:,} records + signing; best of 3)",
                f"{c_fold * 1e6:.1f} µs per entry ({pure / c_fold:.1f}× less than the Python stages below; "
                f"ceiling {1 / c_fold:,.0f} entries/s{of_wall})",
            )
        row(
            f"the worker's pure stages, record by record, unprofiled, no Kafka (best of 3 × {sn:,}; µs per entry)",
            ", ".join(f"{k} {v * 1e6:.1f}" for k, v in stages.items())
            + f"; sum {pure * 1e6:.1f} = {pure / per_entry:.0%} of the worker's {per_entry * 1e6:.1f} µs/entry "
            f"at batch_max {default_bm}{' (Python fold)' if py_runs else ''} (pure ceiling {1 / pure:,.0f} entries/s)",
        )

        # 2. profile
        if args.profile_entries:
            pn = min(args.profile_entries, n)
            topics = new_topics("prof")
            produce_audits(args.bootstrap, topics.name("audit"), encoded[:pn])
            groups.append(f"{topics.prefix}g{default_bm}")
            prof = cProfile.Profile()
            pr = run_worker(
                args.bootstrap, topics, key, pn, default_bm, args.checkpoint_every, prof, paths[0] == "native"
            )
            step_total, split, top = profile_split(prof)
            pe = pr.profiled  # the first batch (group join, head rebuild) is not profiled
            print(
                f"\ncProfile, {pe:,} of {pn:,} entries, batch_max {default_bm} "
                f"({pr.rate:,.0f} entries/s under the profiler), step() cumulative {step_total:.2f} s:"
            )
            for label, s in split:
                print(f"  {label:<52} {s:6.2f} s  {s / step_total:5.1%}  {s / pe * 1e6:6.1f} µs/entry")
            other = step_total - sum(s for _label, s in split)
            print(
                f"  {'rest of step() (snapshot, _chain glue, dict ops)':<52} {other:6.2f} s  {other / step_total:5.1%}"
            )
            print(top, flush=True)
            row(
                f"cProfile split of step(), {pe:,} entries, batch_max {default_bm} (µs per entry)",
                ", ".join(f"{label.split(' (')[0]} {s / pe * 1e6:.1f}" for label, s in split if s / step_total > 0.01)
                + f", rest {other / pe * 1e6:.1f}; total {step_total / pe * 1e6:.1f}",
            )

        if not args.chain_only:
            # 3. verify from the log (the default batch_max run)
            topics = topics_of[default_bm]
            names = [topics.name("audit"), topics.name("ledger"), topics.name("ledger-checkpoints")]
            secs_raw, raw = timed(lambda: read_to_end(args.bootstrap, names, 180.0, strict=True))
            secs_dec, _ = timed(lambda: [codec.decode(m.value()) for _t, _o, m in raw])
            n_raw = len(raw)
            raw.clear()
            with tempfile.TemporaryDirectory() as tmp:
                settings = load(
                    kafka_bootstrap=args.bootstrap,
                    topic_prefix=topics.prefix,
                    partitions=PARTITIONS,
                    data_dir=Path(tmp),
                )
                secs_log, chains = timed(lambda: audit.from_log(settings, None, 180.0))
                secs_one, _ = timed(lambda: audit.from_log(settings, tenants[0], 180.0))
                gc.disable()  # what a collector tuned for a bulk read would save (gc.freeze, thresholds)
                try:
                    secs_nogc, _ = timed(lambda: audit.from_log(settings, None, 180.0))
                finally:
                    gc.enable()
            secs_ver, reports = timed(lambda: audit.verify(chains, key.verifier))
            with tempfile.TemporaryDirectory() as tmp:
                settings = load(
                    kafka_bootstrap=args.bootstrap,
                    topic_prefix=topics.prefix,
                    partitions=PARTITIONS,
                    data_dir=Path(tmp),
                )
                secs_jobs, jreports = timed(lambda: audit.verify_log(settings, key.verifier, None, 2))
            assert jreports == sorted(reports, key=lambda r: r.tenant or "")
            bad = [r for r in reports if not r.ok]
            if bad or sum(r.size for r in reports) != n:
                raise RuntimeError(f"verify failed or incomplete: {bad or [(r.tenant, r.size) for r in reports]}")
            cps = sum(r.checkpoints_checked for r in reports)
            total = secs_log + secs_ver
            row(f"read_to_end of audit + ledger + checkpoints ({n_raw:,} records, no decode)", f"{secs_raw:.2f} s")
            row(f"Codec.decode of those {n_raw:,} records alone", f"{secs_dec:.2f} s ({n_raw / secs_dec:,.0f}/s)")
            row(f"audit.from_log (read + decode + group), {n:,} entries", f"{secs_log:.2f} s")
            row("the same with the cyclic GC disabled", f"{secs_nogc:.2f} s ({secs_nogc / secs_log:.2f}×)")
            row(
                f"audit.from_log for one tenant ({by_tenant[tenants[0]]:,} entries; what `audit prove` reads)",
                f"{secs_one:.2f} s ({secs_one / secs_log:.2f}× the whole log: every record is still read and decoded)",
            )
            row(
                f"audit.verify, {n:,} entries, {n:,} audit records re-hashed, {cps} checkpoints",
                f"{secs_ver:.2f} s ({n / secs_ver:,.0f} entries/s)",
            )
            row("`audit verify` from the log, partitions in 2 processes (verify_log jobs=2)", f"{secs_jobs:.2f} s")
            row(
                f"`audit verify` from the log, {n:,} entries (from_log + verify)",
                f"**{total:.2f} s** → {total * 1e6 / n:.1f} s per 1M (linear), read+decode {secs_log / total:.0%}",
                f"1M ≤ 10 s: {GOAL_VERIFY_1M / (total * 1e6 / n):.2f}× goal (extrapolated)",
            )

            # 4. rebuild of the chain heads on assignment
            rb = LedgerWorker(
                args.bootstrap, f"{topics.prefix}rebuild", topics, LedgerConfig(key=key, origin="ledgerflow.bench")
            )
            try:
                secs_rb, heads = timed(lambda: [rb._restore(p).heads for p in range(PARTITIONS)])
            finally:
                rb._consumer.close()
            assert sum(h.size for part in heads for h in part.values()) == n
            row(f"worker head rebuild on assignment, all {PARTITIONS} partitions ({n:,} entries)", f"{secs_rb:.2f} s")

            # 5. an inclusion proof at the largest chain's newest checkpoint
            tenant = max(chains, key=lambda t: len(chains[t].entries))
            entries = collapse_redeliveries(chains[tenant].entries)
            size = max(cp.tree_size for cp in chains[tenant].checkpoints)
            secs_prove, doc = timed(lambda: audit.prove(chains, tenant, size - 1))
            secs_next = best_per_call(lambda: audit.prove(chains, tenant, size // 2), 200)
            secs_tree, tree = timed(lambda: tree_of(entries[:size]))
            secs_path = best_per_call(lambda: tree.inclusion_proof(size - 1, size), 500)
            secs_check = best_per_call(lambda: check_proof_file(doc, key.verifier), 100)
            assert check_proof_file(doc, key.verifier).ok
            row(
                f"audit.prove at seq {size - 1:,} of a {len(entries):,}-entry chain (checkpoint size {size:,})",
                f"{secs_prove * 1e3:.1f} ms (tree build {secs_tree * 1e3:.1f} ms, path alone {secs_path * 1e6:.1f} µs)",
                f"< 1 ms: path {GOAL_PROOF / secs_path:.0f}× under; first prove {secs_prove / GOAL_PROOF:.0f}× over",
            )
            row(
                "audit.prove again on that chain (its tree kept from the first)",
                f"{secs_next * 1e6:.0f} µs (path + proof file)",
                f"< 1 ms: {GOAL_PROOF / secs_next:.1f}× under",
            )
            row("proof file: check offline (Ed25519 + entry + path)", f"{secs_check * 1e6:.0f} µs")
            row(
                "setup",
                f"{args.tenants} tenants ({', '.join(f'{v:,}' for v in by_tenant.values())} entries), "
                f"{PARTITIONS} partitions ({', '.join(f'{v:,}' for v in per_partition)} records), "
                f"checkpoint every {args.checkpoint_every}",
            )
            row("peak RSS of this process", f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:,.0f} MiB")
    finally:
        cleanup(args.bootstrap, created, groups)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n| measure | result | goal |\n| --- | --- | --- |")
    for label, value, goal in rows:
        print(f"| {label} | {value} | {goal} |")


if __name__ == "__main__":
    main()
