"""The audit ledger end to end: real broker, the Faust worker, the sink into chDB, the auditor's tools.

Audit records go in; the worker chains and checkpoints them; `audit verify` recomputes every
hash from the log and from ClickHouse; tampering in ClickHouse is found at its seq; a proof
written from the log checks offline with the public key alone; a worker killed mid-run and
restarted leaves no duplicate seq and no gap.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from domain.checkpoint import load_verifier_key_file, open_checkpoint
from domain.ledger import LedgerEntry, audit_canonical_bytes
from ledgerflow import audit
from ledgerflow.settings import Settings, load
from streams.admin import read_to_end
from streams.codec import Codec
from streams.events import AuditRecorded, Envelope, LedgerEntryChained
from streams.ids import uuid7
from streams.topics import Topics
from tests.conftest import REPO, free_port
from tests.kafka_helpers import read_all
from tests.test_projections_sink import produce_events, run_until

pytestmark = pytest.mark.kafka
CODEC = Codec()


def audits(tenant: str, n: int) -> list[AuditRecorded]:
    out = []
    for i in range(n):
        eid = str(uuid7())
        out.append(
            AuditRecorded(
                envelope=Envelope(
                    event_id=eid,
                    event_type="AuditRecorded",
                    schema_version=1,
                    tenant=tenant,
                    occurred_at=datetime.now(UTC),
                    correlation_id=eid,
                    producer="test",
                ),
                action="request.completed",
                actor=f"key-{i % 3}",
                subject=f"req-{i}",
                outcome="success",
                details={"model": "sim-small", "n": str(i)},
            )
        )
    return out


def settings_for(bootstrap: str, topics: Topics, tmp: Path) -> Settings:
    return load(
        kafka_bootstrap=bootstrap,
        topic_prefix=topics.prefix,
        partitions=topics.partitions,
        data_dir=tmp,
        ledger_checkpoint_every=40,
        ledger_checkpoint_interval_s=3600,
    )


@pytest.fixture
def worker(kafka_bootstrap: str, topics: Topics, tmp_path: Path) -> Iterator[Any]:
    procs: list[subprocess.Popen[bytes]] = []
    group = f"agents-{uuid.uuid4().hex[:8]}"

    def start() -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env.update(
            {
                "LEDGERFLOW_KAFKA_BOOTSTRAP": kafka_bootstrap,
                "LEDGERFLOW_TOPIC_PREFIX": topics.prefix,
                "LEDGERFLOW_PARTITIONS": str(topics.partitions),
                "LEDGERFLOW_WORKER_ID": group,
                "LEDGERFLOW_WORKER_WEB_PORT": str(free_port()),
                "LEDGERFLOW_DATA_DIR": str(tmp_path),
                "LEDGERFLOW_LEDGER_CHECKPOINT_EVERY": "40",
                "LEDGERFLOW_LEDGER_CHECKPOINT_INTERVAL_S": "3600",
                "LEDGERFLOW_LEDGER_BATCH_MAX": "100",
            }
        )
        log = (tmp_path / f"worker{len(procs)}.log").open("wb")
        p = subprocess.Popen(
            [sys.executable, "-m", "agents.ledger", "--loglevel", "info"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()


def reference_chains(settings: Settings) -> dict[str, tuple[list[LedgerEntry], dict[str, bytes], list[Any]]]:
    """What `audit.from_log` read before its fast path: every record decoded to its event."""
    topics = Topics(settings.topic_prefix, settings.partitions)
    names = [topics.name("audit"), topics.name("ledger"), topics.name("ledger-checkpoints")]
    out: dict[str, tuple[list[LedgerEntry], dict[str, bytes], list[Any]]] = {}
    for _t, _o, msg in read_to_end(settings.bootstrap, names, 60, strict=True):
        event = Codec(fast=False).decode(msg.value())
        entries, audits, checkpoints = out.setdefault(event.tenant, ([], {}, []))
        if isinstance(event, AuditRecorded):
            audits[event.envelope.event_id] = audit_canonical_bytes(event)
        elif isinstance(event, LedgerEntryChained):
            entries.append(LedgerEntry.of(event))
        else:
            checkpoints.append(event)
    return out


def fields(entries: list[Any]) -> list[LedgerEntry]:
    return [LedgerEntry.of(e) for e in entries]


def test_chain_verify_tamper_and_offline_proof(
    kafka_bootstrap: str,
    topics: Topics,
    tmp_path: Path,
    worker: Any,
    new_sink: Any,
    store: Client,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = audits("acme", 100) + audits("globex", 45)
    produce_events(kafka_bootstrap, topics, records)
    worker()
    read_all(kafka_bootstrap, [topics.name("ledger")], expect=len(records), timeout=120)
    settings = settings_for(kafka_bootstrap, topics, tmp_path)
    key = audit.public_key(settings)

    # from the log: every chain recomputes, checkpoints at 40 and 80 (acme) and 40 (globex) verify
    chains = audit.from_log(settings)
    reports = {r.tenant: r for r in audit.verify(chains, key)}
    assert {t: (r.ok, r.size, r.checkpoints_checked) for t, r in reports.items()} == {
        "acme": (True, 100, 2),
        "globex": (True, 45, 1),
    }, reports
    # ...reading only the hashed fields gives what decoding every event gave, and so does
    # reading the partitions in two processes
    assert reference_chains(settings) == {t: (fields(c.entries), c.audits, c.checkpoints) for t, c in chains.items()}
    assert audit.verify_log(settings, key, jobs=2) == sorted(reports.values(), key=lambda r: r.tenant or "")

    # from ClickHouse, after the sink landed everything
    sink = new_sink()
    run_until(
        sink,
        lambda: (
            int(str(store.command("SELECT count() FROM ledger_entry_chained"))) == len(records)
            and int(str(store.command("SELECT count() FROM ledger_checkpoint_signed"))) == 3
        ),
        timeout=60,
    )
    from_store = {r.tenant: r for r in audit.verify(audit.from_store(store), key)}
    assert all(r.ok for r in from_store.values()) and from_store["acme"].root_hash == reports["acme"].root_hash

    # an offline proof from the log, checked with nothing but the file and the public key
    doc = audit.prove(audit.from_log(settings, "acme"), "acme", 17)
    proof = tmp_path / "proof.json"
    proof.write_text(json.dumps(doc))
    # `audit prove` of several entries: one read of the tenant's records, one tree, a file each
    monkeypatch.chdir(tmp_path)
    assert audit._prove_cmd(settings, ["acme:17", "acme:79", "globex:39"], None) == 0
    assert json.loads((tmp_path / "proof-acme-17.json").read_text()) == doc
    for name in ("proof-acme-79.json", "proof-globex-39.json"):
        assert audit.check_file(tmp_path / name, key) == (True, "ok")
    pub = settings.ledger_key_path.with_name(settings.ledger_key_path.name + ".pub")
    ok, reason = audit.check_file(proof, load_verifier_key_file(pub))
    assert ok, reason
    checked = subprocess.run(
        [sys.executable, "-m", "ledgerflow", "audit", "check", str(proof), "--key", str(pub)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "LEDGERFLOW_KAFKA_BOOTSTRAP": "127.0.0.1:1"},
    )  # fmt: skip  (an unreachable broker: the check needs no platform)
    assert checked.returncode == 0 and checked.stdout.startswith("OK"), checked.stdout + checked.stderr
    doc["inclusion_path"][0] = doc["inclusion_path"][0][:-1] + ("0" if doc["inclusion_path"][0][-1] != "0" else "1")
    proof.write_text(json.dumps(doc))
    assert not audit.check_file(proof, load_verifier_key_file(pub))[0]
    note = audit.latest_checkpoint(audit.from_log(settings, "acme"), "acme")
    checkpoint, _ = open_checkpoint(note, load_verifier_key_file(pub))
    assert (checkpoint.tree_size, checkpoint.root_hash.hex()) == (80, doc["root_hash"])
    cons = audit.consistency(audit.from_log(settings, "acme"), "acme", 40, 80)
    (tmp_path / "cons.json").write_text(json.dumps(cons))
    assert audit.check_file(tmp_path / "cons.json", key)[0]

    # tampering in ClickHouse is found at its seq: a changed audit record, a deleted entry
    store.command("ALTER TABLE audit_recorded UPDATE actor = 'mallory' WHERE tenant = 'acme' AND subject = 'req-23'")
    store.command("ALTER TABLE ledger_entry_chained DELETE WHERE tenant = 'globex' AND seq = 30")
    bad = {r.tenant: r for r in audit.verify(audit.from_store(store), key)}
    assert (bad["acme"].ok, bad["acme"].bad_seq) == (False, 23) and "audit_sha256" in (bad["acme"].reason or "")
    assert (bad["globex"].ok, bad["globex"].bad_seq) == (False, 30) and "gap" in (bad["globex"].reason or "")
    # ...while the log still verifies
    assert all(r.ok for r in audit.verify(audit.from_log(settings), key))


def test_worker_killed_mid_run_leaves_no_duplicate_seq_and_no_gap(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path, worker: Any
) -> None:
    n = 50_000
    records = audits("acme", n // 2) + audits("initech", n // 2)
    first = worker()
    deadline = time.monotonic() + 60
    produce_events(kafka_bootstrap, topics, records)
    # kill -9 once some, not all, entries are out
    while time.monotonic() < deadline:
        seen = len(read_all(kafka_bootstrap, [topics.name("ledger")], expect=1, timeout=2))
        if seen >= 200:
            break
    first.send_signal(signal.SIGKILL)
    first.wait(10)
    at_kill = len(read_all(kafka_bootstrap, [topics.name("ledger")], expect=1, timeout=2))
    assert 0 < at_kill < n, f"the kill should land mid-run; {at_kill} of {n} entries were out"
    worker()
    read_all(kafka_bootstrap, [topics.name("ledger")], expect=n, timeout=180)
    settings = settings_for(kafka_bootstrap, topics, tmp_path)
    chains = audit.from_log(settings)
    reports = {r.tenant: r for r in audit.verify(chains, audit.public_key(settings))}
    assert {t: (r.ok, r.size) for t, r in reports.items()} == {"acme": (True, n // 2), "initech": (True, n // 2)}, (
        reports,
        (tmp_path / "worker1.log").read_text()[-3000:],
    )
    print(f"killed with {at_kill} of {n} entries out")
    # redelivered twins are identical (same event id, seq and hash); never two entries for one seq
    for chain in chains.values():
        by_seq: dict[int, set[str]] = {}
        for e in chain.entries:
            by_seq.setdefault(e.seq, set()).add(e.entry_hash)
        assert all(len(h) == 1 for h in by_seq.values())
