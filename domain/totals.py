"""The per-tenant running totals fold: `fold(state, charge, partition, offset) -> (state, event)`.

Pure, so the Faust agent, replay and the unit tests run the same code. Idempotent under
redelivery: a tenant's charges live in one partition (keyed by tenant), so the state keeps
the last offset folded and skips anything at or below it. The emitted event's id and time
derive from the charge, so replaying the same log emits identical events.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from domain.pricing import add
from streams.events import TenantTotalsUpdated, TokensCharged

PRODUCER = "agent:tenant-totals"


@dataclass(frozen=True)
class TenantTotals:
    tenant: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: Decimal = Decimal(0)
    currency: str = "USD"
    source_partition: int = -1
    source_offset: int = -1

    def to_json(self) -> dict[str, Any]:
        """Table-storable form (money as a string, never a float)."""
        return {
            "tenant": self.tenant,
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost": str(self.cost),
            "currency": self.currency,
            "source_partition": self.source_partition,
            "source_offset": self.source_offset,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TenantTotals:
        return cls(**{**data, "cost": Decimal(data["cost"])})


def fold(
    state: TenantTotals | None, charge: TokensCharged, partition: int, offset: int
) -> tuple[TenantTotals, TenantTotalsUpdated | None]:
    """Add one charge to a tenant's totals; (state, None) if this offset was already folded."""
    current = state or TenantTotals(tenant=charge.tenant, currency=charge.currency)
    if partition == current.source_partition and offset <= current.source_offset:
        return current, None
    if charge.currency != current.currency:
        raise ValueError(f"tenant {charge.tenant} charged in {charge.currency}, totals kept in {current.currency}")
    new = replace(
        current,
        requests=current.requests + 1,
        prompt_tokens=current.prompt_tokens + charge.prompt_tokens,
        completion_tokens=current.completion_tokens + charge.completion_tokens,
        cost=add(current.cost, charge.cost),
        source_partition=partition,
        source_offset=offset,
    )
    event = TenantTotalsUpdated(
        envelope=charge.envelope.caused_by("TenantTotalsUpdated", PRODUCER),
        requests=new.requests,
        prompt_tokens=new.prompt_tokens,
        completion_tokens=new.completion_tokens,
        cost=new.cost,
        currency=new.currency,
        source_partition=partition,
        source_offset=offset,
    )
    return new, event
