"""Issue 11: ONE trace spans gateway → agent → sink, through the real broker and real chDB.

The gateway runs in this process (aiohttp test client, the real transactional publisher);
the Faust worker (`python -m agents worker`) and the projections service with its sink
(`python -m projections`) run as their own processes, as `ledgerflow up` starts them. Every
process exports its spans to a JSON-lines file; the test reads them all back and follows
the request: the agent's span is a child of the gateway's (through the record header), and
the sink's insert spans of the charge and of the agent's derived event are tied to the same
trace (parent or link, from the envelope's trace_parent).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import always_ready, create_app
from gateway.auth import KeyStore
from ledgerflow.settings import hash_key
from streams import telemetry
from streams.codec import Codec
from streams.events import TenantTotalsUpdated
from streams.publisher import FactPublisher
from streams.topics import Topics
from tests.conftest import REPO, free_port
from tests.kafka_helpers import read_all
from tests.test_projections_service import Proc

pytestmark = [pytest.mark.kafka, pytest.mark.slow]
KEY = "lf_trace_e2e_secret"
CLIENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


@pytest.fixture
def span_dir(tmp_path: Path) -> Iterator[Path]:
    out = tmp_path / "spans"
    telemetry.configure(
        telemetry.TelemetryConfig(
            "ledgerflow-gateway", "file", file=str(out / "{service}-{pid}.jsonl"), schedule_delay_ms=200
        )
    )
    yield out
    telemetry.use(None)


def worker(bootstrap: str, topics: Topics, home: Path, spans: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "LEDGERFLOW_KAFKA_BOOTSTRAP": bootstrap,
        "LEDGERFLOW_TOPIC_PREFIX": topics.prefix,
        "LEDGERFLOW_PARTITIONS": str(topics.partitions),
        "LEDGERFLOW_WORKER_ID": f"agents-{uuid.uuid4().hex[:8]}",
        "LEDGERFLOW_WORKER_WEB_PORT": str(free_port()),
        "LEDGERFLOW_DATA_DIR": str(home),
        "LEDGERFLOW_OTEL_EXPORTER": "file",
        "LEDGERFLOW_OTEL_FILE": str(spans / "{service}-{pid}.jsonl"),
        "LEDGERFLOW_LOG_FORMAT": "json",
    }
    log = (home / "worker.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "agents", "worker", "--loglevel", "warn"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip


def eventually(found: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def tied_to(span: dict[str, Any], trace_id: str, span_id: str) -> bool:
    """The span's parent or one of its links is (trace_id, span_id)."""
    if (span.get("parent_trace_id"), span.get("parent_span_id")) == (trace_id, span_id):
        return True
    return any((link["trace_id"], link["span_id"]) == (trace_id, span_id) for link in span["links"])


async def test_one_trace_spans_gateway_agent_and_sink(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path, span_dir: Path
) -> None:
    agents = worker(kafka_bootstrap, topics, tmp_path, span_dir)
    sink = Proc(
        [
            "--bootstrap", kafka_bootstrap, "--group", f"sink-{uuid.uuid4().hex[:8]}",
            "--topic-prefix", topics.prefix, "--partitions", str(topics.partitions),
            "--store", f"chdb://{tmp_path / 'ch'}", "--port", "0", "--batch-ms", "100",
            "--otel-exporter", "file", "--otel-file", str(span_dir / "{service}-{pid}.jsonl"),
        ]
    )  # fmt: skip
    publisher = FactPublisher(kafka_bootstrap, f"{topics.prefix}gw", topics)
    publisher.start()
    try:
        keys = KeyStore([("k-acme", "acme", hash_key(KEY), ["user"])])
        app = create_app(keys, publisher, always_ready, publish_timeout=20.0)
        async with TestClient(TestServer(app)) as client:
            await asyncio.to_thread(eventually, lambda: publisher.ready, 60, "the transactional producer")
            headers = {"Authorization": f"Bearer {KEY}", "traceparent": CLIENT}
            resp = await client.post("/v1/ask", json={"prompt": "follow me"}, headers=headers)
            assert resp.status == 200, await resp.text()
            request_id = (await resp.json())["request_id"]
        await asyncio.to_thread(sink.wait_ready, 90)

        def spans() -> list[dict[str, Any]]:
            return telemetry.read_spans(sorted(span_dir.glob("*.jsonl")))

        def find() -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]]] | None:
            found = spans()
            gateway = [s for s in found if s["name"] == "POST /v1/ask"]
            if not gateway:
                return None
            gw = gateway[0]
            agent = [s for s in found if s["name"] == "tenant-totals" and s["parent_span_id"] == gw["span_id"]]
            inserts = [
                s
                for s in found
                if s["name"] == "sink.insert" and s["status"] != "ERROR" and tied_to(s, gw["trace_id"], gw["span_id"])
            ]
            tables = {s["attributes"].get("db.collection.name") for s in inserts}
            if agent and {"tokens_charged", "tenant_totals_updated"} <= tables:
                return gw, agent[0], inserts
            return None

        gw, agent, inserts = await asyncio.to_thread(
            eventually, find, 150, "gateway, agent and sink spans of one trace"
        )
    finally:
        publisher.close()
        agents.terminate()
        sink.p.terminate()
        agents.wait(30)
        sink.p.wait(30)
    trace_id = gw["trace_id"]
    # the gateway: a child of the client's span, one trace with everything the request caused
    assert trace_id == CLIENT.split("-")[1] and gw["parent_span_id"] == CLIENT.split("-")[2]
    assert gw["kind"] == "SERVER" and gw["service"] == "ledgerflow-gateway"
    assert gw["attributes"]["ledgerflow.request_id"] == request_id and gw["attributes"]["ledgerflow.tenant"] == "acme"
    # the agent, in its own process: parent = the gateway span, from the record's traceparent header
    assert agent["trace_id"] == trace_id and agent["service"] == "ledgerflow-agents" and agent["kind"] == "CONSUMER"
    assert agent["attributes"]["messaging.destination.name"] == topics.name("token-charges")
    # the sink, in its own process: its inserts of the charge and of the derived totals are in the trace
    assert {s["service"] for s in inserts} == {"ledgerflow-projections"}
    assert all(s["trace_id"] == trace_id or s["links"] for s in inserts)
    # the derived event: its header carries the agent's span (the next hop's parent), its envelope the request's
    [derived] = read_all(kafka_bootstrap, [topics.name("tenant-totals")], expect=1, timeout=30)
    header = dict(derived.headers() or [])["traceparent"]
    assert isinstance(header, bytes) and header.decode().split("-")[1:3] == [trace_id, agent["span_id"]]
    event = Codec().decode(derived.value())
    assert isinstance(event, TenantTotalsUpdated)
    assert str(event.envelope.trace_parent).split("-")[1:3] == [trace_id, gw["span_id"]]
