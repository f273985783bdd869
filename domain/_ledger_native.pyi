"""Types of the C extension `domain._ledger_native` (source: domain/_ledger_native.c).

The audit ledger's per-record work for `audit verify` from the log (`LogVerifier`) and for the
chaining worker's fold (`ChainBatch`); the pure-Python paths (`domain.ledger`,
`ledgerflow.audit.from_log` + `verify`, `agents.ledger.LedgerWorker._chain_records`) are the
references they are held to.
A header is the 10-byte single-object header (C3 01 + fingerprint) of AuditRecorded v1 or
LedgerEntryChained v1, the writer schemas the C code reads.
"""

from collections.abc import Callable, Sequence
from typing import Any

def audit_canonical(value: bytes, header: bytes, /) -> bytes | None:
    """`domain.ledger.audit_canonical_bytes` of the record, or None if not handled exactly."""

def entry_fields(value: bytes, header: bytes, /) -> tuple[str, str, int, str, str, str, str, bytes] | None:
    """(envelope tenant, chain_tenant, seq, prev_hash, audit_event_id, audit_sha256, entry_hash,
    canonical entry bytes), or None if not handled exactly."""

def merkle_roots(leaf_hashes: bytes, sizes: Sequence[int], /) -> list[bytes]:
    """RFC 9162 roots of the first m of the 32-byte leaf hashes, for each m (ascending, 1..n)."""

class LogVerifier:
    """Audit and ledger records hashed batch by batch; sound chains and their Merkle roots."""

    def __init__(self, audit_header: bytes, entry_header: bytes) -> None: ...
    def add_audits(self, records: Sequence[Any], tenant: bytes | None = None) -> str | None:
        """Records: bytes values, or confluent-kafka Messages (errors and tombstones skipped;
        with `tenant`, only that Kafka key). Returns why the first record not handled was not."""

    def add_entries(self, records: Sequence[Any], tenant: bytes | None = None) -> str | None:
        """As add_audits, for the ledger topic's records."""

    def chains(self) -> list[tuple[str, int, bool]]:
        """(tenant, entries, sound) per chain, after every batch was added."""

    def roots(self, index: int, tenant: str, sizes: Sequence[int], /) -> list[bytes]:
        """Merkle roots of the sound chain in row `index` of `chains()` (whose tenant must be
        `tenant`) at ascending sizes (1..entries)."""

    @property
    def unhandled(self) -> str | None: ...
    @property
    def counts(self) -> tuple[int, int]: ...

# head_for's answer: the head object, size, last_hash, frontier, last offset chained from the
# partition (None: none), checkpoint_size, pending_since in µs since the epoch (None: none)
HeadState = tuple[Any, int, str, list[bytes], int | None, int, int | None]
# per ledger partition, in the order partitions first appear: its entries' values, keys, and
# (with `trace`) each audit record's trace_parent
Entries = tuple[int, list[bytes], list[bytes], list[str | None] | None]
# a head that got entries: (head, partition, size, last_hash, frontier, last_offset,
# last_event_id, last_occurred_us, pending_since_us)
HeadUpdate = tuple[Any, int, int, str, list[bytes], int, str, int, int]

class ChainBatch:
    """One batch of audit-topic records chained into LedgerEntryChained records, as
    `LedgerWorker._chain_records` does record by record (see the C source)."""

    def __init__(self, records: Sequence[Any], audit_header: bytes, entry_header: bytes) -> None:
        """Records: confluent-kafka Messages (value(), partition(), offset()) or
        (value, partition, offset) tuples; a value that is not bytes is left to Python."""

    @property
    def size(self) -> int: ...
    def run(
        self,
        start: int,
        head_for: Callable[[int, str], HeadState | bool | None],
        every_n: int,
        every_s: float,
        max_us: int,
        trace: bool,
        /,
    ) -> tuple[int, tuple[Any, int] | None, list[Entries], list[HeadUpdate]]:
        """Chain from `start`: (next, due, entries, heads). `due` (head, partition): that chain
        is due for a checkpoint after record next - 1; else next < size: record `next` is not
        handled (Python's turn), or next == size: the end. head_for(partition, tenant) is asked
        once per chain and run: None skips its records (a revoked partition), False leaves
        them to Python."""
