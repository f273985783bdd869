"""Versioned DDL for the projections: `migrations/NNNN_name.sql`, applied in order at start.

Why versioned files and checksums: ClickHouse tables outlive the code that made them, so a
schema change must be a new file that every deployment applies exactly once. Each applied
file is recorded in `schema_migrations` (version, name, checksum, applied_at); if a file
that was already applied has since been edited, start is refused, because the database no
longer matches what the file says and silently continuing would hide the drift.

`{db}` in a file is replaced by the (identifier-checked) database name. ClickHouse DDL is not
transactional: a file is recorded only after all its statements succeeded, so every
statement must be re-runnable (`IF NOT EXISTS`) for a half-applied file to be retried.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from clickhouse_connect.driver.client import Client

from projections.sqlguard import split_statements
from projections.store import check_identifier

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
MIGRATIONS_TABLE = "schema_migrations"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


class MigrationError(RuntimeError):
    """The database and the migration files disagree; the message says which file and how."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str
    checksum: str  # sha256 hex of the file bytes

    def statements(self, database: str) -> list[str]:
        return split_statements(self.sql.replace("{db}", check_identifier(database)))


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Every migration file in `directory`, by version; duplicate versions are an error."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        m = _FILE.match(path.name)
        if not m:
            raise MigrationError(f"{path.name}: migration files are named NNNN_lower_snake.sql")
        version = int(m.group(1))
        if version in found:
            raise MigrationError(f"{path.name}: version {version} is already used by {found[version].name}")
        data = path.read_bytes()
        found[version] = Migration(version, m.group(2), data.decode(), hashlib.sha256(data).hexdigest())
    return [found[v] for v in sorted(found)]


def applied(client: Client, database: str) -> dict[int, tuple[str, str]]:
    """version → (name, checksum) of what `database` has applied (empty if never migrated)."""
    check_identifier(database)
    client.command(
        f"CREATE TABLE IF NOT EXISTS {database}.{MIGRATIONS_TABLE} "
        "(version UInt32, name String, checksum String, applied_at DateTime64(3, 'UTC')) "
        "ENGINE = MergeTree ORDER BY version"
    )
    rows = client.query(
        f"SELECT version, any(name), any(checksum) FROM {database}.{MIGRATIONS_TABLE} GROUP BY version"
    ).result_rows
    return {int(v): (str(n), str(c)) for v, n, c in rows}


def migrate(client: Client, database: str, directory: Path = MIGRATIONS_DIR) -> list[int]:
    """Apply every pending migration to `database`; return the versions applied now.

    Raises MigrationError before touching anything if an applied file's checksum changed.
    """
    migrations = discover(directory)
    done = applied(client, database)
    known = {m.version for m in migrations}
    for m in migrations:
        if m.version in done and done[m.version][1] != m.checksum:
            raise MigrationError(
                f"migration {m.version:04d}_{m.name}.sql was edited after it was applied to {database!r} "
                f"(recorded checksum {done[m.version][1][:12]}…, file now {m.checksum[:12]}…): "
                "restore the file and put the change in a new migration"
            )
    unknown = sorted(set(done) - known)
    if unknown:
        # A newer release migrated this database; inserts name their columns, so an older
        # sink still works for additive changes. Say so rather than refuse.
        log.warning("database %s has migrations this code does not know: %s", database, unknown)
    now_applied: list[int] = []
    for m in migrations:
        if m.version in done:
            continue
        for stmt in m.statements(database):
            client.command(stmt)
        client.insert(
            MIGRATIONS_TABLE,
            [[m.version, m.name, m.checksum, datetime.now(UTC)]],
            column_names=["version", "name", "checksum", "applied_at"],
            database=database,
        )
        log.info("applied migration %04d_%s to %s", m.version, m.name, database)
        now_applied.append(m.version)
    return now_applied
