"""Dead-letter records: the original bytes plus why and where they came from.

A poison record never stops a consumer: it is copied to `<topic>.dlq` with headers naming
the reason and the source coordinates, and the consumer moves on. Redrive reads these back.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from confluent_kafka import Message

from streams.admin import read_to_end
from streams.clients import Producer

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


# --- reading and re-driving ---------------------------------------------------------------


@dataclass(frozen=True)
class StoredLetter:
    """A dead letter as it sits in a `.dlq` topic; `id` is what the CLI shows and takes."""

    dlq_topic: str
    dlq_offset: int
    letter: DeadLetter

    @property
    def id(self) -> str:
        return f"{self.dlq_topic}@{self.dlq_offset}"

    @property
    def source_key(self) -> str:
        """The source record's coordinates: several consumers may dead-letter the same record."""
        return f"{self.letter.topic}:{self.letter.partition}:{self.letter.offset}"


@dataclass(frozen=True)
class RedriveResult:
    source_key: str
    ids: tuple[str, ...]
    outcome: str  # redriven | already-redriven | still-poison | dry-run
    detail: str = ""


def read_dlq(bootstrap: str, dlq_topics: list[str], timeout: float = 10.0) -> list[StoredLetter]:
    """Every dead letter in `dlq_topics`, oldest first (reads to the end, commits nothing)."""
    out: list[StoredLetter] = []
    for _topic, _offset, msg in read_to_end(bootstrap, dlq_topics, timeout):
        letter = DeadLetter.from_headers(_headers(msg), msg.key(), msg.value())
        out.append(StoredLetter(msg.topic() or "", msg.offset() or 0, letter))
    return out


def redriven(bootstrap: str, redrive_topic: str, timeout: float = 10.0) -> dict[str, str]:
    """source_key → when it was re-driven, from the compacted redrive topic."""
    return {
        (msg.key() or b"").decode(): (msg.value() or b"").decode()
        for _t, _o, msg in read_to_end(bootstrap, [redrive_topic], timeout)
        if msg.value() is not None
    }


def redrive(
    bootstrap: str,
    letters: list[StoredLetter],
    redrive_topic: str,
    check: Callable[[bytes | None], str | None],
    *,
    dry_run: bool = False,
    timeout: float = 30.0,
) -> list[RedriveResult]:
    """Put dead-lettered records back on their source topic, once per source record.

    `check(value)` returns None when the record now decodes (the fix is deployed) or the
    reason it still does not; such records stay where they are. Each re-driven record and
    its marker in `redrive_topic` are written in one transaction, so a record is re-driven
    at most once however often the command runs, and the original bytes stay in the DLQ.
    """
    done = redriven(bootstrap, redrive_topic, timeout)
    groups: dict[str, list[StoredLetter]] = {}
    for stored in letters:
        groups.setdefault(stored.source_key, []).append(stored)
    results: list[RedriveResult] = []
    todo: list[tuple[str, StoredLetter]] = []
    for key, group in groups.items():
        ids = tuple(s.id for s in group)
        if key in done:
            results.append(RedriveResult(key, ids, "already-redriven", done[key]))
            continue
        reason = check(group[0].letter.value)
        if reason is not None:
            results.append(RedriveResult(key, ids, "still-poison", reason))
        elif dry_run:
            results.append(RedriveResult(key, ids, "dry-run"))
        else:
            todo.append((key, group[0]))
    if todo:
        producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"ledgerflow-redrive-{uuid.uuid4()}"})
        producer.init_transactions(timeout)
        producer.begin_transaction()
        at = datetime.now(UTC).isoformat()
        for key, stored in todo:
            letter = stored.letter
            producer.produce(
                letter.topic,
                key=letter.key,
                value=letter.value,
                headers=[("lf.redriven_from", stored.id.encode()), ("lf.redriven_at", at.encode())],
            )
            producer.produce(redrive_topic, key=key.encode(), value=at.encode())
        producer.commit_transaction(timeout)
        results.extend(RedriveResult(key, tuple(s.id for s in groups[key]), "redriven", at) for key, _ in todo)
    return results


def _headers(msg: Message) -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for pair in msg.headers() or []:
        key, value = pair[0], pair[1]
        out.append((str(key), value.encode() if isinstance(value, str) else bytes(value or b"")))
    return out
