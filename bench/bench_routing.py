"""Routing decision latency: what the gateway spends to pick a model, default features.

Run: OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/bench_routing.py [--data FILE.jsonl] [--decisions 5000]
Single process, single thread. Prints a Markdown table for BENCHMARKS.md.

The decision timed is `gateway.router.Router.decide` as the request path calls it: features
of the prompt, a posterior mean and variance per candidate (river's BayesianLinearRegression),
expected cost per candidate in Decimal, the capped exploration and the draw. Priors are
trained first (full feedback on the first `--train` prompts, so every model has a posterior
of full dimension), then swapped into the router as a published version would be. Prompts
are the data file's (or generated ones if it is absent), in file order. Rows:
- decide, 2 models / 6 models, 16 buckets (the default) and 64 buckets;
- features only (the text pass), for the split.
Rows run in interleaved rounds so a noisy neighbour hits them alike; percentiles pool the rounds.
Each decision is also repeated `--repeat` times (default 3, same request): the last column is
the p99 over prompts of each prompt's best CPU time, which keeps the prompt-to-prompt spread
(long prompts cost more) and drops most of what a neighbour's interference adds to one run.
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
from collections.abc import Callable
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domain.pricing import Price
from domain.routing import Priors
from domain.routing_features import FeatureConfig, features
from gateway.router import Router
from streams.events import Envelope, RoutingPriorsPublished

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "routing" / "dev-mmlu.jsonl"


def prompts(path: Path, n: int) -> list[str]:
    if path.exists():
        with path.open() as fh:
            return [json.loads(line)["prompt"] for _, line in zip(range(n), fh, strict=False)]
    rng = random.Random(3)
    words = ["the", "of", "model", "answer", "equation", "function", "river", "bridge", "matrix", "poem", "city"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 300))) for _ in range(n)]


def router_with(models: list[str], buckets: int, train: list[str]) -> Router:
    priors = Priors(config=FeatureConfig(buckets=buckets))
    rng = random.Random(5)
    for text in train:
        x = priors.features(text)
        for m in models:
            priors.learn_quality(m, x, float(rng.random() < 0.7))
    for m in models:
        priors.learn_completion(m, rng.randint(20, 400))
        priors.learn_latency(m, rng.uniform(200, 2000))
    router = Router()
    body = priors.to_json()
    env = Envelope("0190a000-0000-7000-8000-000000000000", "RoutingPriorsPublished", 1, "_platform",
                   _now(), "0190a000-0000-7000-8000-000000000000", "bench")  # fmt: skip
    router.apply(RoutingPriorsPublished(env, "bench", "blr-capped-thompson-v1", len(priors.contexts),
                                        priors.feedback_count, _now(), body, "x"))  # fmt: skip
    return router


def _now():  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    return datetime.now(UTC)


def prices_for(models: list[str]) -> dict[str, Price]:
    return {m: Price(m, Decimal(i + 1) / 10, Decimal(i + 1) * 4 / 10, "USD", "b") for i, m in enumerate(models)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--decisions", type=int, default=5000)
    ap.add_argument("--train", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    texts = prompts(args.data, args.train + args.decisions)
    train, test = texts[: args.train], texts[args.train :]
    two = ["strong", "weak"]
    six = [f"m{i}" for i in range(6)]
    rows: dict[str, Callable[[str, int], object]] = {}
    for label, models, buckets in (("2 models, 16 buckets (default)", two, 16), ("6 models, 16 buckets", six, 16),
                                   ("2 models, 64 buckets", two, 64)):  # fmt: skip
        r = router_with(models, buckets, train)
        p = prices_for(models)
        allowed = models[:-1] if len(models) > 2 else models  # one forbidden among six

        def decide(text: str, i: int, r: Router = r, p: dict[str, Price] = p, ms: list[str] = models,
                   al: list[str] = allowed) -> object:  # fmt: skip
            return r.decide("acme", f"req-{i}", text, ms, al, p, len(text) // 4, 512, None)

        rows[f"decide: {label}"] = decide
    cfg = FeatureConfig()
    rows["features only (16 buckets)"] = lambda text, _i: features(text, cfg)
    timings: dict[str, list[float]] = {k: [] for k in rows}
    cpu: dict[str, list[float]] = {k: [] for k in rows}
    best: dict[str, list[float]] = {k: [] for k in rows}
    per_round = max(1, len(test) // args.rounds)
    for rnd in range(args.rounds):
        chunk = test[rnd * per_round : (rnd + 1) * per_round]
        for name, fn in rows.items():
            for i, text in enumerate(chunk):
                c, t = time.thread_time_ns(), time.perf_counter_ns()
                fn(text, i)
                timings[name].append((time.perf_counter_ns() - t) / 1000.0)
                cpu[name].append((time.thread_time_ns() - c) / 1000.0)
                fastest = cpu[name][-1]
                for _ in range(args.repeat - 1):
                    c = time.thread_time_ns()
                    fn(text, i)
                    fastest = min(fastest, (time.thread_time_ns() - c) / 1000.0)
                best[name].append(fastest)
    print(f"routing decisions, {len(test)} prompts x {len(rows)} rows, {args.rounds} interleaved rounds; "
          f"python {platform.python_version()}, river {version('river')}, numpy {version('numpy')}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")  # fmt: skip
    print()
    print("wall = perf_counter (includes time descheduled by neighbours); cpu = this thread's CPU time")
    print()
    print(f"| row | wall p50 µs | wall p99 µs | cpu p50 µs | cpu p90 µs | cpu p99 µs | cpu mean µs "
          f"| cpu p99, best of {args.repeat} µs |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, ts in timings.items():
        w = statistics.quantiles(ts, n=100)
        q = statistics.quantiles(cpu[name], n=100)
        b = statistics.quantiles(best[name], n=100)
        print(f"| {name} | {w[49]:.0f} | {w[98]:.0f} | {q[49]:.0f} | {q[89]:.0f} | {q[98]:.0f} | "
              f"{statistics.fmean(cpu[name]):.0f} | {b[98]:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
