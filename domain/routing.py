"""Router scoring, exploration and priors, pure: the same code decides in the gateway, learns in
the priors agent and is judged by `ledgerflow route-eval`.

How a decision is made (`choose`):
1. candidates are the models the policy obligations allow (residency, tools, cost cap); a
   forbidden model is listed (RouteChosen shows it and why) but gets probability 0, always;
2. each allowed model's quality is predicted from the request's features by its own Bayesian
   linear regression (river's `BayesianLinearRegression`: a posterior mean and variance, so
   the uncertainty needed for exploration comes with the estimate);
3. score = w_q · quality − w_c · cost / dearest cost − w_l · latency / slowest latency, with
   per-tenant weights (cost and latency normalised over the allowed candidates, so a weight
   is "how much quality is the whole price difference worth");
4. the best score is the greedy choice; every other allowed model is explored with the
   probability that Thompson sampling would pick it over the greedy one (pairwise,
   Φ(Δscore / posterior std)), at least `floor`, and all exploration together at most `cap`
   (the guardrail: a tenant never pays more than `cap` of its traffic for learning);
5. one uniform draw derived from the request id picks the model, so the choice is a pure
   function of (request id, priors, features) and replays identically; the probability of
   the chosen model is logged as its propensity, exact, which is what IPS and doubly robust
   offline evaluation need (Thompson sampling's own propensities have no closed form for
   more than two arms; this mixture's do).

Why not river's `LinUCBDisjoint` as is: UCB is deterministic (propensity 1, useless for
off-policy evaluation) and has no notion of cost, forbidden arms or an exploration cap; we
reuse its building block (one `BayesianLinearRegression` per arm) and add those.

Priors are a versioned snapshot (`Priors.to_json`): each model's posterior (feature names,
precision matrix, natural mean) plus per-context counts, mean latency and mean cost. The
JSON is canonical (sorted keys, floats as repr), so equal priors have equal SHA-256.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from river.linear_model import BayesianLinearRegression

from domain.routing_features import FeatureConfig, context_key, features

if TYPE_CHECKING:
    from domain.routing_embedding import SentenceEncoder

ALGORITHM = "blr-capped-thompson-v1"
GLOBAL = "*"  # the priors' context holding each model's regression; other keys hold per-context counts


class NoCandidate(ValueError):
    """Every candidate is forbidden for this call: nothing to route to (the caller decides what then)."""


@dataclass(frozen=True)
class Weights:
    """A tenant's trade-off; only ratios matter (quality 1, cost 0.1: the whole price gap is worth 0.1 quality)."""

    quality: float = 1.0
    cost: float = 0.0
    latency: float = 0.0

    def __post_init__(self) -> None:
        if min(self.quality, self.cost, self.latency) < 0 or not any((self.quality, self.cost, self.latency)):
            raise ValueError("routing weights must be non-negative and not all zero")


@dataclass(frozen=True)
class Exploration:
    """Guardrails: total exploration share at most `cap`, each other allowed model at least `floor`."""

    cap: float = 0.1
    floor: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.floor <= self.cap < 1.0:
            raise ValueError("exploration needs 0 <= floor <= cap < 1")


@dataclass(frozen=True)
class Candidate:
    """One model the router considers; `expected_cost` in money (Decimal), latency in ms."""

    model: str
    expected_cost: Decimal = Decimal(0)
    expected_latency_ms: float = 0.0
    allowed: bool = True
    excluded_by: str | None = None  # why not allowed (a policy id, "region", "cost_cap", "unhealthy")


@dataclass(frozen=True)
class Scored:
    model: str
    score: float
    quality: float  # posterior mean
    quality_std: float  # posterior std of the mean (epistemic)
    probability: float
    allowed: bool
    excluded_by: str | None


@dataclass(frozen=True)
class Choice:
    model: str
    propensity: float
    greedy: str
    context_key: str
    priors_version: str
    candidates: tuple[Scored, ...]  # best score first, forbidden ones after

    @property
    def explored(self) -> bool:
        return self.model != self.greedy

    def route_candidates(self) -> list[dict[str, Any]]:
        """RouteChosen.candidates: every model considered, best score first."""
        return [
            {"model": c.model, "score": c.score, "allowed": c.allowed, "excluded_by": c.excluded_by}
            for c in self.candidates
        ]


# --- per-model posterior ------------------------------------------------------------------


class ArmModel:
    """One model's quality regression: river's BayesianLinearRegression, plus (de)serialisation."""

    def __init__(self, alpha: float = 1.0, beta: float = 4.0) -> None:
        self.alpha = alpha
        self.beta = beta
        self.blr = BayesianLinearRegression(alpha=alpha, beta=beta)
        self.n = 0
        self._cache: tuple[int, list[str], np.ndarray, np.ndarray] | None = None  # see _posterior

    def learn(self, x: Mapping[str, float], quality: float) -> None:
        self.blr.learn_one(dict(x), quality)
        self.n += 1

    def predict(self, x: Mapping[str, float]) -> tuple[float, float]:
        """Posterior mean and the std of that mean (the predictive variance less the noise 1/beta).

        Bishop 3.58/3.59 as river's `predict_one(with_dist=True)` computes them, read from the
        same state, without building a distribution object per call (that object seeds a
        random generator each time: a third of the decision's cost on the request path). The
        request's features are laid out once in the arm's own feature order (absent ones 0),
        so a prediction is two small dot products; a feature the arm has never seen adds its
        prior variance (value² / alpha).
        """
        idx = self.blr._idx
        if not idx:
            return 0.0, math.sqrt(sum(v * v for v in x.values()) / self.alpha)
        names, m, cov = self._posterior()
        xs = np.fromiter((x.get(f, 0.0) for f in names), dtype=np.float64, count=len(names))
        known = float(xs @ xs)
        unknown = max(0.0, sum(v * v for v in x.values()) - known)
        mean = float(m @ xs)
        var = float(xs @ cov @ xs) + unknown / self.alpha
        return mean, math.sqrt(max(var, 0.0))

    def _posterior(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        """(feature names in index order, posterior mean, covariance), rebuilt only after learning."""
        cached = self._cache
        if cached is not None and cached[0] == self.n:
            return cached[1], cached[2], cached[3]
        blr = self.blr
        blr._ensure_m()
        k = len(blr._idx)
        names = [str(f) for f in sorted(blr._idx, key=blr._idx.__getitem__)]
        m = np.array(blr._m_arr[:k], dtype=np.float64)
        cov = np.array(blr._ss_inv_arr[:k, :k], dtype=np.float64)
        self._cache = (self.n, names, m, cov)
        return names, m, cov

    def to_dict(self) -> dict[str, Any]:
        """Feature names, upper triangle of the precision matrix, natural mean: enough to rebuild exactly."""
        blr = self.blr
        names = sorted(blr._idx, key=blr._idx.__getitem__)
        k = len(names)
        prec = blr._ss_arr[:k, :k]
        upper = prec[np.triu_indices(k)]
        return {
            "alpha": self.alpha,
            "beta": self.beta,
            "n": self.n,
            "features": names,
            "precision_upper": [float(v) for v in upper],
            "eta": [float(v) for v in blr._eta_arr[:k]],
        }

    @staticmethod
    def from_dict(raw: Mapping[str, Any]) -> ArmModel:
        arm = ArmModel(float(raw["alpha"]), float(raw["beta"]))
        arm.n = int(raw["n"])
        names: list[str] = list(raw["features"])
        k = len(names)
        if k:
            prec = np.zeros((k, k), dtype=np.float64)
            prec[np.triu_indices(k)] = np.asarray(raw["precision_upper"], dtype=np.float64)
            prec = prec + np.triu(prec, 1).T
            # river's internals (0.26): precision, covariance (its inverse), natural mean, capacity.
            blr = arm.blr
            blr._idx = {f: i for i, f in enumerate(names)}
            blr._cap = k
            blr._ss_arr = prec
            blr._ss_inv_arr = np.asfortranarray(np.linalg.inv(prec))
            blr._eta_arr = np.asarray(raw["eta"], dtype=np.float64)
            blr._m_arr = np.zeros(k, dtype=np.float64)
            blr._m_dirty = True
        return arm


# --- priors -------------------------------------------------------------------------------


@dataclass
class ContextStats:
    """Per (context, model) outcome counts: quality observations and their sum."""

    n: int = 0
    quality_sum: float = 0.0


@dataclass
class ModelStats:
    """Per-model running means the score needs besides quality: latency and answer length."""

    latency_n: int = 0
    latency_ms_sum: float = 0.0
    completion_n: int = 0
    completion_tokens_sum: int = 0
    cost_n: int = 0
    cost_sum: Decimal = Decimal(0)

    def latency_ms(self, default: float) -> float:
        return self.latency_ms_sum / self.latency_n if self.latency_n else default

    def completion_tokens(self, default: int) -> int:
        return round(self.completion_tokens_sum / self.completion_n) if self.completion_n else default


@dataclass
class Priors:
    """What the router knows: per-model quality posteriors and per-context/model statistics."""

    version: str = "none"
    config: FeatureConfig = field(default_factory=FeatureConfig)
    alpha: float = 1.0
    beta: float = 4.0
    arms: dict[str, ArmModel] = field(default_factory=dict)
    contexts: dict[str, dict[str, ContextStats]] = field(default_factory=dict)
    models: dict[str, ModelStats] = field(default_factory=dict)
    feedback_count: int = 0

    def arm(self, model: str) -> ArmModel:
        found = self.arms.get(model)
        if found is None:
            found = self.arms[model] = ArmModel(self.alpha, self.beta)
        return found

    def stats(self, model: str) -> ModelStats:
        found = self.models.get(model)
        if found is None:
            found = self.models[model] = ModelStats()
        return found

    def features(self, text: str, encoder: SentenceEncoder | None = None) -> dict[str, float]:
        """The request's features as these priors were learned on (`encoder`: when they name an embedding)."""
        return features(text, self.config, encoder)

    def predict(self, model: str, x: Mapping[str, float]) -> tuple[float, float]:
        """Posterior quality of `model` on `x`; a model never seen gets the prior (mean 0, wide)."""
        arm = self.arms.get(model)
        if arm is None:
            return 0.0, math.sqrt(sum(v * v for v in x.values()) / self.alpha)
        return arm.predict(x)

    def learn_quality(self, model: str, x: Mapping[str, float], quality: float, key: str | None = None) -> None:
        """Fold one observed quality (0..1) of `model` on a request with features `x`."""
        if not 0.0 <= quality <= 1.0 or math.isnan(quality):
            raise ValueError(f"quality must be in [0, 1], got {quality}")
        self.arm(model).learn(x, quality)
        ctx = self.contexts.setdefault(key or context_key(dict(x)), {}).setdefault(model, ContextStats())
        ctx.n += 1
        ctx.quality_sum += quality
        self.feedback_count += 1

    def learn_latency(self, model: str, latency_ms: float) -> None:
        s = self.stats(model)
        s.latency_n += 1
        s.latency_ms_sum += float(latency_ms)

    def learn_completion(self, model: str, completion_tokens: int) -> None:
        s = self.stats(model)
        s.completion_n += 1
        s.completion_tokens_sum += completion_tokens

    def learn_cost(self, model: str, cost: Decimal) -> None:
        s = self.stats(model)
        s.cost_n += 1
        s.cost_sum += cost

    # -- snapshot --

    def to_json(self) -> str:
        """Canonical JSON of everything but the version ({context: {model: {param: value}}})."""
        body: dict[str, Any] = {
            GLOBAL: {m: self.arms[m].to_dict() for m in sorted(self.arms)},
            **{
                k: {m: {"n": s.n, "quality_sum": s.quality_sum} for m, s in sorted(v.items())}
                for k, v in sorted(self.contexts.items())
            },
        }
        meta = {
            "algorithm": ALGORITHM,
            "features": self.config.as_dict(),
            "alpha": self.alpha,
            "beta": self.beta,
            "feedback_count": self.feedback_count,
            "models": {
                m: {
                    "latency_n": s.latency_n,
                    "latency_ms_sum": s.latency_ms_sum,
                    "completion_n": s.completion_n,
                    "completion_tokens_sum": s.completion_tokens_sum,
                    "cost_n": s.cost_n,
                    "cost_sum": str(s.cost_sum),
                }
                for m, s in sorted(self.models.items())
            },
        }
        return orjson.dumps({"contexts": body, "meta": meta}, option=orjson.OPT_SORT_KEYS).decode()

    @staticmethod
    def from_json(text: str, version: str = "none") -> Priors:
        raw = orjson.loads(text)
        meta = raw["meta"]
        if meta.get("algorithm") != ALGORITHM:
            raise ValueError(f"priors of algorithm {meta.get('algorithm')!r}; this router runs {ALGORITHM!r}")
        contexts = dict(raw["contexts"])
        arms = {m: ArmModel.from_dict(d) for m, d in contexts.pop(GLOBAL, {}).items()}
        return Priors(
            version=version,
            config=FeatureConfig.from_dict(meta["features"]),
            alpha=float(meta["alpha"]),
            beta=float(meta["beta"]),
            arms=arms,
            contexts={
                k: {m: ContextStats(int(s["n"]), float(s["quality_sum"])) for m, s in v.items()}
                for k, v in contexts.items()
            },
            models={
                m: ModelStats(
                    int(s["latency_n"]),
                    float(s["latency_ms_sum"]),
                    int(s["completion_n"]),
                    int(s["completion_tokens_sum"]),
                    int(s["cost_n"]),
                    Decimal(s["cost_sum"]),
                )
                for m, s in meta["models"].items()
            },
            feedback_count=int(meta["feedback_count"]),
        )

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode()).hexdigest()


# --- the decision -------------------------------------------------------------------------


def unit_draw(seed: str) -> float:
    """A uniform number in [0, 1) derived from `seed` (the request id): replay draws the same."""
    digest = hashlib.sha256(seed.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _phi(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2.0))


def choose(
    priors: Priors,
    x: Mapping[str, float],
    candidates: Sequence[Candidate],
    weights: Weights,
    exploration: Exploration,
    seed: str,
    key: str | None = None,
) -> Choice:
    """Pick one allowed candidate and its exact probability (see the module docstring)."""
    allowed = [c for c in candidates if c.allowed]
    if not allowed:
        raise NoCandidate("no allowed candidate to route to")
    max_cost = max((c.expected_cost for c in allowed), default=Decimal(0))
    max_lat = max((c.expected_latency_ms for c in allowed), default=0.0)
    rows: list[tuple[Candidate, float, float, float]] = []  # candidate, score, mean, std
    for c in candidates:
        mean, std = priors.predict(c.model, x)
        score = weights.quality * mean
        if max_cost > 0:
            score -= weights.cost * float(c.expected_cost / max_cost)
        if max_lat > 0:
            score -= weights.latency * (c.expected_latency_ms / max_lat)
        rows.append((c, score, mean, std))
    live = [r for r in rows if r[0].allowed]
    greedy = max(live, key=lambda r: (r[1], r[0].model))  # ties: the name, so replay is deterministic
    probs: dict[str, float] = {}
    for c, score, _, std in live:
        if c is greedy[0]:
            continue
        spread = weights.quality * math.sqrt(std * std + greedy[3] * greedy[3])
        p = _phi((score - greedy[1]) / spread) if spread > 0 else 0.0
        probs[c.model] = max(p, exploration.floor)
    total = sum(probs.values())
    if total > exploration.cap:
        probs = {m: p * exploration.cap / total for m, p in probs.items()}
    probs[greedy[0].model] = 1.0 - sum(probs.values())
    chosen = _draw(live, probs, unit_draw(seed))
    ordered = sorted(rows, key=lambda r: (not r[0].allowed, -r[1], r[0].model))
    scored = tuple(
        Scored(c.model, score, mean, std, probs.get(c.model, 0.0), c.allowed, c.excluded_by)
        for c, score, mean, std in ordered
    )
    return Choice(
        model=chosen,
        propensity=probs[chosen],
        greedy=greedy[0].model,
        context_key=key if key is not None else context_key(dict(x)),
        priors_version=priors.version,
        candidates=scored,
    )


def _draw(live: Sequence[tuple[Candidate, float, float, float]], probs: Mapping[str, float], u: float) -> str:
    """Inverse-CDF draw over the allowed models in name order (any fixed order would do)."""
    acc = 0.0
    names = sorted(r[0].model for r in live)
    for m in names:
        acc += probs.get(m, 0.0)
        if u < acc:
            return m
    return max(names, key=lambda m: probs.get(m, 0.0))  # float rounding at the top end


def expected_tokens(chars: int) -> int:
    """Token estimate of a text, ~4 characters a token (the gateway's own estimate is the same order)."""
    return max(1, (chars + 3) // 4)
