"""Dead-letter records: the original bytes plus why and where they came from.

A poison record never stops a consumer: it is copied to `<topic>.dlq` with headers naming
the reason and the source coordinates, and the consumer moves on. Redrive reads these back.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

HEADER_REASON = "lf.dlq.reason"
HEADER_DETAIL = "lf.dlq.detail"
HEADER_TOPIC = "lf.dlq.source.topic"
HEADER_PARTITION = "lf.dlq.source.partition"
HEADER_OFFSET = "lf.dlq.source.offset"
HEADER_FIRST_SEEN = "lf.dlq.first_seen"
HEADER_CONSUMER = "lf.dlq.consumer"


@dataclass(frozen=True)
class DeadLetter:
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int
    consumer: str
    first_seen: datetime
    key: bytes | None
    value: bytes | None

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            (HEADER_REASON, self.reason.encode()),
            (HEADER_DETAIL, self.detail[:2000].encode()),
            (HEADER_TOPIC, self.topic.encode()),
            (HEADER_PARTITION, str(self.partition).encode()),
            (HEADER_OFFSET, str(self.offset).encode()),
            (HEADER_FIRST_SEEN, self.first_seen.isoformat().encode()),
            (HEADER_CONSUMER, self.consumer.encode()),
        ]

    @classmethod
    def from_headers(
        cls, headers: list[tuple[str, bytes]] | None, key: bytes | None, value: bytes | None
    ) -> DeadLetter:
        h = {k: v.decode(errors="replace") for k, v in (headers or [])}
        return cls(
            reason=h.get(HEADER_REASON, "unknown"),
            detail=h.get(HEADER_DETAIL, ""),
            topic=h.get(HEADER_TOPIC, ""),
            partition=int(h.get(HEADER_PARTITION, "-1")),
            offset=int(h.get(HEADER_OFFSET, "-1")),
            consumer=h.get(HEADER_CONSUMER, ""),
            first_seen=datetime.fromisoformat(h[HEADER_FIRST_SEEN]) if HEADER_FIRST_SEEN in h else datetime.now(UTC),
            key=key,
            value=value,
        )
