"""Budget arithmetic (domain.budget) and the two ledgers that run it: in process and Redis (real redis-server).

One contract, both implementations (`ledger` is parametrized): holds never let a hard budget
overrun, settles spend the actual and return the rest, releases return the hold, a repeated
settle spends once, thresholds fire once per period, lapsed holds return, restore only raises.
Amounts are chosen to exercise exactness past a float's 2^53 (picounits of > $9007).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal

import pytest

from domain.budget import (
    Budget,
    BudgetBook,
    BudgetCounter,
    Line,
    from_pico,
    next_reset,
    period_start,
    reserve,
    restore,
    settle,
    to_pico,
)
from gateway.budgets import BudgetLedger, LocalBudgetLedger, RedisBudgetLedger, prompt_bound
from gateway.models import Message
from tests import factories
from tests.redis_fixture import redis_url

__all__ = ["redis_url"]

P = to_pico


def test_money_maps_to_picounits_exactly_and_refuses_more_places() -> None:
    assert P(Decimal("0.000000000001")) == 1
    assert from_pico(P(Decimal("123456789.123456789012"))) == Decimal("123456789.123456789012")
    with pytest.raises(ValueError):
        P(Decimal("0.0000000000001"))


def test_periods_are_utc_calendar_periods() -> None:
    at = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC)
    assert period_start("month", at) == datetime(2026, 12, 1, tzinfo=UTC)
    assert next_reset("month", at) == datetime(2027, 1, 1, tzinfo=UTC)
    assert next_reset("day", at) == datetime(2027, 1, 1, tzinfo=UTC)
    assert period_start("total", at).year == 1970 and next_reset("total", at) is None
    with pytest.raises(ValueError):
        period_start("week", at)


def test_budget_book_newest_wins_and_key_budgets_stay_in_their_tenant() -> None:
    book = BudgetBook()
    ev = factories.budget_set("acme")
    book.apply(ev)
    book.apply(replace(ev, limit_amount=Decimal("7")))
    assert [b.limit for b in book.all()] == [Decimal("7")]
    key = factories.budget_set("acme")
    key = replace(key, budget_id="k", scope="api_key", scope_id="k1", enforced=False)
    book.apply(key)
    assert [b.budget_id for b in book.applicable("acme", "k1")] == ["b-acme-month", "k"]  # hard first
    assert [b.budget_id for b in book.applicable("acme", "k2")] == ["b-acme-month"]
    assert book.applicable("globex", "k1") == []


def test_pure_reserve_settle_never_overruns_and_alerts_once() -> None:
    c = BudgetCounter(initialised=True)
    line = Line(limit=100, enforced=True, thresholds=(50, 80, 100))
    assert reserve([c], [line], 60) is None
    refusal = reserve([c], [line], 41)
    assert refusal is not None and refusal.left == 40
    assert settle([c], [line], 60, 50) == [[50]]
    assert (c.spent, c.held) == (50, 0)
    assert reserve([c], [line], 50) is None
    assert settle([c], [line], 50, 50) == [[80, 100]]
    assert settle([c], [line], None, 0) == [[]]  # once each
    restore(c, 10)
    assert c.spent == 100  # restore never lowers


def test_prompt_bound_is_at_least_the_simulators_count() -> None:
    from gateway.adapters import SimulatedAdapter

    for text in ["hi", "x" * 999, "ünïcødé " * 40]:
        msgs = [Message(role="user", content=text), Message(role="system", content="be brief")]
        _, counted, _ = SimulatedAdapter()._answer("sim-small", msgs)
        assert prompt_bound(msgs) >= counted


@pytest.fixture(params=["local", "redis"])
async def ledger(request: pytest.FixtureRequest) -> AsyncIterator[BudgetLedger]:
    if request.param == "local":
        yield LocalBudgetLedger()
        return
    url = request.getfixturevalue("redis_url")
    led = RedisBudgetLedger.from_url(url, key_prefix=f"t{uuid.uuid4().hex[:8]}:")
    yield led
    await led.aclose()


BIG = P(Decimal("10000.000000000001"))  # 1e16 + 1 picounits: not exact as a double


@pytest.mark.redis
async def test_holds_settles_and_releases_are_exact_past_float_precision(ledger: BudgetLedger) -> None:
    t, c = "acme", "b:1"
    lines = [Line(BIG, True, (50, 100))]
    assert (await ledger.reserve(t, "r0", [c], lines, 1, 0.0, 60.0)).status == "uninitialised"
    await ledger.restore(t, c, 0, None)
    assert (await ledger.reserve(t, "r1", [c], lines, BIG - 1, 0.0, 60.0)).status == "ok"
    refused = await ledger.reserve(t, "r2", [c], lines, 2, 0.0, 60.0)
    assert (refused.status, refused.index, refused.left) == ("refused", 0, 1)
    assert (await ledger.reserve(t, "r3", [c], lines, 1, 0.0, 60.0)).status == "ok"  # exactly full
    after = await ledger.settle(t, "r1", [c], lines, BIG - 1, )  # fmt: skip
    assert after[0].spent == BIG - 1 and after[0].held == 1 and after[0].crossed == (50,)
    assert await ledger.settle(t, "r1", [c], lines, BIG - 1) == []  # a repeated settle spends nothing
    await ledger.release(t, "r3", [c])
    await ledger.release(t, "r3", [c])  # idempotent
    state = await ledger.read(t, c)
    assert (state.spent, state.held, state.alerted) == (BIG - 1, 0, {50})
    late = (await ledger.settle(t, "late", [c], lines, 1))[0]  # a settle with no hold still spends
    assert (late.spent, late.crossed) == (BIG, (100,))


@pytest.mark.redis
async def test_a_lapsed_hold_returns_and_a_late_settle_still_spends(ledger: BudgetLedger) -> None:
    t, c = "acme", "b:2"
    lines = [Line(100, True, ())]
    await ledger.restore(t, c, 0, None)
    assert (await ledger.reserve(t, "a", [c], lines, 100, 0.0, 10.0)).status == "ok"
    assert (await ledger.reserve(t, "b", [c], lines, 1, 5.0, 15.0)).status == "refused"
    assert (await ledger.reserve(t, "b", [c], lines, 1, 11.0, 21.0)).status == "ok"  # "a" lapsed at 10
    await ledger.settle(t, "a", [c], lines, 30)  # its call did finish: the spend counts, the hold is not returned twice
    state = await ledger.read(t, c)
    assert (state.spent, state.held) == (30, 1)


@pytest.mark.redis
async def test_a_hold_on_two_budgets_is_all_or_nothing(ledger: BudgetLedger) -> None:
    t = "acme"
    lines = [Line(1000, True, ()), Line(10, True, ())]  # tenant budget, key budget
    for c in ("tenant", "key"):
        await ledger.restore(t, c, 0, None)
    out = await ledger.reserve(t, "r", ["tenant", "key"], lines, 11, 0.0, 60.0)
    assert (out.status, out.index, out.left) == ("refused", 1, 10)
    assert (await ledger.read(t, "tenant")).held == 0  # the tenant line was not touched
    soft = [Line(1000, True, ()), Line(10, False, (100,))]
    assert (await ledger.reserve(t, "s", ["tenant", "key"], soft, 11, 0.0, 60.0)).status == "ok"
    after = await ledger.settle(t, "s", ["tenant", "key"], soft, 11)
    assert [a.crossed for a in after] == [(), (100,)]


def test_budget_from_event_refuses_what_gateways_could_not_enforce() -> None:
    ev = factories.budget_set("acme")
    with pytest.raises(ValueError):
        Budget.from_event(replace(ev, period="week"))


@pytest.mark.redis
async def test_two_tenants_with_the_same_budget_id_and_request_id_never_share_a_counter(ledger: BudgetLedger) -> None:
    """Tenants choose their budget ids (and may send request ids): the same names in two tenants
    are two counters and two holds, in process as in Redis."""
    c, lines = "team:1", [Line(10, True, ())]
    for tenant in ("acme", "globex"):
        await ledger.restore(tenant, c, 0, None)
    assert (await ledger.reserve("acme", "r", [c], lines, 10, 0.0, 60.0)).status == "ok"
    assert (await ledger.reserve("globex", "r", [c], lines, 10, 0.0, 60.0)).status == "ok"  # not a duplicate
    await ledger.settle("acme", "r", [c], lines, 7)
    await ledger.release("globex", "r", [c])
    acme, globex = await ledger.read("acme", c), await ledger.read("globex", c)
    assert (acme.spent, acme.held, globex.spent, globex.held) == (7, 0, 0, 0)
