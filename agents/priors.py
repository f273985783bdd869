"""Agent: routing priors. Learns from routing decisions and their outcomes, publishes priors.

A Kafka consume-transform-produce loop around the pure fold `domain.routing_priors`
(run: `python -m agents.priors`). Kafka only at the edges:
1. consume RouteChosen (`routes`), FeedbackReceived (`feedback`), TokensCharged
   (`token-charges`) and AdapterCalled (`adapter-outcomes`, which the gateway records with each
   answered call; AdapterFailed on the same topic is skipped), read_committed;
2. fold each into the learner state in memory;
3. every `publish_every` facts, or `every_s` seconds with something new, publish ONE
   transaction: the new `RoutingPriorsPublished` (compacted `routing-priors`, which gateways
   follow), one `RoutingRegretRecorded` per tenant routed since, and the consumed offsets
   (`send_offsets_to_transaction`). Priors and offsets become visible together or not at all;
4. on start (and on any failure) the state is the newest published priors plus each tenant's
   newest regret record, and consumption resumes at the committed offsets: the facts folded
   after that publication are folded again, so a crash loses nothing and doubles nothing.
   What a restart does forget is the join buffer (a route whose feedback had not come yet):
   feedback arriving after the restart for a route folded before it is not learned from.

One learner for the whole platform: priors are shared by every tenant (a model's quality on
a kind of prompt does not depend on who asks), so run ONE priors worker (it holds the
consumer group's every partition; a second member would split the facts between two states).
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field

from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from agents.metrics import AgentMetrics
from domain.routing_features import FeatureConfig
from domain.routing_priors import LearnerState, fold, publish
from streams import telemetry
from streams.clients import Consumer, Producer
from streams.codec import Codec, PoisonEvent
from streams.events import Event, RoutingPriorsPublished, RoutingRegretRecorded
from streams.log_scan import scan_to_end
from streams.metrics import serve
from streams.topics import Topics

AGENT_NAME = "routing-priors"
log = logging.getLogger(__name__)
SOURCE_EVENTS = ("RouteChosen", "FeedbackReceived", "TokensCharged", "AdapterCalled")


@dataclass(frozen=True)
class PriorsConfig:
    publish_every: int = 500  # facts folded between publications
    every_s: float = 5.0  # ... or this long, if anything was folded
    batch_max: int = 2000
    poll_s: float = 0.2
    features: FeatureConfig = field(default_factory=FeatureConfig)  # what fresh priors record (the gateways' setting)


def source_topics(topics: Topics) -> list[str]:
    """The topics of the facts the learner folds (an event type on no topic is skipped)."""
    names = []
    for event_type in SOURCE_EVENTS:
        try:
            names.append(topics.for_event(event_type))
        except KeyError:
            continue
    return sorted(set(names))


def load_state(
    bootstrap: str, topics: Topics, codec: Codec, timeout: float = 120.0, features: FeatureConfig | None = None
) -> LearnerState:
    """The newest published priors and every tenant's newest regret record, from the log."""
    newest: RoutingPriorsPublished | None = None
    regrets: dict[str, RoutingRegretRecorded] = {}
    for msg in scan_to_end(bootstrap, [topics.name("routing-priors"), topics.name("routing-regret")], timeout):
        try:
            event = codec.decode(msg.value())
        except PoisonEvent:
            continue
        if isinstance(event, RoutingPriorsPublished):
            newest = event
        elif isinstance(event, RoutingRegretRecorded):
            regrets[event.tenant] = event
    return LearnerState.resume(newest, regrets.values(), features)


class PriorsWorker:
    def __init__(self, bootstrap: str, group: str, topics: Topics, config: PriorsConfig | None = None) -> None:
        self._bootstrap = bootstrap
        self._topics = topics
        self._config = config or PriorsConfig()
        self._codec = Codec()
        self.sources = source_topics(topics)
        self.priors_topic = topics.name("routing-priors")
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "session.timeout.ms": 10000,
                "heartbeat.interval.ms": 3000,
            }
        )
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "transactional.id": f"{group}-priors-{uuid.uuid4().hex[:12]}",
                "enable.idempotence": True,
                "acks": "all",
                "compression.type": "zstd",  # the priors JSON is mostly digits: it compresses well
                "message.max.bytes": 8 * 1024 * 1024,
                "transaction.timeout.ms": 30000,
            }
        )
        self._producer.init_transactions(60)
        self.metrics = AgentMetrics()  # issue 11: served by main() at --metrics-port
        self.batches = self.metrics.batches(AGENT_NAME, group)
        self.state = load_state(bootstrap, topics, self._codec, features=self._config.features)
        self._last_publish = time.monotonic()
        self.published = 0

    def run(self, stop: threading.Event) -> None:
        self._consumer.subscribe(self.sources)
        try:
            while not stop.is_set():
                self.step()
                self.batches.sample_lag(self._consumer)
        finally:
            self._consumer.close()
            self._producer.flush(10)

    def step(self) -> int:
        """Fold one batch; publish when due. The number of records consumed."""
        msgs = [m for m in self._consumer.consume(self._config.batch_max, self._config.poll_s) if self._usable(m)]
        started = time.perf_counter()
        if msgs:  # issue 11: one span per batch folded, linked to the requests of its records
            with telemetry.batch_span(AGENT_NAME, headers=(m.headers() for m in msgs)):
                for msg in msgs:
                    event = self._decode(msg)
                    if event is not None:
                        fold(self.state, event)
        if msgs:  # folded (committed with the next publication; a rewind folds them again)
            self.batches.committed(len(msgs), started)
        due = self.state.unpublished >= self._config.publish_every or (
            self.state.unpublished > 0 and time.monotonic() - self._last_publish >= self._config.every_s
        )
        if due:
            self._publish()
        return len(msgs)

    def _decode(self, msg: Message) -> Event | None:
        try:
            return self._codec.decode(msg.value())
        except PoisonEvent as exc:  # the sink dead-letters the same record; the learner skips it
            self.batches.count("skipped")
            log.warning(
                "priors: skipping undecodable record %s[%s]@%s: %s", msg.topic(), msg.partition(), msg.offset(), exc
            )
            return None

    def _publish(self) -> None:
        outputs = publish(self.state)
        try:
            self._producer.begin_transaction()
            for event in outputs:
                self._producer.produce(
                    self._topics.for_event(event.event_type),
                    key=self._topics.key_for(event),
                    value=self._codec.encode(event),
                )
            self._producer.send_offsets_to_transaction(
                self._consumer.position(self._consumer.assignment()), self._consumer.consumer_group_metadata(), 30
            )
            self._producer.commit_transaction(60)
        except KafkaException as exc:
            log.warning("priors transaction failed, rewinding to the last publication: %s", exc)
            self._rewind()
            return
        self._last_publish = time.monotonic()
        self.published += 1
        log.info(
            "published priors %s (%d feedback folded)", self.state.priors.version, self.state.priors.feedback_count
        )

    def _rewind(self) -> None:
        try:
            self._producer.abort_transaction(30)
        except KafkaException as exc:
            log.error("priors could not abort (%s); exiting so the supervisor restarts a clean worker", exc)
            raise
        self.state = load_state(self._bootstrap, self._topics, self._codec)
        committed = self._consumer.committed(self._consumer.assignment(), 30)
        for tp in committed:
            self._consumer.seek(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else 0))

    @staticmethod
    def _usable(msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return True
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("priors consumer: %s", err)
        return False


def main(argv: list[str] | None = None) -> int:
    """`python -m agents.priors`: the routing priors learner, configured from ledgerflow settings."""
    from ledgerflow.settings import load

    parser = argparse.ArgumentParser(prog="python -m agents.priors")
    parser.add_argument("--loglevel", default="info")
    parser.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics here (0: off)")
    parser.add_argument("--metrics-host", default="127.0.0.1")
    parser.add_argument("--publish-every", type=int, default=PriorsConfig.publish_every)
    parser.add_argument("--every-s", type=float, default=PriorsConfig.every_s)
    args = parser.parse_args(argv)
    settings = load()
    telemetry.start("priors", settings, level=args.loglevel.upper())
    topics = Topics(settings.topic_prefix, settings.partitions)
    features = FeatureConfig()
    if settings.routing_embedding_model is not None:  # the same model id the gateways compute features with
        from domain.routing_embedding import check_embedding_dims, load_encoder

        encoder = load_encoder(settings.routing_embedding_model)
        check_embedding_dims(encoder, settings.routing_embedding_dims)
        features = FeatureConfig(embedding=encoder.model_id, embedding_dims=settings.routing_embedding_dims)
    worker = PriorsWorker(
        settings.bootstrap,
        f"{settings.worker_id}-routing-priors",
        topics,
        PriorsConfig(publish_every=args.publish_every, every_s=args.every_s, features=features),
    )
    serve(worker.metrics.registry, args.metrics_host, args.metrics_port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    worker.run(stop)
    log.info("priors worker stopped: %d publications", worker.published)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
