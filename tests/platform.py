"""Runs the whole platform for a test: the real processes `ledgerflow up` starts, on a shared broker.

Each platform gets its own topic prefix, consumer groups, ports, data directory and chDB
path, so tests cannot see each other's data.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from ledgerflow.cli import children, query_text, state_file, wait_ready
from ledgerflow.settings import Settings, load
from ledgerflow.supervisor import Child, Supervisor
from streams.admin import ensure_topics
from streams.topics import Topics
from tests.conftest import free_port


@dataclass
class Platform:
    settings: Settings
    supervisor: Supervisor

    def child(self, name: str) -> Child:
        return next(c for c in self.supervisor.children if c.name == name)

    def sql(self, query: str) -> list[list[str]]:
        text = query_text(self.settings, query, "TabSeparated")
        return [line.split("\t") for line in text.splitlines() if line]

    def scalar(self, query: str) -> str:
        return self.sql(query)[0][0]

    @property
    def topics(self) -> Topics:
        return Topics(self.settings.topic_prefix, self.settings.partitions)


def platform_env(bootstrap: str, data_dir: Path) -> dict[str, str]:
    run = uuid.uuid4().hex[:8]
    return {
        "LEDGERFLOW_KAFKA_BOOTSTRAP": bootstrap,
        "LEDGERFLOW_DATA_DIR": str(data_dir),
        "LEDGERFLOW_TOPIC_PREFIX": f"e2e{run}.",
        "LEDGERFLOW_PARTITIONS": "3",
        "LEDGERFLOW_GATEWAY_PORT": str(free_port()),
        "LEDGERFLOW_PROJECTIONS_PORT": str(free_port()),
        "LEDGERFLOW_WORKER_WEB_PORT": str(free_port()),
        "LEDGERFLOW_WORKER_ID": f"agents-{run}",
        "LEDGERFLOW_SINK_GROUP": f"sink-{run}",
        "LEDGERFLOW_GATEWAY_INSTANCE_ID": f"gw-{run}",
        "LEDGERFLOW_SINK_BATCH_MS": "100",
        # Checkpoints by count only: a wall-clock checkpoint of a quiet chain would add rows
        # to the live database in the middle of a replay-vs-live comparison.
        "LEDGERFLOW_LEDGER_CHECKPOINT_INTERVAL_S": "86400",
        "LEDGERFLOW_LEDGER_CHECKPOINT_EVERY": "10",
        # Off for the same reason (the lag sampler writes consumer_lag every few seconds), and no
        # fixed /metrics ports that parallel platforms would fight over (tests/test_metrics_kafka.py).
        "LEDGERFLOW_LAG_SAMPLE_INTERVAL_S": "0",
        "LEDGERFLOW_AGENT_METRICS_PORT": "0",
    }


@contextmanager
def running_platform(monkeypatch: pytest.MonkeyPatch, bootstrap: str, data_dir: Path) -> Iterator[Platform]:
    for key, value in platform_env(bootstrap, data_dir).items():
        monkeypatch.setenv(key, value)
    settings = load()
    ensure_topics(settings.bootstrap, Topics(settings.topic_prefix, settings.partitions))
    sup = Supervisor(children(settings), state_file(settings))
    try:
        sup.start_all()
        wait_ready(sup)
        yield Platform(settings, sup)
    finally:
        sup.stop_all()
