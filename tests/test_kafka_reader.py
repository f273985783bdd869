"""Replay's C reader of runs (projections/kafka_reader.py) held to confluent-kafka's Consumer.

- Without its library, or with `LEDGERFLOW_NATIVE=0`, it is unavailable; bad input is refused
  with an exception, never a crash.
- Real broker: the same partitions read by a confluent Consumer and by a RunConsumer give the same
  records in the same order (tombstones, short values, interleaved headers, a committed and an
  aborted transaction, partition EOF), and the runs are what `items_of` builds from Messages.
- Real broker and chDB: a replay through the reader, one with `LEDGERFLOW_NATIVE=0` and one whose
  librdkafka cannot be found build databases `replay.check` calls equal, poison dead-lettered alike.
(The Sink's run intake is held to its Message intakes in tests/test_sink_avro.py.)
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import NewTopic

from projections import kafka_reader
from projections.kafka_reader import OddRecord, RunConsumer, items_of
from projections.replay import ReplayJob, ReplayRequest, check, known_tables
from projections.sink import sink_consumer_config
from projections.store import open_store
from streams.admin import admin
from streams.clients import Consumer
from streams.codec import HEADER_LEN, MAGIC
from streams.topics import Topics
from tests.test_projections_sink import counts, encoded, expected_counts, make_events, produce
from tests.test_replay import _sql

needs_reader = pytest.mark.skipif(not kafka_reader.available(), reason="projections._kafka_reader not built")

_IDLE = {"bootstrap.servers": "127.0.0.1:9", "group.id": "idle", "log_level": 0}  # never polled: no broker needed


@needs_reader
def test_unavailable_without_library_or_when_turned_off_and_bad_input_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from projections import _kafka_reader

    assert _kafka_reader.HEADER_LEN == HEADER_LEN
    monkeypatch.setenv(kafka_reader.NATIVE_ENV, "0")
    assert not kafka_reader.available()
    monkeypatch.setenv(kafka_reader.NATIVE_ENV, "1")
    monkeypatch.setenv(kafka_reader.PATH_ENV, "/nonexistent/librdkafka.so.1")
    assert kafka_reader.library_path() is None and not kafka_reader.available()
    with pytest.raises(OSError, match="cannot load"):
        _kafka_reader.Reader("/nonexistent/librdkafka.so.1", {})
    with pytest.raises(OSError, match="lacks rd_kafka_"):  # a library, but not librdkafka
        _kafka_reader.Reader("libc.so.6", {})
    monkeypatch.delenv(kafka_reader.PATH_ENV)
    assert kafka_reader.available()
    with pytest.raises(KafkaException, match=r"no\.such\.property"):
        RunConsumer({**_IDLE, "no.such.property": 1})
    reader = _kafka_reader.Reader(str(kafka_reader.library_path()), {k: str(v) for k, v in _IDLE.items()})
    for bad in (0, -1, 10**7):
        with pytest.raises(ValueError, match="max_messages"):
            reader.read(bad, 0.0)
    with pytest.raises(TypeError):
        reader.assign([("topic", "not a partition", 0)])  # type: ignore[list-item]
    assert reader.read(10, 0.0) == []  # nothing assigned: nothing read
    reader.close()
    reader.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        reader.read(10, 0.0)


def _records(items: list[tuple[Any, ...]]) -> tuple[dict[int, list[tuple[int, Any, Any]]], dict[int, int]]:
    """Reader items → per partition [(offset, key, value)] in delivery order, and the last EOF offset."""
    recs: dict[int, list[tuple[int, Any, Any]]] = {}
    eof: dict[int, int] = {}
    for item in items:
        if len(item) == 6 and type(item[0]) is str:
            _topic, partition, header, offsets, keys, values = item
            assert offsets == sorted(set(offsets)) and all(v[:HEADER_LEN] == header for v in values)
            recs.setdefault(partition, []).extend(zip(offsets, keys, values, strict=True))
            continue
        rec = OddRecord.of(item)
        err = rec.error()
        if err is None:
            assert rec.value() is None or len(rec.value() or b"") < HEADER_LEN
            recs.setdefault(rec.partition() or 0, []).append((rec.offset() or 0, rec.key(), rec.value()))
        else:
            assert err.code() == KafkaError._PARTITION_EOF, err
            eof[rec.partition() or 0] = rec.offset() or 0
    return recs, eof


def _read(read: Any, partitions: int, ends: dict[int, int], timeout: float = 20.0) -> list[tuple[Any, ...]]:
    """Items until every partition reported EOF at its end offset."""
    items: list[tuple[Any, ...]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = read()
        # runs are maximal: with the records equal, the grouping is the one `items_of` makes
        runs = [(i, item) for i, item in enumerate(batch) if len(item) == 6 and type(item[0]) is str]
        for (i, x), (j, y) in pairwise(runs):
            assert j > i + 1 or x[:3] != y[:3] or y[3][0] <= x[3][-1], (x, y)
        items += batch
        _, eof = _records(items)
        if all(eof.get(p, -1) >= ends[p] for p in range(partitions)):
            return items
    raise AssertionError(f"no EOF at {ends} within {timeout}s: {_records(items)[1]}")


@needs_reader
@pytest.mark.kafka
def test_reader_gives_the_records_confluent_gives_as_runs(kafka_bootstrap: str) -> None:
    topic = f"reader-{uuid.uuid4().hex[:8]}"
    client = admin(kafka_bootstrap)
    client.create_topics([NewTopic(topic, 2, 1)])[topic].result(20)
    a, b = MAGIC + b"A" * 8, MAGIC + b"B" * 8  # two writer headers
    plain = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for i, value in enumerate(
        [a + b"1", a + b"2", a + b"3", b + b"4", b + b"5", a + b"6", None, b"abc", a, b + b"", a + b"7", b"", a + b"8"]
    ):
        plain.produce(topic, value=value, key=None if i % 3 else b"k%d" % i, partition=0)
    assert plain.flush(20) == 0
    txn = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"tx-{topic}"})
    txn.init_transactions(20)
    for values, commit in (([a + b"c1", a + b"c2"], True), ([b + b"x1", b + b"x2", a + b"x3"], False), ([None], True)):
        txn.begin_transaction()
        for v in values:
            txn.produce(topic, value=v, key=b"t", partition=1)
        txn.flush(20)
        (txn.commit_transaction if commit else txn.abort_transaction)(20)
    plain.produce(topic, value=b + b"after", partition=1)
    assert plain.flush(20) == 0

    conf = sink_consumer_config(kafka_bootstrap, f"reader-{uuid.uuid4().hex[:6]}", {"enable.partition.eof": True})
    start = [TopicPartition(topic, p, 0) for p in range(2)]
    ref = Consumer(conf)
    runs = RunConsumer(conf)
    try:
        ends = {p: runs.get_watermark_offsets(TopicPartition(topic, p))[1] for p in range(2)}
        assert ends == {p: ref.get_watermark_offsets(TopicPartition(topic, p), cached=False)[1] for p in range(2)}
        assert runs.partitions_of([topic, "no-such-topic"]) == {topic: [0, 1]}
        ref.assign(start)
        runs.assign(start)
        want = _read(lambda: items_of(ref.consume(1000, 0.2)), 2, ends)
        got = _read(lambda: runs.read_runs(1000, 0.2), 2, ends)
        assert _records(got) == _records(want)
        by_partition, eof = _records(got)
        assert eof == ends
        assert [v for _, _, v in by_partition[0]] == [
            a + b"1", a + b"2", a + b"3", b + b"4", b + b"5", a + b"6", None, b"abc", a, b, a + b"7", b"", a + b"8"
        ]  # fmt: skip
        # read_committed: the aborted transaction's records are not delivered, the markers are skipped
        assert [v for _, _, v in by_partition[1]] == [a + b"c1", a + b"c2", None, b + b"after"]
        assert max(len(i[3]) for i in got if len(i) == 6 and type(i[0]) is str) >= 3  # a run, not a record each
        assert [tp.offset for tp in runs.position(start)] == [ends[0], ends[1]]
        runs.seek(TopicPartition(topic, 0, 3))  # back to the first `b` record
        again = _read(lambda: runs.read_runs(1000, 0.2), 1, {0: ends[0]})
        assert _records(again)[0][0] == by_partition[0][3:]
        runs.pause([TopicPartition(topic, 0)])
        runs.resume([TopicPartition(topic, 0)])
    finally:
        ref.close()
        runs.close()


class _Recording(ReplayJob):
    """A ReplayJob that records which consumer its Sink was given."""

    used: type | None = None

    def _prefetch(self) -> Any:
        bounds, consumer = super()._prefetch()
        self.used = type(consumer)
        return bounds, consumer


@needs_reader
@pytest.mark.kafka
def test_replay_through_the_reader_builds_what_the_message_path_builds(
    kafka_bootstrap: str,
    topics: Topics,
    chdb_url: str,
    ch_database: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    events = make_events(240)
    poison = [
        (topics.name("token-charges"), b"acme", None),  # a NULL value
        (topics.name("token-charges"), b"acme", b"abc"),  # 3 bytes: shorter than a header
        (topics.name("requests"), b"hooli", MAGIC + b"\x01" * 8 + b"body"),  # an unknown writer
        (topics.name("audit"), None, b"not avro at all"),
    ]
    records = encoded(topics, events[:120]) + poison + encoded(topics, events[120:])
    produce(kafka_bootstrap, records)
    want = expected_counts(events, dead=len(poison))

    built: dict[str, tuple[type | None, str]] = {}
    dbs: list[str] = []
    for how, env in (
        ("reader", {}),
        ("messages", {kafka_reader.NATIVE_ENV: "0"}),
        ("no-library", {kafka_reader.PATH_ENV: "/nonexistent/librdkafka.so.1"}),
    ):
        with monkeypatch.context() as m:
            for k, v in env.items():
                m.setenv(k, v)
            into = f"{ch_database}_{how.replace('-', '_')}"
            dbs.append(into)
            job = _Recording(
                ReplayRequest(into, tuple(known_tables()), None),
                store_url=chdb_url,
                bootstrap=kafka_bootstrap,
                topics=topics,
                batch_ms=100,
            )
            status = job.run()
            assert status["state"] == "done" and status["dead_letters"] == len(poison), status
            built[how] = (job.used, into)
    assert built["reader"][0] is RunConsumer
    assert built["messages"][0] is built["no-library"][0] is Consumer
    client = open_store(chdb_url, built["reader"][1])
    try:
        assert counts(client) == want
        reasons = client.query("SELECT _offset, reason FROM dead_letters ORDER BY _topic, _offset").result_rows
        assert len(reasons) == len(poison)
        for how in ("messages", "no-library"):
            report = check(_sql(client), built["reader"][1], built[how][1])
            assert report.equal, report.render()
            assert {t.table: t.into_rows for t in report.tables if t.table in want} == want
    finally:
        for name in dbs:
            client.command(f"DROP DATABASE IF EXISTS {name}")
        client.close()


def test_reader_survives_a_logger_that_closes_it() -> None:
    """A logger that closes the reader while `read` drains its log lines (or another thread doing so
    while the logger does I/O) gets "in use", not a reader destroyed under the loop (a segfault)."""
    code = textwrap.dedent(
        """
        from projections import _kafka_reader, kafka_reader
        holder = []
        def logger(level, fac, msg):
            if holder:
                holder.pop().close()
        conf = {"bootstrap.servers": "127.0.0.1:9", "group.id": "g", "debug": "generic,broker"}
        r = _kafka_reader.Reader(kafka_reader.library_path(), conf, logger)
        holder.append(r)
        try:
            r.read(1, 0.5)
        except RuntimeError as exc:
            print("raised", exc)
        print("survived")
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=str(Path(__file__).resolve().parents[1]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0 and "survived" in proc.stdout, (proc.returncode, proc.stderr[-2000:])
