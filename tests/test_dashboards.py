"""Every Grafana dashboard in infra/grafana/ runs against a demo database.

The dashboards query the ClickHouse projections through the grafana-clickhouse-datasource
plugin. This test loads each JSON, takes every query (panel targets and query variables),
expands the plugin's macros ($__timeFilter, $__timeInterval, $__conditionalAll, ...) and the
template variables to concrete SQL the way the plugin does, and runs each through the read
side's ClickHouse HTTP endpoint of a real platform (real broker, real chDB) filled by demo
traffic: allowed, denied, redacted and failing requests. Each query must succeed, and the
main panels must return rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from ledgerflow import demo
from ledgerflow.settings import DEMO_KEYS
from tests import platform
from tests.conftest import REPO
from tests.platform import Platform

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

DASHBOARDS = sorted((REPO / "infra" / "grafana").glob("*.json"))
DATASOURCE = "grafana-clickhouse-datasource"
# Panels that must show data after the demo run (the others may rightly be empty: anomalies need
# days of history, budgets need a budget set).
MAIN_PANELS = {
    "slo.json": {
        "Availability: error budget left (30 days)",
        "/v1/ask latency: error budget left (30 days)",
        "Burn rate by window",
        "Burn rate over time",
        "Requests by status class",
        "/v1/ask latency (whole answers)",
        "Open burn-rate alerts",
        "Alert transitions",
        "Errors by route and kind",
    },
    "cost.json": {
        "Spend",
        "Savings",
        "Requests charged",
        "Savings rate",
        "Spend and savings over time",
        "Spend by tenant and model",
        "Daily rollup",
    },
    "policy.json": {
        "Denied requests",
        "Requests redacted",
        "Decisions over time",
        "Redactions by kind",
        "Denials by determining policy",
        "Obligations imposed",
    },
    "consumer-lag.json": {
        "Lag now",
        "Partitions without an owner",
        "Newest sample",
        "Lag by group",
        "Lag per partition now",
    },
}
# A panel per dashboard that the tenant (or group) selection must filter down to nothing.
FILTERED = {
    "slo.json": "Requests by status class",
    "cost.json": "Spend by tenant and model",
    "policy.json": "Decisions over time",
    "consumer-lag.json": "Lag per partition now",
}
FLAKY = [{"name": "sim-flaky", "input_per_mtok": "1", "output_per_mtok": "2", "error_rate": 1.0}]


# --- the plugin's macros, expanded as grafana-clickhouse-datasource does -------------------------


def _args(sql: str, start: int) -> tuple[list[str], int]:
    """The comma-separated arguments of the call whose '(' is at `start`, and the index after ')'."""
    depth, args, cur, i = 0, [], [], start
    while i < len(sql):
        ch = sql[i]
        if ch == "(":
            depth += 1
            if depth > 1:
                cur.append(ch)
        elif ch == ")":
            depth -= 1
            if depth == 0:
                args.append("".join(cur).strip())
                return args, i + 1
            cur.append(ch)
        elif ch == "," and depth == 1:
            args.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
        i += 1
    raise ValueError(f"unbalanced macro call in {sql!r}")


def _interpolate(sql: str, variables: dict[str, list[str] | None]) -> str:
    """Template variables: ${name:singlequote}, ${name} and $name (None = All)."""

    def value(name: str, fmt: str | None) -> str:
        if name not in variables:
            raise KeyError(f"unknown template variable {name!r}")
        chosen = variables[name]
        if chosen is None:
            return "$__all"
        if fmt == "singlequote":
            return ",".join("'" + v.replace("'", "\\'") + "'" for v in chosen)
        return ",".join(chosen)

    sql = re.sub(r"\$\{(\w+)(?::(\w+))?\}", lambda m: value(m.group(1), m.group(2)), sql)
    return re.sub(r"\$(?!__)(\w+)", lambda m: value(m.group(1), None), sql)


def expand(sql: str, start: datetime, end: datetime, interval_s: int, variables: dict[str, list[str] | None]) -> str:
    """Concrete SQL for `sql` over [start, end] with `variables`."""
    fs, ts = int(start.timestamp()), int(end.timestamp())
    fms, tms = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
    calls: dict[str, Callable[[list[str]], str]] = {
        "timeFilter": lambda a: f"{a[0]} >= toDateTime({fs}) AND {a[0]} <= toDateTime({ts})",
        "timeFilter_ms": lambda a: (
            f"{a[0]} >= fromUnixTimestamp64Milli({fms}) AND {a[0]} <= fromUnixTimestamp64Milli({tms})"
        ),
        "dateFilter": lambda a: f"{a[0]} >= toDate('{start:%Y-%m-%d}') AND {a[0]} <= toDate('{end:%Y-%m-%d}')",
        "timeInterval": lambda a: f"toStartOfInterval(toDateTime({a[0]}), INTERVAL {interval_s} second)",
        "timeInterval_ms": lambda a: (
            f"toStartOfInterval(toDateTime64({a[0]}, 3), INTERVAL {interval_s * 1000} millisecond)"
        ),
    }
    # $__conditionalAll first: its condition holds template variables the plugin checks for "All"
    while (i := sql.find("$__conditionalAll(")) >= 0:
        (cond, var), after = _args(sql, i + len("$__conditionalAll"))
        name = var.lstrip("$").strip("{}").split(":")[0]
        sql = sql[:i] + ("1=1" if variables[name] is None else cond) + sql[after:]
    sql = _interpolate(sql, variables)
    for name in sorted(calls, key=len, reverse=True):
        token = f"$__{name}("
        while (i := sql.find(token)) >= 0:
            args, after = _args(sql, i + len(token) - 1)
            sql = sql[:i] + calls[name](args) + sql[after:]
    bare = {
        "$__fromTime_ms": f"fromUnixTimestamp64Milli({fms})",
        "$__toTime_ms": f"fromUnixTimestamp64Milli({tms})",
        "$__fromTime": f"toDateTime({fs})",
        "$__toTime": f"toDateTime({ts})",
        "$__interval_s": str(interval_s),
    }
    for token, text in bare.items():
        sql = sql.replace(token, text)
    assert "$" not in sql, f"unexpanded macro or variable in:\n{sql}"
    return sql


def test_macro_expansion_matches_the_plugins_documented_output() -> None:
    start, end = datetime(2022, 10, 21, tzinfo=UTC), datetime(2022, 10, 23, 12, tzinfo=UTC)
    sql = (
        "SELECT $__timeInterval(t) AS time FROM x WHERE $__timeFilter(t) AND $__dateFilter(d) "
        "AND $__conditionalAll(tenant IN (${tenant:singlequote}), $tenant) AND $__interval_s > 0"
    )
    assert expand(sql, start, end, 20, {"tenant": ["a", "b"]}) == (
        "SELECT toStartOfInterval(toDateTime(t), INTERVAL 20 second) AS time FROM x "
        f"WHERE t >= toDateTime({int(start.timestamp())}) AND t <= toDateTime({int(end.timestamp())}) "
        "AND d >= toDate('2022-10-21') AND d <= toDate('2022-10-23') AND tenant IN ('a','b') AND 20 > 0"
    )
    assert "1=1" in expand(sql, start, end, 20, {"tenant": None})
    with pytest.raises(AssertionError, match="unexpanded"):
        expand("SELECT $__unknownMacro(x)", start, end, 20, {})


# --- the dashboards ----------------------------------------------------------------------------


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # collapsed rows hold their panels


def variable_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    return {v["name"]: v["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_is_grafana_clickhouse_json(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"].startswith("ledgerflow-") and dashboard["title"]
    assert {"type": "datasource", "id": DATASOURCE} in [
        {k: r[k] for k in ("type", "id")} for r in dashboard["__requires"]
    ]
    titles = [p["title"] for p in panels(dashboard)]
    assert len(titles) == len(set(titles)) and MAIN_PANELS[path.name] <= set(titles)
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        for target in panel["targets"]:
            assert target["datasource"] == {"type": DATASOURCE, "uid": "${datasource}"}
            assert target["editorType"] == "sql" and target["rawSql"].lstrip().upper().startswith("SELECT")
            assert target["format"] in (0, 1) and target["queryType"] in ("table", "timeseries")
        if panel["type"] == "timeseries":  # the plugin needs a time column for a time series
            assert all(" AS time" in t["rawSql"] for t in panel["targets"]), panel["title"]
    assert DASHBOARDS and {p.name for p in DASHBOARDS} == set(MAIN_PANELS)


# --- against the demo database -----------------------------------------------------------------


@pytest.fixture(scope="module")
def demo_platform(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    base_env = platform.platform_env

    def env(bootstrap: str, data_dir: Path) -> dict[str, str]:  # the lag sampler on (tests/platform.py: off)
        return {**base_env(bootstrap, data_dir), "LEDGERFLOW_LAG_SAMPLE_INTERVAL_S": "1"}

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEDGERFLOW_SIMULATED_MODELS", json.dumps(FLAKY))
        mp.setattr(platform, "platform_env", env)
        with platform.running_platform(mp, kafka_bootstrap, tmp_path_factory.mktemp("dash")) as p:
            fill(p)
            yield p


async def _post(url: str, calls: list[tuple[str, str | None, dict[str, Any]]]) -> list[int]:
    async with aiohttp.ClientSession() as session:

        async def one(path: str, key: str | None, body: dict[str, Any]) -> int:
            headers = {"X-API-Key": key} if key else {}
            async with session.post(f"{url}{path}", json=body, headers=headers) as resp:
                await resp.read()
                return resp.status

        return list(await asyncio.gather(*(one(*c) for c in calls)))


def wait_for(predicate: Callable[[], bool], timeout: float = 90.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if predicate():
                return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def fill(p: Platform) -> None:
    """Demo traffic plus what the policy, redaction and SLO panels need to show something."""
    url = p.settings.gateway_url
    acme, globex = DEMO_KEYS["acme"], DEMO_KEYS["globex"]
    warm = [("/v1/ask", acme, {"prompt": "warm up"})]
    wait_for(lambda: asyncio.run(_post(url, warm)) == [200], what="a first answer")
    ok, failed = asyncio.run(demo.send(p.settings, 60))
    assert (ok, failed) == (60, 0)
    tool = {"type": "function", "function": {"name": "code_exec"}}  # no tool scope: denied by the policy
    search = {"role": "user", "content": "run this"}
    special = (
        [("/v1/ask", globex, {"prompt": f"mail alice{i}@example.com about it"}) for i in range(3)]
        + [
            ("/v1/ask", globex, {"prompt": "restricted", "data_classification": "restricted"}),
            ("/v1/chat/completions", acme, {"model": "sim-small", "messages": [search], "tools": [tool]}),
            ("/v1/ask", None, {"prompt": "anonymous"}),
        ]
        + [("/v1/ask", acme, {"prompt": f"doomed {i}", "model": "sim-flaky"}) for i in range(3)]
    )
    assert asyncio.run(_post(url, special)) == [200] * 4 + [403, 401] + [503] * 3

    def filled() -> bool:
        counts = p.sql(
            "SELECT (SELECT count() FROM tokens_charged), (SELECT count() FROM request_completed), "
            "(SELECT count() FROM request_redacted), (SELECT countIf(decision = 'deny') FROM policy_decided), "
            "(SELECT count() FROM slo_burn_rate_alerted), (SELECT count() FROM consumer_lag)"
        )[0]
        seen[:] = [int(x) for x in counts]
        charged, completed, redacted, denied, alerts, lag = seen
        return charged >= 65 and completed >= 70 and redacted >= 3 and denied >= 1 and alerts >= 1 and lag > 0

    seen: list[int] = []
    try:
        wait_for(filled, what="the demo run in ClickHouse")
    except AssertionError as exc:
        raise AssertionError(f"{exc}: (charged, completed, redacted, denied, alerts, lag) = {seen}") from None


def run_all(p: Platform, path: Path, variables: dict[str, list[str] | None]) -> dict[str, int]:
    """Run every query of a dashboard; {panel title (or 'var:' name): rows}."""
    dashboard = json.loads(path.read_text())
    end = datetime.now(UTC) + timedelta(minutes=1)
    start = end - timedelta(hours=6)
    rows: dict[str, int] = {}
    for name, query in variable_queries(dashboard).items():
        rows[f"var:{name}"] = len(p.sql(expand(query, start, end, 60, variables)))
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            sql = expand(target["rawSql"], start, end, 60, variables)
            try:
                rows[panel["title"]] = len(p.sql(sql))
            except Exception as exc:
                raise AssertionError(f"{path.name} / {panel['title']} failed: {exc}\n{sql}") from None
    return rows


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_runs_and_the_main_panels_show_data(demo_platform: Platform, path: Path) -> None:
    everything = {"tenant": None, "group": None}  # "All", the default selection
    rows = run_all(demo_platform, path, everything)
    empty = sorted(t for t in MAIN_PANELS[path.name] if rows.get(t, 0) == 0)
    assert not empty, f"{path.name}: main panels without rows: {empty}"
    assert all(n > 0 for k, n in rows.items() if k.startswith("var:")), rows

    one = {"tenant": ["acme"], "group": [demo_platform.settings.sink_group]}  # a selection: the IN (...) path
    chosen = run_all(demo_platform, path, one)
    assert set(chosen) == set(rows)
    nobody = run_all(demo_platform, path, {"tenant": ["no-such-tenant"], "group": ["no-such-group"]})
    assert rows[FILTERED[path.name]] > 0 and nobody[FILTERED[path.name]] == 0  # the selection filters
