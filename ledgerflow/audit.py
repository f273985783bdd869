"""`ledgerflow audit verify | prove | check | consistency`: the auditor's tools.

`verify` trusts nothing it did not recompute: it reads the audit records, the chain and the
signed checkpoints from Kafka (from offset 0) and, separately, from the ClickHouse
projection, and checks each copy: by default with ClickHouse doing the hashing for the store
(`verify_store_sql`) and, for the log, the C extension `domain._ledger_native` when it is
built (`verify_log_native`), else the log's raw records in a scratch in-memory chDB
(`verify_log_sql`); any chain those find unsound, and `--verifier python`, with
`domain.ledger.verify_chain`; signatures always in Python with the public key.
`prove` writes a self-contained proof file; `check` verifies one offline with only the file
and the public key (no platform access: it imports nothing that talks to Kafka or ClickHouse).

For the Python verifier and for `prove`, `from_log` streams the log (`streams.log_scan`):
audit records and entries are decoded to plain Avro records, not events (the entry's six
hashed fields and the audit record's canonical bytes are all `verify` needs), a `--tenant`
read skips other tenants' records by their Kafka key before decoding, and `--jobs N` reads
and verifies the partitions in N processes (a tenant's records share one partition).
A chain's Merkle tree is built once per `Chain` and kept for every proof asked of it.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import multiprocessing
import os
import queue
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from confluent_kafka import TopicPartition

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
    native_chain_headers,
    tree_of,
    verify_chain,
)
from domain.ledger_replay import collapse_redeliveries
from domain.merkle import MerkleTree, frontier_root
from ledgerflow.settings import Settings
from streams.codec import HEADER_LEN, MAGIC, Codec, PoisonEvent
from streams.events import AuditRecorded, Envelope, LedgerCheckpointSigned, LedgerEntryChained, LedgerVerified
from streams.ids import uuid7
from streams.log_scan import (
    AvroDecodeError,
    RecordReaders,
    assign_from_start,
    reader_consumer,
    scan_raw,
    scan_to_end,
)
from streams.schemas import load_all
from streams.topics import Topics

if TYPE_CHECKING:
    from projections.avro_block import Writer

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
    # A chain's entries in a fixed order whatever order the reads interleave in: the ledger
    # topic's, then any found on the audit or checkpoints topics (a fork placed there), each
    # topic partition by partition in offset order; the segments are joined at the end.
    rank = {topics.name("ledger"): 0, names[0]: 1, names[2]: 2}
    segments: dict[str, dict[tuple[int, int], list[Any]]] = {}
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
                _segment(segments, owner, rank, msg).append(new_entry(v[1], v[2], v[3], v[4], v[5], v[6]))
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
            _segment(segments, event.tenant, rank, msg).append(LedgerEntry.of(event))
        elif isinstance(event, LedgerCheckpointSigned):
            chain.checkpoints.append(event)
    for owner, parts in segments.items():
        chains[owner].entries = [e for where in sorted(parts) for e in parts[where]]
    return chains


def _segment(
    segments: dict[str, dict[tuple[int, int], list[Any]]], owner: str, rank: Mapping[str, int], msg: Any
) -> list[Any]:
    """The list for `owner`'s entries from `msg`'s (topic, partition), made on first use."""
    parts = segments.setdefault(owner, {})
    where = (rank[msg.topic()], msg.partition())
    part = parts.get(where)
    if part is None:
        part = parts[where] = []
    return part


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

    for row in rows(f"SELECT * FROM ledger_entry_chained {where} ORDER BY tenant, seq, _partition, _offset, _topic"):
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


def _audit_rows(source: str, *, log: bool = False, keep: str = "") -> str:
    """Per audit record of `source` (what follows FROM, with `audit_recorded`'s columns): tenant,
    event_id and `h`, the hex SHA-256 of its canonical bytes ('' for a value with a control
    character, or with `log` one that is not valid UTF-8: ClickHouse keeps any bytes, the
    log's reader refuses such a record); `keep` (", col, ...") passes columns through."""
    bad = _CONTROL.format("c") + (" OR NOT isValidUTF8(c)" if log else "")
    return (
        f"SELECT tenant, event_id, if({bad}, '', lower(hex(SHA256(c)))) AS h{keep}"
        f" FROM (SELECT tenant, event_id, {_AUDIT_CANON} AS c{keep} FROM {source})"
    )


def _entry_rows(source: str, *, log: bool = False, keep: str = "") -> str:
    """Per entry of `source` (with `ledger_entry_chained`'s columns): its chain `t`, hashed fields,
    `hash_ok` (its entry_hash recomputes from canonical bytes we rebuild exactly) and its
    Merkle `leaf` hash."""
    ok = f"lower(hex(SHA256(data))) = entry_hash AND NOT {_CONTROL.format('data')}" + (
        " AND isValidUTF8(data)" if log else ""
    )
    return (
        "SELECT toString(tenant) AS t, seq, entry_hash, prev_hash, audit_event_id, audit_sha256, chain_tenant,"
        f" {ok} AS hash_ok, SHA256(concat(char(0), data)) AS leaf{keep}"
        " FROM (SELECT tenant, seq, entry_hash, prev_hash, audit_event_id, audit_sha256, chain_tenant,"
        f" {_ENTRY_CANON} AS data{keep} FROM {source})"
    )


def _chains_query(audits: str, entries: str, *, log: bool = False) -> str:
    """Per chain: is every row sound (seq 0..n-1 once each, hashes, links, tenant, its one audit
    record), and its Merkle leaf hashes in seq order (hex, 64 per leaf).

    `audits` and `entries` are rows of `_audit_rows` and `_entry_rows`: a subquery over the
    projection's tables, or tables filled from the log's records (`verify_log_sql`). With
    `log`, the entries also carry `pos`, their place in the log, and a row is sound only if
    the log holds the chain in seq order, as `verify_chain` walks it.

    An entry without its audit record is unsound: with `join_use_nulls = 0` the missing side's
    `h` is '', so `a.h != ''` is what tells "no record" from an entry that cites an empty hash.

    Anything unusual leaves a chain to Python rather than being judged here: a seq twice
    (identical redeliveries, which Python collapses, included: n > distinct_seq), an audit
    event id twice (the join doubles the entry's row), a value with a control character.
    """
    order = (
        ", lagInFrame(pos) OVER (PARTITION BY t ORDER BY seq ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS pos_before"
        if log
        else ""
    )
    in_order = " AND pos_before < pos" if log else ""
    return f"""
SELECT t, count() AS n, min(seq) AS lo, max(seq) AS hi, uniqExact(seq) AS distinct_seq,
    countIf(NOT (hash_ok AND chain_tenant = t AND prev_hash = before AND a.h != '' AND a.h = audit_sha256{in_order}))
        AS unsound,
    arrayStringConcat(arrayMap(x -> hex(x.2), arraySort(x -> x.1, groupArray((seq, leaf))))) AS leaves
FROM (
    SELECT *, lagInFrame(entry_hash, 1, repeat('0', 64)) OVER (PARTITION BY t ORDER BY seq
        ROWS BETWEEN 1 PRECEDING AND CURRENT ROW) AS before{order}
    FROM {entries}
) AS e
LEFT JOIN {audits} AS a ON a.tenant = e.t AND a.event_id = e.audit_event_id
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
    audits, entries = _audit_rows(f"audit_recorded {where}"), _entry_rows(f"ledger_entry_chained {where}")
    result = client.query(_chains_query(f"({audits})", f"({entries})"), parameters=params)
    cps: dict[str, list[LedgerCheckpointSigned]] = {}
    cp_result = client.query(
        f"SELECT * FROM ledger_checkpoint_signed {where} ORDER BY tenant, tree_size", parameters=params
    )
    for row in cp_result.result_rows:
        cp = _checkpoint_from_row(dict(zip(cp_result.column_names, row, strict=True)))
        cps.setdefault(cp.tenant, []).append(cp)
    reports, slow = _judge(result.result_rows, cps, key)
    for t in slow:
        reports.update((r.tenant or "", r) for r in verify(from_store(client, t), key))
    return [reports[t] for t in sorted(reports)], sorted(slow)


def _judge(
    rows: Iterable[Sequence[Any]], cps: dict[str, list[LedgerCheckpointSigned]], key: VerifierKey
) -> tuple[dict[str, VerifyReport], list[str]]:
    """The OK reports of the chains `_chains_query`'s rows show sound (and whose checkpoints
    check), and the tenants left for the Python verifier: any other chain, and a tenant with
    checkpoints but no entries."""
    reports: dict[str, VerifyReport] = {}
    slow: list[str] = []
    for t, n, lo, hi, distinct, unsound, leaves_hex in rows:
        report = None
        if int(unsound) == 0 and int(lo) == 0 and int(hi) == int(n) - 1 and int(distinct) == int(n):
            report = _sound_chain(t, int(n), partial(_roots, bytes.fromhex(leaves_hex), int(n)), cps.get(t, []), key)
        if report is None:
            slow.append(t)
        else:
            reports[t] = report
    slow.extend(t for t in cps if t not in reports and t not in slow)
    return reports, slow


# --- verifying the log in ClickHouse ----------------------------------------------------------
#
# Reading the log into Python objects is what made `verify` slow (decoding 2M records per 1M
# entries), so by default the log is verified by ClickHouse too: the raw records of the audit
# and ledger topics are written, untouched, into Avro container files (one per consume batch,
# under /dev/shm) whose row is a whole log record (its 10-byte single-object header declared
# as a fixed field, then the writer's fields, the envelope inlined as in
# `projections.avro_block`) followed by a random 16-byte separator this run appends; a scratch
# in-memory chDB hashes them into tables while the topics are still being read (`_Loader`),
# then checks them with the projection's SQL (`_audit_rows`, `_entry_rows`, `_chains_query`).
# Python touches a record only to take its bytes.
#
# Framing is exact: every row must start with its type's header and end with the separator,
# and each file must hold as many rows as records were written to it. The separator is
# random, so no record can contain it: a row ending with it ends where a record ends, and
# with as many rows as records, each row is exactly one record, parsed by ClickHouse from the
# bytes Python's reader parses. A union index past the schema's reads as Tuple() (as in the
# sink's fast path) and ClickHouse fails a file on other malformed Avro. Anything of the
# sort, a record of another type or schema version in these topics, or a checkpoint record
# that is not a checkpoint, and the whole log is verified by Python as before
# (`LogNotReadable`): the fast path never decides what Python would have read differently.

SEPARATOR_LEN = 16
LOG_TIMEOUT = 600.0  # s to read the log to its end: a hang guard (1M entries take minutes on a busy box)
_LOG_KINDS = (("audit", AUDIT), ("ledger", ENTRY))


def _reverify_from_log(
    settings: Settings,
    tenant: str | None,
    timeout: float,
    partitions: Collection[int] | None,
    slow: list[str],
    key: VerifierKey,
) -> dict[str, VerifyReport]:
    """The Python verifier's reports for the chains a fast path could not call sound, read
    again from the log; a chain the second read no longer finds (a retention cut between the
    reads) fails, rather than dropping out of the report."""
    chains = from_log(settings, tenant, timeout, partitions=partitions)
    out = {r.tenant or "": r for r in verify({t: chains[t] for t in slow if t in chains}, key)}
    for t in slow:
        if t not in out:
            out[t] = VerifyReport(
                False, t, 0, 0, 0, "", bad_seq=0, reason="chain not found when the log was read again"
            )
    return out


def _checkpoint_of(value: bytes | None) -> LedgerCheckpointSigned | None:
    """A checkpoints-topic record as `from_log` files it: None for poison (skipped, as the
    dead-letter topic has it); `LogNotReadable` for anything but a checkpoint, since `from_log`
    files an audit record or entry into its chain whatever topic it is on, even one whose
    envelope the codec refuses (its field readers skip those checks), and only Python
    reproduces that."""
    codec, readers = _decoders()
    try:
        if readers.read(value) is not None:
            raise LogNotReadable("an audit record or ledger entry on the checkpoints topic")
    except AvroDecodeError:
        return None
    try:
        event = codec.decode(value)
    except PoisonEvent:
        return None
    if not isinstance(event, LedgerCheckpointSigned):
        raise LogNotReadable(f"a {event.event_type} on the checkpoints topic")
    return event


class LogNotReadable(Exception):
    """The log holds a record the ClickHouse path does not read exactly as Python does."""


class _ChdbTaken(Exception):
    """This process already has a chDB store open (one embedded engine, one path, per process)."""


def _container_header(writer: Writer, sep: bytes) -> bytes:
    """An Avro container file header: rows of [header fixed(10), the writer's flat fields, sep fixed(16)].

    A `["null", T]` union is declared `["null", T, <empty record>]` so that a corrupt index 2
    reads as Tuple() (refused), not as null; ClickHouse fails the file on any other index.
    """
    fields: list[dict[str, Any]] = [{"name": "_h", "type": {"type": "fixed", "name": "LfHeader", "size": HEADER_LEN}}]
    for i, f in enumerate(writer.fields):
        avro = f["type"]
        if isinstance(avro, list):
            if len(avro) != 2 or avro[0] != "null":
                raise LogNotReadable(f"{writer.event_type}.{f['name']}: union {avro!r}")
            avro = ["null", avro[1], {"type": "record", "name": f"LfBadIndex{i}", "fields": []}]
        fields.append({"name": f["name"], "type": avro})
    fields.append({"name": "_s", "type": {"type": "fixed", "name": "LfSeparator", "size": SEPARATOR_LEN}})
    schema = {"type": "record", "name": "LfLogRecord", "namespace": "ledgerflow.verify", "fields": fields}
    meta = {b"avro.schema": json.dumps(schema, separators=(",", ":")).encode(), b"avro.codec": b"null"}
    from projections.avro_block import varint  # here: `audit check` imports nothing of the platform

    header = b"Obj\x01" + varint(len(meta))
    header += b"".join(varint(len(k)) + k + varint(len(v)) + v for k, v in meta.items())
    return header + varint(0) + sep


def _unions(writer: Writer) -> list[str]:
    return [f["name"] for f in writer.fields if isinstance(f["type"], list)]


@cache
def _log_writers() -> dict[str, Writer]:
    """Today's writer of each event type the ClickHouse path reads, by type."""
    from projections.avro_block import writers

    today = load_all()
    by_header = writers()
    return {name: by_header[MAGIC + today[name].fingerprint] for _, name in _LOG_KINDS}


# occurred_at within 1900-01-01 .. 2299-12-31 (µs), where ClickHouse's DateTime64 formats
# exactly what Python's datetime does (a time Python cannot hold would not be read by it)
_IN_RANGE = "toUnixTimestamp64Micro(occurred_at) BETWEEN -2208988800000000 AND 10413791999999999"


def _log_source(kind: str, files: str, header: bytes, sep: bytes) -> str:
    """The records in `files` (a glob under the scratch directory) with `audit_recorded`'s or
    `ledger_entry_chained`'s columns, plus `f` (the file), `frame_ok` (the row is exactly one
    record of today's schema, see above) and for entries `pos`: file number << 32 + row, the
    order they were read in (a partition's offset order; files are `ledger-NNNNNNNN.avro`)."""
    unions = _unions(_log_writers()[dict(_LOG_KINDS)[kind]])
    frame = " AND ".join(
        [f"_h = unhex('{header.hex()}')", f"_s = unhex('{sep.hex()}')", "isValidUTF8(tenant)", _IN_RANGE]
        + [f"variantType({u}) != 'Tuple()'" for u in unions]
    )
    raw = f"(SELECT *, _file AS f, _row_number AS r, {frame} AS frame_ok FROM file('{files}', 'Avro'))"
    if kind == "ledger":
        return (
            "(SELECT tenant, seq, entry_hash, prev_hash, audit_event_id, audit_sha256, chain_tenant, f, frame_ok,"
            f" bitShiftLeft(toUInt64(substring(f, 8, 8)), 32) + r AS pos FROM {raw})"
        )
    return (
        "(SELECT tenant, event_id, action, actor, details, event_type, producer, schema_version, outcome, subject,"
        " correlation_id, toDateTime64(occurred_at, 6, 'UTC') AS occurred_at,"
        " variantElement(causation_id, 'String') AS causation_id,"
        f" variantElement(trace_parent, 'String') AS trace_parent, f, frame_ok FROM {raw})"
    )


def _log_rows(kind: str, files: str, header: bytes, sep: bytes) -> str:
    """`_audit_rows` / `_entry_rows` of the records in `files`, with what the framing check needs."""
    source = _log_source(kind, files, header, sep)
    if kind == "ledger":
        return _entry_rows(source, log=True, keep=", pos, f, frame_ok")
    return _audit_rows(source, log=True, keep=", f, frame_ok")


class _Loader:
    """Hashes the container files into the scratch chDB's tables while the topics are still being
    read: each file, once written, is queued, and this thread loads whatever is queued in one
    INSERT per kind (chDB releases the GIL), then deletes the files (they live in memory)."""

    def __init__(self, session: Any, directory: Path, sep: bytes) -> None:
        self.session, self.directory, self.sep = session, directory, sep
        self.headers = {kind: MAGIC + load_all()[name].fingerprint for kind, name in _LOG_KINDS}
        # Bounded: when hashing lags the read, the reader waits rather than filling /dev/shm.
        self.queue: queue.Queue[tuple[str, str] | None] = queue.Queue(maxsize=8)
        self.error: Exception | None = None
        for kind, name in _LOG_KINDS:  # the tables, typed from a file with no records
            empty = directory / f"{kind}-empty.avro"
            empty.write_bytes(_container_header(_log_writers()[name], sep))
            self.query(f"CREATE TABLE lf_{kind} ENGINE = Memory AS {self.rows(kind, str(empty))}")
            empty.unlink()
        self.thread = threading.Thread(target=self._run, name="audit-verify-loader", daemon=True)
        self.thread.start()

    def rows(self, kind: str, files: str) -> str:
        return _log_rows(kind, files, self.headers[kind], self.sep)

    def query(self, sql: str) -> None:
        self.session.query(sql, "Null")

    def _run(self) -> None:
        done = False
        while not done:
            batch = [self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get())
            done = None in batch
            by_kind: dict[str, list[str]] = {}
            for item in batch:
                if item is not None:
                    by_kind.setdefault(item[0], []).append(item[1])
            for kind, names in by_kind.items():
                if self.error is None:
                    glob = f"{self.directory}/{{{','.join(names)}}}"
                    try:
                        self.query(f"INSERT INTO lf_{kind} {self.rows(kind, glob)}")
                    except Exception as exc:  # chDB raises plain RuntimeErrors for malformed input
                        self.error = exc
                for name in names:
                    (self.directory / name).unlink(missing_ok=True)

    def finish(self) -> None:
        """Wait for every queued file; raise LogNotReadable if ClickHouse could not read one."""
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise LogNotReadable(f"ClickHouse could not read the log's records: {self.error}")


def _read_log(
    settings: Settings, loader: _Loader, partitions: Collection[int] | None, timeout: float
) -> tuple[dict[str, dict[str, int]], dict[str, list[LedgerCheckpointSigned]]]:
    """The audit and ledger topics written as container files and handed to `loader` (kind → file
    name → records), and every checkpoint decoded (tenant → checkpoints).

    The topics are read at once, one thread each: reading to the end waits on fetches more
    than it computes (consume releases the GIL), and per batch Python only joins its values.
    """
    from projections.avro_block import varint

    topics = Topics(settings.topic_prefix, settings.partitions)
    sep, directory = loader.sep, loader.directory

    def write(kind: str, name: str) -> dict[str, int]:
        header = _container_header(_log_writers()[name], sep)
        written: dict[str, int] = {}
        for i, batch in enumerate(scan_raw(settings.bootstrap, [topics.name(kind)], timeout, partitions=partitions)):
            values = batch.values
            body = sep.join(values) + sep
            file = f"{kind}-{i:08d}.avro"
            with (directory / file).open("wb") as fh:
                fh.writelines((header, varint(len(values)), varint(len(body)), body, sep))
            written[file] = len(values)
            loader.queue.put((kind, file))
        return written

    with ThreadPoolExecutor(max_workers=len(_LOG_KINDS)) as pool:
        running = {kind: pool.submit(write, kind, name) for kind, name in _LOG_KINDS}
        cps: dict[str, list[LedgerCheckpointSigned]] = {}
        for batch in scan_raw(settings.bootstrap, [topics.name("ledger-checkpoints")], timeout, partitions=partitions):
            for value in batch.values:
                event = _checkpoint_of(value)
                if event is not None:
                    cps.setdefault(event.tenant, []).append(event)
        files = {kind: future.result() for kind, future in running.items()}
    return files, cps


def _check_framing(session: Any, files: dict[str, dict[str, int]]) -> None:
    """Raise LogNotReadable unless every file's records are its rows, one each, framed exactly."""
    for kind, _ in _LOG_KINDS:
        seen = {}
        for file, count, bad in _chdb_rows(
            session, f"SELECT f, count(), countIf(NOT frame_ok) FROM lf_{kind} GROUP BY f"
        ):
            if int(bad):
                raise LogNotReadable(f"{file}: {bad} record(s) not read exactly")
            seen[file] = int(count)
        if seen != files[kind]:
            raise LogNotReadable(f"{kind}: rows per file differ from the records written")


def _chdb_rows(session: Any, sql: str, params: dict[str, Any] | None = None) -> list[list[Any]]:
    """A chDB query's rows (JSONCompactEachRow: 64-bit integers come quoted)."""
    try:
        result = session.query(sql, "JSONCompactEachRow", params=params or {})
    except Exception as exc:  # chDB raises plain RuntimeErrors for malformed input
        raise LogNotReadable(f"ClickHouse could not read the log's records: {exc}") from exc
    return [orjson.loads(line) for line in result.bytes().splitlines() if line]


def _escaped(value: str) -> str:
    """A String query parameter for chDB, which parses parameter values in the Escaped (TSV)
    text format (clickhouse-connect escapes them itself)."""
    return value.translate({ord("\\"): "\\\\", ord("\t"): "\\t", ord("\n"): "\\n", ord("\r"): "\\r", 0: "\\0"})


@contextmanager
def _scratch_chdb() -> Iterator[Any]:
    """A scratch in-memory chDB session in a database of its own (two verifications in one
    process share the engine), dropped and closed after (which frees the engine for a store)."""
    from chdb import session as chdb_session

    try:
        sess = chdb_session.Session(":memory:")
    except RuntimeError as exc:
        if "already initialized" in str(exc):
            raise _ChdbTaken(str(exc)) from exc
        raise
    db = f"lf_verify_{uuid.uuid4().hex}"
    try:
        sess.query(f"CREATE DATABASE {db}", "Null")  # Atomic: Memory databases cannot CREATE ... AS SELECT
        sess.query(f"USE {db}", "Null")
        yield sess
    finally:
        try:
            sess.query(f"DROP DATABASE IF EXISTS {db}", "Null")
        finally:
            sess.close()


def verify_log_sql(
    settings: Settings,
    key: VerifierKey,
    tenant: str | None = None,
    partitions: Collection[int] | None = None,
    timeout: float = LOG_TIMEOUT,
    timings: dict[str, float] | None = None,
) -> tuple[list[VerifyReport], list[str]]:
    """`verify(from_log(settings, tenant, partitions=...), key)` with the hashing done by ClickHouse.

    As `verify_store_sql`, over the log's records (see above): a chain ClickHouse finds
    unsound is verified again by Python from the log, which names its first bad seq.
    Returns (reports, the tenants handed to Python). Raises LogNotReadable when the log
    holds a record this path does not read exactly (the caller verifies it all in Python),
    and _ChdbTaken when this process has a chDB store open (the caller runs this in a child).
    A `tenant` is taken by the records' envelope tenant, as in a run over every tenant.
    `timings`, if given, gets the wall seconds of each phase (for the benchmark).
    """
    spent = timings if timings is not None else {}
    clock = [time.perf_counter()]

    def lap(phase: str) -> None:
        now = time.perf_counter()
        spent[phase] = spent.get(phase, 0.0) + now - clock[0]
        clock[0] = now

    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else None
    with _scratch_chdb() as session:
        try:
            directory = Path(tempfile.mkdtemp(prefix="lf-verify-", dir=base))
        except OSError as exc:
            raise LogNotReadable(f"no scratch directory for the log's records: {exc}") from exc
        try:
            if set(str(directory)) & set("'\\{}*?[]"):  # it goes into file('...') as a glob
                raise LogNotReadable(f"scratch directory {directory} has characters a file() glob reads")
            try:
                loader = _Loader(session, directory, os.urandom(SEPARATOR_LEN))
                lap("start chDB")
            except (OSError, RuntimeError) as exc:  # a full /dev/shm, or chDB refusing the tables
                raise LogNotReadable(f"could not prepare the scratch tables: {exc}") from exc
            try:
                files, cps = _read_log(settings, loader, partitions, timeout)
                lap("read the log (hashing alongside)")
            except TimeoutError:
                raise
            except OSError as exc:  # writing a file under /dev/shm (full): Python verifies instead
                raise LogNotReadable(f"could not write the log's records to {directory}: {exc}") from exc
            finally:
                loader.finish()
                lap("hash the rest")
        finally:
            shutil.rmtree(directory, ignore_errors=True)
        _check_framing(session, files)
        lap("framing check")
        params = None
        audits, entries = "lf_audit", "lf_ledger"
        if tenant is not None:
            params = {"t": _escaped(tenant)}
            audits, entries = (
                "(SELECT * FROM lf_audit WHERE tenant = {t:String})",
                "(SELECT * FROM lf_ledger WHERE t = {t:String})",
            )
            cps = {t: c for t, c in cps.items() if t == tenant}
        rows = _chdb_rows(session, _chains_query(audits, entries, log=True), params)
        lap("chains query")
    lap("close chDB")
    reports, slow = _judge(rows, cps, key)
    lap("Merkle roots and signatures")
    if slow:
        reports.update(_reverify_from_log(settings, tenant, timeout, partitions, slow, key))
        lap("unsound chains in Python")
    return [reports[t] for t in sorted(reports)], sorted(slow)


# --- verifying the log natively ---------------------------------------------------------------
#
# `domain._ledger_native` (C, built by `pip install -e .`) does per record what the two paths
# above do per record in Python or in ClickHouse: it reads each AuditRecorded and
# LedgerEntryChained straight from the Kafka record's bytes, builds the canonical bytes
# (`domain.ledger`'s, byte for byte: tests/test_ledger_native.py), hashes them, and walks each
# chain in log order as `verify_chain` does. Python only consumes the topics (one consumer
# and thread per topic; the C code takes each batch of Messages and releases the GIL while it
# hashes) and checks the signed checkpoints against the roots the C code folds. Like the
# ClickHouse path it decides only what it can decide exactly: a chain it finds unsound goes
# to the Python verifier, which names the first bad seq; a record it does not read exactly
# (another writer schema, malformed bytes, another type on the topic) sends the whole log to
# Python (`LogNotReadable`). It is written for AuditRecorded v1 and LedgerEntryChained v1, and
# is used only while those are today's schemas (then a record of a newer writer is "not
# handled"). `LEDGERFLOW_NATIVE=0`, or the extension missing, leaves `verify_log` to ClickHouse.

NATIVE_BATCH = 20_000  # records per consume call of the native read


def _native() -> Any:
    """The C extension, or None when it is missing, switched off (`LEDGERFLOW_NATIVE=0`), or
    written for other schema versions than today's."""
    if os.environ.get("LEDGERFLOW_NATIVE", "1") == "0":
        return None
    try:
        from domain import _ledger_native
    except ImportError:
        return None
    return _ledger_native if native_chain_headers() is not None else None


def native_available() -> bool:
    """Whether `verify_log` reads the log with the C extension (`verify_log_native`)."""
    return _native() is not None


def _consume_batches(
    bootstrap: str, topic: str, timeout: float, partitions: Collection[int] | None, stop: threading.Event
) -> Iterator[list[Any]]:
    """The topic's records as consume() gives them (Messages, errors included), from the start to
    the end offsets seen now, until `stop` is set. Raises TimeoutError as `scan_to_end`."""
    consumer = reader_consumer(bootstrap, eof=False, name="verify")
    try:
        ends = assign_from_start(consumer, [topic], timeout, partitions, None, None)
        deadline = time.monotonic() + timeout
        pending = set(ends)
        while pending and not stop.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError(f"could not read {sorted(pending)} to their end within {timeout} s")
            batch = consumer.consume(NATIVE_BATCH, 0.05)
            if batch:
                yield batch
            if len(batch) < NATIVE_BATCH:  # the end: where the position reaches the end offset
                for pos in consumer.position([TopicPartition(t, p) for t, p in pending]):
                    if pos.offset >= ends[(pos.topic or "", pos.partition)]:
                        pending.discard((pos.topic or "", pos.partition))
    finally:
        consumer.close()


@contextmanager
def _no_gc() -> Iterator[None]:
    """The cyclic garbage collector off while the log is read: every consume batch allocates
    20,000 Messages, which are tracked objects, and the collections they set off took ~10% of
    the native verifier's CPU; the batches form no cycles (they are freed by refcount)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _native_roots(verifier: Any, index: int, tenant: str, sizes: list[int]) -> dict[int, bytes]:
    return dict(zip(sizes, verifier.roots(index, tenant, sizes), strict=True))


def verify_log_native(
    settings: Settings,
    key: VerifierKey,
    tenant: str | None = None,
    partitions: Collection[int] | None = None,
    timeout: float = LOG_TIMEOUT,
    timings: dict[str, float] | None = None,
) -> tuple[list[VerifyReport], list[str]]:
    """`verify(from_log(settings, tenant, partitions=...), key)` with the per-record work in C
    (see above). Returns (reports, the tenants handed to Python). Raises LogNotReadable when the
    extension is not in use or the log holds a record it does not read exactly (the caller
    verifies it all in Python). A `tenant` is read as `from_log` reads it: records with that
    Kafka key, then that envelope tenant. `timings`, if given, gets wall seconds by phase.
    """
    native = _native()
    headers = native_chain_headers()
    if native is None or headers is None:
        raise LogNotReadable("the native verifier is not in use (not built, or LEDGERFLOW_NATIVE=0)")
    spent = timings if timings is not None else {}
    clock = [time.perf_counter()]

    def lap(phase: str) -> None:
        now = time.perf_counter()
        spent[phase] = spent.get(phase, 0.0) + now - clock[0]
        clock[0] = now

    topics = Topics(settings.topic_prefix, settings.partitions)
    verifier = native.LogVerifier(*headers)
    wanted = None if tenant is None else tenant.encode()
    stop = threading.Event()

    def read(kind: str, add: Callable[[list[Any], bytes | None], str | None]) -> None:
        try:
            for batch in _consume_batches(settings.bootstrap, topics.name(kind), timeout, partitions, stop):
                why = add(batch, wanted)
                if why is not None:
                    raise LogNotReadable(f"{kind}: {why}")
        except BaseException:
            stop.set()  # the other topic's read stops too: the result is thrown away
            raise

    cps: dict[str, list[LedgerCheckpointSigned]] = {}
    with _no_gc(), ThreadPoolExecutor(max_workers=2) as pool:
        running = [pool.submit(read, "audit", verifier.add_audits), pool.submit(read, "ledger", verifier.add_entries)]
        try:
            name = topics.name("ledger-checkpoints")
            for batch in _consume_batches(settings.bootstrap, name, timeout, partitions, stop):
                for msg in batch:
                    if msg.error() is not None or (wanted is not None and msg.key() != wanted):
                        continue
                    event = _checkpoint_of(msg.value())
                    if event is not None and (tenant is None or event.tenant == tenant):
                        cps.setdefault(event.tenant, []).append(event)
            # the signatures, while the other two topics are still being read
            problems = {id(cp): check_checkpoint_event(cp, key) for due in cps.values() for cp in due}
        except BaseException:
            stop.set()
            raise
        finally:
            for future in running:
                future.exception()  # wait for both
        for future in running:
            future.result()
    lap("read and hash the log")
    reports: dict[str, VerifyReport] = {}
    slow: list[str] = []
    for i, (t, n, sound) in enumerate(verifier.chains()):
        report = None
        if sound:
            report = _sound_chain(t, n, partial(_native_roots, verifier, i, t), cps.get(t, []), key, problems)
        if report is None:
            slow.append(t)
        else:
            reports[t] = report
    slow.extend(t for t in cps if t not in reports and t not in slow)
    lap("Merkle roots and checkpoints")
    if slow:
        reports.update(_reverify_from_log(settings, tenant, timeout, partitions, slow, key))
        lap("unsound chains in Python")
    return [reports[t] for t in sorted(reports)], sorted(slow)


def _sound_chain(
    tenant: str,
    n: int,
    roots_at: Callable[[list[int]], dict[int, bytes]],
    checkpoints: list[LedgerCheckpointSigned],
    key: VerifierKey,
    problems: dict[int, str | None] | None = None,
) -> VerifyReport | None:
    """The OK report of a chain whose rows ClickHouse (or the native code) found sound, if its
    Merkle roots (`roots_at(sizes)`, sizes ascending, each in 1..n) match every checkpoint
    (signature checked, or looked up in `problems`: id(checkpoint) -> check_checkpoint_event's
    answer, made earlier); None for anything else (Python then says why)."""
    by_size: dict[int, list[LedgerCheckpointSigned]] = {}
    for cp in checkpoints:
        by_size.setdefault(cp.tree_size, []).append(cp)
    if any(not 0 < size <= n for size in by_size):  # a forged size (0, negative, past the end): Python says why
        return None
    roots = roots_at(sorted({*by_size, n}))
    checked = 0
    for size, due in sorted(by_size.items()):
        root = roots[size].hex()
        for cp in due:
            problem = problems[id(cp)] if problems is not None else check_checkpoint_event(cp, key)
            if problem is not None or cp.chain_tenant != tenant or cp.root_hash != root:
                return None
            checked += 1
    return VerifyReport(
        ok=True, tenant=tenant, entries_checked=n, checkpoints_checked=checked, size=n, root_hash=roots[n].hex()
    )


def _roots(leaves: bytes, n: int, sizes: Iterable[int]) -> dict[int, bytes]:
    """The RFC 9162 root of the first m of `n` leaf hashes (32 bytes each) for every m in `sizes`.

    Level by level (each a list comprehension: about a third of the cost of the per-leaf
    frontier walk `verify_chain` does), then each root is the fold of the perfect subtrees
    that make up m: for each bit k set in m, node (m >> k) - 1 of level k, largest first.
    """
    sha256 = hashlib.sha256
    level = [leaves[i : i + 32] for i in range(0, 32 * n, 32)]
    levels = [level]
    while len(level) > 1:
        level = [sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level) - 1, 2)]
        levels.append(level)
    return {
        m: frontier_root([levels[k][(m >> k) - 1] for k in range(m.bit_length() - 1, -1, -1) if m >> k & 1])
        for m in sizes
    }


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


def _verify_log_part(
    settings: Settings,
    key: VerifierKey,
    tenant: str | None,
    partitions: Collection[int] | None,
    engine: str,
    timeout: float = LOG_TIMEOUT,
) -> tuple[list[VerifyReport], list[str]]:
    """Reports of (part of) the log and the tenants Python verified; unless `engine` is "python"
    or the log holds a record only Python reads exactly, by the native verifier
    (`verify_log_native`) when it is in use, else by ClickHouse (`verify_log_sql`, in a spawned
    child when this process holds a chDB store)."""
    if engine == "clickhouse" and native_available():
        try:
            return verify_log_native(settings, key, tenant, partitions, timeout)
        except LogNotReadable as exc:
            print(f"log: verifying in Python: {exc}", file=sys.stderr)
    elif engine == "clickhouse":
        try:
            return verify_log_sql(settings, key, tenant, partitions, timeout)
        except _ChdbTaken:
            with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
                return pool.submit(_verify_log_part, settings, key, tenant, partitions, engine, timeout).result()
        except LogNotReadable as exc:
            print(f"log: verifying in Python: {exc}", file=sys.stderr)
    reports = verify(from_log(settings, tenant, timeout, partitions=partitions), key)
    return reports, [r.tenant or "" for r in reports]


def _verify_log(
    settings: Settings, key: VerifierKey, tenant: str | None, jobs: int, engine: str, timeout: float = LOG_TIMEOUT
) -> tuple[list[VerifyReport], list[str]]:
    if jobs <= 1:
        return _verify_log_part(settings, key, tenant, None, engine, timeout)
    topics = Topics(settings.topic_prefix, settings.partitions)
    parts = range(max(topics.partitions_of(topics.name(n)) for n in ("audit", "ledger", "ledger-checkpoints")))
    # spawned, not forked: a forked child would inherit librdkafka's threads' locks mid-flight
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        args = ((settings, key, tenant, [p], engine, timeout) for p in parts)
        results = list(pool.map(_verify_log_part, *zip(*args, strict=True)))
    by_tenant: dict[str, list[VerifyReport]] = {}
    by_python: set[str] = set()
    for reports, python in results:
        by_python.update(python)
        for r in reports:
            by_tenant.setdefault(r.tenant or "", []).append(r)
    split = sorted(t for t, rs in by_tenant.items() if len(rs) > 1)
    out = [rs[0] for t, rs in by_tenant.items() if len(rs) == 1]
    for t in split:
        out.extend(verify(from_log(settings, t, timeout), key))
    by_python |= set(split)  # Python verified them again
    return sorted(out, key=lambda r: r.tenant or ""), sorted(by_python)


def verify_log(
    settings: Settings,
    key: VerifierKey,
    tenant: str | None = None,
    jobs: int = 1,
    *,
    engine: str = "clickhouse",
    timeout: float = LOG_TIMEOUT,
) -> list[VerifyReport]:
    """`verify(from_log(...))`: by ClickHouse (`verify_log_sql`) unless `engine` is "python", with
    `jobs` > 1 partition by partition in that many processes.

    Partitions apart are sound because a chain never spans partitions: the worker writes a
    tenant's entries and checkpoints to the partition its audit records are on, and the
    audit topic is keyed by tenant. Should a tenant still show up in two partitions (the
    audit topic was given more partitions and keys moved), its partial reports are not
    trusted: it is verified again from the whole log in this process, by Python.
    """
    return _verify_log(settings, key, tenant, jobs, engine, timeout)[0]


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
    by_python: tuple[
        str, ...
    ] = ()  # tenants the ClickHouse or native verifier handed to Python (a chain it found unsound)


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

    Either source is verified by ClickHouse unless `verifier` is "python": the store by
    itself (`verify_store_sql`), the log by a scratch chDB over its records (`verify_log_sql`),
    or rather, when the C extension is in use, by it (`verify_log_native`: the run's verifier
    is then "native").
    """
    started = time.monotonic()
    by_python: list[str] = []
    if source == "log":
        reports, by_python = _verify_log(settings, key, tenant, jobs, verifier)
        if verifier == "clickhouse" and native_available():
            verifier = "native"
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
        help="who recomputes each copy: ClickHouse (default; the store by itself; the log by the native C verifier "
        "when it is built, else its records in a scratch in-memory chDB; an unsound chain is re-checked in Python "
        "to name its first bad seq) or Python",
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
