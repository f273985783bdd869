"""API-key authentication at the gateway: which credential a request presents.

The key store itself (hashes only, folded from the `api-keys` topic) is `domain/keys.py`,
shared with the read side.
"""

from __future__ import annotations

from aiohttp import web

from domain.keys import KeyStore, Principal

__all__ = ["KeyStore", "Principal", "presented_key"]


def presented_key(request: web.Request) -> str | None:
    """The credential from `Authorization: Bearer <key or JWT>` or `X-API-Key: <key>`."""
    header = request.headers.get("Authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip() or None
    return request.headers.get("X-API-Key", "").strip() or None
