"""The checked-in OpenAPI document is what the code generates, and the gateway serves it."""

from __future__ import annotations

from pathlib import Path

import orjson
from aiohttp.test_utils import TestClient, TestServer

from gateway.app import always_ready, create_app
from gateway.auth import KeyStore
from gateway.openapi import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "openapi.json"


def test_checked_in_openapi_matches_the_models() -> None:
    assert DOC.read_bytes() == render(), "regenerate: .venv/bin/python -m gateway.openapi > docs/openapi.json"


def test_document_covers_both_apis_and_streamed_frames() -> None:
    doc = orjson.loads(render())
    assert doc["openapi"].startswith("3.1")
    for path in ("/v1/ask", "/v1/chat/completions"):
        content = doc["paths"][path]["post"]["responses"]["200"]["content"]
        assert {"application/json", "text/event-stream"} <= set(content)
    for name in ("AskRequest", "AskDelta", "ChatCompletionChunk", "ErrorResponse", "ToolDescriptor"):
        assert name in doc["components"]["schemas"]


async def test_gateway_serves_it() -> None:
    async with TestClient(TestServer(create_app(KeyStore(), None, always_ready))) as client:  # type: ignore[arg-type]
        resp = await client.get("/openapi.json")
        assert resp.status == 200 and await resp.read() == render()
