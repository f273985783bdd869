"""`ledgerflow demo`: sample traffic over HTTP, then a summary read back from ClickHouse.

The summary shows rows per fact table and, per tenant, the agent's running totals next to
the sum of the raw charges, which must agree to the last decimal digit.

The cost spike (on by default, `--no-spike` to skip): the anomaly detector learns a day of hours
before it judges one, which live demo traffic cannot supply in minutes, so the demo records two
days of hourly charges for one tenant (`demo-spike`, kept apart from the API tenants' billing)
directly on the charges topic, one hour at 20x the usual spend, and waits until the
cost-anomalies agent's `CostAnomalyDetected` for that hour is in ClickHouse.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from datetime import UTC, datetime, timedelta

import aiohttp

from domain.pricing import DEFAULT_PRICES, cost
from ledgerflow.settings import DEMO_KEYS, Settings
from streams.events import Envelope, TokensCharged
from streams.ids import uuid7

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


SPIKE_TENANT = "demo-spike"
SPIKE_HOURS = 48  # hours of history; the detector learns 24 before it judges one
SPIKE_AT = 42  # the spike is this hour of the history (six hours before its end)
SPIKE_X = 20  # calls in the spike hour, times the usual four

ANOMALY_SQL = f"""
SELECT tenant, hour_start, spend, expected, round(spend / expected, 1) AS times, round(score, 6) AS score, detector
FROM cost_anomaly_detected WHERE tenant = '{SPIKE_TENANT}' ORDER BY hour_start
"""  # the tenant is our constant, not input


def spike_charges(tenant: str = SPIKE_TENANT, now: datetime | None = None, seed: int = 11) -> list[TokensCharged]:
    """`SPIKE_HOURS` hours of charges up to the hour before `now`: four calls an hour (a few hours
    quiet), `SPIKE_X` times as many in hour `SPIKE_AT`; deterministic for a seed and an hour."""
    rnd = random.Random(seed)
    end = (now or datetime.now(UTC)).astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    start = end - timedelta(hours=SPIKE_HOURS)
    price = DEFAULT_PRICES["sim-small"]
    out = []
    for h in range(SPIKE_HOURS):
        if h % 11 == 5:
            continue  # a quiet hour
        calls = 4 * (SPIKE_X if h == SPIKE_AT else 1)
        for i in range(calls):
            at = start + timedelta(hours=h, seconds=i * 3600 // calls)
            prompt, completion = rnd.randrange(800, 1200), rnd.randrange(300, 500)
            rid = str(uuid7())
            env = Envelope(
                event_id=str(uuid7()), event_type="TokensCharged", schema_version=1, tenant=tenant, occurred_at=at,
                correlation_id=rid, producer="demo:spike",
            )  # fmt: skip
            out.append(
                TokensCharged(
                    envelope=env,
                    request_id=rid,
                    model=price.model,
                    prompt_tokens=prompt,
                    completion_tokens=completion,
                    input_price_per_mtok=price.input_per_mtok,
                    output_price_per_mtok=price.output_per_mtok,
                    price_list_version=price.version,
                    currency=price.currency,
                    cost=cost(prompt, completion, price),
                )
            )
    return out


def inject_spike(settings: Settings, tenant: str = SPIKE_TENANT) -> datetime:
    """Record the spike history on the charges topic (one transaction); returns the spike hour."""
    from streams.clients import Producer
    from streams.codec import Codec
    from streams.topics import Topics

    charges = spike_charges(tenant)
    codec = Codec()
    producer = Producer({"bootstrap.servers": settings.bootstrap, "transactional.id": f"demo-spike-{uuid7()}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    topic = Topics(settings.topic_prefix, settings.partitions).name("token-charges")
    for c in charges:
        producer.produce(topic, key=tenant.encode(), value=codec.encode(c))
    producer.commit_transaction(60)
    spike = charges[0].envelope.occurred_at.replace(minute=0, second=0, microsecond=0) + timedelta(hours=SPIKE_AT)
    print(f"demo: recorded {len(charges)} charges of tenant {tenant} over {SPIKE_HOURS} h, hour {spike:%Y-%m-%d %H}:00"
          f" at {SPIKE_X}x the usual spend", flush=True)  # fmt: skip
    return spike


async def probe(settings: Settings) -> tuple[int, int]:
    """Issue 11: a prompt with an e-mail address (masked before anything sees it) and a call declaring
    a tool the default policy denies, so that after a demo every gateway metric family has a non-zero
    series (`curl <gateway>/metrics`). Returns the two statuses (200 and 403 expected)."""
    key = DEMO_KEYS["acme"]
    ask = {"prompt": "Draft a reply to jane.doe@example.com about the invoice.", "model": "sim-small"}
    tool = {"type": "function", "function": {"name": "code_exec"}}
    chat = {"model": "sim-small", "messages": [{"role": "user", "content": "run this"}], "tools": [tool]}
    statuses = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for path, body in (("/v1/ask", ask), ("/v1/chat/completions", chat)):
            headers = {"Authorization": f"Bearer {key}"}
            async with session.post(f"{settings.gateway_url}{path}", json=body, headers=headers) as resp:
                await resp.read()
                statuses.append(resp.status)
    print(f"demo: a prompt with an e-mail address ({statuses[0]}, masked) and a tool the policy denies "
          f"({statuses[1]}), for the redaction and denial metrics", flush=True)  # fmt: skip
    return statuses[0], statuses[1]


def caught_up(settings: Settings) -> bool:
    from ledgerflow.cli import query_text

    rows = query_text(settings, TOTALS_SQL, "TabSeparated").strip().splitlines()
    return bool(rows) and all(r.split("\t")[-1] == "1" for r in rows)


def produce_poison(settings: Settings) -> None:
    """One hand-made bad record on the charges topic: consumers must dead-letter it and go on."""
    from streams.clients import Producer
    from streams.topics import Topics

    producer = Producer({"bootstrap.servers": settings.bootstrap, "enable.idempotence": True})
    topic = Topics(settings.topic_prefix, settings.partitions).name("token-charges")
    producer.produce(topic, key=b"acme", value=b'{"cost": 1.0, "note": "JSON where Avro belongs"}')
    producer.flush(10)
    print(f"demo: produced one poison record to {topic}; `ledgerflow dlq list` shows where it went", flush=True)


def run(settings: Settings, n: int, timeout: float = 120.0, poison: bool = False, spike: bool = True) -> int:
    from ledgerflow.cli import PlatformError, query_text

    if poison:
        produce_poison(settings)
    asyncio.run(probe(settings))
    if spike:
        inject_spike(settings)
    started = time.monotonic()
    if settings.routing_enabled:  # issue 9: unpinned calls in rounds, feedback from hidden quality, the shift
        from ledgerflow import routing_demo

        ok, failed = routing_demo.run(settings, n)
    else:
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
    flagged = True
    if spike:
        sql = ANOMALY_SQL
        while not query_text(settings, sql, "TabSeparated").strip():
            if time.monotonic() > deadline:
                flagged = False
                print(f"\ndemo: no CostAnomalyDetected for {SPIKE_TENANT} within {timeout:.0f}s", flush=True)
                break
            time.sleep(0.5)
        if flagged:
            print(f"\ncost anomalies flagged for {SPIKE_TENANT} (the injected spike):")
            print(query_text(settings, sql, "PrettyCompactMonoBlock"), end="")
    sys.stdout.flush()
    return 0 if failed == 0 and flagged else 1
