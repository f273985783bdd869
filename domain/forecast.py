"""Month-end spend forecast per budget, and variance alerts: `fold(state, settled, partition, offset)`.

Input: the `BudgetSettled` facts of one monthly budget (spend counted against it, call by call,
with the limit in force when it was settled). State: the month to date, the open UTC day's
spend and the spend of each closed day of the month (quiet days count as 0). After every
settle the month-end forecast is recomputed:

- fewer than `MIN_DAYS` closed days: **run rate**, month_to_date / elapsed days (at least one)
  x days in the month. A handful of daily points gives a trend model nothing to fit; a run
  rate is what an operator would compute by hand and says so (`method="run_rate"`);
- from `MIN_DAYS` closed days on: river's **HoltWinters** (level + trend, no seasonality: a
  weekly season needs two weeks of history, more than the month gives early on) over the
  closed days' spend, refitted from the stored days; the forecast is the closed days + the
  larger of today's spend so far and today's prediction + the remaining days' predictions
  (negative predictions count as 0). Never below the month to date.

A `SpendForecasted` is emitted when the forecast moves by a cent or more (or the method or the
limit changes), so the table follows the forecast without one row per call. When the forecast
first exceeds the limit in a month a `BudgetVarianceAlerted` is emitted; it re-arms when the
forecast falls back to the limit or below. Why a new event rather than BudgetThresholdCrossed:
that one reports settled spend (its consumers act on money already spent); this one reports a
projection, which must never be mistaken for spend.

Pure and deterministic: the state holds exact Decimals (no pickled model; HoltWinters is refitted
from at most 31 numbers), event ids derive from the settle, so a replay emits the same events.
Idempotent under redelivery: a budget's settles are on one partition (keyed by tenant), so the
state keeps the last offset folded.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Any

from river import time_series

from domain.budget import next_reset, period_start
from domain.pricing import MONEY_PLACES, add
from streams.events import BudgetSettled, BudgetVarianceAlerted, Event, SpendForecasted

PRODUCER = "agent:spend-forecasts"
MIN_DAYS = 7
ALPHA, BETA = 0.3, 0.1
RUN_RATE = "run_rate"
HOLT_WINTERS = f"river.time_series.HoltWinters(alpha={ALPHA}, beta={BETA})"
CHANGE = Decimal("0.01")  # a forecast that moved less than this is not re-emitted
_QUANTUM = Decimal(1).scaleb(-MONEY_PLACES)
_DAY = timedelta(days=1)


def key_of(settled: BudgetSettled) -> str:
    """Table key: one state per budget (its id names its tenant, scope and period)."""
    return f"{settled.tenant}|{settled.budget_id}"


def month_label(start: datetime) -> str:
    """The month a forecast is for, as the billing export names periods (2026-11)."""
    return f"{start.year:04d}-{start.month:02d}"


def days_in_month(start: datetime) -> int:
    return calendar.monthrange(start.year, start.month)[1]


def day_of(at: datetime) -> datetime:
    return at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


@dataclass(frozen=True)
class BudgetMonth:
    tenant: str
    budget_id: str
    scope: str
    scope_id: str
    currency: str
    period_start: datetime  # the month
    day_start: datetime  # the open day
    month_to_date: Decimal = Decimal(0)
    day_spend: Decimal = Decimal(0)
    closed_days: tuple[Decimal, ...] = ()  # spend of each closed day of the month, in order
    limit: Decimal | None = None
    enforced: bool | None = None
    forecast: Decimal | None = None  # the last one emitted
    method: str = ""
    over: bool = False  # an alert was emitted this month and the forecast is still above the limit
    source_partition: int = -1
    source_offset: int = -1

    def to_json(self) -> dict[str, Any]:
        """Table-storable form (money as strings, never floats)."""
        return {
            "tenant": self.tenant,
            "budget_id": self.budget_id,
            "scope": self.scope,
            "scope_id": self.scope_id,
            "currency": self.currency,
            "period_start": self.period_start.isoformat(),
            "day_start": self.day_start.isoformat(),
            "month_to_date": str(self.month_to_date),
            "day_spend": str(self.day_spend),
            "closed_days": [str(d) for d in self.closed_days],
            "limit": None if self.limit is None else str(self.limit),
            "enforced": self.enforced,
            "forecast": None if self.forecast is None else str(self.forecast),
            "method": self.method,
            "over": self.over,
            "source_partition": self.source_partition,
            "source_offset": self.source_offset,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BudgetMonth:
        return cls(
            **{
                **data,
                "period_start": datetime.fromisoformat(data["period_start"]),
                "day_start": datetime.fromisoformat(data["day_start"]),
                "month_to_date": Decimal(data["month_to_date"]),
                "day_spend": Decimal(data["day_spend"]),
                "closed_days": tuple(Decimal(d) for d in data["closed_days"]),
                "limit": None if data["limit"] is None else Decimal(data["limit"]),
                "forecast": None if data["forecast"] is None else Decimal(data["forecast"]),
            }
        )


def forecast(state: BudgetMonth, at: datetime) -> tuple[Decimal, str]:
    """Month-end spend forecast of `state` at `at` (a time in its open day), and the method used."""
    days = days_in_month(state.period_start)
    if len(state.closed_days) < MIN_DAYS:
        elapsed = Decimal((at - state.period_start) / timedelta(microseconds=1)) / Decimal(86_400_000_000)
        rate = state.month_to_date / max(elapsed, Decimal(1))
        return _money(max(rate * days, state.month_to_date)), RUN_RATE
    model = time_series.HoltWinters(alpha=ALPHA, beta=BETA)
    for spent in state.closed_days:
        model.learn_one(float(spent))
    ahead = [max(Decimal(repr(p)), Decimal(0)) for p in model.forecast(horizon=days - len(state.closed_days))]
    closed = state.month_to_date - state.day_spend
    total = closed + max(state.day_spend, ahead[0]) + sum(ahead[1:], Decimal(0))
    return _money(max(total, state.month_to_date)), HOLT_WINTERS


def _money(amount: Decimal) -> Decimal:
    return amount.quantize(_QUANTUM, rounding=ROUND_HALF_EVEN)


def fold(
    state: BudgetMonth | None, settled: BudgetSettled, partition: int, offset: int
) -> tuple[BudgetMonth | None, tuple[Event, ...]]:
    """Count one settle against its budget's month; the forecast and alert it causes, if any.

    Settles of day and total budgets are not forecast (None state, nothing emitted).
    """
    if settled.period != "month":
        return state, ()
    if state is not None and partition == state.source_partition and offset <= state.source_offset:
        return state, ()
    at = settled.envelope.occurred_at.astimezone(UTC)
    month = period_start("month", settled.period_start)
    if state is None or month > state.period_start:
        state = BudgetMonth(
            tenant=settled.tenant,
            budget_id=settled.budget_id,
            scope=settled.scope,
            scope_id=settled.scope_id,
            currency=settled.currency,
            period_start=month,
            day_start=max(day_of(at), month),
        )
    elif month < state.period_start:  # a settle of a month already closed (a late record): counted there only
        return replace(state, source_partition=partition, source_offset=offset), ()
    if settled.currency != state.currency:
        raise ValueError(f"budget {settled.budget_id} settled in {settled.currency}, it counts {state.currency}")
    day = min(max(day_of(at), state.day_start), month + (days_in_month(month) - 1) * _DAY)
    closed = state.closed_days
    day_spend = state.day_spend
    if day > state.day_start:  # the open day closes; days without settles spent nothing
        gap = int((day - state.day_start) / _DAY) - 1
        closed = (*closed, day_spend, *([Decimal(0)] * gap))
        day_spend = Decimal(0)
    limit = settled.limit_amount if settled.limit_amount is not None else state.limit
    enforced = settled.enforced if settled.enforced is not None else state.enforced
    new = replace(
        state,
        day_start=day,
        day_spend=add(day_spend, settled.actual_amount),
        month_to_date=add(state.month_to_date, settled.actual_amount),
        closed_days=closed,
        limit=limit,
        enforced=enforced,
        source_partition=partition,
        source_offset=offset,
    )
    projected, method = forecast(new, max(at, day))
    out: list[Event] = []
    moved = state.forecast is None or abs(projected - state.forecast) >= CHANGE
    if moved or method != state.method or limit != state.limit:
        new = replace(new, forecast=projected, method=method)
        out.append(_forecasted(new, settled, projected, method, partition, offset))
    over = limit is not None and projected > limit
    if over and not state.over:
        out.append(_alerted(new, settled, projected, method, partition, offset))
    return replace(new, over=over), tuple(out)


def _common(state: BudgetMonth, projected: Decimal, partition: int, offset: int) -> dict[str, Any]:
    end = next_reset("month", state.period_start)
    assert end is not None
    return {
        "budget_id": state.budget_id,
        "scope": state.scope,
        "scope_id": state.scope_id,
        "period": month_label(state.period_start),
        "period_start": state.period_start,
        "period_end": end,
        "month_to_date": state.month_to_date,
        "forecast": projected,
        "limit": state.limit,
        "enforced": state.enforced,
        "projected_variance": None if state.limit is None else projected - state.limit,
        "currency": state.currency,
        "source_partition": partition,
        "source_offset": offset,
    }


def _forecasted(
    state: BudgetMonth, settled: BudgetSettled, projected: Decimal, method: str, partition: int, offset: int
) -> SpendForecasted:
    return SpendForecasted(
        envelope=settled.envelope.caused_by("SpendForecasted", PRODUCER),
        method=method,
        days_of_history=len(state.closed_days),
        **_common(state, projected, partition, offset),
    )


def _alerted(
    state: BudgetMonth, settled: BudgetSettled, projected: Decimal, method: str, partition: int, offset: int
) -> BudgetVarianceAlerted:
    return BudgetVarianceAlerted(
        envelope=settled.envelope.caused_by("BudgetVarianceAlerted", PRODUCER),
        method=method,
        **_common(state, projected, partition, offset),
    )
