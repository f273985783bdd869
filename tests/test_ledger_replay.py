"""Reading a chain back from the log: redelivered twins collapse, heads resume where the log ends."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from domain.ledger import ChainState, chain, verify_chain
from domain.ledger_replay import collapse_redeliveries, resume, resume_from
from streams.events import AuditRecorded, Envelope, LedgerEntryChained
from streams.ids import derived_uuid7, uuid7

T0 = datetime(2026, 11, 1, tzinfo=UTC)
ROOT = uuid7()


def audit(i: int, tenant: str = "acme") -> AuditRecorded:
    eid = str(derived_uuid7(ROOT, tenant, str(i)))
    return AuditRecorded(
        envelope=Envelope(
            event_id=eid, event_type="AuditRecorded", schema_version=1, tenant=tenant,
            occurred_at=T0 + timedelta(seconds=i), correlation_id=eid, producer="test",
        ),
        action="request.completed", actor="key-1", subject=f"req-{i}", outcome="success",
    )  # fmt: skip


def chained(n: int) -> tuple[ChainState, list[LedgerEntryChained]]:
    state: ChainState | None = None
    entries = []
    for i in range(n):
        state, entry = chain(state, audit(i), 0, i)
        assert entry is not None
        entries.append(entry)
    assert state is not None
    return state, entries


def test_resume_rebuilds_the_head_the_fold_had() -> None:
    head, entries = chained(37)
    rebuilt = resume("acme", entries)
    assert (rebuilt.size, rebuilt.last_hash, rebuilt.root, dict(rebuilt.offsets)) == (
        head.size, head.last_hash, head.root, dict(head.offsets),
    )  # fmt: skip
    # chaining on from the rebuilt head gives what chaining on from the original gives
    assert chain(rebuilt, audit(37), 0, 37) == chain(head, audit(37), 0, 37)


def test_resume_stops_at_a_gap_so_the_missing_records_are_chained_again() -> None:
    _, entries = chained(10)
    rebuilt = resume("acme", entries[:4] + entries[5:])
    assert rebuilt.size == 4 and rebuilt.offsets[0] == 3


def test_redelivered_twins_collapse_but_a_fork_does_not() -> None:
    _, entries = chained(5)
    twin = entries[2]
    assert collapse_redeliveries([*entries[:3], twin, *entries[3:]]) == entries
    fork = replace(entries[3], entry_hash="f" * 64)
    kept = collapse_redeliveries([*entries[:4], fork, entries[4]])
    assert len(kept) == 6
    report = verify_chain(kept)
    assert not report.ok and report.bad_seq == 3


def test_resume_keeps_checkpoint_progress_only_within_the_rebuilt_chain() -> None:
    head, entries = chained(8)
    signed = replace(head, checkpoint_size=8, pending_since=None)
    assert resume("acme", entries, signed).checkpoint_size == 8
    assert resume("acme", entries[:5], signed).checkpoint_size == 0


def test_resume_from_a_snapshot_and_the_tail_equals_resuming_the_whole_log() -> None:
    head, entries = chained(53)
    snapshot = resume("acme", entries[:20])
    # a tail overlapping the snapshot (as the worker reads it: from an earlier transaction on)
    for start in (20, 19, 12):
        assert resume_from(snapshot, entries[start:]) == resume("acme", entries), start
    assert resume_from(head, []) == head  # nothing after the snapshot: the snapshot itself
    assert resume_from(snapshot, entries[15:] + entries[30:35]) == resume("acme", entries)  # redelivered twins


def test_resume_from_refuses_a_stale_or_foreign_snapshot() -> None:
    _, entries = chained(53)
    snapshot = resume("acme", entries[:20])
    assert resume_from(snapshot, entries[25:]) is None  # seq 20-24 were never read: a gap
    forged = replace(entries[19], entry_hash="f" * 64)
    assert resume_from(snapshot, [forged, *entries[20:]]) is None  # the log's seq 19 is another entry
    other = replace(snapshot, last_hash="e" * 64)
    assert resume_from(other, entries[20:]) is None  # seq 20 does not link to the snapshot's head
