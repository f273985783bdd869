"""Starts the platform's processes, restarts the ones that die, stops them all on request.

Each child is a plain `python -m <side>` process with its log in `<data_dir>/logs/`. The
supervisor records its own pid and its children's in `<data_dir>/run/up.json` so that
`ledgerflow down` and `ledgerflow status` from another shell can find them.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

RESTART_BACKOFF_MAX_S = 30.0


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    url: str = ""
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        out.close()
        self.started_at = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


@dataclass
class Supervisor:
    children: list[Child]
    state_file: Path
    extra_state: dict[str, object] = field(default_factory=dict)
    _stopping: bool = False

    def start_all(self) -> None:
        for child in self.children:
            child.start()
        self.write_state()

    def write_state(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "supervisor_pid": os.getpid(),
            "children": [
                {"name": c.name, "pid": c.proc.pid if c.proc else None, "url": c.url, "log": str(c.log)}
                for c in self.children
            ],
            **self.extra_state,
        }
        self.state_file.write_bytes(orjson.dumps(state, option=orjson.OPT_INDENT_2))

    def request_stop(self, *_: object) -> None:
        self._stopping = True

    def run(self, poll: float = 0.5) -> None:
        """Watch the children until asked to stop; restart a dead one with capped backoff."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        while not self._stopping:
            now = time.monotonic()
            for child in self.children:
                if child.alive or self._stopping:
                    continue
                if child.next_start == 0.0:
                    code = child.proc.returncode if child.proc else None
                    backoff = min(RESTART_BACKOFF_MAX_S, 2.0 ** min(child.restarts, 5))
                    print(
                        f"ledgerflow: {child.name} exited ({code}); restarting in {backoff:.0f}s, log: {child.log}",
                        file=sys.stderr,
                        flush=True,
                    )
                    child.next_start = now + backoff
                elif now >= child.next_start:
                    child.restarts += 1
                    child.next_start = 0.0
                    child.start()
                    self.write_state()
            time.sleep(poll)

    def stop_all(self) -> None:
        for child in reversed(self.children):  # gateway first, store owner last
            child.stop()
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()


def read_state(state_file: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(state_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
