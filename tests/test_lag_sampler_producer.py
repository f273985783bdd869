"""The lag sampler replaces a producer that cannot deliver instead of queueing behind it forever."""

from __future__ import annotations

from projections.lag import LagSampler, WatchedGroup
from streams.admin import GroupDescription, PartitionOwner
from streams.topics import Topics
from tests.conftest import free_port


def _one_partition(_bootstrap: str, group: str, _topics: list[str]) -> GroupDescription:
    owner = PartitionOwner(group, "t.token-charges", 0, 5, 9, 4, "m-1", "c-1", "/127.0.0.1")
    return GroupDescription(group, "STABLE", 1, [owner])


def test_a_round_left_undelivered_is_purged_and_the_producer_replaced() -> None:
    topics = Topics("t.", 3)
    dead_broker = f"127.0.0.1:{free_port()}"  # nothing listens: every record stays queued
    sampler = LagSampler(
        dead_broker,
        topics,
        [WatchedGroup("g", ("t.token-charges",))],
        0.0,
        describe=_one_partition,
        flush_timeout_s=0.3,
    )
    first = sampler._producer
    try:
        assert sampler.run_once() == 0  # nothing acknowledged
        assert sampler._producer is not first  # a fresh producer for the next round
        assert first.flush(0.5) == 0  # the undelivered sample was purged, not left to be sent later
        second = sampler._producer
        assert sampler.run_once() == 0
        assert sampler._producer is not second and second.flush(0.5) == 0
    finally:
        sampler.close(timeout=1.0)
