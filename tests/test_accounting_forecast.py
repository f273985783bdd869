"""Month-end spend forecast and budget variance alerts (issue 7, part 6): the pure fold.

The agent through the real broker and ClickHouse is in tests/test_accounting_kafka.py.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from domain.forecast import HOLT_WINTERS, MIN_DAYS, RUN_RATE, BudgetMonth, fold, forecast
from streams.events import BudgetSettled, BudgetVarianceAlerted, Envelope, Event, SpendForecasted
from streams.ids import derived_uuid7

NOV = datetime(2026, 11, 1, tzinfo=UTC)  # 30 days
ROOT = "01900000-0000-7000-8000-000000000000"


def settle(
    at: datetime, amount: str, *, limit: str | None = "100", enforced: bool | None = True, budget: str = "acme:month",
    period: str = "month", n: int = 0,
) -> BudgetSettled:  # fmt: skip
    rid = str(derived_uuid7(ROOT, at.isoformat(), str(n)))
    start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0) if period == "month" else at
    return BudgetSettled(
        envelope=Envelope(
            event_id=str(derived_uuid7(rid, "BudgetSettled", budget)),
            event_type="BudgetSettled",
            schema_version=1,
            tenant="acme",
            occurred_at=at,
            correlation_id=rid,
            producer="test",
        ),
        budget_id=budget,
        scope="tenant",
        scope_id="acme",
        period=period,
        period_start=start,
        reservation_id=f"hold-{rid}",
        request_id=rid,
        reserved_amount=Decimal(amount),
        actual_amount=Decimal(amount),
        currency="USD",
        limit_amount=None if limit is None else Decimal(limit),
        enforced=enforced,
    )


def run(settles: list[BudgetSettled]) -> tuple[BudgetMonth | None, list[Event]]:
    state: BudgetMonth | None = None
    out: list[Event] = []
    for offset, s in enumerate(settles):
        state, events = fold(state, s, 0, offset)
        if state is not None:
            state = BudgetMonth.from_json(state.to_json())  # as the table stores it
        out.extend(events)
    return state, out


def daily(days: int, amount: str = "1", **kw: object) -> list[BudgetSettled]:
    """One settle at noon of each of the first `days` days of November."""
    return [settle(NOV + timedelta(days=d, hours=12), amount, **kw) for d in range(days)]  # type: ignore[arg-type]


def test_few_days_use_the_run_rate_and_say_so() -> None:
    state, out = run(daily(3))
    last = [e for e in out if isinstance(e, SpendForecasted)][-1]
    # 3.00 spent by Nov 3, 12:00 = 2.5 days: 3 / 2.5 x 30 days = 36
    assert (last.method, last.month_to_date, last.forecast) == (RUN_RATE, Decimal(3), Decimal(36))
    assert (last.period, last.period_start, last.period_end) == ("2026-11", NOV, datetime(2026, 12, 1, tzinfo=UTC))
    assert (last.limit, last.enforced, last.projected_variance) == (Decimal(100), True, Decimal(-64))
    assert last.days_of_history == 2 and state is not None and state.closed_days == (Decimal(1), Decimal(1))


def test_the_first_hours_of_a_month_do_not_explode_the_run_rate() -> None:
    _, out = run([settle(NOV + timedelta(minutes=5), "2")])
    (first,) = out
    assert isinstance(first, SpendForecasted) and first.forecast == Decimal(60)  # elapsed counts as one day


def test_a_week_of_history_switches_to_holt_winters() -> None:
    _, out = run(daily(MIN_DAYS + 3))
    forecasts = [e for e in out if isinstance(e, SpendForecasted)]
    hw = [e for e in forecasts if e.method == HOLT_WINTERS]
    assert hw and hw[0].days_of_history == MIN_DAYS  # the switch is emitted even if the amount barely moves
    assert {e.method for e in forecasts if e.days_of_history < MIN_DAYS} == {RUN_RATE}
    assert abs(hw[-1].forecast - Decimal(30)) < Decimal("0.5")  # a flat 1/day month ends near 30


def test_a_rising_trend_is_projected_above_the_run_rate() -> None:
    settles = [settle(NOV + timedelta(days=d, hours=12), str(d + 1)) for d in range(12)]  # 1, 2, ..., 12 a day
    state, out = run(settles)
    assert state is not None
    last = [e for e in out if isinstance(e, SpendForecasted)][-1]
    run_rate, _ = forecast(replace(state, closed_days=()), settles[-1].envelope.occurred_at)
    assert last.method == HOLT_WINTERS and last.forecast > run_rate  # the trend is not flattened
    assert last.forecast >= last.month_to_date


def test_quiet_days_count_as_zero() -> None:
    _, out = run([settle(NOV + timedelta(hours=12), "8"), settle(NOV + timedelta(days=9, hours=12), "1")])
    last = out[-1]
    assert isinstance(last, SpendForecasted) and last.days_of_history == 9  # day 1 and eight quiet days
    assert last.method == HOLT_WINTERS and last.month_to_date == Decimal(9)


def test_an_overrun_forecast_alerts_once_per_crossing() -> None:
    settles = daily(4, limit="20")  # about 30 projected against 20
    _, out = run(settles)
    alerts = [e for e in out if isinstance(e, BudgetVarianceAlerted)]
    assert len(alerts) == 1 and alerts[0].forecast > alerts[0].limit  # type: ignore[operator]
    assert alerts[0].projected_variance == alerts[0].forecast - Decimal(20) and alerts[0].enforced is True
    # the limit is raised (no alert, re-armed), then lowered again: a second crossing, a second alert
    later = [settle(NOV + timedelta(days=4, hours=h), "0.000001", limit=lim, n=h) for h, lim in ((1, "500"), (2, "20"))]
    _, out = run(settles + later)
    assert len([e for e in out if isinstance(e, BudgetVarianceAlerted)]) == 2


def test_soft_budgets_alert_too_and_say_so() -> None:
    _, out = run(daily(2, limit="5", enforced=False))
    (alert,) = [e for e in out if isinstance(e, BudgetVarianceAlerted)]
    assert alert.enforced is False


def test_forecasts_are_emitted_on_change_not_per_call() -> None:
    base = NOV + timedelta(days=10, hours=12)
    calls = [settle(base + timedelta(seconds=i), "0.000001", n=i) for i in range(50)]
    _, out = run(calls)
    assert 1 <= len([e for e in out if isinstance(e, SpendForecasted)]) < 5  # 50 calls moving it by < 1 cent


def test_replay_emits_the_same_events_and_redelivery_nothing() -> None:
    settles = daily(12, "3", limit="50")
    assert run(settles) == run(settles)
    state, _ = run(settles)
    again, out = fold(state, settles[-1], 0, len(settles) - 1)
    assert out == () and again == state


def test_a_new_month_starts_over_and_other_periods_are_not_forecast() -> None:
    state, _ = run(daily(5))
    dec = settle(datetime(2026, 12, 2, 12, tzinfo=UTC), "1")
    state, out = fold(state, dec, 0, 99)
    assert state is not None and (state.period_start, state.month_to_date) == (dec.period_start, Decimal(1))
    assert isinstance(out[0], SpendForecasted) and out[0].period == "2026-12"
    assert fold(None, settle(NOV, "1", period="day"), 0, 0) == (None, ())
    with pytest.raises(ValueError):
        fold(state, replace(dec, currency="EUR"), 0, 100)


def test_settles_without_a_limit_still_forecast() -> None:
    _, out = run(daily(2, limit=None, enforced=None))
    assert out and all(isinstance(e, SpendForecasted) and e.limit is None for e in out)
    assert all(e.projected_variance is None for e in out)  # type: ignore[attr-defined]
