"""The read-side process: its read-only ClickHouse HTTP endpoint, health, and crash-safe sink."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import clickhouse_connect
import orjson
import pytest
import urllib3
from aiohttp.test_utils import TestClient, TestServer
from clickhouse_connect.driver.exceptions import DatabaseError
from confluent_kafka import Producer

from projections.access import ReadAccess
from projections.migrations import discover
from projections.schema import columns_for, event_to_row, table_for
from projections.service import ProjectionService
from streams.events import TokensCharged
from streams.topics import Topics
from tests.test_projections_sink import CODEC, committed, make_events

REPO = Path(__file__).resolve().parents[1]
EVENTS = make_events(20)
N_REQUESTS = sum(e.event_type == "RequestReceived" for e in EVENTS)


@pytest.fixture(scope="module")
def service(chdb_url: str) -> Iterator[ProjectionService]:
    """The service without a sink (no broker needed), with a few rows in its tables (shared: read-only)."""
    ch_database = f"t_{uuid.uuid4().hex[:12]}"
    svc = ProjectionService(
        access=ReadAccess.open(), store_url=chdb_url, database=ch_database, run_sink=False, sql_handles=2
    )
    svc.start()
    assert svc.writer is not None
    for i, e in enumerate(EVENTS):
        svc.writer.insert(table_for(e.event_type), [event_to_row(e, "t", 0, i)], column_names=columns_for(e.event_type))
    yield svc
    svc.writer.command(f"DROP DATABASE IF EXISTS {ch_database}")
    svc.stop()


@pytest.fixture
async def http(service: ProjectionService) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(service.make_app(), host="127.0.0.1")) as client:
        yield client


async def test_health_endpoints(http: TestClient[Any, Any], service: ProjectionService) -> None:
    assert await (await http.get("/ping")).text() == "Ok.\n"
    assert (await http.get("/readyz")).status == 200
    status = orjson.loads(await (await http.get("/status")).read())
    assert (
        status["ready"]
        and status["migrations"] == [m.version for m in discover()]
        and status["database"] == service.database
    )
    assert await (await http.get("/")).text() == "Ok.\n"  # a bare GET, as ClickHouse answers


async def test_before_start_it_is_not_ready_and_a_server_store_is_not_proxied() -> None:
    starting = ProjectionService(access=ReadAccess.open(), store_url="chdb:///nowhere", database="lf", run_sink=False)
    async with TestClient(TestServer(starting.make_app(), host="127.0.0.1")) as client:
        assert (await client.get("/readyz")).status == 503
        assert (await client.get("/", params={"query": "SELECT 1"})).status == 503
        assert (await client.head("/ping")).status == 200
    server = ProjectionService(
        access=ReadAccess.open(), store_url="http://user:secret@127.0.0.1:1", database="lf", run_sink=False
    )
    async with TestClient(TestServer(server.make_app(), host="127.0.0.1")) as client:
        r = await client.get("/", params={"query": "SELECT 1"})
        assert r.status == 501 and "secret" not in await r.text()
        assert "secret" not in await (await client.get("/status")).text()


async def test_select_in_tabseparated_and_json(http: TestClient[Any, Any]) -> None:
    r = await http.get("/", params={"query": "SELECT count(), 'a\tb' FROM request_received"})
    assert r.status == 200 and r.headers["X-ClickHouse-Format"] == "TabSeparated"
    assert r.headers["Content-Type"].startswith("text/tab-separated-values")
    assert await r.text() == f"{N_REQUESTS}\ta\\tb\n"

    r = await http.post("/", data="SELECT tenant, count() AS n FROM request_received GROUP BY tenant ORDER BY tenant")
    assert r.status == 200
    r = await http.post("/", params={"default_format": "JSON"}, data="SELECT count() AS n FROM request_received")
    assert r.headers["Content-Type"].startswith("application/json")
    body = orjson.loads(await r.read())
    assert int(body["data"][0]["n"]) == N_REQUESTS and body["meta"] == [{"name": "n", "type": "UInt64"}]

    r = await http.post("/", data="SELECT toString(sum(cost)) AS c FROM tokens_charged FORMAT JSONEachRow;")
    assert r.headers["X-ClickHouse-Format"] == "JSONEachRow"
    exact = sum(e.cost for e in EVENTS if isinstance(e, TokensCharged))
    assert Decimal(orjson.loads(await r.read())["c"]) == exact  # Decimal(38, 12) kept exact


async def test_query_parameters_and_database(http: TestClient[Any, Any]) -> None:
    q = {"query": "SELECT count() FROM request_received WHERE tenant = {t:String}", "param_t": "acme"}
    acme = sum(e.event_type == "RequestReceived" and e.tenant == "acme" for e in EVENTS)
    assert await (await http.get("/", params=q)).text() == f"{acme}\n"
    r = await http.get("/", params={"query": "SELECT currentDatabase()", "database": "system"})
    assert await r.text() == "system\n"
    r = await http.get("/", params={"query": "SELECT 1", "database": "no_such_db"})
    assert r.status == 404 and r.headers["X-ClickHouse-Exception-Code"] == "81"


@pytest.mark.parametrize(
    ("sql", "status", "code", "needle"),
    [
        ("INSERT INTO request_received (event_id) VALUES ('x')", 403, 164, "INSERT is not allowed"),
        ("CREATE TABLE evil (a Int8) ENGINE = Memory", 403, 164, "CREATE is not allowed"),
        ("DROP TABLE request_received", 403, 164, "DROP is not allowed"),
        ("SELECT * FROM url('http://127.0.0.1:1/x', CSV, 'a String')", 403, 164, "url() is not allowed"),
        ("SELECT * FROM file('/etc/passwd', LineAsString)", 403, 164, "file() is not allowed"),
        ("SELECT file('/etc/hostname')", 403, 164, "file() is not allowed"),
        ("SELECT * FROM numbers(2) INTO OUTFILE 'out.tsv'", 403, 164, "INTO OUTFILE"),
        ("SELECT count() FROM request_received SETTINGS readonly = 0", 403, 164, "Cannot modify 'readonly'"),
        ("SELECT 1 SETTINGS readonly = 2", 403, 164, "Cannot modify 'readonly'"),
        ("SELECT * FROM mysql('127.0.0.1:1', 'a', 'b', 'c', 'd')", 403, 164, "mysql() is not allowed"),
        ("SELECT 1; DROP TABLE request_received", 400, 62, "Multi-statements"),
        ("SET readonly = 0", 403, 164, "SET is not allowed"),
        ("SELECT nope FROM request_received", 400, 47, "UNKNOWN_IDENTIFIER"),
        ("SELECT 1 FROM no_such_table", 404, 60, "UNKNOWN_TABLE"),
        ("SELEKT 1", 403, 164, "SELEKT is not allowed"),
    ],
)
async def test_writes_and_escapes_are_refused(
    http: TestClient[Any, Any], sql: str, status: int, code: int, needle: str
) -> None:
    r = await http.post("/", data=sql)
    text = await r.text()
    assert (r.status, r.headers["X-ClickHouse-Exception-Code"]) == (status, str(code)), text
    assert needle in text and text.startswith(f"Code: {code}. DB::Exception:")
    assert await (await http.get("/", params={"query": "SELECT count() FROM request_received"})).text() == (
        f"{N_REQUESTS}\n"
    )


async def test_readonly_setting_cannot_be_lowered_by_url(http: TestClient[Any, Any]) -> None:
    r = await http.get("/", params={"query": "SELECT 1", "readonly": "0"})
    assert r.status == 403 and "readonly" in await r.text()
    # Other settings sent as URL parameters are ignored, like clickhouse-connect's.
    r = await http.get("/", params={"query": "SELECT 1", "max_threads": "1", "wait_end_of_query": "1"})
    assert await r.text() == "1\n"


async def test_the_engine_session_is_readonly(service: ProjectionService) -> None:
    """Even a statement the gate would let through cannot write: readonly=1 is on the handle."""
    assert service.reader is not None
    out = service.reader.execute("SELECT getSetting('readonly')", "TabSeparated", service.database, {})
    assert out.body == b"1\n"


async def test_clickhouse_connect_http_client_works(http: TestClient[Any, Any], service: ProjectionService) -> None:
    port = http.server.port
    assert port is not None

    def use_client() -> None:
        client = clickhouse_connect.get_client(host="127.0.0.1", port=port, database=service.database)
        try:
            assert client.command("SELECT count() FROM request_received") == N_REQUESTS
            rows = client.query(
                "SELECT tenant, count() AS n, min(occurred_at) AS t FROM request_received "
                "WHERE tenant = {t:String} GROUP BY tenant",
                parameters={"t": "acme"},
            ).result_rows
            assert rows and rows[0][0] == "acme"
            totals = client.query("SELECT cost, currency FROM tenant_totals_updated ORDER BY cost").result_rows
            assert [r[1] for r in totals] == ["USD"] * len(totals)
            with pytest.raises(DatabaseError, match="164"):
                client.command("CREATE TABLE evil (a Int8) ENGINE = Memory")
            with pytest.raises(DatabaseError, match="readonly"):
                client.query("SELECT 1 SETTINGS readonly = 0")
        finally:
            client.close()

    await asyncio.to_thread(use_client)


# --- the real process, with a broker: kill -9, restart, SIGTERM --------------------------


class Proc:
    """`python -m projections` as a child process with its own chDB path."""

    TOKEN = "lf-test-operator-token"

    def __init__(self, args: list[str]) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        fd, token_file = tempfile.mkstemp(prefix="read-token-")
        os.write(fd, self.TOKEN.encode())
        os.close(fd)
        self.p = subprocess.Popen(
            [sys.executable, "-m", "projections", *args, "--token-file", token_file],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._port: int | None = None
        self._seen = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.p.stdout is not None
        for line in self.p.stdout:
            self.lines.append(line)
            m = re.search(r"listening on http://[\d.]+:(\d+)", line)
            if m:
                self._port = int(m.group(1))
                self._seen.set()

    @property
    def port(self) -> int:
        assert self._seen.wait(30), "".join(self.lines)
        assert self._port is not None
        return self._port

    def get(self, path: str, **fields: str) -> urllib3.BaseHTTPResponse:
        return urllib3.request(
            "GET",
            f"http://127.0.0.1:{self.port}{path}",
            fields=fields or None,
            headers={"Authorization": f"Bearer {self.TOKEN}"},
            timeout=10,
        )

    def sql(self, query: str) -> str:
        r = self.get("/", query=query)
        assert r.status == 200, r.data
        return r.data.decode()

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.p.poll() is None, "".join(self.lines)
            if self.get("/readyz").status == 200:
                return
            time.sleep(0.1)
        raise AssertionError("not ready: " + "".join(self.lines))

    def status(self) -> dict[str, Any]:
        return dict(orjson.loads(self.get("/status").data))


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for pr in started:
        if pr.p.poll() is None:
            pr.p.kill()
            pr.p.wait(10)


@pytest.mark.kafka
def test_process_survives_kill_9_and_stops_cleanly_on_sigterm(
    kafka_bootstrap: str, topics: Topics, tmp_path: Path, procs: list[Proc]
) -> None:
    group = f"svc-{uuid.uuid4().hex[:8]}"
    args = [
        "--bootstrap", kafka_bootstrap, "--group", group, "--topic-prefix", topics.prefix,
        "--partitions", str(topics.partitions), "--store", f"chdb://{tmp_path / 'chdb'}", "--database", "lf",
        "--port", "0", "--batch-max", "50", "--batch-ms", "20", "--instance-id", f"{group}-0",
    ]  # fmt: skip
    events = make_events(3000)

    def feed() -> None:
        """Facts keep arriving while the process runs, is killed and comes back."""
        producer = Producer({"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "linger.ms": 5})
        for i, e in enumerate(events):
            producer.produce(topics.for_event(e.event_type), key=e.tenant.encode(), value=CODEC.encode(e))
            if i % 100 == 99:
                producer.flush(10)
                time.sleep(0.05)
        assert producer.flush(30) == 0

    feeder = threading.Thread(target=feed, daemon=True)
    first = Proc(args)
    procs.append(first)
    first.wait_ready()
    feeder.start()
    deadline = time.monotonic() + 30
    while first.status()["sink"]["rows_inserted"] < 300:
        assert time.monotonic() < deadline, first.status()
        time.sleep(0.02)
    first.p.send_signal(signal.SIGKILL)  # no flush, no commit, maybe mid-insert
    first.p.wait(10)

    second = Proc(args)
    procs.append(second)
    second.wait_ready()
    feeder.join(60)
    tables = ["request_received", "policy_decided", "tokens_charged", "audit_recorded", "tenant_totals_updated"]
    count_all = " + ".join(f"(SELECT count() FROM {t})" for t in tables)
    distinct_all = " + ".join(f"(SELECT uniqExact(event_id) FROM {t})" for t in tables)
    deadline = time.monotonic() + 60
    while int(second.sql(f"SELECT {count_all}")) < len(events):
        assert time.monotonic() < deadline, second.status()
        time.sleep(0.1)
    time.sleep(0.5)
    assert int(second.sql(f"SELECT {count_all}")) == len(events), "rows doubled after kill -9"
    assert int(second.sql(f"SELECT {distinct_all}")) == len(events)
    assert second.sql("SELECT count() FROM dead_letters") == "0\n"
    resumed = second.status()["sink"]["rows_inserted"]
    assert 0 < resumed < len(events), "the restarted sink should continue where ClickHouse says, not from scratch"

    second.p.send_signal(signal.SIGTERM)
    assert second.p.wait(30) == 0, "".join(second.lines)
    offsets = committed(kafka_bootstrap, group, topics)  # the final commit happened
    assert sum(offsets.values()) >= len(events)


def test_the_process_will_not_start_without_a_way_to_authenticate(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m projections` needs the operator's token file, or an explicit `--open`."""
    from projections.__main__ import parse_args

    with pytest.raises(SystemExit) as exc:
        parse_args(["--store", "chdb:///nowhere", "--no-sink"])
    assert exc.value.code == 2
    assert "pass --token-file" in capsys.readouterr().err
    assert parse_args(["--store", "chdb:///nowhere", "--no-sink", "--open"]).open


def test_load_or_create_token_makes_a_private_file_once(tmp_path: Path) -> None:
    from projections.access import load_or_create_token

    path = tmp_path / "secrets" / "read.token"
    first = load_or_create_token(path)
    assert len(first) >= 32 and (path.stat().st_mode & 0o777) == 0o600
    assert load_or_create_token(path) == first


def test_read_rows_binds_values_as_the_client_does_quotes_backslashes_lists_and_decimals(
    service: ProjectionService,
) -> None:
    """The embedded reader binds escaped text like the HTTP interface; hand-built or str() text
    broke on a quote, a backslash or a tab, and arrays were spliced by hand (the DP queries)."""
    params: dict[str, Any] = {
        "s": "a'b\\c\td",
        "names": ["x'y", "z\\w", "]"],
        "edges": [Decimal("-1.5"), Decimal("0"), Decimal("2.25")],
    }
    [row] = service.read_rows(
        "SELECT {s:String} AS s, {names:Array(String)} AS names, "
        "toString({edges:Array(Decimal(38, 12))}) AS edges, length({names:Array(String)}) AS n",
        params,
    )
    assert (row["s"], row["names"], int(row["n"])) == ("a'b\\c\td", ["x'y", "z\\w", "]"], 3)
    assert row["edges"] == "[-1.5,0,2.25]"
