"""SQL text handling, pure: statement splitting (migrations) and the read-only gate (SQL endpoint).

Why a lexer and not regexes: quotes, comments and heredocs can hide a `;` or a keyword,
so the checks look at real tokens. The gate is defence in depth on top of the engine's
readonly=1 session: readonly=1 blocks writes, DDL, settings changes and the external
table functions, but chDB (clickhouse-local) still lets `SELECT file('/etc/passwd')`,
`INTO OUTFILE` and multi-statement input through, so those are refused here. Anything the
lexer cannot classify with certainty is refused rather than guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

READ_STATEMENTS = frozenset({"SELECT", "WITH", "SHOW", "DESCRIBE", "DESC", "EXPLAIN", "EXISTS"})
# Functions (scalar or table) that reach outside the database: files, processes, the
# network, the host's Python objects. readonly=1 stops most table functions already;
# listing them again costs nothing and covers the scalar `file()` it does not.
DENIED_FUNCTIONS = frozenset(
    name.lower()
    for name in (
        "file", "fileCluster", "filesystem", "url", "urlCluster", "s3", "s3Cluster", "gcs", "oss", "cosn",
        "hdfs", "hdfsCluster", "azureBlobStorage", "azureBlobStorageCluster", "executable", "python",
        "arrowstream", "remote", "remoteSecure", "cluster", "clusterAllReplicas", "mysql", "postgresql",
        "sqlite", "odbc", "jdbc", "mongodb", "redis", "input", "icebergLocal", "deltaLakeLocal",
        "paimonLocal", "hudi", "iceberg", "deltaLake", "paimon", "ytsaurus", "bigquery", "eval",
        "dictionary", "loop",
    )
)  # fmt: skip
_FORMAT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_HEREDOC = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)?\$")
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"(?:0[xX][0-9a-fA-F_]+|0[bB][01_]+|(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][+-]?\d+)?)")


class UnsafeQuery(ValueError):
    """The text is not a single read-only statement we are willing to run.

    `code`/`name` follow ClickHouse's error codes so HTTP clients see what a real server with
    a readonly user would answer: 164 READONLY for refused statements, 62 SYNTAX_ERROR for
    text that is not one well-formed statement.
    """

    def __init__(self, message: str, *, syntax: bool = False) -> None:
        super().__init__(message)
        self.code, self.name = (62, "SYNTAX_ERROR") if syntax else (164, "READONLY")


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # word | qident | string | number | punct
    text: str  # as written (for qident: the unquoted name)
    start: int
    end: int
    depth: int  # parenthesis depth at the token


def tokenize(sql: str) -> list[Token]:
    """Significant tokens of `sql` (comments and whitespace dropped); UnsafeQuery if unlexable."""
    out: list[Token] = []
    i, n, depth = 0, len(sql), 0
    while i < n:
        c = sql[i]
        if c.isspace():
            i += 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            i = n if j < 0 else j + 1
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            if j < 0 or "/*" in sql[i + 2 : j]:
                raise UnsafeQuery("unterminated or nested /* comment", syntax=True)
            i = j + 2
        elif c == "#":
            raise UnsafeQuery("'#' comments are not supported here; use -- or /* */", syntax=True)
        elif c in "'\"`":
            j = _end_of_quoted(sql, i)
            body = sql[i + 1 : j - 1]
            out.append(Token("string" if c == "'" else "qident", body, i, j, depth))
            i = j
        elif c == "$":
            m = _HEREDOC.match(sql, i)
            if not m:
                raise UnsafeQuery(f"unexpected '$' at position {i}", syntax=True)
            j = sql.find(m.group(0), m.end())
            if j < 0:
                raise UnsafeQuery("unterminated heredoc string", syntax=True)
            out.append(Token("string", sql[m.end() : j], i, j + len(m.group(0)), depth))
            i = j + len(m.group(0))
        elif c.isalpha() or c == "_":
            m = _WORD.match(sql, i)
            assert m is not None
            out.append(Token("word", m.group(0), i, m.end(), depth))
            i = m.end()
        elif c.isdigit() or (c == "." and i + 1 < n and sql[i + 1].isdigit()):
            m = _NUMBER.match(sql, i)
            end = m.end() if m and m.end() > i else i + 1
            out.append(Token("number", sql[i:end], i, end, depth))
            i = end
        else:
            if c in "([":
                out.append(Token("punct", c, i, i + 1, depth))
                depth += 1
            elif c in ")]":
                depth = max(0, depth - 1)
                out.append(Token("punct", c, i, i + 1, depth))
            else:
                out.append(Token("punct", c, i, i + 1, depth))
            i += 1
    return out


def _end_of_quoted(sql: str, i: int) -> int:
    """Index just past the quoted literal starting at `i` (backslash escapes and doubled quotes)."""
    q, j, n = sql[i], i + 1, len(sql)
    while j < n:
        ch = sql[j]
        if ch == "\\":
            j += 2
            continue
        if ch == q:
            if j + 1 < n and sql[j + 1] == q:
                j += 2
                continue
            return j + 1
        j += 1
    raise UnsafeQuery(f"unterminated {q}quoted{q} text starting at position {i}", syntax=True)


def split_statements(sql: str) -> list[str]:
    """Top-level `;`-separated statements, without the `;`, skipping empty ones (migrations)."""
    tokens = tokenize(sql)
    out: list[str] = []
    start = 0
    piece: list[Token] = []
    for t in tokens:
        if t.kind == "punct" and t.text == ";":
            if piece:
                out.append(sql[start : t.start].strip())
            piece, start = [], t.end
        else:
            if not piece:
                start = t.start
            piece.append(t)
    if piece:
        out.append(sql[start:].strip())
    return out


@dataclass(frozen=True, slots=True)
class ReadQuery:
    sql: str  # the statement as sent, a trailing ';' removed
    format: str  # output format of the response: the query's FORMAT clause, else the default
    explicit_format: bool  # the query names its own FORMAT


def check_format_name(name: str) -> str:
    """Format names are spliced into SQL; only plain names pass."""
    if not _FORMAT_NAME.match(name):
        raise UnsafeQuery(f"bad format name {name!r}", syntax=True)
    return name


def prepare_read_query(sql: str, default_format: str = "TabSeparated") -> ReadQuery:
    """Validate that `sql` is one read-only statement and find its output format.

    Raises UnsafeQuery with a message fit for the client when it is not.
    """
    tokens = tokenize(sql)
    if tokens and tokens[-1].kind == "punct" and tokens[-1].text == ";":
        sql = sql[: tokens[-1].start]
        tokens = tokens[:-1]
    if not tokens:
        raise UnsafeQuery("empty query", syntax=True)
    if any(t.kind == "punct" and t.text == ";" for t in tokens):
        raise UnsafeQuery("Multi-statements are not allowed: send one statement per request", syntax=True)
    first = tokens[0]
    is_read = first.kind == "word" and first.text.upper() in READ_STATEMENTS
    if not (is_read or (first.kind == "punct" and first.text == "(")):
        shown = first.text.upper() if first.kind == "word" else first.text
        raise UnsafeQuery(
            f"read-only endpoint: {shown} is not allowed (only SELECT, WITH, SHOW, DESCRIBE, EXPLAIN, EXISTS)"
        )
    fmt: str | None = None
    for k, t in enumerate(tokens):
        nxt = tokens[k + 1] if k + 1 < len(tokens) else None
        is_call = t.kind in ("word", "qident") and nxt is not None and nxt.kind == "punct" and nxt.text == "("
        if is_call and t.text.lower() in DENIED_FUNCTIONS:
            raise UnsafeQuery(f"read-only endpoint: function {t.text}() is not allowed")
        if t.kind != "word" or nxt is None:
            continue
        upper = t.text.upper()
        if upper == "INTO" and nxt.kind == "word" and nxt.text.upper() == "OUTFILE":
            raise UnsafeQuery("read-only endpoint: INTO OUTFILE is not allowed")
        if upper == "IDENTIFIER" and k > 0 and tokens[k - 1].text == ":" and nxt.text == "}":
            raise UnsafeQuery("read-only endpoint: Identifier query parameters are not allowed")
        after = tokens[k + 2] if k + 2 < len(tokens) else None
        ends_clause = after is None or (after.kind == "word" and after.text.upper() == "SETTINGS")
        if upper == "FORMAT" and t.depth == 0 and k > 0 and nxt.kind in ("word", "qident") and ends_clause:
            fmt = check_format_name(nxt.text)
    if fmt is None:
        return ReadQuery(sql=sql.rstrip(), format=check_format_name(default_format), explicit_format=False)
    return ReadQuery(sql=sql.rstrip(), format=fmt, explicit_format=True)
