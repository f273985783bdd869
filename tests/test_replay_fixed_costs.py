"""Replay's fixed costs cut in session 7, held to the behaviour they replace.

- `LazyCodec`: the Sink's default Codec is compiled on the first decode, and `_knows` answers
  for the default writers without compiling it: every header it vouches for, a real Codec reads.
- A Sink handed a consumer that is already assigned (a replay prefetching during its
  migrations) keeps that assignment when step 1 moves nothing, and re-assigns from ClickHouse's
  resume point when it does: nothing doubled, nothing skipped (real broker, real chDB).
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import TopicPartition

from projections import avro_block
from projections.sink import LazyCodec, Sink, _knows, sink_consumer_config
from streams.clients import Consumer
from streams.codec import HEADER_LEN, MAGIC, Codec, PoisonEvent
from streams.topics import Topics
from tests.test_projections_sink import CODEC, counts, encoded, expected_counts, make_events, produce, run_until

# --- LazyCodec -------------------------------------------------------------------------------


def test_lazy_codec_vouches_only_for_headers_a_real_codec_reads() -> None:
    codec = Codec()
    lazy = LazyCodec()
    headers = avro_block.default_headers()
    assert headers == frozenset(avro_block.writers())
    assert len(headers) >= 10  # today's schemas and released ones
    for header in headers:
        assert _knows(lazy, header)
        assert _knows(codec, header), header.hex()  # the claim LazyCodec's shortcut rests on
    assert not lazy.compiled  # answered without compiling
    unknown = MAGIC + bytes(8)
    assert not _knows(lazy, unknown) and not _knows(codec, unknown)
    assert lazy.compiled  # a header it cannot vouch for is asked of the real Codec


def test_lazy_codec_decodes_as_the_codec_does() -> None:
    event = make_events(3)[2]
    data = CODEC.encode(event)
    lazy = LazyCodec()
    assert not lazy.compiled
    assert lazy.decode(data) == Codec().decode(data) == event
    assert lazy.compiled
    for bad in (b"not avro", None, data[:HEADER_LEN] + b"\xff"):
        with pytest.raises(PoisonEvent) as want:
            Codec().decode(bad)
        with pytest.raises(PoisonEvent) as got:
            lazy.decode(bad)
        assert got.value.reason == want.value.reason


# --- a pre-assigned consumer ---------------------------------------------------------------------


class _CountingConsumer(Consumer):
    """A real consumer that records its assign() calls (what the Sink did with the assignment)."""

    def __init__(self, conf: dict[str, Any]) -> None:
        super().__init__(conf)
        self.assigns: list[list[tuple[str, int, int]]] = []

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigns.append([(tp.topic, tp.partition, tp.offset) for tp in partitions])
        super().assign(partitions)


def _prefetching_sink(bootstrap: str, topics: Topics, store: Client) -> tuple[Sink, _CountingConsumer]:
    group = f"prefetch-{uuid.uuid4().hex[:8]}"
    consumer = _CountingConsumer(sink_consumer_config(bootstrap, group, {"enable.partition.eof": True}))
    start = {(t, p): 0 for t in topics.all() for p in range(3)}
    consumer.assign([TopicPartition(t, p, o) for (t, p), o in sorted(start.items())])
    sink = Sink(
        bootstrap, group, topics, store, batch_max=50, batch_ms=50, assign=start, commit=False, consumer=consumer
    )
    return sink, consumer


@pytest.mark.kafka
def test_a_prefetching_consumer_is_kept_or_moved_by_step_one(
    kafka_bootstrap: str, topics: Topics, store: Client, new_sink: Any
) -> None:
    stray = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"g-{uuid.uuid4().hex[:8]}"})
    with pytest.raises(ValueError, match="assign"):  # a consumer of its own only with the assignment it holds
        Sink(kafka_bootstrap, "g", topics, store, consumer=stray)
    stray.close()
    events = make_events(100)
    produce(kafka_bootstrap, encoded(topics, events[:60]))

    # Empty database: step 1 moves nothing, so the prefetched assignment stays (one assign: ours).
    sink, consumer = _prefetching_sink(kafka_bootstrap, topics, store)
    try:
        assert len(consumer.assigns) == 1
        run_until(sink, lambda: counts(store) == expected_counts(events[:60]))
    finally:
        sink.close()

    # ClickHouse holds 60: step 1 moves every start past what landed and re-assigns from there.
    produce(kafka_bootstrap, encoded(topics, events[60:]))
    sink, consumer = _prefetching_sink(kafka_bootstrap, topics, store)
    try:
        assert len(consumer.assigns) == 2
        moved = {(t, p): o for t, p, o in consumer.assigns[1]}
        assert sum(moved.values()) == 60  # each partition's start = the records of it already landed
        run_until(sink, lambda: sink.pending_rows() == 0 and counts(store) == expected_counts(events))
        assert sink.rows_inserted == 40  # only the new ones: nothing read twice
    finally:
        sink.close()
    assert counts(store) == expected_counts(events)
    distinct = int(str(store.command("SELECT uniqExact(event_id) FROM tokens_charged")))
    assert distinct == counts(store)["tokens_charged"]
