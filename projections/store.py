"""Opening the ClickHouse store: embedded chDB (`chdb:///path`) or a server (`http(s)://...`).

Why one function: every part of the read side (migrations, sink, SQL endpoint, tests) gets
its client the same way, so the embedded default and production differ only in the URL.

Threading: a clickhouse-connect client is used by one thread at a time here. The chDB
backend serializes calls on its handle with its own lock, and the HTTP client refuses
concurrent queries in one session; `LockedStore` makes the rule explicit for code that
shares one client between threads (the service gives the sink and the SQL endpoint each
their own client instead).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import unquote, urlparse

import clickhouse_connect
from clickhouse_connect.driver.client import Client

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_T = TypeVar("_T")


def check_identifier(name: str) -> str:
    """Database names are spliced into DDL, so only plain identifiers are accepted."""
    if not _IDENT.match(name):
        raise ValueError(f"not a plain identifier: {name!r} (use letters, digits and _)")
    return name


def open_store(url: str, database: str, *, readonly: bool = False, settings: dict[str, Any] | None = None) -> Client:
    """A client on `database` at `url`, creating the database if missing (unless `readonly`).

    `readonly=True` makes a session that can only read: readonly=1 is applied on the
    connection itself (chDB: SET on the handle; HTTP: a setting sent with every request),
    so a query's own `SETTINGS readonly=0` is refused by the engine.
    """
    check_identifier(database)
    extra: dict[str, Any] = dict(settings or {})
    if readonly:
        extra["readonly"] = 1
    if url.startswith("chdb:"):
        path = urlparse(url).path
        if not path:
            raise ValueError(f"use chdb:///absolute/path, got {url!r}")
        if not readonly:
            bootstrap = clickhouse_connect.get_client(dsn=f"chdb://{path}")
            try:
                bootstrap.command(f"CREATE DATABASE IF NOT EXISTS {database}")
            finally:
                bootstrap.close()
        return clickhouse_connect.get_client(dsn=f"chdb://{path}", database=database, settings=extra)
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ValueError(f"use chdb:///path or http(s)://[user:password@]host:port, got {url!r}")
    secure = parsed.scheme == "https"
    conn: dict[str, Any] = {
        "host": parsed.hostname,
        "port": parsed.port or (8443 if secure else 8123),
        "interface": parsed.scheme,
        "username": unquote(parsed.username) if parsed.username else "default",
        "password": unquote(parsed.password) if parsed.password else "",
        # Sessions serialize a client's queries server-side; our clients are per-thread
        # anyway, and without a session the SQL endpoint's reader can run queries in parallel.
        "autogenerate_session_id": False,
    }
    if not readonly:
        admin = clickhouse_connect.get_client(**conn)
        try:
            admin.command(f"CREATE DATABASE IF NOT EXISTS {database}")
        finally:
            admin.close()
    return clickhouse_connect.get_client(**conn, database=database, settings=extra)


class LockedStore:
    """A client plus a lock: every call holds the lock, so threads may share one client."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._lock = threading.Lock()

    @property
    def database(self) -> str | None:
        return self.client.database

    def command(
        self, cmd: str, parameters: dict[str, Any] | None = None, settings: dict[str, Any] | None = None
    ) -> Any:
        with self._lock:
            return self.client.command(cmd, parameters=parameters, settings=settings)

    def query_rows(self, query: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        with self._lock:
            return [tuple(r) for r in self.client.query(query, parameters=parameters).result_rows]

    def raw_query(self, query: str, parameters: dict[str, Any] | None = None) -> bytes:
        with self._lock:
            return self.client.raw_query(query, parameters=parameters)

    def insert(
        self,
        table: str,
        rows: Sequence[Sequence[Any]],
        column_names: Sequence[str],
        settings: dict[str, Any] | None = None,
    ) -> None:
        with self._lock:
            self.client.insert(table, rows, column_names=column_names, settings=settings)

    def call(self, fn: Callable[[Client], _T]) -> _T:
        """`fn(client)` under the lock, for calls the methods above do not cover (the sink's Avro inserts)."""
        with self._lock:
            return fn(self.client)

    def close(self) -> None:
        with self._lock:
            self.client.close()
