"""OIDC bearer tokens: JWTs verified against the issuer's JWKS (PyJWT does the JOSE work).

Checked: signature (asymmetric algorithms only, never `none` or HMAC, so a public key can
not be abused as an HMAC secret), issuer, audience, expiry and not-before with a small
leeway, and the presence of the tenant claim. The JWKS is fetched only from the configured
URL, cached, and re-fetched when a token names a key id we have not seen (key rotation), at
most once per `min_refresh_s` so a flood of bogus key ids cannot hammer the issuer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
from jwt import PyJWK, PyJWKSet

from domain.tenants import tenant_problem
from gateway.auth import Principal

log = logging.getLogger(__name__)
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA"]


class TokenRejected(Exception):
    """The bearer token is not acceptable; the message says why (safe to show the client)."""


@dataclass
class OidcVerifier:
    issuer: str
    audience: str
    jwks_url: str
    tenant_claim: str = "tenant"
    roles_claim: str = "roles"
    leeway_s: float = 30.0
    min_refresh_s: float = 30.0
    _keys: dict[str, PyJWK] = field(default_factory=dict)
    _fetched_at: float = -1e9
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @staticmethod
    def looks_like_jwt(token: str) -> bool:
        return token.count(".") == 2 and token.startswith("eyJ")

    async def verify(self, token: str) -> Principal:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRejected("the bearer token is not a well-formed JWT") from None
        if header.get("alg") not in ALGORITHMS:
            raise TokenRejected(f"tokens signed with {header.get('alg')!r} are not accepted; use RS256 or ES256")
        key = await self._key(str(header.get("kid", "")))
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key=key,
                algorithms=ALGORITHMS,
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_s,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRejected("the token has expired; get a new one from your identity provider") from None
        except jwt.InvalidAudienceError:
            raise TokenRejected(f"the token's audience is not {self.audience!r}") from None
        except jwt.InvalidIssuerError:
            raise TokenRejected(f"the token's issuer is not {self.issuer!r}") from None
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"the token is not valid: {exc}") from None
        tenant = claims.get(self.tenant_claim)
        if not isinstance(tenant, str) or not tenant.strip():
            raise TokenRejected(f"the token has no {self.tenant_claim!r} claim naming the tenant")
        problem = tenant_problem(tenant)
        if problem is not None:
            raise TokenRejected(f"the token's {self.tenant_claim!r} claim: {problem}")
        roles = claims.get(self.roles_claim) or ["user"]
        return Principal(tenant=tenant, key_id=f"oidc:{claims['sub']}", roles=tuple(str(r) for r in roles))

    async def _key(self, kid: str) -> PyJWK:
        if kid in self._keys:
            return self._keys[kid]
        async with self._lock:
            if kid not in self._keys and time.monotonic() - self._fetched_at >= self.min_refresh_s:
                await self._refresh()
        if kid not in self._keys:
            raise TokenRejected(f"no signing key {kid!r} at the issuer's JWKS")
        return self._keys[kid]

    async def _refresh(self) -> None:
        self._fetched_at = time.monotonic()
        try:
            timeout = aiohttp.ClientTimeout(total=3)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(self.jwks_url, allow_redirects=False) as resp,
            ):
                if resp.status != 200:
                    log.warning("JWKS fetch from %s answered %d", self.jwks_url, resp.status)
                    return
                data = await resp.json(content_type=None)
            keyset = PyJWKSet.from_dict(data)
        except (aiohttp.ClientError, TimeoutError, jwt.PyJWTError, ValueError) as exc:
            log.warning("JWKS fetch from %s failed: %s", self.jwks_url, exc)
            return
        self._keys = {k.key_id: k for k in keyset.keys if k.key_id}
