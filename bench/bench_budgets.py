"""What a budget hold costs on the request path (issue 7): reserve + settle, in process and in Redis.

Run: .venv/bin/python bench/bench_budgets.py [--calls 5000] [--concurrency 50] [--rounds 3]

Starts its own redis-server (infra.redis, a free port, no persistence). Side by side, in
alternating order, each `--rounds` times: `--calls` hold+settle pairs on one hard budget,
`--concurrency` at a time, against LocalBudgetLedger and RedisBudgetLedger (two EVALSHA of
BUDGET_LUA per call), and for scale the rate limiter's one EVALSHA (RedisRateLimiter.acquire).
Prints calls/s and the per-call latency percentiles of each; the machine is shared, so compare
the ratios within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domain.budget import Line
from gateway.budgets import BudgetLedger, LocalBudgetLedger, RedisBudgetLedger
from gateway.limits import Limits, RedisRateLimiter
from infra.redis import RedisConfig, start, stop
from tests.conftest import free_port


async def timed(calls: int, concurrency: int, one: Callable[[int], Awaitable[None]]) -> tuple[float, list[float]]:
    latencies: list[float] = []
    sem = asyncio.Semaphore(concurrency)

    async def run(i: int) -> None:
        async with sem:
            t = time.perf_counter()
            await one(i)
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(run(i) for i in range(calls)))
    return calls / (time.perf_counter() - t0), latencies


def hold_and_settle(ledger: BudgetLedger) -> Callable[[int], Awaitable[None]]:
    lines = [Line(10**30, True, (50, 80, 100))]
    ids = itertools.count()

    async def one(_i: int) -> None:
        rid = f"r{next(ids)}"
        out = await ledger.reserve("acme", rid, ["b:1"], lines, 12_345_678, time.time(), time.time() + 300)
        assert out.status == "ok", out
        await ledger.settle("acme", rid, ["b:1"], lines, 1_234_567)

    return one


async def main_async(args: argparse.Namespace, url: str) -> None:
    local = LocalBudgetLedger()
    redis_ledger = RedisBudgetLedger.from_url(url, key_prefix=f"bench{uuid.uuid4().hex[:6]}:")
    limiter = RedisRateLimiter.from_url(url, Limits(requests_per_min=10**9))
    for led in (local, redis_ledger):
        await led.restore("acme", "b:1", 0, None)

    async def acquire(_i: int) -> None:
        await limiter.acquire("acme")

    cases: dict[str, Callable[[int], Awaitable[None]]] = {
        "budget hold+settle, in process": hold_and_settle(local),
        "budget hold+settle, Redis (2 EVALSHA)": hold_and_settle(redis_ledger),
        "rate limit acquire, Redis (1 EVALSHA)": acquire,
    }
    results: dict[str, list[tuple[float, list[float]]]] = {k: [] for k in cases}
    names = list(cases)
    for r in range(args.rounds):
        for name in names if r % 2 == 0 else reversed(names):
            results[name].append(await timed(args.calls, args.concurrency, cases[name]))
    print(f"{args.calls} calls x {args.rounds} rounds, {args.concurrency} concurrent")
    for name, runs in results.items():
        rates = [r for r, _ in runs]
        lat = sorted(x for _, ls in runs for x in ls)
        p50, p99 = lat[len(lat) // 2] * 1e3, lat[int(len(lat) * 0.99)] * 1e3
        print(f"  {name:<40} {statistics.median(rates):>9.0f} calls/s (median)  p50 {p50:.2f} ms  p99 {p99:.2f} ms")
    await redis_ledger.aclose()
    await limiter.aclose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = RedisConfig(home=Path(tmp), port=free_port())
        start(cfg)
        try:
            asyncio.run(main_async(args, cfg.url))
        finally:
            stop(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
