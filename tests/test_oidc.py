"""OIDC bearer JWTs against a JWKS served by the test, with key rotation and every rejection."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from gateway.app import always_ready, create_app
from gateway.auth import KeyStore
from gateway.oidc import OidcVerifier
from streams.events import Event

ISSUER = "https://idp.test"
AUDIENCE = "ledgerflow"


class Keys:
    def __init__(self) -> None:
        self.private: dict[str, rsa.RSAPrivateKey] = {}
        self.fetches = 0

    def add(self, kid: str) -> None:
        self.private[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key in self.private.items():
            jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        return {"keys": keys}

    def token(self, kid: str, **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "tenant": "acme", "iat": now, "exp": now + 300}
        body.update(claims)
        return jwt.encode(body, self.private[kid], algorithm="RS256", headers={"kid": kid})


class Recorder:
    def __init__(self) -> None:
        self.batches: list[list[Event]] = []

    async def publish(self, events: Sequence[Event], timeout: float = 1.8) -> None:
        self.batches.append(list(events))


@pytest.fixture
async def setup() -> AsyncIterator[tuple[TestClient, Keys, Recorder]]:
    keys = Keys()
    keys.add("k1")

    async def jwks(_: web.Request) -> web.Response:
        keys.fetches += 1
        return web.json_response(keys.jwks())

    idp = web.Application()
    idp.router.add_get("/jwks", jwks)
    async with TestServer(idp) as idp_server:
        verifier = OidcVerifier(ISSUER, AUDIENCE, str(idp_server.make_url("/jwks")), min_refresh_s=0.0)
        rec = Recorder()
        async with TestClient(TestServer(create_app(KeyStore(), rec, always_ready, oidc=verifier))) as client:
            yield client, keys, rec


async def ask(client: TestClient, token: str) -> tuple[int, dict[str, Any]]:
    resp = await client.post("/v1/ask", json={"prompt": "hi"}, headers={"Authorization": f"Bearer {token}"})
    return resp.status, await resp.json()


async def test_valid_token_names_the_tenant(setup: tuple[TestClient, Keys, Recorder]) -> None:
    client, keys, rec = setup
    status, _ = await ask(client, keys.token("k1", tenant="globex", sub="alice"))
    assert status == 200
    assert {e.tenant for e in rec.batches[0]} == {"globex"}
    assert rec.batches[0][0].api_key_id == "oidc:alice"  # type: ignore[attr-defined]


async def test_rotation_fetches_the_new_key(setup: tuple[TestClient, Keys, Recorder]) -> None:
    client, keys, _ = setup
    assert (await ask(client, keys.token("k1")))[0] == 200
    keys.add("k2")
    assert (await ask(client, keys.token("k2")))[0] == 200
    assert keys.fetches == 2


@pytest.mark.parametrize(
    ("claims", "needle"),
    [
        ({"exp": int(time.time()) - 3600}, "expired"),
        ({"aud": "someone-else"}, "audience"),
        ({"iss": "https://evil.test"}, "issuer"),
        ({"tenant": ""}, "tenant"),
        ({"tenant": "acme\nevil"}, "control character"),  # no checkpoint could name its chain
    ],
)
async def test_bad_claims_are_401_with_the_reason(
    setup: tuple[TestClient, Keys, Recorder], claims: dict[str, Any], needle: str
) -> None:
    client, keys, rec = setup
    status, body = await ask(client, keys.token("k1", **claims))
    assert status == 401 and needle in body["error"]["message"]
    assert rec.batches == []


async def test_forged_and_unknown_keys_and_hmac_are_refused(setup: tuple[TestClient, Keys, Recorder]) -> None:
    client, keys, rec = setup
    forger = Keys()
    forger.add("k1")  # same kid, different key
    assert (await ask(client, forger.token("k1")))[0] == 401
    forger.add("k9")
    status, body = await ask(client, forger.token("k9"))
    assert status == 401 and "k9" in body["error"]["message"]
    public_pem = keys.jwks()["keys"][0]["n"]
    hmac = jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "tenant": "acme", "exp": int(time.time()) + 60},
                      public_pem, algorithm="HS256", headers={"kid": "k1"})  # fmt: skip
    status, body = await ask(client, hmac)
    assert status == 401 and "HS256" in body["error"]["message"]
    assert rec.batches == []
