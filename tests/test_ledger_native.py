"""The C extension `domain._ledger_native` against the pure-Python reference, no broker.

`audit verify` from the log trusts the C code's canonical bytes, entry fields, chain walk and
Merkle roots only because they equal Python's byte for byte: hypothesis over AuditRecorded
contents (unicode with escapes, astral characters, controls, empty and large details maps,
null optionals, times over datetime's whole range), hand-made Avro the writer never makes
(duplicate map keys, negative block counts, long varints), and mutated records (whatever the
C code accepts, Python's reader must accept with the same bytes). The Kafka path itself is in
tests/test_ledger_native_log.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from domain.checkpoint import SigningKey, generate_key
from domain.ledger import (
    LedgerEntry,
    audit_canonical_bytes,
    audit_canonical_bytes_from_record,
    entry_bytes_of,
    native_chain_headers,
)
from domain.merkle import MerkleTree
from ledgerflow import audit
from streams.codec import Codec
from streams.events import AuditRecorded, Envelope, Event, LedgerCheckpointSigned, LedgerEntryChained
from streams.log_scan import RecordReaders
from tests.test_ledger_verify_log import EXPECTED, tampered
from tests.test_ledger_verify_sql import audit_record, chain_events

native = pytest.importorskip("domain._ledger_native")
HEADERS = native_chain_headers()
assert HEADERS is not None, "AuditRecorded / LedgerEntryChained moved past v1: the C code needs a new layout"
AUDIT_HEADER, ENTRY_HEADER = HEADERS
CODEC = Codec()
READERS = RecordReaders({audit.AUDIT: None, audit.ENTRY: audit.ENTRY_FIELDS})
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def python_audit(value: bytes) -> bytes | None:
    """What `audit.from_log` makes of an audit-topic record: canonical bytes, or None (skipped)."""
    try:
        record = READERS.read(value)
    except Exception:  # AvroDecodeError, or what a time out of range raises
        return None
    if record is None or record[0] != audit.AUDIT:
        return None
    return audit_canonical_bytes_from_record(record[1])


def python_entry(value: bytes) -> tuple[Any, ...] | None:
    try:
        record = READERS.read(value)
    except Exception:
        return None
    if record is None or record[0] != audit.ENTRY:
        return None
    v = record[1]
    return (*v, entry_bytes_of(LedgerEntry(v[1], v[2], v[3], v[4], v[5], v[6])))


# --- canonical bytes -----------------------------------------------------------------------

text = st.text(st.characters(codec="utf-8"), max_size=40)  # any code point but surrogates
spicy = st.one_of(text, st.sampled_from(['"', "\\", "\x00", "\x1f", "\x7f", "\u2028", "😀", "é\n\t\r\b\f", ""]))
times = st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999))


@st.composite
def audits(draw: st.DrawFn) -> AuditRecorded:
    env = Envelope(
        event_id=draw(spicy),
        event_type=draw(st.sampled_from(["AuditRecorded", "other", "é"])),
        schema_version=draw(st.integers(-(2**31), 2**31 - 1)),
        tenant=draw(spicy),
        occurred_at=draw(times).replace(tzinfo=UTC),
        correlation_id=draw(spicy),
        producer=draw(spicy),
        trace_parent=draw(st.none() | spicy),
        causation_id=draw(st.none() | spicy),
    )
    details = draw(st.dictionaries(spicy, spicy, max_size=draw(st.sampled_from([0, 3, 60]))))
    return AuditRecorded(
        envelope=env,
        action=draw(spicy),
        actor=draw(spicy),
        subject=draw(spicy),
        outcome=draw(spicy),
        details=details,
    )


@FAST
@given(audits())
def test_audit_canonical_bytes_equal_pythons(event: AuditRecorded) -> None:
    value = CODEC.encode(event)
    got = native.audit_canonical(value, AUDIT_HEADER)
    assert got is not None
    assert got == audit_canonical_bytes(event) == python_audit(value)


def test_times_at_the_edges_and_zero_microseconds() -> None:
    base = audit_record("acme", 1)
    for at in [
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(2000, 2, 29, 12, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    ]:
        event = dataclasses.replace(base, envelope=dataclasses.replace(base.envelope, occurred_at=at))
        value = CODEC.encode(event)
        assert native.audit_canonical(value, AUDIT_HEADER) == audit_canonical_bytes(event) == python_audit(value)


# Hand-made Avro: what fastavro's writer never writes but a reader must take as Python does.


def zigzag(n: int, pad: int = 0) -> bytes:
    """A long as an Avro varint; `pad` extra continuation bytes (a longer, equal encoding)."""
    u = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        b = u & 0x7F
        u >>= 7
        if u or pad:
            out.append(b | 0x80)
            if not u:
                pad -= 1
                if pad == 0:
                    out.append(0)
                    break
        else:
            out.append(b)
            break
    return bytes(out)


def avro_str(s: str | bytes) -> bytes:
    raw = s.encode() if isinstance(s, str) else s
    return zigzag(len(raw)) + raw


def raw_audit(blocks: list[list[tuple[str, str]]], *, negative: bool = False, pad: int = 0) -> bytes:
    """An AuditRecorded (today's layout) with its details written as these map blocks."""
    e = audit_record("acme", 3).envelope
    body = avro_str(e.event_id) + avro_str(e.event_type) + zigzag(1, pad) + avro_str(e.tenant)
    micros = (e.occurred_at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    body += zigzag(micros, min(pad, 1)) + b"\x00" + avro_str(e.correlation_id) + b"\x02" + avro_str("cause")
    body += avro_str(e.producer) + b"".join(avro_str(s) for s in ("act", "actor", "subj", "success"))
    for block in blocks:
        items = b"".join(avro_str(k) + avro_str(v) for k, v in block)
        body += zigzag(-len(block)) + zigzag(len(items)) + items if negative else zigzag(len(block)) + items
    return AUDIT_HEADER + body + b"\x00"


@pytest.mark.parametrize("negative", [False, True])
@pytest.mark.parametrize("pad", [0, 3])
def test_hand_made_avro_duplicate_keys_blocks_and_long_varints(negative: bool, pad: int) -> None:
    blocks = [[("b", "1"), ("a", "x")], [("b", "2"), ("é", "e"), ("a\x00", "z")], [("b", "3")]]
    value = raw_audit(blocks, negative=negative, pad=pad)
    want = python_audit(value)
    assert want is not None and b'"b":"3"' in want  # the last of a key twice wins, as in a dict
    assert native.audit_canonical(value, AUDIT_HEADER) == want


def test_not_handled_gives_none() -> None:
    value = CODEC.encode(audit_record("acme", 2))
    assert native.audit_canonical(value, ENTRY_HEADER) is None  # another writer schema
    assert native.audit_canonical(value[:-1], AUDIT_HEADER) is None
    assert native.audit_canonical(value + b"\x00", AUDIT_HEADER) is None
    assert native.audit_canonical(b"", AUDIT_HEADER) is None
    assert native.audit_canonical(AUDIT_HEADER + b"\x80" * 11, AUDIT_HEADER) is None  # a varint past 10 bytes
    bad_utf8 = raw_audit([[("k", "v")]]).replace(avro_str("actor"), avro_str(b"act\xed\xa0\x80"))
    assert python_audit(bad_utf8) is None and native.audit_canonical(bad_utf8, AUDIT_HEADER) is None
    huge = raw_audit([]).replace(b"\x00" + avro_str(audit_record("acme", 3).envelope.correlation_id), b"\x06", 1)
    assert native.audit_canonical(huge, AUDIT_HEADER) is None  # union index 3
    with pytest.raises(ValueError):
        native.audit_canonical(value, b"short")


mutations = st.lists(
    st.tuples(st.sampled_from(["flip", "cut", "insert", "set"]), st.integers(0, 10_000), st.integers(0, 255)),
    min_size=1,
    max_size=3,
)


def mutate(value: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(value)
    for op, at, byte in ops:
        i = 10 + at % max(len(out) - 10, 1)  # the header stays: the body is what is read
        if op == "flip" and i < len(out):
            out[i] ^= 1 << (byte % 8)
        elif op == "cut":
            del out[i:]
        elif op == "insert":
            out.insert(i, byte)
        elif i < len(out):
            out[i] = byte
    return bytes(out)


@FAST
@given(st.integers(0, 40), mutations)
def test_a_mutated_audit_record_is_read_as_python_reads_it_or_not_at_all(i: int, ops: list[Any]) -> None:
    value = mutate(CODEC.encode(audit_record("t\u00e9n", i)), ops)
    got = native.audit_canonical(value, AUDIT_HEADER)
    if got is not None:
        assert got == python_audit(value)


@FAST
@given(st.integers(0, 40), mutations)
def test_a_mutated_entry_is_read_as_python_reads_it_or_not_at_all(i: int, ops: list[Any]) -> None:
    events = chain_events("acme", 3, KEY, every=100)
    entry = next(e for e in events if isinstance(e, LedgerEntryChained))
    entry = dataclasses.replace(entry, seq=i * 1_000_003, prev_hash=TRICKY_TEXT[i % len(TRICKY_TEXT)])
    value = mutate(CODEC.encode(entry), ops)
    got = native.entry_fields(value, ENTRY_HEADER)
    if got is not None:
        assert got == python_entry(value)


KEY: SigningKey = generate_key("ledgerflow.test")
TRICKY_TEXT = ['say "hi"', "back\\slash", "naïve\x01café", "line\u2028sep", "😀", ""]


@FAST
@given(spicy, spicy, st.integers(-(2**63), 2**63 - 1), spicy, spicy, spicy)
def test_entry_fields_and_bytes_equal_pythons(tenant: str, prev: str, seq: int, aid: str, asha: str, h: str) -> None:
    base = chain_events("acme", 1, KEY, every=100)[1]
    assert isinstance(base, LedgerEntryChained)
    env = dataclasses.replace(base.envelope, tenant=tenant)
    entry = dataclasses.replace(
        base, envelope=env, chain_tenant=tenant, seq=seq, prev_hash=prev, audit_event_id=aid, audit_sha256=asha,
        entry_hash=h,
    )  # fmt: skip
    value = CODEC.encode(entry)
    got = native.entry_fields(value, ENTRY_HEADER)
    assert got is not None
    assert got == python_entry(value)
    assert got[-1] == entry_bytes_of(entry)


# --- Merkle roots --------------------------------------------------------------------------


@FAST
@given(st.integers(1, 300), st.data())
def test_merkle_roots_equal_the_trees(n: int, data: st.DataObject) -> None:
    leaves = [hashlib.sha256(struct.pack(">I", i)).digest() for i in range(n)]
    sizes = sorted(data.draw(st.sets(st.integers(1, n), min_size=1, max_size=12)))
    tree = MerkleTree.from_leaf_hashes(leaves)
    assert native.merkle_roots(b"".join(leaves), sizes) == [tree.root(m) for m in sizes]


def test_merkle_roots_refuse_bad_sizes() -> None:
    leaves = b"\x01" * 32 * 4
    for sizes in ([0], [5], [2, 2], [3, 1]):
        with pytest.raises(ValueError):
            native.merkle_roots(leaves, sizes)
    with pytest.raises(ValueError):
        native.merkle_roots(b"\x01" * 31, [1])


# --- the chain walk ------------------------------------------------------------------------


def walk(events: list[Event], key: SigningKey) -> tuple[dict[str, Any], Any]:
    """The native verifier over these events' records (bytes, one partition): its report of each
    chain it finds sound (None for the others), and Python's reports."""
    verifier = native.LogVerifier(AUDIT_HEADER, ENTRY_HEADER)
    audits = [CODEC.encode(e) for e in events if isinstance(e, AuditRecorded)]
    entries = [CODEC.encode(e) for e in events if isinstance(e, LedgerEntryChained)]
    assert verifier.add_audits(audits) is None and verifier.add_entries(entries) is None
    cps: dict[str, list[LedgerCheckpointSigned]] = {}
    chains: dict[str, audit.Chain] = {}
    for e in events:
        chain = chains.setdefault(e.tenant, audit.Chain(e.tenant))
        if isinstance(e, LedgerCheckpointSigned):
            cps.setdefault(e.tenant, []).append(e)
            chain.checkpoints.append(e)
        elif isinstance(e, LedgerEntryChained):
            chain.entries.append(LedgerEntry.of(e))
        elif isinstance(e, AuditRecorded):
            chain.audits[e.envelope.event_id] = audit_canonical_bytes(e)
    out: dict[str, Any] = {}
    for i, (t, n, sound) in enumerate(verifier.chains()):
        roots_at = partial(audit._native_roots, verifier, i, t)
        out[t] = audit._sound_chain(t, n, roots_at, cps.get(t, []), key.verifier) if sound else None
    return out, {r.tenant: r for r in audit.verify(chains, key.verifier)}


def test_sound_chains_report_as_python_and_every_tampered_one_is_left_to_it() -> None:
    events = [e for t in EXPECTED for e in tampered(t, KEY)]
    native_reports, python = walk(events, KEY)
    assert set(native_reports) == set(EXPECTED)
    for t, (ok, _) in EXPECTED.items():
        if t.startswith("twin"):  # an identical redelivery: Python collapses it, the C code leaves it to Python
            assert native_reports[t] is None and python[t].ok
        elif ok:
            assert native_reports[t] == python[t]
        else:
            assert native_reports[t] is None, t


def test_batches_messages_and_the_tenant_filter() -> None:
    events = chain_events("acme", 25, KEY) + chain_events("globex", 12, KEY)
    verifier = native.LogVerifier(AUDIT_HEADER, ENTRY_HEADER)
    values = [CODEC.encode(e) for e in events if isinstance(e, AuditRecorded | LedgerEntryChained)]
    audits = [v for v in values if v[:10] == AUDIT_HEADER]
    entries = [v for v in values if v[:10] == ENTRY_HEADER]
    for i in range(0, len(entries), 7):  # batch borders fall anywhere
        assert verifier.add_entries(entries[i : i + 7], b"acme") is None
    assert verifier.add_audits(audits, b"acme") is None
    assert verifier.counts == (25, 25)
    assert verifier.chains() == [("acme", 25, True)]
    assert len(verifier.roots(0, "acme", [1, 25])) == 2  # a chain is named by its row and tenant
    for row, tenant in ((1, "acme"), (-1, "acme"), (0, "globex")):
        with pytest.raises(KeyError):
            verifier.roots(row, tenant, [25])
    assert verifier.add_entries([b"\xc3\x01junk"]) is not None  # not handled: the caller goes to Python
    assert verifier.unhandled is not None
    with pytest.raises(AttributeError):  # neither bytes nor a Message: a clean error
        verifier.add_audits([1])


def test_an_audit_record_twice_leaves_its_chain_to_python_even_after_its_claim_matched() -> None:
    events = chain_events("acme", 6, KEY) + chain_events("globex", 4, KEY)
    audits = [e for e in events if isinstance(e, AuditRecorded)]
    entries = [CODEC.encode(e) for e in events if isinstance(e, LedgerEntryChained)]
    verifier = native.LogVerifier(AUDIT_HEADER, ENTRY_HEADER)
    assert verifier.add_audits([CODEC.encode(e) for e in audits]) is None
    assert verifier.add_entries(entries) is None  # every claim matches here, before the twin arrives
    twin = dataclasses.replace(audits[3], actor="mallory")  # Python keeps the last of an id twice
    assert verifier.add_audits([CODEC.encode(twin)]) is None
    assert sorted(verifier.chains()) == [("acme", 6, False), ("globex", 4, True)]
