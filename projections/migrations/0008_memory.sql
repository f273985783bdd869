-- 0008: memory facts (sizes, hashes and erasures of session memory; the content is never here).

-- MergeTree: append-only facts; tenant + session + time order serves "what was stored and erased for this session".
CREATE TABLE IF NOT EXISTS {db}.memory_written
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
    session_id String,
    turn_index Int32,
    role LowCardinality(String),
    content_sha256 String,
    chars Int32,
    request_id Nullable(String),
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, session_id, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: erasures are facts an auditor lists per tenant over time (and joins to the writes by session).
CREATE TABLE IF NOT EXISTS {db}.memory_erased
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
    session_id String,
    reason LowCardinality(String),
    turns_erased Int32,
    erased_by String,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;
