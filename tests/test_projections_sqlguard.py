"""The read-only gate of the SQL endpoint, pure: what passes, what is refused and why."""

from __future__ import annotations

import re

import pytest

from projections.sqlguard import UnsafeQuery, prepare_read_query, split_statements, tokenize


@pytest.mark.parametrize(
    ("sql", "fmt", "explicit"),
    [
        ("SELECT 1", "TabSeparated", False),
        ("select 1;", "TabSeparated", False),
        ("SELECT 1 FORMAT JSON", "JSON", True),
        ("SELECT 1 FORMAT JSONEachRow SETTINGS max_threads = 1", "JSONEachRow", True),
        ("WITH x AS (SELECT 1) SELECT * FROM x", "TabSeparated", False),
        ("(SELECT 1) UNION ALL (SELECT 2)", "TabSeparated", False),
        ("SHOW TABLES", "TabSeparated", False),
        ("DESCRIBE TABLE tokens_charged", "TabSeparated", False),
        ("EXPLAIN SELECT 1", "TabSeparated", False),
        ("SELECT format FROM t", "TabSeparated", False),  # a column called format is not the clause
        ("SELECT 'FORMAT JSON' AS s -- FORMAT CSV", "TabSeparated", False),
        ("SELECT x FROM (SELECT 1 AS x FORMAT JSON)", "TabSeparated", False),  # nested: not the output
        ("SELECT ';' AS s, `a;b`, \"c;d\", $$e;f$$ /* ; */", "TabSeparated", False),
        ("SELECT {tenant:String}", "TabSeparated", False),
    ],
)
def test_read_queries_pass(sql: str, fmt: str, explicit: bool) -> None:
    q = prepare_read_query(sql)
    assert (q.format, q.explicit_format) == (fmt, explicit)
    assert not q.sql.endswith(";")


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("INSERT INTO t VALUES (1)", "INSERT is not allowed"),
        ("CREATE TABLE x (a Int8) ENGINE = Memory", "CREATE is not allowed"),
        ("DROP TABLE tokens_charged", "DROP is not allowed"),
        ("ALTER TABLE t DELETE WHERE 1", "ALTER is not allowed"),
        ("SET readonly = 0", "SET is not allowed"),
        ("USE system", "USE is not allowed"),
        ("KILL QUERY WHERE 1", "KILL is not allowed"),
        ("SYSTEM SHUTDOWN", "SYSTEM is not allowed"),
        ("OPTIMIZE TABLE t", "OPTIMIZE is not allowed"),
        ("SELECT 1; SELECT 2", "Multi-statements"),
        ("SELECT 1; DROP TABLE t;", "Multi-statements"),
        ("SELECT file('/etc/passwd')", "file() is not allowed"),
        ("SELECT `file`('/etc/passwd')", "file() is not allowed"),
        ("SELECT \"FILE\" ('/etc/passwd')", "FILE() is not allowed"),
        ("SELECT * FROM url('http://x/y', CSV)", "url() is not allowed"),
        ("SELECT * FROM view(SELECT file('/etc/hostname'))", "file() is not allowed"),
        ("SELECT * FROM numbers(3) INTO OUTFILE '/tmp/x'", "INTO OUTFILE"),
        ("SELECT * FROM {t:Identifier}", "Identifier query parameters"),
        ("SELECT 1 # comment", "'#' comments"),
        ("SELECT 'unterminated", "unterminated"),
        ("SELECT 1 /* /* nested */ */", "nested"),
        ("   ;  ", "empty query"),
        ("SELECT 1 FORMAT `bad format`", "bad format name"),
    ],
)
def test_unsafe_queries_are_refused(sql: str, message: str) -> None:
    with pytest.raises(UnsafeQuery, match=re.escape(message)):
        prepare_read_query(sql)


def test_error_codes_follow_clickhouse() -> None:
    with pytest.raises(UnsafeQuery) as refused:
        prepare_read_query("INSERT INTO t VALUES (1)")
    assert (refused.value.code, refused.value.name) == (164, "READONLY")
    with pytest.raises(UnsafeQuery) as multi:
        prepare_read_query("SELECT 1; SELECT 2")
    assert (multi.value.code, multi.value.name) == (62, "SYNTAX_ERROR")


def test_default_format_is_checked() -> None:
    assert prepare_read_query("SELECT 1", "JSONCompact").format == "JSONCompact"
    with pytest.raises(UnsafeQuery):
        prepare_read_query("SELECT 1", "JSON; DROP TABLE t")


def test_tokenizer_tracks_depth_and_quotes() -> None:
    toks = tokenize("SELECT f(a, 'x)') FROM t")
    assert [t.text for t in toks] == ["SELECT", "f", "(", "a", ",", "x)", ")", "FROM", "t"]
    assert [t.depth for t in toks] == [0, 0, 0, 1, 1, 1, 0, 0, 0]


def test_split_statements_ignores_semicolons_in_literals() -> None:
    assert split_statements("SELECT ';'; SELECT 2;\n-- trailing;\n") == ["SELECT ';'", "SELECT 2"]
