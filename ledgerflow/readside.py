"""Calls to the read side (the projections service) as the operator.

The operator's read token comes from settings (`LEDGERFLOW_READ_TOKEN`) or, in the embedded
default, from the 0600 file `ledgerflow up` made at first start; it is sent as a bearer
header, never in the URL.
"""

from __future__ import annotations

import os
from pathlib import Path

import orjson

from ledgerflow.settings import Settings
from projections.access import load_or_create_token


def operator_token(settings: Settings) -> str:
    if settings.read_token is not None:
        return settings.read_token.get_secret_value()
    return load_or_create_token(settings.read_token_path)


def auth_headers(settings: Settings) -> dict[str, str]:
    return {"Authorization": f"Bearer {operator_token(settings)}"}


def static_keys_json(settings: Settings) -> bytes:
    """The settings' static API keys (hashes only) for the read side's `--api-keys-file`."""
    return orjson.dumps([k.model_dump() for k in settings.api_keys])


def prepare_files(settings: Settings) -> tuple[Path, Path]:
    """The token file and static-keys file the read-side process is started with.

    A token given in settings is written to the file (0600) so the process and the CLI agree.
    """
    token_path = settings.read_token_path
    if settings.read_token is not None:
        token_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(settings.read_token.get_secret_value() + "\n")
    else:
        load_or_create_token(token_path)
    keys_path = settings.resolved_data_dir / "run" / "read-api-keys.json"
    keys_path.parent.mkdir(parents=True, exist_ok=True)
    keys_path.write_bytes(static_keys_json(settings))
    return token_path, keys_path
