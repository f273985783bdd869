"""Tests for infra.kafka.runner: the local broker every other Kafka test depends on.

The ``kafka`` test starts a real broker (Java 17 + cached jars, ~10 s) so that the
settings other tests silently rely on -- RF=1 internal topics, transactions, explicit
topic creation -- are proven once, in one place.
"""

from __future__ import annotations

import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import confluent_kafka as ck
import pytest
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from infra.kafka.runner import (
    DEFAULT_CACHE,
    KafkaConfig,
    KafkaError,
    ensure_jars,
    is_running,
    log_path,
    start,
    stop,
)


def _free_ports(n: int) -> list[int]:
    """Distinct free loopback ports, all held open while choosing so none repeats."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _create_topic(admin: AdminClient, name: str, partitions: int) -> None:
    futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    futures[name].result(timeout=30)


def _consume_one(bootstrap: str, topic: str, **extra: str) -> ck.Message:
    consumer = ck.Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"test-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            **extra,
        }
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(1.0)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            return msg
        pytest.fail(f"no message consumed from {topic} within 30 s")
    finally:
        consumer.close()


def test_ensure_jars_without_maven_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which

    def which_without_mvn(cmd: str, *args: object, **kwargs: object) -> str | None:
        return None if cmd == "mvn" else real_which(cmd)

    monkeypatch.setattr(shutil, "which", which_without_mvn)
    cache = tmp_path / "cache"

    with pytest.raises(KafkaError) as excinfo:
        ensure_jars(cache)

    message = str(excinfo.value)
    assert "mvn" in message
    assert "install maven" in message
    assert str(cache / "libs") in message
    assert not (cache / "libs").exists()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[KafkaConfig]:
    if shutil.which("java") is None:
        pytest.skip("Java 17+ is needed to run the Kafka broker")
    port, controller_port = _free_ports(2)
    cfg = KafkaConfig(
        home=tmp_path / "kafka",
        cache=DEFAULT_CACHE,
        port=port,
        controller_port=controller_port,
        heap_mb=384,
    )
    try:
        yield cfg
    finally:
        stop(cfg)  # never leak a broker, whatever the test did


@pytest.mark.kafka
def test_broker_lifecycle(broker: KafkaConfig) -> None:
    cfg = broker
    began = time.monotonic()
    pid = start(cfg)
    startup = time.monotonic() - began

    assert is_running(cfg)
    assert start(cfg) == pid, "start must adopt the running broker, not launch another"
    assert log_path(cfg).is_file()
    assert startup < 60, f"broker took {startup:.1f}s to start"

    admin = AdminClient({"bootstrap.servers": cfg.bootstrap})

    # Plain produce/consume round trip (topics must be created: auto-create is off).
    _create_topic(admin, "lf.test.roundtrip", partitions=1)
    producer = ck.Producer({"bootstrap.servers": cfg.bootstrap, "acks": "all"})
    producer.produce("lf.test.roundtrip", key=b"k", value=b"hello")
    assert producer.flush(30) == 0
    msg = _consume_one(cfg.bootstrap, "lf.test.roundtrip")
    assert (msg.key(), msg.value()) == (b"k", b"hello")

    # Explicit partition count is honoured and visible in metadata.
    _create_topic(admin, "lf.test.three", partitions=3)
    topics = admin.list_topics(timeout=30).topics
    assert "lf.test.three" in topics
    assert len(topics["lf.test.three"].partitions) == 3
    # Facts are kept forever unless a topic says otherwise (log.retention.hours=-1).
    resource = ConfigResource("topic", "lf.test.three")
    config = admin.describe_configs([resource])[resource].result(timeout=30)
    assert config["retention.ms"].value == "-1"

    # Transactions need __transaction_state, which only works with RF=1/min.isr=1 here.
    _create_topic(admin, "lf.test.txn", partitions=1)
    txn = ck.Producer({"bootstrap.servers": cfg.bootstrap, "transactional.id": "lf-test-txn"})
    txn.init_transactions(60)
    txn.begin_transaction()
    txn.produce("lf.test.txn", value=b"committed")
    txn.commit_transaction(60)
    msg = _consume_one(cfg.bootstrap, "lf.test.txn", **{"isolation.level": "read_committed"})
    assert msg.value() == b"committed"

    assert stop(cfg) is True
    assert not is_running(cfg)
    assert not _port_open(cfg.port)
    assert not _port_open(cfg.controller_port)
    assert stop(cfg) is False, "stopping a stopped broker is a no-op"
