"""The priors loop end to end on the real broker: a gateway (built as `python -m gateway` builds
it, routing on) routes calls and records RouteChosen; feedback comes in through its API; the
priors worker learns and publishes priors and regret; the gateway hot-loads the priors and
routes by them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer

from agents.priors import PriorsConfig, PriorsWorker
from gateway.app import STATE
from gateway.server import build
from ledgerflow.settings import DEMO_KEYS, load
from streams.codec import Codec
from streams.events import AdapterCalled, RouteChosen, RoutingPriorsPublished, RoutingRegretRecorded
from streams.topics import Topics
from tests.kafka_helpers import read_all

pytestmark = pytest.mark.kafka

CODEC = Codec()
ACME = {"Authorization": f"Bearer {DEMO_KEYS['acme']}"}
CODE = "def parse(line):\n    return line.split(';')  # why does parse() return {}?"
PLAIN = "Tell me about the history of the city of Lyon and its bridges"


def hidden_quality(model: str, is_code: bool) -> float:
    """The simulated truth: sim-large answers both kinds well, sim-small only prose."""
    return 1.0 if model == "sim-large" or not is_code else 0.0


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.1)


async def test_outcomes_in_priors_published_and_a_gateway_routes_by_them(
    kafka_bootstrap: str, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LEDGERFLOW_KAFKA_BOOTSTRAP", kafka_bootstrap)
    monkeypatch.setenv("LEDGERFLOW_TOPIC_PREFIX", topics.prefix)
    monkeypatch.setenv("LEDGERFLOW_PARTITIONS", str(topics.partitions))
    monkeypatch.setenv("LEDGERFLOW_GATEWAY_INSTANCE_ID", f"{topics.prefix}gw")
    monkeypatch.setenv("LEDGERFLOW_ROUTING_ENABLED", "true")
    monkeypatch.setenv("LEDGERFLOW_ROUTING_EXPLORE_CAP", "0.5")  # cold start: learn both models quickly
    settings = load()
    app, _ = build(settings)
    stop = threading.Event()
    async with TestClient(TestServer(app)) as client:
        router = app[STATE].router
        assert router is not None

        async def ready() -> bool:
            return (await client.get("/readyz")).status == 200

        await eventually(ready)

        # 1. cold priors: calls without a model are routed (RouteChosen with features); feedback follows
        chosen: dict[str, int] = {}
        for i in range(60):
            is_code = i % 2 == 0
            prompt = f"{CODE if is_code else PLAIN} #{i}"
            resp = await client.post("/v1/ask", json={"prompt": prompt}, headers=ACME)
            assert resp.status == 200, await resp.text()
            body = await resp.json()
            chosen[body["model"]] = chosen.get(body["model"], 0) + 1
            score = hidden_quality(body["model"], is_code)
            fb = await client.post(
                "/v1/feedback", json={"request_id": body["request_id"], "score": score}, headers=ACME
            )
            assert fb.status in (200, 201, 202), await fb.text()
        assert set(chosen) == {"sim-small", "sim-large"}  # both explored
        pinned = await client.post("/v1/ask", json={"prompt": CODE, "model": "sim-small"}, headers=ACME)
        assert (await pinned.json())["model"] == "sim-small"  # a pinned model is never overridden

        routes = [CODEC.decode(m.value()) for m in read_all(kafka_bootstrap, [topics.name("routes")], 60)]
        assert len(routes) == 60 and all(isinstance(r, RouteChosen) for r in routes)  # none for the pinned call
        for r in routes:
            assert isinstance(r, RouteChosen)
            assert r.strategy == "bandit" and r.priors_version == "none" and r.features and 0 < r.propensity <= 1
            assert {c["model"] for c in r.candidates} == {"sim-small", "sim-large"}

        # 2. the priors worker learns from the facts and publishes
        worker = PriorsWorker(kafka_bootstrap, f"{topics.prefix}priors", topics, PriorsConfig(every_s=0.3))
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        try:

            async def learned_all() -> bool:
                return router.priors.feedback_count >= 60

            await eventually(learned_all)  # 3. ... and the gateway hot-loaded them

            # the adapter outcomes (AdapterCalled, one per answered call, pinned included) reach the
            # priors too: each model's latency statistics are the gateway's own measurements
            outcomes = [
                CODEC.decode(m.value()) for m in read_all(kafka_bootstrap, [topics.name("adapter-outcomes")], 61)
            ]
            assert len(outcomes) == 61 and all(isinstance(o, AdapterCalled) for o in outcomes)
            latencies: dict[str, list[int]] = {}
            for o in outcomes:
                assert isinstance(o, AdapterCalled) and o.status == 200 and o.adapter == "simulated"
                latencies.setdefault(o.model, []).append(o.latency_ms)
            assert latencies.keys() == {"sim-small", "sim-large"}

            async def learned_latency() -> bool:
                stats = router.priors.models
                return all(m in stats and stats[m].latency_n == len(v) for m, v in latencies.items())

            await eventually(learned_latency)
            for m, v in latencies.items():
                assert router.priors.models[m].latency_ms(-1.0) == pytest.approx(sum(v) / len(v))
            version = router.priors.version
            assert version.startswith("rp-")

            # 4. routed by the learned priors: code to sim-large (sim-small gets it wrong), prose to sim-small
            resp = await client.post("/v1/ask", json={"prompt": f"{CODE} again"}, headers=ACME)
            code_rid = (await resp.json())["request_id"]
            resp = await client.post("/v1/ask", json={"prompt": f"{PLAIN} again"}, headers=ACME)
            plain_rid = (await resp.json())["request_id"]
            routes = [CODEC.decode(m.value()) for m in read_all(kafka_bootstrap, [topics.name("routes")], 62)]
            by_id = {r.request_id: r for r in routes if isinstance(r, RouteChosen)}
            code_route, plain_route = by_id[code_rid], by_id[plain_rid]
            assert code_route.priors_version == version == plain_route.priors_version
            assert code_route.candidates[0]["model"] == "sim-large"  # best score first
            assert plain_route.candidates[0]["model"] == "sim-small"
        finally:
            stop.set()
            await asyncio.to_thread(thread.join, 15)

    published = [
        CODEC.decode(m.value()) for m in read_all(kafka_bootstrap, [topics.name("routing-priors")], 1, timeout=10)
    ]
    assert published and all(isinstance(p, RoutingPriorsPublished) for p in published)
    assert max(p.feedback_count for p in published if isinstance(p, RoutingPriorsPublished)) >= 60
    regrets = [CODEC.decode(m.value()) for m in read_all(kafka_bootstrap, [topics.name("routing-regret")], 1, 10)]
    acme = [r for r in regrets if isinstance(r, RoutingRegretRecorded) and r.tenant == "acme"]
    assert acme and acme[-1].cumulative_routed >= 60 and acme[-1].cumulative_regret > 0  # exploring cost something

    # a restarted worker resumes from the published priors (same version chain, nothing refolded twice)
    again = PriorsWorker(kafka_bootstrap, f"{topics.prefix}priors", topics, PriorsConfig(every_s=0.3))
    last = published[-1]
    assert isinstance(last, RoutingPriorsPublished)
    assert again.state.priors.feedback_count == last.feedback_count
