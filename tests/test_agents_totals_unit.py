"""The totals agent in Faust's test context: no broker, memory tables."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import faust
import pytest

from agents.app import create_app
from domain.totals import TenantTotals
from streams.codec import Codec
from streams.topics import Topics
from tests import factories

CODEC = Codec()


@pytest.fixture
def app(tmp_path):  # type: ignore[no-untyped-def]
    app = create_app("totals-unit", "127.0.0.1:1", Topics("u.", 1), data_dir=str(tmp_path), store="memory://")
    app.finalize()
    app.conf.store = "memory://"
    app.flow_control.resume()
    return app


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any, Any, Any]]:
    """Capture what the agent sends instead of producing (no broker in a unit test)."""
    captured: list[tuple[str, Any, Any, Any]] = []

    async def publish_message(self: faust.Topic, fut: Any, wait: bool = False) -> Any:
        m = fut.message
        captured.append((self._topic_name_or_default(m.channel), m.key, m.value, m.headers))
        fut.set_result(None)
        return fut

    monkeypatch.setattr(faust.Topic, "publish_message", publish_message)
    return captured


async def test_agent_folds_charges_per_tenant_and_skips_poison(app, sent) -> None:  # type: ignore[no-untyped-def]
    agent = app.agents["tenant-totals"]
    table = app.tables["tenant-totals-state"]
    async with agent.test_context() as ctx:
        for cost in ("0.1", "0.2"):
            await ctx.put(CODEC.encode(factories.charge("acme", cost=cost)), key=b"acme")
        await ctx.put(b"\x00garbage", key=b"acme")  # poison: dead-lettered, not folded, no crash
        await ctx.put(CODEC.encode(factories.charge("globex", cost="7")), key=b"globex")
        await ctx.put(CODEC.encode(factories.charge("acme", cost="0.000000000003")), key=b"acme")
        acme = TenantTotals.from_json(table["acme"])
        globex = TenantTotals.from_json(table["globex"])
    assert acme.requests == 3 and acme.cost == Decimal("0.300000000003")
    assert globex.requests == 1 and globex.cost == Decimal(7)
    derived = [CODEC.decode(v) for t, _, v, _ in sent if t == "u.tenant-totals"]
    assert [d.cost for d in derived if d.tenant == "acme"] == [
        Decimal("0.1"),
        Decimal("0.3"),
        Decimal("0.300000000003"),
    ]
    dead = [(v, dict(h)) for t, _, v, h in sent if t == "u.token-charges.dlq"]
    assert len(dead) == 1 and dead[0][0] == b"\x00garbage"
    assert dead[0][1]["lf.dlq.reason"] == b"not-single-object-encoding"
