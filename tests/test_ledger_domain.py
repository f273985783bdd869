"""The audit ledger's pure core: hashing against RFC 9162 and published vectors, the chain fold,
signed checkpoints, tamper detection and forged proofs. No broker, no ClickHouse."""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import random
import stat
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymerkle import InmemoryTree

from domain import merkle
from domain.checkpoint import (
    NoteError,
    SigningKey,
    VerifierKey,
    checkpoint_body,
    generate_key,
    load_signing_key_file,
    load_verifier_key_file,
    open_checkpoint,
    open_note,
    parse_checkpoint,
    parse_signing_key,
    parse_verifier_key,
    save_key_pair,
    sign_checkpoint,
    sign_note,
)
from domain.ledger import (
    GENESIS_HASH,
    ChainState,
    LedgerEntry,
    audit_canonical_bytes,
    audit_canonical_bytes_from_row,
    audit_sha256,
    build_consistency_proof_file,
    build_inclusion_proof_file,
    canonical_time,
    chain,
    check_checkpoint_event,
    check_consistency_file,
    check_proof_file,
    checkpoint_due,
    entry_bytes,
    entry_bytes_of,
    make_checkpoint,
    tree_of,
    verify_chain,
)
from domain.merkle import MerkleTree, verify_consistency, verify_inclusion
from streams.events import AuditRecorded, Envelope, LedgerCheckpointSigned, LedgerEntryChained
from streams.ids import derived_uuid7
from tests import rfc9162_reference as ref

T0 = datetime(2026, 11, 28, 12, 0, 0, 250000, tzinfo=UTC)
BASE_ID = "01930000-0000-7000-8000-000000000000"
ORIGIN = "ledgerflow.test/acme"


def audit(i: int, tenant: str = "acme", outcome: str = "success") -> AuditRecorded:
    """A deterministic audit record number i."""
    rid = str(derived_uuid7(BASE_ID, tenant, str(i)))
    return AuditRecorded(
        envelope=Envelope(
            event_id=str(derived_uuid7(rid, "AuditRecorded")),
            event_type="AuditRecorded",
            schema_version=1,
            tenant=tenant,
            occurred_at=T0 + timedelta(milliseconds=i),
            correlation_id=rid,
            producer="gateway",
            trace_parent=None if i % 3 else f"00-{i:032x}-{i:016x}-01",
        ),
        action="request.completed",
        actor=f"key_{i % 7}",
        subject=rid,
        outcome=outcome,
        details={"model": "sim-small", "cost": f"0.{i:06d}", "émoji": "✓ \u2028"},
    )


def build_chain(n: int, tenant: str = "acme") -> tuple[ChainState, list[LedgerEntryChained], list[AuditRecorded]]:
    state: ChainState | None = None
    entries: list[LedgerEntryChained] = []
    audits = [audit(i, tenant) for i in range(n)]
    for offset, a in enumerate(audits):
        state, out = chain(state, a, 0, offset)
        assert out is not None
        entries.append(out)
    assert state is not None
    return state, entries, audits


@pytest.fixture(scope="module")
def key() -> SigningKey:
    """The log's key, made here from a fixed seed so every run (and the fuzz) is reproducible."""
    return SigningKey("ledgerflow.test/audit", hashlib.sha256(b"ledgerflow test key").digest())


@pytest.fixture(scope="module")
def chain300(key: SigningKey) -> dict[str, Any]:
    """300 entries with checkpoints at 50, 100, ..., 300 (and their notes)."""
    state: ChainState | None = None
    entries: list[LedgerEntryChained] = []
    cps: list[LedgerCheckpointSigned] = []
    audits = [audit(i) for i in range(300)]
    for offset, a in enumerate(audits):
        state, out = chain(state, a, 1, offset)
        assert state is not None and out is not None
        entries.append(out)
        if checkpoint_due(state, T0, every_n=50, every_s=3600):
            state, cp = make_checkpoint(state, key, ORIGIN)
            cps.append(cp)
    return {"entries": entries, "audits": audits, "checkpoints": cps, "tree": tree_of(entries)}


def _data(n: int, salt: str = "") -> list[bytes]:
    return [f"{salt}leaf-{i}".encode() for i in range(n)]


# --- RFC 9162 hashing and proofs -------------------------------------------------------------

CT_LEAVES = [
    bytes.fromhex(h)
    for h in ["", "00", "10", "2021", "3031", "40414243", "5051525354555657", "606162636465666768696a6b6c6d6e6f"]
]
CT_ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def test_roots_and_proofs_match_the_certificate_transparency_vectors() -> None:
    """Published RFC 6962 test data (same hashes as RFC 9162 with SHA-256)."""
    tree = MerkleTree.from_entries(CT_LEAVES)
    assert [tree.root(n).hex() for n in range(9)] == CT_ROOTS
    assert [h.hex() for h in tree.inclusion_proof(0, 8)] == [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ]
    assert [h.hex() for h in tree.inclusion_proof(5, 8)] == [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ]
    assert [h.hex() for h in tree.consistency_proof(2, 8)] == [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ]
    assert [h.hex() for h in tree.consistency_proof(6, 8)] == [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ]
    assert [h.hex() for h in tree.consistency_proof(2, 5)] == [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ]
    assert ref.MTH(CT_LEAVES).hex() == CT_ROOTS[8]


def test_every_root_path_and_proof_for_sizes_1_to_64_equals_the_rfc_reference() -> None:
    data = _data(64)
    tree = MerkleTree.from_entries(data)
    grown = MerkleTree()
    for d in data:
        grown.append(d)
    assert grown.levels == tree.levels
    roots = {n: ref.MTH(data[:n]) for n in range(65)}
    for n in range(1, 65):
        assert tree.root(n) == roots[n], n
        for m in range(n):
            path = tree.inclusion_proof(m, n)
            assert path == ref.PATH(m, data[:n]), (m, n)
            leaf = merkle.leaf_hash(data[m])
            assert verify_inclusion(leaf, m, n, path, roots[n])
            assert ref.verify_inclusion(m, n, leaf, path, roots[n])
        for m in range(1, n):
            proof = tree.consistency_proof(m, n)
            assert proof == ref.PROOF(m, data[:n]), (m, n)
            assert verify_consistency(m, n, roots[m], roots[n], proof)
            assert ref.verify_consistency(m, n, roots[m], roots[n], proof)
    # the trivial cases the RFC algorithm leaves to the caller
    assert tree.consistency_proof(7, 7) == [] and verify_consistency(7, 7, roots[7], roots[7], [])
    assert not verify_consistency(7, 7, roots[7], roots[8], [])
    assert tree.consistency_proof(0, 9) == [] and verify_consistency(0, 9, merkle.EMPTY_ROOT, roots[9], [])
    assert not verify_consistency(0, 9, roots[1], roots[9], [])
    assert not verify_consistency(9, 7, roots[9], roots[7], [])


def test_random_indices_in_larger_trees_equal_the_rfc_reference() -> None:
    rng = random.Random(9162)
    data = _data(777, "big")
    tree = MerkleTree.from_entries(data)
    for _ in range(40):
        n = rng.randint(65, 777)
        m = rng.randrange(n)
        assert tree.root(n) == ref.MTH(data[:n])
        assert tree.inclusion_proof(m, n) == ref.PATH(m, data[:n])
        old = rng.randint(1, n - 1)
        assert tree.consistency_proof(old, n) == ref.PROOF(old, data[:n])


def test_roots_and_inclusion_paths_agree_with_pymerkle_with_prefixes_on() -> None:
    data = _data(100, "pm")
    ours = MerkleTree.from_entries(data)
    theirs = InmemoryTree(algorithm="sha256")  # security (0x00 / 0x01 prefixes) on by default
    for d in data:
        theirs.append_entry(d)
    for n in range(1, 101):
        assert theirs.get_root(n) == ours.root(n), n
    for n, m in [(1, 0), (13, 4), (64, 63), (100, 0), (100, 37), (100, 99)]:
        proof = theirs.prove_inclusion(m + 1, n)  # pymerkle counts leaves from 1
        assert proof.path == [ours.leaf_hash(m), *ours.inclusion_proof(m, n)]
    # pymerkle's consistency proofs are valid but not RFC 9162's: a different list of hashes
    theirs_c = theirs.prove_consistency(6, 13)
    theirs_c.verify(theirs.get_root(6), theirs.get_root(13))
    assert theirs_c.path != ours.consistency_proof(6, 13)
    assert ours.consistency_proof(6, 13) == ref.PROOF(6, data[:13])


def test_frontier_root_equals_the_full_tree_hash_at_every_size_1_to_200() -> None:
    state: ChainState | None = None
    leaves: list[bytes] = []
    for i in range(200):
        state, out = chain(state, audit(i), 0, i)
        assert out is not None
        leaves.append(entry_bytes_of(out))
        assert len(state.frontier) == state.size.bit_count()
        assert state.root == ref.MTH(leaves), state.size


def test_proof_generators_refuse_impossible_requests() -> None:
    tree = MerkleTree.from_entries(_data(5))
    with pytest.raises(ValueError):
        tree.inclusion_proof(5, 5)
    with pytest.raises(ValueError):
        tree.inclusion_proof(0, 6)
    with pytest.raises(ValueError):
        tree.consistency_proof(4, 3)
    with pytest.raises(ValueError):
        tree.root(6)


# --- canonical bytes -------------------------------------------------------------------------


def _reference_canonical(event: AuditRecorded) -> bytes:
    """The rule as documented, written with the standard library."""
    env = event.envelope
    doc = {
        "action": event.action,
        "actor": event.actor,
        "details": event.details,
        "envelope": {
            "causation_id": env.causation_id,
            "correlation_id": env.correlation_id,
            "event_id": env.event_id,
            "event_type": env.event_type,
            "occurred_at": _utc(env.occurred_at).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "producer": env.producer,
            "schema_version": env.schema_version,
            "tenant": env.tenant,
            "trace_parent": env.trace_parent,
        },
        "outcome": event.outcome,
        "subject": event.subject,
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=20)  # any text but lone surrogates


_lo, _hi = datetime(1000, 1, 1), datetime(9998, 1, 1)
_zones = st.sampled_from([UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-9, minutes=-30))])
times = st.one_of(st.datetimes(_lo, _hi), st.datetimes(_lo, _hi, timezones=_zones))  # naive or aware


@settings(max_examples=300, deadline=None)
@given(details=st.dictionaries(texts, texts, max_size=6), actor=texts, subject=texts, at=times)
def test_canonical_bytes_follow_the_documented_json_rule(
    details: dict[str, str], actor: str, subject: str, at: datetime
) -> None:
    event = audit(1)
    event = replace(event, details=details, actor=actor, subject=subject)
    for when in (at, at.replace(microsecond=0)):
        timed = replace(event, envelope=replace(event.envelope, occurred_at=when))
        assert audit_canonical_bytes(timed) == _reference_canonical(timed)


def test_canonical_bytes_from_a_clickhouse_row_equal_those_from_the_kafka_record() -> None:
    for i in range(6):
        event = audit(i)
        if i == 5:  # a whole second: the fraction must still be written as .000000
            event = replace(event, envelope=replace(event.envelope, occurred_at=T0.replace(microsecond=0)))
        env = event.envelope
        row: dict[str, Any] = {
            "event_id": env.event_id,
            "event_type": env.event_type,
            "schema_version": env.schema_version,
            "tenant": env.tenant,
            # clickhouse-connect may hand back a naive UTC datetime
            "occurred_at": env.occurred_at.replace(tzinfo=None),
            "trace_parent": env.trace_parent,
            "correlation_id": env.correlation_id,
            "causation_id": env.causation_id,
            "producer": env.producer,
            "action": event.action,
            "actor": event.actor,
            "subject": event.subject,
            "outcome": event.outcome,
            "details": dict(reversed(list(event.details.items()))),
            "_topic": "audit",
            "_partition": 3,
            "_offset": 99,
        }
        assert audit_canonical_bytes_from_row(row) == audit_canonical_bytes(event)


def test_canonical_time_is_utc_with_six_digits() -> None:
    plus2 = timezone(timedelta(hours=2))
    assert canonical_time(datetime(2026, 1, 2, 5, 4, 5, tzinfo=plus2)) == "2026-01-02T03:04:05.000000Z"
    assert canonical_time(datetime(2026, 1, 2, 3, 4, 5, 7)) == "2026-01-02T03:04:05.000007Z"
    event = audit(0)
    moved = replace(event, envelope=replace(event.envelope, occurred_at=event.envelope.occurred_at.astimezone(plus2)))
    assert audit_canonical_bytes(moved) == audit_canonical_bytes(event)


def test_every_field_of_the_audit_record_is_bound() -> None:
    event = audit(3)
    base = audit_sha256(event)
    env = event.envelope
    variants = [
        replace(event, action="x"),
        replace(event, actor="x"),
        replace(event, subject="x"),
        replace(event, outcome="denied"),
        replace(event, details={**event.details, "cost": "9"}),
        replace(event, envelope=replace(env, occurred_at=env.occurred_at + timedelta(microseconds=1))),
        replace(event, envelope=replace(env, causation_id="c")),
        replace(event, envelope=replace(env, trace_parent="t")),
        replace(event, envelope=replace(env, producer="p")),
        replace(event, envelope=replace(env, schema_version=2)),
        replace(event, envelope=replace(env, correlation_id="r")),
        replace(event, envelope=replace(env, event_id="e")),
        replace(event, envelope=replace(env, tenant="other")),
    ]
    assert len({audit_sha256(v) for v in variants} | {base}) == len(variants) + 1


def test_entry_bytes_are_the_documented_json() -> None:
    data = entry_bytes("acme", 7, "ab" * 32, "id-1", "cd" * 32)
    assert data == (
        b'{"audit_event_id":"id-1","audit_sha256":"' + b"cd" * 32 + b'","chain_tenant":"acme",'
        b'"format":"ledgerflow.ledger-entry/1","prev_hash":"' + b"ab" * 32 + b'","seq":7}'
    )


# --- the chain fold --------------------------------------------------------------------------


def test_chain_links_entries_from_genesis_with_0_based_seq() -> None:
    _, entries, audits = build_chain(5)
    assert [e.seq for e in entries] == [0, 1, 2, 3, 4]
    assert entries[0].prev_hash == GENESIS_HASH
    for prev, e in itertools.pairwise(entries):
        assert e.prev_hash == prev.entry_hash
    for e, a in zip(entries, audits, strict=True):
        assert e.audit_sha256 == audit_sha256(a)
        assert e.audit_event_id == a.envelope.event_id
        assert e.envelope.causation_id == a.envelope.event_id
        assert e.envelope.occurred_at == a.envelope.occurred_at
    assert len({e.envelope.event_id for e in entries}) == 5


def test_redelivered_offsets_make_no_second_entry() -> None:
    audits = [audit(i) for i in range(6)]
    state: ChainState | None = None
    for i, a in enumerate(audits[:4]):
        state, _ = chain(state, a, 2, 10 + i)
    assert state is not None
    again, out = chain(state, audits[1], 2, 11)
    assert out is None and again == state
    again, out = chain(state, audits[3], 2, 13)
    assert out is None and again == state
    # another partition has its own offsets (the source topic was repartitioned)
    nxt, out = chain(state, audits[4], 5, 0)
    assert out is not None and out.seq == 4 and nxt.offsets == {2: 13, 5: 0}
    # a redelivered batch after a restore from the table's JSON
    restored = ChainState.from_json(json.loads(json.dumps(nxt.to_json())))
    assert restored == nxt
    for i, a in enumerate(audits[:4]):
        assert chain(restored, a, 2, 10 + i)[1] is None
    _, out = chain(restored, audits[5], 5, 1)
    assert out is not None and out.seq == 5 and out.prev_hash == nxt.last_hash


def test_replay_emits_identical_entries_and_checkpoints(key: SigningKey) -> None:
    def run() -> list[object]:
        state: ChainState | None = None
        outs: list[object] = []
        for i in range(40):
            state, out = chain(state, audit(i), 0, i)
            outs.append(out)
            assert state is not None
            if checkpoint_due(state, T0, every_n=16, every_s=60):
                state, cp = make_checkpoint(state, key, ORIGIN)
                outs.append(cp)
        return outs

    first = run()
    assert first == run()
    assert sum(isinstance(o, LedgerCheckpointSigned) for o in first) == 2


def test_chain_refuses_another_tenants_record() -> None:
    state, _, _ = build_chain(2)
    with pytest.raises(ValueError):
        chain(state, audit(9, tenant="globex"), 0, 99)


def test_state_from_json_rejects_a_frontier_that_does_not_fit() -> None:
    state, _, _ = build_chain(6)
    data = state.to_json()
    data["frontier"] = data["frontier"][:1]
    with pytest.raises(ValueError):
        ChainState.from_json(data)


def test_checkpoint_due_by_count_and_by_waiting_time(key: SigningKey) -> None:
    state, _, _ = build_chain(3)
    assert not checkpoint_due(state, T0, every_n=4, every_s=60)
    assert checkpoint_due(state, T0 + timedelta(seconds=61), every_n=4, every_s=60)
    assert checkpoint_due(state, T0, every_n=3, every_s=60)
    done, cp = make_checkpoint(state, key, ORIGIN)
    assert cp.tree_size == 3 and cp.root_hash == state.root.hex()
    assert not checkpoint_due(done, T0 + timedelta(days=1), every_n=1, every_s=0)
    nxt, _ = chain(done, audit(3), 0, 3)
    assert nxt.pending_since == audit(3).envelope.occurred_at
    assert checkpoint_due(nxt, T0 + timedelta(seconds=61), every_n=4, every_s=60)
    with pytest.raises(ValueError):
        make_checkpoint(ChainState(tenant="acme"), key, ORIGIN)


def test_checkpoint_event_carries_a_verifiable_note(key: SigningKey) -> None:
    state, _, _ = build_chain(9)
    _, cp = make_checkpoint(state, key, ORIGIN)
    assert cp.signed_note.startswith(f"{ORIGIN}\n9\n")
    assert cp.key_id == key.verifier.key_id_hex and cp.algorithm == "ed25519"
    assert check_checkpoint_event(cp, key.verifier) is None
    again = make_checkpoint(state, key, ORIGIN)[1]
    assert again.envelope.event_id == cp.envelope.event_id and again.signed_note == cp.signed_note
    assert check_checkpoint_event(replace(cp, tree_size=8), key.verifier) is not None
    assert check_checkpoint_event(replace(cp, root_hash="00" * 32), key.verifier) is not None
    assert check_checkpoint_event(replace(cp, signature="AAAA"), key.verifier) is not None
    assert check_checkpoint_event(cp, generate_key(key.name).verifier) is not None


# --- signed notes and keys -------------------------------------------------------------------

GO_SKEY = "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz"
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
GO_SIG = "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM="
GO_NOTE = f"{GO_TEXT}\n— PeterNeumann {GO_SIG}\n"


def test_notes_match_the_go_reference_byte_for_byte() -> None:
    """golang.org/x/mod/sumdb/note's documented example: same key id, same signed note."""
    signer = parse_signing_key(GO_SKEY)
    verifier = parse_verifier_key(GO_VKEY)
    assert signer.verifier == verifier and verifier.key_id_hex == "c74f20a3"
    assert signer.to_skey() == GO_SKEY and verifier.to_vkey() == GO_VKEY
    assert sign_note(GO_TEXT, signer) == GO_NOTE
    assert open_note(GO_NOTE, verifier)[0] == GO_TEXT


def test_signature_checks_reject_wrong_key_altered_body_and_altered_size(key: SigningKey) -> None:
    root = merkle.leaf_hash(b"x")
    note = sign_checkpoint(ORIGIN, 42, root, key)
    cp, _ = open_checkpoint(note, key.verifier)
    assert (cp.origin, cp.tree_size, cp.root_hash) == (ORIGIN, 42, root)
    with pytest.raises(NoteError):  # another key under the same name
        open_checkpoint(note, generate_key(key.name).verifier)
    with pytest.raises(NoteError):  # the right key under another name
        open_checkpoint(note, VerifierKey("someone.else", key.verifier.public_key))
    with pytest.raises(NoteError):  # altered size
        open_checkpoint(note.replace("\n42\n", "\n43\n", 1), key.verifier)
    with pytest.raises(NoteError):  # altered origin
        open_checkpoint(note.replace(ORIGIN, ORIGIN + "x", 1), key.verifier)
    body = checkpoint_body(ORIGIN, 42, root)
    with pytest.raises(NoteError):  # altered root
        open_checkpoint(note.replace(body, checkpoint_body(ORIGIN, 42, merkle.leaf_hash(b"y"))), key.verifier)
    sig_line = note.splitlines()[-1]
    with pytest.raises(NoteError):  # altered signature byte
        flipped = sig_line[:-6] + ("A" if sig_line[-6] != "A" else "B") + sig_line[-5:]
        open_checkpoint(note.replace(sig_line, flipped), key.verifier)
    with pytest.raises(NoteError):  # signature removed
        open_checkpoint(body + "\n", key.verifier)
    # a cosignature by someone else is ignored, the log's own still decides
    other = generate_key("witness.example")
    cosigned = note + sign_note(body, other).split("\n\n", 1)[1]
    assert open_checkpoint(cosigned, key.verifier)[0].tree_size == 42
    assert open_checkpoint(cosigned, other.verifier)[0].tree_size == 42


def test_checkpoint_parsing_is_strict() -> None:
    root_b64 = "47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU="
    assert parse_checkpoint(f"o\n0\n{root_b64}\n").tree_size == 0
    assert parse_checkpoint(f"o\n5\n{root_b64}\next\n").extensions == ("ext",)
    for bad in [
        f"o\n05\n{root_b64}\n",
        f"o\n-1\n{root_b64}\n",
        f"o\n5\n{root_b64}",
        "o\n5\nAAAA\n",
        f"o\n٣\n{root_b64}\n",
        f"\n5\n{root_b64}\n",
        f"o\n5\n{root_b64}\n\n",
        f"o\n5\n{root_b64}\nx\ty\n",
    ]:
        with pytest.raises(NoteError):
            parse_checkpoint(bad)


def test_key_round_trips_through_go_text_pem_and_files(key: SigningKey, tmp_path: Path) -> None:
    assert parse_signing_key(key.to_skey()) == key
    assert key.seed.hex() not in repr(key) and str(key.seed) not in repr(key)
    assert parse_verifier_key(key.verifier.to_vkey()) == key.verifier
    assert parse_signing_key(key.to_pem(), name=key.name) == key
    assert parse_verifier_key(key.verifier.to_pem(), name=key.name) == key.verifier
    with pytest.raises(NoteError):
        parse_signing_key(key.to_pem())  # PEM has no name
    with pytest.raises(NoteError):  # key id that does not match the key
        parse_verifier_key(key.verifier.to_vkey().replace(key.verifier.key_id_hex, "00000000"))
    with pytest.raises(NoteError):
        generate_key("has space")
    private, public = save_key_pair(key, tmp_path / "ledger.key")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert load_signing_key_file(private) == key
    assert load_verifier_key_file(public) == key.verifier
    with pytest.raises(FileExistsError):
        save_key_pair(generate_key("x.example"), private)
    assert load_signing_key_file(private) == key


# --- verify_chain: tamper detection ----------------------------------------------------------


def _entries(chain300: dict[str, Any]) -> list[LedgerEntry]:
    """The chain as rows read back from storage (plain dataclasses we can alter)."""
    return [LedgerEntry.of(e) for e in chain300["entries"]]


def _verify(chain300: dict[str, Any], key: SigningKey, entries: list[Any], **kw: Any) -> Any:
    audits = kw.pop("audits", {a.envelope.event_id: a for a in chain300["audits"]})
    return verify_chain(entries, audits, kw.pop("checkpoints", chain300["checkpoints"]), key.verifier, **kw)


def _flip(text: str, at: int) -> str:
    ch = text[at]
    swap = "0" if ch != "0" else "1"
    if not ch.isalnum():
        swap = "_"
    return text[:at] + swap + text[at + 1 :]


def test_a_sound_chain_verifies_with_its_audits_and_checkpoints(chain300: dict[str, Any], key: SigningKey) -> None:
    report = _verify(chain300, key, _entries(chain300))
    assert report.ok and report.bad_seq is None and report.reason is None
    assert report.entries_checked == 300 and report.checkpoints_checked == 6
    assert report.root_hash == chain300["tree"].root().hex() == chain300["checkpoints"][-1].root_hash
    # the same from the Kafka events themselves, and from canonical bytes as the audit source
    assert verify_chain(chain300["entries"]).ok
    by_bytes = {a.envelope.event_id: audit_canonical_bytes(a) for a in chain300["audits"]}
    assert verify_chain(chain300["entries"], by_bytes).ok


@pytest.mark.parametrize("field", ["entry_hash", "prev_hash", "audit_sha256", "audit_event_id", "chain_tenant"])
def test_one_flipped_byte_is_reported_at_its_seq(chain300: dict[str, Any], key: SigningKey, field: str) -> None:
    rng = random.Random(field)
    for k in [0, 1, 137, 299, *rng.sample(range(300), 3)]:
        entries = _entries(chain300)
        value = getattr(entries[k], field)
        changes: dict[str, Any] = {field: _flip(value, rng.randrange(len(value)))}
        entries[k] = replace(entries[k], **changes)
        report = _verify(chain300, key, entries)
        assert not report.ok and report.bad_seq == k, (field, k, report)
        assert report.reason is not None and ("hash mismatch" in report.reason or "tenant" in report.reason)


def test_a_deleted_entry_is_a_gap_at_its_seq(chain300: dict[str, Any], key: SigningKey) -> None:
    for k in [0, 1, 150, 298]:
        entries = _entries(chain300)
        del entries[k]
        report = _verify(chain300, key, entries)
        assert not report.ok and report.bad_seq == k and report.reason is not None and report.reason.startswith("gap")


def test_a_cut_tail_is_caught_by_the_last_checkpoint(chain300: dict[str, Any], key: SigningKey) -> None:
    report = _verify(chain300, key, _entries(chain300)[:-1])
    assert not report.ok and report.bad_seq == 299 and report.reason is not None and "truncated" in report.reason


def test_reordered_and_duplicated_entries_are_detected(chain300: dict[str, Any], key: SigningKey) -> None:
    entries = _entries(chain300)
    entries[40], entries[41] = entries[41], entries[40]
    report = _verify(chain300, key, entries)
    assert not report.ok and report.bad_seq == 40 and report.reason is not None and "out of order" in report.reason
    entries = _entries(chain300)
    entries.insert(11, entries[10])
    report = _verify(chain300, key, entries)
    assert not report.ok and report.bad_seq == 10 and report.reason is not None and "duplicate" in report.reason
    entries[11] = replace(entries[10], audit_event_id="forked")
    report = _verify(chain300, key, entries)
    assert not report.ok and report.bad_seq == 10 and report.reason is not None and "fork" in report.reason
    entries = _entries(chain300)
    entries.insert(60, entries[30])
    report = _verify(chain300, key, entries)
    assert not report.ok and report.bad_seq == 30 and report.reason is not None and "out of order" in report.reason
    # renumbering the swapped pair so the seqs look in order breaks their hashes instead
    entries = _entries(chain300)
    a, b = entries[40], entries[41]
    entries[40], entries[41] = replace(b, seq=40), replace(a, seq=41)
    report = _verify(chain300, key, entries)
    assert not report.ok and report.bad_seq == 40 and report.reason is not None and "hash mismatch" in report.reason


def test_a_forged_audit_record_is_detected(chain300: dict[str, Any], key: SigningKey) -> None:
    audits = {a.envelope.event_id: a for a in chain300["audits"]}
    forged = chain300["audits"][77]
    audits[forged.envelope.event_id] = replace(forged, outcome="denied")
    report = _verify(chain300, key, _entries(chain300), audits=audits)
    assert not report.ok and report.bad_seq == 77 and report.reason is not None and "audit_sha256" in report.reason
    del audits[forged.envelope.event_id]
    report = _verify(chain300, key, _entries(chain300), audits=audits)
    assert not report.ok and report.bad_seq == 77 and report.reason is not None and "missing" in report.reason


def test_a_rehashed_entry_breaks_the_next_link(chain300: dict[str, Any], key: SigningKey) -> None:
    """Forge audit 120 and recompute entry 120's hashes: entry 121's prev_hash no longer links."""
    entries = _entries(chain300)
    forged = replace(chain300["audits"][120], outcome="denied")
    e = entries[120]
    a_sha = audit_sha256(forged)
    e_hash = hashlib.sha256(entry_bytes(e.chain_tenant, 120, e.prev_hash, e.audit_event_id, a_sha)).hexdigest()
    entries[120] = replace(e, audit_sha256=a_sha, entry_hash=e_hash)
    audits = {a.envelope.event_id: a for a in chain300["audits"]}
    audits[forged.envelope.event_id] = forged
    report = _verify(chain300, key, entries, audits=audits)
    assert not report.ok and report.bad_seq == 121 and report.reason is not None and "link broken" in report.reason


def test_a_rewritten_tail_is_caught_by_the_signed_roots(chain300: dict[str, Any], key: SigningKey) -> None:
    """Rewrite every entry from 120 on consistently (a forger without the key): the signed root
    of the checkpoint at 150 no longer matches; the rewrite lies in [100, 150)."""
    audits = list(chain300["audits"])
    audits[120] = replace(audits[120], outcome="denied")
    state: ChainState | None = None
    forged_entries: list[LedgerEntryChained] = []
    for i, a in enumerate(audits):
        state, out = chain(state, a, 1, i)
        assert out is not None
        forged_entries.append(out)
    by_id = {a.envelope.event_id: a for a in audits}
    report = _verify(chain300, key, [LedgerEntry.of(e) for e in forged_entries], audits=by_id)
    assert not report.ok and report.bad_seq == 100 and report.reason is not None and "root" in report.reason
    # and a checkpoint signed by another key is refused even over the right root
    impostor = generate_key(key.name)
    report = verify_chain(_entries(chain300), None, chain300["checkpoints"], impostor.verifier)
    assert not report.ok and report.bad_seq == 0 and report.reason is not None and "no signature by" in report.reason


def test_verify_of_another_tenants_entry_is_refused(chain300: dict[str, Any], key: SigningKey) -> None:
    _, globex, _ = build_chain(3, tenant="globex")
    entries = _entries(chain300)[:50]
    entries[2] = LedgerEntry.of(globex[2])
    report = verify_chain(entries, tenant="acme")
    assert not report.ok and report.bad_seq == 2


# --- proof files -----------------------------------------------------------------------------


def test_inclusion_proof_file_checks_offline_after_a_json_round_trip(chain300: dict[str, Any], key: SigningKey) -> None:
    cp = chain300["checkpoints"][2]  # size 150
    doc = build_inclusion_proof_file(chain300["entries"], cp, 77, audit=chain300["audits"][77])
    doc = json.loads(json.dumps(doc))
    result = check_proof_file(doc, key.verifier.to_vkey())
    assert result.ok and result.tree_size == 150 and result.leaf_index == 77 and result.origin == ORIGIN
    # from a prebuilt tree, without the audit record
    tree: MerkleTree = chain300["tree"]
    doc2 = build_inclusion_proof_file(tree, cp.signed_note, 149, entry=chain300["entries"][149])
    assert check_proof_file(doc2, key.verifier).ok
    assert not check_proof_file(doc2, generate_key(key.name).verifier).ok
    with pytest.raises(ValueError):  # an entry beyond the checkpoint
        build_inclusion_proof_file(chain300["entries"], cp, 150)
    with pytest.raises(ValueError):  # the wrong audit record
        build_inclusion_proof_file(chain300["entries"], cp, 77, audit=chain300["audits"][78])


def test_consistency_proof_file_checks_offline(chain300: dict[str, Any], key: SigningKey) -> None:
    cps = chain300["checkpoints"]
    tree: MerkleTree = chain300["tree"]
    for old, new in [(0, 5), (1, 3), (2, 2), (3, 4)]:
        doc = json.loads(json.dumps(build_consistency_proof_file(cps[old], cps[new], tree)))
        result = check_consistency_file(doc, key.verifier)
        assert result.ok and result.old_size == cps[old].tree_size and result.tree_size == cps[new].tree_size
    path = tree.consistency_proof(100, 250)
    with pytest.raises(ValueError):  # a path for other sizes
        build_consistency_proof_file(cps[1], cps[5], path)
    with pytest.raises(ValueError):  # new older than old
        build_consistency_proof_file(cps[4], cps[1], tree)


# --- forged proofs: fuzz ---------------------------------------------------------------------

Mutation = Callable[[dict[str, Any], random.Random], None]


def _flip_hex(value: str, rng: random.Random) -> str:
    i = rng.randrange(len(value))
    return value[:i] + rng.choice([c for c in "0123456789abcdef" if c != value[i]]) + value[i + 1 :]


def _mutate_list(doc: dict[str, Any], field: str, rng: random.Random) -> None:
    path: list[str] = doc[field]
    kind = rng.randrange(5)
    if kind == 0 and path:
        i = rng.randrange(len(path))
        path[i] = _flip_hex(path[i], rng)
    elif kind == 1 and path:
        del path[rng.randrange(len(path))]
    elif kind == 2:
        extra = rng.choice([*path, rng.randbytes(32).hex()]) if path else rng.randbytes(32).hex()
        path.insert(rng.randrange(len(path) + 1), extra)
    elif kind == 3 and len(path) > 1:
        i, j = rng.sample(range(len(path)), 2)
        path[i], path[j] = path[j], path[i]
    else:
        path.reverse() if len(path) > 1 else path.append(rng.randbytes(32).hex())


def _flip_b64(text: str, rng: random.Random) -> str:
    """Change one base64 character (not the padding)."""
    i = rng.randrange(len(text.rstrip("=")))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    return text[:i] + rng.choice([c for c in alphabet if c != text[i]]) + text[i + 1 :]


def _flip_signature(note: str, rng: random.Random) -> str:
    body, sig = note.rstrip("\n").rsplit(" ", 1)
    return f"{body} {_flip_b64(sig, rng)}\n"


def test_10k_mutated_proofs_are_all_rejected(chain300: dict[str, Any], key: SigningKey) -> None:
    """Seeded fuzz: every mutation of a valid proof file must be refused (0 accepted).

    Kinds: a flipped path hash, a dropped/added/swapped/reversed path element, a wrong index
    (alone, or with the entry renumbered, or with another real entry), a wrong size, a wrong
    root, another genuine checkpoint, a flipped signature, another key's signature, an altered
    entry field or audit record, type confusion. Both the file checker and, where the mutation
    is of the path, the raw RFC verifiers (ours and the reference) must refuse.
    """
    rng = random.Random(6)
    entries: list[LedgerEntryChained] = chain300["entries"]
    audits: list[AuditRecorded] = chain300["audits"]
    cps: list[LedgerCheckpointSigned] = chain300["checkpoints"]
    tree: MerkleTree = chain300["tree"]
    verifier = key.verifier
    impostor = SigningKey(key.name, hashlib.sha256(b"impostor").digest())  # same name, other key
    impostor_cps = [make_checkpoint(_state_at(entries, cp.tree_size), impostor, ORIGIN)[1] for cp in cps[:2]]

    inclusion_docs = []
    for _ in range(60):
        cp = rng.choice(cps)
        i = rng.randrange(cp.tree_size)
        doc = build_inclusion_proof_file(entries, cp, i, audit=audits[i] if rng.random() < 0.5 else None)
        assert check_proof_file(doc, verifier).ok
        inclusion_docs.append(doc)
    consistency_docs = []
    for _ in range(40):
        a, b = sorted(rng.sample(range(len(cps)), 2))
        doc = build_consistency_proof_file(cps[a], cps[b], tree)
        assert check_consistency_file(doc, verifier).ok
        consistency_docs.append(doc)

    def other_hex(value: str) -> str:
        return _flip_hex(value, rng)

    def inc_mutation(doc: dict[str, Any]) -> bool:
        """Mutate doc; True if only its path changed (then the raw verifiers are tried too)."""
        kind = rng.randrange(14)
        size, index = doc["tree_size"], doc["leaf_index"]
        if kind <= 3:
            _mutate_list(doc, "inclusion_path", rng)
            return True
        elif kind == 4:  # wrong index only
            doc["leaf_index"] = rng.choice([j for j in range(size + 2) if j != index])
        elif kind == 5:  # wrong index, entry renumbered to match
            j = rng.choice([j for j in range(size) if j != index]) if size > 1 else index + 1
            doc["leaf_index"] = j
            doc["entry"]["seq"] = j
        elif kind == 6:  # another real entry (and its leaf hash) with this path
            j = rng.choice([j for j in range(size) if j != index])
            doc["entry"] = LedgerEntry.of(entries[j]).to_json()
            doc["leaf_hash"] = merkle.leaf_hash(entry_bytes_of(entries[j])).hex()
            doc.pop("audit_record", None)
            if rng.random() < 0.5:
                doc["leaf_index"] = j
        elif kind == 7:  # wrong size: the field, or another genuine checkpoint under the same path
            others = [c for c in cps if c.tree_size != size and c.tree_size > index]
            other = rng.choice(others or [c for c in cps if c.tree_size != size])
            if rng.random() < 0.5 or not others:
                doc["tree_size"] = other.tree_size
            else:
                doc.update(checkpoint=other.signed_note, tree_size=other.tree_size, root_hash=other.root_hash)
        elif kind == 8:  # wrong root: the field, or the root line inside the note
            if rng.random() < 0.5:
                doc["root_hash"] = other_hex(doc["root_hash"])
            else:
                lines = doc["checkpoint"].split("\n")
                lines[2] = _flip_b64(lines[2], rng)
                doc["checkpoint"] = "\n".join(lines)
        elif kind == 9:  # wrong signature: a flipped character, or another key's note
            if rng.random() < 0.5:
                doc["checkpoint"] = _flip_signature(doc["checkpoint"], rng)
            else:
                doc["checkpoint"] = rng.choice(impostor_cps).signed_note
        elif kind == 10:  # altered entry field (with or without a matching entry_hash)
            field = rng.choice(["prev_hash", "audit_sha256", "audit_event_id", "chain_tenant", "entry_hash"])
            doc["entry"][field] = other_hex(doc["entry"][field])
            if rng.random() < 0.5 and field != "entry_hash":
                e = LedgerEntry.from_mapping(doc["entry"])
                doc["entry"]["entry_hash"] = hashlib.sha256(entry_bytes_of(e)).hexdigest()
                doc["leaf_hash"] = merkle.leaf_hash(entry_bytes_of(e)).hex()
        elif kind == 11:  # altered leaf hash, or a forged audit record
            if "audit_record" in doc and rng.random() < 0.7:
                doc["audit_record"] = doc["audit_record"].replace('"success"', '"denied"')
            else:
                doc["leaf_hash"] = other_hex(doc["leaf_hash"])
        elif kind == 12:  # the tree size line altered in the signed note
            doc["checkpoint"] = doc["checkpoint"].replace(f"\n{size}\n", f"\n{size + rng.randint(1, 9)}\n", 1)
        else:  # type confusion
            field = rng.choice(["leaf_index", "tree_size", "inclusion_path", "entry", "checkpoint"])
            doc[field] = rng.choice([None, "7", -1, 1.5, True, [], {}])
        return False

    def con_mutation(doc: dict[str, Any]) -> bool:
        """Mutate doc; True if only its path changed (then the raw verifiers are tried too)."""
        kind = rng.randrange(9)
        if kind <= 3:
            _mutate_list(doc, "consistency_path", rng)
            return True
        elif kind == 4:  # notes swapped (claim the newer is older)
            doc["old_checkpoint"], doc["new_checkpoint"] = doc["new_checkpoint"], doc["old_checkpoint"]
            doc["old_size"], doc["new_size"] = doc["new_size"], doc["old_size"]
        elif kind == 5:  # another genuine checkpoint on one side, sizes following it
            side = rng.choice(["old", "new"])
            current = doc[f"{side}_size"]
            other = rng.choice([c for c in cps if c.tree_size not in (doc["old_size"], doc["new_size"], current)])
            doc[f"{side}_checkpoint"], doc[f"{side}_size"] = other.signed_note, other.tree_size
        elif kind == 6:  # a size field alone
            side = rng.choice(["old_size", "new_size"])
            doc[side] = doc[side] + rng.choice([-1, 1, 50])
        elif kind == 7:  # wrong signature
            side = rng.choice(["old_checkpoint", "new_checkpoint"])
            doc[side] = _flip_signature(doc[side], rng) if rng.random() < 0.5 else rng.choice(impostor_cps).signed_note
        else:  # a path for other sizes
            a, b = sorted(rng.sample(range(1, 301), 2))
            doc["consistency_path"] = [h.hex() for h in tree.consistency_proof(a, b)]
            return True
        return False

    accepted = 0
    mutated = 0
    raw_checked = 0
    for n in range(12_000):
        if n % 2 == 0:
            original = rng.choice(inclusion_docs)
            doc = copy.deepcopy(original)
            path_only = inc_mutation(doc)
            if doc == original:
                continue
            mutated += 1
            accepted += check_proof_file(doc, verifier).ok
            if path_only:
                path = [bytes.fromhex(h) for h in doc["inclusion_path"]]
                leaf, root = bytes.fromhex(doc["leaf_hash"]), bytes.fromhex(doc["root_hash"])
                i, size = doc["leaf_index"], doc["tree_size"]
                accepted += verify_inclusion(leaf, i, size, path, root)
                accepted += ref.verify_inclusion(i, size, leaf, path, root)
                raw_checked += 1
        else:
            original = rng.choice(consistency_docs)
            doc = copy.deepcopy(original)
            path_only = con_mutation(doc)
            if doc == original:
                continue
            mutated += 1
            accepted += check_consistency_file(doc, verifier).ok
            if path_only:
                path = [bytes.fromhex(h) for h in doc["consistency_path"]]
                old_cp = next(c for c in cps if c.tree_size == doc["old_size"])
                new_cp = next(c for c in cps if c.tree_size == doc["new_size"])
                args = (
                    doc["old_size"],
                    doc["new_size"],
                    bytes.fromhex(old_cp.root_hash),
                    bytes.fromhex(new_cp.root_hash),
                )
                accepted += verify_consistency(*args, path)
                accepted += ref.verify_consistency(*args, path)
                raw_checked += 1
    assert accepted == 0
    assert mutated >= 10_000 and raw_checked > 4000


def _state_at(entries: list[LedgerEntryChained], size: int) -> ChainState:
    """A chain state at `size` rebuilt from entries (to sign impostor checkpoints)."""
    frontier: tuple[bytes, ...] = ()
    for i, e in enumerate(entries[:size]):
        frontier = merkle.frontier_append(frontier, i, merkle.leaf_hash(entry_bytes_of(e)))
    last = entries[size - 1]
    return ChainState(
        tenant=last.chain_tenant,
        size=size,
        last_hash=last.entry_hash,
        frontier=frontier,
        last_event_id=last.envelope.event_id,
        last_occurred_at=last.envelope.occurred_at,
    )
