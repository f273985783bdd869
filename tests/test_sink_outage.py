"""The sink through an injected store outage (projections/faults.py), as the chaos run cuts it:
every store call fails for a while, events keep arriving, and afterwards all of them land once."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import cast

import pytest
from clickhouse_connect.driver.client import Client

from projections.faults import OutageClient, StoreOutage, StoreUnreachable
from projections.sink import Sink
from streams.topics import Topics
from tests.test_projections_sink import counts, expected_counts, make_events, produce_events, run_until, settle


def test_an_outage_refuses_every_call_until_it_ends() -> None:
    class Fake:
        def command(self, sql: str) -> str:
            return "ok"

        def close(self) -> None:
            pass

    outage = StoreOutage()
    client = OutageClient(Fake(), outage)
    assert client.command("SELECT 1") == "ok"
    outage.cut(0.3)
    with pytest.raises(StoreUnreachable, match="injected outage"):
        client.command("SELECT 1")
    client.close()  # closing is never refused
    time.sleep(0.35)
    assert client.command("SELECT 1") == "ok" and outage.refused_calls == 1
    with pytest.raises(ValueError, match="at most"):
        outage.cut(10_000)


@pytest.mark.kafka
def test_sink_rides_out_a_store_outage_while_events_arrive(
    kafka_bootstrap: str, topics: Topics, store: Client, new_sink: Callable[..., Sink]
) -> None:
    first, during = make_events(100), make_events(400)
    produce_events(kafka_bootstrap, topics, first)
    outage = StoreOutage()
    sink = new_sink(store_=cast(Client, OutageClient(store, outage)), max_backoff=1.0)
    run_until(sink, lambda: counts(store) == expected_counts(first))
    outage.cut(4.0)
    feeder = threading.Thread(target=produce_events, args=(kafka_bootstrap, topics, during))
    feeder.start()
    saw_paused = False
    end = time.monotonic() + 4.0
    while time.monotonic() < end:
        sink.poll_once(0.1)
        saw_paused = saw_paused or bool(sink.status()["paused"])
    feeder.join(30)
    assert saw_paused, sink.status()
    assert outage.refused_calls > 0
    want = expected_counts(first + during)
    run_until(sink, lambda: counts(store) == want, timeout=60)
    settle(sink, 1.0)
    assert counts(store) == want
    assert not sink.status()["paused"]
