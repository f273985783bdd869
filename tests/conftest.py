"""Shared fixtures: one real Kafka broker per test session, a fresh topic prefix per test.

The broker is the real Apache Kafka (KRaft) started by `infra.kafka.runner`; set
LEDGERFLOW_TEST_BOOTSTRAP to use one that is already running (as `.ci/run` does).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from streams.admin import ensure_topics
from streams.topics import Topics

REPO = Path(__file__).resolve().parents[1]


_handed_out: set[int] = set()


def free_port() -> int:
    """A free loopback port not handed out before in this process (so two calls never collide)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _handed_out:
            _handed_out.add(port)
            return port


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    existing = os.environ.get("LEDGERFLOW_TEST_BOOTSTRAP")
    if existing:
        yield existing
        return
    from infra.kafka.runner import KafkaConfig, start, stop

    cfg = KafkaConfig(
        home=tmp_path_factory.mktemp("kafka"),
        cache=REPO / ".cache" / "kafka",
        port=free_port(),
        controller_port=free_port(),
    )
    start(cfg)
    try:
        yield cfg.bootstrap
    finally:
        stop(cfg)


@pytest.fixture
def topics(kafka_bootstrap: str) -> Topics:
    """A fresh, created set of catalogue topics (3 partitions each) unique to this test."""
    t = Topics(prefix=f"t{uuid.uuid4().hex[:10]}.", partitions=3)
    ensure_topics(kafka_bootstrap, t)
    return t


@pytest.fixture(scope="session")
def chdb_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One chDB path for the whole session: chDB allows one data path per process."""
    return f"chdb://{tmp_path_factory.mktemp('chdb')}"


@pytest.fixture
def ch_database() -> str:
    """A database name unique to this test (the projections live in it)."""
    return f"t_{uuid.uuid4().hex[:12]}"
