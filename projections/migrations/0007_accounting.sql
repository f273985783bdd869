-- 0007: cost accounting (issue 7): prices, budgets and their holds, savings snapshots, daily rollups.
--
-- TokensCharged v2: the tenant's baseline model, its cost and the savings (null in older rows).
ALTER TABLE {db}.tokens_charged ADD COLUMN IF NOT EXISTS baseline_model LowCardinality(Nullable(String)) AFTER cost;
ALTER TABLE {db}.tokens_charged ADD COLUMN IF NOT EXISTS baseline_cost Nullable(Decimal(38, 12)) AFTER baseline_model;
ALTER TABLE {db}.tokens_charged ADD COLUMN IF NOT EXISTS savings Nullable(Decimal(38, 12)) AFTER baseline_cost;

-- MergeTree: every published price version with its list, read by model and time for `prices list` and to price an old charge again.
CREATE TABLE IF NOT EXISTS {db}.price_list_published
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
    effective_from DateTime64(6, 'UTC'),
    currency LowCardinality(String),
    prices Array(Tuple(model String, input_per_mtok Decimal(38, 12), output_per_mtok Decimal(38, 12))),
    author String,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: every change of every budget (the compacted topic keeps only the newest), read per tenant and budget.
CREATE TABLE IF NOT EXISTS {db}.budget_set
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
    budget_id LowCardinality(String),
    scope LowCardinality(String),
    scope_id String,
    period LowCardinality(String),
    limit_amount Decimal(38, 12),
    currency LowCardinality(String),
    enforced Bool,
    alert_thresholds_pct Array(Int32),
    set_by String,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, budget_id, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: holds, read per tenant and budget over a period when a budget's history is inspected.
CREATE TABLE IF NOT EXISTS {db}.budget_reserved
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
    budget_id LowCardinality(String),
    scope LowCardinality(String),
    scope_id String,
    period LowCardinality(String),
    period_start DateTime64(6, 'UTC'),
    reservation_id String,
    request_id String,
    amount Decimal(38, 12),
    currency LowCardinality(String),
    expires_at DateTime64(6, 'UTC'),
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, budget_id, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: the spend each budget was charged, summed per tenant, budget and period (the log-derived spend).
CREATE TABLE IF NOT EXISTS {db}.budget_settled
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
    budget_id LowCardinality(String),
    scope LowCardinality(String),
    scope_id String,
    period LowCardinality(String),
    period_start DateTime64(6, 'UTC'),
    reservation_id String,
    request_id String,
    reserved_amount Decimal(38, 12),
    actual_amount Decimal(38, 12),
    currency LowCardinality(String),
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, budget_id, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: holds returned without spending, read per tenant and budget.
CREATE TABLE IF NOT EXISTS {db}.budget_released
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
    budget_id LowCardinality(String),
    scope LowCardinality(String),
    scope_id String,
    period LowCardinality(String),
    period_start DateTime64(6, 'UTC'),
    reservation_id String,
    request_id String,
    amount Decimal(38, 12),
    currency LowCardinality(String),
    reason LowCardinality(String),
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, budget_id, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: alerts, few and read per tenant and budget.
CREATE TABLE IF NOT EXISTS {db}.budget_threshold_crossed
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
    budget_id LowCardinality(String),
    scope LowCardinality(String),
    scope_id String,
    period LowCardinality(String),
    period_start DateTime64(6, 'UTC'),
    threshold_pct Int32,
    limit_amount Decimal(38, 12),
    spent_amount Decimal(38, 12),
    reserved_amount Decimal(38, 12),
    currency LowCardinality(String),
    reservation_id Nullable(String),
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, budget_id, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: every snapshot the rollups agent emitted; the newest per (tenant, day, model), by source offset, holds the totals (see savings_daily).
CREATE TABLE IF NOT EXISTS {db}.savings_snapshotted
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
    day_start DateTime64(6, 'UTC'),
    model LowCardinality(String),
    requests Int64,
    prompt_tokens Int64,
    completion_tokens Int64,
    cost Decimal(38, 12),
    baseline_cost Decimal(38, 12),
    savings Decimal(38, 12),
    currency LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, day_start, model, source_offset, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: spend anomalies, few; read per tenant over time (alerts, the demo's injected spike).
CREATE TABLE IF NOT EXISTS {db}.cost_anomaly_detected
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
    hour_start DateTime64(6, 'UTC'),
    spend Decimal(38, 12),
    expected Decimal(38, 12),
    currency LowCardinality(String),
    score Float64,
    threshold Float64,
    detector LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, hour_start, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- SummingMergeTree: the daily rollup of raw charges per tenant, UTC day, model and currency, kept by
-- the materialized view below as the sink inserts charges; rows of one key are summed at merge, so
-- read it with sum() ... GROUP BY. Sorted by tenant then day: every read is one tenant over a period.
-- A charge without a baseline counts its own cost as baseline (savings 0), as the rollups agent does.
CREATE TABLE IF NOT EXISTS {db}.charges_daily
(
    tenant LowCardinality(String),
    day Date,
    model LowCardinality(String),
    currency LowCardinality(String),
    requests UInt64,
    prompt_tokens UInt64,
    completion_tokens UInt64,
    cost Decimal(38, 12),
    baseline_cost Decimal(38, 12),
    savings Decimal(38, 12)
)
ENGINE = SummingMergeTree((requests, prompt_tokens, completion_tokens, cost, baseline_cost, savings))
PARTITION BY toYYYYMM(day)
ORDER BY (tenant, day, model, currency);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.charges_daily_mv TO {db}.charges_daily AS
SELECT
    c.tenant AS tenant,
    toDate(c.occurred_at, 'UTC') AS day,
    c.model AS model,
    c.currency AS currency,
    count() AS requests,
    sum(toUInt64(c.prompt_tokens)) AS prompt_tokens,
    sum(toUInt64(c.completion_tokens)) AS completion_tokens,
    sum(c.cost) AS cost,
    sum(ifNull(c.baseline_cost, c.cost)) AS baseline_cost,
    sum(ifNull(c.savings, toDecimal128(0, 12))) AS savings
FROM {db}.tokens_charged AS c
GROUP BY tenant, day, model, currency;

-- The agent's rollup as a table of totals: the newest snapshot per (tenant, day, model). A plain
-- view (always exactly the snapshots; a replay rebuilds it for free).
CREATE VIEW IF NOT EXISTS {db}.savings_daily AS
SELECT
    s.tenant AS tenant,
    toDate(s.day_start, 'UTC') AS day,
    s.model AS model,
    argMax(s.currency, s.source_offset) AS currency,
    argMax(s.requests, s.source_offset) AS requests,
    argMax(s.prompt_tokens, s.source_offset) AS prompt_tokens,
    argMax(s.completion_tokens, s.source_offset) AS completion_tokens,
    argMax(s.cost, s.source_offset) AS cost,
    argMax(s.baseline_cost, s.source_offset) AS baseline_cost,
    argMax(s.savings, s.source_offset) AS savings
FROM {db}.savings_snapshotted AS s
GROUP BY tenant, day, model;
