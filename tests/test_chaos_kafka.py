"""Issue 10's chaos test, shortened for CI: SIGKILLs, a broker restart and a store outage
during a run, then 0 lost, 0 doubled, totals = charges, the ledger verifies and a replay
of the log equals the live projections. The full 100k-event run is `bench/chaos.py`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.chaos import ChaosPlan, run
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.kafka


@pytest.mark.timeout(900)
def test_chaos_short_run_loses_and_doubles_nothing(tmp_path: Path) -> None:
    plan = ChaosPlan(
        requests=1_500,  # 6,000 events
        tenants=4,
        produce_s=30.0,
        kill_every_s=4.0,
        outage_s=8.0,
        outage_at_s=3.0,
        broker_restart_at_s=15.0,
        converge_timeout_s=240.0,
    )
    ports = (free_port(), free_port(), free_port(), free_port(), free_port())
    lines: list[str] = []

    def log(line: str) -> None:  # printed too: pytest shows it even when the timeout ends the test
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        lines.append(stamped)
        print(stamped, flush=True)

    report = run(plan, tmp_path, REPO / ".cache" / "kafka", ports, log=log)
    summary = report.render() + "\n" + "\n".join(lines)
    assert report.nemesis_error is None, summary
    assert not report.produce_errors, summary  # the harness's own producer lost nothing
    assert sum(report.kills.values()) >= 3, summary
    assert report.broker_restarts == 1, summary
    assert report.outage_refused_calls > 0, summary  # the sink really met the outage
    assert report.lost == 0 and report.doubled == 0, summary
    assert report.dead_letters == 0, summary
    assert not report.totals_disagree, summary
    assert report.ledger_verify_rc == 0, summary + report.ledger_verify_out
    assert report.replay_check_rc == 0, summary + report.replay_check_out
