"""Budgets that never overshoot, through the real gateway app, the real broker and a real redis-server.

Budgets are set with `ledgerflow budgets set` (events on the budgets topic) and reach the
gateways through their followers. The model is a test adapter whose usage the test sets (so the
worst case is exact; that no adapter exceeds max_tokens is tests/test_budget_max_tokens.py); in
its worst case every call uses
exactly the tokens its hold allowed (prompt bound + max_tokens), so "a budget for exactly 10
calls" admits exactly 10 however the 100 concurrent calls interleave: fewer would mean a
leak, more an overshoot. When calls cost less than their hold, spend stays at or under it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient, TestServer

from domain.budget import period_start
from domain.pricing import DEFAULT_PRICES, PriceBook, cost
from gateway.adapters import Completion
from gateway.app import always_ready, create_app
from gateway.auth import KeyStore
from gateway.budgets import (
    Accounting,
    BudgetLedger,
    LocalBudgetLedger,
    RedisBudgetLedger,
    counter_name,
    kafka_spend_source,
    prompt_bound,
)
from gateway.models import Message
from ledgerflow import budgets as lf_budgets
from ledgerflow.settings import Settings, hash_key, load
from streams.codec import Codec
from streams.events import (
    BudgetReserved,
    BudgetSettled,
    BudgetThresholdCrossed,
    Event,
    TokensCharged,
)
from streams.publisher import FactPublisher
from streams.topics import Topics
from tests.kafka_helpers import read_all
from tests.redis_fixture import redis_url

__all__ = ["redis_url"]
pytestmark = pytest.mark.kafka

CODEC = Codec()
KEY = "lf_thrift_secret"
MAX_TOKENS = 40
PROMPT = "Summarise the quarterly numbers."
PRICE = DEFAULT_PRICES["sim-small"]


class UsageAdapter:
    """A model whose usage is set by the test: by default the worst case, exactly what the hold allowed
    (the prompt bound and max_tokens); `share` < 1 uses that share of both (a call cheaper than its hold)."""

    models: tuple[str, ...] = ("sim-small", "sim-large")

    def __init__(self, share: Decimal = Decimal(1)) -> None:
        self.share = share

    def usage(self, model: str, messages: list[Message], text: str, max_tokens: int | None = None) -> Completion:
        prompt = int(prompt_bound(messages) * self.share)
        return Completion(model, text, prompt, int(MAX_TOKENS * self.share))

    async def complete(self, model: str, messages: list[Message], max_tokens: int | None = None) -> Completion:
        return self.usage(model, messages, f"[{model}] fine")

    async def stream(self, model: str, messages: list[Message], max_tokens: int | None = None) -> AsyncIterator[str]:
        yield f"[{model}] fine"


def call_cost() -> Decimal:
    return cost(prompt_bound([Message(role="user", content=PROMPT)]), MAX_TOKENS, PRICE)


def settings_for(bootstrap: str, topics: Topics, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("LEDGERFLOW_KAFKA_BOOTSTRAP", bootstrap)
    monkeypatch.setenv("LEDGERFLOW_TOPIC_PREFIX", topics.prefix)
    monkeypatch.setenv("LEDGERFLOW_PARTITIONS", str(topics.partitions))
    return load()


async def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


async def gateway(
    stack: AsyncExitStack, bootstrap: str, topics: Topics, ledger: BudgetLedger, replica: int, adapter: Any
) -> tuple[TestClient, Accounting]:
    """One replica: create_app with a transactional publisher on the broker and accounting following the topics."""
    publisher = FactPublisher(bootstrap, f"{topics.prefix}gw{replica}", topics)
    publisher.start()
    stack.callback(publisher.close)
    acc = Accounting(
        prices=PriceBook(DEFAULT_PRICES),
        ledger=ledger,
        spend_source=kafka_spend_source(bootstrap, topics.name("budget-holds")),
    )
    acc.follow(bootstrap, [topics.name("price-lists"), topics.name("budgets")])
    acc.start()
    stack.callback(acc.close)
    keys = KeyStore([("k-thrift", "thrift", hash_key(KEY), ["user"])])
    # a generous Kafka budget: 100 concurrent transactions on a shared 2-core box must not turn into 503s
    app = create_app(keys, publisher, acc.gate(always_ready), adapter=adapter, accounting=acc, publish_timeout=20.0)
    await eventually(lambda: publisher.ready and acc.loaded)
    client = await stack.enter_async_context(TestClient(TestServer(app)))
    return client, acc


async def ask(client: TestClient) -> tuple[int, dict[str, Any]]:
    body = {"model": "sim-small", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS}
    resp = await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    return resp.status, await resp.json()


async def set_budget(settings: Settings, limit: Decimal, accs: Sequence[Accounting]) -> str:
    event = await asyncio.to_thread(lf_budgets.set_budget, settings, "thrift", str(limit))
    await eventually(lambda: all((b := a.budgets.get(event.budget_id)) and b.limit == limit for a in accs))
    return event.budget_id


def facts(bootstrap: str, topics: Topics, topic: str, expect: int) -> list[Event]:
    return [CODEC.decode(m.value()) for m in read_all(bootstrap, [topics.name(topic)], expect, timeout=15.0)]


async def test_100_concurrent_calls_against_a_budget_for_10_admit_exactly_10(
    kafka_bootstrap: str, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(kafka_bootstrap, topics, monkeypatch)
    async with AsyncExitStack() as stack:
        client, acc = await gateway(stack, kafka_bootstrap, topics, LocalBudgetLedger(), 0, UsageAdapter())
        budget_id = await set_budget(settings, call_cost() * 10, [acc])
        results = await asyncio.gather(*(ask(client) for _ in range(100)))
    statuses = [s for s, _ in results]
    assert statuses.count(200) == 10 and statuses.count(402) == 90, statuses
    refusal = next(body for s, body in results if s == 402)["error"]
    assert refusal["code"] == "budget_exhausted"
    now = datetime.now(UTC)
    reset = datetime(now.year + now.month // 12, now.month % 12 + 1, 1, tzinfo=UTC).isoformat()
    assert budget_id in refusal["message"] and "0.00 USD left" in refusal["message"]
    assert f"resets at {reset}" in refusal["message"]

    charges = [e for e in facts(kafka_bootstrap, topics, "token-charges", 10) if isinstance(e, TokensCharged)]
    assert len(charges) == 10 and sum(c.cost for c in charges) == call_cost() * 10  # spent = budget, exactly
    holds = facts(kafka_bootstrap, topics, "budget-holds", 23)
    assert sum(isinstance(e, BudgetReserved) for e in holds) == 10
    assert sum(isinstance(e, BudgetSettled) for e in holds) == 10
    crossed = sorted(e.threshold_pct for e in holds if isinstance(e, BudgetThresholdCrossed))
    assert crossed == [50, 80, 100]  # once each
    # each hold and its settle were committed with the request's own facts (same correlation id)
    assert {e.envelope.correlation_id for e in holds if isinstance(e, BudgetSettled)} == {c.request_id for c in charges}


@pytest.mark.redis
async def test_three_replicas_sharing_redis_never_overspend_and_restore_after_redis_is_lost(
    kafka_bootstrap: str, topics: Topics, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(kafka_bootstrap, topics, monkeypatch)
    prefix = f"{topics.prefix}bud:"
    async with AsyncExitStack() as stack:
        replicas = []
        for i in range(3):
            ledger = RedisBudgetLedger.from_url(redis_url, key_prefix=prefix)
            stack.push_async_callback(ledger.aclose)
            replicas.append(await gateway(stack, kafka_bootstrap, topics, ledger, i, UsageAdapter()))
        accs = [a for _, a in replicas]
        await set_budget(settings, call_cost() * 10, accs)
        for a in accs:  # counters initialised from the log up front, so the burst spreads over the replicas
            await a.reconcile_once()
        results = await asyncio.gather(*(ask(replicas[i % 3][0]) for i in range(99)))
        statuses = [s for s, _ in results]
        assert statuses.count(200) == 10 and statuses.count(402) == 89
        served_by = {i % 3 for i, (s, _) in enumerate(results) if s == 200}
        assert len(served_by) >= 2  # the budget really was shared

        # Redis is lost: its counters are rebuilt from the BudgetSettled facts on the log before any admission
        r = aioredis.Redis.from_url(redis_url)
        for key in await r.keys(f"{prefix}*"):
            await r.delete(key)
        await r.aclose()
        assert [s for s, _ in await asyncio.gather(*(ask(c) for c, _ in replicas))] == [402, 402, 402]

        # a raised budget admits exactly what was added
        await set_budget(settings, call_cost() * 12, accs)
        statuses = [s for s, _ in await asyncio.gather(*(ask(replicas[i % 3][0]) for i in range(12)))]
        assert statuses.count(200) == 2

    charges = [e for e in facts(kafka_bootstrap, topics, "token-charges", 12) if isinstance(e, TokensCharged)]
    assert sum(c.cost for c in charges) == call_cost() * 12


@pytest.mark.redis
async def test_three_replicas_with_cheaper_calls_than_their_holds_stay_within_budget(
    kafka_bootstrap: str, topics: Topics, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(kafka_bootstrap, topics, monkeypatch)
    budget = call_cost() * 5
    async with AsyncExitStack() as stack:
        replicas = []
        for i in range(3):
            ledger = RedisBudgetLedger.from_url(redis_url, key_prefix=f"{topics.prefix}bud:")
            stack.push_async_callback(ledger.aclose)
            replicas.append(await gateway(stack, kafka_bootstrap, topics, ledger, i, UsageAdapter(Decimal("0.6"))))
        await set_budget(settings, budget, [a for _, a in replicas])
        statuses = []
        for _ in range(4):  # waves: leftovers of settled holds are admitted again, never beyond the budget
            statuses += [s for s, _ in await asyncio.gather(*(ask(replicas[i % 3][0]) for i in range(30)))]
    admitted = statuses.count(200)
    assert admitted > 5 and statuses.count(402) > 0  # cheaper calls: more than 5 fit, but not all 120
    charges = [e for e in facts(kafka_bootstrap, topics, "token-charges", admitted) if isinstance(e, TokensCharged)]
    assert len(charges) == admitted and sum(c.cost for c in charges) <= budget


async def test_an_upstream_failure_releases_the_hold_and_records_it(
    kafka_bootstrap: str, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gateway.upstream import UpstreamError
    from streams.events import BudgetReleased

    class Failing(UsageAdapter):
        async def complete(self, model: str, messages: list[Message], max_tokens: int | None = None) -> Completion:
            raise UpstreamError("the model is down")

    settings = settings_for(kafka_bootstrap, topics, monkeypatch)
    async with AsyncExitStack() as stack:
        client, acc = await gateway(stack, kafka_bootstrap, topics, LocalBudgetLedger(), 0, Failing())
        await set_budget(settings, call_cost(), [acc])
        assert [await ask(client) for _ in range(3)][-1][0] == 502  # never 402: every failed hold came back
        budget = acc.budgets.all()[0]
        state = await acc.ledger.read("thrift", counter_name(budget, period_start("month", datetime.now(UTC))))
        assert (state.spent, state.held) == (0, 0)
    released = [e for e in facts(kafka_bootstrap, topics, "budget-holds", 6) if isinstance(e, BudgetReleased)]
    assert len(released) == 3 and {e.reason for e in released} == {"failed"}


async def test_a_streamed_call_holds_with_its_opening_facts_and_settles_with_its_charge(
    kafka_bootstrap: str, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(kafka_bootstrap, topics, monkeypatch)
    async with AsyncExitStack() as stack:
        client, acc = await gateway(
            stack, kafka_bootstrap, topics, LocalBudgetLedger(), 0, UsageAdapter(Decimal("0.5"))
        )
        await set_budget(settings, call_cost() * 3, [acc])
        body = {"model": "sim-small", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": MAX_TOKENS}
        body["stream"] = True
        resp = await client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
        assert resp.status == 200 and "[DONE]" in await resp.text()
    holds = facts(kafka_bootstrap, topics, "budget-holds", 2)
    reserved = [e for e in holds if isinstance(e, BudgetReserved)]
    settled = [e for e in holds if isinstance(e, BudgetSettled)]
    assert len(reserved) == len(settled) == 1 and reserved[0].amount == call_cost()
    (charge,) = [e for e in facts(kafka_bootstrap, topics, "token-charges", 1) if isinstance(e, TokensCharged)]
    assert settled[0].actual_amount == charge.cost < call_cost() and settled[0].request_id == charge.request_id
