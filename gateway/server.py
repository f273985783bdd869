"""Runs the gateway process: real keys, the transactional fact publisher, readiness on Kafka."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiohttp import web
from confluent_kafka import KafkaException

from domain.pricing import Price
from domain.redaction import ALL_KINDS
from gateway.app import create_app
from gateway.auth import KeyStore
from gateway.keycatalog import KeyCatalog
from gateway.limits import Limits, LocalRateLimiter, RateLimiter, RedisRateLimiter
from gateway.oidc import OidcVerifier
from gateway.policy import PolicyPoint, seeds_from_regions
from gateway.registry import ModelInfo, Registry, default_registry
from gateway.upstream import CircuitBreaker, OpenAIUpstreamAdapter
from ledgerflow.settings import Settings
from streams.admin import admin
from streams.publisher import FactPublisher
from streams.topics import Topics

log = logging.getLogger(__name__)


class KafkaReadiness:
    """Ready when the broker answers, every fact topic exists, keys and policy are loaded and the publisher is up."""

    def __init__(
        self, bootstrap: str, topics: Topics, publisher: FactPublisher, catalog: KeyCatalog, policy: PolicyPoint
    ) -> None:
        self._bootstrap = bootstrap
        self._topics = topics
        self._publisher = publisher
        self._catalog = catalog
        self._policy = policy
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
    return registry


def model_regions(registry: Registry) -> dict[str, tuple[str, str]]:
    """{model: (registry region, adapter name)}: what Model entities are seeded from."""
    return {m.name: (m.region, m.adapter_name) for m in registry.models()}


def build_policy(settings: Settings, registry: Registry, topics: Topics) -> PolicyPoint:
    """The replica's decision point, following the policy topics (started with the app)."""
    policy = PolicyPoint(
        seeds=seeds_from_regions(model_regions(registry)), shadow_version=settings.policy_shadow_version
    )
    policy.follow(settings.bootstrap, topics.name("policy-bundles"), topics.name("policy-attributes"))
    return policy


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
    app = create_app(
        keys,
        publisher,
        KafkaReadiness(settings.bootstrap, topics, publisher, catalog, policy),
        publish_timeout=settings.publish_timeout_s,
        oidc=oidc,
        limiter=limiter,
        adapter=registry.as_adapter(),
        redaction=redaction_policy(settings),
        prices=registry.prices(),
        policy=policy,
        classification_header=settings.policy_data_classification_header,
        default_max_tokens=settings.policy_default_max_tokens,
    )

    async def on_startup(_: web.Application) -> None:
        publisher.start()
        catalog.start()
        policy.start()

    async def on_cleanup(_: web.Application) -> None:
        await registry.close()
        await limiter.aclose()
        await asyncio.to_thread(catalog.close)
        await asyncio.to_thread(policy.close)
        await asyncio.to_thread(publisher.close)

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app, publisher


def run(settings: Settings) -> None:
    app, _ = build(settings)
    log.info("gateway listening on %s", settings.gateway_url)
    web.run_app(app, host=settings.gateway_host, port=settings.gateway_port, print=None, access_log=None)
