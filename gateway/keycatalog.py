"""Follows the compacted `api-keys` topic and keeps the gateway's KeyStore current.

At start it reads the topic from the beginning to its end before the gateway reports ready
("state loaded"); afterwards it keeps applying issuances and revocations as they arrive,
typically within a poll interval (~100 ms). A record it cannot decode is logged and skipped
here: the projection sink dead-letters it for inspection.
"""

from __future__ import annotations

import logging
import threading
import uuid

from confluent_kafka import Consumer, KafkaException, TopicPartition

from gateway.auth import KeyStore
from streams.codec import Codec, PoisonEvent
from streams.events import ApiKeyIssued, ApiKeyRevoked

log = logging.getLogger(__name__)


class KeyCatalog:
    def __init__(self, bootstrap: str, topic: str, store: KeyStore, codec: Codec | None = None) -> None:
        self._conf = {
            "bootstrap.servers": bootstrap,
            "group.id": f"ledgerflow-keycatalog-{uuid.uuid4()}",  # never commits: always reads it all
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
        self._topic = topic
        self._store = store
        self._codec = codec or Codec()
        self._stop = threading.Event()
        self.loaded = threading.Event()
        self._thread = threading.Thread(target=self._run, name="key-catalog", daemon=True)
        self.applied = 0

    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            consumer = Consumer(self._conf)
            try:
                ends = self._assign(consumer)
                while not self._stop.is_set():
                    for msg in consumer.consume(500, 0.1):
                        if msg.error() is None:
                            self._apply(msg.value())
                    if not self.loaded.is_set() and self._caught_up(consumer, ends):
                        self.loaded.set()
                        log.info("api keys loaded: %d applied", self.applied)
            except KafkaException as exc:  # e.g. a fresh topic without a leader yet: start over
                log.warning("key catalog restarting after: %s", exc)
                self._stop.wait(0.5)
            finally:
                consumer.close()

    def _assign(self, consumer: Consumer) -> dict[int, int]:
        md = consumer.list_topics(self._topic, timeout=5)
        parts = sorted(md.topics[self._topic].partitions) if self._topic in md.topics else []
        if not parts:
            raise KafkaException(f"topic {self._topic} has no partitions yet")
        ends = {}
        assign = []
        for p in parts:
            low, high = consumer.get_watermark_offsets(TopicPartition(self._topic, p), timeout=10)
            ends[p] = high
            assign.append(TopicPartition(self._topic, p, low))
        consumer.assign(assign)
        return ends

    def _caught_up(self, consumer: Consumer, ends: dict[int, int]) -> bool:
        positions = consumer.position([TopicPartition(self._topic, p) for p in ends])
        return all(tp.offset >= ends[tp.partition] or ends[tp.partition] == 0 for tp in positions)

    def _apply(self, value: bytes | None) -> None:
        try:
            event = self._codec.decode(value)
        except PoisonEvent as exc:
            log.warning("skipping undecodable api-key record: %s", exc)
            return
        if isinstance(event, ApiKeyIssued):
            self._store.add(event.key_id, event.tenant, event.key_sha256, event.roles, event.expires_at)
        elif isinstance(event, ApiKeyRevoked):
            self._store.revoke(event.key_id)
        self.applied += 1
