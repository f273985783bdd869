"""What tracing costs the gateway (issue 11): the same gateway with tracing off and on, side by side.

Run:  .venv/bin/python bench/bench_tracing.py [--seconds 15] [--rounds 3] [--connections 16]

On demand only (never part of the test suite). Starts one gateway process per mode on
127.0.0.1 (`--serve`, below) and loads each with `wrk` + `bench/wrk_chat.lua` (a small
non-streamed chat completion on the simulated model, every answer checked), interleaving the
modes round by round so machine noise is shared:

- off:      otel_exporter "none" (no tracer: the middleware opens a log context and returns);
- file:     sampling 1.0, every span exported by the batch processor to a JSON-lines file;
- sampled:  sampling 1.0, spans made and ended but exported nowhere (the SDK's own cost).

What is measured is the gateway's own work: the facts are encoded exactly as for Kafka
(`FactPublisher.encode`: Avro, record headers with the traceparent) but not sent, so broker
round trips (milliseconds, identical in every mode) do not hide the difference. Reported per
mode: requests/s, p50/p99 latency and the gateway process's CPU µs per request (from
/proc), and the ratios against "off".
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LUA = ROOT / "bench" / "wrk_chat.lua"
KEY = "lf_bench_tracing_key"
MODES = ("off", "file", "sampled")


def serve(port: int, mode: str, span_file: str) -> None:
    """One gateway with a Kafka-less publisher that encodes the facts (the real encode path)."""
    from aiohttp import web
    from opentelemetry.sdk.trace import TracerProvider

    from gateway.app import always_ready, create_app
    from gateway.auth import KeyStore
    from ledgerflow.settings import hash_key
    from streams import telemetry
    from streams.events import Event
    from streams.publisher import FactPublisher
    from streams.topics import Topics

    encoder = FactPublisher("127.0.0.1:1", "bench", Topics("bench.", 3))  # never started: encode only

    class EncodingPublisher:
        async def publish(self, events: Sequence[Event], timeout: float = 1.8) -> None:
            encoder.encode(events)

    telemetry.setup_logging("gateway", "WARNING", "json")
    if mode == "file":
        telemetry.configure(telemetry.TelemetryConfig("ledgerflow-gateway", "file", file=span_file))
    elif mode == "sampled":
        telemetry.use(TracerProvider())  # spans made, no processor: nothing exported
    keys = KeyStore([("k-bench", "acme", hash_key(KEY), ["user"])])
    app = create_app(keys, EncodingPublisher(), always_ready)
    loop = None
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None, loop=loop)


def micro(n: int, repeats: int) -> dict[str, float]:
    """CPU µs per request of the tracing work alone, per mode: what the middleware and the handlers
    add (server span with attributes, tenant and request id, the envelope's traceparent, the
    status, the log context), plus exporting (the batch processor's thread: process CPU time
    counts every thread, and the buffer is flushed inside the timed region). Best of `repeats`."""
    from opentelemetry.sdk.trace import TracerProvider

    from streams import telemetry

    headers = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    attrs = {"http.request.method": "POST", "http.route": "/v1/ask", "url.scheme": "http"}
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracing-micro-"))
    out: dict[str, float] = {}
    for mode in MODES:
        best = float("inf")
        for _ in range(repeats):
            if mode == "file":
                config = telemetry.TelemetryConfig("bench", "file", file=str(tmp / "spans.jsonl"))
                provider = telemetry.configure(config)
            elif mode == "sampled":
                provider = TracerProvider()
                telemetry.use(provider)
            else:
                provider = telemetry.configure(telemetry.TelemetryConfig("bench", "none"))
            started = time.process_time()
            for i in range(n):
                with telemetry.log_context(route="/v1/ask"):
                    if not telemetry.enabled():
                        telemetry.annotate(tenant="acme")
                        telemetry.annotate(request_id=str(i))
                        telemetry.trace_parent_for(headers["traceparent"])
                        continue
                    with telemetry.server_span("POST /v1/ask", headers, attrs):
                        telemetry.annotate(tenant="acme")
                        telemetry.annotate(request_id=str(i))
                        telemetry.trace_parent_for(headers["traceparent"])
                        telemetry.mark_error(200)
            if provider is not None:
                provider.force_flush()
            best = min(best, (time.process_time() - started) / n * 1e6)
            telemetry.use(None)
        out[mode] = best
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_up(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"gateway on {port} did not come up")


def load(port: int, pid: int, seconds: int, args: argparse.Namespace) -> dict[str, float]:
    cmd = ["wrk", f"-t{args.threads}", f"-c{args.connections}", f"-d{seconds}s", "--latency", "-s", str(LUA),
           f"http://127.0.0.1:{port}"]  # fmt: skip
    env = {**os.environ, "BENCH_AUTH": f"Bearer {KEY}", "BENCH_MODEL": "sim-small"}
    before = cpu_seconds(pid)
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=seconds + 60, check=True)
    cpu = cpu_seconds(pid) - before
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("BENCH_JSON "))
    data = json.loads(line.removeprefix("BENCH_JSON "))
    if data["ok"] != data["requests"] or data["requests"] == 0:
        raise RuntimeError(f"failed answers: {data}")
    return {
        "rps": data["requests"] / (data["duration_us"] / 1e6),
        "p50_ms": data["p50_us"] / 1000,
        "p99_ms": data["p99_us"] / 1000,
        "cpu_us_per_req": cpu / data["requests"] * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--micro", type=int, default=20000, help="requests of the in-process tracing-only timing")
    p.add_argument("--serve", nargs=3, metavar=("PORT", "MODE", "SPAN_FILE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve:
        serve(int(args.serve[0]), args.serve[1], args.serve[2])
        return 0
    added = micro(args.micro, 5)
    print(f"tracing work alone, CPU µs per request (best of 5 x {args.micro}): {added}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-tracing-"))
    procs: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    try:
        for mode in MODES:
            port = free_port()
            log = (tmp / f"{mode}.log").open("wb")
            proc = subprocess.Popen(
                [sys.executable, __file__, "--serve", str(port), mode, str(tmp / "spans.jsonl")],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
            procs[mode] = (port, proc)
        for port, _ in procs.values():
            wait_up(port)
        results: dict[str, list[dict[str, float]]] = {m: [] for m in MODES}
        for r in range(args.rounds):
            order = MODES if r % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                port, proc = procs[mode]
                load(port, proc.pid, args.warmup, args)
                results[mode].append(load(port, proc.pid, args.seconds, args))
                print(f"round {r + 1} {mode:8s} {results[mode][-1]}", flush=True)
        spans = sum(1 for _ in (tmp / "spans.jsonl").open()) if (tmp / "spans.jsonl").exists() else 0
    finally:
        for _, proc in procs.values():
            proc.terminate()
            proc.wait(10)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
    print(f"\nmedians over {args.rounds} rounds of {args.seconds}s, {args.connections} connections:")
    head = ("mode", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "rps vs off", "CPU vs off")
    print("{:10s} {:>9s} {:>8s} {:>8s} {:>11s} {:>10s} {:>10s}".format(*head))
    for m in MODES:
        got, off = med[m], med["off"]
        cells = (m, got["rps"], got["p50_ms"], got["p99_ms"], got["cpu_us_per_req"], got["rps"] / off["rps"],
                 got["cpu_us_per_req"] / off["cpu_us_per_req"])  # fmt: skip
        print("{:10s} {:9.0f} {:8.2f} {:8.2f} {:11.0f} {:10.3f} {:10.3f}".format(*cells))
    print(f"spans exported by the file mode: {spans}")
    base = med["off"]["cpu_us_per_req"]
    for m in ("file", "sampled"):
        extra = added[m] - added["off"]
        print(
            f"{m}: tracing adds {extra:.0f} µs CPU per request = {(base + extra) / base:.3f}x the gateway's "
            f"{base:.0f} µs/request with tracing off (expected req/s ratio when CPU-bound: {base / (base + extra):.3f})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
