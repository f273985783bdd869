"""Cost anomalies (issue 7, part 6): an injected spike in a tenant's hourly spend is flagged, once.

The pure fold over two days of ordinary hours and one spike, its replay, and the Faust agent
in its test context (no broker), emitting CostAnomalyDetected for the spike hour only.
"""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import faust
import pytest

from agents.app import create_app
from domain.anomaly import GRACE_HOURS, HourlySpend, fold
from streams.codec import Codec
from streams.events import CostAnomalyDetected, TokensCharged
from streams.topics import Topics
from tests import factories

CODEC = Codec()
START = datetime(2026, 11, 1, tzinfo=UTC)
SPIKE_HOUR = 40


def traffic(
    tenant: str = "acme", hours: int = 48, spike: int | None = SPIKE_HOUR, seed: int = 3
) -> list[TokensCharged]:
    """Four calls an hour costing about 0.25 each (some hours quiet or cheap); the spike hour costs 20x."""
    rnd = random.Random(seed)
    out = []
    for h in range(hours):
        if h % 11 == 5:
            continue  # a quiet hour: no charges at all
        calls = 4 * (20 if h == spike else 1)
        for i in range(calls):
            at = START + timedelta(hours=h, minutes=i * 60 // calls)
            c = factories.charge(tenant, cost=str(Decimal("0.25") + Decimal(rnd.randrange(-50, 50)) / 1000))
            out.append(replace(c, envelope=replace(c.envelope, occurred_at=at)))
    return out


def run(charges: list[TokensCharged]) -> list[CostAnomalyDetected]:
    state: HourlySpend | None = None
    found = []
    for offset, c in enumerate(charges):
        state, out = fold(state, c, 0, offset)
        state = HourlySpend.from_json(state.to_json())  # as the table stores it
        if out is not None:
            found.append(out)
    return found


def test_an_injected_spike_is_flagged_once_and_ordinary_hours_are_not() -> None:
    found = run(traffic())
    assert [a.hour_start for a in found] == [START + timedelta(hours=SPIKE_HOUR)]
    (spike,) = found
    assert spike.spend > 15 * spike.expected and spike.score >= spike.threshold
    assert spike.expected > 0 and spike.detector.startswith("river.anomaly.GaussianScorer")
    assert run(traffic(spike=None)) == []


def test_replay_reports_the_same_events() -> None:
    charges = traffic()
    assert run(charges) == run(charges)  # same log, same events (ids derive from the closing charge)


def test_the_first_day_only_trains_and_a_dip_is_no_alert() -> None:
    early = traffic(spike=GRACE_HOURS // 2)
    assert run(early) == []  # within the grace period
    dip = [c for c in traffic(spike=None) if c.envelope.occurred_at.hour != 16 or c.envelope.occurred_at.day != 2]
    assert run(dip) == []


def test_redelivered_charges_change_nothing() -> None:
    charges = traffic()
    state, _ = fold(None, charges[0], 0, 0)
    again, out = fold(state, charges[0], 0, 0)
    assert out is None and again == state


@pytest.fixture
def app(tmp_path):  # type: ignore[no-untyped-def]
    app = create_app("anomaly-unit", "127.0.0.1:1", Topics("u.", 1), data_dir=str(tmp_path), store="memory://")
    app.finalize()
    app.conf.store = "memory://"  # type: ignore[assignment]
    app.flow_control.resume()
    return app


async def test_agent_emits_the_spike_on_the_cost_anomalies_topic(app, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    sent: list[tuple[str, Any]] = []

    async def publish_message(self: faust.Topic, fut: Any, wait: bool = False) -> Any:
        sent.append((self._topic_name_or_default(fut.message.channel), fut.message.value))
        fut.set_result(None)
        return fut

    monkeypatch.setattr(faust.Topic, "publish_message", publish_message)
    agent = app.agents["cost-anomalies"]
    async with agent.test_context() as ctx:
        for c in traffic(hours=SPIKE_HOUR + 2):
            await ctx.put(CODEC.encode(c), key=b"acme")
    found = [CODEC.decode(v) for t, v in sent if t == "u.cost-anomalies"]
    assert [a.hour_start for a in found] == [START + timedelta(hours=SPIKE_HOUR)]  # type: ignore[attr-defined]
