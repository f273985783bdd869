"""The audit ledger through the real broker, two versions of the code side by side (A/B).

Run: git archive <commit> agents domain streams ledgerflow schemas projections gateway infra | tar -x -C /tmp/old
     .venv/bin/python bench/bench_ledger_ab.py --old /tmp/old [--entries 100000] [--rounds 2]
         [--bootstrap 127.0.0.1:19192] [--jobs 2]

Why A/B: the 2-core box is shared and its load swings several-fold within minutes, so a
figure measured an hour ago says little; two versions measured alternately (A B B A ...)
on the same records give a ratio that means something.

Each round and version: fresh topics (`bench-ledger-ab-<run>-…`, deleted at the end, also
on failure) are filled with the same `--entries` AuditRecorded (5 tenants, tenant i on
partition i % 3, non-transactional producer); then ONE child process, importing only the
version's own tree (`--old` PATH, or this checkout), runs:
1. one `LedgerWorker` chaining all records (checkpoint every 1000, batch_max 2000): the
   steady-state rate from the end of its first batch to the commit of the last entry;
2. `audit verify` from the log: `from_log` + `verify` (both versions), and this version's
   `verify_log(jobs=N)` where it exists;
3. `from_log` of one tenant (what `audit prove` reads) and `prove` of 50 entries of that
   chain: the first proof (which builds the tree, in both) and the mean of the other 49;
4. the worker's head rebuild of all 3 partitions (`LedgerWorker._rebuild`; with chain-head
   snapshots `_restore`, what a restarted worker does, and the full rebuild beside it).
The child prints one JSON line (wall and CPU seconds of each step); this script prints a
table of medians, each row with B/A.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_ledger_kafka import PARTITIONS, cleanup, encode_audits, make_topics, produce_audits

from streams.codec import Codec

REPO = Path(__file__).resolve().parents[1]

CHILD = r"""
import gc, json, resource, sys, tempfile, threading, time
from pathlib import Path
from agents.ledger import LedgerConfig, LedgerWorker
from domain.checkpoint import load_signing_key_file
from ledgerflow import audit
from ledgerflow.settings import load
from streams.topics import Topics

bootstrap, prefix, n, key_path, jobs = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
batch_max, chain_only = int(sys.argv[6]), sys.argv[7] == "1"
key = load_signing_key_file(Path(key_path))
topics = Topics(prefix=prefix, partitions=3)
out = {}

def cpu():
    # this process (librdkafka's threads included) and its finished children (verify_log's)
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime

def timed(name, fn):
    gc.collect()
    w, c = time.perf_counter(), cpu()
    result = fn()
    out[name], out[name + "_cpu"] = time.perf_counter() - w, cpu() - c
    return result

class Timed(LedgerWorker):
    # step() returns the records committed during the call (before overlapping commits, the
    # batch it consumed): the window runs from the first commit to the one of the last entry
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.first = None; self.first_n = 0; self.last = 0.0; self.stop = threading.Event(); self.txns = 0
    def step(self):
        got = super().step()
        if got:
            now = time.perf_counter()
            if self.first is None:  # a batch chained but not committed yet counts as before the window
                flying = getattr(self, "_inflight", None)
                self.first, self.cpu0, self.thread0 = now, cpu(), time.thread_time()
                self.first_n = self.chained + (flying.records if flying is not None else 0)
            else:
                self.txns += 1
            self.last, self.cpu1, self.thread1 = now, cpu(), time.thread_time()
        if self.chained >= n:
            self.stop.set()
        return got

config = LedgerConfig(key=key, origin="ledgerflow.bench", every_n=1000, every_s=3600.0, batch_max=batch_max)
w = Timed(bootstrap, prefix + "g", topics, config)
guard = threading.Timer(300.0, w.stop.set); guard.daemon = True; guard.start()
gc.collect()
w.run(w.stop)
guard.cancel()
assert w.chained >= n, w.chained
out["chain_rate"] = (w.chained - w.first_n) / (w.last - w.first)
out["chain_rate_cpu"] = (w.chained - w.first_n) / (w.cpu1 - w.cpu0)  # entries per CPU-second
out["chain_thread_cpu"] = (w.thread1 - w.thread0) / (w.last - w.first)  # share of the wall the worker thread ran
out["chain_txns"] = w.txns
if chain_only:
    print(json.dumps(out))
    sys.exit(0)

with tempfile.TemporaryDirectory() as tmp:
    settings = load(kafka_bootstrap=bootstrap, topic_prefix=prefix, partitions=3, data_dir=Path(tmp))
    chains = timed("from_log", lambda: audit.from_log(settings, None, 300.0))
    reports = timed("verify", lambda: audit.verify(chains, key.verifier))
    assert all(r.ok for r in reports) and sum(r.size for r in reports) == n, reports
    out["verify_total"] = out["from_log"] + out["verify"]
    out["verify_total_cpu"] = out["from_log_cpu"] + out["verify_cpu"]
    del chains, reports
    if hasattr(audit, "verify_log"):
        reports = timed("verify_log_jobs", lambda: audit.verify_log(settings, key.verifier, None, jobs))
        assert all(r.ok for r in reports) and sum(r.size for r in reports) == n
    tenant = "bench-tenant-0"
    one = timed("from_log_one_tenant", lambda: audit.from_log(settings, tenant, 300.0))
    size = max(cp.tree_size for cp in one[tenant].checkpoints)
    seqs = [(i * 7919) % size for i in range(50)]
    timed("prove_first", lambda: audit.prove(one, tenant, seqs[0]))
    timed("prove_next", lambda: [audit.prove(one, tenant, s) for s in seqs[1:]])
    out["prove_next"] /= 49
    out["prove_next_cpu"] /= 49
    out["chain_size"] = size
    rb = LedgerWorker(bootstrap, prefix + "rb", topics, LedgerConfig(key=key, origin="ledgerflow.bench"))
    if hasattr(rb, "_restore"):  # chain-head snapshots: what a restarted worker reads; then the full rebuild
        heads = timed("rebuild", lambda: [rb._restore(p).heads for p in range(3)])
        out["restore_read"] = sum(r.entries_read + r.snapshots_read for r in rb.restores)
        full = timed("rebuild_full", lambda: [rb._rebuild(p, "bench")[0].heads for p in range(3)])
        assert sum(h.size for part in full for h in part.values()) == n
    else:
        heads = timed("rebuild", lambda: [rb._rebuild(p) for p in range(3)])
    assert sum(h.size for part in heads for h in part.values()) == n
print(json.dumps(out))
"""

ROWS = [
    ("chain_rate", "one LedgerWorker, entries/s (steady state)", "{:,.0f}/s"),
    ("chain_rate_cpu", "one LedgerWorker, entries per CPU-second (process)", "{:,.0f}/s"),
    ("chain_thread_cpu", "one LedgerWorker, its thread on CPU (share of wall)", "{:.0%}"),
    ("chain_txns", "one LedgerWorker, transactions in the window", "{:.0f}"),
    ("verify_total", "`audit verify` from the log: from_log + verify", "{:.2f} s"),
    ("from_log", "  of which from_log (read + decode)", "{:.2f} s"),
    ("verify", "  of which verify (hashes, links, audit records, signatures)", "{:.2f} s"),
    ("verify_log_jobs", "verify_log(jobs=N): partitions in N processes", "{:.2f} s"),
    ("from_log_one_tenant", "from_log of one tenant (what `audit prove` reads)", "{:.2f} s"),
    ("prove_first", "prove, first of 50 on that chain (builds its tree)", "{:.4f} s"),
    ("prove_next", "prove, each of the other 49", "{:.6f} s"),
    ("rebuild", "worker head restore on assignment, all 3 partitions", "{:.2f} s"),
    ("restore_read", "  records read by it (snapshots + ledger tail)", "{:,.0f}"),
    ("rebuild_full", "worker full head rebuild (no snapshot), all 3 partitions", "{:.2f} s"),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True, help="tree of the old version (A)")
    parser.add_argument("--new", type=Path, default=REPO, help="tree of the new version (B; default this checkout)")
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--bootstrap", default="127.0.0.1:19192")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--batch-max", type=int, default=2000, help="the workers' batch_max (both sides)")
    parser.add_argument(
        "--chain-only", action="store_true", help="only the chaining rate (skip verify, prove, rebuild)"
    )
    args = parser.parse_args()
    from domain.checkpoint import generate_key, save_key_pair

    run = uuid.uuid4().hex[:8]
    codec = Codec()
    tenants = [f"bench-tenant-{i}" for i in range(5)]
    encoded = encode_audits(codec, args.entries, tenants)
    created: list[str] = []
    groups: list[str] = []
    results: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    print(f"run {run}: {args.entries:,} entries, {PARTITIONS} partitions; load {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        key_path = Path(tmp) / "signing.key"
        save_key_pair(generate_key("ledgerflow.bench/audit"), key_path)
        try:
            for rnd in range(args.rounds):
                for side in ("A", "B") if rnd % 2 == 0 else ("B", "A"):
                    tree = args.old if side == "A" else args.new
                    topics = make_topics(args.bootstrap, f"bench-ledger-ab-{run}-{side}{rnd}-")
                    created += [topics.name(k) for k in ("audit", "ledger", "ledger-checkpoints")]
                    created.append(topics.dlq(topics.name("audit")))
                    created.append(topics.ledger_heads())  # the new worker's snapshots (absent for the old)
                    groups += [f"{topics.prefix}g", f"{topics.prefix}rb"]
                    produce_audits(args.bootstrap, topics.name("audit"), encoded)
                    started = time.perf_counter()
                    child = subprocess.run(
                        [sys.executable, "-c", CHILD, args.bootstrap, topics.prefix, str(args.entries),
                         str(key_path), str(args.jobs), str(args.batch_max), "1" if args.chain_only else "0"],
                        cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)}, capture_output=True, text=True,
                        timeout=1800,
                    )  # fmt: skip
                    if child.returncode != 0:
                        raise RuntimeError(f"{side} failed:\n{child.stderr[-3000:]}")
                    result = json.loads(child.stdout.strip().splitlines()[-1])
                    results[side].append(result)
                    print(f"round {rnd} {side}: {time.perf_counter() - started:.0f} s, {result}", flush=True)
        finally:
            cleanup(args.bootstrap, created, groups)
    print(f"load after: {os.getloadavg()}")
    print("\nWall time swings with the neighbours; CPU time (this process and its children, Kafka")
    print("client threads included) much less: read the CPU rows for the code, the wall rows for the box.")
    print("Medians over the rounds; B/A is the ratio of the medians.")
    print("\n| measure | A (old) | B (new) | B/A |\n| --- | ---: | ---: | ---: |")
    for key, label, fmt in ROWS:
        for suffix, kind in (("", "wall"), ("_cpu", "CPU")):
            if key.startswith("chain_") and suffix:
                continue
            k = key + suffix if key != "chain_rate_cpu" else key
            a = [r[k] for r in results["A"] if k in r]
            b = [r[k] for r in results["B"] if k in r]
            if not b:
                continue
            bv = statistics.median(b)
            av = statistics.median(a) if a else None
            ratio = f"{bv / av:.2f}×" if av else "—"
            a_text = fmt.format(av) if av is not None else "—"
            what = "" if key.startswith("chain_") else f", {kind}"
            print(f"| {label}{what} | {a_text} | {fmt.format(bv)} | {ratio} |")


if __name__ == "__main__":
    main()
