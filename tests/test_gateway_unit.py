"""Gateway request handling with an in-memory publisher: validation, auth, 503 on publish failure.

The real-broker path is covered in test_e2e.py; here we check that bad input gets a clear
4xx and records nothing.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from decimal import Decimal

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from domain.policy import AttributeChange
from gateway.app import STATE, always_ready, create_app
from gateway.auth import KeyStore
from ledgerflow.settings import hash_key
from streams.events import AdapterCalled, Event, TokensCharged
from streams.publisher import PublishFailed

KEY = "lf_test_secret"


class RecordingPublisher:
    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[Event]] = []
        self.fail = fail

    async def publish(self, events: Sequence[Event], timeout: float = 1.8) -> None:
        if self.fail:
            raise PublishFailed("broker down")
        self.batches.append(list(events))


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
async def client(publisher: RecordingPublisher) -> AsyncIterator[TestClient]:
    keys = KeyStore([("k-acme", "acme", hash_key(KEY), ["user"])])
    app = create_app(keys, publisher, always_ready)
    async with TestClient(TestServer(app)) as c:
        yield c


AUTH = {"Authorization": f"Bearer {KEY}"}


async def test_ask_answers_and_records_four_facts(client: TestClient, publisher: RecordingPublisher) -> None:
    resp = await client.post("/v1/ask", json={"prompt": "What is 2+2?"}, headers=AUTH)
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["model"] == "sim-small" and body["usage"]["total_tokens"] > 0
    [batch] = publisher.batches
    assert [e.event_type for e in batch] == [
        "RequestReceived", "PolicyDecided", "TokensCharged", "AuditRecorded", "AdapterCalled",
    ]  # fmt: skip
    assert {e.envelope.correlation_id for e in batch} == {body["request_id"]}
    assert {e.tenant for e in batch} == {"acme"}
    charge, outcome = batch[2], batch[4]
    assert isinstance(charge, TokensCharged) and Decimal(body["cost"]) == charge.cost
    # issue 9: the adapter's outcome rides in the same transaction (the router's latency term learns from it)
    assert isinstance(outcome, AdapterCalled) and outcome.model == "sim-small" and outcome.adapter == "simulated"
    assert (outcome.status, outcome.retries, outcome.streamed, outcome.finish_reason) == (200, 0, False, "stop")
    assert (outcome.prompt_tokens, outcome.completion_tokens) == (charge.prompt_tokens, charge.completion_tokens)
    assert outcome.latency_ms >= 0 and outcome.first_token_ms is None
    assert "What is 2+2" not in repr(batch)  # the prompt text never reaches an event


@pytest.mark.parametrize(
    ("headers", "body", "status", "needle"),
    [
        ({}, {"prompt": "hi"}, 401, "API key"),
        ({"X-API-Key": "wrong"}, {"prompt": "hi"}, 401, "not known"),
        (AUTH, b"{not json", 400, "not valid JSON"),
        (AUTH, b"", 400, "JSON object"),
        (AUTH, b"[1,2]", 400, "JSON object"),
        (AUTH, {}, 422, "exactly one of 'prompt'"),
        (AUTH, {"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, 422, "exactly one"),
        (AUTH, {"messages": [{"role": "wizard", "content": "b"}]}, 422, "messages.0.role"),
        (AUTH, {"prompt": "hi", "temperature": 2}, 422, "temperature"),
        (AUTH, {"prompt": "hi", "model": "gpt-9"}, 400, "sim-small"),
    ],
)
async def test_bad_input_is_4xx_with_a_message_and_records_nothing(
    client: TestClient, publisher: RecordingPublisher, headers: dict[str, str], body: object, status: int, needle: str
) -> None:
    if isinstance(body, bytes):
        resp = await client.post("/v1/ask", data=body, headers={**headers, "Content-Type": "application/json"})
    else:
        resp = await client.post("/v1/ask", json=body, headers=headers)
    assert resp.status == status
    payload = await resp.json()
    assert needle in payload["error"]["message"]
    assert publisher.batches == []


async def test_publish_failure_is_503_with_retry_after(client: TestClient, publisher: RecordingPublisher) -> None:
    publisher.fail = True
    resp = await client.post("/v1/ask", json={"prompt": "hi"}, headers=AUTH)
    assert resp.status == 503
    assert resp.headers["Retry-After"] == "1"
    assert "retry" in (await resp.json())["error"]["message"]


async def test_streamed_ask_records_opening_facts_first_and_closing_facts_before_done(
    client: TestClient, publisher: RecordingPublisher
) -> None:
    resp = await client.post("/v1/ask", json={"prompt": "stream it", "stream": True}, headers=AUTH)
    assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    text = await resp.text()
    events = [block.split("\n")[0] for block in text.strip().split("\n\n")]
    assert events[0] == "event: delta" and events[-1] == "event: done"
    assert [[e.event_type for e in b] for b in publisher.batches] == [
        ["RequestReceived", "PolicyDecided"],
        ["TokensCharged", "AuditRecorded", "AdapterCalled"],
    ]
    outcome = publisher.batches[1][2]
    assert isinstance(outcome, AdapterCalled) and outcome.streamed and outcome.first_token_ms is not None
    assert outcome.first_token_ms <= outcome.latency_ms
    done = orjson.loads(text.strip().split("\n\n")[-1].split("data: ", 1)[1])
    deltas = [orjson.loads(b.split("data: ", 1)[1])["text"] for b in text.strip().split("\n\n")[:-1]]
    assert "".join(deltas) == done["answer"]
    assert Decimal(done["cost"]) == publisher.batches[1][0].cost  # type: ignore[attr-defined]


async def test_chat_completions_matches_openai_shape(client: TestClient, publisher: RecordingPublisher) -> None:
    body = {"model": "sim-small", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    resp = await client.post("/v1/chat/completions", json=body, headers=AUTH)
    assert resp.status == 200
    data = await resp.json()
    assert data["object"] == "chat.completion" and data["choices"][0]["message"]["role"] == "assistant"
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]
    assert len(publisher.batches) == 1 and len(publisher.batches[0]) == 5  # four facts and AdapterCalled
    bad = await client.post("/v1/chat/completions", json={"model": "sim-small", "messages": []}, headers=AUTH)
    assert bad.status == 422 and "messages" in (await bad.json())["error"]["message"]


async def test_rate_limit_is_429_with_retry_after_and_records_nothing(publisher: RecordingPublisher) -> None:
    from gateway.limits import Limits, LocalRateLimiter

    keys = KeyStore([("k-acme", "acme", hash_key(KEY), ["user"])])
    limiter = LocalRateLimiter(Limits(requests_per_min=60, request_burst=2))
    app = create_app(keys, publisher, always_ready, limiter=limiter)
    async with TestClient(TestServer(app)) as c:
        statuses = [(await c.post("/v1/ask", json={"prompt": "hi"}, headers=AUTH)).status for _ in range(2)]
        denied = await c.post("/v1/ask", json={"prompt": "hi"}, headers=AUTH)
        assert statuses == [200, 200] and denied.status == 429
        assert int(denied.headers["Retry-After"]) >= 1
        assert "requests per minute" in (await denied.json())["error"]["message"]
    assert len(publisher.batches) == 2


async def test_feedback_is_recorded_for_the_callers_tenant(client: TestClient, publisher: RecordingPublisher) -> None:
    answer = await (await client.post("/v1/ask", json={"prompt": "rate me"}, headers=AUTH)).json()
    resp = await client.post(
        "/v1/feedback", json={"request_id": answer["request_id"], "score": 0.75, "label": "good"}, headers=AUTH
    )
    assert resp.status == 202
    [fb] = publisher.batches[-1]
    assert fb.event_type == "FeedbackReceived" and fb.tenant == "acme" and fb.score == 0.75  # type: ignore[attr-defined]
    rid = answer["request_id"]
    cases = [
        ({"request_id": "nope", "score": 1}, "request_id"),
        ({"request_id": rid, "score": 1.5}, "score"),
        ({"request_id": rid, "score": 1, "label": "meh"}, "label"),
    ]
    for bad, field in cases:
        r = await client.post("/v1/feedback", json=bad, headers=AUTH)
        assert r.status == 422 and field in (await r.json())["error"]["fields"][0]
    assert len(publisher.batches) == 2


async def test_metrics_count_requests_with_bounded_labels(client: TestClient) -> None:
    await client.post("/v1/ask", json={"prompt": "hi"}, headers=AUTH)
    await client.post("/v1/ask", json={"prompt": "hi"})
    for i in range(50):  # random paths must not create series
        await client.get(f"/no/such/path/{i}")
    text = await (await client.get("/metrics")).text()
    assert 'ledgerflow_gateway_request_seconds_count{route="/v1/ask",status="200"} 1.0' in text
    assert 'ledgerflow_gateway_request_seconds_count{route="/v1/ask",status="401"} 1.0' in text
    assert text.count("/no/such/path") == 0
    series = [ln for ln in text.splitlines() if ln.startswith("ledgerflow_gateway_request_seconds_count")]
    assert len(series) <= 4


async def test_prompt_is_masked_before_events_and_redaction_is_recorded(
    client: TestClient, publisher: RecordingPublisher
) -> None:
    secret = "AKIAIOSFODNN7EXAMPLE"
    resp = await client.post("/v1/ask", json={"prompt": f"my key is {secret} mail me at a.b@example.org"}, headers=AUTH)
    assert resp.status == 200
    [batch] = publisher.batches
    assert [e.event_type for e in batch][:3] == ["RequestReceived", "RequestRedacted", "PolicyDecided"]
    assert batch[1].counts_by_kind == {"api_key": 1, "email": 1}  # type: ignore[attr-defined]
    assert secret not in repr(batch)


async def test_tool_descriptors_are_validated(client: TestClient) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    base = {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}]}
    # a valid descriptor reaches the policy, which checks the tool against the principal's scopes
    unscoped = await client.post("/v1/chat/completions", json={**base, "tools": [tool]}, headers=AUTH)
    assert unscoped.status == 403 and "'get_weather'" in (await unscoped.json())["error"]["message"]
    client.server.app[STATE].policy.engine.apply(
        AttributeChange("Principal", "k-acme", {"tool_scopes": ["get_weather"]})
    )
    ok = await client.post("/v1/chat/completions", json={**base, "tools": [tool]}, headers=AUTH)
    assert ok.status == 200
    bad_tool = {"type": "function", "function": {"name": "no spaces allowed"}}
    bad = await client.post("/v1/chat/completions", json={**base, "tools": [bad_tool]}, headers=AUTH)
    assert bad.status == 422 and "tools.0.function.name" in (await bad.json())["error"]["fields"]
