"""Tenant isolation of the memory fabric, with every credential kind, through the real broker.

The same three credential kinds as `tests/test_tenant_isolation.py` (a settings key, an
issued key folded from an `ApiKeyIssued` event, an OIDC JWT verified against the test's JWKS):
a session id is scoped by the caller's tenant, so acme's "same-name" is not globex's; acme can
neither read, append to nor erase globex's turns, whatever headers or body fields it sends.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import always_ready, create_app
from gateway.auth import KeyStore
from gateway.memory import LocalWindow, MemoryFabric, MemoryLog, Sealer
from gateway.oidc import OidcVerifier
from ledgerflow.settings import hash_key
from streams.publisher import FactPublisher
from streams.topics import Topics
from tests.kafka_helpers import read_all
from tests.test_oidc import AUDIENCE, ISSUER, Keys
from tests.test_tenant_isolation import CONFIG_SECRET, ISSUED_SECRET, KINDS, OTHER_TENANT_HEADERS, World, issued

pytestmark = pytest.mark.kafka


@pytest.fixture
async def world(kafka_bootstrap: str, topics: Topics) -> AsyncIterator[World]:
    """One gateway with a real publisher and memory fabric, accepting all three credential kinds."""
    keys = Keys()
    keys.add("k1")

    async def jwks(_: web.Request) -> web.Response:
        return web.json_response(keys.jwks())

    idp = web.Application()
    idp.router.add_get("/jwks", jwks)
    store = KeyStore((f"cfg-{t}", t, hash_key(s), ["user"]) for t, s in CONFIG_SECRET.items())
    for tenant in ISSUED_SECRET:
        store.apply(issued(tenant))
    publisher = FactPublisher(kafka_bootstrap, f"iso-{topics.prefix}", topics)
    log = MemoryLog(kafka_bootstrap, topics.memory(), Sealer(bytes(32)))
    publisher.start()
    log.start()
    memory = MemoryFabric(log, LocalWindow(log), publisher, publish_timeout=10)
    try:
        async with TestServer(idp) as idp_server:
            oidc = OidcVerifier(ISSUER, AUDIENCE, str(idp_server.make_url("/jwks")), min_refresh_s=0.0)
            app = create_app(store, publisher, always_ready, oidc=oidc, memory=memory)
            async with TestClient(TestServer(app)) as client:
                w = World(client, keys, None)  # type: ignore[arg-type]
                w.topics = topics  # type: ignore[attr-defined]
                w.bootstrap = kafka_bootstrap  # type: ignore[attr-defined]
                yield w
    finally:
        log.close()
        publisher.close()


async def contents(w: World, kind: str, tenant: str, session: str, headers: dict[str, str] | None = None) -> list[str]:
    resp = await w.client.get(f"/v1/memory/{session}", headers={**w.auth(kind, tenant), **(headers or {})})
    assert resp.status == 200, await resp.text()
    return [t["content"] for t in (await resp.json())["turns"]]


async def append(w: World, kind: str, tenant: str, text: str, headers: dict[str, str] | None = None) -> Any:
    return await w.client.post(
        "/v1/memory/same-name",
        json={"role": "user", "content": text},
        headers={**w.auth(kind, tenant), **(headers or {})},
    )


@pytest.mark.parametrize("kind", KINDS)
async def test_memory_sessions_are_scoped_by_the_callers_tenant(world: World, kind: str) -> None:
    w = world
    for tenant in ("globex", "acme"):
        assert (await append(w, kind, tenant, f"{tenant} private")).status == 201
    # acme reads its own session of that name, whatever tenant its headers name
    assert await contents(w, kind, "acme", "same-name", OTHER_TENANT_HEADERS) == ["acme private"]
    # a write naming globex in headers lands in acme's session; naming it in the body is refused
    assert (await append(w, kind, "acme", "acme again", OTHER_TENANT_HEADERS)).status == 201
    for field in ({"tenant": "globex"}, {"tenant_id": "globex"}, {"session": "globex:same-name"}):
        refused = await w.client.post(
            "/v1/memory/same-name", json={"role": "user", "content": "x", **field}, headers=w.auth(kind, "acme")
        )
        assert refused.status == 422 and next(iter(field)) in (await refused.json())["error"]["fields"][0]
    # ids that try to reach past the tenant scope are refused
    for bad in ("globex%2Fsame-name", "..%2Fglobex", "same%20name", "x" * 129):
        assert (await w.client.get(f"/v1/memory/{bad}", headers=w.auth(kind, "acme"))).status in (404, 422), bad
    # acme erases "its" same-name: globex's is untouched
    erased = await w.client.delete("/v1/memory/same-name", headers={**w.auth(kind, "acme"), **OTHER_TENANT_HEADERS})
    assert erased.status == 200 and (await erased.json())["turns_erased"] == 2
    assert await contents(w, kind, "acme", "same-name") == []
    assert await contents(w, "settings_key", "globex", "same-name") == ["globex private"]
    # every memory fact acme caused is acme's, by acme's key
    from streams.codec import Codec

    topics: Topics = w.topics  # type: ignore[attr-defined]
    facts = [Codec().decode(m.value()) for m in read_all(w.bootstrap, [topics.name("memory-facts")], expect=4)]  # type: ignore[attr-defined]
    acme = [e for e in facts if e.tenant == "acme"]
    assert len(acme) == 3 and len(facts) == 4
    assert {getattr(e, "erased_by", None) for e in acme} - {None} == {w.key_id(kind, "acme")}


async def test_memory_without_a_valid_credential_is_refused(world: World) -> None:
    w = world
    assert (await w.client.get("/v1/memory/s")).status == 401
    assert (await w.client.delete("/v1/memory/s", headers={"X-API-Key": "nope"})).status == 401
    wrong_audience = w.keys.token("k1", tenant="acme", sub="x", aud="someone-else")
    resp = await w.client.post(
        "/v1/memory/s", json={"role": "user", "content": "x"}, headers={"Authorization": f"Bearer {wrong_audience}"}
    )
    assert resp.status == 401
    assert await contents(w, "oidc_jwt", "acme", "s") == []
