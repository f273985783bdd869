"""`ledgerflow up` with gateways=2: a redis-server of its own and two gateway replicas sharing it.

Drives the real command line as an operator would (a subprocess, stopped with SIGTERM) on the
test broker: the addresses it prints answer; a memory turn written through one replica is read
at once through the other; the rate limit is one limit across both replicas (each replica's
own in-process limiter would admit twice as much); `up` stops its redis-server on the way out.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from infra.redis import ping
from ledgerflow.settings import DEMO_KEYS
from tests.conftest import REPO, free_port
from tests.platform import platform_env

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]
KEY = DEMO_KEYS["acme"]


def free_pair() -> int:
    """A free port p with p + 1 free too (replica i listens on gateway_port + i)."""
    while True:
        port = free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def call(method: str, url: str, body: object | None = None) -> tuple[int, dict[str, object]]:
    import urllib.error
    import urllib.request

    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"X-API-Key": KEY})
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, orjson.loads(exc.read() or b"{}")


def test_up_with_two_gateways_shares_redis_for_memory_and_limits(kafka_bootstrap: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        **platform_env(kafka_bootstrap, tmp_path / "data"),
        "LEDGERFLOW_GATEWAYS": "2",
        "LEDGERFLOW_GATEWAY_PORT": str(free_pair()),
        "LEDGERFLOW_WORKERS": "0",  # not what this test is about; spares the CPU
        "LEDGERFLOW_RATE_REQUESTS_PER_MIN": "60",  # a burst of 10 (10 s worth), then 1 per second
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("LEDGERFLOW_REDIS_URL", None)
    up = subprocess.Popen(
        [sys.executable, "-m", "ledgerflow", "up"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: list[str] = []
    try:
        assert up.stdout is not None
        deadline = time.monotonic() + 180
        while not any(line.startswith("ready.") for line in lines):
            line = up.stdout.readline()
            assert line or up.poll() is None, "up exited:\n" + "".join(lines)
            assert time.monotonic() < deadline, "up not ready in time:\n" + "".join(lines)
            lines.append(line)
        out = "".join(lines)
        gateways = re.findall(r"^gateway-(\d):\s+(http://\S+)", out, re.M)
        assert [g for g, _ in gateways] == ["0", "1"], out
        urls = [u for _, u in gateways]
        assert len(set(urls)) == 2
        [redis_url] = re.findall(r"^redis:\s+(redis://\S+)", out, re.M)
        host, port = redis_url.removeprefix("redis://").split("/")[0].split(":")
        assert ping(host, int(port))

        # read-your-writes across the two replicas, through Redis
        for i in range(4):
            status, body = call("POST", f"{urls[i % 2]}/v1/memory/ops-1", {"role": "user", "content": f"t{i}"})
            assert status == 201, body
            status, body = call("GET", f"{urls[(i + 1) % 2]}/v1/memory/ops-1")
            assert [t["content"] for t in body["turns"]] == [f"t{j}" for j in range(i + 1)]  # type: ignore[attr-defined]

        # one request limit across both replicas: a burst of 10 plus 1 per second, not 10 per replica
        started = time.monotonic()
        codes = [call("POST", f"{urls[i % 2]}/v1/ask", {"prompt": f"hi {i}"})[0] for i in range(30)]
        elapsed = time.monotonic() - started
        admitted = codes.count(200)
        assert set(codes) <= {200, 429}, codes
        assert 10 <= admitted <= 10 + int(elapsed) + 1, (admitted, elapsed)
    finally:
        up.send_signal(signal.SIGTERM)
        rest, _ = up.communicate(timeout=120)
        lines.append(rest or "")
    assert up.returncode == 0, "".join(lines)
    assert not ping(host, int(port)), "up left its redis-server running"
    assert not (tmp_path / "data" / "run" / "up.json").exists()
