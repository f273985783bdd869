"""One shape for the agents that fold every TokensCharged into keyed state (rollups, anomalies).

I/O only: decode, look up the state by key, call the agent's pure fold, store the new state
in a changelog-backed table, and send the derived event. Poison records are skipped, not
dead-lettered: the tenant-totals agent dead-letters the records of token-charges, so each
poison record has one dead letter and a re-drive is not doubled.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, MutableMapping
from typing import Any, Protocol

import faust
from mode import CrashingSupervisor

from agents.metrics import metrics_of
from streams import telemetry
from streams.codec import Codec, PoisonEvent
from streams.events import Event, TokensCharged
from streams.topics import CATALOGUE, Topics

log = logging.getLogger(__name__)


class State(Protocol):
    def to_json(self) -> Any: ...


# How a fold's state is kept in its table: restore(table, key) -> state or None, and
# save(table, key, old, new). The default is one table value per key, `to_json()` / `load`.
Restore = Callable[[MutableMapping[Any, Any], str], Any]
Save = Callable[[MutableMapping[Any, Any], str, Any, Any], None]


def register_charge_fold(
    app: faust.App,
    topics: Topics,
    codec: Codec,
    *,
    name: str,
    derived_topic: str,
    key_of: Callable[[Any], str],
    load: Callable[[Any], Any],
    fold: Callable[[Any, Any, int, int], tuple[Any, Event | tuple[Event, ...] | None]],
    store_every_charge: bool = False,
    restore: Restore | None = None,
    save: Save | None = None,
    source_topic: str = "token-charges",
    accepts: type[Event] = TokensCharged,
) -> Any:
    """Register agent `name`; `store_every_charge` for state that changes even when nothing is emitted;
    `restore`/`save` for state stored in more than one table value (see agents/anomalies.py).

    `source_topic`/`accepts`: the same shape over another tenant-keyed fact topic (budget-holds
    for the forecast); its other event types are passed over, not poison. A fold may emit
    several events (a tuple), sent in order."""

    def restore_one(table: MutableMapping[Any, Any], key: str) -> Any:
        stored = table.get(key)
        return load(stored) if stored else None

    def save_one(table: MutableMapping[Any, Any], key: str, old: Any, new: Any) -> None:
        table[key] = new.to_json()

    restore_state = restore or restore_one
    save_state = save or save_one
    source_name = topics.name(source_topic)
    others = {e for spec in CATALOGUE if spec.key == source_topic for e in spec.events} - {accepts.__name__}
    source = app.topic(source_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    derived = app.topic(topics.name(derived_topic), key_serializer="raw", value_serializer="raw")
    # Keys and values use the app's default JSON serializer (value_type=dict would make Faust
    # look for a Record's from_data during changelog recovery and never finish recovering).
    table = app.Table(f"{name}-state", partitions=topics.partitions)

    # CrashingSupervisor: if the agent dies the whole worker exits, so the process
    # supervisor restarts it, instead of a worker that lives on with a dead agent.
    async def agent(stream: faust.StreamT[bytes]) -> None:
        tracked = metrics_of(app).tracker(name)  # issue 11: events by outcome, time per event
        async for event in tracked.events(stream):
            msg = event.message
            # issue 11: one span per event, child of the request that recorded it (the record's traceparent)
            with telemetry.consume_span(name, msg.topic, msg.partition, msg.offset, msg.headers):
                try:
                    charge = codec.decode(msg.value)
                    if not isinstance(charge, accepts):
                        if charge.event_type in others:  # another fact of the same topic: not ours
                            tracked.outcome = "unchanged"
                            continue
                        raise PoisonEvent("wrong-topic", f"{charge.event_type} on {source_name}")
                except PoisonEvent as exc:
                    tracked.outcome = "skipped"
                    log.warning("%s: skipping %s record at %s/%s", name, exc.reason, msg.partition, msg.offset)
                    continue
                key = key_of(charge)
                old = restore_state(table, key)
                try:
                    new, out = fold(old, charge, msg.partition, msg.offset)
                except ValueError as exc:  # a valid event the fold refuses (a currency change): totals dead-letters it
                    tracked.outcome = "skipped"
                    log.warning("%s: fold refused %s/%s: %s", name, msg.partition, msg.offset, exc)
                    continue
                if out == ():
                    out = None
                if (store_every_charge and new is not old) or out is not None:
                    save_state(table, key, old, new)
                if out is None:
                    tracked.outcome = "unchanged" if new is old else "ok"
                    continue
                # Produced at once (Faust's attach-to-offset mode, stream_publish_on_commit, never
                # publishes the last record before a transaction marker on read_committed topics).
                # A redelivered charge re-emits the identical event (same id), which downstream
                # collapses; a SIGKILL between send and commit can lose one, and the next event of
                # the same key carries the full state again.
                for one in out if isinstance(out, tuple) else (out,):
                    await event.send(
                        derived, key=charge.tenant.encode(), value=codec.encode(one), headers=telemetry.inject()
                    )

    agent.__name__ = name.replace("-", "_")
    return app.agent(source, name=name, concurrency=1, supervisor_strategy=CrashingSupervisor)(agent)
