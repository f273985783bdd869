"""The audit ledger end to end: real broker, the Faust worker, the sink into chDB, the auditor's tools.

Audit records go in; the worker chains and checkpoints them; `audit verify` recomputes every
hash from the log and from ClickHouse; tampering in ClickHouse is found at its seq; a proof
written from the log checks offline with the public key alone; a worker killed mid-run and
restarted leaves no duplicate seq and no gap.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agents.ledger import LedgerConfig, LedgerWorker, load_or_create_key, snapshot_record
from domain.checkpoint import load_verifier_key_file, open_checkpoint
from domain.ledger import ChainHead, LedgerEntry, audit_canonical_bytes
from domain.ledger_replay import resume
from ledgerflow import audit
from ledgerflow.settings import Settings, load
from streams import telemetry
from streams.admin import read_to_end
from streams.codec import Codec
from streams.events import AuditRecorded, Envelope, LedgerEntryChained
from streams.ids import uuid7
from streams.log_scan import scan_to_end
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


@pytest.mark.timeout(600)  # the whole auditor's path in one broker run (the default 300 s is tight on a busy box)
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
    passing = [audit.run_verify(settings, key, "store", client=store), audit.run_verify(settings, key, "log")]

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

    # verification results are facts: the passing runs and a tampered one land rows in ledger_verifications
    tampered = audit.run_verify(settings, key, "store", "acme", client=store)
    run_ok, run_bad = str(uuid7()), str(uuid7())
    audit.record_verifications(settings, audit.verification_events(passing, key, None, run_id=run_ok))
    audit.record_verifications(settings, audit.verification_events([tampered], key, "acme", run_id=run_bad))
    # the command line: a --no-record check publishes nothing, a recorded one its one row
    args = argparse.Namespace(audit_command="verify", tenant="globex", source="log", key=None, jobs=1, no_record=True)
    assert audit.cmd(settings, args) == 0
    assert audit.cmd(settings, argparse.Namespace(**{**vars(args), "no_record": False})) == 0
    run_until(sink, lambda: int(str(store.command("SELECT count() FROM ledger_verifications"))) == 6, timeout=60)
    for _ in range(10):  # a row the --no-record run published would arrive about now
        sink.poll_once(0.1)
    cols = (
        "correlation_id, tenant, chain_tenant, scope, source, ok, entries_checked, checkpoints_checked, "
        "root_hash, first_bad_seq, reason, duration_ms, key_fingerprint, key_id, verifier, producer"
    )
    result = store.query(f"SELECT {cols} FROM ledger_verifications ORDER BY correlation_id, source, tenant")
    rows = [dict(zip(result.column_names, r, strict=True)) for r in result.result_rows]
    assert len(rows) == 6, rows
    fingerprint = hashlib.sha256(key.to_vkey().encode()).hexdigest()
    assert all(
        (r["key_fingerprint"], r["key_id"], r["producer"], r["tenant"])
        == (fingerprint, key.key_id_hex, "cli:audit-verify", r["chain_tenant"])
        and r["duration_ms"] >= 0
        for r in rows
    ), rows
    ok_rows = [r for r in rows if r["correlation_id"] == run_ok]
    summary = {
        (r["source"], r["tenant"]): (r["scope"], r["ok"], r["entries_checked"], r["checkpoints_checked"])
        for r in ok_rows
    }
    assert summary == {
        ("clickhouse", "acme"): ("all", True, 100, 2),
        ("clickhouse", "globex"): ("all", True, 45, 1),
        ("log", "acme"): ("all", True, 100, 2),
        ("log", "globex"): ("all", True, 45, 1),
    }
    assert all(r["first_bad_seq"] is None and r["reason"] is None for r in ok_rows)
    # the store by ClickHouse; the log by the native verifier when built, else in a scratch chDB (in a
    # spawned child: this process holds the store)
    log_engine = "native" if audit.native_available() else "clickhouse"
    assert {(r["source"], r["verifier"]) for r in ok_rows} == {("clickhouse", "clickhouse"), ("log", log_engine)}
    assert {r["root_hash"] for r in ok_rows if r["tenant"] == "acme"} == {reports["acme"].root_hash}
    (bad_row,) = [r for r in rows if r["correlation_id"] == run_bad]
    assert (bad_row["tenant"], bad_row["scope"], bad_row["source"], bad_row["ok"]) == (
        "acme",
        "tenant",
        "clickhouse",
        False,
    )
    assert (bad_row["first_bad_seq"], bad_row["entries_checked"]) == (23, 23) and "audit_sha256" in bad_row["reason"]
    assert bad_row["verifier"] == "python"  # ClickHouse found the chain unsound; Python named the seq
    (cli_row,) = [r for r in rows if r["correlation_id"] not in (run_ok, run_bad)]
    assert (cli_row["tenant"], cli_row["scope"], cli_row["source"], cli_row["ok"], cli_row["entries_checked"]) == (
        "globex",
        "tenant",
        "log",
        True,
        45,
    )


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
    # the restarted worker came back from the snapshots the killed one committed with its entries
    assert "snapshot restore" in (tmp_path / "worker1.log").read_text()
    # redelivered twins are identical (same event id, seq and hash); never two entries for one seq
    for chain in chains.values():
        by_seq: dict[int, set[str]] = {}
        for e in chain.entries:
            by_seq.setdefault(e.seq, set()).add(e.entry_hash)
        assert all(len(h) == 1 for h in by_seq.values())


def _run_until_chained(w: LedgerWorker, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while w.chained < n:
        assert time.monotonic() < deadline, f"chained {w.chained} of {n}"
        w.step()


def test_restart_reads_the_snapshots_and_the_tail_only_and_a_stale_snapshot_falls_back(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    settings = settings_for(kafka_bootstrap, topics, tmp_path)
    key = load_or_create_key(settings.ledger_key_path, settings.ledger_origin)
    config = LedgerConfig(key=key, origin=settings.ledger_origin, every_n=40, every_s=3600, batch_max=100)
    group = f"ledger-{uuid.uuid4().hex[:8]}"
    acme, initech = audits("acme", 450), audits("initech", 450)
    interleaved = [r for pair in zip(acme, initech, strict=True) for r in pair]  # every batch touches both

    def worker() -> LedgerWorker:
        w = LedgerWorker(kafka_bootstrap, group, topics, config)
        w.subscribe()
        return w

    # first start: no snapshot yet, so the whole (empty) history is read; then 600 entries
    produce_events(kafka_bootstrap, topics, interleaved[:600])
    first = worker()
    _run_until_chained(first, 600)
    assert first.restores and all(r.mode == "full" and r.reason == "no snapshot" for r in first.restores)
    first.close()

    # restart: heads from the snapshots plus the ledger's tail, not the 600 entries of history
    produce_events(kafka_bootstrap, topics, interleaved[600:800])
    second = worker()
    _run_until_chained(second, 200)
    restored = [r for r in second.restores if r.chains]
    assert restored and all(r.mode == "snapshot" for r in restored), second.restores
    assert sum(r.entries for r in restored) == 600  # the heads it restored: every entry before the restart
    assert all(0 < r.entries_read <= 2 * config.batch_max for r in restored), restored  # of 600 in the log
    assert all(r.snapshots_read > 0 for r in restored)
    second.close()
    reports = {r.tenant: r for r in audit.verify(audit.from_log(settings), key.verifier)}
    assert {t: (r.ok, r.size) for t, r in reports.items()} == {"acme": (True, 400), "initech": (True, 400)}

    # a stale snapshot (acme at seq 10, while the tail after it holds seq ~390 on): a full rebuild
    logged = [CODEC.decode(m.value() or b"") for m in scan_to_end(kafka_bootstrap, [topics.name("ledger")], 60)]
    entries = [e for e in logged if isinstance(e, LedgerEntryChained) and e.chain_tenant == "acme"]
    early = sorted(entries, key=lambda e: e.seq)[:10]
    heads = [m for m in scan_to_end(kafka_bootstrap, [topics.ledger_heads()], 60) if m.key() == b"acme"]
    doc = json.loads(max(heads, key=lambda m: m.offset() or 0).value() or b"")
    stale = snapshot_record(ChainHead.from_state(resume("acme", early)), doc["partition"], doc["ledger_from"])
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(topics.ledger_heads(), key=b"acme", value=stale, partition=doc["partition"])
    producer.flush(10)
    produce_events(kafka_bootstrap, topics, interleaved[800:])
    third = worker()
    _run_until_chained(third, 100)
    fallback = [r for r in third.restores if r.partition == doc["partition"]]
    assert [(r.mode, r.reason) for r in fallback] == [("full", "stale snapshot of acme")], third.restores
    assert fallback[0].entries_read >= 400  # the whole history of the partition
    third.close()
    chains = audit.from_log(settings)
    reports = {r.tenant: r for r in audit.verify(chains, key.verifier)}
    assert {t: (r.ok, r.size) for t, r in reports.items()} == {"acme": (True, 450), "initech": (True, 450)}
    for chain in chains.values():  # no seq twice, none missing
        assert sorted(e.seq for e in chain.entries) == list(range(450))


class _FailingCommit(LedgerWorker):
    """A worker whose `fail_at`-th transaction fails at its commit: its records are flushed to
    the broker (as a commit does first), then the offsets and the commit never come, as when
    the group's generation fences them (KIP-447); the worker must abort it."""

    def __init__(self, *args: Any, fail_at: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fail_at = fail_at
        self.commits = 0
        self.failures: list[int] = []  # per failed transaction: chains the batch behind it had touched

    def _commit(self, offsets: Any, group: Any) -> None:
        self.commits += 1
        if self.commits == self.fail_at:
            assert self._producer.flush(30) == 0
            raise KafkaException(KafkaError(KafkaError._FAIL, "injected commit failure"))
        super()._commit(offsets, group)

    def _settle(self, later: Any = None) -> int | None:
        done = super()._settle(later)
        if done is None:
            self.failures.append(len(later or {}))
        return done


def _uncommitted(bootstrap: str, topic: str) -> int:
    """Records of `topic` read_uncommitted: committed and aborted entries alike."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"raw-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.partition.eof": True,
            "isolation.level": "read_uncommitted",
        }
    )
    try:
        parts = consumer.list_topics(topic, 30).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        n, ended = 0, set[int]()
        deadline = time.monotonic() + 60
        while len(ended) < len(parts) and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.5):
                err = msg.error()
                if err is None:
                    n += 1
                elif err.code() == KafkaError._PARTITION_EOF:
                    ended.add(msg.partition() or 0)
        return n
    finally:
        consumer.close()


def test_a_failed_commit_undoes_its_batch_and_the_one_chained_behind_it(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    """Overlapping commits: batch k+1 is chained while batch k's commit is in flight. When that
    commit fails, both are undone (the heads, then the consumer's positions) and chained
    again: no gap, no duplicate, every entry of the aborted transaction invisible. The same
    without overlap, after a restart, with tracing on: each entry carries its audit record's
    trace context in its headers, and each transaction has its span.

    Every 50 records (one batch) start a new chain, all on one partition, so batch k+1 makes
    a chain batch k never touched: left standing after the abort, that head would take the
    re-read records for redeliveries (their offsets are behind it) and open a gap."""
    settings = settings_for(kafka_bootstrap, topics, tmp_path)
    key = load_or_create_key(settings.ledger_key_path, settings.ledger_origin)
    group = f"ledger-{uuid.uuid4().hex[:8]}"
    tenants = [f"tenant-{i:02d}" for i in range(12)]
    records = [r for t in tenants for r in audits(t, 50)]
    # the traced part: runs of two records of one request, every fifth record untraced
    for i in range(400, 600):
        parent = None if i % 5 == 0 else f"00-{uuid.UUID(int=i // 2).hex}-00f067aa0ba902b7-01"
        records[i] = replace(records[i], envelope=replace(records[i].envelope, trace_parent=parent))
    source = topics.name("audit")

    def run(part: list[AuditRecorded], overlap: bool, fail_at: int) -> _FailingCommit:
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True})
        for r in part:
            producer.produce(source, CODEC.encode(r), r.tenant.encode(), 0)
        assert producer.flush(30) == 0
        config = LedgerConfig(key=key, origin=settings.ledger_origin, every_n=40, every_s=3600, batch_max=50)
        w = _FailingCommit(kafka_bootstrap, group, topics, replace(config, overlap=overlap), fail_at=fail_at)
        w.subscribe()
        _run_until_chained(w, len(part))
        w.close()
        return w

    first = run(records[:400], overlap=True, fail_at=3)
    # the failed batch's transaction aborted, and a batch already chained behind it was undone too
    assert len(first.failures) == 1 and first.failures[0] > 0, first.failures
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    telemetry.use(provider)
    try:
        second = run(records[400:], overlap=False, fail_at=2)
    finally:
        telemetry.use(None)
    assert second.failures == [] and second.commits > 2  # without overlap a failure is handled in its own step
    batches = [s for s in spans.get_finished_spans() if s.name == "audit-ledger"]
    assert len(batches) >= second.commits  # one per transaction (the aborted one too)
    parent_of = {r.envelope.event_id: r.envelope.trace_parent for r in records}
    traced = 0
    for msg in read_all(kafka_bootstrap, [topics.name("ledger")], expect=len(records)):
        entry = CODEC.decode(msg.value())
        assert isinstance(entry, LedgerEntryChained)
        headers = dict(msg.headers() or [])
        parent = parent_of[entry.audit_event_id]
        if entry.chain_tenant in tenants[8:] and parent is not None:
            assert headers == {"traceparent": parent.encode()}, (entry.seq, headers)
            traced += 1
        else:
            assert "traceparent" not in headers, (entry.chain_tenant, entry.seq, headers)
    assert traced == 160

    chains = audit.from_log(settings)
    reports = {r.tenant: r for r in audit.verify(chains, key.verifier)}
    assert {t: (r.ok, r.size, r.checkpoints_checked) for t, r in reports.items()} == {
        t: (True, 50, 1) for t in tenants
    }, reports
    for chain in chains.values():  # no seq twice, none missing
        assert sorted(e.seq for e in chain.entries) == list(range(50))
    # the aborted transactions' entries reached the log, but no read_committed reader saw them
    assert _uncommitted(kafka_bootstrap, topics.name("ledger")) > len(records)


def test_a_quiet_chain_is_checkpointed_in_a_fenced_transaction(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path
) -> None:
    """The wall-clock checkpoint of a chain no traffic reaches commits (its transaction carries the
    consumed positions, so it is fenced by the group generation like every batch) and verifies."""
    settings = settings_for(kafka_bootstrap, topics, tmp_path)
    key = load_or_create_key(settings.ledger_key_path, settings.ledger_origin)
    config = LedgerConfig(key=key, origin=settings.ledger_origin, every_n=1000, every_s=0.5, batch_max=100)
    worker = LedgerWorker(kafka_bootstrap, f"ledger-{uuid.uuid4().hex[:8]}", topics, config)
    worker.subscribe()
    produce_events(kafka_bootstrap, topics, audits("acme", 30))
    _run_until_chained(worker, 30)
    deadline = time.monotonic() + 30
    checkpoints: list[Any] = []
    while not checkpoints:
        assert time.monotonic() < deadline, "no wall-clock checkpoint of the quiet chain"
        worker.step()  # nothing to consume: the quiet chain's tail is signed once every_s has passed
        logged = scan_to_end(kafka_bootstrap, [topics.name("ledger-checkpoints")], 30)
        checkpoints = [CODEC.decode(m.value() or b"") for m in logged]
    worker.close()
    assert [c.tree_size for c in checkpoints] == [30]
    reports = audit.verify(audit.from_log(settings), key.verifier)
    assert [(r.tenant, r.ok, r.size, r.checkpoints_checked) for r in reports] == [("acme", True, 30, 1)]
