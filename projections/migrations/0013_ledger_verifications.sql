-- 0013: audit ledger verification results (issue 6): one row per chain per source per
-- `ledgerflow audit verify` run, so the portal can show each tenant's last verification.

-- MergeTree: read as "the newest result per tenant and source", so sorted by tenant, source, time.
CREATE TABLE IF NOT EXISTS {db}.ledger_verifications
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
    chain_tenant String,
    scope LowCardinality(String),
    source LowCardinality(String),
    ok Bool,
    entries_checked Int64,
    checkpoints_checked Int64,
    root_hash String,
    first_bad_seq Nullable(Int64),
    reason Nullable(String),
    duration_ms Int64,
    key_fingerprint String,
    key_id String,
    verifier LowCardinality(String),
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, source, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;
