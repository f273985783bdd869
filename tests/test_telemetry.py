"""Issue 11 in process: trace context through Kafka headers, spans of each hop, JSON logs.

Spans go to the SDK's in-memory exporter; the cross-process trace (real Kafka, the Faust
worker, the sink into chDB) is tests/test_trace_e2e_kafka.py.
"""

from __future__ import annotations

import dataclasses
import io
import logging
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.__main__ import scrub_log
from gateway.app import always_ready, create_app
from gateway.auth import KeyStore
from ledgerflow.settings import hash_key, load
from streams import telemetry
from streams.codec import Codec
from streams.events import Event, TokensCharged
from streams.publisher import PublishFailed
from tests import factories
from tests.test_e2e import PLANTED

KEY = "lf_test_secret_telemetry"
AUTH = {"Authorization": f"Bearer {KEY}"}
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_PARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"


@pytest.fixture(autouse=True)
def fresh_log_context() -> Iterator[None]:
    """Tests share one thread: a field bound by one must not reach the next one's log lines."""
    with telemetry.log_context():
        yield


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.use(provider)
    yield exporter
    telemetry.use(None)


@pytest.fixture
def logs() -> Iterator[io.StringIO]:
    """JSON log lines of everything logged during the test, formatted as the gateway's are."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(telemetry.formatter("gateway", "json", scrub_log))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield out
    root.removeHandler(handler)
    root.setLevel(level)


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def hexid(span: ReadableSpan) -> tuple[str, str]:
    ctx = span.get_span_context()
    assert ctx is not None
    return f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}"


# --- propagation -----------------------------------------------------------------------------


def test_headers_carry_the_current_span_and_a_consumer_span_becomes_its_child(spans: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("test", tracer_provider=telemetry._provider)
    with tracer.start_as_current_span("producer") as producer:
        headers = telemetry.inject([("lf.event_type", b"TokensCharged")])
        assert telemetry.traceparent() == telemetry.format_traceparent(producer.get_span_context())
    assert headers[0] == ("lf.event_type", b"TokensCharged")
    assert dict(headers)["traceparent"] == telemetry.format_traceparent(producer.get_span_context()).encode()
    extracted = telemetry.extract(headers)
    assert extracted is not None
    remote = trace.get_current_span(extracted).get_span_context()
    assert (remote.trace_id, remote.span_id) == (
        producer.get_span_context().trace_id,
        producer.get_span_context().span_id,
    )
    with telemetry.consume_span("agent", "t", 2, 41, headers):
        pass
    consumer = next(s for s in spans.get_finished_spans() if s.name == "agent")
    assert consumer.parent is not None and consumer.parent.span_id == producer.get_span_context().span_id
    assert hexid(consumer)[0] == f"{producer.get_span_context().trace_id:032x}"
    assert consumer.kind == trace.SpanKind.CONSUMER and consumer.attributes is not None
    assert consumer.attributes["messaging.kafka.offset"] == 41


def test_dict_and_bytes_keyed_headers_are_read_too() -> None:
    for headers in ({"traceparent": CLIENT_PARENT}, [(b"traceparent", CLIENT_PARENT.encode())]):
        ctx = telemetry.extract(headers)  # type: ignore[arg-type]
        assert ctx is not None
        assert f"{trace.get_current_span(ctx).get_span_context().trace_id:032x}" == CLIENT_TRACE


@pytest.mark.parametrize(
    "bad",
    [
        b"garbage",
        b"\xff\xfe\x00",
        b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
        b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case is invalid
        b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # version ff is forbidden
        b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
        b"",
        None,
    ],
)
def test_a_malformed_traceparent_is_ignored_and_the_span_is_a_new_root(
    spans: InMemorySpanExporter, bad: bytes | None
) -> None:
    headers = [("traceparent", bad)]
    assert telemetry.extract(headers) is None
    assert telemetry.parse_traceparent(bad) is None
    with telemetry.consume_span("agent", "t", 0, 0, headers):
        assert telemetry.traceparent() is not None  # a fresh, valid context of its own
    [span] = spans.get_finished_spans()
    assert span.parent is None


def test_with_tracing_off_nothing_is_traced_and_a_valid_client_context_is_passed_on() -> None:
    telemetry.use(None)
    assert not telemetry.enabled()
    with telemetry.consume_span("agent", "t", 0, 0, [("traceparent", CLIENT_PARENT.encode())]):
        assert telemetry.traceparent() is None
    assert telemetry.inject() == []
    assert telemetry.trace_headers(CLIENT_PARENT) == []
    assert telemetry.trace_parent_for(CLIENT_PARENT) == CLIENT_PARENT
    assert telemetry.trace_parent_for("not-a-traceparent") is None
    assert telemetry.trace_parent_for(None) is None


# --- batch spans -----------------------------------------------------------------------------


def charge_with(trace_parent: str | None) -> TokensCharged:
    base = factories.charge()
    return dataclasses.replace(base, envelope=dataclasses.replace(base.envelope, trace_parent=trace_parent))


def parent_of(i: int) -> str:
    return f"00-{i + 1:032x}-{i + 1:016x}-01"


def test_the_envelope_trace_parent_is_read_from_encoded_events_without_decoding() -> None:
    codec = Codec()
    assert telemetry.envelope_trace_parent(codec.encode(charge_with(CLIENT_PARENT))) == CLIENT_PARENT
    assert telemetry.envelope_trace_parent(codec.encode(charge_with(None))) is None
    for junk in (b"", b"poison!", b"\xc3\x01" + b"\x00" * 8 + b"\xff" * 20, None):
        assert telemetry.envelope_trace_parent(junk) is None


def test_a_batch_span_links_distinct_contexts_up_to_the_cap(spans: InMemorySpanExporter) -> None:
    codec = Codec()
    values = [codec.encode(charge_with(parent_of(i % 100))) for i in range(200)]
    with telemetry.batch_span("sink.insert", table="tokens_charged", values=[values, [b"poison!"]]):
        pass
    [span] = spans.get_finished_spans()
    assert len(span.links) == telemetry.LINK_CAP
    linked = {f"00-{link.context.trace_id:032x}-{link.context.span_id:016x}-01" for link in span.links}
    assert linked <= {parent_of(i) for i in range(100)}
    assert span.parent is None  # many requests: links only
    assert span.attributes is not None and span.attributes["messaging.batch.message_count"] == 201
    assert span.attributes["db.collection.name"] == "tokens_charged"


def test_a_batch_of_one_request_is_its_child_and_rows_and_headers_are_read(spans: InMemorySpanExporter) -> None:
    columns = ("event_id", "trace_parent", "tenant")
    rows: list[list[Any]] = [["e1", CLIENT_PARENT, "acme"], ["e2", CLIENT_PARENT, "acme"], ["e3", None, "acme"]]
    with telemetry.batch_span("sink.insert", rows=[rows], columns=columns):
        pass
    with telemetry.batch_span("audit-ledger", headers=[[("traceparent", CLIENT_PARENT.encode())], None, []]):
        pass
    for span in spans.get_finished_spans():
        assert [f"{link.context.trace_id:032x}" for link in span.links] == [CLIENT_TRACE]
        assert span.parent is not None and f"{span.parent.trace_id:032x}" == CLIENT_TRACE


def test_the_json_lines_exporter_writes_one_object_per_span(tmp_path) -> None:  # type: ignore[no-untyped-def]
    provider = telemetry.configure(
        telemetry.TelemetryConfig("ledgerflow-test", "file", file=str(tmp_path / "{service}-{pid}.jsonl"))
    )
    assert provider is not None
    with (
        telemetry.log_context(),
        telemetry.server_span("POST /v1/ask", {"traceparent": CLIENT_PARENT}, {"http.route": "/v1/ask"}),
    ):
        telemetry.annotate(tenant="acme", request_id="r-1")
    telemetry.shutdown()  # flushes the batch processor
    [record] = telemetry.read_spans(tmp_path.glob("ledgerflow-test-*.jsonl"))
    assert record["name"] == "POST /v1/ask" and record["kind"] == "SERVER"
    assert record["trace_id"] == CLIENT_TRACE and record["parent_span_id"] == "00f067aa0ba902b7"
    assert record["service"] == "ledgerflow-test"
    assert record["attributes"]["ledgerflow.tenant"] == "acme"


def test_settings_select_the_exporter_and_a_file_without_a_path_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = load(data_dir=tmp_path, otel_exporter="file", otel_sample_ratio=0.25)
    config = telemetry.TelemetryConfig.of(settings, "gateway")
    assert config.service == "ledgerflow-gateway" and config.sample_ratio == 0.25
    assert config.file == str(tmp_path.resolve() / "traces" / "{service}-{pid}.jsonl")
    assert telemetry.configure(telemetry.TelemetryConfig("x", "none")) is None and not telemetry.enabled()
    with pytest.raises(ValueError, match="file path"):
        telemetry.configure(telemetry.TelemetryConfig("x", "file"))


# --- logs ------------------------------------------------------------------------------------


def test_json_log_lines_parse_and_carry_trace_ids_and_request_fields(
    spans: InMemorySpanExporter, logs: io.StringIO
) -> None:
    log = logging.getLogger("ledgerflow.test")
    telemetry.bind(tenant="bound-before")  # cleared by the request's fresh context, back after it
    with telemetry.log_context(route="/v1/ask"):
        with telemetry.server_span("POST /v1/ask", {}) as span:
            telemetry.annotate(tenant="acme", request_id="r-7")
            log.warning("answered %s", "r-7")
        log.info("after the span", extra={"tenant": "globex", "prompt": "never logged"})
    log.error("outside any request")
    first, second, third = lines(logs)
    ctx = span.get_span_context()
    assert first["trace_id"] == f"{ctx.trace_id:032x}" and first["span_id"] == f"{ctx.span_id:016x}"
    assert (first["tenant"], first["request_id"], first["route"]) == ("acme", "r-7", "/v1/ask")
    assert (first["level"], first["logger"], first["message"], first["component"]) == (
        "WARNING", "ledgerflow.test", "answered r-7", "gateway",
    )  # fmt: skip
    stamp = datetime.fromisoformat(str(first["timestamp"]).replace("Z", "+00:00"))
    assert stamp.tzinfo is not None and stamp.utcoffset() == UTC.utcoffset(None)
    assert "trace_id" not in second and second["tenant"] == "globex" and "prompt" not in second
    assert "never logged" not in logs.getvalue()
    assert third["tenant"] == "bound-before" and "route" not in third  # the request's context ended with it


def test_setup_logging_replaces_the_handlers_and_text_stays_available() -> None:
    root = logging.getLogger()
    saved, level = list(root.handlers), root.level
    out = io.StringIO()
    try:
        telemetry.setup_logging("sink", "WARNING", "text", stream=out)
        assert len(root.handlers) == 1 and root.level == logging.WARNING
        logging.getLogger("x").warning("plain %d", 1)
        logging.getLogger("x").info("dropped")
        assert out.getvalue().rstrip().endswith("WARNING x plain 1")
        telemetry.setup_logging("sink", "INFO", "json", stream=out)
        logging.getLogger("x").info("now json")
        assert orjson.loads(out.getvalue().splitlines()[-1])["component"] == "sink"
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved:
            root.addHandler(h)
        root.setLevel(level)


# --- the gateway -----------------------------------------------------------------------------


class RecordingPublisher:
    def __init__(self, fail: bool = False) -> None:
        self.batches: list[list[Event]] = []
        self.fail = fail

    async def publish(self, events: Sequence[Event], timeout: float = 1.8) -> None:
        if self.fail:
            raise PublishFailed(f"broker down; the client sent {PLANTED[0]}")  # a secret reaching a log line
        self.batches.append(list(events))


@pytest.fixture
def publisher() -> RecordingPublisher:
    return RecordingPublisher()


@pytest.fixture
async def client(publisher: RecordingPublisher) -> AsyncIterator[TestClient]:
    keys = KeyStore([("k-acme", "acme", hash_key(KEY), ["user"])])
    async with TestClient(TestServer(create_app(keys, publisher, always_ready))) as c:
        yield c


async def test_one_server_span_per_request_is_the_parent_of_every_fact(
    client: TestClient, publisher: RecordingPublisher, spans: InMemorySpanExporter
) -> None:
    resp = await client.post("/v1/ask", json={"prompt": "hi"}, headers={**AUTH, "traceparent": CLIENT_PARENT})
    assert resp.status == 200, await resp.text()
    request_id = (await resp.json())["request_id"]
    [span] = [s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.SERVER]
    assert span.name == "POST /v1/ask"
    trace_id, span_id = hexid(span)
    assert trace_id == CLIENT_TRACE and span.parent is not None and span.parent.span_id == 0x00F067AA0BA902B7
    attrs = span.attributes or {}
    assert attrs["http.route"] == "/v1/ask" and attrs["http.response.status_code"] == 200
    assert attrs["ledgerflow.tenant"] == "acme" and attrs["ledgerflow.request_id"] == request_id
    [batch] = publisher.batches
    # every fact of the request records the gateway's span, not the client's header
    assert {tuple(str(e.envelope.trace_parent).split("-")[1:3]) for e in batch} == {(trace_id, span_id)}


async def test_a_malformed_client_traceparent_starts_a_new_trace(
    client: TestClient, publisher: RecordingPublisher, spans: InMemorySpanExporter
) -> None:
    resp = await client.post("/v1/ask", json={"prompt": "hi"}, headers={**AUTH, "traceparent": "00-zz-yy-01"})
    assert resp.status == 200
    [span] = [s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.SERVER]
    assert span.parent is None
    assert {tuple(str(e.envelope.trace_parent).split("-")[1:3]) for e in publisher.batches[0]} == {hexid(span)}


async def test_route_templates_name_spans_and_5xx_marks_them_failed(
    client: TestClient, publisher: RecordingPublisher, spans: InMemorySpanExporter
) -> None:
    publisher.fail = True
    resp = await client.post("/v1/memory/s-1", json={"role": "user", "content": "x"}, headers=AUTH)
    assert resp.status == 501  # no memory fabric configured here
    resp = await client.post("/v1/ask", json={"prompt": "hi"}, headers=AUTH)
    assert resp.status == 503
    memory, ask = [s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.SERVER]
    assert memory.name == "POST /v1/memory/{session}"  # the template: no session id in span names
    assert ask.status.status_code == trace.StatusCode.ERROR


async def test_planted_secrets_never_reach_a_json_log_line(
    client: TestClient, publisher: RecordingPublisher, spans: InMemorySpanExporter, logs: io.StringIO
) -> None:
    """The e2e planted-secret check, against the gateway's JSON log output: secrets in prompts,
    in a bad API key, in a traceparent header and in an error that reaches a log line."""
    prompt = "Please help. " + " and ".join(PLANTED)
    assert (await client.post("/v1/ask", json={"prompt": prompt}, headers=AUTH)).status == 200
    assert (await client.post("/v1/ask", json={"prompt": prompt, "stream": True}, headers=AUTH)).status == 200
    bad_key = {"Authorization": f"Bearer {PLANTED[-1]}", "traceparent": PLANTED[2]}
    assert (await client.post("/v1/ask", json={"prompt": prompt}, headers=bad_key)).status == 401
    publisher.fail = True  # the publish error carries a secret into log.warning
    assert (await client.post("/v1/ask", json={"prompt": prompt}, headers=AUTH)).status == 503
    logging.getLogger("gateway.test").error("stray line: %s", " ".join(PLANTED[:5] + PLANTED[6:]))
    text = logs.getvalue()
    parsed = lines(logs)
    assert any("not recorded" in str(p["message"]) for p in parsed)  # the warning was logged, masked
    assert any(p.get("trace_id") for p in parsed)
    for secret in PLANTED:
        if secret == PLANTED[5]:
            continue  # an IP address: masked in prompts (asserted by the e2e test), kept in log text by design
        assert secret not in text, f"{secret} reached a log line"
    assert PLANTED[5] not in text  # ... and no prompt reached a log line, so neither did the prompt's IP
