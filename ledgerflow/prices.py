"""`ledgerflow prices publish | list`: model prices as events on the compacted price-lists topic.

    prices publish --version V --price MODEL=IN/OUT [--price ...] [--currency USD] [--effective-from T]
    prices list [--json]

One PriceListPublished per model (key models@version, so every version stays on the topic and
every charge's price_list_version stays resolvable), published with their audit records in
one transaction. Prices are per million tokens, in Decimal with at most 12 places; a version
is immutable: republishing it with other prices is refused. Gateways follow the topic and
switch at effective_from (default: now).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from domain.budget import to_pico
from domain.pricing import DEFAULT_PRICES, PriceBook
from ledgerflow import admin
from ledgerflow.settings import Settings
from streams.admin import read_to_end
from streams.codec import Codec, PoisonEvent
from streams.events import PLATFORM_TENANT, ModelPrice, PriceListPublished
from streams.topics import Topics


def _author() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


def money(text: str, what: str) -> Decimal:
    """A non-negative Decimal with at most 12 places; ValueError saying which input is wrong."""
    try:
        value = Decimal(text)
        to_pico(value)
    except (InvalidOperation, ValueError):
        raise ValueError(f"{what}: {text!r} is not an amount with at most 12 decimal places") from None
    if value < 0 or not value.is_finite():
        raise ValueError(f"{what}: {text!r} must be zero or more")
    return value


def parse_price(spec: str) -> ModelPrice:
    """MODEL=IN/OUT, prices per million input and output tokens."""
    model, sep, pair = spec.partition("=")
    inp, slash, out = pair.partition("/")
    if not (sep and slash and model.strip()):
        raise ValueError(f"--price {spec!r}: write MODEL=IN/OUT, e.g. sim-small=0.15/0.60 (per million tokens)")
    return {
        "model": model.strip(),
        "input_per_mtok": money(inp, f"input price of {model}"),
        "output_per_mtok": money(out, f"output price of {model}"),
    }


def read_prices(settings: Settings) -> list[PriceListPublished]:
    """Every PriceListPublished on the topic, in topic order."""
    topic = Topics(settings.topic_prefix, settings.partitions).name("price-lists")
    codec = Codec()
    out = []
    for _t, _o, msg in read_to_end(settings.bootstrap, [topic], 30.0, strict=True):
        try:
            event = codec.decode(msg.value())
        except PoisonEvent:
            continue
        if isinstance(event, PriceListPublished):
            out.append(event)
    return out


def publish(
    settings: Settings,
    version: str,
    prices: list[ModelPrice],
    currency: str = "USD",
    effective_from: datetime | None = None,
    author: str | None = None,
) -> list[PriceListPublished]:
    """Publish one PriceListPublished per model (with its audit record), all in one transaction."""
    if not version.strip():
        raise ValueError("--version must not be empty")
    if not prices:
        raise ValueError("name at least one --price MODEL=IN/OUT")
    by = author or _author()
    when = effective_from or datetime.now(UTC)
    existing = read_prices(settings)
    events: list[Any] = []
    for p in prices:
        mine = [e for e in existing if any(q["model"] == p["model"] for q in e.prices)]
        for e in mine:
            if e.version == version:
                old = next(q for q in e.prices if q["model"] == p["model"])
                if (old["input_per_mtok"], old["output_per_mtok"], e.currency) != (
                    p["input_per_mtok"],
                    p["output_per_mtok"],
                    currency,
                ):
                    raise ValueError(
                        f"version {version} already prices {p['model']} differently; versions are immutable "
                        "(charges cite them): publish a new version"
                    )
        event = PriceListPublished(
            envelope=admin.envelope("PriceListPublished", PLATFORM_TENANT),
            version=version,
            previous_version=mine[-1].version if mine else None,
            effective_from=when,
            currency=currency,
            prices=[p],
            author=by,
        )
        details = {"model": p["model"], "input_per_mtok": str(p["input_per_mtok"])}
        details["output_per_mtok"] = str(p["output_per_mtok"])
        events += [event, admin.audit_of(event, "prices.published", by, f"{p['model']}@{version}", details)]
    admin.publish(settings, events)
    return [e for e in events if isinstance(e, PriceListPublished)]


def book(records: list[PriceListPublished]) -> PriceBook:
    """The shipped defaults, then every published list: what a gateway holds."""
    b = PriceBook(DEFAULT_PRICES)
    for r in records:
        b.apply(r)
    return b


def add_parser(sub: Any) -> None:
    p = sub.add_parser("prices", help="publish and list model prices (events on the price-lists topic)")
    ps = p.add_subparsers(dest="prices_command", required=True)
    pub = ps.add_parser("publish", help="publish prices per million tokens for one or more models")
    pub.add_argument("--version", required=True, help="a new price version, e.g. 2026-12")
    pub.add_argument("--price", action="append", default=[], metavar="MODEL=IN/OUT", help="e.g. sim-small=0.15/0.60")
    pub.add_argument("--currency", default="USD")
    pub.add_argument("--effective-from", help="ISO-8601 time the prices apply from (default now; UTC if no offset)")
    ls = ps.add_parser("list", help="every price version per model; * marks the one in force")
    ls.add_argument("--json", action="store_true")


def _when(text: str | None) -> datetime | None:
    if not text:
        return None
    at = datetime.fromisoformat(text)
    return at.replace(tzinfo=UTC) if at.tzinfo is None else at.astimezone(UTC)


def cmd(settings: Settings, args: argparse.Namespace) -> int:
    if args.prices_command == "publish":
        events = publish(
            settings, args.version, [parse_price(s) for s in args.price], args.currency, _when(args.effective_from)
        )
        for e in events:
            p = e.prices[0]
            print(
                f"published {p['model']} {e.version}: {p['input_per_mtok']} in / {p['output_per_mtok']} out "
                f"{e.currency} per 1M tokens from {e.effective_from.isoformat()} (was {e.previous_version or '-'})"
            )
        return 0
    b = book(read_prices(settings))
    now = datetime.now(UTC)
    rows = []
    for model, since, price in b.history():
        current = b.at(model, now)
        rows.append(
            {
                "model": model,
                "version": price.version,
                "effective_from": since.isoformat(),
                "input_per_mtok": str(price.input_per_mtok),
                "output_per_mtok": str(price.output_per_mtok),
                "currency": price.currency,
                "in_force": current is not None and current.version == price.version,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'':2}{'model':<16} {'version':<16} {'effective from':<33} {'in/1M':>14} {'out/1M':>14} currency")
    for r in rows:
        mark = "* " if r["in_force"] else "  "
        print(
            f"{mark}{r['model']:<16} {r['version']:<16} {r['effective_from']:<33} {r['input_per_mtok']:>14} "
            f"{r['output_per_mtok']:>14} {r['currency']}"
        )
    sys.stdout.flush()
    return 0
