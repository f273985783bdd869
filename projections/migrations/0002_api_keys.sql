-- 0002: API key lifecycle (hashes only, never a key), from the compacted api-keys topic.

-- MergeTree: issuance is an audit fact; sorted by tenant then time like every per-tenant audit read.
CREATE TABLE IF NOT EXISTS {db}.api_key_issued
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
    key_id String,
    key_sha256 String,
    roles Array(String),
    label Nullable(String),
    expires_at Nullable(DateTime64(6, 'UTC')),
    issued_by String,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: revocations are audit facts, read per tenant over time.
CREATE TABLE IF NOT EXISTS {db}.api_key_revoked
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
    key_id String,
    reason String,
    revoked_by String,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;
