"""One shape for the agents that fold every TokensCharged into keyed state (rollups, anomalies).

I/O only: decode, look up the state by key, call the agent's pure fold, store the new state
in a changelog-backed table, and send the derived event. Poison records are skipped, not
dead-lettered: the tenant-totals agent dead-letters the records of token-charges, so each
poison record has one dead letter and a re-drive is not doubled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import faust
from mode import CrashingSupervisor

from streams.codec import Codec, PoisonEvent
from streams.events import Event, TokensCharged
from streams.topics import Topics

log = logging.getLogger(__name__)


class State(Protocol):
    def to_json(self) -> Any: ...


def register_charge_fold(
    app: faust.App,
    topics: Topics,
    codec: Codec,
    *,
    name: str,
    derived_topic: str,
    key_of: Callable[[TokensCharged], str],
    load: Callable[[Any], Any],
    fold: Callable[[Any, TokensCharged, int, int], tuple[State, Event | None]],
    store_every_charge: bool = False,
) -> Any:
    """Register agent `name`; `store_every_charge` for state that changes even when nothing is emitted."""
    source_name = topics.name("token-charges")
    source = app.topic(source_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    derived = app.topic(topics.name(derived_topic), key_serializer="raw", value_serializer="raw")
    # Keys and values use the app's default JSON serializer (value_type=dict would make Faust
    # look for a Record's from_data during changelog recovery and never finish recovering).
    table = app.Table(f"{name}-state", partitions=topics.partitions)

    # CrashingSupervisor: if the agent dies the whole worker exits, so the process
    # supervisor restarts it, instead of a worker that lives on with a dead agent.
    async def agent(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            msg = event.message
            try:
                charge = codec.decode(msg.value)
                if not isinstance(charge, TokensCharged):
                    raise PoisonEvent("wrong-topic", f"{charge.event_type} on {source_name}")
            except PoisonEvent as exc:
                log.warning("%s: skipping %s record at %s/%s", name, exc.reason, msg.partition, msg.offset)
                continue
            key = key_of(charge)
            stored = table.get(key)
            try:
                new, out = fold(load(stored) if stored else None, charge, msg.partition, msg.offset)
            except ValueError as exc:  # a valid event the fold refuses (a currency change): totals dead-letters it
                log.warning("%s: fold refused %s/%s: %s", name, msg.partition, msg.offset, exc)
                continue
            if store_every_charge or out is not None:
                table[key] = new.to_json()
            if out is None:
                continue
            # Produced at once (Faust's attach-to-offset mode, stream_publish_on_commit, never
            # publishes the last record before a transaction marker on read_committed topics).
            # A redelivered charge re-emits the identical event (same id), which downstream
            # collapses; a SIGKILL between send and commit can lose one, and the next event of
            # the same key carries the full state again.
            await event.send(derived, key=charge.tenant.encode(), value=codec.encode(out), headers=[])

    agent.__name__ = name.replace("-", "_")
    return app.agent(source, name=name, concurrency=1, supervisor_strategy=CrashingSupervisor)(agent)
