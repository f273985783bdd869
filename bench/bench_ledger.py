"""Audit ledger core: chaining rate, verify of a whole chain, proofs at 1M leaves, pymerkle beside ours.

Run: .venv/bin/python bench/bench_ledger.py [--entries 1000000] [--pymerkle-entries N] [--proofs 2000]
Single process, single thread (one core). Pure functions only: no broker, no ClickHouse, so
these are the ceilings of the code the agent and `ledgerflow audit` call, not end-to-end rates.

Steps (timed with perf_counter; the machine's load average is printed before and after):
1. build `--entries` distinct AuditRecorded (untimed), then chain them with `domain.ledger.chain`,
   checking `checkpoint_due` after each and signing a checkpoint every 10,000 (as the agent will);
2. `verify_chain` over the resulting LedgerEntryChained list: entries and checkpoints only, then
   again with every audit record re-hashed from its canonical bytes (the full auditor's check);
3. the Merkle tree over all entries: ours bulk-built and grown by appends, pymerkle's
   InmemoryTree (prefixes on) grown by appends over `--pymerkle-entries` (default: the same);
   the memory each tree holds, measured with tracemalloc over the first 200,000 leaves;
4. `--proofs` inclusion proofs at random leaves of the full tree, generation and verification
   timed separately (mean, p99), ours and pymerkle's; consistency proofs likewise;
5. proof files: build and offline check (Ed25519 signature included).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import random
import resource
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pymerkle import InmemoryTree

from domain.checkpoint import generate_key
from domain.ledger import (
    ChainState,
    audit_canonical_bytes,
    build_inclusion_proof_file,
    chain,
    check_proof_file,
    checkpoint_due,
    entry_bytes_of,
    make_checkpoint,
    verify_chain,
)
from domain.merkle import MerkleTree, leaf_hash, verify_consistency, verify_inclusion
from streams.events import AuditRecorded, Envelope, LedgerCheckpointSigned, LedgerEntryChained
from streams.ids import derived_uuid7

T0 = datetime(2026, 11, 28, tzinfo=UTC)
ACTIONS = ["request.completed", "policy.decided", "tokens.charged", "key.issued", "policy.published"]


def audits(n: int, tenant: str = "acme-corp") -> list[AuditRecorded]:
    """n distinct, realistic audit records (ids, times, actors, details all vary)."""
    rng = random.Random(6)
    base = "01930000-0000-7000-8000-000000000000"
    out = []
    for i in range(n):
        rid = str(derived_uuid7(base, str(i)))
        out.append(
            AuditRecorded(
                envelope=Envelope(
                    event_id=str(derived_uuid7(rid, "AuditRecorded")),
                    event_type="AuditRecorded",
                    schema_version=1,
                    tenant=tenant,
                    occurred_at=T0 + timedelta(microseconds=i * 997),
                    correlation_id=rid,
                    causation_id=str(derived_uuid7(rid, "TokensCharged")),
                    trace_parent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
                    producer="gateway",
                ),
                action=ACTIONS[i % len(ACTIONS)],
                actor=f"key_{rng.randrange(500):04d}",
                subject=rid,
                outcome="success" if rng.random() < 0.97 else "denied",
                details={
                    "model": "sim-small",
                    "cost": f"0.{rng.randrange(10**9):09d}",
                    "tokens": str(rng.randrange(9999)),
                },
            )
        )
    return out


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def per_call(fn: Callable[[int], Any], args: list[int]) -> tuple[float, float]:
    """Mean and p99 in microseconds of fn(a) over args, each call timed on its own."""
    samples = []
    for a in args:
        t = time.perf_counter()
        fn(a)
        samples.append((time.perf_counter() - t) * 1e6)
    samples.sort()
    return statistics.fmean(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def traced_mib(build: Callable[[], Any]) -> float:
    """MiB still allocated by what `build` returns (the leaf data itself is allocated before)."""
    gc.collect()
    tracemalloc.start()
    kept = build()
    current, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del kept
    return current / 2**20


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--pymerkle-entries", type=int, default=None, help="default: --entries; 0 skips pymerkle")
    parser.add_argument("--checkpoint-every", type=int, default=10_000)
    parser.add_argument("--proofs", type=int, default=2000)
    args = parser.parse_args()
    n = args.entries
    n_pm = n if args.pymerkle_entries is None else args.pymerkle_entries
    rng = random.Random(9162)
    rows: list[tuple[str, str]] = []

    def row(label: str, value: str) -> None:
        rows.append((label, value))
        print(f"{label:<62} {value}", flush=True)

    print(f"python {platform.python_version()} on {platform.machine()}, {os.cpu_count()} cpus")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    recs = audits(n)
    key = generate_key("ledgerflow.bench/audit")
    origin = "ledgerflow.bench/acme-corp"

    # 1. chaining
    def run_chain() -> tuple[ChainState, list[LedgerEntryChained], list[LedgerCheckpointSigned]]:
        state: ChainState | None = None
        entries: list[LedgerEntryChained] = []
        cps: list[LedgerCheckpointSigned] = []
        for offset, rec in enumerate(recs):
            state, out = chain(state, rec, 0, offset)
            entries.append(out)  # type: ignore[arg-type]
            if checkpoint_due(state, T0, args.checkpoint_every, 3600.0):
                state, cp = make_checkpoint(state, key, origin)
                cps.append(cp)
        assert state is not None
        if not cps:  # fewer entries than --checkpoint-every: sign the whole chain once
            state, cp = make_checkpoint(state, key, origin)
            cps.append(cp)
        return state, entries, cps

    secs, (state, entries, cps) = timed(run_chain)
    row(f"chain() fold, {n:,} entries, {len(cps)} checkpoints signed", f"{n / secs:,.0f} entries/s ({secs:.2f} s)")
    secs_c, _ = timed(lambda: [audit_canonical_bytes(r) for r in recs[:200_000]])
    row("audit_canonical_bytes alone (200k records)", f"{min(n, 200_000) / secs_c:,.0f} records/s")

    # 2. verify
    secs, report = timed(lambda: verify_chain(entries, None, cps, key.verifier))
    assert report.ok, report
    row(f"verify_chain, {n:,} entries + {len(cps)} checkpoints", f"{secs:.2f} s ({n / secs:,.0f} entries/s)")
    by_id = {r.envelope.event_id: r for r in recs}
    secs, report = timed(lambda: verify_chain(entries, by_id, cps, key.verifier))
    assert report.ok, report
    row(f"verify_chain, {n:,} entries + checkpoints + audit records re-hashed", f"{secs:.2f} s")

    # 3. trees
    leaves = [entry_bytes_of(e) for e in entries]
    secs, tree = timed(lambda: MerkleTree.from_entries(leaves))
    assert tree.root() == state.root
    row(f"ours: MerkleTree.from_entries, {n:,} leaves", f"{secs:.2f} s ({n / secs:,.0f} leaves/s)")
    ours_append_rate = 0.0

    def grow() -> MerkleTree:
        t = MerkleTree()
        for leaf in leaves:
            t.append(leaf)
        return t

    secs, grown = timed(grow)
    ours_append_rate = n / secs
    assert grown.root() == state.root
    del grown
    row(f"ours: MerkleTree.append x {n:,}", f"{secs:.2f} s ({ours_append_rate:,.0f} leaves/s)")

    pm: Any = None
    if n_pm:
        mem_n = min(n_pm, 200_000)
        row(
            f"memory held by the tree, {mem_n:,} leaves (tracemalloc)",
            f"ours {traced_mib(lambda: MerkleTree.from_entries(leaves[:mem_n])):.1f} MiB, "
            f"pymerkle {traced_mib(lambda: InmemoryTree.init_from_entries(leaves[:mem_n])):.1f} MiB",
        )

        def grow_pm() -> Any:
            t = InmemoryTree(algorithm="sha256")
            for leaf in leaves[:n_pm]:
                t.append_entry(leaf)
            return t

        secs, pm = timed(grow_pm)
        assert pm.get_root(n_pm) == tree.root(n_pm)
        pm_rate = n_pm / secs
        row(
            f"pymerkle: InmemoryTree.append_entry x {n_pm:,}",
            f"{secs:.2f} s ({pm_rate:,.0f} leaves/s; ours appends {ours_append_rate / pm_rate:.1f}x faster)",
        )

    # 4. proofs at n leaves
    idx = [rng.randrange(n) for _ in range(args.proofs)]
    paths = {i: tree.inclusion_proof(i) for i in idx}
    root = tree.root()
    gen_mean, gen_p99 = per_call(tree.inclusion_proof, idx)
    ver_mean, ver_p99 = per_call(lambda i: verify_inclusion(tree.leaf_hash(i), i, n, paths[i], root), idx)
    assert all(verify_inclusion(tree.leaf_hash(i), i, n, paths[i], root) for i in idx)
    row(f"ours: inclusion proof at {n:,} leaves, generate", f"mean {gen_mean:.1f} µs, p99 {gen_p99:.1f} µs")
    row(f"ours: inclusion proof at {n:,} leaves, verify", f"mean {ver_mean:.1f} µs, p99 {ver_p99:.1f} µs")
    if pm is not None:
        idx_pm = [rng.randrange(n_pm) for _ in range(args.proofs)]
        root_pm = pm.get_root()
        pm_proofs = {i: pm.prove_inclusion(i + 1) for i in idx_pm}
        pg_mean, pg_p99 = per_call(lambda i: pm.prove_inclusion(i + 1), idx_pm)
        pv_mean, pv_p99 = per_call(lambda i: pm_proofs[i].verify(pm.get_leaf(i + 1), root_pm), idx_pm)
        row(
            f"pymerkle: inclusion proof at {n_pm:,} leaves, generate",
            f"mean {pg_mean:.1f} µs, p99 {pg_p99:.1f} µs ({pg_mean / gen_mean:.1f}x ours)",
        )
        row(
            f"pymerkle: inclusion proof at {n_pm:,} leaves, verify",
            f"mean {pv_mean:.1f} µs, p99 {pv_p99:.1f} µs ({pv_mean / ver_mean:.1f}x ours)",
        )
    olds = [rng.randrange(1, n) for _ in range(args.proofs)]
    cproofs = {m: tree.consistency_proof(m) for m in olds}
    old_roots = {m: tree.root(m) for m in olds}
    cg_mean, cg_p99 = per_call(tree.consistency_proof, olds)
    cv_mean, cv_p99 = per_call(lambda m: verify_consistency(m, n, old_roots[m], root, cproofs[m]), olds)
    assert all(verify_consistency(m, n, old_roots[m], root, cproofs[m]) for m in olds)
    row(f"ours: consistency proof to {n:,} leaves, generate", f"mean {cg_mean:.1f} µs, p99 {cg_p99:.1f} µs")
    row(f"ours: consistency proof to {n:,} leaves, verify", f"mean {cv_mean:.1f} µs, p99 {cv_p99:.1f} µs")
    if pm is not None:
        olds_pm = [rng.randrange(1, n_pm) for _ in range(min(args.proofs, 500))]
        pcg_mean, _ = per_call(lambda m: pm.prove_consistency(m), olds_pm)
        row(
            f"pymerkle: consistency proof to {n_pm:,} leaves (not RFC order), generate",
            f"mean {pcg_mean:.1f} µs ({pcg_mean / cg_mean:.1f}x ours)",
        )
    rt_mean, _ = per_call(tree.root, olds)
    row(f"ours: root at an arbitrary size of a {n:,}-leaf tree", f"mean {rt_mean:.1f} µs")

    # 5. proof files
    last_cp = cps[-1]
    file_idx = [i for i in idx if i < last_cp.tree_size][:300]
    docs = {i: build_inclusion_proof_file(tree, last_cp, i, entry=entries[i]) for i in file_idx}
    b_mean, _ = per_call(lambda i: build_inclusion_proof_file(tree, last_cp, i, entry=entries[i]), file_idx)
    c_mean, c_p99 = per_call(lambda i: check_proof_file(docs[i], key.verifier), file_idx)
    assert all(check_proof_file(docs[i], key.verifier).ok for i in file_idx)
    row("proof file: build (from a built tree)", f"mean {b_mean:.1f} µs")
    row("proof file: check offline (Ed25519 + entry + path)", f"mean {c_mean:.1f} µs, p99 {c_p99:.1f} µs")

    row("leaf hash (SHA-256 of 0x00 || ~220-byte entry)", f"{per_call(lambda i: leaf_hash(leaves[i]), idx)[0]:.2f} µs")
    row("peak RSS of this process", f"{rss_mib():,.0f} MiB")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n| measure | result |\n| --- | --- |")
    for label, value in rows:
        print(f"| {label.strip()} | {value} |")


if __name__ == "__main__":
    main()
