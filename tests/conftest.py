"""Shared fixtures: one real Kafka broker per test session, a fresh topic prefix per test.

The broker is the real Apache Kafka (KRaft) started by `infra.kafka.runner`; set
LEDGERFLOW_TEST_BOOTSTRAP to use one that is already running (as `.ci/run` does).
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from projections.migrations import migrate
from projections.sink import Sink
from projections.store import open_store
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


# --- projections: a migrated store and sink factory (shared by the sink, DLQ and fuzz tests) ---


@pytest.fixture
def store(chdb_url: str, ch_database: str) -> Iterator[Client]:
    client = open_store(chdb_url, ch_database)
    migrate(client, ch_database)
    yield client
    client.command(f"DROP DATABASE IF EXISTS {ch_database}")
    client.close()


@pytest.fixture
def new_sink(kafka_bootstrap: str, topics: Topics, store: Client) -> Iterator[Callable[..., Sink]]:
    made: list[Sink] = []

    def make(group: str | None = None, store_: Any = None, **kw: Any) -> Sink:
        kw.setdefault("batch_max", 50)
        kw.setdefault("batch_ms", 50)
        s = Sink(kafka_bootstrap, group or f"sink-{uuid.uuid4().hex[:8]}", topics, store_ or store, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()
