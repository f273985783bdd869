"""Prices as events and savings against a baseline (issue 7, parts 1 and 2).

Unit: the PriceBook's schedule (effective_from, versions), the default baseline, the savings
arithmetic on the charge. Through the real broker: `ledgerflow prices publish` reaches a
gateway's follower, and the next charge cites the new version and its prices, with the
tenant's baseline cost and savings recorded on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from aiohttp.test_utils import TestClient, TestServer

from domain.pricing import DEFAULT_PRICES, Price, PriceBook, cost, savings, strongest
from gateway.app import always_ready, create_app
from gateway.auth import KeyStore
from gateway.budgets import Accounting
from ledgerflow import prices as lf_prices
from ledgerflow.settings import Settings, hash_key, load
from streams.codec import Codec
from streams.events import ModelPrice, PriceListPublished, TokensCharged
from streams.publisher import FactPublisher
from streams.topics import Topics
from tests import factories
from tests.kafka_helpers import read_all

CODEC = Codec()
T0 = datetime(2026, 11, 1, tzinfo=UTC)


def listed(version: str, at: datetime, *prices: tuple[str, str, str]) -> PriceListPublished:
    items: list[ModelPrice] = [
        {"model": m, "input_per_mtok": Decimal(i), "output_per_mtok": Decimal(o)} for m, i, o in prices
    ]
    base = factories.price_list()
    return PriceListPublished(
        envelope=base.envelope, version=version, effective_from=at, currency="USD", prices=items, author="t"
    )


def test_price_book_switches_at_effective_from_and_keeps_every_version() -> None:
    now = [T0]
    book = PriceBook(DEFAULT_PRICES, clock=lambda: now[0])
    book.apply(listed("v2", T0 + timedelta(days=1), ("sim-small", "0.10", "0.40")))
    assert book["sim-small"].version == DEFAULT_PRICES["sim-small"].version  # announced, not yet in force
    now[0] = T0 + timedelta(days=1)
    assert (book["sim-small"].version, book["sim-small"].input_per_mtok) == ("v2", Decimal("0.10"))
    assert book.version("sim-small", DEFAULT_PRICES["sim-small"].version) == DEFAULT_PRICES["sim-small"]
    assert book["sim-large"] == DEFAULT_PRICES["sim-large"]
    book.apply(listed("v3", T0, ("new-model", "1", "2")))
    assert set(book) == {"sim-small", "sim-large", "new-model"} and len(book) == 3
    with pytest.raises(KeyError):
        PriceBook(clock=lambda: T0)["sim-small"]


def test_default_baseline_is_the_dearest_model() -> None:
    assert strongest(DEFAULT_PRICES) == "sim-large"
    assert strongest({}) is None


def test_savings_are_baseline_minus_actual_and_may_be_negative() -> None:
    small, large = DEFAULT_PRICES["sim-small"], DEFAULT_PRICES["sim-large"]
    actual = cost(1000, 500, small)
    s = savings(1000, 500, actual, large)
    assert s is not None and s.baseline_cost == cost(1000, 500, large)
    assert s.savings == s.baseline_cost - actual and s.savings > 0
    worse = savings(1000, 500, cost(1000, 500, large), small)
    assert worse is not None and worse.savings < 0
    assert savings(1, 1, actual, None) is None


def test_price_parsing_refuses_what_would_round() -> None:
    assert lf_prices.parse_price("m=0.15/0.6")["output_per_mtok"] == Decimal("0.6")
    for bad in ["m=0.15", "m=x/1", "=1/1", "m=0.0000000000001/1", "m=-1/1"]:
        with pytest.raises(ValueError):
            lf_prices.parse_price(bad)


# --- through the broker ----------------------------------------------------------------------


def settings_for(bootstrap: str, topics: Topics, monkeypatch: pytest.MonkeyPatch) -> Settings:
    monkeypatch.setenv("LEDGERFLOW_KAFKA_BOOTSTRAP", bootstrap)
    monkeypatch.setenv("LEDGERFLOW_TOPIC_PREFIX", topics.prefix)
    monkeypatch.setenv("LEDGERFLOW_PARTITIONS", str(topics.partitions))
    return load()


async def eventually(check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


KEYS = {"acme": "lf_acme_secret", "globex": "lf_globex_secret"}


@pytest.mark.kafka
async def test_published_prices_reach_the_gateway_and_every_charge_cites_its_version(
    kafka_bootstrap: str, topics: Topics, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_for(kafka_bootstrap, topics, monkeypatch)
    async with AsyncExitStack() as stack:
        publisher = FactPublisher(kafka_bootstrap, f"{topics.prefix}gw", topics)
        publisher.start()
        stack.callback(publisher.close)
        now = [datetime.now(UTC)]  # the gateway's clock for prices: the test moves it past effective_from
        acc = Accounting(
            prices=PriceBook(DEFAULT_PRICES, clock=lambda: now[0]), baseline_by_tenant={"globex": "sim-small"}
        )
        acc.follow(kafka_bootstrap, [topics.name("price-lists"), topics.name("budgets")])
        acc.start()
        stack.callback(acc.close)
        keys = KeyStore((f"k-{t}", t, hash_key(s), ["user"]) for t, s in KEYS.items())
        app = create_app(keys, publisher, acc.gate(always_ready), accounting=acc, publish_timeout=20.0)
        client = await stack.enter_async_context(TestClient(TestServer(app)))
        await eventually(lambda: acc.loaded and publisher.ready)

        async def ask(tenant: str) -> None:
            headers = {"Authorization": f"Bearer {KEYS[tenant]}"}
            resp = await client.post("/v1/ask", json={"prompt": "price me", "model": "sim-small"}, headers=headers)
            assert resp.status == 200, await resp.text()

        await ask("acme")
        soon = datetime.now(UTC) + timedelta(days=1)
        await asyncio.to_thread(
            lf_prices.publish, settings, "2026-12", [lf_prices.parse_price("sim-small=0.10/0.40")], "USD", soon
        )
        await eventually(lambda: getattr(acc.prices.at("sim-small", soon), "version", "") == "2026-12")
        await ask("acme")  # announced but not yet in force
        now[0] = soon
        await ask("acme")
        await ask("globex")

        with pytest.raises(ValueError, match="immutable"):
            lf_prices.publish(settings, "2026-12", [lf_prices.parse_price("sim-small=0.11/0.40")])

    decoded = [CODEC.decode(m.value()) for m in read_all(kafka_bootstrap, [topics.name("token-charges")], 4)]
    charges = sorted((c for c in decoded if isinstance(c, TokensCharged)), key=lambda c: c.envelope.event_id)
    assert [c.price_list_version for c in charges] == ["sim-2026-11", "sim-2026-11", "2026-12", "2026-12"]
    new = DEFAULT_PRICES["sim-small"].__class__("sim-small", Decimal("0.10"), Decimal("0.40"), "USD", "2026-12")
    for c in charges:
        price = new if c.price_list_version == "2026-12" else DEFAULT_PRICES["sim-small"]
        assert (c.input_price_per_mtok, c.output_price_per_mtok) == (price.input_per_mtok, price.output_per_mtok)
        assert c.cost == cost(c.prompt_tokens, c.completion_tokens, price)
        baseline: Price = DEFAULT_PRICES["sim-large"] if c.tenant == "acme" else new
        assert c.baseline_model == baseline.model
        assert c.baseline_cost == cost(c.prompt_tokens, c.completion_tokens, baseline)
        assert c.savings == c.baseline_cost - c.cost  # type: ignore[operator]
    assert charges[-1].tenant == "globex" and charges[-1].savings == 0  # its baseline is the model it used

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        lf_prices.cmd(settings, argparse.Namespace(prices_command="list", json=True))
    rows = json.loads(out.getvalue())
    small = {r["version"]: r["in_force"] for r in rows if r["model"] == "sim-small"}
    assert small == {"sim-2026-11": True, "2026-12": False}  # by the wall clock, 2026-12 starts tomorrow
