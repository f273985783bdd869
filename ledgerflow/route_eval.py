"""`ledgerflow route-eval`: the router judged on recorded outcomes (replay evaluation).

The file (format: shared/routing/README.md) holds prompts with the recorded outcome of every
model on each. The router is the gateway's own code (`domain.routing.choose`), learning
online in file order from the outcome of the model it chose only (bandit feedback, as in
production), optionally after a training phase on another part of the file (`--split-by
source`: train on every other source, evaluate on the rest) or on priors from a file.

It reports, side by side with always-strongest (the dearest model), always-cheapest and
random mixing: quality as a share of the best single model's, each model's share of calls,
cost versus always-strongest, cumulative regret versus the per-prompt oracle, the
cost-quality curve over a sweep of the cost weight, and the strongest model's share needed
to reach 95% of its quality. Nothing about the models, sources or order of a file is
assumed; prices come from the catalogue (`--price`, `--prices`, `--map` onto the registry's
prices), so a model without a price is an error, not a guess.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domain.pricing import DEFAULT_PRICES, Price, cost
from domain.routing import Candidate, Choice, Exploration, Priors, Weights, choose, expected_tokens
from domain.routing_features import FeatureConfig, context_key
from ledgerflow.settings import Settings

if TYPE_CHECKING:
    from domain.routing_embedding import SentenceEncoder

DEFAULT_SWEEP = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
TARGET = Decimal("0.95")


@dataclass(frozen=True)
class Row:
    id: str
    source: str
    prompt: str
    quality: dict[str, float]  # model -> recorded quality in [0, 1]
    completion_chars: dict[str, int]  # model -> answer length, when recorded


def load_rows(path: Path) -> list[Row]:
    """Rows of a routing file; every row must have the same set of models (the comparison needs all)."""
    rows: list[Row] = []
    models: set[str] | None = None
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            raw = json.loads(line)
            outcomes = raw["outcomes"]
            if models is None:
                models = set(outcomes)
            elif set(outcomes) != models:
                raise ValueError(f"{path}:{n}: outcomes for {sorted(outcomes)}, earlier rows have {sorted(models)}")
            rows.append(
                Row(
                    id=str(raw.get("id", n)),
                    source=str(raw.get("source", "")),
                    prompt=str(raw["prompt"]),
                    quality={m: float(o["quality"]) for m, o in outcomes.items()},
                    completion_chars={
                        m: int(o["completion_chars"]) for m, o in outcomes.items() if "completion_chars" in o
                    },
                )
            )
    if not rows or not models or len(models) < 2:
        raise ValueError(f"{path}: needs rows with outcomes of at least two models")
    return rows


# --- prices -------------------------------------------------------------------------------


def catalogue(settings: Settings | None) -> dict[str, Price]:
    """The registry's prices: the built-in simulated models and every configured upstream model."""
    prices = dict(DEFAULT_PRICES)
    for up in settings.upstreams if settings is not None else []:
        for m in up.models:
            prices[m.name] = Price(m.name, m.input_per_mtok, m.output_per_mtok, "USD", m.price_version)
    return prices


def resolve_prices(
    models: Iterable[str],
    known: dict[str, Price],
    explicit: Sequence[str] = (),
    table: Path | None = None,
    mapping: Sequence[str] = (),
) -> dict[str, Price]:
    """A price per file model: `--price M=IN/OUT`, `--prices FILE`, `--map M=CATALOGUE_MODEL`, else M's own."""
    prices: dict[str, Price] = {}
    if table is not None:
        for m, p in json.loads(table.read_text()).items():
            prices[m] = Price(m, Decimal(str(p["input_per_mtok"])), Decimal(str(p["output_per_mtok"])), "USD", "file")
    for spec in explicit:
        m, _, io = spec.rpartition("=")
        i, _, o = io.partition("/")
        if not m or not o:
            raise ValueError(f"--price {spec!r}: expected MODEL=INPUT/OUTPUT per million tokens")
        prices[m] = Price(m, Decimal(i), Decimal(o), "USD", "cli")
    aliases = dict(s.rsplit("=", 1) for s in mapping)
    out: dict[str, Price] = {}
    missing = []
    for m in sorted(models):
        if m in prices:
            out[m] = prices[m]
        elif aliases.get(m, m) in known:
            p = known[aliases.get(m, m)]
            out[m] = Price(m, p.input_per_mtok, p.output_per_mtok, p.currency, p.version)
        else:
            missing.append(m)
    if missing:
        raise ValueError(
            f"no price for {', '.join(missing)}: pass --price MODEL=IN/OUT (per million tokens), --prices FILE.json "
            f"or --map MODEL=CATALOGUE_MODEL (catalogue: {', '.join(sorted(known))})"
        )
    return out


# --- one run ------------------------------------------------------------------------------


@dataclass
class RunResult:
    name: str
    calls: Counter[str] = field(default_factory=Counter)
    quality: float = 0.0
    cost: Decimal = Decimal(0)
    regret: float = 0.0  # sum over prompts of oracle quality - achieved quality
    explored: int = 0
    log: list[tuple[str, float, float, dict[str, float]]] = field(
        default_factory=list
    )  # chosen, propensity, reward, predicted

    def n(self) -> int:
        return sum(self.calls.values())


@dataclass(frozen=True)
class Setup:
    rows: Sequence[Row]
    prices: dict[str, Price]
    default_completion_tokens: int
    encoder: SentenceEncoder | None = None  # when the priors' features include an embedding
    _features: dict[int, dict[str, float]] = field(default_factory=dict)

    def features(self, row: Row, priors: Priors) -> dict[str, float]:
        """Features of a row's prompt, computed once per evaluation (they depend on the text and config only)."""
        x = self._features.get(id(row))
        if x is None:
            x = self._features[id(row)] = priors.features(row.prompt, self.encoder)
        return x

    @property
    def models(self) -> list[str]:
        return sorted(self.rows[0].quality)

    def prompt_tokens(self, row: Row) -> int:
        return expected_tokens(len(row.prompt))

    def actual_cost(self, row: Row, model: str) -> Decimal:
        chars = row.completion_chars.get(model)
        out = expected_tokens(chars) if chars is not None else self.default_completion_tokens
        return cost(self.prompt_tokens(row), out, self.prices[model])

    def expected_cost(self, row: Row, model: str, priors: Priors) -> Decimal:
        """What the router may know before the call: the prompt, and the model's usual answer length."""
        out = priors.stats(model).completion_tokens(self.default_completion_tokens) if model in priors.models else None
        return cost(self.prompt_tokens(row), out or self.default_completion_tokens, self.prices[model])


def train(setup: Setup, rows: Sequence[Row], priors: Priors, feedback: str, weights: Weights, ex: Exploration) -> None:
    """Fold training rows into `priors`: every model's outcome (`full`) or only the chosen one's (`bandit`)."""
    for row in rows:
        x = setup.features(row, priors)
        seen = setup.models if feedback == "full" else [route_one(setup, row, priors, x, weights, ex).model]
        for m in seen:
            priors.learn_quality(m, x, row.quality[m])
            _learn_length(priors, row, m)


def _learn_length(priors: Priors, row: Row, model: str) -> None:
    """The answer length of `model`, when the file records it (expected cost uses the mean)."""
    chars = row.completion_chars.get(model)
    if chars is not None:
        priors.learn_completion(model, expected_tokens(chars))


def route_one(setup: Setup, row: Row, priors: Priors, x: dict[str, float], weights: Weights, ex: Exploration) -> Choice:
    cands = [Candidate(m, setup.expected_cost(row, m, priors)) for m in setup.models]
    return choose(priors, x, cands, weights, ex, seed=row.id, key=context_key(x))


def run_router(
    setup: Setup, rows: Sequence[Row], priors: Priors, weights: Weights, ex: Exploration, name: str
) -> RunResult:
    """Online in file order: choose, observe the chosen model's outcome only, learn it."""
    res = RunResult(name)
    for row in rows:
        x = setup.features(row, priors)
        c = route_one(setup, row, priors, x, weights, ex)
        q = row.quality[c.model]
        _account(setup, res, row, c.model)
        res.explored += c.explored
        res.log.append((c.model, c.propensity, q, {s.model: s.quality for s in c.candidates}))
        priors.learn_quality(c.model, x, q)
        _learn_length(priors, row, c.model)
    return res


def run_fixed(setup: Setup, rows: Sequence[Row], pick: Any, name: str) -> RunResult:
    res = RunResult(name)
    for row in rows:
        _account(setup, res, row, pick(row))
    return res


def _account(setup: Setup, res: RunResult, row: Row, model: str) -> None:
    res.calls[model] += 1
    res.quality += row.quality[model]
    res.cost += setup.actual_cost(row, model)
    res.regret += max(row.quality.values()) - row.quality[model]


def off_policy(res: RunResult, target: str) -> tuple[float, float]:
    """IPS and doubly robust estimates, from the router's log, of the mean quality of always-`target`.

    Shows the logged propensities are usable: compare with the real always-`target` figure.
    """
    n = len(res.log) or 1
    ips = sum(r / p for m, p, r, _ in res.log if m == target) / n
    dr = sum(pred[target] + ((r - pred[target]) / p if m == target else 0.0) for m, p, r, pred in res.log) / n
    return ips, dr


# --- the report ---------------------------------------------------------------------------


def split(rows: Sequence[Row], by: str, fraction: float) -> tuple[list[Row], list[Row]]:
    """(train, eval). By source: an evenly spread `fraction` of the sorted sources trains; by row: the first rows."""
    if fraction <= 0:
        return [], list(rows)
    if by == "source":
        sources = sorted({r.source for r in rows})
        chosen = {s for i, s in enumerate(sources) if int((i + 1) * fraction) > int(i * fraction)}
        return [r for r in rows if r.source in chosen], [r for r in rows if r.source not in chosen]
    cut = int(len(rows) * fraction)
    return list(rows[:cut]), list(rows[cut:])


def mixing_share(strong: float, weak: float, target: float) -> float | None:
    """Share of calls to the strong model random mixing needs to reach `target` mean quality."""
    if strong <= weak:
        return None
    return min(1.0, max(0.0, (target - weak) / (strong - weak)))


def needed_share(curve: Sequence[tuple[float, float, float]], target: float) -> float | None:
    """Smallest strong share reaching `target` on the (weight, strong share, quality) curve, interpolated."""
    pts = sorted({(s, q) for _, s, q in curve})
    best: float | None = None
    for s, q in pts:
        if q >= target and (best is None or s < best):
            best = s
    for (s0, q0), (s1, q1) in itertools.pairwise(pts):
        if q0 < target <= q1 and q1 > q0:
            s = s0 + (target - q0) * (s1 - s0) / (q1 - q0)
            best = s if best is None else min(best, s)
    return best


def source_oracle_share(rows: Sequence[Row], strong: str, weak: str, target: float) -> float | None:
    """The strong share a router that knew each source's true quality gap would need (whole sources,
    the last one in part): a bound on what routing by topic alone can reach on this file."""
    n = len(rows)
    gaps: dict[str, list[float]] = {}
    for r in rows:
        g = gaps.setdefault(r.source, [0, 0.0])
        g[0] += 1
        g[1] += r.quality[strong] - r.quality[weak]
    q = sum(r.quality[weak] for r in rows) / n
    share = 0.0
    for size, gain in sorted(gaps.values(), key=lambda g: -g[1] / g[0]):
        if q >= target:
            return share
        need, add = target - q, gain / n
        if add >= need > 0:
            return share + (size / n) * need / add
        q, share = q + add, share + size / n
    return share if q >= target else None


def evaluate(
    rows: Sequence[Row],
    prices: dict[str, Price],
    *,
    split_by: str = "none",
    train_fraction: float = 0.0,
    train_feedback: str = "bandit",
    priors_from: Path | None = None,
    cost_weight: float = 0.05,
    latency_weight: float = 0.0,
    sweep: Sequence[float] = DEFAULT_SWEEP,
    exploration: Exploration | None = None,
    config: FeatureConfig | None = None,
    completion_tokens: int = 16,
    seed: int = 0,
    save_priors: Path | None = None,
    encoder: SentenceEncoder | None = None,
) -> dict[str, Any]:
    """Everything the report prints, as data (the CLI formats it; tests assert on it)."""
    ex = exploration or Exploration()
    setup = Setup(rows, prices, completion_tokens, encoder)
    train_rows, eval_rows = split(rows, split_by, train_fraction)
    if not eval_rows:
        raise ValueError("nothing left to evaluate: lower --train-fraction")
    models = setup.models
    strongest = max(models, key=lambda m: (prices[m].output_per_mtok, prices[m].input_per_mtok, m))
    cheapest = min(models, key=lambda m: (prices[m].output_per_mtok, prices[m].input_per_mtok, m))

    base = Priors.from_json(priors_from.read_text()) if priors_from else Priors(config=config or FeatureConfig())
    base.version = "trained"
    train(setup, train_rows, base, train_feedback, Weights(1.0, cost_weight, latency_weight), ex)
    snapshot = base.to_json()
    if save_priors is not None:
        save_priors.write_text(snapshot)

    def fresh() -> Priors:
        return Priors.from_json(snapshot, "trained")

    n = len(eval_rows)
    singles = {m: run_fixed(setup, eval_rows, lambda _r, m=m: m, f"always {m}") for m in models}
    best_single = max(models, key=lambda m: (singles[m].quality, m))
    best_q = singles[best_single].quality / n
    strong_q = singles[strongest].quality / n
    weak_q = singles[cheapest].quality / n
    oracle_q = sum(max(r.quality.values()) for r in eval_rows) / n

    router = run_router(setup, eval_rows, fresh(), Weights(1.0, cost_weight, latency_weight), ex, "router")
    share = router.calls[strongest] / n
    mix = run_fixed(
        setup,
        eval_rows,
        lambda r: strongest if (zlib.crc32(f"{seed}:{r.id}".encode()) / 2**32) < share else cheapest,
        f"random mixing at the router's {strongest} share",
    )
    curve = []
    for w in sweep:
        res = run_router(setup, eval_rows, fresh(), Weights(1.0, w, latency_weight), ex, f"w={w}")
        curve.append((w, res.calls[strongest] / n, res.quality / n, res.cost, res.regret))
    target = float(TARGET) * strong_q
    ips, dr = off_policy(router, strongest)

    def row(res: RunResult) -> dict[str, Any]:
        return {
            "policy": res.name,
            "quality": res.quality / n,
            "quality_share_of_best": (res.quality / n) / best_q if best_q else None,
            "calls": {m: res.calls[m] / n for m in models},
            "cost": str(res.cost),
            "cost_vs_strongest": float(res.cost / singles[strongest].cost) if singles[strongest].cost else None,
            "regret": res.regret,
            "explored": res.explored / n,
        }

    return {
        "rows": {"train": len(train_rows), "eval": n},
        "sources": {"train": len({r.source for r in train_rows}), "eval": len({r.source for r in eval_rows})},
        "models": models,
        "strongest": strongest,
        "cheapest": cheapest,
        "best_single": best_single,
        "oracle_quality": oracle_q,
        "cost_weight": cost_weight,
        "policies": [row(router), row(singles[strongest]), row(singles[cheapest]), row(mix)]
        + [row(singles[m]) for m in models if m not in (strongest, cheapest)],
        "curve": [
            {
                "cost_weight": w,
                "strong_share": s,
                "quality": q,
                "quality_share": q / strong_q,
                "cost": str(c),
                "regret": g,
            }
            for w, s, q, c, g in curve
        ],
        "target_quality": target,
        "router_share_for_95": needed_share([(w, s, q) for w, s, q, _, _ in curve], target),
        "mixing_share_for_95": mixing_share(strong_q, weak_q, target),
        "source_oracle_share_for_95": source_oracle_share(eval_rows, strongest, cheapest, target),
        "off_policy": {"target": strongest, "ips": ips, "dr": dr, "actual": strong_q},
    }


def format_report(r: dict[str, Any]) -> str:
    out = [
        f"rows: {r['rows']['train']} train ({r['sources']['train']} sources), "
        f"{r['rows']['eval']} evaluated ({r['sources']['eval']} sources); models: {', '.join(r['models'])}",
        f"strongest (dearest): {r['strongest']}; cheapest: {r['cheapest']}; best single: {r['best_single']}; "
        f"per-prompt oracle quality {r['oracle_quality']:.4f}",
        "",
        f"{'policy':<58} {'quality':>8} {'of best':>8} {'cost vs strongest':>18} {'regret':>8}  calls",
    ]
    for p in r["policies"]:
        calls = ", ".join(f"{m} {s:.1%}" for m, s in p["calls"].items())
        out.append(
            f"{p['policy'][:58]:<58} {p['quality']:>8.4f} {p['quality_share_of_best']:>8.1%} "
            f"{p['cost_vs_strongest']:>18.3f} {p['regret']:>8.0f}  {calls}"
        )
    out += ["", f"cost-quality curve (cost weight sweep; quality as a share of {r['strongest']}'s):"]
    out.append(f"{'cost weight':>12} {'strong share':>13} {'quality':>8} {'share':>7} {'regret':>8}")
    for c in r["curve"]:
        out.append(
            f"{c['cost_weight']:>12g} {c['strong_share']:>13.1%} {c['quality']:>8.4f} "
            f"{c['quality_share']:>7.1%} {c['regret']:>8.0f}"
        )
    rs, ms = r["router_share_for_95"], r["mixing_share_for_95"]
    out += [
        "",
        f"{r['strongest']} share needed for 95% of its quality ({r['target_quality']:.4f}): "
        f"router {'not reached' if rs is None else f'{rs:.1%}'}, random mixing {'n/a' if ms is None else f'{ms:.1%}'}",
        f"  (bound for routing by source alone, knowing each source's true gap: "
        f"{'n/a' if r['source_oracle_share_for_95'] is None else format(r['source_oracle_share_for_95'], '.1%')})",
        f"off-policy check from the router's log (always {r['off_policy']['target']}): "
        f"IPS {r['off_policy']['ips']:.4f}, DR {r['off_policy']['dr']:.4f}, actual {r['off_policy']['actual']:.4f}",
    ]
    return "\n".join(out)


def add_parser(sub: Any) -> None:
    p = sub.add_parser("route-eval", help="replay the router over a file of prompts with recorded model outcomes")
    p.add_argument("--data", required=True, type=Path, metavar="FILE.jsonl")
    p.add_argument("--priors-from", type=Path, metavar="FILE", help="start from these priors (Priors JSON)")
    p.add_argument("--save-priors", type=Path, metavar="FILE", help="write the trained priors here")
    p.add_argument("--split-by", choices=("none", "row", "source"), default="none")
    p.add_argument("--train-fraction", type=float, default=None, help="share trained on (default 0.5 with --split-by)")
    p.add_argument("--train-feedback", choices=("bandit", "full"), default="bandit")
    p.add_argument("--cost-weight", type=float, default=0.05)
    p.add_argument("--latency-weight", type=float, default=0.0)
    p.add_argument("--explore-cap", type=float, default=0.1)
    p.add_argument("--buckets", type=int, default=FeatureConfig().buckets, help="hashed n-gram buckets")
    p.add_argument(
        "--embedding-model",
        type=Path,
        metavar="DIR|WHEEL",
        help="add a sentence embedding to the features (a BERT model directory or wheel; ~0.1 CPU-s a prompt)",
    )
    p.add_argument("--embedding-dims", type=int, default=16, help="projected embedding dimensions kept")
    p.add_argument("--price", action="append", default=[], metavar="MODEL=IN/OUT", help="per million tokens")
    p.add_argument("--prices", type=Path, metavar="FILE.json", help='{"model": {"input_per_mtok": .., ...}}')
    p.add_argument("--map", action="append", default=[], metavar="MODEL=CATALOGUE_MODEL")
    p.add_argument("--completion-tokens", type=int, default=16, help="answer length when the file has none")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def cmd(settings: Settings | None, args: argparse.Namespace) -> int:
    rows = load_rows(args.data)
    prices = resolve_prices(rows[0].quality, catalogue(settings), args.price, args.prices, args.map)
    fraction = args.train_fraction if args.train_fraction is not None else (0.5 if args.split_by != "none" else 0.0)
    encoder = None
    config = FeatureConfig(buckets=args.buckets)
    if args.embedding_model is not None:
        from domain.routing_embedding import load_encoder

        encoder = load_encoder(args.embedding_model)
        config = FeatureConfig(buckets=args.buckets, embedding=encoder.model_id, embedding_dims=args.embedding_dims)
    report = evaluate(
        rows,
        prices,
        split_by=args.split_by,
        train_fraction=fraction,
        train_feedback=args.train_feedback,
        priors_from=args.priors_from,
        cost_weight=args.cost_weight,
        latency_weight=args.latency_weight,
        exploration=Exploration(cap=args.explore_cap),
        config=config,
        completion_tokens=args.completion_tokens,
        save_priors=args.save_priors,
        encoder=encoder,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report), file=sys.stdout)
    return 0
