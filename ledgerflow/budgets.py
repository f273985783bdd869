"""`ledgerflow budgets set | list`: spend budgets as events on the compacted budgets topic.

    budgets set --tenant T [--api-key K] --limit AMOUNT [--period month] [--soft] [--thresholds 50,80,100]
    budgets list [--json]

A budget caps a tenant, or one of its API keys, per UTC period; hard budgets (the default)
refuse calls that could overrun them (402), soft ones only alert. The id is derived from what
it caps (tenant, scope, period, hard/soft) unless given, so setting it again changes it in
place. Each change is published with its audit record in one transaction; gateways follow
the topic within about a second.
"""

from __future__ import annotations

import argparse
import getpass
import json
from typing import Any

from domain.budget import DEFAULT_THRESHOLDS, PERIODS, Budget, BudgetBook
from ledgerflow import admin
from ledgerflow.prices import money
from ledgerflow.settings import Settings
from streams.admin import read_to_end
from streams.codec import Codec, PoisonEvent
from streams.events import BudgetSet
from streams.topics import Topics


def _author() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def budget_id(tenant: str, api_key: str | None, period: str, enforced: bool) -> str:
    scope = f"key:{api_key}" if api_key else "tenant"
    return f"{tenant}:{scope}:{period}:{'hard' if enforced else 'soft'}"


def set_budget(
    settings: Settings,
    tenant: str,
    limit: str,
    *,
    api_key: str | None = None,
    period: str = "month",
    enforced: bool = True,
    thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS,
    currency: str = "USD",
    bid: str | None = None,
    by: str | None = None,
) -> BudgetSet:
    """Record a budget (validated as gateways will read it) and its audit record."""
    if period not in PERIODS:
        raise ValueError(f"--period {period!r}: use one of {', '.join(PERIODS)}")
    if any(not 0 < t <= 1000 for t in thresholds):
        raise ValueError("--thresholds: percentages between 1 and 1000")
    actor = by or _author()
    event = BudgetSet(
        envelope=admin.envelope("BudgetSet", tenant),
        budget_id=bid or budget_id(tenant, api_key, period, enforced),
        scope="api_key" if api_key else "tenant",
        scope_id=api_key or tenant,
        period=period,
        limit_amount=money(limit, "--limit"),
        currency=currency,
        enforced=enforced,
        alert_thresholds_pct=sorted(set(thresholds)),
        set_by=actor,
    )
    Budget.from_event(event)
    details = {"limit": str(event.limit_amount), "period": period, "enforced": str(enforced).lower()}
    admin.publish(settings, [event, admin.audit_of(event, "budget.set", actor, event.budget_id, details)])
    return event


def read_budgets(settings: Settings) -> BudgetBook:
    topic = Topics(settings.topic_prefix, settings.partitions).name("budgets")
    codec = Codec()
    book = BudgetBook()
    for _t, _o, msg in read_to_end(settings.bootstrap, [topic], 30.0, strict=True):
        try:
            event = codec.decode(msg.value())
        except PoisonEvent:
            continue
        if isinstance(event, BudgetSet):
            book.apply(event)
    return book


def add_parser(sub: Any) -> None:
    p = sub.add_parser("budgets", help="set and list spend budgets per tenant or API key (budgets topic)")
    ps = p.add_subparsers(dest="budgets_command", required=True)
    st = ps.add_parser("set", help="create or change a budget")
    st.add_argument("--tenant", required=True)
    st.add_argument("--api-key", help="cap this API key (its id) instead of the whole tenant")
    st.add_argument("--limit", required=True, help="spend allowed per period, e.g. 250.00")
    st.add_argument("--period", default="month", choices=PERIODS)
    st.add_argument("--soft", action="store_true", help="alert only; never refuse calls")
    st.add_argument("--thresholds", default="50,80,100", help="alert percentages, e.g. 50,80,100")
    st.add_argument("--currency", default="USD")
    st.add_argument("--id", help="budget id (default: derived from tenant, key, period, hard/soft)")
    ls = ps.add_parser("list", help="budgets in force")
    ls.add_argument("--json", action="store_true")


def cmd(settings: Settings, args: argparse.Namespace) -> int:
    if args.budgets_command == "set":
        thresholds = tuple(int(t) for t in args.thresholds.split(",") if t.strip())
        event = set_budget(
            settings, args.tenant, args.limit, api_key=args.api_key, period=args.period, enforced=not args.soft,
            thresholds=thresholds, currency=args.currency, bid=args.id,
        )  # fmt: skip
        kind = "hard" if event.enforced else "soft"
        print(
            f"set {kind} {event.period} budget {event.budget_id}: {event.limit_amount} {event.currency} "
            f"(alerts at {', '.join(f'{t}%' for t in event.alert_thresholds_pct) or 'none'})"
        )
        return 0
    rows: list[dict[str, Any]] = [
        {
            "budget_id": b.budget_id,
            "tenant": b.tenant,
            "scope": b.scope,
            "scope_id": b.scope_id,
            "period": b.period,
            "limit": str(b.limit),
            "currency": b.currency,
            "enforced": b.enforced,
            "thresholds": list(b.thresholds),
        }
        for b in read_budgets(settings).all()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'budget':<40} {'scope':<22} {'period':<6} {'kind':<4} {'limit':>18} alerts")
    for r in rows:
        scope = f"{r['scope']}:{r['scope_id']}"
        kind = "hard" if r["enforced"] else "soft"
        alerts = ",".join(map(str, r["thresholds"]))
        print(f"{r['budget_id']:<40} {scope:<22} {r['period']:<6} {kind:<4} {r['limit']:>14} {r['currency']} {alerts}")
    return 0
