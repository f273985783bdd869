"""Differential privacy through the real broker and chDB: the read side's `POST /v1/dp/query`, the
DP budget agent deciding on Kafka, releases and budgets projected into ClickHouse.

One rig per module (topics, a read side with its sink, one agent worker); each test uses its
own tenant, so budgets never meet. The replay test runs last and checks everything before it.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer

from agents.dp_budget import DpBudgetWorker
from domain.dp import replay
from domain.keys import KeyStore
from ledgerflow import dp as dp_cli
from ledgerflow.settings import Settings, load
from projections.access import ReadAccess
from projections.schema import table_for
from projections.service import ProjectionService
from projections.store import open_store
from streams.admin import ensure_topics, read_to_end
from streams.codec import Codec
from streams.events import DpQueryCharged, DpQueryRefused, DpReleasePublished, Envelope, RequestReceived, TokensCharged
from streams.ids import uuid7
from streams.topics import Topics

pytestmark = pytest.mark.kafka

OPERATOR = "op-secret-for-dp-tests"
TENANT_KEY = "lf_cache_tenant_key_secret"
DAY = date(2026, 11, 2)
CODEC = Codec()


@dataclass
class Rig:
    svc: ProjectionService
    topics: Topics
    settings: Settings
    bootstrap: str
    group: str
    worker: DpBudgetWorker
    stop: threading.Event
    thread: threading.Thread

    def restart_worker(self) -> None:
        """Stop the agent and start a new member of its group: it must rebuild every budget from the log."""
        self.stop.set()
        self.thread.join(30)
        self.stop = threading.Event()
        self.worker = DpBudgetWorker(self.bootstrap, self.group, self.topics)
        self.thread = threading.Thread(target=self.worker.run, args=(self.stop,), daemon=True)
        self.thread.start()
        assert self.worker.assigned.wait(60)


def _env(event_type: str, tenant: str, rid: str, at: datetime) -> Envelope:
    return Envelope(str(uuid7()), event_type, 1, tenant, at, rid, "test")


def _insert_usage(svc: ProjectionService, tenant: str) -> None:
    """Traffic of one tenant on DAY: key k-heavy sends 50 requests to `big` (cost 0.02 each);
    ten light keys send 3 each to `small` (cost 0.001). Inserted as projection rows: the DP path
    reads them, it does not need them to have come through Kafka."""
    assert svc.writer is not None
    rows: list[tuple[RequestReceived, TokensCharged]] = []
    base = datetime.combine(DAY, datetime.min.time(), UTC) + timedelta(hours=1)
    plan = [("k-heavy", "big", "0.02")] * 50 + [(f"k-light-{i}", "small", "0.001") for i in range(10) for _ in range(3)]
    for n, (key, model, cost) in enumerate(plan):
        rid = str(uuid7())
        at = base + timedelta(seconds=n)
        req = RequestReceived(_env("RequestReceived", tenant, rid, at), rid, "/v1/ask", key, 1, 5, "0" * 64)
        charge = TokensCharged(
            _env("TokensCharged", tenant, rid, at), rid, model, 10, 20, Decimal("0.15"), Decimal("0.60"), "v1", "USD",
            Decimal(cost),
        )  # fmt: skip
        rows.append((req, charge))
    for idx in (0, 1):
        event_type = rows[0][idx].event_type
        table = table_for(event_type)
        found = svc.writer.query(
            "SELECT name FROM system.columns WHERE database = {d:String} AND table = {t:String}",
            parameters={"d": svc.database, "t": table},
        )
        existing = {r[0] for r in found.result_rows}
        envelope = ("event_id", "event_type", "schema_version", "tenant", "occurred_at", "correlation_id", "producer")
        record_cols = [c for c in envelope if c in existing]
        payload = [f for f in rows[0][idx].to_record() if f != "envelope" and f in existing]
        data = []
        for pair in rows:
            e = pair[idx]
            env = e.envelope
            data.append([getattr(env, c) for c in record_cols] + [getattr(e, f) for f in payload] + ["t", 0, 0])
        svc.writer.insert(table, data, column_names=[*record_cols, *payload, "_topic", "_partition", "_offset"])


@pytest.fixture(scope="module")
def rig(kafka_bootstrap: str, chdb_url: str) -> Iterator[Rig]:
    topics = Topics(prefix=f"t{uuid.uuid4().hex[:10]}.", partitions=3)
    ensure_topics(kafka_bootstrap, topics)
    keys = KeyStore([("key-cache", "cache", hashlib.sha256(TENANT_KEY.encode()).hexdigest(), ["analyst"])])
    database = f"t_{uuid.uuid4().hex[:12]}"
    svc = ProjectionService(
        store_url=chdb_url, database=database, bootstrap=kafka_bootstrap, group=f"sink-{uuid.uuid4().hex[:8]}",
        topics=topics, batch_ms=50, sql_handles=3, access=ReadAccess(OPERATOR, keys),
    )  # fmt: skip
    svc.start()
    for tenant in ("conc", "exh", "cache"):
        _insert_usage(svc, tenant)
    group = f"dp-{uuid.uuid4().hex[:8]}"
    worker = DpBudgetWorker(kafka_bootstrap, group, topics)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
    thread.start()
    settings = load(kafka_bootstrap=kafka_bootstrap, topic_prefix=topics.prefix, partitions=3)
    r = Rig(svc, topics, settings, kafka_bootstrap, group, worker, stop, thread)
    assert worker.assigned.wait(60)
    deadline = time.monotonic() + 60
    while not (svc.dp and svc.dp.loaded) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert svc.dp is not None and svc.dp.loaded
    yield r
    r.stop.set()
    r.thread.join(30)
    svc.stop()  # the sink first, so it does not write into a dropped database
    client = open_store(chdb_url, database)
    client.command(f"DROP DATABASE IF EXISTS {database}")
    client.close()


@pytest.fixture
async def http(rig: Rig) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(rig.svc.make_app(), host="127.0.0.1")) as client:
        yield client


AUTH = {"Authorization": f"Bearer {OPERATOR}"}


async def grant(rig: Rig, tenant: str, epsilon: float, metric_set: str = "usage", **kw: Any) -> None:
    """Through the CLI's grant (fact + audit record in one transaction), then until the read side has it."""
    assert rig.svc.dp is not None
    before = sum((float(b.epsilon) for b in rig.svc.dp.budget_list(tenant) if b.metric_set == metric_set), 0.0)
    await asyncio.to_thread(
        dp_cli.grant, rig.settings, tenant, metric_set, epsilon, kw.get("delta", 0.0), kw.get("composition", "basic"),
        kw.get("period", "total"), "test",
    )  # fmt: skip
    assert rig.svc.dp is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = [b for b in rig.svc.dp.budget_list(tenant) if b.metric_set == metric_set]
        if got and float(got[0].epsilon) >= before + epsilon - 1e-9:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"grant for {tenant} never reached the read side")


def body(tenant: str, epsilon: str = "0.1", **kw: Any) -> dict[str, Any]:
    doc = {
        "tenant": tenant,
        "kind": "requests_per_model_per_day",
        "since": DAY.isoformat(),
        "until": DAY.isoformat(),
        "models": ["big", "small"],
        "max_requests_per_unit": 5,
        "epsilon": epsilon,
    }
    doc.update(kw)
    return doc


async def ask(http: TestClient[Any, Any], doc: dict[str, Any], headers: dict[str, str] = AUTH) -> tuple[int, Any]:
    r = await http.post("/v1/dp/query", data=orjson.dumps(doc), headers=headers)
    return r.status, orjson.loads(await r.read())


def _decided(rig: Rig) -> list[Any]:
    records = read_to_end(rig.bootstrap, [rig.topics.name("dp-decisions")], 30.0)
    return [CODEC.decode(m.value()) for _t, _o, m in records]


def _releases(rig: Rig, tenant: str) -> list[DpReleasePublished]:
    records = read_to_end(rig.bootstrap, [rig.topics.name("dp-releases")], 30.0)
    out = [CODEC.decode(m.value()) for _t, _o, m in records]
    return [e for e in out if isinstance(e, DpReleasePublished) and e.tenant == tenant]


async def test_100_concurrent_queries_against_a_budget_for_10_release_exactly_10(
    rig: Rig, http: TestClient[Any, Any]
) -> None:
    await grant(rig, "conc", 1.0)
    # 100 different queries (the contribution bound differs), each asking epsilon 0.1, all at once
    docs = [body("conc", max_requests_per_unit=k) for k in range(1, 101)]
    answers = await asyncio.gather(*(ask(http, d) for d in docs))
    ok = [b for s, b in answers if s == 200]
    refused = [b for s, b in answers if s == 409]
    assert len(ok) == 10 and len(refused) == 90, sorted({s for s, _ in answers})
    assert all(not b["cached"] for b in ok)
    assert all(b["reason"] == "exhausted" for b in refused)
    # the log agrees: 10 charges, 90 refusals and 10 releases for this budget, nothing more
    decided = [e for e in _decided(rig) if e.tenant == "conc"]
    assert sum(isinstance(e, DpQueryCharged) for e in decided) == 10
    assert sum(isinstance(e, DpQueryRefused) for e in decided) == 90
    released = _releases(rig, "conc")
    assert len(released) == 10 and {r.query_id for r in released} == {b["query_id"] for b in ok}
    charged = {e.query_id: e for e in decided if isinstance(e, DpQueryCharged)}
    assert set(charged) == {r.query_id for r in released}  # every release has its charge, recorded first
    assert all(charged[r.query_id].envelope.event_id == r.envelope.causation_id for r in released)
    r = await http.get("/v1/dp/budgets", params={"tenant": "conc"}, headers=AUTH)
    (budget,) = orjson.loads(await r.read())["budgets"]
    assert budget["queries_charged"] == 10 and budget["epsilon_remaining"] == pytest.approx(0.0, abs=1e-9)


async def test_exhausted_budget_refuses_showing_what_remains(rig: Rig, http: TestClient[Any, Any]) -> None:
    await grant(rig, "exh", 0.25)
    status, _ = await ask(http, body("exh", "0.2"))
    assert status == 200
    status, refused = await ask(http, body("exh", "0.1", max_requests_per_unit=6))
    assert status == 409
    assert refused["reason"] == "exhausted"
    assert "cannot pay epsilon 0.1: epsilon 0.05 of 0.25 remains" in refused["error"]
    assert refused["remaining"]["epsilon"] == pytest.approx(0.05)
    # nothing was taken by the refusal: 0.05 still fits
    status, _ = await ask(http, body("exh", "0.05", max_requests_per_unit=7))
    assert status == 200
    status, refused = await ask(http, body("exh", "0.01", max_requests_per_unit=8))
    assert status == 409 and "epsilon 0 of 0.25 remains" in refused["error"]


async def test_repeated_query_returns_the_recorded_release(rig: Rig, http: TestClient[Any, Any]) -> None:
    await grant(rig, "cache", 1.0)
    # epsilon 1 over k=5: scale 5; a precise release (epsilon 20, scale 0.25) below checks clamping
    status, first = await ask(http, body("cache", "0.5"))
    assert status == 200 and first["cached"] is False
    status, again = await ask(http, body("cache", "0.5"))
    assert status == 200 and again["cached"] is True
    assert again["query_id"] == first["query_id"] and again["result"] == first["result"]
    # five identical queries at once, never asked before: one charge, one release, five equal answers
    same = body("cache", "0.25", max_requests_per_unit=3)
    answers = await asyncio.gather(*(ask(http, same) for _ in range(5)))
    assert {s for s, _ in answers} == {200}
    assert len({b["query_id"] for _s, b in answers}) == 1 and len({orjson.dumps(b["result"]) for _s, b in answers}) == 1
    r = await http.get("/v1/dp/budgets", params={"tenant": "cache"}, headers=AUTH)
    (budget,) = orjson.loads(await r.read())["budgets"]
    assert budget["queries_charged"] == 2 and budget["epsilon_spent"] == pytest.approx(0.75)
    assert len(_releases(rig, "cache")) == 2


async def test_release_clamps_each_key_and_a_tenant_key_reads_its_own_tenant_only(
    rig: Rig, http: TestClient[Any, Any]
) -> None:
    await grant(rig, "cache", 100.0, metric_set="usage")  # top-up, for precise releases
    key = {"Authorization": f"Bearer {TENANT_KEY}"}
    status, got = await ask(http, body("cache", "40", max_requests_per_unit=5), headers=key)
    assert status == 200
    counts = {(m, d): n for m, d, n in got["result"]["rows"]}
    # k-heavy sent 50 requests but counts with 5; ten light keys with 3 each. Scale 5/40 = 0.125:
    # noise beyond +-2 has probability ~1e-7 per cell.
    assert abs(counts[("big", DAY.isoformat())] - 5) <= 2
    assert abs(counts[("small", DAY.isoformat())] - 30) <= 2
    status, mean = await ask(
        http, body("cache", "40", kind="mean_cost_per_request", cost_max="0.01", max_requests_per_unit=5), headers=key
    )
    assert status == 200
    rows = {r[0]: r for r in mean["result"]["rows"]}
    assert Decimal(rows["big"][3]) == pytest.approx(Decimal("0.01"), abs=Decimal("0.002"))  # 0.02 clamped to 0.01
    assert Decimal(rows["small"][3]) == pytest.approx(Decimal("0.001"), abs=Decimal("0.0005"))
    # the key is the cache tenant's: another tenant is refused, its own budgets only are listed
    status, denied = await ask(http, body("conc", "1"), headers=key)
    assert status == 403 and "reads tenant 'cache' only" in denied["error"]
    r = await http.get("/v1/dp/budgets", headers=key)
    assert {b["tenant"] for b in orjson.loads(await r.read())["budgets"]} == {"cache"}
    r = await http.post("/v1/dp/query", data=orjson.dumps(body("cache")))
    assert r.status == 401


async def test_zcdp_budget_and_reallocation_report(rig: Rig, http: TestClient[Any, Any]) -> None:
    await grant(rig, "cache", 1.0, metric_set="savings", delta=1e-6, composition="zcdp")
    doc = body("cache", kind="savings_distribution", savings_edges=["0", "0.01"])
    doc.pop("epsilon")
    doc["rho"] = "0.001"
    assert rig.svc.writer is not None
    projected = rig.svc.writer.query(
        "SELECT count() FROM system.columns "
        "WHERE database = {d:String} AND table = 'tokens_charged' AND name = 'savings'",
        parameters={"d": rig.svc.database},
    ).result_rows[0][0]
    status, got = await ask(http, doc)
    assert projected, "migration 0007 projects tokens_charged.savings"
    assert status == 200 and got["mechanism"] == "discrete_gaussian"
    assert [r[0] for r in got["result"]["rows"]] == ["<0", "[0,0.01)", ">=0.01"]
    # a zcdp budget on the usage metric set: Gaussian noise, rho accounting, refusal in rho terms
    await grant(rig, "zc", 1.0, delta=1e-6, composition="zcdp")
    doc = body("zc")
    doc.pop("epsilon")
    status, got = await ask(http, {**doc, "rho": "0.01"})
    assert status == 200 and got["mechanism"] == "discrete_gaussian"
    assert got["budget"]["rho_remaining"] == pytest.approx(got["budget"]["rho"] - 0.01)
    status, refused = await ask(http, {**doc, "rho": "0.02", "max_requests_per_unit": 6})
    assert status == 409 and "cannot pay rho 0.02: rho 0.01435" in refused["error"]
    assert refused["remaining"]["rho"] == pytest.approx(0.0144, abs=1e-4)
    status, wrong = await ask(http, {**doc, "epsilon": "0.1"})
    assert status == 400 and "send 'rho', not 'epsilon'" in wrong["error"]
    r = await http.get("/v1/dp/reallocation", params={"tenant": "cache", "near": "0.5", "unused": "0.2"}, headers=AUTH)
    report = orjson.loads(await r.read())
    assert [x["metric_set"] for x in report["unused"]] == ["savings"]
    assert report["near_exhaustion"] == [] or report["near_exhaustion"][0]["metric_set"] == "usage"
    for bad in ("nan", "inf", "1.5", "-0.1", "lots"):
        r = await http.get("/v1/dp/reallocation", params={"tenant": "cache", "near": bad}, headers=AUTH)
        assert r.status == 400 and "between 0 and 1" in (await r.json())["error"], bad


async def test_a_decision_the_client_gave_up_on_is_still_released_once(rig: Rig, http: TestClient[Any, Any]) -> None:
    """The agent is down: the client gets 503 with the query id. Once the agent is back, the read
    side follows the decision through; asking again returns that release, paid once."""
    await grant(rig, "late", 1.0)
    assert rig.svc.dp is not None
    rig.stop.set()
    rig.thread.join(30)
    rig.svc.dp.decision_timeout_s = 1.0
    try:
        status, pending = await ask(http, body("late", "0.3"))
        assert status == 503 and "still pending" in pending["error"]
        await asyncio.to_thread(rig.restart_worker)
        deadline = time.monotonic() + 30
        while True:
            status, got = await ask(http, body("late", "0.3"))
            if status == 200 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
    finally:
        rig.svc.dp.decision_timeout_s = 15.0
    assert status == 200 and got["query_id"] == pending["query_id"] and got["cached"] is True
    (budget,) = rig.svc.dp.budget_list("late")
    assert budget.charged == 1 and budget.spent_epsilon == Decimal("0.3")
    assert len(_releases(rig, "late")) == 1


async def test_replay_restart_and_projections_agree(rig: Rig, http: TestClient[Any, Any]) -> None:
    """Runs last: every budget and decision so far, rebuilt three ways, is the same."""
    log_records = read_to_end(rig.bootstrap, [rig.topics.name("dp-budget-log")], 30.0)
    by_partition = sorted(log_records, key=lambda r: (r[2].partition(), r[1]))
    events = [CODEC.decode(m.value()) for _t, _o, m in by_partition]
    budgets, outputs = replay(events)
    # 1. replaying the budget log reproduces the agent's decisions, ids included
    assert sorted(outputs, key=lambda e: e.envelope.event_id) == sorted(
        _decided(rig), key=lambda e: e.envelope.event_id
    )
    # 2. and the read side's budgets (its follower folds the same log)
    assert rig.svc.dp is not None
    assert {k: b.summary() for k, b in budgets.items()} == {b.key: b.summary() for b in rig.svc.dp.budget_list(None)}
    # 3. a restarted agent rebuilds the budgets from the log: exh still has nothing left
    rig.restart_worker()
    status, refused = await ask(http, body("exh", "0.01", max_requests_per_unit=9))
    assert status == 409 and "epsilon 0 of 0.25 remains" in refused["error"]
    # 4. the projections: releases and budgets as ClickHouse tables
    assert rig.svc.writer is not None
    db = rig.svc.database
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        n = rig.svc.writer.query(f"SELECT count() FROM {db}.dp_release_published WHERE tenant = 'conc'").result_rows[0][
            0
        ]
        refusals = rig.svc.writer.query(f"SELECT count() FROM {db}.dp_query_refused WHERE tenant = 'conc'").result_rows[
            0
        ][0]
        if n == 10 and refusals == 90:
            break
        time.sleep(0.2)
    assert (n, refusals) == (10, 90)
    row = rig.svc.writer.query(
        f"SELECT queries_charged, epsilon_remaining, queries_refused FROM {db}.dp_budgets WHERE tenant = 'conc'"
    ).result_rows
    assert len(row) == 1 and row[0][0] == 10 and row[0][1] == pytest.approx(0.0, abs=1e-9) and row[0][2] == 90


async def test_cli_query_budgets_and_reallocation(
    rig: Rig, http: TestClient[Any, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """`ledgerflow dp query | budgets | reallocation` against the read side over HTTP, as the operator."""
    assert http.server.port is not None
    settings = load(
        kafka_bootstrap=rig.bootstrap, topic_prefix=rig.topics.prefix, partitions=3,
        projections_port=http.server.port, read_token=OPERATOR,
    )  # fmt: skip
    parser = argparse.ArgumentParser()
    dp_cli.add_parser(parser.add_subparsers(dest="command"))
    day = DAY.isoformat()
    argv = ["dp", "query", "--tenant", "cache", "--kind", "requests_per_model_per_day", "--since", day, "--until", day,
            "--models", "big,small", "--epsilon", "0.5", "--max-requests-per-unit", "11"]  # fmt: skip
    assert await asyncio.to_thread(dp_cli.cmd, settings, parser.parse_args(argv)) == 0
    first = capsys.readouterr().out
    assert "model\tday\trequests" in first and "big\t2026-11-02\t" in first
    assert await asyncio.to_thread(dp_cli.cmd, settings, parser.parse_args(argv)) == 0
    again = capsys.readouterr().out
    assert "(recorded release, nothing spent)" in again
    assert again.splitlines()[1:3] == first.splitlines()[1:3]  # the same noisy rows
    assert await asyncio.to_thread(dp_cli.cmd, settings, parser.parse_args(["dp", "budgets", "--tenant", "exh"])) == 0
    assert "exh\tusage\tbasic\ttotal\t0.25\t0.25\t0.0" in capsys.readouterr().out
    realloc = ["dp", "reallocation", "--tenant", "cache", "--near", "0.5"]
    assert await asyncio.to_thread(dp_cli.cmd, settings, parser.parse_args(realloc)) == 0
    assert "# near exhaustion" in capsys.readouterr().out
    too_much = [*argv[:-4], "--epsilon", "1000"]
    assert await asyncio.to_thread(dp_cli.cmd, settings, parser.parse_args(too_much)) == 1
    assert "epsilon must be in (0, 100]" in capsys.readouterr().err
