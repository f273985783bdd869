"""The ledger worker's fold in C (`domain._ledger_native.ChainBatch`, `LedgerWorker._chain_native`)
against the Python fold it replaces (`LedgerWorker._chain_records`), no broker.

Both folds run over the same batches of audit-topic records from the same chain heads; what
each transaction would write must be equal byte for byte: every LedgerEntryChained value and
key per ledger partition in order (so ids, hashes, links and Merkle leaves), checkpoints,
dead letters; and so must the heads after each batch (size, last hash, frontier, so the Merkle
roots, offsets, times) and the undo the batch keeps for an abort. Hypothesis mixes records the
C code takes with all it leaves to Python in the middle of a batch: poison bytes, another
event on the topic, truncated and mutated records, ids only uuid.UUID() reads, blank and
non-ASCII tenants, times out of the codec's range, redeliveries, a revoked partition, heads
restored with odd states. The same through the real broker: tests/test_ledger_kafka.py (the
worker's default is the C fold) and `test_the_python_fold_through_the_broker` below.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.sdk.trace import TracerProvider

from agents.ledger import LedgerConfig, LedgerWorker, _Batch, _Out, _Partition, native_chainer
from domain.checkpoint import generate_key
from domain.ledger import ChainHead, ChainState, native_chain_headers
from streams import telemetry
from streams.clients import Producer
from streams.codec import Codec
from streams.deadletter import HEADER_FIRST_SEEN, HEADER_REASON
from streams.events import AuditRecorded, Envelope
from streams.log_scan import scan_to_end
from streams.topics import Topics
from tests.conftest import REPO
from tests.test_ledger_verify_log import ledger_topics

native = pytest.importorskip("domain._ledger_native")
HEADERS = native_chain_headers()
assert HEADERS is not None, "AuditRecorded / LedgerEntryChained moved past v1: the C fold needs a new layout"
AUDIT_HEADER, ENTRY_HEADER = HEADERS
assert native_chainer() is not None or os.environ.get("LEDGERFLOW_NATIVE") == "0"
CODEC = Codec()
KEY = generate_key("ledgerflow.test/native-chain")
NOW = datetime.now(UTC)
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass
class Msg:
    """What the fold reads of a confluent-kafka Message."""

    _value: bytes | None
    _partition: int
    _offset: int
    _key: bytes | None = None

    def value(self) -> bytes | None:
        return self._value

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes | None:
        return self._key

    def topic(self) -> str:
        return "t.audit"


class Fold(LedgerWorker):
    """A LedgerWorker's fold without its Kafka clients: `_chain` over given heads, counting
    the records the C fold left to Python."""

    def __init__(self, use_native: bool, every_n: int, every_s: float, parts: dict[int, _Partition]) -> None:
        self._config = LedgerConfig(key=KEY, origin="ledgerflow.test", every_n=every_n, every_s=every_s)
        self._codec = CODEC
        self._native = native_chainer() if use_native else None
        if use_native:
            assert self._native is not None, "the C fold is not in use: LEDGERFLOW_NATIVE=0?"
        self._parts = parts
        self._keys = {}
        self.source, self.ledger, self.checkpoints, self.dead = "t.audit", "t.ledger", "t.checkpoints", "t.audit.dlq"
        self.by_python = 0

    def _chain_records(self, msgs: Any, batch: _Batch, out: _Out) -> None:
        self.by_python += len(msgs)
        super()._chain_records(msgs, batch, out)


def copy_parts(parts: dict[int, _Partition]) -> dict[int, _Partition]:
    return {p: _Partition({t: h.copy() for t, h in part.heads.items()}) for p, part in parts.items()}


def states(parts: dict[int, _Partition]) -> dict[tuple[int, str], ChainState]:
    return {(p, t): h.state() for p, part in parts.items() for t, h in part.heads.items()}


def written(out: _Out) -> tuple[Any, ...]:
    """What the transaction would write (a dead letter's first-seen time is the wall clock's)."""
    entries = {p: (v, k, h if out.traced else None) for p, (v, k, h) in out.entries.items()}
    other = [(t, v, k, p, [x for x in (h or []) if x[0] != HEADER_FIRST_SEEN]) for t, v, k, p, h in out.other]
    return entries, other


def undo_of(batch: _Batch) -> dict[tuple[int, str], ChainState | None]:
    return {k: None if h is None else h.state() for k, h in batch.undo.items()}


def fold_both(
    batches: list[list[Msg]], parts: dict[int, _Partition], every_n: int, every_s: float
) -> tuple[Fold, Fold, list[_Out]]:
    """Each batch through the Python and the C fold, from equal heads: asserts every outcome equal."""
    py, c = Fold(False, every_n, every_s, copy_parts(parts)), Fold(True, every_n, every_s, copy_parts(parts))
    outs = []
    for msgs in batches:
        before = states(py._parts)
        pb, cb = _Batch(len(msgs), 0.0), _Batch(len(msgs), 0.0)
        pout, cout = py._chain(msgs, pb), c._chain(msgs, cb)  # type: ignore[arg-type]
        assert written(cout) == written(pout)
        assert states(c._parts) == states(py._parts)
        assert undo_of(cb) == undo_of(pb)
        assert cb.dead == pb.dead
        # the undo of an abort restores the heads as they were before the batch
        c._undo(cb.undo)
        assert states(c._parts) == before
        py._undo(pb.undo)
        pout, cout = py._chain(msgs, _Batch(len(msgs), 0.0)), c._chain(msgs, _Batch(len(msgs), 0.0))  # type: ignore[arg-type]
        assert written(cout) == written(pout)
        outs.append(cout)
    assert states(c._parts) == states(py._parts)
    return py, c, outs


def audit(
    i: int,
    tenant: str = "acme",
    at: datetime | None = None,
    event_id: str | None = None,
    trace: str | None = None,
    details: dict[str, str] | None = None,
) -> AuditRecorded:
    eid = event_id or str(uuid.UUID(int=(0x0193 << 112) | (0x7 << 76) | (0x8 << 60) | i * 7919 + 1))
    return AuditRecorded(
        envelope=Envelope(
            event_id=eid,
            event_type="AuditRecorded",
            schema_version=1,
            tenant=tenant,
            occurred_at=at or NOW - timedelta(seconds=60) + timedelta(microseconds=i * 50 + 1),
            correlation_id=str(uuid.UUID(int=i + 12345)),
            producer="gateway",
            trace_parent=trace,
            causation_id=None if i % 4 == 0 else str(uuid.UUID(int=i + 777)),
        ),
        action="request.completed",
        actor=f"key_{i % 7}",
        subject=f"req-{i}",
        outcome="success" if i % 5 else "denied",
        details=details if details is not None else {"model": "sim-small", "n": str(i), "cost": f"0.{i:06d}"},
    )


def realistic(n: int, tenants: int = 5, partitions: int = 3) -> list[Msg]:
    offsets = [0] * partitions
    out = []
    for i in range(n):
        tenant = f"tenant-{i % tenants}"
        p = (i % tenants) % partitions
        out.append(Msg(CODEC.encode(audit(i, tenant)), p, offsets[p], tenant.encode()))
        offsets[p] += 1
    return out


# --- fixtures ---------------------------------------------------------------------------------


def test_realistic_batches_are_chained_in_c_alone_to_the_same_bytes() -> None:
    msgs = realistic(1200)
    _py, c, outs = fold_both([msgs[:500], msgs[500:]], {0: _Partition(), 1: _Partition(), 2: _Partition()}, 100, 3600.0)
    assert c.by_python == 0  # every record was chained in C
    assert sum(len(v) for out in outs for v, _k, _h in out.entries.values()) == 1200
    assert sum(1 for out in outs for o in out.other if o[0] == "t.checkpoints") == 10  # 5 chains × 240 entries
    assert {h.size for part in c._parts.values() for h in part.heads.values()} == {240}
    # the entries decode as the Python fold's events, and each chain's root is the frontier's
    for out in outs:
        for values, _k, _h in out.entries.values():
            assert all(CODEC.decode(v).event_type == "LedgerEntryChained" for v in values)


def test_records_left_to_python_in_the_middle_of_a_batch_keep_order_and_heads() -> None:
    good = realistic(60, tenants=2, partitions=1)
    odd_id = Msg(CODEC.encode(audit(1000, "tenant-0", event_id=str(uuid.uuid4()).upper())), 0, 100, b"tenant-0")
    braces = Msg(CODEC.encode(audit(1001, "tenant-1", event_id="{" + str(uuid.uuid4()) + "}")), 0, 101)
    not_ascii = Msg(CODEC.encode(audit(1002, "üñï")), 0, 102)  # C leaves a tenant of non-ASCII only to Python
    blank = Msg(CODEC.encode(audit(1003, "\u3000")), 0, 103)  # blank: poison (missing-tenant)
    future = Msg(CODEC.encode(audit(1004, "tenant-0", at=NOW + timedelta(days=3))), 0, 104)  # poison (insane-time)
    other = Msg(CODEC.encode(dataclasses.replace(audit(1005), action="x")), 0, 105)
    tombstone = Msg(None, 0, 106)
    garbage = Msg(b"\xc3\x01" + AUDIT_HEADER[2:] + b"\x00\x01", 0, 107)
    truncated = Msg(CODEC.encode(audit(1008, "tenant-1"))[:-3], 0, 108)
    separators = Msg(CODEC.encode(audit(1009, "\x1c\x1f")), 0, 109)  # blank to str.isspace() too
    later = [Msg(m._value, 0, 200 + i, m._key) for i, m in enumerate(good[30:])]
    left = [odd_id, braces, not_ascii, blank, future, other, tombstone, garbage, truncated, separators]
    msgs = [*good[:30], *left, *later]
    _py, c, outs = fold_both([msgs], {0: _Partition()}, 7, 3600.0)
    assert c.by_python == 2 * 9  # all but `other`, a valid record C chains (each batch is folded twice)
    assert len(outs[0].entries[0][0]) == 60 + 4  # odd_id, braces and not_ascii chained by Python, other by C
    dead = [o for o in outs[0].other if o[0] == "t.audit.dlq"]
    assert [dict(o[4] or [])[HEADER_REASON] for o in dead] == [
        b"missing-tenant",
        b"insane-time",
        b"not-single-object-encoding",
        b"undecodable-body",
        b"undecodable-body",
        b"missing-tenant",
    ]


def test_a_tenant_with_a_control_character_is_dead_lettered_not_chained_to_a_crash() -> None:
    """No checkpoint note can name such a chain (its origin line would hold the character): it
    used to be chained, then signing its first checkpoint raised NoteError and stopped the worker."""
    msgs = [Msg(CODEC.encode(audit(i, ["acme", "a\tb", "x\ny", "acme"][i % 4])), 0, i) for i in range(12)]
    _py, c, outs = fold_both([msgs], {0: _Partition()}, 1, 3600.0)  # a checkpoint after every entry
    assert c.by_python == 2 * 6  # C leaves the six to Python (each batch is folded twice)
    assert len(outs[0].entries[0][0]) == 6 and {h for h in c._parts[0].heads if h != "acme"} <= {"a\tb", "x\ny"}
    assert all(h.size == 0 for t, h in c._parts[0].heads.items() if t != "acme")
    dead = [dict(o[4] or []) for o in outs[0].other if o[0] == "t.audit.dlq"]
    assert [d[HEADER_REASON] for d in dead] == [b"fold-refused"] * 6
    assert sum(1 for o in outs[0].other if o[0] == "t.checkpoints") == 6


def test_redeliveries_a_revoked_partition_and_restored_heads() -> None:
    """Records at or below a head's last offset are skipped; a partition no longer assigned
    is skipped whole; heads restored mid-chain (pending wait, a checkpoint behind) continue."""
    first = realistic(40, tenants=2, partitions=2)
    restored = Fold(False, 1000, 3600.0, {0: _Partition(), 1: _Partition()})
    restored._chain(first, _Batch(len(first), 0.0))  # type: ignore[arg-type]
    head = restored._parts[0].heads["tenant-0"]
    head.checkpoint_size = 5  # a checkpoint behind, its pending wait since an old time
    head.pending_since = NOW - timedelta(seconds=90)  # 30 s before the fresh records' times
    parts = {0: restored._parts[0], 1: restored._parts[1]}
    again = first[10:20]  # redelivered
    fresh = [Msg(CODEC.encode(audit(100 + i, f"tenant-{i % 2}")), i % 2, 40 + i) for i in range(30)]
    revoked = [Msg(CODEC.encode(audit(500 + i, "tenant-9")), 2, i) for i in range(5)]
    batch = [*again, *fresh[:10], *revoked, *fresh[10:]]
    _py, c, outs = fold_both([batch], parts, 1000, 20.0)  # the old pending wait makes tenant-0 due at once
    assert c.by_python == 0
    cps = [o for o in outs[0].other if o[0] == "t.checkpoints"]
    assert len(cps) == 1  # tenant-0's wait passed at its first entry
    assert 2 not in outs[0].entries and sum(len(v) for v, _k, _h in outs[0].entries.values()) == 30


def test_traced_entries_carry_their_audit_records_trace_context() -> None:
    parents = [
        None,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01",
    ]
    msgs = [Msg(CODEC.encode(audit(i, "acme", trace=parents[i // 3 % 3])), 0, i) for i in range(30)]
    telemetry.use(TracerProvider())
    try:
        _py, c, outs = fold_both([msgs], {0: _Partition()}, 8, 3600.0)
    finally:
        telemetry.use(None)
    headers = outs[0].entries[0][2]
    assert c.by_python == 0 and outs[0].traced
    assert [h is None for h in headers] == [parents[i // 3 % 3] is None for i in range(30)]


def test_python_alone_without_the_extension_or_with_native_off() -> None:
    env = {**os.environ, "LEDGERFLOW_NATIVE": "0"}
    code = "from agents.ledger import native_chainer; print(native_chainer())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "None"
    assert LedgerConfig(key=KEY, origin="o", native=False).native is False


def test_chain_batch_refuses_bad_arguments_cleanly() -> None:
    a, e = AUDIT_HEADER, ENTRY_HEADER
    msgs = [(CODEC.encode(audit(1)), 0, 0)]
    with pytest.raises(ValueError, match="10 bytes"):
        native.ChainBatch(msgs, a[:5], e)
    with pytest.raises(TypeError):
        native.ChainBatch([(b"x", 0)], a, e)
    with pytest.raises(TypeError):
        native.ChainBatch([(b"x", "zero", 0)], a, e)
    batch = native.ChainBatch(msgs, a, e)
    assert batch.size == 1
    with pytest.raises(IndexError):
        batch.run(2, lambda p, t: None, 1, 1.0, 2**62, False)
    with pytest.raises(TypeError, match="7-tuple"):
        batch.run(0, lambda p, t: (1, 2), 1, 1.0, 2**62, False)
    with pytest.raises(ZeroDivisionError):
        batch.run(0, lambda p, t: 1 / 0, 1, 1.0, 2**62, False)
    # a head state it cannot take exactly: that record is left to Python (next = 0, no due)
    bad: list[tuple[Any, ...]] = [
        (None, 1, "0" * 64, [], None, 0, None),  # a frontier that does not fit size 1
        (None, 0, "0" * 63, [], None, 0, None),  # not a hash
        (None, 0, "0" * 64, [], None, 0, -(2**62)),  # a pending time far out of range
        (None, 2**70, "0" * 64, [], None, 0, None),
    ]
    for state in bad:
        assert batch.run(0, lambda p, t, s=state: s, 1, 1.0, 2**62, False) == (0, None, [], [])
    # None: a revoked partition, the record is skipped
    assert batch.run(0, lambda p, t: None, 1, 1.0, 2**62, False) == (1, None, [], [])
    # max_us before the record's time: not handled
    assert batch.run(0, lambda p, t: (None, 0, "0" * 64, [], None, 0, None), 1, 1.0, 0, False)[0] == 0


# --- hypothesis ------------------------------------------------------------------------------

# "a\tb" and "x\ny" are refused by both folds (a checkpoint's origin line cannot hold a control character)
TENANTS = ["acme", "initech", "é-corp", "t 1", "üñï", 'q"\\', "😀x", " ", "\u3000", "\t\n", "\x1c\x1f", "a\tb", "x\ny"]
TEXT = st.text(st.characters(codec="utf-8"), max_size=12)
IDS = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: u.hex),
    st.sampled_from(["not-an-id", ""]),
)
TIMES = st.one_of(
    st.integers(0, 5_000_000).map(lambda us: NOW - timedelta(seconds=10) + timedelta(microseconds=us)),
    st.sampled_from(
        [
            datetime(2020, 1, 1, tzinfo=UTC),
            datetime(2019, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
            NOW.replace(microsecond=0),
            NOW + timedelta(hours=23),
            NOW + timedelta(days=2),
        ]
    ),
)


@st.composite
def records(draw: st.DrawFn) -> list[tuple[str, Any]]:
    """A batch's worth of record kinds, in order, each with what makes it."""
    out: list[tuple[str, Any]] = []
    for _ in range(draw(st.integers(1, 30))):
        kind = draw(st.sampled_from(["audit"] * 6 + ["odd"] * 3 + ["poison", "mutated", "again"]))
        if kind in ("audit", "odd", "mutated"):
            tenant = draw(st.sampled_from(TENANTS[:4] if kind != "odd" else TENANTS))
            event = audit(
                draw(st.integers(0, 10**6)),
                tenant,
                at=draw(TIMES),
                event_id=draw(IDS) if kind == "odd" else None,
                trace=draw(st.none() | TEXT | st.just("00-" + "a" * 32 + "-" + "b" * 16 + "-01")),
                details=draw(st.dictionaries(TEXT, TEXT, max_size=4)),
            )
            if kind == "odd":
                event = dataclasses.replace(
                    event, envelope=dataclasses.replace(event.envelope, correlation_id=draw(IDS))
                )
            value = CODEC.encode(event)
            if kind == "mutated":
                at = draw(st.integers(0, len(value) - 1))
                value = value[:at] + bytes([draw(st.integers(0, 255))]) + value[at + 1 :]
            out.append((kind, (value, draw(st.integers(0, 2)))))
        elif kind == "poison":
            out.append(
                (kind, (draw(st.binary(max_size=30) | st.just(ENTRY_HEADER + b"\x00")), draw(st.integers(0, 2))))
            )
        else:
            out.append((kind, draw(st.integers(0, 1000))))
    return out


@FAST
@given(
    made=records(),
    split=st.integers(0, 40),
    every_n=st.integers(1, 6),
    every_s=st.sampled_from([0.0, 1e-6, 0.5, 3600.0]),
    restored=st.booleans(),
)
def test_the_c_fold_equals_the_python_fold(
    made: list[tuple[str, Any]], split: int, every_n: int, every_s: float, restored: bool
) -> None:
    offsets = [0, 0, 0]
    msgs: list[Msg] = []
    for kind, spec in made:
        if kind == "again":
            if msgs:  # a record redelivered, or another at an offset already passed
                old = msgs[spec % len(msgs)]
                msgs.append(Msg(old._value, old._partition, old._offset - spec % 2))
            continue
        value, p = spec
        msgs.append(Msg(value, p, offsets[p]))
        offsets[p] += 1
    parts = {0: _Partition(), 1: _Partition()}  # partition 2 is not ours: its records are skipped
    if restored:  # heads restored from a snapshot: a checkpoint behind, a pending wait
        head = ChainHead.from_state(
            ChainState("acme", pending_since=NOW - timedelta(seconds=1), checkpoint_size=0, offsets={0: 0})
        )
        prior = Fold(False, 1000, 3600.0, {0: _Partition({"acme": head})})
        earlier = [Msg(CODEC.encode(audit(i, "acme")), 0, 1 + i) for i in range(3)]
        prior._chain(earlier, _Batch(3, 0.0))  # type: ignore[arg-type]
        offsets[0] = 10  # the records below chain after these
        parts[0].heads["acme"] = prior._parts[0].heads["acme"]
    fold_both([msgs[:split], msgs[split:]], parts, every_n, every_s)


# --- through the broker ------------------------------------------------------------------------


def _log_of(bootstrap: str, topics: Topics) -> dict[str, dict[int, list[bytes]]]:
    """The committed values of the ledger's output topics, per partition in offset order."""
    out: dict[str, dict[int, list[bytes]]] = {}
    for key in ("ledger", "ledger-checkpoints"):
        parts = out.setdefault(key, {})
        for msg in scan_to_end(bootstrap, [topics.name(key)], 60):
            parts.setdefault(msg.partition() or 0, []).append(msg.value() or b"")
    dead = scan_to_end(bootstrap, [topics.dlq(topics.name("audit"))], 60)
    out["dead"] = {0: [m.value() or b"" for m in dead]}
    return out


@pytest.mark.kafka
def test_the_python_fold_through_the_broker_writes_the_c_folds_log(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One LedgerWorker with LEDGERFLOW_NATIVE=0 and one with the C fold, each over its own copy
    of the same audit records (three chains, a poison record and records the C fold leaves to
    Python among them): byte-identical entries, checkpoints and dead letters in every partition."""
    records: list[tuple[bytes, bytes]] = []
    for i in range(240):
        tenant = ("acme", "initech", "umbrella")[i % 3]
        event_id = str(uuid.UUID(int=(0x0193 << 112) | (0x7 << 76) | (0x8 << 60) | i)).upper() if i % 50 == 7 else None
        records.append((tenant.encode(), CODEC.encode(audit(i, tenant, event_id=event_id))))
        if i == 100:
            records.append((b"acme", b"not an event"))
    logs = []
    for native_on in (False, True):
        topics = ledger_topics(kafka_bootstrap, dlq=True)
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
        for key, value in records:
            producer.produce(topics.name("audit"), value, key)
        assert producer.flush(30) == 0
        config = LedgerConfig(key=KEY, origin="ledgerflow.test", every_n=25, every_s=3600.0, batch_max=60)
        with monkeypatch.context() as m:
            if not native_on:
                m.setenv("LEDGERFLOW_NATIVE", "0")
            worker = LedgerWorker(kafka_bootstrap, f"ledger-{uuid.uuid4().hex[:8]}", topics, config)
        assert (worker._native is not None) is native_on
        worker.subscribe()
        try:
            deadline = time.monotonic() + 120
            while worker.chained < len(records):
                assert time.monotonic() < deadline, f"chained {worker.chained} of {len(records)}"
                worker.step()
        finally:
            worker.close()
        logs.append(_log_of(kafka_bootstrap, topics))
    python_log, c_log = logs
    assert sum(len(v) for v in c_log["ledger"].values()) == 240
    assert sum(len(v) for v in c_log["ledger-checkpoints"].values()) == 9  # 80 entries per chain, every 25
    assert c_log["dead"] == {0: [b"not an event"]}
    assert c_log == python_log
