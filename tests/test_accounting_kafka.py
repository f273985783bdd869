"""Cost anomalies and month-end forecasts through the real broker, the real Faust worker and chDB (issue 7).

One worker run folds both inputs: the demo's injected spike (`ledgerflow.demo.spike_charges`) on
the charges topic must land exactly one `cost_anomaly_detected` row, for the spike hour; a month
of BudgetSettled facts of a budget projected to overrun (with the other budget-holds facts in
between) must land the forecasts the pure fold computes in `spend_forecasts`, and one alert in
`budget_variance_alerts`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from domain.forecast import BudgetMonth, fold
from ledgerflow.demo import SPIKE_AT, spike_charges
from streams.codec import Codec
from streams.events import BudgetReserved, BudgetSettled, BudgetVarianceAlerted, Event, SpendForecasted
from streams.topics import Topics
from tests.test_accounting_forecast import NOV, settle
from tests.test_accounting_rollups import Worker, produce, wait_for

CODEC = Codec()
NOW = datetime(2026, 11, 20, 9, 30, tzinfo=UTC)


def month_of_settles() -> list[BudgetSettled]:
    """Nov 1-12: 1.5 a day, three calls a day, against a hard limit of 40 (about 45 projected)."""
    return [
        settle(NOV + timedelta(days=d, hours=9 + 4 * i), "0.5", limit="40", budget="acme:tenant:month:hard", n=i)
        for d in range(12)
        for i in range(3)
    ]


def produce_holds(bootstrap: str, topics: Topics, events: list[Event]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "transactional.id": f"holds-{uuid.uuid4().hex}"})
    producer.init_transactions(30)
    producer.begin_transaction()
    for e in events:
        producer.produce(topics.name("budget-holds"), key=e.tenant.encode(), value=CODEC.encode(e))
    producer.commit_transaction(30)


def with_reserves(settles: list[BudgetSettled]) -> list[Event]:
    """Each settle preceded by its hold, as the gateway records them: the agent passes over the holds."""
    out: list[Event] = []
    for s in settles:
        out.append(
            BudgetReserved(
                envelope=replace(s.envelope, event_id=str(uuid.uuid4()), event_type="BudgetReserved"),
                budget_id=s.budget_id,
                scope=s.scope,
                scope_id=s.scope_id,
                period=s.period,
                period_start=s.period_start,
                reservation_id=s.reservation_id,
                request_id=s.request_id,
                amount=s.reserved_amount,
                currency=s.currency,
                expires_at=s.envelope.occurred_at,
            )
        )
        out.append(s)
    return out


@pytest.mark.kafka
def test_an_injected_spike_and_an_overrun_forecast_land_in_clickhouse(
    kafka_bootstrap: str, topics: Topics, store: Any, new_sink: Callable[..., Any], tmp_path: Path
) -> None:
    charges = spike_charges("spiky", now=NOW)
    spike_hour = NOW.replace(minute=0) - timedelta(hours=48 - SPIKE_AT)
    settles = month_of_settles()
    expected: list[Event] = []
    state: BudgetMonth | None = None
    for offset, s in enumerate(settles):
        state, out = fold(state, s, 0, offset)
        expected.extend(out)
    forecasts = {e.envelope.event_id: e for e in expected if isinstance(e, SpendForecasted)}
    (alert,) = [e for e in expected if isinstance(e, BudgetVarianceAlerted)]

    produce(kafka_bootstrap, topics, charges)
    produce_holds(kafka_bootstrap, topics, with_reserves(settles))
    worker = Worker(kafka_bootstrap, topics, tmp_path)
    sink = new_sink(batch_max=2000)

    def landed() -> bool:
        sink.run_once()
        a = store.query("SELECT count() FROM cost_anomaly_detected").result_rows[0][0]
        f = store.query("SELECT count() FROM spend_forecasts").result_rows[0][0]
        v = store.query("SELECT count() FROM budget_variance_alerts").result_rows[0][0]
        return bool(a >= 1 and f >= len(forecasts) and v >= 1)

    worker.start()
    try:
        wait_for(landed, 240, "anomaly, forecasts and alert in ClickHouse", worker.log)
    finally:
        worker.stop()
    sink.run_once()
    rows = store.query("SELECT tenant, hour_start, spend > 10 * expected FROM cost_anomaly_detected").result_rows
    assert rows == [("spiky", spike_hour.replace(tzinfo=None), 1)]  # exactly the spike hour, once
    got = store.query(
        "SELECT event_id, budget_id, period, month_to_date, forecast, method, limit, projected_variance "
        "FROM spend_forecasts"
    ).result_rows
    assert {r[0] for r in got} == set(forecasts)  # every forecast the pure fold emits, nothing else
    for r in got:
        e = forecasts[r[0]]
        assert r[1:] == (e.budget_id, e.period, e.month_to_date, e.forecast, e.method, e.limit, e.projected_variance)
    newest = store.query(
        "SELECT argMax(forecast, source_offset), argMax(method, source_offset) FROM spend_forecasts "
        "WHERE tenant = 'acme' AND budget_id = 'acme:tenant:month:hard' AND period = '2026-11'"
    ).result_rows[0]
    last = list(forecasts.values())[-1]
    assert newest == (last.forecast, last.method) and last.forecast > Decimal(40)
    alerts = store.query("SELECT event_id, forecast, limit, enforced FROM budget_variance_alerts").result_rows
    assert alerts == [(alert.envelope.event_id, alert.forecast, Decimal(40), True)]
