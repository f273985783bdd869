"""Topic creation and consumer-group lag, over confluent-kafka's AdminClient."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from confluent_kafka import ConsumerGroupTopicPartitions, KafkaException, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions, NewTopic

from streams.clients import Consumer
from streams.log_scan import assign_from_start
from streams.topics import MEMORY_CONFIGS, Topics


def admin(bootstrap: str) -> AdminClient:
    return AdminClient({"bootstrap.servers": bootstrap, "socket.timeout.ms": 5000})


def ensure_topics(bootstrap: str, topics: Topics, timeout: float = 30.0) -> list[str]:
    """Create every catalogue topic (and its dead-letter topic) that is missing; return those created."""
    wanted: list[tuple[str, int, dict[str, str]]] = []
    for name in topics.all():
        spec = topics.spec_for(name)
        assert spec is not None
        wanted.append((name, topics.partitions_of(name), spec.configs()))
        wanted.append((topics.dlq(name), 1, {"retention.ms": "-1"}))
    wanted.append((topics.redrives(), 1, {"cleanup.policy": "compact"}))
    wanted.append((topics.memory(), 1, MEMORY_CONFIGS))
    return create_missing(bootstrap, wanted, timeout)


def create_missing(bootstrap: str, wanted: list[tuple[str, int, dict[str, str]]], timeout: float = 30.0) -> list[str]:
    """Create each (name, partitions, configs) topic that does not exist yet; return those created."""
    client = admin(bootstrap)
    existing = set(client.list_topics(timeout=timeout).topics)
    new = [
        NewTopic(name, partitions, 1, config=configs) for name, partitions, configs in wanted if name not in existing
    ]
    if not new:
        wait_for_partitions(client, {name: partitions for name, partitions, _ in wanted}, timeout)
        return []
    created = []
    for name, fut in client.create_topics(new, operation_timeout=timeout).items():
        try:
            fut.result(timeout)
            created.append(name)
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":  # a concurrent creator won: fine
                raise
    wait_for_partitions(client, {name: partitions for name, partitions, _ in wanted}, timeout)
    return created


def wait_for_partitions(client: AdminClient, wanted: dict[str, int], timeout: float) -> None:
    """Until the broker's metadata shows every topic with all its partitions led.

    A freshly created topic can be missing from the next metadata read, or show 0
    partitions; Faust checks a table's changelog partition count against its source on the
    first write and crashes on such a read, so callers wait here before starting a worker.
    """
    deadline = time.monotonic() + timeout
    while True:
        topics = client.list_topics(timeout=timeout).topics
        short = {
            name: n
            for name, n in wanted.items()
            if name not in topics
            or len(topics[name].partitions) < n
            or any(p.leader < 0 for p in topics[name].partitions.values())
        }
        if not short:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topics not fully visible after {timeout:.0f} s: {sorted(short)}")
        time.sleep(0.2)


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int  # -1 when nothing committed yet
    end: int
    lag: int  # records the group has still to read (transaction markers not counted)


def group_lag(bootstrap: str, group: str, topic_names: list[str], timeout: float = 10.0) -> list[PartitionLag]:
    """Committed offset, end offset and records left to read for every partition of `topic_names`.

    With transactional producers the log holds commit markers that take an offset but are
    never delivered, so `end - committed` overstates lag (a caught-up consumer that commits
    "last record + 1" sits one marker behind the end). Small gaps are therefore counted by
    reading them with a read_committed consumer; large ones are reported as the offset gap.
    """
    client = admin(bootstrap)
    md = client.list_topics(timeout=timeout)
    tps = [TopicPartition(t, p) for t in topic_names if t in md.topics for p in sorted(md.topics[t].partitions)]
    if not tps:
        return []
    fut = client.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, tps)])[group]
    committed = {(tp.topic, tp.partition): tp.offset for tp in fut.result(timeout).topic_partitions}
    probe = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"{group}.lag-probe",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        ends = {}
        for tp in tps:
            low, high = probe.get_watermark_offsets(tp, timeout=timeout, cached=False)
            ends[(tp.topic, tp.partition)] = (low, high)
        gaps = {}
        for key, (low, high) in ends.items():
            start = committed.get(key, -1)
            gaps[key] = high - (start if start >= 0 else low)
        small = {k: max(committed.get(k, -1), ends[k][0]) for k, gap in gaps.items() if 0 < gap <= _EXACT_LAG_LIMIT}
        exact = _count_remaining(probe, small, {k: ends[k][1] for k in small}, timeout) if small else {}
        return [
            PartitionLag(group, t, p, committed.get((t, p), -1), ends[(t, p)][1], exact.get((t, p), gaps[(t, p)]))
            for t, p in ((tp.topic, tp.partition) for tp in tps)
        ]
    finally:
        probe.close()


_EXACT_LAG_LIMIT = 1000


def _count_remaining(
    probe: Consumer, starts: dict[tuple[str, int], int], ends: dict[tuple[str, int], int], timeout: float
) -> dict[tuple[str, int], int]:
    """Records (not markers) between each start and end, read with read_committed."""
    probe.assign([TopicPartition(t, p, off) for (t, p), off in starts.items()])
    counts = dict.fromkeys(starts, 0)
    pending = set(starts)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        for msg in probe.consume(500, 0.2):
            topic, partition, offset = msg.topic(), msg.partition(), msg.offset()
            if msg.error() is None and topic is not None and partition is not None and offset is not None:
                key = (topic, partition)
                if offset < ends[key]:
                    counts[key] += 1
        for tp in probe.position([TopicPartition(t, p) for t, p in pending]):
            if tp.offset >= ends[(tp.topic, tp.partition)]:
                pending.discard((tp.topic, tp.partition))
    for key in pending:  # could not read to the end in time: fall back to the offset gap
        counts[key] = ends[key] - starts[key]
    return counts


def list_groups(bootstrap: str, timeout: float = 10.0) -> list[str]:
    client = admin(bootstrap)  # keep a reference: a destroyed client resolves the future empty
    result = client.list_consumer_groups(request_timeout=timeout).result()
    return sorted(g.group_id for g in result.valid)


def read_to_end(
    bootstrap: str, topics: list[str], timeout: float, *, partitions: set[int] | None = None, strict: bool = False
) -> list[tuple[str, int, Message]]:
    """Every committed record of `topics` from the start to the end offsets seen now (no group commits).

    `partitions` limits the read to those partition numbers; `strict` raises TimeoutError
    instead of returning what arrived when the end is not reached in time (for callers that
    rebuild state from the result and must not take a prefix for the whole).
    """
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"ledgerflow-dlq-reader-{uuid.uuid4()}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        ends = assign_from_start(consumer, topics, timeout, partitions, None, None)
        if not ends:
            return []
        out: list[tuple[str, int, Message]] = []
        deadline = time.monotonic() + timeout
        pending = set(ends)
        while pending and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.2):
                if msg.error() is None:
                    out.append((msg.topic() or "", msg.offset() or 0, msg))
            for tp in consumer.position([TopicPartition(t, p) for t, p in pending]):
                if tp.offset >= ends[(tp.topic or "", tp.partition)]:
                    pending.discard((tp.topic or "", tp.partition))
        if pending and strict:
            raise TimeoutError(f"could not read {sorted(pending)} to their end within {timeout} s")
        return out
    finally:
        consumer.close()


@dataclass(frozen=True)
class PartitionOwner:
    """One topic-partition of a group, the member that owns it now, and how far behind it is.

    The columns of `kafka-consumer-groups --describe`; member fields are "-" for a partition
    that has a committed offset but no owner (group empty or rebalancing).
    """

    group: str
    topic: str
    partition: int
    committed: int  # -1 when nothing committed yet
    end: int
    lag: int
    member_id: str
    client_id: str
    host: str


@dataclass(frozen=True)
class GroupDescription:
    group: str
    state: str  # STABLE, PREPARING_REBALANCE, EMPTY, DEAD, ...
    members: int
    partitions: list[PartitionOwner]


def describe_group(
    bootstrap: str, group: str, topic_names: list[str] | None = None, timeout: float = 10.0
) -> GroupDescription:
    """Owner, committed offset, end offset and lag per partition of one consumer group.

    Members and their assignments come from DescribeConsumerGroups, lag from `group_lag`.
    The partitions listed are those assigned to a member plus every partition of
    `topic_names` (default: the topics the members are assigned), so an unowned partition
    with lag still shows.
    """
    client = admin(bootstrap)
    desc = client.describe_consumer_groups([group], request_timeout=timeout)[group].result(timeout)
    owners: dict[tuple[str, int], tuple[str, str, str]] = {}
    for member in desc.members:
        for tp in member.assignment.topic_partitions:
            owners[(tp.topic, tp.partition)] = (member.member_id, member.client_id, member.host)
    topics = sorted(set(topic_names) if topic_names is not None else {t for t, _ in owners})
    lags = {(p.topic, p.partition): p for p in group_lag(bootstrap, group, topics, timeout)} if topics else {}
    keys = sorted(set(lags) | {k for k in owners if topic_names is None or k[0] in topics})
    rows = []
    for key in keys:
        lag = lags.get(key)
        member_id, client_id, host = owners.get(key, ("-", "-", "-"))
        rows.append(
            PartitionOwner(
                group,
                key[0],
                key[1],
                lag.committed if lag else -1,
                lag.end if lag else -1,
                lag.lag if lag else 0,
                member_id,
                client_id,
                host,
            )
        )
    state = desc.state.name if hasattr(desc.state, "name") else str(desc.state)
    return GroupDescription(group, state, len(desc.members), rows)


def add_partitions(bootstrap: str, wanted: dict[str, int], timeout: float = 30.0) -> None:
    """Raise each topic's partition count to the given total (Kafka cannot lower it).

    Existing records stay where they are; only keys hashed after the change may land on a
    new partition (see docs/operations.md for what that means for per-tenant order).
    """
    client = admin(bootstrap)
    futures = client.create_partitions([NewPartitions(t, n) for t, n in wanted.items()], operation_timeout=timeout)
    for fut in futures.values():
        fut.result(timeout)
    wait_for_partitions(client, wanted, timeout)
