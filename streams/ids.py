"""Time-ordered event ids (UUIDv7) and deterministic ids derived from them.

A fact re-sent after a retry must carry the same id so duplicates collapse downstream;
deriving a fact's id from its request id and its type gives that without coordination,
and keeping the request id's 48-bit millisecond prefix keeps the ids time-ordered.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid

_VERSION_7 = 0x7 << 76
_VARIANT = 0x2 << 62


def uuid7(ms: int | None = None) -> uuid.UUID:
    """A random UUIDv7 (RFC 9562) for `ms` milliseconds since the epoch (now by default)."""
    if ms is None:
        ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    return _assemble(ms, rand)


def derived_uuid7(parent: uuid.UUID | str, *parts: str) -> uuid.UUID:
    """A UUIDv7 with `parent`'s timestamp and bits hashed from (parent, parts): same input, same id."""
    parent_uuid = parent if isinstance(parent, uuid.UUID) else uuid.UUID(parent)
    ms = parent_uuid.int >> 80
    digest = hashlib.sha256("\x1f".join((str(parent_uuid), *parts)).encode()).digest()
    return _assemble(ms, int.from_bytes(digest[:10], "big"))


def uuid7_millis(value: uuid.UUID | str) -> int:
    """The millisecond timestamp a UUIDv7 carries."""
    u = value if isinstance(value, uuid.UUID) else uuid.UUID(value)
    return u.int >> 80


def _assemble(ms: int, rand80: int) -> uuid.UUID:
    rand_a = (rand80 >> 68) & 0xFFF  # 12 bits
    rand_b = rand80 & ((1 << 62) - 1)  # 62 bits
    value = ((ms & ((1 << 48) - 1)) << 80) | _VERSION_7 | (rand_a << 64) | _VARIANT | rand_b
    return uuid.UUID(int=value)
