"""The audit ledger's pure core: canonical bytes, the per-tenant hash chain, checkpoints,
chain verification and self-contained proof files.

Responsible for:
- `audit_canonical_bytes`: one byte string per AuditRecorded, rebuilt the same from the Kafka
  record or from a ClickHouse row, so `verify` can check either copy of the audit trail;
- the chain: entry k binds (tenant, seq k, entry k-1's hash, the audit's id and SHA-256);
  its canonical bytes are both what `entry_hash` hashes and the RFC 9162 Merkle leaf;
- `chain(state, audit, partition, offset)`: the fold the chaining agent runs, idempotent under
  redelivery (the state keeps the last offset applied per source partition), emitting
  `LedgerEntryChained` with ids and times derived from the audit, so replay emits the same;
- `checkpoint_due` / `make_checkpoint`: sign (origin, size, root) as a C2SP checkpoint;
- `verify_chain`: walk a chain and report the first bad sequence number and why;
- inclusion and consistency proof files an auditor checks offline with the public key only.

Formats (all UTF-8; canonical JSON = `json.dumps(obj, sort_keys=True, separators=(",", ":"),
ensure_ascii=False)`, keys sorted by code point; orjson produces the same bytes faster and a
test holds the two together):
- audit record: `{"action","actor","details":{..},"envelope":{"causation_id","correlation_id",
  "event_id","event_type","occurred_at","producer","schema_version","tenant","trace_parent"},
  "outcome","subject"}`; absent optional fields are `null`; `occurred_at` is
  `YYYY-MM-DDTHH:MM:SS.ffffffZ` (UTC, always 6 digits; a naive time is taken as UTC). Only
  the fields of AuditRecorded v1 are listed, so a field added later changes no old hash.
- entry: `{"audit_event_id","audit_sha256","chain_tenant","format":"ledgerflow.ledger-entry/1",
  "prev_hash","seq"}`; hashes lowercase hex; seq an integer, 0-based; prev_hash of seq 0 is
  64 zeros. `entry_hash = sha256(entry bytes)`; Merkle leaf hash = SHA-256(0x00 || entry bytes).

Sequence numbers are 0-based, as schemas/avro/LedgerEntryChained.avsc says: seq is the
entry's leaf index, and a checkpoint of tree size n covers seq 0..n-1.

Proof files (JSON objects; hashes lowercase hex; every field is checked against the signed note):
- inclusion: `format` "ledgerflow.inclusion-proof/1", `checkpoint` (the signed note text),
  `origin`, `key_name`, `key_id` (8 hex), `tree_size`, `root_hash`, `leaf_index`, `entry` (the
  six fields of LedgerEntry), `leaf_hash`, `inclusion_path` (RFC 9162 order, leaf level
  first), and optionally `audit_record` (the audit record's canonical JSON as a string);
- consistency: `format` "ledgerflow.consistency-proof/1", `origin`, `key_name`, `key_id`,
  `old_checkpoint`, `new_checkpoint` (notes), `old_size`, `new_size`, `consistency_path`
  (RFC 9162 2.1.4.1 order).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime, timedelta
from functools import cache
from typing import Any, Protocol

import orjson

from domain.checkpoint import (
    ALGORITHM,
    NoteError,
    SigningKey,
    VerifierKey,
    open_checkpoint,
    parse_checkpoint,
    parse_verifier_key,
    sign_checkpoint,
    split_note,
)
from domain.merkle import (
    EMPTY_ROOT,
    MerkleTree,
    frontier_append,
    frontier_root,
    leaf_hash,
    verify_consistency,
    verify_inclusion,
)
from domain.tenants import CONTROL
from streams.avro_write import unchecked_twin
from streams.events import AuditRecorded, Envelope, LedgerCheckpointSigned, LedgerEntryChained
from streams.ids import derived_uuid7

PRODUCER = "agent:audit-ledger"
GENESIS_HASH = "0" * 64
ENTRY_FORMAT = "ledgerflow.ledger-entry/1"
INCLUSION_PROOF_FORMAT = "ledgerflow.inclusion-proof/1"
CONSISTENCY_PROOF_FORMAT = "ledgerflow.consistency-proof/1"

_sha256 = hashlib.sha256
_dumps = orjson.dumps
# Sorted keys; a datetime handed to orjson (only a UTC or naive one with nonzero microseconds,
# see _time) is written as YYYY-MM-DDTHH:MM:SS.ffffffZ, the same text canonical_time makes.
_TIME = orjson.OPT_UTC_Z | orjson.OPT_NAIVE_UTC
_SORT = orjson.OPT_SORT_KEYS | _TIME


# --- canonical bytes ------------------------------------------------------------------------


def canonical_time(value: datetime) -> str:
    """ISO-8601 UTC with exactly 6 fractional digits and a Z; naive times are taken as UTC."""
    if value.tzinfo is UTC:  # what the codec decodes: the fast path
        return value.isoformat(timespec="microseconds")[:-6] + "Z"
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(timespec="microseconds") + "Z"


def _time(value: datetime) -> datetime | str:
    """What to hand orjson for a time: the datetime itself when orjson writes canonical_time's
    text (UTC or naive, microseconds nonzero, as orjson drops a zero fraction), else the text.
    Formatting in orjson saves about half the cost of canonical bytes."""
    tz = value.tzinfo
    if value.microsecond and (tz is UTC or tz is None):
        return value
    return canonical_time(value)


def audit_canonical_bytes(event: AuditRecorded) -> bytes:
    """The canonical JSON bytes of an AuditRecorded (format in the module docstring).

    The chaining agent's hot path: the keys are written in sorted order here and only the
    details map is sorted (by code point, as json.dumps' sort_keys), so orjson needs no
    OPT_SORT_KEYS pass over the whole document (a test holds this to the json.dumps rule)."""
    env = event.envelope
    details = event.details
    if len(details) > 1:
        details = dict(sorted(details.items()))
    elif type(details) is not dict:
        details = dict(details)
    return _dumps(
        {
            "action": event.action,
            "actor": event.actor,
            "details": details,
            "envelope": {
                "causation_id": env.causation_id,
                "correlation_id": env.correlation_id,
                "event_id": env.event_id,
                "event_type": env.event_type,
                "occurred_at": _time(env.occurred_at),
                "producer": env.producer,
                "schema_version": env.schema_version,
                "tenant": env.tenant,
                "trace_parent": env.trace_parent,
            },
            "outcome": event.outcome,
            "subject": event.subject,
        },
        option=_TIME,
    )


def audit_canonical_bytes_from_row(row: Mapping[str, Any]) -> bytes:
    """The same bytes from a row of ClickHouse `audit_recorded` (envelope columns flat, `details` a map).

    Columns beyond the record's (`_topic`, `_partition`, `_offset`, `_ingested_at`) are ignored.
    """
    return _dumps(
        {
            "action": row["action"],
            "actor": row["actor"],
            "details": dict(row.get("details") or {}),
            "envelope": {
                "causation_id": row["causation_id"],
                "correlation_id": row["correlation_id"],
                "event_id": row["event_id"],
                "event_type": row["event_type"],
                "occurred_at": _time(row["occurred_at"]),
                "producer": row["producer"],
                "schema_version": int(row["schema_version"]),
                "tenant": row["tenant"],
                "trace_parent": row["trace_parent"],
            },
            "outcome": row["outcome"],
            "subject": row["subject"],
        },
        option=_SORT,
    )


def audit_canonical_bytes_from_record(record: Mapping[str, Any]) -> bytes:
    """The same bytes from an AuditRecorded in Avro field layout (`Event.to_record()`, or the
    dict a compiled reader gives): what `audit verify` hashes without building the event."""
    env = record["envelope"]
    details = record["details"]
    return _dumps(
        {
            "action": record["action"],
            "actor": record["actor"],
            "details": details if type(details) is dict else dict(details),
            "envelope": {
                "causation_id": env["causation_id"],
                "correlation_id": env["correlation_id"],
                "event_id": env["event_id"],
                "event_type": env["event_type"],
                "occurred_at": _time(env["occurred_at"]),
                "producer": env["producer"],
                "schema_version": env["schema_version"],
                "tenant": env["tenant"],
                "trace_parent": env["trace_parent"],
            },
            "outcome": record["outcome"],
            "subject": record["subject"],
        },
        option=_SORT,
    )


def audit_sha256(event: AuditRecorded) -> str:
    """Hex SHA-256 of the audit record's canonical bytes, as bound into its ledger entry."""
    return _sha256(audit_canonical_bytes(event)).hexdigest()


def entry_bytes(chain_tenant: str, seq: int, prev_hash: str, audit_event_id: str, audit_sha256: str) -> bytes:
    """Canonical bytes of a chain entry: what entry_hash hashes and the Merkle leaf data."""
    return _dumps(
        {
            "audit_event_id": audit_event_id,
            "audit_sha256": audit_sha256,
            "chain_tenant": chain_tenant,
            "format": ENTRY_FORMAT,
            "prev_hash": prev_hash,
            "seq": seq,
        }
    )


class EntryLike(Protocol):
    """The hashed fields of an entry: LedgerEntryChained, LedgerEntry or any row object."""

    @property
    def chain_tenant(self) -> str: ...
    @property
    def seq(self) -> int: ...
    @property
    def prev_hash(self) -> str: ...
    @property
    def audit_event_id(self) -> str: ...
    @property
    def audit_sha256(self) -> str: ...
    @property
    def entry_hash(self) -> str: ...


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """An entry's hashed fields and its hash, e.g. read back from ClickHouse or a proof file."""

    chain_tenant: str
    seq: int
    prev_hash: str
    audit_event_id: str
    audit_sha256: str
    entry_hash: str

    @classmethod
    def of(cls, entry: EntryLike) -> LedgerEntry:
        return cls(
            entry.chain_tenant, entry.seq, entry.prev_hash, entry.audit_event_id, entry.audit_sha256, entry.entry_hash
        )

    @classmethod
    def from_mapping(cls, row: Mapping[str, Any]) -> LedgerEntry:
        """From a dict with the six field names (a ClickHouse row, a proof file's `entry`)."""
        return cls(
            chain_tenant=row["chain_tenant"],
            seq=row["seq"],
            prev_hash=row["prev_hash"],
            audit_event_id=row["audit_event_id"],
            audit_sha256=row["audit_sha256"],
            entry_hash=row["entry_hash"],
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "chain_tenant": self.chain_tenant,
            "seq": self.seq,
            "prev_hash": self.prev_hash,
            "audit_event_id": self.audit_event_id,
            "audit_sha256": self.audit_sha256,
            "entry_hash": self.entry_hash,
        }


def entry_bytes_of(entry: EntryLike) -> bytes:
    """Canonical bytes of an entry object (its stored entry_hash is not part of them)."""
    return entry_bytes(entry.chain_tenant, entry.seq, entry.prev_hash, entry.audit_event_id, entry.audit_sha256)


def tree_of(entries: Iterable[EntryLike]) -> MerkleTree:
    """The Merkle tree over entries in the order given (seq order for a sound chain)."""
    return MerkleTree.from_entries(entry_bytes_of(e) for e in entries)


# --- the chain fold -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChainState:
    """One tenant's chain head, small enough for a Faust table row.

    `size` is the number of entries chained, so the next seq and the Merkle tree size;
    `frontier` the roots of the tree's perfect subtrees (one per set bit of size), which is
    all it takes to extend the root; `offsets` the last source offset chained per partition
    of the audit topic. The checkpoint fields say how far the last checkpoint reached and
    since when (event time of the first entry after it) entries wait for the next one.
    """

    tenant: str
    size: int = 0
    last_hash: str = GENESIS_HASH
    frontier: tuple[bytes, ...] = ()
    offsets: Mapping[int, int] = field(default_factory=dict)
    last_event_id: str | None = None
    last_occurred_at: datetime | None = None
    checkpoint_size: int = 0
    pending_since: datetime | None = None

    @property
    def root(self) -> bytes:
        """The Merkle root over all entries chained so far."""
        return frontier_root(self.frontier)

    def to_json(self) -> dict[str, Any]:
        """Table-storable form: hashes in hex, times in the canonical text form."""
        return {
            "tenant": self.tenant,
            "size": self.size,
            "last_hash": self.last_hash,
            "frontier": [h.hex() for h in self.frontier],
            "offsets": {str(p): o for p, o in sorted(self.offsets.items())},
            "last_event_id": self.last_event_id,
            "last_occurred_at": None if self.last_occurred_at is None else canonical_time(self.last_occurred_at),
            "checkpoint_size": self.checkpoint_size,
            "pending_since": None if self.pending_since is None else canonical_time(self.pending_since),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ChainState:
        state = cls(
            tenant=data["tenant"],
            size=data["size"],
            last_hash=data["last_hash"],
            frontier=tuple(bytes.fromhex(h) for h in data["frontier"]),
            offsets={int(p): int(o) for p, o in data["offsets"].items()},
            last_event_id=data.get("last_event_id"),
            last_occurred_at=_parse_time(data.get("last_occurred_at")),
            checkpoint_size=data.get("checkpoint_size", 0),
            pending_since=_parse_time(data.get("pending_since")),
        )
        if len(state.frontier) != state.size.bit_count():
            raise ValueError(f"chain state of {state.tenant}: frontier does not fit size {state.size}")
        return state


def _parse_time(text: str | None) -> datetime | None:
    if text is None:
        return None
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


_CANONICAL_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}").fullmatch
# a hex digit of the hash -> the id's variant digit: the RFC 9562 variant bits 10, then the digit's low 2 bits
_VARIANT_DIGIT = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


def derived_id(parent: str, *parts: str) -> str:
    """`str(streams.ids.derived_uuid7(parent, *parts))` without two UUID objects (a third of
    the chaining cost): for a canonical lowercase parent id the same bits, as text; any other
    spelling of an id goes through derived_uuid7 itself (a test holds the two together).

    The id's text is spliced from the parent's 48-bit time (its first 12 hex digits), the
    version digit 7, and the first 80 bits of SHA-256(parent, parts) (20 hex digits): 12 bits
    after the version, then the variant bits over the top 2 of the last 64 (derived_uuid7's
    `_assemble`, which drops hash bits 12-15 and 16-17), with no integer built at all."""
    if _CANONICAL_ID(parent) is None:
        return str(derived_uuid7(parent, *parts))
    d = _sha256("\x1f".join((parent, *parts)).encode()).hexdigest()
    return f"{parent[:8]}-{parent[9:13]}-7{d[:3]}-{_VARIANT_DIGIT[d[4]]}{d[5:8]}-{d[8:20]}"


# Built without `__init__` only while the classes have exactly the fields set below (a field
# added later would be left unset): otherwise through the constructors.
_ENVELOPE_TWIN = unchecked_twin(Envelope) if tuple(f.name for f in fields(Envelope)) == (
    "event_id", "event_type", "schema_version", "tenant", "occurred_at",
    "correlation_id", "producer", "trace_parent", "causation_id",
) else None  # fmt: skip
_ENTRY_TWIN = unchecked_twin(LedgerEntryChained) if tuple(f.name for f in fields(LedgerEntryChained)) == (
    "envelope", "chain_tenant", "seq", "entry_hash", "prev_hash",
    "audit_event_id", "audit_sha256", "source_partition", "source_offset",
) else None  # fmt: skip


def _entry_event(
    audit_env: Envelope,
    event_id: str,
    tenant: str,
    seq: int,
    e_hash: str,
    prev_hash: str,
    a_sha: str,
    partition: int,
    offset: int,
) -> LedgerEntryChained:
    """The LedgerEntryChained of one link: what `audit_env.caused_by(...)` and the dataclass
    constructors give, built without the frozen `__init__`s (a fifth of the chaining cost)."""
    if _ENVELOPE_TWIN is None or _ENTRY_TWIN is None:  # pragma: no cover - the fields changed
        return LedgerEntryChained(
            envelope=audit_env.caused_by("LedgerEntryChained", PRODUCER, str(seq)),
            chain_tenant=tenant, seq=seq, entry_hash=e_hash, prev_hash=prev_hash,
            audit_event_id=audit_env.event_id, audit_sha256=a_sha, source_partition=partition, source_offset=offset,
        )  # fmt: skip
    env = _ENVELOPE_TWIN()
    env.event_id = event_id
    env.event_type = "LedgerEntryChained"
    env.schema_version = 1
    env.tenant = audit_env.tenant
    env.occurred_at = audit_env.occurred_at
    env.correlation_id = audit_env.correlation_id
    env.producer = PRODUCER
    env.trace_parent = audit_env.trace_parent
    env.causation_id = audit_env.event_id
    env.__class__ = Envelope
    event = _ENTRY_TWIN()
    event.envelope = env
    event.chain_tenant = tenant
    event.seq = seq
    event.entry_hash = e_hash
    event.prev_hash = prev_hash
    event.audit_event_id = audit_env.event_id
    event.audit_sha256 = a_sha
    event.source_partition = partition
    event.source_offset = offset
    event.__class__ = LedgerEntryChained
    return event


def _link(
    tenant: str, seq: int, prev_hash: str, audit: AuditRecorded, partition: int, offset: int
) -> tuple[str, bytes, LedgerEntryChained]:
    """Entry `seq` of `tenant`'s chain for `audit`: (entry_hash, Merkle leaf hash, the event).

    Refuses (ValueError: the worker dead-letters the record) a tenant with a control character:
    its chain could never be checkpointed (a C2SP note's text has none), and chaining it first
    only to fail at the checkpoint stopped the worker for good.
    """
    if CONTROL.search(tenant) is not None:
        raise ValueError(f"tenant {tenant!r} has a control character: no checkpoint note can name its chain")
    env = audit.envelope
    a_sha = _sha256(audit_canonical_bytes(audit)).hexdigest()
    data = entry_bytes(tenant, seq, prev_hash, env.event_id, a_sha)
    e_hash = _sha256(data).hexdigest()
    # The entry id binds seq too: a record produced twice (two offsets) gets two entries with
    # two ids, so deduplication by id downstream can never open a gap in the chain.
    # Same id as env.caused_by("LedgerEntryChained", PRODUCER, str(seq)).
    event_id = derived_id(env.event_id, "LedgerEntryChained", str(seq))
    event = _entry_event(env, event_id, tenant, seq, e_hash, prev_hash, a_sha, partition, offset)
    return e_hash, _sha256(b"\x00" + data).digest(), event


def chain(
    state: ChainState | None, audit: AuditRecorded, partition: int, offset: int
) -> tuple[ChainState, LedgerEntryChained | None]:
    """Append one audit record to its tenant's chain; (state, None) if this offset was chained.

    A tenant's audit records are keyed by tenant, so they arrive in order within a partition;
    anything at or below the last offset chained from that partition is a redelivery.
    The pure fold (replays and tests); the worker runs the same link through `ChainHead`.
    """
    current = state or ChainState(tenant=audit.tenant)
    if audit.tenant != current.tenant:
        raise ValueError(f"audit record of tenant {audit.tenant!r} offered to the chain of {current.tenant!r}")
    last = current.offsets.get(partition)
    if last is not None and offset <= last:
        return current, None
    env = audit.envelope
    seq = current.size
    e_hash, leaf, event = _link(current.tenant, seq, current.last_hash, audit, partition, offset)
    offsets = dict(current.offsets)
    offsets[partition] = offset
    new = ChainState(
        tenant=current.tenant,
        size=seq + 1,
        last_hash=e_hash,
        frontier=frontier_append(current.frontier, seq, leaf),
        offsets=offsets,
        last_event_id=event.envelope.event_id,
        last_occurred_at=env.occurred_at,
        checkpoint_size=current.checkpoint_size,
        pending_since=current.pending_since or env.occurred_at,
    )
    return new, event


class ChainHead:
    """A chain head updated in place: `chain()` for the worker's hot loop, without a new
    ChainState (and a copy of its offsets) per entry. Same fields and meaning as ChainState;
    `state()` / `from_state()` convert, and a test holds entries and states of the two paths
    equal. Not shared between threads; `copy()` before a batch to undo it on abort."""

    __slots__ = (
        "checkpoint_size",
        "frontier",
        "last_event_id",
        "last_hash",
        "last_occurred_at",
        "offsets",
        "pending_since",
        "size",
        "tenant",
    )  # fmt: skip

    def __init__(self, tenant: str) -> None:
        self.tenant = tenant
        self.size = 0
        self.last_hash = GENESIS_HASH
        self.frontier: list[bytes] = []
        self.offsets: dict[int, int] = {}
        self.last_event_id: str | None = None
        self.last_occurred_at: datetime | None = None
        self.checkpoint_size = 0
        self.pending_since: datetime | None = None

    @classmethod
    def from_state(cls, state: ChainState) -> ChainHead:
        head = cls(state.tenant)
        head.size = state.size
        head.last_hash = state.last_hash
        head.frontier = list(state.frontier)
        head.offsets = dict(state.offsets)
        head.last_event_id = state.last_event_id
        head.last_occurred_at = state.last_occurred_at
        head.checkpoint_size = state.checkpoint_size
        head.pending_since = state.pending_since
        return head

    def state(self) -> ChainState:
        return ChainState(
            tenant=self.tenant,
            size=self.size,
            last_hash=self.last_hash,
            frontier=tuple(self.frontier),
            offsets=dict(self.offsets),
            last_event_id=self.last_event_id,
            last_occurred_at=self.last_occurred_at,
            checkpoint_size=self.checkpoint_size,
            pending_since=self.pending_since,
        )

    def copy(self) -> ChainHead:
        head = ChainHead(self.tenant)
        head.size = self.size
        head.last_hash = self.last_hash
        head.frontier = list(self.frontier)
        head.offsets = dict(self.offsets)
        head.last_event_id = self.last_event_id
        head.last_occurred_at = self.last_occurred_at
        head.checkpoint_size = self.checkpoint_size
        head.pending_since = self.pending_since
        return head

    def append(self, audit: AuditRecorded, partition: int, offset: int) -> LedgerEntryChained | None:
        """`chain(self.state(), audit, partition, offset)` in place; None for a redelivery."""
        if audit.tenant != self.tenant:
            raise ValueError(f"audit record of tenant {audit.tenant!r} offered to the chain of {self.tenant!r}")
        last = self.offsets.get(partition)
        if last is not None and offset <= last:
            return None
        seq = self.size
        e_hash, h, event = _link(self.tenant, seq, self.last_hash, audit, partition, offset)
        frontier = self.frontier
        carry = seq
        while carry & 1:
            h = _sha256(b"\x01" + frontier.pop() + h).digest()
            carry >>= 1
        frontier.append(h)
        self.offsets[partition] = offset
        self.size = seq + 1
        self.last_hash = e_hash
        self.last_event_id = event.envelope.event_id
        occurred_at = audit.envelope.occurred_at
        self.last_occurred_at = occurred_at
        if self.pending_since is None:
            self.pending_since = occurred_at
        return event

    def native_state(self, partition: int) -> NativeHeadState | None:
        """This head as `domain._ledger_native.ChainBatch.run` reads it for records of
        `partition`: (self, size, last_hash, frontier, last offset chained from the partition,
        checkpoint_size, pending_since in µs since the epoch); None when pending_since is not
        an aware time (then Python's own `append` and `due` decide)."""
        since = self.pending_since
        since_us = None
        if since is not None:
            if since.tzinfo is None:
                return None
            since_us = (since - _EPOCH) // _ONE_US
        return (
            self,
            self.size,
            self.last_hash,
            self.frontier,
            self.offsets.get(partition),
            self.checkpoint_size,
            since_us,
        )

    def native_applied(
        self, partition: int, size: int, last_hash: str, frontier: list[bytes], offset: int, last_event_id: str,
        occurred_us: int, since_us: int,
    ) -> None:  # fmt: skip
        """Take the state the C fold left after appending entries (`ChainBatch.run`'s heads):
        what `append` would have set, times as the codec decodes them."""
        self.size = size
        self.last_hash = last_hash
        self.frontier = frontier
        self.offsets[partition] = offset
        self.last_event_id = last_event_id
        self.last_occurred_at = _EPOCH + timedelta(0, 0, occurred_us)
        if self.pending_since is None:
            self.pending_since = _EPOCH + timedelta(0, 0, since_us)

    def due(self, now: datetime, every_n: int, every_s: float) -> bool:
        """`checkpoint_due` of this head."""
        pending = self.size - self.checkpoint_size
        if pending <= 0:
            return False
        if pending >= every_n:
            return True
        return self.pending_since is not None and (now - self.pending_since).total_seconds() >= every_s

    def checkpoint(self, key: SigningKey, origin: str, at: datetime | None = None) -> LedgerCheckpointSigned:
        """`make_checkpoint` of this head; marks the head as checkpointed."""
        state, signed = make_checkpoint(self.state(), key, origin, at)
        self.checkpoint_size = state.checkpoint_size
        self.pending_since = state.pending_since
        return signed


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
NativeHeadState = tuple["ChainHead", int, str, list[bytes], int | None, int, int | None]


@cache
@cache
def native_chain_headers() -> tuple[bytes, bytes] | None:
    """(AuditRecorded, LedgerEntryChained) single-object headers of v1, the layouts
    `domain._ledger_native` reads and writes, if v1 is still today's schema of both; else None
    (then the C fold is not used: a record of a newer writer would be "not handled", and the
    entries it writes would be of an old schema)."""
    from streams.codec import MAGIC
    from streams.evolution import load_fixtures
    from streams.schemas import load_all

    today, released = load_all(), load_fixtures()
    out = []
    for name in ("AuditRecorded", "LedgerEntryChained"):
        v1 = [f for f in released.get(name, []) if f.version == 1]
        if not v1 or v1[0].schema.fingerprint != today[name].fingerprint:
            return None
        out.append(MAGIC + today[name].fingerprint)
    return out[0], out[1]


def checkpoint_due(state: ChainState, now: datetime, every_n: int, every_s: float) -> bool:
    """True when entries past the last checkpoint number `every_n`, or the oldest has waited `every_s`.

    The wait is measured from the event time of the first unsigned entry, so the fold stays a
    function of the log; `now` is the caller's clock (the agent's timer).
    """
    pending = state.size - state.checkpoint_size
    if pending <= 0:
        return False
    if pending >= every_n:
        return True
    return state.pending_since is not None and (now - state.pending_since).total_seconds() >= every_s


def make_checkpoint(
    state: ChainState, key: SigningKey, origin: str, at: datetime | None = None
) -> tuple[ChainState, LedgerCheckpointSigned]:
    """Sign the chain's current (origin, size, root); returns the state marked as checkpointed.

    Deterministic: the event id derives from the tenant and tree size (through the last
    entry's id), the time defaults to the last entry's, and Ed25519 signatures are
    deterministic, so a replay signs byte-identical checkpoints.
    """
    if state.size == 0 or state.last_event_id is None:
        raise ValueError(f"chain of {state.tenant} is empty: nothing to checkpoint")
    root = state.root
    note = sign_checkpoint(origin, state.size, root, key)
    verifier = key.verifier
    _, sig = open_checkpoint(note, verifier)
    event_id = str(derived_uuid7(state.last_event_id, "LedgerCheckpointSigned", state.tenant, str(state.size)))
    occurred_at = at or state.last_occurred_at
    assert occurred_at is not None
    event = LedgerCheckpointSigned(
        envelope=Envelope(
            event_id=event_id,
            event_type="LedgerCheckpointSigned",
            schema_version=LedgerCheckpointSigned.SCHEMA_VERSION,
            tenant=state.tenant,
            occurred_at=occurred_at,
            correlation_id=event_id,
            causation_id=state.last_event_id,
            producer=PRODUCER,
        ),
        chain_tenant=state.tenant,
        origin=origin,
        tree_size=state.size,
        root_hash=root.hex(),
        algorithm=ALGORITHM,
        key_id=verifier.key_id_hex,
        signature=base64.b64encode(sig.signature).decode("ascii"),
        signed_note=note,
    )
    new = ChainState(
        tenant=state.tenant,
        size=state.size,
        last_hash=state.last_hash,
        frontier=state.frontier,
        offsets=state.offsets,
        last_event_id=state.last_event_id,
        last_occurred_at=state.last_occurred_at,
        checkpoint_size=state.size,
        pending_since=None,
    )
    return new, event


def check_checkpoint_event(event: LedgerCheckpointSigned, key: VerifierKey) -> str | None:
    """None if the event's note is signed by `key` and agrees with the event's fields; else why not."""
    try:
        cp, sig = open_checkpoint(event.signed_note, key)
    except NoteError as exc:
        return f"checkpoint at size {event.tree_size}: {exc}"
    if (cp.origin, cp.tree_size, cp.root_hash.hex()) != (event.origin, event.tree_size, event.root_hash):
        return f"checkpoint at size {event.tree_size}: event fields differ from its signed note"
    signature = base64.b64encode(sig.signature).decode("ascii")
    if event.key_id != key.key_id_hex or event.signature != signature or event.algorithm != ALGORITHM:
        return f"checkpoint at size {event.tree_size}: key id, algorithm or signature field differs from the note"
    return None


# --- verification ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """Outcome of `verify_chain`: ok, or the first bad seq and why.

    `bad_seq` is the first sequence number that cannot be trusted: the entry that fails, the
    missing one for a gap, or for a checkpoint that fails, the first seq it covers that no
    earlier good checkpoint did (the rewrite lies somewhere from there to its size).
    """

    ok: bool
    tenant: str | None
    entries_checked: int
    checkpoints_checked: int
    size: int
    root_hash: str
    bad_seq: int | None = None
    reason: str | None = None


AuditSource = AuditRecorded | bytes


def verify_chain(
    entries: Iterable[EntryLike],
    audits_by_id: Mapping[str, AuditSource] | None = None,
    checkpoints: Iterable[LedgerCheckpointSigned] = (),
    key: VerifierKey | None = None,
    tenant: str | None = None,
) -> VerifyReport:
    """Recompute a tenant's chain from its entries, in the order given (log or storage order).

    Checks, per entry in turn: seq is the next one (else: gap, reordering or duplicate),
    the entry hash recomputes, prev_hash links to the previous entry, the chain's tenant, and
    with `audits_by_id` (event id → AuditRecorded or its canonical bytes) that the audit record
    hashes to audit_sha256. Each checkpoint is checked when the walk reaches its size: its
    note must verify with `key` and its root equal the recomputed one; a checkpoint beyond
    the last entry means the tail was cut. Stops at the first failure.
    """
    items = list(entries)
    cps: dict[int, list[LedgerCheckpointSigned]] = {}
    for cp in checkpoints:
        cps.setdefault(cp.tree_size, []).append(cp)
    if cps and key is None:
        raise ValueError("checking checkpoints needs the verifier key")
    chain_tenant = tenant if tenant is not None else (items[0].chain_tenant if items else None)

    frontier: list[bytes] = []  # as merkle.frontier_append, kept in place: this loop is the hot path
    expected = 0
    prev = GENESIS_HASH
    trusted_from = 0  # first seq not yet covered by a good checkpoint
    n_cps = 0
    seen: set[int] | None = None

    def report(bad: int | None, reason: str | None) -> VerifyReport:
        return VerifyReport(
            ok=bad is None and reason is None,
            tenant=chain_tenant,
            entries_checked=expected,
            checkpoints_checked=n_cps,
            size=expected,
            root_hash=frontier_root(frontier).hex(),
            bad_seq=bad,
            reason=reason,
        )

    def check_checkpoints(size: int) -> str | None:
        nonlocal n_cps, trusted_from
        root_hex = frontier_root(frontier).hex()
        for cp in cps.pop(size, ()):
            assert key is not None
            problem = check_checkpoint_event(cp, key)
            if problem is None and cp.chain_tenant != chain_tenant:
                problem = f"checkpoint at size {size} is for tenant {cp.chain_tenant!r}"
            if problem is None and cp.root_hash != root_hex:
                problem = f"checkpoint at size {size}: signed root differs from the recomputed root (entries rewritten)"
            if problem is not None:
                return problem
            n_cps += 1
            trusted_from = size
        return None

    problem = check_checkpoints(0) if 0 in cps else None
    if problem is not None:
        return report(0, problem)

    for e in items:
        seq = e.seq
        if seq != expected:
            if seq == expected - 1:
                if e.entry_hash == prev == _sha256(entry_bytes_of(e)).hexdigest():
                    return report(seq, f"duplicate: seq {seq} appears twice, identical (a redelivered entry)")
                return report(seq, f"fork: seq {seq} appears twice with different contents")
            if seq < expected:
                return report(seq, f"out of order: seq {seq} found after seq {expected - 1}")
            if seen is None:
                seen = {x.seq for x in items}
            if expected in seen:
                return report(expected, f"out of order: seq {seq} found where seq {expected} belongs")
            return report(expected, f"gap: seq {expected} missing (next found is {seq})")
        tenant_of, prev_of, audit_id, audit_hash = e.chain_tenant, e.prev_hash, e.audit_event_id, e.audit_sha256
        if chain_tenant is not None and tenant_of != chain_tenant:
            return report(seq, f"entry belongs to tenant {tenant_of!r}, not {chain_tenant!r}")
        data = entry_bytes(tenant_of, seq, prev_of, audit_id, audit_hash)
        recomputed = _sha256(data).hexdigest()
        if recomputed != e.entry_hash:
            return report(seq, "hash mismatch: entry_hash is not the hash of the entry's fields")
        if prev_of != prev:
            return report(seq, f"prev_hash link broken: not the hash of seq {seq - 1} (seq {seq - 1} or {seq} altered)")
        if audits_by_id is not None:
            source = audits_by_id.get(audit_id)
            if source is None:
                return report(seq, f"audit record {audit_id} missing")
            raw = source if isinstance(source, bytes) else audit_canonical_bytes(source)
            if _sha256(raw).hexdigest() != audit_hash:
                return report(seq, f"audit_sha256 mismatch: audit record {audit_id} is not what was chained")
        h = _sha256(b"\x00" + data).digest()
        carry = seq
        while carry & 1:
            h = _sha256(b"\x01" + frontier.pop() + h).digest()
            carry >>= 1
        frontier.append(h)
        prev = recomputed
        expected = seq + 1
        if expected in cps:
            problem = check_checkpoints(expected)
            if problem is not None:
                return report(trusted_from, problem)

    if cps:
        beyond = min(cps)
        return report(expected, f"truncated: a checkpoint covers {beyond} entries, the chain has {expected}")
    return report(None, None)


# --- proof files ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProofCheck:
    """Outcome of checking a proof file offline."""

    ok: bool
    reason: str
    origin: str | None = None
    tree_size: int | None = None
    leaf_index: int | None = None
    old_size: int | None = None


def _note_of(checkpoint: LedgerCheckpointSigned | str) -> str:
    return checkpoint.signed_note if isinstance(checkpoint, LedgerCheckpointSigned) else checkpoint


def _unverified_checkpoint(note: str) -> tuple[str, int, bytes, str, str]:
    """(origin, size, root, key name, key id hex) read from a note without verifying it (for building)."""
    text, sigs = split_note(note)
    cp = parse_checkpoint(text)
    if not sigs:
        raise NoteError("checkpoint note has no signature")
    return cp.origin, cp.tree_size, cp.root_hash, sigs[0].name, sigs[0].key_id.hex()


def build_inclusion_proof_file(
    entries: Sequence[EntryLike] | MerkleTree,
    checkpoint: LedgerCheckpointSigned | str,
    index: int,
    entry: EntryLike | None = None,
    audit: AuditRecorded | bytes | None = None,
) -> dict[str, Any]:
    """A self-contained proof that entry `index` is in the log the checkpoint signs.

    `entries` is the chain in seq order (at least up to the checkpoint's size) or a tree
    built from it (then pass `entry`). With `audit` (the record or its canonical bytes), the
    file also carries the audit record's canonical JSON so the checker sees what was
    recorded, not just its hash. Refuses to
    write a proof that would not check (wrong tree for this checkpoint).
    """
    note = _note_of(checkpoint)
    origin, size, root, key_name, key_hex = _unverified_checkpoint(note)
    if isinstance(entries, MerkleTree):
        tree = entries
        if entry is None:
            raise ValueError("pass the entry when giving a tree")
    else:
        tree = tree_of(entries[:size])
        entry = entry or entries[index]
    if not 0 <= index < size <= tree.size:
        raise ValueError(f"index {index} not in a checkpoint of size {size} (tree has {tree.size})")
    if tree.root(size) != root:
        raise ValueError(f"tree root at size {size} is not the checkpoint's: wrong chain or tenant")
    data = entry_bytes_of(entry)
    if entry.seq != index or leaf_hash(data) != tree.leaf_hash(index):
        raise ValueError(f"entry seq {entry.seq} is not leaf {index} of the tree")
    doc: dict[str, Any] = {
        "format": INCLUSION_PROOF_FORMAT,
        "checkpoint": note,
        "origin": origin,
        "key_name": key_name,
        "key_id": key_hex,
        "tree_size": size,
        "root_hash": root.hex(),
        "leaf_index": index,
        "entry": LedgerEntry.of(entry).to_json(),
        "leaf_hash": leaf_hash(data).hex(),
        "inclusion_path": [h.hex() for h in tree.inclusion_proof(index, size)],
    }
    if audit is not None:
        canonical = audit if isinstance(audit, bytes) else audit_canonical_bytes(audit)
        if _sha256(canonical).hexdigest() != entry.audit_sha256:
            raise ValueError("audit record is not the one this entry chained")
        if orjson.loads(canonical)["envelope"]["event_id"] != entry.audit_event_id:
            raise ValueError("audit record is not the one this entry chained")
        doc["audit_record"] = canonical.decode("utf-8")
    return doc


def _as_verifier(public_key: VerifierKey | str) -> VerifierKey:
    return public_key if isinstance(public_key, VerifierKey) else parse_verifier_key(public_key)


def _hex_hash(value: object, what: str) -> bytes:
    if not isinstance(value, str) or len(value) != 64 or value != value.lower():
        raise ValueError(f"{what} is not a lowercase hex SHA-256")
    return bytes.fromhex(value)


def _int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} is not a non-negative integer")
    return value


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is not a string")
    return value


def _open(note: object, key: VerifierKey) -> tuple[str, int, bytes]:
    cp, _ = open_checkpoint(_str(note, "checkpoint"), key)
    return cp.origin, cp.tree_size, cp.root_hash


def check_proof_file(doc: Mapping[str, Any], public_key: VerifierKey | str) -> ProofCheck:
    """Check an inclusion proof file with nothing but the log's public key; never raises.

    The signature on the checkpoint, every field against the signed note, the entry hash,
    the leaf hash, the audit path up to the signed root, and the audit record if present.
    """
    try:
        key = _as_verifier(public_key)
        if doc.get("format") != INCLUSION_PROOF_FORMAT:
            return ProofCheck(False, "not an inclusion proof file")
        origin, size, root = _open(doc["checkpoint"], key)
        if doc["origin"] != origin or _int(doc["tree_size"], "tree_size") != size:
            return ProofCheck(False, "origin or tree size differs from the signed checkpoint")
        if _hex_hash(doc["root_hash"], "root_hash") != root:
            return ProofCheck(False, "root hash differs from the signed checkpoint")
        if doc["key_name"] != key.name or doc["key_id"] != key.key_id_hex:
            return ProofCheck(False, "key name or id differs from the verifier key")
        index = _int(doc["leaf_index"], "leaf_index")
        raw = doc["entry"]
        if not isinstance(raw, Mapping):
            return ProofCheck(False, "entry is not an object")
        entry = LedgerEntry(
            chain_tenant=_str(raw["chain_tenant"], "chain_tenant"),
            seq=_int(raw["seq"], "seq"),
            prev_hash=_hex_hash(raw["prev_hash"], "prev_hash").hex(),
            audit_event_id=_str(raw["audit_event_id"], "audit_event_id"),
            audit_sha256=_hex_hash(raw["audit_sha256"], "audit_sha256").hex(),
            entry_hash=_hex_hash(raw["entry_hash"], "entry_hash").hex(),
        )
        if entry.seq != index:
            return ProofCheck(False, f"entry seq {entry.seq} is not the leaf index {index}")
        if index == 0 and entry.prev_hash != GENESIS_HASH:
            return ProofCheck(False, "seq 0 must link to the genesis hash")
        data = entry_bytes_of(entry)
        if _sha256(data).hexdigest() != entry.entry_hash:
            return ProofCheck(False, "entry hash does not match the entry's fields")
        leaf = leaf_hash(data)
        if _hex_hash(doc["leaf_hash"], "leaf_hash") != leaf:
            return ProofCheck(False, "leaf hash does not match the entry")
        path_raw = doc["inclusion_path"]
        if not isinstance(path_raw, list):
            return ProofCheck(False, "inclusion_path is not a list")
        path = [_hex_hash(p, "inclusion_path element") for p in path_raw]
        if not verify_inclusion(leaf, index, size, path, root):
            return ProofCheck(False, "inclusion path does not lead to the signed root")
        if "audit_record" in doc:
            record = _str(doc["audit_record"], "audit_record").encode("utf-8")
            if _sha256(record).hexdigest() != entry.audit_sha256:
                return ProofCheck(False, "audit record does not hash to the entry's audit_sha256")
            parsed = orjson.loads(record)
            if parsed.get("envelope", {}).get("event_id") != entry.audit_event_id:
                return ProofCheck(False, "audit record's event id is not the entry's")
        return ProofCheck(True, "ok", origin=origin, tree_size=size, leaf_index=index)
    except NoteError as exc:
        return ProofCheck(False, f"checkpoint rejected: {exc}")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return ProofCheck(False, f"malformed: {exc!r}")


def build_consistency_proof_file(
    old: LedgerCheckpointSigned | str, new: LedgerCheckpointSigned | str, proof: Sequence[bytes] | MerkleTree
) -> dict[str, Any]:
    """A self-contained proof that checkpoint `new` extends checkpoint `old` (same log).

    `proof` is the RFC 9162 consistency path, or a tree of the chain to compute it from.
    """
    old_note, new_note = _note_of(old), _note_of(new)
    o_origin, o_size, o_root, key_name, key_hex = _unverified_checkpoint(old_note)
    n_origin, n_size, n_root, n_key_name, n_key_hex = _unverified_checkpoint(new_note)
    if o_origin != n_origin or (key_name, key_hex) != (n_key_name, n_key_hex):
        raise ValueError("checkpoints are of different logs or keys")
    if o_size > n_size:
        raise ValueError(f"old size {o_size} is larger than new size {n_size}")
    path = proof.consistency_proof(o_size, n_size) if isinstance(proof, MerkleTree) else list(proof)
    if not verify_consistency(o_size, n_size, o_root, n_root, path):
        raise ValueError("the consistency proof does not hold for these checkpoints")
    return {
        "format": CONSISTENCY_PROOF_FORMAT,
        "origin": o_origin,
        "key_name": key_name,
        "key_id": key_hex,
        "old_checkpoint": old_note,
        "new_checkpoint": new_note,
        "old_size": o_size,
        "new_size": n_size,
        "consistency_path": [h.hex() for h in path],
    }


def check_consistency_file(doc: Mapping[str, Any], public_key: VerifierKey | str) -> ProofCheck:
    """Check a consistency proof file with the log's public key only; never raises."""
    try:
        key = _as_verifier(public_key)
        if doc.get("format") != CONSISTENCY_PROOF_FORMAT:
            return ProofCheck(False, "not a consistency proof file")
        o_origin, o_size, o_root = _open(doc["old_checkpoint"], key)
        n_origin, n_size, n_root = _open(doc["new_checkpoint"], key)
        if o_origin != n_origin or doc["origin"] != o_origin:
            return ProofCheck(False, "checkpoints are of different logs")
        if doc["key_name"] != key.name or doc["key_id"] != key.key_id_hex:
            return ProofCheck(False, "key name or id differs from the verifier key")
        if _int(doc["old_size"], "old_size") != o_size or _int(doc["new_size"], "new_size") != n_size:
            return ProofCheck(False, "sizes differ from the signed checkpoints")
        path_raw = doc["consistency_path"]
        if not isinstance(path_raw, list):
            return ProofCheck(False, "consistency_path is not a list")
        path = [_hex_hash(p, "consistency_path element") for p in path_raw]
        if not verify_consistency(o_size, n_size, o_root, n_root, path):
            return ProofCheck(False, f"tree of size {n_size} is not proven to extend the tree of size {o_size}")
        return ProofCheck(True, "ok", origin=o_origin, tree_size=n_size, old_size=o_size)
    except NoteError as exc:
        return ProofCheck(False, f"checkpoint rejected: {exc}")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        return ProofCheck(False, f"malformed: {exc!r}")


__all__ = [
    "CONSISTENCY_PROOF_FORMAT",
    "EMPTY_ROOT",
    "ENTRY_FORMAT",
    "GENESIS_HASH",
    "INCLUSION_PROOF_FORMAT",
    "ChainHead",
    "ChainState",
    "EntryLike",
    "LedgerEntry",
    "ProofCheck",
    "VerifyReport",
    "audit_canonical_bytes",
    "audit_canonical_bytes_from_record",
    "audit_canonical_bytes_from_row",
    "audit_sha256",
    "build_consistency_proof_file",
    "build_inclusion_proof_file",
    "canonical_time",
    "chain",
    "check_checkpoint_event",
    "check_consistency_file",
    "check_proof_file",
    "checkpoint_due",
    "derived_id",
    "entry_bytes",
    "entry_bytes_of",
    "make_checkpoint",
    "tree_of",
    "verify_chain",
]
