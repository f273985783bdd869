"""The projection sink: Kafka facts → ClickHouse tables, effectively once.

Why this shape (OpenMeter's sink protocol): ClickHouse, not Kafka, is the record of what has
been projected. Every row carries its Kafka coordinates, so after any crash the sink asks
ClickHouse how far it got and resumes right after; Kafka commits are only a hint for tools
that read group lag. The numbered steps below each state the guarantee they provide:

(1) On assignment, for each partition, `max(_offset)` over the topic's table(s) AND
    `dead_letters` is the last record landed; consumption restarts at max+1. Nothing at or
    below it is read again, nothing above it was inserted (see 2), so nothing is doubled or
    skipped, whatever Kafka's committed offset says. No row at all → Kafka's committed
    offset, else earliest.
(2) A batch is a run of consecutive records of ONE topic-partition going to ONE table,
    flushed at `batch_max` rows or `batch_ms` age. A record bound for another table (a
    poison record amid good ones) first flushes the run before it, so inserts land in offset
    order and the max in (1) is always a prefix boundary: every record ≤ max is in ClickHouse.
(3) Every record is validated, by ClickHouse or by the Codec (fast path below). A PoisonEvent,
    or an event whose type does not belong on its topic, becomes a DeadLetter: produced to
    `<topic>.dlq` (idempotent producer, flushed before the insert, so the DLQ topic has it
    whenever the table does — at least once, as a retry after a failed insert may produce it
    again) and a `dead_letters` row. The sink never stops on a bad record.
(4) The insert carries `insert_deduplication_token = topic-partition-first-last` and the
    tables keep a non-replicated deduplication window, so re-sending the same batch after an
    insert whose outcome is unknown (timeout, crash) is dropped by ClickHouse, not doubled.
(5) The Kafka offset (last+1) is committed synchronously only after the insert succeeded; a
    failed commit is logged and ignored, (1) makes it harmless.

The fast path (`projections/avro_block.py`): a record whose header names a writer schema of
an event type that belongs on its topic is not decoded here. A run of such records (one
partition, one table, one writer schema: a change of writer also ends the run, as a change
of table does in (2)) is inserted as one Avro block that ClickHouse parses and checks itself.
When ClickHouse refuses the block (a record it cannot read or that fails a check), nothing
of it landed, and the run is decoded record by record with the Codec and goes through the
row path above: poison is dead-lettered with its reason, every valid neighbour lands, and
(2)-(5) hold as for any run. After a refusal the partition's next `batch_max` records take
the row path (in a poison storm the refused insert would double the cost of every run). Any
other record (unknown header, a writer the Codec does not know, wrong topic, tombstone) takes
the row path directly. A refusal for a reason other than the data (ClickHouse unreachable)
is a failed insert like any other: the run is kept as it is and retried (back-pressure).

Partial sinks (replay, `projections/replay.py`): `subscribe` limits the topics read; `keep`
refuses records by table, time or offset (consumed, never landed, never dead-lettered); with
`produce_dead_letters=False` dead letters are landed in `dead_letters` but not produced again
(the live sink already put them on the DLQ topic). (1)-(5) hold unchanged for what is kept:
a refused record has no row, so it cannot move max(_offset); every kept record ≤ max is
still landed, and a record refused once is refused again after a restart, provided the same
`keep` is used against the same database (replay only ever fills an empty database, with a
fresh group). A `keep` that is a `Keep` (what replay uses) lets records take the fast path:
it decides from the table, the offset and (with `since`) the envelope's time read from the
record's first bytes, and sends a record to the Codec when only decoding can tell (it might
be a dead letter that `dead_letters` wants). Any other callable sees every record decoded.

Back-pressure: a failed insert pauses that partition (no more fetching, so memory stays at
one run plus at most one poll's records), keeps the run, retries with capped exponential
backoff and resumes when the insert succeeds. Other partitions keep flowing.

Threading: a Sink is driven by one thread (`run` or the test's `poll_once` calls);
`status()` may be called from any thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import OperationalError
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from projections import avro_block
from projections.schema import (
    DEAD_LETTER_COLUMNS,
    DEAD_LETTERS,
    ENVELOPE_COLUMNS,
    columns_for,
    dead_letter_row,
    event_to_row,
    table_for,
)
from projections.store import LockedStore
from streams.codec import HEADER_LEN, Codec, PoisonEvent
from streams.deadletter import DeadLetter
from streams.topics import Topics

log = logging.getLogger(__name__)

_BACKOFF_BASE = 0.1
_POLL_BATCH = 10000  # records per consume() call: fewer round trips into librdkafka
_MAX_RUN = 200_000  # a fast run stays one ClickHouse insert block (min_insert_block_size_rows ≈ 1M)
_OCCURRED_AT = ENVELOPE_COLUMNS.index("occurred_at")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TRANSIENT = (OperationalError, ConnectionError, TimeoutError, OSError)  # not the data's fault: retry as is

RecordFilter = Callable[[str, Sequence[str], Sequence[Any]], bool]
"""`keep(table, columns, row)`: False = the record is consumed but not landed (see module doc).

`row` is laid out as `columns` (an event table's `columns_for` or `DEAD_LETTER_COLUMNS`); both
end with `_topic, _partition, _offset`."""


@dataclass(frozen=True)
class Keep:
    """A `RecordFilter` the fast path understands: wanted tables, a time floor, per-partition ends.

    Called as a RecordFilter on a decoded row: the table is wanted, the offset is below its
    partition's end (an unknown partition has end 0), and, for event tables, `occurred_at`
    ≥ `since`. `fast` gives the same verdict for an undecoded record, or None when only
    decoding can tell.
    """

    tables: frozenset[str]
    since: datetime | None
    ends: Mapping[tuple[str, int], int]

    def __call__(self, table: str, columns: Sequence[str], row: Sequence[Any]) -> bool:
        if table not in self.tables:
            return False
        if row[-1] >= self.ends.get((row[-3], row[-2]), 0):
            return False  # arrived after the job started (or on a partition created since)
        return self.since is None or table == DEAD_LETTERS or row[_OCCURRED_AT] >= self.since

    def fast(self, table: str, topic: str, partition: int, offset: int, value: bytes) -> bool | None:
        """The verdict on a record the fast path would land in `table`, without decoding it.

        A record it would refuse may still be poison, i.e. a `dead_letters` row: when that
        table is wanted, only the Codec can say (None).
        """
        if offset >= self.ends.get((topic, partition), 0):
            return False  # refused whatever it decodes to: a dead letter carries the same offset
        if table not in self.tables:
            return None if DEAD_LETTERS in self.tables else False
        if self.since is None:
            return True
        micros = avro_block.occurred_at_micros(value)
        if micros is None:
            return None
        if micros >= (self.since - _EPOCH) // timedelta(microseconds=1):
            return True
        return None if DEAD_LETTERS in self.tables else False


_UNSEEN: Any = object()  # a (topic, header) the route cache has not seen yet


@dataclass(frozen=True)
class _Route:
    """Where a fast record goes: its table and how (one per topic and writer schema)."""

    table: str
    plan: avro_block.Plan


@dataclass
class _Record:
    """A consumed record, decoded once: where it goes and its row."""

    offset: int
    table: str
    columns: tuple[str, ...]
    row: list[Any]
    dead: DeadLetter | None


@dataclass
class _Run:
    """Consecutive records of one partition bound for one table (step 2).

    A row run holds decoded rows; a fast run (`route` set) holds the records' offsets, keys
    and bytes, all of one writer schema, for one Avro block (or for decoding if refused).
    """

    table: str
    columns: tuple[str, ...]
    first: int
    last: int
    started: float
    rows: list[list[Any]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    dlq_sent: bool = False
    route: _Route | None = None
    offsets: list[int] = field(default_factory=list)
    keys: list[bytes | None] = field(default_factory=list)
    values: list[bytes] = field(default_factory=list)

    def size(self) -> int:
        return len(self.offsets) if self.route is not None else len(self.rows)


@dataclass(slots=True)
class _FastSeg:
    """Consecutive consumed records of one fast route, not decoded: appended to as they arrive,
    moved into a run a whole list at a time (no per-record work between consume and insert)."""

    route: _Route
    offsets: list[int]
    keys: list[bytes | None]
    values: list[bytes]


@dataclass
class _Partition:
    topic: str
    partition: int
    next_offset: int = -1  # lowest offset still wanted; anything below is a redelivery and is dropped
    run: _Run | None = None
    backlog: deque[_Record | _FastSeg] = field(default_factory=deque)  # consumed, not yet in a run
    paused: bool = False
    unresolved: bool = False  # ClickHouse could not be asked where to resume (step 1 pending)
    committed: int = -1  # last offset we committed to Kafka
    slow_until: int = -1  # after a refused fast run, records below this offset are decoded (poison storm)
    idle_check_at: float = 0.0
    failures: int = 0
    retry_at: float = 0.0
    last_error: str | None = None

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def pending_rows(self) -> int:
        # list() copies in one C call: status() reads this from another thread while the driver appends
        queued = sum(len(b.offsets) if type(b) is _FastSeg else 1 for b in list(self.backlog))
        return (self.run.size() if self.run else 0) + queued


class SinkError(RuntimeError):
    """An insert or DLQ produce failed; the batch is kept and retried."""


class Sink:
    """Consumes the catalogue topics (or `subscribe`'s subset) and lands events in their tables (see module doc)."""

    def __init__(
        self,
        bootstrap: str,
        group: str,
        topics: Topics,
        store: Client | LockedStore,
        codec: Codec | None = None,
        batch_max: int = 5000,
        batch_ms: int = 200,
        *,
        max_backoff: float = 5.0,
        consumer_config: dict[str, Any] | None = None,
        subscribe: Sequence[str] | None = None,
        keep: RecordFilter | None = None,
        produce_dead_letters: bool = True,
        fast: bool = True,
    ) -> None:
        self.topics = topics
        self.subscribed = list(subscribe) if subscribe is not None else topics.all()
        unknown = [t for t in self.subscribed if topics.spec_for(t) is None]
        if unknown:
            raise ValueError(f"not catalogue topics of prefix {topics.prefix!r}: {unknown}")
        self._keep = keep
        # The fast path needs no decoded row to filter on: off for a `keep` that is not a Keep.
        self._fast = fast and (keep is None or isinstance(keep, Keep))
        self._keep_fast = keep if isinstance(keep, Keep) else None
        self._routes: dict[tuple[str, bytes], _Route | None] = {}
        self._types: dict[str, dict[str, str]] = {}
        self._produce_dlq = produce_dead_letters
        self.group = group
        self.batch_max = max(1, min(batch_max, _MAX_RUN))
        self.batch_s = max(1, batch_ms) / 1000.0
        self.max_backoff = max_backoff
        self.consumer_name = f"projections-sink:{group}"
        self._store = store if isinstance(store, LockedStore) else LockedStore(store)
        self._codec = codec or Codec()
        # Only writers this sink's Codec reads: a record the Codec calls unknown-fingerprint
        # must stay a dead letter, not land because ClickHouse could read it.
        self._writers = {h: w for h, w in avro_block.writers().items() if _knows(self._codec, h)} if self._fast else {}
        self._bootstrap = bootstrap
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "client.id": self.consumer_name,
            "isolation.level": "read_committed",  # aborted facts are never projected
            "enable.auto.commit": False,  # step 5 commits, after the insert
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "queued.max.messages.kbytes": 32768,  # bounds librdkafka's prefetch buffer (all partitions)
            # Throughput: big fetches per partition (the 1 MB default caps a fetch of 3
            # partitions at ~15k records), answered as soon as any data is there (freshness).
            "max.partition.fetch.bytes": 8 * 1024 * 1024,
            "fetch.max.bytes": 32 * 1024 * 1024,
            "fetch.wait.max.ms": 100,
            # A crashed sink's partitions move after this long (broker minimum is 6 s); pass
            # group.instance.id (static membership) for an instant takeover by its restart.
            "session.timeout.ms": 10000,
            "heartbeat.interval.ms": 2000,
        }
        conf.update(consumer_config or {})
        self._consumer = Consumer(conf)
        self._producer: Producer | None = None
        self._parts: dict[tuple[str, int], _Partition] = {}
        self._lock = threading.Lock()  # guards _parts against status() readers
        self._closed = False
        # counters (read by /status)
        self.rows_inserted = 0
        self.dead_lettered = 0
        self.refused = 0  # consumed but refused by `keep`
        self.batches = 0
        self.insert_failures = 0
        self.fast_rows = 0  # rows landed by the fast path (of rows_inserted)
        self.fast_fallbacks = 0  # fast runs ClickHouse refused, then decoded by the Codec
        self.commit_failures = 0
        self.last_insert_at: datetime | None = None
        self.last_error: str | None = None
        self.assigned = threading.Event()  # set once the group gave us an assignment
        self._consumer.subscribe(
            self.subscribed, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    # --- step 1: resume from ClickHouse -------------------------------------------------

    def resume_offsets(self, topic: str, partitions: list[int]) -> dict[int, int]:
        """partition → next offset to consume, from what ClickHouse already holds (step 1)."""
        spec = self.topics.spec_for(topic)
        tables = [table_for(e) for e in spec.events] if spec else []
        where = "_topic = {topic:String} AND _partition IN {parts:Array(UInt16)}"
        union = " UNION ALL ".join(
            f"SELECT _partition, _offset FROM {t} WHERE {where}" for t in [*tables, DEAD_LETTERS]
        )
        rows = self._store.query_rows(
            f"SELECT _partition, max(_offset) FROM ({union}) GROUP BY _partition",
            parameters={"topic": topic, "parts": partitions},
        )
        return {int(p): int(o) + 1 for p, o in rows}

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        by_topic: dict[str, list[TopicPartition]] = {}
        for tp in partitions:
            by_topic.setdefault(tp.topic, []).append(tp)
        unresolved: set[tuple[str, int]] = set()
        for topic, tps in by_topic.items():
            try:
                # (1) ClickHouse holds every record ≤ max(_offset) and none above: start at max+1.
                resume = self.resume_offsets(topic, [tp.partition for tp in tps])
            except Exception as exc:  # ClickHouse down: consume nothing until we know (retried in poll_once)
                log.warning("cannot read resume offsets of %s from ClickHouse, pausing: %s", topic, exc)
                self.last_error = f"resume offsets: {exc}"
                unresolved.update((topic, tp.partition) for tp in tps)
                continue
            for tp in tps:
                if tp.partition in resume:
                    tp.offset = resume[tp.partition]
        consumer.assign(partitions)
        with self._lock:
            for tp in partitions:
                key = (tp.topic, tp.partition)
                state = _Partition(tp.topic, tp.partition, next_offset=max(tp.offset, -1))
                if key in unresolved:
                    state.unresolved = state.paused = True
                self._parts[key] = state
        paused = [TopicPartition(t, p) for t, p in unresolved]
        if paused:
            consumer.pause(paused)
        log.info("sink assigned %d partitions (%d awaiting ClickHouse)", len(partitions), len(paused))
        self.assigned.set()

    def _retry_unresolved(self) -> None:
        """Step 1 for partitions whose resume point ClickHouse could not give at assignment."""
        todo = [p for p in self._parts.values() if p.unresolved and p.retry_at <= time.monotonic()]
        for p in todo:
            try:
                resume = self.resume_offsets(p.topic, [p.partition])
                if p.partition in resume:
                    self._consumer.seek(TopicPartition(p.topic, p.partition, resume[p.partition]))
                    p.next_offset = resume[p.partition]
            except Exception as exc:
                self._backoff(p, f"resume offsets: {exc}")
                continue
            p.unresolved = False
            p.backlog.clear()
            self._resume(p)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Hand over cleanly: land what we hold. If that fails the next owner resumes from
        # ClickHouse anyway (step 1), so dropping the buffered records is safe.
        for tp in partitions:
            p = self._parts.get((tp.topic, tp.partition))
            if p is not None and not p.unresolved:
                self._drain(p, final=True)
        self._forget(consumer, partitions)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Another member may own them already: no flush, no commit; step 1 covers the rest.
        self._forget(consumer, partitions)

    def _forget(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        with self._lock:
            dropped = [self._parts.pop((tp.topic, tp.partition), None) for tp in partitions]
        paused = [p.tp for p in dropped if p is not None and p.paused]
        if paused:
            consumer.resume(paused)  # do not carry a pause into a later assignment

    # --- steps 2-5 ---------------------------------------------------------------------

    def _decode(self, msg: Message) -> _Record:
        """(3) An event row for its table, or a dead letter: a bad record never stops the sink."""
        topic, partition, offset = _coordinates(msg)
        return self._decode_value(topic, partition, offset, msg.key(), msg.value())

    def _decode_value(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes | None) -> _Record:
        try:
            try:
                event = self._codec.decode(value)
            except PoisonEvent:
                raise
            except Exception as exc:  # a codec bug must not stop the sink either
                raise PoisonEvent("decode-error", f"{type(exc).__name__}: {exc}") from None
            spec = self.topics.spec_for(topic)
            if spec is None or event.event_type not in spec.events:
                raise PoisonEvent("wrong-topic", f"{event.event_type} does not belong on {topic}")
            row = event_to_row(event, topic, partition, offset)
            return _Record(offset, table_for(event.event_type), columns_for(event.event_type), row, None)
        except PoisonEvent as exc:
            dl = DeadLetter(
                reason=exc.reason,
                detail=exc.detail,
                topic=topic,
                partition=partition,
                offset=offset,
                consumer=self.consumer_name,
                first_seen=datetime.now(UTC),
                key=key,
                value=value,
            )
            return _Record(offset, DEAD_LETTERS, DEAD_LETTER_COLUMNS, dead_letter_row(dl, topic, partition, offset), dl)

    def _route(self, topic: str, header: bytes) -> _Route | None:
        """The fast route of records with `header` on `topic`, or None: they take the Codec path.

        None for an unknown header, an event type that does not belong on the topic (the
        Codec says wrong-topic), or a table the fast path cannot fill exactly. Cached, except
        when ClickHouse could not be asked for the table's columns (asked again next time).
        """
        writer = self._writers.get(header)
        spec = self.topics.spec_for(topic)
        route: _Route | None = None
        if writer is not None and spec is not None and writer.event_type in spec.events:
            table = table_for(writer.event_type)
            if table not in self._types:
                try:
                    wanted = sorted({table_for(e) for e in spec.events})
                    rows = self._store.query_rows(avro_block.TABLE_TYPES_SQL, parameters={"tables": wanted})
                    found = avro_block.table_types(rows)
                except Exception as exc:
                    log.info("fast path: cannot read the columns of %s yet: %s", table, exc)
                    return None
                self._types.update({t: found.get(t, {}) for t in wanted})
            try:
                route = _Route(table, avro_block.plan(writer, self._types[table]))
            except avro_block.Unsupported as exc:
                log.info("fast path off for %s into %s: %s", writer.event_type, table, exc)
        self._routes[(topic, header)] = route
        return route

    def _drain(self, p: _Partition, final: bool = False) -> bool:
        """Move backlog records into runs, flushing as runs fill or change table (step 2).

        Returns False when an insert failed (the partition is then paused, nothing lost).
        """
        backlog = p.backlog
        while True:
            while backlog:
                item = backlog[0]
                run = p.run
                if isinstance(item, _FastSeg):
                    # a fast run holds one writer schema of one table: anything else ends it
                    if run is not None and run.route is not item.route:
                        if not self._flush(p):
                            return False
                        continue
                    if run is None:
                        run = _Run(item.route.table, item.route.plan.columns, item.offsets[0], 0, time.monotonic())
                        run.route = item.route
                        p.run = run
                    room = self.batch_max - len(run.offsets)
                    if len(item.offsets) <= room:
                        run.offsets += item.offsets
                        run.keys += item.keys
                        run.values += item.values
                        backlog.popleft()
                    else:  # the run fills up: take what fits, the rest waits for the next run
                        run.offsets += item.offsets[:room]
                        run.keys += item.keys[:room]
                        run.values += item.values[:room]
                        del item.offsets[:room], item.keys[:room], item.values[:room]
                    run.last = run.offsets[-1]
                    if len(run.offsets) >= self.batch_max and not self._flush(p):
                        return False
                    continue
                rec = item
                # (2) a run never mixes tables: inserts land in offset order, so (1)'s max is a prefix.
                if run is not None and (run.route is not None or run.table != rec.table):
                    if not self._flush(p):
                        return False
                    continue
                if run is None:
                    run = p.run = _Run(rec.table, rec.columns, rec.offset, rec.offset, time.monotonic())
                run.rows.append(rec.row)
                run.last = rec.offset
                if rec.dead is not None:
                    run.dead.append(rec.dead)
                backlog.popleft()
                if len(run.rows) >= self.batch_max and not self._flush(p):
                    return False
            if p.run is not None and (final or time.monotonic() - p.run.started >= self.batch_s):
                if not self._flush(p):
                    return False
                if backlog:
                    continue  # a refused fast run came back decoded: drain it too
            return True

    def _flush(self, p: _Partition) -> bool:
        run = p.run
        if run is None:
            return True
        token = f"{p.topic}-{p.partition}-{run.first}-{run.last}"
        try:
            if run.route is not None:
                self._insert_fast(p, run, token)
            else:
                if run.dead and not run.dlq_sent and self._produce_dlq:
                    self._produce_dead_letters(p.topic, run.dead)  # (3) DLQ topic first, acknowledged
                    run.dlq_sent = True
                # (4) one insert per run; a retry of the same run carries the same token → deduplicated
                self._store.insert(run.table, run.rows, run.columns, settings={"insert_deduplication_token": token})
        except Exception as exc:
            if run.route is not None and not isinstance(exc, _TRANSIENT):
                self._fall_back(p, run, exc)
                return True
            self.insert_failures += 1
            log.warning("insert of %s into %s failed (%d rows), pausing: %s", token, run.table, run.size(), exc)
            self._backoff(p, f"insert {token}: {exc}")
            return False
        # (5) only now tell Kafka; a failed commit is harmless, (1) resumes from ClickHouse
        self._commit(p, run.last + 1)
        if run.table == DEAD_LETTERS:
            self.dead_lettered += len(run.rows)
        else:
            self.rows_inserted += run.size()
            if run.route is not None:
                self.fast_rows += run.size()
        self.batches += 1
        self.last_insert_at = datetime.now(UTC)
        p.run = None
        p.failures = 0
        p.last_error = None
        return True

    def _insert_fast(self, p: _Partition, run: _Run, token: str) -> None:
        """(3)+(4) for a fast run: one Avro block, checked and landed by ClickHouse, or refused whole."""
        assert run.route is not None
        plan = run.route.plan
        data = avro_block.block(plan, p.topic, p.partition, run.offsets, run.values)
        params = avro_block.parameters(p.topic, p.partition, run.first, run.last, token)
        self._store.call(lambda c: avro_block.insert_block(c, plan, data, params))

    def _fall_back(self, p: _Partition, run: _Run, exc: Exception) -> None:
        """ClickHouse refused a fast run: nothing of it landed. Decode it and put it back in front.

        The decoded records go through the row path: poison becomes dead letters with the
        Codec's reason, valid records land, in offset order (2), with tokens of their own runs.
        """
        self.fast_fallbacks += 1
        detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        log.info(
            "fast insert of %s[%d] %d-%d refused, decoding its %d records: %s",
            p.topic, p.partition, run.first, run.last, run.size(), detail,
        )  # fmt: skip
        decoded: list[_Record] = []
        for offset, key, value in zip(run.offsets, run.keys, run.values, strict=True):
            rec = self._decode_value(p.topic, p.partition, offset, key, value)
            if self._keep is not None and not self._keep(rec.table, rec.columns, rec.row):
                self.refused += 1
                continue
            decoded.append(rec)
        if not any(r.dead for r in decoded):
            # Every record was valid: a check stricter than the Codec (a non-canonical id, a
            # time near the bound...) or a fast path that cannot read this table. Correct
            # either way, but slow if it repeats, so say so.
            log.warning("fast path refused a run of valid records (%s[%d] %d-%d): %s", p.topic, p.partition,
                        run.first, run.last, detail)  # fmt: skip
        p.run = None
        p.backlog.extendleft(reversed(decoded))
        # Where one refusal is, more are likely (a bad producer, a poison storm): a refused run
        # costs an extra ClickHouse call, so the next batch_max records take the Codec path.
        p.slow_until = max(p.slow_until, p.next_offset + self.batch_max)

    def _commit(self, p: _Partition, offset: int) -> None:
        try:
            self._consumer.commit(offsets=[TopicPartition(p.topic, p.partition, offset)], asynchronous=False)
            p.committed = offset
        except KafkaException as exc:
            self.commit_failures += 1
            log.info(
                "offset commit %s[%d]@%d failed (ClickHouse stays authoritative): %s", p.topic, p.partition, offset, exc
            )

    def _commit_idle(self, p: _Partition, now: float) -> None:
        """Commit past transaction markers once a partition is idle, so group lag reaches 0.

        A transactional producer leaves a control record after each commit; the consumer skips
        it, so `last + 1` stays one short of the end. When everything delivered has landed,
        the consumer's position is the right commit point (it only adds skipped non-data offsets).
        """
        if p.run or p.backlog or p.paused or p.unresolved or now < p.idle_check_at:
            return
        p.idle_check_at = now + 1.0
        try:
            position = self._consumer.position([p.tp])[0].offset
        except KafkaException:
            return
        if position >= 0 and position > p.committed:
            self._commit(p, position)

    def _produce_dead_letters(self, topic: str, dead: list[DeadLetter]) -> None:
        if self._producer is None:
            self._producer = Producer(
                {"bootstrap.servers": self._bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 5}
            )
        errors: list[str] = []

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                errors.append(err.str())

        dlq = self.topics.dlq(topic)
        for dl in dead:
            headers: list[tuple[str, str | bytes | None]] = list(dl.headers())
            self._producer.produce(dlq, value=dl.value, key=dl.key, headers=headers, on_delivery=on_delivery)
        left = self._producer.flush(10.0)
        if left or errors:
            raise SinkError(f"dead letters to {dlq} not acknowledged: {left} pending, errors {errors[:3]}")

    def _backoff(self, p: _Partition, error: str) -> None:
        """Back-pressure: pause the partition (stop fetching it) and schedule a retry."""
        p.failures += 1
        p.last_error = self.last_error = error
        p.retry_at = time.monotonic() + min(self.max_backoff, _BACKOFF_BASE * 2 ** (p.failures - 1))
        if not p.paused:
            self._consumer.pause([p.tp])
            p.paused = True

    def _resume(self, p: _Partition) -> None:
        if p.paused:
            self._consumer.resume([p.tp])
            p.paused = False

    # --- driving -----------------------------------------------------------------------

    def poll_once(self, timeout: float = 0.1) -> int:
        """One round: retry stalled partitions, consume, flush aged runs. Returns records consumed."""
        now = time.monotonic()
        self._retry_unresolved()
        for p in list(self._parts.values()):
            if p.paused and not p.unresolved and p.retry_at <= now and self._drain(p, final=True):
                self._resume(p)
        deadlines = [p.run.started + self.batch_s for p in self._parts.values() if p.run and not p.paused]
        wait = min([timeout, *(d - now for d in deadlines)])
        msgs = self._consumer.consume(num_messages=min(_POLL_BATCH, self.batch_max * 2), timeout=max(0.0, wait))
        parts, routes, fast, keep_fast = self._parts, self._routes, self._fast, self._keep_fast
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:  # only with enable.partition.eof (replay)
                    self._reached_end(msg)
                    continue
                if err.fatal() or err.code() == KafkaError._FATAL:  # e.g. a static member fenced after a
                    # broker restart: this consumer is done; the service builds a new one
                    self.last_error = f"consumer: {err.str()}"
                    raise SinkError(f"the Kafka consumer hit a fatal error and must be rebuilt: {err.str()}")
                if self.last_error != f"consumer: {err.str()}":
                    log.warning("consumer error: %s", err)  # once per distinct error, not per poll
                    self.last_error = f"consumer: {err.str()}"
                continue
            # a record (not an error) always has its coordinates: no None checks on the hot path
            topic: str = msg.topic()  # type: ignore[assignment]
            partition: int = msg.partition()  # type: ignore[assignment]
            offset: int = msg.offset()  # type: ignore[assignment]
            part = parts.get((topic, partition))
            if part is None or part.unresolved or offset < part.next_offset:
                continue  # not ours any more, start not known yet (refetched after the seek), or a redelivery
            part.next_offset = offset + 1
            value = msg.value()
            if fast and type(value) is bytes and offset >= part.slow_until:
                header = value[:HEADER_LEN]
                route = routes.get((topic, header), _UNSEEN)
                if route is _UNSEEN:
                    route = self._route(topic, header)
                if route is not None:
                    verdict = keep_fast is None or keep_fast.fast(route.table, topic, partition, offset, value)
                    if verdict is False:
                        self.refused += 1  # no row: cannot move (1)'s max, and is refused again on a re-read
                        continue
                    if verdict:
                        backlog = part.backlog
                        seg = backlog[-1] if backlog else None
                        if isinstance(seg, _FastSeg) and seg.route is route:
                            seg.offsets.append(offset)
                            seg.keys.append(msg.key())
                            seg.values.append(value)
                        else:
                            backlog.append(_FastSeg(route, [offset], [msg.key()], [value]))
                        continue
            rec = self._decode(msg)
            if self._keep is not None and not self._keep(rec.table, rec.columns, rec.row):
                self.refused += 1
                continue
            part.backlog.append(rec)
        for p in list(self._parts.values()):
            if not p.paused and (p.backlog or p.run is not None):
                self._drain(p)
            self._commit_idle(p, now)
        return len(msgs)

    def _reached_end(self, msg: Message) -> None:
        """The fetcher reached the partition's end: every record below it was delivered before this event."""
        part = self._parts.get((msg.topic() or "", msg.partition() or 0))
        end = msg.offset()
        if part is not None and not part.unresolved and end is not None and end > part.next_offset:
            part.next_offset = end  # skips trailing transaction markers and compacted-away offsets

    def run_once(self) -> int:
        """`poll_once` with the default timeout (for tests and simple loops)."""
        return self.poll_once()

    def run(self, stop: threading.Event, poll_timeout: float = 0.1) -> None:
        """Consume until `stop` is set, then flush, commit and close."""
        try:
            while not stop.is_set():
                try:
                    self.poll_once(poll_timeout)
                except KafkaException as exc:  # transient client errors: log, keep going
                    err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                    if err is not None and (err.fatal() or err.code() == KafkaError._FATAL):
                        raise SinkError(f"the Kafka consumer hit a fatal error and must be rebuilt: {exc}") from exc
                    log.warning("sink poll failed: %s", exc)
                    self.last_error = str(exc)
                    stop.wait(0.5)
        finally:
            self.close()

    def pending_rows(self) -> int:
        return sum(p.pending_rows() for p in list(self._parts.values()))

    def positions(self) -> dict[tuple[str, int], int]:
        """(topic, partition) → how far the sink has read each assigned partition (next offset wanted).

        The larger of the consumer's position (which moves past transaction markers) and the
        sink's own next offset (set by step 1's resume point and, with `enable.partition.eof`,
        by reaching the end), so it reaches a partition's end offset even when the last offsets
        hold no record. Call it from the thread that drives the sink.
        """
        with self._lock:
            parts = [p for p in self._parts.values() if not p.unresolved]
        out = {(p.topic, p.partition): p.next_offset for p in parts if p.next_offset >= 0}
        if parts:
            for tp in self._consumer.position([p.tp for p in parts]):
                if tp.offset >= 0 and tp.topic is not None:
                    key = (tp.topic, tp.partition)
                    out[key] = max(out.get(key, 0), tp.offset)
        return out

    def close(self) -> None:
        """Final flush (one attempt per partition) and commit, then leave the group."""
        if self._closed:
            return
        self._closed = True
        for p in list(self._parts.values()):
            if not p.unresolved:
                self._drain(p, final=True)
        try:
            self._consumer.close()  # leaves the group so a successor is assigned at once
        except (KafkaException, RuntimeError) as exc:
            log.warning("sink consumer close: %s", exc)
        if self._producer is not None:
            self._producer.flush(5.0)

    def status(self) -> dict[str, Any]:
        """A JSON-able snapshot for /status."""
        with self._lock:
            parts = list(self._parts.values())
        return {
            "group": self.group,
            "assigned": sorted(f"{p.topic}[{p.partition}]" for p in parts),
            "paused": sorted(f"{p.topic}[{p.partition}]" for p in parts if p.paused),
            "pending_rows": sum(p.pending_rows() for p in parts),
            "rows_inserted": self.rows_inserted,
            "dead_lettered": self.dead_lettered,
            "refused": self.refused,
            "batches": self.batches,
            "insert_failures": self.insert_failures,
            "fast_rows": self.fast_rows,
            "fast_fallbacks": self.fast_fallbacks,
            "commit_failures": self.commit_failures,
            "last_insert_at": self.last_insert_at.isoformat() if self.last_insert_at else None,
            "last_error": self.last_error,
        }


def _knows(codec: Codec, header: bytes) -> bool:
    """Whether `codec` reads records with this header (it refuses an empty body, not the header)."""
    try:
        codec.decode(header)
    except PoisonEvent as exc:
        return exc.reason != "unknown-fingerprint"
    return True


def _coordinates(msg: Message) -> tuple[str, int, int]:
    """(topic, partition, offset) of a consumed record (never None for a real record)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset
