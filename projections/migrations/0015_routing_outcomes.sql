-- 0015: adapter outcomes (issue 9): what each model call did (latency, time to first token,
-- status, retries, tokens, finish reason) and how calls failed. The router's latency term is
-- learned from AdapterCalled; operators read per-model latency and error classes here.

-- MergeTree: one row per answered call; model + time order serves per-model latency quantiles.
CREATE TABLE IF NOT EXISTS {db}.adapter_called
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
    model LowCardinality(String),
    adapter LowCardinality(String),
    status Int32,
    retries Int32,
    latency_ms Int32,
    first_token_ms Nullable(Int32),
    streamed Bool,
    finish_reason LowCardinality(Nullable(String)),
    prompt_tokens Int32,
    completion_tokens Int32,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (model, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: one row per call an adapter gave up on; error class + model order serves
-- "which upstream fails how" reports.
CREATE TABLE IF NOT EXISTS {db}.adapter_failed
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
    model LowCardinality(String),
    adapter LowCardinality(String),
    error_kind LowCardinality(String),
    status Nullable(Int32),
    retries Int32,
    latency_ms Int32,
    will_fall_back Bool,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (model, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- Per model and hour: calls, mean and p95 latency, mean time to first token (streams).
CREATE VIEW IF NOT EXISTS {db}.adapter_latency AS
SELECT
    model,
    toStartOfHour(occurred_at) AS hour,
    count() AS calls,
    avg(latency_ms) AS mean_latency_ms,
    quantile(0.95)(latency_ms) AS p95_latency_ms,
    avgIf(first_token_ms, first_token_ms IS NOT NULL) AS mean_first_token_ms,
    sum(retries) AS retries
FROM {db}.adapter_called
GROUP BY model, hour;
