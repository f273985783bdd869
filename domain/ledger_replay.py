"""Reading a chain back from the log: collapse redelivered entries, rebuild the chain head.

The chaining agent is at-least-once: after a crash it can produce an entry a second time,
with the same event id, seq and hash. Such twins are one entry; two *different* entries with
one seq are not twins and stay, so `verify_chain` reports them. The log of entries is also
enough to rebuild a chain head (`resume`), which is how the agent repairs a head its table
restored ahead of, or behind, what actually reached the ledger topic.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import datetime
from typing import NamedTuple, TypeVar

from domain.ledger import ChainState, EntryLike, entry_bytes
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


# LoggedEntry's fields as paths in LedgerEntryChained's Avro record, in its order
LOGGED_ENTRY_FIELDS = (
    "chain_tenant", "seq", "prev_hash", "audit_event_id", "audit_sha256", "entry_hash",
    "source_partition", "source_offset", "envelope.event_id", "envelope.occurred_at",
)  # fmt: skip


class LoggedEntry(NamedTuple):
    """What a head rebuild needs of one LedgerEntryChained: read from the log's Avro record
    without building the event (the rebuild reads every entry of a partition)."""

    chain_tenant: str
    seq: int
    prev_hash: str
    audit_event_id: str
    audit_sha256: str
    entry_hash: str
    source_partition: int
    source_offset: int
    event_id: str
    occurred_at: datetime

    @classmethod
    def of(cls, e: LedgerEntryChained) -> LoggedEntry:
        return cls(
            e.chain_tenant, e.seq, e.prev_hash, e.audit_event_id, e.audit_sha256, e.entry_hash,
            e.source_partition, e.source_offset, e.envelope.event_id, e.envelope.occurred_at,
        )  # fmt: skip


def resume(
    tenant: str, entries: Iterable[LedgerEntryChained | LoggedEntry], head: ChainState | None = None
) -> ChainState:
    """The chain head after `entries` (log order), continuing the contiguous run from seq 0.

    Stops at the first entry that does not extend the chain (a gap or a foreign entry): the
    head then points there, so the agent chains the missing audit records again. Checkpoint
    progress is kept from `head` where it is not beyond the rebuilt size.
    """
    sha256 = hashlib.sha256
    size = 0
    last_hash = ChainState(tenant=tenant).last_hash
    frontier: list[bytes] = []
    offsets: dict[int, int] = {}
    last_event_id: str | None = None
    last_occurred_at: datetime | None = None
    signed = head.checkpoint_size if head is not None else 0
    first_time: dict[int, datetime] = {}  # event time of seq 0 and of the first seq after the last checkpoint
    seen: set[tuple[int, str]] = set()  # redelivered twins: each (seq, entry_hash) once
    for raw in entries:
        e = raw if type(raw) is LoggedEntry else LoggedEntry.of(raw)  # type: ignore[arg-type]
        twin = (e.seq, e.entry_hash)
        if twin in seen:
            continue
        seen.add(twin)
        if e.chain_tenant != tenant or e.seq != size or e.prev_hash != last_hash:
            if e.seq < size:
                continue
            break
        if e.seq in (0, signed):
            first_time[e.seq] = e.occurred_at
        partition = e.source_partition
        offsets[partition] = max(offsets.get(partition, -1), e.source_offset)
        h = sha256(b"\x00" + entry_bytes(e.chain_tenant, e.seq, e.prev_hash, e.audit_event_id, e.audit_sha256)).digest()
        carry = size
        while carry & 1:
            h = sha256(b"\x01" + frontier.pop() + h).digest()
            carry >>= 1
        frontier.append(h)
        size += 1
        last_hash = e.entry_hash
        last_event_id = e.event_id
        last_occurred_at = e.occurred_at
    checkpointed = signed if 0 < signed <= size else 0
    pending = first_time.get(checkpointed) if size > checkpointed else None
    return ChainState(
        tenant=tenant,
        size=size,
        last_hash=last_hash,
        frontier=tuple(frontier),
        offsets=offsets,
        last_event_id=last_event_id,
        last_occurred_at=last_occurred_at,
        checkpoint_size=checkpointed,
        pending_since=pending,
    )


def resume_from(snapshot: ChainState, entries: Iterable[LedgerEntryChained | LoggedEntry]) -> ChainState | None:
    """The chain head after `snapshot` and the log's `entries` written after it (log order), or
    None when the two do not fit together (the snapshot is stale or not of this log).

    Entries the snapshot already covers are skipped, except that the one at seq size - 1, if
    present, must carry the snapshot's last hash; the first entry beyond the snapshot must be
    seq `size` linked to that hash, and the rest continue as in `resume` (stopping at the first
    entry that does not extend the chain). A head rebuilt this way reads only the log's tail.
    """
    tenant = snapshot.tenant
    size = snapshot.size
    last_hash = snapshot.last_hash
    frontier = list(snapshot.frontier)
    offsets = dict(snapshot.offsets)
    last_event_id = snapshot.last_event_id
    last_occurred_at = snapshot.last_occurred_at
    pending = snapshot.pending_since
    sha256 = hashlib.sha256
    seen: set[tuple[int, str]] = set()
    extended = False
    for raw in entries:
        e = raw if type(raw) is LoggedEntry else LoggedEntry.of(raw)  # type: ignore[arg-type]
        if e.chain_tenant != tenant:
            continue
        twin = (e.seq, e.entry_hash)
        if twin in seen:
            continue
        seen.add(twin)
        if e.seq < size:
            if e.seq == size - 1 and not extended and e.entry_hash != last_hash:
                return None  # the log's entry at the snapshot's head is another one
            continue
        if e.seq != size or e.prev_hash != last_hash:
            if not extended:
                return None  # entries between the snapshot and this tail were not read
            break
        partition = e.source_partition
        offsets[partition] = max(offsets.get(partition, -1), e.source_offset)
        h = sha256(b"\x00" + entry_bytes(e.chain_tenant, e.seq, e.prev_hash, e.audit_event_id, e.audit_sha256)).digest()
        carry = size
        while carry & 1:
            h = sha256(b"\x01" + frontier.pop() + h).digest()
            carry >>= 1
        frontier.append(h)
        size += 1
        last_hash = e.entry_hash
        last_event_id = e.event_id
        last_occurred_at = e.occurred_at
        if pending is None:
            pending = e.occurred_at
        extended = True
    return ChainState(
        tenant=tenant,
        size=size,
        last_hash=last_hash,
        frontier=tuple(frontier),
        offsets=offsets,
        last_event_id=last_event_id,
        last_occurred_at=last_occurred_at,
        checkpoint_size=snapshot.checkpoint_size,
        pending_since=pending,
    )
