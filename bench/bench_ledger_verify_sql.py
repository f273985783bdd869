"""`audit verify` of the ClickHouse projection: the Python verifier against the ClickHouse one, side by side.

Run: .venv/bin/python bench/bench_ledger_verify_sql.py [--entries 1000000] [--tenants 5] [--rounds 2]

Builds `--entries` AuditRecorded chained by the worker's fold (`ChainHead`, a checkpoint every
1,000 entries per chain), lands their rows in a scratch chDB store exactly as the sink would
(`projections.schema.event_to_row`, the migrated tables), then times, alternating A B B A:
- A: `audit.verify(audit.from_store(client), key)`: rows to Python, canonical bytes and
  hashes in Python (what `audit verify --source store` did before);
- B: `audit.verify_store_sql(client, key)`: canonical bytes, hashes, links and audit
  matches in ClickHouse (chDB, C++), Merkle tree and signatures in Python.
Both must give the same reports (asserted). Wall and process CPU time (chDB's threads run in
this process, so CPU covers them) and the load average are printed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domain.checkpoint import generate_key
from domain.ledger import ChainHead
from ledgerflow import audit
from projections.migrations import migrate
from projections.schema import columns_for, event_to_row, table_for
from projections.store import open_store
from streams.events import AuditRecorded, Envelope, Event
from streams.ids import derived_uuid7

T0 = datetime(2026, 11, 29, tzinfo=UTC)
ROOT = "01a2254e-858f-76ea-bab1-95608768fad3"


def load(client: Any, entries: int, tenants: int, every: int) -> Any:
    key = generate_key("ledgerflow.bench")
    heads = {f"tenant-{t}": ChainHead(f"tenant-{t}") for t in range(tenants)}
    names = list(heads)
    batch: dict[str, tuple[tuple[str, ...], list[Any]]] = {}

    def add(e: Event, offset: int) -> None:
        _cols, rows = batch.setdefault(table_for(e.event_type), (columns_for(e.event_type), []))
        rows.append(event_to_row(e, "bench", 0, offset))

    def flush() -> None:
        for table, (cols, rows) in batch.items():
            client.insert(table, rows, column_names=cols)
        batch.clear()

    for i in range(entries):
        tenant = names[i % tenants]
        eid = str(derived_uuid7(ROOT, tenant, str(i)))
        rec = AuditRecorded(
            envelope=Envelope(
                event_id=eid, event_type="AuditRecorded", schema_version=1, tenant=tenant,
                occurred_at=T0 + timedelta(microseconds=1000 * i + 7), correlation_id=eid, producer="gateway",
                trace_parent=f"00-{i:032x}-{i:016x}-01",
            ),
            action="request.completed", actor=f"key-{i % 17}", subject=f"req-{i}", outcome="success",
            details={"model": "sim-small", "n": str(i), "route": "default"},
        )  # fmt: skip
        head = heads[tenant]
        entry = head.append(rec, 0, i)
        assert entry is not None
        add(rec, 2 * i)
        add(entry, 2 * i + 1)
        if head.size % every == 0:
            add(head.checkpoint(key, f"ledgerflow.bench/{tenant}"), i)
        if i % 50_000 == 49_999:
            flush()
    flush()
    return key.verifier


def timed(fn: Any) -> tuple[Any, float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--tenants", type=int, default=5)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}, load average {os.getloadavg()}")
    client = open_store(f"chdb://{tempfile.mkdtemp(prefix='bench-ledger-sql-')}", "bench")
    migrate(client, "bench")
    _, wall, cpu = timed(lambda: load(client, args.entries, args.tenants, args.every))
    key = _
    print(f"loaded {args.entries} entries + audit records ({args.tenants} tenants) in {wall:.1f} s")
    runs: dict[str, list[tuple[float, float]]] = {"A python": [], "B clickhouse": []}
    reports: dict[str, Any] = {}
    order = ["A python", "B clickhouse", "B clickhouse", "A python"] * ((args.rounds + 1) // 2)
    for name in order[: 2 * args.rounds]:
        if name.startswith("A"):
            out, wall, cpu = timed(lambda: audit.verify(audit.from_store(client), key))
        else:
            (out, slow), wall, cpu = timed(lambda: audit.verify_store_sql(client, key))
            assert slow == [], slow
        reports[name] = out
        runs[name].append((wall, cpu))
        print(f"{name}: wall {wall:.2f} s, cpu {cpu:.2f} s, load {os.getloadavg()[0]:.2f}", flush=True)
    assert reports["A python"] == reports["B clickhouse"] and all(r.ok for r in reports["A python"])
    assert sum(r.size for r in reports["A python"]) == args.entries
    best = {n: (min(w for w, _ in r), min(c for _, c in r)) for n, r in runs.items()}
    a, b = best["A python"], best["B clickhouse"]
    print(f"best wall A {a[0]:.2f} s, B {b[0]:.2f} s (B/A {b[0] / a[0]:.2f}); cpu A {a[1]:.2f}, B {b[1]:.2f}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
