"""Soak: the gateway under steady load for a bounded time; is its resident memory flat?

Run:  .venv/bin/python bench/soak_gateway.py                  # 30 minutes (the issue's soak)
      .venv/bin/python bench/soak_gateway.py --minutes 5 --sample-s 10

On demand only (never part of the test suite). Loopback only, bounded, stops by itself: it
starts (like `bench/bench_gateway.py`, whose helpers it reuses) a real Kafka broker on free
loopback ports, the mock OpenAI-compatible upstream and ONE gateway with everything on (API-key
auth, the in-process rate limiter, redaction, the policy decision point, the registry, facts
committed to Kafka before every answer, the memory fabric), then:

- `wrk` drives non-streamed chat completions with `--connections` for exactly `--minutes`
  (one continuous run, after a `--warmup`);
- beside it, a small client cycles memory sessions at `--memory-ops` operations per second:
  append turns to one of 50 sessions, read its window, erase it after 8 turns (so the live
  memory state stays bounded and any growth is a leak, not data);
- every `--sample-s` seconds the gateway's RSS (VmRSS from /proc) is sampled.

Verdict "flat": the least-squares slope over the samples after warm-up, extrapolated over the
run, and the difference between the mean of the first and of the last third are both under
`--tolerance-mib` (default 8 MiB). Everything it started is stopped on exit, also on Ctrl-C,
SIGTERM or an error; the whole run is killed at `--minutes` + 10 minutes at the latest.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

import bench_gateway as bg  # noqa: E402

from streams.admin import ensure_topics  # noqa: E402
from streams.topics import Topics  # noqa: E402

SESSIONS = 50
TURNS_PER_SESSION = 8


def slope_per_min(ts: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over ts (seconds), in units per minute."""
    mt, my = statistics.fmean(ts), statistics.fmean(ys)
    den = sum((t - mt) ** 2 for t in ts)
    return 0.0 if den == 0 else 60 * sum((t - mt) * (y - my) for t, y in zip(ts, ys, strict=True)) / den


def verdict(ts: list[float], ys: list[float], tolerance: float) -> tuple[bool, float, float, float]:
    """(flat?, slope MiB/min, slope × run length, last-third mean - first-third mean)."""
    slope = slope_per_min(ts, ys)
    span_min = (ts[-1] - ts[0]) / 60 if len(ts) > 1 else 0.0
    third = max(1, len(ys) // 3)
    drift = statistics.fmean(ys[-third:]) - statistics.fmean(ys[:third])
    return abs(slope * span_min) < tolerance and abs(drift) < tolerance, slope, slope * span_min, drift


class MemoryChurn(threading.Thread):
    """Appends, reads and erases memory sessions at a steady rate; counts what did not succeed."""

    def __init__(self, url: str, key: str, ops_per_s: float, stop: threading.Event) -> None:
        super().__init__(name="memory-churn", daemon=True)
        self.url, self.key, self.period, self.stop = url, key, 1.0 / ops_per_s, stop
        self.ops = 0
        self.failures = 0

    def run(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"}
        turns = dict.fromkeys(range(SESSIONS), 0)
        i = 0
        next_at = time.monotonic()
        while not self.stop.is_set():
            s = i % SESSIONS
            base = f"{self.url}/v1/memory/soak-{s}"
            if turns[s] >= TURNS_PER_SESSION:
                status, _ = bg.http("DELETE", base, headers=headers)
                turns[s] = 0
                ok = status == 200
            elif i % 3 == 2:
                status, _ = bg.http("GET", base + "?turns=8", headers=headers)
                ok = status == 200
            else:
                body = {"role": "user", "content": f"turn {turns[s]} of session {s}: mail a{i}@example.com " * 4}
                status, _ = bg.http("POST", base, body, headers=headers)
                turns[s] += 1
                ok = status == 201
            self.ops += 1
            self.failures += not ok
            i += 1
            next_at += self.period
            self.stop.wait(max(0.0, next_at - time.monotonic()))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=30.0, help="length of the steady load (default 30)")
    p.add_argument("--sample-s", type=float, default=10.0, help="seconds between RSS samples")
    p.add_argument("--warmup", type=int, default=30, help="seconds of load before the baseline sample")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="wrk threads")
    p.add_argument("--tokens", type=int, default=16, help="completion tokens per mock answer")
    p.add_argument("--partitions", type=int, default=12)
    p.add_argument("--memory-ops", type=float, default=20.0, help="memory operations per second beside the load")
    p.add_argument("--tolerance-mib", type=float, default=8.0, help="largest drift still called flat")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = p.parse_args(argv)
    args.rate_requests_per_min, args.rate_tokens_per_min = 100_000_000, 1_000_000_000
    if args.minutes <= 0 or args.sample_s <= 0:
        p.error("--minutes and --sample-s must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, bg._on_signal)
    signal.signal(signal.SIGHUP, bg._on_signal)
    cleanup = bg.Cleanup(workdir=Path(tempfile.mkdtemp(prefix="lf-soak-gw-")), keep_workdir=args.keep)
    atexit.register(cleanup.close)
    # the main thread's SIGTERM handler unwinds through `finally`, which stops everything
    hard_stop = threading.Timer((args.minutes + 10) * 60, lambda: os.kill(os.getpid(), signal.SIGTERM))
    hard_stop.daemon = True
    hard_stop.start()
    try:
        return soak(args, cleanup)
    finally:
        hard_stop.cancel()
        cleanup.close()


def soak(args: argparse.Namespace, cleanup: bg.Cleanup) -> int:
    bootstrap = bg.start_kafka(cleanup)
    topics = Topics(f"soak{uuid.uuid4().hex[:8]}.", args.partitions)
    ensure_topics(bootstrap, topics)
    _mock, mock_url = bg.start_mock(cleanup, args.tokens)
    gw = bg.start_gateway(cleanup, bootstrap, topics, mock_url, args)
    for attempt in range(10):  # a loaded box: the first commits of a new broker can miss the 1.8 s budget
        try:
            bg.check_answers(gw)
            break
        except RuntimeError as exc:
            if attempt == 9:
                raise
            bg.log(f"not answering yet ({exc}); retrying")
            time.sleep(3)
    print("\n## Machine\n\n" + "\n".join(f"- {n}" for n in bg.machine_notes(None, None)), flush=True)
    if args.warmup > 0:
        bg.wrk(gw.url, gw.key, args.warmup, args, {})
    stop = threading.Event()
    churn = MemoryChurn(gw.url, gw.key, args.memory_ops, stop) if args.memory_ops > 0 else None
    result: list[bg.Run | None] = []
    load = threading.Thread(target=lambda: result.append(bg.wrk(gw.url, gw.key, args.minutes * 60, args, {})))
    start = time.monotonic()
    load.start()
    if churn is not None:
        churn.start()
    ts, ys = [0.0], [bg.rss_mib(gw.proc.pid)]
    print(f"\n### Soak: {args.minutes:g} min, {args.connections} connections + {args.memory_ops:g} memory ops/s\n")
    print("| t (min) | RSS MiB |\n| ---: | ---: |")
    print(f"| 0.0 | {ys[0]:.1f} |", flush=True)
    while load.is_alive():
        load.join(timeout=max(0.0, args.sample_s - (time.monotonic() - start - ts[-1])))
        if not gw.proc.alive():
            bg.log("the gateway died during the soak:\n" + gw.proc.tail())
            return 1
        ts.append(time.monotonic() - start)
        ys.append(bg.rss_mib(gw.proc.pid))
        print(f"| {ts[-1] / 60:.1f} | {ys[-1]:.1f} |", flush=True)
    stop.set()
    if churn is not None:
        churn.join(10)
    run = result[0] if result else None
    flat, slope, over_run, drift = verdict(ts, ys, args.tolerance_mib)
    print(f"\nRSS MiB: start {ys[0]:.1f}, end {ys[-1]:.1f}, min {min(ys):.1f}, max {max(ys):.1f}")
    print(f"slope {slope:+.3f} MiB/min ({over_run:+.1f} MiB over the run); last third - first third {drift:+.1f} MiB")
    print(f"verdict: {'FLAT' if flat else 'NOT FLAT'} (tolerance {args.tolerance_mib:g} MiB)")
    failures = 0
    if run is not None:
        failures = run.failures
        print(f"load: {run.result['requests']:,} chat completions, {run.rps:,.0f} req/s, "
              f"p50 {run.ms('p50_us'):.1f} ms, p99 {run.ms('p99_us'):.1f} ms, "
              f"non-2xx + errors {run.failures}")  # fmt: skip
    else:
        failures = 1
        print("load: wrk failed")
    if churn is not None:
        print(f"memory: {churn.ops:,} operations, {churn.failures} failed")
        failures += churn.failures
    return 0 if flat and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
