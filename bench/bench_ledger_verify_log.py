"""`audit verify` from the log: the Python verifier against the ClickHouse one, side by side.

Run: .venv/bin/python bench/bench_ledger_verify_log.py --bootstrap 127.0.0.1:19530 [--entries 100000]
     [--tenants 5] [--every 1000] [--rounds 2] [--jobs 1,2] [--engines ABN] [--skip-python] [--keep DIR]

Needs a running broker. Writes the log itself, as the worker would have, without running
the worker (chaining 1M entries through one worker takes minutes): `--entries` AuditRecorded
(`bench_ledger_kafka.audits`: 5 tenants, tenant i on partition i % 3) produced by an
idempotent producer, then their LedgerEntryChained and a signed LedgerCheckpointSigned every
`--every` entries per chain made by the worker's own fold (`domain.ledger.ChainHead`) and
produced transactionally, 2,000 entries per transaction as the worker commits them (so
the log holds transaction markers, as a real one does). With `--keep DIR` the topics and the
key are kept and reused by a later run with the same DIR (the log takes ~1.5 min per 1M).

Then times, alternating A B N N B A per round:
- A: `audit.verify_log(..., engine="python")`: every record read into Python, audit records
  decoded and re-hashed there (what `audit verify` from the log ran until now);
- B: `audit.verify_log_sql(...)` (what `audit.verify_log` runs by default in a process
  without a chDB store when the C extension is not built): the raw records handed to a scratch
  in-memory chDB as Avro files, canonical bytes, hashes, seq, links, log order and audit
  matches in SQL, timed by phase;
- N: `audit.verify_log_native(...)` (what `audit.verify_log` runs by default when
  `domain._ledger_native` is built): the records' bytes hashed and chained in C as they are
  consumed, Merkle roots in C, signatures in Python, timed by phase;
and B and N as `audit.verify_log(..., jobs=J)` (partitions in J spawned processes; B with
LEDGERFLOW_NATIVE=0) for each J > 1 given. All must give the same reports, all OK (asserted).
Wall and CPU (this process and its finished children; chDB's and librdkafka's threads
included) and the load average are printed. Also the lean
read alone (`streams.log_scan.scan_raw`) and a bare consume-and-count loop over the same
topics, for the floor the read sets.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ledger_kafka import PARTITIONS, audits, make_topics, produce_audits
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from domain.checkpoint import SigningKey, generate_key, load_signing_key_file, save_key_pair
from domain.ledger import ChainHead
from ledgerflow import audit
from ledgerflow.settings import Settings, load
from streams.codec import Codec
from streams.log_scan import scan_raw
from streams.topics import Topics

GOAL_1M = 10.0  # seconds for `audit verify` of 1M entries
TXN = 2000  # entries per transaction, as the worker's default batch_max


def build_log(bootstrap: str, topics: Topics, n: int, tenants: Sequence[str], every: int, key: SigningKey) -> None:
    """The audit topic, then the ledger and checkpoints as the worker writes them (module doc)."""
    codec = Codec()
    part_of = {t: i % PARTITIONS for i, t in enumerate(tenants)}
    audit_topic, ledger, checkpoints = (topics.name(k) for k in ("audit", "ledger", "ledger-checkpoints"))
    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "transactional.id": f"bench-verify-log-{uuid.uuid4().hex}",
            "linger.ms": 50,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 2_000_000,
            "queue.buffering.max.kbytes": 2_000_000,
        }
    )
    producer.init_transactions(30)
    heads = {t: ChainHead(t) for t in tenants}
    offsets = dict.fromkeys(range(PARTITIONS), 0)
    step = 50_000
    started = time.perf_counter()
    for lo in range(0, n, step):
        batch = _reindexed(audits(min(step, n - lo), tenants), lo)
        produce_audits(bootstrap, audit_topic, [(r.tenant.encode(), codec.encode(r), part_of[r.tenant]) for r in batch])
        for t0 in range(0, len(batch), TXN):
            producer.begin_transaction()
            for rec in batch[t0 : t0 + TXN]:
                p = part_of[rec.tenant]
                head = heads[rec.tenant]
                entry = head.append(rec, p, offsets[p])
                offsets[p] += 1
                assert entry is not None
                _produce(producer, ledger, rec.tenant.encode(), codec.encode(entry), p)
                if head.due(rec.envelope.occurred_at, every, 1e9):
                    signed = head.checkpoint(key, f"ledgerflow.bench/{head.tenant}")
                    _produce(producer, checkpoints, rec.tenant.encode(), codec.encode(signed), p)
            producer.commit_transaction(60)
        print(f"  log: {lo + len(batch):,} of {n:,} entries ({time.perf_counter() - started:.0f} s)", flush=True)


def _reindexed(records: list[Any], lo: int) -> list[Any]:
    """`audits(k)` makes records 0..k-1; slice `lo` needs distinct ids and times: rebuild them."""
    if lo == 0:
        return records
    import dataclasses
    from datetime import timedelta

    from streams.ids import derived_uuid7

    out = []
    for rec in records:
        env = rec.envelope
        eid = str(derived_uuid7(env.event_id, str(lo)))
        env2 = dataclasses.replace(
            env, event_id=eid, correlation_id=eid, occurred_at=env.occurred_at + timedelta(microseconds=lo * 50)
        )
        out.append(dataclasses.replace(rec, envelope=env2, subject=eid))
    return out


def _produce(producer: Producer, topic: str, key: bytes, value: bytes, partition: int) -> None:
    while True:
        try:
            producer.produce(topic, key=key, value=value, partition=partition)
            return
        except BufferError:
            producer.poll(0.05)


def _cpu() -> float:
    """CPU seconds of this process and its finished children (verify_log's spawned jobs)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), _cpu()
    out = fn()
    return out, time.perf_counter() - wall, _cpu() - cpu


def bare_count(bootstrap: str, names: Sequence[str]) -> int:
    """A bare confluent-kafka loop: consume(10000) and count, to the end offsets (the floor)."""
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-bare-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "fetch.max.bytes": 64 * 1024 * 1024,
            "max.partition.fetch.bytes": 16 * 1024 * 1024,
        }
    )
    md = c.list_topics(timeout=30)
    ends, assign = {}, []
    for name in names:
        for p in md.topics[name].partitions:
            lo, hi = c.get_watermark_offsets(TopicPartition(name, p), timeout=30)
            if hi > lo:
                ends[(name, p)] = hi
                assign.append(TopicPartition(name, p, lo))
    c.assign(assign)
    count = 0
    while ends:
        batch = c.consume(10000, 0.5)
        count += len(batch)
        if len(batch) < 10000:
            for pos in c.position([TopicPartition(t, p) for t, p in ends]):
                if pos.offset >= ends[(pos.topic, pos.partition)]:
                    del ends[(pos.topic, pos.partition)]
    c.close()
    return count


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--tenants", type=int, default=5)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--jobs", default="2", help="comma-separated job counts for B besides 1 (0: none)")
    parser.add_argument("--skip-python", action="store_true", help="leave A out (A takes ~55 s per 1M)")
    parser.add_argument("--engines", default="ABN", help="which of A (Python), B (ClickHouse), N (native) to time")
    parser.add_argument("--keep", type=Path, help="keep the log's topics and key here, reuse them if present")
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average {os.getloadavg()}", flush=True)
    tenants = [f"tenant-{i}" for i in range(args.tenants)]
    state = args.keep / "log.json" if args.keep else None
    if state is not None and state.exists():
        saved = json.loads(state.read_text())
        assert saved["entries"] == args.entries and saved["tenants"] == args.tenants, saved
        prefix = saved["prefix"]
        key = load_signing_key_file(Path(saved["key"]))
        topics = Topics(prefix=prefix, partitions=PARTITIONS)
        print(f"reusing {prefix} ({args.entries:,} entries)")
    else:
        prefix = f"bench-verify-{uuid.uuid4().hex[:8]}-"
        topics = make_topics(args.bootstrap, prefix)
        key = generate_key("ledgerflow.bench")
        _, wall, _ = timed(lambda: build_log(args.bootstrap, topics, args.entries, tenants, args.every, key))
        print(f"wrote the log ({args.entries:,} entries + audit records) in {wall:.1f} s", flush=True)
        if state is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            save_key_pair(key, args.keep / "key")
            state.write_text(json.dumps({"prefix": prefix, "entries": args.entries, "tenants": args.tenants,
                                         "key": str(args.keep / "key")}))  # fmt: skip
    settings: Settings = load(kafka_bootstrap=args.bootstrap, topic_prefix=prefix, partitions=PARTITIONS)
    names = [topics.name(k) for k in ("audit", "ledger", "ledger-checkpoints")]
    try:
        run(args, settings, key, names)
    finally:
        if state is None:
            AdminClient({"bootstrap.servers": args.bootstrap}).delete_topics(
                [*names, topics.dlq(topics.name("audit"))], operation_timeout=30
            )


def run(args: argparse.Namespace, settings: Settings, key: SigningKey, names: Sequence[str]) -> None:
    n = args.entries
    count, wall, cpu = timed(lambda: bare_count(args.bootstrap, names))
    print(f"bare consume(10000)-and-count loop: {count:,} records in {wall:.2f} s (cpu {cpu:.2f} s)", flush=True)
    raw, wall, cpu = timed(lambda: sum(len(b.values) for b in scan_raw(args.bootstrap, names, 300.0)))
    print(f"scan_raw of the 3 topics, one after another: {raw:,} in {wall:.2f} s (cpu {cpu:.2f} s)", flush=True)
    jobs = [int(j) for j in args.jobs.split(",") if int(j) > 1]
    engines = [e for e in ("A", "B", "N") if e in args.engines and not (e == "A" and args.skip_python)]
    order = (engines + engines[::-1]) * ((args.rounds + 1) // 2)
    order = order[: len(engines) * args.rounds]
    runs: dict[str, list[tuple[float, float]]] = {}
    reports: dict[str, Any] = {}
    phases: dict[str, list[tuple[float, dict[str, float]]]] = {}
    for name in order:
        for j in [1, *jobs] if name != "A" else [1]:
            label = f"{name} jobs={j}"
            if name != "A" and j == 1:  # the fast path itself, in this process, timed by phase
                spent: dict[str, float] = {}
                fn = audit.verify_log_sql if name == "B" else audit.verify_log_native

                def fast(s: dict[str, float] = spent, f: Any = fn) -> Any:
                    return f(settings, key.verifier, timings=s)

                (out, slow), wall, cpu = timed(fast)
                assert slow == [], slow  # the fast path judged every chain itself
                phases.setdefault(name, []).append((wall, spent))
            else:
                engine = "python" if name == "A" else "clickhouse"

                def log(j: int = j, e: str = engine, native: str = "0" if name == "B" else "1") -> Any:
                    before = os.environ.get("LEDGERFLOW_NATIVE")
                    os.environ["LEDGERFLOW_NATIVE"] = native  # the spawned jobs inherit it
                    try:
                        return audit.verify_log(settings, key.verifier, None, j, engine=e)
                    finally:
                        if before is None:
                            del os.environ["LEDGERFLOW_NATIVE"]
                        else:
                            os.environ["LEDGERFLOW_NATIVE"] = before

                out, wall, cpu = timed(log)
            reports[label] = out
            runs.setdefault(label, []).append((wall, cpu))
            print(f"{label}: wall {wall:.2f} s, cpu {cpu:.2f} s, load {os.getloadavg()[0]:.2f}", flush=True)
    first = next(iter(reports.values()))
    assert all(r == first for r in reports.values()), reports
    assert all(r.ok for r in first) and sum(r.size for r in first) == n, first
    print(f"\n{n:,} entries, {len(first)} chains, all OK and equal across engines; best of {args.rounds}:")
    best = {label: (min(w for w, _ in rs), min(c for _, c in rs)) for label, rs in runs.items()}
    for label, (w, c) in best.items():
        ratios = "".join(
            f", {w / best[b][0]:.2f}x {b[0]} wall, {c / best[b][1]:.2f}x {b[0]} cpu"
            for b in ("A jobs=1", "B jobs=1")
            if b in best and b != label and label[0] != "A"
        )
        per1m = w * 1_000_000 / n
        print(f"  {label}: wall {w:.2f} s, cpu {c:.2f} s{ratios}; {per1m:.1f} s per 1M -> {GOAL_1M / per1m:.2f}x goal")
    for name, ps in phases.items():
        wall, spent = min(ps, key=lambda p: p[0])
        print(f"  {name} jobs=1, best run by phase (wall s): " + ", ".join(f"{k} {v:.2f}" for k, v in spent.items()))
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
