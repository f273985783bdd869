"""`ledgerflow audit verify | prove | check | consistency`: the auditor's tools.

`verify` trusts nothing it did not recompute: it reads the audit records, the chain and the
signed checkpoints from Kafka (from offset 0) and, separately, from the ClickHouse
projection, and checks each copy with `domain.ledger.verify_chain` and the public key.
`prove` writes a self-contained proof file; `check` verifies one offline with only the file
and the public key (no platform access: it imports nothing that talks to Kafka or ClickHouse).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domain.checkpoint import VerifierKey, load_verifier_key_file
from domain.ledger import (
    LedgerEntry,
    VerifyReport,
    audit_canonical_bytes_from_row,
    build_consistency_proof_file,
    build_inclusion_proof_file,
    check_consistency_file,
    check_proof_file,
    tree_of,
    verify_chain,
)
from domain.ledger_replay import collapse_redeliveries
from ledgerflow import readside
from ledgerflow.settings import Settings
from streams.admin import read_to_end
from streams.codec import Codec, PoisonEvent
from streams.events import AuditRecorded, Envelope, LedgerCheckpointSigned, LedgerEntryChained
from streams.topics import Topics


@dataclass
class Chain:
    """One tenant's ledger material as one source holds it."""

    tenant: str
    entries: list[Any] = field(default_factory=list)  # LedgerEntryChained or LedgerEntry, in source order
    audits: dict[str, Any] = field(default_factory=dict)  # audit event id -> AuditRecorded or canonical bytes
    checkpoints: list[LedgerCheckpointSigned] = field(default_factory=list)


def public_key(settings: Settings, path: Path | None = None) -> VerifierKey:
    key_file = path or settings.ledger_key_path.with_name(settings.ledger_key_path.name + ".pub")
    if not key_file.exists():
        raise FileNotFoundError(f"no public key at {key_file}: pass --key PATH (the .pub beside the signing key)")
    return load_verifier_key_file(key_file)


def from_log(settings: Settings, tenant: str | None = None, timeout: float = 120.0) -> dict[str, Chain]:
    """Every chain as the Kafka log holds it, read from offset 0."""
    topics = Topics(settings.topic_prefix, settings.partitions)
    names = [topics.name("audit"), topics.name("ledger"), topics.name("ledger-checkpoints")]
    codec = Codec()
    chains: dict[str, Chain] = {}
    for _topic, _offset, msg in read_to_end(settings.bootstrap, names, timeout, strict=True):
        try:
            event = codec.decode(msg.value())
        except PoisonEvent:
            continue  # the dead-letter topic has it; a chain that needed it shows as a gap
        if tenant is not None and event.tenant != tenant:
            continue
        chain = chains.setdefault(event.tenant, Chain(event.tenant))
        if isinstance(event, AuditRecorded):
            chain.audits[event.envelope.event_id] = event
        elif isinstance(event, LedgerEntryChained):
            chain.entries.append(event)
        elif isinstance(event, LedgerCheckpointSigned):
            chain.checkpoints.append(event)
    return chains


def read_client(settings: Settings) -> Any:
    """A read-only ClickHouse client: the projections service in embedded mode, else the server."""
    import clickhouse_connect

    if settings.embedded_store:
        return clickhouse_connect.get_client(
            host=settings.projections_host,
            port=settings.projections_port,
            database=settings.clickhouse_database,
            password=readside.operator_token(settings),
        )
    return clickhouse_connect.get_client(
        dsn=settings.store_url, database=settings.clickhouse_database, settings={"readonly": 1}
    )


def from_store(client: Any, tenant: str | None = None) -> dict[str, Chain]:
    """Every chain as the ClickHouse projection holds it (storage order by seq)."""
    where, params = ("WHERE tenant = {t:String}", {"t": tenant}) if tenant is not None else ("", {})
    chains: dict[str, Chain] = {}

    def rows(sql: str) -> Iterable[dict[str, Any]]:
        result = client.query(sql, parameters=params)
        for row in result.result_rows:
            yield dict(zip(result.column_names, row, strict=True))

    for row in rows(f"SELECT * FROM ledger_entry_chained {where} ORDER BY tenant, seq, _partition, _offset"):
        chains.setdefault(row["tenant"], Chain(row["tenant"])).entries.append(LedgerEntry.from_mapping(row))
    for row in rows(f"SELECT * FROM audit_recorded {where}"):
        chain = chains.setdefault(row["tenant"], Chain(row["tenant"]))
        chain.audits[row["event_id"]] = audit_canonical_bytes_from_row(row)
    for row in rows(f"SELECT * FROM ledger_checkpoint_signed {where} ORDER BY tenant, tree_size"):
        chains.setdefault(row["tenant"], Chain(row["tenant"])).checkpoints.append(_checkpoint_from_row(row))
    return chains


def _checkpoint_from_row(row: dict[str, Any]) -> LedgerCheckpointSigned:
    env = Envelope(**{f.name: row[f.name] for f in dataclasses.fields(Envelope)})
    payload = {f.name: row[f.name] for f in dataclasses.fields(LedgerCheckpointSigned) if f.name != "envelope"}
    return LedgerCheckpointSigned(envelope=env, **payload)


def verify(chains: dict[str, Chain], key: VerifierKey) -> list[VerifyReport]:
    """One report per tenant; identical redelivered entries count once, anything else is checked."""
    reports = []
    for tenant in sorted(chains):
        c = chains[tenant]
        if not c.entries and not c.checkpoints:
            continue  # audit records not chained yet (the agent is behind): nothing to verify
        reports.append(verify_chain(collapse_redeliveries(c.entries), c.audits, c.checkpoints, key, tenant))
    return reports


def prove(chains: dict[str, Chain], tenant: str, seq: int) -> dict[str, Any]:
    """An inclusion proof file for entry `seq` of `tenant`'s chain under its newest covering checkpoint."""
    chain = chains.get(tenant)
    if chain is None:
        raise LookupError(f"no ledger for tenant {tenant!r}")
    entries = collapse_redeliveries(chain.entries)
    covering = [cp for cp in chain.checkpoints if cp.tree_size > seq]
    if not covering:
        raise LookupError(f"no signed checkpoint covers seq {seq} of {tenant} yet; retry after the next checkpoint")
    checkpoint = max(covering, key=lambda cp: cp.tree_size)
    audit = chain.audits.get(entries[seq].audit_event_id) if seq < len(entries) else None
    return build_inclusion_proof_file(
        entries, checkpoint, seq, audit=audit if isinstance(audit, AuditRecorded) else None
    )


def consistency(chains: dict[str, Chain], tenant: str, old_size: int, new_size: int) -> dict[str, Any]:
    """A consistency proof file between two of `tenant`'s signed checkpoints."""
    chain = chains.get(tenant)
    if chain is None:
        raise LookupError(f"no ledger for tenant {tenant!r}")
    by_size = {cp.tree_size: cp for cp in chain.checkpoints}
    missing = [s for s in (old_size, new_size) if s not in by_size]
    if missing:
        raise LookupError(f"no checkpoint of size {missing} for {tenant}; signed sizes: {sorted(by_size)}")
    tree = tree_of(collapse_redeliveries(chain.entries)[:new_size])
    return build_consistency_proof_file(by_size[old_size], by_size[new_size], tree)


def latest_checkpoint(chains: dict[str, Chain], tenant: str) -> str:
    """The newest signed checkpoint note of `tenant`'s chain, as an auditor stores it."""
    chain = chains.get(tenant)
    if chain is None or not chain.checkpoints:
        raise LookupError(f"no signed checkpoint for tenant {tenant!r} yet")
    return max(chain.checkpoints, key=lambda cp: cp.tree_size).signed_note


def check_file(path: Path, key: VerifierKey) -> tuple[bool, str]:
    """Offline: verify a proof file of either kind with the public key alone."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    result = check_consistency_file(doc, key) if "consistency_path" in doc else check_proof_file(doc, key)
    return result.ok, result.reason


# --- the command line ------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    a = sub.add_parser("audit", help="verify the audit ledger, write and check proofs")
    asub = a.add_subparsers(dest="audit_command", required=True)
    v = asub.add_parser("verify", help="recompute every hash and root from the log and from ClickHouse")
    v.add_argument("--tenant")
    v.add_argument("--source", choices=["log", "store", "both"], default="both")
    v.add_argument("--key", type=Path, help="verifier key file (default: the .pub beside the signing key)")
    p = asub.add_parser("prove", help="write a self-contained inclusion proof for one entry")
    p.add_argument("entry", metavar="TENANT:SEQ")
    p.add_argument("--out", type=Path, help="proof file (default: proof-TENANT-SEQ.json)")
    c = asub.add_parser("check", help="verify a proof file offline with only the public key")
    c.add_argument("proof", type=Path)
    c.add_argument("--key", type=Path, required=True)
    e = asub.add_parser("checkpoint", help="export a tenant's newest signed checkpoint (a C2SP signed note)")
    e.add_argument("tenant")
    e.add_argument("--out", type=Path, help="file to write (default: print it)")
    k = asub.add_parser("consistency", help="prove that one signed checkpoint extends another")
    k.add_argument("tenant")
    k.add_argument("old_size", type=int)
    k.add_argument("new_size", type=int)
    k.add_argument("--out", type=Path)


def cmd(settings: Settings, args: Any) -> int:
    if args.audit_command == "check":
        ok, reason = check_file(args.proof, load_verifier_key_file(args.key))
        print(("OK " if ok else "REJECTED ") + reason)
        return 0 if ok else 1
    if args.audit_command == "verify":
        key = public_key(settings, args.key)
        failed = False
        sources = ["log", "store"] if args.source == "both" else [args.source]
        for source in sources:
            chains = (
                from_log(settings, args.tenant) if source == "log" else from_store(read_client(settings), args.tenant)
            )
            reports = verify(chains, key)
            if not reports:
                print(f"{source}: no ledger entries" + (f" for {args.tenant}" if args.tenant else ""))
            for r in reports:
                if r.ok:
                    print(
                        f"{source}: {r.tenant}: OK {r.size} entries, {r.checkpoints_checked} checkpoints, "
                        f"root {r.root_hash}"
                    )
                else:
                    failed = True
                    print(f"{source}: {r.tenant}: BAD at seq {r.bad_seq}: {r.reason}")
        return 1 if failed else 0
    chains = from_log(settings, getattr(args, "tenant", None))
    if args.audit_command == "checkpoint":
        note = latest_checkpoint(chains, args.tenant)
        if args.out is None:
            print(note, end="")
        else:
            args.out.write_text(note, encoding="utf-8")
            print(f"wrote {args.out}")
        return 0
    if args.audit_command == "prove":
        tenant, _, seq = args.entry.rpartition(":")
        if not tenant or not seq.isdigit():
            print("name the entry as TENANT:SEQ, e.g. acme:42", file=sys.stderr)
            return 2
        chains = from_log(settings, tenant)
        doc = prove(chains, tenant, int(seq))
        out = args.out or Path(f"proof-{tenant}-{seq}.json")
    else:
        doc = consistency(chains, args.tenant, args.old_size, args.new_size)
        out = args.out or Path(f"consistency-{args.tenant}-{args.old_size}-{args.new_size}.json")
    out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0
