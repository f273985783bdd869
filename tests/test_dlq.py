"""Dead letters end to end on the real broker and chDB: list, refuse what still fails, re-drive once."""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from projections.sink import Sink
from streams.codec import Codec, PoisonEvent
from streams.deadletter import read_dlq, redrive
from streams.schemas import load_all
from streams.topics import Topics
from tests import factories
from tests.test_projections_sink import produce, produce_events, run_until

pytestmark = pytest.mark.kafka


def full_check(value: bytes | None) -> str | None:
    try:
        Codec().decode(value)
    except PoisonEvent as exc:
        return str(exc)
    return None


def rows(client: Client, table: str) -> int:
    return int(client.query(f"SELECT count() FROM {table}").result_rows[0][0])


def test_dead_letters_are_listed_and_redriven_once_after_the_fix(
    kafka_bootstrap: str,
    topics: Topics,
    store: Client,
    new_sink: Callable[..., Sink],
) -> None:
    # A sink deployed before TokensCharged's schema existed: every charge is poison to it.
    old_codec = Codec({k: v for k, v in load_all().items() if k != "TokensCharged"})
    charges = [factories.charge(cost=f"0.{i + 1}") for i in range(5)]
    produce_events(kafka_bootstrap, topics, [factories.request(), *charges])
    produce(kafka_bootstrap, [(topics.name("token-charges"), b"acme", b"\x00 not avro at all")])
    group = "sink-dlq"
    old: Any = new_sink(group=group, codec=old_codec)
    run_until(old, lambda: rows(store, "dead_letters") == 6 and rows(store, "request_received") == 1)
    old.close()

    letters = read_dlq(kafka_bootstrap, [topics.dlq(topics.name("token-charges"))])
    assert len(letters) == 6
    assert sorted({s.letter.reason for s in letters}) == ["not-single-object-encoding", "unknown-fingerprint"]
    assert all(s.letter.topic == topics.name("token-charges") for s in letters)

    # The fix is deployed (today's codec knows the schema): re-drive what now decodes.
    results = redrive(kafka_bootstrap, letters, topics.redrives(), full_check)
    outcomes = sorted(r.outcome for r in results)
    assert outcomes == ["redriven"] * 5 + ["still-poison"]
    again = redrive(kafka_bootstrap, letters, topics.redrives(), full_check)
    assert sorted(r.outcome for r in again) == ["already-redriven"] * 5 + ["still-poison"]

    fixed = new_sink(group=group)  # same group, today's codec: resumes where the old one stopped
    run_until(fixed, lambda: rows(store, "tokens_charged") == 5)
    assert rows(store, "tokens_charged") == 5  # each charge once, although redrive ran twice
    got = sorted(Decimal(r[0]) for r in store.query("SELECT cost FROM tokens_charged").result_rows)
    assert got == sorted(c.cost for c in charges)
