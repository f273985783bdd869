"""Prices and cost arithmetic, in Decimal end to end.

Cost = (prompt_tokens x input price + completion_tokens x output price) / 1e6. With prices
of at most 6 decimal places per million tokens the result is exact at 12 places, the scale
every money field is stored at; anything that would round is refused rather than rounded.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, localcontext

MONEY_PLACES = 12
_QUANTUM = Decimal(1).scaleb(-MONEY_PLACES)
_MILLION = Decimal(1_000_000)


@dataclass(frozen=True)
class Price:
    model: str
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    currency: str
    version: str


DEFAULT_PRICE_LIST_VERSION = "sim-2026-11"
DEFAULT_PRICES: dict[str, Price] = {
    p.model: p
    for p in (
        Price("sim-small", Decimal("0.15"), Decimal("0.60"), "USD", DEFAULT_PRICE_LIST_VERSION),
        Price("sim-large", Decimal("2.50"), Decimal("10.00"), "USD", DEFAULT_PRICE_LIST_VERSION),
    )
}


def cost(prompt_tokens: int, completion_tokens: int, price: Price) -> Decimal:
    """Exact cost of one call; raises ValueError if it cannot be held at 12 places."""
    if prompt_tokens < 0 or completion_tokens < 0:
        raise ValueError("token counts cannot be negative")
    with localcontext() as ctx:
        ctx.prec = 60
        raw = (prompt_tokens * price.input_per_mtok + completion_tokens * price.output_per_mtok) / _MILLION
        exact = raw.quantize(_QUANTUM)
        if exact != raw:
            raise ValueError(f"cost {raw} needs more than {MONEY_PLACES} decimal places")
    return exact


def add(a: Decimal, b: Decimal) -> Decimal:
    """Sum of two money values at the stored scale (exact: both already have <= 12 places)."""
    with localcontext() as ctx:
        ctx.prec = 60
        return (a + b).quantize(_QUANTUM)
