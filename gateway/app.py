"""HTTP routes of the gateway and the request path of `POST /v1/ask`.

Order on the request path: authenticate → validate → complete → build facts → publish them
in one transaction → answer. The answer is sent only after Kafka committed the facts; if
Kafka cannot take them within the budget the client gets 503 with Retry-After and the
answer is withheld, so no answered call goes unrecorded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from aiohttp import web
from pydantic import ValidationError

from domain.pricing import DEFAULT_PRICES, Price
from gateway.adapters import Adapter, SimulatedAdapter
from gateway.auth import KeyStore, Principal, presented_key
from gateway.facts import request_facts
from gateway.models import AskRequest, AskResponse, Usage
from streams.events import Event
from streams.ids import uuid7
from streams.publisher import PublishFailed

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 1 << 20
RETRY_AFTER_S = "1"


class Publisher(Protocol):
    async def publish(self, events: Sequence[Event], timeout: float = ...) -> None: ...


ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]


@dataclass
class GatewayState:
    keys: KeyStore
    publisher: Publisher
    adapter: Adapter
    prices: dict[str, Price]
    default_model: str
    publish_timeout: float
    ready_check: ReadyCheck


STATE = web.AppKey("state", GatewayState)


def error(
    status: int, code: str, message: str, fields: Sequence[str] = (), headers: dict[str, str] | None = None
) -> web.Response:
    body = {"error": {"code": code, "message": message, "fields": list(fields)}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json", headers=headers)


def json_response(data: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(data, default=str), content_type="application/json")


@web.middleware
async def errors_as_json(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every failure is a JSON error body; internals never leak into a response."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error(exc.status, exc.reason.lower().replace(" ", "_"), exc.text or exc.reason)
    except Exception:
        log.exception("unhandled error on %s", request.path)
        return error(500, "internal_error", "the gateway failed unexpectedly; the request was not recorded")


async def authenticate(request: web.Request) -> Principal | web.Response:
    secret = presented_key(request)
    if secret is None:
        return error(401, "missing_api_key", "send your API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    principal = request.app[STATE].keys.lookup(secret)
    if principal is None:
        return error(
            401, "unknown_api_key", "the API key is not known or was revoked; check the key or ask for a new one"
        )
    return principal


async def read_json(request: web.Request) -> Any | web.Response:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        return error(413, "body_too_large", f"the body is over {MAX_BODY_BYTES} bytes; send a shorter prompt")
    raw = await request.read()
    if not raw:
        return error(400, "empty_body", "send a JSON object with 'prompt' or 'messages'")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return error(400, "malformed_json", f"the body is not valid JSON: {exc}")


def validation_error(exc: ValidationError) -> web.Response:
    fields = []
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "body"
        fields.append(loc)
        parts.append(f"{loc}: {err['msg']}")
    return error(422, "invalid_request", "; ".join(parts), fields)


async def ask(request: web.Request) -> web.Response:
    state = request.app[STATE]
    started = time.monotonic()
    principal = await authenticate(request)
    if isinstance(principal, web.Response):
        return principal
    body = await read_json(request)
    if isinstance(body, web.Response):
        return body
    if not isinstance(body, dict):
        return error(400, "invalid_request", "the body must be a JSON object with 'prompt' or 'messages'")
    try:
        req = AskRequest.model_validate(body)
    except ValidationError as exc:
        return validation_error(exc)
    model = req.model or state.default_model
    price = state.prices.get(model)
    if model not in state.adapter.models or price is None:
        known = ", ".join(sorted(m for m in state.adapter.models if m in state.prices))
        return error(400, "unknown_model", f"model {model!r} is not available; use one of: {known}", ["model"])

    messages = req.as_messages()
    request_id = str(uuid7())
    completion = await state.adapter.complete(model, messages)
    recorded = request_facts(
        request_id=request_id,
        at=datetime.now(UTC),
        principal=principal,
        route="/v1/ask",
        messages=messages,
        model_hint=req.model,
        completion=completion,
        price=price,
        trace_parent=request.headers.get("traceparent"),
    )
    budget = max(0.05, state.publish_timeout - (time.monotonic() - started))
    try:
        await state.publisher.publish(recorded.events, timeout=budget)
    except PublishFailed as exc:
        log.warning("request %s not recorded: %s", request_id, exc)
        return error(
            503,
            "event_log_unavailable",
            "the event log did not accept the request in time; nothing was charged, retry later",
            headers={"Retry-After": RETRY_AFTER_S},
        )
    charge = recorded.charge
    answer = AskResponse(
        request_id=request_id,
        model=completion.model,
        answer=completion.text,
        usage=Usage(
            prompt_tokens=charge.prompt_tokens,
            completion_tokens=charge.completion_tokens,
            total_tokens=charge.prompt_tokens + charge.completion_tokens,
        ),
        cost=charge.cost,
        currency=charge.currency,
    )
    return web.Response(body=answer.model_dump_json(), content_type="application/json")


async def healthz(_: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ok, detail = await request.app[STATE].ready_check()
    return json_response({"ready": ok, "detail": detail}, status=200 if ok else 503)


def create_app(
    keys: KeyStore,
    publisher: Publisher,
    ready_check: ReadyCheck,
    *,
    adapter: Adapter | None = None,
    prices: dict[str, Price] | None = None,
    default_model: str = "sim-small",
    publish_timeout: float = 1.8,
) -> web.Application:
    app = web.Application(middlewares=[errors_as_json], client_max_size=MAX_BODY_BYTES)
    app[STATE] = GatewayState(
        keys=keys,
        publisher=publisher,
        adapter=adapter or SimulatedAdapter(),
        prices=prices or dict(DEFAULT_PRICES),
        default_model=default_model,
        publish_timeout=publish_timeout,
        ready_check=ready_check,
    )
    app.router.add_post("/v1/ask", ask)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def always_ready() -> tuple[bool, str]:
    return True, "no checks"
