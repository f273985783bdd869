"""Keeps the gateway's KeyStore current from the compacted `api-keys` topic."""

from __future__ import annotations

from gateway.auth import KeyStore
from streams.codec import Codec
from streams.events import ApiKeyIssued, ApiKeyRevoked, Event
from streams.follower import StateFollower


class KeyCatalog(StateFollower):
    def __init__(self, bootstrap: str, topic: str, store: KeyStore, codec: Codec | None = None) -> None:
        super().__init__(bootstrap, [topic], self._on_event, name="api-keys", codec=codec)
        self._store = store

    def _on_event(self, event: Event) -> None:
        if isinstance(event, ApiKeyIssued):
            self._store.add(event.key_id, event.tenant, event.key_sha256, event.roles, event.expires_at)
        elif isinstance(event, ApiKeyRevoked):
            self._store.revoke(event.key_id)
