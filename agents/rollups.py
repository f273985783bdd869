"""Agent: per-tenant, per-UTC-day, per-model savings rollups (SavingsSnapshotted), from TokensCharged.

I/O only: decode, look up the state, call the pure fold (`domain.rollups.fold`), store the
new state in a changelog-backed table, and send the derived event. Poison records are skipped
(the tenant-totals agent dead-letters them, once).
"""

from __future__ import annotations

import logging
from typing import Any

import faust
from mode import CrashingSupervisor

from domain.rollups import DailyTotals, fold, key_of
from streams.codec import Codec, PoisonEvent
from streams.events import TokensCharged
from streams.topics import Topics

log = logging.getLogger(__name__)
AGENT_NAME = "savings-rollups"


def register(app: faust.App, topics: Topics, codec: Codec) -> Any:
    source_name = topics.name("token-charges")
    source = app.topic(source_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    derived = app.topic(topics.name("savings-snapshots"), key_serializer="raw", value_serializer="raw")
    # Keys and values use the app's default JSON serializer (value_type=dict would make Faust
    # look for a Record's from_data during changelog recovery and never finish recovering).
    table = app.Table(f"{AGENT_NAME}-state", partitions=topics.partitions)

    # CrashingSupervisor: if the agent dies the whole worker exits, so the process
    # supervisor restarts it, instead of a worker that lives on with a dead agent.
    @app.agent(source, name=AGENT_NAME, concurrency=1, supervisor_strategy=CrashingSupervisor)
    async def savings_rollups(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            msg = event.message
            try:
                charge = codec.decode(msg.value)
                if not isinstance(charge, TokensCharged):
                    raise PoisonEvent("wrong-topic", f"{charge.event_type} on {source_name}")
            except PoisonEvent as exc:
                # Skipped, not dead-lettered: the tenant-totals agent dead-letters the records of
                # token-charges, so each poison record has one dead letter and a re-drive is not doubled.
                log.warning("%s: skipping %s record at %s/%s", AGENT_NAME, exc.reason, msg.partition, msg.offset)
                continue
            stored = table.get(key_of(charge))
            state = DailyTotals.from_json(stored) if stored else None
            try:
                new, out = fold(state, charge, msg.partition, msg.offset)
            except ValueError as exc:  # a valid event the fold refuses (a currency change): totals dead-letters it
                log.warning("%s: fold refused %s/%s: %s", AGENT_NAME, msg.partition, msg.offset, exc)
                continue
            if out is None:
                continue
            table[key_of(charge)] = new.to_json()
            # Produced at once (Faust's attach-to-offset mode, stream_publish_on_commit, never
            # publishes the last record before a transaction marker on read_committed topics).
            # Faust flushes the producer before each offset commit; a SIGKILL between the two
            # can still lose one snapshot, which is harmless here: every snapshot carries its
            # key's full totals, so the next one restores the projection. Redelivered
            # charges re-emit identical events (same id), which downstream collapses.
            await event.send(derived, key=charge.tenant.encode(), value=codec.encode(out), headers=[])

    return savings_rollups
