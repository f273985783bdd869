"""Freeze today's event schemas as released versions in `schemas/fixtures/`.

For every schema in `schemas/avro/` that has no fixture yet, or differs from its latest
fixture (see `streams.evolution.difference`), write `schemas/fixtures/<Event>/v<N+1>.avsc`
(envelope inlined) and `v<N+1>.bin` (a deterministic, fully populated sample written with it).
A change that breaks the policy in `schemas/avro/EVOLUTION.md` is refused: nothing is written
and the problems are printed; such a change needs a new record name instead.

    .venv/bin/python scripts/freeze_schemas.py           # freeze what changed
    .venv/bin/python scripts/freeze_schemas.py --check   # exit 1 if anything would be frozen
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from streams.evolution import (
    FIXTURE_DIR,
    Fixture,
    breaking_changes,
    difference,
    encode,
    load_fixtures,
    resolve,
    sample_record,
)
from streams.schemas import SCHEMA_DIR, EventSchema, load_all


def compatibility_problems(schema: EventSchema, versions: list[Fixture]) -> list[str]:
    """Why `schema` cannot be released after `versions`: the static rules and resolution both ways."""
    problems = breaking_changes(versions[-1].raw, schema.raw)
    today = encode(schema, sample_record(schema))
    for old in versions:
        for label, data, writer, reader in (
            (f"v{old.version} data read by today's schema", old.sample, old.schema, schema),
            (f"today's data read by v{old.version}", today, schema, old.schema),
        ):
            if data is None:
                continue
            try:
                resolve(data, writer, reader)
            except Exception as exc:  # fastavro's resolution errors have no common base
                problems.append(f"{schema.name}: {label} fails: {type(exc).__name__}: {exc}")
    return problems


def plan(
    schemas: dict[str, EventSchema], fixtures: dict[str, list[Fixture]]
) -> tuple[list[tuple[str, int, str]], list[str]]:
    """(name, new version, why) to freeze, and problems that forbid freezing."""
    todo: list[tuple[str, int, str]] = []
    problems: list[str] = []
    for name, schema in sorted(schemas.items()):
        versions = fixtures.get(name, [])
        if not versions:
            todo.append((name, 1, "first release"))
            continue
        why = difference(schema.raw, versions[-1].raw)
        if why is None:
            continue
        broken = compatibility_problems(schema, versions)
        if broken:
            problems.extend(broken)
        else:
            todo.append((name, versions[-1].version + 1, why))
    return todo, problems


def write_version(schema: EventSchema, version: int, directory: Path) -> list[Path]:
    out = directory / schema.name
    out.mkdir(parents=True, exist_ok=True)
    avsc, sample = out / f"v{version}.avsc", out / f"v{version}.bin"
    avsc.write_text(json.dumps(schema.raw, indent=2, ensure_ascii=False) + "\n")
    sample.write_bytes(encode(schema, sample_record(schema)))
    return [avsc, sample]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a schema would be frozen")
    parser.add_argument("--schemas", type=Path, default=SCHEMA_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--fixtures", type=Path, default=FIXTURE_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    schemas = load_all(args.schemas)
    fixtures = load_fixtures(args.fixtures)
    todo, problems = plan(schemas, fixtures)
    gone = sorted(set(fixtures) - set(schemas))
    problems += [f"{name}: released but schemas/avro/{name}.avsc is gone; never remove an event" for name in gone]
    if problems:
        print("refusing to freeze: these changes break schemas/avro/EVOLUTION.md", file=sys.stderr)
        print("(a breaking change is a new record name, e.g. TokensChargedV2):", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        return 1
    if args.check:
        for name, version, why in todo:
            print(f"{name}: would freeze v{version} ({why})")
        return 1 if todo else 0
    for name, version, why in todo:
        for path in write_version(schemas[name], version, args.fixtures):
            print(f"wrote {path}")
        print(f"{name}: froze v{version} ({why})")
    if not todo:
        print("every schema matches its latest fixture; nothing to freeze")
    return 0


if __name__ == "__main__":
    sys.exit(main())
