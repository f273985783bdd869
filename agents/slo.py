"""Agent: error-budget burn-rate alerts (SloBurnRateAlerted), from RequestCompleted.

I/O only, the shape of `agents/charge_folds.py` on another source: decode, look up the
tenant's counters, call the pure `domain.slo.fold`, store the counters in a changelog-backed
table (co-partitioned with `request-completions`, keyed by tenant), and send each alert
transition. The counters change with every record, so they are stored every time.

Why per tenant: a tenant's records are in one partition, in log order, so the fold sees the
same sequence on every replay and emits the same transitions with the same ids (derived from
the record that caused them). A platform-wide fold would depend on how partitions interleave.
Platform-wide burn is the `slo_burn` projection in ClickHouse (sum over tenants).

At-least-once like the other Faust agents: a redelivered record is skipped by the fold (it
remembers the last offset applied); an alert re-sent after a crash carries the same event id.
Poison records are skipped (the sink dead-letters the same records).
"""

from __future__ import annotations

import logging
from typing import Any

import faust
from mode import CrashingSupervisor

from domain.slo import SloState, fold
from streams.codec import Codec, PoisonEvent
from streams.events import RequestCompleted
from streams.topics import Topics

AGENT_NAME = "slo-burn"
log = logging.getLogger(__name__)


def register(app: faust.App, topics: Topics, codec: Codec) -> Any:
    source_name = topics.name("request-completions")
    source = app.topic(source_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    derived = app.topic(topics.name("slo-alerts"), key_serializer="raw", value_serializer="raw")
    # JSON values through the app's default serializer (see agents/charge_folds.py for why not value_type=dict).
    table = app.Table(f"{AGENT_NAME}-state", partitions=topics.partitions)

    # CrashingSupervisor: a dead agent ends the worker, so the process supervisor restarts it.
    async def slo_burn(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            msg = event.message
            try:
                completed = codec.decode(msg.value)
                if not isinstance(completed, RequestCompleted):
                    raise PoisonEvent("wrong-topic", f"{completed.event_type} on {source_name}")
            except PoisonEvent as exc:
                log.warning("%s: skipping %s record at %s/%s", AGENT_NAME, exc.reason, msg.partition, msg.offset)
                continue
            stored = table.get(completed.tenant)
            state, alerts = fold(SloState.from_json(stored) if stored else None, completed, msg.partition, msg.offset)
            table[completed.tenant] = state.to_json()
            for alert in alerts:  # produced at once, as in charge_folds (read_committed + attach mode)
                await event.send(derived, key=completed.tenant.encode(), value=codec.encode(alert), headers=[])

    return app.agent(source, name=AGENT_NAME, concurrency=1, supervisor_strategy=CrashingSupervisor)(slo_burn)
