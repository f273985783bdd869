-- 0004: what ingress redaction masked per request (counts by kind, never the secret).

-- MergeTree: append-only facts; tenant + time order serves per-tenant redaction reports.
CREATE TABLE IF NOT EXISTS {db}.request_redacted
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
    counts_by_kind Map(String, Int32),
    redacted_chars Int32,
    action LowCardinality(String),
    ruleset_version LowCardinality(String),
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;
