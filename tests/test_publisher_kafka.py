"""The transactional fact publisher against the real broker."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter

import pytest

from streams.codec import Codec
from streams.publisher import FactPublisher, PublishFailed
from streams.topics import Topics
from tests import factories
from tests.conftest import free_port
from tests.kafka_helpers import read_all

pytestmark = pytest.mark.kafka
CODEC = Codec()


async def test_each_call_lands_all_its_facts_once(kafka_bootstrap: str, topics: Topics) -> None:
    pub = FactPublisher(kafka_bootstrap, f"test-{topics.prefix}", topics)
    pub.start()
    try:
        calls = []
        for _ in range(60):
            req = factories.request()
            rid = req.envelope.correlation_id
            same_request = [
                dataclasses.replace(e, envelope=dataclasses.replace(e.envelope, correlation_id=rid))
                for e in (factories.charge(), factories.audit())
            ]
            calls.append([req, *same_request])
        await asyncio.gather(*(pub.publish(c, timeout=30) for c in calls))
    finally:
        pub.close()
    msgs = read_all(kafka_bootstrap, topics.facts(), expect=180)
    events = [CODEC.decode(m.value()) for m in msgs]
    assert len(events) == 180
    assert set(Counter(e.envelope.correlation_id for e in events).values()) == {3}
    assert {m.key() for m in msgs} == {b"acme"}
    by_type = Counter(m.topic() for m in msgs)
    assert by_type == {topics.name("requests"): 60, topics.name("token-charges"): 60, topics.name("audit"): 60}


async def test_unreachable_broker_fails_within_the_deadline() -> None:
    pub = FactPublisher(f"127.0.0.1:{free_port()}", "test-dead", Topics("dead."))
    pub.start()
    try:
        started = time.monotonic()
        with pytest.raises(PublishFailed, match=r"unreachable|timed out"):
            await pub.publish([factories.charge()], timeout=1.0)
        assert time.monotonic() - started < 1.6
        assert not pub.ready
    finally:
        pub.close(timeout=1)
