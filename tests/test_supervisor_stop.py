"""An interrupted `stop_all` (a test's timeout, a second Ctrl-C) must leave no child running."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from ledgerflow.supervisor import Child, Supervisor


def _sleeper(name: str, tmp_path: Path) -> Child:
    # ignores SIGTERM, so only a SIGKILL ends it
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"
    return Child(name, [sys.executable, "-c", code], tmp_path / f"{name}.log", env={})


def test_stop_all_interrupted_kills_the_rest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    children = [_sleeper("store", tmp_path), _sleeper("worker", tmp_path), _sleeper("gateway", tmp_path)]
    sup = Supervisor(children, tmp_path / "state.json")
    for c in children:
        c.start()

    def interrupted(self: Child, timeout: float = 15.0) -> None:
        raise KeyboardInterrupt  # what a timeout raises in the middle of the first stop

    monkeypatch.setattr(Child, "stop", interrupted)
    with pytest.raises(KeyboardInterrupt):
        sup.stop_all()
    assert [c.alive for c in children] == [False, False, False]
    assert all(c.proc is not None and c.proc.returncode == -9 for c in children)
