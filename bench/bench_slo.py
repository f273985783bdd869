"""What recording RequestCompleted costs the gateway, and how fast the burn-rate fold runs.

Run:  .venv/bin/python bench/bench_slo.py --bootstrap 127.0.0.1:PORT [--requests 2000] [--rounds 3]
          [--concurrency 16] [--fold-events 50000]

On demand only (never part of the test suite). Part 1: one gateway app in process (aiohttp,
the simulated model with no latency) with the real transactional publisher on the given
broker, served twice — with `record_completions` off and on — in alternating rounds (off, on,
off, on, ...) so machine noise is shared; the client (aiohttp, `--concurrency` in flight) runs
in the same process. Reports requests/s and p50/p99 latency per mode and the on/off ratios.
Part 2: `domain.slo.fold` over `--fold-events` synthetic RequestCompleted of one tenant
(1 per 50 ms of event time, 1% 5xx): events/s and the stored state's JSON size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta

import aiohttp
from aiohttp import web

from domain.slo import SloState, fold
from gateway.app import always_ready, create_app
from gateway.auth import KeyStore
from ledgerflow.settings import hash_key
from streams.admin import ensure_topics
from streams.events import Envelope, RequestCompleted
from streams.ids import uuid7
from streams.publisher import FactPublisher
from streams.topics import Topics

KEY = "lf_bench_secret"


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"


async def load(url: str, n: int, concurrency: int) -> tuple[float, list[float], int]:
    """n requests, `concurrency` in flight: (seconds, latencies in ms, non-200 count)."""
    latencies: list[float] = []
    bad = 0
    todo = iter(range(n))

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal bad
        for i in todo:
            t0 = time.perf_counter()
            async with session.post(f"{url}/v1/ask", json={"prompt": f"q {i}"}, headers={"X-API-Key": KEY}) as r:
                await r.read()
                bad += r.status != 200
            latencies.append((time.perf_counter() - t0) * 1000)

    start = time.perf_counter()
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return time.perf_counter() - start, latencies, bad


async def gateway_part(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    topics = Topics(f"bench{uuid.uuid4().hex[:8]}.", 3)
    ensure_topics(args.bootstrap, topics)
    publisher = FactPublisher(args.bootstrap, f"bench-slo-{uuid.uuid4().hex[:8]}", topics)
    publisher.start()
    keys = KeyStore([("k-bench", "acme", hash_key(KEY), ["user"])])
    out: dict[str, list[tuple[float, list[float], int]]] = {"off": [], "on": []}
    try:
        servers = {}
        for mode in ("off", "on"):
            app = create_app(keys, publisher, always_ready, record_completions=mode == "on", publish_timeout=5.0)
            servers[mode] = await serve(app)
        for mode in ("off", "on"):  # warm-up: the producer's first transaction, connections
            await load(servers[mode][1], 200, args.concurrency)
        for _ in range(args.rounds):
            for mode in ("off", "on"):
                out[mode].append(await load(servers[mode][1], args.requests, args.concurrency))
        for runner, _ in servers.values():
            await runner.cleanup()
    finally:
        await asyncio.to_thread(publisher.close)
    summary = {}
    for mode, runs in out.items():
        seconds = sum(r[0] for r in runs)
        lat = [x for r in runs for x in r[1]]
        q = statistics.quantiles(lat, n=100)
        summary[mode] = {
            "rps": len(lat) / seconds,
            "p50_ms": q[49],
            "p99_ms": q[98],
            "non_200": float(sum(r[2] for r in runs)),
        }
    return summary


def fold_part(n: int) -> dict[str, float]:
    t0 = datetime(2026, 11, 29, tzinfo=UTC)
    events = []
    for i in range(n):
        rid = str(uuid7())
        at = t0 + timedelta(milliseconds=50 * i)
        events.append(
            RequestCompleted(
                envelope=Envelope(rid, "RequestCompleted", 1, "acme", at, rid, "bench"),
                request_id=rid, route="/v1/ask", method="POST", status=503 if i % 100 == 0 else 200,
                latency_ms=300 + i % 1000, streamed=False,
            )
        )  # fmt: skip
    state: SloState | None = None
    alerts = 0
    start = time.perf_counter()
    for offset, e in enumerate(events):
        state, out = fold(state, e, 0, offset)
        alerts += len(out)
    seconds = time.perf_counter() - start
    assert state is not None
    return {"events_per_s": n / seconds, "state_json_bytes": float(len(json.dumps(state.to_json()))), "alerts": alerts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--fold-events", type=int, default=50_000)
    args = p.parse_args()
    gw = asyncio.run(gateway_part(args))
    for mode in ("off", "on"):
        s = gw[mode]
        print(f"record_completions={mode:<3}  {s['rps']:8.0f} req/s  p50 {s['p50_ms']:6.2f} ms  "
              f"p99 {s['p99_ms']:6.2f} ms  non-200 {s['non_200']:.0f}")  # fmt: skip
    on, off = gw["on"], gw["off"]
    print(
        f"on/off: throughput x{on['rps'] / off['rps']:.3f}, p50 x{on['p50_ms'] / off['p50_ms']:.3f}, "
        f"p99 x{on['p99_ms'] / off['p99_ms']:.3f}"
    )
    f = fold_part(args.fold_events)
    print(
        f"slo fold: {f['events_per_s']:.0f} events/s over {args.fold_events} events, "
        f"state {f['state_json_bytes']:.0f} B of JSON, {f['alerts']:.0f} transitions"
    )


if __name__ == "__main__":
    main()
