"""The read-side process: owns the store, runs the sink, serves read-only SQL over HTTP.

Why one process: chDB opens one data path per process, so whoever hosts the embedded store
must also be the one that writes it (the sink) and answers everybody else's queries. The
SQL endpoint speaks the subset of the ClickHouse HTTP interface that curl and
clickhouse-connect's HTTP client use, so tools written against a real ClickHouse work
unchanged; with a ClickHouse server as the store, clients should talk to the server
directly and this endpoint answers 501.

Read-only is enforced by the engine, not by parsing: every query runs on a chDB handle whose
session has readonly=1, which refuses writes, DDL, external table functions and any
settings change (so `SETTINGS readonly=0` in a query fails). `sqlguard` adds what readonly=1
does not cover in clickhouse-local: one statement only, no INTO OUTFILE, no file() & co.
Settings sent as URL parameters are ignored (a `readonly` other than 1 is refused).

Endpoints: `/` (SQL, GET ?query= or POST body), `/ping`, `/readyz`, `/status`, `/metrics`
(Prometheus, `projections/metrics.py`; operator token like every route but the two health checks), and replay
(`projections/replay.py`; it runs here because in embedded mode only this process may write
the store): `POST /replay` {"into", "tables", "since", "replace"} starts one background
rebuild (202; 400 for a bad request, naming the fix; 409 while one runs or when `into` holds
rows and `replace` is not set; 503 without Kafka),
`GET /replay/status` reports it, `DELETE /replay` cancels it.

`POST /v1/policy/dry-run` evaluates a candidate policy bundle beside the active one over the
inputs of the last N recorded decisions and returns the `DiffReport` as JSON (see
`ProjectionService.dry_run`). It reads only projections (audit_recorded, policy_published,
policy_attributes_set) and spends nothing, so it records no fact.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, cast
from urllib.parse import urlparse

import chdb
import orjson
from aiohttp import web
from clickhouse_connect.driver.binding import format_bind_value
from clickhouse_connect.driver.client import Client

from domain.policy import (
    AttributeChange,
    AttributesInvalid,
    BundleInvalid,
    DecisionInput,
    EntityStore,
    PolicyBundle,
    default_bundle,
    diff,
    fold_attributes,
)
from projections import billing
from projections import dp as dp_read
from projections import slo as slo_read
from projections.access import READER, AccessDenied, ReadAccess, scoped_tenant
from projections.faults import OutageClient, StoreOutage
from projections.lag import LagSampler, WatchedGroup
from projections.metrics import ReadSideMetrics
from projections.migrations import applied, migrate
from projections.portal import Portal
from projections.replay import BadReplayRequest, ReplayJob, TargetNotEmpty, idle_status, parse_request, target_check
from projections.sink import Sink
from projections.sqlguard import UnsafeQuery, prepare_read_query
from projections.store import check_identifier, open_store
from streams.admin import ensure_topics
from streams.follower import StateFollower
from streams.topics import Topics

log = logging.getLogger(__name__)

SERVER_NAME = "ledgerflow-projections"
MAX_QUERY_BYTES = 1 << 20  # SQL text only: this endpoint takes no insert data
# URL parameters that are part of the HTTP protocol, not settings; everything else that a
# client sends (wait_end_of_query, enable_http_compression, date_time_input_format, ...) is
# a setting and is ignored: a readonly=1 session could not change it anyway.
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
SINK_REBUILD_S = 2.0  # wait before a new consumer after a fatal client error
SINK_STALL_S = 60.0  # no progress on a partition with records waiting this long: a new consumer
_PUBLIC_PATHS = frozenset({"/ping", "/readyz"})
# What a tenant's key may call; the handler scopes each to the key's tenant (projections/access.py).
_TENANT_PATHS = frozenset({"/v1/usage", "/v1/policy/dry-run", *dp_read.PATHS, *billing.PATHS, *slo_read.PATHS})
USAGE_MAX_DAYS = 366

_USAGE_SQL = """
SELECT toString(toDate(occurred_at)) AS day, tenant, model, currency,
       count() AS requests, sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
       toString(sum(cost)) AS cost
FROM tokens_charged
WHERE occurred_at >= {since:DateTime64(6, 'UTC')} AND occurred_at < {until:DateTime64(6, 'UTC')}
  AND ({all:UInt8} = 1 OR tenant = {tenant:String})
GROUP BY day, tenant, model, currency
ORDER BY day, tenant, model, currency
"""


def usage_window(since: str | None, until: str | None, today: date | None = None) -> tuple[datetime, datetime]:
    """[since, until) as UTC midnights from ISO dates; default the last 30 days including today."""
    end_day = today or datetime.now(UTC).date()
    try:
        end = date.fromisoformat(until) + timedelta(days=1) if until else end_day + timedelta(days=1)
        start = date.fromisoformat(since) if since else end - timedelta(days=30)
    except ValueError:
        raise ValueError("'since' and 'until' must be dates like 2026-11-01 (until is inclusive)") from None
    if start >= end:
        raise ValueError(f"'since' ({start}) must not be after 'until' ({end - timedelta(days=1)})")
    if (end - start).days > USAGE_MAX_DAYS:
        raise ValueError(f"ask for at most {USAGE_MAX_DAYS} days at a time")
    return datetime.combine(start, datetime.min.time(), UTC), datetime.combine(end, datetime.min.time(), UTC)


_PROTOCOL_PARAMS = frozenset({"query", "database", "default_format", "query_id", "user", "password", "readonly"})
_CODE = re.compile(r"Code: (\d+)")
_NAME = re.compile(r"\(([A-Z][A-Z0-9_]+)\)\s*$")
_VERSION = re.compile(r"\s*\(version [^)]*\)")
_DOUBLE_NAME = re.compile(r"(\([A-Z][A-Z0-9_]+\))\.? \1$")
_NESTED = re.compile(r"^(Code: \d+\. DB::Exception: )(?:Code: \d+\. DB::Exception: )+")
# ClickHouse's exception code → HTTP status mapping, for the codes a read query can hit.
_STATUS_BY_CODE = {
    48: 501,  # NOT_IMPLEMENTED
    164: 403,  # READONLY
    497: 403,  # ACCESS_DENIED
    291: 403,  # DATABASE_ACCESS_DENIED
    60: 404,  # UNKNOWN_TABLE
    81: 404,  # UNKNOWN_DATABASE
    62: 400,  # SYNTAX_ERROR
    6: 400,  # CANNOT_PARSE_TEXT
    27: 400,  # CANNOT_PARSE_INPUT_ASSERTION_FAILED
    36: 400,  # BAD_ARGUMENTS
    42: 400,  # NUMBER_OF_ARGUMENTS_DOESNT_MATCH
    43: 400,  # ILLEGAL_TYPE_OF_ARGUMENT
    44: 400,  # ILLEGAL_COLUMN
    46: 400,  # UNKNOWN_FUNCTION
    47: 400,  # UNKNOWN_IDENTIFIER
    53: 400,  # TYPE_MISMATCH
    73: 400,  # UNKNOWN_FORMAT
    115: 400,  # UNKNOWN_SETTING
    130: 400,  # CANNOT_READ_ARRAY_FROM_TEXT
    184: 400,  # ILLEGAL_AGGREGATION
    215: 400,  # NOT_AN_AGGREGATE
    456: 400,  # UNKNOWN_QUERY_PARAMETER
    457: 400,  # BAD_QUERY_PARAMETER
}


class QueryError(Exception):
    """A ClickHouse error to hand back to the HTTP client as a real server would."""

    def __init__(self, code: int, name: str, message: str) -> None:
        super().__init__(message)
        self.code, self.name, self.message = code, name, message

    @classmethod
    def from_engine(cls, exc: Exception) -> QueryError:
        text = _VERSION.sub("", str(exc)).strip()
        idx = text.find("Code: ")
        text = text[idx:] if idx > 0 else text
        # chDB nests some errors ("Code: 164. DB::Exception: Code: 164. DB::Exception: ..."): keep one prefix
        text = _NESTED.sub(r"\1", text)
        text = _DOUBLE_NAME.sub(r"\1", text)
        code = _CODE.search(text)
        name = _NAME.search(text)
        return cls(int(code.group(1)) if code else 1000, name.group(1) if name else "STD_EXCEPTION", text)

    @property
    def status(self) -> int:
        return _STATUS_BY_CODE.get(self.code, 500)

    def body(self, version: str) -> str:
        text = self.message
        if not text.startswith("Code: "):
            text = f"Code: {self.code}. DB::Exception: {text}"
        if not text.rstrip().endswith(f"({self.name})"):
            text = f"{text.rstrip().rstrip('.')}. ({self.name})"
        return f"{text} (version {version})\n"


@dataclass(frozen=True)
class SqlResult:
    body: bytes
    rows_read: int
    bytes_read: int
    elapsed_ns: int


class _Handle:
    __slots__ = ("conn", "database")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.database: str | None = None


class ChdbReader:
    """Read-only SQL on this process's chDB engine, through its own readonly=1 handles.

    Why raw chDB handles and not a clickhouse-connect client: query parameters must reach
    the engine exactly as the HTTP client escaped them, and the response is returned in the
    client's format byte for byte. A small pool lets queries run in parallel; each handle
    is used by one thread at a time.
    """

    def __init__(self, path: str, database: str, handles: int = 3, max_execution_time: int = 120) -> None:
        self.default_database = check_identifier(database)
        self._pool: queue.Queue[_Handle] = queue.Queue()
        conn_str = os.path.realpath(path)  # clickhouse-connect opens the engine by its real path too
        for _ in range(handles):
            conn = chdb.connect(conn_str)
            # Limits first: once readonly=1 is set, no setting can be changed on this handle.
            conn.query(f"SET max_execution_time = {int(max_execution_time)}")
            conn.query("SET readonly = 1")
            self._pool.put(_Handle(conn))
        probe = self.execute("SELECT version(), timezone()", "TabSeparated", database, {})
        version, tz = probe.body.decode().split("\t")
        self.version, self.timezone = version.strip(), tz.strip()

    def execute(self, sql: str, fmt: str, database: str, params: dict[str, str]) -> SqlResult:
        """Run one already-vetted statement; QueryError carries the engine's error."""
        try:
            check_identifier(database)
        except ValueError:
            raise QueryError(81, "UNKNOWN_DATABASE", f"Database {database!r} does not exist") from None
        try:
            handle = self._pool.get(timeout=60)
        except queue.Empty:
            raise QueryError(202, "TOO_MANY_SIMULTANEOUS_QUERIES", "all query handles busy for 60 s") from None
        try:
            started = time.perf_counter_ns()
            if handle.database != database:
                handle.conn.query(f"USE `{database}`")
                handle.database = database
            res = handle.conn.query(sql, fmt, params=params)
            return SqlResult(
                body=res.bytes() or b"",
                rows_read=int(res.rows_read()),
                bytes_read=int(res.bytes_read()),
                elapsed_ns=time.perf_counter_ns() - started,
            )
        except Exception as exc:  # the engine's own error text, code and name
            raise QueryError.from_engine(exc) from None
        finally:
            self._pool.put(handle)

    def close(self) -> None:
        while True:
            try:
                self._pool.get_nowait().conn.close()
            except queue.Empty:
                return


def content_type(fmt: str) -> str:
    """The Content-Type ClickHouse sends for an output format."""
    f = fmt.lower()
    if f.startswith(("tabseparated", "tsv")):
        return "text/tab-separated-values; charset=UTF-8"
    if f.startswith("csv"):
        return "text/csv; charset=UTF-8; header=" + ("present" if "withnames" in f else "absent")
    if f in ("jsoneachrow", "jsonlines", "ndjson", "jsoncompacteachrow", "jsonstringseachrow", "jsonobjecteachrow"):
        return "application/x-ndjson; charset=UTF-8"
    if f.startswith("json"):
        return "application/json; charset=UTF-8"
    if f == "xml":
        return "application/xml; charset=UTF-8"
    if f.startswith(("native", "rowbinary", "parquet", "arrow", "orc", "avro", "protobuf", "msgpack", "capnproto")):
        return "application/octet-stream"
    return "text/plain; charset=UTF-8"


def redact(url: str) -> str:
    """The store URL without credentials, for /status and logs."""
    p = urlparse(url)
    if p.password or p.username:
        host = p.hostname or ""
        return p._replace(netloc=f"{host}:{p.port}" if p.port else host).geturl()
    return url


DRY_RUN_DEFAULT_LAST = 1000
DRY_RUN_MAX_LAST = 100_000
DRY_RUN_MAX_EXAMPLES = 20
# The inputs of recorded decisions: the gateway puts DecisionInput.canonical_json() into the
# request's audit record (details['policy_input']). A redelivered record counts once.
_DRY_RUN_INPUTS_SQL = """
SELECT event_id, details['policy_input'] AS policy_input
FROM audit_recorded
WHERE action IN ('request.completed', 'request.denied') AND mapContains(details, 'policy_input')
  AND ({tenant:String} = '' OR tenant = {tenant:String})
ORDER BY occurred_at DESC, event_id DESC
LIMIT 1 BY event_id
LIMIT {last:UInt32}
"""
# The active bundle is the last record of the policy-bundles topic (one partition).
_ACTIVE_BUNDLE_SQL = """
SELECT version, bundle, content_sha256 FROM policy_published
ORDER BY _offset DESC, occurred_at DESC LIMIT 1
"""
# Each entity's newest attributes record (the compacted topic's state).
_ATTRIBUTES_SQL = """
SELECT entity_type, entity_id, argMax(attributes_json, _offset) AS attributes_json,
       argMax(deleted, _offset) AS deleted
FROM policy_attributes_set GROUP BY entity_type, entity_id
"""


class BadDryRun(ValueError):
    """A dry-run request that cannot run: HTTP `status`, a message naming the fix, and any bundle errors."""

    def __init__(self, status: int, message: str, errors: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.status, self.message, self.errors = status, message, errors


@dataclass(frozen=True)
class DryRunRequest:
    """What `POST /v1/policy/dry-run` takes: the candidate text and how many recent decisions to replay."""

    bundle: str
    version: str = "candidate"
    last: int = DRY_RUN_DEFAULT_LAST
    examples: int = 3
    tenant: str = ""
    models: dict[str, str] | None = None  # model → region, seeded where the attributes name none

    @classmethod
    def parse(cls, body: bytes, content: str, query: Any) -> DryRunRequest:
        """From a JSON object ({"bundle", "version", "last", "examples", "tenant", "models"}) or a
        plain-text bundle with `?last=&version=&examples=&tenant=`; BadDryRun names what to fix."""
        if content == "application/json":
            try:
                doc = orjson.loads(body) if body else None
            except orjson.JSONDecodeError as exc:
                raise BadDryRun(
                    400, f'the body is not JSON ({exc}): send {{"bundle": "<cedar text>", "last": N}}'
                ) from None
            if not isinstance(doc, dict):
                raise BadDryRun(400, 'send a JSON object: {"bundle": "<cedar text>", "last": N}')
            unknown = sorted(set(doc) - {"bundle", "version", "last", "examples", "tenant", "models"})
            if unknown:
                raise BadDryRun(
                    400, f"unknown fields {unknown}; known: bundle, version, last, examples, tenant, models"
                )
        else:
            try:
                text = body.decode("utf-8")
            except UnicodeDecodeError:
                raise BadDryRun(400, "the bundle text is not UTF-8") from None
            doc = {"bundle": text, **{k: query[k] for k in ("version", "last", "examples", "tenant") if k in query}}
        bundle = doc.get("bundle")
        if not isinstance(bundle, str) or not bundle.strip():
            raise BadDryRun(400, "send the candidate bundle's Cedar text (the body, or 'bundle' in a JSON object)")
        version = doc.get("version", "candidate")
        tenant = doc.get("tenant", "")
        if not isinstance(version, str) or not isinstance(tenant, str):
            raise BadDryRun(400, "'version' and 'tenant' must be strings")
        last = _int_field(doc, "last", DRY_RUN_DEFAULT_LAST, 1, DRY_RUN_MAX_LAST)
        examples = _int_field(doc, "examples", 3, 0, DRY_RUN_MAX_EXAMPLES)
        models = doc.get("models")
        if models is not None and (
            not isinstance(models, dict)
            or not all(isinstance(k, str) and isinstance(v, str) for k, v in models.items())
        ):
            raise BadDryRun(400, '\'models\' must map model names to regions, e.g. {"sim-small": "eu"}')
        return cls(bundle, version or "candidate", last, examples, tenant, models)


def _int_field(doc: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    raw = doc.get(name, default)
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise BadDryRun(400, f"{name!r} must be an integer from {low} to {high}, got {raw!r}") from None
    if isinstance(raw, bool) or not low <= value <= high:
        raise BadDryRun(400, f"{name!r} must be an integer from {low} to {high}, got {raw!r}")
    return value


class ReplayRefused(Exception):
    """A replay that cannot start now: HTTP `status` and a message that says why."""

    def __init__(self, status: int, message: str, job: ReplayJob | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.job = status, message, job


class ProjectionService:
    """Migrations, the sink thread, replays and the read-only SQL endpoint over one store."""

    def __init__(
        self,
        *,
        store_url: str,
        database: str,
        bootstrap: str = "",
        group: str = "ledgerflow-sink",
        topics: Topics | None = None,
        run_sink: bool = True,
        batch_max: int = 5000,
        batch_ms: int = 200,
        sql_handles: int = 3,
        instance_id: str | None = None,
        access: ReadAccess,
        fault_injection: bool = False,
        lag_groups: Sequence[WatchedGroup] = (),
        lag_interval_s: float = 0.0,
    ) -> None:
        if run_sink and not bootstrap:
            raise ValueError("the sink needs a Kafka bootstrap (or run without the sink)")
        self.store_url = store_url
        self.database = check_identifier(database)
        self.bootstrap = bootstrap
        self.group = group
        self.topics = topics or Topics()
        self.run_sink = run_sink
        self.batch_max = batch_max
        self.batch_ms = batch_ms
        self.sql_handles = sql_handles
        # Static group membership: a restarted sink (crash, deploy) takes its partitions back at
        # once instead of waiting out the dead member's session timeout.
        self.consumer_config = {"group.instance.id": instance_id} if instance_id else {}
        self.writer: Client | None = None
        self.reader: ChdbReader | None = None
        self.sink: Sink | None = None
        self.migrations: list[int] = []
        self.migrated = threading.Event()
        self.start_error: str | None = None
        self.sink_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.replay_job: ReplayJob | None = None
        self._replay_lock = threading.Lock()
        self._server_reader: Client | None = None  # read-only client for a server store (dry-runs)
        self._server_lock = threading.Lock()
        # Required: an open service is a decision its caller writes down (`ReadAccess.open()`), never a default.
        self.access = access
        self._key_follower: StateFollower | None = None
        # Chaos tests only (projections/faults.py): None unless the process allows injection.
        self.outage: StoreOutage | None = StoreOutage() if fault_injection else None
        self.sink_rebuilds = 0
        self.dp: dp_read.DpReadSide | None = None  # DP queries (projections/dp.py); needs Kafka
        self.portal = Portal(self.access, self.read_rows)  # issue 12: /portal pages, cookie sessions
        # issue 11: /metrics (operator token), the sink's hook, and the consumer-lag sampler (off at 0 s)
        self.metrics = ReadSideMetrics(lambda: self.sink.status() if self.sink is not None else None)
        self.lag_groups = list(lag_groups)
        self.lag_interval_s = lag_interval_s
        self.lag_sampler: LagSampler | None = None

    # --- lifecycle --------------------------------------------------------------------

    def start(self) -> None:
        """Migrate, open the read side, start the sink thread. Raises if the store is unusable."""
        try:
            self.writer = open_store(self.store_url, self.database)
            migrate(self.writer, self.database)
            self.migrations = sorted(applied(self.writer, self.database))
            self.migrated.set()
            if self.store_url.startswith("chdb:"):
                self.reader = ChdbReader(urlparse(self.store_url).path, self.database, handles=self.sql_handles)
            if self.bootstrap and not self.access.is_open:
                self._key_follower = StateFollower(
                    self.bootstrap, [self.topics.name("api-keys")], self.access.keys.apply, name="read-api-keys"
                )
                self._key_follower.start()
            if self.bootstrap:
                self.dp = dp_read.DpReadSide(self.bootstrap, self.topics, self.read_rows, group=self.group)
                self.dp.start()
            if self.run_sink:
                try:
                    ensure_topics(self.bootstrap, self.topics)
                except Exception as exc:  # the sink still subscribes; topics may appear later
                    log.warning("could not ensure topics exist: %s", exc)
                self.sink = self._new_sink()
                self._thread = threading.Thread(target=self._sink_main, name="projection-sink", daemon=True)
                self._thread.start()
            if self.bootstrap and self.lag_interval_s > 0 and self.lag_groups:
                self.lag_sampler = LagSampler(
                    self.bootstrap, self.topics, self.lag_groups, self.lag_interval_s, self.metrics
                )
                self.lag_sampler.start()
        except Exception as exc:
            self.start_error = f"{type(exc).__name__}: {exc}"
            raise

    def _new_sink(self) -> Sink:
        assert self.writer is not None
        sink = Sink(
            self.bootstrap,
            self.group,
            self.topics,
            cast(Client, OutageClient(self.writer, self.outage)) if self.outage else self.writer,
            batch_max=self.batch_max,
            batch_ms=self.batch_ms,
            consumer_config=self.consumer_config,
            stall_s=SINK_STALL_S,  # a wedged fetcher ends this sink; _sink_main builds a new one
        )
        sink.hooks = self.metrics
        return sink

    def _sink_main(self) -> None:
        """Run the sink; rebuild it after a fatal client error (a fenced consumer cannot recover).

        Rebuilding is safe by the sink's step (1): the new consumer resumes after what
        ClickHouse holds, so nothing in flight is lost or landed twice.
        """
        assert self.sink is not None
        while not self._stop.is_set():
            try:
                self.sink.run(self._stop)
                return
            except Exception as exc:  # the sink never stops on data; a dead client or a bug
                log.exception("projection sink stopped; rebuilding it in %.0fs", SINK_REBUILD_S)
                self.sink_error = f"{type(exc).__name__}: {exc}"
                self.sink_rebuilds += 1
            while not self._stop.wait(SINK_REBUILD_S):  # a closed sink is never run again
                try:
                    self.sink = self._new_sink()
                    self.sink_error = None
                    break
                except Exception as exc:
                    log.warning("could not rebuild the sink yet: %s", exc)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the sink (its final flush and commit happen in its thread), then close stores."""
        self._stop.set()
        job = self.replay_job
        if job is not None and job.active:
            job.cancel()
            if not job.join(timeout):
                log.warning("replay into %s did not stop within %.0fs", job.request.into, timeout)
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("sink thread did not stop within %.0fs", timeout)
        if self.lag_sampler is not None:
            self.lag_sampler.close()
        if self._key_follower is not None:
            self._key_follower.close()
        if self.dp is not None:
            self.dp.close()
        if self.reader is not None:
            self.reader.close()
        if self._server_reader is not None:
            self._server_reader.close()
        if self.writer is not None:
            self.writer.close()

    # --- health -----------------------------------------------------------------------

    def ready(self) -> tuple[bool, str]:
        if self.start_error:
            return False, f"start failed: {self.start_error}"
        if not self.migrated.is_set():
            return False, "migrations not applied yet"
        if not self.run_sink:
            return True, "ready (no sink)"
        if self.sink is None or not self.sink.assigned.is_set():
            return False, "sink has no partition assignment yet"
        if self._thread is None or not self._thread.is_alive():
            return False, f"sink stopped: {self.sink_error or 'stopped'}"
        return True, "ready"

    def status(self) -> dict[str, Any]:
        ok, why = self.ready()
        sink: dict[str, Any] | None = None
        if self.sink is not None:
            sink = self.sink.status()
            sink["running"] = bool(self._thread and self._thread.is_alive())
            sink["error"] = self.sink_error
            sink["rebuilds"] = self.sink_rebuilds
        return {
            "ready": ok,
            "reason": why,
            "store": redact(self.store_url),
            "database": self.database,
            "migrations": self.migrations,
            "sql_endpoint": self.reader is not None,
            "sink": sink,
            "replay": self.replay_job.status() if self.replay_job else None,
            "store_outage": (
                {"remaining_s": round(self.outage.remaining, 3), "refused_calls": self.outage.refused_calls}
                if self.outage
                else None
            ),
        }

    # --- replay -----------------------------------------------------------------------

    def start_replay(self, body: Any) -> ReplayJob:
        """Validate and start a rebuild in the background; BadReplayRequest or ReplayRefused otherwise."""
        if not self.bootstrap:
            raise ReplayRefused(503, "this projections service has no Kafka bootstrap: start it with --bootstrap")
        if not self.migrated.is_set():
            raise ReplayRefused(503, "projections service is starting (migrations); retry shortly")
        request = parse_request(body, self.database)
        with self._replay_lock:
            running = self.replay_job
            if running is not None and running.active:
                raise ReplayRefused(
                    409,
                    f"a replay into {running.request.into!r} is running: wait for it (GET /replay/status) "
                    "or cancel it (DELETE /replay)",
                    running,
                )
            try:
                target_check(self.store_url, request)
            except TargetNotEmpty as exc:
                raise ReplayRefused(409, str(exc)) from None
            job = ReplayJob(
                request,
                store_url=self.store_url,
                bootstrap=self.bootstrap,
                topics=self.topics,
                batch_max=max(self.batch_max, 20000),
            )
            job.start()
            self.replay_job = job
        return job

    # --- policy dry-run ---------------------------------------------------------------

    def read_rows(self, sql: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Rows of one parameterised read query, on a read-only handle (never the sink's client)."""
        if self.reader is not None:  # the engine binds escaped text, as the ClickHouse HTTP interface does:
            text = {k: format_bind_value(v) for k, v in params.items()}  # the client's own formatting
            found = self.reader.execute(sql, "JSONEachRow", self.database, text)
            return [orjson.loads(line) for line in found.body.splitlines() if line]
        if not self.migrated.is_set():
            raise BadDryRun(503, "projections service is starting (migrations); retry shortly")
        with self._server_lock:
            if self._server_reader is None:
                self._server_reader = open_store(self.store_url, self.database, readonly=True)
            result = self._server_reader.query(sql, parameters=params)
            return list(result.named_results())

    def dry_run(self, req: DryRunRequest) -> dict[str, Any]:
        """Diff `req.bundle` against the active bundle over the inputs of the last `req.last` decisions.

        The active bundle is the newest `policy_published` row (the shipped default when none
        is); attributes are each entity's newest `policy_attributes_set` row, with `req.models`
        seeded for models they do not name (the gateway seeds its registry's models the same
        way). Inputs that do not parse are counted in `skipped`, never fatal.
        """
        started = time.perf_counter()
        try:
            candidate = PolicyBundle.parse(req.bundle, req.version)
        except BundleInvalid as exc:
            raise BadDryRun(422, f"the candidate bundle is invalid ({len(exc.errors)} errors)", exc.errors) from None
        rows = self.read_rows(_ACTIVE_BUNDLE_SQL, {})
        if rows:
            try:
                active = PolicyBundle.from_published(rows[0]["version"], rows[0]["bundle"], rows[0]["content_sha256"])
            except BundleInvalid as exc:
                raise BadDryRun(
                    409, f"the active bundle recorded in policy_published does not validate: {exc}"
                ) from None
        else:
            active = default_bundle()
        changes: list[AttributeChange] = []
        for row in self.read_rows(_ATTRIBUTES_SQL, {}):
            try:
                changes.append(
                    AttributeChange.from_json(
                        row["entity_type"], row["entity_id"], row["attributes_json"], bool(row["deleted"])
                    )
                )
            except AttributesInvalid as exc:
                log.warning("dry-run: attributes skipped: %s", exc)
        store, _rejected = fold_attributes(EntityStore(), changes)
        seeds = [
            AttributeChange("Model", name, {"region": region, "provider": "registry"})
            for name, region in (req.models or {}).items()
            if store.get("Model", name) is None
        ]
        store, _ = fold_attributes(store, seeds)
        read_at = time.perf_counter()
        inputs: list[DecisionInput] = []
        skipped = 0
        for row in self.read_rows(_DRY_RUN_INPUTS_SQL, {"last": req.last, "tenant": req.tenant}):
            try:
                inputs.append(DecisionInput.from_json(row["policy_input"]))
            except (ValueError, TypeError, KeyError):
                skipped += 1
        parsed_at = time.perf_counter()
        report = diff(active, candidate, inputs, store, examples=req.examples)
        done = time.perf_counter()
        return {
            **report.to_dict(with_examples=req.examples > 0),
            "active_sha256": active.content_sha256,
            "candidate_sha256": candidate.content_sha256,
            "requested": req.last,
            "skipped": skipped,
            "attributes_version": store.version,
            "timings_ms": {
                "bundles_and_attributes": round((read_at - started) * 1000, 1),
                "read_inputs": round((parsed_at - read_at) * 1000, 1),
                "evaluate": round((done - parsed_at) * 1000, 1),
                "total": round((done - started) * 1000, 1),
            },
        }

    # --- HTTP -------------------------------------------------------------------------

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_QUERY_BYTES, middlewares=[self.metrics.middleware(), self._guard])
        app.router.add_get("/ping", self._ping)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status)
        app.router.add_get("/metrics", self.metrics.handler)  # operator token, like /status
        app.router.add_post("/replay", self._replay_start)
        app.router.add_get("/replay/status", self._replay_status)
        app.router.add_delete("/replay", self._replay_cancel)
        app.router.add_post("/v1/policy/dry-run", self._dry_run)
        app.router.add_get("/v1/usage", self._usage)
        if self.outage is not None:
            app.router.add_post("/faults/store-outage", self._store_outage)
        dp_read.register(app, lambda: self.dp)
        billing.register(app, self.read_rows)  # issue 7: /v1/billing/export, tenant-scoped
        slo_read.register(app, self.read_rows)  # issue 11: /v1/slo, burn per window, tenant-scoped
        self.portal.register(app)  # issue 12: /portal/*, every page scoped by scoped_tenant
        app.router.add_get("/", self._sql)
        app.router.add_post("/", self._sql)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Authenticate every route but the health checks; operator-only routes refuse tenant keys."""
        if request.path in _PUBLIC_PATHS:
            return await handler(request)
        if Portal.owns(request.path):  # a session cookie or a header credential; pages scope by tenant
            return await self.portal.guard(request, handler)
        try:
            reader = self.access.authorize(request.headers)
            if not reader.operator and request.path not in _TENANT_PATHS:
                raise AccessDenied(
                    403,
                    f"{request.path} is for the operator's read token; tenant keys may use "
                    + ", ".join(sorted(_TENANT_PATHS)),
                )
        except AccessDenied as exc:
            return self._denied(request, exc)
        request[READER] = reader
        return await handler(request)

    def _denied(self, request: web.Request, exc: AccessDenied) -> web.Response:
        headers = {"WWW-Authenticate": 'Bearer realm="ledgerflow-read"'} if exc.status == 401 else {}
        if request.path == "/":  # speak ClickHouse's error dialect to SQL clients
            code, name = (516, "AUTHENTICATION_FAILED") if exc.status == 401 else (497, "ACCESS_DENIED")
            resp = self._error(QueryError(code, name, exc.message), request.query.get("query_id") or "")
            resp.set_status(exc.status)
            resp.headers.update(headers)
            return resp
        return web.Response(
            status=exc.status,
            body=orjson.dumps({"error": exc.message}),
            content_type="application/json",
            headers=headers,
        )

    async def _ping(self, _request: web.Request) -> web.Response:
        return web.Response(text="Ok.\n")

    async def _readyz(self, _request: web.Request) -> web.Response:
        ok, why = self.ready()
        return web.Response(status=200 if ok else 503, text=why + "\n")

    async def _status(self, _request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.status()), content_type="application/json")

    @staticmethod
    def _json(status: int, body: dict[str, Any]) -> web.Response:
        return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")

    async def _replay_start(self, request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError as exc:
            return self._json(400, {"error": f'the body is not JSON ({exc}): send {{"into": "db"}}'})
        try:
            job = self.start_replay(body)
        except BadReplayRequest as exc:
            return self._json(400, {"error": str(exc)})
        except ReplayRefused as exc:
            return self._json(exc.status, {"error": exc.message, "status": exc.job.status() if exc.job else None})
        return self._json(202, job.status())

    async def _dry_run(self, request: web.Request) -> web.Response:
        try:
            req = DryRunRequest.parse(await request.read(), request.content_type, request.query)
            try:
                req = replace(req, tenant=scoped_tenant(request[READER], req.tenant) or "")
            except AccessDenied as exc:
                raise BadDryRun(exc.status, exc.message) from None
            if self.reader is None and self.store_url.startswith("chdb:"):
                raise BadDryRun(503, "projections service is starting (migrations); retry shortly")
            report = await asyncio.get_running_loop().run_in_executor(None, self.dry_run, req)
        except BadDryRun as exc:
            body: dict[str, Any] = {"error": exc.message}
            if exc.errors:
                body["errors"] = list(exc.errors)
            return self._json(exc.status, body)
        except QueryError as err:
            return self._json(500, {"error": f"reading the projections failed: {err.message}"})
        return self._json(200, report)

    async def _usage(self, request: web.Request) -> web.Response:
        """Per-day, per-model usage and spend from the raw charges; a tenant key sees its own only."""
        try:
            tenant = scoped_tenant(request[READER], request.query.get("tenant"))
            since, until = usage_window(request.query.get("since"), request.query.get("until"))
            if self.reader is None and self.store_url.startswith("chdb:"):
                raise AccessDenied(503, "projections service is starting (migrations); retry shortly")
        except AccessDenied as exc:
            return self._json(exc.status, {"error": exc.message})
        except ValueError as exc:
            return self._json(400, {"error": str(exc)})
        params = {
            "since": since.strftime("%Y-%m-%d %H:%M:%S"),
            "until": until.strftime("%Y-%m-%d %H:%M:%S"),
            "tenant": tenant or "",
            "all": int(tenant is None),
        }
        try:
            rows = await asyncio.get_running_loop().run_in_executor(None, self.read_rows, _USAGE_SQL, params)
        except QueryError as err:
            return self._json(500, {"error": f"reading the projections failed: {err.message}"})
        return self._json(
            200,
            {
                "tenant": tenant,
                "since": since.date().isoformat(),
                "until": (until - timedelta(days=1)).date().isoformat(),
                "days": rows,
            },
        )

    async def _store_outage(self, request: web.Request) -> web.Response:
        """Chaos tests: cut the sink off from the store for `?seconds=N` (operator only)."""
        assert self.outage is not None
        try:
            left = self.outage.cut(float(request.query.get("seconds", "")))
        except ValueError as exc:
            return self._json(400, {"error": f"?seconds= must be a number of seconds: {exc}"})
        log.warning("injected store outage: the sink cannot reach ClickHouse for %.1fs", left)
        return self._json(202, {"outage_s": round(left, 3)})

    async def _replay_status(self, _request: web.Request) -> web.Response:
        job = self.replay_job
        return self._json(200, job.status() if job else idle_status())

    async def _replay_cancel(self, _request: web.Request) -> web.Response:
        job = self.replay_job
        if job is None or not job.active:
            return self._json(409, {"error": "no replay is running", "status": job.status() if job else idle_status()})
        job.cancel()
        return self._json(202, job.status())

    def _error(self, err: QueryError, query_id: str) -> web.Response:
        version = self.reader.version if self.reader else "unknown"
        return web.Response(
            status=err.status,
            text=err.body(version),
            headers={
                "X-ClickHouse-Exception-Code": str(err.code),
                "X-ClickHouse-Query-Id": query_id,
                "X-ClickHouse-Server-Display-Name": SERVER_NAME,
            },
        )

    async def _sql(self, request: web.Request) -> web.Response:
        params = request.query
        query_id = params.get("query_id") or str(uuid.uuid4())
        parts = [params["query"]] if "query" in params else []
        if request.method == "POST":
            body = await request.read()
            if body:
                try:
                    parts.append(body.decode("utf-8"))
                except UnicodeDecodeError:
                    return self._error(QueryError(62, "SYNTAX_ERROR", "query is not valid UTF-8"), query_id)
        if not parts:
            if request.method == "GET":
                return web.Response(text="Ok.\n")  # what ClickHouse answers to a bare GET /
            return self._error(QueryError(62, "SYNTAX_ERROR", "Empty query"), query_id)
        if self.reader is None and self.store_url.startswith("chdb:"):
            return web.Response(status=503, text="projections service is starting (migrations); retry shortly\n")
        if self.reader is None:
            return self._error(
                QueryError(48, "NOT_IMPLEMENTED", f"no embedded store here: query {redact(self.store_url)} directly"),
                query_id,
            )
        if params.get("readonly", "1") != "1":
            err = QueryError(164, "READONLY", "Cannot modify 'readonly' setting in readonly mode")
            return self._error(err, query_id)
        default_format = params.get("default_format") or request.headers.get("X-ClickHouse-Format") or "TabSeparated"
        database = params.get("database") or request.headers.get("X-ClickHouse-Database") or self.database
        query_params = {k[len("param_") :]: v for k, v in params.items() if k.startswith("param_")}
        ignored = sorted(k for k in params if k not in _PROTOCOL_PARAMS and not k.startswith("param_"))
        if ignored:
            log.debug("ignoring settings sent as URL parameters: %s", ignored)
        try:
            rq = prepare_read_query("\n".join(parts), default_format)
        except UnsafeQuery as exc:
            return self._error(QueryError(exc.code, exc.name, str(exc)), query_id)
        reader = self.reader
        try:
            result = await asyncio.get_running_loop().run_in_executor(
                None, reader.execute, rq.sql, rq.format, database, query_params
            )
        except QueryError as err:
            return self._error(err, query_id)
        summary = {
            "read_rows": str(result.rows_read),
            "read_bytes": str(result.bytes_read),
            "written_rows": "0",
            "written_bytes": "0",
            "total_rows_to_read": str(result.rows_read),
            "result_rows": "0",
            "result_bytes": str(len(result.body)),
            "elapsed_ns": str(result.elapsed_ns),
        }
        return web.Response(
            body=result.body,
            headers={
                "Content-Type": content_type(rq.format),
                "X-ClickHouse-Format": rq.format,
                "X-ClickHouse-Timezone": reader.timezone,
                "X-ClickHouse-Query-Id": query_id,
                "X-ClickHouse-Server-Display-Name": SERVER_NAME,
                "X-ClickHouse-Summary": orjson.dumps(summary).decode(),
            },
        )


async def serve(service: ProjectionService, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve HTTP, bring the service up behind it, and run until `stop` is set."""
    runner = web.AppRunner(service.make_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = getattr(site, "_server", None)
    bound = server.sockets[0].getsockname()[1] if server and server.sockets else port
    print(f"projections: listening on http://{host}:{bound}", flush=True)
    try:
        await asyncio.get_running_loop().run_in_executor(None, service.start)
        log.info("projections ready: database %s, migrations %s", service.database, service.migrations)
        await stop.wait()
    finally:
        await runner.cleanup()
