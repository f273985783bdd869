"""API keys as the platform holds them: only SHA-256 hashes, each naming its tenant and roles.

Keys come from two places: static ones in settings (the demo keys) and the compacted
`api-keys` topic (`ApiKeyIssued` / `ApiKeyRevoked`), which every process that checks keys
(each gateway replica, the read side) folds into a KeyStore with `apply`, so a key issued or
revoked anywhere works everywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from streams.events import ApiKeyIssued, ApiKeyRevoked, Event


@dataclass(frozen=True)
class Principal:
    tenant: str
    key_id: str
    roles: tuple[str, ...]
    expires_at: datetime | None = None


class KeyStore:
    """In-memory hash → principal map. Replaced entries are swapped whole, so readers need no lock."""

    def __init__(self, keys: Iterable[tuple[str, str, str, Iterable[str]]] = ()) -> None:
        self._by_hash: dict[str, Principal] = {}
        self._hash_of: dict[str, str] = {}
        for key_id, tenant, sha256, roles in keys:
            self.add(key_id, tenant, sha256, roles)

    def add(
        self,
        key_id: str,
        tenant: str,
        sha256: str,
        roles: Iterable[str] = ("user",),
        expires_at: datetime | None = None,
    ) -> None:
        digest = sha256.lower()
        self.revoke(key_id)
        self._by_hash[digest] = Principal(tenant, key_id, tuple(roles), expires_at)
        self._hash_of[key_id] = digest

    def revoke(self, key_id: str) -> bool:
        digest = self._hash_of.pop(key_id, None)
        return digest is not None and self._by_hash.pop(digest, None) is not None

    def apply(self, event: Event) -> None:
        """Fold one record of the `api-keys` topic (other event types are ignored)."""
        if isinstance(event, ApiKeyIssued):
            self.add(event.key_id, event.tenant, event.key_sha256, event.roles, event.expires_at)
        elif isinstance(event, ApiKeyRevoked):
            self.revoke(event.key_id)

    def active(self, key_id: str) -> bool:
        """Whether `key_id` is still issued and unexpired (sessions opened with it end otherwise)."""
        digest = self._hash_of.get(key_id)
        found = self._by_hash.get(digest) if digest is not None else None
        return found is not None and (found.expires_at is None or found.expires_at > datetime.now(UTC))

    def lookup(self, secret: str) -> Principal | None:
        # Looking up by digest compares hashes, never the secret, so timing reveals nothing of it.
        found = self._by_hash.get(hashlib.sha256(secret.encode()).hexdigest())
        if found is None or (found.expires_at is not None and found.expires_at <= datetime.now(UTC)):
            return None
        return found

    def __len__(self) -> int:
        return len(self._by_hash)
