-- 0011: consumer lag samples (issue 11), from ConsumerLagSampled on the consumer-lag topic.
--
-- MergeTree sorted by (group_id, topic, partition, occurred_at): the portal and Grafana read one
-- group's partitions over a time range, or each partition's newest sample (argMax by occurred_at).
-- Partitioned by month like the fact tables; no TTL, so a rebuild by replay equals the live table
-- (lag_sample_interval_s sets the volume: one row per sampled partition per round).
-- The column names are what the dashboards and the portal query.
CREATE TABLE IF NOT EXISTS {db}.consumer_lag
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
    group_id String,
    topic String,
    partition Int32,
    owner String,
    committed Int64,
    end_offset Int64,
    lag Int64,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (group_id, topic, partition, occurred_at)
SETTINGS non_replicated_deduplication_window = 10000;
