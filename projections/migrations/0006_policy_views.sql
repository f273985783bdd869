-- 0006: policy denials and obligations by policy and tenant (issue 5), as views over the decisions.

-- A plain view, not a materialized one: it is always exactly the decisions table (a replay
-- rebuilds it for free) and a day of a tenant's decisions is a small scan.
CREATE VIEW IF NOT EXISTS {db}.policy_decisions_by_policy AS
SELECT
    tenant,
    toDate(occurred_at) AS day,
    decision,
    arrayJoin(if(empty(determining_policies), ['(none)'], determining_policies)) AS policy,
    count() AS decisions
FROM {db}.policy_decided
GROUP BY tenant, day, decision, policy;

-- Obligations attached to allowed requests, by kind (redact, region, max_cost) and value.
CREATE VIEW IF NOT EXISTS {db}.policy_obligations_by_kind AS
SELECT
    tenant,
    toDate(occurred_at) AS day,
    splitByChar(':', obligation)[1] AS kind,
    arrayStringConcat(arraySlice(splitByChar(':', obligation), 2), ':') AS value,
    count() AS decisions
FROM {db}.policy_decided
ARRAY JOIN obligations AS obligation
GROUP BY tenant, day, kind, value;
