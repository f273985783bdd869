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
"""

from __future__ import annotations

import argparse
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
from tests.test_accounting_rollups import reconcile


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--charges", type=int, default=100_000)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
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
