"""SLO burn on the read side: `GET /v1/slo[?tenant=T]`, each SLO's burn per window and open alerts.

Tenant-scoped like every read route: a tenant key sees its own tenant; the operator sees the
platform (all tenants summed) or names one. The counts come from the `slo_burn` and
`slo_alerts_open` views (projections/migrations/0012_slo.sql) through parameterised queries;
the error ratio, burn rate and budget left are computed here with `domain.slo`, the same
arithmetic the burn-rate agent uses. docs/slo.md explains the numbers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
from aiohttp import web

from domain.slo import RULES, SLO_BY_NAME, budget_remaining, burn_rate, error_ratio
from projections.access import READER, AccessDenied, scoped_tenant

PATHS = ("/v1/slo",)
ReadRows = Callable[[str, dict[str, Any]], list[dict[str, Any]]]

BURN_SQL = """
SELECT slo, window, window_s, toInt64(sum(requests)) AS requests, toInt64(sum(bad)) AS bad
FROM slo_burn
WHERE ({all:UInt8} = 1 OR tenant = {tenant:String})
GROUP BY slo, window, window_s
ORDER BY slo, window_s
"""
OPEN_SQL = """
SELECT tenant, slo, severity, long_window_s, short_window_s, toString(since) AS since,
       long_burn_rate, short_burn_rate, threshold
FROM slo_alerts_open
WHERE ({all:UInt8} = 1 OR tenant = {tenant:String})
ORDER BY severity, since DESC
"""
BUDGET_WINDOW_S = 30 * 86400


def report(read: ReadRows, tenant: str | None) -> dict[str, Any]:
    """Every SLO with its windows (requests, bad, error ratio, burn rate) and budget left; open alerts."""
    params = {"tenant": tenant or "", "all": int(tenant is None)}
    windows: dict[str, list[dict[str, Any]]] = {name: [] for name in SLO_BY_NAME}
    for row in read(BURN_SQL, params):
        slo = SLO_BY_NAME.get(row["slo"])
        if slo is None:
            continue
        requests, bad = int(row["requests"]), int(row["bad"])
        windows[slo.name].append(
            {
                "window": row["window"],
                "window_s": int(row["window_s"]),
                "requests": requests,
                "bad": bad,
                "error_ratio": error_ratio(bad, requests),
                "burn_rate": burn_rate(bad, requests, slo),
            }
        )
    slos = []
    for name, rows in windows.items():
        slo = SLO_BY_NAME[name]
        month = next((w for w in rows if w["window_s"] == BUDGET_WINDOW_S), {"requests": 0, "bad": 0})
        slos.append(
            {
                "slo": name,
                "objective": slo.objective,
                "description": slo.description,
                "budget_remaining": budget_remaining(month["bad"], month["requests"], slo),
                "windows": rows,
            }
        )
    rules = [{"severity": r.severity, "long_window_s": r.long_s, "short_window_s": r.short_s,
              "threshold": r.threshold} for r in RULES]  # fmt: skip
    return {"tenant": tenant, "slos": slos, "rules": rules, "alerts_open": read(OPEN_SQL, params)}


def register(app: web.Application, read: ReadRows) -> None:
    """Add `GET /v1/slo`; `read` runs one parameterised read query."""

    async def slo(request: web.Request) -> web.Response:
        try:
            tenant = scoped_tenant(request[READER], request.query.get("tenant"))
        except AccessDenied as exc:
            return _json(exc.status, {"error": exc.message})
        try:
            out = await asyncio.get_running_loop().run_in_executor(None, report, read, tenant)
        except Exception as exc:  # the store refused or is starting: say so, never a stack trace
            return _json(503, {"error": f"reading the SLO projections failed: {exc}"})
        return _json(200, out)

    app.router.add_get(PATHS[0], slo)


def _json(status: int, body: Any) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")
