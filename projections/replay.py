"""Replay: rebuild projections in a fresh database from the log, and check it against the live one.

Why a Sink and not a bespoke loader: the rebuild must obey the same effectively-once protocol
as the live projection (`projections/sink.py`, steps 1-5), so a replay that is interrupted and
re-run into the same database continues where it stopped instead of doubling rows. A replay
is a Sink with no consumer group (it is assigned every non-empty partition of the topics that
feed the tables asked for, from its start, and commits nothing: no join, no rebalance, no
group left behind; ClickHouse is its record of progress), and a `keep` filter that:

- drops rows of tables not asked for (a topic can feed several tables);
- drops event rows with `occurred_at` < `since` (filtered at insert, so offsets and progress
  still cover the whole log; `dead_letters` has no event time and is kept whole);
- drops every record at or past the end offsets captured when the job started, so the
  rebuilt database is the log as it was at that moment, even while traffic keeps arriving.

The target must hold no projection rows (or be replaced: dropped first), because a Sink
resumes each partition after what the database holds, which is only right for a database
filled with the same filter.

Dead letters are landed in `dead_letters` but not produced to the DLQ topics again: the live
sink already did. The job is done when every partition's consumer position reached its
captured end offset and nothing is left in memory. Progress is offsets consumed over offsets
to consume (transaction markers included, as in Kafka's own lag).

The check compares each table of the live database with the rebuilt one per topic-partition:
row count, an order-independent checksum (`sum(cityHash64(tuple(<columns>)))`, wrapping
UInt64, so a doubled row changes it where a XOR would cancel), and min/max `_offset`. Columns
that record when or by whom a row was landed, not what the log says, are left out:
`_ingested_at` everywhere, and in `dead_letters` `first_seen` and `consumer`. The SQL is
plain ClickHouse and read-only, so it runs through the projections service's SQL endpoint
or straight against a ClickHouse server. Compare a quiet system: rows the live sink landed
after the replay captured its end offsets show up at the tail of their partitions.
Everything here except `ReplayJob`, `end_offsets` and `check`'s `run_sql` is pure.

Fixed costs (issue 10's replay floor): the Sink's consumer is built, reads the end offsets and
is assigned every partition while the migrations start; a fresh target's DDL runs in a thread
beside the replay (`SchemaBuild`), each table used once the last statement naming it ran, so
the first inserts do not wait for all 60 statements; the Codec is compiled only if a record
needs decoding (`projections.sink.LazyCodec`).

Threading: a `ReplayJob` runs in its own thread (`start`) or in the caller's (`run`);
`status()` and `cancel()` may be called from any thread.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from clickhouse_connect.driver.client import Client
from confluent_kafka import TopicPartition

from projections import kafka_reader
from projections.kafka_reader import RunConsumer
from projections.migrations import MIGRATIONS_TABLE, Migration, applied, discover, migrate
from projections.schema import DEAD_LETTERS, event_tables, table_for
from projections.sink import Keep, Sink, sink_consumer_config
from projections.store import check_identifier, open_store
from streams.clients import Consumer
from streams.log_scan import READER_FETCH
from streams.topics import Topics

log = logging.getLogger(__name__)

# Databases a replay may never write into (besides the live one).
RESERVED_DATABASES = frozenset({"system", "information_schema", "default"})
# Columns that say when/by whom a row was landed, not what the log holds: not checksummed.
CHECK_EXCLUDED = frozenset({"_ingested_at"})
CHECK_EXCLUDED_BY_TABLE: dict[str, frozenset[str]] = {DEAD_LETTERS: frozenset({"first_seen", "consumer"})}
TIME_COLUMN = "occurred_at"
_COLUMN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MASK64 = (1 << 64) - 1

TP = tuple[str, int]

# --- what to rebuild ---------------------------------------------------------------------


def known_tables() -> list[str]:
    """Every table a replay can rebuild: one per projected event type, then `dead_letters`."""
    return [*sorted(set(event_tables().values())), DEAD_LETTERS]


def topics_for(tables: Collection[str], topics: Topics) -> list[str]:
    """The topics that feed `tables`: `dead_letters` is fed by every topic."""
    if DEAD_LETTERS in tables:
        return topics.all()
    wanted = set(tables)
    out = []
    for name in topics.all():
        spec = topics.spec_for(name)
        if spec is not None and wanted & {table_for(e) for e in spec.events}:
            out.append(name)
    return out


class BadReplayRequest(ValueError):
    """A replay request that cannot run; the message names the field and the fix."""


class TargetNotEmpty(RuntimeError):
    """`into` already holds projection rows and the request did not ask to replace them."""


@dataclass(frozen=True)
class ReplayRequest:
    into: str
    tables: tuple[str, ...]  # resolved: every known table when none were named
    since: datetime | None = None  # UTC
    replace: bool = False  # drop `into` first (a database holding rows is refused otherwise)

    def as_json(self) -> dict[str, Any]:
        return {
            "into": self.into,
            "tables": list(self.tables),
            "since": self.since.isoformat() if self.since else None,
            "replace": self.replace,
        }


def parse_tables(value: Any) -> tuple[str, ...]:
    """None/empty → every known table; a list or a comma-separated string of known names otherwise."""
    known = known_tables()
    if value is None or value == "" or value == []:
        return tuple(known)
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadReplayRequest("'tables' must be a list of table names (or null for all)")
    unknown = [v for v in value if v not in known]
    if unknown:
        raise BadReplayRequest(f"unknown table(s) {', '.join(unknown)}: choose from {', '.join(known)}")
    return tuple(t for t in known if t in value)  # catalogue order, no duplicates


def parse_since(value: Any) -> datetime | None:
    """An ISO-8601 time (a date alone = its midnight; no offset = UTC) or None."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadReplayRequest("'since' must be an ISO-8601 time such as 2025-01-31T00:00:00Z")
    try:
        t = datetime.fromisoformat(value.strip())
    except ValueError:
        raise BadReplayRequest(
            f"'since' {value!r} is not an ISO-8601 time: use e.g. 2025-01-31 or 2025-01-31T12:00:00Z"
        ) from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def parse_request(body: Any, live_database: str) -> ReplayRequest:
    """Validate a `POST /replay` body; BadReplayRequest says what to fix."""
    if not isinstance(body, dict):
        raise BadReplayRequest('send a JSON object: {"into": "db", "tables": [...] | null, "since": "..." | null}')
    extra = sorted(set(body) - {"into", "tables", "since", "replace"})
    if extra:
        raise BadReplayRequest(f"unknown field(s) {', '.join(extra)}: the fields are into, tables, since, replace")
    into = body.get("into")
    if not isinstance(into, str) or not into:
        raise BadReplayRequest("'into' is required: the name of the database to rebuild into")
    try:
        check_identifier(into)
    except ValueError:
        raise BadReplayRequest(
            f"'into' {into!r} is not a plain identifier: use letters, digits and _ (not starting with a digit)"
        ) from None
    if into == live_database:
        raise BadReplayRequest(f"'into' must differ from the live database {live_database!r}: name a new database")
    if into.lower() in RESERVED_DATABASES:
        raise BadReplayRequest(f"'into' {into!r} is a reserved database: name a new database")
    replace = body.get("replace", False)
    if not isinstance(replace, bool):
        raise BadReplayRequest("'replace' must be true or false")
    return ReplayRequest(into, parse_tables(body.get("tables")), parse_since(body.get("since")), replace)


def record_filter(tables: Collection[str], since: datetime | None, ends: Mapping[TP, int]) -> Keep:
    """The Sink `keep` of a replay: wanted table, not older than `since`, below the captured end.

    A `Keep`, so the sink's fast path can apply it without decoding (see `projections.sink`).
    """
    return Keep(frozenset(tables), since, dict(ends))


def rows_held(client: Client, database: str) -> int:
    """Rows in `database`'s projection tables (0 if it does not exist); `client` may be on any database.

    Why a replay refuses a database that holds rows: a continuation would resume each
    partition after what the database holds, which is only right if the earlier run had the
    same tables and `since`; nothing records that, so the caller must replace it explicitly.
    """
    held: Any = client.command(
        "SELECT toUInt64(ifNull(sum(total_rows), 0)) FROM system.tables "
        "WHERE database = {db:String} AND name IN {names:Array(String)}",
        parameters={"db": check_identifier(database), "names": known_tables()},
    )
    return int(held or 0)


def refuse_if_held(client: Client, request: ReplayRequest) -> None:
    """TargetNotEmpty unless `request.into` is empty or is to be replaced."""
    if request.replace:
        return
    held = rows_held(client, request.into)
    if held:
        raise TargetNotEmpty(
            f"database {request.into!r} already holds {held} rows: replace it (`ledgerflow replay --replace`, "
            '"replace": true) or name a new database'
        )


def target_check(store_url: str, request: ReplayRequest) -> None:
    """`refuse_if_held` on a short-lived read-only client (for a caller that has none)."""
    client = open_store(store_url, "default", readonly=True)
    try:
        refuse_if_held(client, request)
    finally:
        client.close()


def _record_applied(client: Client, database: str, migrations: Sequence[Migration]) -> list[int]:
    """One insert recording every file as applied (after all their statements ran)."""
    now = datetime.now(UTC)
    client.insert(
        MIGRATIONS_TABLE,
        [[m.version, m.name, m.checksum, now] for m in migrations],
        column_names=["version", "name", "checksum", "applied_at"],
        database=database,
    )
    return [m.version for m in migrations]


class SchemaBuildFailed(RuntimeError):
    """The fresh target's DDL failed: no insert may wait for it any longer."""


def tables_touched(statement: str, database: str) -> set[str]:
    """Tables and views a DDL statement names as `database.name` (every migration qualifies them)."""
    return set(re.findall(rf"\b{re.escape(database)}\.([A-Za-z_][A-Za-z0-9_]*)\b", statement))


class SchemaBuild:
    """A fresh database's migrations, in a thread of its own, so a replay inserts into each table as
    soon as it is made.

    Why: the fresh database's DDL (60 statements, 0.4-0.8 s on chDB) was a fixed cost before
    the first insert, and `migrate` records each file with an insert of its own (~0.5 s more on
    chDB; here one insert records them all). A table is ready once the last statement naming it
    ran: its own CREATE and ALTERs, and the views and materialized views that read it (an insert before the view
    that reads it exists would never reach the view's target). The statements run in the files'
    order, as `migrate` runs them; the one insert recording the files comes last, so a
    build interrupted half-way records nothing and a re-run repeats the (re-runnable) DDL.
    A table no statement names is ready when the whole build is.
    """

    def __init__(self, store_url: str, database: str) -> None:
        self.database = check_identifier(database)
        self._store_url = store_url
        self._migrations = discover()
        self._statements = [s for m in self._migrations for s in m.statements(database)]
        self._last: dict[str, int] = {}  # table → index of the last statement naming it
        for i, stmt in enumerate(self._statements):
            for table in tables_touched(stmt, database):
                self._last[table] = i
        self._ran = -1  # statements [0, _ran] have run
        self._finished = False
        self._stop = False
        self._error: BaseException | None = None
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._main, name=f"replay-ddl-{database}", daemon=True)

    def start(self) -> SchemaBuild:
        self._thread.start()
        return self

    def _main(self) -> None:
        try:
            client = open_store(self._store_url, self.database)
            try:
                if applied(client, self.database):  # (also makes the table recording the files)
                    raise SchemaBuildFailed(f"{self.database} has migrations applied: it is not fresh")
                for i, stmt in enumerate(self._statements):
                    if self._stop:
                        raise SchemaBuildFailed("stopped before the schema was complete")
                    client.command(stmt)
                    with self._cv:
                        self._ran = i
                        self._cv.notify_all()
                _record_applied(client, self.database, self._migrations)
            finally:
                client.close()
            with self._cv:
                self._finished = True
                self._cv.notify_all()
        except BaseException as exc:  # kept for the waiters: the job reports it
            with self._cv:
                self._error = exc
                self._cv.notify_all()

    def _raise(self) -> None:
        err = self._error
        if err is not None:
            if isinstance(err, SchemaBuildFailed):
                raise err
            raise SchemaBuildFailed(f"migrating {self.database} failed: {type(err).__name__}: {err}") from err

    def wait_for(self, table: str) -> None:
        """Block until `table` is ready (see class doc); SchemaBuildFailed if the DDL failed."""
        last = self._last.get(table)
        with self._cv:
            self._cv.wait_for(
                lambda: self._error is not None or self._finished or (last is not None and self._ran >= last)
            )
            self._raise()

    def join(self) -> list[int]:
        """Wait for the whole build (every statement and the record of the files); the versions applied."""
        self._thread.join()
        with self._cv:
            self._raise()
        return [m.version for m in self._migrations]

    def stop(self) -> None:
        """Run no further statement (the one running completes), and wait for the thread."""
        self._stop = True
        self._thread.join()


# --- progress ------------------------------------------------------------------------------


def progress(bounds: Mapping[TP, tuple[int, int]], positions: Mapping[TP, int]) -> tuple[int, int]:
    """(offsets consumed, offsets to consume) from each partition's (start, end) and position."""
    total = done = 0
    for tp, (low, high) in bounds.items():
        total += high - low
        done += min(max(positions.get(tp, low), low), high) - low
    return done, total


def finished(bounds: Mapping[TP, tuple[int, int]], positions: Mapping[TP, int]) -> bool:
    return all(high <= low or positions.get(tp, low) >= high for tp, (low, high) in bounds.items())


def end_offsets(
    bootstrap: str, topic_names: Sequence[str], timeout: float = 10.0, consumer: Consumer | RunConsumer | None = None
) -> dict[TP, tuple[int, int]]:
    """(start, end) of every partition of `topic_names` now, as a read_committed consumer sees them.

    The end is the last stable offset: records of a transaction still open are not part of
    the snapshot. Topics that do not exist have no partitions. Asked through `consumer` when
    given (it must be read_committed; it is left open), else through a probe of its own.
    """
    if consumer is not None:
        return _watermarks(consumer, topic_names, timeout)
    probe = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"ledgerflow-replay-probe-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        return _watermarks(probe, topic_names, timeout)
    finally:
        probe.close()


def _watermarks(probe: Consumer | RunConsumer, topic_names: Sequence[str], timeout: float) -> dict[TP, tuple[int, int]]:
    if isinstance(probe, RunConsumer):
        found = probe.partitions_of(topic_names, timeout)
    else:
        md = probe.list_topics(timeout=timeout)
        found = {name: sorted(md.topics[name].partitions) for name in topic_names if name in md.topics}
    out: dict[TP, tuple[int, int]] = {}
    for name in topic_names:
        for p in found.get(name, ()):
            low, high = probe.get_watermark_offsets(TopicPartition(name, p), timeout=timeout, cached=False)
            out[(name, p)] = (int(low), int(high))
    return out


# --- the job ---------------------------------------------------------------------------------

IDLE, PENDING, RUNNING, DONE, FAILED, CANCELLED = "idle", "pending", "running", "done", "failed", "cancelled"


def idle_status() -> dict[str, Any]:
    """`GET /replay/status` before any replay ran in this process."""
    return {
        "state": IDLE,
        "phase": IDLE,
        "into": None,
        "tables": [],
        "since": None,
        "topics": [],
        "group": None,
        "total": 0,
        "done": 0,
        "rows": 0,
        "dead_letters": 0,
        "refused": 0,
        "rate_per_s": 0.0,
        "eta_s": None,
        "started_at": None,
        "finished_at": None,
        "error": None,
        "last_error": None,
    }


@dataclass
class _Progress:
    state: str = PENDING
    phase: str = "queued"
    total: int = 0
    done: int = 0
    rows: int = 0
    dead_letters: int = 0
    refused: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    consuming_since: float | None = None  # monotonic, when the sink got its partitions
    done_at_consuming: int = 0
    error: str | None = None
    last_error: str | None = None
    samples: list[tuple[float, int]] = field(default_factory=list)  # (monotonic, done) for the rate


class ReplayJob:
    """One rebuild of `request.tables` into `request.into` (see module doc)."""

    def __init__(
        self,
        request: ReplayRequest,
        *,
        store_url: str,
        bootstrap: str,
        topics: Topics,
        batch_max: int = 20000,
        batch_ms: int = 1000,
        group: str | None = None,
        consumer_config: dict[str, Any] | None = None,
    ) -> None:
        self.request = request
        self.store_url = store_url
        self.bootstrap = bootstrap
        self.topics = topics
        self.batch_max = batch_max
        self.batch_ms = batch_ms
        self.group = group or f"ledgerflow-replay-{request.into}-{uuid.uuid4().hex[:8]}"
        # partition EOF events let the sink see a partition's end even if its last offsets hold no
        # record (a compacted-away tombstone; transaction markers also move the consumer's position)
        self.consumer_config = {"enable.partition.eof": True, **READER_FETCH, **(consumer_config or {})}
        self.topic_names = topics_for(request.tables, topics)
        self._p = _Progress()
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._thread: threading.Thread | None = None

    # --- control (any thread) ---------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name=f"replay-{self.request.into}", daemon=True)
        self._thread.start()

    def cancel(self) -> None:
        self._cancel.set()

    def join(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    @property
    def active(self) -> bool:
        with self._lock:
            return self._p.state in (PENDING, RUNNING)

    def status(self) -> dict[str, Any]:
        with self._lock:
            p = self._p
            rate = self._rate_locked()
            left = max(p.total - p.done, 0)
            eta = round(left / rate, 1) if rate > 0 and p.state == RUNNING else (0.0 if p.state == DONE else None)
            return {
                "state": p.state,
                "phase": p.phase,
                "into": self.request.into,
                "tables": list(self.request.tables),
                "since": self.request.since.isoformat() if self.request.since else None,
                "topics": self.topic_names,
                "group": self.group,
                "total": p.total,
                "done": p.done,
                "rows": p.rows,
                "dead_letters": p.dead_letters,
                "refused": p.refused,
                "rate_per_s": round(rate, 1),
                "eta_s": eta,
                "started_at": p.started_at.isoformat() if p.started_at else None,
                "finished_at": p.finished_at.isoformat() if p.finished_at else None,
                "error": p.error,
                "last_error": p.last_error,
            }

    def _rate_locked(self) -> float:
        """Offsets per second: over the last ~5 s while running, over the whole consumption at the end."""
        p = self._p
        if p.consuming_since is None:
            return 0.0
        if p.state != RUNNING:
            end = p.samples[-1][0] if p.samples else p.consuming_since
            span = end - p.consuming_since
            return (p.done - p.done_at_consuming) / span if span > 0 else 0.0
        if len(p.samples) < 2:
            return 0.0
        (t0, d0), (t1, d1) = p.samples[0], p.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def _set(self, **changes: Any) -> None:
        with self._lock:
            for k, v in changes.items():
                setattr(self._p, k, v)

    # --- the work (one thread) --------------------------------------------------------

    def _main(self) -> None:
        try:
            self.run()
        except Exception:  # run() records the error in the status; a thread has nobody to raise to
            log.debug("replay into %s ended with an error", self.request.into, exc_info=True)

    def run(self, poll_timeout: float = 0.2) -> dict[str, Any]:
        """Rebuild synchronously; returns the final status. Raises on failure (after recording it)."""
        req = self.request
        self._set(state=RUNNING, phase="migrating", started_at=datetime.now(UTC))
        log.info("replay into %s: tables %s, since %s, group %s", req.into, req.tables, req.since, self.group)
        sink: Sink | None = None
        store = None
        schema: SchemaBuild | None = None
        try:
            if req.replace:
                dropper = open_store(self.store_url, "default")
                try:
                    dropper.command(f"DROP DATABASE IF EXISTS {req.into} SYNC")
                finally:
                    dropper.close()
            # While the DDL runs (chDB releases the GIL), a thread builds the Sink's consumer, reads
            # the end offsets through it and assigns every non-empty partition from its start: the
            # log is fetched while the tables are made. The Codec is compiled only if a record needs
            # decoding (the Sink's LazyCodec); compiled here it held the GIL the DDL's client needed.
            with ThreadPoolExecutor(1, thread_name_prefix=f"replay-prep-{req.into}") as prep:
                fetch_at = prep.submit(self._prefetch)
                try:
                    store = open_store(self.store_url, req.into)
                    refuse_if_held(store, req)  # the service checked at POST; this covers direct callers and races
                    if applied(store, req.into):
                        migrate(store, req.into)  # made before (an emptied or interrupted target): as a sink would
                    else:  # a fresh database: its DDL runs beside the replay, each table waited for (SchemaBuild)
                        schema = SchemaBuild(self.store_url, req.into).start()
                except BaseException:
                    with contextlib.suppress(Exception):
                        fetch_at.result()[1].close()
                    raise
                self._set(phase="capturing end offsets")
                bounds, consumer = fetch_at.result()
            ends = {tp: high for tp, (_low, high) in bounds.items()}
            done, total = progress(bounds, {})
            self._set(phase="assigning", total=total, done=done)
            try:
                sink = Sink(
                    self.bootstrap,
                    self.group,
                    self.topics,
                    store,
                    batch_max=self.batch_max,
                    batch_ms=self.batch_ms,
                    consumer_config=self.consumer_config,
                    subscribe=self.topic_names,
                    keep=record_filter(req.tables, req.since, ends),
                    produce_dead_letters=False,
                    # no group: every partition with something to read, from its start (the database is
                    # empty, and step 1 would move a start up to what it holds); no commits either
                    assign={tp: low for tp, (low, high) in bounds.items() if high > low},
                    commit=False,
                    consumer=consumer,  # assigned those partitions at those offsets by _prefetch
                    # a database this job made holds nothing: step 1 has nothing to ask it, and
                    # each table is used (its columns read, its rows inserted) once it is made
                    resume=schema is None,
                    table_ready=schema.wait_for if schema is not None else None,
                )
            except BaseException:
                consumer.close()
                raise
            self._consume(sink, bounds, poll_timeout)
            if self._cancel.is_set():
                sink.close()
                if schema is not None:
                    schema.stop()
                self._finish(CANCELLED, sink, "cancelled")
                return self.status()
            sink.close()
            if schema is not None:
                schema.join()  # the tables nothing was inserted into, the views, the record of the files
            self._finish(DONE, sink, None)
            log.info("replay into %s done: %s", req.into, self.status())
            return self.status()
        except Exception as exc:
            if sink is not None:
                try:
                    sink.close()
                except Exception:  # already failing: the first error is the one to report
                    log.debug("sink close after failure", exc_info=True)
            self._finish(FAILED, sink, f"{type(exc).__name__}: {exc}")
            log.exception("replay into %s failed", req.into)
            raise
        finally:
            if schema is not None:
                schema.stop()  # after a failure: no statement more (a no-op once it finished)
            if store is not None:
                store.close()

    def _prefetch(self) -> tuple[dict[TP, tuple[int, int]], Consumer | RunConsumer]:
        """The Sink's consumer, assigned every non-empty partition from its start, and each
        partition's (start, end) read through it (read_committed: the end is the last stable offset).

        A reader of runs (`projections.kafka_reader`, same configuration) when it is available: the
        driver then takes a run of records per Python step instead of a Message per record.
        """
        conf = sink_consumer_config(self.bootstrap, self.group, self.consumer_config)
        consumer = RunConsumer(conf) if kafka_reader.available() else Consumer(conf)
        try:
            bounds = end_offsets(self.bootstrap, self.topic_names, consumer=consumer)
            consumer.assign([TopicPartition(t, p, low) for (t, p), (low, high) in sorted(bounds.items()) if high > low])
        except BaseException:
            consumer.close()
            raise
        return bounds, consumer

    def _consume(self, sink: Sink, bounds: dict[TP, tuple[int, int]], poll_timeout: float) -> None:
        flushing = False
        while not self._cancel.is_set():
            if flushing:  # everything is read: wait for the inserter, not in consume() (nothing comes)
                sink.wait_inserted(poll_timeout)
                sink.poll_once(0.0)
            else:
                sink.poll_once(poll_timeout)
            positions = sink.positions()
            done, total = progress(bounds, positions)
            now = time.monotonic()
            with self._lock:
                p = self._p
                if p.consuming_since is None and sink.assigned.is_set():
                    p.consuming_since, p.done_at_consuming, p.phase = now, done, "consuming"
                p.done, p.total = done, total
                p.rows, p.dead_letters, p.refused = sink.rows_inserted, sink.dead_lettered, sink.refused
                p.last_error = sink.last_error
                if p.consuming_since is not None:
                    p.samples.append((now, done))
                    while len(p.samples) > 2 and now - p.samples[0][0] > 5.0:
                        p.samples.pop(0)
            if sink.assigned.is_set() and finished(bounds, positions):
                self._set(phase="flushing")
                if sink.pending_rows() == 0:
                    return
                flushing = True

    def _finish(self, state: str, sink: Sink | None, error: str | None) -> None:
        with self._lock:
            p = self._p
            p.state, p.phase, p.error = state, state, error
            p.finished_at = datetime.now(UTC)
            if sink is not None:
                p.rows, p.dead_letters, p.refused = sink.rows_inserted, sink.dead_lettered, sink.refused
            if p.consuming_since is not None:
                p.samples.append((time.monotonic(), p.done))


# --- the check -------------------------------------------------------------------------------


def _quote(name: str) -> str:
    if not _COLUMN.match(name):
        raise ValueError(f"unexpected identifier {name!r}")
    return f"`{name}`"


def _literal(name: str) -> str:
    if not _COLUMN.match(name):
        raise ValueError(f"unexpected identifier {name!r}")
    return f"'{name}'"


def columns_query(databases: Sequence[str], tables: Sequence[str]) -> str:
    """Columns of `tables` in `databases` (TabSeparated: database, table, column), in table order."""
    dbs = ", ".join(_literal(d) for d in databases)
    tbls = ", ".join(_literal(t) for t in tables)
    return (
        f"SELECT database, table, name FROM system.columns WHERE database IN ({dbs}) AND table IN ({tbls}) "
        "ORDER BY database, table, position"
    )


def parse_columns(tsv: str) -> dict[tuple[str, str], list[str]]:
    out: dict[tuple[str, str], list[str]] = {}
    for line in tsv.splitlines():
        if line:
            db, table, name = line.split("\t")
            out.setdefault((db, table), []).append(name)
    return out


def checked_columns(table: str, columns: Sequence[str]) -> list[str]:
    skip = CHECK_EXCLUDED | CHECK_EXCLUDED_BY_TABLE.get(table, frozenset())
    return [c for c in columns if c not in skip]


def _since_literal(since: datetime) -> str:
    return f"toDateTime64('{since.astimezone(UTC):%Y-%m-%d %H:%M:%S.%f}', 6, 'UTC')"


def checksum_query(
    live: str,
    into: str,
    columns: Mapping[tuple[str, str], Sequence[str]],
    tables: Sequence[str],
    since: datetime | None = None,
) -> str | None:
    """Per (side, table, topic, partition): rows, checksum, min and max offset (read it as TabSeparated).

    None when no table exists on both sides. The checksum covers the columns both sides have
    (a column only one side has is reported by `compare`), so the two sums are comparable.
    """
    parts = []
    for table in tables:
        have = {db: columns.get((db, table)) for db in (live, into)}
        if not all(have.values()):
            continue
        common = [c for c in checked_columns(table, have[live] or []) if c in set(have[into] or [])]
        row = ", ".join(_quote(c) for c in common)
        where = f" WHERE {TIME_COLUMN} >= {_since_literal(since)}" if since and TIME_COLUMN in common else ""
        for side, db in (("live", live), ("into", into)):
            parts.append(
                f"SELECT '{side}', '{table}', toString(_topic), toUInt32(_partition), count(), "
                f"sum(cityHash64(tuple({row}))), min(_offset), max(_offset) "
                f"FROM {_quote(check_identifier(db))}.{_quote(table)}{where} GROUP BY _topic, _partition"
            )
    if not parts:
        return None
    return "\nUNION ALL\n".join(parts)


@dataclass(frozen=True)
class PartitionSum:
    rows: int
    checksum: int
    min_offset: int
    max_offset: int


def parse_checksums(tsv: str) -> dict[tuple[str, str], dict[TP, PartitionSum]]:
    """(side, table) → (topic, partition) → sums, from `checksum_query`'s output."""
    out: dict[tuple[str, str], dict[TP, PartitionSum]] = {}
    for line in tsv.splitlines():
        if not line:
            continue
        side, table, topic, partition, rows, checksum, lo, hi = line.split("\t")
        out.setdefault((side, table), {})[(topic, int(partition))] = PartitionSum(
            int(rows), int(checksum), int(lo), int(hi)
        )
    return out


@dataclass
class TableCheck:
    table: str
    live_rows: int = 0
    into_rows: int = 0
    live_sum: int = 0
    into_sum: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        return not self.problems


@dataclass
class CheckReport:
    live: str
    into: str
    tables: list[TableCheck]

    @property
    def equal(self) -> bool:
        return all(t.equal for t in self.tables)

    def render(self) -> str:
        """A table of every checked table, then what differs (if anything)."""
        w = max([len("table"), *(len(t.table) for t in self.tables)])
        lw, iw = max(len(self.live) + 5, 12), max(len(self.into) + 5, 12)
        lines = [
            f"{'table':<{w}}  {self.live + ' rows':>{lw}}  {self.into + ' rows':>{iw}}  "
            f"{'live checksum':>16}  {'rebuilt checksum':>16}  result"
        ]
        for t in self.tables:
            lines.append(
                f"{t.table:<{w}}  {t.live_rows:>{lw}}  {t.into_rows:>{iw}}  "
                f"{t.live_sum:016x}  {t.into_sum:016x}  {'ok' if t.equal else 'DIFFERENT'}"
            )
        diffs = [(t.table, p) for t in self.tables for p in t.problems]
        if diffs:
            lines.append("")
            lines.append(f"differences ({self.live} vs {self.into}):")
            lines.extend(f"  {table}: {p}" for table, p in diffs)
        else:
            lines.append("")
            lines.append(f"{self.into} equals {self.live} in every checked table.")
        return "\n".join(lines) + "\n"


def _describe(ps: PartitionSum | None) -> str:
    if ps is None:
        return "no rows"
    return f"{ps.rows} rows, offsets {ps.min_offset}-{ps.max_offset}, checksum {ps.checksum:016x}"


def compare(
    live: str,
    into: str,
    tables: Sequence[str],
    columns: Mapping[tuple[str, str], Sequence[str]],
    sums: Mapping[tuple[str, str], Mapping[TP, PartitionSum]],
) -> CheckReport:
    report = CheckReport(live, into, [])
    for table in tables:
        tc = TableCheck(table)
        report.tables.append(tc)
        have = {db: columns.get((db, table)) for db in (live, into)}
        for db, cols in have.items():
            if not cols:
                tc.problems.append(f"table missing in {db}")
        if tc.problems:
            continue
        live_cols = checked_columns(table, have[live] or [])
        into_cols = checked_columns(table, have[into] or [])
        only_live = [c for c in live_cols if c not in into_cols]
        only_into = [c for c in into_cols if c not in live_cols]
        if only_live or only_into:
            tc.problems.append(f"columns differ: only in {live} {only_live}, only in {into} {only_into}")
        lsums, isums = sums.get(("live", table), {}), sums.get(("into", table), {})
        tc.live_rows, tc.into_rows = sum(s.rows for s in lsums.values()), sum(s.rows for s in isums.values())
        tc.live_sum = sum(s.checksum for s in lsums.values()) & _MASK64
        tc.into_sum = sum(s.checksum for s in isums.values()) & _MASK64
        for tp in sorted(set(lsums) | set(isums)):
            a, b = lsums.get(tp), isums.get(tp)
            if a != b:
                tc.problems.append(f"{tp[0]}[{tp[1]}]: {live} {_describe(a)}; {into} {_describe(b)}")
    return report


def check(
    run_sql: Callable[[str], str],
    live: str,
    into: str,
    tables: Sequence[str] | None = None,
    since: datetime | None = None,
) -> CheckReport:
    """Compare `tables` (all known when None) of `live` and `into` through `run_sql` (SQL → TabSeparated)."""
    check_identifier(live)
    check_identifier(into)
    names = list(tables) if tables else known_tables()
    columns = parse_columns(run_sql(columns_query([live, into], names)))
    sql = checksum_query(live, into, columns, names, since)
    sums = parse_checksums(run_sql(sql)) if sql else {}
    return compare(live, into, names, columns, sums)
