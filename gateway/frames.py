"""How an answer is framed on the wire: the native /v1/ask shape and the OpenAI shape.

Each framer gives the whole answer for a plain response and the SSE frames for a streamed
one, so the request path is the same for both APIs.
"""

from __future__ import annotations

import time
from typing import Protocol

import orjson

from domain.pricing import Price, cost
from gateway.adapters import Completion
from gateway.facts import CallContext
from gateway.models import (
    AskDelta,
    AskResponse,
    ChatChoice,
    ChatChoiceMessage,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatUsage,
    Usage,
)


def sse(data: bytes | str, event: str | None = None) -> bytes:
    body = data if isinstance(data, bytes) else data.encode()
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + body + b"\n\n"


class Frames(Protocol):
    def delta(self, piece: str) -> bytes: ...

    def done(self, completion: Completion, price: Price) -> bytes: ...

    def failure(self, message: str, code: str = "event_log_unavailable") -> bytes:
        """The last frame of a stream that could not finish: an error object, as OpenAI sends."""
        ...


class AskFrames:
    """`/v1/ask`: `event: delta` frames, then one `event: done` frame with the AskResponse."""

    def __init__(self, ctx: CallContext) -> None:
        self.ctx = ctx

    def whole(self, completion: Completion, price: Price) -> AskResponse:
        return AskResponse(
            request_id=self.ctx.request_id,
            model=completion.model,
            answer=completion.text,
            usage=Usage(
                prompt_tokens=completion.prompt_tokens,
                completion_tokens=completion.completion_tokens,
                total_tokens=completion.prompt_tokens + completion.completion_tokens,
            ),
            cost=cost(completion.prompt_tokens, completion.completion_tokens, price),
            currency=price.currency,
        )

    def delta(self, piece: str) -> bytes:
        return sse(AskDelta(request_id=self.ctx.request_id, text=piece).model_dump_json(), "delta")

    def done(self, completion: Completion, price: Price) -> bytes:
        return sse(self.whole(completion, price).model_dump_json(), "done")

    def failure(self, message: str, code: str = "event_log_unavailable") -> bytes:
        return sse(orjson.dumps({"error": {"code": code, "message": message}}), "error")


class ChatFrames:
    """OpenAI chat completions: `chat.completion` objects and `chat.completion.chunk` SSE frames."""

    def __init__(self, ctx: CallContext, include_usage: bool = False) -> None:
        self.ctx = ctx
        self.include_usage = include_usage
        self.created = int(time.time())
        self.id = f"chatcmpl-{ctx.request_id}"
        self._first = True

    def _usage(self, c: Completion) -> ChatUsage:
        return ChatUsage(
            prompt_tokens=c.prompt_tokens,
            completion_tokens=c.completion_tokens,
            total_tokens=c.prompt_tokens + c.completion_tokens,
        )

    def whole(self, completion: Completion) -> ChatCompletion:
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=completion.model,
            choices=[ChatChoice(message=ChatChoiceMessage(content=completion.text))],
            usage=self._usage(completion),
        )

    def _chunk(self, delta: ChatDelta, finish: bool = False, usage: ChatUsage | None = None) -> bytes:
        choices = [] if usage else [ChatChunkChoice(delta=delta, finish_reason="stop" if finish else None)]
        chunk = ChatCompletionChunk(
            id=self.id, created=self.created, model=self.ctx.model, choices=choices, usage=usage
        )
        return sse(chunk.model_dump_json(exclude_none=True))

    def delta(self, piece: str) -> bytes:
        delta = ChatDelta(role="assistant", content=piece) if self._first else ChatDelta(content=piece)
        self._first = False
        return self._chunk(delta)

    def done(self, completion: Completion, price: Price) -> bytes:
        out = self._chunk(ChatDelta(), finish=True)
        if self.include_usage:
            out += self._chunk(ChatDelta(), usage=self._usage(completion))
        return out + sse("[DONE]")

    def failure(self, message: str, code: str = "event_log_unavailable") -> bytes:
        # OpenAI's shape: the SDKs raise APIError on a `data:` frame whose object has "error"
        return sse(orjson.dumps({"error": {"message": message, "type": code, "code": code}}))
