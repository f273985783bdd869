"""Agent: the audit ledger. Chains every AuditRecorded into its tenant's hash chain.

A Kafka transactional consume-transform-produce loop around the pure `domain.ledger.chain`
and `make_checkpoint` (run: `python -m agents.ledger`, started by `ledgerflow up`).

Why not a Faust agent with a changelog table like the totals agent: a chain tolerates
neither a gap nor two entries for one seq, and at-least-once Faust gives neither guarantee
under SIGKILL (the kill test found both: the table's changelog and the agent's outputs
reach Kafka independently of the offset commit). Here every batch is ONE transaction:
1. read a batch of audit records (read_committed: an aborted request is never chained);
2. fold each into its chain head (held in memory), producing its `LedgerEntryChained`, and
   a signed `LedgerCheckpointSigned` when one is due, to the same partition number of the
   ledger topics; poison goes to the dead-letter topic;
3. add the consumed offsets to the transaction (`send_offsets_to_transaction`, fenced by the
   consumer group generation, KIP-447) and commit. Entries, checkpoints, dead letters and
   offsets become visible together or not at all: exactly once.
4. On any failure the transaction is aborted, the heads of the assigned partitions are
   rebuilt and the consumer rewinds to the committed offsets.

The chain heads are state derived from the log, and the log is where they come back from:
when a partition is assigned, its heads are rebuilt from the ledger topic (read_committed),
so a restarted or rebalanced worker continues exactly where the committed log ends. Single
writer per chain: the audit topic is keyed by tenant, one partition has one owner.
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from domain.checkpoint import SigningKey, generate_key, load_signing_key_file, save_key_pair
from domain.ledger import ChainHead
from domain.ledger_replay import LOGGED_ENTRY_FIELDS, LoggedEntry, resume
from streams.codec import Codec, PoisonEvent
from streams.deadletter import DeadLetter
from streams.events import AuditRecorded, LedgerEntryChained
from streams.log_scan import AvroDecodeError, RecordReaders, scan_to_end
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


@dataclass
class _Partition:
    heads: dict[str, ChainHead] = field(default_factory=dict)


class LedgerWorker:
    """One member of the ledger's consumer group."""

    def __init__(self, bootstrap: str, group: str, topics: Topics, config: LedgerConfig, codec: Codec | None = None):
        self._bootstrap = bootstrap
        self._topics = topics
        self._config = config
        self._codec = codec or Codec()
        self._entries = RecordReaders({"LedgerEntryChained": LOGGED_ENTRY_FIELDS})
        self.source = topics.name("audit")
        self.ledger = topics.name("ledger")
        self.checkpoints = topics.name("ledger-checkpoints")
        self.dead = topics.dlq(self.source)
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
        self._parts: dict[int, _Partition] = {}
        self.chained = 0

    # -- assignment -------------------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._parts[tp.partition] = _Partition(self._rebuild(tp.partition))
        consumer.incremental_assign(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._parts.pop(tp.partition, None)
        consumer.incremental_unassign(partitions)

    def _rebuild(self, partition: int) -> dict[str, ChainHead]:
        """Every chain head of one audit partition, from the committed entries in the ledger topic.

        Entries are streamed and read as plain Avro records (`streams.log_scan`), not events:
        a rebuild reads the partition's whole history, and decoding events was most of its cost.
        """
        by_tenant: dict[str, list[LoggedEntry]] = {}
        for msg in scan_to_end(self._bootstrap, [self.ledger], 120.0, partitions={partition}):
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
                by_tenant.setdefault(entry.chain_tenant, []).append(entry)
        heads = {tenant: ChainHead.from_state(resume(tenant, entries)) for tenant, entries in by_tenant.items()}
        log.info(
            "ledger partition %d: %d chains, %d entries", partition, len(heads), sum(h.size for h in heads.values())
        )
        return heads

    # -- the loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        self._consumer.subscribe([self.source], on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            while not stop.is_set():
                self.step()
        finally:
            self._consumer.close()
            self._producer.flush(10)

    def step(self) -> int:
        """One batch in one transaction; the number of records consumed."""
        msgs = [m for m in self._consumer.consume(self._config.batch_max, self._config.poll_s) if self._usable(m)]
        if not msgs:
            self._checkpoint_quiet_chains()
            return 0
        # heads as they were before this batch touched them (None: the batch made the chain),
        # copied on first touch, so an abort undoes exactly what the batch did
        undo: dict[tuple[int, str], ChainHead | None] = {}
        try:
            self._producer.begin_transaction()
            fold = self._fold
            for msg in msgs:
                fold(msg, undo)
            self._producer.send_offsets_to_transaction(
                self._consumer.position(self._consumer.assignment()), self._consumer.consumer_group_metadata(), 30
            )
            self._producer.commit_transaction(60)
        except KafkaException as exc:
            log.warning("ledger transaction failed, rewinding: %s", exc)
            self._abort(undo)
            return 0
        self.chained += len(msgs)
        return len(msgs)

    def _usable(self, msg: Message) -> bool:
        err = msg.error()
        if err is None:
            return True
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("ledger consumer: %s", err)
        return False

    def _abort(self, undo: dict[tuple[int, str], ChainHead | None]) -> None:
        try:
            self._producer.abort_transaction(30)
        except KafkaException as exc:
            log.error("ledger could not abort (%s); exiting so the supervisor restarts a clean worker", exc)
            raise
        for (p, tenant), head in undo.items():
            part = self._parts.get(p)
            if part is None:
                continue
            if head is None:
                part.heads.pop(tenant, None)
            else:
                part.heads[tenant] = head
        committed = self._consumer.committed(self._consumer.assignment(), 30)
        for tp in committed:
            self._consumer.seek(TopicPartition(tp.topic, tp.partition, tp.offset if tp.offset >= 0 else 0))

    def _fold(self, msg: Message, undo: dict[tuple[int, str], ChainHead | None]) -> None:
        partition, offset = msg.partition() or 0, msg.offset() or 0
        part = self._parts.get(partition)
        if part is None:  # revoked while this batch was fetched: its new owner chains it (from the log)
            return
        try:
            audit = self._codec.decode(msg.value())
            if not isinstance(audit, AuditRecorded):
                raise PoisonEvent("wrong-topic", f"{audit.event_type} on {self.source}")
            tenant = audit.envelope.tenant
            heads = part.heads
            head = heads.get(tenant)
            if head is None:
                head = heads[tenant] = ChainHead(tenant)
                undo.setdefault((partition, tenant), None)
            elif (partition, tenant) not in undo:
                undo[(partition, tenant)] = head.copy()
            entry = head.append(audit, partition, offset)
        except PoisonEvent as exc:
            self._dead_letter(msg, exc.reason, exc.detail)
            return
        except ValueError as exc:  # a valid record the fold refuses
            self._dead_letter(msg, "fold-refused", str(exc))
            return
        if entry is None:
            return  # already chained (cannot happen under transactions; kept for replays)
        self._producer.produce(self.ledger, key=tenant.encode(), value=self._codec.encode(entry), partition=partition)
        if head.due(audit.envelope.occurred_at, self._config.every_n, self._config.every_s):
            self._sign(head, partition)

    def _sign(self, head: ChainHead, partition: int) -> None:
        signed = head.checkpoint(self._config.key, f"{self._config.origin}/{head.tenant}")
        self._producer.produce(
            self.checkpoints, key=head.tenant.encode(), value=self._codec.encode(signed), partition=partition
        )

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
            self._producer.begin_transaction()
            for p, tenant in due:
                head = self._parts[p].heads[tenant]
                undo[(p, tenant)] = head.copy()
                self._sign(head, p)
            self._producer.commit_transaction(60)
        except KafkaException as exc:
            log.warning("ledger checkpoint transaction failed: %s", exc)
            self._abort(undo)

    def _dead_letter(self, msg: Message, reason: str, detail: str) -> None:
        letter = DeadLetter(
            reason, detail, msg.topic() or self.source, msg.partition() or 0, msg.offset() or 0,
            AGENT_NAME, datetime.now(UTC), msg.key(), msg.value(),
        )  # fmt: skip
        headers: list[tuple[str, str | bytes | None]] = list(letter.headers())
        self._producer.produce(self.dead, key=msg.key(), value=msg.value() or b"", headers=headers)


def main(argv: list[str] | None = None) -> int:
    """`python -m agents.ledger`: one ledger worker, configured from ledgerflow settings."""
    from ledgerflow.settings import load

    parser = argparse.ArgumentParser(prog="python -m agents.ledger")
    parser.add_argument("--loglevel", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.loglevel.upper(), format="[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s")
    settings = load()
    config = LedgerConfig(
        key=load_or_create_key(settings.ledger_key_path, settings.ledger_origin),
        origin=settings.ledger_origin,
        every_n=settings.ledger_checkpoint_every,
        every_s=settings.ledger_checkpoint_interval_s,
        batch_max=settings.ledger_batch_max,
    )
    topics = Topics(settings.topic_prefix, settings.partitions)
    worker = LedgerWorker(settings.bootstrap, f"{settings.worker_id}-ledger", topics, config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    started = time.monotonic()
    worker.run(stop)
    log.info("ledger worker stopped after %.0f s, %d records chained", time.monotonic() - started, worker.chained)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
