from __future__ import annotations

import time
import uuid

from streams.ids import derived_uuid7, uuid7, uuid7_millis


def test_uuid7_is_version_7_and_time_ordered() -> None:
    ids = [uuid7(ms) for ms in (1_700_000_000_000, 1_700_000_000_001, 1_800_000_000_000)]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in ids)
    assert ids == sorted(ids)
    now = time.time_ns() // 1_000_000
    assert abs(uuid7_millis(uuid7()) - now) < 1000


def test_derived_ids_are_deterministic_distinct_and_keep_the_time() -> None:
    parent = uuid7(1_750_000_000_000)
    a, b = derived_uuid7(parent, "TokensCharged"), derived_uuid7(str(parent), "TokensCharged")
    c = derived_uuid7(parent, "AuditRecorded")
    assert a == b != c
    assert a.version == 7 and uuid7_millis(a) == 1_750_000_000_000
