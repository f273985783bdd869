"""Rate limits: GCRA arithmetic, the in-process limiter, the Redis limiter, and replicas.

The Redis tests run a real Debian redis-server (``tests/redis_fixture.py`` starts one from a
temporary directory).  The replica test runs 3 OS processes, each an asyncio load loop with
its own RedisRateLimiter and connection pool, against one server on 127.0.0.1.

Also a replica worker: ``python -m tests.test_limits replica ...`` (used by that test).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.limits import (
    EPS_S,
    Decision,
    Limits,
    LocalRateLimiter,
    RedisRateLimiter,
    Remaining,
    decide,
    gcra_charge,
    gcra_remaining,
    gcra_step,
    static_limits,
)
from infra.redis import start, stop
from tests.redis_fixture import redis_server, redis_url  # noqa: F401  (fixtures)

REPO = Path(__file__).resolve().parents[1]

# Until pyproject registers the marker, don't warn about it.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
    needs_redis = pytest.mark.redis


def _tenant() -> str:
    return f"tenant-{uuid.uuid4().hex[:12]}"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# ------------------------------------------------------------------ GCRA, pure


def test_burst_then_one_per_interval() -> None:
    # 60/min = one per second, burst 5: five at once, then the sixth waits exactly 1 s.
    tat: float | None = None
    now = 100.0
    for _ in range(5):
        step = gcra_step(tat, now, 1, 1.0, 5)
        assert step.allowed
        tat = step.new_tat
    denied = gcra_step(tat, now, 1, 1.0, 5)
    assert not denied.allowed
    assert denied.wait == pytest.approx(1.0)
    assert gcra_remaining(denied.base, now, 1.0, 5) == 0
    # A denial is pure: retrying the same state later behaves as if the denial never happened.
    assert gcra_step(tat, now + 1.0, 1, 1.0, 5).allowed
    assert not gcra_step(tat, now + 0.99, 1, 1.0, 5).allowed


def test_steady_rate_under_overload() -> None:
    # Offered 20/s against 600/min (10/s), burst 10, for 30 s: admits burst + 10/s * 30 s.
    limits = Limits(requests_per_min=600, request_burst=10)
    tat: float | None = None
    admitted = 0
    for i in range(20 * 30 + 1):
        now = i / 20
        decision, r_new, _ = decide(limits, tat, None, now, 0)
        if decision.allowed:
            admitted += 1
            tat = r_new
    assert admitted == 10 + 300  # 10 at t=0, then one per 0.1 s from t=0.1 through t=30.0


@settings(max_examples=150, deadline=None)
@given(
    per_min=st.integers(min_value=1, max_value=100_000),
    capacity=st.integers(min_value=1, max_value=500),
    events=st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=3.0), st.integers(min_value=0, max_value=600)),
        min_size=1,
        max_size=60,
    ),
)
def test_retry_after_is_exact_and_window_bound_holds(
    per_min: int, capacity: int, events: list[tuple[float, int]]
) -> None:
    interval = 60.0 / per_min
    now, tat = 50.0, None
    admitted: list[tuple[float, int]] = []
    for gap, cost in events:
        now += gap
        step = gcra_step(tat, now, cost, interval, capacity)
        if step.allowed:
            tat = step.new_tat
            admitted.append((now, cost))
            continue
        if cost > capacity:
            assert math.isinf(step.wait)
            continue
        # Waiting exactly retry_after admits this same request; waiting 10 µs less does not.
        assert step.wait > EPS_S
        assert gcra_step(tat, now + step.wait, cost, interval, capacity).allowed
        if step.wait > 2e-5:
            assert not gcra_step(tat, now + step.wait - 1e-5, cost, interval, capacity).allowed
    # Any window [a, b] between admissions admits at most capacity + (b - a) * rate units.
    for i, (a, _) in enumerate(admitted):
        total = 0
        for b, cost in admitted[i:]:
            total += cost
            assert total <= capacity + (b - a) / interval + 1e-3


def test_both_kinds_checked_and_denial_charges_nothing() -> None:
    limits = Limits(requests_per_min=60, tokens_per_min=600, request_burst=10, token_burst=100)
    d, r_new, t_new = decide(limits, None, None, 0.0, 80)
    assert d.allowed and r_new == pytest.approx(1.0) and t_new == pytest.approx(8.0)
    assert d.remaining == Remaining(requests=9, tokens=20)
    # Tokens refuse (80 + 30 > 100) while requests would admit: nothing is charged.
    d, r_new2, t_new2 = decide(limits, r_new, t_new, 0.0, 30)
    assert not d.allowed and d.limit_kind == "tokens"
    assert r_new2 is None and t_new2 is None
    assert d.retry_after_s == pytest.approx(1.0)  # 10 tokens short at 10 tokens/s
    assert d.remaining == Remaining(requests=9, tokens=20)
    # Requests refuse: burst 10 used up.
    rt: float | None = None
    for _ in range(10):
        d, rt, _ = decide(Limits(requests_per_min=60, request_burst=10), rt, None, 0.0, 0)
        assert d.allowed
    d, _, _ = decide(Limits(requests_per_min=60, request_burst=10), rt, None, 0.0, 0)
    assert d.limit_kind == "requests" and d.retry_after_s == pytest.approx(1.0)


def test_request_too_big_for_token_burst_is_never_admitted() -> None:
    limits = Limits(tokens_per_min=1000)  # token burst defaults to a minute's worth
    d, _, _ = decide(limits, None, None, 0.0, 1001)
    assert not d.allowed and d.limit_kind == "tokens" and math.isinf(d.retry_after_s)
    assert "Retry-After" not in d.headers()
    assert decide(limits, None, None, 0.0, 1000)[0].allowed


def test_charge_debt_and_refund() -> None:
    # 600 tokens/min = 10/s.  A debt of 50 tokens delays the next admission by 5 s ...
    assert gcra_charge(None, 10.0, 50, 0.1) == pytest.approx(15.0)
    # ... a refund never takes the cell below rest (no credit beyond the burst) ...
    assert gcra_charge(12.0, 10.0, -50, 0.1) == 10.0
    assert gcra_charge(None, 10.0, -5, 0.1) == 10.0
    # ... and a partial refund takes back exactly what it says.
    assert gcra_charge(14.0, 10.0, -20, 0.1) == pytest.approx(12.0)


def test_limits_defaults_validation_and_headers() -> None:
    limits = Limits(requests_per_min=600, tokens_per_min=90_000)
    assert limits.request_capacity == 100  # 10 s worth
    assert limits.token_capacity == 90_000  # a minute's worth
    assert Limits(requests_per_min=3).request_capacity == 1
    assert Limits().unlimited
    with pytest.raises(ValueError):
        Limits(requests_per_min=-1)
    with pytest.raises(ValueError):
        Limits(requests_per_min=1, request_burst=0)
    denied = Decision(False, 0.2, "requests", Remaining(0, 500), limits)
    assert denied.headers() == {
        "Retry-After": "1",
        "x-ratelimit-limit-requests": "600",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-limit-tokens": "90000",
        "x-ratelimit-remaining-tokens": "500",
    }
    assert Decision(False, 2.01, "tokens").retry_after_header == "3"
    lookup = static_limits(Limits(requests_per_min=1), {"vip": Limits(requests_per_min=1000)})
    assert lookup("vip").requests_per_min == 1000 and lookup("other").requests_per_min == 1


# --------------------------------------------------------------- in process


async def test_local_tokens_per_min_with_reconcile() -> None:
    clock = FakeClock()
    # 6000 tokens/min = 100 tokens/s, burst 1000; no request limit.
    lim = LocalRateLimiter(Limits(tokens_per_min=6000, token_burst=1000), clock=clock)
    t = _tenant()
    assert (await lim.acquire(t, tokens=600)).allowed
    d = await lim.acquire(t, tokens=500)
    assert not d.allowed and d.limit_kind == "tokens"
    assert d.retry_after_s == pytest.approx(1.0) and d.remaining.tokens == 400
    assert d.remaining.requests is None
    # The call used 900 tokens, not the 600 estimated: 300 more are charged, no refusal.
    await lim.reconcile(t, estimated=600, actual=900)
    d = await lim.acquire(t, tokens=500)
    assert d.retry_after_s == pytest.approx(4.0)  # 900 used of 1000; needs 400 more -> 4 s
    clock.now += d.retry_after_s
    assert (await lim.acquire(t, tokens=500)).allowed
    # Over a minute of hammering, admitted tokens = burst + 60 s * 100/s (estimates exact).
    t2 = _tenant()
    admitted = 0
    for i in range(6000):
        clock.now = 2000.0 + i * 0.01
        if (await lim.acquire(t2, tokens=37)).allowed:
            admitted += 37
    span = 5999 * 0.01
    assert 1000 + 100 * span - 37 <= admitted <= 1000 + 100 * span


async def test_local_unlimited_and_sweep() -> None:
    clock = FakeClock()
    lim = LocalRateLimiter(
        static_limits(Limits(requests_per_min=60), {"free": Limits()}),
        clock=clock,
    )
    assert (await lim.acquire("free", tokens=10**9)).allowed
    for i in range(LocalRateLimiter._SWEEP_EVERY - 1):
        await lim.acquire(f"t{i}")
    assert len(lim._cells) == LocalRateLimiter._SWEEP_EVERY - 1
    clock.now += 120  # every cell back at rest
    await lim.acquire("last")
    assert len(lim._cells) <= 1


# ------------------------------------------------------------------- Redis


@needs_redis
async def test_local_and_redis_agree_on_the_same_timestamps(redis_url: str) -> None:  # noqa: F811
    rng = random.Random(20240601)
    lookup = static_limits(
        Limits(requests_per_min=120, tokens_per_min=3000, request_burst=3, token_burst=500),
        {
            "tok": Limits(tokens_per_min=1000),
            "odd": Limits(requests_per_min=7, tokens_per_min=777, token_burst=333),  # inexact intervals
            "free": Limits(),
        },
    )
    clock = FakeClock(1000.0)
    local = LocalRateLimiter(lookup, clock=clock)
    remote = RedisRateLimiter.from_url(redis_url, lookup, key_prefix=f"p{uuid.uuid4().hex[:8]}:", clock=clock)
    tenants = ["both", "tok", "odd", "free"]
    outcomes = {"allowed": 0, "requests": 0, "tokens": 0, "never": 0}
    try:
        for _ in range(600):
            clock.now += rng.choice([0.0, 0.0, 0.001, 0.05, 0.3, 1.7, rng.uniform(0.0, 2.0)])
            tenant = rng.choice(tenants)
            if rng.random() < 0.15:
                est, act = rng.randint(0, 300), rng.randint(0, 300)
                await local.reconcile(tenant, est, act)
                await remote.reconcile(tenant, est, act)
                continue
            tokens = rng.choice([0, rng.randint(1, 120), rng.randint(100, 400), 600])
            a = await local.acquire(tenant, tokens)
            b = await remote.acquire(tenant, tokens)
            assert a == b, (tenant, tokens, clock.now)  # bit-identical floats included
            assert not b.degraded
            if a.allowed:
                outcomes["allowed"] += 1
            elif math.isinf(a.retry_after_s):
                outcomes["never"] += 1
            else:
                outcomes[str(a.limit_kind)] += 1
    finally:
        await remote.aclose()
    assert all(n > 5 for n in outcomes.values()), outcomes  # the sequence exercised every branch


@needs_redis
async def test_redis_server_clock_burst_retry_and_expiry(redis_url: str) -> None:  # noqa: F811
    import redis.asyncio as aioredis

    # one per 0.5 s: the last two acquires must land within one interval of the wait's end,
    # which a CI box at load 14 once missed at 0.1 s (two tokens had come back)
    limits = Limits(requests_per_min=120, request_burst=3)
    lim = RedisRateLimiter.from_url(redis_url, limits)
    raw = aioredis.Redis.from_url(redis_url)
    t = _tenant()
    r_key, t_key = lim.keys(t)
    try:
        for expected_left in (2, 1, 0):
            d = await lim.acquire(t)
            assert d.allowed and d.remaining.requests == expected_left
        d = await lim.acquire(t)
        denied_at = time.monotonic()
        assert not d.allowed and d.limit_kind == "requests"
        assert 0.25 < d.retry_after_s <= 0.5 + 1e-6
        assert d.headers()["Retry-After"] == "1"
        # Denials write nothing: same value, TTL only running down.
        before = await raw.get(r_key)
        for _ in range(20):
            assert not (await lim.acquire(t)).allowed
        assert await raw.get(r_key) == before
        assert await raw.exists(t_key) == 0  # no token limit: that cell is never touched
        ttl_ms = await raw.pttl(r_key)
        assert 0 < ttl_ms <= 1500 + 1000 + 5
        await asyncio.sleep(max(0.0, denied_at + d.retry_after_s + 0.005 - time.monotonic()))
        assert (await lim.acquire(t)).allowed
        assert not (await lim.acquire(t)).allowed
    finally:
        await raw.aclose()
        await lim.aclose()


@needs_redis
async def test_redis_down_fail_open_or_closed(
    redis_server,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits = Limits(requests_per_min=60, request_burst=1)
    fail_open = RedisRateLimiter.from_url(redis_server.url, limits)
    fail_closed = RedisRateLimiter.from_url(redis_server.url, limits, fail_open=False)
    t = _tenant()
    try:
        assert (await fail_open.acquire(t)).allowed
        d = await fail_closed.acquire(t)  # another "replica": the burst of 1 is used up
        assert not d.allowed and d.limit_kind == "requests" and not d.degraded

        stop(redis_server)  # mid-test: the server goes away under both limiters
        with caplog.at_level(logging.WARNING, logger="ledgerflow.gateway.limits"):
            began = time.monotonic()
            d = await fail_open.acquire(t)
            d2 = await fail_open.acquire(t)
            took = time.monotonic() - began
        assert d.allowed and d.degraded and d.limit_kind is None
        assert d2.allowed and d2.degraded
        assert took < 2.0  # fails fast, never hangs the request
        warnings_logged = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings_logged) == 1  # rate-limited: one warning, not one per request
        assert "fail-open" in warnings_logged[0].getMessage()
        assert fail_open.backend_failures == 2

        d = await fail_closed.acquire(t)
        assert not d.allowed and d.degraded and d.limit_kind == "unavailable"
        assert d.headers()["Retry-After"] == "1"
        await fail_closed.reconcile(t, 0, 10)  # best effort: no raise while down

        start(redis_server)  # back, empty (no persistence) and without the script: NOSCRIPT -> reload
        d = await fail_open.acquire(t)
        assert d.allowed and not d.degraded
        d = await fail_closed.acquire(t)
        assert not d.allowed and d.limit_kind == "requests" and not d.degraded
    finally:
        await fail_open.aclose()
        await fail_closed.aclose()


# ----------------------------------------------------------------- replicas

REPLICAS = 3
DURATION_S = 6.0
TASKS_PER_TENANT = 6
MAX_CALLS_PER_REPLICA = 400_000  # bound on the load loop besides time


def _replica_main(argv: list[str]) -> int:
    """One gateway 'replica': an asyncio load loop on its own limiter and connection pool."""
    url, prefix, tenant_r, tenant_t, start_at, duration, seed = argv
    lookup = static_limits(
        Limits(),
        {
            tenant_r: Limits(requests_per_min=600, request_burst=10),
            tenant_t: Limits(tokens_per_min=60_000, token_burst=2_000),
        },
    )
    rng = random.Random(int(seed))

    async def run() -> dict[str, dict[str, float]]:
        lim = RedisRateLimiter.from_url(url, lookup, key_prefix=prefix)
        await lim._client.ping()  # connect before the start line
        stats = {
            t: {"calls": 0, "admitted": 0, "tokens": 0, "degraded": 0, "first": math.inf, "last": -math.inf}
            for t in (tenant_r, tenant_t)
        }
        await asyncio.sleep(max(0.0, float(start_at) - time.time()))
        end = time.monotonic() + float(duration)
        budget = [MAX_CALLS_PER_REPLICA]

        async def hammer(tenant: str) -> None:
            s = stats[tenant]
            while time.monotonic() < end and budget[0] > 0:
                budget[0] -= 1
                cost = rng.randint(20, 120) if tenant == tenant_t else 0
                d = await lim.acquire(tenant, cost)
                server_now = lim.last_server_now
                assert server_now is not None
                s["calls"] += 1
                s["first"] = min(s["first"], server_now)
                s["last"] = max(s["last"], server_now)
                s["degraded"] += d.degraded
                if d.allowed:
                    s["admitted"] += 1
                    s["tokens"] += cost

        await asyncio.gather(*(hammer(t) for t in (tenant_r, tenant_t) for _ in range(TASKS_PER_TENANT)))
        await lim.aclose()
        return stats

    print(json.dumps(asyncio.run(run())))
    return 0


@needs_redis
def test_three_replicas_admit_the_limit_within_5_percent(redis_url: str) -> None:  # noqa: F811
    prefix = f"rep{uuid.uuid4().hex[:8]}:"
    tenant_r, tenant_t = _tenant(), _tenant()
    start_at = time.time() + 2.0  # all three start hammering together
    worker = [sys.executable, "-m", "tests.test_limits", "replica", redis_url, prefix, tenant_r, tenant_t]
    procs = [
        subprocess.Popen(
            [*worker, repr(start_at), str(DURATION_S), str(i)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(REPLICAS)
    ]
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=DURATION_S + 20)
            assert p.returncode == 0, err
            results.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    report = {}
    for tenant, kind, rate_per_s, burst in ((tenant_r, "requests", 10.0, 10), (tenant_t, "tokens", 1000.0, 2000)):
        per = [r[tenant] for r in results]
        assert all(s["degraded"] == 0 for s in per)
        assert all(s["admitted"] > 0 for s in per), per  # every replica got a share
        window = max(s["last"] for s in per) - min(s["first"] for s in per)  # Redis server clock
        got = sum(s["tokens"] if kind == "tokens" else s["admitted"] for s in per)
        expected = burst + rate_per_s * window
        calls = sum(s["calls"] for s in per)
        report[kind] = {"admitted": got, "expected": round(expected, 1), "window_s": round(window, 3), "calls": calls}
        assert calls > 5 * sum(s["admitted"] for s in per)  # the limit was really contended
        assert abs(got - expected) <= 0.05 * expected, report
        # Atomicity: never more than GCRA allows in the window (no race lets a replica over-admit).
        assert got <= expected + 1e-3, report
    print(f"\nreplica admission: {json.dumps(report)}")


if __name__ == "__main__" and sys.argv[1:2] == ["replica"]:
    sys.exit(_replica_main(sys.argv[2:]))
