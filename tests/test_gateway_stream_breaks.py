"""A streamed answer that breaks after its first byte is still charged and audited.

Once the opening facts are recorded and the 200 is sent, every way a stream can end records
closing facts: the upstream failing mid-answer, the client going away (read one chunk, then
close), or the server cancelling the handler. The charge is the usage so far, the audit
record says "failed" with the reason, and the client (if still there) gets an error frame.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, get_unused_port_socket

from domain.pricing import DEFAULT_PRICES, cost
from gateway.adapters import Completion
from gateway.app import always_ready, create_app
from gateway.auth import KeyStore
from gateway.models import Message
from gateway.upstream import UpstreamError, UpstreamStreamBroken
from ledgerflow.settings import hash_key
from streams.events import AdapterCalled, AdapterFailed, AuditRecorded, Event, TokensCharged
from streams.ids import derived_uuid7

KEY = "lf_test_stream_breaks"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT_TOKENS = 11
WORDS = ["alpha", " bravo", " charlie", " delta", " echo", " foxtrot", " golf", " hotel"]


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[Event]] = []

    async def publish(self, events: Sequence[Event], timeout: float = 1.8) -> None:
        self.batches.append(list(events))

    async def wait_for(self, n: int, timeout: float = 5.0) -> None:
        """Closing facts of a dropped client are published after the client has gone: wait for them."""
        deadline = asyncio.get_running_loop().time() + timeout
        while len(self.batches) < n:
            assert asyncio.get_running_loop().time() < deadline, f"only {len(self.batches)} batches published"
            await asyncio.sleep(0.01)


class FakeAdapter:
    """Streams `pieces`, then raises UpstreamStreamBroken if `breaks`; after the first piece it
    waits for `gate` (when given) so a test can drop the client in between.

    `usage` counts one completion token per word of the text it is given: what the gateway
    passes is the text produced, so the expected charge is the number of pieces yielded.
    """

    models = ("sim-small", "sim-large")

    def __init__(self, pieces: Sequence[str], *, breaks: bool = False, gate: asyncio.Event | None = None) -> None:
        self.pieces = list(pieces)
        self.breaks = breaks
        self.gate = gate
        self.yielded = 0
        self.closed = False

    async def complete(self, model: str, messages: list[Message], max_tokens: int | None = None) -> Completion:
        raise UpstreamError("the fake upstream is down")

    async def stream(self, model: str, messages: list[Message], max_tokens: int | None = None) -> AsyncIterator[str]:
        try:
            for i, piece in enumerate(self.pieces):
                if i == 1 and self.gate is not None:
                    await self.gate.wait()
                if i:
                    await asyncio.sleep(0.005)
                self.yielded += 1
                yield piece
            if self.breaks:
                raise UpstreamStreamBroken("the upstream dropped the connection mid-answer")
        except (GeneratorExit, asyncio.CancelledError):  # closed by the gateway, or cancelled with its handler
            self.closed = True
            raise

    def usage(self, model: str, messages: list[Message], text: str, max_tokens: int | None = None) -> Completion:
        return Completion(model, text, PROMPT_TOKENS, len(text.split()))


def app_for(adapter: FakeAdapter, rec: Recorder, *, redact: bool = True) -> web.Application:
    """The gateway over `adapter`; without `redact` each piece is written as it comes (no holdback)."""
    keys = KeyStore([("k-acme", "acme", hash_key(KEY), ["user"])])
    return create_app(keys, rec, always_ready, adapter=adapter, redaction=None if redact else lambda _t: frozenset())


def frames_of(text: str) -> list[str]:
    return [block for block in text.strip().split("\n\n") if block]


def data_of(frame: str) -> dict[str, Any]:
    return orjson.loads(frame.split("data: ", 1)[1])  # type: ignore[no-any-return]


def assert_partial_closing(rec: Recorder, completion_tokens: int, reason: str) -> tuple[TokensCharged, AuditRecorded]:
    """Opening then closing facts, one TokensCharged for the partial usage, an audit "failed"."""
    lost = ["AdapterFailed"] if reason == "upstream_error" else []  # issue 9: the upstream's failure, same transaction
    assert [[e.event_type for e in b] for b in rec.batches] == [
        ["RequestReceived", "PolicyDecided"],
        ["TokensCharged", "AuditRecorded", *lost],
    ]
    request_id = rec.batches[0][0].request_id  # type: ignore[attr-defined]
    every = [e for b in rec.batches for e in b]
    assert {e.envelope.correlation_id for e in every} == {request_id}
    assert {e.tenant for e in every} == {"acme"}
    charged, audited = rec.batches[1][:2]
    assert isinstance(charged, TokensCharged) and isinstance(audited, AuditRecorded)
    assert sum(isinstance(e, TokensCharged) for e in every) == 1
    assert (charged.request_id, charged.prompt_tokens, charged.completion_tokens) == (
        request_id,
        PROMPT_TOKENS,
        completion_tokens,
    )
    price = DEFAULT_PRICES["sim-small"]
    assert isinstance(charged.cost, Decimal) and charged.cost == cost(PROMPT_TOKENS, completion_tokens, price)
    assert (audited.action, audited.outcome, audited.subject) == ("request.completed", "failed", request_id)
    assert audited.details["reason"] == reason and audited.details["partial"] == "true"
    assert audited.details["cost"] == str(charged.cost)
    assert audited.envelope.causation_id == charged.envelope.event_id
    return charged, audited


@pytest.mark.parametrize("route", ["/v1/ask", "/v1/chat/completions"])
async def test_upstream_error_mid_stream_charges_the_pieces_sent_and_ends_with_an_error_frame(route: str) -> None:
    adapter = FakeAdapter(WORDS[:3], breaks=True)
    rec = Recorder()
    body = {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with TestClient(TestServer(app_for(adapter, rec))) as client:
        resp = await client.post(route, json=body, headers=AUTH)
        assert resp.status == 200
        frames = frames_of(await resp.text())
    charged, _ = assert_partial_closing(rec, completion_tokens=3, reason="upstream_error")
    *deltas, last = frames
    assert len(deltas) == 3
    error = data_of(last)["error"]
    assert "upstream_stream_broken" in error["message"] and "incomplete" in error["message"]
    if route == "/v1/ask":
        assert last.startswith("event: error\n") and error["code"] == "upstream_stream_broken"
        assert "".join(data_of(f)["text"] for f in deltas) == "alpha bravo charlie"
    else:  # OpenAI's shape: a data frame holding {"error": {...}}, no [DONE] after it
        assert error["type"] == "upstream_stream_broken" and "[DONE]" not in last
        assert data_of(deltas[0])["id"] == f"chatcmpl-{charged.request_id}"


@asynccontextmanager
async def serve(app: web.Application, handler_cancellation: bool) -> AsyncIterator[str]:
    """The app on a loopback port, with the server setting under test (TestServer forces cancellation on)."""
    runner = web.AppRunner(app, handler_cancellation=handler_cancellation)
    await runner.setup()
    sock = get_unused_port_socket("127.0.0.1")
    await web.SockSite(runner, sock).start()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("handler_cancellation", [False, True])
async def test_client_disconnect_mid_stream_charges_what_the_model_produced(handler_cancellation: bool) -> None:
    """Read the first chunk, close the connection: the stream stops and its usage so far is charged.

    Without handler_cancellation (aiohttp's default, `web.run_app`) the next write fails; with
    it the server cancels the handler as the client goes. Both record the same closing facts.
    """
    gate = asyncio.Event()
    adapter = FakeAdapter(WORDS * 5, gate=gate)
    rec = Recorder()
    # redaction off: the stream redactor would hold a lone first word back, waiting for more
    app = app_for(adapter, rec, redact=False)
    async with serve(app, handler_cancellation) as base, aiohttp.ClientSession() as session:
        resp = await session.post(f"{base}/v1/ask", json={"prompt": "hi", "stream": True}, headers=AUTH)
        assert resp.status == 200
        first = await resp.content.readuntil(b"\n\n")
        assert data_of(first.decode())["text"] == "alpha"
        resp.close()  # drops the connection
        await asyncio.sleep(0.1)  # let the server see the connection go
        gate.set()
        await rec.wait_for(2)
    assert 1 <= adapter.yielded < len(adapter.pieces) and adapter.closed  # the model was stopped
    assert_partial_closing(rec, completion_tokens=adapter.yielded, reason="client_disconnected")


async def test_upstream_failure_before_the_first_piece_is_a_status_and_records_nothing() -> None:
    """As for a whole answer: nothing was answered, so nothing of the request is recorded (and nothing is
    half-recorded); only the adapter's failure, on its own (issue 9: AdapterFailed, a stable error class)."""
    adapter = FakeAdapter([], breaks=True)
    rec = Recorder()
    async with TestClient(TestServer(app_for(adapter, rec))) as client:
        resp = await client.post("/v1/ask", json={"prompt": "hi", "stream": True}, headers=AUTH)
        assert resp.status == 502 and (await resp.json())["error"]["code"] == "upstream_stream_broken"
        whole = await client.post("/v1/ask", json={"prompt": "hi"}, headers=AUTH)
        assert whole.status == 502
    assert [[e.event_type for e in b] for b in rec.batches] == [["AdapterFailed"], ["AdapterFailed"]]
    for [lost] in rec.batches:
        assert isinstance(lost, AdapterFailed) and lost.error_kind == "server_error" and not lost.will_fall_back


async def test_a_complete_stream_still_records_success() -> None:
    adapter = FakeAdapter(WORDS[:4])
    rec = Recorder()
    async with TestClient(TestServer(app_for(adapter, rec))) as client:
        resp = await client.post("/v1/ask", json={"prompt": "hi", "stream": True}, headers=AUTH)
        frames = frames_of(await resp.text())
    assert frames[-1].startswith("event: done\n")
    charged, audited, outcome = rec.batches[1]
    assert isinstance(charged, TokensCharged) and charged.completion_tokens == 4
    assert isinstance(outcome, AdapterCalled) and outcome.streamed and outcome.completion_tokens == 4
    assert isinstance(audited, AuditRecorded) and audited.outcome == "success" and "partial" not in audited.details


async def test_partial_closing_ids_derive_from_the_request_id() -> None:
    """A retried publish of the same partial closing carries the same ids, which downstream collapses."""
    adapter = FakeAdapter(WORDS[:2], breaks=True)
    rec = Recorder()
    async with TestClient(TestServer(app_for(adapter, rec))) as client:
        await (await client.post("/v1/ask", json={"prompt": "hi", "stream": True}, headers=AUTH)).read()
    charged, audited = assert_partial_closing(rec, completion_tokens=2, reason="upstream_error")
    rid = charged.request_id
    assert charged.envelope.event_id == str(derived_uuid7(rid, "TokensCharged"))
    assert audited.envelope.event_id == str(derived_uuid7(rid, "AuditRecorded"))


class BuggyAdapter(FakeAdapter):
    """A stream that fails with something that is not an UpstreamError (a bug in an adapter)."""

    async def stream(self, model: str, messages: list[Message], max_tokens: int | None = None) -> AsyncIterator[str]:
        async for piece in super().stream(model, messages):
            yield piece
        raise RuntimeError("adapter bug")


async def test_an_unexpected_error_mid_stream_still_closes_the_request() -> None:
    adapter = BuggyAdapter(WORDS[:2])
    rec = Recorder()
    async with TestClient(TestServer(app_for(adapter, rec))) as client:
        resp = await client.post("/v1/ask", json={"prompt": "hi", "stream": True}, headers=AUTH)
        last = frames_of(await resp.text())[-1]
    assert data_of(last)["error"]["code"] == "internal_error"
    assert_partial_closing(rec, completion_tokens=2, reason="internal_error")
