"""The sink's native fast path (projections/_rowbinary.c): RowBinary rows checked in C.

The reference is Python: the Codec decodes a record and `avro_block.encode_row` writes the
row it gives as RowBinary. Whatever the C transcoder accepts must be byte for byte that
(every event type, edge values, older writer versions, random valid events from hypothesis,
mutated records), and what the Codec refuses the transcoder must refuse too. Against real
chDB: the RowBinary insert lands the same rows as the Avro block; through Kafka, a native sink
and an Avro sink (`native=False`) build equal tables from one log with poison in it.
"""

from __future__ import annotations

import dataclasses
import random
import typing
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from projections import avro_block
from projections.migrations import migrate
from projections.replay import check
from projections.schema import columns_for, event_to_row
from projections.sink import Sink
from projections.store import open_store
from streams.codec import HEADER_LEN, PoisonEvent
from streams.events import Event
from streams.ids import uuid7
from streams.topics import Topics
from tests import factories
from tests.store_helpers import migrated_databases
from tests.test_poison_fuzz import mutate
from tests.test_projections_sink import counts, encoded, expected_counts, make_events, produce, run_until
from tests.test_sink_avro import BUILDERS, CODEC, _contents, _corruptions, _old_versions, _plans, variants

pytestmark = pytest.mark.skipif(not avro_block.native_available(), reason="projections._rowbinary is not built")

TOPIC = "lf.native"
PARTITION = 2
NOW_US = (datetime.now(UTC) - avro_block._EPOCH) // timedelta(microseconds=1)


@pytest.fixture(scope="module")
def migrated(chdb_url: str) -> Iterator[Client]:
    name = f"t_{uuid.uuid4().hex[:10]}_native"
    client = open_store(chdb_url, name)
    migrate(client, name)
    yield client
    client.command(f"DROP DATABASE IF EXISTS {name}")
    client.close()


@pytest.fixture(scope="module")
def plans(migrated: Client) -> dict[bytes, avro_block.Plan]:
    return _plans(migrated)


@pytest.fixture(scope="module")
def types(migrated: Client) -> dict[str, dict[str, str]]:
    rows = migrated.query("SELECT table, name, type FROM system.columns WHERE database = currentDatabase()")
    return avro_block.table_types(rows.result_rows)


def reference(p: avro_block.Plan, table_types: dict[str, str], value: bytes, offset: int) -> bytes | None:
    """The Python path: the Codec's row of `value` as RowBinary in the native column order; None if poison."""
    assert p.native is not None
    try:
        event = CODEC.decode(value)
    except PoisonEvent:
        return None
    by_column = dict(zip(columns_for(event.event_type), event_to_row(event, TOPIC, PARTITION, offset), strict=True))
    cols = p.native.columns
    return avro_block.encode_row([by_column[c] for c in cols], [table_types[c] for c in cols])


def native(p: avro_block.Plan, values: list[bytes], offsets: list[int]) -> bytes | int:
    """The C path: the block's bytes, or the index of the first record refused."""
    try:
        return avro_block.native_block(p, TOPIC, [avro_block.Run(PARTITION, offsets, values)], now_us=NOW_US)
    except avro_block.NativeRefused as exc:
        return exc.index


def _edge_values(plans: dict[bytes, avro_block.Plan]) -> list[bytes]:
    values = []
    for name in sorted({p.event_type for p in plans.values()}):
        for e in variants(BUILDERS[name]()):
            try:
                value = CODEC.encode(e)
                CODEC.decode(value)
            except (PoisonEvent, ValueError, TypeError, OverflowError):
                continue
            values.append(value)
    return values


def test_every_fast_table_has_a_native_form(plans: dict[bytes, avro_block.Plan]) -> None:
    """Every writer the Avro block carries, the transcoder carries too (today's and older versions)."""
    assert plans
    assert [p.event_type for p in plans.values() if p.native is None] == []


def test_native_rows_are_the_codec_rows_byte_for_byte_for_every_type_edge_values_and_old_versions(
    plans: dict[bytes, avro_block.Plan], types: dict[str, dict[str, str]]
) -> None:
    old = [v for v in _old_versions() if v[:HEADER_LEN] in plans]
    assert old, "no older schema version to check (schemas/fixtures)"
    values = _edge_values(plans) + old
    seen = set()
    for i, value in enumerate(values):
        p = plans[value[:HEADER_LEN]]
        want = reference(p, types[p.table], value, 1000 + i)
        assert want is not None
        got = native(p, [value], [1000 + i])
        assert got == want, (p.event_type, value.hex())
        seen.add(p.event_type)
    assert len(seen) == len({p.event_type for p in plans.values()})
    # a run: one call, the rows back to back, offsets in order
    charges = [CODEC.encode(factories.charge()) for _ in range(5)]
    p = plans[charges[0][:HEADER_LEN]]
    block = native(p, charges, [7, 8, 10, 11, 2**40])
    assert block == b"".join(
        reference(p, types[p.table], v, o) or b"" for v, o in zip(charges, [7, 8, 10, 11, 2**40], strict=True)
    )


# --- random valid events -----------------------------------------------------------------------


def _strategy(hint: Any) -> st.SearchStrategy[Any] | None:
    """Values of a payload field typed `hint` (None: keep the builder's value)."""
    args = typing.get_args(hint)
    if type(None) in args:
        inner = _strategy(next(a for a in args if a is not type(None)))
        return None if inner is None else st.none() | inner
    origin = typing.get_origin(hint) or hint
    if origin is str:
        return st.text(max_size=30)
    if origin is bool:
        return st.booleans()
    if origin is int:
        return st.integers(-(2**31), 2**31 - 1)
    if origin is float:
        return st.floats(width=64)
    if origin is Decimal:
        return st.integers(-(10**38) + 1, 10**38 - 1).map(lambda n: Decimal(n).scaleb(-12, avro_block._EXACT))
    if origin is datetime:
        return st.integers(avro_block._TS_LO_US, avro_block._TS_HI_US).map(
            lambda us: avro_block._EPOCH + timedelta(microseconds=us)
        )
    if origin is list and args and args[0] in (str, int, float, bool):
        item = _strategy(args[0])
        return None if item is None else st.lists(item, max_size=5)
    if origin is dict and args and args[0] is str and args[1] in (str, int):
        value = _strategy(args[1])
        return None if value is None else st.dictionaries(st.text(max_size=10), value, max_size=5)
    return None


@st.composite
def random_events(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(sorted(BUILDERS)))
    event: Event = BUILDERS[name]()
    hints = typing.get_type_hints(type(event))
    changes = {}
    for f in dataclasses.fields(event):
        strategy = _strategy(hints[f.name]) if f.name != "envelope" else None
        if strategy is not None:
            changes[f.name] = draw(strategy)
    env = dataclasses.replace(
        event.envelope,
        # a tenant without a printable ASCII byte is a documented false alarm (the Codec takes "\x1b")
        tenant=draw(
            st.tuples(
                st.text(max_size=10), st.characters(min_codepoint=0x21, max_codepoint=0x7E), st.text(max_size=10)
            ).map("".join)
        ),
        event_id=draw(st.sampled_from([str(uuid7()), str(uuid7()).upper()])),
        occurred_at=datetime(2020, 1, 1, tzinfo=UTC) + timedelta(microseconds=draw(st.integers(0, 10**15))),
        trace_parent=draw(st.none() | st.text(max_size=20)),
        causation_id=draw(st.none() | st.just(str(uuid7()))),
    )
    try:
        value = CODEC.encode(dataclasses.replace(event, envelope=env, **changes))
        CODEC.decode(value)
    except (PoisonEvent, ValueError, TypeError, OverflowError):
        assume(False)
    return value


@settings(
    max_examples=300,
    deadline=None,
    print_blob=False,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(value=random_events(), offset=st.integers(0, 2**63 - 1))
def test_random_valid_events_give_the_codec_rows(
    plans: dict[bytes, avro_block.Plan], types: dict[str, dict[str, str]], value: bytes, offset: int
) -> None:
    p = plans.get(value[:HEADER_LEN])
    assume(p is not None)
    assert p is not None
    assert native(p, [value], [offset]) == reference(p, types[p.table], value, offset)


# --- refusals and fuzz -----------------------------------------------------------------------------


@pytest.mark.parametrize("what", list(_corruptions()))
def test_what_the_codec_refuses_the_transcoder_refuses_at_its_index(
    plans: dict[bytes, avro_block.Plan], what: str
) -> None:
    bad = _corruptions()[what]
    with pytest.raises(PoisonEvent):
        CODEC.decode(bad)
    good = [CODEC.encode(factories.charge()) for _ in range(3)]
    p = plans[good[0][:HEADER_LEN]]
    assert native(p, [good[0], good[1], bad, good[2]], [1, 2, 3, 4]) == 2
    assert native(p, [bad], [1]) == 0


def test_mutated_records_never_crash_and_what_is_accepted_is_the_codec_row(
    plans: dict[bytes, avro_block.Plan], types: dict[str, dict[str, str]]
) -> None:
    """Seeded corruptions of every fast event type: a refusal, or exactly the Codec's row."""
    rng = random.Random(20261129)
    pool = _edge_values(plans)
    accepted = refused = 0
    for i in range(6000):
        original = pool[i % len(pool)]
        p = plans[original[:HEADER_LEN]]  # the run's writer: a mutated header must be refused
        value = mutate(rng, original)
        got = native(p, [value], [i])
        want = reference(p, types[p.table], value, i) if value[:HEADER_LEN] == original[:HEADER_LEN] else None
        if got == 0:
            refused += 1
            continue
        accepted += 1
        assert want is not None, f"accepted a record the Codec refuses: {value.hex()}"
        assert got == want, value.hex()
    assert accepted > 100 and refused > 1000


@settings(max_examples=500, deadline=None)
@given(body=st.binary(max_size=300), maker=st.sampled_from(["charge", "request", "decision", "audit"]))
def test_arbitrary_bytes_after_a_valid_header_never_crash(
    plans: dict[bytes, avro_block.Plan], body: bytes, maker: str
) -> None:
    header = CODEC.encode(getattr(factories, maker)())[:HEADER_LEN]
    got = native(plans[header], [header + body], [0])
    if got != 0:
        assert isinstance(got, bytes)
        CODEC.decode(header + body)  # accepted ⇒ the Codec accepts


def test_malformed_calls_raise_cleanly(plans: dict[bytes, avro_block.Plan]) -> None:
    from projections import _rowbinary

    value = CODEC.encode(factories.charge())
    p = plans[value[:HEADER_LEN]]
    assert p.native is not None
    n = p.native
    ok = (n.program, n.writer_header, n.event_type, [value], [0], b"", 0, 2**62)
    assert isinstance(_rowbinary.transcode(*ok), bytes)
    with pytest.raises(ValueError, match="invalid op"):
        _rowbinary.transcode(b"\x1f", *ok[1:])
    with pytest.raises(ValueError, match="invalid op"):
        _rowbinary.transcode(bytes([0x80 | 0x20 | 1]), *ok[1:])  # a nullable array
    with pytest.raises(ValueError, match="10 bytes"):
        _rowbinary.transcode(n.program, b"\xc3\x01", *ok[2:])
    with pytest.raises(TypeError):
        text: Any = value.decode("latin-1")  # not bytes
        _rowbinary.transcode(n.program, n.writer_header, n.event_type, [text], [0], b"", 0, 1)
    with pytest.raises(ValueError, match="one offset per record"):
        _rowbinary.transcode(n.program, n.writer_header, n.event_type, [value], [0, 1], b"", 0, 1)
    with pytest.raises(OverflowError):
        _rowbinary.transcode(n.program, n.writer_header, n.event_type, [value], [-1], b"", 0, 1)
    assert _rowbinary.transcode(n.program, n.writer_header, n.event_type, [], [], b"", 0, 1) == b""
    # occurred_at outside [min, max] is refused: the bounds are the caller's
    assert _rowbinary.transcode(n.program, n.writer_header, n.event_type, [value], [0], b"", 0, 1) == 0


def test_native_is_off_with_the_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(avro_block.NATIVE_ENV, "0")
    assert not avro_block.native_enabled()
    monkeypatch.setenv(avro_block.NATIVE_ENV, "1")
    assert avro_block.native_enabled()


# --- against chDB ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_dbs(chdb_url: str) -> Iterator[tuple[Client, Client]]:
    with migrated_databases(chdb_url, "avro", "rb") as (first, second):
        yield first, second


def test_rowbinary_inserts_land_the_rows_avro_blocks_land(two_dbs: tuple[Client, Client]) -> None:
    avro_db, rb_db = two_dbs
    plans = _plans(rb_db)
    values = _edge_values(plans) + [v for v in _old_versions() if v[:HEADER_LEN] in plans]
    offsets = list(range(1000, 1000 + 2 * len(values), 2))
    groups: dict[bytes, tuple[list[int], list[bytes]]] = {}
    for value, offset in zip(values, offsets, strict=True):
        o, v = groups.setdefault(value[:HEADER_LEN], ([], []))
        o.append(offset)
        v.append(value)
    for header, (o, v) in groups.items():
        p = plans[header]
        avro_block.insert_block(
            avro_db,
            p,
            avro_block.block(p, TOPIC, PARTITION, o, v),
            avro_block.parameters(TOPIC, PARTITION, o[0], o[-1]),
        )
        data = avro_block.native_block(p, TOPIC, [avro_block.Run(PARTITION, o, v)])
        tok = avro_block.token(TOPIC, [(PARTITION, o[0], o[-1])])
        avro_block.insert_native(rb_db, p, data, tok)
        avro_block.insert_native(rb_db, p, data, tok)  # a retry with the same token: dropped
    landed = 0
    for table in sorted({p.table for p in plans.values()}):
        a = _contents(avro_db, table, TOPIC)
        assert _contents(rb_db, table, TOPIC) == a, table
        landed += len(a[0])
    assert landed == len(values)


# --- through Kafka --------------------------------------------------------------------------------


@pytest.mark.kafka
def test_native_sink_and_avro_sink_build_equal_tables_from_the_same_log_with_poison(
    kafka_bootstrap: str,
    topics: Topics,
    store: Client,
    chdb_url: str,
    new_sink: Callable[..., Sink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = make_events(300)
    poison = [
        (topics.name("token-charges"), b"acme", _corruptions()["union index 2 (read as NULL by ClickHouse)"]),
        (topics.name("token-charges"), b"acme", _corruptions()["decimal above its precision"]),
        (topics.name("token-charges"), b"acme", CODEC.encode(factories.charge()) + b"\x00"),
    ]
    ok = [CODEC.encode(factories.charge()) for _ in range(6)]
    records = encoded(topics, events[:150]) + [(topics.name("token-charges"), b"acme", v) for v in ok[:3]]
    records += poison + [(topics.name("token-charges"), b"acme", v) for v in ok[3:]] + encoded(topics, events[150:])
    produce(kafka_bootstrap, records)
    want = expected_counts(events, dead=len(poison))
    want["tokens_charged"] += len(ok)

    sink = new_sink(batch_max=500, batch_ms=100, native=True)
    run_until(sink, lambda: counts(store) == want, timeout=60)
    assert sink.native_rows > 0 and sink.native_rows == sink.fast_rows and sink.fast_fallbacks >= 1
    assert sink.dead_lettered == len(poison)

    other = f"{store.database}_avro"
    avro_db = open_store(chdb_url, other)
    try:
        migrate(avro_db, other)
        monkeypatch.setenv(avro_block.NATIVE_ENV, "0")  # what the environment variable turns off
        slow = Sink(kafka_bootstrap, f"avro-{uuid.uuid4().hex[:6]}", topics, avro_db, batch_max=500, batch_ms=100)
        try:
            assert not slow.native
            run_until(slow, lambda: counts(avro_db) == want, timeout=60)
            assert slow.native_rows == 0 and slow.fast_rows > 0
        finally:
            slow.close()

        def run_sql(sql: str) -> str:
            return store.raw_query(sql, fmt="TabSeparated").decode()

        report = check(run_sql, str(store.database), other)
        assert report.equal, report.render()
    finally:
        avro_db.command(f"DROP DATABASE IF EXISTS {other}")
        avro_db.close()
