"""The projection sink against a real broker and real chDB: every fact once, poison aside, resumable."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, Producer, TopicPartition

from projections.schema import DEAD_LETTERS, columns_for, event_to_row, table_for
from projections.sink import Sink
from projections.store import LockedStore
from streams.admin import group_lag
from streams.codec import Codec
from streams.deadletter import HEADER_OFFSET, HEADER_REASON, DeadLetter
from streams.events import (
    AuditRecorded,
    Envelope,
    Event,
    PolicyDecided,
    RequestReceived,
    TenantTotalsUpdated,
    TokensCharged,
)
from streams.ids import uuid7
from streams.topics import Topics

TENANTS = ("acme", "globex", "initech", "umbrella", "hooli")
CODEC = Codec()


# --- builders (shared with test_projections_service) --------------------------------------


def _env(event_type: str, tenant: str) -> Envelope:
    return Envelope(
        event_id=str(uuid7()),
        event_type=event_type,
        schema_version=1,
        tenant=tenant,
        occurred_at=datetime.now(UTC),
        correlation_id=str(uuid7()),
        producer="test",
    )


def make_event(kind: int, tenant: str, i: int) -> Event:
    """One valid event of the kind-th catalogue type."""
    rid = str(uuid7())
    match kind % 5:
        case 0:
            return RequestReceived(_env("RequestReceived", tenant), rid, "/v1/ask", "k1", 1, 10 + i, "0" * 64)
        case 1:
            return PolicyDecided(_env("PolicyDecided", tenant), rid, "allow", "p1", ["default"], "f" * 64)
        case 2:
            cost = Decimal(i) / Decimal(10**12)
            return TokensCharged(
                _env("TokensCharged", tenant), rid, "sim", i, 2 * i, Decimal("0.15"), Decimal("0.6"), "v1", "USD", cost
            )
        case 3:
            return AuditRecorded(
                _env("AuditRecorded", tenant), "request.completed", "k1", rid, "success", {"i": str(i)}
            )
        case _:
            return TenantTotalsUpdated(_env("TenantTotalsUpdated", tenant), i, i, i, Decimal(i), "USD", 0, i)


def make_events(n: int) -> list[Event]:
    return [make_event(i, TENANTS[(i // 5) % len(TENANTS)], i) for i in range(n)]


def produce(bootstrap: str, records: Sequence[tuple[str, bytes | None, bytes | None]]) -> None:
    """Plain idempotent producer: (topic, key, value) in order."""
    p = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    for topic, key, value in records:
        p.produce(topic, key=key, value=value)
    assert p.flush(30) == 0


def encoded(topics: Topics, events: Sequence[Event]) -> list[tuple[str, bytes | None, bytes | None]]:
    return [(topics.for_event(e.event_type), e.tenant.encode(), CODEC.encode(e)) for e in events]


def produce_events(bootstrap: str, topics: Topics, events: Sequence[Event]) -> None:
    produce(bootstrap, encoded(topics, events))


def counts(client: Client) -> dict[str, int]:
    tables = [table_for(t) for t in ("RequestReceived", "PolicyDecided", "TokensCharged", "AuditRecorded")]
    tables += [table_for("TenantTotalsUpdated"), DEAD_LETTERS]
    return {t: int(str(client.command(f"SELECT count() FROM {t}"))) for t in tables}


def expected_counts(events: Sequence[Event], dead: int = 0) -> dict[str, int]:
    out = {t: 0 for t in ("request_received", "policy_decided", "tokens_charged", "audit_recorded")}
    out |= {"tenant_totals_updated": 0, DEAD_LETTERS: dead}
    for e in events:
        out[table_for(e.event_type)] += 1
    return out


def run_until(sinks: Sink | Sequence[Sink], done: Callable[[], bool], timeout: float = 30.0) -> None:
    """Drive the sink(s) until `done()` holds (checked between polls) or fail after `timeout`."""
    group = [sinks] if isinstance(sinks, Sink) else list(sinks)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in group:
            s.poll_once(0.1)
        if all(s.pending_rows() == 0 for s in group) and done():
            return
    raise AssertionError(f"sink did not finish in {timeout}s: {[s.status() for s in group]}")


def settle(sink: Sink, seconds: float = 1.0) -> None:
    """Keep polling a while, so anything that would be duplicated has the chance to be."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sink.poll_once(0.1)


# --- fixtures ----------------------------------------------------------------------------


def committed(bootstrap: str, group: str, topics: Topics) -> dict[tuple[str, int], int]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        tps = [TopicPartition(t, p) for t in topics.all() for p in range(topics.partitions_of(t))]
        return {(tp.topic, tp.partition): tp.offset for tp in c.committed(tps, timeout=10) if tp.offset >= 0}
    finally:
        c.close()


# --- chDB only ---------------------------------------------------------------------------


def test_dedup_token_drops_a_retried_batch(store: Client) -> None:
    """Step 4 relies on this: same token → the second insert is a no-op; another token lands."""
    events = make_events(5)
    rows = [event_to_row(e, "t", 0, i) for i, e in enumerate(events) if e.event_type == "RequestReceived"]
    cols = columns_for("RequestReceived")
    for token in ("t-0-0-0", "t-0-0-0", "t-0-1-1"):
        store.insert("request_received", rows, column_names=cols, settings={"insert_deduplication_token": token})
    assert store.command("SELECT count() FROM request_received") == 2 * len(rows)


# --- real broker -------------------------------------------------------------------------


@pytest.mark.kafka
def test_sink_lands_each_event_once_dead_letters_poison_and_resumes(
    kafka_bootstrap: str, topics: Topics, store: Client, new_sink: Callable[..., Sink]
) -> None:
    events = make_events(250)
    valid_request = CODEC.encode(make_event(0, "acme", 0))
    poison: list[tuple[str, bytes | None, bytes | None]] = [
        (topics.name("requests"), b"acme", b"not avro at all"),  # garbage
        (topics.name("token-charges"), b"globex", CODEC.encode(make_event(2, "globex", 7))[:-3]),  # truncated
        (topics.name("requests"), b"initech", CODEC.encode(make_event(1, "initech", 1))),  # wrong topic
        (topics.name("audit"), b"hooli", None),  # tombstone
    ]
    # Poison in the middle of good traffic: its neighbours in the same partitions must land.
    produce(kafka_bootstrap, encoded(topics, events[:120]) + poison + encoded(topics, events[120:]))
    assert CODEC.decode(valid_request).event_type == "RequestReceived"

    sink = new_sink(group="g-main")
    want = expected_counts(events, dead=len(poison))
    run_until(sink, lambda: counts(store) == want)
    settle(sink, 0.5)
    assert counts(store) == want
    ids = {r[0] for t in want if t != DEAD_LETTERS for r in store.query(f"SELECT event_id FROM {t}").result_rows}
    assert ids == {e.envelope.event_id for e in events}
    assert sink.rows_inserted == len(events) and sink.dead_lettered == len(poison)

    reasons = store.query("SELECT reason, source_topic, _topic = source_topic FROM dead_letters ORDER BY reason")
    assert [r[0] for r in reasons.result_rows] == sorted(
        ["not-single-object-encoding", "undecodable-body", "wrong-topic", "not-single-object-encoding"]
    )
    assert all(r[2] for r in reasons.result_rows)

    # The DLQ topics carry the same four records with their coordinates in the headers.
    dlq_msgs = _read(kafka_bootstrap, [topics.dlq(t) for t in topics.all()], expect=len(poison))
    assert len(dlq_msgs) == len(poison)
    letters = [DeadLetter.from_headers(m.headers(), m.key(), m.value()) for m in dlq_msgs]
    assert sorted(d.reason for d in letters) == sorted(r[0] for r in reasons.result_rows)
    assert {(d.topic, d.partition, d.offset) for d in letters} == {
        tuple(r)
        for r in store.query("SELECT source_topic, source_partition, source_offset FROM dead_letters").result_rows
    }
    assert all(dict(m.headers() or [])[HEADER_REASON] for m in dlq_msgs)
    assert all(int(dict(m.headers() or [])[HEADER_OFFSET]) >= 0 for m in dlq_msgs)

    # Offsets were committed after the inserts (step 5), one past the last record of each partition.
    assert committed(kafka_bootstrap, "g-main", topics)
    sink.close()

    # A new instance of the same group and store: nothing doubled, new facts picked up.
    again = new_sink(group="g-main")
    settle(again, 1.0)
    assert counts(store) == want
    more = make_events(40)
    produce_events(kafka_bootstrap, topics, more)
    want_more = expected_counts(events + more, dead=len(poison))
    run_until(again, lambda: counts(store) == want_more)
    settle(again, 0.5)
    assert counts(store) == want_more


@pytest.mark.kafka
def test_resumes_from_clickhouse_when_kafka_offsets_were_never_committed(
    kafka_bootstrap: str, topics: Topics, store: Client, new_sink: Callable[..., Sink]
) -> None:
    """A sink that inserted but never committed (crash between steps 4 and 5) must not double."""
    events = make_events(120)
    produce_events(kafka_bootstrap, topics, events)
    first = new_sink()
    want = expected_counts(events)
    run_until(first, lambda: counts(store) == want)
    first.close()

    # A group that has never committed anything, on the same store: Kafka would say "earliest".
    fresh = f"never-committed-{uuid.uuid4().hex[:6]}"
    assert committed(kafka_bootstrap, fresh, topics) == {}
    second = new_sink(group=fresh)
    more = make_events(30)
    produce_events(kafka_bootstrap, topics, more)
    want_more = expected_counts(events + more)
    run_until(second, lambda: counts(store) == want_more)
    settle(second, 1.0)
    assert counts(store) == want_more
    assert second.rows_inserted == len(more)  # it started right after what ClickHouse held


class FlakyStore(LockedStore):
    """A store whose first `insert_failures` inserts and `query_failures` queries fail."""

    def __init__(self, client: Client, insert_failures: int = 0, query_failures: int = 0) -> None:
        super().__init__(client)
        self.insert_failures = insert_failures
        self.query_failures = query_failures

    def insert(self, table: str, rows: Any, column_names: Any, settings: dict[str, Any] | None = None) -> None:
        if self.insert_failures > 0:
            self.insert_failures -= 1
            raise ConnectionError("ClickHouse is down (simulated)")
        super().insert(table, rows, column_names, settings)

    def call(self, fn: Callable[[Client], Any]) -> Any:
        """The fast path's Avro inserts fail like `insert`."""
        if self.insert_failures > 0:
            self.insert_failures -= 1
            raise ConnectionError("ClickHouse is down (simulated)")
        return super().call(fn)

    def query_rows(self, query: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        if self.query_failures > 0:
            self.query_failures -= 1
            raise ConnectionError("ClickHouse is down (simulated)")
        return super().query_rows(query, parameters)


@pytest.mark.kafka
def test_failed_inserts_pause_retry_and_lose_nothing(
    kafka_bootstrap: str, topics: Topics, store: Client, new_sink: Callable[..., Sink]
) -> None:
    events = make_events(150)
    produce_events(kafka_bootstrap, topics, events)
    flaky = FlakyStore(store, insert_failures=4)
    sink = new_sink(store_=flaky, max_backoff=0.2)
    saw_paused = False
    deadline = time.monotonic() + 30
    want = expected_counts(events)
    while time.monotonic() < deadline and not (counts(store) == want and sink.pending_rows() == 0):
        sink.poll_once(0.1)
        saw_paused = saw_paused or bool(sink.status()["paused"])
    assert counts(store) == want
    assert saw_paused and sink.insert_failures == 4
    settle(sink, 0.5)
    assert counts(store) == want and not sink.status()["paused"]


@pytest.mark.kafka
def test_clickhouse_unavailable_at_assignment_resolves_later(
    kafka_bootstrap: str, topics: Topics, store: Client, new_sink: Callable[..., Sink]
) -> None:
    """Step 1 cannot be skipped: partitions wait paused until ClickHouse says where to resume."""
    events = make_events(60)
    produce_events(kafka_bootstrap, topics, events)
    first = new_sink()
    run_until(first, lambda: counts(store) == expected_counts(events))
    first.close()
    more = make_events(25)
    produce_events(kafka_bootstrap, topics, more)

    flaky = FlakyStore(store, query_failures=2)  # the assignment's first resume queries fail
    second = new_sink(store_=flaky, max_backoff=0.2)
    want = expected_counts(events + more)
    run_until(second, lambda: counts(store) == want)
    settle(second, 1.0)
    assert counts(store) == want
    assert second.rows_inserted == len(more)


@pytest.mark.kafka
def test_aborted_transactions_are_not_projected(
    kafka_bootstrap: str, topics: Topics, store: Client, new_sink: Callable[..., Sink]
) -> None:
    tx = Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"tx-{uuid.uuid4().hex[:8]}"})
    tx.init_transactions(10)
    committed_events, aborted = make_events(10), make_events(10)
    for batch, commit in ((aborted, False), (committed_events, True)):
        tx.begin_transaction()
        for e in batch:
            tx.produce(topics.for_event(e.event_type), key=e.tenant.encode(), value=CODEC.encode(e))
        if commit:
            tx.commit_transaction(10)
        else:
            tx.abort_transaction(10)
    sink = new_sink()
    want = expected_counts(committed_events)
    run_until(sink, lambda: counts(store) == want)
    settle(sink, 0.5)
    assert counts(store) == want

    # Transaction markers are skipped, yet the group's lag still reaches 0 once idle.
    def lag_zero() -> bool:
        return sum(p.lag for p in group_lag(kafka_bootstrap, sink.group, topics.all())) == 0

    run_until(sink, lag_zero, timeout=10)


def _read(bootstrap: str, names: list[str], expect: int, timeout: float = 20.0) -> list[Any]:
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"r-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    c.subscribe(names)
    out: list[Any] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and len(out) < expect:
            m = c.poll(0.2)
            if m is not None and m.error() is None:
                out.append(m)
        end = time.monotonic() + 0.5  # a little longer: more than `expect` would be a bug
        while time.monotonic() < end:
            m = c.poll(0.1)
            if m is not None and m.error() is None:
                out.append(m)
        return out
    finally:
        c.close()


@pytest.mark.kafka
def test_two_sinks_share_partitions_and_hand_over_on_close(
    kafka_bootstrap: str, topics: Topics, store: Client, new_sink: Callable[..., Sink]
) -> None:
    """Scaling out and back in: rebalances flush on revoke and resume from ClickHouse on assign."""
    group = f"pair-{uuid.uuid4().hex[:6]}"
    a, b = new_sink(group=group), new_sink(group=group)
    total = sum(topics.partitions_of(t) for t in topics.all())

    def both_own_some() -> bool:
        owned = [len(s.status()["assigned"]) for s in (a, b)]
        return all(owned) and sum(owned) == total

    run_until([a, b], both_own_some)  # the group settled with both members before any traffic
    events = make_events(200)
    produce_events(kafka_bootstrap, topics, events)
    run_until([a, b], lambda: counts(store) == expected_counts(events))
    assert a.rows_inserted > 0 and b.rows_inserted > 0  # both got a share
    a.close()  # leaves the group: b takes every partition
    more = make_events(100)
    produce_events(kafka_bootstrap, topics, more)
    want = expected_counts(events + more)
    run_until(b, lambda: counts(store) == want)
    settle(b, 0.5)
    assert counts(store) == want
    assert len(b.status()["assigned"]) == total
