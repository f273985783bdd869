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
(3) Every record is decoded with the Codec. A PoisonEvent, or an event whose type does not
    belong on its topic, becomes a DeadLetter: produced to `<topic>.dlq` (idempotent producer,
    flushed before the insert, so the DLQ topic has it whenever the table does — at least
    once, as a retry after a failed insert may produce it again) and a `dead_letters` row.
    The sink never stops on a bad record.
(4) The insert carries `insert_deduplication_token = topic-partition-first-last` and the
    tables keep a non-replicated deduplication window, so re-sending the same batch after an
    insert whose outcome is unknown (timeout, crash) is dropped by ClickHouse, not doubled.
(5) The Kafka offset (last+1) is committed synchronously only after the insert succeeded; a
    failed commit is logged and ignored, (1) makes it harmless.

Partial sinks (replay, `projections/replay.py`): `subscribe` limits the topics read; `keep`
refuses records by table, time or offset (consumed, never landed, never dead-lettered); with
`produce_dead_letters=False` dead letters are landed in `dead_letters` but not produced again
(the live sink already put them on the DLQ topic). (1)-(5) hold unchanged for what is kept:
a refused record has no row, so it cannot move max(_offset); every kept record ≤ max is
still landed, and a record refused once is refused again after a restart, provided the same
`keep` is used against the same database (replay only ever fills an empty database, with a
fresh group).

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from projections.schema import DEAD_LETTER_COLUMNS, DEAD_LETTERS, columns_for, dead_letter_row, event_to_row, table_for
from projections.store import LockedStore
from streams.codec import Codec, PoisonEvent
from streams.deadletter import DeadLetter
from streams.topics import Topics

log = logging.getLogger(__name__)

_BACKOFF_BASE = 0.1
_POLL_BATCH = 500

RecordFilter = Callable[[str, Sequence[str], Sequence[Any]], bool]
"""`keep(table, columns, row)`: False = the record is consumed but not landed (see module doc).

`row` is laid out as `columns` (an event table's `columns_for` or `DEAD_LETTER_COLUMNS`); both
end with `_topic, _partition, _offset`."""


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
    """Consecutive records of one partition bound for one table (step 2)."""

    table: str
    columns: tuple[str, ...]
    first: int
    last: int
    started: float
    rows: list[list[Any]] = field(default_factory=list)
    dead: list[DeadLetter] = field(default_factory=list)
    dlq_sent: bool = False


@dataclass
class _Partition:
    topic: str
    partition: int
    next_offset: int = -1  # lowest offset still wanted; anything below is a redelivery and is dropped
    run: _Run | None = None
    backlog: deque[_Record] = field(default_factory=deque)  # consumed while the run could not be flushed
    paused: bool = False
    unresolved: bool = False  # ClickHouse could not be asked where to resume (step 1 pending)
    committed: int = -1  # last offset we committed to Kafka
    idle_check_at: float = 0.0
    failures: int = 0
    retry_at: float = 0.0
    last_error: str | None = None

    @property
    def tp(self) -> TopicPartition:
        return TopicPartition(self.topic, self.partition)

    def pending_rows(self) -> int:
        return (len(self.run.rows) if self.run else 0) + len(self.backlog)


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
    ) -> None:
        self.topics = topics
        self.subscribed = list(subscribe) if subscribe is not None else topics.all()
        unknown = [t for t in self.subscribed if topics.spec_for(t) is None]
        if unknown:
            raise ValueError(f"not catalogue topics of prefix {topics.prefix!r}: {unknown}")
        self._keep = keep
        self._produce_dlq = produce_dead_letters
        self.group = group
        self.batch_max = max(1, batch_max)
        self.batch_s = max(1, batch_ms) / 1000.0
        self.max_backoff = max_backoff
        self.consumer_name = f"projections-sink:{group}"
        self._store = store if isinstance(store, LockedStore) else LockedStore(store)
        self._codec = codec or Codec()
        self._bootstrap = bootstrap
        conf: dict[str, Any] = {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "client.id": self.consumer_name,
            "isolation.level": "read_committed",  # aborted facts are never projected
            "enable.auto.commit": False,  # step 5 commits, after the insert
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            "queued.max.messages.kbytes": 16384,  # bounds librdkafka's prefetch buffer
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
        value = msg.value()
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
                key=msg.key(),
                value=value,
            )
            return _Record(offset, DEAD_LETTERS, DEAD_LETTER_COLUMNS, dead_letter_row(dl, topic, partition, offset), dl)

    def _drain(self, p: _Partition, final: bool = False) -> bool:
        """Move backlog records into runs, flushing as runs fill or change table (step 2).

        Returns False when an insert failed (the partition is then paused, nothing lost).
        """
        while p.backlog:
            rec = p.backlog[0]
            # (2) a run never mixes tables: inserts land in offset order, so (1)'s max is a prefix.
            if p.run is not None and p.run.table != rec.table and not self._flush(p):
                return False
            if p.run is None:
                p.run = _Run(rec.table, rec.columns, rec.offset, rec.offset, time.monotonic())
            p.run.rows.append(rec.row)
            p.run.last = rec.offset
            if rec.dead is not None:
                p.run.dead.append(rec.dead)
            p.backlog.popleft()
            if len(p.run.rows) >= self.batch_max and not self._flush(p):
                return False
        if p.run is not None and (final or time.monotonic() - p.run.started >= self.batch_s):
            return self._flush(p)
        return True

    def _flush(self, p: _Partition) -> bool:
        run = p.run
        if run is None:
            return True
        token = f"{p.topic}-{p.partition}-{run.first}-{run.last}"
        try:
            if run.dead and not run.dlq_sent and self._produce_dlq:
                self._produce_dead_letters(p.topic, run.dead)  # (3) DLQ topic first, acknowledged
                run.dlq_sent = True
            # (4) one insert per run; a retry of the same run carries the same token → deduplicated
            self._store.insert(run.table, run.rows, run.columns, settings={"insert_deduplication_token": token})
        except Exception as exc:
            self.insert_failures += 1
            log.warning("insert of %s into %s failed (%d rows), pausing: %s", token, run.table, len(run.rows), exc)
            self._backoff(p, f"insert {token}: {exc}")
            return False
        # (5) only now tell Kafka; a failed commit is harmless, (1) resumes from ClickHouse
        self._commit(p, run.last + 1)
        if run.table == DEAD_LETTERS:
            self.dead_lettered += len(run.rows)
        else:
            self.rows_inserted += len(run.rows)
        self.batches += 1
        self.last_insert_at = datetime.now(UTC)
        p.run = None
        p.failures = 0
        p.last_error = None
        return True

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
        touched: set[tuple[str, int]] = set()
        for msg in msgs:
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:  # only with enable.partition.eof (replay)
                    self._reached_end(msg)
                    continue
                if self.last_error != f"consumer: {err.str()}":
                    log.warning("consumer error: %s", err)  # once per distinct error, not per poll
                    self.last_error = f"consumer: {err.str()}"
                continue
            topic, partition, offset = _coordinates(msg)
            key = (topic, partition)
            part = self._parts.get(key)
            if part is None or part.unresolved or offset < part.next_offset:
                continue  # not ours any more, start not known yet (refetched after the seek), or a redelivery
            part.next_offset = offset + 1
            rec = self._decode(msg)
            if self._keep is not None and not self._keep(rec.table, rec.columns, rec.row):
                self.refused += 1  # no row: cannot move (1)'s max, and is refused again on a re-read
                continue
            part.backlog.append(rec)
            touched.add(key)
        for p in list(self._parts.values()):
            if not p.paused and ((p.topic, p.partition) in touched or p.run is not None):
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
            "commit_failures": self.commit_failures,
            "last_insert_at": self.last_insert_at.isoformat() if self.last_insert_at else None,
            "last_error": self.last_error,
        }


def _coordinates(msg: Message) -> tuple[str, int, int]:
    """(topic, partition, offset) of a consumed record (never None for a real record)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset
