"""The gateway in front of a configured OpenAI-compatible upstream (the mock, on loopback)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from decimal import Decimal

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bench.mock_upstream import MOCK, Fault, make_app
from gateway.app import always_ready, create_app
from gateway.auth import KeyStore
from gateway.server import build_registry
from ledgerflow.settings import Settings, hash_key
from streams.events import AdapterFailed, Event, TokensCharged

KEY = "lf_up_test"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[Event]] = []

    async def publish(self, events: Sequence[Event], timeout: float = 1.8) -> None:
        self.batches.append(list(events))


@pytest.fixture
async def setup() -> AsyncIterator[tuple[TestClient, TestServer, Recorder]]:
    async with TestServer(make_app(tokens=12)) as upstream:
        settings = Settings(
            egress_allowed_hosts=["127.0.0.1"],
            upstreams=[{
                "name": "mock", "base_url": str(upstream.make_url("/v1")), "allow_loopback": True, "max_retries": 1,
                "backoff_base_s": 0.01, "breaker_failures": 3,
                "models": [{"name": "mock-gpt", "upstream_id": "gpt-4o-mini", "region": "eu-west",
                            "input_per_mtok": "0.15", "output_per_mtok": "0.60"}],
            }],
        )  # type: ignore[list-item]  # fmt: skip
        registry = build_registry(settings)
        rec = Recorder()
        app = create_app(KeyStore([("k", "acme", hash_key(KEY), ["user"])]), rec, always_ready,
                         adapter=registry.as_adapter(), prices=registry.prices())  # fmt: skip
        async with TestClient(TestServer(app)) as client:
            yield client, upstream, rec
        await registry.close()


async def test_upstream_answer_is_charged_at_the_configured_price(
    setup: tuple[TestClient, TestServer, Recorder],
) -> None:
    client, upstream, rec = setup
    resp = await client.post("/v1/ask", json={"prompt": "hi", "model": "mock-gpt"}, headers=AUTH)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    charge = rec.batches[0][2]
    assert isinstance(charge, TokensCharged) and charge.model == "mock-gpt"
    assert charge.input_price_per_mtok == Decimal("0.15") and Decimal(body["cost"]) == charge.cost
    assert upstream.app[MOCK].requests == 1
    # the simulated models stay available beside it
    assert (await client.post("/v1/ask", json={"prompt": "hi", "model": "sim-small"}, headers=AUTH)).status == 200


async def test_upstream_failures_map_to_statuses_and_record_nothing(
    setup: tuple[TestClient, TestServer, Recorder],
) -> None:
    client, upstream, rec = setup
    upstream.app[MOCK].faults.append(Fault(status=503, retry_after="3"))  # longer than the backoff cap: passed on
    resp = await client.post("/v1/ask", json={"prompt": "hi", "model": "mock-gpt"}, headers=AUTH)
    assert resp.status == 503 and resp.headers["Retry-After"] == "3"
    upstream.app[MOCK].faults.append(Fault(status=302, location="http://169.254.169.254/latest"))
    resp = await client.post("/v1/chat/completions", json={"model": "mock-gpt", "messages": [
        {"role": "user", "content": "x"}]}, headers=AUTH)  # fmt: skip
    assert resp.status == 502 and "redirect" in (await resp.json())["error"]["message"]
    # nothing of the requests is recorded; only each adapter failure, alone, as a stable class (issue 9)
    assert [[e.event_type for e in b] for b in rec.batches] == [["AdapterFailed"], ["AdapterFailed"]]
    unavailable, redirected = (b[0] for b in rec.batches)
    assert isinstance(unavailable, AdapterFailed) and isinstance(redirected, AdapterFailed)
    assert (unavailable.model, unavailable.error_kind, unavailable.status) == ("mock-gpt", "server_error", 503)
    assert redirected.error_kind in ("connection", "server_error") and "169.254" not in repr(redirected)


async def test_streamed_upstream_failure_before_first_piece_is_a_status(
    setup: tuple[TestClient, TestServer, Recorder],
) -> None:
    client, upstream, rec = setup
    upstream.app[MOCK].faults.extend([Fault(status=500)])
    resp = await client.post("/v1/ask", json={"prompt": "hi", "model": "mock-gpt", "stream": True}, headers=AUTH)
    assert resp.status == 502
    # as for a whole answer: nothing reached the client, nothing of the request is recorded (no
    # request is ever left with opening facts and no closing ones), only the adapter's failure
    assert [[e.event_type for e in b] for b in rec.batches] == [["AdapterFailed"]]
