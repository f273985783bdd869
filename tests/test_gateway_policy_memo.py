"""The policy point's decision memo: reused for a repeated input, never across a snapshot change."""

from __future__ import annotations

from decimal import Decimal

from domain.policy import DecisionInput
from domain.policy_bundle import PolicyBundle, default_bundle_text
from gateway.policy import PolicyPoint

FORBID_ALL = """
@id("closed")
forbid (principal, action == Ledgerflow::Action::"Ask", resource);
"""


def inp(model: str = "sim-large", cost: str = "0.010") -> DecisionInput:
    return DecisionInput(tenant="acme", principal="k", roles=frozenset({"user"}), region="",
                         data_classification="internal", tools=frozenset(), model=model,
                         estimated_cost=Decimal(cost), route="/v1/ask")  # fmt: skip


def test_a_repeated_input_reuses_the_decision_and_an_equal_cost_is_the_same_input() -> None:
    point = PolicyPoint()
    first, _ = point.decide(inp())
    again, _ = point.decide(inp(cost="0.01"))  # equal Decimal, same canonical input
    assert again is first and first.input_sha256 == inp(cost="0.01").sha256()
    other, _ = point.decide(inp(cost="0.02"))
    assert other is not first and other.input_sha256 != first.input_sha256


def test_a_new_bundle_is_in_force_at_once_despite_the_memo() -> None:
    point = PolicyPoint()
    before, _ = point.decide(inp())
    assert before.allow
    point.engine.activate(PolicyBundle.parse(default_bundle_text() + FORBID_ALL, "closed-1"))
    after, _ = point.decide(inp())
    assert not after.allow and after.policy_version == "closed-1"
    point.engine.activate(PolicyBundle.parse(default_bundle_text(), "open-2"))  # a rollback, too
    assert point.decide(inp())[0].allow


def test_the_memo_is_bounded_and_can_be_switched_off() -> None:
    point = PolicyPoint(memo_size=3)
    for i in range(10):
        point.decide(inp(cost=f"0.0{i}"))
    assert len(point._memo) == 3
    off = PolicyPoint(memo_size=0)
    a, _ = off.decide(inp())
    b, _ = off.decide(inp())
    assert a == b and a is not b and not off._memo
