"""Projection DDL: migrations apply once, refuse edited history, and cover every Avro field."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from decimal import Decimal, localcontext
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from projections.migrations import MIGRATIONS_DIR, MigrationError, applied, discover, migrate
from projections.schema import (
    DEAD_LETTER_COLUMNS,
    DEAD_LETTERS,
    columns_for,
    dead_letter_row,
    event_tables,
    event_to_row,
    table_for,
)
from projections.sqlguard import split_statements
from projections.store import open_store
from streams.deadletter import DeadLetter
from streams.events import EVENT_TYPES, AuditRecorded, Envelope, PolicyDecided, TokensCharged
from streams.ids import uuid7
from streams.schemas import load_all


@pytest.fixture
def client(chdb_url: str, ch_database: str) -> Iterator[Client]:
    c = open_store(chdb_url, ch_database)
    yield c
    c.command(f"DROP DATABASE IF EXISTS {ch_database}")
    c.close()


def _columns(client: Client, db: str, table: str) -> list[tuple[str, str]]:
    rows = client.query(
        "SELECT name, type FROM system.columns WHERE database = {db:String} AND table = {t:String} ORDER BY position",
        parameters={"db": db, "t": table},
    ).result_rows
    return [(str(n), str(t)) for n, t in rows]


def test_migrations_apply_once_and_are_recorded(client: Client, ch_database: str) -> None:
    versions = [m.version for m in discover()]
    assert versions and versions[0] == 1
    assert migrate(client, ch_database) == versions
    assert migrate(client, ch_database) == []  # idempotent: nothing pending, nothing re-run
    recorded = applied(client, ch_database)
    assert sorted(recorded) == versions
    assert {c for _, c in recorded.values()} == {m.checksum for m in discover()}
    tables = {str(r[0]) for r in client.query(f"SHOW TABLES FROM {ch_database}").result_rows}
    assert set(event_tables().values()) | {DEAD_LETTERS, "schema_migrations"} <= tables


def test_edited_migration_is_refused(client: Client, ch_database: str, tmp_path: Path) -> None:
    copy = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, copy)
    migrate(client, ch_database, copy)
    first = sorted(copy.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- an innocent-looking edit\n")
    with pytest.raises(MigrationError, match="edited after it was applied"):
        migrate(client, ch_database, copy)


def test_new_migration_file_is_applied(client: Client, ch_database: str, tmp_path: Path) -> None:
    copy = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, copy)
    migrate(client, ch_database, copy)
    (copy / "0999_extra.sql").write_text("CREATE TABLE IF NOT EXISTS {db}.extra (a Int8) ENGINE = Memory;\n")
    assert migrate(client, ch_database, copy) == [999]
    assert client.command(f"EXISTS TABLE {ch_database}.extra") == 1


def test_badly_named_migration_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "1_oops.sql").write_text("SELECT 1")
    with pytest.raises(MigrationError, match="NNNN_lower_snake"):
        discover(tmp_path)


_AVRO_TO_CH = {"string": "String", "int": "Int32", "long": "Int64", "boolean": "Bool", "double": "Float64"}


def _expected_type(avro: Any) -> str:
    """The ClickHouse type (LowCardinality aside) an Avro type maps to."""
    if isinstance(avro, list):
        rest = [t for t in avro if t != "null"]
        assert len(rest) == 1 and "null" in avro, f"only [null, X] unions are mapped: {avro}"
        return f"Nullable({_expected_type(rest[0])})"
    if isinstance(avro, dict):
        if avro.get("logicalType") == "decimal":
            return f"Decimal({avro['precision']}, {avro['scale']})"
        if avro.get("logicalType") == "timestamp-micros":
            return "DateTime64(6, 'UTC')"
        if avro["type"] == "array":
            return f"Array({_expected_type(avro['items'])})"
        if avro["type"] == "map":
            return f"Map(String, {_expected_type(avro['values'])})"
        if avro["type"] == "record":  # nested records (PriceListPublished.prices): named tuples
            return "Tuple(" + ", ".join(f"{f['name']} {_expected_type(f['type'])}" for f in avro["fields"]) + ")"
        return _expected_type(avro["type"])
    return _AVRO_TO_CH[avro]


def _strip_low_cardinality(t: str) -> str:
    return t[len("LowCardinality(") : -1] if t.startswith("LowCardinality(") else t


def test_every_avro_field_has_a_column_of_the_mapped_type(client: Client, ch_database: str) -> None:
    """A schema change without a migration fails here, before it fails an insert."""
    migrate(client, ch_database)
    schemas = load_all()
    assert set(event_tables()) <= set(schemas) == set(EVENT_TYPES)
    for name in event_tables():
        schema = schemas[name]
        cols = dict(_columns(client, ch_database, table_for(name)))
        assert cols, f"no table for {name}"
        avro_fields = [f for f in schema.raw["fields"] if f["name"] != "envelope"]
        envelope = next(f for f in schema.raw["fields"] if f["name"] == "envelope")["type"]["fields"]
        for f in envelope + avro_fields:
            assert f["name"] in cols, f"{name}.{f['name']} has no column in {table_for(name)}: add a migration"
            got = _strip_low_cardinality(cols[f["name"]])
            want = _expected_type(f["type"])
            assert got == want, f"{name}.{f['name']}: column is {got}"
        assert cols["_topic"] == "LowCardinality(String)"
        assert (cols["_partition"], cols["_offset"]) == ("UInt16", "UInt64")
        assert cols["_ingested_at"] == "DateTime64(3, 'UTC')"


def test_insert_columns_match_table_order(client: Client, ch_database: str) -> None:
    migrate(client, ch_database)
    for name in event_tables():
        table_cols = [c for c, _ in _columns(client, ch_database, table_for(name))]
        assert table_cols == [*columns_for(name), "_ingested_at"]
    assert [c for c, _ in _columns(client, ch_database, DEAD_LETTERS)] == [*DEAD_LETTER_COLUMNS, "_ingested_at"]


def _env(event_type: str, tenant: str = "acme") -> Envelope:
    return Envelope(
        event_id=str(uuid7()),
        event_type=event_type,
        schema_version=1,
        tenant=tenant,
        occurred_at=datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC),
        correlation_id=str(uuid7()),
        producer="test",
        trace_parent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )


def test_decimal_and_time_round_trip_exactly(client: Client, ch_database: str) -> None:
    migrate(client, ch_database)
    tiny, huge = Decimal("0.000000000001"), Decimal("12345678901234567890123456.123456789012")
    ev = TokensCharged(
        envelope=_env("TokensCharged"),
        request_id="r1",
        model="gpt-x",
        prompt_tokens=3,
        completion_tokens=4,
        input_price_per_mtok=tiny,
        output_price_per_mtok=huge,
        price_list_version="p1",
        currency="EUR",
        cost=Decimal("1.100000000000"),
    )
    client.insert(table_for("TokensCharged"), [event_to_row(ev, "t", 2, 41)], column_names=columns_for("TokensCharged"))
    row = client.query(
        f"SELECT input_price_per_mtok, output_price_per_mtok, cost, occurred_at, _partition, _offset "
        f"FROM {ch_database}.tokens_charged"
    ).result_rows[0]
    assert row[0] == tiny and row[1] == huge and row[2] == Decimal("1.1")
    got_at = row[3] if row[3].tzinfo else row[3].replace(tzinfo=UTC)  # naive means the server zone, UTC here
    assert got_at == ev.envelope.occurred_at  # microseconds kept
    at = client.command(f"SELECT toString(occurred_at) FROM {ch_database}.tokens_charged")
    assert at == "2025-03-04 05:06:07.123456"
    assert row[4:] == (2, 41)
    total = client.command(f"SELECT toString(sum(output_price_per_mtok) + sum(cost)) FROM {ch_database}.tokens_charged")
    with localcontext() as ctx:
        ctx.prec = 60  # Python's default 28 digits would round the reference sum, not ClickHouse
        assert Decimal(str(total)) == huge + Decimal("1.1")


def test_arrays_maps_nullables_and_dead_letters(client: Client, ch_database: str) -> None:
    migrate(client, ch_database)
    pd = PolicyDecided(_env("PolicyDecided"), "r1", "deny", "v7", ["p1", "p2"], "ab" * 32)
    details = {"model": "m", "cost": "1"}
    au = AuditRecorded(_env("AuditRecorded"), "request.completed", "key-1", "r1", "success", details)
    client.insert("policy_decided", [event_to_row(pd, "t", 0, 1)], column_names=columns_for("PolicyDecided"))
    client.insert("audit_recorded", [event_to_row(au, "t", 0, 2)], column_names=columns_for("AuditRecorded"))
    assert client.query("SELECT determining_policies, causation_id FROM policy_decided").result_rows == [
        (["p1", "p2"], None)
    ]
    assert client.query("SELECT details['model'], details FROM audit_recorded").result_rows[0][1] == au.details
    dl = DeadLetter("undecodable-body", "EOFError", "t", 1, 9, "sink", datetime.now(UTC), b"acme", b"\xc3\x01\xff\x00")
    client.insert(DEAD_LETTERS, [dead_letter_row(dl, "t", 1, 9)], column_names=DEAD_LETTER_COLUMNS)
    got = client.query(
        "SELECT base64Decode(value_base64) = unhex('C301FF00'), key_base64, value_size FROM dead_letters"
    )
    assert got.result_rows == [(True, "YWNtZQ==", 4)]


def test_split_statements_respects_quotes_and_comments() -> None:
    sql = "CREATE TABLE a (s String DEFAULT ';'); -- c; x\n/* ; */ SELECT 'it''s;'  ;\n;"
    assert split_statements(sql) == ["CREATE TABLE a (s String DEFAULT ';')", "SELECT 'it''s;'"]


def test_policy_views_count_decisions_by_policy_and_obligation(client: Client, ch_database: str) -> None:
    """Issue 5's ClickHouse projection of denials and obligations, over real rows."""
    from projections.schema import columns_for, event_to_row
    from tests import factories

    migrate(client, ch_database)
    allow = factories.decision("acme")  # allow, obligations redact:email + region:eu
    deny = dataclasses.replace(
        factories.decision("acme"), decision="deny", determining_policies=["residency-eu-pinned-model"], obligations=[]
    )
    rows = [event_to_row(e, "t.policy-decisions", 0, i) for i, e in enumerate([allow, allow, deny])]
    client.insert("policy_decided", rows, column_names=list(columns_for("PolicyDecided")))
    by_policy = client.query(
        "SELECT decision, policy, sum(decisions) FROM policy_decisions_by_policy GROUP BY 1, 2 ORDER BY 1, 2"
    ).result_rows
    assert by_policy == [("allow", "default-allow", 2), ("deny", "residency-eu-pinned-model", 1)]
    kinds = client.query(
        "SELECT kind, value, sum(decisions) FROM policy_obligations_by_kind GROUP BY kind, value ORDER BY 1"
    ).result_rows
    assert kinds == [("redact", "email", 2), ("region", "eu", 2)]
