"""Redaction of PII and secrets in prompts and in streamed model output.

Why hand-written rules rather than a library. Candidates were weighed (all on PyPI):
presidio-analyzer is the reference, but its default engine needs a spaCy model fetched from
the internet at install time and runs NER per request (milliseconds, not microseconds);
scrubadub (last release 2023) and detect-secrets (line-oriented file scanner that reports
secrets per line, not spans, and knows no PII) each cover only part of the kinds;
phonenumbers' matcher is accurate but slow and would be the only phone-aware piece. None of
them has a streaming mode, and exact chunk-by-chunk redaction needs what no library exposes:
for every rule, which characters a match may consume and how far an attempt may read. The
checksums themselves (Luhn, ISO 7064 mod-97) are a few lines each, and `ipaddress` from the
standard library confirms addresses. So: one table of regex rules plus validators, pure and
dependency-free, shared by the batch and the streaming path.

Kinds (see ALL_KINDS): email, phone, card_number (Luhn), iban (mod-97), ip_address (v4 and
v6, confirmed by `ipaddress`), api_key (OpenAI/Anthropic `sk-`, AWS `AKIA`/`ASIA`, GitHub,
Slack, Google `AIza`, our own `lf_` keys), jwt, bearer_token, credential (`password=...`,
`api_key: "..."` style assignments; only the value is replaced), private_key (PEM blocks).

Decisions worth knowing:
- Phone numbers are matched conservatively: `+CC ...` international form (8-15 digits),
  North-American `(415) 555-2671` / `415-555-2671` / `415.555.2671` (separators required),
  and trunk-zero national forms `020 7946 0958` (9-12 digits, one consistent separator).
  Bare digit runs, years, prices, token counts and `1.2.3` versions are never phones.
- Cards: first digit 2-6, 13-19 digits contiguous or in the printed groupings (4-4-4-4...,
  Amex 4-6-5), Luhn-valid; a trailing `12/27` style group is dropped rather than spoiling it.
- IPv4-shaped version strings (`1.2.3.4`) are ambiguous and ARE redacted when every octet is
  valid: a leaked address costs more than a masked version. `v1.2.3.4` (glued to a letter)
  and longer dotted runs (`1.2.3.4.5`) are not addresses. IPv6 needs at least three hex
  digits, so `::`, `::1` and C++ `a::b` stay.
- Overlaps: detections that overlap are merged into ONE placeholder covering their union, so
  no character of any detection survives; the label is the leftmost detection's (ties: the
  more specific kind first, then the longer). One placeholder counts once.
- Long secrets are unbounded: keys, JWTs and bearer tokens swallow the rest of their
  character run, PEM blocks everything up to their END line, so nothing of them is left.
- Placeholders `[REDACTED:<kind>]` match no rule, so redact() is idempotent.

Streaming (StreamRedactor). `feed()` returns text that is final: for any chunking,
`"".join(feed(c) for c in chunks) + flush() == redact("".join(chunks)).text` and the counts
agree. Both paths run the same engine; the stream only stops at the first position where a
match attempt could still change with more text. A position counts as undecided when (a) a
rule could start there (its opening literal or first character, checked on what is there),
(b) the run of characters that rule may consume reaches the end of the buffer, and (c) the
rule's bounded reach from there passes the end. Consequences:
- Every emitted piece is a prefix of the final redacted text: no character of a span that
  will be redacted is ever emitted, not even one, in any chunk (stronger than bounding the
  leaked prefix length).
- Hold-back is bounded: at most MAX_HOLDBACK characters of raw text are pending at any time,
  and usually only the partial word or number at the end (prose is released at whitespace).
  A secret longer than its rule's reach is not held: its placeholder is emitted once its
  head is certain, and the rest of it is swallowed as it arrives.
- Memory is bounded by the same figure plus a small lookbehind context.

Speed: one regex pass per rule with literal prefilters (rules whose literal is absent are
skipped), validators only on candidates. On the development machine 100 KB of prose redacts
in about 30 ms, 100 KB with a secret every few dozen words in about 70 ms, and streaming
costs about 50 us per chunk (the engine rescans only the small undecided tail).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

RULESET_VERSION = "1"

EMAIL = "email"
PHONE = "phone"
CARD_NUMBER = "card_number"
IBAN = "iban"
IP_ADDRESS = "ip_address"
API_KEY = "api_key"
JWT = "jwt"
BEARER_TOKEN = "bearer_token"
CREDENTIAL = "credential"
PRIVATE_KEY = "private_key"

PII_KINDS = frozenset({EMAIL, PHONE, CARD_NUMBER, IBAN, IP_ADDRESS})
SECRET_KINDS = frozenset({API_KEY, JWT, BEARER_TOKEN, CREDENTIAL, PRIVATE_KEY})
ALL_KINDS = PII_KINDS | SECRET_KINDS

# Which label wins when detections start at the same place: the more specific kind.
_PRIORITY = {
    PRIVATE_KEY: 0,
    JWT: 1,
    API_KEY: 2,
    BEARER_TOKEN: 3,
    CREDENTIAL: 4,
    CARD_NUMBER: 5,
    IBAN: 6,
    EMAIL: 7,
    PHONE: 8,
    IP_ADDRESS: 9,
}

_CONTEXT = 16  # raw characters kept before the scan position, for lookbehinds


def placeholder(kind: str) -> str:
    """The text that replaces a span of `kind`: fixed, so it carries nothing of the secret."""
    return f"[REDACTED:{kind}]"


@dataclass(frozen=True)
class Redaction:
    """Redacted text, placeholders counted by kind, and how many characters they replaced."""

    text: str
    counts: dict[str, int]
    redacted_chars: int = 0


# --------------------------------------------------------------------------- extensions


class _Ext:
    """How a detected head grows past its bounded regex (long keys, PEM bodies).

    run() returns (end, still_open); still_open means more text could extend it. `back` is
    how far before the previous end a resumed run must restart to see the same result.
    """

    back = 0

    def run(self, text: str, pos: int, final: bool) -> tuple[int, bool]:  # pragma: no cover
        raise NotImplementedError


class _Run(_Ext):
    """Extend over a run of one character class."""

    def __init__(self, cls: str) -> None:
        self._rx = re.compile(f"[{cls}]*")

    def run(self, text: str, pos: int, final: bool) -> tuple[int, bool]:
        m = self._rx.match(text, pos)
        end = m.end() if m else pos
        return end, (not final and end == len(text))


class _DottedRun(_Ext):
    """Extend over base64url characters and inner dots (JWT payload, signature, JWE parts)."""

    _rx = re.compile(r"(?:[A-Za-z0-9_\-]|\.(?=[A-Za-z0-9_\-]))*")

    def run(self, text: str, pos: int, final: bool) -> tuple[int, bool]:
        m = self._rx.match(text, pos)
        end = m.end() if m else pos
        n = len(text)
        pending = end == n or (end == n - 1 and text[end] == ".")
        return end, (not final and pending)


class _PemBody(_Ext):
    """Swallow a PEM body up to and including its END line, or up to a foreign character."""

    back = 64  # longer than any END line, so a line split across chunks is found again
    _body = r"[A-Za-z0-9+/=:,\\\s\-]"
    _rx = re.compile(rf"(?P<ended>{_body}*?-----END[A-Z0-9 ]{{0,40}}-----)|{_body}*")

    def run(self, text: str, pos: int, final: bool) -> tuple[int, bool]:
        m = self._rx.match(text, pos)
        end = m.end() if m else pos
        ended = m is not None and m.group("ended") is not None
        return end, (not final and not ended and end == len(text))


# --------------------------------------------------------------------------- validators

_Check = Callable[[re.Match[str], str], tuple[int, int] | None]


def luhn_valid(digits: str) -> bool:
    """Luhn checksum of a digit string (payment cards)."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


_IBAN_DIGITS = {ord(c): str(10 + i) for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ")}


def iban_valid(iban: str) -> bool:
    """ISO 13616 check: move the first four characters to the end, letters to numbers, mod 97."""
    s = iban.replace(" ", "").upper()
    if not 15 <= len(s) <= 34 or not s.isascii() or not s.isalnum():
        return False
    return int((s[4:] + s[:4]).translate(_IBAN_DIGITS)) % 97 == 1


def _cuts(text: str, start: int, end: int, seps: str) -> Iterable[int]:
    """Candidate ends, longest first: the match end, then each separator inside it."""
    yield end
    for i in range(end - 1, start, -1):
        if text[i] in seps:
            yield i


def _check_card(m: re.Match[str], text: str) -> tuple[int, int] | None:
    for end in _cuts(text, m.start(), m.end(), " -"):
        digits = re.sub(r"[ \-]", "", text[m.start() : end])
        if 13 <= len(digits) <= 19 and luhn_valid(digits):
            return m.start(), end
    return None


def _check_iban(m: re.Match[str], text: str) -> tuple[int, int] | None:
    for end in _cuts(text, m.start(), m.end(), " "):
        if iban_valid(text[m.start() : end]):
            return m.start(), end
    return None


def _check_phone(m: re.Match[str], text: str) -> tuple[int, int] | None:
    if m.group("nanp") is not None:
        return m.start(), m.end()
    lo, hi = (8, 15) if text[m.start()] == "+" else (9, 12)
    # Greedy groups may run into a following number ("07700 900123 12:30"): cut them off.
    for end in _cuts(text, m.start(), m.end(), " .-"):
        if lo <= sum(c.isdigit() for c in text[m.start() : end]) <= hi:
            return m.start(), end
    return None


def _check_ipv4(m: re.Match[str], text: str) -> tuple[int, int] | None:
    end = m.end()
    if end + 1 < len(text) and text[end] == "." and text[end + 1].isdigit():
        return None  # a longer dotted run: version or OID, not an address
    try:
        ipaddress.IPv4Address(m.group())
    except ValueError:
        return None
    return m.start(), end


_HEX = frozenset("0123456789abcdefABCDEF")


def _check_ipv6(m: re.Match[str], text: str) -> tuple[int, int] | None:
    s = m.group()
    if sum(c in _HEX for c in s) < 3:
        return None
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return None
    return m.start(), m.end()


def _check_api_key(m: re.Match[str], text: str) -> tuple[int, int] | None:
    sk = m.group("sk")
    if sk is not None:
        body = sk[3:]
        if not (any(c.isdigit() for c in body) and any(c.isalpha() for c in body)):
            return None  # "sk-some-long-slug-of-words" is a name, not a key
    return m.start(), m.end()


def _check_bearer(m: re.Match[str], text: str) -> tuple[int, int] | None:
    v = m.group("v")
    if not any(c.isdigit() for c in v):
        return None  # "Bearer responsibilities": prose, not a token
    return m.start("v"), m.end("v")


_NOT_SECRETS = frozenset({"true", "false", "none", "null", "nil", "undefined", "required", "optional"})
_PASSWORDISH = frozenset({"password", "passwd", "secret"})


def _check_credential(m: re.Match[str], text: str) -> tuple[int, int] | None:
    group = next(g for g in ("dq", "sq", "v") if m.group(g) is not None)
    value = m.group(group)
    key = m.group("key").lower()
    if value.startswith(("[REDACTED:", "$", "{{", "<")) or value.rstrip(".").lower() in _NOT_SECRETS:
        return None
    if key not in _PASSWORDISH and len(value) < 8:
        return None  # "token=1024", "api_key: abc": too short to be a real key
    if group == "v" and m.group("sep") == ":" and m.group("kq") is None and value.isalpha():
        return None  # "password: required" / "the token: something" in prose
    return m.start(group), m.end(group)


# --------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class _Rule:
    """One detector.

    pattern: the bounded head; every attempt at s (pattern and check together) reads fewer
        than `maxread` characters from s and nothing past the first character outside
        `alphabet` (a regex class body; a leading ^ negates it). Lookaheads are one character.
    opening: matches at s whenever an attempt at s could still succeed (a superset); used
        only to decide what the stream must hold back.
    check: validates a match and returns the span to replace (may shorten it).
    ext_for: how the span grows past the head (long keys, PEM bodies), or None.
    needles: cheap prefilter; if none occurs at or after the scan position, skip the rule.
    These three bounds are what make the stream exact: break one and text could be emitted
    before it is final (test_rule_reach_bounds_are_sound and the property tests guard them).
    """

    kind: str
    pattern: re.Pattern[str]
    opening: re.Pattern[str]
    alphabet: str
    maxread: int
    check: _Check | None = None
    ext_for: Callable[[re.Match[str]], _Ext | None] | None = None
    needles: tuple[str, ...] = ()
    last_foreign: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        foreign = self.alphabet[1:] if self.alphabet.startswith("^") else "^" + self.alphabet
        object.__setattr__(self, "last_foreign", re.compile(rf"(?s:.*)[{foreign}]"))


def _opening(lookbehind: str, literals: Iterable[str], rest: str = "", flags: int = 0) -> re.Pattern[str]:
    """A literal opening, or any proper prefix of it cut off by the end of the buffer."""
    alts = set()
    for lit in literals:
        alts.add(re.escape(lit) + rest)
        for k in range(1, len(lit)):
            alts.add(re.escape(lit[:k]) + r"\Z")
    body = "|".join(sorted(alts, key=len, reverse=True))
    return re.compile(f"{lookbehind}(?:{body})", flags | re.ASCII)


_A = re.ASCII
_TOK = r"A-Za-z0-9_\-"
_TOKEN_RUN = _Run(_TOK)

_API_LITERALS = ("sk-", "AKIA", "ASIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "xox", "AIza", "lf_")

# Longer keys first where one is a prefix of another ("secret_key" before "secret").
# fmt: off
_CRED_KEYS = (
    "api_key", "api-key", "apikey", "api_secret", "api-secret", "access_key", "access-key",
    "secret_key", "secret-key", "client_secret", "client-secret", "access_token", "access-token",
    "auth_token", "auth-token", "refresh_token", "refresh-token", "private_key", "private-key",
    "password", "passwd", "secret", "token",
)
# fmt: on
_CRED_VALUE = r"[^\s\"'`,;&<>]"
_CRED_AFTER_KEY = rf"[\"']?[ \t]{{0,3}}(?:[:=][ \t]{{0,3}}(?:\"[^\"\r\n]*|'[^'\r\n]*|{_CRED_VALUE}*))?\Z"


def _credential_ext(m: re.Match[str]) -> _Ext:
    if m.group("dq") is not None:
        return _Run(r"^\"\r\n")
    if m.group("sq") is not None:
        return _Run(r"^'\r\n")
    return _Run(r"^\s\"'`,;&<>")


_RULES: tuple[_Rule, ...] = (
    _Rule(
        kind=PRIVATE_KEY,
        pattern=re.compile(r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----", _A),
        opening=_opening("", ["-----BEGIN"]),
        alphabet=r"A-Z0-9 \-",
        maxread=80,
        ext_for=lambda m: _PemBody(),
        needles=("-----BEGIN",),
    ),
    _Rule(
        kind=JWT,
        pattern=re.compile(rf"(?<![{_TOK}])eyJ[{_TOK}]{{8,300}}\.eyJ[{_TOK}]{{0,16}}", _A),
        opening=_opening(rf"(?<![{_TOK}])", ["eyJ"]),
        alphabet=r"A-Za-z0-9_.\-",
        maxread=330,
        ext_for=lambda m: _DottedRun(),
        needles=("eyJ",),
    ),
    _Rule(
        kind=API_KEY,
        pattern=re.compile(
            rf"(?<![{_TOK}])(?:"
            rf"(?P<sk>sk-[{_TOK}]{{20,200}})"
            r"|(?:AKIA|ASIA)[0-9A-Z]{16}(?![0-9A-Za-z])"
            r"|gh[pousr]_[A-Za-z0-9]{36,200}"
            r"|github_pat_[A-Za-z0-9_]{22,200}"
            r"|xox[baprs]-[A-Za-z0-9\-]{10,200}"
            rf"|AIza[{_TOK}]{{35}}"
            rf"|lf_[{_TOK}]{{9,200}}"
            ")",
            _A,
        ),
        opening=_opening(
            rf"(?<![{_TOK}])",
            [*(lit for lit in _API_LITERALS if lit != "xox"), *(f"xox{c}-" for c in "baprs")],
        ),
        alphabet=_TOK,
        maxread=216,
        check=_check_api_key,
        ext_for=lambda m: _TOKEN_RUN,
        needles=_API_LITERALS,
    ),
    _Rule(
        kind=BEARER_TOKEN,
        pattern=re.compile(r"(?<![A-Za-z0-9_])(?i:bearer)[ \t]{1,4}(?P<v>[A-Za-z0-9._~+/=\-]{16,200})", _A),
        opening=re.compile(
            r"(?<![A-Za-z0-9_])(?:bearer[ \t]{0,4}\Z|bearer[ \t]{1,4}[A-Za-z0-9._~+/=\-]{1,200}\Z"
            r"|b(?:e(?:a(?:r(?:e)?)?)?)?\Z)",
            _A | re.IGNORECASE,
        ),
        alphabet=r"A-Za-z0-9._~+/= \t\-",
        maxread=216,
        check=_check_bearer,
        ext_for=lambda m: _Run(r"A-Za-z0-9._~+/=\-"),
    ),
    _Rule(
        kind=CREDENTIAL,
        pattern=re.compile(
            r"(?P<key>" + "|".join(re.escape(k) for k in _CRED_KEYS) + r")(?P<kq>[\"'])?[ \t]{0,3}"
            r"(?P<sep>[:=])[ \t]{0,3}"
            rf"(?:\"(?P<dq>[^\"\r\n]{{1,200}})|'(?P<sq>[^'\r\n]{{1,200}})|(?P<v>{_CRED_VALUE}{{4,200}}))",
            _A | re.IGNORECASE,
        ),
        opening=_opening("", _CRED_KEYS, rest=_CRED_AFTER_KEY, flags=re.IGNORECASE),
        alphabet=r"^\r\n",
        maxread=232,
        check=_check_credential,
        ext_for=_credential_ext,
    ),
    _Rule(
        kind=CARD_NUMBER,
        pattern=re.compile(
            r"(?<![A-Za-z0-9_])(?:"
            r"[2-6][0-9]{12,18}"
            r"|[2-6][0-9]{3}(?P<cs>[ \-])[0-9]{4}(?:(?P=cs)[0-9]{4}){1,2}(?:(?P=cs)[0-9]{1,4})?"
            r"|3[0-9]{3}(?P<as>[ \-])[0-9]{6}(?P=as)[0-9]{4,5}"
            r")(?![A-Za-z0-9_])",
            _A,
        ),
        opening=re.compile(r"(?<![A-Za-z0-9_])[2-6]", _A),
        alphabet=r"0-9 \-",
        maxread=32,
        check=_check_card,
    ),
    _Rule(
        kind=IBAN,
        pattern=re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?:[ ]?[A-Z0-9]){11,30}(?![A-Za-z0-9])", _A),
        opening=re.compile(r"(?<![A-Za-z0-9])(?:[A-Z]{2}[0-9]{2}|[A-Z]{2}[0-9]\Z|[A-Z]{1,2}\Z)", _A),
        alphabet=r"A-Z0-9 ",
        maxread=72,
        check=_check_iban,
    ),
    _Rule(
        kind=EMAIL,
        pattern=re.compile(
            r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]{1,64}@"
            r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]{0,61}[A-Za-z0-9])?\.){1,4}[A-Za-z]{2,24}(?![A-Za-z0-9\-])",
            _A,
        ),
        opening=re.compile(r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]", _A),
        alphabet=r"A-Za-z0-9._%+@\-",
        maxread=350,
        needles=("@",),
    ),
    _Rule(
        kind=PHONE,
        pattern=re.compile(
            r"(?<![A-Za-z0-9_+.\-])(?:"
            r"\+[1-9][0-9]{0,2}(?:[ .\-]?\([0-9]{1,4}\))?(?:[ .\-]?[0-9]{1,5}){1,6}"
            r"|(?P<nanp>(?:1[ .\-]?)?(?:\([2-9][0-9]{2}\)[ ]?|[2-9][0-9]{2}[.\-])[2-9][0-9]{2}[.\-][0-9]{4})"
            r"|0[0-9]{1,4}(?P<ps>[ .\-])[0-9]{2,8}(?:(?P=ps)[0-9]{2,8}){0,4}"
            r"|\(0[0-9]{1,4}\)[ ]?[0-9]{2,8}(?:[ \-][0-9]{2,8}){0,3}"
            r")(?![A-Za-z0-9_])",
            _A,
        ),
        opening=re.compile(r"[+(0-9]", _A),
        alphabet=r"0-9+() .\-",
        maxread=64,
        check=_check_phone,
    ),
    _Rule(
        kind=IP_ADDRESS,
        pattern=re.compile(r"(?<![A-Za-z0-9_.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?![A-Za-z0-9_])", _A),
        opening=re.compile(r"(?<![A-Za-z0-9_.])[0-9]", _A),
        alphabet=r"0-9.",
        maxread=20,
        check=_check_ipv4,
        needles=(".",),
    ),
    _Rule(
        kind=IP_ADDRESS,
        pattern=re.compile(
            r"(?<![A-Za-z0-9_:.])[0-9A-Fa-f]{0,4}"
            r"(?::(?:[0-9]{1,3}(?:\.[0-9]{1,3}){3}|[0-9A-Fa-f]{0,4})){2,7}(?![A-Za-z0-9_:])",
            _A,
        ),
        opening=re.compile(r"(?<![A-Za-z0-9_:.])[0-9A-Fa-f:]", _A),
        alphabet=r"0-9A-Fa-f:.",
        maxread=120,
        check=_check_ipv6,
        needles=(":",),
    ),
)

MAX_HOLDBACK = max(r.maxread for r in _RULES)


def _rules_for(kinds: frozenset[str]) -> tuple[_Rule, ...]:
    unknown = kinds - ALL_KINDS
    if unknown:
        raise ValueError(f"unknown redaction kinds: {sorted(unknown)}; known: {sorted(ALL_KINDS)}")
    return tuple(r for r in _RULES if r.kind in kinds)


# --------------------------------------------------------------------------- engine


@dataclass
class _Cand:
    start: int
    end: int
    kind: str
    rule: int
    attempt: int
    ext: _Ext | None


class _Engine:
    """Incremental scanner behind both redact() and StreamRedactor (one code path, one answer).

    Positions are local to `buf`; `_trim` drops text no rule can need and shifts them.
    """

    def __init__(self, kinds: frozenset[str]) -> None:
        self.rules = _rules_for(kinds)
        self.buf = ""
        self.rp = [0] * len(self.rules)  # where each rule's next attempt starts
        self.out_pos = 0  # output produced (raw or swallowed) up to here
        self.cur_end = -1  # end of the current merged span
        self.open: list[tuple[_Ext, int]] = []  # extensions that more text could still grow
        self.counts: dict[str, int] = {}
        self.redacted_chars = 0

    # how far text is decided ------------------------------------------------------------
    def _undecided_from(self, i: int, rule: _Rule, n: int) -> int:
        ws = max(self.rp[i], n - rule.maxread + 1)
        if ws >= n:
            return n
        m = rule.last_foreign.match(self.buf, ws, n)
        hit = rule.opening.search(self.buf, m.end() if m else ws)
        return hit.start() if hit else n

    def _extend(self, end: int) -> None:
        if end > self.cur_end:
            self.redacted_chars += end - self.cur_end
            self.cur_end = end

    def step(self, chunk: str, final: bool) -> str:
        self.buf += chunk
        text = self.buf
        n = len(text)
        out: list[str] = []

        still: list[tuple[_Ext, int]] = []
        for ext, pos in self.open:
            e, is_open = ext.run(text, pos, final)
            self._extend(e)
            if is_open:
                still.append((ext, max(pos, e - ext.back)))
        self.open = still

        limit = n if final else min((self._undecided_from(i, r, n) for i, r in enumerate(self.rules)), default=n)

        cands: list[_Cand] = []
        for i, rule in enumerate(self.rules):
            q = self.rp[i]
            if rule.needles and not any(text.find(nd, q) >= 0 for nd in rule.needles):
                self.rp[i] = max(q, limit)
                continue
            deferred = -1
            while True:
                m = rule.pattern.search(text, q)
                if m is None or m.start() >= limit:
                    break
                s = m.start()
                span = rule.check(m, text) if rule.check else (s, m.end())
                if span is None:
                    q = s + 1
                    continue
                a, b = span
                if a >= limit:
                    deferred = s
                    break
                grow = rule.ext_for(m) if rule.ext_for else None
                cands.append(_Cand(a, b, rule.kind, i, s, grow))
                q = max(b, s + 1)
            self.rp[i] = deferred if deferred >= 0 else max(q, limit)

        cands.sort(key=lambda c: (c.start, _PRIORITY[c.kind], -c.end))
        for idx, c in enumerate(cands):
            if self.open and c.start >= self.cur_end:
                # The open span may or may not reach c: decide next time, from c's attempt on.
                for d in cands[idx:]:
                    self.rp[d.rule] = min(self.rp[d.rule], d.attempt)
                break
            if c.start >= self.cur_end:
                out.append(text[max(self.out_pos, self.cur_end) : c.start])
                out.append(placeholder(c.kind))
                self.counts[c.kind] = self.counts.get(c.kind, 0) + 1
                self.out_pos = c.start
                self.cur_end = c.start
            self._extend(c.end)
            if c.ext is not None:
                e, is_open = c.ext.run(text, c.end, final)
                self._extend(e)
                if is_open:
                    self.open.append((c.ext, max(c.end, e - c.ext.back)))

        emit_to = self.cur_end if self.open else max(limit, self.cur_end)
        raw_from = max(self.out_pos, self.cur_end)
        if emit_to > raw_from:
            out.append(text[raw_from:emit_to])
        self.out_pos = max(self.out_pos, emit_to)
        self._trim()
        return "".join(out)

    def _trim(self) -> None:
        keep = min([self.out_pos, *self.rp, *(pos for _, pos in self.open)]) - _CONTEXT
        if keep <= 0:
            return
        self.buf = self.buf[keep:]
        self.rp = [p - keep for p in self.rp]
        self.out_pos -= keep
        self.cur_end -= keep
        self.open = [(ext, pos - keep) for ext, pos in self.open]


def redact(text: str, kinds: frozenset[str] = ALL_KINDS) -> Redaction:
    """Replace every detected span of the given kinds by its placeholder; count by kind."""
    engine = _Engine(kinds)
    out = engine.step(text, final=True)
    return Redaction(text=out, counts=dict(engine.counts), redacted_chars=engine.redacted_chars)


class StreamRedactor:
    """Redacts a stream chunk by chunk with exactly the result of redact() on the whole.

    feed() returns only text that no later chunk can change; flush() returns the rest at the
    end. See the module docstring for the guarantees (prefix-exact, bounded hold-back).
    """

    def __init__(self, kinds: frozenset[str] = ALL_KINDS) -> None:
        self._engine = _Engine(kinds)
        self._closed = False

    def feed(self, chunk: str) -> str:
        """Take the next chunk; return the text that is safe and final to emit now."""
        if self._closed:
            raise RuntimeError("StreamRedactor already flushed")
        return self._engine.step(chunk, final=False)

    def flush(self) -> str:
        """End of stream: return everything still held back, redacted."""
        if self._closed:
            return ""
        self._closed = True
        return self._engine.step("", final=True)

    @property
    def pending(self) -> int:
        """Raw characters received but not yet emitted or swallowed (at most MAX_HOLDBACK)."""
        e = self._engine
        return max(0, len(e.buf) - max(e.out_pos, e.cur_end))

    @property
    def counts(self) -> dict[str, int]:
        """Placeholders emitted so far, by kind."""
        return dict(self._engine.counts)

    @property
    def redacted_chars(self) -> int:
        """Raw characters replaced so far (grows while a long secret is being swallowed)."""
        return self._engine.redacted_chars
