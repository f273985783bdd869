"""`audit verify` from the log by ClickHouse (`audit.verify_log_sql`) against the Python verifier, real broker.

The raw records go to a scratch chDB as Avro files; on sound chains ClickHouse must agree with
`verify(from_log(...))` alone (no chain handed to Python), on every tampered chain it must
notice (the chain is handed to Python, which names the first bad seq: the reports are then
equal), and a record it cannot read exactly as Python does must send the whole log to Python.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Sequence
from typing import Any

import pytest
from confluent_kafka import Producer

from domain.checkpoint import SigningKey, generate_key
from ledgerflow import audit
from ledgerflow.settings import Settings, load
from streams.admin import create_missing
from streams.codec import HEADER_LEN, Codec, PoisonEvent
from streams.events import AuditRecorded, Event, LedgerCheckpointSigned, LedgerEntryChained
from streams.topics import Topics
from tests.test_ledger_verify_sql import chain_events

pytestmark = pytest.mark.kafka
CODEC = Codec()


def ledger_topics(bootstrap: str, *, dlq: bool = False) -> Topics:
    """Only the three topics `verify` reads, under a fresh prefix (cheaper than every catalogue
    topic); with `dlq`, the audit topic's dead-letter topic too (what the ledger worker writes)."""
    topics = Topics(prefix=f"t{uuid.uuid4().hex[:10]}.", partitions=3)
    wanted = []
    for kind in ("audit", "ledger", "ledger-checkpoints"):
        name = topics.name(kind)
        spec = topics.spec_for(name)
        assert spec is not None
        wanted.append((name, topics.partitions_of(name), spec.configs()))
    if dlq:
        wanted.append((topics.dlq(topics.name("audit")), 1, {}))
    create_missing(bootstrap, wanted)
    return topics


def produce_log(bootstrap: str, topics: Topics, records: list[tuple[str, bytes]]) -> Settings:
    """(tenant, value) in log order, each to the topic of its type, keyed by tenant (a chain's one partition)."""
    producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5})
    kinds = {AuditRecorded: "audit", LedgerEntryChained: "ledger", LedgerCheckpointSigned: "ledger-checkpoints"}
    for tenant, value in records:
        kind = "audit"  # a malformed record too
        with contextlib.suppress(PoisonEvent):
            kind = kinds[type(CODEC.decode(value))]
        producer.produce(topics.name(kind), key=tenant.encode(), value=value)
    assert producer.flush(30) == 0
    return load(kafka_bootstrap=bootstrap, topic_prefix=topics.prefix, partitions=topics.partitions)


def encoded(events: Sequence[Event]) -> list[tuple[str, bytes]]:
    return [(e.tenant, CODEC.encode(e)) for e in events]


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return generate_key("ledgerflow.test")


def entry_of(events: list[Event], seq: int) -> LedgerEntryChained:
    return next(e for e in events if isinstance(e, LedgerEntryChained) and e.seq == seq)


def audit_of(events: list[Event], seq: int) -> AuditRecorded:
    wanted = entry_of(events, seq).audit_event_id
    return next(e for e in events if isinstance(e, AuditRecorded) and e.envelope.event_id == wanted)


def tampered(tenant: str, key: SigningKey) -> list[Event]:
    """`tenant`'s chain (45 entries, a checkpoint every 10) with one kind of tampering, named by the tenant."""
    events = chain_events(tenant, 45, key)
    kind = tenant.split("-")[0]
    if kind == "hash":  # one flipped hex digit of an entry's prev_hash
        e = entry_of(events, 12)
        flipped = e.prev_hash[:5] + ("0" if e.prev_hash[5] != "0" else "1") + e.prev_hash[6:]
        events[events.index(e)] = dataclasses.replace(e, prev_hash=flipped)
    elif kind == "gap":
        events.remove(entry_of(events, 30))
    elif kind == "reorder":  # entries 20 and 21 swap places in the log
        i, j = events.index(entry_of(events, 20)), events.index(entry_of(events, 21))
        events[i], events[j] = events[j], events[i]
    elif kind == "audit":  # the audit record chained at seq 6 altered
        rec = audit_of(events, 6)
        events[events.index(rec)] = dataclasses.replace(rec, actor="mallory")
    elif kind == "missing":  # the audit record chained at seq 4 never logged
        events.remove(audit_of(events, 4))
    elif kind == "twin":  # an identical redelivery of entry 15 (Python collapses it: still OK)
        e = entry_of(events, 15)
        events.insert(events.index(e) + 1, e)
    elif kind == "fork":  # seq 17 twice, different contents
        e = entry_of(events, 17)
        events.insert(events.index(e) + 1, dataclasses.replace(e, audit_sha256="b" * 64, entry_hash="d" * 64))
    elif kind == "root":  # the checkpoint of size 20 signs another root
        cp = next(e for e in events if isinstance(e, LedgerCheckpointSigned) and e.tree_size == 20)
        events[events.index(cp)] = dataclasses.replace(cp, root_hash="c" * 64)
    elif kind == "cut":  # entries 35.. dropped; the checkpoint of size 40 stays
        events = [e for e in events if not (isinstance(e, LedgerEntryChained) and e.seq >= 35)]
    return events


QUOTED = 'o\'neil \\"q"'  # a tenant name with a quote, a backslash and double quotes
# tenant → (ok, bad seq) that Python names; the sound ones have tricky strings (chain_events)
EXPECTED = {
    "acme": (True, None), QUOTED: (True, None), "hash-t": (False, 12), "gap-t": (False, 30),
    "reorder-t": (False, 20), "audit-t": (False, 6), "missing-t": (False, 4), "twin-t": (True, None),
    "fork-t": (False, 17), "root-t": (False, 10), "cut-t": (False, 35),
}  # fmt: skip


def test_clickhouse_verifies_sound_chains_alone_and_hands_every_tampered_one_to_python(
    kafka_bootstrap: str, key: SigningKey
) -> None:
    topics = ledger_topics(kafka_bootstrap)
    settings = produce_log(kafka_bootstrap, topics, [r for t in EXPECTED for r in encoded(tampered(t, key))])
    python = audit.verify(audit.from_log(settings), key.verifier)
    assert {r.tenant: (r.ok, r.bad_seq) for r in python} == EXPECTED

    fast, slow = audit.verify_log_sql(settings, key.verifier)
    assert fast == python
    assert slow == sorted(t for t in EXPECTED if t not in ("acme", QUOTED))  # the twin too: Python collapses it
    # one tenant, by query parameter
    assert audit.verify_log_sql(settings, key.verifier, QUOTED) == ([r for r in python if r.tenant == QUOTED], [])
    # the command's path: ClickHouse by default, here partitions in two processes
    run = audit.run_verify(settings, key.verifier, "log", jobs=2)
    engine = "native" if audit.native_available() else "clickhouse"  # the C verifier when built (LEDGERFLOW_NATIVE)
    assert (run.reports, run.verifier, run.by_python) == (python, engine, tuple(slow))


def _union_index_at(value: bytes) -> int:
    """Byte offset of the envelope's trace_parent union index: after event_id, event_type,
    schema_version, tenant, occurred_at (each a varint, strings then their bytes)."""
    pos = HEADER_LEN
    for kind in "ssisl":
        n, shift = 0, 0
        while True:
            b = value[pos]
            pos += 1
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        if kind == "s":
            pos += n >> 1
    return pos


MALFORMED: dict[str, Any] = {
    "truncated": lambda v: v[:-3],
    "trailing bytes": lambda v: v + b"\x00",
    "union index 2": lambda v: v[: _union_index_at(v)] + b"\x04" + v[_union_index_at(v) + 1 :],
    "another type on the audit topic": None,  # a checkpoint produced to the audit topic
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_a_record_clickhouse_cannot_read_exactly_sends_the_whole_log_to_python(
    kafka_bootstrap: str, key: SigningKey, case: str
) -> None:
    events = chain_events("acme", 12, key)
    records = encoded(events)
    audit_at = next(i for i, e in enumerate(events) if isinstance(e, AuditRecorded) and e.envelope.trace_parent is None)
    topics = ledger_topics(kafka_bootstrap)
    mutate = MALFORMED[case]
    if mutate is None:
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        cp = next(e for e in events if isinstance(e, LedgerCheckpointSigned))
        producer.produce(topics.name("audit"), key=b"acme", value=CODEC.encode(cp))
        assert producer.flush(10) == 0
    else:
        records[audit_at] = ("acme", mutate(records[audit_at][1]))
    settings = produce_log(kafka_bootstrap, topics, records)
    python = audit.verify(audit.from_log(settings), key.verifier)
    with pytest.raises(audit.LogNotReadable):
        audit.verify_log_sql(settings, key.verifier)
    run = audit.run_verify(settings, key.verifier, "log")
    assert (run.reports, run.by_python) == (python, ("acme",))  # verified by Python instead


def test_no_ledger_yet_and_audit_records_only(kafka_bootstrap: str, key: SigningKey) -> None:
    topics = ledger_topics(kafka_bootstrap)
    settings = load(kafka_bootstrap=kafka_bootstrap, topic_prefix=topics.prefix, partitions=3)
    assert audit.verify_log_sql(settings, key.verifier) == ([], [])
    events = [e for e in chain_events("acme", 3, key) if isinstance(e, AuditRecorded)]
    produce_log(kafka_bootstrap, topics, encoded(events))
    assert audit.verify(audit.from_log(settings), key.verifier) == []  # nothing chained yet: nothing to verify
    assert audit.verify_log_sql(settings, key.verifier) == ([], [])
