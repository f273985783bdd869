"""Model adapters behind one interface. Only the deterministic simulator exists so far.

The simulator answers from a hash of the prompt so tests and demos are reproducible without
network access; token counts approximate 4 characters per token. It streams its answer word
by word, with an optional per-chunk latency to model a real upstream.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

from gateway.models import Message

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


@dataclass(frozen=True)
class Completion:
    model: str
    text: str
    prompt_tokens: int
    completion_tokens: int


class Adapter(Protocol):
    models: tuple[str, ...]

    async def complete(self, model: str, messages: list[Message]) -> Completion: ...

    def stream(self, model: str, messages: list[Message]) -> AsyncIterator[str]:
        """The answer in pieces; `usage(model, messages, text)` gives the counts afterwards."""
        ...

    def usage(self, model: str, messages: list[Message], text: str) -> Completion: ...


class SimulatedAdapter:
    """Deterministic fake LLM: same messages, same answer and token counts."""

    models: tuple[str, ...] = ("sim-small", "sim-large")

    def __init__(self, chunk_latency_s: float = 0.0) -> None:
        self.chunk_latency_s = chunk_latency_s

    def _answer(self, model: str, messages: list[Message]) -> tuple[str, int, int]:
        text = "\n".join(m.content for m in messages)
        digest = hashlib.sha256(f"{model}\x1f{text}".encode()).digest()
        prompt_tokens = max(1, (len(text) + 3) // 4) + 3 * len(messages)
        completion_tokens = 8 + digest[0] % 56
        answer = " ".join(WORDS[b % len(WORDS)] for b in digest[1 : 1 + completion_tokens // 2])
        return f"[{model}] {answer}", prompt_tokens, completion_tokens

    async def complete(self, model: str, messages: list[Message]) -> Completion:
        text, prompt_tokens, completion_tokens = self._answer(model, messages)
        return Completion(model, text, prompt_tokens, completion_tokens)

    async def stream(self, model: str, messages: list[Message]) -> AsyncIterator[str]:
        text, _, _ = self._answer(model, messages)
        words = text.split(" ")
        for i, word in enumerate(words):
            if self.chunk_latency_s:
                await asyncio.sleep(self.chunk_latency_s)
            yield word if i == 0 else " " + word

    def usage(self, model: str, messages: list[Message], text: str) -> Completion:
        _, prompt_tokens, completion_tokens = self._answer(model, messages)
        return Completion(model, text, prompt_tokens, completion_tokens)
