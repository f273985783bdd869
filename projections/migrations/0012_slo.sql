-- 0012: SLOs (issue 11): how every request ended, the SLIs and error-budget burn computed from it,
-- and the burn-rate alerts of the slo-burn agent. docs/slo.md explains the numbers.

-- MergeTree: one row per answered request of a public route; every read is a tenant (or all
-- tenants) over a recent time range, so tenant then time.
CREATE TABLE IF NOT EXISTS {db}.request_completed
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
    method LowCardinality(String),
    status Int32,
    latency_ms Int32,
    error_kind LowCardinality(Nullable(String)),
    streamed Bool,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, occurred_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- MergeTree: alert transitions, few; read per tenant and SLO over time (which alerts are open).
CREATE TABLE IF NOT EXISTS {db}.slo_burn_rate_alerted
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
    slo LowCardinality(String),
    objective Float64,
    severity LowCardinality(String),
    state LowCardinality(String),
    long_window_s Int32,
    short_window_s Int32,
    long_burn_rate Float64,
    short_burn_rate Float64,
    threshold Float64,
    long_requests Int64,
    long_bad Int64,
    short_requests Int64,
    short_bad Int64,
    evaluated_at DateTime64(6, 'UTC'),
    source_partition Int32,
    source_offset Int64,
    _topic LowCardinality(String),
    _partition UInt16,
    _offset UInt64,
    _ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (tenant, slo, evaluated_at, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- The SLIs: one row per request and SLO that counts it, with bad = 1 when it spent budget. The
-- same rules as domain/slo.py (`classify`; tests/test_slo_domain.py holds the two together):
-- availability counts every request, bad when 5xx or a stream that broke on our side;
-- ask_latency counts whole (not streamed) 2xx answers of /v1/ask, bad at 1200 ms or more.
CREATE VIEW IF NOT EXISTS {db}.slo_requests AS
SELECT
    tenant,
    occurred_at,
    request_id,
    route,
    status,
    latency_ms,
    error_kind,
    streamed,
    sli.1 AS slo,
    sli.2 AS objective,
    sli.3 AS bad
FROM (SELECT * FROM {db}.request_completed LIMIT 1 BY event_id)  -- a re-sent batch (unknown commit outcome) counts once
ARRAY JOIN arrayFilter(
    s -> s.4 = 1,
    [
        ('availability', 0.999,
         toUInt8(status >= 500 OR ifNull(error_kind, '') IN ('upstream_error', 'internal_error', 'charge_not_recorded')),
         toUInt8(1)),
        ('ask_latency', 0.95, toUInt8(latency_ms >= 1200),
         toUInt8(route = '/v1/ask' AND status >= 200 AND status < 300 AND NOT streamed))
    ]
) AS sli;

-- Burn per tenant, SLO and alerting window, ending now: requests, bad, error ratio and burn rate
-- (error ratio / (1 - objective)); the 30d row is the budget window, where the burn rate is the
-- share of the budget spent and budget_remaining = 1 - that. Platform-wide: sum requests and bad
-- over tenants.
CREATE VIEW IF NOT EXISTS {db}.slo_burn AS
SELECT
    tenant,
    slo,
    objective,
    w.1 AS window,
    w.2 AS window_s,
    count() AS requests,
    sum(bad) AS bad,
    requests - bad AS good,
    if(requests = 0, 0, bad / requests) AS error_ratio,
    error_ratio / round(1 - objective, 9) AS burn_rate,
    if(window_s = 2592000, 1 - burn_rate, NULL) AS budget_remaining
FROM
(
    SELECT
        tenant, slo, objective, bad, occurred_at,
        arrayJoin([('5m', 300), ('30m', 1800), ('1h', 3600), ('6h', 21600), ('3d', 259200), ('30d', 2592000)]) AS w
    FROM {db}.slo_requests
    WHERE occurred_at >= now64(6) - toIntervalDay(30)
)
WHERE occurred_at >= now64(6) - toIntervalSecond(w.2)
GROUP BY tenant, slo, objective, window, window_s;

-- The error budget over the 30-day window per tenant and SLO: allowed bad requests, spent, left.
CREATE VIEW IF NOT EXISTS {db}.slo_budget AS
SELECT
    tenant,
    slo,
    objective,
    count() AS requests,
    sum(bad) AS bad,
    round(1 - objective, 9) * requests AS allowed_bad,
    if(requests = 0, 0, bad / allowed_bad) AS budget_spent,
    1 - budget_spent AS budget_remaining
FROM {db}.slo_requests
WHERE occurred_at >= now64(6) - toIntervalDay(30)
GROUP BY tenant, slo, objective;

-- Alerts open now: the newest transition of each (tenant, SLO, rule) is "fired".
CREATE VIEW IF NOT EXISTS {db}.slo_alerts_open AS
SELECT
    tenant,
    slo,
    severity,
    long_window_s,
    short_window_s,
    argMax(state, (evaluated_at, source_offset)) AS last_state,
    max(evaluated_at) AS since,
    argMax(long_burn_rate, (evaluated_at, source_offset)) AS long_burn_rate,
    argMax(short_burn_rate, (evaluated_at, source_offset)) AS short_burn_rate,
    any(threshold) AS threshold
FROM {db}.slo_burn_rate_alerted
GROUP BY tenant, slo, severity, long_window_s, short_window_s
HAVING last_state = 'fired';
