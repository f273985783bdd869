"""Dry-run and diff: what a candidate bundle would decide differently from the active one.

`diff` evaluates both bundles over recorded inputs against one set of attributes and counts
the flips by kind (allow→deny, deny→allow, obligations changed) and by the policies they are
put down to (see `Divergence`), keeping a few examples of each. `shadow` does the same for
one live input. Both reuse one `EntityView`, so the inputs' entities are parsed once per
distinct caller, not once per input and bundle.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from domain.policy_bundle import PolicyBundle
from domain.policy_engine import (
    FLIP_KINDS,
    DecisionInput,
    Divergence,
    EntityView,
    cedar_requests,
    compare,
    evaluate,
)
from domain.policy_entities import EntityStore

__all__ = ["DiffReport", "FlipExample", "diff", "shadow"]


@dataclass(frozen=True, slots=True)
class FlipExample:
    """One input the bundles decide differently, with both decisions."""

    input: DecisionInput
    divergence: Divergence

    def to_dict(self) -> dict[str, Any]:
        d = self.divergence
        return {
            "input": self.input.to_dict(),
            "input_sha256": d.active.input_sha256,
            "kind": d.kind,
            "policies": list(d.policies),
            "active": {**d.active.decided_fields(), "reasons": list(d.active.reasons)},
            "candidate": {**d.candidate.decided_fields(), "reasons": list(d.candidate.reasons)},
        }


@dataclass(frozen=True)
class DiffReport:
    """Counts of flipped decisions by kind and by policy, with a few examples of each kind."""

    active_version: str
    candidate_version: str
    evaluated: int
    counts: Mapping[str, int]  # kind → flips; every kind present
    by_policy: Mapping[str, Mapping[str, int]]  # kind → policy → flips, most first
    examples: Mapping[str, tuple[FlipExample, ...]]  # kind → first few

    @property
    def flipped(self) -> int:
        return sum(self.counts.values())

    @property
    def unchanged(self) -> int:
        return self.evaluated - self.flipped

    def to_dict(self, with_examples: bool = True) -> dict[str, Any]:
        """JSON-ready form (for `POST /v1/policy/dry-run` and `ledgerflow policy diff --json`)."""
        out: dict[str, Any] = {
            "active_version": self.active_version,
            "candidate_version": self.candidate_version,
            "evaluated": self.evaluated,
            "unchanged": self.unchanged,
            "flipped": self.flipped,
            "counts": dict(self.counts),
            "by_policy": {k: dict(v) for k, v in self.by_policy.items()},
        }
        if with_examples:
            out["examples"] = {k: [e.to_dict() for e in v] for k, v in self.examples.items()}
        return out

    def lines(self) -> list[str]:
        """A short human summary, one line per kind with its policies."""
        out = [
            f"{self.active_version} → {self.candidate_version}: {self.evaluated} inputs, "
            f"{self.flipped} flipped, {self.unchanged} unchanged"
        ]
        for kind in FLIP_KINDS:
            policies = ", ".join(f"{p} {n}" for p, n in self.by_policy[kind].items())
            out.append(f"  {kind:<20} {self.counts[kind]:>7}" + (f"  by policy: {policies}" if policies else ""))
        return out


def diff(
    active: PolicyBundle,
    candidate: PolicyBundle,
    inputs: Iterable[DecisionInput],
    entities: EntityStore | EntityView,
    *,
    examples: int = 3,
    fail_closed: bool = True,
) -> DiffReport:
    """Evaluate `candidate` beside `active` over `inputs` with the same attributes; report the flips."""
    view = entities if isinstance(entities, EntityView) else EntityView(entities)
    counts: Counter[str] = Counter()
    by_policy: dict[str, Counter[str]] = {k: Counter() for k in FLIP_KINDS}
    kept: dict[str, list[FlipExample]] = {k: [] for k in FLIP_KINDS}
    # Inputs that make the same Cedar requests over the same entities are decided alike (only
    # their hashes differ), and recorded traffic repeats itself: evaluate each such class once.
    seen: dict[tuple[Any, ...], Divergence | None] = {}
    evaluated = 0
    for inp in inputs:
        evaluated += 1
        requests = cedar_requests(inp)
        key = (view.key(inp), *(r["context"] for r in requests))
        if key in seen:
            div = seen[key]
            if div is None:
                continue
            if len(kept[div.kind]) < examples:
                digest = inp.sha256()
                div = replace(
                    div,
                    active=replace(div.active, input_sha256=digest),
                    candidate=replace(div.candidate, input_sha256=digest),
                )
        else:
            digest = inp.sha256()
            a = evaluate(active, view, inp, input_sha256=digest, fail_closed=fail_closed, requests=requests)
            c = evaluate(candidate, view, inp, input_sha256=digest, fail_closed=fail_closed, requests=requests)
            div = seen[key] = compare(a, c, active, candidate)
            if div is None:
                continue
        counts[div.kind] += 1
        by_policy[div.kind].update(div.policies)
        if len(kept[div.kind]) < examples:
            kept[div.kind].append(FlipExample(inp, div))
    return DiffReport(
        active_version=active.version,
        candidate_version=candidate.version,
        evaluated=evaluated,
        counts=MappingProxyType({k: counts[k] for k in FLIP_KINDS}),
        by_policy=MappingProxyType({k: MappingProxyType(dict(by_policy[k].most_common())) for k in FLIP_KINDS}),
        examples=MappingProxyType({k: tuple(kept[k]) for k in FLIP_KINDS}),
    )


def shadow(
    active: PolicyBundle,
    candidate: PolicyBundle,
    entities: EntityStore | EntityView,
    inp: DecisionInput,
    *,
    fail_closed: bool = True,
) -> Divergence | None:
    """Evaluate one input under both bundles; the divergence, or None when they enforce the same.

    In the gateway prefer `PolicyEngine.decide_with_shadow`, which uses the engine's snapshot
    for both, so an attribute update between the two cannot show up as a divergence.
    """
    view = entities if isinstance(entities, EntityView) else EntityView(entities)
    digest = inp.sha256()
    a = evaluate(active, view, inp, input_sha256=digest, fail_closed=fail_closed)
    c = evaluate(candidate, view, inp, input_sha256=digest, fail_closed=fail_closed)
    return compare(a, c, active, candidate)
