"""Keeps the gateway's KeyStore current from the compacted `api-keys` topic."""

from __future__ import annotations

from domain.keys import KeyStore
from streams.codec import Codec
from streams.follower import StateFollower


class KeyCatalog(StateFollower):
    def __init__(self, bootstrap: str, topic: str, store: KeyStore, codec: Codec | None = None) -> None:
        super().__init__(bootstrap, [topic], store.apply, name="api-keys", codec=codec)
