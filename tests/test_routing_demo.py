"""The routing demo's traffic (issue 9, Build 4): simulated models with hidden quality per task
class (docs/routing-demo.toml), a gateway with the router on, users posting feedback from the
hidden quality, and the priors learned between rounds with the priors agent's own fold. Over a
bounded run the traffic must shift: code and maths to the model that gets them right, prose to
the cheap one, and the cost must fall well below always-the-dearest while quality rises.

Kafka is not what is under test here (tests/test_routing_kafka.py runs the loop through the
broker); the gateway's recorded facts go straight into `domain.routing_priors.fold`, which is
what agents/priors.py runs on them, so the router sees exactly what it would from the topic.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import pytest
from aiohttp.test_utils import TestServer

from domain.routing import Exploration
from domain.routing_priors import LearnerState, fold, publish
from gateway.adapters import SimProfile, SimulatedAdapter, task_class
from gateway.app import STATE, always_ready, create_app
from gateway.auth import KeyStore
from gateway.policy import PolicyPoint, seeds_from_regions
from gateway.router import Router
from gateway.server import build_registry, model_regions
from ledgerflow.routing_demo import format_shift, judge_for, prompt_for, run_rounds, summarise
from ledgerflow.settings import hash_key, load
from streams.events import AdapterCalled, Event, RoutingPriorsPublished

REPO = Path(__file__).resolve().parents[1]
KEY = "lf_demo_test_key"


class Recorder:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def publish(self, events: Sequence[Event], timeout: float = 1.8) -> None:
        self.events.extend(events)


def test_hidden_quality_and_latency_are_per_task_class_and_deterministic() -> None:
    from gateway.adapters import Latency
    from gateway.models import Message

    profile = SimProfile(
        Latency(first_token_ms=10.0),
        quality=0.9,
        quality_spread=0.0,
        class_quality=(("code", 0.2),),
        class_latency=(("code", 3.0),),
    )
    sim = SimulatedAdapter(profiles={"m": profile, "flat": SimProfile(quality=0.5, quality_spread=0.0)})
    code, prose = [Message(role="user", content=prompt_for(0))], [Message(role="user", content=prompt_for(2))]
    assert (task_class(prompt_for(0)), task_class(prompt_for(1)), task_class(prompt_for(2))) == (
        "code",
        "maths",
        "prose",
    )
    assert sim.quality("m", code) == 0.2 and sim.quality("m", prose) == 0.9
    assert sim.plan("m", code).first_token_s == pytest.approx(0.03) and sim.plan("m", prose).first_token_s == 0.01
    assert sim.quality("flat", code) == 0.5 == sim.quality("flat", prose)
    assert sim.plan("m", code) == sim.plan("m", code)  # the same call, the same hidden outcome
    with pytest.raises(ValueError):
        SimProfile(class_quality=(("code", 1.5),))


async def test_demo_traffic_shifts_to_the_model_good_enough_per_class_and_saves(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LEDGERFLOW_CONFIG", str(REPO / "docs" / "routing-demo.toml"))
    monkeypatch.setenv("LEDGERFLOW_DATA_DIR", str(tmp_path))
    settings = load()
    assert settings.routing_enabled
    registry = build_registry(settings)
    recorder = Recorder()
    app = create_app(
        KeyStore([("k-acme", "acme", hash_key(KEY), ["user"])]),
        recorder,
        always_ready,
        adapter=registry.as_adapter(),
        prices=registry.prices(),
        policy=PolicyPoint(seeds=seeds_from_regions(model_regions(registry))),
    )
    router = Router(exploration=Exploration(cap=settings.routing_explore_cap))
    app[STATE].router = router
    judge = judge_for(settings)
    assert judge.strongest == "sim-pro"
    learner = LearnerState()
    folded = 0

    async def learn(_round: int) -> None:
        """What the priors agent and the gateway's follower do between rounds."""
        nonlocal folded
        for event in recorder.events[folded:]:
            fold(learner, event)
        folded = len(recorder.events)
        [priors, *_] = publish(learner)
        assert isinstance(priors, RoutingPriorsPublished)
        router.apply(priors)

    async with TestServer(app) as server:
        base = str(server.make_url("")).rstrip("/")
        rounds, failed = await run_rounds(base, [KEY], judge, rounds=5, per_round=90, between=learn)
    assert failed == 0
    first, last = rounds[0], summarise([r for s in rounds[-2:] for r in s.routed])  # the last two rounds
    print(format_shift(rounds, judge.strongest))  # what `ledgerflow demo` prints (pytest -s shows it)

    # cold: every model unknown, the cheapest wins on cost, so code and maths go badly
    assert first.shares["code"].get("sim-mini", 0) > 0.5
    # learned: code and maths to sim-pro (the only one good at them), prose stays cheap
    for task in ("code", "maths"):
        assert last.shares[task].get("sim-pro", 0) >= max(0.5, first.shares[task].get("sim-pro", 0) + 0.4), last.shares
    assert last.shares["prose"].get("sim-pro", 0) <= 0.4 < last.shares["prose"].get("sim-mini", 0), last.shares
    assert last.quality > first.quality + 0.1
    # savings: well under always-sim-pro at nearly its quality
    assert last.cost < last.strongest_cost * Decimal("0.8") and last.savings > 0
    # the latency the router weighs is the adapters' own (AdapterCalled, one per answered call)
    calls = [e for e in recorder.events if isinstance(e, AdapterCalled)]
    assert len(calls) == 5 * 90
    assert router.priors.models["sim-pro"].latency_ms(0) > router.priors.models["sim-mini"].latency_ms(0)


def test_summary_shares_and_savings() -> None:

    from ledgerflow.routing_demo import Routed

    s = summarise(
        [
            Routed("code", "b", Decimal("0.3"), 1.0, Decimal("0.3")),
            Routed("code", "a", Decimal("0.1"), 0.0, Decimal("0.3")),
            Routed("prose", "a", Decimal("0.1"), 1.0, Decimal("0.3")),
        ]
    )
    assert s.shares == {"code": {"a": 0.5, "b": 0.5}, "prose": {"a": 1.0}}
    assert (s.cost, s.strongest_cost, s.savings) == (Decimal("0.5"), Decimal("0.9"), Decimal("0.4"))
    assert "saved 0.4" in format_shift([s], "b")
