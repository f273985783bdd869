"""The daily savings rollup fold: per tenant, UTC day and model, totals of requests, tokens, cost,
baseline cost and savings. `fold(state, charge, partition, offset) -> (state, SavingsSnapshotted)`.

Why a day is part of the key, not a Faust window: a charge belongs to the UTC day of its
occurred_at (event time), so a replay, a late record or a restarted worker put it in the same
day; one row per (tenant, day, model) is a tumbling daily window keyed by event time. Pure,
so the agent, replay and the unit tests run the same code; idempotent under redelivery (a
tenant's charges live in one partition, so each key remembers the last offset it folded).
A charge recorded before baselines existed counts its own cost as its baseline (savings 0),
as the ClickHouse daily view does, so both rollups agree to the last decimal.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from domain.pricing import add
from streams.events import SavingsSnapshotted, TokensCharged

PRODUCER = "agent:savings-rollups"


def day_of(at: datetime) -> datetime:
    """Midnight UTC of the day `at` falls on."""
    return at.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def key_of(charge: TokensCharged) -> str:
    """Table key: tenant, UTC day and model (what one snapshot totals)."""
    return f"{charge.tenant}|{day_of(charge.envelope.occurred_at).date().isoformat()}|{charge.model}"


@dataclass(frozen=True)
class DailyTotals:
    tenant: str
    day_start: datetime
    model: str
    currency: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Decimal = Decimal(0)
    baseline_cost: Decimal = Decimal(0)
    savings: Decimal = Decimal(0)
    source_partition: int = -1
    source_offset: int = -1

    def to_json(self) -> dict[str, Any]:
        """Table-storable form (money as strings, never floats)."""
        return {
            "tenant": self.tenant,
            "day_start": self.day_start.isoformat(),
            "model": self.model,
            "currency": self.currency,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost": str(self.cost),
            "baseline_cost": str(self.baseline_cost),
            "savings": str(self.savings),
            "source_partition": self.source_partition,
            "source_offset": self.source_offset,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DailyTotals:
        return cls(
            **{
                **data,
                "day_start": datetime.fromisoformat(data["day_start"]),
                "cost": Decimal(data["cost"]),
                "baseline_cost": Decimal(data["baseline_cost"]),
                "savings": Decimal(data["savings"]),
            }
        )


def fold(
    state: DailyTotals | None, charge: TokensCharged, partition: int, offset: int
) -> tuple[DailyTotals, SavingsSnapshotted | None]:
    """Add one charge to its (tenant, day, model) totals; (state, None) if this offset was already folded."""
    current = state or DailyTotals(
        tenant=charge.tenant,
        day_start=day_of(charge.envelope.occurred_at),
        model=charge.model,
        currency=charge.currency,
    )
    if partition == current.source_partition and offset <= current.source_offset:
        return current, None
    if charge.currency != current.currency:
        raise ValueError(f"tenant {charge.tenant} charged in {charge.currency}, its rollup is in {current.currency}")
    baseline = charge.baseline_cost if charge.baseline_cost is not None else charge.cost
    saved = charge.savings if charge.savings is not None else Decimal(0)
    new = replace(
        current,
        requests=current.requests + 1,
        prompt_tokens=current.prompt_tokens + charge.prompt_tokens,
        completion_tokens=current.completion_tokens + charge.completion_tokens,
        cost=add(current.cost, charge.cost),
        baseline_cost=add(current.baseline_cost, baseline),
        savings=add(current.savings, saved),
        source_partition=partition,
        source_offset=offset,
    )
    event = SavingsSnapshotted(
        envelope=charge.envelope.caused_by("SavingsSnapshotted", PRODUCER),
        day_start=new.day_start,
        model=new.model,
        requests=new.requests,
        prompt_tokens=new.prompt_tokens,
        completion_tokens=new.completion_tokens,
        cost=new.cost,
        baseline_cost=new.baseline_cost,
        savings=new.savings,
        currency=new.currency,
        source_partition=partition,
        source_offset=offset,
    )
    return new, event
