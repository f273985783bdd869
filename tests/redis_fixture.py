"""Redis fixtures: a real Debian ``redis-server`` started by the test itself.

Only the binary is needed (``apt-get install redis-server``); each server runs from a
temporary directory on a free loopback port, without persistence.  Set
LEDGERFLOW_TEST_REDIS_URL to use a server that is already running instead of the
session one (tests use unique tenant names, so sharing is safe).

Import the fixtures into a test module: ``from tests.redis_fixture import redis_url``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.redis import RedisConfig, RedisServerError, start, stop
from tests.conftest import free_port

__all__ = ["free_port", "redis_server", "redis_url", "start_private_redis"]


def start_private_redis(home: Path, attempts: int = 3) -> RedisConfig:
    """Start a redis-server in ``home`` on a free port (retrying if the port was taken meanwhile)."""
    last: RedisServerError | None = None
    for _ in range(attempts):
        cfg = RedisConfig(home=home, port=free_port())
        try:
            start(cfg)
            return cfg
        except RedisServerError as exc:
            if "not found on PATH" in str(exc):
                raise
            last = exc
    assert last is not None
    raise last


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """URL of one redis-server shared by the whole session."""
    existing = os.environ.get("LEDGERFLOW_TEST_REDIS_URL")
    if existing:
        yield existing
        return
    cfg = start_private_redis(tmp_path_factory.mktemp("redis"))
    try:
        yield cfg.url
    finally:
        stop(cfg)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisConfig]:
    """A redis-server of this test's own, which the test may stop and restart (same port)."""
    cfg = start_private_redis(tmp_path / "redis")
    try:
        yield cfg
    finally:
        stop(cfg)
