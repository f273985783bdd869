"""Tenant isolation: with every credential kind, a caller of tenant "acme" tries to reach "globex".

Credential kinds: an API key from settings (`Settings.api_keys`, as `gateway.server.build`
loads them), an API key issued as an `ApiKeyIssued` event (folded into the KeyStore by the
same `KeyCatalog` code every replica runs), and an OIDC bearer JWT verified against a JWKS
served by the test. On every write-side surface that takes an id or could name a tenant:

* `/v1/feedback` for globex's request id: accepted, but recorded only under the caller's own
  tenant and key (every join on the read side is on (tenant, request_id), so it joins
  nothing of globex's); it can never land in globex's rows.
* `/v1/policy/check`: the tenant comes only from the credential; a body naming a tenant or a
  principal is refused (422), a header naming one is ignored.
* `/v1/ask` and `/v1/chat/completions`: a `tenant` body field is refused on /v1/ask (its
  model forbids unknown fields) and ignored on chat completions (OpenAI clients send extra
  fields), an `X-Tenant` header is ignored: every fact is the caller's tenant's.

The read side (`projections/service.py`, `projections/access.py`) is checked at the end: only
the operator's token runs SQL; a tenant's key with a read role reaches fixed endpoints scoped
to its own tenant.
Memory (`/v1/memory/{session}`) is tried with the same credential kinds through the real
broker in `tests/test_memory_isolation.py`.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import always_ready, create_app
from gateway.auth import KeyStore
from gateway.oidc import OidcVerifier
from ledgerflow.settings import ApiKey, Settings, hash_key
from projections.access import ReadAccess
from projections.schema import columns_for, event_to_row, table_for
from projections.service import ProjectionService
from streams.events import ApiKeyIssued, Envelope, Event, FeedbackReceived
from streams.ids import uuid7
from tests.factories import charge, request
from tests.test_oidc import AUDIENCE, ISSUER, Keys

CONFIG_SECRET = {"acme": "lf_cfg_acme_secret", "globex": "lf_cfg_globex_secret"}
ISSUED_SECRET = {"acme": "lf_issued_acme_secret", "globex": "lf_issued_globex_secret"}
KINDS = ["settings_key", "issued_key", "oidc_jwt"]
OTHER_TENANT_HEADERS = {"X-Tenant": "globex", "X-Tenant-Id": "globex", "X-Ledgerflow-Tenant": "globex"}


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[Event]] = []

    async def publish(self, events: Sequence[Event], timeout: float = 1.8) -> None:
        self.batches.append(list(events))

    def since(self, n: int) -> list[Event]:
        return [e for b in self.batches[n:] for e in b]


def issued(tenant: str, secret: str | None = None, roles: Sequence[str] = ("user",)) -> ApiKeyIssued:
    """The event an admin's `key issue` publishes on the compacted api-keys topic."""
    key_id = f"issued-{tenant}" if secret is None else f"issued-{tenant}-{'-'.join(roles)}"
    return ApiKeyIssued(
        envelope=Envelope(
            event_id=str(uuid7()),
            event_type="ApiKeyIssued",
            schema_version=1,
            tenant=tenant,
            occurred_at=datetime.now(UTC),
            correlation_id=key_id,
            producer="test",
        ),
        key_id=key_id,
        key_sha256=hash_key(secret or ISSUED_SECRET[tenant]),
        roles=list(roles),
        issued_by="admin",
    )


class World:
    """One gateway that accepts all three credential kinds, for both tenants."""

    def __init__(self, client: TestClient[Any, Any], keys: Keys, rec: Recorder) -> None:
        self.client = client
        self.keys = keys
        self.rec = rec

    def auth(self, kind: str, tenant: str) -> dict[str, str]:
        if kind == "settings_key":
            return {"X-API-Key": CONFIG_SECRET[tenant]}
        if kind == "issued_key":
            return {"Authorization": f"Bearer {ISSUED_SECRET[tenant]}"}
        token = self.keys.token("k1", tenant=tenant, sub=f"user-of-{tenant}")
        return {"Authorization": f"Bearer {token}"}

    @staticmethod
    def key_id(kind: str, tenant: str) -> str:
        return {
            "settings_key": f"cfg-{tenant}",
            "issued_key": f"issued-{tenant}",
            "oidc_jwt": f"oidc:user-of-{tenant}",
        }[kind]

    async def globex_request_id(self) -> str:
        resp = await self.client.post(
            "/v1/ask", json={"prompt": "globex secret plan"}, headers=self.auth("settings_key", "globex")
        )
        assert resp.status == 200
        return str((await resp.json())["request_id"])


@pytest.fixture
async def world() -> AsyncIterator[World]:
    keys = Keys()
    keys.add("k1")

    async def jwks(_: web.Request) -> web.Response:
        return web.json_response(keys.jwks())

    idp = web.Application()
    idp.router.add_get("/jwks", jwks)
    settings = Settings(
        api_keys=[ApiKey(key_id=f"cfg-{t}", tenant=t, sha256=hash_key(s)) for t, s in CONFIG_SECRET.items()]
    )
    store = KeyStore((k.key_id, k.tenant, k.sha256, k.roles) for k in settings.api_keys)  # as gateway.server.build
    for tenant in ISSUED_SECRET:
        store.apply(issued(tenant))
    rec = Recorder()
    async with TestServer(idp) as idp_server:
        oidc = OidcVerifier(ISSUER, AUDIENCE, str(idp_server.make_url("/jwks")), min_refresh_s=0.0)
        async with TestClient(TestServer(create_app(store, rec, always_ready, oidc=oidc))) as client:
            yield World(client, keys, rec)


@pytest.mark.parametrize("kind", KINDS)
async def test_each_credential_kind_acts_as_its_own_tenant(world: World, kind: str) -> None:
    resp = await world.client.post("/v1/ask", json={"prompt": "hello"}, headers=world.auth(kind, "acme"))
    assert resp.status == 200, await resp.text()
    [batch] = world.rec.batches
    assert {e.tenant for e in batch} == {"acme"}
    assert batch[0].api_key_id == world.key_id(kind, "acme")  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", KINDS)
async def test_feedback_on_another_tenants_request_lands_only_in_the_callers_tenant(world: World, kind: str) -> None:
    """Feedback naming globex's request id is accepted (the gateway never reads other tenants'
    requests to check ownership: it is the write side) but recorded as acme's, by acme's key:
    it cannot be attached to globex's rows, which are keyed by (tenant, request_id)."""
    rid = await world.globex_request_id()
    n = len(world.rec.batches)
    resp = await world.client.post(
        "/v1/feedback",
        json={"request_id": rid, "score": 0.0, "label": "wrong"},
        headers={**world.auth(kind, "acme"), **OTHER_TENANT_HEADERS},
    )
    assert resp.status == 202, await resp.text()
    [fb] = world.rec.since(n)
    assert isinstance(fb, FeedbackReceived)
    assert (fb.tenant, fb.envelope.tenant, fb.api_key_id) == ("acme", "acme", world.key_id(kind, "acme"))
    assert fb.request_id == rid and fb.envelope.correlation_id == rid
    assert not any(e.tenant == "globex" for e in world.rec.since(n))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("field", [{"tenant": "globex"}, {"tenant_id": "globex"}, {"api_key_id": "cfg-globex"}])
async def test_feedback_body_naming_a_tenant_or_key_is_refused(world: World, kind: str, field: dict[str, str]) -> None:
    rid = await world.globex_request_id()
    n = len(world.rec.batches)
    body = {"request_id": rid, "score": 1.0, **field}
    resp = await world.client.post("/v1/feedback", json=body, headers=world.auth(kind, "acme"))
    assert resp.status == 422
    assert next(iter(field)) in (await resp.json())["error"]["fields"][0]
    assert world.rec.since(n) == []


@pytest.mark.parametrize("kind", KINDS)
async def test_policy_check_takes_the_tenant_only_from_the_credential(world: World, kind: str) -> None:
    headers = {**world.auth(kind, "acme"), **OTHER_TENANT_HEADERS}
    resp = await world.client.post("/v1/policy/check", json={}, headers=headers)
    assert resp.status == 200, await resp.text()
    out = await resp.json()
    assert (out["tenant"], out["principal"]) == ("acme", world.key_id(kind, "acme"))
    for field in ({"tenant": "globex"}, {"principal": "cfg-globex"}, {"roles": ["admin"]}, {"region": "us-east"}):
        refused = await world.client.post("/v1/policy/check", json=field, headers=headers)
        assert refused.status == 422, field
        assert repr(next(iter(field))) in (await refused.json())["error"]["message"]  # named, with the fix
    assert world.rec.batches == []  # a what-if records nothing


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("stream", [False, True])
async def test_a_tenant_named_in_headers_or_body_is_never_honoured(world: World, kind: str, stream: bool) -> None:
    headers = {**world.auth(kind, "acme"), **OTHER_TENANT_HEADERS}
    refused = await world.client.post(
        "/v1/ask", json={"prompt": "hi", "tenant": "globex", "stream": stream}, headers=headers
    )
    assert refused.status == 422 and "tenant" in (await refused.json())["error"]["fields"][0]
    assert world.rec.batches == []
    # chat completions ignore unknown fields (OpenAI clients send extras such as `user`)
    chat = {"model": "sim-small", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    for extra in ({"tenant": "globex"}, {"user": "globex"}, {"metadata": {"tenant": "globex"}}):
        resp = await world.client.post("/v1/chat/completions", json={**chat, **extra}, headers=headers)
        assert resp.status == 200, await resp.text()
        await resp.read()
    every = world.rec.since(0)
    assert every and {e.tenant for e in every} == {"acme"}
    assert {e.envelope.tenant for e in every} == {"acme"}


async def test_a_token_or_key_of_one_tenant_cannot_be_combined_with_another(world: World) -> None:
    """Two credentials at once: the Authorization header wins, and it is one tenant's, whole."""
    headers = {**world.auth("oidc_jwt", "acme"), "X-API-Key": CONFIG_SECRET["globex"]}
    resp = await world.client.post("/v1/ask", json={"prompt": "hi"}, headers=headers)
    assert resp.status == 200
    assert {e.tenant for e in world.rec.since(0)} == {"acme"}
    forged = world.keys.token("k1", tenant="globex", sub="user-of-acme")  # a token for globex is globex's
    resp = await world.client.post("/v1/policy/check", json={}, headers={"Authorization": f"Bearer {forged}"})
    assert (await resp.json())["tenant"] == "globex"


# --- read side -------------------------------------------------------------------------------


OPERATOR_TOKEN = "lf_read_operator_token"
ANALYST_SECRET = {"acme": "lf_analyst_acme_secret", "globex": "lf_analyst_globex_secret"}


@pytest.fixture(scope="module")
def read_side(chdb_url: str) -> Iterator[ProjectionService]:
    """The projections service with no sink (no broker), its store holding rows of both tenants.

    Access as `python -m projections` sets it up: the operator's token, the settings' keys
    (users, no read role) and analyst keys of each tenant (as folded from `ApiKeyIssued`)."""
    keys = KeyStore((f"cfg-{t}", t, hash_key(s), ["user"]) for t, s in CONFIG_SECRET.items())
    for tenant, secret in ANALYST_SECRET.items():
        keys.apply(issued(tenant, secret, ["analyst"]))
    svc = ProjectionService(
        store_url=chdb_url,
        database=f"iso_{uuid.uuid4().hex[:12]}",
        run_sink=False,
        sql_handles=1,
        access=ReadAccess(OPERATOR_TOKEN, keys),
    )
    svc.start()
    assert svc.writer is not None
    rows: list[Event] = [request(t) for t in ["acme", "acme", "globex", "globex", "globex"]]
    rows += [charge("acme", "0.5"), charge("globex", "2.25"), charge("globex", "1.25")]
    for i, e in enumerate(rows):
        svc.writer.insert(table_for(e.event_type), [event_to_row(e, "t", 0, i)], column_names=columns_for(e.event_type))
    yield svc
    svc.writer.command(f"DROP DATABASE IF EXISTS {svc.database}")
    svc.stop()


@pytest.fixture
async def read_http(read_side: ProjectionService) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(read_side.make_app(), host="127.0.0.1")) as client:
        yield client


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def basic(secret: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"default:{secret}".encode()).decode()}


TENANT_SQL = "SELECT tenant, count() FROM request_received GROUP BY tenant ORDER BY tenant FORMAT JSONCompact"


def test_read_side_binds_to_loopback_by_default() -> None:
    assert Settings().projections_host == "127.0.0.1"


@pytest.mark.parametrize(
    "headers", [bearer(OPERATOR_TOKEN), basic(OPERATOR_TOKEN), {"X-ClickHouse-Key": OPERATOR_TOKEN}]
)
async def test_read_side_sql_with_the_operator_token_reads_every_tenant(
    read_http: TestClient[Any, Any], headers: dict[str, str]
) -> None:
    resp = await read_http.get("/", params={"query": TENANT_SQL}, headers=headers)
    assert resp.status == 200, await resp.text()
    assert [row[0] for row in orjson.loads(await resp.read())["data"]] == ["acme", "globex"]


@pytest.mark.parametrize(
    ("headers", "status", "says"),
    [
        ({}, 401, "no credential"),
        (bearer("not-a-key"), 401, "unknown"),
        (bearer(CONFIG_SECRET["acme"]), 403, "needs 'admin' or 'analyst'"),  # a user key of the tenant
        (bearer(ANALYST_SECRET["acme"]), 403, "operator's read token"),  # tenants never run raw SQL
        (basic(ANALYST_SECRET["globex"]), 403, "operator's read token"),
    ],
)
async def test_read_side_sql_refuses_everyone_but_the_operator(
    read_http: TestClient[Any, Any], headers: dict[str, str], status: int, says: str
) -> None:
    """Any SQL would read every tenant's rows (there is no row-level confinement in chDB), so a
    tenant's key is refused outright, in ClickHouse's error dialect, with the reason; and the
    credential in the URL (ClickHouse's `?password=`) is never accepted."""
    resp = await read_http.get("/", params={"query": TENANT_SQL, "password": OPERATOR_TOKEN}, headers=headers)
    assert resp.status == status
    text = await resp.text()
    assert says in text and "DB::Exception" in text
    assert "globex" not in text  # no data rows leak in the error (only the caller's own tenant is named)


@pytest.mark.parametrize("path", ["/status", "/replay/status"])
async def test_operator_routes_refuse_tenant_keys(read_http: TestClient[Any, Any], path: str) -> None:
    assert (await read_http.get(path, headers=bearer(ANALYST_SECRET["acme"]))).status == 403
    assert (await read_http.get(path)).status == 401
    assert (await read_http.get(path, headers=bearer(OPERATOR_TOKEN))).status == 200


async def test_health_checks_need_no_credential(read_http: TestClient[Any, Any]) -> None:
    assert (await read_http.get("/ping")).status == 200
    assert (await read_http.get("/readyz")).status == 200


async def test_usage_with_a_tenants_key_is_that_tenants_only(read_http: TestClient[Any, Any]) -> None:
    resp = await read_http.get("/v1/usage", headers=bearer(ANALYST_SECRET["globex"]))
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert body["tenant"] == "globex"
    assert {d["tenant"] for d in body["days"]} == {"globex"}
    assert sum(Decimal(d["cost"]) for d in body["days"]) == Decimal("3.5")
    # Asking for another tenant is refused, not silently narrowed.
    resp = await read_http.get("/v1/usage", params={"tenant": "acme"}, headers=bearer(ANALYST_SECRET["globex"]))
    assert resp.status == 403
    assert "reads tenant 'globex' only" in (await resp.json())["error"]


async def test_usage_as_the_operator_reads_one_or_every_tenant(read_http: TestClient[Any, Any]) -> None:
    every = await (await read_http.get("/v1/usage", headers=bearer(OPERATOR_TOKEN))).json()
    assert every["tenant"] is None and {d["tenant"] for d in every["days"]} == {"acme", "globex"}
    one = await (await read_http.get("/v1/usage", params={"tenant": "acme"}, headers=bearer(OPERATOR_TOKEN))).json()
    assert [Decimal(d["cost"]) for d in one["days"]] == [Decimal("0.5")]


async def test_usage_rejects_a_bad_window_with_the_fix(read_http: TestClient[Any, Any]) -> None:
    resp = await read_http.get("/v1/usage", params={"since": "last week"}, headers=bearer(OPERATOR_TOKEN))
    assert resp.status == 400
    assert "dates like 2026-11-01" in (await resp.json())["error"]


async def test_policy_dry_run_with_a_tenants_key_is_scoped_to_that_tenant(read_http: TestClient[Any, Any]) -> None:
    body = {"bundle": "permit(principal, action, resource);", "tenant": "acme"}
    resp = await read_http.post("/v1/policy/dry-run", json=body, headers=bearer(ANALYST_SECRET["globex"]))
    assert resp.status == 403
    assert "reads tenant 'globex' only" in (await resp.json())["error"]
