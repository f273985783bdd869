"""`audit verify` from the log by the C extension (`audit.verify_log_native`) against the Python
verifier, real broker: the same cases tests/test_ledger_verify_log.py holds the ClickHouse path to.

On sound chains the native path must agree with `verify(from_log(...))` alone (no chain handed
to Python), every tampered chain must go to Python (the reports are then equal), a record it
does not read exactly must send the whole log to Python, and one tenant is read as `from_log`
reads it (by Kafka key, then envelope tenant). Run with LEDGERFLOW_NATIVE=0 these are skipped:
`verify_log` then takes the ClickHouse path, which test_ledger_verify_log.py covers.
"""

from __future__ import annotations

import pytest

from domain.checkpoint import SigningKey, generate_key
from ledgerflow import audit
from ledgerflow.settings import load
from streams.events import AuditRecorded
from tests.test_ledger_verify_log import EXPECTED, QUOTED, encoded, ledger_topics, produce_log, tampered
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
