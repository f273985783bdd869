-- 0005: policy bundles, attributes and shadow divergences (issue 5), the audit ledger (issue 6).

-- PolicyDecided v2: obligations and the refused tool (old rows read as empty / null).
ALTER TABLE {db}.policy_decided ADD COLUMN IF NOT EXISTS obligations Array(String) AFTER input_sha256;
ALTER TABLE {db}.policy_decided ADD COLUMN IF NOT EXISTS denied_tool Nullable(String) AFTER obligations;

-- MergeTree: every published bundle, kept with its text; read by version and time for `policy list` and rollbacks.
CREATE TABLE IF NOT EXISTS {db}.policy_published
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
    version LowCardinality(String),
    previous_version Nullable(String),
    content_sha256 String,
    author String,
    policy_count Int32,
    policy_ids Array(String),
    change_note Nullable(String),
    bundle String,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: the history of every entity's policy attributes (the compacted topic keeps only the newest).
CREATE TABLE IF NOT EXISTS {db}.policy_attributes_set
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
    entity_type LowCardinality(String),
    entity_id String,
    attributes_json String,
    set_by String,
    deleted Bool,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, entity_type, entity_id, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: where a candidate bundle would have ruled differently on live traffic.
CREATE TABLE IF NOT EXISTS {db}.policy_shadow_diverged
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
    active_version LowCardinality(String),
    candidate_version LowCardinality(String),
    active_decision LowCardinality(String),
    candidate_decision LowCardinality(String),
    active_policies Array(String),
    candidate_policies Array(String),
    active_obligations Array(String),
    candidate_obligations Array(String),
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

-- MergeTree: the hash chain, read per tenant in sequence order by `audit verify`. A redelivered entry (same event_id, same seq) may appear twice; verify collapses identical duplicates and flags any other.
CREATE TABLE IF NOT EXISTS {db}.ledger_entry_chained
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
    seq Int64,
    entry_hash String,
    prev_hash String,
    audit_event_id String,
    audit_sha256 String,
    source_partition Int32,
    source_offset Int64,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, seq, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: signed tree heads per chain, read by size for proofs and consistency checks.
CREATE TABLE IF NOT EXISTS {db}.ledger_checkpoint_signed
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
    origin String,
    tree_size Int64,
    root_hash String,
    algorithm String,
    key_id String,
    signature String,
    signed_note String,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, tree_size, event_id)
SETTINGS non_replicated_deduplication_window = 10000;
