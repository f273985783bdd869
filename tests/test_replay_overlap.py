"""The replay's DDL beside its inserts, and blocks built ahead by the driver (issue 10, session 8).

A fresh target's tables are made in a thread (`SchemaBuild`) while the log is read: each table
is used once the last statement naming it ran. The driver builds the RowBinary block of a job
queued behind the insert in flight (`Sink._prebuild`). Neither may change what lands.
"""

from __future__ import annotations

import dataclasses
import re
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from projections import replay as replay_module
from projections.migrations import MIGRATIONS_TABLE, discover, migrate
from projections.replay import (
    FAILED,
    ReplayJob,
    ReplayRequest,
    SchemaBuild,
    SchemaBuildFailed,
    check,
    known_tables,
    tables_touched,
)
from projections.sink import Sink
from projections.store import LockedStore, open_store
from streams.codec import Codec
from streams.topics import Topics
from tests import factories
from tests.test_projections_sink import counts, encoded, expected_counts, make_events, produce, run_until
from tests.test_replay import _schema, _sql, extra_dbs  # noqa: F401  (fixture)
from tests.test_sink_native import _corruptions

CODEC = Codec()


def test_tables_touched_reads_every_qualified_name() -> None:
    stmt = (
        "CREATE MATERIALIZED VIEW IF NOT EXISTS db1.charges_daily_mv TO db1.charges_daily AS "
        "SELECT c.tenant FROM db1.tokens_charged AS c LEFT JOIN db10.other USING (x)"
    )
    assert tables_touched(stmt, "db1") == {"charges_daily_mv", "charges_daily", "tokens_charged"}


def test_a_schema_build_makes_what_migrate_makes_and_a_table_is_ready_with_its_views(
    chdb_url: str,
    extra_dbs: list[str],  # noqa: F811
) -> None:
    tag = uuid.uuid4().hex[:8]
    ref, new = f"sb_ref_{tag}", f"sb_new_{tag}"
    extra_dbs.extend([ref, new])
    a = open_store(chdb_url, ref)
    b = open_store(chdb_url, new)
    try:
        versions = migrate(a, ref)
        seen: dict[str, set[str]] = {}
        build = SchemaBuild(chdb_url, new).start()
        # tokens_charged is ready once its later ALTERs ran and the materialized view reading it exists
        build.wait_for("tokens_charged")
        seen["columns"] = {
            str(r[0])
            for r in b.query(
                "SELECT name FROM system.columns WHERE database = {d:String} AND table = 'tokens_charged'",
                parameters={"d": new},
            ).result_rows
        }
        seen["views"] = {
            str(r[0])
            for r in b.query(
                "SELECT name FROM system.tables WHERE database = {d:String} AND engine = 'MaterializedView'",
                parameters={"d": new},
            ).result_rows
        }
        assert {"baseline_model", "baseline_cost", "savings"} <= seen["columns"]
        assert "charges_daily_mv" in seen["views"]
        assert build.join() == versions
        assert _schema(b, new) == _schema(a, ref)
        recorded = f"SELECT version, name, checksum FROM {MIGRATIONS_TABLE} ORDER BY version"
        assert b.query(recorded).result_rows == a.query(recorded).result_rows
        # a built database is migrated: `migrate` (the replay's path for it) applies nothing more,
        # and another build of it is refused
        assert migrate(b, new) == []
        assert len(b.query(recorded).result_rows) == len(versions)
        with pytest.raises(SchemaBuildFailed, match="not fresh"):
            SchemaBuild(chdb_url, new).start().join()
    finally:
        a.close()
        b.close()


def _broken_discover(real: Callable[[], list[Any]]) -> Callable[[], list[Any]]:
    """The migrations with a statement ClickHouse refuses in the middle of the second file."""

    def discover() -> list[Any]:
        ms = real()
        bad = dataclasses.replace(ms[1], sql=ms[1].sql + "\n;\nCREATE TABLE {db}.broken (x NoSuchType) ENGINE = Log;\n")
        return [ms[0], bad, *ms[2:]]

    return discover


def test_a_failed_schema_build_fails_every_waiter_and_records_nothing(
    chdb_url: str,
    extra_dbs: list[str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(replay_module, "discover", _broken_discover(replay_module.discover))
    name = f"sb_bad_{uuid.uuid4().hex[:8]}"
    extra_dbs.append(name)
    build = SchemaBuild(chdb_url, name).start()
    build.wait_for("request_received")  # made by the first file, before the failure: ready
    with pytest.raises(SchemaBuildFailed, match=r"NoSuchType|broken"):
        build.wait_for("tokens_charged")  # its ALTERs come after the failure
    with pytest.raises(SchemaBuildFailed):
        build.join()
    client = open_store(chdb_url, name)
    try:
        assert client.query(f"SELECT count() FROM {MIGRATIONS_TABLE}").result_rows == [(0,)]  # nothing recorded
    finally:
        client.close()


@pytest.mark.kafka
def test_a_replay_whose_ddl_fails_fails_with_the_reason_and_a_good_one_equals_the_live_tables(
    kafka_bootstrap: str,
    topics: Topics,
    store: Client,
    chdb_url: str,
    new_sink: Callable[..., Sink],
    extra_dbs: list[str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = make_events(240)
    poison = [(topics.name("token-charges"), b"acme", b"not avro"), (topics.name("audit"), b"hooli", None)]
    produce(kafka_bootstrap, encoded(topics, events[:120]) + poison + encoded(topics, events[120:]))
    live = new_sink()
    want = expected_counts(events, dead=len(poison))
    run_until(live, lambda: counts(store) == want)
    live.close()

    def job(into: str) -> ReplayJob:
        extra_dbs.append(into)
        req = ReplayRequest(into, tuple(known_tables()))
        return ReplayJob(req, store_url=chdb_url, bootstrap=kafka_bootstrap, topics=topics, batch_ms=100)

    with monkeypatch.context() as m:
        m.setattr(replay_module, "discover", _broken_discover(replay_module.discover))
        failing = job(f"{store.database}_ddl_bad")
        with pytest.raises(Exception, match=r"NoSuchType|broken"):
            failing.run()
        assert failing.status()["state"] == FAILED and "NoSuchType" in str(failing.status()["error"])

    good = job(f"{store.database}_ddl_ok")
    status = good.run()
    assert status["state"] == "done" and status["rows"] == len(events) and status["dead_letters"] == len(poison)
    report = check(_sql(store), str(store.database), good.request.into)
    assert report.equal, report.render()


class SlowStore(LockedStore):
    """The real store, each insert held back a little: jobs queue behind the one in flight."""

    def __init__(self, client: Client, delay: float) -> None:
        super().__init__(client)
        self.delay = delay

    def call(self, fn: Callable[[Client], Any]) -> Any:
        time.sleep(self.delay)
        return super().call(fn)


@pytest.mark.kafka
def test_blocks_built_ahead_by_the_driver_land_what_the_inserter_would_poison_included(
    kafka_bootstrap: str, topics: Topics, store: Client, new_sink: Callable[..., Sink]
) -> None:
    events = make_events(600)
    bad = [_corruptions()["decimal above its precision"], _corruptions()["union index 2 (read as NULL by ClickHouse)"]]
    ok = [CODEC.encode(factories.charge()) for _ in range(40)]
    charges = topics.name("token-charges")
    records = encoded(topics, events[:300]) + [(charges, b"acme", v) for v in ok[:20]]
    records += [(charges, b"acme", v) for v in bad] + [(charges, b"acme", v) for v in ok[20:]]
    records += encoded(topics, events[300:])
    produce(kafka_bootstrap, records)
    want = expected_counts(events, dead=len(bad))
    want["tokens_charged"] += len(ok)

    sink = new_sink(store_=SlowStore(store, 0.05), batch_max=20, batch_ms=20, native=True)
    run_until(sink, lambda: counts(store) == want, timeout=90)
    assert sink.prebuilt_blocks > 0, sink.status()  # the driver built blocks while inserts queued
    assert sink.dead_lettered == len(bad) and sink.fast_fallbacks >= 1
    assert sink.native_rows == sink.fast_rows > 0
    ids = [str(r[0]) for r in store.query("SELECT event_id FROM tokens_charged").result_rows]
    assert len(ids) == len(set(ids))


def test_every_migration_names_its_tables_with_the_database() -> None:
    """SchemaBuild's readiness rule reads `{db}.name`: a view reading an unqualified table would
    make that table "ready" before the view exists (its target would miss rows). So every name
    after FROM/JOIN/TO/INTO/TABLE/VIEW in a migration is qualified."""
    named = re.compile(r"(?<!ARRAY )\b(FROM|JOIN|TO|INTO|TABLE|VIEW)\s+(?:IF NOT EXISTS\s+)?([^\s(,;]+)", re.I)
    found: list[tuple[int, str]] = []
    for m in discover():
        for stmt in m.statements("zdb"):
            found += [(m.version, name) for _kw, name in named.findall(stmt)]
    assert ("zdb.tokens_charged" in {n for _, n in found}) and len(found) > 60  # the pattern does read them
    assert [(v, n) for v, n in found if not n.startswith("zdb.")] == []
