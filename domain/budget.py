"""Spend budgets: which budgets cap a call, their periods, and the hold arithmetic, in exact integers.

A budget (`BudgetSet`, latest per budget_id wins) caps a tenant or one API key per UTC
period (day, month, or total). `enforced` budgets are hard limits (a call that could exceed
one is refused); the others are soft (alerts only). Before a model call the gateway *holds*
the most the call can cost against every budget that applies; after the call it *settles*
the actual cost (spent += actual, the hold is returned) or *releases* the hold on failure.
Admission: for every hard budget, spent + held + amount <= limit. Holds are upper bounds, so
spent never exceeds a hard limit unless a model reports more tokens than it was allowed.

Money here is integer picounits (10^-12 of the currency, the scale of every money field):
Decimal at 12 places maps onto them exactly, and the Redis script can hold them as two
exact doubles (whole units, picounits). `BudgetCounter` + `reserve`/`settle`/`release` are
the arithmetic both implementations (in process, Redis Lua) perform, operation for
operation; `gateway.budgets` runs them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from domain.pricing import MONEY_PLACES
from streams.events import BudgetSet

PICO = 10**MONEY_PLACES
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
PERIODS = ("day", "month", "total")
SCOPES = ("tenant", "api_key")
DEFAULT_THRESHOLDS = (50, 80, 100)


def to_pico(amount: Decimal) -> int:
    """Exact picounits of a money amount; ValueError if it has more than 12 decimal places."""
    scaled = amount.scaleb(MONEY_PLACES)
    if scaled != scaled.to_integral_value():
        raise ValueError(f"{amount} has more than {MONEY_PLACES} decimal places")
    return int(scaled)


def from_pico(units: int) -> Decimal:
    """The Decimal (12 places) of `units` picounits."""
    return Decimal(units).scaleb(-MONEY_PLACES)


def period_start(period: str, at: datetime) -> datetime:
    """Start of the UTC period containing `at` (the epoch for total)."""
    at = at.astimezone(UTC)
    if period == "day":
        return at.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "month":
        return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if period == "total":
        return EPOCH
    raise ValueError(f"unknown budget period {period!r}; use one of {', '.join(PERIODS)}")


def next_reset(period: str, at: datetime) -> datetime | None:
    """When the period containing `at` ends and the budget starts over (None: never, for total)."""
    start = period_start(period, at)
    if period == "day":
        return start + timedelta(days=1)
    if period == "month":
        return datetime(start.year + start.month // 12, start.month % 12 + 1, 1, tzinfo=UTC)
    return None


@dataclass(frozen=True)
class Budget:
    """One budget in force (from its newest BudgetSet)."""

    budget_id: str
    tenant: str
    scope: str
    scope_id: str
    period: str
    limit: Decimal
    currency: str
    enforced: bool
    thresholds: tuple[int, ...] = DEFAULT_THRESHOLDS

    @classmethod
    def from_event(cls, event: BudgetSet) -> Budget:
        if event.scope not in SCOPES:
            raise ValueError(f"budget {event.budget_id}: unknown scope {event.scope!r}")
        if event.period not in PERIODS:
            raise ValueError(f"budget {event.budget_id}: unknown period {event.period!r}")
        if event.limit_amount < 0:
            raise ValueError(f"budget {event.budget_id}: negative limit")
        to_pico(event.limit_amount)
        return cls(
            budget_id=event.budget_id,
            tenant=event.tenant,
            scope=event.scope,
            scope_id=event.scope_id,
            period=event.period,
            limit=event.limit_amount,
            currency=event.currency,
            enforced=event.enforced,
            thresholds=tuple(sorted(set(event.alert_thresholds_pct))),
        )

    def applies_to(self, tenant: str, key_id: str) -> bool:
        """Does this budget cap a call by `key_id` of `tenant`? (An api_key budget never crosses tenants.)"""
        if self.tenant != tenant:
            return False
        return self.scope == "tenant" or self.scope_id == key_id

    def describe(self) -> str:
        kind = "hard" if self.enforced else "soft"
        scope = f"tenant {self.scope_id}" if self.scope == "tenant" else f"api key {self.scope_id}"
        return f"{kind} {self.period} budget {self.budget_id!r} of {scope}"


class BudgetBook:
    """Budgets in force, folded from BudgetSet records (the newest per budget_id wins).

    A `limit_amount` of -1 is never valid; to retire a budget, set it soft with no thresholds.
    Writes swap a new dict in one assignment, so readers need no lock.
    """

    def __init__(self, budgets: Iterable[Budget] = ()) -> None:
        self._by_id: dict[str, Budget] = {b.budget_id: b for b in budgets}

    def apply(self, event: BudgetSet) -> None:
        budget = Budget.from_event(event)
        self._by_id = {**self._by_id, budget.budget_id: budget}

    def get(self, budget_id: str) -> Budget | None:
        return self._by_id.get(budget_id)

    def all(self) -> list[Budget]:
        return sorted(self._by_id.values(), key=lambda b: (b.tenant, b.budget_id))

    def applicable(self, tenant: str, key_id: str) -> list[Budget]:
        """Every budget capping this call, hard ones first, each once."""
        found = [b for b in self._by_id.values() if b.applies_to(tenant, key_id)]
        return sorted(found, key=lambda b: (not b.enforced, b.budget_id))


# --- the hold arithmetic (mirrored by gateway.budgets.BUDGET_LUA) ---------------------------


@dataclass
class BudgetCounter:
    """One budget's state in one period: settled spend, open holds, thresholds already alerted."""

    spent: int = 0  # picounits
    held: int = 0
    alerted: set[int] = field(default_factory=set)
    initialised: bool = False  # restored from the log once (see gateway.budgets: reconcile)


@dataclass(frozen=True)
class Line:
    """One budget a hold counts against: its limit (picounits), hard or soft, its alert thresholds."""

    limit: int
    enforced: bool
    thresholds: tuple[int, ...]


@dataclass(frozen=True)
class Refusal:
    index: int  # which line refused
    left: int  # picounits still available on it (limit - spent - held, never below 0)


def reserve(counters: Sequence[BudgetCounter], lines: Sequence[Line], amount: int) -> Refusal | None:
    """Hold `amount` on every line, or on none: the first hard line it would overrun refuses."""
    for i, (c, line) in enumerate(zip(counters, lines, strict=True)):
        if line.enforced and c.spent + c.held + amount > line.limit:
            return Refusal(i, max(0, line.limit - c.spent - c.held))
    for c in counters:
        c.held += amount
    return None


def crossed(c: BudgetCounter, line: Line) -> list[int]:
    """Thresholds newly reached by settled spend (spent * 100 >= pct * limit), each once per period."""
    out = []
    for pct in line.thresholds:
        if pct not in c.alerted and line.limit > 0 and c.spent * 100 >= pct * line.limit:
            c.alerted.add(pct)
            out.append(pct)
    return out


def settle(counters: Sequence[BudgetCounter], lines: Sequence[Line], held: int | None, actual: int) -> list[list[int]]:
    """Close a hold of `held` (None: it had lapsed and was already returned) with `actual` spent.

    Returns the thresholds each line crossed.
    """
    out = []
    for c, line in zip(counters, lines, strict=True):
        if held is not None:
            c.held = max(0, c.held - held)
        c.spent += actual
        out.append(crossed(c, line))
    return out


def release(counters: Sequence[BudgetCounter], held: int) -> None:
    """Return a hold without spending (the call failed, or the hold lapsed)."""
    for c in counters:
        c.held = max(0, c.held - held)


def restore(c: BudgetCounter, spent: int) -> None:
    """Raise settled spend to what the log says was spent, never lower it.

    Why never lower: a settle recorded in the counter whose charge did not reach the log (the
    publish failed) is spend the log does not show; lowering would let a budget overrun.
    """
    c.spent = max(c.spent, spent)
    c.initialised = True
