"""Small real-broker helpers for tests: read a topic to its end."""

from __future__ import annotations

import time
import uuid

from confluent_kafka import Consumer, Message


def read_all(bootstrap: str, topics: list[str], expect: int, timeout: float = 30.0) -> list[Message]:
    """Every committed record of `topics` from the beginning; waits until `expect` arrived (or timeout)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    consumer.subscribe(topics)
    out: list[Message] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                if len(out) >= expect:
                    break
                continue
            if msg.error():
                continue
            out.append(msg)
        return out
    finally:
        consumer.close()
