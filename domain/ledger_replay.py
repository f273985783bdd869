"""Reading a chain back from the log: collapse redelivered entries, rebuild the chain head.

The chaining agent is at-least-once: after a crash it can produce an entry a second time,
with the same event id, seq and hash. Such twins are one entry; two *different* entries with
one seq are not twins and stay, so `verify_chain` reports them. The log of entries is also
enough to rebuild a chain head (`resume`), which is how the agent repairs a head its table
restored ahead of, or behind, what actually reached the ledger topic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime
from typing import TypeVar

from domain.ledger import ChainState, EntryLike, entry_bytes_of
from domain.merkle import frontier_append, leaf_hash
from streams.events import LedgerEntryChained

E = TypeVar("E", bound=EntryLike)


def collapse_redeliveries(entries: Iterable[E]) -> list[E]:
    """Entries in the order given, each (seq, entry_hash) pair once."""
    seen: set[tuple[int, str]] = set()
    out = []
    for e in entries:
        key = (e.seq, e.entry_hash)
        if key not in seen:
            seen.add(key)
            out.append(e)
    return out


def resume(tenant: str, entries: Iterable[LedgerEntryChained], head: ChainState | None = None) -> ChainState:
    """The chain head after `entries` (log order), continuing the contiguous run from seq 0.

    Stops at the first entry that does not extend the chain (a gap or a foreign entry): the
    head then points there, so the agent chains the missing audit records again. Checkpoint
    progress is kept from `head` where it is not beyond the rebuilt size.
    """
    state = ChainState(tenant=tenant)
    offsets: dict[int, int] = {}
    signed = head.checkpoint_size if head is not None else 0
    first_time: dict[int, datetime] = {}  # event time of seq 0 and of the first seq after the last checkpoint
    for e in collapse_redeliveries(entries):
        if e.chain_tenant != tenant or e.seq != state.size or e.prev_hash != state.last_hash:
            if e.seq < state.size:
                continue
            break
        if e.seq in (0, signed):
            first_time[e.seq] = e.envelope.occurred_at
        offsets[e.source_partition] = max(offsets.get(e.source_partition, -1), e.source_offset)
        state = replace(
            state,
            size=state.size + 1,
            last_hash=e.entry_hash,
            frontier=frontier_append(state.frontier, state.size, leaf_hash(entry_bytes_of(e))),
            offsets=dict(offsets),
            last_event_id=e.envelope.event_id,
            last_occurred_at=e.envelope.occurred_at,
        )
    checkpointed = signed if 0 < signed <= state.size else 0
    pending = first_time.get(checkpointed) if state.size > checkpointed else None
    return replace(state, checkpoint_size=checkpointed, pending_since=pending)
