"""Starts the platform's processes, restarts the ones that die, stops them all on request.

Each child is a plain `python -m <side>` process with its log in `<data_dir>/logs/`. The
supervisor records its own pid and its children's in `<data_dir>/run/up.json` so that
`ledgerflow down` and `ledgerflow status` from another shell can find them.

Scaling: a `Pool` of numbered children (`agents-0`, `agents-1`, ...) is resized from a small
control file (`<data_dir>/run/scale.json`, written by `ledgerflow scale`) that the
supervisor reads on every loop; a file rather than a signal or socket, so a CLI in another
shell needs no connection to the supervisor and the desired count survives in one place.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
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
    metrics: str = ""  # its Prometheus /metrics URL, if it serves one (issue 11)
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

    def kill(self) -> None:
        """SIGKILL at once (no-op when not running): the last resort of an interrupted stop."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(5)


@dataclass
class Pool:
    """Numbered copies of one process (`<prefix>-<i>`), resized by the `key` in the control file.

    `make(i)` builds child i (its own data directory and port are the caller's business). On
    shrink the highest-numbered children stop first, so the survivors keep their numbers,
    data directories and ports.
    """

    prefix: str
    key: str
    make: Callable[[int], Child]
    initial: int = 1

    def owns(self, name: str) -> bool:
        head, _, tail = name.rpartition("-")
        return head == self.prefix and tail.isdigit()


def read_scale(control_file: Path) -> dict[str, int]:
    """Desired counts from the control file; {} when it is missing or unreadable."""
    try:
        data = json.loads(control_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, int) and v >= 0}


def write_scale(control_file: Path, key: str, count: int) -> None:
    """Set one desired count, atomically (the supervisor may read at any moment)."""
    control_file.parent.mkdir(parents=True, exist_ok=True)
    data: dict[str, int] = {**read_scale(control_file), key: count}
    tmp = control_file.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(orjson.dumps(data))
    tmp.replace(control_file)


@dataclass
class Supervisor:
    children: list[Child]
    state_file: Path
    extra_state: dict[str, object] = field(default_factory=dict)
    pools: list[Pool] = field(default_factory=list)
    control_file: Path | None = None
    _stopping: bool = False

    def pool_children(self, pool: Pool) -> list[Child]:
        return sorted((c for c in self.children if pool.owns(c.name)), key=lambda c: int(c.name.rpartition("-")[2]))

    def init_pools(self) -> None:
        """Add each pool's initial children (before `start_all`) and record the counts as desired."""
        for pool in self.pools:
            if not self.pool_children(pool):
                self._insert(pool, [pool.make(i) for i in range(pool.initial)])
            if self.control_file is not None:
                write_scale(self.control_file, pool.key, len(self.pool_children(pool)))

    def _insert(self, pool: Pool, new: list[Child]) -> None:
        """Place new pool members after the existing ones, keeping the start/stop order."""
        members = [i for i, c in enumerate(self.children) if pool.owns(c.name)]
        at = members[-1] + 1 if members else len(self.children)
        self.children[at:at] = new

    def apply_scale(self) -> bool:
        """Start or stop pool members to match the control file; True if anything changed."""
        if self.control_file is None or not self.pools:
            return False
        desired = read_scale(self.control_file)
        changed = False
        for pool in self.pools:
            want = desired.get(pool.key)
            current = self.pool_children(pool)
            if want is None or want == len(current):
                continue
            if want > len(current):
                new = [pool.make(i) for i in range(len(current), want)]
                self._insert(pool, new)
                for child in new:
                    child.start()
                print(f"ledgerflow: scaled {pool.key} to {want} (started {', '.join(c.name for c in new)})", flush=True)
            else:
                gone = current[want:]
                for child in reversed(gone):  # highest-numbered first
                    child.stop()
                    self.children.remove(child)
                print(
                    f"ledgerflow: scaled {pool.key} to {want} (stopped {', '.join(c.name for c in gone)})", flush=True
                )
            changed = True
        if changed:
            self.write_state()
        return changed

    def start_all(self) -> None:
        for child in self.children:
            child.start()
        self.write_state()

    def write_state(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "supervisor_pid": os.getpid(),
            "children": [
                {
                    "name": c.name,
                    "pid": c.proc.pid if c.proc else None,
                    "url": c.url,
                    "log": str(c.log),
                    "metrics": c.metrics,
                }
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
            self.apply_scale()
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
        try:
            for child in reversed(self.children):  # gateway first, store owner last
                child.stop()
        finally:  # interrupted (a test's timeout, Ctrl-C twice): leave no orphan behind
            for child in self.children:
                child.kill()
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        if self.control_file is not None:  # a stale count must not resize the next `up`
            self.control_file.unlink(missing_ok=True)


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
