"""API-key authentication: keys are held only as SHA-256 hashes, each naming its tenant."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from aiohttp import web


@dataclass(frozen=True)
class Principal:
    tenant: str
    key_id: str
    roles: tuple[str, ...]


class KeyStore:
    """In-memory hash → principal map (later fed by ApiKeyIssued/Revoked events)."""

    def __init__(self, keys: Iterable[tuple[str, str, str, Iterable[str]]] = ()) -> None:
        self._by_hash: dict[str, Principal] = {}
        for key_id, tenant, sha256, roles in keys:
            self.add(key_id, tenant, sha256, roles)

    def add(self, key_id: str, tenant: str, sha256: str, roles: Iterable[str] = ("user",)) -> None:
        self._by_hash[sha256.lower()] = Principal(tenant, key_id, tuple(roles))

    def lookup(self, secret: str) -> Principal | None:
        digest = hashlib.sha256(secret.encode()).hexdigest()
        # Dict lookup by digest does not leak the secret by timing; compare again to be explicit.
        found = self._by_hash.get(digest)
        if found is not None and hmac.compare_digest(digest, hashlib.sha256(secret.encode()).hexdigest()):
            return found
        return None


def presented_key(request: web.Request) -> str | None:
    """The key from `Authorization: Bearer <key>` or `X-API-Key: <key>`."""
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("X-API-Key", "").strip() or None
