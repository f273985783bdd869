"""The portal's sessions and scoping over HTTP (fast; the real-browser checks are in test_portal_browser.py).

A real projections service on chDB holds demo rows of two tenants, built from the same events the
sink would land (`event_to_row`); the portal reads them only through the service's query layer.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from domain.keys import KeyStore
from ledgerflow.settings import hash_key
from projections.access import ReadAccess, Reader
from projections.portal import COOKIE, LOGIN, PAGES, SESSION_TTL_S, Scope, Sessions, forecast, lag_bucket_s
from projections.schema import columns_for, event_to_row, table_for
from projections.service import ProjectionService
from streams.events import PLATFORM_TENANT, Event, RequestCompleted, SloBurnRateAlerted
from tests import factories as f
from tests.test_tenant_isolation import issued

OPERATOR_TOKEN = "lf_read_portal_operator_token"
ADMIN_SECRET = {"acme": "lf_portal_admin_acme", "globex": "lf_portal_admin_globex", "initech": "lf_portal_admin_ini"}
USER_SECRET = "lf_portal_user_acme"  # a key without a read role
TENANTS = ("acme", "globex")  # initech has a key but no rows: its pages show the empty states
TENANT_PAGES = tuple(p for p in PAGES if not p.operator_only)
OPERATOR_PAGES = tuple(p for p in PAGES if p.operator_only)


def _at(e: Event, when: datetime) -> Event:
    return replace(e, envelope=replace(e.envelope, occurred_at=when))  # type: ignore[type-var]


def demo_events(now: datetime | None = None) -> list[Event]:
    """A few days of every fact the portal charts, for both tenants (no string of one names the other)."""
    now = now or datetime.now(UTC)
    month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    events: list[Event] = []
    for n, tenant in enumerate(TENANTS, start=1):
        budget = f"b-{tenant}-month"
        for day in range(3):
            for model, cost in (("sim-small", "0.25"), ("sim-large", "1.5")):
                c = f.charge(tenant, str(Decimal(cost) * n * (day + 1)))
                events.append(_at(replace(c, model=model), now - timedelta(days=day, hours=1)))
        events.append(replace(f.budget_set(tenant), budget_id=budget, limit_amount=Decimal(40 * n)))
        for _ in range(2):
            events.append(
                replace(f.budget_settled(tenant), budget_id=budget, period_start=month, actual_amount=Decimal(6 * n))
            )
        events.append(replace(f.dp_grant(tenant), metric_set=f"usage_{tenant}"))
        events.append(replace(f.dp_charge(tenant), metric_set=f"usage_{tenant}", epsilon_remaining=1.0 - 0.3 * n))
        events.append(replace(f.checkpoint(tenant), tree_size=4 * n))
        for model in ("sim-small", "sim-small", "sim-large"):
            events.append(replace(f.route(tenant), chosen_model=model))
        for i in range(3):
            r = replace(f.regret(tenant), cumulative_regret=0.5 * n * (i + 1), priors_version=f"pr{i}")
            events.append(_at(r, now - timedelta(hours=3 - i)))
        for day in range(2):
            events.append(_at(replace(f.decision(tenant), decision="deny"), now - timedelta(days=day)))
        events.append(f.decision(tenant))  # an allow: not a denial
        events.append(f.redaction(tenant))
        events += _accounting_events(tenant, n, now, month, budget)
        events += _ledger_and_slo_events(tenant, n, now)
    return events + lag_events(now)


def _accounting_events(tenant: str, n: int, now: datetime, month: datetime, budget: str) -> list[Event]:
    """Savings snapshots of the charges above (globex's newest day one short), an anomaly, forecasts."""
    events: list[Event] = []
    for day in range(3):
        charged_on = (now - timedelta(days=day, hours=1)).replace(hour=0, minute=0, second=0, microsecond=0)
        for model, cost in (("sim-small", "0.25"), ("sim-large", "1.5")):
            spent = Decimal(cost) * n * (day + 1)
            behind = Decimal(1) if (tenant == "globex" and day == 0 and model == "sim-large") else Decimal(0)
            snap = replace(
                f.savings_snapshot(tenant),
                day_start=charged_on,
                model=model,
                requests=1,
                cost=spent - behind,
                baseline_cost=(spent - behind) * 10,
                savings=(spent - behind) * 9,
            )
            events.append(snap)
    hour = (now - timedelta(hours=1)).replace(minute=0, second=0, microsecond=0)
    events.append(replace(f.cost_anomaly(tenant), hour_start=hour, spend=Decimal(n) * Decimal("1.75")))
    if tenant == "acme":  # a second budget whose newest forecast was made when 6 of its 12 were settled
        soft = "b-acme-month-soft"
        events.append(replace(f.budget_set(tenant), budget_id=soft, limit_amount=Decimal(60), enforced=False))
        for _ in range(2):
            events.append(
                replace(f.budget_settled(tenant), budget_id=soft, period_start=month, actual_amount=Decimal(6))
            )
        stale = replace(f.spend_forecast(tenant), budget_id=soft, period_start=month, month_to_date=Decimal(6))
        events.append(replace(stale, forecast=Decimal(15), method="run_rate", days_of_history=3))
    if tenant == "acme":  # globex has none: its budget falls back to the straight line
        for offset, projected in ((70, "20"), (77, "30.5")):  # the newer (higher offset) one is shown
            events.append(
                replace(
                    f.spend_forecast(tenant),
                    budget_id=budget,
                    period_start=month,
                    month_to_date=Decimal(12),
                    forecast=Decimal(projected),
                    method="river.time_series.HoltWinters(alpha=0.3, beta=0.1)",
                    days_of_history=12,
                    source_offset=offset,
                    limit=Decimal(40),
                    projected_variance=Decimal(projected) - 40,
                )
            )
    return events


def _ledger_and_slo_events(tenant: str, n: int, now: datetime) -> list[Event]:
    """acme's chain verified ok (after an older failure); globex's failed from clickhouse. Requests and alerts."""
    events: list[Event] = []
    if tenant == "acme":
        events.append(_at(replace(f.ledger_verified(tenant), source="log"), now - timedelta(hours=2)))  # failed
        ok = replace(f.ledger_verified(tenant), source="log", ok=True, first_bad_seq=None, reason=None)
        events.append(_at(ok, now - timedelta(hours=1)))
    else:
        events.append(replace(f.ledger_verified(tenant), source="clickhouse", entries_checked=29))
    # acme: 10 good asks and one 503; globex: 4 fast asks and one slow (latency-bad) one
    statuses = [(200, 100)] * 10 + [(503, 40)] if tenant == "acme" else [(200, 100)] * 4 + [(200, 1500)]
    for status, ms in statuses:
        rid = str(uuid.uuid4())
        rc = RequestCompleted(
            envelope=f.envelope("RequestCompleted", tenant, rid),
            request_id=rid,
            route="/v1/ask",
            method="POST",
            status=status,
            latency_ms=ms,
            streamed=False,
            error_kind="event_log_unavailable" if status >= 500 else None,
        )
        events.append(_at(rc, now - timedelta(minutes=1)))
    slo, severity = ("availability", "page") if tenant == "acme" else ("ask_latency", "ticket")
    states = ("fired",) if tenant == "acme" else ("fired", "resolved")
    for i, state in enumerate(states):
        when = now - timedelta(minutes=30 - 10 * i)
        alert = SloBurnRateAlerted(
            envelope=f.envelope("SloBurnRateAlerted", tenant),
            slo=slo,
            objective=0.999 if slo == "availability" else 0.95,
            severity=severity,
            state=state,
            long_window_s=3600 if severity == "page" else 259200,
            short_window_s=300 if severity == "page" else 21600,
            long_burn_rate=90.9 if state == "fired" else 0.5,
            short_burn_rate=90.9 if state == "fired" else 0.5,
            threshold=14.4 if severity == "page" else 1.0,
            long_requests=11,
            long_bad=1,
            short_requests=11,
            short_bad=1,
            evaluated_at=when,
            source_partition=0,
            source_offset=10 + i,
        )
        events.append(_at(alert, when))
    return events


LAG_BASE_AGO = timedelta(hours=2)


def lag_events(now: datetime) -> list[Event]:
    """Two groups' lag samples over one hour: the sink's two partitions catch up, the agents' stays at 3.

    With a one-hour span the chart's bucket is 60 s: at the first bucket the sink's newest samples
    are 7 (p0, sampled twice) + 5 (p1) = 12 and the agents' 3; an hour later the sink's are 0.
    """
    base = (now - LAG_BASE_AGO).replace(minute=0, second=0, microsecond=0)
    samples = [
        ("ledgerflow-sink", 0, "sink-a", 90, 100, 10, 0),
        ("ledgerflow-sink", 1, "sink-a", 95, 100, 5, 1),
        ("ledgerflow-sink", 0, "sink-a", 100, 107, 7, 30),
        ("ledgerflow-agents", 0, "agents-b", -1, 3, 3, 0),
        ("ledgerflow-sink", 0, "sink-a", 107, 107, 0, 3600),
        ("ledgerflow-sink", 1, "", 100, 100, 0, 3600),
    ]
    return [
        _at(
            replace(
                f.consumer_lag(PLATFORM_TENANT),
                group_id=group,
                topic="ledgerflow.token-charges",
                partition=partition,
                owner=owner,
                committed=committed,
                end_offset=end,
                lag=lag,
            ),
            base + timedelta(seconds=after),
        )
        for group, partition, owner, committed, end, lag, after in samples
    ]


def make_read_side(chdb_url: str, events: list[Event] | None = None) -> ProjectionService:
    """The projections service (no sink, no broker) with the demo rows, behind real access control."""
    keys = KeyStore([("cfg-user-acme", "acme", hash_key(USER_SECRET), ["user"])])
    for tenant, secret in ADMIN_SECRET.items():
        keys.apply(issued(tenant, secret, ["admin"]))
    svc = ProjectionService(
        store_url=chdb_url,
        database=f"portal_{uuid.uuid4().hex[:12]}",
        run_sink=False,
        sql_handles=1,
        access=ReadAccess(OPERATOR_TOKEN, keys),
    )
    svc.start()
    assert svc.writer is not None
    for i, e in enumerate(demo_events() if events is None else events):
        svc.writer.insert(table_for(e.event_type), [event_to_row(e, "t", 0, i)], column_names=columns_for(e.event_type))
    return svc


@pytest.fixture(scope="module")
def read_side(chdb_url: str) -> Iterator[ProjectionService]:
    svc = make_read_side(chdb_url)
    yield svc
    assert svc.writer is not None
    svc.writer.command(f"DROP DATABASE IF EXISTS {svc.database}")
    svc.stop()


@pytest.fixture
async def http(read_side: ProjectionService) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(read_side.make_app(), host="127.0.0.1")) as client:
        yield client


async def login(http: TestClient[Any, Any], secret: str) -> str:
    """Log in through the form; the session id from Set-Cookie (the test client keeps no IP cookies)."""
    resp = await http.post(LOGIN, data={"secret": secret}, allow_redirects=False)
    assert resp.status == 303, await resp.text()
    assert resp.headers["Location"] == "/portal/"
    return resp.cookies[COOKIE].value


def cookie(sid: str) -> dict[str, str]:
    return {"Cookie": f"{COOKIE}={sid}"}


# --- sessions, pure --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_session_lasts_eight_hours_then_is_forgotten() -> None:
    clock = Clock()
    sessions = Sessions(clock=clock)
    reader = Reader("k-acme", "acme")
    sid = sessions.create(reader)
    assert SESSION_TTL_S == 8 * 3600
    clock.now += SESSION_TTL_S - 1
    assert sessions.get(sid) == reader
    clock.now += 1
    assert sessions.get(sid) is None
    assert len(sessions) == 0  # an expired session is dropped, not kept around


def test_session_ids_are_random_held_hashed_and_forgeries_match_nothing() -> None:
    sessions = Sessions()
    a, b = sessions.create(Reader("operator", None)), sessions.create(Reader("operator", None))
    assert a != b and len(a) >= 40
    assert sessions.get(a[:-1] + ("x" if a[-1] != "x" else "y")) is None
    assert sessions.get("") is None and sessions.get(None) is None
    assert a.encode() not in sessions._by_digest  # only digests are kept
    sessions.drop(a)
    assert sessions.get(a) is None and sessions.get(b) is not None


def test_forecast_projects_a_months_spend_in_a_straight_line() -> None:
    start = datetime(2026, 11, 1, tzinfo=UTC)
    assert forecast(Decimal("10"), "month", start, start + timedelta(days=10)) == Decimal("30")
    assert forecast(Decimal("10"), "month", start, start + timedelta(days=45)) == Decimal("10")  # period over
    assert forecast(Decimal("3"), "day", start, start + timedelta(hours=6)) == Decimal("12")
    assert forecast(Decimal("3"), "total", start, start) is None


# --- over HTTP ---------------------------------------------------------------------------


async def test_login_sets_an_httponly_strict_cookie_that_opens_every_page(http: TestClient[Any, Any]) -> None:
    resp = await http.post(LOGIN, data={"secret": OPERATOR_TOKEN}, allow_redirects=False)
    assert resp.status == 303
    set_cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie and "Path=/portal" in set_cookie
    assert f"Max-Age={8 * 3600}" in set_cookie
    assert OPERATOR_TOKEN not in set_cookie
    sid = resp.cookies[COOKIE].value
    for page in PAGES:
        got = await http.get(f"/portal/{page.slug}", headers=cookie(sid), allow_redirects=False)
        text = await got.text()
        assert got.status == 200, (page.slug, text[:300])
        assert "default-src 'none'" in got.headers["Content-Security-Policy"]
        assert "<svg" in text and "<script" not in text
        if not page.operator_only:  # consumer lag names no tenant: it is platform-wide
            assert "acme" in text and "globex" in text  # the operator sees both tenants


async def test_without_a_session_pages_redirect_to_the_login_form(http: TestClient[Any, Any]) -> None:
    for headers in ({}, cookie("forged-session-id"), cookie("")):
        resp = await http.get("/portal/budgets", headers=headers, allow_redirects=False)
        assert resp.status == 303 and resp.headers["Location"] == LOGIN
    form = await http.get(LOGIN)
    assert form.status == 200 and 'name="secret"' in await form.text()


@pytest.mark.parametrize(
    ("secret", "status", "says"),
    [
        ("not-a-key", 401, "unknown"),
        (USER_SECRET, 403, "needs &#x27;admin&#x27; or &#x27;analyst&#x27;"),
        ("", 401, ""),
    ],
)
async def test_a_wrong_or_unprivileged_key_is_refused_at_login(
    http: TestClient[Any, Any], secret: str, status: int, says: str
) -> None:
    resp = await http.post(LOGIN, data={"secret": secret}, allow_redirects=False)
    assert resp.status == status
    assert COOKIE not in resp.cookies
    assert says in await resp.text()


async def test_logout_ends_the_session_on_the_server(http: TestClient[Any, Any], read_side: ProjectionService) -> None:
    sid = await login(http, ADMIN_SECRET["acme"])
    before = len(read_side.portal.sessions)
    assert (await http.get("/portal/", headers=cookie(sid), allow_redirects=False)).status == 200
    out = await http.post("/portal/logout", headers=cookie(sid), allow_redirects=False)
    assert out.status == 303 and out.headers["Location"] == LOGIN
    assert out.cookies[COOKIE].value == ""  # the browser's copy is cleared
    assert len(read_side.portal.sessions) == before - 1
    replayed = await http.get("/portal/", headers=cookie(sid), allow_redirects=False)  # a kept copy is dead
    assert replayed.status == 303


async def test_revoking_the_key_ends_its_open_sessions(
    http: TestClient[Any, Any], read_side: ProjectionService
) -> None:
    """A session is only as good as the key it was opened with: revoked (or expired) → logged out."""
    keys = read_side.access.keys
    keys.apply(issued("acme", "lf_portal_revoke_me", ["admin"]))
    sid = await login(http, "lf_portal_revoke_me")
    assert (await http.get("/portal/", headers=cookie(sid), allow_redirects=False)).status == 200
    assert keys.revoke("issued-acme-admin")
    resp = await http.get("/portal/", headers=cookie(sid), allow_redirects=False)
    assert resp.status == 303 and resp.headers["Location"] == LOGIN
    keys.apply(issued("acme", ADMIN_SECRET["acme"], ["admin"]))  # the module's acme admin key, as before


async def test_an_expired_session_is_refused(http: TestClient[Any, Any], read_side: ProjectionService) -> None:
    sessions = read_side.portal.sessions
    clock, original = Clock(), sessions._clock
    sessions._clock = clock
    try:
        sid = await login(http, ADMIN_SECRET["globex"])
        assert (await http.get("/portal/ledger", headers=cookie(sid), allow_redirects=False)).status == 200
        clock.now += SESSION_TTL_S
        assert (await http.get("/portal/ledger", headers=cookie(sid), allow_redirects=False)).status == 303
    finally:
        sessions._clock = original


async def test_a_tenant_admin_reads_only_their_tenant(http: TestClient[Any, Any]) -> None:
    sid = await login(http, ADMIN_SECRET["globex"])
    for page in TENANT_PAGES:
        text = await (await http.get(f"/portal/{page.slug}", headers=cookie(sid))).text()
        assert "globex" in text and "acme" not in text, page.slug
        for hidden in OPERATOR_PAGES:  # no link to the platform-wide pages
            assert f'href="/portal/{hidden.slug}"' not in text
    other = await http.get("/portal/", params={"tenant": "acme"}, headers=cookie(sid))
    assert other.status == 403 and "reads tenant &#x27;globex&#x27; only" in await other.text()
    # the session is for the portal only: the operator's routes still refuse the tenant
    assert (await http.get("/status", headers=cookie(sid))).status == 401


async def test_header_credentials_work_for_scripts(http: TestClient[Any, Any]) -> None:
    ok = await http.get("/portal/privacy", headers={"Authorization": f"Bearer {ADMIN_SECRET['acme']}"})
    assert ok.status == 200 and "usage_acme" in await ok.text()
    bad = await http.get("/portal/privacy", headers={"Authorization": "Bearer nope"}, allow_redirects=False)
    assert bad.status == 401


async def test_a_tenant_without_rows_sees_clear_empty_states(http: TestClient[Any, Any]) -> None:
    sid = await login(http, ADMIN_SECRET["initech"])
    for page in TENANT_PAGES:
        text = await (await http.get(f"/portal/{page.slug}", headers=cookie(sid))).text()
        assert 'class="empty"' in text and "<svg" not in text, page.slug
        assert "acme" not in text and "globex" not in text


async def test_spend_figures_are_exact_decimals(http: TestClient[Any, Any]) -> None:
    """acme's demo charges: (0.25 + 1.5) * (1 + 2 + 3) = 10.50 spent, baseline 10x, saved 94.50 (90%)."""
    sid = await login(http, ADMIN_SECRET["acme"])
    text = await (await http.get("/portal/", headers=cookie(sid))).text()
    assert "<b>10.50 USD</b>" in text and "<b>105.00 USD</b>" in text and "<b>94.50 USD (90.0%)</b>" in text
    budgets = await (await http.get("/portal/budgets", headers=cookie(sid))).text()
    assert "<td>12.00 USD</td>" in budgets and "<td>40.00 USD</td>" in budgets and "<td>30.0%</td>" in budgets


# --- the panels added with their tables: lag, SLOs, verifications, forecasts, snapshots, anomalies ---


def operator_scope(tenant: str | None = None, days: int = 30) -> Scope:
    return Scope(Reader("operator", None), tenant, days)


@pytest.fixture(scope="module")
def empty_side(chdb_url: str) -> Iterator[ProjectionService]:
    """A migrated read side with no rows at all: every panel must show its empty state."""
    svc = make_read_side(chdb_url, events=[])
    yield svc
    assert svc.writer is not None
    svc.writer.command(f"DROP DATABASE IF EXISTS {svc.database}")
    svc.stop()


@pytest.mark.parametrize("slug", [p.slug for p in OPERATOR_PAGES])
async def test_operator_only_pages_refuse_tenant_keys(http: TestClient[Any, Any], slug: str) -> None:
    operator = await http.get(f"/portal/{slug}", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})
    assert operator.status == 200 and "<svg" in await operator.text()
    by_header = await http.get(f"/portal/{slug}", headers={"Authorization": f"Bearer {ADMIN_SECRET['acme']}"})
    assert by_header.status == 403
    sid = await login(http, ADMIN_SECRET["acme"])
    by_cookie = await http.get(f"/portal/{slug}", headers=cookie(sid), allow_redirects=False)
    text = await by_cookie.text()
    assert by_cookie.status == 403 and "the operator&#x27;s read token only" in text
    assert "<svg" not in text and "ledgerflow-sink" not in text and "availability" not in text


def test_lag_buckets_keep_a_span_to_sixty_points() -> None:
    assert lag_bucket_s(0) == 15 and lag_bucket_s(900) == 15 and lag_bucket_s(901) == 30
    assert lag_bucket_s(3600) == 60 and lag_bucket_s(7 * 86400) == 3 * 3600
    assert lag_bucket_s(10**9) == 86400


def test_lag_per_group_sums_each_partitions_newest_sample_per_bucket(read_side: ProjectionService) -> None:
    """See `lag_events`: the sink's p0 was sampled twice in the first minute (10 then 7): 7 + 5 counts."""
    bucket, labels, series = read_side.portal.lag_series(operator_scope())
    assert bucket == 60 and len(labels) == 2
    first, second = (datetime.fromisoformat(at) for at in labels)
    assert first.minute == first.second == 0 and second - first == timedelta(hours=1)  # `lag_events`' base
    assert datetime.now(UTC).replace(tzinfo=None) - first <= LAG_BASE_AGO + timedelta(hours=1)
    assert dict(series) == {"ledgerflow-agents": [3.0, None], "ledgerflow-sink": [12.0, 0.0]}
    assert read_side.portal.lag_series(operator_scope(days=1))[0] == 60  # samples 2 h old: inside a day


async def test_lag_page_lists_each_partitions_newest_sample_and_owner(http: TestClient[Any, Any]) -> None:
    text = await (await http.get("/portal/lag", headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"})).text()
    assert "<span>ledgerflow-agents</span><b>3</b>" in text and "<span>ledgerflow-sink</span><b>0</b>" in text
    assert (
        "<td>ledgerflow-agents</td><td>ledgerflow.token-charges</td><td>0</td><td>agents-b</td>"
        "<td>(nothing committed)</td><td>3</td><td>3</td>" in text
    )
    assert "<td>1</td><td>(none: group empty or rebalancing)</td><td>100</td><td>100</td><td>0</td>" in text
    assert "<td>0</td><td>sink-a</td><td>107</td><td>107</td><td>0</td>" in text
    assert "60s buckets" not in text and "1m buckets" in text


async def test_slo_page_burn_rates_and_budget_are_exact(http: TestClient[Any, Any]) -> None:
    """16 requests, 1 bad (acme's 503): availability burns 0.0625 / 0.001 = 62.5x, budget 1 - 62.5 left;
    15 whole /v1/ask 2xx (the 503 is not one), 1 slow: latency burns (1/15) / 0.05 = 1.33x."""
    op = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
    text = await (await http.get("/portal/slo", headers=op)).text()
    assert "<td>availability</td><td>30d</td><td>16</td><td>1</td><td>6.2500%</td><td>62.50</td>" in text
    assert "<td>availability</td><td>1h</td><td>16</td><td>1</td><td>6.2500%</td><td>62.50</td>" in text
    assert "<td>ask_latency</td><td>30d</td><td>15</td><td>1</td><td>6.6667%</td><td>1.33</td>" in text
    assert "<b>-6150.0% of the error budget left</b>" in text and "<b>-33.3% of the error budget left</b>" in text
    assert "docs/slo.md" in text and "1200 ms" in text
    # per tenant, and the open alert: acme's page alert fired; globex's ticket fired then resolved
    assert "<td>acme</td><td>availability</td><td>11</td><td>1</td><td>-8990.9%</td>" in text
    firing = text.split("<caption>Firing now</caption>")[1].split("</table>")[0]
    assert "<td>acme</td><td>availability</td>" in firing and "globex" not in firing
    assert "<td>1h &amp; 5m</td>" in firing
    recent = text.split("Fired and resolved in the last 30 days</caption>")[1].split("</table>")[0]
    assert recent.count("<tr>") == 4  # header + acme fired + globex fired + globex resolved
    assert "<td>resolved</td><td>3d &amp; 6h</td>" in recent
    one = await (await http.get("/portal/slo", params={"tenant": "acme"}, headers=op)).text()
    assert "<td>availability</td><td>30d</td><td>11</td><td>1</td><td>9.0909%</td><td>90.91</td>" in one
    assert "<td>ask_latency</td><td>30d</td><td>10</td><td>0</td><td>0.0000%</td><td>0.00</td>" in one
    assert "globex" not in one


async def test_ledger_page_shows_each_chains_newest_verification(http: TestClient[Any, Any]) -> None:
    acme = await (await http.get("/portal/ledger", headers={"Authorization": f"Bearer {ADMIN_SECRET['acme']}"})).text()
    verified = acme.split("<h2>Last verification</h2>")[1]
    assert '<td>acme</td><td>log</td><td><span class="ok">ok</span></td><td>30</td><td>1</td>' in verified
    assert "FAILED" not in verified  # the older failed run of the same chain and source is superseded
    globex = await (
        await http.get("/portal/ledger", headers={"Authorization": f"Bearer {ADMIN_SECRET['globex']}"})
    ).text()
    assert (
        '<td>globex</td><td>clickhouse</td><td><span class="failed">FAILED at seq 30</span>: '
        "gap: seq 30 missing (next found is 31)</td><td>29</td>" in globex
    )
    assert "<td>120 ms</td><td>python · key 0a1b2c3d</td>" in globex


async def test_budgets_show_the_recorded_forecast_and_its_method(http: TestClient[Any, Any]) -> None:
    acme = await (await http.get("/portal/budgets", headers={"Authorization": f"Bearer {ADMIN_SECRET['acme']}"})).text()
    assert (
        "<td>12.00 USD</td><td>30.50 USD</td><td>river.time_series.HoltWinters(alpha=0.3, beta=0.1) "
        "(12 closed days)</td><td>40.00 USD</td><td>30.0%</td><td>-9.50 USD</td>" in acme
    )  # recorded at the 12.00 spent shown: no "made at" note
    globex = await (
        await http.get("/portal/budgets", headers={"Authorization": f"Bearer {ADMIN_SECRET['globex']}"})
    ).text()
    assert "<td>24.00 USD</td>" in globex and "straight line (portal; none recorded)" in globex
    assert (
        "<td>12.00 USD</td><td>15.00 USD</td><td>run_rate (3 closed days); made at 6.00 USD spent "
        "(re-recorded when it moves by a cent); straight line now " in acme
    )


async def test_spend_page_reconciles_snapshots_and_lists_anomalies(http: TestClient[Any, Any]) -> None:
    acme = await (await http.get("/portal/", headers={"Authorization": f"Bearer {ADMIN_SECRET['acme']}"})).text()
    assert "savings snapshots (savings_daily) agree with the charges on every day shown" in acme
    assert "cost anomaly (hour's spend)</text>" in acme  # the marker series on the daily chart
    anomalies = acme.split("<h2>Cost anomalies</h2>")[1]
    assert "<td>acme</td><td>1.75 USD</td><td>0.500000 USD</td><td>0.9999 ≥ 0.9990</td>" in anomalies
    globex = await (await http.get("/portal/", headers={"Authorization": f"Bearer {ADMIN_SECRET['globex']}"})).text()
    # globex's newest day: charges saved 9 x (0.5 + 3.0) = 31.50; its snapshots are one charge of 1 behind
    assert "differ from the charges on 1 of the days shown" in globex
    today = (datetime.now(UTC) - timedelta(hours=1)).date().isoformat()
    assert f"<td>{today}</td><td>31.50 USD</td><td>22.50 USD</td>" in globex
    assert "<td>globex</td><td>3.50 USD</td>" in globex


async def test_every_new_panel_has_an_empty_state_naming_what_fills_it(empty_side: ProjectionService) -> None:
    async with TestClient(TestServer(empty_side.make_app(), host="127.0.0.1")) as client:
        op = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
        pages = {p.slug: await (await client.get(f"/portal/{p.slug}", headers=op)).text() for p in PAGES}
    for slug, text in pages.items():
        assert 'class="empty"' in text and "<svg" not in text, slug
    assert "No lag samples yet." in pages["lag"] and "lag_sample_interval_s" in pages["lag"]
    assert "No requests yet." in pages["slo"] and "`ledgerflow demo`" in pages["slo"]
    assert "No burn-rate alerts yet." in pages["slo"] and "No burn-rate alert is firing." in pages["slo"]
    assert "No verification results yet." in pages["ledger"] and "`ledgerflow audit verify`" in pages["ledger"]
    assert "No cost anomalies yet." in pages[""] and "No charges yet." in pages[""]
    assert "No budgets yet." in pages["budgets"]
