"""Cost anomalies (issue 7, part 6): an injected spike in a tenant's hourly spend is flagged, once.

The pure fold over two days of ordinary hours and one spike, its replay, and the Faust agent
in its test context (no broker), emitting CostAnomalyDetected for the spike hour only.
"""

from __future__ import annotations

import pickle
import random
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import faust
import orjson
import pytest

from agents import anomalies
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


def fold_through_table(
    charges: list[TokensCharged], crash_at: int | None = None
) -> tuple[HourlySpend | None, list[CostAnomalyDetected]]:
    """The agent's storage (open hour per charge, detectors per closed hour) over a dict as its table.

    `crash_at`: that charge's detectors reach the table but its open hour does not (a SIGKILL
    between the two writes), and the charge is redelivered, as the worker would after a restart.
    """
    table: dict[str, Any] = {}
    found = []
    queue = list(enumerate(charges))
    crashed = False
    while queue:
        offset, c = queue.pop(0)
        old = anomalies.restore(table, "acme")
        new, out = fold(old, c, 0, offset)
        if offset == crash_at and not crashed:
            crashed = True
            before = table.get("acme")
            anomalies.save(table, "acme", old, new)
            table["acme"] = before  # the open hour was lost
            queue.insert(0, (offset, c))  # redelivered
            continue
        anomalies.save(table, "acme", old, new)
        if out is not None:
            found.append(out)
    return anomalies.restore(table, "acme"), found


def test_a_crash_between_the_two_writes_learns_the_hour_once() -> None:
    charges = traffic()
    closing = next(i for i, c in enumerate(charges) if c.envelope.occurred_at >= START + timedelta(hours=30))
    straight, found = fold_through_table(charges)
    assert straight is not None and [a.hour_start for a in found] == [START + timedelta(hours=SPIKE_HOUR)]
    crashed, found_after_crash = fold_through_table(charges, crash_at=closing)
    assert crashed is not None and found_after_crash == found
    assert replace(crashed, detector=b"") == replace(straight, detector=b"")
    a, b = (pickle.loads(x.detector).gaussian for x in (crashed, straight))  # its rng state differs, its data not
    assert list(a.window) == list(b.window) and (a.obj.mu, a.obj.n_samples) == (b.obj.mu, b.obj.n_samples)
    table: dict[str, Any] = {}
    anomalies.save(table, "acme", None, straight)
    assert len(orjson.dumps(table["acme"])) < 400  # per charge: the open hour only, not the ~6 KB detector


def test_state_stored_by_the_previous_layout_is_read_and_migrated() -> None:
    """Before this layout the table held the whole state (detector included) under the tenant and
    no `|detectors` key: the first charge after an upgrade must fold, not crash the worker."""
    charges = traffic()[:40]
    straight, _ = fold_through_table(charges)
    assert straight is not None
    table: dict[str, Any] = {"acme": straight.to_json()}  # what the old agent stored
    old = anomalies.restore(table, "acme")
    assert old == straight
    new, _ = fold(old, charges[-1], 0, 10_000)
    anomalies.save(table, "acme", old, new)
    assert "detector" not in table["acme"] and table["acme|detectors"]  # now in the new layout
    assert anomalies.restore(table, "acme") == new
