"""Prices and cost arithmetic, in Decimal end to end.

Cost = (prompt_tokens x input price + completion_tokens x output price) / 1e6. With prices
of at most 6 decimal places per million tokens the result is exact at 12 places, the scale
every money field is stored at; anything that would round is refused rather than rounded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal, localcontext

from streams.events import PriceListPublished

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


# --- prices as events ---------------------------------------------------------------------
#
# Prices reach every gateway as PriceListPublished events on a compacted topic; `PriceBook`
# folds them. A published price applies from its effective_from on, so a price can be
# announced ahead of time and every replica switches at the same instant. Charges cite the
# version (TokensCharged.price_list_version), which stays resolvable because the topic keeps
# one record per models@version, never one per model.

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class _Scheduled:
    effective_from: datetime
    seq: int  # order of arrival: of two versions effective at the same instant the later one wins
    price: Price


class PriceBook(Mapping[str, Price]):
    """model -> the price in force now (a read-only Mapping, so the request path reads it like a dict).

    Writes (`apply`, from the follower thread) build a new schedule and swap it in one
    assignment; readers never see a half-applied list. `clock` is injectable for tests.
    """

    def __init__(self, seed: Mapping[str, Price] | None = None, *, clock: Callable[[], datetime] | None = None) -> None:
        self._clock = clock or (lambda: datetime.now(UTC))
        self._schedule: dict[str, tuple[_Scheduled, ...]] = {}
        self._seq = 0
        self._versions: set[str] = set()
        for model, price in (seed or {}).items():
            self._add(model, EPOCH, price)

    def _add(self, model: str, effective_from: datetime, price: Price) -> None:
        self._seq += 1
        entries = [e for e in self._schedule.get(model, ()) if e.price.version != price.version]
        entries.append(_Scheduled(effective_from, self._seq, price))
        entries.sort(key=lambda e: (e.effective_from, e.seq))
        self._schedule = {**self._schedule, model: tuple(entries)}
        self._versions.add(price.version)

    def apply(self, event: PriceListPublished) -> None:
        """Fold one published list: every model in it gets this version from effective_from on."""
        for p in event.prices:
            self._add(
                p["model"],
                event.effective_from,
                Price(p["model"], p["input_per_mtok"], p["output_per_mtok"], event.currency, event.version),
            )

    def at(self, model: str, when: datetime) -> Price | None:
        """The price of `model` in force at `when` (None if none was effective yet)."""
        found = None
        for entry in self._schedule.get(model, ()):
            if entry.effective_from > when:
                break
            found = entry.price
        return found

    def version(self, model: str, version: str) -> Price | None:
        """The price `version` gave `model` (what a charge citing it used), if known."""
        return next((e.price for e in self._schedule.get(model, ()) if e.price.version == version), None)

    def history(self) -> list[tuple[str, datetime, Price]]:
        """(model, effective_from, price) for every scheduled price, by model then time."""
        return [(m, e.effective_from, e.price) for m in sorted(self._schedule) for e in self._schedule[m]]

    def __getitem__(self, model: str) -> Price:
        price = self.at(model, self._clock())
        if price is None:
            raise KeyError(model)
        return price

    def __iter__(self) -> Iterator[str]:
        now = self._clock()
        return iter([m for m in self._schedule if self.at(m, now) is not None])

    def __len__(self) -> int:
        return sum(1 for _ in self)


def strongest(prices: Mapping[str, Price]) -> str | None:
    """The default baseline: the dearest model (output price, then input price, then name).

    Why the dearest: without routing, a tenant would send everything to its strongest model,
    so that is what routing's savings are measured against.
    """
    if not prices:
        return None
    return max(prices.values(), key=lambda p: (p.output_per_mtok, p.input_per_mtok, p.model)).model


@dataclass(frozen=True)
class Savings:
    baseline_model: str
    baseline_cost: Decimal
    savings: Decimal


def savings(prompt_tokens: int, completion_tokens: int, actual: Decimal, baseline: Price | None) -> Savings | None:
    """Baseline cost of the same tokens and baseline - actual (negative when the call cost more)."""
    if baseline is None:
        return None
    base = cost(prompt_tokens, completion_tokens, baseline)
    return Savings(baseline.model, base, sub(base, actual))


def sub(a: Decimal, b: Decimal) -> Decimal:
    """a - b at the stored scale (exact, like `add`)."""
    with localcontext() as ctx:
        ctx.prec = 60
        return (a - b).quantize(_QUANTUM)
