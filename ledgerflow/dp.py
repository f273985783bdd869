"""`ledgerflow dp grant | query | budgets | reallocation`: differential-privacy budgets and releases.

`grant` records a `DpBudgetGranted` (with its audit record, in one transaction) on the budget
log, where the DP budget agent folds it before any later request of that budget. `query`,
`budgets` and `reallocation` call the read side (`POST /v1/dp/query`, `GET /v1/dp/budgets`,
`GET /v1/dp/reallocation`) as the operator: queries are charged and released there, never
here, so the CLI holds no budget state and draws no noise.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import orjson

from domain.dp import COMPOSITIONS, KINDS, PERIODS, GrantRejected, check_grant
from ledgerflow import admin, readside
from ledgerflow.settings import Settings
from streams.events import DpBudgetGranted


def add_parser(sub: Any) -> None:
    d = sub.add_parser("dp", help="differential privacy: grant budgets, run DP queries, list budgets")
    dsub = d.add_subparsers(dest="dp_command", required=True)
    g = dsub.add_parser("grant", help="grant (or top up) a tenant's budget for a metric set")
    g.add_argument("--tenant", required=True)
    g.add_argument("--metric-set", required=True, choices=sorted(set(KINDS.values())))
    g.add_argument("--epsilon", type=float, required=True)
    g.add_argument("--delta", type=float, default=0.0, help="needed (> 0) for zcdp")
    g.add_argument("--composition", choices=COMPOSITIONS, default="basic")
    g.add_argument("--period", choices=PERIODS, default="total", help="when the budget renews")
    g.add_argument("--by", default="cli", help="who grants it (recorded)")
    q = dsub.add_parser("query", help="run a DP query on the read side (charged once; a repeat returns the release)")
    q.add_argument("--tenant", required=True)
    q.add_argument("--kind", required=True, choices=sorted(KINDS))
    q.add_argument("--since", required=True, help="first day, YYYY-MM-DD")
    q.add_argument("--until", required=True, help="last day (inclusive), YYYY-MM-DD")
    q.add_argument("--epsilon", help="privacy loss under a basic budget")
    q.add_argument("--rho", help="privacy loss under a zcdp budget")
    q.add_argument("--models", help="comma-separated models (the public categories)")
    q.add_argument("--max-requests-per-unit", type=int, default=100, help="contribution bound per API key")
    q.add_argument("--cost-max", help="clamp of one request's cost (mean_cost_per_request)")
    q.add_argument("--currency", default="USD")
    q.add_argument("--savings-edges", help="comma-separated bin edges (savings_distribution)")
    b = dsub.add_parser("budgets", help="every budget: granted, spent, remaining")
    b.add_argument("--tenant")
    r = dsub.add_parser("reallocation", help="metric sets near exhaustion beside those with unused budget")
    r.add_argument("--tenant")
    r.add_argument("--near", type=float, default=0.8)
    r.add_argument("--unused", type=float, default=0.2)


def grant(settings: Settings, tenant: str, metric_set: str, epsilon: float, delta: float, composition: str,
          period: str, by: str) -> DpBudgetGranted:  # fmt: skip
    """Record a grant and its audit record. A grant the fold would not apply is refused here first."""
    event = DpBudgetGranted(
        envelope=admin.envelope("DpBudgetGranted", tenant),
        metric_set=metric_set,
        epsilon=epsilon,
        delta=delta,
        composition=composition,
        period=period,
        granted_by=by,
    )
    check_grant(None, event)  # the top-up rule needs the current budget: the read side reports it
    details = {"epsilon": repr(epsilon), "delta": repr(delta), "composition": composition, "period": period}
    admin.publish(settings, [event, admin.audit_of(event, "dp.granted", by, f"{tenant}/{metric_set}", details)])
    return event


def call(settings: Settings, method: str, path: str, body: dict[str, Any] | None = None,
         query: dict[str, str] | None = None) -> tuple[int, Any]:  # fmt: skip
    """One JSON call to the read side as the operator; (status, decoded body)."""
    url = settings.projections_url + path + ("?" + urllib.parse.urlencode(query) if query else "")
    data = orjson.dumps(body) if body is not None else None
    headers = {**readside.auth_headers(settings), "Content-Type": "application/json"}
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, orjson.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return exc.code, {"error": raw.decode(errors="replace")}
    except urllib.error.URLError as exc:
        raise ConnectionError(
            f"read side not reachable at {settings.projections_url} ({exc.reason}); is `ledgerflow up` running?"
        ) from None


def query_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {
        "tenant": args.tenant,
        "kind": args.kind,
        "since": args.since,
        "until": args.until,
        "max_requests_per_unit": args.max_requests_per_unit,
        "currency": args.currency,
    }
    for name in ("epsilon", "rho", "cost_max"):
        if getattr(args, name) is not None:
            body[name] = getattr(args, name)
    if args.models:
        body["models"] = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.savings_edges:
        body["savings_edges"] = [e.strip() for e in args.savings_edges.split(",") if e.strip()]
    return body


def _print_table(columns: list[str], rows: list[list[Any]]) -> None:
    print("\t".join(columns))
    for row in rows:
        print("\t".join("" if v is None else str(v) for v in row))


def cmd(settings: Settings, args: argparse.Namespace) -> int:
    try:
        return _cmd(settings, args)
    except ConnectionError as exc:
        print(f"ledgerflow dp: {exc}", file=sys.stderr)
        return 1


def _cmd(settings: Settings, args: argparse.Namespace) -> int:
    if args.dp_command == "grant":
        try:
            event = grant(settings, args.tenant, args.metric_set, args.epsilon, args.delta, args.composition,
                          args.period, args.by)  # fmt: skip
        except GrantRejected as exc:
            print(f"ledgerflow dp grant: {exc}", file=sys.stderr)
            return 2
        print(f"granted {event.tenant}/{event.metric_set}: epsilon {event.epsilon} delta {event.delta} "
              f"({event.composition}, per {event.period}); event {event.envelope.event_id}")  # fmt: skip
        return 0
    if args.dp_command == "query":
        status, body = call(settings, "POST", "/v1/dp/query", query_body(args))
        if status != 200:
            print(f"ledgerflow dp query: {status}: {body.get('error', body)}", file=sys.stderr)
            return 1
        print(
            f"# query {body['query_id']} {body['kind']} {body['since']}..{body['until']} "
            f"mechanism {body['mechanism']}" + (" (recorded release, nothing spent)" if body["cached"] else "")
        )
        _print_table(body["result"]["columns"], body["result"]["rows"])
        if body.get("budget"):
            b = body["budget"]
            print(f"# budget {b['tenant']}/{b['metric_set']}: epsilon remaining {b['epsilon_remaining']:.6g}")
        return 0
    tenant = {"tenant": args.tenant} if args.tenant else {}
    if args.dp_command == "budgets":
        status, body = call(settings, "GET", "/v1/dp/budgets", query=tenant)
        if status != 200:
            print(f"ledgerflow dp budgets: {status}: {body.get('error', body)}", file=sys.stderr)
            return 1
        cols = ["tenant", "metric_set", "composition", "period", "epsilon", "epsilon_spent", "epsilon_remaining",
                "rho_remaining", "used_fraction", "queries_charged", "queries_refused"]  # fmt: skip
        _print_table(cols, [[b[c] for c in cols] for b in body["budgets"]])
        return 0
    status, body = call(
        settings, "GET", "/v1/dp/reallocation", query={**tenant, "near": str(args.near), "unused": str(args.unused)}
    )
    if status != 200:
        print(f"ledgerflow dp reallocation: {status}: {body.get('error', body)}", file=sys.stderr)
        return 1
    cols = ["tenant", "metric_set", "used_fraction", "epsilon_remaining", "queries_charged"]
    print(f"# near exhaustion (used >= {args.near:.0%})")
    _print_table(cols, [[r[c] for c in cols] for r in body["near_exhaustion"]])
    print(f"# unused (used <= {args.unused:.0%})")
    _print_table(cols, [[r[c] for c in cols] for r in body["unused"]])
    print("# suggestions")
    for s in body["suggestions"]:
        print(f"{s['tenant']}: move from {s['from_metric_set']} to {s['to_metric_set']}: {s['note']}")
    return 0
