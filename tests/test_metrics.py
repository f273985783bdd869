"""Prometheus metrics without a broker: the cardinality guard, the label rule, the sink's hook, lag.

The broker-backed half (every family non-zero after a real run, lag rows in ClickHouse, a
poison record counted) is tests/test_metrics_kafka.py.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from agents.metrics import AgentMetrics, lag_of
from domain.policy import DecisionInput, PolicyEngine, default_bundle
from gateway.metrics import OTHER, TENANT_SERIES, GatewayMetrics
from projections.lag import events_of
from projections.metrics import ReadSideMetrics
from streams.admin import GroupDescription, PartitionOwner
from streams.metrics import BoundedLabel

TENANT_FAMILIES = (
    "ledgerflow_gateway_policy_decisions",
    "ledgerflow_gateway_policy_denials",
    "ledgerflow_gateway_policy_obligations",
    "ledgerflow_gateway_policy_refusals",
)


def samples(registry: CollectorRegistry) -> list[tuple[str, dict[str, str], float]]:
    """Every sample of the exposition, parsed back from the text a scrape would get."""
    text = generate_latest(registry).decode()
    return [(s.name, dict(s.labels), s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def test_ten_thousand_tenants_add_one_series_per_family_and_other_counts_the_rest_exactly() -> None:
    metrics = GatewayMetrics()
    bundle = default_bundle()
    engine = PolicyEngine(bundle)
    allow = engine.decide(DecisionInput(tenant="t", principal="k"))
    deny = engine.decide(DecisionInput(tenant="t", principal="k", tools=frozenset({"code_exec"})))
    redact = engine.decide(DecisionInput(tenant="t", principal="k", data_classification="restricted"))
    assert allow.allow and not deny.allow and redact.allow and redact.obligations.redact
    decisions = (allow, deny, redact)

    def drive(tenants: range) -> None:
        for i in tenants:
            tenant = f"tenant-{i:05d}"
            metrics.observe_policy(decisions[i % 3], tenant, bundle, 0.0001)
            metrics.observe_refusal("max_cost", tenant)

    drive(range(0, 2 * TENANT_SERIES))
    after_200 = samples(metrics.registry)
    drive(range(2 * TENANT_SERIES, 10_000))
    after_10k = samples(metrics.registry)

    # past the limit, no tenant adds a series: the exposition has the same series, only values move
    assert [(n, sorted(lbl.items())) for n, lbl, _ in after_200] == [
        (n, sorted(lbl.items())) for n, lbl, _ in after_10k
    ]
    tenants = {lbl["tenant"] for _, lbl, _ in after_10k if "tenant" in lbl}
    assert len(tenants) == TENANT_SERIES + 1 and OTHER in tenants
    assert tenants - {OTHER} == {f"tenant-{i:05d}" for i in range(TENANT_SERIES)}  # the first ones seen
    per_tenant_series = Counter(n for n, lbl, _ in after_10k if "tenant" in lbl)
    assert all(count <= 3 * (TENANT_SERIES + 1) for count in per_tenant_series.values())

    def total(name: str, **match: str) -> float:
        return sum(v for n, lbl, v in after_10k if n == name and all(lbl.get(k) == m for k, m in match.items()))

    # exact: every decision is counted once, "_other" holds exactly those of tenants 100..9999
    assert total("ledgerflow_gateway_policy_decisions_total") == 10_000
    assert total("ledgerflow_gateway_policy_decisions_total", tenant=OTHER) == 10_000 - TENANT_SERIES
    assert total("ledgerflow_gateway_policy_refusals_total", tenant=OTHER) == 10_000 - TENANT_SERIES
    denied_other = sum(1 for i in range(TENANT_SERIES, 10_000) if i % 3 == 1)
    assert total("ledgerflow_gateway_policy_denials_total", tenant=OTHER) == denied_other
    assert total("ledgerflow_gateway_policy_decisions_total", tenant="tenant-00042") == 1


def test_bounded_label_is_exact_under_threads() -> None:
    import threading

    label = BoundedLabel(50)
    got: list[str] = []
    lock = threading.Lock()

    def work(base: int) -> None:
        out = [label(f"v{base + i}") for i in range(1000)]
        with lock:
            got.extend(out)

    threads = [threading.Thread(target=work, args=(k * 1000,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    kept = {v for v in got if v != OTHER}
    assert len(kept) == 50 and got.count(OTHER) == 8000 - 50


ALLOWED_LABELS = {
    "route", "status", "kind", "decision", "policy", "reason", "agent", "outcome", "unit", "group", "topic",
    "partition", "table", "path", "tenant",
}  # fmt: skip
BOUNDED_ONLY = {"tenant", "reason"}  # client- or data-chosen: only through a BoundedLabel


def test_every_label_is_from_the_allowed_set() -> None:
    """The label rule of docs/observability.md, over every family of every process."""
    agent = AgentMetrics()
    agent.declare("tenant-totals", "event")
    agent.set_lag("g", {("t", 0): 3})
    read = ReadSideMetrics(lambda: {"paused": ["t[0]"], "assigned": ["t[0]", "t[1]"], "pending_rows": 5})
    read.landed("t", "dead_letters", 1, 0.01, False, ["decode-error"])
    read.set_lags(["g"], {("g", "t", 0): 2})
    gateway = GatewayMetrics()
    bundle = default_bundle()
    gateway.observe_policy(PolicyEngine(bundle).decide(DecisionInput(tenant="t", principal="k")), "t", bundle, 0.001)
    gateway.observe_refusal("max_cost", "t")
    for registry in (agent.registry, read.registry, gateway.registry):
        for family in registry.collect():
            for sample in family.samples:
                assert set(sample.labels) - {"le"} <= ALLOWED_LABELS, (family.name, sample.labels)
    assert {"tenant"} <= {lbl for f in gateway.registry.collect() for s in f.samples for lbl in s.labels}
    assert not any(
        "tenant" in s.labels for r in (agent.registry, read.registry) for f in r.collect() for s in f.samples
    )


def test_sink_hook_counts_rows_batches_and_dead_letters_by_reason_and_topic() -> None:
    read = ReadSideMetrics(lambda: {"paused": ["a[1]"], "assigned": ["a[0]", "a[1]"], "pending_rows": 7})
    read.landed("p.token-charges", "tokens_charged", 500, 0.02, True)
    read.landed("p.token-charges", "dead_letters", 2, 0.005, False, ["decode-error", "wrong-topic"])
    for i in range(100):  # a flood of distinct reasons (a bug upstream) stays bounded
        read.landed("p.audit", "dead_letters", 1, 0.001, False, [f"weird-{i}"])
    got = {(n, tuple(sorted(lbl.items()))): v for n, lbl, v in samples(read.registry)}
    assert got[("ledgerflow_sink_rows_total", (("table", "tokens_charged"),))] == 500
    assert got[("ledgerflow_sink_rows_total", (("table", "dead_letters"),))] == 102
    assert got[("ledgerflow_sink_batch_rows_count", (("path", "fast"),))] == 1
    assert got[("ledgerflow_sink_batch_rows_sum", (("path", "fast"),))] == 500
    assert got[("ledgerflow_sink_insert_seconds_count", (("path", "row"),))] == 101
    key = ("ledgerflow_sink_dead_letters_total", (("reason", "decode-error"), ("topic", "p.token-charges")))
    assert got[key] == 1
    reasons = {dict(lbl)["reason"] for (n, lbl) in got if n == "ledgerflow_sink_dead_letters_total"}
    assert len(reasons) <= 32 + 1 and OTHER in reasons
    assert sum(v for (n, _), v in got.items() if n == "ledgerflow_sink_dead_letters_total") == 102
    assert got[("ledgerflow_sink_paused_partitions", ())] == 1
    assert got[("ledgerflow_sink_assigned_partitions", ())] == 2
    assert got[("ledgerflow_sink_pending_rows", ())] == 7


def test_lag_of_discounts_the_trailing_commit_marker_only_when_fetched_to_the_end() -> None:
    assert lag_of(10, 10) == 0
    assert lag_of(10, 4) == 6
    assert lag_of(10, 9, fetched=10) == 0  # the last offset is a transaction marker
    assert lag_of(10, 9, fetched=9) == 1  # not fetched yet: it may be a record
    assert lag_of(10, 9) == 1
    assert lag_of(10, 12) == 0


def test_lag_events_one_per_partition_with_owner_and_nothing_for_unknown_groups() -> None:
    at = datetime(2026, 11, 29, 4, 0, tzinfo=UTC)
    rows = [
        PartitionOwner("g", "p.audit", 0, 40, 42, 2, "member-1", "client", "/127.0.0.1"),
        PartitionOwner("g", "p.audit", 1, -1001, 5, 5, "-", "-", "-"),
        PartitionOwner("g", "p.audit", 2, -1, 0, 0, "-", "-", "-"),  # never written, never committed
    ]
    events = events_of(GroupDescription("g", "STABLE", 1, rows), at, "corr-1")
    assert [(e.partition, e.owner, e.committed, e.end_offset, e.lag) for e in events] == [
        (0, "member-1", 40, 42, 2),
        (1, "", -1, 5, 5),
    ]
    assert {(e.tenant, e.envelope.occurred_at, e.envelope.correlation_id) for e in events} == {
        ("_platform", at, "corr-1")
    }
    assert events_of(GroupDescription("g", "DEAD", 0, rows), at, "corr-2") == []


def test_up_gives_every_process_a_metrics_url_and_samples_every_group(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from ledgerflow.cli import children
    from ledgerflow.settings import load

    monkeypatch.setenv("LEDGERFLOW_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LEDGERFLOW_AGENT_METRICS_PORT", "19411")
    monkeypatch.setenv("LEDGERFLOW_ROUTING_ENABLED", "1")
    monkeypatch.setenv("LEDGERFLOW_WORKERS", "2")
    settings = load()
    procs = {c.name: c for c in children(settings)}
    assert procs["ledger"].metrics == "http://127.0.0.1:19411/metrics"
    assert procs["routing-priors"].metrics == "http://127.0.0.1:19413/metrics"
    assert procs["ledger"].argv[-4:] == ["--metrics-port", "19411", "--metrics-host", "127.0.0.1"]
    assert procs["agents-1"].metrics == f"http://127.0.0.1:{settings.worker_web_port + 1}/metrics"
    assert procs["gateway"].metrics == settings.gateway_url + "/metrics"
    assert procs["projections"].metrics == settings.projections_url + "/metrics"
    argv = procs["projections"].argv
    groups = [argv[i + 1] for i, a in enumerate(argv) if a == "--lag-group"]
    assert argv[argv.index("--lag-interval") + 1] == "15.0"
    assert groups[0] == f"{settings.sink_group}=*"
    assert groups[1].startswith(f"{settings.worker_id}=token-charges")  # + the SLO agent's source, once it exists
    assert groups[2:4] == [f"{settings.worker_id}-ledger=audit", f"{settings.worker_id}-dp-budget=dp-budget-log"]
    assert groups[4].startswith(f"{settings.worker_id}-routing-priors=") and "routes" in groups[4]
    monkeypatch.setenv("LEDGERFLOW_AGENT_METRICS_PORT", "0")
    monkeypatch.setenv("LEDGERFLOW_LAG_SAMPLE_INTERVAL_S", "0")
    off = {c.name: c for c in children(load())}
    assert off["ledger"].metrics == "" and "--metrics-port" not in off["ledger"].argv
    assert "--lag-group" not in off["projections"].argv
