"""`ledgerflow dlq list | show ID | redrive [ID ...|--all] [--dry-run]`.

Dead letters are read straight from the `<topic>.dlq` topics. Re-drive puts a record back on
its source topic once the fix that makes it decodable is deployed (the check uses this
process's codec, i.e. today's schemas); records that still do not decode stay put.
"""

from __future__ import annotations

from ledgerflow.settings import Settings
from streams.codec import Codec, PoisonEvent
from streams.deadletter import StoredLetter, read_dlq, redrive
from streams.topics import Topics


def _topics(settings: Settings) -> Topics:
    return Topics(settings.topic_prefix, settings.partitions)


def letters(settings: Settings) -> list[StoredLetter]:
    topics = _topics(settings)
    return read_dlq(settings.bootstrap, [topics.dlq(t) for t in topics.all()])


def cmd_list(settings: Settings) -> int:
    found = letters(settings)
    if not found:
        print("no dead letters.")
        return 0
    print(f"{'id':<44} {'reason':<28} {'consumer':<20} {'source':<40} first seen")
    for s in found:
        dl = s.letter
        source = f"{dl.topic}[{dl.partition}]@{dl.offset}"
        print(f"{s.id:<44} {dl.reason:<28} {dl.consumer:<20} {source:<40} {dl.first_seen:%Y-%m-%d %H:%M:%S}")
    return 0


def cmd_show(settings: Settings, letter_id: str) -> int:
    found = {s.id: s for s in letters(settings)}
    stored = found.get(letter_id)
    if stored is None:
        print(f"no dead letter {letter_id!r}; `ledgerflow dlq list` shows the ids")
        return 1
    dl = stored.letter
    value = dl.value or b""
    for name, val in [
        ("id", stored.id), ("reason", dl.reason), ("detail", dl.detail), ("consumer", dl.consumer),
        ("source", f"{dl.topic} partition {dl.partition} offset {dl.offset}"),
        ("first seen", dl.first_seen.isoformat()),
        ("key", (dl.key or b"").decode(errors="replace")), ("value bytes", str(len(value))),
    ]:  # fmt: skip
        print(f"{name + ':':<12} {val}")
    print("value (hex, first 256 bytes):")
    for i in range(0, min(len(value), 256), 32):
        print(f"  {i:04x}  {value[i : i + 32].hex(' ')}")
    return 0


def cmd_redrive(settings: Settings, ids: list[str], all_: bool, dry_run: bool) -> int:
    found = letters(settings)
    if not all_:
        wanted = set(ids)
        unknown = wanted - {s.id for s in found}
        if unknown:
            print(f"unknown dead letter ids: {', '.join(sorted(unknown))}; `ledgerflow dlq list` shows them")
            return 1
        found = [s for s in found if s.id in wanted]
    if not found:
        print("nothing to re-drive.")
        return 0
    topics = _topics(settings)
    codec = Codec()

    def check(value: bytes | None) -> str | None:
        try:
            codec.decode(value)
        except PoisonEvent as exc:
            return str(exc)
        return None

    results = redrive(settings.bootstrap, found, topics.redrives(), check, dry_run=dry_run)
    for r in results:
        print(f"{r.outcome:<17} {r.source_key:<44} {', '.join(r.ids)}  {r.detail}")
    return 0 if all(r.outcome != "still-poison" for r in results) else 3
