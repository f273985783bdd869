"""A ledger worker whose every transaction aborts exits for the supervisor instead of rewinding
forever (a producer wedged by librdkafka#5430 after a broker restart fails every commit)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Producer

from agents.ledger import MAX_ABORTS_IN_A_ROW, LedgerConfig, LedgerStalled, LedgerWorker, load_or_create_key
from streams.topics import Topics
from tests.test_ledger_kafka import CODEC, audits, settings_for

pytestmark = pytest.mark.kafka


class _NeverCommits(LedgerWorker):
    def __init__(self, *args: Any, succeed_first: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.succeed_first = succeed_first
        self.commits = 0

    def _commit(self, offsets: Any, group: Any) -> None:
        self.commits += 1
        if self.commits > self.succeed_first:
            assert self._producer.flush(30) == 0  # the records reach the broker, the commit never comes
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "injected: the commit never completes"))
        super()._commit(offsets, group)


def test_aborts_in_a_row_end_the_worker_and_one_success_resets_the_count(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    settings = settings_for(kafka_bootstrap, topics, tmp_path)
    key = load_or_create_key(settings.ledger_key_path, settings.ledger_origin)
    records = audits(f"stall-{uuid.uuid4().hex[:6]}", 200)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
    for r in records:
        producer.produce(topics.name("audit"), CODEC.encode(r), r.tenant.encode(), 0)
    assert producer.flush(30) == 0
    config = LedgerConfig(key=key, origin=settings.ledger_origin, every_n=1000, every_s=3600, batch_max=50)
    w = _NeverCommits(kafka_bootstrap, f"ledger-{uuid.uuid4().hex[:8]}", topics, config, succeed_first=1)
    w.subscribe()
    try:
        deadline = time.monotonic() + 120
        with pytest.raises(LedgerStalled):
            while time.monotonic() < deadline:
                w.step()
        assert w.commits == 1 + MAX_ABORTS_IN_A_ROW  # one good commit, then exactly three aborts
        assert w.chained == 50  # the first batch stands; the aborted ones were undone
    finally:
        w.close()
