"""Billing export (issue 7, part 5): invoice lines by model and price, totals equal to the sum of the charges.

The read side runs on chDB with charges the sink would land (two tenants, two models, two
price versions, amounts using all 12 decimal places, one charge landed twice, one outside the
period); the export is asked over HTTP as the operator, as a tenant's own analyst key, and
through `ledgerflow billing export`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import io
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from domain.pricing import DEFAULT_PRICES, Price, cost, savings
from gateway.auth import KeyStore
from ledgerflow import billing as lf_billing
from ledgerflow.settings import hash_key, load
from projections.access import ReadAccess
from projections.billing import Invoice, period
from projections.schema import columns_for, event_to_row, table_for
from projections.service import ProjectionService
from streams.events import TokensCharged
from tests import factories
from tests.conftest import free_port

OPERATOR = "op-token-" + uuid.uuid4().hex
ANALYST = {"acme": "lf_acme_analyst", "globex": "lf_globex_analyst"}
NOV = datetime(2026, 11, 3, 12, tzinfo=UTC)
CHEAP_V2 = Price("sim-small", Decimal("0.123456"), Decimal("0.654321"), "USD", "2026-11b")


def charge(
    tenant: str, price: Price, prompt: int, completion: int, at: datetime, baseline: bool = True
) -> TokensCharged:
    base = factories.charge(tenant)
    spent = cost(prompt, completion, price)
    saved = savings(prompt, completion, spent, DEFAULT_PRICES["sim-large"]) if baseline else None
    return replace(
        base,
        envelope=replace(base.envelope, occurred_at=at),
        model=price.model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        input_price_per_mtok=price.input_per_mtok,
        output_price_per_mtok=price.output_per_mtok,
        price_list_version=price.version,
        cost=spent,
        baseline_model=saved.baseline_model if saved else None,
        baseline_cost=saved.baseline_cost if saved else None,
        savings=saved.savings if saved else None,
    )


ACME = [
    charge("acme", DEFAULT_PRICES["sim-small"], 1234, 567, NOV),
    charge("acme", DEFAULT_PRICES["sim-small"], 7, 3, NOV, baseline=False),
    charge("acme", CHEAP_V2, 999_999, 1, NOV.replace(day=20)),
    charge("acme", DEFAULT_PRICES["sim-large"], 1, 999_999, NOV.replace(day=30, hour=23, minute=59)),
]
OTHERS = [
    charge("acme", DEFAULT_PRICES["sim-small"], 10, 10, datetime(2026, 12, 1, tzinfo=UTC)),  # next period
    charge("globex", DEFAULT_PRICES["sim-large"], 50, 50, NOV),
]


@pytest.fixture(scope="module")
def service(chdb_url: str) -> Iterator[ProjectionService]:
    keys = KeyStore((f"k-{t}", t, hash_key(s), ["analyst"]) for t, s in ANALYST.items())
    svc = ProjectionService(
        store_url=chdb_url, database=f"bill_{uuid.uuid4().hex[:12]}", run_sink=False, sql_handles=1,
        access=ReadAccess(OPERATOR, keys),
    )  # fmt: skip
    svc.start()
    assert svc.writer is not None
    rows = [*ACME, ACME[0], *OTHERS]  # ACME[0] landed twice (a re-sent request): billed once
    for i, e in enumerate(rows):
        svc.writer.insert(table_for(e.event_type), [event_to_row(e, "t", 0, i)], column_names=columns_for(e.event_type))
    yield svc
    svc.writer.command(f"DROP DATABASE IF EXISTS {svc.database}")
    svc.stop()


@pytest.fixture
async def http(service: ProjectionService) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(service.make_app(), host="127.0.0.1")) as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_periods() -> None:
    assert period("2026-12") == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    assert period("2026-11-03..2026-11-04")[1] == datetime(2026, 11, 4, tzinfo=UTC)
    for bad in ["2026-13", "nov", "2026-11-04..2026-11-03", "2025-01-01..2026-11-01"]:
        with pytest.raises(ValueError):
            period(bad)


async def test_invoice_totals_equal_the_sum_of_the_charges_exactly(http: TestClient[Any, Any]) -> None:
    resp = await http.get("/v1/billing/export?tenant=acme&period=2026-11&format=json", headers=bearer(OPERATOR))
    assert resp.status == 200, await resp.text()
    doc = await resp.json()
    total = doc["totals"]["USD"]
    assert Decimal(total["cost"]) == sum(c.cost for c in ACME)
    assert Decimal(total["savings"]) == sum(c.savings or Decimal(0) for c in ACME)
    assert Decimal(total["baseline_cost"]) == sum(c.baseline_cost or c.cost for c in ACME)
    assert total["requests"] == 4 and total["prompt_tokens"] == sum(c.prompt_tokens for c in ACME)
    lines = {(ln["model"], ln["price_list_version"]): ln for ln in doc["lines"]}
    assert set(lines) == {("sim-small", "sim-2026-11"), ("sim-small", "2026-11b"), ("sim-large", "sim-2026-11")}
    assert Decimal(lines[("sim-small", "2026-11b")]["input_per_mtok"]) == CHEAP_V2.input_per_mtok
    assert lines[("sim-small", "sim-2026-11")]["requests"] == 2

    resp = await http.get("/v1/billing/export?tenant=acme&period=2026-11", headers=bearer(OPERATOR))
    rows = list(csv.DictReader(io.StringIO(await resp.text())))
    body = [r for r in rows if r["model"] != "TOTAL"]
    (tot,) = [r for r in rows if r["model"] == "TOTAL"]
    assert sum(Decimal(r["cost"]) for r in body) == Decimal(tot["cost"]) == sum(c.cost for c in ACME)
    assert "attachment" in resp.headers["Content-Disposition"]

    resp = await http.get("/v1/billing/export?tenant=acme&period=2026-11&detail=1", headers=bearer(OPERATOR))
    detail = list(csv.DictReader(io.StringIO(await resp.text())))
    assert sorted(r["request_id"] for r in detail) == sorted(c.request_id for c in ACME)
    assert sum(Decimal(r["cost"]) for r in detail) == sum(c.cost for c in ACME)


async def test_a_tenant_exports_its_own_invoice_only(http: TestClient[Any, Any]) -> None:
    own = await http.get("/v1/billing/export?period=2026-11&format=json", headers=bearer(ANALYST["globex"]))
    assert own.status == 200 and Decimal((await own.json())["totals"]["USD"]["cost"]) == OTHERS[1].cost
    other = await http.get("/v1/billing/export?tenant=acme&period=2026-11", headers=bearer(ANALYST["globex"]))
    assert other.status == 403
    assert (await http.get("/v1/billing/export?period=2026-11")).status == 401
    assert (await http.get("/v1/billing/export?period=2026-11", headers=bearer(OPERATOR))).status == 400  # whose?
    bad = await http.get("/v1/billing/export?tenant=acme&period=last-month", headers=bearer(OPERATOR))
    assert bad.status == 400 and "YYYY-MM" in (await bad.json())["error"]


async def test_cli_export_asks_the_read_side(
    service: ProjectionService, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    port = free_port()
    runner_server = TestServer(service.make_app(), host="127.0.0.1", port=port)
    await runner_server.start_server()
    try:
        monkeypatch.setenv("LEDGERFLOW_PROJECTIONS_PORT", str(port))
        monkeypatch.setenv("LEDGERFLOW_READ_TOKEN", OPERATOR)
        monkeypatch.setenv("LEDGERFLOW_DATA_DIR", str(tmp_path))
        settings = load()
        out = io.StringIO()
        args = argparse.Namespace(tenant="acme", period="2026-11", format="csv", detail=False, out=None)
        with contextlib.redirect_stdout(out):
            assert await asyncio.to_thread(lf_billing.cmd, settings, args) == 0
        rows = list(csv.DictReader(io.StringIO(out.getvalue())))
        assert Decimal(next(r for r in rows if r["model"] == "TOTAL")["cost"]) == sum(c.cost for c in ACME)
        with pytest.raises(lf_billing.BillingError, match="YYYY-MM"):
            await asyncio.to_thread(lf_billing.export, settings, "acme", "november")
    finally:
        await runner_server.close()


def test_invoice_sums_lines_per_currency() -> None:
    row = {"model": "m", "price_list_version": "v", "input_per_mtok": "1", "output_per_mtok": "2", "requests": "2",
           "prompt_tokens": "3", "completion_tokens": "4", "cost": "0.000000000001", "baseline_cost": "1",
           "savings": "0.999999999999"}  # fmt: skip
    inv = Invoice.from_rows(
        "t", NOV, NOV, [row | {"currency": "USD"}, row | {"currency": "USD"}, row | {"currency": "EUR"}]
    )
    assert inv.totals()["USD"]["cost"] == Decimal("0.000000000002") and inv.totals()["EUR"]["requests"] == 2
