"""Traces across Kafka and structured JSON logs: the plumbing every process imports.

Responsible for:
- the tracer of this process (`configure`): exporter none | console | otlp (OTLP over HTTP
  to a collector) | file (JSON lines, for local runs and the cross-process tests), a service
  name per process and a parent-based ratio sampler. With exporter "none" there is no tracer
  at all and every helper here returns at once (a shared null context), so a process that
  does not trace pays one `is None` check per call site;
- W3C trace context into and out of Kafka record headers (`inject`, `extract`): the header
  is `traceparent`, the same one HTTP uses (parsed here, not by the SDK's propagator: half
  the cost, and `tracestate` is not carried). A malformed header is ignored (the span is a
  new root), never an error: a consumer must not stop on a bad header;
- the spans of each hop: a server span per gateway request (`server_span`), a consumer
  span per event (`consume_span`) whose parent is the record's header, and a batch span
  (`batch_span`) for loops that handle many records in one transaction or insert, linked to
  (at most `LINK_CAP`) distinct trace contexts of its records;
- JSON log lines (`setup_logging`, `JsonFormatter`): timestamp (UTC ISO), level, logger,
  message, component, trace_id and span_id of the current span, and tenant / request_id /
  route when the code passes them (`extra=` or `annotate`/`log_context`). Only those
  fields are taken from `extra=`, so a stray keyword cannot put a payload in a log line.

Why the envelope and the header differ: an event's envelope `trace_parent` is part of the
fact (written once by the gateway and copied by `Envelope.caused_by`, so a replay derives
byte-identical events); the record header carries the context of the span that produced
the record, which for a per-event agent is its consumer span (a child of the gateway's).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType
from typing import IO, Any, Literal

import orjson
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, SpanKind, Status, StatusCode, TraceFlags

Exporter = Literal["none", "console", "otlp", "file"]
LogFormat = Literal["json", "text"]
Headers = Sequence[tuple[str | bytes, str | bytes | None]] | Mapping[str, str | bytes | None]

TRACEPARENT = "traceparent"
LINK_CAP = 64  # most links on one batch span: enough to follow requests, bounded span size
SCAN_CAP = 256  # most records of a batch looked at for links (spread evenly over the batch)
_TRACEPARENT_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_NULL: contextlib.nullcontext[None] = contextlib.nullcontext()
_AVRO_HEADER = 10  # single-object encoding: C3 01 + 8-byte schema fingerprint


@dataclass(frozen=True)
class TelemetryConfig:
    """What `configure` needs; built from ledgerflow settings (or flags) by each entry point."""

    service: str
    exporter: Exporter = "none"
    endpoint: str = ""  # OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces ("" = the SDK's env/default)
    file: str = ""  # JSON-lines path for exporter "file"; {service} and {pid} are filled in
    sample_ratio: float = 1.0
    schedule_delay_ms: int = 1000  # how often batched spans are exported

    @classmethod
    def of(cls, settings: Any, component: str) -> TelemetryConfig:
        """From ledgerflow settings (duck-typed: streams imports nothing of ours)."""
        return cls(
            service=f"ledgerflow-{component}",
            exporter=settings.otel_exporter,
            endpoint=settings.otel_endpoint,
            file=settings.otel_file_path,
            sample_ratio=settings.otel_sample_ratio,
        )


_tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None


def start(
    component: str, settings: Any, *, level: str | None = None, scrub: Callable[[str], str] | None = None
) -> TracerProvider | None:
    """An entry point's one call: JSON (or text) logs and the tracer, both from ledgerflow settings."""
    setup_logging(component, level or settings.log_level, settings.log_format, scrub=scrub)
    return configure(TelemetryConfig.of(settings, component))


def configure(config: TelemetryConfig) -> TracerProvider | None:
    """Set this process's tracer from `config`; None (tracing off) for exporter "none".

    The provider is kept here, not installed as OpenTelemetry's global one, so tests can
    configure again (the global can be set only once per process).
    """
    if config.exporter == "none":
        use(None)
        return None
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(config.sample_ratio)),
        resource=Resource.create({"service.name": config.service}),
    )
    provider.add_span_processor(BatchSpanProcessor(_exporter(config), schedule_delay_millis=config.schedule_delay_ms))
    use(provider)
    return provider


def _exporter(config: TelemetryConfig) -> SpanExporter:
    if config.exporter == "console":
        return ConsoleSpanExporter(service_name=config.service)
    if config.exporter == "file":
        if not config.file:
            raise ValueError("exporter 'file' needs a file path (otel_file)")
        return JsonLinesSpanExporter(Path(config.file.format(service=config.service, pid=os.getpid())))
    if config.exporter == "otlp":
        # imported only when used: it brings protobuf and requests
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=config.endpoint or None)
    raise ValueError(f"unknown exporter {config.exporter!r}: use none, console, otlp or file")


def use(provider: TracerProvider | None) -> None:
    """Trace with `provider` (tests pass one with an in-memory exporter); None turns tracing off."""
    global _tracer, _provider
    old = _provider
    _provider = provider
    _tracer = provider.get_tracer("ledgerflow") if provider is not None else None
    if old is not None and old is not provider:
        old.shutdown()


def shutdown() -> None:
    """Export what is buffered and stop (also done at exit by the SDK)."""
    use(None)


def enabled() -> bool:
    return _tracer is not None


# --- W3C trace context -----------------------------------------------------------------


def format_traceparent(ctx: SpanContext) -> str:
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def parse_traceparent(value: str | bytes | None) -> SpanContext | None:
    """The remote span context of a W3C traceparent (version 00), or None if absent or malformed."""
    if value is None:
        return None
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    m = _TRACEPARENT_RE.fullmatch(value.strip())
    if m is None:
        return None
    trace_id, span_id = int(m[1], 16), int(m[2], 16)
    if not trace_id or not span_id:  # all-zero ids are invalid by the spec
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(m[3], 16)))


def traceparent() -> str | None:
    """The traceparent of the current span, or None when there is none (tracing off, no request)."""
    ctx = trace.get_current_span().get_span_context()
    return format_traceparent(ctx) if ctx.is_valid else None


def trace_parent_for(incoming: str | None) -> str | None:
    """What a fact's envelope records: the current span's context, else a well-formed incoming one.

    With tracing off the gateway opens no span; a client's valid traceparent is then passed on
    (as before), a malformed one is dropped.
    """
    current = traceparent()
    if current is not None:
        return current
    parsed = parse_traceparent(incoming)
    return format_traceparent(parsed) if parsed is not None else None


def _header_value(headers: Headers | None, name: str) -> str | bytes | None:
    if not headers:
        return None
    if isinstance(headers, Mapping):
        return headers.get(name)
    for key, value in headers:
        if key == name or (isinstance(key, bytes) and key == name.encode()):
            return value
    return None


def extract(headers: Headers | None) -> otel_context.Context | None:
    """The context carried by a Kafka record's headers, or None (absent or malformed: a new root)."""
    parsed = parse_traceparent(_header_value(headers, TRACEPARENT))
    return set_parent(parsed) if parsed is not None else None


def inject(headers: list[tuple[str, str | bytes | None]] | None = None) -> list[tuple[str, str | bytes | None]]:
    """`headers` (a new list if None) plus the current span's traceparent, when this process traces."""
    out = [] if headers is None else headers
    if _tracer is None:
        return out
    current = traceparent()
    if current is not None:
        out.append((TRACEPARENT, current.encode()))
    return out


def trace_headers(trace_parent: str | None) -> list[tuple[str, str | bytes | None]]:
    """Record headers carrying a known traceparent (a derived event's envelope), or none.

    For batched workers, whose span links many requests: their records carry on the trace of
    the request that caused them. Only when this process traces (no per-record cost otherwise).
    """
    return [(TRACEPARENT, trace_parent.encode())] if trace_parent and _tracer is not None else []


# --- spans -----------------------------------------------------------------------------


def server_span(
    name: str, carrier: Mapping[str, str], attributes: Mapping[str, Any] | None = None
) -> contextlib.AbstractContextManager[Any]:
    """A SERVER span for one HTTP request; a valid `traceparent` in `carrier` becomes its parent."""
    if _tracer is None:
        return _NULL
    parent = parse_traceparent(carrier.get(TRACEPARENT))
    context = set_parent(parent) if parent is not None else otel_context.Context()
    return _tracer.start_as_current_span(name, context=context, kind=SpanKind.SERVER, attributes=attributes)


def consume_span(
    name: str, topic: str, partition: int, offset: int, headers: Headers | None
) -> contextlib.AbstractContextManager[Any]:
    """A CONSUMER span for one record, child of the context in its headers (a new root if none)."""
    if _tracer is None:
        return _NULL
    return _tracer.start_as_current_span(
        name,
        context=extract(headers) or otel_context.Context(),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "kafka",
            "messaging.operation.type": "process",
            "messaging.destination.name": topic,
            "messaging.destination.partition.id": str(partition),
            "messaging.kafka.offset": offset,
        },
    )


def batch_span(
    name: str,
    *,
    table: str | None = None,
    topic: str | None = None,
    headers: Iterable[Headers | None] = (),
    values: Iterable[Sequence[bytes]] = (),
    rows: Iterable[Sequence[Sequence[Any]]] = (),
    columns: Sequence[str] = (),
) -> contextlib.AbstractContextManager[Any]:
    """A span for one batch (a transaction, an insert), linked to its records' trace contexts.

    The contexts come from Kafka `headers` (one entry per record), from groups of Avro-encoded
    `values` (the envelope's trace_parent, read without decoding) or from groups of decoded
    `rows` (their `trace_parent` column, named in `columns`). Pass generators: nothing is read
    when tracing is off. At most `SCAN_CAP` records of a group are looked at, spread over it,
    and at most `LINK_CAP` distinct contexts linked. When the batch carries exactly one
    context it is also the parent, so a one-request trace shows the batch in line.
    """
    if _tracer is None:
        return _NULL
    found, count = _batch_contexts(headers, values, rows, columns)
    attributes: dict[str, Any] = {"messaging.batch.message_count": count, "ledgerflow.batch.linked": len(found)}
    if table is not None:
        attributes["db.collection.name"] = table
    if topic is not None:
        attributes["messaging.destination.name"] = topic
    parent = set_parent(found[0]) if len(found) == 1 else otel_context.Context()
    return _tracer.start_as_current_span(
        name, context=parent, kind=SpanKind.CONSUMER, links=[Link(c) for c in found], attributes=attributes
    )


def set_parent(ctx: SpanContext) -> otel_context.Context:
    """A context whose parent is the (remote) span `ctx`."""
    return trace.set_span_in_context(NonRecordingSpan(ctx), otel_context.Context())


def _spread(n: int) -> range:
    return range(0, n, max(1, -(-n // SCAN_CAP)))


def _batch_contexts(
    headers: Iterable[Headers | None],
    values: Iterable[Sequence[bytes]],
    rows: Iterable[Sequence[Sequence[Any]]],
    columns: Sequence[str],
) -> tuple[list[SpanContext], int]:
    """Distinct trace contexts (at most LINK_CAP) of a batch's records, and how many records it has."""
    raw: list[str | bytes | None] = []
    count = 0
    for h in headers:
        if count < SCAN_CAP:
            raw.append(_header_value(h, TRACEPARENT))
        count += 1
    for group in values:
        raw.extend(envelope_trace_parent(group[i]) for i in _spread(len(group)))
        count += len(group)
    at = list(columns).index("trace_parent") if "trace_parent" in columns else None
    for rgroup in rows:
        if at is not None:
            raw.extend(rgroup[i][at] for i in _spread(len(rgroup)))
        count += len(rgroup)
    seen: dict[tuple[int, int], SpanContext] = {}
    for value in raw:
        ctx = parse_traceparent(value)
        if ctx is not None and (ctx.trace_id, ctx.span_id) not in seen:
            seen[(ctx.trace_id, ctx.span_id)] = ctx
            if len(seen) >= LINK_CAP:
                break
    return list(seen.values()), count


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = data[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def envelope_trace_parent(value: bytes | None) -> str | None:
    """The envelope's trace_parent of an Avro single-object-encoded event, read without decoding it.

    The envelope is every event's first field: event_id, event_type (strings), schema_version
    (int), tenant (string), occurred_at (long), then trace_parent (union null|string). Anything
    unexpected gives None (the caller only links what parses as a traceparent).
    """
    if not value or len(value) < _AVRO_HEADER or value[0] != 0xC3:
        return None
    try:
        pos = _AVRO_HEADER
        for kind in "ssisl":
            n, pos = _varint(value, pos)
            if kind == "s":
                pos += n
        branch, pos = _varint(value, pos)
        if branch != 1:
            return None
        n, pos = _varint(value, pos)
        if not 0 <= n <= 64:
            return None
        return value[pos : pos + n].decode("ascii")
    except (IndexError, ValueError):
        return None


def annotate(**fields: str | None) -> None:
    """Attach tenant / request_id / route to the current span (as ledgerflow.<name>) and to later log lines."""
    bind(**fields)
    if _tracer is not None:
        span = trace.get_current_span()
        if span.is_recording():
            for key, value in fields.items():
                if value is not None:
                    span.set_attribute(f"ledgerflow.{key}", value)


def mark_error(status_code: int) -> None:
    """Set the current server span's HTTP status (5xx marks the span failed)."""
    if _tracer is None:
        return
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attribute("http.response.status_code", status_code)
        if status_code >= 500:
            span.set_status(Status(StatusCode.ERROR))


# --- the JSON-lines span file ----------------------------------------------------------


def _iso(ns: int | None) -> str | None:
    if ns is None:
        return None
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """One exported span as a flat JSON object (ids in W3C hex)."""
    ctx = span.get_span_context()
    assert ctx is not None
    parent = span.parent
    return {
        "name": span.name,
        "service": span.resource.attributes.get("service.name"),
        "kind": span.kind.name,
        "trace_id": f"{ctx.trace_id:032x}",
        "span_id": f"{ctx.span_id:016x}",
        "parent_span_id": f"{parent.span_id:016x}" if parent is not None else None,
        "parent_trace_id": f"{parent.trace_id:032x}" if parent is not None else None,
        "start": _iso(span.start_time),
        "end": _iso(span.end_time),
        "duration_ms": ((span.end_time or 0) - (span.start_time or 0)) / 1e6,
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "links": [
            {"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"}
            for link in span.links
        ],
    }


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per span to a file: local runs, e2e tests, `jq`.

    Each export is one write to a file opened for appending, so a reader never sees half a
    batch; give each process its own file ({service}-{pid}) all the same.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = b"".join(orjson.dumps(span_record(s), default=str) + b"\n" for s in spans)
        try:
            with self._lock, self.path.open("ab") as f:
                f.write(data)
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def read_spans(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every span in the given JSON-lines files (a line cut short by a crash is skipped)."""
    out: list[dict[str, Any]] = []
    for path in paths:
        if not path.is_file():
            continue
        for line in path.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                out.append(orjson.loads(line))
    return out


# --- logs --------------------------------------------------------------------------------

LOG_FIELDS = ("tenant", "request_id", "route")
_NO_FIELDS: Mapping[str, str] = MappingProxyType({})
_LOG_CONTEXT: ContextVar[Mapping[str, str]] = ContextVar("ledgerflow_log_context", default=_NO_FIELDS)


def bind(**fields: str | None) -> None:
    """Add fields to the log context of the current task (until its `log_context` ends)."""
    given = {k: v for k, v in fields.items() if v is not None and k in LOG_FIELDS}
    if given:
        _LOG_CONTEXT.set({**_LOG_CONTEXT.get(), **given})


@contextlib.contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    """A fresh log context for one unit of work (a request): nothing leaks to the next one."""
    token = _LOG_CONTEXT.set({k: v for k, v in fields.items() if v is not None and k in LOG_FIELDS})
    try:
        yield
    finally:
        _LOG_CONTEXT.reset(token)


class JsonFormatter(logging.Formatter):
    """One JSON object per log line; `scrub` (e.g. the redactor) masks the message and traceback."""

    def __init__(self, component: str = "", scrub: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self.component = component
        self.scrub = scrub

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        out: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")[:-6] + "Z",
            "level": record.levelname,
            "logger": record.name,
            "message": message,
            "component": self.component,
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            out["trace_id"] = f"{ctx.trace_id:032x}"
            out["span_id"] = f"{ctx.span_id:016x}"
        bound = _LOG_CONTEXT.get()
        for key in LOG_FIELDS:
            value = record.__dict__.get(key) or bound.get(key)
            if value is not None:
                out[key] = str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        if self.scrub is not None:
            for key in ("message", "exception", "stack"):
                if key in out:
                    out[key] = self.scrub(out[key])
        return orjson.dumps(out).decode()


class TextFormatter(logging.Formatter):
    """The plain format, with the trace id when there is one (for people reading a terminal)."""

    def __init__(self, component: str = "", scrub: Callable[[str], str] | None = None) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.component = component
        self.scrub = scrub

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            line += f" trace_id={ctx.trace_id:032x}"
        return self.scrub(line) if self.scrub is not None else line


def formatter(component: str, fmt: LogFormat = "json", scrub: Callable[[str], str] | None = None) -> logging.Formatter:
    if fmt == "json":
        return JsonFormatter(component, scrub)
    if fmt == "text":
        return TextFormatter(component, scrub)
    raise ValueError(f"unknown log format {fmt!r}: use json or text")


def setup_logging(
    component: str,
    level: str | int = "INFO",
    fmt: LogFormat = "json",
    *,
    scrub: Callable[[str], str] | None = None,
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Route every log record of the process through one handler in `fmt` (replaces basicConfig)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(formatter(component, fmt, scrub))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


def faust_logging_config(component: str, fmt: LogFormat = "json") -> dict[str, Any]:
    """A `logging_config` for Faust/mode that keeps their level handling but formats lines as ours.

    mode replaces the root handlers when the worker starts; merged into its own config, this
    swaps its handler for ours and keeps the level from `--loglevel`.
    """
    return {
        "merge": True,
        "version": 1,
        "formatters": {"ledgerflow": {"()": formatter, "component": component, "fmt": fmt}},
        "handlers": {
            "default": {"class": "logging.StreamHandler", "formatter": "ledgerflow", "stream": "ext://sys.stderr"}
        },
    }
