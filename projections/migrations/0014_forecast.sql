-- 0014: month-end spend forecasts and budget variance alerts (issue 7); docs/accounting.md explains them.

-- Settles now record the limit in force (what the forecast compares with); older rows keep nulls.
ALTER TABLE {db}.budget_settled ADD COLUMN IF NOT EXISTS limit_amount Nullable(Decimal(38, 12)) AFTER currency;
ALTER TABLE {db}.budget_settled ADD COLUMN IF NOT EXISTS enforced Nullable(Bool) AFTER limit_amount;

-- MergeTree: one row per forecast change of a monthly budget; the portal reads a tenant's budgets
-- for a month and draws the newest forecast (argMax by source_offset) against the limit.
CREATE TABLE IF NOT EXISTS {db}.spend_forecasts
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
    period_end DateTime64(6, 'UTC'),
    month_to_date Decimal(38, 12),
    forecast Decimal(38, 12),
    method LowCardinality(String),
    days_of_history Int32,
    currency LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    limit Nullable(Decimal(38, 12)),
    enforced Nullable(Bool),
    projected_variance Nullable(Decimal(38, 12)),
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(period_start)
ORDER BY (tenant, budget_id, period_start, source_partition, source_offset, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: alerts, few; read per tenant over time.
CREATE TABLE IF NOT EXISTS {db}.budget_variance_alerts
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
    period_end DateTime64(6, 'UTC'),
    month_to_date Decimal(38, 12),
    forecast Decimal(38, 12),
    method LowCardinality(String),
    currency LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    limit Nullable(Decimal(38, 12)),
    enforced Nullable(Bool),
    projected_variance Nullable(Decimal(38, 12)),
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(period_start)
ORDER BY (tenant, budget_id, period_start, event_id)
SETTINGS non_replicated_deduplication_window = 10000;
