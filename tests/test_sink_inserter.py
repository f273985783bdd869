"""The sink's inserter thread and multi-partition blocks (issue 10, round two), real broker and chDB.

One Avro block may carry the runs of several partitions of a topic; these tests check that it
lands whole or not at all, that a crash between inserts and commits doubles nothing (each
partition resumes after its own max(_offset)), and that a dead inserter commits nothing and
surfaces as a SinkError.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError
from confluent_kafka import Producer

from projections import avro_block
from projections.sink import Sink, SinkError
from projections.store import LockedStore
from streams.codec import HEADER_LEN, Codec
from streams.topics import Topics
from tests import factories
from tests.test_projections_sink import (
    committed,
    counts,
    expected_counts,
    make_events,
    produce_events,
    run_until,
)
from tests.test_sink_avro import _plans, topic, two_stores  # noqa: F401  (fixtures)

CODEC = Codec()


# --- the block: several partitions, one insert -------------------------------------------------


def _landed(client: Client, name: str) -> list[tuple[int, int]]:
    rows = client.query(
        "SELECT _partition, _offset FROM tokens_charged WHERE _topic = {t:String} ORDER BY _partition, _offset",
        parameters={"t": name},
    ).result_rows
    return [(int(p), int(o)) for p, o in rows]


def test_a_block_of_several_partitions_lands_whole_and_checks_each_run(
    two_stores: tuple[Client, Client],  # noqa: F811
    topic: str,  # noqa: F811
) -> None:
    _rows, db = two_stores
    values = [CODEC.encode(factories.charge()) for _ in range(5)]
    p = _plans(db)[values[0][:HEADER_LEN]]
    runs = [avro_block.Run(0, [10, 11], values[:2]), avro_block.Run(2, [7, 8, 9], values[2:])]
    spans = [(0, 10, 11), (2, 7, 9)]
    assert avro_block.token(topic, spans) == f"{topic}-0-10-11+{topic}-2-7-9"
    assert avro_block.token(topic, spans[::-1]) == avro_block.token(topic, spans)  # order-free
    with pytest.raises(ValueError, match="one run per partition"):
        avro_block.parameters_of_runs(topic, [(0, 1, 2), (0, 3, 4)])

    # A run whose rows claim offsets outside its span (the parameters lie about partition 2):
    # the alignment check refuses the whole block, partition 0's good run included.
    data = avro_block.block_of_runs(p, topic, runs)
    with pytest.raises(Exception, match="fast path"):
        avro_block.insert_block(db, p, data, avro_block.parameters_of_runs(topic, [(0, 10, 11), (2, 7, 8)]))
    with pytest.raises(Exception, match="fast path"):  # a partition the parameters do not name
        avro_block.insert_block(db, p, data, avro_block.parameters_of_runs(topic, [(0, 10, 11), (1, 7, 9)]))
    with pytest.raises(Exception, match="fast path"):  # rows below their run's first offset
        avro_block.insert_block(db, p, data, avro_block.parameters_of_runs(topic, [(0, 11, 11), (2, 7, 9)]))
    with pytest.raises(Exception, match="fast path"):  # partition 0 not named at all (its default range is empty)
        avro_block.insert_block(db, p, data, avro_block.parameters_of_runs(topic, [(2, 7, 9)]))
    at_zero = avro_block.block_of_runs(p, topic, [avro_block.Run(0, [0], values[:1]), runs[1]])
    with pytest.raises(Exception, match="fast path"):  # offset 0 of a partition not named (no default range)
        avro_block.insert_block(db, p, at_zero, avro_block.parameters_of_runs(topic, [(2, 7, 9)]))
    with pytest.raises(Exception, match="fast path"):  # the rows say another topic
        avro_block.insert_block(db, p, data, avro_block.parameters_of_runs(topic + "x", spans))
    assert _landed(db, topic) == []

    params = avro_block.parameters_of_runs(topic, spans)
    avro_block.insert_block(db, p, data, params)
    want = [(0, 10), (0, 11), (2, 7), (2, 8), (2, 9)]
    assert _landed(db, topic) == want
    avro_block.insert_block(db, p, data, params)  # a retry of the same block: same token, dropped
    assert _landed(db, topic) == want


# --- through Kafka ---------------------------------------------------------------------------------


class RecordingStore(LockedStore):
    """The real store; records each fast insert's partitions, and after `fail_after` fast inserts
    fails every insert (the sink process "dies" at that point: nothing more lands)."""

    def __init__(self, client: Client, fail_after: int | None = None) -> None:
        super().__init__(client)
        self.fail_after = fail_after
        self.blocks: list[list[int]] = []

    def call(self, fn: Callable[[Client], Any]) -> Any:
        if self.fail_after is not None and len(self.blocks) >= self.fail_after:
            raise ConnectionError("the sink process is gone (simulated crash)")
        out = super().call(fn)
        params = getattr(fn, "__closure__", None)
        for cell in params or ():
            value = cell.cell_contents
            if isinstance(value, dict) and "lf_partitions" in value:
                self.blocks.append(list(value["lf_partitions"]))
        return out

    def insert(self, table: str, rows: Any, column_names: Any, settings: dict[str, Any] | None = None) -> None:
        if self.fail_after is not None and len(self.blocks) >= self.fail_after:
            raise ConnectionError("the sink process is gone (simulated crash)")
        super().insert(table, rows, column_names, settings)


def _event_ids(client: Client, tables: list[str]) -> list[str]:
    return [str(r[0]) for t in tables for r in client.query(f"SELECT event_id FROM {t}").result_rows]


@pytest.mark.kafka
def test_multi_partition_blocks_then_a_crash_before_the_commits_double_nothing(
    kafka_bootstrap: str, topics: Topics, store: Client, new_sink: Callable[..., Sink]
) -> None:
    """A sink lands some multi-partition blocks and dies before committing; a successor whose
    group never committed anything (Kafka would say "earliest") lands the rest, each event once."""
    events = make_events(600)
    produce_events(kafka_bootstrap, topics, events)
    want = expected_counts(events)
    dying = RecordingStore(store, fail_after=4)
    first = new_sink(store_=dying, batch_max=1000, batch_ms=300, max_backoff=0.2)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (len(dying.blocks) >= 4 and first.insert_failures > 0):
        first.poll_once(0.1)
    assert len(dying.blocks) == 4 and first.insert_failures > 0, first.status()
    assert any(len(parts) > 1 for parts in dying.blocks), dying.blocks  # blocks spanned partitions
    landed_before = sum(counts(store).values())
    assert 0 < landed_before < len(events)
    # The crash: `first` is abandoned, never polled or closed again (it stays paused and failing).

    fresh = f"never-committed-{uuid.uuid4().hex[:6]}"
    assert committed(kafka_bootstrap, fresh, topics) == {}
    second = new_sink(group=fresh, batch_max=1000, batch_ms=100)
    run_until(second, lambda: counts(store) == want)
    assert second.rows_inserted == len(events) - landed_before  # it started after what ClickHouse held
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        second.poll_once(0.1)
    assert counts(store) == want
    ids = _event_ids(store, [t for t in want if want[t]])
    assert len(ids) == len(set(ids)) == len(events)


@pytest.mark.kafka
def test_a_dead_inserter_commits_nothing_and_raises(
    kafka_bootstrap: str,
    topics: Topics,
    store: Client,
    new_sink: Callable[..., Sink],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = make_events(200)
    produce_events(kafka_bootstrap, topics, events)
    group = f"dies-{uuid.uuid4().hex[:6]}"

    def broken(*_args: Any, **_kw: Any) -> bytes:
        raise RuntimeError("a bug while building a block")

    monkeypatch.setattr(avro_block, "block_of_runs", broken)
    monkeypatch.setattr(avro_block, "native_block", broken)  # the RowBinary block, when the C transcoder is on
    sink = new_sink(group=group)
    deadline = time.monotonic() + 30
    with pytest.raises(SinkError, match="inserter thread failed"):
        while time.monotonic() < deadline:
            sink.poll_once(0.1)
    assert "bug while building" in str(sink.status()["last_error"])
    sink.close()  # no final flush and no commit after the inserter died
    assert committed(kafka_bootstrap, group, topics) == {}
    assert sum(counts(store).values()) == 0

    monkeypatch.undo()
    again = new_sink(group=group)
    want = expected_counts(events)
    run_until(again, lambda: counts(store) == want)
    assert again.rows_inserted == len(events)
    assert committed(kafka_bootstrap, group, topics)  # and this one commits after landing


class RaisesAfterLanding(LockedStore):
    """The real store; the first fast insert into tokens_charged lands, then raises the way an
    error from a materialized view reading the table would (the rows are already written)."""

    def __init__(self, client: Client) -> None:
        super().__init__(client)
        self.raised = 0

    def call(self, fn: Callable[[Client], Any]) -> Any:
        out = super().call(fn)
        closure = [c.cell_contents for c in getattr(fn, "__closure__", None) or ()]
        plan = next((v for v in closure if isinstance(v, avro_block.Plan)), None)
        if plan is not None and plan.event_type == "TokensCharged" and not self.raised:
            self.raised += 1
            raise DatabaseError("Code: 241. DB::Exception: Memory limit exceeded (pushing to view charges_daily_mv)")
        return out


@pytest.mark.kafka
def test_a_block_that_raised_after_landing_is_not_decoded_and_inserted_again(
    kafka_bootstrap: str, topics: Topics, store: Client, new_sink: Callable[..., Sink]
) -> None:
    events = make_events(300)
    produce_events(kafka_bootstrap, topics, events)
    want = expected_counts(events)
    flaky = RaisesAfterLanding(store)
    sink = new_sink(store_=flaky, batch_max=200, batch_ms=50)
    run_until(sink, lambda: counts(store) == want)
    assert flaky.raised == 1 and sink.landed_with_error == 1
    assert sink.fast_fallbacks == 0 and sink.rows_inserted == len(events), sink.status()
    ids = _event_ids(store, ["tokens_charged"])
    assert len(ids) == len(set(ids)) == want["tokens_charged"]  # landed once, never decoded and landed again


@pytest.mark.kafka
def test_a_partition_that_stops_moving_with_records_waiting_ends_the_sink_and_an_idle_one_does_not(
    kafka_bootstrap: str, topics: Topics, store: Client, new_sink: Callable[..., Sink]
) -> None:
    """The stall watchdog: a fetcher wedged on one partition (simulated by pausing it in librdkafka
    behind the sink's back) raises SinkError naming it; partitions with nothing to read never do."""
    events = make_events(120)
    produce_events(kafka_bootstrap, topics, events)
    sink = new_sink(stall_s=1.0)
    run_until(sink, lambda: counts(store) == expected_counts(events))
    idle_until = time.monotonic() + 2.5  # every partition read to its end: idle, never a stall
    while time.monotonic() < idle_until:
        sink.poll_once(0.1)

    charges = topics.name("token-charges")
    wedged = next(p for p in sink._parts.values() if p.topic == charges)
    sink._consumer.pause([wedged.tp])  # the fetcher stops; the sink still thinks it is reading
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(30):  # records waiting on the wedged partition
        producer.produce(charges, CODEC.encode(factories.charge(tenant=f"t{i}")), b"x", partition=wedged.partition)
    assert producer.flush(30) == 0
    deadline = time.monotonic() + 20
    with pytest.raises(SinkError, match=rf"no progress on {charges}\[{wedged.partition}\]"):
        while time.monotonic() < deadline:
            sink.poll_once(0.1)
    assert "no progress" in str(sink.status()["last_error"])
