"""The sink's stall watchdog (`Sink(stall_s=...)`, issue 10): real broker, real chDB.

A partition whose position does not move while records wait is a wedged fetcher (the service
then builds a new consumer); an idle one, a record that just arrived, or a driver held back by
back-pressure never is; and the check never holds the driver up. The basic case (one partition
paused behind the sink's back) is in tests/test_sink_inserter.py.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import Producer

from projections.sink import Sink, SinkError
from streams.codec import Codec
from streams.topics import Topics
from tests import factories
from tests.test_projections_sink import counts, expected_counts, make_events, produce_events, run_until

CODEC = Codec()


@pytest.mark.kafka
def test_a_wedged_partition_is_reported_while_other_partitions_cause_back_pressure(
    kafka_bootstrap: str,
    topics: Topics,
    store: Client,
    new_sink: Callable[..., Sink],
) -> None:
    """As the repo's stall test, but another partition keeps receiving records while the sink is
    under back-pressure now and then (queue_max reached: here queue_max=1, in the service a sink
    behind its ingest). The windows must not restart whenever
    back-pressure held the driver (they did: a sink behind its ingest never reported a stall)."""
    events = make_events(60)
    produce_events(kafka_bootstrap, topics, events)
    sink = new_sink(stall_s=1.0)
    run_until(sink, lambda: counts(store) == expected_counts(events))
    charges = topics.name("token-charges")
    wedged = next(p for p in sink._parts.values() if p.topic == charges)
    other = next(p for p in sink._parts.values() if p.topic == charges and p.partition != wedged.partition)
    sink.queue_max = 1  # back-pressure whenever a run is queued (brief: the insert takes ms)
    sink._consumer.pause([wedged.tp])  # the fetcher stops; the sink still thinks it is reading
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(30):
        producer.produce(charges, CODEC.encode(factories.charge(tenant=f"w{i}")), b"x", partition=wedged.partition)
    assert producer.flush(30) == 0
    stop = threading.Event()

    def trickle() -> None:  # steady traffic on another partition
        i = 0
        while not stop.is_set():
            producer.produce(charges, CODEC.encode(factories.charge(tenant=f"o{i}")), b"y", partition=other.partition)
            producer.flush(5)
            i += 1
            stop.wait(0.3)

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 10  # stall_s is 1 s: without traffic elsewhere it fires in ~1.5 s
        with pytest.raises(SinkError, match=rf"no progress on {charges}\[{wedged.partition}\]"):
            while time.monotonic() < deadline:
                sink.poll_once(0.1)
    finally:
        stop.set()
        t.join()


@pytest.mark.kafka
def test_a_record_arriving_on_a_long_idle_partition_is_not_a_stall(
    kafka_bootstrap: str,
    topics: Topics,
    store: Client,
    new_sink: Callable[..., Sink],
) -> None:
    """A record produced just before an idle partition's window runs out (after the round's
    consume returned, before the fetcher delivered it) waited milliseconds: never a stall (it was
    one, before records waiting had to outlast a whole window). The check runs right after the
    produce, as poll_once runs it right after its consume."""
    events = make_events(30)
    produce_events(kafka_bootstrap, topics, events)
    sink = new_sink(stall_s=1.0)
    run_until(sink, lambda: counts(store) == expected_counts(events))
    charges = topics.name("token-charges")
    quiet = next(p for p in sink._parts.values() if p.topic == charges)
    key = (quiet.topic, quiet.partition)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # idle, every round asking for records, until the window is old
        sink.poll_once(0.05)
        seen = sink._watch.get(key)
        if seen is not None and time.monotonic() - seen.since >= 0.95:
            break
    time.sleep(0.06)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(charges, CODEC.encode(factories.charge(tenant="late")), b"z", partition=quiet.partition)
    assert producer.flush(30) == 0
    sink._watch_progress(time.monotonic())  # what poll_once runs after its consume (no record waited long)


@pytest.mark.kafka
def test_the_watchdog_does_not_freeze_the_driver_on_idle_partitions(
    kafka_bootstrap: str,
    topics: Topics,
    store: Client,
    new_sink: Callable[..., Sink],
) -> None:
    """Idle partitions' windows all run out together; their ends were asked one by one on the
    consumer's connection, each behind its long-poll fetch (~100 ms): an 8 s poll_once for the
    catalogue's 78 partitions. Now one ListOffsets request on an admin connection."""
    events = make_events(30)
    produce_events(kafka_bootstrap, topics, events)
    sink = new_sink(stall_s=1.0)
    run_until(sink, lambda: counts(store) == expected_counts(events))
    longest = 0.0
    end = time.monotonic() + 4.0
    while time.monotonic() < end:
        t0 = time.monotonic()
        sink.poll_once(0.05)
        longest = max(longest, time.monotonic() - t0)
    assert longest < 1.0, f"an idle sink's poll_once took {longest:.1f}s ({len(sink._parts)} partitions)"
