"""Who may read what on the read side: the operator sees every tenant, a tenant's key sees its own.

Two kinds of caller:
- the operator (CLI, analysts, auditors) presents the read token: a random secret the
  platform writes to a 0600 file at first start (`ledgerflow up`) or that the deployment
  provides. Only its SHA-256 is held here. The operator may run any read-only SQL, start
  replays and see every tenant.
- a tenant presents one of its API keys (the same keys the gateway accepts, folded from the
  `api-keys` topic) carrying a read role (`admin` or `analyst`). A tenant never runs raw
  SQL: ClickHouse has no safe way to confine arbitrary SQL to one tenant's rows here (row
  policies need server users; chDB has none), so tenants get fixed, parameterised endpoints
  whose tenant filter comes from the key, never from the request.

Credentials are read from headers only (`Authorization: Bearer`, `Authorization: Basic` with
the secret as password, `X-API-Key`, `X-ClickHouse-Key`), never from the URL, which access
logs and proxies keep.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from domain.keys import KeyStore

READ_ROLES = frozenset({"admin", "analyst"})


@dataclass(frozen=True)
class Reader:
    """An authenticated read-side caller. `tenant` None means the operator (every tenant)."""

    who: str
    tenant: str | None

    @property
    def operator(self) -> bool:
        return self.tenant is None


READER = web.RequestKey("reader", Reader)  # set by the read side's guard on every authorised request


class AccessDenied(Exception):
    """401 (no or unknown credential) or 403 (known, not allowed), with a message naming the fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def presented_secret(headers: Mapping[str, str]) -> str | None:
    """The secret a request carries in any of the header forms ClickHouse and our clients use."""
    auth = headers.get("Authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    if scheme.lower() == "basic" and value.strip():
        try:
            _user, _, password = base64.b64decode(value.strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None
        return password or None
    for name in ("X-API-Key", "X-ClickHouse-Key"):
        found = headers.get(name, "").strip()
        if found:
            return found
    return None


class ReadAccess:
    def __init__(self, operator_token: str | None, keys: KeyStore | None = None, *, everyone_operator: bool = False):
        self._operator_sha256 = hashlib.sha256(operator_token.encode()).digest() if operator_token else None
        self.keys = keys if keys is not None else KeyStore()
        self._everyone_operator = everyone_operator

    @classmethod
    def open(cls) -> ReadAccess:
        """Every caller is the operator: for in-process tests and an explicit `--open` only."""
        return cls(None, everyone_operator=True)

    @property
    def is_open(self) -> bool:
        return self._everyone_operator

    def authorize(self, headers: Mapping[str, str]) -> Reader:
        if self._everyone_operator:
            return Reader("open", None)
        secret = presented_secret(headers)
        if secret is None:
            raise AccessDenied(
                401,
                "no credential: send the read token (see `ledgerflow token`) or a tenant API key with an "
                "admin or analyst role as 'Authorization: Bearer <secret>'",
            )
        digest = hashlib.sha256(secret.encode()).digest()
        if self._operator_sha256 is not None and hmac.compare_digest(digest, self._operator_sha256):
            return Reader("operator", None)
        principal = self.keys.lookup(secret)
        if principal is None:
            raise AccessDenied(401, "unknown, revoked or expired credential")
        if not READ_ROLES.intersection(principal.roles):
            raise AccessDenied(
                403,
                f"key {principal.key_id} has roles {list(principal.roles)}; the read side needs 'admin' or "
                "'analyst' (issue one with `ledgerflow keys issue --tenant T --role analyst`)",
            )
        return Reader(principal.key_id, principal.tenant)


def scoped_tenant(reader: Reader, asked: str | None) -> str | None:
    """The tenant a request may read: a tenant key's own (asking for another is refused), or the
    operator's choice (None = every tenant)."""
    if reader.operator:
        return asked or None
    if asked and asked != reader.tenant:
        raise AccessDenied(403, f"this key reads tenant {reader.tenant!r} only, not {asked!r}")
    return reader.tenant


def load_or_create_token(path: Path) -> str:
    """The read token in `path`, made (random, 0600) if the file does not exist yet."""
    try:
        token = path.read_text().strip()
        if token:
            return token
    except FileNotFoundError:
        pass
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    return token
