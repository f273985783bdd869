"""A fast, deterministic mock of an OpenAI-compatible upstream (chat completions and models).

Why: the gateway and the LiteLLM proxy are benchmarked against the same upstream, so it must
cost as little as possible per request and answer identically every time. Answers are
precomputed per model; only the usage chunk depends on the prompt. Tests import `make_app`
and script faults (status codes, redirects, delays, broken streams) through `MockState`.

Run: .venv/bin/python bench/mock_upstream.py --port 9100 [--latency-ms 0] [--tokens 16]
     [--chunk-ms 0] [--workers 1] [--host 127.0.0.1]
Serves POST /v1/chat/completions (JSON, or SSE with `stream: true`; the usage chunk is sent
when `stream_options.include_usage` is true) and GET /v1/models. Standalone: imports nothing
of ledgerflow, so it can run next to either system under test.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import signal
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
CREATED = 1_700_000_000  # fixed, so answers are byte-for-byte deterministic
DEFAULT_MODELS = ("mock-small", "mock-large")


@dataclass
class Fault:
    """What the next chat-completions request gets instead of a normal answer (tests only)."""

    status: int | None = None  # answer with this status and an OpenAI-style error body
    retry_after: str | None = None  # Retry-After header with `status`
    location: str | None = None  # Location header with a 3xx `status`
    delay_s: float = 0.0  # extra wait before answering
    break_after_chunks: int | None = None  # stream: drop the connection after this many content chunks
    no_usage: bool = False  # leave usage out (JSON and stream)
    echo_auth: bool = False  # put the request's Authorization header into the error body


@dataclass
class MockState:
    latency_ms: float
    tokens: int
    chunk_ms: float
    models: tuple[str, ...]
    faults: deque[Fault] = field(default_factory=deque)
    requests: int = 0  # chat-completions requests received
    _answers: dict[str, _Answer] = field(default_factory=dict)

    def answer(self, model: str) -> _Answer:
        found = self._answers.get(model)
        if found is None:
            found = _Answer(model, self.tokens)
            if len(self._answers) < 1024:  # model names come from clients; keep the cache bounded
                self._answers[model] = found
        return found


MOCK = web.AppKey("mock", MockState)


def answer_text(tokens: int) -> str:
    """The deterministic answer: `tokens` words, one token each."""
    return " ".join(WORDS[i % len(WORDS)] for i in range(tokens))


def prompt_tokens(messages: Any) -> int:
    """~4 characters per token plus 3 per message, like the gateway's simulator."""
    if not isinstance(messages, list):
        return 0
    chars = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(str(p.get("text", ""))) for p in content if isinstance(p, dict))
    return max(1, (chars + 3) // 4) + 3 * len(messages)


class _Answer:
    """Precomputed bodies for one model: the SSE chunks and the pieces of the JSON answer."""

    def __init__(self, model: str, tokens: int) -> None:
        self.model = model
        self.tokens = tokens
        self.text = answer_text(tokens)
        self.id = "chatcmpl-mock"
        words = self.text.split(" ") if tokens else []
        pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
        self.role_chunk = self._sse({"role": "assistant", "content": ""}, None)
        self.content_chunks = [self._sse({"content": p}, None) for p in pieces]
        self.final_chunk = self._sse({}, "stop")
        self.stream_prefix = self.role_chunk + b"".join(self.content_chunks) + self.final_chunk

    def _sse(self, delta: dict[str, Any], finish: str | None) -> bytes:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def usage(self, prompt: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": self.tokens, "total_tokens": prompt + self.tokens}

    def usage_chunk(self, prompt: int) -> bytes:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": self.model,
            "choices": [],
            "usage": self.usage(prompt),
        }
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    def whole(self, prompt: int, with_usage: bool) -> bytes:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion",
            "created": CREATED,
            "model": self.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.text}, "finish_reason": "stop"}],
        }
        if with_usage:
            body["usage"] = self.usage(prompt)
        return orjson.dumps(body)


DONE = b"data: [DONE]\n\n"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    body = {"error": {"message": message, "type": "mock_error", "code": status}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[MOCK]
    state.requests += 1
    fault = state.faults.popleft() if state.faults else None
    try:
        req = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return _error(400, "the body is not valid JSON")
    if not isinstance(req, dict) or not isinstance(req.get("model"), str) or not req.get("messages"):
        return _error(400, "send 'model' and 'messages'")
    delay = state.latency_ms / 1000 + (fault.delay_s if fault else 0.0)
    if delay:
        await asyncio.sleep(delay)
    if fault is not None and fault.status is not None:
        return _fault_response(request, fault)
    answer = state.answer(req["model"])
    prompt = prompt_tokens(req["messages"])
    no_usage = fault is not None and fault.no_usage
    if not req.get("stream"):
        return web.Response(body=answer.whole(prompt, not no_usage), content_type="application/json")
    options = req.get("stream_options")
    include_usage = isinstance(options, dict) and bool(options.get("include_usage")) and not no_usage
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    tail = (answer.usage_chunk(prompt) if include_usage else b"") + DONE
    break_after = fault.break_after_chunks if fault is not None else None
    if not state.chunk_ms and break_after is None:
        await resp.write(answer.stream_prefix + tail)  # one write: the cheapest way to send it all
    else:
        await resp.write(answer.role_chunk)
        for i, chunk in enumerate(answer.content_chunks):
            if break_after is not None and i == break_after:
                await asyncio.sleep(0.05)  # let the pieces already written reach the client first
                if request.transport is not None:
                    request.transport.close()  # no terminating chunk: the client sees a truncated body
                return resp
            if state.chunk_ms:
                await asyncio.sleep(state.chunk_ms / 1000)
            await resp.write(chunk)
        await resp.write(answer.final_chunk + tail)
    await resp.write_eof()
    return resp


def _fault_response(request: web.Request, fault: Fault) -> web.Response:
    assert fault.status is not None
    headers: dict[str, str] = {}
    if fault.retry_after is not None:
        headers["Retry-After"] = fault.retry_after
    if fault.location is not None:
        headers["Location"] = fault.location
    message = f"mock fault {fault.status}"
    if fault.echo_auth:
        message += f"; you sent Authorization: {request.headers.get('Authorization', '')}"
    return _error(fault.status, message, headers)


async def list_models(request: web.Request) -> web.Response:
    data = [{"id": m, "object": "model", "created": CREATED, "owned_by": "mock"} for m in request.app[MOCK].models]
    return web.Response(body=orjson.dumps({"object": "list", "data": data}), content_type="application/json")


def make_app(
    latency_ms: float = 0.0, tokens: int = 16, *, chunk_ms: float = 0.0, models: tuple[str, ...] = DEFAULT_MODELS
) -> web.Application:
    """The mock as an aiohttp app; `app[MOCK]` holds the request count and the fault script."""
    if latency_ms < 0 or tokens < 0 or chunk_ms < 0:
        raise ValueError("latency_ms, tokens and chunk_ms must be >= 0")
    app = web.Application()
    app[MOCK] = MockState(latency_ms=latency_ms, tokens=tokens, chunk_ms=chunk_ms, models=models)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    return app


def _serve(args: argparse.Namespace, reuse_port: bool) -> None:
    app = make_app(args.latency_ms, args.tokens, chunk_ms=args.chunk_ms)
    web.run_app(
        app,
        host=args.host,
        port=args.port,
        access_log=None,
        reuse_port=reuse_port or None,
        print=None if reuse_port else print,
        backlog=1024,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=0.0, help="wait before answering (time to first token)")
    parser.add_argument("--tokens", type=int, default=16, help="completion tokens per answer (one word each)")
    parser.add_argument("--chunk-ms", type=float, default=0.0, help="wait between streamed chunks")
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port (SO_REUSEPORT)")
    args = parser.parse_args(argv)
    if args.workers <= 1:
        _serve(args, reuse_port=False)
        return
    procs = [multiprocessing.Process(target=_serve, args=(args, True), daemon=True) for _ in range(args.workers)]
    for p in procs:
        p.start()

    def stop(_signum: int, _frame: object) -> None:
        for p in procs:
            p.terminate()  # each worker's run_app exits cleanly on SIGTERM

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"mock upstream on http://{args.host}:{args.port}/v1 with {args.workers} workers (pid {os.getpid()})")
    for p in procs:
        p.join()


if __name__ == "__main__":
    main()
