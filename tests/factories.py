"""Builders of valid events for tests."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from streams.events import (
    AdapterCalled,
    AdapterFailed,
    ApiKeyIssued,
    ApiKeyRevoked,
    AuditRecorded,
    BudgetReleased,
    BudgetReserved,
    BudgetSet,
    BudgetSettled,
    BudgetThresholdCrossed,
    BudgetVarianceAlerted,
    ConsumerLagSampled,
    CostAnomalyDetected,
    DpBudgetGranted,
    DpQueryCharged,
    DpQueryRefused,
    DpQueryRequested,
    DpReleasePublished,
    Envelope,
    Event,
    FeedbackReceived,
    LedgerCheckpointSigned,
    LedgerEntryChained,
    LedgerVerified,
    MemoryErased,
    MemoryWritten,
    ModelPrice,
    PolicyAttributesSet,
    PolicyDecided,
    PolicyPublished,
    PolicyShadowDiverged,
    PriceListPublished,
    RequestCompleted,
    RequestReceived,
    RequestRedacted,
    RouteCandidate,
    RouteChosen,
    RoutingPriorsPublished,
    RoutingRegretRecorded,
    SavingsSnapshotted,
    SloBurnRateAlerted,
    SpendForecasted,
    SubjectErasureRequested,
    TenantTotalsUpdated,
    TokensCharged,
)
from streams.ids import derived_uuid7, uuid7


def envelope(event_type: str, tenant: str = "acme", request_id: str | None = None) -> Envelope:
    rid = request_id or str(uuid7())
    return Envelope(
        event_id=str(derived_uuid7(rid, event_type)),
        event_type=event_type,
        schema_version=1,
        tenant=tenant,
        occurred_at=datetime.now(UTC).replace(microsecond=123456),
        correlation_id=rid,
        producer="test",
    )


def charge(tenant: str = "acme", cost: str = "0.000123450000", prompt: int = 10, completion: int = 20) -> TokensCharged:
    rid = str(uuid7())
    return TokensCharged(
        envelope=envelope("TokensCharged", tenant, rid),
        request_id=rid,
        model="sim-small",
        prompt_tokens=prompt,
        completion_tokens=completion,
        input_price_per_mtok=Decimal("0.15"),
        output_price_per_mtok=Decimal("0.60"),
        price_list_version="v1",
        currency="USD",
        cost=Decimal(cost),
        baseline_model="sim-large",
        baseline_cost=Decimal(cost) * 10,
        savings=Decimal(cost) * 9,
    )


def request(tenant: str = "acme") -> RequestReceived:
    rid = str(uuid7())
    return RequestReceived(
        envelope=envelope("RequestReceived", tenant, rid),
        request_id=rid,
        route="/v1/ask",
        api_key_id="k1",
        message_count=1,
        prompt_chars=5,
        prompt_sha256="0" * 64,
        model_hint=None,
    )


def decision(tenant: str = "acme") -> PolicyDecided:
    rid = str(uuid7())
    return PolicyDecided(
        envelope=envelope("PolicyDecided", tenant, rid),
        request_id=rid,
        decision="allow",
        policy_version="p1",
        determining_policies=["default-allow"],
        input_sha256="f" * 64,
        obligations=["redact:email", "region:eu"],
        denied_tool=None,
    )


def audit(tenant: str = "acme") -> AuditRecorded:
    rid = str(uuid7())
    return AuditRecorded(
        envelope=envelope("AuditRecorded", tenant, rid),
        action="request.completed",
        actor="k1",
        subject=rid,
        outcome="success",
        details={"model": "sim-small"},
    )


# --- one builder per remaining event type (realistic values; optionals set where it matters) ---

_AT = datetime(2025, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
_MONTH = datetime(2025, 3, 1, tzinfo=UTC)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def totals(tenant: str = "acme") -> TenantTotalsUpdated:
    return TenantTotalsUpdated(
        envelope=envelope("TenantTotalsUpdated", tenant),
        requests=3,
        prompt_tokens=30,
        completion_tokens=60,
        cost=Decimal("0.000370350000"),
        currency="USD",
        source_partition=2,
        source_offset=41,
    )


def redaction(tenant: str = "acme") -> RequestRedacted:
    rid = str(uuid7())
    return RequestRedacted(
        envelope=envelope("RequestRedacted", tenant, rid),
        request_id=rid,
        counts_by_kind={"email": 2, "api_key": 1},
        redacted_chars=61,
        action="masked",
        ruleset_version="r3",
    )


def policy_published(tenant: str = "acme") -> PolicyPublished:
    return PolicyPublished(
        envelope=envelope("PolicyPublished", tenant),
        version="p2",
        previous_version="p1",
        content_sha256=_sha("bundle p2"),
        author="alice",
        policy_count=2,
        policy_ids=["default-allow", "deny-large-prompts"],
        change_note=None,
        bundle='@id("default-allow")\npermit(principal, action, resource);',
    )


def policy_attributes(tenant: str = "acme") -> PolicyAttributesSet:
    return PolicyAttributesSet(
        envelope=envelope("PolicyAttributesSet", tenant),
        entity_type="Tenant",
        entity_id=tenant,
        attributes_json=json.dumps({"residency": "eu", "tier": "gold"}),
        set_by="alice",
        deleted=False,
    )


def shadow_diverged(tenant: str = "acme") -> PolicyShadowDiverged:
    rid = str(uuid7())
    return PolicyShadowDiverged(
        envelope=envelope("PolicyShadowDiverged", tenant, rid),
        request_id=rid,
        active_version="p1",
        candidate_version="p2",
        active_decision="allow",
        candidate_decision="deny",
        active_policies=["default-allow"],
        candidate_policies=["deny-large-prompts"],
        active_obligations=["redact:email"],
        candidate_obligations=[],
        input_sha256="e" * 64,
    )


def route(tenant: str = "acme") -> RouteChosen:
    rid = str(uuid7())
    candidates: list[RouteCandidate] = [
        {"model": "sim-small", "score": 0.71, "allowed": True, "excluded_by": None},
        {"model": "sim-large", "score": 0.64, "allowed": True, "excluded_by": None},
        {"model": "sim-xl", "score": 0.9, "allowed": False, "excluded_by": "budget"},
    ]
    return RouteChosen(
        envelope=envelope("RouteChosen", tenant, rid),
        request_id=rid,
        attempt=1,
        strategy="bandit",
        context_key="/v1/ask:short",
        priors_version="pr7",
        candidates=candidates,
        chosen_model="sim-small",
        propensity=0.625,
        features={"bias": 1.0, "len_log": 0.42, "h7": -0.5},
    )


def adapter_called(tenant: str = "acme") -> AdapterCalled:
    rid = str(uuid7())
    return AdapterCalled(
        envelope=envelope("AdapterCalled", tenant, rid),
        request_id=rid,
        model="sim-small",
        adapter="sim",
        status=200,
        retries=1,
        latency_ms=412,
        first_token_ms=95,
        streamed=True,
        finish_reason="stop",
        prompt_tokens=10,
        completion_tokens=20,
    )


def adapter_failed(tenant: str = "acme") -> AdapterFailed:
    rid = str(uuid7())
    return AdapterFailed(
        envelope=envelope("AdapterFailed", tenant, rid),
        request_id=rid,
        model="sim-large",
        adapter="sim",
        error_kind="timeout",
        status=None,
        retries=2,
        latency_ms=30_000,
        will_fall_back=True,
    )


def price_list(tenant: str = "acme") -> PriceListPublished:
    prices: list[ModelPrice] = [
        {"model": "sim-small", "input_per_mtok": Decimal("0.15"), "output_per_mtok": Decimal("0.60")},
        {"model": "sim-large", "input_per_mtok": Decimal("2.5"), "output_per_mtok": Decimal("10.000000000001")},
    ]
    return PriceListPublished(
        envelope=envelope("PriceListPublished", tenant),
        version="v2",
        previous_version="v1",
        effective_from=_MONTH,
        currency="USD",
        prices=prices,
        author="price-sync",
    )


def budget_set(tenant: str = "acme") -> BudgetSet:
    return BudgetSet(
        envelope=envelope("BudgetSet", tenant),
        budget_id="b-acme-month",
        scope="tenant",
        scope_id=tenant,
        period="month",
        limit_amount=Decimal("250.00"),
        currency="USD",
        enforced=True,
        alert_thresholds_pct=[50, 80, 100],
        set_by="alice",
    )


def budget_reserved(tenant: str = "acme") -> BudgetReserved:
    rid = str(uuid7())
    return BudgetReserved(
        envelope=envelope("BudgetReserved", tenant, rid),
        budget_id="b-k1-day",
        scope="api_key",
        scope_id="k1",
        period="day",
        period_start=_AT.replace(hour=0, minute=0, second=0, microsecond=0),
        reservation_id=f"res-{rid}",
        request_id=rid,
        amount=Decimal("0.012"),
        currency="USD",
        expires_at=_AT + timedelta(minutes=5),
    )


def budget_settled(tenant: str = "acme") -> BudgetSettled:
    rid = str(uuid7())
    return BudgetSettled(
        envelope=envelope("BudgetSettled", tenant, rid),
        budget_id="b-acme-month",
        scope="tenant",
        scope_id=tenant,
        period="month",
        period_start=_MONTH,
        reservation_id=f"res-{rid}",
        request_id=rid,
        reserved_amount=Decimal("0.012"),
        actual_amount=Decimal("0.000123450000"),
        currency="USD",
        limit_amount=Decimal("250"),
        enforced=True,
    )


def budget_released(tenant: str = "acme") -> BudgetReleased:
    rid = str(uuid7())
    return BudgetReleased(
        envelope=envelope("BudgetReleased", tenant, rid),
        budget_id="b-acme-month",
        scope="tenant",
        scope_id=tenant,
        period="month",
        period_start=_MONTH,
        reservation_id=f"res-{rid}",
        request_id=rid,
        amount=Decimal("0.012"),
        currency="USD",
        reason="failed",
    )


def budget_threshold(tenant: str = "acme") -> BudgetThresholdCrossed:
    return BudgetThresholdCrossed(
        envelope=envelope("BudgetThresholdCrossed", tenant),
        budget_id="b-acme-month",
        scope="tenant",
        scope_id=tenant,
        period="month",
        period_start=_MONTH,
        threshold_pct=80,
        limit_amount=Decimal("250"),
        spent_amount=Decimal("199.990000000001"),
        reserved_amount=Decimal("0.012"),
        currency="USD",
        reservation_id="res-1",
    )


def savings_snapshot(tenant: str = "acme") -> SavingsSnapshotted:
    return SavingsSnapshotted(
        envelope=envelope("SavingsSnapshotted", tenant),
        day_start=_MONTH,
        model="sim-small",
        requests=3,
        prompt_tokens=30,
        completion_tokens=60,
        cost=Decimal("0.000370350000"),
        baseline_cost=Decimal("0.003703500000"),
        savings=Decimal("0.003333150000"),
        currency="USD",
        source_partition=2,
        source_offset=41,
    )


def cost_anomaly(tenant: str = "acme") -> CostAnomalyDetected:
    return CostAnomalyDetected(
        envelope=envelope("CostAnomalyDetected", tenant),
        hour_start=_MONTH,
        spend=Decimal("12.345678901234"),
        expected=Decimal("0.5"),
        currency="USD",
        score=0.9999,
        threshold=0.999,
        detector="river.anomaly.GaussianScorer(window_size=168, grace_period=24)",
        source_partition=1,
        source_offset=99,
    )


def spend_forecast(tenant: str = "acme") -> SpendForecasted:
    return SpendForecasted(
        envelope=envelope("SpendForecasted", tenant),
        budget_id="acme:tenant:month:hard",
        scope="tenant",
        scope_id=tenant,
        period="2026-11",
        period_start=_MONTH,
        period_end=datetime(2026, 12, 1, tzinfo=UTC),
        month_to_date=Decimal("120.000000000001"),
        forecast=Decimal("260.5"),
        method="river.time_series.HoltWinters(alpha=0.3, beta=0.1)",
        days_of_history=12,
        currency="USD",
        source_partition=1,
        source_offset=77,
        limit=Decimal("250"),
        enforced=True,
        projected_variance=Decimal("10.5"),
    )


def budget_variance_alert(tenant: str = "acme") -> BudgetVarianceAlerted:
    return BudgetVarianceAlerted(
        envelope=envelope("BudgetVarianceAlerted", tenant),
        budget_id="acme:tenant:month:hard",
        scope="tenant",
        scope_id=tenant,
        period="2026-11",
        period_start=_MONTH,
        period_end=datetime(2026, 12, 1, tzinfo=UTC),
        month_to_date=Decimal("120.000000000001"),
        forecast=Decimal("260.5"),
        method="run_rate",
        currency="USD",
        source_partition=1,
        source_offset=77,
        limit=Decimal("250"),
        enforced=False,
        projected_variance=Decimal("10.5"),
    )


def ledger_entry(tenant: str = "acme") -> LedgerEntryChained:
    audit_id = str(uuid7())
    return LedgerEntryChained(
        envelope=envelope("LedgerEntryChained", tenant),
        chain_tenant=tenant,
        seq=0,
        entry_hash=_sha("entry 0"),
        prev_hash="0" * 64,
        audit_event_id=audit_id,
        audit_sha256=_sha(audit_id),
        source_partition=5,
        source_offset=0,
    )


def checkpoint(tenant: str = "acme") -> LedgerCheckpointSigned:
    root = _sha("root")
    note = f"ledgerflow.example/{tenant}\n1\n{root}\n\n— ledgerflow.example/{tenant} AAAA+sig==\n"
    return LedgerCheckpointSigned(
        envelope=envelope("LedgerCheckpointSigned", tenant),
        chain_tenant=tenant,
        origin=f"ledgerflow.example/{tenant}",
        tree_size=1,
        root_hash=root,
        algorithm="ed25519",
        key_id="a1b2c3d4",
        signature="AAAA+sig==",
        signed_note=note,
    )


def dp_grant(tenant: str = "acme") -> DpBudgetGranted:
    return DpBudgetGranted(
        envelope=envelope("DpBudgetGranted", tenant),
        metric_set="usage_by_model",
        epsilon=1.0,
        delta=1e-6,
        composition="basic",
        period="month",
        granted_by="alice",
    )


def dp_charge(tenant: str = "acme") -> DpQueryCharged:
    query = "SELECT model, count() FROM usage GROUP BY model"
    return DpQueryCharged(
        envelope=envelope("DpQueryCharged", tenant),
        query_id=str(uuid7()),
        metric_set="usage_by_model",
        epsilon=0.1,
        delta=0.0,
        query_sha256=_sha(query),
        requested_by="analyst-1",
        epsilon_remaining=0.9,
        delta_remaining=1e-6,
    )


def dp_request(tenant: str = "acme") -> DpQueryRequested:
    query = json.dumps({"kind": "requests_per_model_per_day", "epsilon": "0.1"}, sort_keys=True)
    return DpQueryRequested(
        envelope=envelope("DpQueryRequested", tenant),
        query_id=str(uuid7()),
        metric_set="usage",
        composition="zcdp",
        epsilon=0.0,
        delta=0.0,
        query_sha256=_sha(query),
        query=query,
        requested_by="key-analyst-1",
        rho=0.005,
    )


def dp_refusal(tenant: str = "acme") -> DpQueryRefused:
    return DpQueryRefused(
        envelope=envelope("DpQueryRefused", tenant),
        query_id=str(uuid7()),
        metric_set="usage",
        reason="repeat",
        detail="the same query was charged as q-1; its release is the answer",
        epsilon=0.1,
        delta=0.0,
        query_sha256=_sha("q"),
        requested_by="key-analyst-1",
        epsilon_remaining=0.05,
        delta_remaining=0.0,
        rho=0.005,
        rho_remaining=0.001,
        repeat_of="q-1",
    )


def dp_release(tenant: str = "acme") -> DpReleasePublished:
    return DpReleasePublished(
        envelope=envelope("DpReleasePublished", tenant),
        query_id=str(uuid7()),
        metric_set="usage_by_model",
        window_start=_MONTH,
        window_end=_MONTH + timedelta(days=31),
        mechanism="laplace",
        result=json.dumps({"columns": ["model", "count"], "rows": [["sim-small", 1041.7]]}),
    )


def priors(tenant: str = "acme") -> RoutingPriorsPublished:
    body = json.dumps({"/v1/ask:short": {"sim-small": {"alpha": 12.0, "beta": 3.0}}}, sort_keys=True)
    return RoutingPriorsPublished(
        envelope=envelope("RoutingPriorsPublished", tenant),
        version="pr8",
        previous_version="pr7",
        algorithm="beta-bernoulli",
        context_count=1,
        feedback_count=15,
        trained_until=_AT,
        priors=body,
        priors_sha256=_sha(body),
    )


def regret(tenant: str = "acme") -> RoutingRegretRecorded:
    return RoutingRegretRecorded(
        envelope=envelope("RoutingRegretRecorded", tenant),
        priors_version="pr8",
        routed=40,
        explored=3,
        regret=0.12,
        cumulative_routed=900,
        cumulative_regret=2.5,
    )


def feedback(tenant: str = "acme") -> FeedbackReceived:
    rid = str(uuid7())
    return FeedbackReceived(
        envelope=envelope("FeedbackReceived", tenant, rid),
        request_id=rid,
        api_key_id="k1",
        score=0.8,
        label="good",
    )


def memory_written(tenant: str = "acme") -> MemoryWritten:
    rid = str(uuid7())
    return MemoryWritten(
        envelope=envelope("MemoryWritten", tenant, rid),
        session_id="s-42",
        turn_index=3,
        role="assistant",
        content_sha256=_sha("hello"),
        chars=5,
        request_id=rid,
    )


def memory_erased(tenant: str = "acme") -> MemoryErased:
    return MemoryErased(
        envelope=envelope("MemoryErased", tenant),
        session_id="s-42",
        reason="subject_erasure",
        turns_erased=4,
        erased_by="agent:memory",
    )


def key_issued(tenant: str = "acme") -> ApiKeyIssued:
    return ApiKeyIssued(
        envelope=envelope("ApiKeyIssued", tenant),
        key_id="k2",
        key_sha256=_sha("lf_secret_not_recorded"),
        roles=["ask", "feedback"],
        label="ci bot",
        expires_at=_AT + timedelta(days=90),
        issued_by="cli",
    )


def key_revoked(tenant: str = "acme") -> ApiKeyRevoked:
    return ApiKeyRevoked(envelope=envelope("ApiKeyRevoked", tenant), key_id="k2", reason="rotated", revoked_by="cli")


def erasure_request(tenant: str = "acme") -> SubjectErasureRequested:
    return SubjectErasureRequested(
        envelope=envelope("SubjectErasureRequested", tenant),
        subject_sha256=_sha("user@example.com"),
        scope="all",
        requested_by="dpo",
        due_by=_AT + timedelta(days=30),
    )


def ledger_verified(tenant: str = "acme") -> LedgerVerified:
    return LedgerVerified(
        envelope=envelope("LedgerVerified", tenant),
        chain_tenant=tenant,
        scope="all",
        source="log",
        ok=False,
        entries_checked=30,
        checkpoints_checked=1,
        root_hash=_sha("root"),
        duration_ms=120,
        key_fingerprint=_sha("key"),
        key_id="0a1b2c3d",
        verifier="python",
        first_bad_seq=30,
        reason="gap: seq 30 missing (next found is 31)",
    )


def consumer_lag(tenant: str = "_platform") -> ConsumerLagSampled:
    return ConsumerLagSampled(
        envelope=envelope("ConsumerLagSampled", tenant),
        group_id="ledgerflow-sink",
        topic="ledgerflow.token-charges",
        partition=7,
        owner="projections-sink:ledgerflow-sink-0a1b2c3d",
        committed=1200,
        end_offset=1242,
        lag=21,
    )


def request_completed(tenant: str = "acme") -> RequestCompleted:  # issue 11 (SLOs)
    rid = str(uuid7())
    return RequestCompleted(
        envelope=envelope("RequestCompleted", tenant, rid),
        request_id=rid,
        route="/v1/ask",
        method="POST",
        status=503,
        latency_ms=1834,
        streamed=False,
        error_kind="event_log_unavailable",
    )


def slo_alert(tenant: str = "acme") -> SloBurnRateAlerted:
    return SloBurnRateAlerted(
        envelope=envelope("SloBurnRateAlerted", tenant),
        slo="availability",
        objective=0.999,
        severity="page",
        state="fired",
        long_window_s=3600,
        short_window_s=300,
        long_burn_rate=19.607843,
        short_burn_rate=19.607843,
        threshold=14.4,
        long_requests=102,
        long_bad=2,
        short_requests=102,
        short_bad=2,
        evaluated_at=datetime.now(UTC).replace(second=0, microsecond=0),
        source_partition=1,
        source_offset=101,
    )


BUILDERS: dict[str, Callable[[], Event]] = {
    "RequestReceived": request,
    "PolicyDecided": decision,
    "TokensCharged": charge,
    "AuditRecorded": audit,
    "TenantTotalsUpdated": totals,
    "RequestRedacted": redaction,
    "PolicyPublished": policy_published,
    "RouteChosen": route,
    "AdapterCalled": adapter_called,
    "AdapterFailed": adapter_failed,
    "PriceListPublished": price_list,
    "BudgetSet": budget_set,
    "BudgetReserved": budget_reserved,
    "BudgetSettled": budget_settled,
    "BudgetReleased": budget_released,
    "BudgetThresholdCrossed": budget_threshold,
    "SavingsSnapshotted": savings_snapshot,
    "CostAnomalyDetected": cost_anomaly,
    "SpendForecasted": spend_forecast,
    "BudgetVarianceAlerted": budget_variance_alert,
    "LedgerEntryChained": ledger_entry,
    "LedgerCheckpointSigned": checkpoint,
    "LedgerVerified": ledger_verified,
    "DpBudgetGranted": dp_grant,
    "DpQueryCharged": dp_charge,
    "DpQueryRequested": dp_request,
    "DpQueryRefused": dp_refusal,
    "DpReleasePublished": dp_release,
    "RoutingPriorsPublished": priors,
    "RoutingRegretRecorded": regret,
    "FeedbackReceived": feedback,
    "MemoryWritten": memory_written,
    "MemoryErased": memory_erased,
    "ApiKeyIssued": key_issued,
    "ApiKeyRevoked": key_revoked,
    "SubjectErasureRequested": erasure_request,
    "PolicyAttributesSet": policy_attributes,
    "PolicyShadowDiverged": shadow_diverged,
    "ConsumerLagSampled": consumer_lag,
    "RequestCompleted": request_completed,
    "SloBurnRateAlerted": slo_alert,
}
"""Event type → a builder of a valid event of that type (every type has one; a test checks)."""
