"""OpenAI-compatible HTTP adapter (OpenAI, vLLM, Ollama, LiteLLM...) behind the `Adapter` interface.

Why it looks the way it does:

* **One pooled session.** A lazily created `aiohttp.ClientSession` with a keep-alive
  `TCPConnector` per adapter; a new TCP (and TLS) handshake per call would dominate latency.
  The keep-alive is shorter than uvicorn's 5 s default so we rarely reuse a socket the
  upstream is closing.
* **Retries only where repeating is harmless to the caller**: connect errors, stale
  keep-alive disconnects, timeouts and 429/502/503/504, with full-jitter backoff, and for a
  stream only until the first piece was handed to the caller. Never after: the client has
  already seen part of an answer.
* **A circuit breaker** per upstream so a dead upstream costs callers microseconds, not
  `timeout_s x attempts`, and is probed by one request after a cool-down.
* **Egress is pinned.** The base URL's host must be in `allowed_hosts`; redirects are
  errors, not followed; every address the host resolves to (on every connection, so DNS
  rebinding is covered) must be public unless loopback or a network is allowed explicitly;
  proxies from the environment are ignored.
* **The API key stays secret.** It is only ever in the Authorization header, which nothing
  here logs; error messages are built by us (never from aiohttp exceptions that carry request
  headers), raised without exception context, and scrubbed of the key.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import logging
import os
import random
import socket
import ssl as ssl_module
import time
from collections import OrderedDict, deque
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import aiohttp
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from gateway.adapters import Adapter, Completion
from gateway.models import Message

log = logging.getLogger(__name__)

T = TypeVar("T")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

RETRYABLE_STATUSES = frozenset({429, 502, 503, 504})
MAX_ERROR_BODY = 4096  # bytes of an upstream error body we read for its message
MAX_SSE_LINE = 1 << 20  # one SSE `data:` line; a longer one is a broken upstream
_USAGE_STASH_MAX = 4096  # streamed usages waiting for `usage()`; bounded so abandoned ones cannot leak


# --- errors --------------------------------------------------------------------------------


class UpstreamError(Exception):
    """A call to an upstream model failed. `status` and `code` say what the gateway should answer.

    `retry_after_s` is set when the upstream (or the breaker) says when to come back; the
    gateway should send it as `Retry-After`. Messages never contain the API key.
    """

    status: int = 502
    code: str = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        upstream_status: int | None = None,
        attempts: int = 0,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s
        self.upstream_status = upstream_status
        self.attempts = attempts


class UpstreamUnavailable(UpstreamError):
    """The upstream cannot be reached (connect errors after retries); worth retrying later."""

    status = 503
    code = "upstream_unavailable"


class CircuitOpen(UpstreamUnavailable):
    """The breaker is open: the call was refused without touching the network."""

    code = "upstream_circuit_open"


class UpstreamTimeout(UpstreamError):
    """The upstream did not answer within `timeout_s` on any attempt."""

    status = 504
    code = "upstream_timeout"


class UpstreamHTTPError(UpstreamError):
    """The upstream answered with a non-2xx status (after any retries)."""

    code = "upstream_http_error"

    def __init__(self, message: str, *, upstream_status: int, **kw: Any) -> None:
        super().__init__(message, upstream_status=upstream_status, **kw)
        self.status = _gateway_status(upstream_status)
        if upstream_status == 429:
            self.code = "upstream_rate_limited"
        elif self.status == 400:
            self.code = "upstream_rejected_request"


class UpstreamProtocolError(UpstreamError):
    """The upstream answered 200 with something that is not an OpenAI-compatible completion."""

    code = "upstream_bad_response"


class UpstreamStreamBroken(UpstreamError):
    """A stream failed after pieces were handed out; the gateway must end its own stream with an error.

    The only error a stream raises after its first piece, whatever the cause.
    """

    code = "upstream_stream_broken"


class EgressRefused(UpstreamError):
    """Outbound policy refused the destination (host not allowed, private address, redirect)."""

    code = "upstream_refused"


def _gateway_status(upstream_status: int) -> int:
    """What the gateway answers for an upstream status: the client's fault only for a bad request."""
    if upstream_status in (429, 503):
        return 503  # the upstream's capacity, not the client's rate limit
    if upstream_status == 504:
        return 504
    if upstream_status in (400, 413, 422):
        return 400  # e.g. the prompt exceeds the model's context window
    return 502  # 401/403/404 are our configuration; 5xx are the upstream's failure


# --- circuit breaker -----------------------------------------------------------------------


class CircuitBreaker:
    """Closed → open after `failure_threshold` consecutive failures → half-open after `cooldown_s`.

    Half-open lets exactly one probe through; its verdict closes or reopens the circuit.
    Calls started before the circuit opened cannot close it: only verdicts of calls let
    through in the current state count. Single event loop only (no locking needed).
    """

    def __init__(
        self,
        failure_threshold: int = 5,
        cooldown_s: float = 10.0,
        *,
        name: str = "upstream",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1 or cooldown_s < 0:
            raise ValueError("failure_threshold must be >= 1 and cooldown_s >= 0")
        self.failure_threshold = failure_threshold
        self.cooldown_s = cooldown_s
        self.name = name
        self._clock = clock
        self._state: Literal["closed", "open", "half_open"] = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> Literal["closed", "open", "half_open"]:
        if self._state == "open" and self._clock() - self._opened_at >= self.cooldown_s:
            return "half_open"
        return self._state

    def acquire(self) -> bool:
        """Admit a call or raise CircuitOpen; True means the call is the half-open probe."""
        if self._state == "closed":
            return False
        if self._state == "open":
            remaining = self.cooldown_s - (self._clock() - self._opened_at)
            if remaining > 0:
                raise self._refusal(remaining)
            self._state = "half_open"
        if self._probe_in_flight:
            raise self._refusal(self.cooldown_s)
        self._probe_in_flight = True
        return True

    def success(self, probe: bool) -> None:
        if probe or self._state == "closed":
            self._state = "closed"
            self._failures = 0
            self._probe_in_flight = False

    def failure(self, probe: bool) -> None:
        if probe:
            self._open()
        elif self._state == "closed":
            self._failures += 1
            if self._failures >= self.failure_threshold:
                self._open()

    def release(self, probe: bool) -> None:
        """The call ended without a verdict (cancelled, refused by policy): free the probe slot."""
        if probe:
            self._probe_in_flight = False

    def _open(self) -> None:
        if self._state != "open":
            log.warning("circuit for %s opened after %d consecutive failures", self.name, self._failures)
        self._state = "open"
        self._opened_at = self._clock()
        self._probe_in_flight = False
        self._failures = 0

    def _refusal(self, retry_after: float) -> CircuitOpen:
        return CircuitOpen(
            f"upstream {self.name!r} is unavailable (circuit open after repeated failures); "
            f"retry in {retry_after:.1f} s",
            retry_after_s=round(max(retry_after, 0.0), 3),
        )


# --- egress policy -------------------------------------------------------------------------


@dataclass(frozen=True)
class EgressPolicy:
    """Which resolved addresses we may connect to: public ones, plus what is allowed explicitly."""

    allow_loopback: bool = False
    allowed_networks: tuple[IPNetwork, ...] = ()

    def permits(self, addr: IPAddress) -> bool:
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped  # ::ffff:10.0.0.1 is 10.0.0.1
        if any(addr in net for net in self.allowed_networks):
            return True
        if addr.is_loopback:
            return self.allow_loopback
        # is_global is False for private, link-local (incl. 169.254.169.254), ULA, CGNAT,
        # multicast, reserved, unspecified and documentation ranges.
        return addr.is_global and not addr.is_multicast

    def check(self, host: str, addr: IPAddress) -> None:
        if not self.permits(addr):
            raise EgressRefused(
                f"refusing to connect to {host!r} at {addr}: private, link-local, loopback or metadata "
                "addresses need allow_loopback or allowed_networks"
            )


class GuardedResolver(AbstractResolver):
    """Resolves through `inner` and drops addresses the policy refuses; none left → EgressRefused.

    It sits in the connector, so the check runs on the addresses actually connected to, on
    every new connection, before any socket is opened.
    """

    def __init__(self, policy: EgressPolicy, inner: AbstractResolver | None = None) -> None:
        self._policy = policy
        self._inner = inner

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if self._inner is None:
            self._inner = aiohttp.ThreadedResolver()
        results = await self._inner.resolve(host, port, family)
        allowed = [r for r in results if self._policy.permits(ipaddress.ip_address(r["host"].split("%", 1)[0]))]
        if not allowed:
            seen = ", ".join(sorted({r["host"] for r in results})) or "nothing"
            raise EgressRefused(
                f"refusing to connect to {host!r}: it resolves to {seen}, none of which is an allowed address"
            )
        return allowed

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


# --- completions and streams ---------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamCompletion(Completion):
    """A Completion that says whether its token counts are the upstream's or our estimate."""

    estimated: bool = False
    finish_reason: str | None = None
    attempts: int = 1  # calls made, retries included (AdapterCalled.retries = attempts - 1)


def _bounded(completion: UpstreamCompletion, max_tokens: int | None, upstream: str) -> UpstreamCompletion:
    """An estimate capped at `max_tokens`; reported usage over it is kept, and logged.

    Why keep it: the upstream bills what it reports, so the charge and the budget settle the
    actual cost (the ledger must equal the bill), even past the hold. The overshoot is bounded
    per call by the upstream's own output limit, and the settled spend makes the next hold see it.
    """
    if max_tokens is None or completion.completion_tokens <= max_tokens:
        return completion
    if completion.estimated:
        return replace(completion, completion_tokens=max_tokens)
    log.warning(
        "upstream %r reported %d completion tokens, over the max_tokens of %d it was sent; charging what it reported",
        upstream,
        completion.completion_tokens,
        max_tokens,
    )
    return completion


def estimate_usage(messages: list[Message], text: str) -> tuple[int, int]:
    """~4 characters per token (the simulator's rule), for upstreams that report no usage."""
    chars = sum(len(m.content) for m in messages)
    return max(1, (chars + 3) // 4) + 3 * len(messages), (len(text) + 3) // 4


class UpstreamStream:
    """The pieces of a streamed answer; after exhaustion `completion` holds the upstream's usage.

    An `AsyncIterator[str]`, so it satisfies `Adapter.stream`. The gateway may read
    `completion` directly (race-free) instead of calling `usage()` afterwards.
    """

    def __init__(
        self, adapter: OpenAIUpstreamAdapter, model: str, messages: list[Message], max_tokens: int | None = None
    ) -> None:
        self.completion: UpstreamCompletion | None = None
        self._gen = adapter._stream_pieces(model, messages, self, max_tokens)

    def __aiter__(self) -> UpstreamStream:
        return self

    async def __anext__(self) -> str:
        return await self._gen.__anext__()

    async def aclose(self) -> None:
        """Stop early: the upstream connection is closed, not returned to the pool half-read."""
        await self._gen.aclose()


@dataclass
class _Failure(Exception):
    """One failed attempt, classified: may it be retried, does it count against the breaker."""

    error: UpstreamError
    retryable: bool
    counts: bool


class _SSEReader:
    """Reads OpenAI chat-completion chunks from an SSE body, one content piece at a time.

    Splits whatever bytes arrived into lines itself: a `readline()` per line costs several
    times more in aiohttp, and a stream is two lines per token.
    """

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._content = resp.content
        self._lines: deque[bytes] = deque()
        self._partial = b""
        self.usage: tuple[int, int] | None = None
        self.finish_reason: str | None = None
        self.done = False

    async def _next_line(self) -> bytes:
        """The next non-blank line; b"" at the end of the body."""
        while not self._lines:
            chunk = await self._content.readany()
            if not chunk:
                line, self._partial = self._partial, b""
                return line
            lines = (self._partial + chunk).split(b"\n")
            self._partial = lines.pop()
            if len(self._partial) > MAX_SSE_LINE:
                raise _BadChunk(f"a stream line is over {MAX_SSE_LINE} bytes")
            self._lines.extend(line for line in lines if line.strip())
        return self._lines.popleft()

    async def next_piece(self) -> str | None:
        """The next non-empty content piece; None at `[DONE]` (or a clean end after a finish_reason)."""
        while not self.done:
            line = await self._next_line()
            if not line:
                if self.finish_reason is None:
                    raise _BrokenStream("the upstream ended the stream before it finished")
                self.done = True
                return None
            if not line.startswith(b"data:"):
                continue  # blank separators, `event:`, `id:`, `: keep-alive` comments
            data = line[5:].strip()
            if data == b"[DONE]":
                self.done = True
                return None
            try:
                chunk = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise _BadChunk("a stream chunk is not JSON") from None
            if not isinstance(chunk, dict):
                raise _BadChunk("a stream chunk is not a JSON object")
            if chunk.get("error"):
                raise _BrokenStream(f"the upstream reported an error mid-stream: {_error_text(chunk)}")
            usage = _usage_of(chunk)
            if usage is not None:
                self.usage = usage
            choices = chunk.get("choices") or []
            if not isinstance(choices, list):
                raise _BadChunk("'choices' is not a list")
            for choice in choices:
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue
                if choice.get("finish_reason"):
                    self.finish_reason = str(choice["finish_reason"])
                delta = choice.get("delta") or {}
                content = delta.get("content") if isinstance(delta, dict) else None
                if content:
                    return str(content)
        return None


class _BrokenStream(Exception):
    """The stream ended or failed before `[DONE]`."""


class _BadChunk(Exception):
    """A stream chunk is not a valid chat-completion chunk."""


def _usage_of(obj: dict[str, Any]) -> tuple[int, int] | None:
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if isinstance(prompt, int) and isinstance(completion, int) and prompt >= 0 and completion >= 0:
        return prompt, completion
    return None


def _error_text(obj: Any) -> str:
    """The human message of an OpenAI-style error body, short."""
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("type") or err.get("code")
            if msg:
                return str(msg)[:300]
        elif isinstance(err, str):
            return err[:300]
        detail = obj.get("detail")
        if detail:
            return str(detail)[:300]
    return ""


async def _read_upto(resp: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """At most `limit` bytes of the body, and whether that was all of it.

    (`StreamReader.read(n)` returns whatever arrived, up to n, so it has to be looped.)
    """
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await resp.content.readany()
        if not chunk:
            return b"".join(chunks), True
        size += len(chunk)
        if size > limit:
            chunks.append(chunk[: limit - (size - len(chunk))])
            return b"".join(chunks), False
        chunks.append(chunk)


def _retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (the HTTP-date form is rare from LLM APIs and ignored)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 else None


# --- the adapter ---------------------------------------------------------------------------


class OpenAIUpstreamAdapter:
    """`Adapter` over `POST {base_url}/chat/completions` of an OpenAI-compatible server.

    `models` are the names the gateway exposes; `upstream_models` maps them to the
    upstream's ids where they differ (e.g. "llama-8b" → "meta-llama/Llama-3.1-8B-Instruct").
    `timeout_s` bounds a whole non-streamed call, and for a stream the wait for each read
    (so a long answer that keeps flowing is not cut off).
    """

    def __init__(
        self,
        base_url: str,
        *,
        models: Iterable[str],
        allowed_hosts: Iterable[str],
        api_key: str | None = None,
        api_key_env: str | None = None,
        name: str = "openai",
        timeout_s: float = 60.0,
        connect_timeout_s: float = 3.0,
        max_retries: int = 2,
        backoff_base_s: float = 0.1,
        backoff_cap_s: float = 2.0,
        breaker: CircuitBreaker | None = None,
        allow_loopback: bool = False,
        allowed_networks: Iterable[str | IPNetwork] = (),
        max_connections: int = 100,
        keepalive_s: float = 4.0,
        upstream_models: Mapping[str, str] | None = None,
        request_defaults: Mapping[str, Any] | None = None,
        max_response_bytes: int = 8 << 20,
        ssl: ssl_module.SSLContext | bool = True,
        resolver: AbstractResolver | None = None,
    ) -> None:
        if api_key is not None and api_key_env is not None:
            raise ValueError("give api_key or api_key_env, not both")
        if api_key_env is not None:
            api_key = os.environ.get(api_key_env)
            if not api_key:
                raise ValueError(f"environment variable {api_key_env} (the upstream API key) is not set or empty")
        self._api_key = api_key or None
        self.name = name
        self.models: tuple[str, ...] = tuple(models)
        if not self.models:
            raise ValueError("an upstream adapter needs at least one model")
        if timeout_s <= 0 or connect_timeout_s <= 0 or max_retries < 0 or backoff_base_s < 0 or max_connections < 1:
            raise ValueError("timeouts and max_connections must be positive, retries and backoff non-negative")
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self.breaker = breaker or CircuitBreaker(name=name)
        self.policy = EgressPolicy(
            allow_loopback=allow_loopback,
            allowed_networks=tuple(ipaddress.ip_network(n) if isinstance(n, str) else n for n in allowed_networks),
        )
        self.allowed_hosts = frozenset(h.lower().rstrip(".") for h in allowed_hosts)
        self._url = self._checked_url(base_url)
        self.base_url = base_url.rstrip("/")
        self._upstream_models = dict(upstream_models or {})
        self._defaults = dict(request_defaults or {})
        self._max_response_bytes = max_response_bytes
        self._max_connections = max_connections
        self._keepalive_s = keepalive_s
        self._ssl = ssl
        self._resolver = resolver
        self._session: aiohttp.ClientSession | None = None
        self._headers = {"Content-Type": "application/json", "User-Agent": "ledgerflow-gateway"}
        if self._api_key:
            self._headers["Authorization"] = f"Bearer {self._api_key}"
            if self._url.scheme == "http" and not self._is_loopback_host():
                log.warning("upstream %s sends its API key over plain http to %s", name, self._url.host)
        self._whole_timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=connect_timeout_s)
        self._stream_timeout = aiohttp.ClientTimeout(total=None, sock_connect=connect_timeout_s, sock_read=timeout_s)
        self._usage_stash: OrderedDict[bytes, deque[UpstreamCompletion]] = OrderedDict()

    def __repr__(self) -> str:
        return f"OpenAIUpstreamAdapter(name={self.name!r}, base_url={self.base_url!r}, models={self.models!r})"

    # --- construction checks --------------------------------------------------------------

    def _checked_url(self, base_url: str) -> URL:
        """The chat-completions URL, if base_url is a plain http(s) URL to an allowed host."""
        try:
            url = URL(base_url.rstrip("/"))
        except (ValueError, TypeError):
            raise EgressRefused("base_url is not a valid URL") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise EgressRefused(f"base_url must be an http(s) URL with a host, not {url.scheme or 'no'} scheme")
        if url.user is not None or url.password is not None or url.query_string or url.fragment:
            raise EgressRefused("base_url must not carry credentials, a query or a fragment; use api_key(_env)")
        host = url.host.lower().rstrip(".")
        if host not in self.allowed_hosts:
            raise EgressRefused(
                f"upstream host {host!r} is not in allowed_hosts ({', '.join(sorted(self.allowed_hosts))})"
            )
        try:
            literal: IPAddress | None = ipaddress.ip_address(host)
        except ValueError:
            literal = None  # a name: checked on every resolution by GuardedResolver
        if literal is not None:
            # aiohttp never asks the resolver about IP literals, so they are checked here.
            self.policy.check(host, literal)
        return url / "chat" / "completions"

    def _is_loopback_host(self) -> bool:
        host = self._url.host or ""
        try:
            return ipaddress.ip_address(host).is_loopback
        except ValueError:
            return host == "localhost"

    # --- session --------------------------------------------------------------------------

    def _get_session(self) -> aiohttp.ClientSession:
        """Created on first use, inside the running loop; shared by every call of this adapter."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(
                limit=self._max_connections,
                limit_per_host=self._max_connections,
                keepalive_timeout=self._keepalive_s,
                ttl_dns_cache=10,
                resolver=GuardedResolver(self.policy, self._resolver),
                ssl=self._ssl,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                trust_env=False,  # no HTTP(S)_PROXY detours around the egress policy
                cookie_jar=aiohttp.DummyCookieJar(),
                raise_for_status=False,
            )
        return self._session

    async def close(self) -> None:
        """Close pooled connections; call from the gateway's on_cleanup."""
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None

    # --- the Adapter interface ------------------------------------------------------------

    async def complete(self, model: str, messages: list[Message], max_tokens: int | None = None) -> UpstreamCompletion:
        body = self._body(model, messages, stream=False, max_tokens=max_tokens)

        async def attempt() -> UpstreamCompletion:
            async with self._get_session().post(
                self._url, data=body, headers=self._headers, timeout=self._whole_timeout, allow_redirects=False
            ) as resp:
                if resp.status != 200:
                    raise await self._status_failure(resp)
                raw = await self._read_limited(resp)
            return self._parse_whole(model, messages, raw)

        completion, probe, attempts = await self._with_retries(attempt)
        self.breaker.success(probe)
        completion = _bounded(completion, max_tokens, self.name)
        return replace(completion, attempts=attempts) if attempts > 1 else completion

    def stream(self, model: str, messages: list[Message], max_tokens: int | None = None) -> UpstreamStream:
        return UpstreamStream(self, model, messages, max_tokens)

    def usage(
        self, model: str, messages: list[Message], text: str, max_tokens: int | None = None
    ) -> UpstreamCompletion:
        """Usage of a finished stream with this text: the upstream's if it sent any, else estimated
        (an estimate is capped at `max_tokens`: the upstream was asked for no more)."""
        key = self._stash_key(model, messages, text)
        queue = self._usage_stash.get(key)
        if queue:
            found = queue.popleft()
            if not queue:
                del self._usage_stash[key]
            return _bounded(found, max_tokens, self.name)
        prompt_tokens, completion_tokens = estimate_usage(messages, text)
        estimated = UpstreamCompletion(model, text, prompt_tokens, completion_tokens, estimated=True)
        return _bounded(estimated, max_tokens, self.name)

    # --- internals ------------------------------------------------------------------------

    def _body(self, model: str, messages: list[Message], *, stream: bool, max_tokens: int | None = None) -> bytes:
        if model not in self.models:
            raise ValueError(f"model {model!r} is not served by upstream {self.name!r}")
        payload: dict[str, Any] = dict(self._defaults)
        if max_tokens is not None:  # what the budget hold covers; a lower configured default still wins
            configured = payload.get("max_tokens")
            payload["max_tokens"] = min(max_tokens, configured) if isinstance(configured, int) else max_tokens
        payload["model"] = self._upstream_models.get(model, model)
        payload["messages"] = [{"role": m.role, "content": m.content} for m in messages]
        payload["stream"] = stream
        if stream:
            payload["stream_options"] = {"include_usage": True}
        return orjson.dumps(payload)

    def _scrub(self, text: str) -> str:
        """Remove the API key from text that may echo it (upstream error bodies, URLs)."""
        if self._api_key and self._api_key in text:
            text = text.replace(self._api_key, "[redacted]")
        return text

    async def _read_limited(self, resp: aiohttp.ClientResponse) -> bytes:
        """The whole body, refused (not retried) if it is larger than max_response_bytes."""
        limit = self._max_response_bytes
        if resp.content_length is not None and resp.content_length > limit:
            raw, complete = b"", False
        else:
            raw, complete = await _read_upto(resp, limit)
        if not complete:
            raise _Failure(UpstreamProtocolError(f"upstream response is over {limit} bytes"), False, True)
        return raw

    async def _status_failure(self, resp: aiohttp.ClientResponse) -> _Failure:
        """Classify a non-200 answer; reads at most MAX_ERROR_BODY bytes of it for the message."""
        status = resp.status
        if 300 <= status < 400:
            target = URL(resp.headers.get("Location", ""))
            where = f" to host {target.host!r}" if target.host else ""
            return _Failure(
                EgressRefused(
                    self._scrub(
                        f"upstream {self.name!r} answered {status} (redirect{where}); redirects are not followed"
                    ),
                    upstream_status=status,
                ),
                retryable=False,
                counts=False,
            )
        detail = ""
        try:
            raw, _ = await _read_upto(resp, MAX_ERROR_BODY)
            detail = _error_text(orjson.loads(raw)) if raw else ""
        except (orjson.JSONDecodeError, aiohttp.ClientError, HttpProcessingError, TimeoutError):
            detail = ""
        retry_after = _retry_after(resp.headers.get("Retry-After"))
        message = f"upstream {self.name!r} answered {status}" + (f": {detail}" if detail else "")
        return _Failure(
            UpstreamHTTPError(self._scrub(message), upstream_status=status, retry_after_s=retry_after),
            retryable=status in RETRYABLE_STATUSES,
            counts=status >= 500,
        )

    def _parse_whole(self, model: str, messages: list[Message], raw: bytes) -> UpstreamCompletion:
        try:
            obj = orjson.loads(raw)
            choice = obj["choices"][0]
            text = choice["message"].get("content") or ""
            finish = choice.get("finish_reason")
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
            raise _Failure(
                UpstreamProtocolError(f"upstream {self.name!r} sent a body that is not a chat completion"), False, True
            ) from None
        text = str(text)
        usage = _usage_of(obj)
        if usage is None:
            prompt_tokens, completion_tokens = estimate_usage(messages, text)
            return UpstreamCompletion(model, text, prompt_tokens, completion_tokens, True, finish)
        return UpstreamCompletion(model, text, usage[0], usage[1], False, finish)

    async def _with_retries(self, attempt: Callable[[], Awaitable[T]]) -> tuple[T, bool, int]:
        """Run attempts under the breaker; returns the result, whether it was the probe, and attempts made.

        The caller records the breaker's success verdict (a stream does it at its first piece).
        Errors are raised outside any `except` block so they carry no exception context.
        """
        attempts = 0
        while True:
            probe = self.breaker.acquire()
            attempts += 1
            failure: _Failure | None = None
            try:
                return await attempt(), probe, attempts
            except _Failure as f:
                failure = f
            except EgressRefused:
                self.breaker.release(probe)
                raise
            except TimeoutError:
                failure = _Failure(
                    UpstreamTimeout(f"upstream {self.name!r} did not answer within {self.timeout_s} s"), True, True
                )
            except aiohttp.ClientConnectorError as exc:
                failure = _Failure(
                    UpstreamUnavailable(f"cannot connect to upstream {self.name!r}: {type(exc).__name__}"), True, True
                )
            except (aiohttp.ClientError, HttpProcessingError) as exc:
                # Disconnects (often a keep-alive socket the upstream just closed) and broken bodies.
                failure = _Failure(
                    UpstreamUnavailable(f"upstream {self.name!r} connection failed: {type(exc).__name__}"), True, True
                )
            except BaseException:
                self.breaker.release(probe)
                raise
            err = failure.error
            err.attempts = attempts
            if failure.counts:
                self.breaker.failure(probe)
            else:
                self.breaker.release(probe)
            delay = self._backoff(attempts, err.retry_after_s)
            if not failure.retryable or attempts > self.max_retries or delay is None:
                raise err
            log.info("upstream %s attempt %d failed (%s); retrying in %.3f s", self.name, attempts, err.code, delay)
            await asyncio.sleep(delay)

    def _backoff(self, attempts: int, retry_after: float | None) -> float | None:
        """Full jitter; honour Retry-After, but give up (None) if it asks for more than the cap."""
        if retry_after is not None:
            return retry_after if retry_after <= self.backoff_cap_s else None
        return random.uniform(0.0, min(self.backoff_cap_s, self.backoff_base_s * (2 ** (attempts - 1))))

    def _stash_key(self, model: str, messages: list[Message], text: str) -> bytes:
        h = hashlib.blake2b(digest_size=16)
        h.update(model.encode())
        for m in messages:
            h.update(b"\x1e" + m.role.encode() + b"\x1f" + m.content.encode())
        h.update(b"\x1d" + text.encode())
        return h.digest()

    def _stash(self, messages: list[Message], completion: UpstreamCompletion) -> None:
        key = self._stash_key(completion.model, messages, completion.text)
        self._usage_stash.setdefault(key, deque()).append(completion)
        self._usage_stash.move_to_end(key)
        while len(self._usage_stash) > _USAGE_STASH_MAX:
            self._usage_stash.popitem(last=False)

    async def _stream_pieces(
        self, model: str, messages: list[Message], out: UpstreamStream, max_tokens: int | None = None
    ) -> AsyncGenerator[str, None]:
        """The generator behind UpstreamStream. Retries end once the first piece is yielded."""
        body = self._body(model, messages, stream=True, max_tokens=max_tokens)

        async def attempt() -> tuple[aiohttp.ClientResponse, _SSEReader, str | None]:
            resp = await self._get_session().post(
                self._url, data=body, headers=self._headers, timeout=self._stream_timeout, allow_redirects=False
            )
            try:
                if resp.status != 200:
                    raise await self._status_failure(resp)
                reader = _SSEReader(resp)
                first = await self._read_piece(reader, started=False)
            except BaseException:
                resp.close()
                raise
            return resp, reader, first

        (resp, reader, piece), probe, attempts = await self._with_retries(attempt)
        self.breaker.success(probe)
        pieces: list[str] = []
        clean = False
        try:
            while piece is not None:
                pieces.append(piece)
                yield piece
                failure: UpstreamError | None = None
                try:
                    piece = await self._read_piece(reader, started=True)
                except _Failure as f:
                    failure = f.error
                if failure is not None:
                    self.breaker.failure(False)
                    raise failure
            clean = True
        finally:
            if clean:
                resp.release()
            else:
                resp.close()
        text = "".join(pieces)
        if reader.usage is None:
            prompt_tokens, completion_tokens = estimate_usage(messages, text)
            estimated = True
        else:
            (prompt_tokens, completion_tokens), estimated = reader.usage, False
        out.completion = UpstreamCompletion(
            model, text, prompt_tokens, completion_tokens, estimated, reader.finish_reason, attempts
        )
        self._stash(messages, out.completion)

    async def _read_piece(self, reader: _SSEReader, *, started: bool) -> str | None:
        """Next piece; failures become a _Failure that is retryable only if nothing was handed out yet."""
        broken = UpstreamStreamBroken if started else UpstreamUnavailable
        try:
            return await reader.next_piece()
        except TimeoutError:
            if started:
                err: UpstreamError = UpstreamStreamBroken(
                    f"upstream {self.name!r} stalled mid-stream for over {self.timeout_s} s"
                )
            else:
                err = UpstreamTimeout(f"upstream {self.name!r} sent nothing within {self.timeout_s} s")
            raise _Failure(err, not started, True) from None
        except _BadChunk as exc:
            bad = UpstreamStreamBroken if started else UpstreamProtocolError
            raise _Failure(bad(f"upstream {self.name!r}: {exc}"), False, True) from None
        except _BrokenStream as exc:
            raise _Failure(broken(self._scrub(f"upstream {self.name!r}: {exc}")), not started, True) from None
        except (aiohttp.ClientError, HttpProcessingError) as exc:
            raise _Failure(
                broken(f"upstream {self.name!r} stream failed: {type(exc).__name__}"), not started, True
            ) from None


if TYPE_CHECKING:

    def _is_an_adapter(a: OpenAIUpstreamAdapter) -> Adapter:
        return a  # mypy proves the class satisfies the Adapter protocol
