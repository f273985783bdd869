"""Agent: per-tenant running totals of requests and cost, from TokensCharged.

I/O only: decode, look up the tenant's state, call the pure `domain.totals.fold`, store the
new state in a changelog-backed table, and send the derived event. Poison records go to the
dead-letter topic and the agent moves on.
"""

from __future__ import annotations

from typing import Any

import faust
from mode import CrashingSupervisor

from agents.deadletters import dead_letter
from agents.metrics import metrics_of
from domain.totals import TenantTotals, fold
from streams import telemetry
from streams.codec import Codec, PoisonEvent
from streams.events import TokensCharged
from streams.topics import Topics

AGENT_NAME = "tenant-totals"


def register(app: faust.App, topics: Topics, codec: Codec) -> Any:
    source_name = topics.name("token-charges")
    source = app.topic(source_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    derived = app.topic(topics.name("tenant-totals"), key_serializer="raw", value_serializer="raw")
    dead = app.topic(topics.dlq(source_name), key_serializer="raw", value_serializer="raw")
    # Keys and values use the app's default JSON serializer (value_type=dict would make Faust
    # look for a Record's from_data during changelog recovery and never finish recovering).
    table = app.Table(f"{AGENT_NAME}-state", partitions=topics.partitions)

    # CrashingSupervisor: if the agent dies the whole worker exits, so the process
    # supervisor restarts it, instead of a worker that lives on with a dead agent.
    @app.agent(source, name=AGENT_NAME, concurrency=1, supervisor_strategy=CrashingSupervisor)
    async def tenant_totals(stream: faust.StreamT[bytes]) -> None:
        tracked = metrics_of(app).tracker(AGENT_NAME)  # issue 11: events by outcome, time per event
        async for event in tracked.events(stream):
            msg = event.message
            # issue 11: one span per event, child of the request that recorded it (the record's traceparent)
            with telemetry.consume_span(AGENT_NAME, msg.topic, msg.partition, msg.offset, msg.headers):
                try:
                    charge = codec.decode(msg.value)
                    if not isinstance(charge, TokensCharged):
                        raise PoisonEvent("wrong-topic", f"{charge.event_type} on {source_name}")
                except PoisonEvent as exc:
                    tracked.outcome = "dead_letter"
                    await dead_letter(event, dead, AGENT_NAME, exc.reason, exc.detail)
                    continue
                stored = table.get(charge.tenant)
                state = TenantTotals.from_json(stored) if stored else None
                try:
                    new, out = fold(state, charge, msg.partition, msg.offset)
                except ValueError as exc:  # a valid event the fold refuses (e.g. a currency change)
                    tracked.outcome = "dead_letter"
                    await dead_letter(event, dead, AGENT_NAME, "fold-refused", str(exc))
                    continue
                if out is None:
                    tracked.outcome = "unchanged"
                    continue
                table[charge.tenant] = new.to_json()
                # Produced at once (Faust's attach-to-offset mode, stream_publish_on_commit, never
                # publishes the last record before a transaction marker on read_committed topics).
                # Faust flushes the producer before each offset commit; a SIGKILL between the two
                # can still lose one update, which is harmless here: every update carries the
                # tenant's full running totals, so the next one restores the projection. Redelivered
                # charges re-emit identical events (same id), which downstream collapses.
                await event.send(
                    derived, key=charge.tenant.encode(), value=codec.encode(out), headers=telemetry.inject()
                )

    return tenant_totals
