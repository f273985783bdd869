"""Model adapters behind one interface. Only the deterministic simulator exists so far.

The simulator answers from a hash of the prompt so tests and demos are reproducible without
network access; token counts approximate 4 characters per token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

from gateway.models import Message


@dataclass(frozen=True)
class Completion:
    model: str
    text: str
    prompt_tokens: int
    completion_tokens: int


class Adapter(Protocol):
    models: tuple[str, ...]

    async def complete(self, model: str, messages: list[Message]) -> Completion: ...


class SimulatedAdapter:
    """Deterministic fake LLM: same messages, same answer and token counts."""

    models: tuple[str, ...] = ("sim-small", "sim-large")

    async def complete(self, model: str, messages: list[Message]) -> Completion:
        text = "\n".join(m.content for m in messages)
        digest = hashlib.sha256(f"{model}\x1f{text}".encode()).digest()
        prompt_tokens = max(1, (len(text) + 3) // 4) + 3 * len(messages)
        completion_tokens = 8 + digest[0] % 56
        words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel"]
        answer = " ".join(words[b % len(words)] for b in digest[1 : 1 + completion_tokens // 2])
        return Completion(model, f"[{model}] {answer}", prompt_tokens, completion_tokens)
