"""Why the router is no better than random mixing on held-out MMLU subjects: what signal prompt
features carry from one half of the subjects to the other (issue 9, BENCHMARKS.md).

Run: OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/routing_study.py [--data FILE.jsonl]
     [--embeddings FILE.npy]

Not the router: a study of the ceiling. For a file with two models (the dearest is "strong",
the cheapest "weak"), with the same split as `route-eval --split-by source` (every other
sorted source trains, the rest is evaluated), it scores every held-out prompt with a model
trained on the training half's outcomes of BOTH models (full labels, frozen: the most a
learner could get from that half) and sends the highest-scored share to the strong model.
It prints the strong share needed to reach 95% of the strong model's quality, computed
exactly by sorting (a threshold sweep over every prompt), for:
- per-prompt oracle (knows the outcomes) and random mixing (analytic), the two ends;
- prompt length alone (longer → strong), the one-feature baseline;
- L2 logistic regressions on the router's dense features (`domain.routing_features` with no
  buckets) and on hashed word n-grams (2^k signed buckets, uni/bigrams, or character
  4-grams): scored by 1 − P(weak right), by P(strong right) − P(weak right), and by
  P(strong right and weak wrong);
- with `--embeddings`, the same regressions on a sentence embedding per prompt (one row per
  line of the data file, e.g. from bench/routing_embed.py).
Every variant run is printed; none is chosen on the evaluation half. Nothing assumes the dev
file's models or subjects beyond "two models, a dearest and a cheapest, with prices".
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from domain.routing_features import FeatureConfig, features
from ledgerflow.route_eval import Row, load_rows, split

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "routing" / "dev-mmlu.jsonl"
_WORD = re.compile(r"[^\W\d_]+|\d+")


def hashed(text: str, bits: int, ngrams: Sequence[int] = (1, 2), chars: bool = False) -> dict[int, float]:
    words = _WORD.findall(text.lower()[:4000])
    toks = [" ".join(words[i : i + n]) for n in ngrams for i in range(len(words) - n + 1)]
    if chars:
        t = text.lower()[:2000]
        toks += [t[i : i + 4] for i in range(len(t) - 3)]
    out: dict[int, float] = {}
    for tok in toks:
        h = zlib.crc32(tok.encode())
        out[h % (1 << bits)] = out.get(h % (1 << bits), 0.0) + (1.0 if h & 0x80000000 else -1.0)
    norm = math.sqrt(sum(v * v for v in out.values())) or 1.0
    return {k: v / norm for k, v in out.items()}


def matrix(rows: Sequence[Row], bits: int, **kw: Any) -> sp.csr_matrix:
    """Dense router features (13 columns), then 2^bits hashed columns (none when bits is 0)."""
    data: list[float] = []
    ri: list[int] = []
    ci: list[int] = []
    dense = 0
    for i, r in enumerate(rows):
        x = features(r.prompt, FeatureConfig(buckets=0))
        dense = len(x)
        for j, (_, v) in enumerate(sorted(x.items())):
            ri.append(i)
            ci.append(j)
            data.append(v)
        if bits:
            for j, v in hashed(r.prompt, bits, **kw).items():
                ri.append(i)
                ci.append(dense + j)
                data.append(v)
    return sp.csr_matrix((data, (ri, ci)), shape=(len(rows), dense + ((1 << bits) if bits else 0)))


def fit_lr(x: Any, y: np.ndarray, l2: float, iters: int = 300, lr: float = 0.5) -> Callable[[Any], np.ndarray]:
    """L2 logistic regression, full-batch gradient descent with Nesterov momentum; returns a scorer."""
    n, d = x.shape
    w, b, vw, vb = np.zeros(d), 0.0, np.zeros(d), 0.0
    for _ in range(iters):
        la_w, la_b = w + 0.9 * vw, b + 0.9 * vb
        p = 1 / (1 + np.exp(-(x @ la_w + la_b)))
        vw = 0.9 * vw - lr * (x.T @ (p - y) / n + l2 * la_w / n)
        vb = 0.9 * vb - lr * float(np.mean(p - y))
        w, b = w + vw, b + vb
    return lambda z: 1 / (1 + np.exp(-(z @ w + b)))


def auc(score: np.ndarray, y: np.ndarray) -> float:
    r = np.argsort(np.argsort(score)) + 1
    n1 = int((y == 1).sum())
    n0 = len(y) - n1
    return float((r[y == 1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)) if n1 and n0 else float("nan")


def share_for_95(score: np.ndarray, q_s: np.ndarray, q_w: np.ndarray) -> float | None:
    """Send the highest-scored prompts to the strong model: the smallest share reaching 95% of its quality."""
    order = np.argsort(-score, kind="stable")
    reached = (q_w.sum() + np.concatenate([[0.0], np.cumsum((q_s - q_w)[order])])) / len(score)
    hit = np.nonzero(reached >= 0.95 * q_s.mean())[0]
    return float(hit[0] / len(score)) if len(hit) else None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--strong", help="the strong model (default: the best on average)")
    ap.add_argument("--embeddings", type=Path, help=".npy with one embedding per line of the data file")
    args = ap.parse_args()
    rows = load_rows(args.data)
    models = sorted(rows[0].quality)
    if len(models) != 2:
        raise SystemExit("this study compares two models")
    mean = {m: sum(r.quality[m] for r in rows) / len(rows) for m in models}
    strong = args.strong or max(models, key=lambda m: mean[m])
    weak = next(m for m in models if m != strong)
    index = {id(r): i for i, r in enumerate(rows)}
    train, ev = split(rows, "source", 0.5)
    emb = np.load(args.embeddings) if args.embeddings else None
    if emb is not None:  # rows without a vector (NaN: a subsample was embedded) leave every row of the table
        train = [r for r in train if np.isfinite(emb[index[id(r)]]).all()]
        ev = [r for r in ev if np.isfinite(emb[index[id(r)]]).all()]
    q_s = np.array([r.quality[strong] for r in ev])
    q_w = np.array([r.quality[weak] for r in ev])
    y_s = np.array([r.quality[strong] for r in train])
    y_w = np.array([r.quality[weak] for r in train])
    y_gain = ((y_s == 1) & (y_w == 0)).astype(float)
    n_tr, n_ev = len({r.source for r in train}), len({r.source for r in ev})
    print(f"strong {strong}, weak {weak}; train {len(train)} prompts ({n_tr} sources), evaluated {len(ev)} "
          f"({n_ev} sources): strong {q_s.mean():.4f}, weak {q_w.mean():.4f}")  # fmt: skip
    mix = (0.95 * q_s.mean() - q_w.mean()) / (q_s.mean() - q_w.mean())
    print()
    print("| scorer (trained on the training half, frozen) | held-out AUC of P(weak right) | strong share for 95%: "
          "1 − P(weak) | P(strong) − P(weak) | P(strong right, weak wrong) |")  # fmt: skip
    print("|---|---:|---:|---:|---:|")
    print(f"| random mixing (analytic) | | {mix:.1%} | | |")
    oracle = share_for_95(q_s - q_w + 1e-9 * np.arange(len(ev)), q_s, q_w)
    print(f"| per-prompt oracle (knows the outcomes) | | {oracle:.1%} | | |")
    lens = np.array([len(r.prompt) for r in ev], float)
    print(f"| prompt length alone, longer → strong | {auc(-lens, q_w):.3f} | {share_for_95(lens, q_s, q_w):.1%} | | |")
    variants: list[tuple[str, int, dict[str, Any], float]] = [
        ("router's dense features (13)", 0, {}, 1.0),
        ("dense + hashed uni+bigrams, 2^10", 10, {}, 1.0),
        ("dense + hashed uni+bigrams, 2^14", 14, {}, 1.0),
        ("dense + hashed uni+bigrams, 2^14, l2 10", 14, {}, 10.0),
        ("dense + hashed unigrams, 2^16, l2 3", 16, {"ngrams": (1,)}, 3.0),
        ("dense + hashed uni+bigrams + char 4-grams, 2^16, l2 3", 16, {"chars": True}, 3.0),
    ]
    sets: list[tuple[str, Any, Any, float]] = []
    for name, bits, kw, l2 in variants:
        sets.append((name, matrix(train, bits, **kw), matrix(ev, bits, **kw), l2))
    if emb is not None:
        tr = np.stack([emb[index[id(r)]] for r in train])
        te = np.stack([emb[index[id(r)]] for r in ev])
        sets.append((f"sentence embedding ({emb.shape[1]} dims)", tr, te, 1.0))
        dense_tr, dense_te = matrix(train, 0).toarray(), matrix(ev, 0).toarray()
        sets.append(("embedding + dense features", np.hstack([tr, dense_tr]), np.hstack([te, dense_te]), 1.0))
    for name, xt, xe, l2 in sets:
        p_w = fit_lr(xt, y_w, l2)(xe)
        p_s = fit_lr(xt, y_s, l2)(xe)
        p_g = fit_lr(xt, y_gain, l2)(xe)
        cells = [share_for_95(-p_w, q_s, q_w), share_for_95(p_s - p_w, q_s, q_w), share_for_95(p_g, q_s, q_w)]
        shown = " | ".join("n/a" if c is None else f"{c:.1%}" for c in cells)
        print(f"| {name} | {auc(p_w, q_w):.3f} | {shown} |", flush=True)


if __name__ == "__main__":
    main()
