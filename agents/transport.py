"""A Faust Kafka transport whose consumers read with `isolation_level=read_committed`.

The gateway records a request's facts in one Kafka transaction; an aborted transaction's
records must never be folded. Faust turns read_committed on only together with its own
exactly-once producer mode, which we do not use (at-least-once + idempotent folds is
simpler and enough), so this transport sets it on the consumer it builds. Registered under
the URL scheme `lfkafka://`.
"""

from __future__ import annotations

from typing import Any

import aiokafka
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as faust_aiokafka

SCHEME = "lfkafka"


class ReadCommittedConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads this attribute when it builds its fetcher in start(), which comes later.
        consumer._isolation_level = "read_committed"
        return consumer


class ReadCommittedConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return ReadCommittedConsumerThread(self, loop=self.loop, beacon=self.beacon)


class Transport(faust_aiokafka.Transport):
    Consumer = ReadCommittedConsumer


TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"


def broker_url(bootstrap: str) -> str:
    """`lfkafka://` URL for a comma-separated bootstrap list."""
    return ";".join(f"{SCHEME}://{hp.strip()}" for hp in bootstrap.split(",") if hp.strip())
