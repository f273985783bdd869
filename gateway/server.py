"""Runs the gateway process: real keys, the transactional fact publisher, readiness on Kafka."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web
from confluent_kafka import KafkaException

from domain.pricing import Price
from domain.redaction import ALL_KINDS
from gateway.adapters import Adapter, Latency, SimProfile, SimulatedAdapter
from gateway.app import STATE, create_app
from gateway.auth import KeyStore
from gateway.budgets import build_accounting
from gateway.keycatalog import KeyCatalog
from gateway.limits import Limits, LocalRateLimiter, RateLimiter, RedisRateLimiter
from gateway.memory import HotWindow, LocalWindow, MemoryFabric, MemoryLog, RedisWindow, Sealer
from gateway.oidc import OidcVerifier
from gateway.policy import PolicyPoint, seeds_from_regions
from gateway.registry import ModelInfo, Registry, default_registry
from gateway.upstream import CircuitBreaker, OpenAIUpstreamAdapter
from ledgerflow.settings import Settings
from streams.admin import admin
from streams.publisher import FactPublisher
from streams.topics import Topics

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from gateway.router import Router


class KafkaReadiness:
    """Ready when the broker answers, every fact topic exists, keys and policy are loaded and the publisher is up."""

    def __init__(
        self,
        bootstrap: str,
        topics: Topics,
        publisher: FactPublisher,
        catalog: KeyCatalog,
        policy: PolicyPoint,
        memory: MemoryLog | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._topics = topics
        self._publisher = publisher
        self._catalog = catalog
        self._policy = policy
        self._memory = memory
        self._cached: tuple[float, bool, str] = (0.0, False, "not checked")

    async def __call__(self) -> tuple[bool, str]:
        at, ok, detail = self._cached
        if time.monotonic() - at < 1.0:
            return ok, detail
        ok, detail = await asyncio.to_thread(self._check)
        self._cached = (time.monotonic(), ok, detail)
        return ok, detail

    def _check(self) -> tuple[bool, str]:
        try:
            md = admin(self._bootstrap).list_topics(timeout=1.0)
        except KafkaException as exc:
            return False, f"kafka unreachable at {self._bootstrap}: {exc}"
        missing = [t for t in self._topics.facts() if t not in md.topics]
        if missing:
            return False, f"topics missing: {', '.join(missing)} (run `ledgerflow up` or create them)"
        if not self._catalog.loaded.is_set():
            return False, "api keys not loaded yet from the api-keys topic"
        if not self._policy.loaded.is_set():
            return False, "policy bundles and attributes not loaded yet from the policy topics"
        if self._memory is not None and not self._memory.loaded.is_set():
            return False, "memory sessions not loaded yet from the memory topic"
        if not self._publisher.ready:
            return False, f"transactional producer not initialised yet: {self._publisher.last_error or 'starting'}"
        return True, f"kafka {self._bootstrap}"


def redaction_policy(settings: Settings) -> Callable[[str], frozenset[str]]:
    """Tenant → kinds to mask; unknown kinds are refused at start, not at the first request."""
    default = ALL_KINDS if settings.redact_kinds is None else frozenset(settings.redact_kinds)
    per_tenant = {t: frozenset(k) for t, k in settings.redact_by_tenant.items()}
    for kinds in (default, *per_tenant.values()):
        unknown = kinds - ALL_KINDS
        if unknown:
            raise ValueError(f"unknown redaction kinds {sorted(unknown)}; known: {sorted(ALL_KINDS)}")
    return lambda tenant: per_tenant.get(tenant, default)


def build_registry(settings: Settings) -> Registry:
    """The simulated models plus every configured upstream; refuses hosts not in the egress allowlist."""
    registry = default_registry()
    allowed = frozenset(settings.egress_allowed_hosts)
    for u in settings.upstreams:
        adapter = OpenAIUpstreamAdapter(
            u.base_url,
            models=tuple(m.name for m in u.models),
            upstream_models={m.name: m.upstream_id for m in u.models if m.upstream_id},
            allowed_hosts=allowed,
            api_key_env=u.api_key_env or None,
            allow_loopback=u.allow_loopback,
            allowed_networks=tuple(u.allowed_networks),
            timeout_s=u.timeout_s,
            connect_timeout_s=u.connect_timeout_s,
            max_retries=u.max_retries,
            backoff_base_s=u.backoff_base_s,
            max_connections=u.max_connections,
            name=u.name,
            breaker=CircuitBreaker(u.breaker_failures, u.breaker_cooldown_s, name=u.name),
        )
        infos = [
            ModelInfo(m.name, u.name, m.region, m.context_window, frozenset(m.capabilities),
                      Price(m.name, m.input_per_mtok, m.output_per_mtok, "USD", m.price_version))
            for m in u.models
        ]  # fmt: skip
        registry = registry.extended(infos, {u.name: adapter})
    if settings.simulated_models:
        registry = registry.extended(*simulated(settings))
    return registry


SIMULATED_PROFILES = "simulated-profiles"


def simulated(settings: Settings) -> tuple[list[ModelInfo], dict[str, Adapter]]:
    """The configured simulated models: one adapter with their profiles, priced like any model."""
    sims = settings.simulated_models
    profiles = {
        m.name: SimProfile(
            Latency(m.latency, m.first_token_ms, m.per_token_ms, m.latency_spread),
            answer_tokens=m.answer_tokens, quality=m.quality, quality_spread=m.quality_spread,
            error_rate=m.error_rate, class_quality=tuple(sorted(m.class_quality.items())),
            class_latency=tuple(sorted(m.class_latency.items())),
        )
        for m in sims
    }  # fmt: skip
    infos = [
        ModelInfo(m.name, SIMULATED_PROFILES, m.region, m.context_window, frozenset(m.capabilities),
                  Price(m.name, m.input_per_mtok, m.output_per_mtok, "USD", m.price_version))
        for m in sims
    ]  # fmt: skip
    return infos, {SIMULATED_PROFILES: SimulatedAdapter(profiles=profiles)}


def model_regions(registry: Registry) -> dict[str, tuple[str, str]]:
    """{model: (registry region, adapter name)}: what Model entities are seeded from."""
    return {m.name: (m.region, m.adapter_name) for m in registry.models()}


def build_policy(settings: Settings, registry: Registry, topics: Topics) -> PolicyPoint:
    """The replica's decision point, following the policy topics (started with the app)."""
    policy = PolicyPoint(
        seeds=seeds_from_regions(model_regions(registry)),
        shadow_version=settings.policy_shadow_version,
        memo_size=settings.policy_decision_memo,
    )
    policy.follow(settings.bootstrap, topics.name("policy-bundles"), topics.name("policy-attributes"))
    return policy


def memory_kek(path: Path) -> bytes:
    """The key-encryption key of memory data keys: read, or made once (replicas sharing a data_dir race safely)."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(os.urandom(32))
    try:
        os.link(tmp, path)  # fails if another replica made it first: then theirs is the key
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes()


def build_memory(settings: Settings, topics: Topics, publisher: FactPublisher) -> MemoryFabric:
    """The memory fabric: the fold of the memory topic, and Redis as the window when replicas share one."""
    log_ = MemoryLog(settings.bootstrap, topics.memory(), Sealer(memory_kek(settings.memory_key_path)))
    window: HotWindow = (
        RedisWindow.from_url(
            settings.redis_url, log_, ttl_s=settings.memory_hot_ttl_s, prefix=f"lf:mem:{topics.prefix}"
        )
        if settings.redis_url
        else LocalWindow(log_)
    )
    return MemoryFabric(
        log_,
        window,
        publisher,
        max_turns=settings.memory_window_turns,
        max_chars=settings.memory_window_chars,
        publish_timeout=settings.publish_timeout_s,
    )


def build(settings: Settings) -> tuple[web.Application, FactPublisher]:
    topics = Topics(settings.topic_prefix, settings.partitions)
    keys = KeyStore((k.key_id, k.tenant, k.sha256, k.roles) for k in settings.api_keys)
    publisher = FactPublisher(settings.bootstrap, f"ledgerflow-{settings.instance_id}", topics)
    catalog = KeyCatalog(settings.bootstrap, topics.name("api-keys"), keys)
    oidc = None
    if settings.oidc_issuer:
        oidc = OidcVerifier(
            settings.oidc_issuer, settings.oidc_audience, settings.oidc_jwks_url, settings.oidc_tenant_claim
        )
    limits = Limits(requests_per_min=settings.rate_requests_per_min, tokens_per_min=settings.rate_tokens_per_min)
    limiter: RateLimiter = (
        RedisRateLimiter.from_url(settings.redis_url, limits, fail_open=settings.rate_fail_open)
        if settings.redis_url
        else LocalRateLimiter(limits)
    )
    registry = build_registry(settings)
    policy = build_policy(settings, registry, topics)
    memory = build_memory(settings, topics, publisher)
    accounting = build_accounting(settings, registry.prices(), topics)
    app = create_app(
        keys,
        publisher,
        accounting.gate(KafkaReadiness(settings.bootstrap, topics, publisher, catalog, policy, memory.log)),
        publish_timeout=settings.publish_timeout_s,
        oidc=oidc,
        limiter=limiter,
        adapter=registry.as_adapter(),
        redaction=redaction_policy(settings),
        prices=registry.prices(),
        policy=policy,
        classification_header=settings.policy_data_classification_header,
        default_max_tokens=settings.policy_default_max_tokens,
        memory=memory,
        accounting=accounting,
        record_completions=True,
    )

    async def on_startup(_: web.Application) -> None:
        publisher.start()
        catalog.start()
        policy.start()
        memory.log.start()
        await accounting.astart(settings.budget_reconcile_interval_s)

    async def on_cleanup(_: web.Application) -> None:
        await registry.close()
        await limiter.aclose()
        await memory.aclose()
        await accounting.aclose()
        await asyncio.to_thread(memory.log.close)
        await asyncio.to_thread(catalog.close)
        await asyncio.to_thread(policy.close)
        await asyncio.to_thread(publisher.close)

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    if settings.routing_enabled:  # issue 9: the router follows the priors topic while the app runs
        app[STATE].router = router = build_router(settings, topics)

        async def start_router(_: web.Application) -> None:
            router.start()

        async def close_router(_: web.Application) -> None:
            await asyncio.to_thread(router.close)

        app.on_startup.append(start_router)
        app.on_cleanup.append(close_router)
    return app, publisher


def build_router(settings: Settings, topics: Topics) -> Router:
    from domain.routing import Exploration, Weights  # river and numpy load only when routing is on
    from gateway.router import Router

    """The replica's router, following the compacted routing-priors topic (started with the app)."""
    encoder = None
    if settings.routing_embedding_model is not None:
        from domain.routing_embedding import load_encoder

        encoder = load_encoder(settings.routing_embedding_model)
    router = Router(
        default_weights=Weights(quality=1.0, cost=settings.routing_cost_weight),
        exploration=Exploration(cap=settings.routing_explore_cap),
        encoder=encoder,
        embedding_dims=settings.routing_embedding_dims,
    )
    router.follow(settings.bootstrap, topics.name("routing-priors"))
    return router


def run(settings: Settings) -> None:
    app, _ = build(settings)
    loop = None
    if settings.gateway_uvloop:
        try:
            import uvloop
        except ImportError:
            log.warning("uvloop is not installed: running on asyncio's own event loop")
        else:
            loop = uvloop.new_event_loop()
    log.info("gateway listening on %s (%s)", settings.gateway_url, "uvloop" if loop else "asyncio loop")
    web.run_app(app, host=settings.gateway_host, port=settings.gateway_port, print=None, access_log=None, loop=loop)
