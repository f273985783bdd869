-- 0010: routing (issue 9): every routing decision with its candidates and propensity, the priors
-- versions, and per-tenant regret.

-- MergeTree: one row per decision, append-only; tenant + time order serves per-tenant share-of-calls
-- reports and off-policy evaluation (IPS / doubly robust) over a tenant's recent decisions.
CREATE TABLE IF NOT EXISTS {db}.route_chosen
(
    event_id String,
    event_type LowCardinality(String),
    schema_version Int32,
    tenant LowCardinality(String),
    occurred_at DateTime64(6, 'UTC'),
    trace_parent Nullable(String),
    correlation_id String,
    causation_id Nullable(String),
    producer LowCardinality(String),
    request_id String,
    attempt Int32,
    strategy LowCardinality(String),
    context_key LowCardinality(String),
    priors_version LowCardinality(String),
    candidates Array(Tuple(model String, score Float64, allowed Bool, excluded_by Nullable(String))),
    chosen_model LowCardinality(String),
    propensity Float64,
    features Map(String, Float64),
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: every priors version (the compacted topic keeps only the newest); read by version,
-- so time order suffices. The priors JSON can be large, hence ZSTD.
CREATE TABLE IF NOT EXISTS {db}.routing_priors_published
(
    event_id String,
    event_type LowCardinality(String),
    schema_version Int32,
    tenant LowCardinality(String),
    occurred_at DateTime64(6, 'UTC'),
    trace_parent Nullable(String),
    correlation_id String,
    causation_id Nullable(String),
    producer LowCardinality(String),
    version String,
    previous_version Nullable(String),
    algorithm LowCardinality(String),
    context_count Int32,
    feedback_count Int64,
    trained_until DateTime64(6, 'UTC'),
    priors String CODEC(ZSTD(3)),
    priors_sha256 String,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: one row per tenant per priors version; tenant + time order serves "regret over time"
-- per tenant (the newest row's cumulative_regret is the total).
CREATE TABLE IF NOT EXISTS {db}.routing_regret_recorded
(
    event_id String,
    event_type LowCardinality(String),
    schema_version Int32,
    tenant LowCardinality(String),
    occurred_at DateTime64(6, 'UTC'),
    trace_parent Nullable(String),
    correlation_id String,
    causation_id Nullable(String),
    producer LowCardinality(String),
    priors_version String,
    routed Int64,
    explored Int64,
    regret Float64,
    cumulative_routed Int64,
    cumulative_regret Float64,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- Per tenant and model: share of routed calls and mean propensity, the first thing an analyst asks.
CREATE VIEW IF NOT EXISTS {db}.routing_shares AS
SELECT
    tenant,
    chosen_model AS model,
    count() AS calls,
    calls / sum(calls) OVER (PARTITION BY tenant) AS share,
    avg(propensity) AS mean_propensity
FROM {db}.route_chosen
WHERE strategy = 'bandit'
GROUP BY tenant, chosen_model;
