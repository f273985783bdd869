"""Request features for routing: cheap, deterministic, computed from the prompt text alone.

Why these: a routing decision must cost far less than the call it routes (p99 < 1 ms, see
`bench/bench_routing.py`), so the default features are a single pass of string methods and
one regex over a bounded prefix: length, script (Latin / Cyrillic / CJK / other), code and
maths markers, question shape, and word uni- and bigrams hashed into a fixed number of
signed buckets (the "hashing trick"), so the model's dimension never grows with the
vocabulary. Hashes are CRC-32 (stable across processes, unlike Python's salted `hash`), so a
replay computes the same vector and priors learned in one process apply in another.

The vector is a sparse `dict[str, float]` (river's input shape). Every value is bounded
(roughly in [-1, 1]) so no feature dominates the Bayesian regression's prior.
"""

from __future__ import annotations

import math
import re
import string
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # numpy loads only where an embedding is configured
    from domain.routing_embedding import SentenceEncoder

FEATURES_VERSION = "f1"
MAX_SCAN_CHARS = 4000  # markers read this much; length features see the whole prompt
NGRAM_SCAN_CHARS = 1024  # words and their hashed n-grams: the head of the prompt (see FeatureConfig.ngram_chars)
LEGACY_NGRAM_CHARS = 4000  # what priors recorded before `ngram_chars` existed were computed with
_WORD = re.compile(r"[^\W\d_]+|\d+", re.UNICODE)
_CODE_MARKERS = ("```", "def ", "return ", "function ", "class ", "import ", "#include", "=>", "};", "();", "</")
_MATH_CHARS = frozenset("=+-*/^<>√∑∫πθ∞≤≥±×÷")
_MATH_WORDS = ("equation", "integral", "derivative", "matrix", "prove", "theorem", "probability", "solve", "sqrt")


@dataclass(frozen=True)
class FeatureConfig:
    """How features are computed; part of the priors (a model only applies to its own features)."""

    buckets: int = 16  # hashed n-gram buckets; the regression's dimension is 13 + buckets
    bigrams: bool = True
    # Words (n-grams, mean word length) come from this many leading characters. Why bounded:
    # hashing is the one per-word Python loop of a decision, so a long prompt set the p99
    # (bench/bench_routing.py); into 16 buckets, the n-grams past the first ~170 words add noise,
    # not signal (BENCHMARKS.md, routing study). Priors carry it, so older ones keep their 4000.
    ngram_chars: int = NGRAM_SCAN_CHARS
    # Optional sentence embedding (domain/routing_embedding.py): the encoder's model id and how
    # many projected dimensions join the vector; "" and 0 = none (the default, and the < 1 ms path).
    embedding: str = ""
    embedding_dims: int = 0

    def __post_init__(self) -> None:
        if self.embedding_dims < 0 or bool(self.embedding) != bool(self.embedding_dims):
            raise ValueError("an embedding needs both its model id and embedding_dims > 0")

    def as_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "version": FEATURES_VERSION,
            "buckets": self.buckets,
            "bigrams": self.bigrams,
            "ngram_chars": self.ngram_chars,
        }
        if self.embedding_dims:  # absent otherwise: priors without an embedding keep their bytes and hash
            out["embedding"] = self.embedding
            out["embedding_dims"] = self.embedding_dims
        return out

    @staticmethod
    def from_dict(raw: dict[str, object]) -> FeatureConfig:
        if raw.get("version", FEATURES_VERSION) != FEATURES_VERSION:
            raise ValueError(f"priors use features {raw.get('version')!r}; this router computes {FEATURES_VERSION!r}")
        return FeatureConfig(
            buckets=int(raw.get("buckets", 16)),  # type: ignore[call-overload]
            bigrams=bool(raw.get("bigrams", True)),
            ngram_chars=int(raw.get("ngram_chars", LEGACY_NGRAM_CHARS)),  # type: ignore[call-overload]
            embedding=str(raw.get("embedding", "")),
            embedding_dims=int(raw.get("embedding_dims", 0)),  # type: ignore[call-overload]
        )


_NON_LATIN = re.compile("[\u0250-\U0010ffff]")
_CYRILLIC = re.compile("[\u0400-\u04ff]")
_CJK = re.compile("[\u3040-\u30ff\u4e00-\u9fff\uac00-\ud7af]")
_LETTER = re.compile(r"[^\W\d_]")
_DIGITS = b"0123456789"
_MATH_ASCII = bytes(sorted(ord(c) for c in _MATH_CHARS if ord(c) < 128))
_MATH_WIDE = "".join(sorted(c for c in _MATH_CHARS if ord(c) >= 128))
_ASCII = bytes(range(128))
_ASCII_LETTERS = string.ascii_letters.encode()


def _counts(head: str) -> tuple[int, int, bytes, str]:
    """Digits, maths symbols, the UTF-8 bytes and the non-ASCII characters of `head`.

    Counted on bytes (`bytes.translate` deletes in C at memory speed whatever the text), not
    with `str.translate`, which is fast only on pure ASCII and falls back to a per-character
    mapping lookup once a prompt holds a single curly quote. The non-ASCII remainder is
    short in most prompts; the few wide symbols and the script regexes look only at it.
    """
    raw = head.encode("utf-8", "surrogatepass")  # a lone surrogate must not fail a decision
    digits = len(raw) - len(raw.translate(None, _DIGITS))
    maths = len(raw) - len(raw.translate(None, _MATH_ASCII))
    rest = "" if head.isascii() else raw.translate(None, _ASCII).decode("utf-8", "surrogatepass")
    if rest:
        maths += sum(map(rest.count, _MATH_WIDE))
    return digits, maths, raw, rest


def _script(raw: bytes, rest: str) -> tuple[float, float, float]:
    """Shares of letters that are Cyrillic, CJK (incl. kana/hangul) and other non-Latin.

    ASCII letters are counted on the bytes; the regexes run over the non-ASCII characters
    only: the same counts as over the whole text, at a fraction of the cost.
    """
    letters = len(raw) - len(raw.translate(None, _ASCII_LETTERS)) + len(_LETTER.findall(rest))
    if not letters:
        return 0.0, 0.0, 0.0
    cyr = len(_CYRILLIC.findall(rest))
    cjk = len(_CJK.findall(rest))
    non_latin = sum(1 for ch in _NON_LATIN.findall(rest) if ch.isalpha())
    return cyr / letters, cjk / letters, max(0, non_latin - cyr - cjk) / letters


def features(
    text: str, config: FeatureConfig = FeatureConfig(), encoder: SentenceEncoder | None = None
) -> dict[str, float]:
    """The feature vector of one prompt (all of a request's messages, joined).

    `encoder` is needed when `config` names an embedding, and must be that model: features
    from other weights would be read by a regression that never saw them.
    """
    n = len(text)
    head = text[:MAX_SCAN_CHARS]
    lower = head.lower()
    h = len(head) or 1
    digits, maths, raw, rest = _counts(head)  # counted in C: the prompt is long, the budget short
    lines = head.count("\n") + 1
    cyr, cjk, other = _script(raw, rest) if rest else (0.0, 0.0, 0.0)
    words = _WORD.findall(lower[: config.ngram_chars])
    x: dict[str, float] = {
        "bias": 1.0,
        "len_log": math.log1p(n) / 10.0,
        "len_long": 1.0 if n > 2000 else 0.0,
        "lines_log": math.log1p(lines) / 5.0,
        "digit_share": min(1.0, 4.0 * digits / h),
        "math_share": min(1.0, 8.0 * maths / h),
        "math_words": min(1.0, sum(w in lower for w in _MATH_WORDS) / 3.0),
        "code": min(1.0, sum(m in head for m in _CODE_MARKERS) / 3.0),
        "question": 1.0 if "?" in head else 0.0,
        "script_cyrillic": cyr,
        "script_cjk": cjk,
        "script_other": other,
        "word_len": min(1.0, (sum(map(len, words)) / len(words)) / 10.0) if words else 0.0,
    }
    if words and config.buckets > 0:
        _hash_ngrams(words, config, x)
    if config.embedding_dims:
        if encoder is None or encoder.model_id != config.embedding:
            have = encoder.model_id if encoder is not None else "none"
            raise ValueError(f"these features need the embedding model {config.embedding!r}; this process has {have!r}")
        from domain.routing_embedding import embedding_features

        x.update(embedding_features(encoder, text, config.embedding_dims))
    return x


def _hash_ngrams(words: list[str], config: FeatureConfig, x: dict[str, float]) -> None:
    """Signed hashed counts of words (and bigrams), L2-normalised so long prompts do not dominate.

    A bigram's hash is CRC-32 of "w1 w2", computed by continuing w1's CRC over " w2" (no
    string is built per bigram).
    """
    b = config.buckets
    encoded = [w.encode() for w in words]
    hashes = [zlib.crc32(e) for e in encoded]
    if config.bigrams:
        hashes += [zlib.crc32(b" " + e, h) for h, e in zip(hashes, encoded[1:], strict=False)]
    acc: dict[int, float] = {}
    for h in hashes:
        slot = h % b
        acc[slot] = acc.get(slot, 0.0) + (1.0 if h & 0x80000000 else -1.0)
    norm = math.sqrt(sum(v * v for v in acc.values())) or 1.0
    for slot, v in acc.items():
        if v:
            x[f"h{slot}"] = v / norm


def context_key(x: dict[str, float]) -> str:
    """The coarse bucket a request's statistics are kept under (size class, code, maths, script).

    Coarse on purpose: per-context counts are for reports and sanity checks, the regression
    generalises across contexts.
    """
    n = math.expm1(x["len_log"] * 10.0)
    size = "xs" if n < 200 else "s" if n < 1000 else "m" if n < 4000 else "l"
    parts = [size]
    if x["code"] > 0:
        parts.append("code")
    if x["math_share"] > 0.1 or x["math_words"] > 0:
        parts.append("math")
    if x["script_cyrillic"] + x["script_cjk"] + x["script_other"] > 0.3:
        parts.append("nonlatin")
    return "|".join(parts)
