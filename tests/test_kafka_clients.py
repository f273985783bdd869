"""librdkafka's log lines come through Python logging (as JSON), never raw on stderr."""

from __future__ import annotations

import io
import json
import logging
import socket

import pytest

from streams import telemetry
from streams.clients import LOGGER_NAME, Consumer, Producer


def _dead_port() -> int:
    with socket.socket() as s:  # bound and closed: nothing listens there
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_librdkafka_lines_are_json_records_not_raw_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    out = io.StringIO()
    handler = telemetry.setup_logging("test", "INFO", "json", stream=out)
    try:
        consumer = Consumer({"bootstrap.servers": f"127.0.0.1:{_dead_port()}", "group.id": "g"})
        consumer.subscribe(["t"])
        for _ in range(20):
            consumer.poll(0.1)  # logs are delivered from the client's own calls
            if LOGGER_NAME in out.getvalue():
                break
        consumer.close()
        producer = Producer({"bootstrap.servers": f"127.0.0.1:{_dead_port()}"})
        producer.poll(0.5)
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    kafka = [r for r in lines if r["logger"] == LOGGER_NAME]
    assert kafka, out.getvalue()
    assert any("Connect to" in r["message"] or "refused" in r["message"] for r in kafka)
    assert all(r["component"] == "test" for r in kafka)
    assert "|FAIL|" not in capfd.readouterr().err  # nothing raw from librdkafka on stderr
