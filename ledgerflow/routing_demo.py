"""The routing part of `ledgerflow demo` (issue 9): unpinned traffic, feedback from hidden quality,
and the shift of traffic round by round.

Why this shape: routing only shows when the models differ per kind of task and something
tells the router how each answer was. The simulated models of `docs/routing-demo.toml` hide a
quality (and a speed) per task class in their profiles (`gateway.adapters.SimProfile`); the
demo client plays the users: it sends prompts of three classes (code, maths, prose) without a
model, and for each answer posts `/v1/feedback` with the score the simulator's hidden profile
gives that model on that prompt (the gateway never sees those numbers). The priors agent
learns from RouteChosen + feedback + TokensCharged + AdapterCalled and publishes priors; the
gateway hot-loads them; the next round routes by them.

The summary is computed on the client from what the gateway answered: per round and class,
each model's share of calls and the mean hidden quality, and the cost against sending every
call to the dearest model (the simulator is deterministic, so that counterfactual is exact:
the dearest model's own token counts for the same prompt, at its price).
"""

from __future__ import annotations

import asyncio
import zlib
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal

import aiohttp

from domain.pricing import Price, cost
from gateway.adapters import SimProfile, SimulatedAdapter, task_class
from gateway.models import Message
from ledgerflow.settings import Settings

_TOPICS = ("the quarterly report", "our onboarding guide", "the incident review", "the vendor contract",
           "the product launch", "the hiring plan", "the travel policy", "the customer survey")  # fmt: skip
_FUNCS = ("parse_line", "merge_totals", "load_config", "dedupe", "retry_call", "flatten", "chunk", "normalise")
_NOUNS = ("orders", "invoices", "events", "users", "rows", "prices", "tickets", "readings")


def prompt_for(i: int) -> str:
    """The i-th demo prompt: code, maths and prose in turn, varied so no two are the same text."""
    a, b = zlib.crc32(f"a{i}".encode()) % 8, zlib.crc32(f"b{i}".encode()) % 8
    kind = i % 3
    if kind == 0:
        return (
            f"def {_FUNCS[a]}({_NOUNS[b]}):\n    return [x for x in {_NOUNS[b]} if x]\n"
            f"Why does {_FUNCS[a]}() return an empty list for {_NOUNS[(a + b) % 8]}? (#{i})"
        )
    if kind == 1:
        return f"Solve the equation {a + 2}x + {b + 1} = {a * b + 7} and explain each step (#{i})."
    return f"Summarise {_TOPICS[a]} in three short bullet points for {_NOUNS[b]} owners (#{i})."


@dataclass(frozen=True)
class Routed:
    """One answered, unpinned call as the demo saw it."""

    task: str
    model: str
    cost: Decimal
    quality: float
    strongest_cost: Decimal  # what the dearest model would have charged for the same prompt


@dataclass
class Judge:
    """The users' judgement: each model's hidden quality on a prompt, and the dearest model's counterfactual cost."""

    adapters: Mapping[str, SimulatedAdapter]
    prices: Mapping[str, Price]
    strongest: str = field(init=False)

    def __post_init__(self) -> None:
        self.strongest = max(self.prices, key=lambda m: (self.prices[m].output_per_mtok, m))

    def quality(self, model: str, prompt: str) -> float:
        adapter = self.adapters.get(model)
        return adapter.quality(model, [Message(role="user", content=prompt)]) if adapter else 0.0

    def strongest_cost(self, prompt: str) -> Decimal:
        adapter = self.adapters.get(self.strongest)
        if adapter is None:
            return Decimal(0)
        plan = adapter.plan(self.strongest, [Message(role="user", content=prompt)])
        return cost(plan.prompt_tokens, plan.completion_tokens, self.prices[self.strongest])


def judge_of(profiles: Mapping[str, SimProfile], prices: Mapping[str, Price]) -> Judge:
    adapter = SimulatedAdapter(profiles=profiles)
    return Judge({m: adapter for m in profiles}, {m: prices[m] for m in profiles if m in prices})


async def route_round(
    base_url: str, keys: Sequence[str], first: int, n: int, judge: Judge, concurrency: int = 8
) -> tuple[list[Routed], int]:
    """n unpinned calls (prompts first..first+n), each followed by its feedback; (routed, failed)."""
    sem = asyncio.Semaphore(concurrency)
    routed: list[Routed] = []
    failed = 0

    async def one(i: int, session: aiohttp.ClientSession) -> None:
        nonlocal failed
        prompt = prompt_for(i)
        headers = {"Authorization": f"Bearer {keys[i % len(keys)]}"}
        async with sem:
            try:
                async with session.post(f"{base_url}/v1/ask", json={"prompt": prompt}, headers=headers) as resp:
                    if resp.status != 200:
                        failed += 1
                        return
                    body = await resp.json()
                score = judge.quality(body["model"], prompt)
                async with session.post(
                    f"{base_url}/v1/feedback", json={"request_id": body["request_id"], "score": score}, headers=headers
                ) as fb:
                    await fb.read()
            except aiohttp.ClientError:
                failed += 1
                return
        routed.append(
            Routed(task_class(prompt), body["model"], Decimal(body["cost"]), score, judge.strongest_cost(prompt))
        )

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        await asyncio.gather(*(one(i, session) for i in range(first, first + n)))
    return routed, failed


@dataclass(frozen=True)
class RoundSummary:
    calls: int
    shares: dict[str, dict[str, float]]  # task class -> model -> share of that class's calls
    quality: float  # mean hidden quality
    cost: Decimal
    strongest_cost: Decimal
    routed: tuple[Routed, ...] = ()

    @property
    def savings(self) -> Decimal:
        return self.strongest_cost - self.cost


def summarise(routed: Sequence[Routed]) -> RoundSummary:
    by_class: dict[str, Counter[str]] = defaultdict(Counter)
    for r in routed:
        by_class[r.task][r.model] += 1
    shares = {t: {m: c / sum(cs.values()) for m, c in sorted(cs.items())} for t, cs in sorted(by_class.items())}
    n = len(routed)
    return RoundSummary(
        calls=n,
        shares=shares,
        quality=sum(r.quality for r in routed) / n if n else 0.0,
        cost=sum((r.cost for r in routed), Decimal(0)),
        strongest_cost=sum((r.strongest_cost for r in routed), Decimal(0)),
        routed=tuple(routed),
    )


async def run_rounds(
    base_url: str,
    keys: Sequence[str],
    judge: Judge,
    rounds: int,
    per_round: int,
    between: Callable[[int], Awaitable[None]],
) -> tuple[list[RoundSummary], int]:
    """`rounds` rounds of `per_round` calls; `between(round)` waits for the priors to move on."""
    out: list[RoundSummary] = []
    failed = 0
    for k in range(rounds):
        if k:
            await between(k)
        routed, bad = await route_round(base_url, keys, k * per_round, per_round, judge)
        failed += bad
        out.append(summarise(routed))
    return out, failed


def format_shift(summaries: Sequence[RoundSummary], strongest: str) -> str:
    """The shift, one line per round and task class: where the traffic went, quality, cost vs the dearest."""
    lines = [f"routing, round by round (share of each class's calls; cost vs always-{strongest}):"]
    for k, s in enumerate(summaries, 1):
        ratio = float(s.cost / s.strongest_cost) if s.strongest_cost else 0.0
        lines.append(
            f"  round {k}: {s.calls} calls, mean quality {s.quality:.3f}, cost {s.cost} = {ratio:.1%} of "
            f"always-{strongest} ({s.strongest_cost}), saved {s.savings}"
        )
        for task, shares in s.shares.items():
            lines.append(f"    {task:<6} " + ", ".join(f"{m} {v:.0%}" for m, v in shares.items()))
    return "\n".join(lines)


def judge_for(settings: Settings) -> Judge:
    """The hidden truth of the models this deployment simulates (the built-in ones and the configured ones)."""
    from gateway.server import build_registry

    registry = build_registry(settings)
    adapters: dict[str, SimulatedAdapter] = {}
    for info in registry.models():
        adapter = registry.adapter(info.adapter_name)
        if isinstance(adapter, SimulatedAdapter):
            adapters[info.name] = adapter
    prices = registry.prices()
    return Judge(adapters, {m: prices[m] for m in adapters})


def priors_published(settings: Settings) -> int:
    from ledgerflow.cli import query_text

    try:
        return int(query_text(settings, "SELECT count() FROM routing_priors_published", "TabSeparated").strip() or 0)
    except Exception:  # the projection may not exist yet on a fresh store: just count as none
        return 0


def run(settings: Settings, n: int, rounds: int = 4, wait_s: float = 30.0) -> tuple[int, int]:
    """`ledgerflow demo` with routing on: about n unpinned calls in rounds, the shift printed; (answered, failed)."""
    from ledgerflow.settings import DEMO_KEYS

    judge = judge_for(settings)
    per_round = max(1, n // rounds)
    seen = priors_published(settings)

    async def between(k: int) -> None:
        """Wait for a newer priors version to land (the agent publishes every 5 s with news), then a beat."""
        nonlocal seen
        deadline = asyncio.get_running_loop().time() + wait_s
        while priors_published(settings) <= seen and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.5)
        seen = priors_published(settings)
        await asyncio.sleep(1.0)  # the gateway's follower picks the version up (~100 ms)

    keys = [DEMO_KEYS[t] for t in sorted(DEMO_KEYS)]
    summaries, failed = asyncio.run(run_rounds(settings.gateway_url, keys, judge, rounds, per_round, between))
    print(format_shift(summaries, judge.strongest), flush=True)
    return sum(s.calls for s in summaries), failed
