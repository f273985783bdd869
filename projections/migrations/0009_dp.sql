-- 0009: differential privacy (issue 8): the budget log (grants, requests), the agent's decisions
-- (charges, refusals), the releases, and a per-budget summary view. Append-only facts: MergeTree.

-- MergeTree: grants are read per tenant and metric set in time order (the budget's history), so that is the sort key.
CREATE TABLE IF NOT EXISTS {db}.dp_budget_granted
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
    metric_set LowCardinality(String),
    epsilon Float64,
    delta Float64,
    composition LowCardinality(String),
    period LowCardinality(String),
    granted_by String,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, metric_set, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: requests are read per budget in time order, and joined to their decisions by query_id.
CREATE TABLE IF NOT EXISTS {db}.dp_query_requested
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
    query_id String,
    metric_set LowCardinality(String),
    composition LowCardinality(String),
    epsilon Float64,
    delta Float64,
    query_sha256 String,
    query String,
    requested_by String,
    rho Nullable(Float64),
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, metric_set, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: charges are summed per budget over a period and the newest one holds what remains: budget, then time.
CREATE TABLE IF NOT EXISTS {db}.dp_query_charged
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
    query_id String,
    metric_set LowCardinality(String),
    epsilon Float64,
    delta Float64,
    query_sha256 String,
    requested_by String,
    epsilon_remaining Float64,
    delta_remaining Float64,
    rho Nullable(Float64),
    rho_remaining Nullable(Float64),
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, metric_set, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: refusals are counted per budget and reason over time.
CREATE TABLE IF NOT EXISTS {db}.dp_query_refused
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
    query_id String,
    metric_set LowCardinality(String),
    reason LowCardinality(String),
    detail String,
    epsilon Float64,
    delta Float64,
    query_sha256 String,
    requested_by String,
    epsilon_remaining Float64,
    delta_remaining Float64,
    rho Nullable(Float64),
    rho_remaining Nullable(Float64),
    repeat_of Nullable(String),
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, metric_set, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: analysts list a tenant's releases per metric set and window; the result column is JSON text.
CREATE TABLE IF NOT EXISTS {db}.dp_release_published
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
    query_id String,
    metric_set LowCardinality(String),
    window_start DateTime64(6, 'UTC'),
    window_end DateTime64(6, 'UTC'),
    mechanism LowCardinality(String),
    result String,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, metric_set, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;
-- One row per budget: what was granted, what was charged, and what remained after the newest
-- charge (as the DP budget agent recorded it; a daily or monthly budget renews, so that is the
-- current period's remainder). The exact fold is `GET /v1/dp/budgets`; this view is for SQL.
CREATE VIEW IF NOT EXISTS {db}.dp_budgets AS
SELECT
    g.tenant AS tenant,
    g.metric_set AS metric_set,
    g.composition AS composition,
    g.period AS period,
    g.epsilon_granted AS epsilon_granted,
    g.delta_granted AS delta_granted,
    c.queries_charged AS queries_charged,
    c.epsilon_charged AS epsilon_charged,
    if(c.queries_charged = 0, g.epsilon_granted, c.epsilon_remaining) AS epsilon_remaining,
    c.rho_remaining AS rho_remaining,
    r.queries_refused AS queries_refused,
    c.last_charged_at AS last_charged_at
FROM
(
    SELECT tenant, metric_set, any(composition) AS composition, any(period) AS period,
           sum(epsilon) AS epsilon_granted, sum(delta) AS delta_granted
    FROM {db}.dp_budget_granted GROUP BY tenant, metric_set
) AS g
LEFT JOIN
(
    SELECT tenant, metric_set, count() AS queries_charged, sum(epsilon) AS epsilon_charged,
           argMax(epsilon_remaining, (occurred_at, event_id)) AS epsilon_remaining,
           argMax(rho_remaining, (occurred_at, event_id)) AS rho_remaining,
           max(occurred_at) AS last_charged_at
    FROM {db}.dp_query_charged GROUP BY tenant, metric_set
) AS c ON c.tenant = g.tenant AND c.metric_set = g.metric_set
LEFT JOIN
(
    SELECT tenant, metric_set, countIf(reason != 'repeat') AS queries_refused
    FROM {db}.dp_query_refused GROUP BY tenant, metric_set
) AS r ON r.tenant = g.tenant AND r.metric_set = g.metric_set;
