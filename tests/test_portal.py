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
from projections.portal import COOKIE, LOGIN, PAGES, SESSION_TTL_S, Sessions, forecast
from projections.schema import columns_for, event_to_row, table_for
from projections.service import ProjectionService
from streams.events import Event
from tests import factories as f
from tests.test_tenant_isolation import issued

OPERATOR_TOKEN = "lf_read_portal_operator_token"
ADMIN_SECRET = {"acme": "lf_portal_admin_acme", "globex": "lf_portal_admin_globex", "initech": "lf_portal_admin_ini"}
USER_SECRET = "lf_portal_user_acme"  # a key without a read role
TENANTS = ("acme", "globex")  # initech has a key but no rows: its pages show the empty states


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
    return events


def make_read_side(chdb_url: str) -> ProjectionService:
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
    for i, e in enumerate(demo_events()):
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
    for page in PAGES:
        text = await (await http.get(f"/portal/{page.slug}", headers=cookie(sid))).text()
        assert "globex" in text and "acme" not in text, page.slug
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
    for page in PAGES:
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
