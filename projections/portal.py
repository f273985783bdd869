"""The portal: server-rendered pages of the read side for operators and tenant admins.

Why here: the portal is a reader of projections like any analyst (DESIGN.md, CQRS), so it
lives in the projections service and reads only through its query layer (`read_rows`,
parameterised SQL on read-only handles), never from Kafka. Every query is scoped with
`scoped_tenant`: the operator sees every tenant (or one, `?tenant=`), a tenant key its own.
Platform-wide pages (consumer lag, SLOs) are the operator's only: a tenant key gets no link to
them and a 403. Every panel has an empty state naming what fills it, so a page never breaks on
an empty or newly migrated table.

Access: `POST /portal/login` takes the operator's read token or a tenant API key with a read
role in a form field, verifies it with `ReadAccess.authorize` exactly as a header would be,
and sets a cookie holding a random session id (HttpOnly, SameSite=Strict, Secure over TLS).
The secret itself is never stored or logged; sessions live in this process's memory for 8
hours (a restart logs everyone out, which is the safe direction). Header credentials work
too, for scripts. `/portal/logout` drops the session.

Charts are pygal SVG rendered on the server and inlined: no JavaScript, nothing fetched at
run time, and a Content-Security-Policy that would block anything that tried. Money is
summed in ClickHouse and carried as Decimal text; only chart coordinates become floats.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import html
import re
import secrets
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pygal
from aiohttp import web
from pygal.style import Style

from projections.access import READER, AccessDenied, ReadAccess, Reader, presented_secret, scoped_tenant

PREFIX = "/portal"
LOGIN = f"{PREFIX}/login"
LOGOUT = f"{PREFIX}/logout"
COOKIE = "lf_portal"
SESSION_TTL_S = 8 * 3600
MAX_SESSIONS = 10_000
DEFAULT_DAYS = 30
MAX_DAYS = 366
ReadRows = Callable[[str, dict[str, Any]], list[dict[str, Any]]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# `tenant` filter shared by every query: {all}=1 for the operator's "every tenant".
_SCOPE = "({all:UInt8} = 1 OR tenant = {tenant:String})"

# The first UTC day of the window: spend pages count whole days, so a day's bar and the rollups
# agent's snapshot of that day cover the same charges.
_FIRST_DAY = "toStartOfDay({since:DateTime64(6, 'UTC')}, 'UTC')"

SPEND_SQL = f"""
SELECT toString(toDate(c.occurred_at, 'UTC')) AS day, c.tenant AS tenant, c.model AS model, c.currency AS currency,
       count() AS requests,
       toString(sum(c.cost)) AS cost, toString(sum(ifNull(c.baseline_cost, c.cost))) AS baseline_cost,
       toString(sum(ifNull(c.savings, toDecimal128(0, 12)))) AS savings
FROM (SELECT * FROM tokens_charged WHERE occurred_at >= {_FIRST_DAY} AND {_SCOPE}
      LIMIT 1 BY event_id) AS c
GROUP BY day, tenant, model, currency
ORDER BY currency, day, tenant, model
"""

# The rollups agent's totals (savings_daily: the newest SavingsSnapshotted per tenant, day, model),
# per day and currency: the portal checks them against the charges it charts.
SNAPSHOT_SAVINGS_SQL = f"""
SELECT toString(s.day) AS day, s.currency AS currency, toString(sum(s.cost)) AS cost,
       toString(sum(s.baseline_cost)) AS baseline_cost,
       toString(sum(s.savings)) AS savings
FROM (SELECT * FROM savings_daily WHERE day >= toDate({_FIRST_DAY}) AND {_SCOPE}) AS s
GROUP BY day, currency
ORDER BY currency, day
"""

# One row per anomalous hour (a replayed detector re-emits the same hour: keep the newest).
ANOMALIES_SQL = f"""
SELECT tenant, toString(hour_start) AS hour, toString(toDate(hour_start, 'UTC')) AS day,
       toString(spend) AS spend, toString(expected) AS expected, currency, score, threshold, detector
FROM cost_anomaly_detected WHERE hour_start >= {_FIRST_DAY} AND {_SCOPE}
ORDER BY hour_start DESC, tenant, currency, source_offset DESC, event_id DESC
LIMIT 1 BY tenant, hour_start, currency
LIMIT 200
"""

BUDGETS_SQL = f"""
SELECT tenant, budget_id, scope, scope_id, period, toString(limit_amount) AS limit_amount, currency, enforced
FROM (SELECT * FROM budget_set WHERE {_SCOPE} ORDER BY occurred_at DESC, event_id DESC LIMIT 1 BY tenant, budget_id)
ORDER BY tenant, budget_id
"""

# The spend of each budget's newest period (the log-derived spend: settled charges).
BUDGET_SPENT_SQL = f"""
SELECT tenant, budget_id, toString(period_start) AS period_start, toString(sum(actual_amount)) AS spent
FROM (SELECT * FROM budget_settled WHERE {_SCOPE} LIMIT 1 BY event_id)
GROUP BY tenant, budget_id, period_start
ORDER BY tenant, budget_id, period_start DESC
LIMIT 1 BY tenant, budget_id
"""

# The newest recorded month-end forecast of each budget's period (the spend-forecasts agent's
# SpendForecasted; a newer one of the same period has a higher source offset).
FORECASTS_SQL = f"""
SELECT tenant, budget_id, toString(period_start) AS period_start, toString(month_to_date) AS month_to_date,
       toString(forecast) AS forecast, method, days_of_history, toString(`limit`) AS limit_amount,
       toString(projected_variance) AS projected_variance, currency
FROM spend_forecasts WHERE {_SCOPE}
ORDER BY tenant, budget_id, period_start DESC, source_offset DESC, occurred_at DESC, event_id DESC
LIMIT 1 BY tenant, budget_id, period_start
"""

DP_SQL = f"""
SELECT tenant, metric_set, composition, period, epsilon_granted, epsilon_remaining, queries_charged, queries_refused
FROM dp_budgets WHERE {_SCOPE}
ORDER BY tenant, metric_set
"""

CHECKPOINTS_SQL = f"""
SELECT tenant, chain_tenant, tree_size, root_hash, key_id, toString(occurred_at) AS signed_at, count() OVER w AS signed
FROM ledger_checkpoint_signed WHERE {_SCOPE}
WINDOW w AS (PARTITION BY tenant, chain_tenant)
ORDER BY tenant, chain_tenant, tree_size DESC, occurred_at DESC
LIMIT 1 BY tenant, chain_tenant
"""

# The newest `audit verify` result of each chain from each copy of the ledger it checked (log,
# clickhouse): one source failing while the other passes must stay visible.
VERIFICATIONS_SQL = f"""
SELECT tenant, chain_tenant, source, scope, ok, entries_checked, checkpoints_checked, first_bad_seq, reason,
       duration_ms, verifier, key_id, toString(occurred_at) AS verified_at
FROM ledger_verifications WHERE {_SCOPE}
ORDER BY tenant, chain_tenant, source, occurred_at DESC, event_id DESC
LIMIT 1 BY tenant, chain_tenant, source
"""

SHARES_SQL = f"""
SELECT tenant, model, calls FROM routing_shares WHERE {_SCOPE} ORDER BY tenant, calls DESC, model
"""

REGRET_SQL = f"""
SELECT tenant, toString(occurred_at) AS at, priors_version, regret, cumulative_regret
FROM routing_regret_recorded WHERE occurred_at >= {{since:DateTime64(6, 'UTC')}} AND {_SCOPE}
ORDER BY tenant, occurred_at, event_id
LIMIT 500 BY tenant
"""

DENIALS_SQL = f"""
SELECT toString(toDate(occurred_at, 'UTC')) AS day, tenant, count() AS denials
FROM policy_decided WHERE decision = 'deny' AND occurred_at >= {{since:DateTime64(6, 'UTC')}} AND {_SCOPE}
GROUP BY day, tenant ORDER BY day, tenant
"""

REDACTIONS_SQL = f"""
SELECT tenant, kind, sum(n) AS masked
FROM request_redacted ARRAY JOIN mapKeys(counts_by_kind) AS kind, mapValues(counts_by_kind) AS n
WHERE occurred_at >= {{since:DateTime64(6, 'UTC')}} AND {_SCOPE}
GROUP BY tenant, kind ORDER BY tenant, kind
"""

# Consumer lag is platform-wide telemetry (tenant _platform): operator-only pages, no tenant filter.
LAG_SPAN_SQL = """
SELECT count() AS samples, dateDiff('second', min(occurred_at), max(occurred_at)) AS span_s
FROM consumer_lag WHERE occurred_at >= {since:DateTime64(6, 'UTC')}
"""

# Lag per group over time: in each time bucket the newest sample of every partition, summed per group.
LAG_SERIES_SQL = """
SELECT toString(b) AS at, group_id, sum(lag) AS lag
FROM (
    SELECT toStartOfInterval(occurred_at, toIntervalSecond({bucket:UInt32}), 'UTC') AS b, group_id, topic, partition,
           argMax(lag, occurred_at) AS lag
    FROM consumer_lag WHERE occurred_at >= {since:DateTime64(6, 'UTC')}
    GROUP BY b, group_id, topic, partition
)
GROUP BY b, group_id
ORDER BY b, group_id
"""

# Each partition's newest sample: its lag now and the group member that owns it.
LAG_NOW_SQL = """
SELECT group_id, topic, partition, argMax(owner, occurred_at) AS owner, argMax(committed, occurred_at) AS committed,
       argMax(end_offset, occurred_at) AS end_offset, argMax(lag, occurred_at) AS lag,
       toString(max(occurred_at)) AS sampled_at
FROM consumer_lag WHERE occurred_at >= {since:DateTime64(6, 'UTC')}
GROUP BY group_id, topic, partition
ORDER BY group_id, lag DESC, topic, partition
LIMIT {limit:UInt32}
"""
LAG_ROWS = 500
LAG_BUCKETS_S = (15, 30, 60, 120, 300, 600, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400)
LAG_POINTS = 60

# SLOs (docs/slo.md): slo_burn holds requests and bad ones per tenant, SLO and window ending now;
# summed over tenants it is the platform's burn (the operator's filter narrows it to one tenant).
SLO_BURN_SQL = f"""
SELECT slo, objective, `window` AS win, window_s, sum(requests) AS requests, sum(bad) AS bad
FROM slo_burn WHERE {_SCOPE}
GROUP BY slo, objective, win, window_s
ORDER BY slo, window_s
"""

SLO_TENANTS_SQL = f"""
SELECT tenant, slo, objective, requests, bad FROM slo_budget WHERE {_SCOPE} ORDER BY tenant, slo
"""

SLO_OPEN_SQL = f"""
SELECT tenant, slo, severity, long_window_s, short_window_s, toString(since) AS since_at, long_burn_rate,
       short_burn_rate, threshold
FROM slo_alerts_open WHERE {_SCOPE}
ORDER BY since_at DESC, tenant, slo, severity
"""

SLO_ALERTS_SQL = f"""
SELECT tenant, slo, severity, state, long_window_s, short_window_s, long_burn_rate, short_burn_rate, threshold,
       toString(evaluated_at) AS evaluated
FROM slo_burn_rate_alerted WHERE evaluated_at >= {{since:DateTime64(6, 'UTC')}} AND {_SCOPE}
ORDER BY evaluated_at DESC, source_offset DESC, event_id DESC
LIMIT 1 BY tenant, slo, severity, long_window_s, state, evaluated_at
LIMIT 50
"""
SLO_WINDOWS: tuple[tuple[str, int], ...] = (
    ("5m", 300),
    ("30m", 1800),
    ("1h", 3600),
    ("6h", 21600),
    ("3d", 259200),
    ("30d", 2592000),
)

_STYLE = Style(
    background="transparent",
    plot_background="#ffffff",
    font_family="system-ui, sans-serif",
    colors=("#2563eb", "#16a34a", "#dc2626", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d"),
)
_SCRIPT = re.compile(r"<script\b.*?</script>", re.S)
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)


# --- sessions ------------------------------------------------------------------------


class Sessions:
    """Random session ids → Reader, in memory, each valid for `ttl_s` after login.

    Only the SHA-256 of an id is held, so the table's keys are no use to whoever reads them.
    """

    def __init__(self, ttl_s: float = SESSION_TTL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._by_digest: dict[bytes, tuple[Reader, float]] = {}

    @staticmethod
    def _digest(sid: str) -> bytes:
        return hashlib.sha256(sid.encode()).digest()

    def create(self, reader: Reader) -> str:
        now = self._clock()
        if len(self._by_digest) >= MAX_SESSIONS:
            self._by_digest = {d: v for d, v in self._by_digest.items() if v[1] > now}
            if len(self._by_digest) >= MAX_SESSIONS:  # full of live sessions: drop the oldest
                oldest = min(self._by_digest, key=lambda d: self._by_digest[d][1])
                del self._by_digest[oldest]
        sid = secrets.token_urlsafe(32)
        self._by_digest[self._digest(sid)] = (reader, now + self.ttl_s)
        return sid

    def get(self, sid: str | None) -> Reader | None:
        """The session's reader, or None if it is unknown, forged or expired (then forgotten)."""
        if not sid:
            return None
        digest = self._digest(sid)
        found = self._by_digest.get(digest)
        if found is None:
            return None
        reader, expires = found
        if self._clock() >= expires:
            del self._by_digest[digest]
            return None
        return reader

    def drop(self, sid: str | None) -> None:
        if sid:
            self._by_digest.pop(self._digest(sid), None)

    def __len__(self) -> int:
        return len(self._by_digest)


# --- rendering helpers -------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def chart(
    kind: str,
    title: str,
    x_labels: list[str],
    series: list[tuple[str, list[float | None]]],
    markers: tuple[str, ...] = (),
    **opts: Any,
) -> str:
    """One pygal chart as inline SVG (its config <script> removed: the page runs no JS).

    Series named in `markers` are drawn as dots without a line (events marked on a time axis).
    """
    cls = {
        "bar": pygal.Bar,
        "stacked": pygal.StackedBar,
        "hbar": pygal.HorizontalBar,
        "line": pygal.Line,
        "pie": pygal.Pie,
    }[kind]
    c = cls(
        style=_STYLE,
        width=720,
        height=320,
        disable_xml_declaration=True,
        js=[],
        x_label_rotation=30 if len(x_labels) > 6 else 0,
        legend_at_bottom=True,
        truncate_legend=40,
        **opts,
    )
    c.title = title
    if x_labels:
        c.x_labels = x_labels
    for name, values in series:
        if name in markers:
            c.add(name, values, stroke=False, dots_size=6)
        else:
            c.add(name, values)
    svg = _SCRIPT.sub("", c.render(is_unicode=True))
    return f'<figure class="chart" data-title="{_e(title)}">{svg}</figure>'


def pivot(
    rows: list[dict[str, Any]], x: str, name: Callable[[dict[str, Any]], str], value: str
) -> tuple[list[str], list[tuple[str, list[float | None]]]]:
    """Rows of (x, series, value) as chart input: sorted x labels and one value list per series (None = no row)."""
    xs = sorted({str(r[x]) for r in rows})
    cells: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        cells[name(r)][str(r[x])] = float(money(r[value]))
    return xs, [(n, [cells[n].get(v) for v in xs]) for n in sorted(cells)]


def empty(what: str, why: str) -> str:
    return f'<p class="empty"><strong>No {_e(what)} yet.</strong> {_e(why)}</p>'


class Raw(str):
    """Markup the page built itself (escaped parts only): a table cell that is not escaped again."""


def _cell(value: Any) -> str:
    return str(value) if isinstance(value, Raw) else _e(value)


def table(headers: list[str], rows: list[list[Any]], caption: str | None = None) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    cap = f"<caption>{_e(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def money(text: Any) -> Decimal:
    return Decimal(str(text))


def show(amount: Decimal, currency: str = "") -> str:
    """A money figure for people: two decimals if it has cents, else six significant places."""
    q = amount.quantize(Decimal("0.01")) if abs(amount) >= 1 else amount.quantize(Decimal("0.000001"))
    return f"{q} {currency}".strip()


def forecast(spent: Decimal, period: str, start: datetime, now: datetime) -> Decimal | None:
    """Straight-line projection of a budget's spend to the end of its period (month or day)."""
    if period == "month":
        length = timedelta(days=calendar.monthrange(start.year, start.month)[1])
    elif period == "day":
        length = timedelta(days=1)
    else:
        return None
    elapsed = min(max(now - start, timedelta(hours=1)), length)
    return spent * Decimal(length.total_seconds()) / Decimal(elapsed.total_seconds())


def lag_bucket_s(span_s: int) -> int:
    """The time bucket of the lag chart: the smallest that keeps the span to LAG_POINTS points or fewer.

    Why from the data's span, not the window: a demo run lasts minutes, a window is days; 15 s is
    the sampler's default interval, so finer buckets would only hold gaps.
    """
    for bucket in LAG_BUCKETS_S:
        if span_s <= bucket * LAG_POINTS:
            return bucket
    return LAG_BUCKETS_S[-1]


def ratio(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


@dataclass(frozen=True)
class Burn:
    """One SLO over one window: requests it counted, the bad ones, and what that burns of the budget."""

    slo: str
    objective: float
    window: str
    requests: int
    bad: int

    @property
    def error_ratio(self) -> float:
        return ratio(self.bad, self.requests)

    @property
    def burn_rate(self) -> float:
        """Error ratio over the error budget (1 - objective): 1 spends the budget exactly over 30 days."""
        return self.error_ratio / round(1 - self.objective, 9)

    @property
    def budget_remaining(self) -> float:
        """Share of the error budget left, meaningful for the 30-day window (negative when overspent)."""
        return 1 - self.burn_rate


@dataclass(frozen=True)
class Scope:
    """What one page request reads: the reader, the tenant filter and the window."""

    reader: Reader
    tenant: str | None
    days: int

    @property
    def since(self) -> datetime:
        return datetime.now(UTC) - timedelta(days=self.days)

    def params(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant or "",
            "all": int(self.tenant is None),
            "since": self.since.strftime("%Y-%m-%d %H:%M:%S"),
        }

    def label(self, tenant: str, name: str) -> str:
        """A series or bar label: prefixed by its tenant only when the page shows several."""
        return name if self.tenant is not None else f"{tenant} / {name}"


@dataclass(frozen=True)
class Page:
    slug: str
    title: str
    render: Callable[[Portal, Scope], str]
    operator_only: bool = False  # platform-wide data (lag, SLOs): no link and 403 for a tenant key


# --- the portal ----------------------------------------------------------------------------


class Portal:
    """The /portal pages and their session guard, over one service's access and query layer."""

    def __init__(self, access: ReadAccess, read: ReadRows, sessions: Sessions | None = None) -> None:
        self.access = access
        self.read = read
        self.sessions = sessions or Sessions()

    @staticmethod
    def owns(path: str) -> bool:
        return path == PREFIX or path.startswith(PREFIX + "/")

    def register(self, app: web.Application) -> None:
        app.router.add_get(LOGIN, self._login_form)
        app.router.add_post(LOGIN, self._login)
        app.router.add_get(LOGOUT, self._logout)
        app.router.add_post(LOGOUT, self._logout)
        app.router.add_get(PREFIX, self._to_home)
        for page in PAGES:
            app.router.add_get(f"{PREFIX}/{page.slug}", self._page_handler(page))

    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Called by the service's middleware for /portal paths: a session cookie or a header credential."""
        if request.path == LOGIN:
            return await handler(request)
        reader = self.sessions.get(request.cookies.get(COOKIE))
        if reader is not None and not reader.operator and not self.access.keys.active(reader.who):
            self.sessions.drop(request.cookies.get(COOKIE))  # the key was revoked or expired since login
            reader = None
        if reader is None and presented_secret(request.headers) is not None:
            try:
                reader = self.access.authorize(request.headers)
            except AccessDenied as exc:
                return _html(exc.status, _layout("Refused", f'<p class="error">{_e(exc.message)}</p>', None, None))
        if reader is None:
            return _redirect(LOGIN)
        request[READER] = reader
        return await handler(request)

    # --- handlers ----------------------------------------------------------------------

    async def _to_home(self, _request: web.Request) -> web.StreamResponse:
        return _redirect(f"{PREFIX}/")

    async def _login_form(self, request: web.Request) -> web.Response:
        return _html(200, _login_page(None))

    async def _login(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        secret = str(form.get("secret", "")).strip()
        try:
            if not secret:
                raise AccessDenied(401, "enter the read token (`ledgerflow token`) or a tenant API key")
            reader = self.access.authorize({"Authorization": f"Bearer {secret}"})
        except AccessDenied as exc:
            return _html(exc.status, _login_page(exc.message))
        self.sessions.drop(request.cookies.get(COOKIE))  # a new id at every login: no fixation
        sid = self.sessions.create(reader)
        resp = _redirect(f"{PREFIX}/")
        resp.set_cookie(
            COOKIE,
            sid,
            max_age=int(self.sessions.ttl_s),
            path=PREFIX,
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
        return resp

    async def _logout(self, request: web.Request) -> web.StreamResponse:
        self.sessions.drop(request.cookies.get(COOKIE))
        resp = _redirect(LOGIN)
        resp.del_cookie(COOKIE, path=PREFIX)
        return resp

    def _page_handler(self, page: Page) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            reader: Reader = request[READER]
            try:
                tenant = scoped_tenant(reader, request.query.get("tenant") or None)
                days = int(request.query.get("days", DEFAULT_DAYS))
                if not 1 <= days <= MAX_DAYS:
                    raise ValueError
            except AccessDenied as exc:
                return _html(exc.status, _layout("Refused", f'<p class="error">{_e(exc.message)}</p>', reader, None))
            except ValueError:
                body = f'<p class="error">days must be a whole number from 1 to {MAX_DAYS}</p>'
                return _html(400, _layout("Bad request", body, reader, None))
            if page.operator_only and not reader.operator:
                refusal = f"{page.title} is platform-wide: the operator's read token only"
                body = f'<p class="error">{_e(refusal)}</p>'
                return _html(403, _layout("Refused", body, reader, None))
            scope = Scope(reader, tenant, days)
            body = await asyncio.get_running_loop().run_in_executor(None, page.render, self, scope)
            return _html(200, _layout(page.title, body, reader, scope, page.slug))

        return handler

    # --- pages (run in a worker thread: read_rows blocks) --------------------------------

    def spend_page(self, scope: Scope) -> str:
        """Spend per day from the charges themselves, checked against the rollups agent's snapshots.

        Why the charts read `tokens_charged`, not the snapshots: the charges are the fact (deduplicated
        by event id here), include what the agent has not folded yet, and are what billing exports;
        the snapshots (`savings_daily`) must reconcile with them exactly (docs/accounting.md), so the
        page says whether they do, per day, instead of drawing a second copy of the same numbers.
        """
        params = scope.params()
        rows = self.read(SPEND_SQL, params)
        anomalies = self.read(ANOMALIES_SQL, params)
        if not rows:
            return empty("charges", f"Nothing was charged in the last {scope.days} days.") + self._anomalies(anomalies)
        snapshots = self.read(SNAPSHOT_SAVINGS_SQL, params)
        out: list[str] = []
        for currency in sorted({r["currency"] for r in rows}):
            mine = [r for r in rows if r["currency"] == currency]
            days, per_model = pivot(mine, "day", lambda r: scope.label(r["tenant"], r["model"]), "cost")
            base: dict[str, Decimal] = defaultdict(Decimal)
            spent: dict[str, Decimal] = defaultdict(Decimal)
            for r in mine:
                base[r["day"]] += money(r["baseline_cost"])
                spent[r["day"]] += money(r["cost"])
            total, total_base = sum(spent.values(), Decimal()), sum(base.values(), Decimal())
            saved = total_base - total
            pct = f" ({saved / total_base * 100:.1f}%)" if total_base else ""
            out.append(
                f'<div class="figures"><div><span>spent</span><b>{_e(show(total, currency))}</b></div>'
                f"<div><span>baseline</span><b>{_e(show(total_base, currency))}</b></div>"
                f"<div><span>saved</span><b>{_e(show(saved, currency) + pct)}</b></div></div>"
            )
            out.append(
                chart(
                    "stacked",
                    f"Spend per day and model ({currency})",
                    days,
                    per_model,
                )
            )
            worst: dict[str, float] = {}  # the largest anomalous hour of each day, marked on the day
            for a in anomalies:
                if a["currency"] == currency and a["day"] in spent:
                    worst[a["day"]] = max(worst.get(a["day"], 0.0), float(money(a["spend"])))
            lines: list[tuple[str, list[float | None]]] = [
                ("spent", [float(spent[d]) for d in days]),
                ("baseline", [float(base[d]) for d in days]),
                ("saved", [float(base[d] - spent[d]) for d in days]),
            ]
            if worst:
                lines.append(("cost anomaly (hour's spend)", [worst.get(d) for d in days]))
            out.append(
                chart(
                    "line",
                    f"Spend, baseline and savings per day ({currency})",
                    days,
                    lines,
                    markers=("cost anomaly (hour's spend)",),
                    fill=False,
                )
            )
            snaps = {r["day"]: money(r["savings"]) for r in snapshots if r["currency"] == currency}
            out.append(self._reconciled(currency, days, base, spent, snaps))
        return "".join(out) + self._anomalies(anomalies)

    @staticmethod
    def _reconciled(
        currency: str, days: list[str], base: dict[str, Decimal], spent: dict[str, Decimal], snaps: dict[str, Decimal]
    ) -> str:
        """Whether the rollups agent's snapshots agree with the charges, day by day (exact Decimals)."""
        if not snaps:
            return (
                '<p class="note" id="reconciled">No savings snapshots for these days: the rollups agent '
                "(`ledgerflow up` runs it) records one per tenant, day and model as charges arrive.</p>"
            )
        differ = [
            [d, show(base[d] - spent[d], currency), show(snaps[d], currency) if d in snaps else "none"]
            for d in days
            if snaps.get(d) != base[d] - spent[d]
        ]
        if not differ:
            return (
                '<p class="note" id="reconciled">The rollups agent\'s savings snapshots (savings_daily) agree '
                f"with the charges on every day shown, to the last of 12 places ({_e(currency)}).</p>"
            )
        return (
            f'<p class="note" id="reconciled">The rollups agent\'s snapshots differ from the charges on {len(differ)} '
            "of the days shown (the agent behind, or charges it has not folded yet):</p>"
            + table(["day", "saved (charges)", "saved (snapshots)"], differ)
        )

    @staticmethod
    def _anomalies(rows: list[dict[str, Any]]) -> str:
        if not rows:
            return empty(
                "cost anomalies",
                "The cost-anomalies agent reports an hour whose spend is far above the hours before it "
                "(`ledgerflow demo` injects a spike).",
            )
        return "<h2>Cost anomalies</h2>" + table(
            ["hour (UTC)", "tenant", "spend", "expected", "score", "detector"],
            [
                [
                    r["hour"][:16],
                    r["tenant"],
                    show(money(r["spend"]), r["currency"]),
                    show(money(r["expected"]), r["currency"]),
                    f"{float(r['score']):.4f} ≥ {float(r['threshold']):.4f}",
                    r["detector"],
                ]
                for r in rows
            ],
        )

    def budgets_page(self, scope: Scope) -> str:
        """Each budget's spend in its newest period against its limit, with the month-end forecast.

        The forecast is the spend-forecasts agent's recorded one (`spend_forecasts`, method named:
        run_rate or river's HoltWinters) when it recorded one for that period; otherwise (daily
        budgets, or before the agent ran) the portal's own straight line, and the page says which.
        """
        params = scope.params()
        budgets = self.read(BUDGETS_SQL, params)
        if not budgets:
            return empty("budgets", "Set one with `ledgerflow budgets set`; spend against it appears here.")
        spent = {(r["tenant"], r["budget_id"]): r for r in self.read(BUDGET_SPENT_SQL, params)}
        recorded = {(r["tenant"], r["budget_id"], r["period_start"]): r for r in self.read(FORECASTS_SQL, params)}
        now = datetime.now(UTC)
        labels: list[str] = []
        series: dict[str, list[float | None]] = {"spent": [], "period-end forecast": [], "limit": []}
        rows: list[list[Any]] = []
        for b in budgets:
            found = spent.get((b["tenant"], b["budget_id"]))
            amount = money(found["spent"]) if found else Decimal(0)
            start = datetime.fromisoformat(found["period_start"]).replace(tzinfo=UTC) if found else now
            fc = recorded.get((b["tenant"], b["budget_id"], found["period_start"])) if found else None
            ahead: Decimal | None
            if fc is not None:
                ahead, method = money(fc["forecast"]), f"{fc['method']} ({fc['days_of_history']} closed days)"
                if money(fc["month_to_date"]) != amount:  # it re-records only when it moves by a cent or more
                    line = forecast(amount, b["period"], start, now)
                    method += (
                        f"; made at {show(money(fc['month_to_date']), b['currency'])} spent (re-recorded when it "
                        f"moves by a cent); straight line now {show(line, b['currency']) if line is not None else '-'}"
                    )
            else:
                ahead, method = forecast(amount, b["period"], start, now), "straight line (portal; none recorded)"
            limit = money(b["limit_amount"])
            labels.append(scope.label(b["tenant"], b["budget_id"]))
            series["spent"].append(float(amount))
            series["period-end forecast"].append(float(ahead) if ahead is not None else None)
            series["limit"].append(float(limit))
            used = f"{amount / limit * 100:.1f}%" if limit else "-"
            cur = b["currency"]
            over = ahead - limit if ahead is not None else None
            variance = "-" if over is None else ("+" if over > 0 else "") + show(over, cur)
            rows.append(
                [
                    labels[-1],
                    f"{b['scope']} {b['scope_id']}",
                    b["period"],
                    show(amount, cur),
                    show(ahead, cur) if ahead is not None else "-",
                    method if ahead is not None else "-",
                    show(limit, cur),
                    used,
                    variance,
                    "yes" if b["enforced"] else "no",
                ]
            )
        return chart("hbar", "Spend against budget (current period)", labels, list(series.items())) + table(
            [
                "budget",
                "scope",
                "period",
                "spent",
                "forecast",
                "forecast method",
                "limit",
                "used",
                "forecast - limit",
                "enforced",
            ],
            rows,
        )

    def privacy_page(self, scope: Scope) -> str:
        rows = self.read(DP_SQL, scope.params())
        if not rows:
            return empty("DP budgets", "Grant one with `ledgerflow dp grant`; what remains of it appears here.")
        labels = [scope.label(r["tenant"], r["metric_set"]) for r in rows]
        return chart(
            "hbar",
            "Privacy budget (ε) remaining per metric set",
            labels,
            [
                ("ε remaining", [float(r["epsilon_remaining"]) for r in rows]),
                ("ε granted", [float(r["epsilon_granted"]) for r in rows]),
            ],
        ) + table(
            ["metric set", "composition", "period", "ε granted", "ε remaining", "charged", "refused"],
            [
                [
                    label,
                    r["composition"],
                    r["period"],
                    r["epsilon_granted"],
                    r["epsilon_remaining"],
                    r["queries_charged"],
                    r["queries_refused"],
                ]
                for label, r in zip(labels, rows, strict=True)
            ],
        )

    def ledger_page(self, scope: Scope) -> str:
        params = scope.params()
        rows = self.read(CHECKPOINTS_SQL, params)
        out: list[str] = []
        if rows:
            labels = [scope.label(r["tenant"], r["chain_tenant"]) for r in rows]
            out.append(
                chart(
                    "bar",
                    "Entries under the newest signed checkpoint, per chain",
                    labels,
                    [("tree size", [float(r["tree_size"]) for r in rows])],
                )
                + table(
                    ["chain", "tree size", "root hash", "key", "signed at", "checkpoints"],
                    [
                        [label, r["tree_size"], r["root_hash"][:16] + "…", r["key_id"], r["signed_at"], r["signed"]]
                        for label, r in zip(labels, rows, strict=True)
                    ],
                )
            )
        else:
            out.append(empty("ledger checkpoints", "The ledger agent signs one per chain as audit entries arrive."))
        out.append(self._verifications(scope, self.read(VERIFICATIONS_SQL, params)))
        return "".join(out)

    @staticmethod
    def _verifications(scope: Scope, rows: list[dict[str, Any]]) -> str:
        """The newest `audit verify` result per chain and source: ok, or FAILED at seq N and why."""
        if not rows:
            return empty(
                "verification results",
                "Run `ledgerflow audit verify` (it records a LedgerVerified per chain and source; "
                "`--no-record` records none).",
            )
        body: list[list[Any]] = []
        for r in rows:
            if r["ok"]:
                status = Raw('<span class="ok">ok</span>')
            else:
                at = f" at seq {r['first_bad_seq']}" if r["first_bad_seq"] is not None else ""
                status = Raw(f'<span class="failed">FAILED{_e(at)}</span>: {_e(r["reason"] or "no reason given")}')
            body.append(
                [
                    scope.label(r["tenant"], r["chain_tenant"]),
                    r["source"],
                    status,
                    r["entries_checked"],
                    r["checkpoints_checked"],
                    r["verified_at"][:19],
                    f"{r['duration_ms']} ms",
                    f"{r['verifier']} · key {r['key_id']}",
                ]
            )
        return "<h2>Last verification</h2>" + table(
            ["chain", "source", "result", "entries", "checkpoints", "verified at (UTC)", "took", "verifier"], body
        )

    def routing_page(self, scope: Scope) -> str:
        shares = self.read(SHARES_SQL, scope.params())
        regrets = self.read(REGRET_SQL, scope.params())
        out = []
        if shares:
            out.append(
                chart(
                    "pie",
                    "Route mix: calls per model (bandit)",
                    [],
                    [(scope.label(r["tenant"], r["model"]), [float(r["calls"])]) for r in shares],
                )
            )
        else:
            out.append(empty("routing decisions", "The router records one per bandit-routed call."))
        if regrets:
            by_tenant: dict[str, list[float | None]] = defaultdict(list)
            for r in regrets:
                by_tenant[r["tenant"]].append(float(r["cumulative_regret"]))
            longest = max(len(v) for v in by_tenant.values())
            out.append(
                chart(
                    "line",
                    "Cumulative regret per priors version",
                    [str(i + 1) for i in range(longest)],
                    [(scope.label(t, "regret") if scope.tenant is None else "regret", v) for t, v in by_tenant.items()],
                )
            )
        else:
            out.append(
                empty("regret records", f"None in the last {scope.days} days; one comes with each priors version.")
            )
        return "".join(out)

    def policy_page(self, scope: Scope) -> str:
        denials = self.read(DENIALS_SQL, scope.params())
        redactions = self.read(REDACTIONS_SQL, scope.params())
        out = []
        if denials:
            out.append(
                chart(
                    "bar",
                    "Policy denials per day",
                    *pivot(denials, "day", lambda r: scope.label(r["tenant"], "denied"), "denials"),
                )
            )
        else:
            out.append(empty("policy denials", f"Nothing was denied in the last {scope.days} days."))
        if redactions:
            out.append(
                chart(
                    "hbar",
                    "Values masked at ingress, by kind",
                    *pivot(redactions, "kind", lambda r: scope.label(r["tenant"], "masked"), "masked"),
                )
            )
        else:
            out.append(empty("redactions", f"Nothing was masked in the last {scope.days} days."))
        return "".join(out)

    # --- operator-only pages: platform-wide data -----------------------------------------

    def slo_burns(self, scope: Scope) -> list[Burn]:
        """Every SLO over every window, summed over the tenants in scope (a window without requests: 0 of 0)."""
        found = self.read(SLO_BURN_SQL, scope.params())
        objectives = {r["slo"]: float(r["objective"]) for r in found}
        counts = {(r["slo"], r["win"]): (int(r["requests"]), int(r["bad"])) for r in found}
        return [
            Burn(slo, objectives[slo], win, *counts.get((slo, win), (0, 0)))
            for slo in sorted(objectives)
            for win, _s in SLO_WINDOWS
        ]

    def slo_page(self, scope: Scope) -> str:
        params = scope.params()
        burns = self.slo_burns(scope)
        statement = (
            '<p class="note" id="slo-statement">The SLOs, as <code>docs/slo.md</code> states them: '
            "<b>availability</b> 99.9% of requests to the public routes answered without a server error "
            "(a 5xx, or a stream that broke on our side; 4xx are the caller's and count as good); "
            "<b>ask_latency</b> 95% of whole (not streamed) 2xx answers of <code>/v1/ask</code> in under "
            "1200 ms end to end. Each has an error budget of 1 − objective over 30 days; a window's burn "
            "rate is its error ratio over that budget (1 spends it exactly in 30 days). docs/slo.md says "
            "what each alert means and what to do.</p>"
        )
        out = [statement]
        if not burns:
            out.append(
                empty(
                    "requests",
                    "The gateway records a RequestCompleted per answered request; send traffic "
                    "(`ledgerflow demo`) and the SLIs appear here.",
                )
            )
        else:
            month = [b for b in burns if b.window == "30d"]
            out.append(
                '<div class="figures">'
                + "".join(
                    f"<div><span>{_e(b.slo)} · objective {b.objective:.1%} · 30 days</span>"
                    f"<b>{b.budget_remaining:.1%} of the error budget left</b>"
                    f"<span>{b.bad} bad of {b.requests}</span></div>"
                    for b in month
                )
                + "</div>"
            )
            out.append(
                chart(
                    "hbar",
                    "Error budget remaining over 30 days (%)",
                    [b.slo for b in month],
                    [("budget remaining %", [round(b.budget_remaining * 100, 3) for b in month])],
                )
            )
            wins = [w for w, _s in SLO_WINDOWS]
            out.append(
                chart(
                    "bar",
                    "Burn rate per window (1 = the budget lasts exactly 30 days)",
                    wins,
                    [
                        (slo, [next(b.burn_rate for b in burns if b.slo == slo and b.window == w) for w in wins])
                        for slo in sorted({b.slo for b in burns})
                    ],
                )
            )
            out.append(
                table(
                    ["SLO", "window", "requests", "bad", "error ratio", "burn rate"],
                    [[b.slo, b.window, b.requests, b.bad, f"{b.error_ratio:.4%}", f"{b.burn_rate:.2f}"] for b in burns],
                )
            )
            per_tenant = self.read(SLO_TENANTS_SQL, params)
            if per_tenant and scope.tenant is None:
                out.append(
                    table(
                        ["tenant", "SLO", "requests (30 days)", "bad", "budget left"],
                        [
                            [
                                r["tenant"],
                                r["slo"],
                                r["requests"],
                                r["bad"],
                                f"{_month_burn(r).budget_remaining:.1%}",
                            ]
                            for r in per_tenant
                        ],
                        caption="Per tenant",
                    )
                )
        out.append(self._slo_alerts(scope))
        return "".join(out)

    def _slo_alerts(self, scope: Scope) -> str:
        params = scope.params()
        open_now = self.read(SLO_OPEN_SQL, params)
        recent = self.read(SLO_ALERTS_SQL, params)
        out = ["<h2>Burn-rate alerts</h2>"]
        if open_now:
            out.append(
                table(
                    ["tenant", "SLO", "severity", "windows", "since (UTC)", "burn long / short", "threshold"],
                    [
                        [
                            r["tenant"],
                            r["slo"],
                            Raw(f'<span class="failed">{_e(r["severity"])}</span>'),
                            f"{_window(int(r['long_window_s']))} & {_window(int(r['short_window_s']))}",
                            r["since_at"][:19],
                            f"{float(r['long_burn_rate']):.2f} / {float(r['short_burn_rate']):.2f}",
                            f"{float(r['threshold']):g}",
                        ]
                        for r in open_now
                    ],
                    caption="Firing now",
                )
            )
        else:
            out.append('<p class="note" id="slo-open">No burn-rate alert is firing.</p>')
        if recent:
            out.append(
                table(
                    ["evaluated at (UTC)", "tenant", "SLO", "severity", "state", "windows", "burn long / short"],
                    [
                        [
                            r["evaluated"][:19],
                            r["tenant"],
                            r["slo"],
                            r["severity"],
                            r["state"],
                            f"{_window(int(r['long_window_s']))} & {_window(int(r['short_window_s']))}",
                            f"{float(r['long_burn_rate']):.2f} / {float(r['short_burn_rate']):.2f}",
                        ]
                        for r in recent
                    ],
                    caption=f"Fired and resolved in the last {scope.days} days",
                )
            )
        else:
            out.append(
                empty(
                    "burn-rate alerts",
                    f"None in the last {scope.days} days; the slo-burn agent (run by `ledgerflow up`) records "
                    "one when a rule fires or resolves.",
                )
            )
        return "".join(out)

    def lag_series(self, scope: Scope) -> tuple[int, list[str], list[tuple[str, list[float | None]]]]:
        """(bucket seconds, bucket labels, lag per group): per bucket, each partition's newest sample summed."""
        params = scope.params()
        span = self.read(LAG_SPAN_SQL, params)
        if not span or int(span[0]["samples"]) == 0:
            return 0, [], []
        bucket = lag_bucket_s(int(span[0]["span_s"]))
        rows = self.read(LAG_SERIES_SQL, {**params, "bucket": bucket})
        labels = sorted({r["at"] for r in rows})
        cells: dict[str, dict[str, float]] = defaultdict(dict)
        for r in rows:
            cells[r["group_id"]][r["at"]] = float(int(r["lag"]))
        return bucket, labels, [(g, [cells[g].get(at) for at in labels]) for g in sorted(cells)]

    def lag_page(self, scope: Scope) -> str:
        bucket, labels, series = self.lag_series(scope)
        note = '<p class="note">Consumer lag is platform-wide (every tenant\'s records share the topics).</p>'
        if not series:
            return note + empty(
                "lag samples",
                f"None in the last {scope.days} days: the projections service samples every consumer group "
                "every `lag_sample_interval_s` (ledgerflow up; 0 turns it off); `ledgerflow status` shows lag live.",
            )
        now = self.read(LAG_NOW_SQL, {**scope.params(), "limit": LAG_ROWS})
        per_group: dict[str, int] = defaultdict(int)
        for r in now:
            per_group[r["group_id"]] += int(r["lag"])
        figures = "".join(f"<div><span>{_e(g)}</span><b>{lag:,}</b></div>" for g, lag in sorted(per_group.items()))
        cut = slice(5, 19) if bucket < 60 else slice(5, 16) if bucket < 86400 else slice(0, 10)
        short = [at[cut] for at in labels]  # MM-DD hh:mm[:ss], or the date for day buckets
        return (
            note
            + f'<div class="figures">{figures}</div>'
            + chart("line", f"Lag per consumer group (records; {_window(bucket)} buckets, UTC)", short, series)
            + table(
                ["group", "topic", "partition", "owner", "committed", "end offset", "lag", "sampled at (UTC)"],
                [
                    [
                        r["group_id"],
                        r["topic"],
                        r["partition"],
                        r["owner"] or "(none: group empty or rebalancing)",
                        r["committed"] if int(r["committed"]) >= 0 else "(nothing committed)",
                        r["end_offset"],
                        r["lag"],
                        r["sampled_at"][:19],
                    ]
                    for r in now
                ],
                caption=f"Each partition's newest sample (at most {LAG_ROWS}, largest lag first)",
            )
        )


def _month_burn(r: dict[str, Any]) -> Burn:
    return Burn(r["slo"], float(r["objective"]), "30d", int(r["requests"]), int(r["bad"]))


def _window(seconds: int) -> str:
    """3600 → 1h, 259200 → 3d, 900 → 15m, 15 → 15s."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


PAGES: tuple[Page, ...] = (
    Page("", "Spend and savings", Portal.spend_page),
    Page("budgets", "Budgets", Portal.budgets_page),
    Page("privacy", "DP budgets", Portal.privacy_page),
    Page("ledger", "Ledger", Portal.ledger_page),
    Page("routing", "Routing", Portal.routing_page),
    Page("policy", "Policy", Portal.policy_page),
    Page("slo", "SLOs", Portal.slo_page, operator_only=True),
    Page("lag", "Consumer lag", Portal.lag_page, operator_only=True),
)
PATHS: tuple[str, ...] = (PREFIX, LOGIN, LOGOUT, *(f"{PREFIX}/{p.slug}" for p in PAGES))


# --- layout ----------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#111;background:#f6f7f9}
header{background:#111827;color:#fff;padding:.6rem 1.2rem;display:flex;gap:1.2rem;align-items:center;flex-wrap:wrap}
header a{color:#cbd5e1;text-decoration:none}header a.on{color:#fff;font-weight:600}
header .who{margin-left:auto;color:#94a3b8}header form{display:inline}
main{padding:1rem 1.2rem;max-width:1100px}
figure.chart{background:#fff;border:1px solid #e5e7eb;margin:0 0 1rem;padding:.5rem;max-width:740px}
figure.chart svg{width:100%;height:auto}
.empty{background:#fff;border:1px dashed #9ca3af;padding:1rem;max-width:720px}
.error{color:#b91c1c}
table{border-collapse:collapse;background:#fff;margin-bottom:1rem}
td,th{border:1px solid #e5e7eb;padding:.25rem .5rem;text-align:left;font-size:.9rem}
.figures{display:flex;gap:1rem;margin-bottom:1rem}
.figures div{background:#fff;border:1px solid #e5e7eb;padding:.5rem 1rem}
.figures span{display:block;color:#6b7280;font-size:.8rem}
.ok{color:#15803d;font-weight:600}.failed{color:#b91c1c;font-weight:600}
.note{color:#374151;max-width:740px}
"""


def _layout(title: str, body: str, reader: Reader | None, scope: Scope | None, slug: str | None = None) -> str:
    nav = ""
    if reader is not None:
        keep = f"?tenant={_e(scope.tenant)}" if scope and scope.tenant and reader.operator else ""
        links = "".join(
            f'<a href="{PREFIX}/{p.slug}{keep}"{" class=on" if p.slug == slug else ""}>{_e(p.title)}</a>'
            for p in PAGES
            if reader.operator or not p.operator_only
        )
        who = "operator · every tenant" if reader.operator else f"tenant {reader.tenant}"
        if reader.operator and scope is not None:
            who = f"operator · {'tenant ' + scope.tenant if scope.tenant else 'every tenant'}"
        nav = (
            f"{links}<span class=who>{_e(who)}</span>"
            f'<form method="post" action="{LOGOUT}"><button type="submit">Log out</button></form>'
        )
    filt = ""
    if reader is not None and reader.operator and scope is not None:
        filt = (
            f'<form method="get" class="filter"><label>tenant <input name="tenant" value="{_e(scope.tenant or "")}"'
            f' placeholder="every tenant"></label> <label>days <input name="days" size="4" value="{scope.days}">'
            "</label> <button>Show</button></form>"
        )
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{_e(title)} · ledgerflow</title>'
        f'<meta name="viewport" content="width=device-width"><style>{_CSS}</style></head>'
        f"<body><header><b>ledgerflow</b>{nav}</header><main><h1>{_e(title)}</h1>{filt}{body}</main></body></html>"
    )


def _login_page(error: str | None) -> str:
    msg = f'<p class="error" id="login-error">{_e(error)}</p>' if error else ""
    form = (
        f'{msg}<form method="post" action="{LOGIN}" id="login">'
        '<label>Read token or tenant API key<br><input type="password" name="secret" autocomplete="off" autofocus>'
        '</label> <button type="submit">Log in</button></form>'
        "<p>The operator's token: <code>ledgerflow token</code>. A tenant admin's key needs the "
        "<code>admin</code> or <code>analyst</code> role.</p>"
    )
    return _layout("Log in", form, None, None)


def _html(status: int, text: str) -> web.Response:
    return web.Response(
        status=status,
        text=text,
        content_type="text/html",
        headers={
            "Content-Security-Policy": _CSP,
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
        },
    )


def _redirect(location: str) -> web.Response:
    """303 See Other: after a form POST the browser follows with a GET."""
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})
