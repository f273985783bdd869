"""max_tokens reaches the model (issue 7): the budget hold covers `max_tokens` answer tokens, so no
completion may be longer. The simulator honours it, the gateway passes it on every path (whole,
streamed, OpenAI-compatible), and an OpenAI-compatible upstream is sent it; one that ignores it is
charged what it reports (the ledger must equal the upstream's bill) and logged, an estimate is capped.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.adapters import SimProfile, SimulatedAdapter
from gateway.app import always_ready, create_app
from gateway.auth import KeyStore
from gateway.models import Message
from gateway.upstream import OpenAIUpstreamAdapter, UpstreamCompletion, _bounded
from ledgerflow.settings import hash_key
from streams.events import Event, TokensCharged

KEY = "lf_bound_secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = [f"Question {i}: explain {'partitions ' * (i % 7)}in {i} words." for i in range(40)]


class RecordingPublisher:
    def __init__(self) -> None:
        self.events: list[Event] = []

    async def publish(self, events: Sequence[Event], timeout: float = 1.8) -> None:
        self.events.extend(events)


@pytest.mark.parametrize("profile", [None, SimProfile(answer_tokens=(200, 400))])
async def test_the_simulator_never_answers_longer_than_max_tokens(profile: SimProfile | None) -> None:
    sim = SimulatedAdapter(profiles={"sim-small": profile} if profile else None)
    longest = 0
    for i, prompt in enumerate(PROMPTS):
        msgs = [Message(role="user", content=prompt)]
        bound = i % 12
        whole = await sim.complete("sim-small", msgs, bound)
        streamed = "".join([piece async for piece in sim.stream("sim-small", msgs, bound)])
        usage = sim.usage("sim-small", msgs, streamed, bound)
        assert whole.completion_tokens <= bound and usage.completion_tokens <= bound
        assert streamed == whole.text
        longest = max(longest, (await sim.complete("sim-small", msgs)).completion_tokens)
    assert longest > 11  # unbounded answers are longer: the bound is what cut them
    msgs = [Message(role="user", content=PROMPTS[3])]
    assert await sim.complete("sim-small", msgs, 10_000) == await sim.complete("sim-small", msgs)


DEFAULT_MAX = 3


@pytest.fixture
async def gateway() -> AsyncIterator[tuple[TestClient, RecordingPublisher]]:
    publisher = RecordingPublisher()
    keys = KeyStore([("k-acme", "acme", hash_key(KEY), ["user"])])
    app = create_app(keys, publisher, always_ready, default_max_tokens=DEFAULT_MAX)
    async with TestClient(TestServer(app)) as c:
        yield c, publisher


async def test_every_gateway_path_charges_no_more_than_max_tokens(
    gateway: tuple[TestClient, RecordingPublisher],
) -> None:
    client, publisher = gateway
    for i, prompt in enumerate(PROMPTS[:10]):
        bound = 1 + i % 4
        for body in ({"prompt": prompt}, {"prompt": prompt, "stream": True}):  # /v1/ask: the default bound
            resp = await client.post("/v1/ask", json=body, headers=AUTH)
            assert resp.status == 200
            await resp.read()
        chat = {"model": "sim-small", "messages": [{"role": "user", "content": prompt}], "max_tokens": bound}
        resp = await client.post("/v1/chat/completions", json=chat, headers=AUTH)
        assert resp.status == 200
        assert orjson.loads(await resp.read())["usage"]["completion_tokens"] <= bound
        resp = await client.post("/v1/chat/completions", json={**chat, "stream": True}, headers=AUTH)
        assert resp.status == 200
        await resp.read()
        charges = [e for e in publisher.events if isinstance(e, TokensCharged)]
        assert len(charges) == 4 * (i + 1)
        got = [c.completion_tokens for c in charges[-4:]]
        assert got[0] <= DEFAULT_MAX and got[1] <= DEFAULT_MAX and got[2] <= bound and got[3] <= bound, got


def test_an_upstream_is_sent_max_tokens_and_a_lower_configured_default_wins() -> None:
    up = OpenAIUpstreamAdapter("http://llm.example/v1", models=["m"], allowed_hosts=["llm.example"])
    msgs = [Message(role="user", content="hi")]
    assert orjson.loads(up._body("m", msgs, stream=False, max_tokens=64))["max_tokens"] == 64
    assert "max_tokens" not in orjson.loads(up._body("m", msgs, stream=True))
    up._defaults = {"max_tokens": 16}
    assert orjson.loads(up._body("m", msgs, stream=True, max_tokens=64))["max_tokens"] == 16


def test_an_upstream_ignoring_max_tokens_is_charged_what_it_reports_and_estimates_are_capped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    reported = UpstreamCompletion("m", "long answer", 10, 90)
    with caplog.at_level(logging.WARNING, logger="gateway.upstream"):
        assert _bounded(reported, 50, "up").completion_tokens == 90  # the upstream's bill, kept
    assert "reported 90 completion tokens, over the max_tokens of 50" in caplog.text
    estimated = UpstreamCompletion("m", "long answer", 10, 90, estimated=True)
    assert _bounded(estimated, 50, "up").completion_tokens == 50
    assert _bounded(reported, None, "up") == reported
