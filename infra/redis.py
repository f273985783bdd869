"""Run a local Debian ``redis-server`` for tests and ``ledgerflow up``, without Docker.

Several gateway replicas share their rate-limit state through Redis.  This module runs a
throw-away server: no persistence (``--save ''``, ``--appendonly no``), bound to one
loopback address and port, working directory = the config's *home*.  The server is
launched detached (its own session) so it outlives the Python process that started it;
``start`` returns only once the server answers ``PING`` with ``PONG``; ``stop`` is
SIGTERM with a SIGKILL fallback.

The binary comes from Debian's package: ``apt-get install redis-server``.  (The package
also installs a systemd unit for the default port 6379; we never use that one.)

CLI: ``python -m infra.redis start|stop|status [--home H] [--port P] [--host A]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from infra.process import alive, children, cmdline, home_lock, port_open, read_pid

__all__ = [
    "DEFAULT_HOME",
    "DEFAULT_PORT",
    "RedisConfig",
    "RedisServerError",
    "is_running",
    "log_path",
    "main",
    "ping",
    "start",
    "stop",
]

REPO = Path(__file__).resolve().parents[1]
DEFAULT_HOME = REPO / ".ledgerflow" / "redis"
DEFAULT_PORT = 6390  # not 6379: leave the distribution's own service (if any) alone
_BINARY = "redis-server"
_TAIL_LINES = 20

# Servers launched by this interpreter, kept so we can reap them (no zombies that still
# look alive to kill(pid, 0)).


@dataclass(frozen=True)
class RedisConfig:
    """Where one local server lives and listens; one home directory == one server."""

    home: Path
    port: int = DEFAULT_PORT
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        """The ``redis://`` URL clients should use."""
        return f"redis://{self.host}:{self.port}/0"


class RedisServerError(RuntimeError):
    """A local redis-server could not be started or stopped; the message says what to do."""


def _absolute(cfg: RedisConfig) -> RedisConfig:
    return replace(cfg, home=cfg.home.resolve())


def log_path(cfg: RedisConfig) -> Path:
    """The server's log (its stdout: we run it with ``--logfile ''``)."""
    return _absolute(cfg).home / "redis.log"


def _pid_path(cfg: RedisConfig) -> Path:
    return cfg.home / "redis.pid"


def _require_binary() -> str:
    path = shutil.which(_BINARY)
    if path is None:
        raise RedisServerError(
            f"{_BINARY} not found on PATH: install it with `apt-get install redis-server` "
            "(Debian's package; Redis 5 or newer)"
        )
    return path


# ------------------------------------------------------------------- process state


def _read_pid(cfg: RedisConfig) -> int | None:
    return read_pid(_pid_path(cfg))


def _is_our_server(cfg: RedisConfig, pid: int) -> bool:
    """Guard against pid reuse: redis-server shows ``redis-server HOST:PORT`` as its title."""
    if not alive(pid):
        return False
    argv = cmdline(pid)
    if argv is None:
        return True  # no procfs: the pid file is all we have
    title = b" ".join(argv)
    return b"redis-server" in title and f":{cfg.port}".encode() in title


def _server_pid(cfg: RedisConfig) -> int | None:
    pid = _read_pid(cfg)
    if pid is not None and _is_our_server(cfg, pid):
        return pid
    return None


def ping(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if a Redis server on host:port answers ``PING`` with ``PONG`` (raw RESP, no client lib)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            reply = b""
            while not reply.endswith(b"\r\n") and len(reply) < 256:
                chunk = sock.recv(256)
                if not chunk:
                    break
                reply += chunk
            return reply.startswith(b"+PONG")
    except OSError:
        return False


def is_running(cfg: RedisConfig) -> bool:
    """True if this home's server process is alive and answers PING."""
    cfg = _absolute(cfg)
    return _server_pid(cfg) is not None and ping(cfg.host, cfg.port)


def _tail(path: Path, n: int = _TAIL_LINES) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").rstrip().splitlines()[-n:])
    except OSError:
        return ""


# ------------------------------------------------------------------------ control


def _command(binary: str, cfg: RedisConfig) -> list[str]:
    return [
        binary,
        "--port",
        str(cfg.port),
        "--bind",
        cfg.host,
        "--dir",
        str(cfg.home),
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--logfile",
        "",  # stdout, which we send to redis.log
        "--databases",
        "16",
    ]


def start(cfg: RedisConfig, timeout: float = 15.0) -> int:
    """Start this home's server (or adopt the one already running) and return its pid.

    Returns only once the server answers PING.  On failure nothing launched by this call is
    left running and the error carries the log tail.
    """
    binary = _require_binary()
    deadline = time.monotonic() + timeout
    cfg = _absolute(cfg)
    with home_lock(cfg.home):
        pid = _server_pid(cfg)
        if pid is not None:
            _wait_ready(cfg, pid, deadline)
            return pid
        _pid_path(cfg).unlink(missing_ok=True)
        if port_open(cfg.host, cfg.port):
            raise RedisServerError(
                f"{cfg.host}:{cfg.port} is already in use by a process that is not the redis-server "
                f"of {cfg.home}: stop it, or choose another port (--port)"
            )
        with log_path(cfg).open("ab") as out:
            proc = subprocess.Popen(
                _command(binary, cfg),
                cwd=cfg.home,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survive our exit and our terminal's Ctrl-C
                close_fds=True,
            )
        children[proc.pid] = proc
        tmp = _pid_path(cfg).with_suffix(".pid.tmp")
        tmp.write_text(f"{proc.pid}\n")
        os.replace(tmp, _pid_path(cfg))
        try:
            _wait_ready(cfg, proc.pid, deadline)
        except BaseException:
            with contextlib.suppress(RedisServerError):
                _terminate(cfg, proc.pid, timeout=5.0)
            raise
        return proc.pid


def _wait_ready(cfg: RedisConfig, pid: int, deadline: float) -> None:
    while True:
        if not alive(pid):
            child = children.get(pid)
            code = f" with code {child.returncode}" if child is not None else ""
            raise RedisServerError(
                f"redis-server (pid {pid}) exited{code} during startup (port in use? bad --dir?); "
                f"last lines of {log_path(cfg)}:\n{_tail(log_path(cfg))}"
            )
        if ping(cfg.host, cfg.port):
            return
        if time.monotonic() >= deadline:
            raise RedisServerError(
                f"redis-server (pid {pid}) did not answer PING on {cfg.host}:{cfg.port} in time; "
                f"last lines of {log_path(cfg)}:\n{_tail(log_path(cfg))}"
            )
        time.sleep(0.02)


def _terminate(cfg: RedisConfig, pid: int, timeout: float) -> None:
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            break
        end = time.monotonic() + wait
        while alive(pid) and time.monotonic() < end:
            time.sleep(0.02)
        if not alive(pid):
            break
    if alive(pid):
        raise RedisServerError(f"redis-server pid {pid} survived SIGKILL; check `ps -p {pid}`")
    child = children.pop(pid, None)
    if child is not None:
        child.wait()  # reap
    _pid_path(cfg).unlink(missing_ok=True)


def stop(cfg: RedisConfig, timeout: float = 10.0) -> bool:
    """Stop this home's server; True if one was running.  Safe to call when stopped."""
    cfg = _absolute(cfg)
    if not cfg.home.is_dir():
        return False
    with home_lock(cfg.home):
        pid = _server_pid(cfg)
        if pid is None:
            _pid_path(cfg).unlink(missing_ok=True)
            return False
        _terminate(cfg, pid, timeout)
        return True


# ---------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    """``start`` / ``stop`` / ``status`` for a local redis-server; exit 0 on success (status: running)."""
    parser = argparse.ArgumentParser(
        prog="python -m infra.redis",
        description="Run a local redis-server (no persistence) for ledgerflow development and tests.",
    )
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--home", type=Path, default=DEFAULT_HOME, help="server working dir")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="listen port")
    parser.add_argument("--host", default="127.0.0.1", help="listen address")
    args = parser.parse_args(argv)
    cfg = RedisConfig(home=args.home.resolve(), port=args.port, host=args.host)
    try:
        if args.command == "start":
            pid = start(cfg)
            print(f"redis ready on {cfg.url} (pid {pid}); log: {log_path(cfg)}")
            return 0
        if args.command == "stop":
            old = _read_pid(cfg)
            print(f"redis stopped (pid {old})" if stop(cfg) else f"redis was not running (home {cfg.home})")
            return 0
        if is_running(cfg):
            print(f"redis running on {cfg.url} (pid {_read_pid(cfg)})")
            return 0
        print(f"redis not running (home {cfg.home})")
        return 1
    except RedisServerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
