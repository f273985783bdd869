"""The OpenAI-compatible upstream adapter against the in-process mock upstream, and the registry.

Everything runs on 127.0.0.1 (allow_loopback=True) with no broker; faults are scripted on the
mock per request, and attempts are counted by the mock, so retries and their absence are
observed from the server side.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from typing import Any

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.test_utils import TestServer

from bench.mock_upstream import MOCK, Fault, MockState, answer_text, make_app, prompt_tokens
from domain.pricing import DEFAULT_PRICES, Price
from gateway.adapters import SimulatedAdapter
from gateway.models import Message
from gateway.registry import LONG_CONTEXT, ModelInfo, Registry, UnknownModel, default_registry
from gateway.upstream import (
    CircuitBreaker,
    CircuitOpen,
    EgressPolicy,
    EgressRefused,
    GuardedResolver,
    OpenAIUpstreamAdapter,
    UpstreamCompletion,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamProtocolError,
    UpstreamStream,
    UpstreamStreamBroken,
    UpstreamTimeout,
    UpstreamUnavailable,
)

pytestmark = pytest.mark.timeout(20)

MODEL = "mock-small"
TOKENS = 12
SECRET = "sk-live-TOPSECRET-4f2a9c"
MESSAGES = [Message(role="system", content="be brief"), Message(role="user", content="hello there, upstream")]


class Upstream:
    """A running mock upstream and a way to make adapters pointed at it."""

    def __init__(self, server: TestServer) -> None:
        self.server = server
        self.state: MockState = server.app[MOCK]  # type: ignore[index]
        self.adapters: list[OpenAIUpstreamAdapter] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}/v1"

    def adapter(self, **kw: Any) -> OpenAIUpstreamAdapter:
        opts: dict[str, Any] = {
            "models": (MODEL, "mock-large"),
            "allowed_hosts": {"127.0.0.1"},
            "allow_loopback": True,
            "timeout_s": 2.0,
            "connect_timeout_s": 1.0,
            "max_retries": 2,
            "backoff_base_s": 0.001,
            "backoff_cap_s": 0.01,
            "api_key": SECRET,
        }
        opts.update(kw)
        base_url = opts.pop("base_url", self.base_url)
        a = OpenAIUpstreamAdapter(base_url, **opts)
        self.adapters.append(a)
        return a

    def fail(self, *faults: Fault) -> None:
        self.state.faults.extend(faults)


async def serve(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    return server


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    server = await serve(make_app(latency_ms=0, tokens=TOKENS))
    up = Upstream(server)
    try:
        yield up
    finally:
        for a in up.adapters:
            await a.close()
        await server.close()


def expected_prompt_tokens() -> int:
    return prompt_tokens([{"role": m.role, "content": m.content} for m in MESSAGES])


# --- normal operation ----------------------------------------------------------------------


async def test_complete_returns_text_and_upstream_usage(upstream: Upstream) -> None:
    adapter = upstream.adapter()
    c = await adapter.complete(MODEL, MESSAGES)
    assert isinstance(c, UpstreamCompletion)
    assert (c.model, c.text) == (MODEL, answer_text(TOKENS))
    assert (c.prompt_tokens, c.completion_tokens) == (expected_prompt_tokens(), TOKENS)
    assert not c.estimated and c.finish_reason == "stop"
    assert upstream.state.requests == 1


async def test_stream_pieces_join_to_the_text_and_usage_comes_from_the_final_chunk(upstream: Upstream) -> None:
    adapter = upstream.adapter()
    stream = adapter.stream(MODEL, MESSAGES)
    assert isinstance(stream, UpstreamStream)
    pieces = [p async for p in stream]
    assert len(pieces) == TOKENS
    text = "".join(pieces)
    assert text == answer_text(TOKENS)
    assert stream.completion is not None and not stream.completion.estimated
    assert (stream.completion.prompt_tokens, stream.completion.completion_tokens) == (expected_prompt_tokens(), TOKENS)
    # The gateway's current call sequence: stream, then usage(model, messages, text).
    u = adapter.usage(MODEL, MESSAGES, text)
    assert (u.prompt_tokens, u.completion_tokens, u.estimated) == (expected_prompt_tokens(), TOKENS, False)
    assert adapter.usage(MODEL, MESSAGES, text).estimated  # handed out once; afterwards an estimate


async def test_without_upstream_usage_the_counts_are_estimated(upstream: Upstream) -> None:
    adapter = upstream.adapter()
    upstream.fail(Fault(no_usage=True), Fault(no_usage=True))
    whole = await adapter.complete(MODEL, MESSAGES)
    assert whole.estimated and whole.prompt_tokens > 0 and whole.completion_tokens > 0
    stream = adapter.stream(MODEL, MESSAGES)
    text = "".join([p async for p in stream])
    assert stream.completion is not None and stream.completion.estimated
    assert adapter.usage(MODEL, MESSAGES, text).estimated


async def test_model_mapping_and_concurrency_share_one_pool(upstream: Upstream) -> None:
    adapter = upstream.adapter(models=("fast",), upstream_models={"fast": "mock-large"}, max_connections=4)
    results = await asyncio.gather(*(adapter.complete("fast", MESSAGES) for _ in range(20)))
    assert {r.model for r in results} == {"fast"} and upstream.state.requests == 20
    with pytest.raises(ValueError, match="not served"):
        await adapter.complete("other", MESSAGES)


async def test_stopping_a_stream_early_closes_it_cleanly(upstream: Upstream) -> None:
    adapter = upstream.adapter()
    stream = adapter.stream(MODEL, MESSAGES)
    assert await stream.__anext__()
    await stream.aclose()
    assert (await adapter.complete(MODEL, MESSAGES)).text == answer_text(TOKENS)


async def test_large_answers_arrive_whole_and_oversized_ones_are_refused() -> None:
    big, many = await serve(make_app(tokens=400_000)), await serve(make_app(tokens=20_000))
    up, up_many = Upstream(big), Upstream(many)
    try:
        whole = await up.adapter().complete(MODEL, MESSAGES)  # ~3 MB of JSON: many TCP reads
        assert whole.text == answer_text(400_000) and whole.completion_tokens == 400_000
        stream = up_many.adapter().stream(MODEL, MESSAGES)  # 20k SSE events
        assert "".join([p async for p in stream]) == answer_text(20_000)
        assert stream.completion is not None and stream.completion.completion_tokens == 20_000
        small = up.adapter(max_response_bytes=1_000_000, max_retries=2)
        with pytest.raises(UpstreamProtocolError, match="over 1000000 bytes"):
            await small.complete(MODEL, MESSAGES)
        assert up.state.requests == 2  # refused, not retried
    finally:
        for u in (up, up_many):
            for a in u.adapters:
                await a.close()
            await u.server.close()


# --- retries -------------------------------------------------------------------------------


async def test_retries_503_then_succeeds(upstream: Upstream) -> None:
    adapter = upstream.adapter(max_retries=2)
    upstream.fail(Fault(status=503), Fault(status=503))
    c = await adapter.complete(MODEL, MESSAGES)
    assert c.text == answer_text(TOKENS)
    assert upstream.state.requests == 3 and c.attempts == 3


async def test_stream_retries_before_the_first_piece(upstream: Upstream) -> None:
    adapter = upstream.adapter(max_retries=1)
    upstream.fail(Fault(status=502))
    stream = adapter.stream(MODEL, MESSAGES)
    assert "".join([p async for p in stream]) == answer_text(TOKENS)
    assert upstream.state.requests == 2
    assert stream.completion is not None and stream.completion.attempts == 2


async def test_retries_stop_at_max_retries(upstream: Upstream) -> None:
    adapter = upstream.adapter(max_retries=2)
    upstream.fail(*[Fault(status=503)] * 5)
    with pytest.raises(UpstreamHTTPError) as info:
        await adapter.complete(MODEL, MESSAGES)
    assert upstream.state.requests == 3 and info.value.attempts == 3
    assert (info.value.status, info.value.upstream_status) == (503, 503)


@pytest.mark.parametrize(("status", "gateway_status"), [(500, 502), (400, 400), (401, 502), (404, 502)])
async def test_other_statuses_are_not_retried(upstream: Upstream, status: int, gateway_status: int) -> None:
    adapter = upstream.adapter(max_retries=3)
    upstream.fail(Fault(status=status))
    with pytest.raises(UpstreamHTTPError) as info:
        await adapter.complete(MODEL, MESSAGES)
    assert upstream.state.requests == 1
    assert info.value.status == gateway_status and f"mock fault {status}" in str(info.value)


async def test_a_long_retry_after_is_passed_back_not_waited_for(upstream: Upstream) -> None:
    adapter = upstream.adapter(max_retries=3, backoff_cap_s=1.0)
    upstream.fail(Fault(status=429, retry_after="30"))
    with pytest.raises(UpstreamHTTPError) as info:
        await adapter.complete(MODEL, MESSAGES)
    assert upstream.state.requests == 1
    assert (info.value.status, info.value.code, info.value.retry_after_s) == (503, "upstream_rate_limited", 30.0)


async def test_no_retry_after_streaming_began(upstream: Upstream) -> None:
    adapter = upstream.adapter(max_retries=3)
    upstream.fail(Fault(break_after_chunks=3))
    received: list[str] = []
    with pytest.raises(UpstreamStreamBroken) as info:
        async for piece in adapter.stream(MODEL, MESSAGES):
            received.append(piece)
    assert received == [p if i == 0 else " " + p for i, p in enumerate(answer_text(TOKENS).split(" ")[:3])]
    assert upstream.state.requests == 1
    assert info.value.status == 502


async def test_timeout_is_retried_then_reported(upstream: Upstream) -> None:
    adapter = upstream.adapter(timeout_s=0.1, max_retries=1)
    upstream.fail(Fault(delay_s=0.5), Fault(delay_s=0.5))
    with pytest.raises(UpstreamTimeout) as info:
        await adapter.complete(MODEL, MESSAGES)
    assert upstream.state.requests == 2 and info.value.status == 504


async def test_stream_timeout_before_the_first_byte(upstream: Upstream) -> None:
    adapter = upstream.adapter(timeout_s=0.1, max_retries=0)
    upstream.fail(Fault(delay_s=0.5))
    with pytest.raises(UpstreamTimeout):
        async for _ in adapter.stream(MODEL, MESSAGES):
            pass
    assert upstream.state.requests == 1


async def test_connect_errors_are_retried_and_reported_unavailable(upstream: Upstream) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]  # nothing listens once the socket is closed
    adapter = upstream.adapter(base_url=f"http://127.0.0.1:{dead_port}/v1", max_retries=2)
    with pytest.raises(UpstreamUnavailable) as info:
        await adapter.complete(MODEL, MESSAGES)
    assert info.value.attempts == 3 and info.value.status == 503


# --- circuit breaker -----------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


async def test_breaker_opens_after_n_failures_and_half_opens_after_cooldown(upstream: Upstream) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=5.0, clock=clock)
    adapter = upstream.adapter(max_retries=0, breaker=breaker)
    upstream.fail(*[Fault(status=502)] * 3)
    for _ in range(3):
        with pytest.raises(UpstreamHTTPError):
            await adapter.complete(MODEL, MESSAGES)
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen) as info:
        await adapter.complete(MODEL, MESSAGES)
    assert upstream.state.requests == 3  # refused without touching the network
    assert isinstance(info.value, UpstreamUnavailable) and info.value.status == 503
    assert info.value.retry_after_s == pytest.approx(5.0)

    clock.now += 5.0
    assert breaker.state == "half_open"
    upstream.fail(Fault(delay_s=0.2))  # a slow probe, so a second caller arrives while it is in flight
    probe = asyncio.create_task(adapter.complete(MODEL, MESSAGES))
    await asyncio.sleep(0.05)
    with pytest.raises(CircuitOpen):
        await adapter.complete(MODEL, MESSAGES)  # only one probe at a time
    assert (await probe).text == answer_text(TOKENS)
    assert breaker.state == "closed" and upstream.state.requests == 4
    await adapter.complete(MODEL, MESSAGES)


async def test_a_failed_probe_reopens_the_breaker(upstream: Upstream) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=1.0, clock=clock)
    adapter = upstream.adapter(max_retries=0, breaker=breaker)
    upstream.fail(Fault(status=503), Fault(status=503))
    with pytest.raises(UpstreamHTTPError):
        await adapter.complete(MODEL, MESSAGES)
    clock.now += 1.0
    with pytest.raises(UpstreamHTTPError):
        await adapter.complete(MODEL, MESSAGES)  # the probe fails
    assert breaker.state == "open"
    with pytest.raises(CircuitOpen):
        await adapter.complete(MODEL, MESSAGES)
    assert upstream.state.requests == 2


def test_breaker_ignores_4xx_and_late_verdicts() -> None:
    clock = FakeClock()
    b = CircuitBreaker(failure_threshold=2, cooldown_s=1.0, clock=clock)
    b.failure(b.acquire())
    b.success(b.acquire())  # a success resets the consecutive count
    b.failure(b.acquire())
    assert b.state == "closed"
    b.failure(False)
    assert b.state == "open"
    b.success(False)  # a call started before it opened cannot close it
    assert b.state == "open"
    clock.now += 1.0
    probe = b.acquire()
    assert probe
    b.release(probe)  # cancelled probe: the slot frees, the circuit stays half-open
    assert b.acquire()


# --- egress --------------------------------------------------------------------------------


async def test_redirect_is_refused_and_never_followed(upstream: Upstream) -> None:
    other = await serve(make_app(tokens=TOKENS))
    try:
        target = f"http://127.0.0.1:{other.port}/v1/chat/completions"
        adapter = upstream.adapter(max_retries=3)
        upstream.fail(Fault(status=302, location=target), Fault(status=307, location=target))
        with pytest.raises(EgressRefused) as info:
            await adapter.complete(MODEL, MESSAGES)
        assert "redirect" in str(info.value) and info.value.status == 502
        with pytest.raises(EgressRefused):
            async for _ in adapter.stream(MODEL, MESSAGES):
                pass
        assert upstream.state.requests == 2  # not retried either
        assert other.app[MOCK].requests == 0  # type: ignore[index]
    finally:
        await other.close()


@pytest.mark.parametrize(
    "host",
    ["169.254.169.254", "10.1.2.3", "172.16.0.9", "172.31.255.1", "192.168.1.10", "fc00::1", "fe80::1", "0.0.0.0"],
)
def test_private_address_literals_are_refused_at_construction(host: str) -> None:
    url_host = f"[{host}]" if ":" in host else host
    with pytest.raises(EgressRefused, match="refusing to connect"):
        OpenAIUpstreamAdapter(f"http://{url_host}/v1", models=(MODEL,), allowed_hosts={host}, allow_loopback=True)


def test_loopback_needs_allow_loopback_and_private_nets_need_allowed_networks() -> None:
    with pytest.raises(EgressRefused):
        OpenAIUpstreamAdapter("http://127.0.0.1:1/v1", models=(MODEL,), allowed_hosts={"127.0.0.1"})
    OpenAIUpstreamAdapter("http://127.0.0.1:1/v1", models=(MODEL,), allowed_hosts={"127.0.0.1"}, allow_loopback=True)
    OpenAIUpstreamAdapter(
        "http://10.1.2.3:8000/v1", models=(MODEL,), allowed_hosts={"10.1.2.3"}, allowed_networks=["10.1.2.0/24"]
    )
    policy = EgressPolicy()
    assert not policy.permits(ipaddress.ip_address("::ffff:10.0.0.1"))  # IPv4-mapped IPv6
    assert not policy.permits(ipaddress.ip_address("100.64.0.1"))  # carrier-grade NAT
    assert policy.permits(ipaddress.ip_address("93.184.216.34"))


async def test_a_name_resolving_to_loopback_is_refused_before_any_connection() -> None:
    """`localhost` is allowed by name but resolves to loopback, which is not allowed here."""
    connections = 0

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    adapter = OpenAIUpstreamAdapter(
        f"http://localhost:{port}/v1", models=(MODEL,), allowed_hosts={"localhost"}, max_retries=2
    )
    try:
        with pytest.raises(EgressRefused, match="resolves to"):
            await adapter.complete(MODEL, MESSAGES)
        with pytest.raises(EgressRefused):
            async for _ in adapter.stream(MODEL, MESSAGES):
                pass
        await asyncio.sleep(0.05)
        assert connections == 0
        assert adapter.breaker.state == "closed"  # policy refusals are not upstream failures
    finally:
        await adapter.close()
        server.close()
        await server.wait_closed()


class FakeDNS(AbstractResolver):
    """Answers every name with fixed addresses (a DNS rebinding attacker, say)."""

    def __init__(self, *addresses: str) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=a, port=port, family=socket.AF_INET, proto=0, flags=0)
            for a in self.addresses
        ]

    async def close(self) -> None:
        pass


async def test_resolved_addresses_are_filtered_on_every_connection() -> None:
    guard = GuardedResolver(EgressPolicy(), FakeDNS("10.0.0.7", "169.254.169.254"))
    with pytest.raises(EgressRefused, match=r"10\.0\.0\.7"):
        await guard.resolve("llm.example.com", 443)
    mixed = GuardedResolver(EgressPolicy(), FakeDNS("192.168.0.2", "93.184.216.34"))
    assert [r["host"] for r in await mixed.resolve("llm.example.com", 443)] == ["93.184.216.34"]

    adapter = OpenAIUpstreamAdapter(
        "https://llm.example.com/v1",
        models=(MODEL,),
        allowed_hosts={"llm.example.com"},
        resolver=FakeDNS("169.254.169.254"),
        max_retries=2,
    )
    try:
        with pytest.raises(EgressRefused, match=r"169\.254\.169\.254"):
            await adapter.complete(MODEL, MESSAGES)
    finally:
        await adapter.close()


@pytest.mark.parametrize(
    "url",
    [
        "http://evil.example.com/v1",
        "http://api.openai.com.evil.example.com/v1",
        "ftp://api.openai.com/v1",
        "http://user:pw@api.openai.com/v1",
        "https://api.openai.com/v1?next=http://evil",
    ],
)
def test_hosts_outside_the_allowlist_and_odd_urls_are_refused_at_construction(url: str) -> None:
    with pytest.raises(EgressRefused):
        OpenAIUpstreamAdapter(url, models=("gpt-4o-mini",), allowed_hosts={"api.openai.com"})
    OpenAIUpstreamAdapter("https://API.openai.com./v1/", models=("gpt-4o-mini",), allowed_hosts={"api.openai.com"})


# --- the API key ---------------------------------------------------------------------------


def exception_text(exc: BaseException) -> str:
    parts = [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    seen = exc.__cause__ or exc.__context__
    while seen is not None:  # whatever is chained must not carry it either
        parts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


async def test_the_api_key_never_appears_in_errors_or_logs(
    upstream: Upstream, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("UPSTREAM_KEY_FOR_TEST", SECRET)
    adapter = upstream.adapter(api_key=None, api_key_env="UPSTREAM_KEY_FOR_TEST", timeout_s=0.1, max_retries=1)
    assert SECRET not in repr(adapter) and SECRET not in str(vars(adapter).get("base_url"))
    errors: list[UpstreamError] = []

    async def expect(call: Callable[[], Awaitable[object]]) -> None:
        with pytest.raises(UpstreamError) as info:
            await call()
        errors.append(info.value)

    async def drain() -> None:
        async for _ in adapter.stream(MODEL, MESSAGES):
            pass

    upstream.fail(Fault(status=401, echo_auth=True))
    await expect(lambda: adapter.complete(MODEL, MESSAGES))
    upstream.fail(Fault(status=503, echo_auth=True), Fault(status=503, echo_auth=True))
    await expect(drain)
    upstream.fail(Fault(status=302, location=f"http://127.0.0.1:1/?key={SECRET}"))
    await expect(lambda: adapter.complete(MODEL, MESSAGES))
    upstream.fail(Fault(delay_s=0.5), Fault(delay_s=0.5))
    await expect(lambda: adapter.complete(MODEL, MESSAGES))
    upstream.fail(Fault(break_after_chunks=1))
    await expect(drain)
    await adapter.close()
    dead = upstream.adapter(base_url="http://127.0.0.1:1/v1", max_retries=0)
    await expect(lambda: dead.complete(MODEL, MESSAGES))

    assert "[redacted]" in str(errors[0])  # the upstream did echo it; we scrubbed it
    for err in errors:
        assert SECRET not in exception_text(err), type(err).__name__
        assert SECRET[5:] not in exception_text(err)
    assert SECRET not in caplog.text
    assert "Authorization" not in caplog.text


def test_key_configuration_errors_name_the_variable_not_the_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    with pytest.raises(ValueError, match="NO_SUCH_KEY_VAR"):
        OpenAIUpstreamAdapter(
            "http://127.0.0.1/v1", models=(MODEL,), allowed_hosts={"127.0.0.1"}, allow_loopback=True,
            api_key_env="NO_SUCH_KEY_VAR",
        )  # fmt: skip
    with pytest.raises(ValueError, match="not both"):
        OpenAIUpstreamAdapter(
            "http://127.0.0.1/v1", models=(MODEL,), allowed_hosts={"127.0.0.1"}, allow_loopback=True,
            api_key=SECRET, api_key_env="X",
        )  # fmt: skip


# --- mock upstream extras ------------------------------------------------------------------


async def test_mock_lists_models_and_rejects_bad_bodies(upstream: Upstream) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as s:
        async with s.get(f"{upstream.base_url}/models") as r:
            assert [m["id"] for m in (await r.json())["data"]] == ["mock-small", "mock-large"]
        async with s.post(f"{upstream.base_url}/chat/completions", data=b"{") as r:
            assert r.status == 400


# --- registry ------------------------------------------------------------------------------


def test_default_registry_has_the_simulated_models_with_metadata() -> None:
    reg = default_registry()
    assert reg.names() == ("sim-small", "sim-large")
    small, large = reg.get("sim-small"), reg.get("sim-large")
    assert (small.region, large.region) == ("eu-west", "us-east")
    assert small.price == DEFAULT_PRICES["sim-small"] and large.price.output_per_mtok == Decimal("10.00")
    assert small.context_window < large.context_window
    assert reg.models(region="us-east") == (large,)
    assert reg.models(capabilities={LONG_CONTEXT}) == (large,)
    assert reg.prices() == DEFAULT_PRICES
    assert isinstance(reg.adapter_for("sim-small"), SimulatedAdapter)
    assert reg.lookup("nope") is None and "sim-small" in reg
    with pytest.raises(UnknownModel):
        reg.get("nope")


async def test_registry_dispatches_to_the_upstream_adapter(upstream: Upstream) -> None:
    up = upstream.adapter(models=(MODEL,))
    price = Price(MODEL, Decimal("0.10"), Decimal("0.40"), "USD", "mock-1")
    reg = default_registry().extended(
        [ModelInfo(MODEL, "mock", "local", 8192, frozenset({"chat", "streaming"}), price)], {"mock": up}
    )
    adapter = reg.as_adapter()
    assert adapter.models == ("sim-small", "sim-large", MODEL)
    assert (await adapter.complete(MODEL, MESSAGES)).text == answer_text(TOKENS)
    assert (await adapter.complete("sim-small", MESSAGES)).text.startswith("[sim-small]")
    text = "".join([p async for p in adapter.stream(MODEL, MESSAGES)])
    assert adapter.usage(MODEL, MESSAGES, text).completion_tokens == TOKENS
    await reg.close()


def test_registry_refuses_inconsistent_entries() -> None:
    sim = SimulatedAdapter()
    info = ModelInfo("sim-small", "sim", "eu-west", 1000, frozenset(), DEFAULT_PRICES["sim-small"])
    with pytest.raises(ValueError, match="not registered"):
        Registry([info], {})
    with pytest.raises(ValueError, match="twice"):
        Registry([info, info], {"sim": sim})
    with pytest.raises(ValueError, match="does not serve"):
        Registry(
            [ModelInfo("gpt", "sim", "eu", 1, frozenset(), Price("gpt", Decimal(1), Decimal(1), "USD", "v"))],
            {"sim": sim},
        )
    with pytest.raises(ValueError, match="price"):
        ModelInfo("sim-small", "sim", "eu-west", 1000, frozenset(), DEFAULT_PRICES["sim-large"])
