"""`audit verify` from the log by the C extension (`audit.verify_log_native`) against the Python
verifier, real broker: the same cases tests/test_ledger_verify_log.py holds the ClickHouse path to.

On sound chains the native path must agree with `verify(from_log(...))` alone (no chain handed
to Python), every tampered chain must go to Python (the reports are then equal), a record it
does not read exactly must send the whole log to Python, and one tenant is read as `from_log`
reads it (by Kafka key, then envelope tenant). Run with LEDGERFLOW_NATIVE=0 these are skipped:
`verify_log` then takes the ClickHouse path, which test_ledger_verify_log.py covers.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from confluent_kafka import Producer

from domain.checkpoint import SigningKey, generate_key
from ledgerflow import audit
from ledgerflow.settings import load
from streams.events import AuditRecorded, LedgerCheckpointSigned
from tests.test_ledger_verify_log import (
    CODEC,
    EXPECTED,
    QUOTED,
    encoded,
    entry_of,
    ledger_topics,
    produce_log,
    tampered,
)
from tests.test_ledger_verify_sql import chain_events

pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(not audit.native_available(), reason="domain._ledger_native not built or LEDGERFLOW_NATIVE=0"),
]


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return generate_key("ledgerflow.test")


def test_native_verifies_sound_chains_alone_and_hands_every_tampered_one_to_python(
    kafka_bootstrap: str, key: SigningKey
) -> None:
    topics = ledger_topics(kafka_bootstrap)
    empty = load(kafka_bootstrap=kafka_bootstrap, topic_prefix=topics.prefix, partitions=topics.partitions)
    assert audit.verify_log_native(empty, key.verifier) == ([], [])  # nothing in the log yet
    settings = produce_log(kafka_bootstrap, topics, [r for t in EXPECTED for r in encoded(tampered(t, key))])

    python = audit.verify(audit.from_log(settings), key.verifier)
    assert {r.tenant: (r.ok, r.bad_seq) for r in python} == EXPECTED
    timings: dict[str, float] = {}
    fast, slow = audit.verify_log_native(settings, key.verifier, timings=timings)
    assert fast == python
    assert slow == sorted(t for t in EXPECTED if t not in ("acme", QUOTED))  # the twin too: Python collapses it
    assert set(timings) >= {"read and hash the log", "unsound chains in Python"}
    for tenant in (QUOTED, "gap-t"):
        one = audit.verify(audit.from_log(settings, tenant), key.verifier)
        assert audit.verify_log_native(settings, key.verifier, tenant) == (one, [] if tenant == QUOTED else [tenant])
        assert one == [r for r in python if r.tenant == tenant]
    # the command's path (partitions in N processes: tests/test_ledger_verify_log.py)
    run = audit.run_verify(settings, key.verifier, "log")
    assert (run.reports, run.verifier, run.by_python) == (python, "native", tuple(slow))


def test_a_record_it_cannot_read_exactly_sends_the_whole_log_to_python(kafka_bootstrap: str, key: SigningKey) -> None:
    events = chain_events("acme", 12, key)
    records = encoded(events)
    at = next(i for i, e in enumerate(events) if isinstance(e, AuditRecorded))
    records[at] = ("acme", records[at][1] + b"\x00")  # trailing bytes: Python's reader skips the record
    topics = ledger_topics(kafka_bootstrap)
    settings = produce_log(kafka_bootstrap, topics, records)
    python = audit.verify(audit.from_log(settings), key.verifier)
    assert not python[0].ok  # its entry's audit record is missing
    with pytest.raises(audit.LogNotReadable, match="audit"):
        audit.verify_log_native(settings, key.verifier)
    run = audit.run_verify(settings, key.verifier, "log")
    assert (run.reports, run.verifier, run.by_python) == (python, "native", ("acme",))


def test_an_entry_on_the_checkpoints_topic_and_a_negative_checkpoint_size_get_pythons_reports(
    kafka_bootstrap: str, key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review findings: `from_log` files an audit record or entry into its chain whatever topic
    it is on, even one whose envelope the codec refuses, so a fork of seq 5 placed on the
    checkpoints topic breaks the chain for Python and must for the fast paths too; and a
    forged checkpoint of size -1 made the native path raise instead of reporting."""
    events = chain_events("acme", 12, key)
    fork = entry_of(events, 5)
    forged = replace(
        fork, audit_sha256="f" * 64, entry_hash="e" * 64, envelope=replace(fork.envelope, event_type="Bogus")
    )
    bogus = CODEC.encode(forged)  # not a redelivery of seq 5 (those collapse): a fork
    cp = next(e for e in events if isinstance(e, LedgerCheckpointSigned))
    negative = CODEC.encode(replace(cp, tree_size=-1))
    # the fork comes after the ledger topic's entries whatever order the topics are read in
    # (a stop's CI once read the checkpoints topic first and got "where seq 0 belongs")
    for extra, reason in ((bogus, "out of order: seq 5 found after seq 11"), (negative, "covers -1 entries")):
        topics = ledger_topics(kafka_bootstrap)
        settings = produce_log(kafka_bootstrap, topics, encoded(events))
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        producer.produce(topics.name("ledger-checkpoints"), key=b"acme", value=extra)
        assert producer.flush(30) == 0
        python = audit.verify(audit.from_log(settings), key.verifier)
        assert not python[0].ok and reason in (python[0].reason or ""), python
        assert audit.run_verify(settings, key.verifier, "log").reports == python
        with monkeypatch.context() as m:  # the ClickHouse path had the first hole too
            m.setenv("LEDGERFLOW_NATIVE", "0")
            run = audit.run_verify(settings, key.verifier, "log")
            assert (run.reports, run.verifier) == (python, "clickhouse")
