"""Simulated models with profiles: latency distributions, answer lengths, quality, failures, prices."""

from __future__ import annotations

import statistics
import time
from decimal import Decimal
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.adapters import Latency, SimProfile, SimulatedAdapter
from gateway.app import always_ready, create_app
from gateway.auth import KeyStore
from gateway.models import Message
from gateway.server import build_registry
from ledgerflow.settings import SimulatedModel, hash_key, load
from streams.events import Event, TokensCharged


def prompt(i: int) -> list[Message]:
    return [Message(role="user", content=f"question number {i}")]


def test_the_default_simulator_answers_as_it_always_did() -> None:
    """Recorded demos and tests depend on the default answer: the profile machinery must not change it."""
    p = SimulatedAdapter().plan("sim-small", prompt(1))
    assert (p.first_token_s, p.per_token_s, p.fails) == (0.0, 0.0, False)
    assert 8 <= p.completion_tokens <= 63 and p.text.startswith("[sim-small] ")


def test_every_draw_is_a_function_of_model_and_prompt() -> None:
    profile = SimProfile(Latency("lognormal", 200, 5, 0.5), answer_tokens=(20, 400), quality=0.6, error_rate=0.3)
    a, b = SimulatedAdapter(profiles={"m": profile}), SimulatedAdapter(profiles={"m": profile})
    plans = [a.plan("m", prompt(i)) for i in range(200)]
    assert plans == [b.plan("m", prompt(i)) for i in range(200)]
    assert len({p.first_token_s for p in plans}) > 150  # ... but varied across prompts


@pytest.mark.parametrize(
    ("latency", "low", "high"),
    [
        (Latency("fixed", 100, 2), 0.100, 0.100),
        (Latency("uniform", 100, 2, 0.25), 0.075, 0.125),
        (Latency("lognormal", 100, 2, 0.5), 0.0, float("inf")),
    ],
)
def test_latency_distributions(latency: Latency, low: float, high: float) -> None:
    sim = SimulatedAdapter(profiles={"m": SimProfile(latency)})
    firsts = [sim.plan("m", prompt(i)).first_token_s for i in range(2000)]
    assert low - 1e-9 <= min(firsts) and max(firsts) <= high + 1e-9
    assert statistics.median(firsts) == pytest.approx(0.100, rel=0.06)  # each is centred on first_token_ms
    if latency.distribution == "lognormal":  # a right tail: p99 well above the median
        assert statistics.quantiles(firsts, n=100)[98] > 2.5 * statistics.median(firsts)
    for i in range(20):  # the per-token time scales with the same draw
        p = sim.plan("m", prompt(i))
        assert p.per_token_s == pytest.approx(p.first_token_s * 2 / 100)


def test_answer_length_quality_and_error_rate_follow_the_profile() -> None:
    sim = SimulatedAdapter(
        profiles={
            "good": SimProfile(answer_tokens=(100, 120), quality=0.9, quality_spread=0.05),
            "poor": SimProfile(answer_tokens=(5, 6), quality=0.3, quality_spread=0.05, error_rate=0.2),
        }
    )
    good = [sim.plan("good", prompt(i)) for i in range(1000)]
    poor = [sim.plan("poor", prompt(i)) for i in range(1000)]
    assert {p.completion_tokens for p in good} <= set(range(100, 121))
    assert {p.completion_tokens for p in poor} <= {5, 6}
    assert statistics.mean(p.quality for p in good) == pytest.approx(0.9, abs=0.01)
    assert statistics.mean(p.quality for p in poor) == pytest.approx(0.3, abs=0.01)
    assert all(0 <= p.quality <= 1 for p in good + poor)
    assert sum(p.fails for p in poor) / 1000 == pytest.approx(0.2, abs=0.04)
    assert not any(p.fails for p in good)
    assert sim.quality("good", prompt(3)) == good[3].quality


async def test_calls_take_the_planned_time_and_fail_as_planned() -> None:
    sim = SimulatedAdapter(profiles={"m": SimProfile(Latency("fixed", 40, 1), answer_tokens=(20, 20))})
    started = time.monotonic()
    done = await sim.complete("m", prompt(1))
    assert time.monotonic() - started >= 0.040 + 0.020 - 0.002
    assert done.completion_tokens == 20
    started = time.monotonic()
    pieces = [piece async for piece in sim.stream("m", prompt(1))]
    assert "".join(pieces) == done.text and time.monotonic() - started >= 0.060 - 0.002
    failing = SimulatedAdapter(profiles={"f": SimProfile(error_rate=1.0)})
    from gateway.upstream import UpstreamUnavailable

    with pytest.raises(UpstreamUnavailable):
        await failing.complete("f", prompt(1))
    with pytest.raises(UpstreamUnavailable):
        [piece async for piece in failing.stream("f", prompt(1))]


def test_profiles_are_validated() -> None:
    with pytest.raises(ValueError, match="answer_tokens"):
        SimProfile(answer_tokens=(10, 5))
    with pytest.raises(ValueError, match="uniform"):
        Latency("uniform", 100, 0, 2.0)
    with pytest.raises(ValueError, match="quality"):
        SimProfile(quality=1.5)


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def publish(self, events: Any, timeout: float = 1.8, records: Any = ()) -> None:
        self.events.extend(events)


async def test_configured_simulated_models_are_served_and_charged_at_their_registry_price() -> None:
    settings = load(
        simulated_models=[
            SimulatedModel(name="sim-fast", input_per_mtok=Decimal("0.10"), output_per_mtok=Decimal("0.40"),
                           answer_tokens=(10, 10), quality=0.7),
            SimulatedModel(name="sim-smart", input_per_mtok=Decimal("3"), output_per_mtok=Decimal("15"),
                           region="eu-west", latency="lognormal", first_token_ms=1, latency_spread=0.3,
                           answer_tokens=(50, 50), quality=0.95),
        ]
    )  # fmt: skip
    registry = build_registry(settings)
    assert {"sim-small", "sim-large", "sim-fast", "sim-smart"} <= set(registry.names())
    assert registry.get("sim-smart").region == "eu-west"
    rec = Recorder()
    keys = KeyStore([("k", "acme", hash_key("secret"), ["user"])])
    app = create_app(keys, rec, always_ready, adapter=registry.as_adapter(), prices=registry.prices())
    async with TestClient(TestServer(app)) as client:
        for model, out_price in (("sim-fast", Decimal("0.40")), ("sim-smart", Decimal("15"))):
            resp = await client.post(
                "/v1/chat/completions",
                json={"model": model, "messages": [{"role": "user", "content": "hi"}]},
                headers={"X-API-Key": "secret"},
            )
            assert resp.status == 200, await resp.text()
            [charge] = [e for e in rec.events if isinstance(e, TokensCharged) and e.model == model]
            assert charge.output_price_per_mtok == out_price and charge.price_list_version == "simulated"
            assert charge.cost == (
                charge.prompt_tokens * charge.input_price_per_mtok + charge.completion_tokens * out_price
            ) / Decimal(1_000_000)
