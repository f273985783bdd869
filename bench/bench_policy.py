"""Policy decisions in process: latency of `PolicyEngine.decide`, the naive way beside it, and a 10k diff.

Run: .venv/bin/python bench/bench_policy.py [--decisions 20000] [--naive 2000] [--diff-inputs 10000]
Single process, single thread. Prints a Markdown table for BENCHMARKS.md.

The bundle is the shipped default plus 24 tenant and role policies (36 in all, 12 of them
with obligations); the store holds 200 tenants (every 5th EU-resident, every 7th on trial),
2,000 principals with tool scopes, 6 models and 5 tools. Inputs draw tenants and principals
from that store, classifications, models, tools and costs at random. Rows:
- decide, Ask only: a warm engine (every caller view seen before), one timing per decision;
- decide, 1-3 declared tools: Ask plus one UseTool per tool in one Cedar batch;
- decide, every decision a new caller: the entity cache misses, so each decision also
  parses its entities (the cost after a hot swap of attributes, or for a caller's first call);
- naive: `cedarpy.is_authorized` given the policy text, the schema text and the entity
  JSON of the call, so everything is parsed on every request (same inputs, Ask only);
- diff: the default+24 bundle against an edited candidate over 10k distinct inputs, cold
  (a fresh entity view, as `ledgerflow policy diff` starts).
Rows are run in interleaved rounds so a noisy neighbour hits them alike; the latency
percentiles pool every round.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path

import cedarpy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domain.policy import (
    AttributeChange,
    DecisionInput,
    EntityStore,
    EntityView,
    PolicyBundle,
    PolicyEngine,
    default_bundle_text,
    diff,
    fold_attributes,
    schema_json,
)
from domain.policy_engine import cedar_requests

TENANTS, PRINCIPALS = 200, 2000
MODELS = {"sim-small": "us", "sim-large": "us", "sim-medium": "us", "sim-eu": "eu", "sim-eu-large": "eu", "local": "eu"}
TOOLS = ("web_search", "calculator", "code_exec", "retrieval", "shell")
CLASSES = ("public", "internal", "internal", "internal", "confidential", "restricted")


def realistic_text() -> str:
    """The default bundle plus per-tenant model bans and per-role caps, as a platform team grows it."""
    extra = []
    for i in range(12):
        extra.append(
            f'@id("tenant-{i:03d}-no-large")\n'
            'forbid (principal, action == Ledgerflow::Action::"Ask",\n'
            f'        resource == Ledgerflow::Tenant::"tenant-{i:03d}")\n'
            f'when {{ context.model_hint == "sim-large" }};\n'
        )
        extra.append(
            f'@id("role-{i}-cap")\n@obligation("max_cost:{Decimal(i + 1) / 10}")\n'
            f'permit (principal, action == Ledgerflow::Action::"Ask", resource)\n'
            f'when {{ principal.roles.contains("role-{i}") }};\n'
        )
    return default_bundle_text() + "\n" + "\n".join(extra)


def candidate_text() -> str:
    """An edit worth a dry-run: no restricted data on trial tenants, a lower cap for role-3."""
    return (
        realistic_text().replace('@obligation("max_cost:0.4")', '@obligation("max_cost:0.25")')
        + '\n@id("trial-no-restricted")\nforbid (principal, action == Ledgerflow::Action::"Ask", resource)\n'
        + 'when { resource has tier && resource.tier == "trial" && context.data_classification == "restricted" };\n'
    )


def build_store(rng: random.Random) -> EntityStore:
    changes = []
    for t in range(TENANTS):
        attrs: dict[str, object] = {"tier": "trial" if t % 7 == 0 else "standard"}
        if t % 5 == 0:
            attrs["residency"] = "eu"
        changes.append(AttributeChange("Tenant", f"tenant-{t:03d}", attrs))
    for p in range(PRINCIPALS):
        principal: dict[str, object] = {
            "tool_scopes": rng.sample(TOOLS[:4], rng.randint(0, 4)),
            "roles": [f"role-{rng.randrange(16)}"],
        }
        if p % 2:
            principal["region"] = rng.choice(("eu", "us"))
        changes.append(AttributeChange("Principal", f"user-{p:04d}", principal))
    for name, region in MODELS.items():
        changes.append(AttributeChange("Model", name, {"region": region, "provider": "sim"}))
    for tool in TOOLS:
        changes.append(AttributeChange("Tool", tool, {"requires_role": "admin"} if tool == "shell" else {}))
    store, rejected = fold_attributes(EntityStore(), changes)
    assert not rejected, rejected
    return store


def callers(rng: random.Random, n: int) -> list[tuple[str, str]]:
    return [(f"tenant-{rng.randrange(TENANTS):03d}", f"user-{rng.randrange(PRINCIPALS):04d}") for _ in range(n)]


def make_inputs(
    rng: random.Random, n: int, *, tools: bool, pairs: Sequence[tuple[str, str]] = ()
) -> list[DecisionInput]:
    """`n` inputs from these (tenant, principal) pairs (none given: a new principal each time)."""
    out = []
    for i in range(n):
        tenant, principal = pairs[rng.randrange(len(pairs))] if pairs else (f"tenant-{i % TENANTS:03d}", f"new-{i}")
        declared = frozenset(rng.sample(TOOLS[:4], rng.randint(1, 3))) if tools else frozenset()
        out.append(
            DecisionInput(
                tenant=tenant,
                principal=principal,
                roles=frozenset({"dev"}),
                region=rng.choice(("eu", "us")),
                data_classification=rng.choice(CLASSES),
                tools=declared,
                model=rng.choice(("", "", "", *MODELS)),
                estimated_cost=Decimal(rng.randrange(1, 200_000)) / Decimal(1_000_000),
                route="/v1/chat/completions",
            )
        )
    return out


def timed(fn: Callable[[DecisionInput], object], inputs: Sequence[DecisionInput]) -> list[int]:
    out = []
    clock = time.perf_counter_ns
    for inp in inputs:
        start = clock()
        fn(inp)
        out.append(clock() - start)
    return out


def pct(samples: list[int], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] / 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--decisions", type=int, default=20_000, help="decisions per warm row, over all rounds")
    parser.add_argument("--naive", type=int, default=2_000, help="decisions in the naive and cold rows")
    parser.add_argument("--diff-inputs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    load_before = os.getloadavg()

    t0 = time.perf_counter()
    bundle = PolicyBundle.parse(realistic_text(), "bench-1")
    parse_ms = (time.perf_counter() - t0) * 1000
    candidate = PolicyBundle.parse(candidate_text(), "bench-2")
    store = build_store(rng)
    engine = PolicyEngine(bundle, store)

    known = callers(rng, 1000)  # the warm rows' callers: 1,000 pairs, half of them without a stored region
    ask_only = make_inputs(rng, args.decisions, tools=False, pairs=known)
    with_tools = make_inputs(rng, args.decisions, tools=True, pairs=known)
    cold = make_inputs(rng, args.naive, tools=False)
    naive_inputs = ask_only[: args.naive]
    for inp in ask_only + with_tools:  # warm: every caller view parsed once
        engine.decide(inp)
    view = engine.snapshot.view
    warm_entity_sets = view.cache_info().currsize

    policy_text, schema_text = bundle.text, schema_json()

    def naive(inp: DecisionInput) -> bool:
        entities = str(view.entities_for(inp))  # the call's entities as JSON text, parsed again below
        request = dict(cedar_requests(inp)[0])
        request["context"] = json.loads(request["context"])
        return cedarpy.is_authorized(request, policy_text, entities, schema_text).allowed

    naive_entities = {id(i): str(view.entities_for(i)) for i in naive_inputs}  # serialised outside the timing

    def naive_timed(inp: DecisionInput) -> bool:
        request = dict(cedar_requests(inp)[0])
        request["context"] = json.loads(request["context"])
        return cedarpy.is_authorized(request, policy_text, naive_entities[id(inp)], schema_text).allowed

    # The naive path decides as the engine does.
    for inp in naive_inputs[:200]:
        assert naive(inp) == engine.decide(inp).allow, inp

    def cold_decide(inp: DecisionInput) -> object:
        return engine.decide(inp)

    rows: list[tuple[str, Callable[[DecisionInput], object], list[DecisionInput]]] = [
        ("decide, Ask only (warm)", engine.decide, ask_only),
        ("decide, 1-3 declared tools (warm)", engine.decide, with_tools),
        ("decide, a new caller each time (entities parsed)", cold_decide, cold),
        ("naive: policies, schema and entities parsed per request", naive_timed, naive_inputs),
    ]
    samples: list[list[int]] = [[] for _ in rows]
    for r in range(args.rounds):
        for i, (_, fn, inputs) in enumerate(rows):
            chunk = len(inputs) // args.rounds
            part = inputs[r * chunk : (r + 1) * chunk]
            samples[i].extend(timed(fn, part))

    diff_inputs = make_inputs(rng, args.diff_inputs, tools=False, pairs=callers(rng, 3000))
    fresh = EntityView(store)
    t0 = time.perf_counter()
    report = diff(bundle, candidate, diff_inputs, fresh)
    diff_s = time.perf_counter() - t0
    load_after = os.getloadavg()
    info = view.cache_info()

    print(
        f"python {platform.python_version()}, cedarpy {version('cedarpy')}, {platform.machine()}, "
        f"{os.cpu_count()} cores; bundle of {bundle.policy_count} policies parsed and validated in {parse_ms:.1f} ms; "
        f"store of {len(store)} entities; {warm_entity_sets:,} caller entity sets cached for the warm rows, "
        f"entity cache {info.hits:,} hits / {info.misses:,} misses over the run\n"
        f"load average before {load_before[0]:.2f}, after {load_after[0]:.2f} (1 min)\n"
    )
    print("| row | decisions | p50 µs | p99 µs | max µs | mean µs |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for (name, _, _), s in zip(rows, samples, strict=True):
        print(
            f"| {name} | {len(s):,} | {pct(s, 0.5):,.0f} | {pct(s, 0.99):,.0f} | {max(s) / 1000:,.0f} "
            f"| {statistics.mean(s) / 1000:,.0f} |"
        )
    warm_p50, naive_p50 = pct(samples[0], 0.5), pct(samples[3], 0.5)
    ratio_p99 = pct(samples[3], 0.99) / pct(samples[0], 0.99)
    print(f"\nnaive / warm engine, p50: {naive_p50 / warm_p50:.1f}x; p99: {ratio_p99:.1f}x")
    print(
        f"\ndiff of {report.evaluated:,} inputs ({report.evaluated * 2:,} decisions, "
        f"{fresh.parses:,} entity sets parsed): {diff_s:.2f} s, {report.flipped:,} flipped"
    )
    for line in report.lines()[1:]:
        print(line)


if __name__ == "__main__":
    main()
