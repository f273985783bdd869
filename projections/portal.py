"""The portal: server-rendered pages of the read side for operators and tenant admins.

Why here: the portal is a reader of projections like any analyst (DESIGN.md, CQRS), so it
lives in the projections service and reads only through its query layer (`read_rows`,
parameterised SQL on read-only handles), never from Kafka. Every query is scoped with
`scoped_tenant`: the operator sees every tenant (or one, `?tenant=`), a tenant key its own.

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

from projections.access import AccessDenied, ReadAccess, Reader, presented_secret, scoped_tenant

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

SPEND_SQL = f"""
SELECT toString(toDate(c.occurred_at, 'UTC')) AS day, c.tenant AS tenant, c.model AS model, c.currency AS currency,
       count() AS requests,
       toString(sum(c.cost)) AS cost, toString(sum(ifNull(c.baseline_cost, c.cost))) AS baseline_cost,
       toString(sum(ifNull(c.savings, toDecimal128(0, 12)))) AS savings
FROM (SELECT * FROM tokens_charged WHERE occurred_at >= {{since:DateTime64(6, 'UTC')}} AND {_SCOPE}
      LIMIT 1 BY event_id) AS c
GROUP BY day, tenant, model, currency
ORDER BY currency, day, tenant, model
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


def chart(kind: str, title: str, x_labels: list[str], series: list[tuple[str, list[float | None]]], **opts: Any) -> str:
    """One pygal chart as inline SVG (its config <script> removed: the page runs no JS)."""
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


def table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_e(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


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
        request["reader"] = reader
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
            reader: Reader = request["reader"]
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
            scope = Scope(reader, tenant, days)
            body = await asyncio.get_running_loop().run_in_executor(None, page.render, self, scope)
            return _html(200, _layout(page.title, body, reader, scope, page.slug))

        return handler

    # --- pages (run in a worker thread: read_rows blocks) --------------------------------

    def spend_page(self, scope: Scope) -> str:
        rows = self.read(SPEND_SQL, scope.params())
        if not rows:
            return empty("charges", f"Nothing was charged in the last {scope.days} days.")
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
            out.append(
                chart(
                    "line",
                    f"Spend against the baseline per day ({currency})",
                    days,
                    [("spent", [float(spent[d]) for d in days]), ("baseline", [float(base[d]) for d in days])],
                    fill=False,
                )
            )
        return "".join(out)

    def budgets_page(self, scope: Scope) -> str:
        budgets = self.read(BUDGETS_SQL, scope.params())
        if not budgets:
            return empty("budgets", "Set one with `ledgerflow budgets set`; spend against it appears here.")
        spent = {(r["tenant"], r["budget_id"]): r for r in self.read(BUDGET_SPENT_SQL, scope.params())}
        now = datetime.now(UTC)
        labels: list[str] = []
        series: dict[str, list[float | None]] = {"spent": [], "period-end forecast": [], "limit": []}
        rows: list[list[Any]] = []
        for b in budgets:
            found = spent.get((b["tenant"], b["budget_id"]))
            amount = money(found["spent"]) if found else Decimal(0)
            start = datetime.fromisoformat(found["period_start"]).replace(tzinfo=UTC) if found else now
            ahead = forecast(amount, b["period"], start, now)
            limit = money(b["limit_amount"])
            labels.append(scope.label(b["tenant"], b["budget_id"]))
            series["spent"].append(float(amount))
            series["period-end forecast"].append(float(ahead) if ahead is not None else None)
            series["limit"].append(float(limit))
            used = f"{amount / limit * 100:.1f}%" if limit else "-"
            cur = b["currency"]
            rows.append(
                [
                    labels[-1],
                    f"{b['scope']} {b['scope_id']}",
                    b["period"],
                    show(amount, cur),
                    show(ahead, cur) if ahead is not None else "-",
                    show(limit, cur),
                    used,
                    "yes" if b["enforced"] else "no",
                ]
            )
        return chart("hbar", "Spend against budget (current period)", labels, list(series.items())) + table(
            ["budget", "scope", "period", "spent", "forecast", "limit", "used", "enforced"], rows
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
        rows = self.read(CHECKPOINTS_SQL, scope.params())
        if not rows:
            return empty("ledger checkpoints", "The ledger agent signs one per chain as audit entries arrive.")
        labels = [scope.label(r["tenant"], r["chain_tenant"]) for r in rows]
        return chart(
            "bar",
            "Entries under the newest signed checkpoint, per chain",
            labels,
            [("tree size", [float(r["tree_size"]) for r in rows])],
        ) + table(
            ["chain", "tree size", "root hash", "key", "signed at", "checkpoints"],
            [
                [label, r["tree_size"], r["root_hash"][:16] + "…", r["key_id"], r["signed_at"], r["signed"]]
                for label, r in zip(labels, rows, strict=True)
            ],
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


PAGES: tuple[Page, ...] = (
    Page("", "Spend and savings", Portal.spend_page),
    Page("budgets", "Budgets", Portal.budgets_page),
    Page("privacy", "DP budgets", Portal.privacy_page),
    Page("ledger", "Ledger", Portal.ledger_page),
    Page("routing", "Routing", Portal.routing_page),
    Page("policy", "Policy", Portal.policy_page),
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
"""


def _layout(title: str, body: str, reader: Reader | None, scope: Scope | None, slug: str | None = None) -> str:
    nav = ""
    if reader is not None:
        keep = f"?tenant={_e(scope.tenant)}" if scope and scope.tenant and reader.operator else ""
        links = "".join(
            f'<a href="{PREFIX}/{p.slug}{keep}"{" class=on" if p.slug == slug else ""}>{_e(p.title)}</a>' for p in PAGES
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
