"""Agent: the audit ledger. Chains every AuditRecorded into its tenant's hash chain.

A Kafka transactional consume-transform-produce loop around the pure `domain.ledger.chain`
and `make_checkpoint` (run: `python -m agents.ledger`, started by `ledgerflow up`).

Why not a Faust agent with a changelog table like the totals agent: a chain tolerates
neither a gap nor two entries for one seq, and at-least-once Faust gives neither guarantee
under SIGKILL (the kill test found both: the table's changelog and the agent's outputs
reach Kafka independently of the offset commit). Here every batch is ONE transaction:
1. read a batch of audit records (read_committed: an aborted request is never chained);
2. fold each into its chain head (held in memory), encoding its `LedgerEntryChained`, and
   a signed `LedgerCheckpointSigned` when one is due, for the same partition number of the
   ledger topics; poison becomes a dead letter. In C (`domain._ledger_native.ChainBatch`)
   when it is built, the same bytes as the Python fold, which does what the C code leaves
   (`_chain_native`; LEDGERFLOW_NATIVE=0 or `LedgerConfig.native` off: Python alone);
3. open the transaction, produce what the fold made, add the consumed offsets
   (`send_offsets_to_transaction`, fenced by the consumer group generation, KIP-447) and
   commit. Entries, checkpoints, dead letters and offsets become visible together or not at
   all: exactly once.
4. On any failure the transaction is aborted, what it did to the heads is undone and the
   consumer rewinds to the committed offsets.

Overlap (`LedgerConfig.overlap`, on by default): step 3's offsets and commit (tens of ms of
broker round trips, GIL released) run on a helper thread while the main thread consumes and
folds the next batch (steps 1-2 touch no producer). That batch's transaction opens only
after the commit before it succeeded; if that commit failed, both batches are undone (the
later first) and read again. So transactions still commit one at a time and in order, and
entries reach each ledger partition in seq order; a rebalance or a close first settles the
commit in flight.

The chain heads are state derived from the log, and the log is where they come back from:
each transaction also writes a snapshot of every chain head it changed to a compacted topic
(`Topics.ledger_heads()`), committed with the entries, and when a partition is assigned its
heads are restored from those snapshots plus the ledger entries written after them (a
transaction or two), checked against each other; without a usable snapshot they are rebuilt
from the partition's whole ledger history (read_committed). Either way a restarted or
rebalanced worker continues exactly where the committed log ends. Single writer per chain:
the audit topic is keyed by tenant, one partition has one owner.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import confluent_kafka
import orjson
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from agents.metrics import AgentMetrics
from domain.checkpoint import SigningKey, generate_key, load_signing_key_file, save_key_pair
from domain.ledger import ChainHead, ChainState, NativeHeadState, native_chain_headers
from domain.ledger_replay import LOGGED_ENTRY_FIELDS, LoggedEntry, resume, resume_from
from streams import telemetry
from streams.admin import create_missing
from streams.clients import Consumer, Producer
from streams.codec import Codec, PoisonEvent
from streams.deadletter import DeadLetter
from streams.events import AuditRecorded, LedgerEntryChained
from streams.log_scan import AvroDecodeError, RecordReaders, scan_to_end
from streams.metrics import serve
from streams.topics import Topics

AGENT_NAME = "audit-ledger"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LedgerConfig:
    key: SigningKey
    origin: str  # each chain signs as <origin>/<tenant>
    every_n: int = 1000
    every_s: float = 10.0
    batch_max: int = 2000
    poll_s: float = 0.2
    snapshots: bool = True  # write and read chain-head snapshots (off: every assignment reads the whole history)
    # commit a batch's transaction on a helper thread while the next batch is consumed and
    # chained (off: every step commits its own batch before it returns)
    overlap: bool = True
    # chain in C (`domain._ledger_native.ChainBatch`) when it is built and LEDGERFLOW_NATIVE is
    # not 0; off: every record through the codec and `ChainHead.append` (the reference)
    native: bool = True


def load_or_create_key(path: Path, name: str) -> SigningKey:
    """The checkpoint signing key at `path`, made on first use (with `path`.pub beside it).

    Several workers may start at once on one machine: the file is created exclusively, and
    a worker that loses the race reads the winner's key.
    """
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            save_key_pair(generate_key(name), path)
            log.info("made a new ledger signing key %s (public key %s.pub)", path, path)
        except FileExistsError:
            pass
    return load_signing_key_file(path)


SNAPSHOT_FORMAT = "ledgerflow.ledger-head/1"
# Transactions aborted in a row before the worker gives up and exits for the supervisor to
# start a clean one: a producer that cannot deliver (librdkafka#5430 can leave a partition
# leaderless after a broker restart) would otherwise fail every commit and rewind forever.
MAX_ABORTS_IN_A_ROW = 3

_Headers = list[tuple[str, str | bytes | None]]
_Record = tuple[str, bytes, bytes | None, int | None, _Headers | None]  # topic, value, key, partition, headers
# one ledger partition's entries in order: their values, keys and (when traced) headers
_Entries = tuple[list[bytes], list[bytes], list[_Headers | None]]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_FUTURE = timedelta(days=1)  # the codec's bound on event times (streams.codec._MAX_FUTURE)


def native_chainer() -> tuple[Any, tuple[bytes, bytes]] | None:
    """The C fold (`domain._ledger_native`) and the (AuditRecorded, LedgerEntryChained) headers
    it reads and writes; None when it is not built, LEDGERFLOW_NATIVE=0, or those schemas moved
    past the v1 it is written for. Then the Python fold, the reference, runs alone."""
    if os.environ.get("LEDGERFLOW_NATIVE", "1") == "0":
        return None
    try:
        from domain import _ledger_native
    except ImportError:
        return None
    headers = native_chain_headers()
    return None if headers is None else (_ledger_native, headers)


@dataclass
class _Partition:
    heads: dict[str, ChainHead] = field(default_factory=dict)
    # a ledger offset at or below every entry this worker writes to the partition from now on:
    # what a snapshot records as where to read the log's tail from
    ledger_from: int = 0
    dirty: set[str] = field(default_factory=set)  # chains changed by the open transaction
    resnapshot: set[str] = field(default_factory=set)  # chains whose committed snapshot is stale


@dataclass
class _Out:
    """What one batch's transaction writes, encoded by `_chain` before it opens."""

    # audit partition (= ledger partition) -> its entries in order (headers only when traced)
    entries: dict[int, _Entries] = field(default_factory=dict)
    traced: bool = False  # entries carry trace headers
    other: list[_Record] = field(default_factory=list)  # checkpoints and dead letters


@dataclass
class _Batch:
    """One batch of audit records in its transaction."""

    records: int
    started: float  # perf_counter when its chaining began
    # heads as they were before this batch touched them (None: the batch made the chain),
    # copied on first touch, so an abort undoes exactly what the batch did
    undo: dict[tuple[int, str], ChainHead | None] = field(default_factory=dict)
    dead: int = 0  # dead letters among its records
    commit: Future[None] | None = None  # the commit in flight on the helper thread
    touched: set[ChainHead] = field(default_factory=set)  # heads with an undo entry


@dataclass(frozen=True)
class Restore:
    """How a partition's heads came back on assignment (kept for tests and logs)."""

    partition: int
    mode: str  # "snapshot" (snapshots + the log's tail) or "full" (the whole history)
    reason: str  # why a full rebuild ("no snapshot", "stale snapshot of acme: ..."), else ""
    snapshots_read: int
    entries_read: int
    chains: int
    entries: int


def snapshot_record(head: ChainHead, partition: int, ledger_from: int) -> bytes:
    """The compacted snapshot of one chain head: its ChainState and where the log's tail starts."""
    doc = {
        "format": SNAPSHOT_FORMAT,
        "partition": partition,
        "ledger_from": ledger_from,
        "head": head.state().to_json(),
    }
    return orjson.dumps(doc)


class LedgerStalled(RuntimeError):
    """Every recent transaction aborted: this process's producer is not usable any more."""


class LedgerWorker:
    """One member of the ledger's consumer group."""

    def __init__(self, bootstrap: str, group: str, topics: Topics, config: LedgerConfig, codec: Codec | None = None):
        self._bootstrap = bootstrap
        self._topics = topics
        self._config = config
        self._codec = codec or Codec()
        # the C fold writes the entries of today's schemas only: not with a codec of the caller's
        self._native = native_chainer() if config.native and codec is None else None
        self._entries = RecordReaders({"LedgerEntryChained": LOGGED_ENTRY_FIELDS})
        self.source = topics.name("audit")
        self.ledger = topics.name("ledger")
        self.checkpoints = topics.name("ledger-checkpoints")
        self.dead = topics.dlq(self.source)
        self.heads_topic = topics.ledger_heads()
        if config.snapshots:
            snapshot_configs = {"cleanup.policy": "compact", "retention.ms": "-1", "min.insync.replicas": "1"}
            create_missing(bootstrap, [(self.heads_topic, topics.partitions_of(self.source), snapshot_configs)])
        self._consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "isolation.level": "read_committed",
                "session.timeout.ms": 10000,
                "heartbeat.interval.ms": 3000,
                "partition.assignment.strategy": "cooperative-sticky",
            }
        )
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "transactional.id": f"{group}-ledger-{uuid.uuid4().hex[:12]}",
                "enable.idempotence": True,
                "acks": "all",
                # entries wait for the commit anyway (it flushes at once): a long linger only
                # makes fewer, larger batches, and produce() then contends less with the
                # sender thread (produce's share of the wall time halved against 5 ms)
                "linger.ms": 50,
                # a worker killed mid-transaction blocks read_committed readers of the ledger
                # (the next owner's rebuild among them) until its transaction times out
                "transaction.timeout.ms": 10000,
            }
        )
        self._producer.init_transactions(60)
        self.metrics = AgentMetrics()  # issue 11: served by main() at --metrics-port
        self.batches = self.metrics.batches(AGENT_NAME, group)
        self._parts: dict[int, _Partition] = {}
        self._first_offset: dict[int, int | None] = {}  # partition -> offset of the open transaction's first entry
        self._keys: dict[str, bytes] = {}  # tenant -> its record key
        self._inflight: _Batch | None = None  # a batch whose commit runs on the helper thread
        self._rewinds = 0  # consumer rewinds after an abort (a step drops what it fetched before one)
        self._aborts_in_a_row = 0
        self._committer = ThreadPoolExecutor(1, "ledger-commit") if config.overlap else None
        self.restores: list[Restore] = []
        self.chained = 0

    # -- assignment -------------------------------------------------------------------------

    def _on_assign(self, consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]) -> None:
        self._settle()  # a rebalance sees only committed transactions
        for tp in partitions:
            self._parts[tp.partition] = self._restore(tp.partition)
        consumer.incremental_assign(partitions)

    def _on_revoke(self, consumer: confluent_kafka.Consumer, partitions: list[TopicPartition]) -> None:
        self._settle()  # the batch in flight commits (or is undone) before its partitions go
        for tp in partitions:
            self._parts.pop(tp.partition, None)
        consumer.incremental_unassign(partitions)

    def _restore(self, partition: int) -> _Partition:
        """The heads of one audit partition: from their snapshots and the ledger's tail after
        them when those fit together, else from the partition's whole history."""
        started = time.monotonic()
        found: _Partition | None = None
        reason = "snapshots off"
        if self._config.snapshots:
            found, restore = self._from_snapshots(partition)
            reason = restore.reason
        if found is None:
            found, restore = self._rebuild(partition, reason)
        part = found
        self.restores.append(restore)
        log.info(
            "ledger partition %d: %s restore (%s) of %d chains, %d entries: %d snapshots and %d entries read in %.2f s",
            partition, restore.mode, restore.reason or "-", restore.chains, restore.entries,
            restore.snapshots_read, restore.entries_read, time.monotonic() - started,
        )  # fmt: skip
        return part

    def _read_entries(self, partition: int, start: int | None = None) -> tuple[list[LoggedEntry], int, int]:
        """Committed entries of the ledger partition (from `start`), of chains of this audit
        partition: (entries, entries read, the partition's end offset)."""
        ends: dict[tuple[str, int], int] = {}
        found: list[LoggedEntry] = []
        read = 0
        starts = None if start is None else {partition: start}
        for msg in scan_to_end(
            self._bootstrap, [self.ledger], 120.0, partitions={partition}, start=starts, ends_seen=ends
        ):
            read += 1
            value = msg.value()
            try:
                record = self._entries.read(value)
                if record is not None:
                    entry = LoggedEntry._make(record[1])
                else:
                    event = self._codec.decode(value)
                    if not isinstance(event, LedgerEntryChained):
                        continue
                    entry = LoggedEntry.of(event)
            except (PoisonEvent, AvroDecodeError):
                continue  # never ours: `audit verify` reports it
            if entry.source_partition == partition:
                found.append(entry)
        return found, read, ends.get((self.ledger, partition), 0)

    def _rebuild(self, partition: int, reason: str) -> tuple[_Partition, Restore]:
        """Every chain head of one audit partition, from the committed entries in the ledger topic.

        Entries are streamed and read as plain Avro records (`streams.log_scan`), not events:
        a rebuild reads the partition's whole history, and decoding events was most of its cost.
        Every head is snapshotted in the next transaction, so the next restore reads a tail only.
        """
        entries, read, end = self._read_entries(partition)
        by_tenant: dict[str, list[LoggedEntry]] = {}
        for entry in entries:
            by_tenant.setdefault(entry.chain_tenant, []).append(entry)
        heads = {tenant: ChainHead.from_state(resume(tenant, found)) for tenant, found in by_tenant.items()}
        part = _Partition(heads, ledger_from=end, resnapshot=set(heads))
        return part, Restore(partition, "full", reason, 0, read, len(heads), sum(h.size for h in heads.values()))

    def _from_snapshots(self, partition: int) -> tuple[_Partition | None, Restore]:
        """The heads from the partition's committed snapshots plus the ledger entries written
        after the newest of them; (None, why) when there is none or they do not fit the log.

        Sound because a snapshot commits in the transaction of the entries it covers, and
        every transaction snapshots each chain it changed: the newest snapshots' `ledger_from`
        is at or below the first entry no snapshot covers. The tail is still checked: an entry
        beyond a snapshot must continue it (a stale snapshot, or one of another log, falls
        back to the full rebuild), and chains a tail extends are snapshotted again.
        """
        snaps: dict[str, tuple[ChainState, int]] = {}
        n = 0
        for msg in scan_to_end(self._bootstrap, [self.heads_topic], 120.0, partitions={partition}):
            n += 1
            value = msg.value()
            if value is None:
                continue
            try:
                doc = orjson.loads(value)
                if doc.get("format") != SNAPSHOT_FORMAT or doc.get("partition") != partition:
                    raise ValueError(f"not a {SNAPSHOT_FORMAT} snapshot of partition {partition}")
                state = ChainState.from_json(doc["head"])
                snaps[state.tenant] = (state, int(doc["ledger_from"]))
            except (ValueError, KeyError, TypeError) as exc:
                return None, Restore(partition, "full", f"unreadable snapshot: {exc}", n, 0, 0, 0)
        if not snaps:
            return None, Restore(partition, "full", "no snapshot", n, 0, 0, 0)
        tail_from = max(f for _, f in snaps.values())
        entries, read, end = self._read_entries(partition, tail_from)
        if tail_from > end:
            reason = f"snapshot tail starts at {tail_from}, beyond the ledger's end {end}"
            return None, Restore(partition, "full", reason, n, read, 0, 0)
        by_tenant: dict[str, list[LoggedEntry]] = {}
        for entry in entries:
            by_tenant.setdefault(entry.chain_tenant, []).append(entry)
        heads = {tenant: ChainHead.from_state(state) for tenant, (state, _) in snaps.items()}
        extended: set[str] = set()
        for tenant, tail in by_tenant.items():
            snap = snaps.get(tenant)
            if snap is None:
                if tail[0].seq != 0:
                    return None, Restore(partition, "full", f"entries of {tenant} without a snapshot", n, read, 0, 0)
                state = resume(tenant, tail)
            else:
                resumed = resume_from(snap[0], tail)
                if resumed is None:
                    return None, Restore(partition, "full", f"stale snapshot of {tenant}", n, read, 0, 0)
                state = resumed
            if snap is None or state.size != snap[0].size:
                extended.add(tenant)
                heads[tenant] = ChainHead.from_state(state)
        part = _Partition(heads, ledger_from=end, resnapshot=extended)
        return part, Restore(partition, "snapshot", "", n, read, len(heads), sum(h.size for h in heads.values()))

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self.subscribe()
        try:
            while not stop.is_set():
                self.step()
                self.batches.sample_lag(self._consumer)
        finally:
            self.close()

    def subscribe(self) -> None:
        """Join the group; partitions come (and heads are restored) in the following steps."""
        self._consumer.subscribe([self.source], on_assign=self._on_assign, on_revoke=self._on_revoke)

    def close(self) -> None:
        """Settle the transaction in flight, leave the group (its partitions move at once) and
        flush what is left."""
        try:
            self._settle()
        finally:
            self._consumer.close()
            self._producer.flush(10)
            if self._committer is not None:
                self._committer.shutdown(wait=True)

    def step(self) -> int:
        """One batch in one transaction; the number of records whose transaction committed
        during this call (with `overlap`, usually the previous batch's: see `_settle`)."""
        flying = self._inflight is not None
        rewinds = self._rewinds
        # with a commit in flight take only what is fetched already: waiting here would delay it
        got = self._consumer.consume(self._config.batch_max, 0 if flying else self._config.poll_s)
        if self._rewinds != rewinds:  # a rebalance settled a failed transaction and rewound
            return 0
        msgs = [m for m in got if self._usable(m)]
        if not msgs:
            if flying:
                return self._settle() or 0
            self._checkpoint_quiet_chains()
            return 0
        # issue 11: one span per transaction, linked to the requests of its records
        with telemetry.batch_span(AGENT_NAME, topic=self.source, headers=(m.headers() for m in msgs)):
            batch = _Batch(len(msgs), time.perf_counter())
            out = self._chain(msgs, batch)
            done = self._settle(batch.undo)
            if done is None:  # the transaction before it failed: this batch was undone with it
                return 0
            return done + self._send(out, batch)

    def _chain(self, msgs: list[Message], batch: _Batch) -> _Out:
        """The fold of one batch, before its transaction opens: each record decoded and chained
        into its head (a head is copied on the batch's first touch, for the undo), and what
        the transaction will write, encoded. No producer call here: this runs while the
        previous batch's commit is in flight. In C when it is built (`_chain_native`), else
        record by record in Python (`_chain_records`); the two make the same bytes."""
        out = _Out(traced=telemetry.enabled())
        if self._native is None:
            self._chain_records(msgs, batch, out)
        else:
            self._chain_native(*self._native, msgs, batch, out)
        return out

    def _chain_native(
        self, module: Any, headers: tuple[bytes, bytes], msgs: list[Message], batch: _Batch, out: _Out
    ) -> None:
        """The batch through `domain._ledger_native.ChainBatch`: runs of records chained in C
        (the audit record read from its bytes, its canonical bytes and hash, the entry, its
        hash, id and Merkle leaf, the frontier, the entry's Avro record), byte for byte what
        `_chain_records` makes (tests/test_ledger_native_chain.py). A run stops at a record the
        C code does not take exactly (poison, another writer, an odd id: `_chain_records` does
        that one, dead letter or entry) and after an entry whose chain is due for a
        checkpoint (signed here, as there, before the next record)."""
        records = module.ChainBatch(msgs, *headers)
        head_for = partial(self._native_head, batch)
        every_n, every_s = min(self._config.every_n, 2**62), self._config.every_s  # no chain reaches 2**62
        max_us = (datetime.now(UTC) + _FUTURE - _EPOCH) // _ONE_US  # later times: the codec decides
        traced = out.traced
        entries = out.entries
        n = len(msgs)
        i = 0
        while i < n:
            i, due, made, heads = records.run(i, head_for, every_n, every_s, max_us, traced)
            for head, *state in heads:
                head.native_applied(*state)
            for partition, values, keys, traces in made:
                found = entries.get(partition)
                if found is None:
                    found = entries[partition] = ([], [], [])
                found[0].extend(values)
                found[1].extend(keys)
                if traces is not None:
                    found[2].extend(_trace_headers(traces))
            if due is not None:
                head, partition = due
                out.other.append(self._sign(head, partition))
            elif i < n:
                self._chain_records(msgs[i : i + 1], batch, out)
                i += 1

    def _native_head(self, batch: _Batch, partition: int, tenant: str) -> NativeHeadState | bool | None:
        """`ChainBatch.run` asking for the head of (partition, tenant), as `_chain_records` finds
        it: None if the partition is not ours any more (its records are skipped), else the
        head's state, the head made or copied for the undo on the batch's first touch; False
        if the C code cannot take that state exactly (the record goes to `_chain_records`)."""
        part = self._parts.get(partition)
        if part is None:
            return None
        heads = part.heads
        head = heads.get(tenant)
        if head is None:
            head = heads[tenant] = ChainHead(tenant)
            batch.undo[(partition, tenant)] = None
            batch.touched.add(head)
        elif head not in batch.touched:
            batch.touched.add(head)
            batch.undo[(partition, tenant)] = head.copy()
        return head.native_state(partition) or False

    def _chain_records(self, msgs: list[Message], batch: _Batch, out: _Out) -> None:
        """The fold record by record in Python: the reference, and what runs without the C code."""
        decode, encode = self._codec.decode, self._codec.encode
        parts = self._parts
        undo = batch.undo
        touched = batch.touched
        every_n, every_s = self._config.every_n, self._config.every_s
        keys = self._keys
        tracing = out.traced
        trace_parent: str | None = None
        headers: _Headers | None = None
        entries = out.entries
        for msg in msgs:
            partition = msg.partition()
            part = parts.get(partition)  # type: ignore[arg-type]
            if part is None:  # revoked while this batch was fetched: its new owner chains it (from the log)
                continue
            assert partition is not None
            try:
                audit = decode(msg.value())
                if not isinstance(audit, AuditRecorded):
                    raise PoisonEvent("wrong-topic", f"{audit.event_type} on {self.source}")
                env = audit.envelope
                tenant = env.tenant
                heads = part.heads
                head = heads.get(tenant)
                if head is None:
                    head = heads[tenant] = ChainHead(tenant)
                    undo[(partition, tenant)] = None
                    touched.add(head)
                elif head not in touched:
                    touched.add(head)
                    undo[(partition, tenant)] = head.copy()
                entry = head.append(audit, partition, msg.offset() or 0)
            except PoisonEvent as exc:
                out.other.append(self._dead_letter(msg, exc.reason, exc.detail))
                batch.dead += 1
                continue
            except ValueError as exc:  # a valid record the fold refuses
                out.other.append(self._dead_letter(msg, "fold-refused", str(exc)))
                batch.dead += 1
                continue
            if entry is None:
                continue  # already chained (cannot happen under transactions; kept for replays)
            key = keys.get(tenant) or self._key(tenant)
            found = entries.get(partition)
            if found is None:
                found = entries[partition] = ([], [], [])
            found[0].append(encode(entry))
            found[1].append(key)
            if tracing:
                if env.trace_parent != trace_parent:  # one header list per run of a trace
                    trace_parent = env.trace_parent
                    headers = telemetry.trace_headers(trace_parent) or None
                found[2].append(headers)
            if head.due(env.occurred_at, every_n, every_s):
                out.other.append(self._sign(head, partition))

    def _send(self, out: _Out, batch: _Batch) -> int:
        """Open the batch's transaction and write what `_chain` made, the snapshots and the
        consumed offsets; commit it here, or with `overlap` on the helper thread (settled by
        the next step). The number of records committed by this call."""
        try:
            self._first_offset.clear()
            self._producer.begin_transaction()
            self._write(out)
            self._write_snapshots(batch.undo)
            offsets = self._consumer.position(self._consumer.assignment())
            group = self._consumer.consumer_group_metadata()
            if self._committer is None:
                self._commit(offsets, group)
        except KafkaException as exc:
            log.warning("ledger transaction failed, rewinding: %s", exc)
            self.batches.aborted()
            self._abort(batch.undo)
            return 0
        if self._committer is None:
            self._committed(batch)
            return batch.records
        batch.commit = self._committer.submit(self._commit, offsets, group)
        self._inflight = batch
        return 0

    def _write(self, out: _Out) -> None:
        """Produce what `_chain` made into the open transaction."""
        produce = self._producer.produce
        ledger = self.ledger
        traced = out.traced
        for partition, (values, keys, headers) in out.entries.items():
            # the transaction's first entry here: its offset is where the next snapshots' tail starts
            self._first_offset[partition] = None
            first = headers[0] if traced else None
            produce(ledger, values[0], keys[0], partition, on_delivery=self._on_first_delivery, headers=first)
            if traced:
                rest = zip(islice(values, 1, None), islice(keys, 1, None), islice(headers, 1, None), strict=True)
                for value, key, extra in rest:
                    produce(ledger, value, key, partition, headers=extra)
            else:  # no keywords, no headers: the cheapest call (~1.5 µs against ~3)
                for value, key in zip(islice(values, 1, None), islice(keys, 1, None), strict=True):
                    produce(ledger, value, key, partition)
        for topic, data, record_key, to, extra in out.other:
            if to is None:
                produce(topic, data, record_key, headers=extra)
            else:
                produce(topic, data, record_key, to, headers=extra)

    def _commit(self, offsets: list[TopicPartition], group: object) -> None:
        """The consumed offsets into the transaction (fenced by the group generation, KIP-447),
        then the commit. On the helper thread with `overlap`: both calls wait on the broker
        with the GIL released, while the main thread consumes and chains the next batch."""
        self._producer.send_offsets_to_transaction(offsets, group, 30)
        self._producer.commit_transaction(60)

    def _settle(self, later: dict[tuple[int, str], ChainHead | None] | None = None) -> int | None:
        """Wait for the transaction in flight: the number of records it committed (0 if none
        was in flight), or None if it failed. Then it is aborted and everything after the
        last commit undone: the heads (first `later`, the undo of a batch chained behind it,
        then its own) and the consumer's positions, so its records and the later batch's
        are read and chained again. Called before anything that needs the committed state:
        the next transaction, a rebalance, a close."""
        batch = self._inflight
        if batch is None:
            return 0
        self._inflight = None
        assert batch.commit is not None
        try:
            batch.commit.result()
        except KafkaException as exc:
            log.warning("ledger transaction failed, rewinding: %s", exc)
            self.batches.aborted()
            if later:
                self._undo(later)
            self._abort(batch.undo)
            return None
        self._committed(batch)
        return batch.records

    def _committed(self, batch: _Batch) -> None:
        if batch.dead:
            self.batches.count("dead_letter", batch.dead)
        self._snapshots_committed()
        self.batches.committed(batch.records, batch.started)
        self.chained += batch.records

    def _write_snapshots(self, undo: dict[tuple[int, str], ChainHead | None]) -> None:
        """Into the open transaction: a snapshot of every chain it changed, and of every chain
        whose committed snapshot is stale (after a restore). They commit with the entries."""
        if not self._config.snapshots:
            return
        wanted: dict[int, set[str]] = {}
        for p, tenant in undo:
            wanted.setdefault(p, set()).add(tenant)
        for p, held in self._parts.items():
            if held.resnapshot:
                wanted.setdefault(p, set()).update(held.resnapshot)
        produce = self._producer.produce
        for p, tenants in wanted.items():
            part = self._parts.get(p)
            if part is None:
                continue
            for tenant in sorted(tenants):
                head = part.heads.get(tenant)
                if head is not None:
                    value = snapshot_record(head, p, part.ledger_from)
                    produce(self.heads_topic, key=tenant.encode(), value=value, partition=p)

    def _snapshots_committed(self) -> None:
        """After a commit: stale snapshots are replaced, and the next snapshots may start the
        tail at this transaction's first entry (nothing of ours comes before it any more)."""
        self._aborts_in_a_row = 0
        if not self._config.snapshots:
            return
        self._producer.poll(0)  # serves the first-entry delivery reports (commit flushed them)
        for p, part in self._parts.items():
            part.resnapshot.clear()
            first = self._first_offset.get(p)
            if first is not None:
                part.ledger_from = max(part.ledger_from, first)

    def _on_first_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self._first_offset[msg.partition() or 0] = msg.offset()

    def _usable(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return True
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("ledger consumer: %s", err)
        return False

    def _abort(self, undo: dict[tuple[int, str], ChainHead | None]) -> None:
        """Abort the open transaction, undo what it did to the heads, and rewind the consumer
        to the committed offsets (its records are read and chained again)."""
        try:
            self._producer.abort_transaction(30)
        except KafkaException as exc:
            log.error("ledger could not abort (%s); exiting so the supervisor restarts a clean worker", exc)
            raise
        self._undo(undo)
        self._rewinds += 1
        self._aborts_in_a_row += 1
        if self._aborts_in_a_row >= MAX_ABORTS_IN_A_ROW:
            log.error("ledger: %d transactions aborted in a row; exiting so the supervisor restarts a clean worker",
                      self._aborts_in_a_row)  # fmt: skip
            raise LedgerStalled(f"{self._aborts_in_a_row} transactions aborted in a row")
        committed = self._consumer.committed(self._consumer.assignment(), 30)
        for tp in committed:
            self._consumer.seek(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else 0))

    def _undo(self, undo: dict[tuple[int, str], ChainHead | None]) -> None:
        for (p, tenant), head in undo.items():
            part = self._parts.get(p)
            if part is None:
                continue
            if head is None:
                part.heads.pop(tenant, None)
            else:
                part.heads[tenant] = head

    def _sign(self, head: ChainHead, partition: int) -> _Record:
        """The head's signed checkpoint, encoded for the checkpoints topic (marks the head)."""
        signed = head.checkpoint(self._config.key, f"{self._config.origin}/{head.tenant}")
        return self.checkpoints, self._codec.encode(signed), self._key(head.tenant), partition, None

    def _key(self, tenant: str) -> bytes:
        key = self._keys.get(tenant)
        if key is None:
            key = self._keys[tenant] = tenant.encode()
        return key

    def _checkpoint_quiet_chains(self) -> None:
        """Sign the tail of chains that have waited `every_s` of wall-clock time (no traffic came)."""
        now = datetime.now(UTC)
        due = [
            (p, tenant)
            for p, part in self._parts.items()
            for tenant, head in part.heads.items()
            if head.due(now, self._config.every_n, self._config.every_s)
        ]
        if not due:
            return
        undo: dict[tuple[int, str], ChainHead | None] = {}
        try:
            self._first_offset.clear()
            self._producer.begin_transaction()
            for p, tenant in due:
                head = self._parts[p].heads[tenant]
                undo[(p, tenant)] = head.copy()
                topic, value, key, _, _ = self._sign(head, p)
                self._producer.produce(topic, value, key, p)
            self._write_snapshots(undo)
            # The current positions, unchanged, go into it too: only send_offsets is fenced by the
            # group generation (KIP-447), so without them a zombie that lost these partitions could
            # still commit a stale snapshot over the new owner's.
            self._commit(self._consumer.position(self._consumer.assignment()), self._consumer.consumer_group_metadata())
        except KafkaException as exc:
            log.warning("ledger checkpoint transaction failed: %s", exc)
            self._abort(undo)
            return
        self._snapshots_committed()

    def _dead_letter(self, msg: Message, reason: str, detail: str) -> _Record:
        """The dead letter of a record (written in the batch's transaction)."""
        letter = DeadLetter(
            reason, detail, msg.topic() or self.source, msg.partition() or 0, msg.offset() or 0,
            AGENT_NAME, datetime.now(UTC), msg.key(), msg.value(),
        )  # fmt: skip
        headers: _Headers = list(letter.headers())
        return self.dead, msg.value() or b"", msg.key(), None, headers


def _trace_headers(traces: list[str | None]) -> list[_Headers | None]:
    """Each entry's trace headers from its audit record's trace_parent, one list per run of a trace."""
    out: list[_Headers | None] = []
    last: str | None = None
    headers: _Headers | None = None
    for parent in traces:
        if parent != last:
            last = parent
            headers = telemetry.trace_headers(parent) or None
        out.append(headers)
    return out


def main(argv: list[str] | None = None) -> int:
    """`python -m agents.ledger`: one ledger worker, configured from ledgerflow settings."""
    from ledgerflow.settings import load

    parser = argparse.ArgumentParser(prog="python -m agents.ledger")
    parser.add_argument("--loglevel", default="info")
    parser.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics here (0: off)")
    parser.add_argument("--metrics-host", default="127.0.0.1")
    args = parser.parse_args(argv)
    settings = load()
    telemetry.start("ledger", settings, level=args.loglevel.upper())
    config = LedgerConfig(
        key=load_or_create_key(settings.ledger_key_path, settings.ledger_origin),
        origin=settings.ledger_origin,
        every_n=settings.ledger_checkpoint_every,
        every_s=settings.ledger_checkpoint_interval_s,
        batch_max=settings.ledger_batch_max,
    )
    topics = Topics(settings.topic_prefix, settings.partitions)
    worker = LedgerWorker(settings.bootstrap, f"{settings.worker_id}-ledger", topics, config)
    serve(worker.metrics.registry, args.metrics_host, args.metrics_port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    started = time.monotonic()
    worker.run(stop)
    log.info("ledger worker stopped after %.0f s, %d records chained", time.monotonic() - started, worker.chained)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
