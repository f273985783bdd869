"""Replay: rebuild projections from the log into another database, then check it against the live one.

Real broker and real chDB: in-process (the replay module driving a Sink), through the service's
HTTP endpoints, and through the whole platform with `ledgerflow replay` / `replay --check`.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from clickhouse_connect.driver.client import Client

from ledgerflow import cli
from ledgerflow.replay import progress_line
from projections.access import ReadAccess
from projections.replay import (
    BadReplayRequest,
    ReplayJob,
    ReplayRequest,
    TargetNotEmpty,
    check,
    finished,
    known_tables,
    parse_request,
    progress,
    record_filter,
    topics_for,
)
from projections.schema import DEAD_LETTERS, columns_for, event_to_row
from projections.service import ProjectionService
from projections.store import open_store
from streams.admin import admin
from streams.topics import Topics
from tests.kafka_helpers import read_all
from tests.test_projections_sink import (
    counts,
    encoded,
    expected_counts,
    make_event,
    make_events,
    produce,
    run_until,
)

# --- pure ----------------------------------------------------------------------------------


def test_requests_are_validated_with_the_fix_named() -> None:
    ok = parse_request({"into": "rebuilt", "tables": ["tokens_charged"], "since": "2025-01-31"}, "ledgerflow")
    assert ok.tables == ("tokens_charged",) and ok.since == datetime(2025, 1, 31, tzinfo=UTC)
    assert parse_request({"into": "r", "tables": None}, "lf").tables == tuple(known_tables())
    assert parse_request({"into": "r", "since": "2025-01-31T12:00:00+02:00"}, "lf").since == datetime(
        2025, 1, 31, 10, tzinfo=UTC
    )
    bad = [
        ({"into": "live"}, "must differ from the live database"),
        ({"into": "no-dash"}, "not a plain identifier"),
        ({"into": "system"}, "reserved"),
        ({}, "'into' is required"),
        ({"into": "r", "tables": ["nope", "tokens_charged"]}, "unknown table(s) nope: choose from"),
        ({"into": "r", "since": "yesterday"}, "not an ISO-8601 time"),
        ({"into": "r", "colour": "red"}, "unknown field(s) colour"),
        (["r"], "send a JSON object"),
    ]
    for body, needle in bad:
        with pytest.raises(BadReplayRequest, match=needle.replace("(", r"\(").replace(")", r"\)")):
            parse_request(body, "live")


def test_topics_filter_and_progress() -> None:
    t = Topics("x.", 3)
    assert topics_for(["tokens_charged"], t) == ["x.token-charges"]
    assert topics_for(["request_received", "request_redacted"], t) == ["x.requests"]
    assert topics_for([DEAD_LETTERS], t) == t.all()  # every topic can dead-letter

    charge = make_event(2, "acme", 1)
    since = datetime.now(UTC)
    keep = record_filter(["tokens_charged", DEAD_LETTERS], since, {("x.token-charges", 0): 10})
    row = event_to_row(charge, "x.token-charges", 0, 3)
    cols = columns_for("TokensCharged")
    assert not keep("tokens_charged", cols, row)  # built before `since`
    newer = make_event(2, "acme", 2)
    assert keep("tokens_charged", cols, event_to_row(newer, "x.token-charges", 0, 9))
    assert not keep("tokens_charged", cols, event_to_row(newer, "x.token-charges", 0, 10))  # past the end
    assert not keep("tokens_charged", cols, event_to_row(newer, "x.token-charges", 1, 0))  # unknown partition
    assert not keep("request_received", columns_for("RequestReceived"), event_to_row(newer, "x.token-charges", 0, 1))

    bounds = {("a", 0): (0, 10), ("a", 1): (5, 5), ("b", 0): (2, 12)}
    assert progress(bounds, {}) == (0, 20)
    assert progress(bounds, {("a", 0): 4, ("b", 0): 50}) == (14, 20)  # past the end counts as the end
    assert not finished(bounds, {("a", 0): 10})
    assert finished(bounds, {("a", 0): 10, ("b", 0): 12})
    line = progress_line({"into": "r", "total": 200, "done": 50, "rate_per_s": 25.0, "eta_s": 6, "phase": "consuming"})
    assert "25.0%" in line and "50/200 offsets" in line and "ETA 00:06" in line and "#######-" in line


# --- in process: replay module + Sink, real broker, real chDB -------------------------------


def _sql(client: Client) -> Any:
    return lambda sql: client.raw_query(sql, fmt="TabSeparated").decode()


@pytest.fixture
def extra_dbs(chdb_url: str) -> Iterator[list[str]]:
    names: list[str] = []
    yield names
    client = open_store(chdb_url, "default")
    for name in names:
        client.command(f"DROP DATABASE IF EXISTS {name}")
    client.close()


def _schema(client: Client, database: str) -> list[tuple[str, str, str]]:
    """(table, engine, its CREATE statement with the database's name taken out) of every table."""
    rows = client.query(
        "SELECT name, engine, replaceAll(create_table_query, {db:String}, 'DB') FROM system.tables "
        "WHERE database = {db:String} ORDER BY name",
        parameters={"db": database},
    ).result_rows
    return [(str(n), str(e), str(q)) for n, e, q in rows]


def _replay(chdb_url: str, kafka_bootstrap: str, topics: Topics, into: str, **kw: Any) -> dict[str, Any]:
    req = ReplayRequest(into, tuple(kw.pop("tables", known_tables())), kw.pop("since", None))
    return ReplayJob(req, store_url=chdb_url, bootstrap=kafka_bootstrap, topics=topics, batch_ms=100, **kw).run()


@pytest.mark.kafka
def test_replay_rebuilds_equal_tables_and_check_finds_a_stray_row(
    kafka_bootstrap: str, topics: Topics, store: Client, ch_database: str, chdb_url: str, new_sink: Any, extra_dbs: Any
) -> None:
    older = make_events(300)
    cut = datetime.now(UTC)
    newer = make_events(100)
    poison = [(topics.name("token-charges"), b"acme", b"not avro"), (topics.name("audit"), b"hooli", None)]
    produce(kafka_bootstrap, encoded(topics, older) + poison + encoded(topics, newer))
    live = new_sink()
    want = expected_counts(older + newer, dead=len(poison))
    run_until(live, lambda: counts(store) == want)
    live.close()

    rebuilt = f"{ch_database}_b"
    extra_dbs.append(rebuilt)
    status = _replay(chdb_url, kafka_bootstrap, topics, rebuilt)
    assert status["state"] == "done" and status["error"] is None
    # assigned, not subscribed, and nothing committed: the replay leaves no consumer group behind
    listed = admin(kafka_bootstrap).list_consumer_groups(request_timeout=10).result(10)
    assert status["group"] not in {g.group_id for g in listed.valid}
    assert status["done"] == status["total"] >= len(older + newer) + len(poison)
    assert status["rows"] == len(older + newer) and status["dead_letters"] == len(poison)
    b = open_store(chdb_url, rebuilt)
    try:
        assert counts(b) == want
        report = check(_sql(store), ch_database, rebuilt)
        assert report.equal, report.render()
        assert [t.live_rows for t in report.tables] == [t.into_rows for t in report.tables]
        assert {t.table: t.into_rows for t in report.tables if t.table in want} == want
        # The replay landed the dead letters but did not put them on the DLQ topics a second time.
        dlq = read_all(kafka_bootstrap, [topics.dlq(t) for t in topics.all()], expect=len(poison), timeout=5)
        assert len(dlq) == len(poison)

        # A row the log does not hold: the check names the table and the partition.
        stray = make_event(2, "acme", 99)
        stray_row = event_to_row(stray, topics.name("token-charges"), 1, 10**6)
        b.insert("tokens_charged", [stray_row], columns_for(stray.event_type))
        report = check(_sql(store), ch_database, rebuilt)
        assert not report.equal
        bad = {t.table: t for t in report.tables if not t.equal}
        assert list(bad) == ["tokens_charged"]
        assert bad["tokens_charged"].into_rows == bad["tokens_charged"].live_rows + 1
        assert f"{topics.name('token-charges')}[1]" in "\n".join(bad["tokens_charged"].problems)
        assert "DIFFERENT" in report.render()
    finally:
        b.close()
    with pytest.raises(TargetNotEmpty, match="already holds"):
        _replay(chdb_url, kafka_bootstrap, topics, rebuilt)

    # --tables: only those tables are rebuilt, from only their topics.
    only = f"{ch_database}_c"
    extra_dbs.append(only)
    status = _replay(chdb_url, kafka_bootstrap, topics, only, tables=["tokens_charged"])
    assert status["state"] == "done" and status["topics"] == [topics.name("token-charges")]
    c = open_store(chdb_url, only)
    try:
        got = counts(c)
        assert got["tokens_charged"] == want["tokens_charged"]
        assert sum(got.values()) == want["tokens_charged"]  # nothing else, not even the token-charges poison
        assert check(_sql(store), ch_database, only, ["tokens_charged"]).equal
        assert not check(_sql(store), ch_database, only, ["request_received"]).equal
    finally:
        c.close()

    # --since: events older than T are left out; the check applies the same filter to the live side.
    recent = f"{ch_database}_d"
    extra_dbs.append(recent)
    status = _replay(chdb_url, kafka_bootstrap, topics, recent, since=cut)
    assert status["state"] == "done" and status["rows"] == len(newer)
    d = open_store(chdb_url, recent)
    try:
        assert counts(d) == expected_counts(newer, dead=len(poison))
        assert check(_sql(store), ch_database, recent, since=cut).equal
        assert not check(_sql(store), ch_database, recent).equal
    finally:
        d.close()


# --- the service's endpoints -----------------------------------------------------------------


@pytest.mark.kafka
async def test_service_endpoints_start_report_refuse_and_finish(
    kafka_bootstrap: str, topics: Topics, chdb_url: str, extra_dbs: Any
) -> None:
    live = f"t_{uuid.uuid4().hex[:12]}"
    extra_dbs.extend([live, f"{live}_r"])
    await asyncio.to_thread(produce, kafka_bootstrap, encoded(topics, make_events(200)))
    svc = ProjectionService(
        access=ReadAccess.open(),
        store_url=chdb_url,
        database=live,
        bootstrap=kafka_bootstrap,
        topics=topics,
        run_sink=False,
        sql_handles=1,
    )
    await asyncio.to_thread(svc.start)
    try:
        async with TestClient(TestServer(svc.make_app(), host="127.0.0.1")) as http:
            idle = orjson.loads(await (await http.get("/replay/status")).read())
            assert idle["state"] == "idle" and idle["into"] is None
            for body, needle in [
                ({"into": live}, "must differ from the live database"),
                ({"into": "a b"}, "not a plain identifier"),
                ({"into": "r", "tables": ["nope"]}, "unknown table(s) nope"),
            ]:
                r = await http.post("/replay", json=body)
                assert r.status == 400 and needle in (await r.json())["error"]
            assert (await http.post("/replay", data=b"{not json")).status == 400

            r = await http.post("/replay", json={"into": f"{live}_r", "tables": None, "since": None})
            assert r.status == 202, await r.text()
            first = await r.json()
            assert first["into"] == f"{live}_r" and first["tables"] == known_tables()
            busy = await http.post("/replay", json={"into": f"{live}_s"})
            assert busy.status == 409 and "is running" in (await busy.json())["error"]
            deadline = time.monotonic() + 30
            while True:
                status = orjson.loads(await (await http.get("/replay/status")).read())
                if status["state"] not in ("pending", "running"):
                    break
                assert time.monotonic() < deadline, status
                await asyncio.sleep(0.1)
            assert status["state"] == "done", status
            assert status["rows"] == 200 and status["done"] == status["total"] == 200 and status["eta_s"] == 0.0
            assert {"rate_per_s", "started_at", "finished_at", "error"} <= set(status)
            assert (await http.delete("/replay")).status == 409  # nothing left to cancel
            again = await http.post("/replay", json={"into": f"{live}_r"})
            assert again.status == 409 and "already holds 200 rows" in (await again.json())["error"]
            q = await http.get("/", params={"query": f"SELECT count() FROM {live}_r.tokens_charged"})
            assert int(await q.text()) == expected_counts(make_events(200))["tokens_charged"]
    finally:
        await asyncio.to_thread(svc.stop)


# --- the whole platform: `ledgerflow replay` and `ledgerflow replay --check` ------------------


@pytest.mark.kafka
@pytest.mark.slow
def test_cli_replay_and_check_through_the_running_platform(
    kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory, capsys: pytest.CaptureFixture[str]
) -> None:
    from ledgerflow.settings import DEMO_KEYS
    from tests.platform import running_platform
    from tests.test_e2e import FACT_TABLES, post_many, wait_for

    with pytest.MonkeyPatch.context() as mp, running_platform(mp, kafka_bootstrap, tmp_path_factory.mktemp("rp")) as p:
        tenants = sorted(DEMO_KEYS)
        n = 60
        bodies: list[tuple[str, object]] = [(DEMO_KEYS[tenants[i % 3]], {"prompt": f"replay me {i}"}) for i in range(n)]
        assert [s for s, _ in asyncio.run(post_many(p.settings.gateway_url, bodies))] == [200] * n

        def caught_up() -> bool:
            landed = [int(p.scalar(f"SELECT count() FROM {t}")) for t in FACT_TABLES]
            totals = p.sql("SELECT tenant, max(requests) FROM tenant_totals_updated GROUP BY tenant")
            return landed == [n] * 4 and sorted(int(r[1]) for r in totals) == [n // 3] * 3

        wait_for(caught_up, what="facts and the agents' totals in ClickHouse")
        time.sleep(0.5)  # nothing else in flight: the live database is what the log holds

        capsys.readouterr()
        assert cli.main(["replay", "--into", "rebuilt"]) == 0
        out, err = capsys.readouterr()
        assert "\r" in err and "100.0%" in err and "ETA" in err
        assert "replayed" in out and "rows/s" in out
        for table in [*FACT_TABLES, "tenant_totals_updated"]:
            live_rows = p.scalar(f"SELECT count() FROM {table}")
            assert p.scalar(f"SELECT count() FROM rebuilt.{table}") == live_rows, table

        assert cli.main(["replay", "--check", "--into", "rebuilt"]) == 0
        out, _ = capsys.readouterr()
        assert "rebuilt equals" in out and "DIFFERENT" not in out
        assert "tokens_charged" in out

        # A database that holds rows is not filled again unless it is replaced.
        assert cli.main(["replay", "--into", "rebuilt"]) == 1
        assert "already holds" in capsys.readouterr().err
        # Partial rebuild and a check that sees what is missing.
        assert cli.main(["replay", "--into", "partial", "--tables", "tokens_charged"]) == 0
        assert cli.main(["replay", "--check", "--into", "partial", "--tables", "tokens_charged"]) == 0
        assert cli.main(["replay", "--check", "--into", "partial"]) == 1
        out, _ = capsys.readouterr()
        assert "DIFFERENT" in out and "request_received" in out
        assert cli.main(["replay", "--into", "partial", "--replace"]) == 0  # dropped, then rebuilt whole
        assert cli.main(["replay", "--check", "--into", "partial"]) == 0
        # Refusals carry the fix and a non-zero exit.
        assert cli.main(["replay", "--into", p.settings.clickhouse_database]) == 2
        assert "must differ from the live database" in capsys.readouterr().err
        with contextlib.redirect_stderr(io.StringIO()):
            assert cli.main(["replay", "--into", "x", "--tables", "nope"]) == 2
