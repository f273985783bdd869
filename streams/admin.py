"""Topic creation and consumer-group lag, over confluent-kafka's AdminClient."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import Consumer, ConsumerGroupTopicPartitions, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from streams.topics import Topics


def admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 5000})


def ensure_topics(bootstrap: str, topics: Topics, timeout: float = 30.0) -> list[str]:
    """Create every catalogue topic (and its dead-letter topic) that is missing; return those created."""
    client = admin(bootstrap)
    existing = set(client.list_topics(timeout=timeout).topics)
    wanted: list[NewTopic] = []
    for name in topics.all():
        spec = topics.spec_for(name)
        assert spec is not None
        if name not in existing:
            wanted.append(NewTopic(name, topics.partitions, 1, config=spec.configs()))
        dlq = topics.dlq(name)
        if dlq not in existing:
            wanted.append(NewTopic(dlq, 1, 1, config={"retention.ms": "-1"}))
    if not wanted:
        return []
    created = []
    for name, fut in client.create_topics(wanted, operation_timeout=timeout).items():
        try:
            fut.result(timeout)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":  # a concurrent creator won: fine
                raise
    return created


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int  # -1 when nothing committed yet
    end: int

    @property
    def lag(self) -> int:
        return self.end - max(self.committed, 0)


def group_lag(bootstrap: str, group: str, topic_names: list[str], timeout: float = 10.0) -> list[PartitionLag]:
    """Committed offset and end offset for every partition of `topic_names` in `group`."""
    client = admin(bootstrap)
    md = client.list_topics(timeout=timeout)
    tps = [TopicPartition(t, p) for t in topic_names if t in md.topics for p in sorted(md.topics[t].partitions)]
    if not tps:
        return []
    fut = client.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, tps)])[group]
    committed = {(tp.topic, tp.partition): tp.offset for tp in fut.result(timeout).topic_partitions}
    probe = Consumer({"bootstrap.servers": bootstrap, "group.id": f"{group}.lag-probe", "enable.auto.commit": False})
    try:
        out = []
        for tp in tps:
            _low, high = probe.get_watermark_offsets(tp, timeout=timeout, cached=False)
            out.append(PartitionLag(group, tp.topic, tp.partition, committed.get((tp.topic, tp.partition), -1), high))
        return out
    finally:
        probe.close()


def list_groups(bootstrap: str, timeout: float = 10.0) -> list[str]:
    result = admin(bootstrap).list_consumer_groups(request_timeout=timeout).result()
    return sorted(g.group_id for g in result.valid)
