"""The savings rollup reconciliation at the issue's size (issue 7, Rollups): 100k charges, worker restarts.

Run: .venv/bin/python bench/bench_accounting_rollups.py --bootstrap 127.0.0.1:19592 [--charges 100000] [--kills 3]

Needs a running broker; creates its own topics under a unique prefix and a chDB store in a
temporary directory. Steps (the harness is `tests.test_accounting_rollups.reconcile`, the same
code the CI test runs at 600 charges):
1. produce `--charges` TokensCharged (5 tenants, 2 models, 3 UTC days, a quarter without
   baseline fields) in transactions of 2000;
2. run the agent worker (`python -m agents worker`), SIGKILL it `--kills` times once an equal
   share of the snapshots has appeared, restarting it at once, until the newest snapshot of
   every (tenant, day, model) equals the sums of the charges;
3. run the projection sink until tokens_charged holds every charge and `savings_daily` equals them;
4. assert agent rollup = `charges_daily` (materialized view over raw charges) = a GROUP BY over
   tokens_charged = `savings_daily` = the sums of the charges, exactly; print the timings.

Fold rate, side by side (no kills, no sink): `--compare OLD_TREE [--linger 0.005] --charges 5000
--rounds 2` runs the worker of this checkout and of OLD_TREE (e.g. `git archive HEAD | tar -x -C
/tmp/old`) alternately on the same charges, each on fresh topics, and prints charges/s from the
first snapshot to the last (every agent of the worker folds every charge).

Anomaly-agent storage, in process (no broker): `--storage --charges 30000` folds the workload with
the old storage (the whole state, pickled detector included, with every charge) and the new one
(open hour per charge, detectors per closed hour) and prints changelog bytes and time per charge.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from projections.migrations import migrate
from projections.sink import Sink
from projections.store import open_store
from streams.admin import admin, ensure_topics
from streams.topics import Topics
from tests.test_accounting_rollups import SnapshotReader, Worker, make_workload, produce, reconcile


def fold_rate(bootstrap: str, tree: Path, n: int, extra_env: dict[str, str]) -> float:
    """Charges/s of the agent worker from `tree` folding `n` charges (first snapshot to the full rollup)."""
    topics = Topics(prefix=f"bench-rate-{uuid.uuid4().hex[:8]}-", partitions=3)
    ensure_topics(bootstrap, topics)
    work = make_workload(n)
    expected = work.expected()
    produce(bootstrap, topics, work.charges)
    with tempfile.TemporaryDirectory() as tmp:
        worker = Worker(bootstrap, topics, Path(tmp))
        reader = SnapshotReader(bootstrap, topics)
        with worker.log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agents", "worker", "--loglevel", "warn"],
                cwd=tree, env={**worker.env, **extra_env}, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        try:
            deadline = time.monotonic() + 1800
            first = None
            while reader.rollup() != expected:
                if reader.poll() and first is None:
                    first = time.monotonic()
                if time.monotonic() > deadline:
                    raise SystemExit(f"{tree}: not folded in time\n{worker.log.read_text()[-2000:]}")
            assert first is not None
            rate = n / (time.monotonic() - first)
        finally:
            os.kill(proc.pid, signal.SIGTERM)
            proc.wait(60)
            reader.close()
            names = [t for t in admin(bootstrap).list_topics(timeout=10).topics if t.startswith(topics.prefix)]
            admin(bootstrap).delete_topics(names)
    return rate


def storage(n: int) -> None:
    """Changelog bytes and time per charge of the anomaly agent's two storage layouts (JSON as Faust writes it)."""
    import json

    from agents import anomalies
    from domain.anomaly import HourlySpend, fold
    from streams.codec import Codec

    codec = Codec()
    raw = [codec.encode(c) for c in make_workload(n).charges]

    class Table(dict[str, object]):
        written = 0
        writes = 0

        def __setitem__(self, key: str, value: object) -> None:
            self.written += len(json.dumps(value))
            self.writes += 1
            super().__setitem__(key, value)

    def old(table: Table, tenant: str, charge: object, offset: int) -> None:
        stored = table.get(tenant)
        new, _ = fold(HourlySpend.from_json(stored) if stored else None, charge, 0, offset)  # type: ignore[arg-type]
        table[tenant] = new.to_json()

    def new(table: Table, tenant: str, charge: object, offset: int) -> None:
        before = anomalies.restore(table, tenant)
        after, _ = fold(before, charge, 0, offset)  # type: ignore[arg-type]
        anomalies.save(table, tenant, before, after)

    for name, step in (("old: whole state with the detector", old), ("new: open hour; detectors per hour", new)):
        table = Table()
        started = time.perf_counter()
        for offset, data in enumerate(raw):
            charge = codec.decode(data)
            step(table, charge.tenant, charge, offset)
        took = (time.perf_counter() - started) / n * 1e6
        print(f"{name}: {table.written / n:.0f} changelog bytes/charge, {table.writes / n:.2f} writes, {took:.0f} us")


def compare(bootstrap: str, old: Path, n: int, rounds: int, linger: str | None) -> None:
    here = Path(__file__).resolve().parents[1]
    variants: list[tuple[str, Path, dict[str, str]]] = [("old", old, {}), ("new", here, {})]
    if linger is not None:
        variants.append((f"new, PRODUCER_LINGER={linger}", here, {"PRODUCER_LINGER": linger}))
    rates: dict[str, list[float]] = {name: [] for name, _, _ in variants}
    for r in range(rounds):
        order = variants if r % 2 == 0 else variants[::-1]
        for name, tree, env in order:
            rates[name].append(fold_rate(bootstrap, tree, n, env))
            print(f"round {r + 1} {name}: {rates[name][-1]:.0f} charges/s", flush=True)
    base = sorted(rates["old"])[len(rates["old"]) // 2]
    for name, got in rates.items():
        med = sorted(got)[len(got) // 2]
        print(f"{name}: median {med:.0f} charges/s ({med / base:.2f}x old) over {got}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap")
    parser.add_argument("--charges", type=int, default=100_000)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--compare", type=Path, help="an older tree to compare the fold rate with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--linger", help="also run this tree with Faust's PRODUCER_LINGER (seconds)")
    parser.add_argument("--storage", action="store_true", help="compare the anomaly agent's storage, in process")
    args = parser.parse_args()
    if args.storage:
        storage(args.charges)
        return 0
    if not args.bootstrap:
        parser.error("--bootstrap is required")
    if args.compare is not None:
        compare(args.bootstrap, args.compare, args.charges, args.rounds, args.linger)
        return 0
    topics = Topics(prefix=f"bench-acc-{uuid.uuid4().hex[:8]}-", partitions=3)
    ensure_topics(args.bootstrap, topics)
    with tempfile.TemporaryDirectory() as tmp:
        db = "bench_accounting"
        store = open_store(f"chdb://{tmp}/chdb", db)
        migrate(store, db)
        sinks: list[Sink] = []

        def make_sink() -> Sink:
            s = Sink(args.bootstrap, f"sink-{uuid.uuid4().hex[:8]}", topics, store, batch_max=5000, batch_ms=200)
            sinks.append(s)
            return s

        started = time.monotonic()
        try:
            timings = reconcile(
                args.bootstrap, topics, store, make_sink, Path(tmp), args.charges, args.kills, args.timeout
            )
        finally:
            for s in sinks:
                s.close()
            names = [t for t in admin(args.bootstrap).list_topics(timeout=10).topics if t.startswith(topics.prefix)]
            if names:
                admin(args.bootstrap).delete_topics(names)
    total = time.monotonic() - started
    print(
        f"{args.charges} charges, {args.kills} worker SIGKILLs: agent rollup = SQL rollup = projection = sum of "
        f"charges, exactly. produce {timings['produce_s']:.1f} s, fold (kills and restarts included) "
        f"{timings['fold_s']:.1f} s = {args.charges / timings['fold_s']:.0f} charges/s, sink "
        f"{timings['sink_s']:.1f} s; total {total:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
