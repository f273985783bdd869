"""`ledgerflow replay --into DB [--since T] [--tables t1,t2] [--replace]` and `ledgerflow replay --check --into DB`.

Why the rebuild runs in the projections service and not here: in embedded mode chDB lets one
process own the store, so the CLI only asks the service to start the job (`POST /replay`),
then polls `GET /replay/status` and draws one progress line on stderr (`\\r` updates). The
check is a read-only SQL query (built by `projections.replay`), sent like any other query:
through the service's SQL endpoint in embedded mode, straight to a ClickHouse server
otherwise. Ctrl-C while a replay runs cancels it (`DELETE /replay`).
"""

from __future__ import annotations

import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO

import orjson

from ledgerflow import readside
from ledgerflow.settings import Settings
from projections.replay import BadReplayRequest, check, parse_since, parse_tables

ACTIVE = ("pending", "running")


class ReplayError(RuntimeError):
    """A replay that could not start or did not finish; `code` is the exit status."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def call(settings: Settings, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One JSON request to the projections service; ReplayError with the service's message otherwise."""
    data = orjson.dumps(body) if body is not None else None
    req = urllib.request.Request(
        f"{settings.projections_url}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **readside.auth_headers(settings)},
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return dict(orjson.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            message = str(orjson.loads(raw).get("error") or raw.decode(errors="replace"))
        except orjson.JSONDecodeError:
            message = raw.decode(errors="replace").strip() or exc.reason
        raise ReplayError(message, code=2 if exc.code == 400 else 1) from None
    except urllib.error.URLError as exc:
        raise ReplayError(
            f"projections service not reachable at {settings.projections_url} ({exc.reason}); "
            "is `ledgerflow up` running?"
        ) from None


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    s = round(seconds)
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m:02d}:{sec:02d}"


def progress_line(status: dict[str, Any], width: int = 28) -> str:
    """One line: bar, percentage, offsets, rate and ETA (pure, for the `\\r` redraw)."""
    total, done = int(status.get("total") or 0), int(status.get("done") or 0)
    finished = 1.0 if status.get("state") == "done" else 0.0
    frac = min(done / total, 1.0) if total else finished
    filled = int(frac * width)
    bar = "#" * filled + "-" * (width - filled)
    rate = float(status.get("rate_per_s") or 0.0)
    return (
        f"replay -> {status.get('into')} [{bar}] {frac * 100:5.1f}%  {done:,}/{total:,} offsets  "
        f"{rate:,.0f}/s  ETA {_duration(status.get('eta_s'))}  {status.get('phase', '')}"
    )


class _Line:
    """Redraws one line on a stream with `\\r`, blanking what a longer previous line left behind."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.width = 0

    def draw(self, text: str) -> None:
        self.out.write("\r" + text + " " * max(0, self.width - len(text)))
        self.out.flush()
        self.width = len(text)

    def end(self) -> None:
        if self.width:
            self.out.write("\n")
            self.out.flush()
            self.width = 0


def summary(status: dict[str, Any]) -> str:
    """What a finished replay did, with its rows per second."""
    started, finished = status.get("started_at"), status.get("finished_at")
    elapsed = (
        (datetime.fromisoformat(finished) - datetime.fromisoformat(started)).total_seconds()
        if started and finished
        else 0.0
    )
    rows = int(status.get("rows") or 0) + int(status.get("dead_letters") or 0)
    rate = rows / elapsed if elapsed > 0 else 0.0
    return (
        f"replayed {status.get('done', 0):,} offsets into {status.get('into')}: {status.get('rows', 0):,} rows"
        f" + {status.get('dead_letters', 0):,} dead letters in {elapsed:.1f} s ({rate:,.0f} rows/s); "
        f"tables {', '.join(status.get('tables') or [])}"
    )


def run(
    settings: Settings,
    into: str,
    tables: str | None = None,
    since: str | None = None,
    replace: bool = False,
    *,
    out: TextIO | None = None,
    interval: float = 0.5,
) -> int:
    """Start a replay in the service, draw its progress until it ends; 0 when it is done."""
    err = out or sys.stderr
    body: dict[str, Any] = {
        "into": into,
        "tables": [t.strip() for t in tables.split(",") if t.strip()] if tables else None,
        "since": since,
        "replace": replace,
    }
    status = call(settings, "POST", "/replay", body)
    started_at = status.get("started_at")
    line = _Line(err)
    try:
        while status.get("state") in ACTIVE:
            line.draw(progress_line(status))
            time.sleep(interval)
            status = call(settings, "GET", "/replay/status")
            if status.get("into") != into or (started_at and status.get("started_at") not in (None, started_at)):
                line.end()
                raise ReplayError("the service now reports another replay: ours was replaced (service restarted?)")
    except KeyboardInterrupt:
        line.end()
        try:
            call(settings, "DELETE", "/replay")
            print(f"replay into {into} cancelled; what it landed stays in {into}", file=err)
        except ReplayError as exc:
            print(f"could not cancel the replay: {exc}", file=err)
        return 130
    line.draw(progress_line(status))
    line.end()
    if status.get("state") != "done":
        raise ReplayError(f"replay into {into} {status.get('state')}: {status.get('error') or 'no reason given'}")
    print(summary(status))
    return 0


def run_check(
    settings: Settings,
    query: Callable[[Settings, str, str], str],
    into: str,
    tables: str | None = None,
    since: str | None = None,
) -> int:
    """Compare `into` with the live database; print the table; 0 when identical, 1 otherwise."""
    try:
        names = list(parse_tables(tables))
        when = parse_since(since)
    except BadReplayRequest as exc:
        raise ReplayError(str(exc), code=2) from None
    report = check(lambda sql: query(settings, sql, "TabSeparated"), settings.clickhouse_database, into, names, when)
    print(report.render(), end="")
    return 0 if report.equal else 1
