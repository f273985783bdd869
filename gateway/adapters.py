"""Model adapters behind one interface, and the deterministic simulator with profiles.

The simulator answers from a hash of the prompt so tests, demos and benchmarks are
reproducible without network access; token counts approximate 4 characters per token. It
streams its answer word by word. A `SimProfile` per model makes it behave like a given real
model for the demo and the benchmarks: a latency distribution (time to first token, then per
token), how long its answers are, a quality profile (a score in [0, 1] per answer, for routing
and benchmarks: `quality`), and a failure rate. Every draw is seeded from the model and the
prompt, so the same call always takes the same time, says the same and fails the same way.
Cost is not part of the profile: it comes from the model's registry price, like any model's.

For the routing demo (issue 9) a profile may hide a different quality and speed per task
class (`task_class`: code, maths or prose, from markers in the prompt): `class_quality`
overrides the mean quality, `class_latency` scales the latency, for that class. Nothing
outside the simulator knows these; the router has to learn them from feedback and
AdapterCalled.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from gateway.models import Message

WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")
TASK_CLASSES = ("code", "maths", "prose")
_CODE_MARKS = ("def ", "return ", "class ", "import ", "function ", "```", "();", "=>", "#include", "SELECT ")
_MATHS_MARKS = ("derivative", "integral", "equation", "solve", "probability", "matrix", "prove", "^", "√", "∫")


def task_class(text: str) -> str:
    """The simulator's own notion of what a prompt asks for (code, maths, prose): its hidden truth's key."""
    if any(m in text for m in _CODE_MARKS):
        return "code"
    lower = text.lower()
    return "maths" if any(m in lower for m in _MATHS_MARKS) else "prose"


@dataclass(frozen=True)
class Completion:
    model: str
    text: str
    prompt_tokens: int
    completion_tokens: int


class Adapter(Protocol):
    """A model backend. `max_tokens` is the most completion tokens the call may produce: the
    gateway holds budget and checks cost caps for exactly that many, so an adapter must pass it
    on (a simulator honours it, an upstream is asked for it). None: the adapter's own bound."""

    models: tuple[str, ...]

    async def complete(self, model: str, messages: list[Message], max_tokens: int | None = None) -> Completion: ...

    def stream(self, model: str, messages: list[Message], max_tokens: int | None = None) -> AsyncIterator[str]:
        """The answer in pieces; `usage(model, messages, text, max_tokens)` gives the counts afterwards."""
        ...

    def usage(self, model: str, messages: list[Message], text: str, max_tokens: int | None = None) -> Completion: ...


@dataclass(frozen=True)
class Latency:
    """How long a simulated model takes: `first_token_ms`, then `per_token_ms` for each answer token.

    `distribution` shapes the time to first token around `first_token_ms`: fixed; uniform within
    ± `spread` of it (a fraction); lognormal with median `first_token_ms` and sigma `spread`
    (the long right tail real upstreams show). The per-token time scales with the same draw.
    """

    distribution: Literal["fixed", "uniform", "lognormal"] = "fixed"
    first_token_ms: float = 0.0
    per_token_ms: float = 0.0
    spread: float = 0.0

    def __post_init__(self) -> None:
        if self.first_token_ms < 0 or self.per_token_ms < 0 or self.spread < 0:
            raise ValueError("latency times and spread must not be negative")
        if self.distribution == "uniform" and self.spread > 1:
            raise ValueError("a uniform spread is a fraction of first_token_ms, at most 1")

    def factor(self, rng: random.Random) -> float:
        if self.distribution == "uniform":
            return 1.0 + rng.uniform(-self.spread, self.spread)
        if self.distribution == "lognormal":
            return math.exp(rng.gauss(0.0, self.spread))
        return 1.0


@dataclass(frozen=True)
class SimProfile:
    """How one simulated model behaves (see the module docstring)."""

    latency: Latency = field(default_factory=Latency)
    answer_tokens: tuple[int, int] = (8, 63)  # inclusive range of completion tokens
    quality: float = 0.8  # mean quality score of its answers, in [0, 1]
    quality_spread: float = 0.1  # standard deviation of the score around the mean
    error_rate: float = 0.0  # fraction of calls that fail as an unavailable upstream
    class_quality: tuple[tuple[str, float], ...] = ()  # (task class, mean quality) overriding `quality`
    class_latency: tuple[tuple[str, float], ...] = ()  # (task class, latency factor), 1 when absent

    def __post_init__(self) -> None:
        low, high = self.answer_tokens
        if not 1 <= low <= high:
            raise ValueError("answer_tokens must be (low, high) with 1 <= low <= high")
        if not 0 <= self.quality <= 1 or self.quality_spread < 0 or not 0 <= self.error_rate <= 1:
            raise ValueError("quality and error_rate must lie in [0, 1] and quality_spread must not be negative")
        if any(not 0 <= q <= 1 for _, q in self.class_quality) or any(f < 0 for _, f in self.class_latency):
            raise ValueError("class qualities must lie in [0, 1] and class latency factors must not be negative")

    def quality_of(self, task: str) -> float:
        return next((q for c, q in self.class_quality if c == task), self.quality)

    def latency_of(self, task: str) -> float:
        return next((f for c, f in self.class_latency if c == task), 1.0)


@dataclass(frozen=True)
class Plan:
    """What the simulator will do for one call: derived only from the model, the prompt and the profile."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    first_token_s: float
    per_token_s: float
    quality: float
    fails: bool


DEFAULT_PROFILE = SimProfile()


class SimulatedAdapter:
    """Deterministic fake LLM: same messages, same answer, token counts, delays and quality."""

    def __init__(
        self,
        chunk_latency_s: float = 0.0,
        profiles: Mapping[str, SimProfile] | None = None,
    ) -> None:
        self.chunk_latency_s = chunk_latency_s
        self.profiles: dict[str, SimProfile] = (
            dict(profiles) if profiles else {"sim-small": DEFAULT_PROFILE, "sim-large": DEFAULT_PROFILE}
        )
        self.models: tuple[str, ...] = tuple(self.profiles)

    def plan(self, model: str, messages: list[Message], max_tokens: int | None = None) -> Plan:
        """What the call does; an answer longer than `max_tokens` is cut there, as a model stops at its limit."""
        profile = self.profiles.get(model, DEFAULT_PROFILE)
        text = "\n".join(m.content for m in messages)
        digest = hashlib.sha256(f"{model}\x1f{text}".encode()).digest()
        prompt_tokens = max(1, (len(text) + 3) // 4) + 3 * len(messages)
        low, high = profile.answer_tokens
        if profile is DEFAULT_PROFILE:  # the historic answer shape: tests and demos recorded with it stay valid
            completion_tokens = 8 + digest[0] % 56
        else:
            completion_tokens = low + int.from_bytes(digest[:4], "big") % (high - low + 1)
        if max_tokens is not None:
            completion_tokens = max(0, min(completion_tokens, max_tokens))
        words = [
            WORDS[b % len(WORDS)] for b in (digest * (1 + completion_tokens // 64))[1 : 1 + completion_tokens // 2]
        ]
        rng = random.Random(digest)
        task = task_class(text) if profile.class_quality or profile.class_latency else "prose"
        factor = profile.latency.factor(rng) * profile.latency_of(task)
        quality = min(1.0, max(0.0, rng.gauss(profile.quality_of(task), profile.quality_spread)))
        return Plan(
            text=f"[{model}] {' '.join(words)}",
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            first_token_s=profile.latency.first_token_ms * factor / 1000,
            per_token_s=profile.latency.per_token_ms * factor / 1000,
            quality=quality,
            fails=rng.random() < profile.error_rate,
        )

    def _answer(self, model: str, messages: list[Message], max_tokens: int | None = None) -> tuple[str, int, int]:
        """(text, prompt tokens, completion tokens): the hook subclasses override to shape answers."""
        p = self.plan(model, messages, max_tokens)
        return p.text, p.prompt_tokens, p.completion_tokens

    def quality(self, model: str, messages: list[Message]) -> float:
        """The quality score of this call's answer under the model's profile (for routing and benchmarks)."""
        return self.plan(model, messages).quality

    @staticmethod
    def _fail(model: str) -> Exception:
        from gateway.upstream import UpstreamUnavailable  # the error a real upstream's outage raises

        return UpstreamUnavailable(f"simulated model {model!r} failed (its profile's error_rate)")

    async def complete(self, model: str, messages: list[Message], max_tokens: int | None = None) -> Completion:
        p = self.plan(model, messages, max_tokens)
        delay = p.first_token_s + p.per_token_s * p.completion_tokens
        if delay:
            await asyncio.sleep(delay)
        if p.fails:
            raise self._fail(model)
        return Completion(model, *self._answer(model, messages, max_tokens))

    async def stream(self, model: str, messages: list[Message], max_tokens: int | None = None) -> AsyncIterator[str]:
        p = self.plan(model, messages, max_tokens)
        if p.first_token_s:
            await asyncio.sleep(p.first_token_s)
        if p.fails:
            raise self._fail(model)
        words = self._answer(model, messages, max_tokens)[0].split(" ")
        per_piece = p.per_token_s * p.completion_tokens / max(1, len(words) - 1)
        for i, word in enumerate(words):
            wait = self.chunk_latency_s + (per_piece if i else 0.0)
            if wait:
                await asyncio.sleep(wait)
            yield word if i == 0 else " " + word

    def usage(self, model: str, messages: list[Message], text: str, max_tokens: int | None = None) -> Completion:
        _, prompt_tokens, completion_tokens = self._answer(model, messages, max_tokens)
        return Completion(model, text, prompt_tokens, completion_tokens)
