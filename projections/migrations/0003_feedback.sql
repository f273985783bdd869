-- 0003: quality feedback on requests (joined to requests on tenant + request_id, never across tenants).

-- MergeTree: feedback is an append-only fact; tenant + time order serves per-tenant quality reports.
CREATE TABLE IF NOT EXISTS {db}.feedback_received
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
    api_key_id String,
    score Float64,
    label LowCardinality(Nullable(String)),
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;
