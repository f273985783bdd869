"""Dead-lettering from inside an agent: copy the record with why and where it came from."""

from __future__ import annotations

from datetime import UTC, datetime

import faust

from streams.deadletter import DeadLetter


async def dead_letter(event: faust.EventT[bytes], dead: faust.TopicT, agent: str, reason: str, detail: str) -> None:
    """Send the record to `dead` (attached to its source offset); the agent goes on with the next."""
    msg = event.message
    letter = DeadLetter(
        reason, detail, msg.topic, msg.partition, msg.offset, agent, datetime.now(UTC), msg.key, msg.value
    )
    await event.send(dead, key=msg.key, value=msg.value or b"", headers=letter.headers())
