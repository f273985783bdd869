"""The gateway's OpenAPI 3.1 document, generated from the pydantic models.

Served at `/openapi.json` and checked in as `docs/openapi.json`; `tests/test_openapi.py`
fails when the two drift. Regenerate with `python -m gateway.openapi > docs/openapi.json`.
"""

from __future__ import annotations

from typing import Any

import orjson
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from gateway.models import (
    AskDelta,
    AskRequest,
    AskResponse,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ErrorResponse,
    FeedbackRequest,
    FeedbackResponse,
    MemoryEraseResponse,
    MemoryTurnRequest,
    MemoryWindowResponse,
    MemoryWriteResponse,
    PolicyCheckRequest,
    PolicyCheckResponse,
    ToolDescriptor,
)

API_VERSION = "1.0.0"
MODELS: list[type[BaseModel]] = [
    AskRequest, AskResponse, AskDelta, ChatCompletionRequest, ChatCompletion, ChatCompletionChunk, ErrorResponse,
    FeedbackRequest, FeedbackResponse, ToolDescriptor, PolicyCheckRequest, PolicyCheckResponse,
    MemoryTurnRequest, MemoryWriteResponse, MemoryWindowResponse, MemoryEraseResponse,
]  # fmt: skip


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _errors(*codes: int) -> dict[str, Any]:
    text = {
        400: "Malformed JSON or an unknown model; the message says what to fix.",
        401: "Missing or unknown API key.",
        403: "Refused by policy (recorded): `code` is policy_denied, tool_not_permitted, model_not_permitted or "
        "cost_cap_exceeded; the message names the determining policies and the tool, the allowed models or the "
        "cap. `X-Request-Id` names the recorded request.",
        404: "No such route (a session id with '/' in it never matches).",
        413: "Body over 1 MiB.",
        422: "A field is invalid; `fields` names each one.",
        501: "This gateway runs without the memory fabric.",
        503: "The event log did not accept the request in time (Retry-After is set); nothing was charged.",
    }
    return {
        str(c): {"description": text[c], "content": {"application/json": {"schema": _ref(ErrorResponse)}}}
        for c in codes
    }


def _call(summary: str, req: type[BaseModel], whole: type[BaseModel], frame: type[BaseModel], frames: str) -> Any:
    return {
        "post": {
            "summary": summary,
            "security": [{"bearer": []}, {"apiKey": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(req)}}},
            "responses": {
                "200": {
                    "description": f"The answer, or with `stream: true` server-sent events: {frames}",
                    "content": {
                        "application/json": {"schema": _ref(whole)},
                        "text/event-stream": {"schema": _ref(frame)},
                    },
                },
                **_errors(400, 401, 403, 413, 422, 503),
            },
            "parameters": [{
                "name": "X-Data-Classification", "in": "header", "required": False,
                "description": "public, internal, confidential or restricted (the header name is a setting); "
                "the stricter of it and the body's data_classification applies.",
                "schema": {"type": "string", "enum": ["public", "internal", "confidential", "restricted"]},
            }],
        }
    }  # fmt: skip


def _memory() -> dict[str, Any]:
    session = {
        "name": "session",
        "in": "path",
        "required": True,
        "description": "Session id (1-128 of letters, digits and . _ : @ -), scoped by your tenant: another "
        "tenant's session of the same name is a different session.",
        "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:@-]{1,128}$"},
    }
    bound = {"type": "integer", "minimum": 1}
    security: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}]
    return {
        "parameters": [session],
        "post": {
            "summary": "Append a turn to a memory session (masked as your policy asks)",
            "description": "Answered once Kafka committed the sealed turn and its MemoryWritten fact "
            "(which carries only a hash and sizes).",
            "security": security,
            "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(MemoryTurnRequest)}}},
            "responses": {
                "201": {"description": "Stored",
                        "content": {"application/json": {"schema": _ref(MemoryWriteResponse)}}},
                **_errors(400, 401, 404, 413, 422, 501, 503),
            },
        },
        "get": {
            "summary": "Read the session's window: the newest whole turns within the bounds",
            "description": "Reads your own writes, from any replica.",
            "security": security,
            "parameters": [
                {"name": "turns", "in": "query", "required": False, "schema": bound,
                 "description": "Most turns (capped by the memory_window_turns setting)."},
                {"name": "chars", "in": "query", "required": False, "schema": bound,
                 "description": "Most characters (capped by the memory_window_chars setting)."},
            ],
            "responses": {
                "200": {"description": "The window",
                        "content": {"application/json": {"schema": _ref(MemoryWindowResponse)}}},
                **_errors(401, 404, 422, 501, 503),
            },
        },
        "delete": {
            "summary": "Erase the session (its content is unreadable at once; MemoryErased is recorded)",
            "security": security,
            "responses": {
                "200": {"description": "Erased",
                        "content": {"application/json": {"schema": _ref(MemoryEraseResponse)}}},
                **_errors(401, 404, 422, 501, 503),
            },
        },
    }  # fmt: skip


def document() -> dict[str, Any]:
    _, defs = models_json_schema([(m, "validation") for m in MODELS], ref_template="#/components/schemas/{model}")
    probe = {"description": "JSON status", "content": {"application/json": {"schema": {"type": "object"}}}}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "ledgerflow gateway",
            "version": API_VERSION,
            "description": "Write side of ledgerflow. Versioning and deprecation: docs/api-versioning.md.",
        },
        "servers": [{"url": "http://127.0.0.1:8080"}],
        "paths": {
            "/v1/ask": _call(
                "Ask a model (native API)", AskRequest, AskResponse, AskDelta,
                "`event: delta` frames (AskDelta), then one `event: done` frame (AskResponse).",
            ),
            "/v1/chat/completions": _call(
                "OpenAI-compatible chat completion", ChatCompletionRequest, ChatCompletion, ChatCompletionChunk,
                "`data:` ChatCompletionChunk frames, then `data: [DONE]`.",
            ),
            "/v1/feedback": {"post": {
                "summary": "Record a quality signal for one of your requests",
                "security": [{"bearer": []}, {"apiKey": []}],
                "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(FeedbackRequest)}}},
                "responses": {
                    "202": {"description": "Recorded",
                            "content": {"application/json": {"schema": _ref(FeedbackResponse)}}},
                    **_errors(400, 401, 422, 503),
                },
            }},
            "/v1/policy/check": {"post": {
                "summary": "What-if: the policy decision for a call of your own (nothing is recorded)",
                "description": "Tenant, principal, roles and region come from the credential and the policy "
                               "attributes, never from the body.",
                "security": [{"bearer": []}, {"apiKey": []}],
                "requestBody": {"required": True,
                                "content": {"application/json": {"schema": _ref(PolicyCheckRequest)}}},
                "responses": {
                    "200": {"description": "The decision, its determining policies and obligations",
                            "content": {"application/json": {"schema": _ref(PolicyCheckResponse)}}},
                    **_errors(400, 401, 422),
                },
            }},
            "/v1/memory/{session}": _memory(),
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {
                "description": "Prometheus text exposition",
                "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/healthz": {"get": {"summary": "Liveness", "responses": {"200": probe}}},
            "/readyz": {"get": {"summary": "Readiness: Kafka reachable, state loaded", "responses": {
                "200": probe, "503": probe}}},
        },
        "components": {
            "schemas": defs["$defs"],
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "API key as a bearer token"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            },
        },
    }  # fmt: skip


def render() -> bytes:
    return orjson.dumps(document(), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


if __name__ == "__main__":
    import sys

    sys.stdout.buffer.write(render())
