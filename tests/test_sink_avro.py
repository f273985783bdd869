"""The sink's Avro fast path against real chDB: the same table contents as the row path, or a refusal.

The row path (Codec.decode → event_to_row → clickhouse-connect insert) is the reference. For
every projected event type, with edge values (money at full scale and precision, negative
and zero amounts, nulls, empty and unicode arrays and maps, unicode tenants) and with records
written by an older schema version, the Avro block path must give byte-identical rows.
Where the Codec refuses a record, ClickHouse must refuse the block (the sink then decodes it):
a fixed list of corruptions ClickHouse would otherwise take silently, then seeded random
mutations (the poison fuzzer's) with "fast path accepts ⇒ the Codec accepts, same row".
"""

from __future__ import annotations

import dataclasses
import io
import random
import typing
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import KafkaError, Message
from fastavro import schemaless_writer

from projections import avro_block
from projections.kafka_reader import items_of
from projections.migrations import migrate
from projections.replay import check
from projections.schema import columns_for, event_tables, event_to_row, table_for
from projections.sink import Keep, Sink, _FastSeg, _Partition
from projections.store import open_store
from streams.codec import HEADER_LEN, MAGIC, Codec, PoisonEvent
from streams.events import Event
from streams.evolution import load_fixtures
from streams.ids import uuid7
from streams.topics import Topics
from tests import factories
from tests.store_helpers import migrated_databases
from tests.test_poison_fuzz import mutate
from tests.test_projections_sink import counts, encoded, expected_counts, make_events, produce, run_until

CODEC = Codec()
PARTITION = 2


def _builders() -> dict[str, Callable[..., Event]]:
    """event type → a factories builder of it (every builder is called once to see its type)."""
    out: dict[str, Callable[..., Event]] = {}
    for name in dir(factories):
        fn = getattr(factories, name)
        if callable(fn) and not name.startswith("_") and getattr(fn, "__module__", "") == factories.__name__:
            try:
                made = fn()
            except TypeError:
                continue
            if isinstance(made, Event):
                out.setdefault(made.event_type, fn)
    return out


BUILDERS = _builders()


@pytest.fixture(scope="module")
def two_stores(chdb_url: str) -> Iterator[tuple[Client, Client]]:
    """(row path database, fast path database), migrated once for the module; tests tell their rows
    apart by topic (`topic` fixture)."""
    with migrated_databases(chdb_url, "rows", "fast") as (first, second):
        yield first, second


@pytest.fixture
def topic() -> str:
    return f"lf.t{uuid.uuid4().hex[:10]}"


def _plans(client: Client) -> dict[bytes, avro_block.Plan]:
    """header → Plan for every writer whose table the store has (all of them, once migrations caught up)."""
    writers = avro_block.writers()
    tables = sorted({table_for(w.event_type) for w in writers.values() if w.event_type in event_tables()})
    types = avro_block.table_types(client.query(avro_block.TABLE_TYPES_SQL, parameters={"tables": tables}).result_rows)
    out = {}
    for header, w in writers.items():
        if w.event_type not in event_tables():
            continue
        try:
            out[header] = avro_block.plan(w, types.get(table_for(w.event_type), {}))
        except avro_block.Unsupported:
            continue
    return out


# --- edge values ---------------------------------------------------------------------------


def _hint(cls: type, name: str) -> Any:
    return typing.get_type_hints(cls)[name]


def _edge(value: Any, hint: Any, k: int) -> Any:
    """The k-th edge value of a field of type `hint` (current `value` as the template)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if optional else hint
    if optional and k == 1:
        return None
    origin = typing.get_origin(base) or base
    if origin is Decimal:
        return [
            Decimal("99999999999999999999999999.999999999999"),
            Decimal("-0.000000000001"),
            Decimal(0),
            Decimal("-12345678901234.567890123456"),
        ][k % 4]
    if origin is str:
        return ["ünïcødé ✓ 𝄞", "", "x" * 300, "tab\tnew\nline 'quote' \\"][k % 4]
    if origin is list:
        item = (typing.get_args(base) or (str,))[0]
        if item is str:
            return [["ü", "", "𝄞"], [], ["a"] * 20, ["x"]][k % 4]
        return value
    if origin is dict:
        vt = (typing.get_args(base) or (str, str))[1]
        if vt is str:
            return [{"ü": "ß", "": "empty"}, {}, {"k": "v"}, {"a": "1", "b": "2"}][k % 4]
        if vt is int:
            return [{"email": 3, "ü": -1}, {}, {"k": 2**31 - 1}, {"n": -(2**31)}][k % 4]
        return value
    if origin is bool:
        return k % 2 == 0
    if origin is int:
        return [2**31 - 1, -(2**31), 0, 7][k % 4] if isinstance(value, int) else value
    if origin is float:
        return [0.1, -1e300, 0.0, 2.5][k % 4]
    return value


def variants(event: Event) -> list[Event]:
    """The event, then four variants with edge values in every payload field and the envelope."""
    out = [event]
    cls = type(event)
    for k in range(4):
        changes = {}
        for f in dataclasses.fields(event):
            if f.name == "envelope":
                continue
            changes[f.name] = _edge(getattr(event, f.name), _hint(cls, f.name), k)
        env = dataclasses.replace(
            event.envelope,
            tenant=["tënant ü", "acme", "  padded  ", "t" * 100][k],
            trace_parent=None if k % 2 else "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            causation_id=None if k % 2 else str(uuid7()),
            event_id=str(uuid7()),
            occurred_at=datetime(2024, 2, 29, 23, 59, 59, 999999, tzinfo=UTC) + timedelta(days=k * 200),
        )
        try:
            out.append(dataclasses.replace(event, envelope=env, **changes))
        except (TypeError, ValueError):
            out.append(dataclasses.replace(event, envelope=env))
    return out


def _old_versions() -> list[bytes]:
    """Records written by every released version that is not today's: the fixture samples and re-encodings."""
    out = []
    today = {MAGIC + s.fingerprint for s in CODEC._by_name.values()}
    for name, versions in load_fixtures().items():
        builder = BUILDERS.get(name)
        for fx in versions:
            if MAGIC + fx.schema.fingerprint in today:
                continue
            if fx.sample:
                out.append(fx.sample)
            if builder is not None:
                fields = {f["name"] for f in fx.schema.raw["fields"]}
                for e in variants(builder()):
                    rec = {k: v for k, v in e.to_record().items() if k in fields}
                    buf = io.BytesIO()
                    buf.write(MAGIC + fx.schema.fingerprint)
                    schemaless_writer(buf, fx.schema.parsed, rec)
                    out.append(buf.getvalue())
    return out


def _row_path(client: Client, topic: str, values: list[bytes], offsets: list[int]) -> None:
    by_table: dict[str, tuple[tuple[str, ...], list[list[Any]]]] = {}
    for value, offset in zip(values, offsets, strict=True):
        event = CODEC.decode(value)

        cols, rows = by_table.setdefault(table_for(event.event_type), (columns_for(event.event_type), []))
        rows.append(event_to_row(event, topic, PARTITION, offset))
    for table, (cols, rows) in by_table.items():
        client.insert(table, rows, column_names=cols)


def _fast_path(
    client: Client, plans: dict[bytes, avro_block.Plan], topic: str, values: list[bytes], offsets: list[int]
) -> None:
    """One block per writer schema (what the sink does per run)."""
    groups: dict[bytes, tuple[list[int], list[bytes]]] = {}
    for value, offset in zip(values, offsets, strict=True):
        o, v = groups.setdefault(value[:HEADER_LEN], ([], []))
        o.append(offset)
        v.append(value)
    for header, (o, v) in groups.items():
        p = plans[header]
        data = avro_block.block(p, topic, PARTITION, o, v)
        avro_block.insert_block(client, p, data, avro_block.parameters(topic, PARTITION, o[0], o[-1]))


def _contents(client: Client, table: str, topic: str) -> tuple[list[tuple[Any, ...]], str]:
    cols = [
        r[0]
        for r in client.query(
            "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {t:String} "
            "AND name != '_ingested_at' ORDER BY position",
            parameters={"t": table},
        ).result_rows
    ]
    listed = ", ".join(f"`{c}`" for c in cols)
    where = {"topic": topic}
    rows = client.query(
        f"SELECT {listed} FROM {table} WHERE _topic = {{topic:String}} ORDER BY _offset", parameters=where
    ).result_rows
    checksum = client.command(
        f"SELECT count(), sum(cityHash64(tuple({listed}))) FROM {table} WHERE _topic = {{topic:String}}",
        parameters=where,
    )
    return [tuple(r) for r in rows], str(checksum)


# --- the differential test ---------------------------------------------------------------------


def test_fast_path_rows_equal_the_row_path_for_every_event_type_edge_values_and_old_versions(
    two_stores: tuple[Client, Client], topic: str
) -> None:
    rows_db, fast_db = two_stores
    plans = _plans(fast_db)
    covered = {p.event_type for p in plans.values()}
    # The core facts must take the fast path (a table the fast path cannot fill takes the Codec's).
    assert {"RequestReceived", "PolicyDecided", "TokensCharged", "AuditRecorded", "TenantTotalsUpdated"} <= covered
    values: list[bytes] = []
    for name in sorted(covered):
        builder = BUILDERS.get(name)
        assert builder is not None, f"no factories builder for {name}"
        for e in variants(builder()):
            try:
                value = CODEC.encode(e)
                CODEC.decode(value)
            except (PoisonEvent, ValueError, TypeError, OverflowError):
                continue  # an edge value this event refuses (e.g. a constrained field): not a row
            values.append(value)
    old = [v for v in _old_versions() if v[:HEADER_LEN] in plans]
    assert old, "no older schema version to check (schemas/fixtures)"
    values += old
    offsets = list(range(1000, 1000 + 2 * len(values), 2))  # gaps, as transaction markers leave
    _row_path(rows_db, topic, values, offsets)
    _fast_path(fast_db, plans, topic, values, offsets)
    tables = sorted({p.table for p in plans.values()})
    landed = 0
    for table in tables:
        a, sum_a = _contents(rows_db, table, topic)
        b, sum_b = _contents(fast_db, table, topic)
        assert b == a, table
        assert sum_b == sum_a, table
        landed += len(a)
    assert landed == len(values)
    # money really went through at full precision, and older versions got the reader's defaults
    top = fast_db.command(
        "SELECT countIf(cost = toDecimal128('99999999999999999999999999.999999999999', 12)) FROM tokens_charged "
        "WHERE _topic = {topic:String}",
        parameters={"topic": topic},
    )
    assert int(str(top)) >= 1
    v1 = [v for v in old if CODEC.decode(v).event_type == "PolicyDecided"]
    empty = fast_db.command(
        "SELECT countIf(empty(obligations)) FROM policy_decided WHERE _topic = {topic:String}",
        parameters={"topic": topic},
    )
    assert v1 and int(str(empty)) >= len(v1)


# --- refusals: what the Codec refuses, ClickHouse refuses -----------------------------------------


def _charge_bytes(**changes: Any) -> bytes:
    e = factories.charge()
    env_changes = {k: v for k, v in changes.items() if k in {f.name for f in dataclasses.fields(e.envelope)}}
    payload = {k: v for k, v in changes.items() if k not in env_changes}
    e = dataclasses.replace(e, envelope=dataclasses.replace(e.envelope, **env_changes), **payload)
    return CODEC.encode(e)


def _body_edit(value: bytes, old: bytes, new: bytes) -> bytes:
    assert value.count(old) == 1, old
    return value.replace(old, new)


def _first_edit(value: bytes, old: bytes, new: bytes) -> bytes:
    """`value` with the first `old` (the envelope's copy of a repeated id) replaced by `new`."""
    assert old in value and len(old) == len(new), old
    return value.replace(old, new, 1)


def _corruptions() -> dict[str, bytes]:
    ok = _charge_bytes(baseline_model=None, baseline_cost=None, savings=None)
    env = CODEC.decode(ok).envelope
    # The record ends with three ["null", X] unions written as null (index byte 0x00 each);
    # index 2 is no branch at all, index -1 (0x01) neither.
    assert ok.endswith(b"\x00\x00\x00")
    return {
        "union index 2 (read as NULL by ClickHouse)": ok[:-3] + b"\x04\x00\x00",
        "union index 2 in the last field": ok[:-1] + b"\x04",
        "negative union index": ok[:-3] + b"\x01\x00\x00",
        "invalid UTF-8 in a string": _body_edit(ok, b"\x12sim-small", b"\x12sim-sm\xffll"),
        "UTF-16 surrogate in a string": _body_edit(ok, b"\x12sim-small", b"\x12sim-\xed\xa0\x80ll"),
        "trailing bytes": ok + b"\x00\x00",
        "truncated": ok[:-2],
        "decimal above its precision": _charge_bytes(cost=Decimal(1)).replace(
            b"\x0c" + (10**12).to_bytes(6, "big", signed=True), b"\x20" + (10**38 + 1).to_bytes(16, "big", signed=True)
        ),
        "missing tenant": _charge_bytes(tenant="   "),
        "malformed event id": _charge_bytes(event_id="not-a-uuid"),
        "insane time": _charge_bytes(occurred_at=datetime(2019, 12, 31, tzinfo=UTC)),
        "time two days ahead": _charge_bytes(occurred_at=datetime.now(UTC) + timedelta(days=2)),
        "envelope type mismatch": _charge_bytes(event_type="RequestReceived"),
        # round three dropped the UTF-8 checks of these three columns: the id and type checks
        # must still refuse a byte that is not UTF-8 there
        "invalid UTF-8 in the event id": _first_edit(ok, env.event_id.encode(), env.event_id[:-1].encode() + b"\xff"),
        "invalid UTF-8 in the correlation id": _first_edit(
            ok, env.correlation_id.encode(), env.correlation_id[:-1].encode() + b"\xff"
        ),
        "invalid UTF-8 in the event type": _first_edit(ok, b"TokensCharged", b"TokensCharge\xff"),
        "event id with a trailing newline": _charge_bytes(event_id=str(uuid7()) + "\n"),
    }


@pytest.mark.parametrize("what", list(_corruptions()))
def test_a_block_with_a_record_the_codec_refuses_is_refused_whole(
    two_stores: tuple[Client, Client], topic: str, what: str
) -> None:
    _rows, fast_db = two_stores
    plans = _plans(fast_db)
    bad = _corruptions()[what]
    with pytest.raises(PoisonEvent):
        CODEC.decode(bad)
    good = [CODEC.encode(factories.charge()) for _ in range(2)]
    values = [good[0], bad, good[1]]
    p = plans[values[0][:HEADER_LEN]]
    data = avro_block.block(p, topic, PARTITION, [5, 6, 7], values)

    def landed() -> int:
        q = "SELECT count() FROM tokens_charged WHERE _topic = {topic:String}"
        return int(str(fast_db.command(q, parameters={"topic": topic})))

    with pytest.raises(Exception) as refused:  # ClickHouse's error, whatever its class
        avro_block.insert_block(fast_db, p, data, avro_block.parameters(topic, PARTITION, 5, 7))
    assert "PoisonEvent" not in type(refused.value).__name__
    assert landed() == 0  # nothing of the block landed
    # and the same block without the bad record lands
    data = avro_block.block(p, topic, PARTITION, [5, 7], [good[0], good[1]])
    avro_block.insert_block(fast_db, p, data, avro_block.parameters(topic, PARTITION, 5, 7))
    assert landed() == 2


def test_id_forms_the_codec_takes_beyond_canonical_lowercase(two_stores: tuple[Client, Client], topic: str) -> None:
    """Upper-case canonical ids land through the fast path; the other forms `uuid.UUID()` takes
    (braces, no hyphens, urn:) are refused by ClickHouse, so the sink decodes them (a false
    alarm, never a loss)."""
    _rows, fast_db = two_stores
    plans = _plans(fast_db)
    rid = str(uuid7())
    forms = {"upper": rid.upper(), "braces": "{" + rid + "}", "hex": rid.replace("-", ""), "urn": "urn:uuid:" + rid}
    for k, (name, form) in enumerate(forms.items()):
        value = _charge_bytes(event_id=form, correlation_id=form)
        assert CODEC.decode(value).envelope.event_id == form  # the Codec takes every one of them
        p = plans[value[:HEADER_LEN]]
        data = avro_block.block(p, topic, PARTITION, [k], [value])
        params = avro_block.parameters(topic, PARTITION, k, k)
        if name == "upper":
            avro_block.insert_block(fast_db, p, data, params)
        else:
            with pytest.raises(Exception, match="fast path"):
                avro_block.insert_block(fast_db, p, data, params)
    q = "SELECT event_id FROM tokens_charged WHERE _topic = {topic:String}"
    assert [r[0] for r in fast_db.query(q, parameters={"topic": topic}).result_rows] == [rid.upper()]


def test_mutated_records_the_fast_path_accepts_are_exactly_what_the_codec_accepts(
    two_stores: tuple[Client, Client], topic: str
) -> None:
    """Seeded random corruptions: never looser than the Codec, and the same row when both accept."""
    rows_db, fast_db = two_stores
    plans = _plans(fast_db)
    rng = random.Random(20261129)
    makers = (factories.charge, factories.request, factories.decision, factories.audit)
    accepted = refused = codec_ok = 0
    for i in range(240):
        value = mutate(rng, CODEC.encode(makers[i % len(makers)]()))
        p = plans.get(value[:HEADER_LEN])
        if p is None:
            continue  # unknown header: the sink sends it to the Codec without trying
        try:
            event = CODEC.decode(value)
        except PoisonEvent:
            event = None
        offset = 10 * i
        data = avro_block.block(p, topic, PARTITION, [offset], [value])
        try:
            avro_block.insert_block(fast_db, p, data, avro_block.parameters(topic, PARTITION, offset, offset))
        except Exception:  # refused: the sink decodes it, whatever the Codec says is what happens
            refused += 1
            continue
        accepted += 1
        assert event is not None, f"fast path accepted a record the Codec refuses: {value.hex()}"
        codec_ok += 1

        rows_db.insert(
            table_for(event.event_type),
            [event_to_row(event, topic, PARTITION, offset)],
            column_names=columns_for(event.event_type),
        )
    assert accepted > 0 and refused > 0
    for table in sorted({p.table for p in plans.values()}):
        assert _contents(fast_db, table, topic) == _contents(rows_db, table, topic), table


# --- replay's filter without decoding -------------------------------------------------------------


def test_keep_fast_agrees_with_keep_on_decoded_rows() -> None:
    since = datetime.now(UTC) - timedelta(hours=1)
    events = [factories.charge(), factories.request()]
    old = dataclasses.replace(
        events[0], envelope=dataclasses.replace(events[0].envelope, occurred_at=since - timedelta(microseconds=1))
    )
    exact = dataclasses.replace(events[0], envelope=dataclasses.replace(events[0].envelope, occurred_at=since))
    cases = [*events, old, exact]
    topic = "lf.x"
    ends = {(topic, 0): 10}
    for tables in (frozenset({"tokens_charged"}), frozenset({"tokens_charged", "dead_letters"})):
        for when in (None, since):
            keep = Keep(tables, when, ends)
            for e in cases:
                value = CODEC.encode(e)
                table = table_for(e.event_type)

                for offset in (0, 9, 10):
                    row = event_to_row(e, topic, 0, offset)
                    verdict = keep.fast(table, topic, 0, offset, value)
                    if verdict is None:  # only decoding can tell: dead_letters is wanted
                        assert "dead_letters" in tables and not keep(table, columns_for(e.event_type), row)
                    else:
                        assert verdict == keep(table, columns_for(e.event_type), row), (e.event_type, offset, when)
    assert avro_block.occurred_at_micros(b"\xc3\x01" + bytes(8) + b"\x7f") is None
    micros = avro_block.occurred_at_micros(CODEC.encode(exact))
    assert micros == (since - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    assert uuid.UUID(str(uuid7()))  # ids used above are canonical


# --- the driver's batch intake: the same backlog as record by record ----------------------------


def _backlogs(sink: Sink) -> dict[tuple[str, int], Any]:
    """Each partition's backlog, next offset and the refusal count, in a comparable form."""
    out: dict[tuple[str, int], Any] = {}
    for key, p in sink._parts.items():
        items: list[Any] = []
        for item in p.backlog:
            if isinstance(item, _FastSeg):
                items.append(("fast", item.route.table, item.offsets, item.keys, item.values))
            else:
                items.append(("row", item.offset, item.table, item.dead.reason if item.dead else None))
        out[key] = (p.next_offset, items)
    out[("refused", 0)] = sink._refused[0]
    return out


def test_batch_intake_builds_the_backlog_record_by_record_intake_builds(
    two_stores: tuple[Client, Client], topic: str
) -> None:
    """`_take_batch` (C-level, one Python step per stretch) against `_take_each` on the same
    consume() batches: interleaved partitions, redeliveries, tombstones, unknown headers,
    poison, wrong-topic events, an older writer version, unassigned/unresolved/slow partitions,
    and replay's `Keep` (tables, dead_letters wanted or not, end offsets mid-batch)."""
    _rows, fast_db = two_stores
    topics = Topics(prefix=f"{topic}.", partitions=3)
    charges, requests = topics.for_event("TokensCharged"), topics.for_event("RequestReceived")
    old = [v for v in _old_versions() if CODEC.decode(v).event_type == "TokensCharged"][:2]
    assert old, "an older TokensCharged writer (schemas/fixtures)"
    rng = random.Random(20261129)

    def value(t: str) -> bytes | None:
        roll = rng.random()
        if roll < 0.03:
            return None  # tombstone
        if roll < 0.06:
            return b"not avro at all"
        if roll < 0.09:
            return CODEC.encode(factories.decision())  # wrong topic either way
        if roll < 0.12:
            return CODEC.encode(factories.charge())[:-3]  # poison behind a known header
        if t == charges:
            return rng.choice(old) if roll < 0.2 else CODEC.encode(factories.charge())
        return CODEC.encode(factories.request())

    def batch(next_offsets: dict[tuple[str, int], int]) -> list[Message]:
        msgs: list[Message] = []
        for _ in range(rng.randint(1, 6)):  # stretches of one partition, as librdkafka hands them over
            t, p = rng.choice([charges, requests]), rng.randint(0, 3)  # partition 3 is not assigned
            start = next_offsets.get((t, p), 0)
            if rng.random() < 0.2:
                start = max(0, start - rng.randint(1, 5))  # redeliveries
            n = rng.randint(1, 40)
            for o in range(start, start + n):
                key = rng.choice([b"acme", None])
                msgs.append(Message(topic=t, partition=p, offset=o, key=key, value=value(t)))
            next_offsets[(t, p)] = start + n + rng.choice([0, 0, 1])  # a skipped offset: a marker
            if rng.random() < 0.2:  # replay's end-of-partition event (past a trailing marker)
                eof = KafkaError(KafkaError._PARTITION_EOF)
                msgs.append(Message(topic=t, partition=p, offset=next_offsets[(t, p)], error=eof))
        return msgs

    ends = {(charges, p): 60 for p in range(3)} | {(requests, p): 45 for p in range(3)}
    keeps: list[Keep | None] = [
        None,
        Keep(frozenset({"tokens_charged", "dead_letters"}), None, ends),
        Keep(frozenset({"request_received"}), None, ends),
    ]
    sinks: list[Sink] = []
    try:
        for keep in keeps:
            pair = [
                Sink(
                    "127.0.0.1:9",
                    f"g-{uuid.uuid4().hex[:6]}",
                    topics,
                    fast_db,
                    CODEC,
                    keep=keep,
                    subscribe=[charges, requests],
                    consumer_config={"log_level": 0},  # no broker: the consumer is never polled
                )
                for _ in range(3)
            ]
            sinks += pair
            for s in pair:
                for t in (charges, requests):
                    for p in range(3):
                        s._parts[(t, p)] = _Partition(t, p, next_offset=-1)
                s._parts[(requests, 1)].unresolved = True
                s._parts[(charges, 2)].slow_until = 25
            seen: dict[tuple[str, int], int] = {}
            for _round in range(12):
                msgs = batch(seen)
                pair[0]._take_batch(msgs)
                pair[1]._take_each(msgs)
                pair[2]._take_runs(items_of(msgs), True)  # replay's reader of runs (projections/kafka_reader.py)
                assert _backlogs(pair[0]) == _backlogs(pair[1]) == _backlogs(pair[2]), keep
            fast_records = sum(
                len(i.offsets) for p in pair[0]._parts.values() for i in p.backlog if isinstance(i, _FastSeg)
            )
            assert fast_records > 0 or (keep is not None and "request_received" in keep.tables)
    finally:
        for s in sinks:
            s._inserter.stop()
            s._consumer.close()


# --- through Kafka: the fast sink and the row-path sink build the same database -----------------


@pytest.mark.kafka
def test_fast_sink_and_row_sink_build_equal_tables_from_the_same_log_with_poison(
    kafka_bootstrap: str, topics: Topics, store: Client, chdb_url: str, new_sink: Callable[..., Sink]
) -> None:
    events = make_events(400)
    union_bad = _corruptions()["union index 2 (read as NULL by ClickHouse)"]
    poison: list[tuple[str, bytes | None, bytes | None]] = [
        (topics.name("token-charges"), b"acme", union_bad),  # ClickHouse alone would land a NULL
        (topics.name("token-charges"), b"acme", _corruptions()["invalid UTF-8 in a string"]),
        (topics.name("token-charges"), b"globex", CODEC.encode(factories.charge())[:-3]),  # truncated
        (topics.name("requests"), b"initech", CODEC.encode(factories.decision())),  # wrong topic
        (topics.name("requests"), b"acme", b"not avro at all"),
        (topics.name("audit"), b"hooli", None),  # tombstone
    ]
    ok_charges = [CODEC.encode(factories.charge()) for _ in range(10)]
    records = encoded(topics, events[:200])
    records += [(topics.name("token-charges"), b"acme", v) for v in ok_charges[:5]]
    records += poison
    records += [(topics.name("token-charges"), b"acme", v) for v in ok_charges[5:]]
    records += encoded(topics, events[200:])
    produce(kafka_bootstrap, records)

    fast = new_sink(batch_max=500, batch_ms=100)
    want = expected_counts(events, dead=len(poison))
    want["tokens_charged"] += len(ok_charges)
    run_until(fast, lambda: counts(store) == want, timeout=60)
    assert fast.fast_rows > 0 and fast.fast_fallbacks >= 1
    assert fast.rows_inserted == len(events) + len(ok_charges) and fast.dead_lettered == len(poison)

    other = f"{store.database}_rows"
    rows_db = open_store(chdb_url, other)
    try:
        migrate(rows_db, other)
        slow = Sink(kafka_bootstrap, f"rows-{uuid.uuid4().hex[:6]}", topics, rows_db, batch_max=500, fast=False)
        try:
            run_until(slow, lambda: counts(rows_db) == want, timeout=60)
            assert slow.fast_rows == 0
        finally:
            slow.close()

        def run_sql(sql: str) -> str:
            return store.raw_query(sql, fmt="TabSeparated").decode()

        report = check(run_sql, str(store.database), other)
        assert report.equal, report.render()
        assert sum(t.live_rows for t in report.tables) == len(events) + len(ok_charges) + len(poison)
        reasons = sorted(r[0] for r in store.query("SELECT reason FROM dead_letters").result_rows)
        assert "undecodable-body" in reasons and "wrong-topic" in reasons
    finally:
        rows_db.command(f"DROP DATABASE IF EXISTS {other}")
        rows_db.close()
