"""Follows compacted state topics from the beginning and hands every event to a callback.

Gateway replicas (and the CLI) hold state that reaches them as events: API keys, policy
bundles, policy attributes. A follower reads its topics from offset 0 to their end before it
reports `loaded` (the replica's "state loaded"), then keeps applying new records as they
arrive, typically within one poll interval (~100 ms). It never commits offsets, so every
start rebuilds the state from the log. A record it cannot decode is logged and skipped; the
projection sink dead-letters the same record for inspection.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Sequence

from confluent_kafka import KafkaException, TopicPartition

from streams.clients import Consumer
from streams.codec import Codec, PoisonEvent
from streams.events import Event

log = logging.getLogger(__name__)

POLL_S = 0.1


class StateFollower:
    def __init__(
        self,
        bootstrap: str,
        topics: Sequence[str],
        apply: Callable[[Event], None],
        *,
        name: str = "state",
        codec: Codec | None = None,
    ) -> None:
        self._conf = {
            "bootstrap.servers": bootstrap,
            "group.id": f"ledgerflow-{name}-{uuid.uuid4()}",  # never commits: always reads it all
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
        self._topics = list(topics)
        self._apply = apply
        self._name = name
        self._codec = codec or Codec()
        self._stop = threading.Event()
        self.loaded = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"follow-{name}", daemon=True)
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
                self.applied = 0  # a restart re-reads from the beginning
                ends = self._assign(consumer)
                while not self._stop.is_set():
                    for msg in consumer.consume(500, POLL_S):
                        if msg.error() is None:
                            self._decode_and_apply(msg.value())
                    if not self.loaded.is_set() and self._caught_up(consumer, ends):
                        self.loaded.set()
                        log.info("%s loaded: %d records applied", self._name, self.applied)
            except KafkaException as exc:  # e.g. a fresh topic without a leader yet: start over
                log.warning("%s follower restarting after: %s", self._name, exc)
                self._stop.wait(0.5)
            finally:
                consumer.close()

    def _assign(self, consumer: Consumer) -> dict[tuple[str, int], int]:
        ends: dict[tuple[str, int], int] = {}
        assign = []
        for topic in self._topics:
            md = consumer.list_topics(topic, timeout=5)
            parts = sorted(md.topics[topic].partitions) if topic in md.topics else []
            if not parts:
                raise KafkaException(f"topic {topic} has no partitions yet")
            for p in parts:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                ends[(topic, p)] = high
                assign.append(TopicPartition(topic, p, low))
        consumer.assign(assign)
        return ends

    def _caught_up(self, consumer: Consumer, ends: dict[tuple[str, int], int]) -> bool:
        positions = consumer.position([TopicPartition(t, p) for t, p in ends])
        return all(
            tp.offset >= ends[(tp.topic, tp.partition)] or ends[(tp.topic, tp.partition)] == 0 for tp in positions
        )

    def _decode_and_apply(self, value: bytes | None) -> None:
        try:
            event = self._codec.decode(value)
        except PoisonEvent as exc:
            log.warning("%s: skipping undecodable record: %s", self._name, exc)
            return
        try:
            self._apply(event)
        except Exception:  # one bad state record must not stop the replica from following
            log.exception("%s: could not apply %s %s", self._name, event.event_type, event.envelope.event_id)
            return
        self.applied += 1
