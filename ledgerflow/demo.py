"""`ledgerflow demo`: sample traffic over HTTP, then a summary read back from ClickHouse.

The summary shows rows per fact table and, per tenant, the agent's running totals next to
the sum of the raw charges, which must agree to the last decimal digit.
"""

from __future__ import annotations

import asyncio
import sys
import time

import aiohttp

from ledgerflow.settings import DEMO_KEYS, Settings

PROMPTS = [
    "Summarise the quarterly report in three bullet points.",
    "Translate 'good morning' into French and German.",
    "Write a SQL query that counts orders per day.",
    "What is the derivative of x^3 + 2x?",
    "Draft a polite reminder email about an unpaid invoice.",
    "Explain Kafka consumer groups to a new engineer.",
]
FACT_TABLES = [
    "request_received", "policy_decided", "tokens_charged", "audit_recorded", "tenant_totals_updated", "dead_letters",
]  # fmt: skip

TOTALS_SQL = """
SELECT c.tenant AS tenant, c.n AS charges, c.total AS sum_of_charges,
       t.n AS agent_requests, t.total AS agent_cost, c.total = t.total AND c.n = t.n AS agree
FROM (SELECT tenant, count() AS n, sum(cost) AS total FROM tokens_charged GROUP BY tenant) AS c
LEFT JOIN (SELECT tenant, max(requests) AS n, argMax(cost, requests) AS total
           FROM tenant_totals_updated GROUP BY tenant) AS t USING (tenant)
ORDER BY tenant
"""


async def send(settings: Settings, n: int, concurrency: int = 8) -> tuple[int, int]:
    """POST n requests round-robin over the demo tenants; return (ok, failed)."""
    tenants = sorted(DEMO_KEYS)
    sem = asyncio.Semaphore(concurrency)
    ok = failed = 0

    async def one(i: int, session: aiohttp.ClientSession) -> None:
        nonlocal ok, failed
        key = DEMO_KEYS[tenants[i % len(tenants)]]
        body = {"prompt": f"{PROMPTS[i % len(PROMPTS)]} (#{i})", "model": "sim-large" if i % 5 == 0 else "sim-small"}
        async with sem:
            try:
                async with session.post(
                    f"{settings.gateway_url}/v1/ask", json=body, headers={"Authorization": f"Bearer {key}"}
                ) as resp:
                    await resp.read()
                    if resp.status == 200:
                        ok += 1
                    else:
                        failed += 1
            except aiohttp.ClientError:
                failed += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await asyncio.gather(*(one(i, session) for i in range(n)))
    return ok, failed


def caught_up(settings: Settings) -> bool:
    from ledgerflow.cli import query_text

    rows = query_text(settings, TOTALS_SQL, "TabSeparated").strip().splitlines()
    return bool(rows) and all(r.split("\t")[-1] == "1" for r in rows)


def produce_poison(settings: Settings) -> None:
    """One hand-made bad record on the charges topic: consumers must dead-letter it and go on."""
    from confluent_kafka import Producer

    from streams.topics import Topics

    producer = Producer({"bootstrap.servers": settings.bootstrap, "enable.idempotence": True})
    topic = Topics(settings.topic_prefix, settings.partitions).name("token-charges")
    producer.produce(topic, key=b"acme", value=b'{"cost": 1.0, "note": "JSON where Avro belongs"}')
    producer.flush(10)
    print(f"demo: produced one poison record to {topic}; `ledgerflow dlq list` shows where it went", flush=True)


def run(settings: Settings, n: int, timeout: float = 120.0, poison: bool = False) -> int:
    from ledgerflow.cli import PlatformError, query_text

    if poison:
        produce_poison(settings)
    started = time.monotonic()
    ok, failed = asyncio.run(send(settings, n))
    elapsed = time.monotonic() - started
    print(f"demo: sent {n} requests: {ok} answered, {failed} failed, {ok / max(elapsed, 1e-9):.0f} req/s", flush=True)
    deadline = time.monotonic() + timeout
    while not caught_up(settings):
        if time.monotonic() > deadline:
            raise PlatformError(f"projections did not catch up within {timeout:.0f}s; see `ledgerflow status`")
        time.sleep(0.5)
    union = " UNION ALL ".join(f"SELECT '{t}' AS table, count() AS rows FROM {t}" for t in FACT_TABLES)
    counts = f"SELECT * FROM ({union}) ORDER BY table"
    print("\nrows per table:")
    print(query_text(settings, counts, "PrettyCompactMonoBlock"), end="")
    print("\nper-tenant totals (agent) vs sum of raw charges:")
    print(query_text(settings, TOTALS_SQL, "PrettyCompactMonoBlock"), end="")
    sys.stdout.flush()
    return 0 if failed == 0 else 1
