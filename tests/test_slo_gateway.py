"""RequestCompleted from the gateway (in process, no broker): one per public request, after the
answer, never delaying or changing it; the tenant is authenticated or `_anonymous`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import generate_latest

from gateway.adapters import Completion
from gateway.app import STATE, always_ready, create_app
from gateway.auth import KeyStore
from gateway.models import Message
from gateway.upstream import UpstreamStreamBroken
from ledgerflow.settings import hash_key
from streams.events import Event, RequestCompleted
from streams.ids import derived_uuid7
from streams.publisher import PublishFailed

KEY = "lf_test_secret"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Publisher:
    """Records batches; `hold` makes RequestCompleted publishes wait; `fail` makes them fail."""

    def __init__(self) -> None:
        self.batches: list[list[Event]] = []
        self.hold: asyncio.Event | None = None
        self.fail = False

    async def publish(self, events: Sequence[Event], timeout: float = 1.8) -> None:
        if any(isinstance(e, RequestCompleted) for e in events):
            if self.hold is not None:
                await self.hold.wait()
            if self.fail:
                raise PublishFailed("broker down")
        self.batches.append(list(events))

    def completed(self) -> list[RequestCompleted]:
        return [e for b in self.batches for e in b if isinstance(e, RequestCompleted)]

    async def until(self, n: int) -> list[RequestCompleted]:
        for _ in range(500):
            if len(self.completed()) >= n:
                return self.completed()
            await asyncio.sleep(0.01)
        raise AssertionError(f"only {len(self.completed())} RequestCompleted published")


@pytest.fixture
def publisher() -> Publisher:
    return Publisher()


@pytest.fixture
async def client(publisher: Publisher) -> AsyncIterator[TestClient]:
    keys = KeyStore([("k-acme", "acme", hash_key(KEY), ["user"])])
    app = create_app(keys, publisher, always_ready, record_completions=True)
    async with TestClient(TestServer(app)) as c:
        yield c


async def test_an_answer_records_how_it_ended(client: TestClient, publisher: Publisher) -> None:
    resp = await client.post("/v1/ask", json={"prompt": "2+2?"}, headers=AUTH)
    assert resp.status == 200
    request_id = (await resp.json())["request_id"]
    [done] = await publisher.until(1)
    assert (done.tenant, done.route, done.method, done.status, done.streamed, done.error_kind) == (
        "acme", "/v1/ask", "POST", 200, False, None,
    )  # fmt: skip
    assert done.request_id == request_id == done.envelope.correlation_id  # joins the request's other facts
    assert done.envelope.event_id == str(derived_uuid7(request_id, "RequestCompleted"))
    assert done.latency_ms >= 0


async def test_refusals_and_errors_carry_their_code_and_a_safe_tenant(client: TestClient, publisher: Publisher) -> None:
    assert (await client.post("/v1/ask", json={"prompt": "hi"}, headers={"X-API-Key": "acme"})).status == 401
    assert (await client.post("/v1/ask", json={"prompt": "hi"})).status == 401
    assert (await client.post("/v1/ask", json={"prompt": ""}, headers=AUTH)).status == 422
    assert (await client.get("/v1/memory/s1", headers=AUTH)).status == 501  # no memory fabric: a 5xx
    got = await publisher.until(4)
    assert [(e.tenant, e.status, e.error_kind, e.route) for e in got] == [
        ("_anonymous", 401, "unknown_api_key", "/v1/ask"),  # never the tenant the client claims
        ("_anonymous", 401, "missing_credentials", "/v1/ask"),
        ("acme", 422, "invalid_request", "/v1/ask"),
        ("acme", 501, "memory_not_configured", "/v1/memory/{session}"),  # the template, not the path
    ]
    assert len({e.request_id for e in got}) == 4


async def test_health_metrics_and_unknown_paths_are_not_requests(client: TestClient, publisher: Publisher) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/nope"):
        await client.get(path)
    await client.post("/v1/ask", json={"prompt": "hi"}, headers=AUTH)
    assert [e.route for e in await publisher.until(1)] == ["/v1/ask"]
    await asyncio.sleep(0.05)
    assert len(publisher.completed()) == 1


async def test_the_answer_never_waits_for_the_publish(client: TestClient, publisher: Publisher) -> None:
    publisher.hold = asyncio.Event()
    resp = await client.post("/v1/ask", json={"prompt": "hi"}, headers=AUTH)
    assert resp.status == 200 and (await resp.json())["answer"]
    assert publisher.completed() == []  # answered while its RequestCompleted is still being published
    publisher.hold.set()
    assert len(await publisher.until(1)) == 1


async def test_a_failed_publish_is_counted_and_retried_with_the_next(client: TestClient, publisher: Publisher) -> None:
    publisher.fail = True
    assert (await client.post("/v1/ask", json={"prompt": "one"}, headers=AUTH)).status == 200  # never a 5xx
    metrics = client.server.app[STATE].metrics.registry
    for _ in range(100):
        if b"ledgerflow_gateway_completion_publish_failures_total 1.0" in generate_latest(metrics):
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the failure was not counted")
    assert publisher.completed() == []
    publisher.fail = False
    assert (await client.post("/v1/ask", json={"prompt": "two"}, headers=AUTH)).status == 200
    first, second = await publisher.until(2)
    assert first.request_id != second.request_id and {first.status, second.status} == {200}


class BreakingAdapter:
    models = ("sim-small",)

    async def complete(self, model: str, messages: list[Message], max_tokens: int | None = None) -> Completion:
        raise AssertionError("not called")

    async def stream(self, model: str, messages: list[Message], max_tokens: int | None = None) -> AsyncIterator[str]:
        yield "first "
        raise UpstreamStreamBroken("the upstream dropped the connection mid-answer")

    def usage(self, model: str, messages: list[Message], text: str, max_tokens: int | None = None) -> Completion:
        return Completion(model, text, 3, len(text.split()))


async def test_a_stream_broken_after_its_first_byte_is_a_failure_with_status_200(publisher: Publisher) -> None:
    keys = KeyStore([("k-acme", "acme", hash_key(KEY), ["user"])])
    app = create_app(keys, publisher, always_ready, adapter=BreakingAdapter(), record_completions=True)  # type: ignore[arg-type]
    async with TestClient(TestServer(app)) as client:
        resp = await client.post("/v1/ask", json={"prompt": "hi", "stream": True}, headers=AUTH)
        assert resp.status == 200
        await resp.read()
        [done] = await publisher.until(1)
    assert (done.status, done.streamed, done.error_kind) == (200, True, "upstream_error")


async def test_off_unless_asked(publisher: Publisher) -> None:
    keys = KeyStore([("k-acme", "acme", hash_key(KEY), ["user"])])
    async with TestClient(TestServer(create_app(keys, publisher, always_ready))) as client:
        assert (await client.post("/v1/ask", json={"prompt": "hi"}, headers=AUTH)).status == 200
        await asyncio.sleep(0.05)
    assert publisher.completed() == [] and publisher.batches
