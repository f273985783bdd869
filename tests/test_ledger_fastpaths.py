"""The ledger's fast paths give exactly what the reference paths give.

Chaining (`ChainHead.append`, `derived_id`, entries built without their `__init__`) against
the pure fold `chain()` and `Envelope.caused_by`; reading the log (`compile_extractor`,
`audit_canonical_bytes_from_record`, `resume` over `LoggedEntry`) against decoding whole
events; proofs from a kept tree against proofs from the entries. Hashes, roots, ids and
encoded bytes must be identical, or a replay would not be deterministic.
"""

from __future__ import annotations

import copy
import pickle
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.checkpoint import generate_key
from domain.ledger import (
    ChainHead,
    ChainState,
    audit_canonical_bytes,
    audit_canonical_bytes_from_record,
    build_inclusion_proof_file,
    chain,
    check_proof_file,
    checkpoint_due,
    derived_id,
    make_checkpoint,
    tree_of,
)
from domain.ledger_replay import LOGGED_ENTRY_FIELDS, LoggedEntry, resume
from ledgerflow.audit import ENTRY_FIELDS, Chain, prove
from streams.codec import Codec
from streams.events import AuditRecorded, Envelope, LedgerEntryChained
from streams.ids import derived_uuid7, uuid7
from streams.log_scan import AvroDecodeError, NotCompilable, RecordReaders, compile_extractor
from streams.schemas import load_all

FAST = Codec()
REF = Codec(fast=False)
KEY = generate_key("ledgerflow.test/audit")
T0 = datetime(2026, 11, 29, tzinfo=UTC)
SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=30)


def audit(i: int, tenant: str = "acme", **changes: object) -> AuditRecorded:
    eid = str(derived_uuid7("01930000-0000-7000-8000-000000000000", tenant, str(i)))
    record = AuditRecorded(
        envelope=Envelope(
            event_id=eid, event_type="AuditRecorded", schema_version=1, tenant=tenant,
            occurred_at=T0 + timedelta(microseconds=i * 1001), correlation_id=eid, producer="gateway",
            trace_parent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01" if i % 2 else None,
            causation_id=None if i % 3 else eid,
        ),
        action="request.completed", actor=f"key-{i % 7}", subject=f"req-{i}", outcome="success",
        details={"model": "sim-small", "n": str(i)} if i % 4 else {},
    )  # fmt: skip
    return replace(record, **changes) if changes else record  # type: ignore[arg-type]


# --- ids ------------------------------------------------------------------------------------

ID_SHAPES = st.uuids().flatmap(
    lambda u: st.sampled_from([str(u), str(u).upper(), "{" + str(u) + "}", u.hex, f"urn:uuid:{u}"])
)


@SETTINGS
@given(parent=ID_SHAPES, parts=st.lists(TEXT, max_size=3))
def test_derived_id_is_derived_uuid7_as_text(parent: str, parts: list[str]) -> None:
    assert derived_id(parent, *parts) == str(derived_uuid7(parent, *parts))


def test_derived_id_of_a_uuid7_keeps_its_millisecond_prefix() -> None:
    parent = str(uuid7(1_790_000_000_123))
    child = uuid.UUID(derived_id(parent, "LedgerEntryChained", "7"))
    assert child.version == 7 and child.int >> 80 == 1_790_000_000_123


# --- chaining -------------------------------------------------------------------------------


def test_chain_head_gives_the_folds_entries_states_checkpoints_and_bytes() -> None:
    """Two tenants over two partitions, redeliveries, a time-triggered and count-triggered
    checkpoint: the in-place head and the pure fold agree at every step."""
    records = [(audit(i, "acme" if i % 3 else "globex"), i % 2, i // 2) for i in range(300)]
    states: dict[str, ChainState] = {}
    heads: dict[str, ChainHead] = {}
    for k, (record, partition, offset) in enumerate(records + records[40:60]):  # the tail: redeliveries
        tenant = record.tenant
        state, entry = chain(states.get(tenant), record, partition, offset)
        head = heads.setdefault(tenant, ChainHead(tenant))
        fast = head.append(record, partition, offset)
        assert fast == entry
        if entry is not None:
            assert type(fast) is LedgerEntryChained and type(fast.envelope) is Envelope
            assert entry.envelope == record.envelope.caused_by(
                "LedgerEntryChained", "agent:audit-ledger", str(entry.seq)
            )
            assert FAST.encode(entry) == REF.encode(entry)
            assert REF.decode(FAST.encode(entry)) == entry
        assert head.state() == state
        now = record.envelope.occurred_at + timedelta(seconds=k % 50)
        due = checkpoint_due(state, now, 64, 45.0)
        assert head.due(now, 64, 45.0) == due
        if due:
            state, signed = make_checkpoint(state, KEY, f"ledgerflow.test/{tenant}")
            assert head.checkpoint(KEY, f"ledgerflow.test/{tenant}") == signed
            assert head.state() == state and FAST.encode(signed) == REF.encode(signed)
        states[tenant] = state
    assert {t: s.size for t, s in states.items()} == {"acme": 200, "globex": 100}


def test_a_chain_head_from_a_state_and_a_copy_continue_alike_and_independently() -> None:
    state: ChainState | None = None
    for i in range(13):
        state, _ = chain(state, audit(i), 0, i)
    assert state is not None
    head = ChainHead.from_state(state)
    twin = head.copy()
    assert head.append(audit(13), 0, 13) == chain(state, audit(13), 0, 13)[1]
    assert twin.state() == state  # the copy did not move
    assert twin.append(audit(13), 0, 13) == chain(state, audit(13), 0, 13)[1]
    with pytest.raises(ValueError, match="offered to the chain"):
        head.append(audit(14, "globex"), 0, 14)
    assert head.size == 14


def test_entries_built_without_init_are_ordinary_frozen_events() -> None:
    _, entry = chain(None, audit(0), 0, 0)
    assert entry is not None
    reference = LedgerEntryChained(
        envelope=audit(0).envelope.caused_by("LedgerEntryChained", "agent:audit-ledger", "0"),
        chain_tenant=entry.chain_tenant, seq=0, entry_hash=entry.entry_hash, prev_hash=entry.prev_hash,
        audit_event_id=entry.audit_event_id, audit_sha256=entry.audit_sha256, source_partition=0, source_offset=0,
    )  # fmt: skip
    assert entry == reference and hash(entry) == hash(reference) and repr(entry) == repr(reference)
    assert pickle.loads(pickle.dumps(entry)) == entry and copy.deepcopy(entry) == entry
    with pytest.raises(AttributeError):
        entry.seq = 5  # type: ignore[misc]


# --- reading the log --------------------------------------------------------------------------

TIMES = st.datetimes(datetime(2020, 1, 1), datetime(2026, 11, 1), timezones=st.just(UTC))  # decode refuses the future


@SETTINGS
@given(
    at=TIMES | TIMES.map(lambda t: t.replace(microsecond=0)),
    details=st.dictionaries(TEXT, TEXT, max_size=4),
    text=TEXT,
    trace=st.none() | TEXT,
)
def test_audit_records_read_as_fields_hash_as_the_decoded_event(
    at: datetime, details: dict[str, str], text: str, trace: str | None
) -> None:
    record = audit(1, actor=text, details=details)
    record = replace(record, envelope=replace(record.envelope, occurred_at=at, trace_parent=trace, producer=text))
    canonical = audit_canonical_bytes(record)
    assert audit_canonical_bytes_from_record(record.to_record()) == canonical
    got = RecordReaders({"AuditRecorded": None}).read(FAST.encode(record))
    assert got is not None and got[0] == "AuditRecorded"
    assert audit_canonical_bytes_from_record(got[1]) == canonical
    fields = ("envelope.event_id", "envelope.occurred_at", "envelope.trace_parent", "actor", "details")
    taken = RecordReaders({"AuditRecorded": fields}).read(FAST.encode(record))
    assert taken == ("AuditRecorded", (record.envelope.event_id, at, trace, text, details))
    decoded = FAST.decode(FAST.encode(record))
    assert isinstance(decoded, AuditRecorded) and got[1] == decoded.to_record()


def test_entries_read_as_fields_are_the_decoded_events_fields() -> None:
    state = None
    readers = RecordReaders({"LedgerEntryChained": LOGGED_ENTRY_FIELDS, "AuditRecorded": ("envelope.tenant",)})
    for i in range(50):
        state, entry = chain(state, audit(i), 1, 1000 + i)
        assert entry is not None
        value = FAST.encode(entry)
        got = readers.read(value)
        assert got is not None and got[0] == "LedgerEntryChained"
        assert LoggedEntry._make(got[1]) == LoggedEntry.of(REF.decode(value))  # type: ignore[arg-type]
        verify_fields = RecordReaders({"LedgerEntryChained": ENTRY_FIELDS}).read(value)
        assert verify_fields == ("LedgerEntryChained", ("acme", *LoggedEntry.of(entry)[:6]))
    assert readers.read(FAST.encode(audit(3, "initech"))) == ("AuditRecorded", ("initech",))
    assert readers.read(b"\xc3\x01" + b"\x00" * 8 + b"rest") is None  # another schema: the caller decodes it
    assert readers.read(None) is None


def test_a_corrupted_body_is_refused_not_misread() -> None:
    _, entry = chain(None, audit(0), 0, 0)
    assert entry is not None
    good = FAST.encode(entry)
    readers = RecordReaders({"LedgerEntryChained": LOGGED_ENTRY_FIELDS})
    for cut in range(10, len(good)):
        with pytest.raises(AvroDecodeError):
            readers.read(good[:cut])
    with pytest.raises(AvroDecodeError):
        readers.read(good + b"\x00")
    hash_at = good.index(entry.entry_hash.encode())
    with pytest.raises(AvroDecodeError):  # a non-UTF-8 byte in a field that is taken
        readers.read(good[:hash_at] + b"\xff" + good[hash_at + 1 :])


def test_an_extractor_refuses_fields_it_cannot_take() -> None:
    schemas = load_all()
    with pytest.raises(NotCompilable):
        compile_extractor(schemas["LedgerEntryChained"].parsed, ["no_such_field"])
    with pytest.raises(NotCompilable):
        compile_extractor(schemas["LedgerEntryChained"].parsed, ["envelope"])
    with pytest.raises(NotCompilable):
        compile_extractor(schemas["TokensCharged"].parsed, ["cost"])  # a decimal


def test_resume_over_logged_entries_is_resume_over_events() -> None:
    state: ChainState | None = None
    entries = []
    for i in range(77):
        state, entry = chain(state, audit(i), 2, 5 * i)
        assert entry is not None
        entries.append(entry)
    assert state is not None
    signed = replace(state, checkpoint_size=64, pending_since=None)
    logged = [LoggedEntry.of(e) for e in entries]
    for head in (None, signed):
        assert resume("acme", logged, head) == resume("acme", entries, head)
    assert resume("acme", logged) == replace(state, pending_since=entries[0].envelope.occurred_at)


# --- proofs -----------------------------------------------------------------------------------


def test_proofs_from_the_kept_tree_are_the_proofs_from_the_entries() -> None:
    state: ChainState | None = None
    c = Chain("acme")
    for i in range(300):
        record = audit(i)
        state, entry = chain(state, record, 0, i)
        assert entry is not None
        c.entries.append(entry)
        c.audits[record.envelope.event_id] = audit_canonical_bytes(record) if i % 2 else record
        if entry.seq + 1 in (100, 256):
            state, signed = make_checkpoint(state, KEY, "ledgerflow.test/acme")
            c.checkpoints.append(signed)
    chains = {"acme": c}
    for seq in (0, 1, 99, 100, 200, 255):
        doc = prove(chains, "acme", seq)
        checkpoint = c.checkpoints[1]
        record = audit(seq)
        assert doc == build_inclusion_proof_file(c.entries, checkpoint, seq, audit=record)
        assert check_proof_file(doc, KEY.verifier).ok
    assert c.tree().root(256) == tree_of(c.entries[:256]).root()
    tree = c.tree()
    assert prove(chains, "acme", 3) and c.tree() is tree  # built once, kept
    with pytest.raises(LookupError):
        prove(chains, "acme", 256)  # no checkpoint covers it yet


def test_a_proof_refuses_audit_bytes_of_another_record() -> None:
    state, entry = chain(None, audit(0), 0, 0)
    state, signed = make_checkpoint(state, KEY, "ledgerflow.test/acme")
    assert entry is not None
    with pytest.raises(ValueError, match="not the one this entry chained"):
        build_inclusion_proof_file([entry], signed, 0, audit=audit_canonical_bytes(audit(1)))
    doc = build_inclusion_proof_file([entry], signed, 0, audit=audit_canonical_bytes(audit(0)))
    assert (
        doc == build_inclusion_proof_file([entry], signed, 0, audit=audit(0)) and check_proof_file(doc, KEY.verifier).ok
    )
