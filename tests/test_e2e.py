"""End to end through the real broker and real chDB: gateway → Kafka → agent + sink → ClickHouse."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest

from ledgerflow import cli
from ledgerflow.settings import DEMO_KEYS
from tests.platform import Platform, running_platform

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

FACT_TABLES = ("request_received", "policy_decided", "tokens_charged", "audit_recorded")


@pytest.fixture(scope="module")
def platform(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    with pytest.MonkeyPatch.context() as mp, running_platform(mp, kafka_bootstrap, tmp_path_factory.mktemp("lf")) as p:
        yield p


async def post_many(url: str, bodies: list[tuple[str, object]], concurrency: int = 8) -> list[tuple[int, dict]]:
    sem = asyncio.Semaphore(concurrency)

    async def one(key: str, body: object, session: aiohttp.ClientSession) -> tuple[int, dict]:
        async with sem, session.post(f"{url}/v1/ask", json=body, headers={"X-API-Key": key}) as resp:
            return resp.status, await resp.json()

    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(one(k, b, session) for k, b in bodies))


def wait_for(predicate, timeout: float = 90.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_requests_land_once_per_fact_and_totals_match_to_the_last_digit(platform: Platform) -> None:
    tenants = sorted(DEMO_KEYS)
    n = 150
    bodies = [
        (
            DEMO_KEYS[tenants[i % 3]],
            {"prompt": f"question {i} " * (1 + i % 7), "model": ["sim-small", "sim-large"][i % 2]},
        )
        for i in range(n)
    ]
    # Bad requests mixed in must record nothing.
    bad = [("not-a-key", {"prompt": "x"}), (DEMO_KEYS["acme"], {"prompt": ""}), (DEMO_KEYS["acme"], {"model": "x"})]
    results = asyncio.run(post_many(platform.settings.gateway_url, bodies + bad))
    assert [s for s, _ in results[:n]] == [200] * n
    assert [s for s, _ in results[n:]] == [401, 422, 422]
    answered_cost = {t: Decimal(0) for t in tenants}
    for (key, _), (_, body) in zip(bodies, results[:n], strict=True):
        tenant = next(t for t, k in DEMO_KEYS.items() if k == key)
        answered_cost[tenant] += Decimal(body["cost"])

    def caught_up() -> bool:
        counts = [int(platform.scalar(f"SELECT count() FROM {t}")) for t in FACT_TABLES]
        totals = int(platform.scalar("SELECT max(requests) FROM tenant_totals_updated WHERE tenant = 'acme'") or 0)
        return counts == [n] * 4 and totals == n // 3

    wait_for(caught_up, what="all facts and totals in ClickHouse")
    for table in FACT_TABLES:
        assert int(platform.scalar(f"SELECT count() FROM {table}")) == n, table
        assert int(platform.scalar(f"SELECT uniqExact(event_id) FROM {table}")) == n, table
        assert int(platform.scalar(f"SELECT uniqExact(_topic, _partition, _offset) FROM {table}")) == n, table
    charged = dict(platform.sql("SELECT tenant, toString(sum(cost)) FROM tokens_charged GROUP BY tenant"))
    agent = dict(
        platform.sql("SELECT tenant, toString(argMax(cost, requests)) FROM tenant_totals_updated GROUP BY tenant")
    )
    for tenant in tenants:
        assert Decimal(charged[tenant]) == answered_cost[tenant]
        assert Decimal(agent[tenant]) == answered_cost[tenant]
    # One request = one correlation id shared by its four facts.
    assert (
        int(
            platform.scalar(
                "SELECT count() FROM (SELECT correlation_id FROM request_received "
                "INNER JOIN tokens_charged USING (correlation_id))"
            )
        )
        == n
    )


def test_status_shows_lag_reaching_zero(platform: Platform) -> None:
    def lag_zero() -> bool:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            cli.cmd_status(platform.settings)
        text = out.getvalue()
        lines = [
            ln
            for ln in text.splitlines()
            if ln.strip().startswith((platform.settings.sink_group, platform.settings.worker_id))
        ]
        return len(lines) == 2 and all(ln.split()[-1] == "0" for ln in lines)

    wait_for(lag_zero, what="lag 0 for the sink and the agents")


def test_sql_endpoint_is_read_only(platform: Platform) -> None:
    with pytest.raises(cli.PlatformError):
        cli.query_text(platform.settings, "INSERT INTO tokens_charged (tenant) VALUES ('x')")
    with pytest.raises(cli.PlatformError):
        cli.query_text(platform.settings, "DROP TABLE tokens_charged")
    assert int(platform.scalar("SELECT count() > 0 FROM tokens_charged")) == 1


async def test_broker_unreachable_is_503_with_retry_after_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A gateway whose broker is down answers 503 + Retry-After within 2 s and never hangs."""
    from aiohttp.test_utils import TestClient, TestServer

    from gateway.server import build
    from ledgerflow.settings import load
    from tests.conftest import free_port

    monkeypatch.setenv("LEDGERFLOW_KAFKA_BOOTSTRAP", f"127.0.0.1:{free_port()}")  # nothing listens there
    app, _ = build(load())
    async with TestClient(TestServer(app)) as client:
        for _ in range(3):
            started = time.monotonic()
            resp = await client.post("/v1/ask", json={"prompt": "hi"}, headers={"X-API-Key": DEMO_KEYS["acme"]})
            elapsed = time.monotonic() - started
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
            assert elapsed < 10.0, f"took {elapsed:.2f}s"  # a hang guard (publish timeout 1.8 s), not a speed test
        ready = await client.get("/readyz")
        assert ready.status == 503 and "unreachable" in (await ready.json())["detail"]


def test_sink_killed_with_sigkill_mid_stream_loses_and_doubles_nothing(platform: Platform) -> None:
    sink = platform.child("projections")
    before = int(platform.scalar("SELECT count() FROM tokens_charged"))
    n = 600
    tenants = sorted(DEMO_KEYS)
    bodies = [(DEMO_KEYS[tenants[i % 3]], {"prompt": f"kill test {i}"}) for i in range(n)]

    async def traffic_then_kill() -> list[tuple[int, dict]]:
        task = asyncio.ensure_future(post_many(platform.settings.gateway_url, bodies))
        await asyncio.sleep(0.8)
        assert sink.proc is not None
        os.kill(sink.proc.pid, signal.SIGKILL)  # mid-stream: no flush, no commit, no goodbye
        return await task

    results = asyncio.run(traffic_then_kill())
    assert all(s == 200 for s, _ in results)
    sink.proc.wait(10)  # type: ignore[union-attr]
    sink.start()  # as the supervisor would
    cli.wait_ready(platform.supervisor)

    def landed() -> bool:
        return int(platform.scalar("SELECT count() FROM tokens_charged")) >= before + n

    wait_for(landed, what="the restarted sink to land every charge")
    time.sleep(1.0)  # let any would-be duplicate batch arrive before counting
    for table in FACT_TABLES:
        total = int(platform.scalar(f"SELECT count() FROM {table}"))
        unique = int(platform.scalar(f"SELECT uniqExact(_topic, _partition, _offset) FROM {table}"))
        assert total == unique == before + n, (table, total, unique)


def test_openai_client_gets_a_normal_and_a_streamed_answer(platform: Platform) -> None:
    """The official OpenAI Python client, unchanged, against the gateway and the real broker."""
    from openai import OpenAI

    client = OpenAI(base_url=f"{platform.settings.gateway_url}/v1", api_key=DEMO_KEYS["globex"], max_retries=0)
    before = int(platform.scalar("SELECT count() FROM tokens_charged WHERE tenant = 'globex'"))
    whole = client.chat.completions.create(model="sim-large", messages=[{"role": "user", "content": "Hello there"}])
    assert whole.choices[0].message.content and whole.usage and whole.usage.total_tokens > 0
    stream = client.chat.completions.create(
        model="sim-small",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Stream please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces).startswith("[sim-small]") and usage is not None and usage.completion_tokens > 0
    wait_for(
        lambda: int(platform.scalar("SELECT count() FROM tokens_charged WHERE tenant = 'globex'")) == before + 2,
        what="both answers charged",
    )
    whole_id = whole.id.removeprefix("chatcmpl-")
    assert platform.scalar(f"SELECT model FROM tokens_charged WHERE request_id = '{whole_id}'") == "sim-large"


PLANTED = [
    "jane.doe@example.com",
    "4111 1111 1111 1111",
    "AKIAIOSFODNN7EXAMPLE",
    "GB82WEST12345698765432",
    "+44 20 7946 0958",
    "203.0.113.77",
    "sk-proj-Zq8XkT3vLm9PwRb2NcYd4HsAe7Gu",
]


def test_planted_secrets_never_reach_an_event_or_a_log_line(platform: Platform) -> None:
    """Prompts carrying PII and secrets: masked before any event, log line or adapter sees them."""
    from tests.kafka_helpers import read_all

    prompt = "Please help. " + " and ".join(PLANTED)
    bodies: list[tuple[str, object]] = [
        (DEMO_KEYS["acme"], {"prompt": prompt}),
        (DEMO_KEYS["acme"], {"prompt": prompt, "stream": True}),
        (DEMO_KEYS["initech"], {"messages": [{"role": "user", "content": prompt}], "model": "sim-large"}),
    ]

    async def send() -> list[int]:
        async with aiohttp.ClientSession() as session:
            out = []
            for key, body in bodies:
                async with session.post(
                    f"{platform.settings.gateway_url}/v1/ask", json=body, headers={"X-API-Key": key}
                ) as resp:
                    text = await resp.text()
                    assert not any(s in text for s in PLANTED), text
                    out.append(resp.status)
            return out

    assert asyncio.run(send()) == [200, 200, 200]
    wait_for(lambda: int(platform.scalar("SELECT count() FROM request_redacted")) >= 3, what="redaction facts")
    kinds = platform.sql("SELECT arrayJoin(mapKeys(counts_by_kind)) AS k FROM request_redacted GROUP BY k ORDER BY k")
    assert {k[0] for k in kinds} >= {"email", "card_number", "api_key", "iban", "phone", "ip_address"}
    topics = platform.topics
    names = topics.all() + [topics.dlq(t) for t in topics.all()]
    records = read_all(platform.settings.bootstrap, names, expect=1, timeout=10)
    assert records
    blob = b"".join((m.value() or b"") + (m.key() or b"") for m in records)
    logs = b"".join(p.read_bytes() for p in (platform.settings.resolved_data_dir / "logs").glob("*.log"))
    for secret in PLANTED:
        assert secret.encode() not in blob, f"{secret} reached Kafka"
        assert secret.encode() not in logs, f"{secret} reached a log"


def test_every_request_is_decided_and_chained_and_the_ledger_verifies(platform: Platform) -> None:
    """Issue 5's coverage (one PolicyDecided per request) and issue 6's ledger, on the running platform."""
    n = 30
    bodies = [(DEMO_KEYS["globex"], {"prompt": f"ledger question {i}"}) for i in range(n)]
    results = asyncio.run(post_many(platform.settings.gateway_url, bodies))
    assert [s for s, _ in results] == [200] * n

    def chained() -> bool:
        audits = int(platform.scalar("SELECT count() FROM audit_recorded WHERE tenant = 'globex'"))
        entries = int(platform.scalar("SELECT count() FROM ledger_entry_chained WHERE tenant = 'globex'"))
        return audits >= n and entries == audits

    wait_for(chained, what="globex's audit records chained and projected")

    def decided() -> bool:  # the two facts share a transaction but reach ClickHouse through different partitions
        requests = int(platform.scalar("SELECT count() FROM request_received"))
        return requests > 0 and int(platform.scalar("SELECT count() FROM policy_decided")) == requests

    try:
        wait_for(decided, timeout=60, what="one PolicyDecided per RequestReceived in ClickHouse")
    except AssertionError:
        undecided = platform.sql(
            "SELECT route, producer, count() FROM request_received WHERE request_id NOT IN "
            "(SELECT request_id FROM policy_decided) GROUP BY route, producer"
        )
        raise AssertionError(f"requests without a decision (route, producer, n): {undecided}") from None
    assert int(platform.scalar("SELECT countIf(policy_version = '') FROM policy_decided")) == 0

    verified = subprocess.run(
        [sys.executable, "-m", "ledgerflow", "audit", "verify", "--tenant", "globex"],
        capture_output=True, text=True, env={**os.environ}, timeout=120,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "log: globex: OK" in verified.stdout and "store: globex: OK" in verified.stdout, verified.stdout
