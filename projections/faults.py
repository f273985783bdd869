"""Injected store outages, for chaos tests: the sink's ClickHouse client stops answering for a while.

Why in the code at all: the embedded store is chDB, in the sink's own process, so there is no
network between them to cut (against a ClickHouse server a TCP proxy would do the same job).
An outage makes every call on the sink's client raise `StoreUnreachable`, exactly where a
dead server would make clickhouse-connect raise, so the sink's real back-pressure path runs:
partitions pause, memory stays bounded, inserts are retried and the backlog drains when the
outage ends. Off unless the process was started with `--allow-fault-injection`; the trigger
is an operator-only route (`POST /faults/store-outage?seconds=N`).
"""

from __future__ import annotations

import threading
import time
from typing import Any

MAX_OUTAGE_S = 600.0


class StoreUnreachable(ConnectionError):
    """What the sink sees during an injected outage."""


class StoreOutage:
    """When the current outage ends (monotonic clock); none by default."""

    def __init__(self) -> None:
        self._until = 0.0
        self._lock = threading.Lock()
        self.outages = 0
        self.refused_calls = 0

    def cut(self, seconds: float) -> float:
        """Start (or extend) an outage of `seconds`; returns when it ends, in seconds from now."""
        if not 0 < seconds <= MAX_OUTAGE_S:
            raise ValueError(f"an outage lasts more than 0 and at most {MAX_OUTAGE_S:.0f} seconds, got {seconds}")
        with self._lock:
            self._until = max(self._until, time.monotonic() + seconds)
            self.outages += 1
            return self._until - time.monotonic()

    @property
    def remaining(self) -> float:
        return max(0.0, self._until - time.monotonic())

    def check(self, what: str) -> None:
        left = self.remaining
        if left > 0:
            with self._lock:
                self.refused_calls += 1
            raise StoreUnreachable(f"ClickHouse unreachable (injected outage, {left:.1f}s left): {what}")


class OutageClient:
    """A clickhouse-connect client whose every method raises while an outage is on."""

    def __init__(self, client: Any, outage: StoreOutage) -> None:
        self._client = client
        self._outage = outage

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr) or name == "close":
            return attr

        def guarded(*args: Any, **kwargs: Any) -> Any:
            self._outage.check(name)
            return attr(*args, **kwargs)

        return guarded
