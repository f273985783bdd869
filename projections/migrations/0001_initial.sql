-- 0001: one table per event type plus dead_letters. Never edit an applied migration:
-- add 0002_*.sql instead (the runner refuses to start when a checksum changes).
--
-- Every event table: the envelope flattened, then the payload in .avsc field order, then
-- the Kafka coordinates the sink needs to resume (_topic/_partition/_offset).
-- non_replicated_deduplication_window lets a retried insert with the same
-- insert_deduplication_token (topic-partition-first-last) be dropped instead of doubled.

-- MergeTree: append-only facts; sorted by tenant then time because every read is per tenant over a time range.
CREATE TABLE IF NOT EXISTS {db}.request_received
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
    route LowCardinality(String),
    api_key_id String,
    model_hint LowCardinality(Nullable(String)),
    message_count Int32,
    prompt_chars Int32,
    prompt_sha256 String,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: decisions are immutable facts; tenant + time order serves per-tenant audits of allow/deny over a period.
CREATE TABLE IF NOT EXISTS {db}.policy_decided
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
    decision LowCardinality(String),
    policy_version LowCardinality(String),
    determining_policies Array(String),
    input_sha256 String,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: the billable facts, summed per tenant over a billing period, so tenant then time is the scan order.
CREATE TABLE IF NOT EXISTS {db}.tokens_charged
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
    prompt_tokens Int32,
    completion_tokens Int32,
    input_price_per_mtok Decimal(38, 12),
    output_price_per_mtok Decimal(38, 12),
    price_list_version LowCardinality(String),
    currency LowCardinality(String),
    cost Decimal(38, 12),
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: the audit trail is append-only and read per tenant in time order (the ledger's chain order).
CREATE TABLE IF NOT EXISTS {db}.audit_recorded
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
    action LowCardinality(String),
    actor String,
    subject String,
    outcome LowCardinality(String),
    details Map(String, String),
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: every running-total snapshot is kept (history); the latest per tenant is argMax over the tenant's time-ordered rows.
CREATE TABLE IF NOT EXISTS {db}.tenant_totals_updated
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
    requests Int64,
    prompt_tokens Int64,
    completion_tokens Int64,
    cost Decimal(38, 12),
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
ORDER BY (tenant, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: poison records are few and looked up by where they came from, so the sort key is the source coordinates.
-- key/value are the original bytes, base64 (decode with base64Decode) so every output format stays valid text.
CREATE TABLE IF NOT EXISTS {db}.dead_letters
(
    reason LowCardinality(String),
    detail String,
    source_topic LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    consumer LowCardinality(String),
    first_seen DateTime64(6, 'UTC'),
    key_base64 Nullable(String),
    value_base64 Nullable(String),
    value_size UInt32,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(first_seen)
ORDER BY (_topic, _partition, _offset)
SETTINGS non_replicated_deduplication_window = 10000;
