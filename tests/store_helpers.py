"""Scratch ClickHouse databases for tests that compare two ways of landing the same records."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from clickhouse_connect.driver.client import Client

from projections.migrations import migrate
from projections.store import open_store


@contextmanager
def migrated_databases(chdb_url: str, *suffixes: str) -> Iterator[list[Client]]:
    """One freshly migrated database per suffix (under one random name), dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:10]}"
    clients = []
    try:
        for suffix in suffixes:
            client = open_store(chdb_url, f"{name}_{suffix}")
            migrate(client, client.database)
            clients.append(client)
        yield clients
    finally:
        for client in clients:
            client.command(f"DROP DATABASE IF EXISTS {client.database}")
            client.close()
