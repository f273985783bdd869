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
import hashlib
import json
import multiprocessing
import sys
import time
from collections.abc import Collection, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
    check_checkpoint_event,
    check_consistency_file,
    check_proof_file,
    tree_of,
    verify_chain,
)
from domain.ledger_replay import collapse_redeliveries
from domain.merkle import MerkleTree, frontier_root
from ledgerflow.settings import Settings
from streams.codec import Codec, PoisonEvent
from streams.events import AuditRecorded, Envelope, LedgerCheckpointSigned, LedgerEntryChained, LedgerVerified
from streams.ids import uuid7
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


# --- verifying in ClickHouse -----------------------------------------------------------------
#
# The canonical bytes of entries and audit records, built by ClickHouse from the projection's
# columns and hashed there (SHA256 in C++), byte for byte what domain.ledger builds with orjson
# (tests/test_ledger_verify_sql.py holds the two together). Strings are JSON-escaped for `"`
# and `\`; a value holding a control character (which orjson writes as an escape) is not
# rebuilt here: its row counts as unverified and the chain goes to the Python verifier.


def _js(col: str) -> str:
    return f"""concat('"', replaceAll(replaceAll({col}, '\\\\', '\\\\\\\\'), '"', '\\\\"'), '"')"""


def _jsn(col: str) -> str:
    return f"if(isNull({col}), 'null', {_js(f'assumeNotNull({col})')})"


_AUDIT_CANON = (
    "concat('{\"action\":', " + _js("action") + ", ',\"actor\":', " + _js("actor") + ", ',\"details\":{', "
    "arrayStringConcat(arrayMap((k, v) -> concat(" + _js("k") + ", ':', " + _js("v") + "), "
    "mapKeys(mapSort(details)), mapValues(mapSort(details))), ','), "
    '\'},"envelope":{"causation_id":\', '
    + _jsn("causation_id")
    + ", ',\"correlation_id\":', "
    + _js("correlation_id")
    + ", ',\"event_id\":', "
    + _js("event_id")
    + ", ',\"event_type\":', "
    + _js("toString(event_type)")
    + ", ',\"occurred_at\":\"', formatDateTime(occurred_at, '%Y-%m-%dT%H:%i:%S.%fZ'), "
    '\'","producer":\', ' + _js("toString(producer)") + ", ',\"schema_version\":', toString(schema_version), "
    "',\"tenant\":', " + _js("toString(tenant)") + ", ',\"trace_parent\":', " + _jsn("trace_parent") + ", "
    "'},\"outcome\":', " + _js("toString(outcome)") + ", ',\"subject\":', " + _js("subject") + ", '}')"
)
_ENTRY_CANON = (
    "concat('{\"audit_event_id\":', "
    + _js("audit_event_id")
    + ", ',\"audit_sha256\":', "
    + _js("audit_sha256")
    + ", ',\"chain_tenant\":', "
    + _js("chain_tenant")
    + ', \',"format":"ledgerflow.ledger-entry/1","prev_hash":\', '
    + _js("prev_hash")
    + ", ',\"seq\":', toString(seq), '}')"
)
_CONTROL = "match({0}, '[\\\\x00-\\\\x1f]')"


def _sql_verify_query(where: str) -> str:
    """Per chain: is every row sound (seq 0..n-1 once each, hashes, links, tenant, its one audit
    record), its last hash, and its Merkle leaf hashes in seq order (hex, 64 per leaf)."""
    audit_canon = _AUDIT_CANON
    return f"""
WITH a AS (
    SELECT tenant, event_id, groupUniqArray(if({_CONTROL.format("c")}, '', lower(hex(SHA256(c))))) AS hashes
    FROM (SELECT tenant, event_id, {audit_canon} AS c FROM audit_recorded {where})
    GROUP BY tenant, event_id
), e AS (
    SELECT toString(tenant) AS t, seq, entry_hash, prev_hash, audit_event_id, audit_sha256, chain_tenant,
        {_ENTRY_CANON} AS data,
        lagInFrame(entry_hash, 1, repeat('0', 64)) OVER (PARTITION BY tenant ORDER BY seq
            ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS before
    FROM ledger_entry_chained {where}
)
SELECT t, count() AS n, min(seq) AS lo, max(seq) AS hi, uniqExact(seq) AS distinct_seq,
    countIf(NOT (lower(hex(SHA256(data))) = entry_hash AND NOT {_CONTROL.format("data")} AND chain_tenant = t
        AND prev_hash = before AND length(a.hashes) = 1 AND a.hashes[1] = audit_sha256)) AS unsound,
    arrayStringConcat(arrayMap(x -> x.2, arraySort(x -> x.1, groupArray((seq, hex(SHA256(concat(char(0), data))))))))
        AS leaves
FROM e LEFT JOIN a ON a.tenant = e.t AND a.event_id = e.audit_event_id
GROUP BY t
ORDER BY t
SETTINGS join_use_nulls = 0
"""


def verify_store_sql(client: Any, key: VerifierKey, tenant: str | None = None) -> tuple[list[VerifyReport], list[str]]:
    """`verify(from_store(client, tenant), key)`, with the hashing done by ClickHouse.

    ClickHouse rebuilds and hashes every entry and audit record and checks seq, links and
    audit hashes per row; Python then folds the leaf hashes into the Merkle tree and checks
    each signed checkpoint. A chain with any unsound row (or a checkpoint that does not
    check) is verified again by the Python verifier, which finds and names its first bad
    seq, so reports are those of `verify`. Returns (reports, the tenants handed to Python).
    """
    where, params = ("WHERE tenant = {t:String}", {"t": tenant}) if tenant is not None else ("", {})
    result = client.query(_sql_verify_query(where), parameters=params)
    cps: dict[str, list[LedgerCheckpointSigned]] = {}
    cp_result = client.query(
        f"SELECT * FROM ledger_checkpoint_signed {where} ORDER BY tenant, tree_size", parameters=params
    )
    for row in cp_result.result_rows:
        cp = _checkpoint_from_row(dict(zip(cp_result.column_names, row, strict=True)))
        cps.setdefault(cp.tenant, []).append(cp)
    reports: dict[str, VerifyReport] = {}
    slow: list[str] = []
    for t, n, lo, hi, distinct, unsound, leaves_hex in result.result_rows:
        report = None
        if unsound == 0 and lo == 0 and hi == n - 1 and distinct == n:
            report = _sound_chain(t, int(n), bytes.fromhex(leaves_hex), cps.get(t, []), key)
        if report is None:
            slow.append(t)
        else:
            reports[t] = report
    slow.extend(t for t in cps if t not in reports and t not in slow)
    for t in slow:
        reports.update((r.tenant or "", r) for r in verify(from_store(client, t), key))
    return [reports[t] for t in sorted(reports)], sorted(slow)


def _sound_chain(
    tenant: str, n: int, leaves: bytes, checkpoints: list[LedgerCheckpointSigned], key: VerifierKey
) -> VerifyReport | None:
    """The OK report of a chain whose rows ClickHouse found sound, if its Merkle roots match
    every checkpoint (signature checked); None for anything else (Python then says why)."""
    by_size: dict[int, list[LedgerCheckpointSigned]] = {}
    for cp in checkpoints:
        by_size.setdefault(cp.tree_size, []).append(cp)
    if any(size > n or size == 0 for size in by_size):
        return None
    sha256 = hashlib.sha256
    frontier: list[bytes] = []
    checked = 0
    for size in range(n):
        h = leaves[32 * size : 32 * size + 32]
        carry = size
        while carry & 1:
            h = sha256(b"\x01" + frontier.pop() + h).digest()
            carry >>= 1
        frontier.append(h)
        due = by_size.get(size + 1)
        if due:
            root = frontier_root(frontier).hex()
            for cp in due:
                if check_checkpoint_event(cp, key) is not None or cp.chain_tenant != tenant or cp.root_hash != root:
                    return None
                checked += 1
    return VerifyReport(
        ok=True, tenant=tenant, entries_checked=n, checkpoints_checked=checked, size=n,
        root_hash=frontier_root(frontier).hex(),
    )  # fmt: skip


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


# --- verification results as facts ---------------------------------------------------------

VERIFY_PRODUCER = "cli:audit-verify"
SOURCES = {"log": "log", "store": "clickhouse"}  # --source name -> LedgerVerified.source


@dataclass(frozen=True)
class VerifyRun:
    """One source checked in one `audit verify` run: its reports and how long it took."""

    source: str  # "log" | "clickhouse"
    reports: list[VerifyReport]
    duration_ms: int
    verifier: str = "python"
    by_python: tuple[str, ...] = ()  # tenants the ClickHouse verifier handed to Python (a chain it found unsound)


def key_fingerprint(key: VerifierKey) -> str:
    """Hex SHA-256 of the verifier key text (`name+id+key`): names the key a result was checked with."""
    return hashlib.sha256(key.to_vkey().encode("utf-8")).hexdigest()


def verification_events(
    runs: Iterable[VerifyRun], key: VerifierKey, tenant: str | None, run_id: str | None = None
) -> list[LedgerVerified]:
    """One LedgerVerified per chain per source; the run's events share one correlation id."""
    correlation = run_id or str(uuid7())
    fingerprint, key_id = key_fingerprint(key), key.key_id_hex
    now = datetime.now(UTC)
    out = []
    for run in runs:
        for r in run.reports:
            owner = r.tenant or ""
            eid = str(uuid7())
            env = Envelope(
                event_id=eid, event_type="LedgerVerified", schema_version=LedgerVerified.SCHEMA_VERSION,
                tenant=owner, occurred_at=now, correlation_id=correlation, producer=VERIFY_PRODUCER,
            )  # fmt: skip
            out.append(
                LedgerVerified(
                    envelope=env,
                    chain_tenant=owner,
                    scope="all" if tenant is None else "tenant",
                    source=run.source,
                    ok=r.ok,
                    entries_checked=r.entries_checked,
                    checkpoints_checked=r.checkpoints_checked,
                    root_hash=r.root_hash,
                    duration_ms=run.duration_ms,
                    key_fingerprint=fingerprint,
                    key_id=key_id,
                    verifier="python" if owner in run.by_python else run.verifier,
                    first_bad_seq=None if r.ok else r.bad_seq,
                    reason=None if r.ok else r.reason,
                )
            )
    return out


def record_verifications(settings: Settings, events: list[LedgerVerified]) -> None:
    """Publish the results in one transaction (the sink lands them in `ledger_verifications`)."""
    if not events:
        return
    from ledgerflow.admin import publish  # here: `audit check` imports nothing of the platform

    publish(settings, list(events))


def run_verify(
    settings: Settings,
    key: VerifierKey,
    source: str,
    tenant: str | None = None,
    jobs: int = 1,
    client: Any = None,
    verifier: str = "clickhouse",
) -> VerifyRun:
    """Verify one source (`log` or `store`), timed; `client` overrides the read-side ClickHouse client.

    The store is verified by ClickHouse itself (`verify_store_sql`) unless `verifier` is
    "python"; the log always by Python.
    """
    started = time.monotonic()
    by_python: list[str] = []
    if source == "log":
        reports, verifier = verify_log(settings, key, tenant, jobs), "python"
    else:
        client = client if client is not None else read_client(settings)
        if verifier == "clickhouse":
            reports, by_python = verify_store_sql(client, key, tenant)
        else:
            reports = verify(from_store(client, tenant), key)
    took = round((time.monotonic() - started) * 1000)
    return VerifyRun(SOURCES[source], reports, took, verifier, tuple(by_python))


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
    v.add_argument(
        "--verifier",
        choices=["clickhouse", "python"],
        default="clickhouse",
        help="who recomputes the ClickHouse copy: ClickHouse itself (default; an unsound chain is re-checked "
        "in Python to name its first bad seq) or Python",
    )
    v.add_argument(
        "--no-record",
        action="store_true",
        help="a dry check: do not record the results as LedgerVerified events (the portal shows the last recorded)",
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
        runs = []
        for source in sources:
            run = run_verify(
                settings, key, source, args.tenant, args.jobs, verifier=getattr(args, "verifier", "clickhouse")
            )
            runs.append(run)
            reports = run.reports
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
        if not args.no_record:
            events = verification_events(runs, key, args.tenant)
            record_verifications(settings, events)
            print(f"recorded {len(events)} LedgerVerified event(s)" if events else "nothing to record")
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
