"""Types of the C extension `domain._ledger_native` (source: domain/_ledger_native.c).

The audit ledger's per-record work for `audit verify` from the log; the pure-Python path
(`domain.ledger`, `ledgerflow.audit.from_log` + `verify`) is the reference it is held to.
A header is the 10-byte single-object header (C3 01 + fingerprint) of AuditRecorded v1 or
LedgerEntryChained v1, the writer schemas the C code reads.
"""

from collections.abc import Sequence
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
