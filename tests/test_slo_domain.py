"""SLO arithmetic and the burn-rate alert fold (pure), and the SQL SLI view agreeing with it."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest
from clickhouse_connect.driver.client import Client

from domain.slo import (
    ASK_LATENCY,
    AVAILABILITY,
    MIN_REQUESTS,
    RULES,
    SloState,
    budget_remaining,
    burn_rate,
    burn_threshold,
    classify,
    fold,
)
from projections.schema import columns_for, event_to_row
from streams.events import Envelope, RequestCompleted, SloBurnRateAlerted
from streams.ids import uuid7

T0 = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)


def completed(
    at: datetime,
    status: int = 200,
    *,
    tenant: str = "acme",
    route: str = "/v1/ask",
    latency_ms: int = 40,
    streamed: bool = False,
    error_kind: str | None = None,
) -> RequestCompleted:
    rid = str(uuid7(int(at.timestamp() * 1000)))
    return RequestCompleted(
        envelope=Envelope(rid, "RequestCompleted", 1, tenant, at, rid, "gateway"),
        request_id=rid,
        route=route,
        method="POST",
        status=status,
        latency_ms=latency_ms,
        streamed=streamed,
        error_kind=error_kind,
    )


def run(events: list[RequestCompleted], state: SloState | None = None, **kw: int) -> tuple[SloState, list]:
    """Fold `events` as the next records of partition 0 (offsets continue after the state's)."""
    out: list[SloBurnRateAlerted] = []
    start = state.source_offset + 1 if state is not None else 0
    for offset, e in enumerate(events, start):
        state, alerts = fold(state, e, 0, offset, **kw)
        out.extend(alerts)
    assert state is not None
    return state, out


def test_rules_are_the_workbooks_multiwindow_set() -> None:
    assert [(r.severity, r.long_s, r.short_s, r.threshold) for r in RULES] == [
        ("page", 3600, 300, 14.4),
        ("page", 21600, 1800, 6.0),
        ("ticket", 259200, 21600, 1.0),
    ]
    assert all(r.short_s * 12 == r.long_s for r in RULES)  # the workbook's short window is 1/12 of the long
    assert burn_threshold(1.0, 30 * 86400) == 1.0  # the whole budget over the whole window: rate 1


def test_burn_rate_and_budget() -> None:
    assert burn_rate(1, 1000, AVAILABILITY) == pytest.approx(1.0)
    assert burn_rate(0, 0, AVAILABILITY) == 0.0
    assert burn_rate(144, 10_000, AVAILABILITY) == pytest.approx(14.4)
    assert burn_rate(10, 100, ASK_LATENCY) == pytest.approx(2.0)
    assert budget_remaining(0, 1000, AVAILABILITY) == 1.0
    assert budget_remaining(1, 2000, AVAILABILITY) == pytest.approx(0.5)
    assert budget_remaining(3, 1000, AVAILABILITY) == pytest.approx(-2.0)  # overspent
    assert budget_remaining(0, 0, AVAILABILITY) == 1.0


@pytest.mark.parametrize(
    ("route", "status", "latency", "streamed", "kind", "want"),
    [
        ("/v1/ask", 200, 100, False, None, {"availability": False, "ask_latency": False}),
        ("/v1/ask", 200, 1200, False, None, {"availability": False, "ask_latency": True}),
        ("/v1/ask", 200, 5000, True, None, {"availability": False}),  # streams: no latency SLI
        ("/v1/ask", 200, 50, True, "upstream_error", {"availability": True}),  # a stream broken on our side
        ("/v1/ask", 200, 50, True, "client_disconnected", {"availability": False}),
        ("/v1/ask", 503, 10, False, "event_log_unavailable", {"availability": True}),  # Kafka's 503: bad
        ("/v1/ask", 429, 3, False, "rate_limited", {"availability": False}),  # 4xx: good
        ("/v1/ask", 401, 3, False, "unknown_api_key", {"availability": False}),
        ("/v1/chat/completions", 200, 3000, False, None, {"availability": False}),
        ("/v1/memory/{session}", 500, 3, False, "internal_error", {"availability": True}),
    ],
)
def test_classify(route: str, status: int, latency: int, streamed: bool, kind: str | None, want: dict) -> None:
    assert classify(route, status, latency, streamed, kind) == want


def test_a_burst_of_errors_pages_and_recovery_resolves_it() -> None:
    good = [completed(T0 + timedelta(seconds=i)) for i in range(100)]
    burst = [completed(T0 + timedelta(minutes=2, seconds=i), 503, error_kind="upstream_unavailable") for i in range(5)]
    state, alerts = run(good + burst)
    fired = {(a.slo, a.severity, a.long_window_s) for a in alerts if a.state == "fired"}
    # 5 bad of 105: 4.8% in every window, above 14.4 x 0.1%, 6 x and 1 x: all three availability rules fire
    assert fired == {
        ("availability", "page", 3600),
        ("availability", "page", 21600),
        ("availability", "ticket", 259200),
    }
    # the first error (1 of 101: burn 9.9) reaches 6 x and 1 x; the 14.4 x page needs the second (burn 19.6)
    assert [(a.long_window_s, a.source_offset) for a in alerts] == [(21600, 100), (259200, 100), (3600, 101)]
    page = alerts[-1]
    assert (page.long_requests, page.long_bad, page.short_requests, page.short_bad) == (102, 2, 102, 2)
    assert page.long_burn_rate == pytest.approx(2 / 102 / 0.001, rel=1e-6) and page.threshold == 14.4
    assert page.envelope.causation_id == burst[1].envelope.event_id and page.tenant == "acme"

    # ten minutes of good traffic later: the 5-minute window is clean, so the 1h page resolves; the
    # 30-minute and 6-hour windows still hold the burst, so the others stay
    later = [completed(T0 + timedelta(minutes=10, seconds=i)) for i in range(20)]
    state, after = run(later, state)
    assert [(a.slo, a.severity, a.long_window_s, a.state) for a in after] == [
        ("availability", "page", 3600, "resolved")
    ]
    assert after[0].short_bad == 0 and after[0].long_bad == 5
    assert state.firing == {"availability/page/21600", "availability/ticket/259200"}


def test_slow_asks_burn_the_latency_slo_only() -> None:
    events = [completed(T0 + timedelta(seconds=i), latency_ms=1500 if i % 2 else 300) for i in range(40)]
    _, alerts = run(events)
    assert {a.slo for a in alerts} == {"ask_latency"}
    assert all(a.objective == 0.95 for a in alerts)
    # 50% slow = burn 10: pages at 6 x and tickets at 1 x, but not the 14.4 x page
    assert {(a.severity, a.long_window_s) for a in alerts} == {("page", 21600), ("ticket", 259200)}


def test_too_few_requests_never_page() -> None:
    events = [completed(T0 + timedelta(seconds=i), 500) for i in range(MIN_REQUESTS - 1)]
    _, alerts = run(events)
    assert alerts == []
    _, alerts = run(events, min_requests=1)
    assert alerts


def test_replay_is_identical_and_redelivery_changes_nothing() -> None:
    events = [completed(T0 + timedelta(seconds=7 * i), 503 if 30 <= i < 40 else 200) for i in range(200)]
    a_state, a = run(events)
    _, b = run(events)
    assert a == b and a  # same transitions, same ids
    assert len({x.envelope.event_id for x in a}) == len(a)
    again, none = fold(a_state, events[150], 0, 150)  # an old offset of the same partition
    assert none == [] and again is a_state
    assert SloState.from_json(a_state.to_json()) == a_state


def test_event_time_windows_and_late_records() -> None:
    state, _ = run([completed(T0), completed(T0 + timedelta(hours=2))])
    assert state.window(3600)[0].total == 1  # the 1h window ends at the newest event time
    assert state.window(21600)[0].total == 2
    state, _ = fold(state, completed(T0 + timedelta(minutes=30), 500), 0, 99)  # late: its own bucket
    assert state.window(3600)[0].bad == 0 and state.window(21600)[0].bad == 1
    state, _ = fold(state, completed(T0 + timedelta(days=4)), 0, 100)
    assert state.window(259200)[0].total == 1  # older buckets fall out of the 3-day window
    assert len(state.hours) == 1 and len(state.minutes) == 1  # ... and are pruned


def test_sql_sli_view_agrees_with_classify(store: Client, ch_database: str) -> None:
    cases = list(
        itertools.product(
            ("/v1/ask", "/v1/chat/completions", "/v1/policy/check"),
            (200, 201, 401, 429, 500, 503),
            (100, 1199, 1200, 4000),
            (False, True),
            (None, "upstream_error", "client_disconnected", "charge_not_recorded", "rate_limited"),
        )
    )
    events = [
        completed(T0 + timedelta(milliseconds=i), s, route=r, latency_ms=lat, streamed=st, error_kind=k)
        for i, (r, s, lat, st, k) in enumerate(cases)
    ]
    store.insert(
        f"{ch_database}.request_completed",
        [event_to_row(e, "t", 0, i) for i, e in enumerate(events)],
        column_names=list(columns_for("RequestCompleted")),
    )
    rows = store.query(f"SELECT request_id, slo, bad FROM {ch_database}.slo_requests").result_rows
    got: dict[str, dict[str, bool]] = {}
    for rid, slo, bad in rows:
        got.setdefault(rid, {})[slo] = bool(bad)
    want = {e.request_id: classify(e.route, e.status, e.latency_ms, e.streamed, e.error_kind) for e in events}
    assert got == want
