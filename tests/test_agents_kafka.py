"""The Faust worker against the real broker: folds committed charges, ignores aborted ones,
dead-letters poison, and carries on."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
from confluent_kafka import Producer

from streams.codec import Codec
from streams.topics import Topics
from tests import factories
from tests.conftest import REPO, free_port
from tests.kafka_helpers import read_all

pytestmark = pytest.mark.kafka
CODEC = Codec()


def test_worker_folds_only_committed_charges(kafka_bootstrap: str, topics: Topics, tmp_path: Path) -> None:
    source = topics.name("token-charges")
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"t-{uuid.uuid4().hex}"})
    producer.init_transactions(30)

    def txn(values: list[bytes], commit: bool) -> None:
        producer.begin_transaction()
        for v in values:
            producer.produce(source, key=b"acme", value=v)
        if commit:
            producer.commit_transaction(30)
        else:
            producer.flush(30)  # the records reach the log, then the transaction is aborted
            producer.abort_transaction(30)

    txn([CODEC.encode(factories.charge(cost="1.5"))], commit=True)
    txn([CODEC.encode(factories.charge(cost="100"))], commit=False)
    txn([b"poison!", CODEC.encode(factories.charge(cost="0.000000000002"))], commit=True)

    env = dict(os.environ)
    env.update(
        {
            "LEDGERFLOW_KAFKA_BOOTSTRAP": kafka_bootstrap,
            "LEDGERFLOW_TOPIC_PREFIX": topics.prefix,
            "LEDGERFLOW_PARTITIONS": str(topics.partitions),
            "LEDGERFLOW_WORKER_ID": f"agents-{uuid.uuid4().hex[:8]}",
            "LEDGERFLOW_WORKER_WEB_PORT": str(free_port()),
            "LEDGERFLOW_DATA_DIR": str(tmp_path),
        }
    )
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "agents", "worker", "--loglevel", "warn"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        totals = read_all(kafka_bootstrap, [topics.name("tenant-totals")], expect=2, timeout=90)
        dead = read_all(kafka_bootstrap, [topics.dlq(source)], expect=1, timeout=30)
    finally:
        worker.terminate()
        worker.wait(30)
    updates = [CODEC.decode(m.value()) for m in totals]
    assert [u.cost for u in updates] == [Decimal("1.5"), Decimal("1.500000000002")], (
        tmp_path / "worker.log"
    ).read_text()
    assert updates[-1].requests == 2
    assert len(dead) == 1 and dead[0].value() == b"poison!"
    assert dict(dead[0].headers())["lf.dlq.reason"] == b"not-single-object-encoding"
