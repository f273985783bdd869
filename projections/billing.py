"""Billing export on the read side: a tenant's charges for a period as an invoice, CSV or JSON.

    GET /v1/billing/export?tenant=T&period=2026-11[&format=csv|json][&detail=1]

The invoice has one line per model and price (model, price version, unit prices, currency)
with requests, tokens, cost, baseline cost and savings, and one TOTAL line per currency; with
`detail=1` the CSV lists every charge instead. Everything is summed in ClickHouse over the raw
charges (`tokens_charged`) and carried as text into Python's Decimal, never through a float,
so the totals equal the sum of the charges to the last of their 12 decimal places. A charge
landed twice (a re-sent request keeps its event id) is counted once (`LIMIT 1 BY event_id`).
A tenant's key exports its own tenant only; the operator names one.
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

import orjson
from aiohttp import web

from projections.access import READER, AccessDenied, scoped_tenant

PATHS = ("/v1/billing/export",)
ReadRows = Callable[[str, dict[str, Any]], list[dict[str, Any]]]
MAX_DAYS = 366

_CHARGES = """
SELECT * FROM tokens_charged
WHERE tenant = {tenant:String}
  AND occurred_at >= {since:DateTime64(6, 'UTC')} AND occurred_at < {until:DateTime64(6, 'UTC')}
LIMIT 1 BY event_id
"""

# Columns are qualified (c.) because the output aliases reuse their names (cost, savings, ...).
LINES_SQL = f"""
SELECT c.model AS model, c.price_list_version AS price_list_version, c.currency AS currency,
       toString(c.input_price_per_mtok) AS input_per_mtok, toString(c.output_price_per_mtok) AS output_per_mtok,
       count() AS requests, sum(c.prompt_tokens) AS prompt_tokens, sum(c.completion_tokens) AS completion_tokens,
       toString(sum(c.cost)) AS cost, toString(sum(ifNull(c.baseline_cost, c.cost))) AS baseline_cost,
       toString(sum(ifNull(c.savings, toDecimal128(0, 12)))) AS savings
FROM ({_CHARGES}) AS c
GROUP BY c.model, c.price_list_version, c.currency, c.input_price_per_mtok, c.output_price_per_mtok
ORDER BY currency, model, price_list_version, input_per_mtok, output_per_mtok
"""

DETAIL_SQL = f"""
SELECT toString(c.occurred_at) AS occurred_at, c.request_id AS request_id, c.model AS model,
       c.price_list_version AS price_list_version, c.currency AS currency, c.prompt_tokens AS prompt_tokens,
       c.completion_tokens AS completion_tokens, toString(c.cost) AS cost,
       ifNull(c.baseline_model, '') AS baseline_model, toString(ifNull(c.baseline_cost, c.cost)) AS baseline_cost,
       toString(ifNull(c.savings, toDecimal128(0, 12))) AS savings
FROM ({_CHARGES}) AS c
ORDER BY c.occurred_at, c.request_id
"""

LINE_FIELDS = (
    "model", "price_list_version", "currency", "input_per_mtok", "output_per_mtok", "requests", "prompt_tokens",
    "completion_tokens", "cost", "baseline_cost", "savings",
)  # fmt: skip
MONEY = ("input_per_mtok", "output_per_mtok", "cost", "baseline_cost", "savings")
COUNTS = ("requests", "prompt_tokens", "completion_tokens")


def period(text: str) -> tuple[datetime, datetime]:
    """[start, end) in UTC from "YYYY-MM" (a calendar month) or "YYYY-MM-DD..YYYY-MM-DD" (end exclusive)."""
    text = text.strip()
    try:
        if ".." in text:
            a, b = text.split("..", 1)
            start, end = date.fromisoformat(a), date.fromisoformat(b)
        else:
            year, month = (int(x) for x in text.split("-"))
            start = date(year, month, 1)
            end = date(year + month // 12, month % 12 + 1, 1)
    except ValueError:
        raise ValueError(f"period {text!r}: use YYYY-MM or YYYY-MM-DD..YYYY-MM-DD (end exclusive)") from None
    if not start < end or (end - start).days > MAX_DAYS:
        raise ValueError(f"period {text!r}: the end must be after the start, at most {MAX_DAYS} days later")
    return datetime(start.year, start.month, start.day, tzinfo=UTC), datetime(end.year, end.month, end.day, tzinfo=UTC)


@dataclass
class Invoice:
    tenant: str
    since: datetime
    until: datetime
    lines: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_rows(cls, tenant: str, since: datetime, until: datetime, rows: list[dict[str, Any]]) -> Invoice:
        lines = []
        for r in rows:
            line = {k: r[k] for k in LINE_FIELDS}
            for k in MONEY:
                line[k] = Decimal(str(r[k]))
            for k in COUNTS:
                line[k] = int(r[k])
            lines.append(line)
        return cls(tenant, since, until, lines)

    def totals(self) -> dict[str, dict[str, Any]]:
        """Per currency: requests, tokens and money summed over the lines (exact Decimal sums)."""
        out: dict[str, dict[str, Any]] = {}
        for line in self.lines:
            t = out.setdefault(line["currency"], {k: 0 for k in COUNTS} | {k: Decimal(0) for k in MONEY[2:]})
            for k in COUNTS:
                t[k] += line[k]
            for k in MONEY[2:]:
                t[k] += line[k]
        return out

    def to_json(self) -> dict[str, Any]:
        def text(d: dict[str, Any]) -> dict[str, Any]:
            return {k: str(v) if isinstance(v, Decimal) else v for k, v in d.items()}

        return {
            "tenant": self.tenant,
            "period_start": self.since.isoformat(),
            "period_end": self.until.isoformat(),
            "lines": [text(line) for line in self.lines],
            "totals": {cur: text(t) for cur, t in self.totals().items()},
        }

    def to_csv(self) -> str:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["tenant", "period_start", "period_end", *LINE_FIELDS])
        head = [self.tenant, self.since.date().isoformat(), self.until.date().isoformat()]
        for line in self.lines:
            w.writerow([*head, *(line[k] for k in LINE_FIELDS)])
        for cur, t in self.totals().items():
            w.writerow([*head, "TOTAL", "", cur, "", "", *(t[k] for k in LINE_FIELDS[5:])])
        return buf.getvalue()


def detail_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    cols = [
        "occurred_at", "request_id", "model", "price_list_version", "currency", "prompt_tokens", "completion_tokens",
        "cost", "baseline_model", "baseline_cost", "savings",
    ]  # fmt: skip
    w.writerow(cols)
    for r in rows:
        w.writerow([r[c] for c in cols])
    return buf.getvalue()


def invoice(read: ReadRows, tenant: str, since: datetime, until: datetime) -> Invoice:
    params = {"tenant": tenant, "since": _ch_time(since), "until": _ch_time(until)}
    return Invoice.from_rows(tenant, since, until, read(LINES_SQL, params))


def _ch_time(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M:%S")


def register(app: web.Application, read: ReadRows) -> None:
    """Add the export route to the read side's app; `read` runs one parameterised read query."""

    async def export(request: web.Request) -> web.Response:
        try:
            tenant = scoped_tenant(request[READER], request.query.get("tenant"))
            if not tenant:
                raise AccessDenied(400, "name the tenant to bill: ?tenant=T&period=YYYY-MM")
            since, until = period(request.query.get("period", ""))
        except AccessDenied as exc:
            return _json(exc.status, {"error": exc.message})
        except ValueError as exc:
            return _json(400, {"error": str(exc)})
        fmt = request.query.get("format", "csv")
        if fmt not in ("csv", "json"):
            return _json(400, {"error": f"format {fmt!r}: use csv or json"})
        loop = asyncio.get_running_loop()
        try:
            if request.query.get("detail") in ("1", "true"):
                if fmt != "csv":
                    return _json(400, {"error": "detail=1 lists every charge as CSV only: drop format=json"})
                params = {"tenant": tenant, "since": _ch_time(since), "until": _ch_time(until)}
                rows = await loop.run_in_executor(None, read, DETAIL_SQL, params)
                return web.Response(text=detail_csv(rows), content_type="text/csv")
            inv = await loop.run_in_executor(None, invoice, read, tenant, since, until)
        except Exception as exc:  # the store refused or is starting: say so, never a stack trace
            return _json(503, {"error": f"reading the charges failed: {exc}"})
        if fmt == "json":
            return web.Response(body=orjson.dumps(inv.to_json()), content_type="application/json")
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", tenant)  # a tenant name may hold quotes or semicolons
        name = f"{safe}-{since.date().isoformat()}.csv"
        return web.Response(
            text=inv.to_csv(),
            content_type="text/csv",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    app.router.add_get(PATHS[0], export)


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")
