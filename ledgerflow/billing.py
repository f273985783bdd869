"""`ledgerflow billing export`: a tenant's invoice for a period (CSV or JSON), from the read side.

    billing export --tenant T --period 2026-11 [--format csv|json] [--detail] [--out FILE]

Asks the projections service's `/v1/billing/export` (projections/billing.py) with the
operator's read token, so the CLI and any HTTP client get the same numbers: one line per model
and price, a TOTAL per currency, summed exactly from the raw charges.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from ledgerflow import readside
from ledgerflow.settings import Settings


class BillingError(RuntimeError):
    """The read side refused or could not be reached; the message says what to do."""


def export(settings: Settings, tenant: str, period: str, fmt: str = "csv", detail: bool = False) -> str:
    query = {"tenant": tenant, "period": period, "format": fmt}
    if detail:
        query["detail"] = "1"
    url = f"{settings.projections_url}/v1/billing/export?{urllib.parse.urlencode(query)}"
    req = urllib.request.Request(url, headers=readside.auth_headers(settings))
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return str(resp.read().decode())
    except urllib.error.HTTPError as exc:
        raise BillingError(f"billing export refused: {exc.read().decode(errors='replace').strip()}") from None
    except urllib.error.URLError as exc:
        raise BillingError(
            f"projections service not reachable at {settings.projections_url} ({exc.reason}); "
            "is `ledgerflow up` running?"
        ) from None


def add_parser(sub: Any) -> None:
    p = sub.add_parser("billing", help="export a tenant's invoice for a period (CSV or JSON)")
    ps = p.add_subparsers(dest="billing_command", required=True)
    ex = ps.add_parser("export", help="one line per model and price plus totals, summed exactly from the charges")
    ex.add_argument("--tenant", required=True)
    ex.add_argument("--period", required=True, help="YYYY-MM (a UTC month) or YYYY-MM-DD..YYYY-MM-DD (end exclusive)")
    ex.add_argument("--format", choices=["csv", "json"], default="csv")
    ex.add_argument("--detail", action="store_true", help="every charge instead of the summary (CSV)")
    ex.add_argument("--out", type=Path, help="write to FILE instead of stdout")


def cmd(settings: Settings, args: argparse.Namespace) -> int:
    try:
        text = export(settings, args.tenant, args.period, args.format, args.detail)
    except BillingError as exc:
        print(f"ledgerflow: {exc}", file=sys.stderr)
        return 1
    if args.out:
        args.out.write_text(text)
        print(f"wrote {args.out}")
    else:
        sys.stdout.write(text)
    return 0
