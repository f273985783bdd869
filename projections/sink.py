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
(2) A run is consecutive records of ONE topic-partition going to ONE table, complete at
    `batch_max` rows, at `batch_ms` age, or sooner when the inserter is idle (see Threading).
    A record bound for another table (a poison record amid good ones) first completes the run
    before it. Complete runs go to ONE inserter thread as jobs, in order, and it runs them one
    at a time, in that order: a partition's inserts land in offset order, so the max in (1)
    is always a prefix boundary: every record ≤ max is in ClickHouse.
(3) Every record is validated, by ClickHouse or by the Codec (fast path below). A PoisonEvent,
    or an event whose type does not belong on its topic, becomes a DeadLetter: produced to
    `<topic>.dlq` (idempotent producer, flushed before the insert, so the DLQ topic has it
    whenever the table does — at least once, as a retry after a failed insert may produce it
    again) and a `dead_letters` row. The sink never stops on a bad record.
(4) The insert carries `insert_deduplication_token = topic-partition-first-last` and the
    tables keep a non-replicated deduplication window, so re-sending the same batch after an
    insert whose outcome is unknown (timeout) is dropped by ClickHouse, not doubled.
    One fast insert may hold the runs of SEVERAL partitions of one topic (same table, same
    writer schema: one Avro block, fewer inserts). Why that is still exactly-once: (a) the
    block is one INSERT ... SELECT below `min_insert_block_size_rows`, so ClickHouse lands all
    of its runs or none; (b) jobs run one at a time in submission order and a partition has at
    most one run per job, so per partition the landed records are still a prefix and (1)'s
    max(_offset) is exact per partition, whatever other partitions shared its blocks; (c) the
    token names every run (`t-p-first-last` joined by `+`, partition order), so a retry of the
    same block is dropped, and a different block can never carry the same token; (d) after a
    crash nothing is retried: each partition restarts after its own max (1), and the new
    process cuts new blocks only from records above it, so no record is sent twice whatever
    the old blocks' shape was.
(5) The Kafka offsets (last+1) are committed synchronously only after the inserts holding
    them landed (the driver commits what the inserter reports landed, several partitions per
    call); a failed commit is logged and ignored, (1) makes it harmless.

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

Native blocks (issue 10's throughput floors): when the C transcoder is built and not turned
off (`LEDGERFLOW_NATIVE=0`, or `native=False`), a fast block is RowBinary made and checked by
`projections/_rowbinary.c` (`avro_block.native_block`): every check the Avro insert's SQL made,
done while each record is read once, then a plain `INSERT ... FORMAT RowBinary` with the same
token. A record that fails a check refuses the whole block before anything is sent
(`NativeRefused`), and the block goes the way of a block ClickHouse refused: decoded by the
Codec, which decides, as before. A writer schema the transcoder does not carry keeps the Avro
block. (1)-(5) are unchanged: same runs, same tokens, same order, one insert per job.

Intake: the driver takes each consume() batch a stretch at a time (`_take_batch`: one Python
step per run of records of one partition and one writer schema, the per-record work done in C
by `map`, slicing and `groupby`), and hands anything unusual to the record-by-record intake
(`_take_each`); both build the same backlog (tests/test_sink_avro.py compares them). A replay's
consumer may be a `RunConsumer` (projections/kafka_reader.py: librdkafka read in C, records handed
over as runs of one partition and one writer header, no Message objects): `_take_runs` takes a run
with the same per-stretch step as `_take_batch` (`_take_stretch`), odd records and errors go to
`_take_each`, and the same backlog results (the same test holds all three equal).

Partial sinks (replay, `projections/replay.py`): `subscribe` limits the topics read; `keep`
refuses records by table, time or offset (consumed, never landed, never dead-lettered); with
`produce_dead_letters=False` dead letters are landed in `dead_letters` but not produced again
(the live sink already put them on the DLQ topic); `assign` reads the given partitions from the
given offsets with no group (no join, no rebalance; step 1 still runs once) and `commit=False`
skips step 5's Kafka commits (nobody reads a replay's group); `consumer` is a consumer the caller
built (`sink_consumer_config`) and already assigned `assign`'s partitions at `assign`'s offsets, so
librdkafka fetched while the caller made the tables: kept as it is unless step 1 moves a start (then
re-assigned from ClickHouse's resume points, dropping what it prefetched). (1)-(5) hold unchanged for what is kept:
a refused record has no row, so it cannot move max(_offset); every kept record ≤ max is
still landed, and a record refused once is refused again after a restart, provided the same
`keep` is used against the same database (replay only ever fills an empty database, with a
fresh group). A `keep` that is a `Keep` (what replay uses) lets records take the fast path:
it decides from the table, the offset and (with `since`) the envelope's time read from the
record's first bytes, and sends a record to the Codec when only decoding can tell (it might
be a dead letter that `dead_letters` wants). Any other callable sees every record decoded.

Back-pressure: a failed insert is retried as it is (same block, same token) with capped
exponential backoff, and while it fails every partition is paused (no more fetching, so memory
stays at what is held) and the inserter takes nothing new; all resume when an insert lands.
One insert at a time means one failing insert holds up every partition behind it (with one
store, when one insert cannot land, the others would not either). When the inserter falls
behind (`queue_max` rows queued), the driver stops consuming until it catches up.

Threading: a Sink is driven by one thread (`run` or the test's `poll_once` calls); `status()`
may be called from any thread. The inserter is a second, daemon thread (it dies with the
process: a SIGKILL loses what it held, and (1) reads it again). It owns the store and the DLQ
producer while the sink runs; the driver owns the consumer (commits included). Why a thread:
chDB releases the GIL while ClickHouse works, so consuming overlaps inserting. Adaptive
batching: a run completes after `linger_s` (20 ms) when the inserter has nothing queued
(a quiet sink lands records at once), otherwise it grows until the inserter is free or the
run is full or `batch_ms` old (a busy sink makes fewer, bigger inserts). On revoke and on
close every queued insert gets one more attempt before the partitions move (the next owner's
step 1 must see all we will ever land); inserts given up then, and every later one sharing a
partition with them, are dropped, and a partition still ours goes back to step 1. On a lost
assignment nothing queued is attempted (only the insert in flight finishes). If the inserter
thread dies (a bug, not a refusal), nothing more is committed and `poll_once` raises
SinkError: the service builds a new sink, which resumes by (1).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import cache, partial
from itertools import groupby, islice
from operator import is_not, itemgetter, lt
from typing import Any, cast

import confluent_kafka
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import OperationalError
from confluent_kafka import OFFSET_BEGINNING, IsolationLevel, KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, OffsetSpec

from projections import avro_block
from projections.kafka_reader import OddRecord, RunConsumer, odd_records
from projections.metrics import SinkHooks
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
from streams import telemetry
from streams.admin import admin
from streams.clients import Consumer, Producer
from streams.codec import HEADER_LEN, Codec, PoisonEvent
from streams.deadletter import DeadLetter
from streams.events import Event
from streams.topics import Topics

log = logging.getLogger(__name__)

_BACKOFF_BASE = 0.1
_POLL_BATCH = 10000  # records per consume() call: fewer round trips into librdkafka
_MAX_RUN = 200_000  # a fast run stays one ClickHouse insert block (min_insert_block_size_rows ≈ 1M)
_OCCURRED_AT = ENVELOPE_COLUMNS.index("occurred_at")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_TRANSIENT = (OperationalError, ConnectionError, TimeoutError, OSError)  # not the data's fault: retry as is
_LINGER_S = 0.02  # an idle inserter takes runs this old (freshness); a busy one lets them grow (throughput)
_BUSY_POLL_S = 0.02  # longest consume() wait while runs wait for a busy inserter

# Message accessors and helpers as C callables, mapped over a whole consume() batch (`_take_batch`)
_ERROR, _TOPIC, _PARTITION = Message.error, Message.topic, Message.partition
_OFFSET, _VALUE, _KEY = Message.offset, Message.value, Message.key
_HEADER = itemgetter(slice(0, HEADER_LEN))
_IS_SOMETHING = partial(is_not, None)
_LT = lt

# The cyclic GC's thresholds while a sink runs (gen0 allocations, gen1 and gen2 collections; see tune_gc)
GC_THRESHOLDS = (50_000, 20, 100)


@cache
@cache
def tune_gc() -> None:
    """Once per process: freeze what exists (modules, schemas, compiled readers) out of the cyclic
    GC's sight and raise its thresholds (never lowers them).

    Why: every consume() of 10,000 records allocates 10,000 GC-tracked Message objects, so at
    the default threshold (700) the GC ran 14 young collections per batch and every so often a
    full one over the whole heap: 15-18% of the sink's CPU (perf, BENCHMARKS.md, sink round
    five), for a process whose hot path makes no reference cycles. With the heap frozen and
    fewer collections: 4.1-5.8 µs of CPU per event instead of 6.3-7.8 (same run, same records).
    Process-wide on purpose: the sink is its process's hot path (the projections service, a
    replay); cyclic garbage is still collected, only less often. Called by the process's entry
    point before it builds a sink, never by a Sink: what is frozen is never collected, and a
    frozen Sink (it and its inserter reference each other) would outlive its rebuild. Collected
    first, so no garbage of the start-up is frozen with it.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*(max(a, b) for a, b in zip(gc.get_threshold(), GC_THRESHOLDS, strict=True)))


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

    def fast_count(self, table: str, topic: str, partition: int, offsets: Sequence[int]) -> tuple[bool | None, int]:
        """`fast`'s verdicts on records of one partition bound for `table`, at ascending `offsets`,
        when `since` is None: (the verdict on the first `kept` records, `kept`); the rest lie at or
        past the partition's end and are refused."""
        assert self.since is None, "with since, the verdict depends on each record's time"
        kept = bisect_left(offsets, self.ends.get((topic, partition), 0))
        if table in self.tables:
            return True, kept
        return (None if DEAD_LETTERS in self.tables else False), kept

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


@dataclass(frozen=True, slots=True)
class _Watch:
    """The stall watchdog's view of a partition: its position since when, the driver's held-back
    seconds then, and whether records were waiting when this window started (`_watch_progress`)."""

    position: int
    since: float
    held: float
    waiting: bool = False


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
    due: deque[_Run] = field(default_factory=deque)  # complete runs, in offset order, not yet submitted
    rewind: bool = False  # inserts were given up: go back to step 1 (ClickHouse, else Kafka's commit)
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
        return (self.run.size() if self.run else 0) + queued + sum(r.size() for r in list(self.due))


class SinkError(RuntimeError):
    """An insert or DLQ produce failed (the batch is kept and retried), or the sink cannot go on."""


_Block = tuple[avro_block.Plan, bytes, dict[str, Any], bool]
"""A fast job's block: its plan, its bytes, the INSERT's parameters, whether it is RowBinary."""
_Built = _Block | avro_block.NativeRefused | None
"""A block built ahead of the insert, the refusal met building it, or nothing built."""


@dataclass
class _Job:
    """One insert for the inserter thread: runs of one table, landed together or not at all (4).

    A fast job holds runs of one route (one topic, one writer schema) from distinct
    partitions, sent as one Avro block; a row job holds one partition's row run.
    """

    runs: list[tuple[_Partition, _Run]]
    route: _Route | None
    token: str
    rows: int
    # a native block built ahead by the driver (`Sink._prebuild`): what `_fast_block` returns, or
    # the NativeRefused it raised; `building` while the driver is at it (the inserter waits)
    block: _Built = None
    building: bool = False
    tried: bool = False  # built ahead once (kept, or left to the inserter): never again


class _Inserter:
    """The thread that runs the sink's inserts, one at a time, in submission order.

    Why a thread: chDB (and clickhouse-connect's HTTP client) release the GIL while ClickHouse
    works, so the driver keeps consuming while a block is written. Why one, in order: each
    partition's runs must land in offset order (step 2), which a FIFO of jobs keeps across
    partitions without any per-partition bookkeeping. The head job stays at the head until it
    lands (`attempt` True) or, in final mode (a rebalance or close), after one failed attempt,
    when it is given up ("dropped") together with every later job that shares a partition with
    it, so no partition ever lands a run after a gap. An exception out of `attempt` (a bug,
    not a refusal) ends the thread and is kept in `error`; the driver raises it.
    """

    def __init__(
        self, attempt: Callable[[_Job], bool | list[_Job]], backoff: Callable[[int], float], name: str
    ) -> None:
        self._attempt = attempt
        self._backoff = backoff
        self._cv = threading.Condition()
        self._queue: deque[_Job] = deque()  # the head is the job in flight (or being retried)
        self._done: deque[_Job] = deque()  # landed, not yet committed by the driver
        self._dropped: list[_Job] = []  # given up in final mode: their partitions go back to step 1
        self._gap: set[tuple[str, int]] = set()  # partitions with a dropped job (final mode)
        self.rows = 0  # rows queued or in flight
        self.failures = 0  # consecutive failed attempts of the head job
        self.busy = False
        self.error: BaseException | None = None
        self._final = False
        self._stop = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)  # dies with the process
        self._thread.start()

    def _main(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._queue and not self._stop:
                        self._cv.wait()
                    if not self._queue:
                        return
                    job = self._queue[0]
                    if job.building:  # the driver is building its block (`claim`): a few ms
                        self._cv.wait()
                        continue
                    if self._final and self._gap.intersection((p.topic, p.partition) for p, _ in job.runs):
                        self._drop_head(job)  # after a gap in one of its partitions: never land it
                        continue
                    self.busy = True
                run = job.runs[0][1]
                with telemetry.batch_span(  # issue 11: one span per insert, linked to its records' requests
                    "sink.insert", table=run.table, values=(r.values for _, r in job.runs),
                    rows=(r.rows for _, r in job.runs), columns=run.columns,
                ):  # fmt: skip
                    result = self._attempt(job)
                with self._cv:
                    self.busy = False
                    if result is True:
                        self._queue.popleft()
                        self.rows -= job.rows
                        self._done.append(job)
                        self.failures = 0
                    elif result is False:
                        self.failures += 1
                        if self._final:
                            self._drop_head(job)
                        else:
                            self._cv.wait(self._backoff(self.failures))  # close/settle wake it early
                    else:  # refused block: its decoded runs take its place, in order
                        self._queue.popleft()
                        self._queue.extendleft(reversed(result))
                        self.rows += sum(j.rows for j in result) - job.rows
                    self._cv.notify_all()
        except BaseException as exc:
            log.exception("sink inserter stopped: %s", exc)
            with self._cv:
                self.error = exc
                self.busy = False
                self._cv.notify_all()

    def _drop_head(self, job: _Job) -> None:
        self._queue.popleft()
        self.rows -= job.rows
        self._dropped.append(job)
        self._gap.update((p.topic, p.partition) for p, _ in job.runs)
        self._cv.notify_all()

    def _gone(self) -> bool:
        return self.error is not None or not self._thread.is_alive()

    def submit(self, jobs: list[_Job]) -> None:
        with self._cv:
            self._queue.extend(jobs)
            self.rows += sum(j.rows for j in jobs)
            self._cv.notify_all()

    def claim(self) -> _Job | None:
        """A fast job queued behind the next one, whose block nobody built yet: the caller builds it
        and hands it back with `built` (the inserter waits for a job being built)."""
        with self._cv:
            for job in islice(self._queue, 1, None):
                native = job.route is not None and job.route.plan.native is not None
                if native and job.block is None and not job.building and not job.tried:
                    job.building = True
                    return job
            return None

    def built(self, job: _Job, block: _Built) -> None:
        with self._cv:
            job.block, job.building, job.tried = block, False, True
            self._cv.notify_all()

    def waiting(self) -> int:
        """Jobs queued behind the one in flight."""
        with self._cv:
            return max(0, len(self._queue) - (1 if self.busy else 0))

    def wait_progress(self, timeout: float) -> None:
        """Wait until a job landed or was given up, the queue is empty, an insert fails, or `timeout`."""
        with self._cv:
            self._cv.wait_for(
                lambda: bool(self._done or self._dropped) or not self._queue or self.failures > 0 or self._gone(),
                timeout,
            )

    def wait_rows_below(self, limit: int, timeout: float) -> bool:
        """Back-pressure: wait until fewer than `limit` rows are queued; False if still not."""
        with self._cv:
            return self._cv.wait_for(lambda: self.rows < limit or self.failures > 0 or self._gone(), timeout)

    def settle(self, drop_waiting: bool = False) -> None:
        """Final mode until the queue is empty: every job gets one attempt (none if `drop_waiting`).

        With `drop_waiting` only the job in flight may still land (it cannot be interrupted).
        """
        with self._cv:
            self._final = True
            if drop_waiting:
                for job in list(self._queue)[1 if self.busy else 0 :]:
                    self._queue.remove(job)
                    self.rows -= job.rows
                    self._dropped.append(job)
                    self._gap.update((p.topic, p.partition) for p, _ in job.runs)
            self._cv.notify_all()
            self._cv.wait_for(lambda: not self._queue or self._gone())
            self._final = False
            self._gap.clear()

    def take(self) -> tuple[list[_Job], list[_Job]]:
        """(landed, given up) since the last call: the driver commits the first, rewinds the second."""
        with self._cv:
            done, self._done = list(self._done), deque()
            dropped, self._dropped = self._dropped, []
            return done, dropped

    def pending(self) -> int:
        """Rows queued, in flight, or landed and not yet committed."""
        with self._cv:
            return self.rows + sum(j.rows for j in self._done)

    def empty(self) -> bool:
        with self._cv:
            return not self._queue and not self._done and not self._dropped

    def stop(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stop = self._final = True
            self._cv.notify_all()
        self._thread.join(timeout)


def sink_consumer_config(
    bootstrap: str, group: str, consumer_config: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The configuration of a Sink's consumer (`consumer_config` on top); a caller that builds the
    consumer itself (`Sink(consumer=...)`, a replay prefetching) uses the same."""
    conf: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "client.id": f"projections-sink:{group}",
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
    return conf


class Sink:
    """Consumes the catalogue topics (or `subscribe`'s subset) and lands events in their tables (see module doc)."""

    def __init__(
        self,
        bootstrap: str,
        group: str,
        topics: Topics,
        store: Client | LockedStore,
        codec: Codec | LazyCodec | None = None,
        batch_max: int = 5000,
        batch_ms: int = 200,
        *,
        max_backoff: float = 5.0,
        consumer_config: dict[str, Any] | None = None,
        subscribe: Sequence[str] | None = None,
        keep: RecordFilter | None = None,
        produce_dead_letters: bool = True,
        fast: bool = True,
        native: bool | None = None,
        assign: Mapping[tuple[str, int], int] | None = None,
        commit: bool = True,
        consumer: Consumer | RunConsumer | None = None,
        resume: bool = True,
        table_ready: Callable[[str], None] | None = None,
        stall_s: float | None = None,
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
        # Fast blocks as RowBinary checked in C when built (None: unless LEDGERFLOW_NATIVE=0), else Avro
        self.native = self._fast and (avro_block.native_enabled() if native is None else native)
        if self.native and not avro_block.native_available():
            raise ValueError("native=True but projections._rowbinary is not built")
        self._routes: dict[tuple[str, bytes], _Route | None] = {}
        self._types: dict[str, dict[str, str]] = {}
        self._produce_dlq = produce_dead_letters
        self.group = group
        self.batch_max = max(1, min(batch_max, _MAX_RUN))
        self.batch_s = max(1, batch_ms) / 1000.0
        self.linger_s = min(self.batch_s, _LINGER_S)
        # back-pressure: no more consuming while this many rows wait for (or are in) the inserter
        self.queue_max = min(_MAX_RUN, max(4 * self.batch_max, 40_000))
        self.max_backoff = max_backoff
        self.consumer_name = f"projections-sink:{group}"
        self._store = store if isinstance(store, LockedStore) else LockedStore(store)
        self._codec = codec or LazyCodec()  # compiled on the first record that needs decoding
        # Only writers this sink's Codec reads: a record the Codec calls unknown-fingerprint
        # must stay a dead letter, not land because ClickHouse could read it.
        self._writers = {h: w for h, w in avro_block.writers().items() if _knows(self._codec, h)} if self._fast else {}
        self._bootstrap = bootstrap
        if consumer is not None and assign is None:
            raise ValueError("a prefetching consumer comes with `assign` (the partitions and offsets it was assigned)")
        if isinstance(consumer, RunConsumer) and commit:
            raise ValueError("a RunConsumer has no group to commit to: pass commit=False")
        # a replay's reader of runs (projections/kafka_reader.py): taken by _take_runs, not _take_batch
        self._runs = consumer if isinstance(consumer, RunConsumer) else None
        # a replay's consumer was built (sink_consumer_config) and assigned before its migrations ran
        self._consumer: Consumer | RunConsumer = (
            consumer if consumer is not None else Consumer(sink_consumer_config(bootstrap, group, consumer_config))
        )
        self._producer: Producer | None = None
        self._parts: dict[tuple[str, int], _Partition] = {}
        self._lock = threading.Lock()  # guards _parts against status() readers
        self._closed = False
        # counters (read by /status)
        self.rows_inserted = 0
        self.dead_lettered = 0
        self._refused = [0, 0]  # consumed but refused by `keep`: [by the driver, by the inserter's fallback]
        self.batches = 0
        self.insert_failures = 0
        self.fast_rows = 0  # rows landed by the fast path (of rows_inserted)
        self.native_rows = 0  # of those, rows landed as RowBinary from the C transcoder
        self.prebuilt_blocks = 0  # RowBinary blocks the driver built ahead for the inserter (`_prebuild`)
        self.landed_with_error = 0  # blocks whose insert raised after their rows landed (`_block_landed`)
        self.fast_fallbacks = 0  # fast runs ClickHouse or the C transcoder refused, then decoded by the Codec
        self.commit_failures = 0
        self.last_insert_at: datetime | None = None
        self.last_error: str | None = None
        self.hooks = SinkHooks()  # issue 11: the service puts its metrics here (called after each insert)
        self.assigned = threading.Event()  # set once the group gave us an assignment
        self._inserter = _Inserter(self._attempt, self._backoff_s, f"sink-inserter:{group}")
        self._commits = commit  # False: a reader with no group (replay), ClickHouse alone records progress
        # False: the database is known to hold nothing of what is assigned (a replay's fresh target),
        # so step 1 has nothing to ask it (its tables may not even exist yet, see table_ready)
        self._resume_from_store = resume
        # blocks until a table exists with its final columns (a replay whose DDL runs beside it);
        # None: every table exists already. Called before a table's columns are read or rows inserted.
        self._table_ready = table_ready
        # a partition with records waiting and no progress this long while the sink kept asking
        # for records is a wedged fetcher: SinkError, and the service builds a new consumer (None: off)
        self.stall_s = stall_s
        self._watch: dict[tuple[str, int], _Watch] = {}
        self._watch_at = 0.0
        self._pressured_s = 0.0  # seconds back-pressure kept the driver from consuming, in all
        self._admin: AdminClient | None = None  # the watchdog's end-offset queries (made on first use)
        if assign is not None:  # a reader with no group (replay): these partitions from these offsets, no
            # join and no rebalance; step 1 still applies (it only moves a start up to what ClickHouse holds)
            self._on_assign(
                self._consumer,
                [TopicPartition(t, p, o) for (t, p), o in sorted(assign.items())],
                assigned=consumer is not None,
            )
        else:
            assert not isinstance(self._consumer, RunConsumer)
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

    def _resume_all(self, by_topic: Mapping[str, Sequence[int]]) -> dict[str, dict[int, int]] | None:
        """`resume_offsets` of several topics in ONE query (each table with the topics it is asked
        for); None when ClickHouse cannot answer (then each topic is asked on its own).

        Why: an assignment of every topic at once (a replay, a lone sink) made one query per
        topic, ~17 ms each on chDB, ~0.25 s of a replay's fixed cost.
        """
        fed: dict[str, list[str]] = {DEAD_LETTERS: list(by_topic)}
        for topic in by_topic:
            spec = self.topics.spec_for(topic)
            for table in sorted({table_for(e) for e in spec.events} if spec else set()):
                fed.setdefault(table, []).append(topic)
        union = " UNION ALL ".join(
            f"SELECT _topic, _partition, _offset FROM {t} WHERE _topic IN {{t{i}:Array(String)}}"
            for i, t in enumerate(fed)
        )
        try:
            rows = self._store.query_rows(
                f"SELECT _topic, _partition, max(_offset) FROM ({union}) GROUP BY _topic, _partition",
                parameters={f"t{i}": topics for i, topics in enumerate(fed.values())},
            )
        except Exception as exc:
            log.info("cannot read resume offsets in one query, asking per topic: %s", exc)
            return None
        out: dict[str, dict[int, int]] = {topic: {} for topic in by_topic}
        for topic, partition, offset in rows:
            if int(partition) in by_topic.get(str(topic), ()):
                out[str(topic)][int(partition)] = int(offset) + 1
        return out

    def _on_assign(
        self,
        consumer: confluent_kafka.Consumer | RunConsumer,
        partitions: list[TopicPartition],
        assigned: bool = False,
    ) -> None:
        """Step 1 for `partitions`, then assign them. `assigned`: the caller's consumer already has
        them at their offsets (a replay prefetching): left as it is unless step 1 moved a start."""
        asked = {(tp.topic, tp.partition): tp.offset for tp in partitions}
        by_topic: dict[str, list[TopicPartition]] = {}
        for tp in partitions:
            by_topic.setdefault(tp.topic, []).append(tp)
        unresolved: set[tuple[str, int]] = set()
        known = (
            self._resume_all({t: [tp.partition for tp in tps] for t, tps in by_topic.items()})
            if len(by_topic) > 1 and self._resume_from_store
            else None
        )
        for topic, tps in by_topic.items():
            if not self._resume_from_store:
                break
            try:
                # (1) ClickHouse holds every record ≤ max(_offset) and none above: start at max+1.
                resume = known[topic] if known is not None else self.resume_offsets(topic, [tp.partition for tp in tps])
            except Exception as exc:  # ClickHouse down: consume nothing until we know (retried in poll_once)
                log.warning("cannot read resume offsets of %s from ClickHouse, pausing: %s", topic, exc)
                self.last_error = f"resume offsets: {exc}"
                unresolved.update((topic, tp.partition) for tp in tps)
                continue
            for tp in tps:
                if tp.partition in resume:
                    tp.offset = resume[tp.partition]
        if self._fast and not unresolved and self._table_ready is None:  # (ClickHouse answered above)
            try:
                self._load_types(list(by_topic))
            except Exception as exc:  # asked again by _route when a record needs it
                log.info("fast path: cannot read the tables' columns yet: %s", exc)
        if not assigned or any(tp.offset != asked[(tp.topic, tp.partition)] for tp in partitions):
            consumer.assign(partitions)  # (a re-assign drops what was prefetched: only if a start moved)
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
        """Step 1 for partitions whose resume point is not known: ClickHouse could not give it at
        assignment, or inserts were given up (a rebalance or close while ClickHouse failed).

        A partition ClickHouse holds nothing of resumes from the group's committed offset,
        else from the beginning, as a fresh assignment would (commits only follow inserts).
        """
        todo = [p for p in self._parts.values() if p.unresolved and p.retry_at <= time.monotonic()]
        for p in todo:
            try:
                target = self.resume_offsets(p.topic, [p.partition]).get(p.partition)
                if target is None and p.rewind:
                    committed = self._consumer.committed([p.tp], timeout=10)[0].offset
                    target = committed if committed >= 0 else OFFSET_BEGINNING
                if target is not None:
                    self._consumer.seek(TopicPartition(p.topic, p.partition, target))
                    p.next_offset = max(target, -1)
            except Exception as exc:
                self._backoff(p, f"resume offsets: {exc}")
                continue
            p.unresolved = p.rewind = False
            p.backlog.clear()
            p.run = None
            p.due.clear()
            p.failures = 0
            self._resume(p)

    def _on_revoke(self, consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]) -> None:
        # Hand over cleanly: land what we hold, one attempt per insert, before the partitions
        # move (the next owner's step 1 must see everything we will ever land). What fails is
        # dropped: the next owner resumes from ClickHouse anyway (step 1).
        for tp in partitions:
            p = self._parts.get((tp.topic, tp.partition))
            if p is not None and not p.unresolved:
                self._drain(p, final=True)
        self._submit()
        self._inserter.settle()
        self._landed()
        self._forget(consumer, partitions)

    def _on_lost(self, consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]) -> None:
        # Another member may own them already: no flush, no commit, and nothing queued may land
        # later (only the insert in flight, which cannot be stopped; step 1 covers the rest).
        self._inserter.settle(drop_waiting=True)
        self._forget(consumer, partitions)
        self._landed()

    def _forget(self, consumer: confluent_kafka.Consumer | RunConsumer, partitions: list[TopicPartition]) -> None:
        with self._lock:
            dropped = [self._parts.pop((tp.topic, tp.partition), None) for tp in partitions]
        for tp in partitions:
            self._watch.pop((tp.topic, tp.partition), None)  # a later assignment starts a new window
        paused = [p.tp for p in dropped if p is not None and p.paused]
        if paused:
            consumer.resume(paused)  # do not carry a pause into a later assignment

    # --- steps 2-5 ---------------------------------------------------------------------

    def _decode(self, msg: Message | OddRecord) -> _Record:
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
                    self._load_types([topic], table)
                except Exception as exc:
                    log.info("fast path: cannot read the columns of %s yet: %s", table, exc)
                    return None
            try:
                route = _Route(table, avro_block.plan(writer, self._types[table]))
            except avro_block.Unsupported as exc:
                log.info("fast path off for %s into %s: %s", writer.event_type, table, exc)
        self._routes[(topic, header)] = route
        return route

    def _load_types(self, topics: Sequence[str], table: str | None = None) -> None:
        """Column types of every table `topics` feed, in one query (the fast path's plans need them).

        Asked on assignment, before any insert holds the store: asked later by `_route`, the
        driver would wait for the insert in flight before it could consume on. While the tables
        are being made (`table_ready`), only `table` is asked for, once it is made.
        """
        wanted = sorted(
            {table_for(e) for t in topics if (spec := self.topics.spec_for(t)) for e in spec.events} - set(self._types)
        )
        if self._table_ready is not None and table is not None:
            self._table_ready(table)
            wanted = [table]
        elif self._table_ready is not None:
            for t in wanted:
                self._table_ready(t)
        if wanted:
            rows = self._store.query_rows(avro_block.TABLE_TYPES_SQL, parameters={"tables": wanted})
            found = avro_block.table_types(rows)
            self._types.update({t: found.get(t, {}) for t in wanted})

    def _drain(self, p: _Partition, final: bool = False, idle: bool = False) -> None:
        """Move backlog records into runs; a run is complete when full or when the next record
        needs another run (step 2), and is then due for the inserter (`_submit`).

        A partial run is due once `batch_ms` old, or `linger_s` old when the inserter is `idle`
        (nothing queued): a quiet sink inserts at once (freshness) while a busy one lets its
        runs grow until the inserter is free (fewer, bigger inserts). `final` ships everything.
        """
        backlog = p.backlog
        while backlog:
            item = backlog[0]
            run = p.run
            if isinstance(item, _FastSeg):
                # a fast run holds one writer schema of one table: anything else ends it
                if run is not None and run.route is not item.route:
                    self._ship(p)
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
                if len(run.offsets) >= self.batch_max:
                    self._ship(p)
                continue
            rec = item
            # (2) a run never mixes tables: inserts land in offset order, so (1)'s max is a prefix.
            if run is not None and (run.route is not None or run.table != rec.table):
                self._ship(p)
                continue
            if run is None:
                run = p.run = _Run(rec.table, rec.columns, rec.offset, rec.offset, time.monotonic())
            run.rows.append(rec.row)
            run.last = rec.offset
            if rec.dead is not None:
                run.dead.append(rec.dead)
            backlog.popleft()
            if len(run.rows) >= self.batch_max:
                self._ship(p)
        if p.run is not None:
            age = time.monotonic() - p.run.started
            if final or age >= self.batch_s or (idle and age >= self.linger_s):
                self._ship(p)

    def _ship(self, p: _Partition) -> None:
        if p.run is not None:
            p.due.append(p.run)
            p.run = None

    def _submit(self) -> None:
        """Hand the due runs to the inserter as jobs, wave by wave (group commit).

        Called when the inserter has nothing queued (or on revoke and close), so whatever came
        due while it was busy goes in as few inserts as possible: a partition's adjacent due
        runs for the same route (or table) are one contiguous run, and within a wave the fast
        runs of one route (one topic, one writer schema) from several partitions share one
        block, up to `_MAX_RUN` rows (fewer inserts: each costs ClickHouse a new part); see (4)
        for why such a block is still exactly-once. A partition's k-th due run goes in a job
        submitted before its (k+1)-th, so each partition's inserts keep offset order (2).
        """
        parts = [p for p in self._parts.values() if p.due and not p.unresolved]  # (1) first: see _landed
        for p in parts:
            _coalesce(p.due)
        jobs: list[_Job] = []
        while parts:
            groups: dict[int, list[tuple[_Partition, _Run]]] = {}
            for p in parts:
                run = p.due.popleft()
                if run.route is None:
                    jobs.append(self._job([(p, run)]))
                else:
                    groups.setdefault(id(run.route), []).append((p, run))
            for runs in groups.values():
                chunk: list[tuple[_Partition, _Run]] = []
                size = 0
                for pr in runs:
                    if chunk and size + pr[1].size() > _MAX_RUN:
                        jobs.append(self._job(chunk))
                        chunk, size = [], 0
                    chunk.append(pr)
                    size += pr[1].size()
                jobs.append(self._job(chunk))
            parts = [p for p in parts if p.due]
        if jobs:
            self._inserter.submit(jobs)

    def _job(self, runs: list[tuple[_Partition, _Run]]) -> _Job:
        topic = runs[0][0].topic
        token = avro_block.token(topic, [(p.partition, r.first, r.last) for p, r in runs])
        return _Job(runs, runs[0][1].route, token, sum(r.size() for _, r in runs))

    # --- in the inserter thread: steps 3-4 ---------------------------------------------------

    def _attempt(self, job: _Job) -> bool | list[_Job]:
        """(3)+(4) One try at `job`: True when it landed, False when it failed (retried), or the
        runs that replace a fast block ClickHouse refused (decoded by the Codec)."""
        fast = job.route is not None
        started = time.perf_counter()
        if fast and any(r.first < p.slow_until for p, r in job.runs):
            # Submitted before a block of one of its partitions was refused (a poison storm, see
            # `_fall_back`): decode it now rather than have ClickHouse refuse one block after another.
            return self._fall_back(job, None)
        if self._table_ready is not None:  # outside the insert's try: a failed DDL ends the inserter
            self._table_ready(job.runs[0][1].table)
        native = False
        if fast:
            try:  # outside the insert's try: a bug here is not a refusal
                if isinstance(job.block, avro_block.NativeRefused):
                    raise job.block
                plan, data, params, native = job.block if job.block is not None else self._fast_block(job)
            except avro_block.NativeRefused as exc:  # a record failed a check: as if ClickHouse refused
                return self._fall_back(job, exc)
        try:
            if native:
                self._store.call(lambda c: avro_block.insert_native(c, plan, data, params["lf_token"]))
            elif fast:
                self._store.call(lambda c: avro_block.insert_block(c, plan, data, params))
            else:
                p, run = job.runs[0]
                if run.dead and not run.dlq_sent and self._produce_dlq:
                    self._produce_dead_letters(p.topic, run.dead)  # (3) DLQ topic first, acknowledged
                    run.dlq_sent = True
                # (4) one insert per job; a retry of the same job carries the same token → deduplicated
                self._store.insert(run.table, run.rows, run.columns, settings={"insert_deduplication_token": job.token})
        except Exception as exc:
            landed = None
            if fast and not isinstance(exc, _TRANSIENT):
                landed = self._block_landed(job)
                if landed is False:
                    return self._fall_back(job, exc)
                if landed:  # the rows were written before the error (a view's insert failed after them)
                    table = job.runs[0][1].table
                    log.error(
                        "insert of %s into %s raised after its rows landed; views reading %s may lack them: %s",
                        job.token, table, table, exc,
                    )  # fmt: skip
                    self.last_error = f"insert {job.token} landed, then: {exc}"
                    self.landed_with_error += 1
            if not landed:
                self.insert_failures += 1
                table = job.runs[0][1].table
                log.warning("insert of %s into %s failed (%d rows), pausing: %s", job.token, table, job.rows, exc)
                self.last_error = f"insert {job.token}: {exc}"
                return False
        if job.runs[0][1].table == DEAD_LETTERS:
            self.dead_lettered += job.rows
        else:
            self.rows_inserted += job.rows
            if fast:
                self.fast_rows += job.rows
            if native:
                self.native_rows += job.rows
        dead = [d.reason for _, r in job.runs for d in r.dead]
        first, seconds = job.runs[0], time.perf_counter() - started
        self.hooks.landed(first[0].topic, first[1].table, job.rows, seconds, fast, dead)
        self.batches += 1
        self.last_insert_at = datetime.now(UTC)
        return True

    def _fast_block(self, job: _Job) -> _Block:
        """A fast job's block (every run's records, one writer schema), INSERT parameters, and
        whether the block is RowBinary (checked by the C transcoder: raises NativeRefused when a
        record fails a check) or Avro (checked by ClickHouse)."""
        assert job.route is not None
        plan = job.route.plan
        topic = job.runs[0][0].topic
        runs = [avro_block.Run(p.partition, r.offsets, r.values) for p, r in job.runs]
        params = avro_block.parameters_of_runs(topic, [(p.partition, r.first, r.last) for p, r in job.runs], job.token)
        if self.native and plan.native is not None:
            return plan, avro_block.native_block(plan, topic, runs), params, True
        return plan, avro_block.block_of_runs(plan, topic, runs), params, False

    def _block_landed(self, job: _Job) -> bool | None:
        """Whether a fast block whose insert raised (not a transient error) is in its table anyway:
        True if its rows are there, False if none are, None if ClickHouse cannot say (retried as is).

        Why: ClickHouse writes a block's rows into the table before it feeds the materialized views
        reading it (`tokens_charged` → `charges_daily`); an error from a view comes after the rows
        landed. Decoding such a block again would insert its rows a second time, under the tokens
        of the decoded runs: a doubled row. A block is one insert, so it is all there or none."""
        table = job.runs[0][1].table
        where = " OR ".join(
            f"(_partition = {{p{i}:UInt16}} AND _offset BETWEEN {{f{i}:UInt64}} AND {{l{i}:UInt64}})"
            for i in range(len(job.runs))
        )
        params: dict[str, Any] = {"topic": job.runs[0][0].topic}
        for i, (p, run) in enumerate(job.runs):
            params.update({f"p{i}": p.partition, f"f{i}": run.first, f"l{i}": run.last})
        try:
            rows = self._store.query_rows(
                f"SELECT count() FROM {table} WHERE _topic = {{topic:String}} AND ({where})", parameters=params
            )
        except Exception as exc:
            log.info("cannot tell whether %s landed: %s", job.token, exc)
            return None
        return int(rows[0][0]) > 0

    def _prebuild(self) -> None:
        """Build (transcode, in C without the GIL) the RowBinary block of a job queued behind the
        insert in flight, so the inserter only inserts it.

        Why: the inserter is the replay's and a busy sink's serial path (transcode + insert, one
        job at a time), while the driver, between consumes, often waits for it with a core idle.
        A refused block is kept as its NativeRefused, for the inserter to fall back with."""
        job = self._inserter.claim()
        if job is None:
            return
        block: _Built = None
        try:
            block = self._fast_block(job)
            if not block[3]:
                block = None  # an Avro block: built by the inserter as before (only RowBinary is GIL-free)
        except avro_block.NativeRefused as exc:
            block = exc
        except Exception:  # a bug: left to the inserter, which meets it again and stops (SinkError)
            log.debug("building a block ahead failed; the inserter builds it", exc_info=True)
        finally:
            self._inserter.built(job, block)
        if block is not None:
            self.prebuilt_blocks += 1

    def _fall_back(self, job: _Job, exc: Exception | None) -> list[_Job]:
        """ClickHouse or the C transcoder refused a fast block (`exc`; None: not tried, see
        `_attempt`): nothing of it landed. Decode it; its row runs replace it.

        The decoded records go through the row path: poison becomes dead letters with the
        Codec's reason, valid records land, in offset order (2), with tokens of their own runs,
        before any later job (they take the refused job's place at the head of the queue).
        """
        detail = ""
        if exc is not None:
            self.fast_fallbacks += 1
            detail = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            log.info("fast insert of %s refused, decoding its %d records: %s", job.token, job.rows, detail)
        out: list[_Job] = []
        any_dead = False
        for p, run in job.runs:
            cur: _Run | None = None
            for offset, key, value in zip(run.offsets, run.keys, run.values, strict=True):
                rec = self._decode_value(p.topic, p.partition, offset, key, value)
                if self._keep is not None and not self._keep(rec.table, rec.columns, rec.row):
                    self._refused[1] += 1
                    continue
                if cur is None or cur.table != rec.table or len(cur.rows) >= self.batch_max:
                    if cur is not None:
                        out.append(self._job([(p, cur)]))
                    cur = _Run(rec.table, rec.columns, rec.offset, rec.offset, run.started)
                cur.rows.append(rec.row)
                cur.last = rec.offset
                if rec.dead is not None:
                    cur.dead.append(rec.dead)
                    any_dead = True
            if cur is not None:
                out.append(self._job([(p, cur)]))
            if exc is not None:
                # Where one refusal is, more are likely (a bad producer, a poison storm): a refused
                # block costs an extra ClickHouse call, so what the driver has read of the partition
                # and its next batch_max records take the Codec path (queued blocks included).
                p.slow_until = max(p.slow_until, p.next_offset + self.batch_max)
        if exc is not None and not any_dead:
            # Every record was valid: a check stricter than the Codec (a non-canonical id, a
            # time near the bound...) or a fast path that cannot read this table. Correct
            # either way, but slow if it repeats, so say so.
            log.warning("fast path refused a block of valid records (%s): %s", job.token, detail)
        return out

    # --- back in the driver: step 5 and back-pressure -----------------------------------------

    def _landed(self) -> None:
        """(5) Commit what the inserter landed; send partitions of given-up inserts back to step 1."""
        done, dropped = self._inserter.take()
        offsets: dict[tuple[str, int], int] = {}
        for job in done:
            for p, run in job.runs:
                key = (p.topic, p.partition)
                if self._parts.get(key) is p:
                    offsets[key] = max(offsets.get(key, -1), run.last + 1)
        if offsets:
            self._commit([self._parts[k] for k in offsets], list(offsets.values()))
        for job in dropped:
            for p, _run in job.runs:
                if self._parts.get((p.topic, p.partition)) is p and not p.unresolved:
                    log.warning("inserts into %s[%d] given up: resuming from ClickHouse", p.topic, p.partition)
                    p.unresolved = p.rewind = p.paused = True
                    p.retry_at = 0.0
                    # what was consumed after the given-up run must not land before it does: a
                    # later run landing first would move max(_offset) past the gap (rows lost)
                    p.backlog.clear()
                    p.run = None
                    p.due.clear()
                    self._consumer.pause([p.tp])

    def _commit(self, parts: list[_Partition], offsets: list[int]) -> None:
        """(5) only after the inserts holding these offsets; a failed commit is harmless, (1) resumes."""
        tps = [TopicPartition(p.topic, p.partition, o) for p, o in zip(parts, offsets, strict=True)]
        if not self._commits:  # nothing to tell Kafka (no group); (1) is what a restart reads anyway
            for p, o in zip(parts, offsets, strict=True):
                p.committed = max(p.committed, o)
            return
        try:
            assert not isinstance(self._consumer, RunConsumer)  # (it comes with commit=False)
            self._consumer.commit(offsets=tps, asynchronous=False)
            for p, o in zip(parts, offsets, strict=True):
                p.committed = max(p.committed, o)
        except KafkaException as exc:
            self.commit_failures += 1
            log.info("offset commit %s failed (ClickHouse stays authoritative): %s", tps, exc)

    def _commit_idle(self, p: _Partition, now: float) -> None:
        """Commit past transaction markers once a partition is idle, so group lag reaches 0.

        A transactional producer leaves a control record after each commit; the consumer skips
        it, so `last + 1` stays one short of the end. When everything delivered has landed,
        the consumer's position is the right commit point (it only adds skipped non-data offsets).
        """
        if p.run or p.backlog or p.due or p.paused or p.unresolved or now < p.idle_check_at:
            return
        p.idle_check_at = now + 1.0
        if not self._inserter.empty():
            return
        try:
            position = self._consumer.position([p.tp])[0].offset
        except KafkaException:
            return
        if position >= 0 and position > p.committed:
            self._commit([p], [position])

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
        """Step 1 failed: keep the partition paused and ask ClickHouse again later."""
        p.failures += 1
        p.last_error = self.last_error = error
        p.retry_at = time.monotonic() + self._backoff_s(p.failures)
        self._pause(p)

    def _backoff_s(self, failures: int) -> float:
        return float(min(self.max_backoff, _BACKOFF_BASE * 2 ** (failures - 1)))

    def _pause(self, p: _Partition) -> None:
        if not p.paused:
            self._consumer.pause([p.tp])
            p.paused = True

    def _resume(self, p: _Partition) -> None:
        if p.paused:
            self._consumer.resume([p.tp])
            p.paused = False

    def _pressure(self) -> None:
        """Back-pressure: while the inserter's head insert fails (ClickHouse slow or unreachable),
        every partition is paused (no fetching: memory stays at what is held); when an insert
        lands again they resume and drain."""
        failing = self._inserter.failures > 0
        for p in self._parts.values():
            if failing:
                p.last_error = self.last_error
                self._pause(p)
            elif p.paused and not p.unresolved:
                self._resume(p)

    # --- driving -----------------------------------------------------------------------

    def poll_once(self, timeout: float = 0.1) -> int:
        """One round: commit what landed, retry stalled partitions, consume, hand due runs to the
        inserter. Returns records consumed; raises SinkError when the inserter died."""
        inserter = self._inserter
        if inserter.error is not None:
            self.last_error = f"inserter: {inserter.error!r}"
            raise SinkError(f"the sink's inserter thread failed: {inserter.error!r}") from inserter.error
        self._landed()
        self._retry_unresolved()
        self._pressure()
        if inserter.waiting() == 0:
            self._submit()
        elif self.native and not inserter.failures:
            self._prebuild()
        due = sum(r.size() for p in self._parts.values() for r in p.due)
        if inserter.rows + due >= self.queue_max and not inserter.failures:
            # the inserter is behind: consume nothing until it catches up (while it fails, every
            # partition is paused instead, and consume() below only serves the group's callbacks)
            held_from = time.monotonic()
            if inserter.wait_rows_below(max(self.queue_max - due, 1), timeout) and inserter.waiting() == 0:
                self._submit()
            self._pressured_s += time.monotonic() - held_from
            return 0
        now = time.monotonic()
        runs = [p.run for p in self._parts.values() if p.run and not p.paused]
        wait = timeout
        if due:
            wait = min(wait, _BUSY_POLL_S)  # be back when the inserter is free
        if runs:
            due_by = min(r.started for r in runs) + (self.linger_s if inserter.waiting() == 0 else self.batch_s)
            wait = min(wait, max(due_by - now, 0.0), _BUSY_POLL_S)
        batched = self._fast and (self._keep_fast is None or self._keep_fast.since is None)
        if self._runs is not None:
            consumed = self._take_runs(self._runs.read_runs(min(_POLL_BATCH, self.batch_max * 2), wait), batched)
        else:
            assert not isinstance(self._consumer, RunConsumer)
            msgs = self._consumer.consume(num_messages=min(_POLL_BATCH, self.batch_max * 2), timeout=wait)
            consumed = len(msgs)
            if batched:
                self._take_batch(msgs)
            else:
                self._take_each(msgs)
        idle = inserter.waiting() == 0
        for p in list(self._parts.values()):
            if not p.paused and (p.backlog or p.run is not None):
                self._drain(p, idle=idle)
        if inserter.waiting() == 0:
            self._submit()
        now = time.monotonic()
        for p in list(self._parts.values()):
            self._commit_idle(p, now)
        if self.stall_s is not None and now >= self._watch_at:
            self._watch_progress(now)
        return consumed

    def _watch_progress(self, now: float) -> None:
        """Raise SinkError when a partition stopped moving with records waiting (see `stall_s`).

        Why: librdkafka can stop fetching one partition while the others flow (librdkafka#5430
        shows it for a producer; the fetcher has had its own); nothing else would notice but the
        lag. A partition's window restarts whenever its position moves (transaction markers
        included); time the driver spent held by back-pressure does not count, and a paused
        partition (ClickHouse down) or one awaiting step 1 is not watched. When a window runs out
        the partition's end is asked for (one ListOffsets request for every such partition, on an
        admin connection of its own: the consumer's would wait behind its long-poll fetch). Records
        waiting then only start one more window: the sink is rebuilt if the position still has not
        moved when that one runs out too, so a record that just arrived is never a stall."""
        assert self.stall_s is not None
        self._watch_at = now + min(self.stall_s / 4, 5.0)
        parts = {(p.topic, p.partition): p for p in self._parts.values() if not p.paused and not p.unresolved}
        if self._inserter.failures:
            parts = {}
        self._watch = {k: v for k, v in self._watch.items() if k in parts}
        if not parts:
            return
        positions = self.positions()
        held = self._pressured_s
        due: list[tuple[str, int]] = []
        for key in parts:
            pos = positions.get(key, -1)
            seen = self._watch.get(key)
            if seen is None or seen.position != pos:
                self._watch[key] = _Watch(pos, now, held)
            elif pos >= 0 and (now - seen.since) - (held - seen.held) >= self.stall_s:
                due.append(key)
        if not due:
            return
        ends = self._ends([parts[k].tp for k in due])
        for key in due:
            seen, high = self._watch[key], ends.get(key)
            if high is None:
                continue  # not answered: asked again at the next check
            if high > seen.position and seen.waiting:
                stalled = now - seen.since + self.stall_s
                p = parts[key]
                self.last_error = f"consumer: no progress on {p.topic}[{p.partition}] for {stalled:.0f}s"
                raise SinkError(
                    f"the consumer made no progress on {p.topic}[{p.partition}] for {stalled:.0f}s with "
                    f"{high - seen.position} records waiting (position {seen.position}, end {high}): it must be rebuilt"
                )
            self._watch[key] = _Watch(seen.position, now, held, waiting=high > seen.position)

    def _ends(self, tps: list[TopicPartition]) -> dict[tuple[str, int], int]:
        """The end offsets (last stable, as a read_committed consumer sees them) of `tps`, in one
        request; {} when the broker does not answer in time (the watchdog asks again later)."""
        if self._admin is None:
            self._admin = admin(self._bootstrap)
        try:
            futures = self._admin.list_offsets(
                {tp: OffsetSpec.latest() for tp in tps},
                isolation_level=IsolationLevel.READ_COMMITTED,
                request_timeout=5,
            )
            return {(tp.topic, tp.partition): int(f.result(timeout=5).offset) for tp, f in futures.items()}
        except Exception as exc:  # a slow or restarting broker: not a stall of ours
            log.info("stall check: cannot read end offsets: %s", exc)
            return {}

    def _take_batch(self, msgs: list[Message]) -> None:
        """Steps 2-3 intake of a consume() batch, a stretch of one partition at a time (fast path).

        Why: per record, Python bytecode cost more than librdkafka's own work (~5 µs per record
        against the bare loop's 2.9 µs, BENCHMARKS.md round one). Here every per-record step runs
        in C (`map` over Message's accessors, slicing, `groupby`, `bisect`), and Python runs once
        per stretch of consecutive records of one partition and one writer schema, building the
        same backlog segments, in the same order, as `_take_each` would record by record.
        Anything unusual (an error event, a tombstone, an unknown header, offsets not
        ascending, a partition after a refused block) goes to `_take_each` unchanged. Only
        without `since` (the caller checks): then a `Keep` has one verdict per stretch.
        """
        errors = list(map(_ERROR, msgs))
        if any(map(_IS_SOMETHING, errors)):  # error events: rare (a partition's EOF in replay)
            start = 0
            for i in [i for i, e in enumerate(errors) if e is not None]:
                self._take_batch(msgs[start:i])
                self._take_each(msgs[i : i + 1])
                start = i + 1
            self._take_batch(msgs[start:])
            return
        # a record (not an error) always has its coordinates and bytes (a tombstone's None is checked)
        offsets = cast(list[int], list(map(_OFFSET, msgs)))
        values = cast(list[bytes], list(map(_VALUE, msgs)))
        keys: list[bytes | None] = list(map(_KEY, msgs))
        parts = self._parts
        end = 0
        coordinates = cast(Iterator[tuple[str, int]], zip(map(_TOPIC, msgs), map(_PARTITION, msgs), strict=True))
        for (topic, partition), same in groupby(coordinates):
            start, end = end, end + len(list(same))  # this stretch is msgs[start:end]
            part = parts.get((topic, partition))
            if part is None or part.unresolved:
                continue  # not ours any more, or start not known yet (refetched after the seek)
            offs = offsets[start:end]
            if not all(map(_LT, offs, islice(offs, 1, None))):  # never seen: librdkafka delivers in order
                self._take_each(msgs[start:end])
                continue
            if offs[0] < part.next_offset:  # redeliveries: a prefix
                start += bisect_left(offs, part.next_offset)
                if start == end:
                    continue
            vals = values[start:end]
            if offsets[start] < part.slow_until or None in vals:
                self._take_each(msgs[start:end])
                continue
            hi = start
            for header, same_header in groupby(cast(Iterator[bytes], map(_HEADER, vals))):
                lo, hi = hi, hi + len(list(same_header))  # msgs[lo:hi] share a writer schema
                self._take_stretch(part, header, offsets, keys, values, lo, hi, lambda a, b: self._take_each(msgs[a:b]))

    def _take_runs(self, items: list[tuple[Any, ...]], batched: bool) -> int:
        """Steps 2-3 intake of a RunConsumer's read (replay): a run at a time, as `_take_batch` takes a
        stretch (`batched`; else, with `since`, record by record); odd records and errors go to
        `_take_each` as the Message path's do. Returns the records and events taken."""
        parts = self._parts
        taken = 0
        for item in items:
            if len(item) != 6 or type(item[0]) is not str:  # an odd record or an error event
                taken += 1
                self._take_each([OddRecord.of(item)])
                continue
            topic, partition, header, offsets, keys, values = item
            n = len(offsets)
            taken += n
            part = parts.get((topic, partition))
            if part is None or part.unresolved:
                continue  # not ours any more, or start not known yet (refetched after the seek)
            lo = 0
            if offsets[0] < part.next_offset:  # redeliveries: a prefix
                lo = bisect_left(offsets, part.next_offset)
                if lo == n:
                    continue
            if not batched or offsets[lo] < part.slow_until:
                self._take_each(odd_records(topic, partition, offsets[lo:], keys[lo:], values[lo:]))
                continue
            each = partial(self._take_records, topic, partition, offsets, keys, values)
            self._take_stretch(part, header, offsets, keys, values, lo, n, each)
        return taken

    def _take_records(
        self,
        topic: str,
        partition: int,
        offsets: list[int],
        keys: list[bytes | None],
        values: list[bytes],
        a: int,
        b: int,
    ) -> None:
        """Records [a, b) of a run, record by record (`_take_each`)."""
        self._take_each(odd_records(topic, partition, offsets[a:b], keys[a:b], values[a:b]))

    def _take_stretch(
        self,
        part: _Partition,
        header: bytes,
        offsets: list[int],
        keys: list[bytes | None],
        values: list[bytes],
        lo: int,
        hi: int,
        each: Callable[[int, int], None],
    ) -> None:
        """Records [lo, hi) of these lists: one partition, one header, ascending offsets, none a
        redelivery, none below `slow_until`: appended to the backlog as one segment of their route,
        or handed to the record-by-record intake (`each(a, b)` takes records [a, b)) when their
        route, or `keep`, needs the Codec. Shared by `_take_batch` (Messages) and `_take_runs`."""
        topic, partition = part.topic, part.partition
        route = self._routes.get((topic, header), _UNSEEN)
        if route is _UNSEEN:
            route = self._route(topic, header)
        if route is None:
            each(lo, hi)  # the Codec decides: a row or a dead letter
            return
        upto = hi  # records [lo, upto) go to the backlog as they are
        keep_fast = self._keep_fast
        if keep_fast is not None:
            verdict, kept = keep_fast.fast_count(route.table, topic, partition, offsets[lo:hi])
            self._refused[0] += hi - lo - kept  # at or past the end: refused whatever they decode to
            if verdict is None:  # only decoding can tell (dead_letters is wanted)
                each(lo, lo + kept)
                upto = lo
            elif not verdict:
                self._refused[0] += kept
                upto = lo
            else:
                upto = lo + kept
        part.next_offset = offsets[hi - 1] + 1
        if upto == lo:
            return
        if lo == 0 and upto == len(offsets):  # a whole run (the reader's lists are ours to keep)
            offs, ks, vs = offsets, keys, values
        else:
            offs, ks, vs = offsets[lo:upto], keys[lo:upto], values[lo:upto]
        backlog = part.backlog
        seg = backlog[-1] if backlog else None
        if type(seg) is _FastSeg and seg.route is route:
            seg.offsets += offs
            seg.keys += ks
            seg.values += vs
        else:
            backlog.append(_FastSeg(route, offs, ks, vs))

    def _take_each(self, msgs: Sequence[Message | OddRecord]) -> None:
        """Steps 2-3 intake, one record at a time: errors, tombstones, unknown headers, replay with
        `since`, a partition after a refused block. `_take_batch` hands such records here."""
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
                        self._refused[0] += 1  # no row: cannot move (1)'s max, and is refused again on a re-read
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
                self._refused[0] += 1
                continue
            part.backlog.append(rec)

    @property
    def refused(self) -> int:
        """Records consumed but refused by `keep` (no row, no dead letter)."""
        return self._refused[0] + self._refused[1]

    def _reached_end(self, msg: Message | OddRecord) -> None:
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

    def wait_inserted(self, timeout: float) -> None:
        """Block until the inserter lands (or gives up) a job or has nothing queued, at most `timeout`.

        For a reader that has read everything it will (a replay flushing): waiting here instead of
        in consume() takes each landed job as it lands, not after a consume() timeout."""
        self._inserter.wait_progress(timeout)

    def pending_rows(self) -> int:
        """Rows consumed and not yet landed and committed (in runs, queued or being inserted)."""
        return sum(p.pending_rows() for p in list(self._parts.values())) + self._inserter.pending()

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
        """Final flush (one attempt per insert) and commit, stop the inserter, leave the group.

        After the inserter died nothing more is inserted or committed (step 1 covers it).
        """
        if self._closed:
            return
        self._closed = True
        if self._inserter.error is None:
            for p in list(self._parts.values()):
                if not p.unresolved:
                    self._drain(p, final=True)
            self._submit()
            self._inserter.settle()
            self._landed()
        self._inserter.stop()
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
            "pending_rows": sum(p.pending_rows() for p in parts) + self._inserter.pending(),
            "inserter_failing": self._inserter.failures > 0,
            "rows_inserted": self.rows_inserted,
            "dead_lettered": self.dead_lettered,
            "refused": self.refused,
            "batches": self.batches,
            "insert_failures": self.insert_failures,
            "fast_rows": self.fast_rows,
            "fast_fallbacks": self.fast_fallbacks,
            "native_rows": self.native_rows,
            "prebuilt_blocks": self.prebuilt_blocks,
            "landed_with_error": self.landed_with_error,
            "commit_failures": self.commit_failures,
            "last_insert_at": self.last_insert_at.isoformat() if self.last_insert_at else None,
            "last_error": self.last_error,
        }


def _coalesce(due: deque[_Run]) -> None:
    """Merge adjacent runs of one partition that go the same way (they are contiguous), up to _MAX_RUN."""
    out: list[_Run] = []
    for run in due:
        prev = out[-1] if out else None
        same_way = prev is not None and prev.route is run.route and prev.table == run.table
        if prev is None or not same_way or prev.size() + run.size() > _MAX_RUN or prev.dlq_sent or run.dlq_sent:
            out.append(run)
        else:
            prev.offsets += run.offsets
            prev.keys += run.keys
            prev.values += run.values
            prev.rows += run.rows
            prev.dead += run.dead
            prev.last = run.last
    due.clear()
    due.extend(out)


class LazyCodec:
    """The default `Codec`, compiled on the first `decode` (from either thread; once).

    Why: compiling the Codec's readers and writers is ~0.3 s of Python, a fixed cost of every
    sink and replay (run beside the migrations, it also held the GIL the DDL's client needed),
    while the fast path decodes nothing unless a block is refused or a record is unusual.
    It reads every header `avro_block.writers()` names: both come from the same schemas and
    released fixtures (tests/test_replay_fixed_costs.py holds `_knows` to that).
    """

    def __init__(self) -> None:
        self._codec: Codec | None = None
        self._lock = threading.Lock()

    @property
    def codec(self) -> Codec:
        codec = self._codec
        if codec is None:
            with self._lock:
                if self._codec is None:
                    self._codec = Codec()
                codec = self._codec
        return codec

    @property
    def compiled(self) -> bool:
        return self._codec is not None

    def decode(self, data: bytes | None) -> Event:
        return self.codec.decode(data)


def _knows(codec: Codec | LazyCodec, header: bytes) -> bool:
    """Whether `codec` reads records with this header (it refuses an empty body, not the header).

    A LazyCodec (the default Codec) reads every default writer: answered without compiling it.
    """
    if type(codec) is LazyCodec and header in avro_block.default_headers():
        return True
    try:
        codec.decode(header)
    except PoisonEvent as exc:
        return exc.reason != "unknown-fingerprint"
    return True


def _coordinates(msg: Message | OddRecord) -> tuple[str, int, int]:
    """(topic, partition, offset) of a consumed record (never None for a real record)."""
    topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset
