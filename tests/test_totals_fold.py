from __future__ import annotations

from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from domain.pricing import DEFAULT_PRICES, cost
from domain.totals import TenantTotals, fold
from tests import factories

costs = st.decimals(min_value=Decimal(0), max_value=Decimal(1000), places=12, allow_nan=False, allow_infinity=False)


@given(st.lists(costs, min_size=1, max_size=50))
def test_totals_equal_the_exact_sum_of_charges(values: list[Decimal]) -> None:
    state: TenantTotals | None = None
    for offset, v in enumerate(values):
        state, out = fold(state, factories.charge(cost=str(v)), 0, offset)
        assert out is not None and out.cost == state.cost
    assert state is not None
    assert state.cost == sum(values, Decimal(0))
    assert state.requests == len(values)


def test_redelivered_offsets_change_nothing() -> None:
    charges = [factories.charge(cost="0.5") for _ in range(3)]
    state = None
    for i, c in enumerate(charges):
        state, _ = fold(state, c, 4, 100 + i)
    again, out = fold(state, charges[1], 4, 101)
    assert out is None and again == state and again.requests == 3


def test_replay_emits_identical_events() -> None:
    charges = [factories.charge(cost="0.25") for _ in range(3)]

    def run() -> list[object]:
        state, outs = None, []
        for i, c in enumerate(charges):
            state, out = fold(state, c, 0, i)
            outs.append(out)
        return outs

    assert run() == run()


def test_state_json_round_trip_keeps_decimal() -> None:
    state, _ = fold(None, factories.charge(cost="0.000000000001"), 2, 7)
    assert TenantTotals.from_json(state.to_json()) == state


def test_cost_is_exact() -> None:
    price = DEFAULT_PRICES["sim-small"]
    assert cost(1_000_000, 1_000_000, price) == Decimal("0.75")
    assert cost(1, 1, price) == Decimal("0.00000075")
