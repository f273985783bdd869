"""`ledgerflow audit verify | prove | check | consistency`: the auditor's tools.

`verify` trusts nothing it did not recompute: it reads the audit records, the chain and the
signed checkpoints from Kafka (from offset 0) and, separately, from the ClickHouse
projection, and checks each copy with `domain.ledger.verify_chain` and the public key.
`prove` writes a self-contained proof file; `check` verifies one offline with only the file
and the public key (no platform access: it imports nothing that talks to Kafka or ClickHouse).

Reading the log is most of `verify`'s time, so `from_log` streams it (`streams.log_scan`):
audit records and entries are decoded to plain Avro records, not events (the entry's six
hashed fields and the audit record's canonical bytes are all `verify` needs), a `--tenant`
read skips other tenants' records by their Kafka key before decoding, and `--jobs N` reads
and verifies the partitions in N processes (a tenant's records share one partition).
A chain's Merkle tree is built once per `Chain` and kept for every proof asked of it.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import sys
from collections.abc import Collection, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from domain.checkpoint import VerifierKey, load_verifier_key_file
from domain.ledger import (
    LedgerEntry,
    VerifyReport,
    audit_canonical_bytes,
    audit_canonical_bytes_from_record,
    audit_canonical_bytes_from_row,
    build_consistency_proof_file,
    build_inclusion_proof_file,
    check_consistency_file,
    check_proof_file,
    tree_of,
    verify_chain,
)
from domain.ledger_replay import collapse_redeliveries
from domain.merkle import MerkleTree
from ledgerflow.settings import Settings
from streams.codec import Codec, PoisonEvent
from streams.events import AuditRecorded, Envelope, LedgerCheckpointSigned, LedgerEntryChained
from streams.log_scan import AvroDecodeError, RecordReaders, scan_to_end
from streams.topics import Topics

AUDIT, ENTRY = "AuditRecorded", "LedgerEntryChained"
# what `verify` needs of an entry: its tenant and hashed fields (of an audit record: all)
ENTRY_FIELDS = ("envelope.tenant", "chain_tenant", "seq", "prev_hash", "audit_event_id", "audit_sha256", "entry_hash")


@dataclass
class Chain:
    """One tenant's ledger material as one source holds it."""

    tenant: str
    entries: list[Any] = field(default_factory=list)  # LedgerEntryChained or LedgerEntry, in source order
    audits: dict[str, Any] = field(default_factory=dict)  # audit event id -> AuditRecorded or canonical bytes
    checkpoints: list[LedgerCheckpointSigned] = field(default_factory=list)
    _collapsed: tuple[int, list[Any]] | None = field(default=None, repr=False, compare=False)
    _tree: tuple[int, MerkleTree] | None = field(default=None, repr=False, compare=False)

    def chain_entries(self) -> list[Any]:
        """`entries` with identical redeliveries collapsed (kept until `entries` grows)."""
        if self._collapsed is None or self._collapsed[0] != len(self.entries):
            self._collapsed = (len(self.entries), collapse_redeliveries(self.entries))
        return self._collapsed[1]

    def tree(self) -> MerkleTree:
        """The Merkle tree over `chain_entries()`, built once (2-3 s at 1M entries) and kept:
        every later proof of this chain costs only its path (tens of µs)."""
        entries = self.chain_entries()
        if self._tree is None or self._tree[0] != len(entries):
            self._tree = (len(entries), tree_of(entries))
        return self._tree[1]


def public_key(settings: Settings, path: Path | None = None) -> VerifierKey:
    key_file = path or settings.ledger_key_path.with_name(settings.ledger_key_path.name + ".pub")
    if not key_file.exists():
        raise FileNotFoundError(f"no public key at {key_file}: pass --key PATH (the .pub beside the signing key)")
    return load_verifier_key_file(key_file)


@cache
def _decoders() -> tuple[Codec, RecordReaders]:
    """One codec and one set of field readers per process (compiling them takes a while)."""
    return Codec(), RecordReaders({AUDIT: None, ENTRY: ENTRY_FIELDS})


def from_log(
    settings: Settings, tenant: str | None = None, timeout: float = 120.0, partitions: Collection[int] | None = None
) -> dict[str, Chain]:
    """Every chain as the Kafka log holds it, read from offset 0 (only `partitions`, if given).

    Entries come back as `LedgerEntry` (the hashed fields) and audit records as their
    canonical bytes when written with today's schemas; other schema versions are decoded
    to events as before. Undecodable records are skipped (the dead-letter topic has them; a
    chain that needed one shows a gap or a missing audit record).
    """
    topics = Topics(settings.topic_prefix, settings.partitions)
    names = [topics.name("audit"), topics.name("ledger"), topics.name("ledger-checkpoints")]
    codec, readers = _decoders()
    keys = None if tenant is None else [tenant.encode()]  # events are keyed by tenant
    chains: dict[str, Chain] = {}
    new_entry = LedgerEntry
    for msg in scan_to_end(settings.bootstrap, names, timeout, partitions=partitions, keys=keys):
        value = msg.value()
        try:
            record = readers.read(value)
        except AvroDecodeError:
            continue  # poison: as a PoisonEvent below
        if record is not None:
            name, v = record
            if name == ENTRY:
                owner = v[0]
            else:
                env = v["envelope"]
                owner = env["tenant"]
            if tenant is not None and owner != tenant:
                continue
            chain = chains.get(owner)
            if chain is None:
                chain = chains[owner] = Chain(owner)
            if name == ENTRY:
                chain.entries.append(new_entry(v[1], v[2], v[3], v[4], v[5], v[6]))
            else:
                chain.audits[env["event_id"]] = audit_canonical_bytes_from_record(v)
            continue
        try:
            event = codec.decode(value)
        except PoisonEvent:
            continue  # the dead-letter topic has it; a chain that needed it shows as a gap
        if tenant is not None and event.tenant != tenant:
            continue
        chain = chains.setdefault(event.tenant, Chain(event.tenant))
        if isinstance(event, AuditRecorded):
            chain.audits[event.envelope.event_id] = audit_canonical_bytes(event)
        elif isinstance(event, LedgerEntryChained):
            chain.entries.append(LedgerEntry.of(event))
        elif isinstance(event, LedgerCheckpointSigned):
            chain.checkpoints.append(event)
    return chains


def read_client(settings: Settings) -> Any:
    """A read-only ClickHouse client: the projections service in embedded mode, else the server."""
    import clickhouse_connect

    from ledgerflow import readside  # here, not at the top: `audit check` must import nothing of the platform

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
        reports.append(verify_chain(c.chain_entries(), c.audits, c.checkpoints, key, tenant))
    return reports


def _verify_partition(settings: Settings, key: VerifierKey, tenant: str | None, partition: int) -> list[VerifyReport]:
    return verify(from_log(settings, tenant, partitions=[partition]), key)


def verify_log(settings: Settings, key: VerifierKey, tenant: str | None = None, jobs: int = 1) -> list[VerifyReport]:
    """`verify(from_log(...))`, with `jobs` > 1 partition by partition in that many processes.

    Sound because a chain never spans partitions: the worker writes a tenant's entries and
    checkpoints to the partition its audit records are on, and the audit topic is keyed by
    tenant. Should a tenant still show up in two partitions (the audit topic was given more
    partitions and keys moved), its partial reports are not trusted: it is verified again
    from the whole log in this process.
    """
    if jobs <= 1:
        return verify(from_log(settings, tenant), key)
    topics = Topics(settings.topic_prefix, settings.partitions)
    parts = range(max(topics.partitions_of(topics.name(n)) for n in ("audit", "ledger", "ledger-checkpoints")))
    # spawned, not forked: a forked child would inherit librdkafka's threads' locks mid-flight
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        results = list(pool.map(_verify_partition, *zip(*((settings, key, tenant, p) for p in parts), strict=True)))
    by_tenant: dict[str, list[VerifyReport]] = {}
    for reports in results:
        for r in reports:
            by_tenant.setdefault(r.tenant or "", []).append(r)
    split = sorted(t for t, rs in by_tenant.items() if len(rs) > 1)
    out = [rs[0] for t, rs in by_tenant.items() if len(rs) == 1]
    for t in split:
        out.extend(verify(from_log(settings, t), key))
    return sorted(out, key=lambda r: r.tenant or "")


def prove(chains: dict[str, Chain], tenant: str, seq: int) -> dict[str, Any]:
    """An inclusion proof file for entry `seq` of `tenant`'s chain under its newest covering checkpoint.

    The chain's tree is built on the first proof and kept: asking many proofs of one `chains`
    costs one tree build, then tens of µs each.
    """
    chain = chains.get(tenant)
    if chain is None:
        raise LookupError(f"no ledger for tenant {tenant!r}")
    entries = chain.chain_entries()
    covering = [cp for cp in chain.checkpoints if cp.tree_size > seq]
    if not covering:
        raise LookupError(f"no signed checkpoint covers seq {seq} of {tenant} yet; retry after the next checkpoint")
    checkpoint = max(covering, key=lambda cp: cp.tree_size)
    if seq >= len(entries) or checkpoint.tree_size > len(entries):
        raise ValueError(f"index {seq} not in a checkpoint of size {checkpoint.tree_size} (tree has {len(entries)})")
    audit = chain.audits.get(entries[seq].audit_event_id)
    return build_inclusion_proof_file(
        chain.tree(),
        checkpoint,
        seq,
        entry=entries[seq],
        audit=audit if isinstance(audit, AuditRecorded | bytes) else None,
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
    if new_size > len(chain.chain_entries()):
        raise ValueError(f"new size {new_size} is beyond the chain's {len(chain.chain_entries())} entries")
    return build_consistency_proof_file(by_size[old_size], by_size[new_size], chain.tree())


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
    v.add_argument(
        "--jobs", type=int, default=1, help="read and verify the log's partitions in this many processes (default 1)"
    )
    p = asub.add_parser("prove", help="write self-contained inclusion proofs, one file per entry")
    p.add_argument("entries", metavar="TENANT:SEQ", nargs="+", help="one or more; one log read and tree per tenant")
    p.add_argument("--out", type=Path, help="proof file, for a single entry (default: proof-TENANT-SEQ.json)")
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
            if source == "log":
                reports = verify_log(settings, key, args.tenant, args.jobs)
            else:
                reports = verify(from_store(read_client(settings), args.tenant), key)
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
    if args.audit_command == "prove":
        return _prove_cmd(settings, args.entries, args.out)
    chains = from_log(settings, args.tenant)
    if args.audit_command == "checkpoint":
        note = latest_checkpoint(chains, args.tenant)
        if args.out is None:
            print(note, end="")
        else:
            args.out.write_text(note, encoding="utf-8")
            print(f"wrote {args.out}")
        return 0
    doc = consistency(chains, args.tenant, args.old_size, args.new_size)
    out = args.out or Path(f"consistency-{args.tenant}-{args.old_size}-{args.new_size}.json")
    out.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return 0


def tenant_partitions(settings: Settings, tenant: str) -> list[int] | None:
    """The partitions holding `tenant`'s signed checkpoints, from the small checkpoints topic
    (about one record per `ledger_checkpoint_every` entries); None when none is signed yet.

    The worker writes a chain's entries and checkpoints to the partition of its audit
    records, so `prove` needs only those: a third of the log at 3 partitions. A proof read
    from part of the log is still checked against its signed checkpoint like any other.
    """
    topics = Topics(settings.topic_prefix, settings.partitions)
    name = topics.name("ledger-checkpoints")
    found = {msg.partition() or 0 for msg in scan_to_end(settings.bootstrap, [name], 120.0, keys=[tenant.encode()])}
    return sorted(found) or None


def _prove_cmd(settings: Settings, names: list[str], out: Path | None) -> int:
    """`audit prove TENANT:SEQ...`: each tenant's records read once (by key), its tree built once."""
    wanted: list[tuple[str, int]] = []
    for name in names:
        tenant, _, seq = name.rpartition(":")
        if not tenant or not seq.isdigit():
            print("name each entry as TENANT:SEQ, e.g. acme:42", file=sys.stderr)
            return 2
        wanted.append((tenant, int(seq)))
    if out is not None and len(wanted) > 1:
        print("--out names one file: give one entry, or none and get proof-TENANT-SEQ.json each", file=sys.stderr)
        return 2
    chains: dict[str, Chain] = {}
    for tenant in dict.fromkeys(t for t, _ in wanted):
        chains.update(from_log(settings, tenant, partitions=tenant_partitions(settings, tenant)))
    for tenant, index in wanted:
        try:
            doc = prove(chains, tenant, index)
        except (LookupError, ValueError):  # not all there in the partitions read: read them all
            chains.update(from_log(settings, tenant))
            doc = prove(chains, tenant, index)
        path = out or Path(f"proof-{tenant}-{index}.json")
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        print(f"wrote {path}")
    return 0
