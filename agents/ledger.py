"""Agent: the audit ledger. Chains every AuditRecorded into its tenant's hash chain.

I/O only around the pure `domain.ledger.chain` and `make_checkpoint`: decode, look up the
tenant's chain head in a changelog-backed table, fold, send the entry (and a signed
checkpoint when one is due), store the new head. Poison goes to the dead-letter topic.

Single writer per chain: the audit topic is keyed by tenant, so one tenant's records live in
one partition, which one worker owns at a time. The entry goes to the same partition number
of the ledger topic, so that partition holds exactly the chains of that audit partition.

Why entries are attached sends and heads are reconciled with the log:
1. The entry (and a due checkpoint) is sent attached to the audit record's offset: Faust
   publishes it, and waits for it, before it commits that offset. So every audit record
   below the committed offset has its entry in the ledger topic.
2. The head goes to a changelog-backed table, which Faust flushes on its own schedule: after
   a crash the restored head can be ahead of the entries that reached the ledger topic (a
   gap if chaining went on from it), or behind them (a second entry for one seq).
3. So whenever a worker is given an audit partition, before it chains anything from it, it
   rebuilds every chain head of that partition from the ledger topic (the log is the truth,
   the table its cache) and replaces any head that disagrees. Records redelivered from the
   committed offset are then skipped if the log has their entry and chained if not: no gap,
   no duplicate seq. An entry sent twice (crash after the send, before the commit) is an
   identical twin (same seq, hash and event id), which readers collapse.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faust
from mode import CrashingSupervisor

from agents.deadletters import dead_letter
from domain.checkpoint import SigningKey, generate_key, load_signing_key_file, save_key_pair
from domain.ledger import ChainState, chain, checkpoint_due, make_checkpoint
from domain.ledger_replay import resume
from streams.admin import read_to_end
from streams.codec import Codec, PoisonEvent
from streams.events import AuditRecorded, LedgerEntryChained
from streams.topics import Topics

AGENT_NAME = "audit-ledger"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LedgerConfig:
    key: SigningKey
    origin: str  # each chain signs as <origin>/<tenant>
    every_n: int = 1000
    every_s: float = 10.0
    bootstrap: str = ""  # where to read the ledger topic back from when reconciling


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


def register(app: faust.App, topics: Topics, codec: Codec, config: LedgerConfig) -> Any:
    source_name = topics.name("audit")
    ledger_name = topics.name("ledger")
    source = app.topic(source_name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")
    entries = app.topic(ledger_name, key_serializer="raw", value_serializer="raw")
    checkpoints = app.topic(topics.name("ledger-checkpoints"), key_serializer="raw", value_serializer="raw")
    dead = app.topic(topics.dlq(source_name), key_serializer="raw", value_serializer="raw")
    table = app.Table(f"{AGENT_NAME}-chains", partitions=topics.partitions)
    reconciled: set[int] = set()  # audit partitions whose heads were checked against the ledger since start

    async def reconcile(partition: int) -> None:
        """Replace every head of `partition` that disagrees with the entries in the ledger topic."""
        records = await asyncio.to_thread(
            read_to_end, config.bootstrap, [ledger_name], 60.0, partitions={partition}, strict=True
        )
        by_tenant: dict[str, list[LedgerEntryChained]] = {}
        for _topic, _offset, msg in records:
            try:
                entry = codec.decode(msg.value())
            except PoisonEvent:
                continue  # not ours to judge here; `audit verify` reports it
            if isinstance(entry, LedgerEntryChained):
                by_tenant.setdefault(entry.chain_tenant, []).append(entry)
        for tenant, logged in by_tenant.items():
            stored = table.get(tenant)
            head = ChainState.from_json(stored) if stored else None
            rebuilt = resume(tenant, logged, head)
            if head is None or head.size != rebuilt.size or head.last_hash != rebuilt.last_hash:
                log.warning(
                    "ledger head of %s rebuilt from the log: table had %s entries, the log has %s",
                    tenant, head.size if head else 0, rebuilt.size,
                )  # fmt: skip
                table[tenant] = rebuilt.to_json()
        reconciled.add(partition)

    def forget(_sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        revoked = args[0] if args else kwargs.get("revoked", ())
        for tp in revoked:
            if tp.topic == source_name:
                reconciled.discard(tp.partition)  # whoever had it meanwhile may have crashed

    app.on_partitions_revoked.connect(forget)

    @app.agent(source, name=AGENT_NAME, concurrency=1, supervisor_strategy=CrashingSupervisor)
    async def audit_ledger(stream: faust.StreamT[bytes]) -> None:
        async for event in stream.events():
            msg = event.message
            try:
                audit = codec.decode(msg.value)
                if not isinstance(audit, AuditRecorded):
                    raise PoisonEvent("wrong-topic", f"{audit.event_type} on {source_name}")
            except PoisonEvent as exc:
                await dead_letter(event, dead, AGENT_NAME, exc.reason, exc.detail)
                continue
            if msg.partition not in reconciled:
                await reconcile(msg.partition)
            stored = table.get(audit.tenant)
            try:
                head, entry = chain(ChainState.from_json(stored) if stored else None, audit, msg.partition, msg.offset)
            except ValueError as exc:
                await dead_letter(event, dead, AGENT_NAME, "fold-refused", str(exc))
                continue
            if entry is None:
                continue  # redelivered: already chained
            key = audit.tenant.encode()
            await event.send(entries, key=key, value=codec.encode(entry), partition=msg.partition)
            if checkpoint_due(head, audit.envelope.occurred_at, config.every_n, config.every_s):
                head, signed = make_checkpoint(head, config.key, f"{config.origin}/{audit.tenant}")
                await event.send(checkpoints, key=key, value=codec.encode(signed), partition=msg.partition)
            table[audit.tenant] = head.to_json()

    return audit_ledger
