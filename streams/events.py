"""Python shapes of the events in `schemas/avro/`: one frozen dataclass per record.

Field names mirror the .avsc files exactly (a test holds them together), so the codec can
move between dicts and dataclasses without a mapping table; fields with a default come last
because Python requires it, so the order may differ from the .avsc.

Nested Avro records (RouteChosen.candidates, PriceListPublished.prices) are TypedDicts, not
dataclasses: fastavro reads them as dicts and writes dicts, so the codec needs no per-type
conversion and a decoded event compares equal to the one encoded.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from datetime import datetime
from decimal import Decimal
from typing import Any, ClassVar, TypedDict

PLATFORM_TENANT = "_platform"  # the envelope tenant of platform-wide facts (prices, policies, shared entities)


@dataclass(frozen=True, slots=True)
class Envelope:
    event_id: str
    event_type: str
    schema_version: int
    tenant: str
    occurred_at: datetime
    correlation_id: str
    producer: str
    trace_parent: str | None = None
    causation_id: str | None = None

    def caused_by(self, event_type: str, producer: str, *id_parts: str) -> Envelope:
        """The envelope of an event this one caused: id derived from this id (a replay derives
        the same one), same tenant, time, correlation and trace; this event as its cause."""
        from streams.ids import derived_uuid7

        return Envelope(
            event_id=str(derived_uuid7(self.event_id, event_type, *id_parts)),
            event_type=event_type,
            schema_version=1,
            tenant=self.tenant,
            occurred_at=self.occurred_at,
            correlation_id=self.correlation_id,
            causation_id=self.event_id,
            trace_parent=self.trace_parent,
            producer=producer,
        )


@dataclass(frozen=True, slots=True)
class Event:
    """Base of every event; `envelope` is always the first field."""

    envelope: Envelope
    SCHEMA_VERSION: ClassVar[int] = 1

    @property
    def event_type(self) -> str:
        return type(self).__name__

    @property
    def tenant(self) -> str:
        return self.envelope.tenant

    def to_record(self) -> dict[str, Any]:
        """Plain dict in Avro field layout (the envelope as a nested dict)."""
        record: dict[str, Any] = {name: getattr(self, name) for name in _field_names(type(self))}
        env = self.envelope
        record["envelope"] = {name: getattr(env, name) for name in _field_names(Envelope)}
        return record


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    """`dataclasses.fields()` walks the class each call; encoding is hot (gateway, ledger), so cache the names."""
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in fields(cls))
    return names


@dataclass(frozen=True, slots=True)
class RequestReceived(Event):
    request_id: str
    route: str
    api_key_id: str
    message_count: int
    prompt_chars: int
    prompt_sha256: str
    model_hint: str | None = None


@dataclass(frozen=True, slots=True)
class PolicyDecided(Event):
    request_id: str
    decision: str
    policy_version: str
    determining_policies: list[str]
    input_sha256: str
    obligations: list[str] = field(default_factory=list)
    denied_tool: str | None = None


@dataclass(frozen=True, slots=True)
class TokensCharged(Event):
    request_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    input_price_per_mtok: Decimal
    output_price_per_mtok: Decimal
    price_list_version: str
    currency: str
    cost: Decimal
    baseline_model: str | None = None
    baseline_cost: Decimal | None = None
    savings: Decimal | None = None


@dataclass(frozen=True, slots=True)
class AuditRecorded(Event):
    action: str
    actor: str
    subject: str
    outcome: str
    details: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TenantTotalsUpdated(Event):
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal
    currency: str
    source_partition: int
    source_offset: int


class RouteCandidate(TypedDict):
    """One model the router considered (Avro record `ledgerflow.events.RouteCandidate`)."""

    model: str
    score: float
    allowed: bool
    excluded_by: str | None


class ModelPrice(TypedDict):
    """Unit prices of one model (Avro record `ledgerflow.events.ModelPrice`)."""

    model: str
    input_per_mtok: Decimal
    output_per_mtok: Decimal


@dataclass(frozen=True, slots=True)
class RequestRedacted(Event):
    request_id: str
    redacted_chars: int
    action: str
    ruleset_version: str
    counts_by_kind: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PolicyPublished(Event):
    version: str
    content_sha256: str
    author: str
    policy_count: int
    policy_ids: list[str]
    previous_version: str | None = None
    change_note: str | None = None
    bundle: str = ""


@dataclass(frozen=True, slots=True)
class PolicyAttributesSet(Event):
    entity_type: str
    entity_id: str
    attributes_json: str
    set_by: str
    deleted: bool = False

    @property
    def entity_key(self) -> str:
        """Compaction key: one live record per entity."""
        return f"{self.entity_type}::{self.entity_id}"


@dataclass(frozen=True, slots=True)
class PolicyShadowDiverged(Event):
    request_id: str
    active_version: str
    candidate_version: str
    active_decision: str
    candidate_decision: str
    active_policies: list[str]
    candidate_policies: list[str]
    active_obligations: list[str]
    candidate_obligations: list[str]
    input_sha256: str


@dataclass(frozen=True, slots=True)
class RouteChosen(Event):
    request_id: str
    attempt: int
    strategy: str
    context_key: str
    priors_version: str
    candidates: list[RouteCandidate]
    chosen_model: str
    propensity: float
    features: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AdapterCalled(Event):
    request_id: str
    model: str
    adapter: str
    status: int
    retries: int
    latency_ms: int
    streamed: bool
    prompt_tokens: int
    completion_tokens: int
    first_token_ms: int | None = None
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class AdapterFailed(Event):
    request_id: str
    model: str
    adapter: str
    error_kind: str
    retries: int
    latency_ms: int
    will_fall_back: bool
    status: int | None = None


@dataclass(frozen=True, slots=True)
class PriceListPublished(Event):
    version: str
    effective_from: datetime
    currency: str
    prices: list[ModelPrice]
    author: str
    previous_version: str | None = None

    @property
    def price_key(self) -> str:
        """Compaction key: the models priced and the version, so every version of a model's price is kept
        (charges cite versions, and a price published ahead of its effective_from must not erase the one
        in force)."""
        return ",".join(sorted(p["model"] for p in self.prices)) + "@" + self.version


@dataclass(frozen=True, slots=True)
class BudgetSet(Event):
    budget_id: str
    scope: str
    scope_id: str
    period: str
    limit_amount: Decimal
    currency: str
    enforced: bool
    set_by: str
    alert_thresholds_pct: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class BudgetReserved(Event):
    budget_id: str
    scope: str
    scope_id: str
    period: str
    period_start: datetime
    reservation_id: str
    request_id: str
    amount: Decimal
    currency: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class BudgetSettled(Event):
    budget_id: str
    scope: str
    scope_id: str
    period: str
    period_start: datetime
    reservation_id: str
    request_id: str
    reserved_amount: Decimal
    actual_amount: Decimal
    currency: str
    limit_amount: Decimal | None = None
    enforced: bool | None = None


@dataclass(frozen=True, slots=True)
class BudgetReleased(Event):
    budget_id: str
    scope: str
    scope_id: str
    period: str
    period_start: datetime
    reservation_id: str
    request_id: str
    amount: Decimal
    currency: str
    reason: str


@dataclass(frozen=True, slots=True)
class BudgetThresholdCrossed(Event):
    budget_id: str
    scope: str
    scope_id: str
    period: str
    period_start: datetime
    threshold_pct: int
    limit_amount: Decimal
    spent_amount: Decimal
    reserved_amount: Decimal
    currency: str
    reservation_id: str | None = None


@dataclass(frozen=True, slots=True)
class SavingsSnapshotted(Event):
    day_start: datetime
    model: str
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost: Decimal
    baseline_cost: Decimal
    savings: Decimal
    currency: str
    source_partition: int
    source_offset: int


@dataclass(frozen=True, slots=True)
class CostAnomalyDetected(Event):
    hour_start: datetime
    spend: Decimal
    expected: Decimal
    currency: str
    score: float
    threshold: float
    detector: str
    source_partition: int
    source_offset: int


@dataclass(frozen=True, slots=True)
class SpendForecasted(Event):
    budget_id: str
    scope: str
    scope_id: str
    period: str
    period_start: datetime
    period_end: datetime
    month_to_date: Decimal
    forecast: Decimal
    method: str
    days_of_history: int
    currency: str
    source_partition: int
    source_offset: int
    limit: Decimal | None = None
    enforced: bool | None = None
    projected_variance: Decimal | None = None


@dataclass(frozen=True, slots=True)
class BudgetVarianceAlerted(Event):
    budget_id: str
    scope: str
    scope_id: str
    period: str
    period_start: datetime
    period_end: datetime
    month_to_date: Decimal
    forecast: Decimal
    method: str
    currency: str
    source_partition: int
    source_offset: int
    limit: Decimal | None = None
    enforced: bool | None = None
    projected_variance: Decimal | None = None


@dataclass(frozen=True, slots=True)
class LedgerEntryChained(Event):
    chain_tenant: str
    seq: int
    entry_hash: str
    prev_hash: str
    audit_event_id: str
    audit_sha256: str
    source_partition: int
    source_offset: int


@dataclass(frozen=True, slots=True)
class LedgerVerified(Event):
    chain_tenant: str
    scope: str
    source: str
    ok: bool
    entries_checked: int
    checkpoints_checked: int
    root_hash: str
    duration_ms: int
    key_fingerprint: str
    key_id: str
    verifier: str
    first_bad_seq: int | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class LedgerCheckpointSigned(Event):
    chain_tenant: str
    origin: str
    tree_size: int
    root_hash: str
    algorithm: str
    key_id: str
    signature: str
    signed_note: str


class _DpBudgetKeyed:
    """DP budget events are keyed by tenant/metric_set: one budget's events stay in one partition,
    so its single owner (the DP budget agent) decides them one at a time, in log order."""

    __slots__ = ()
    tenant: str
    metric_set: str

    @property
    def budget_key(self) -> str:
        return f"{self.tenant}/{self.metric_set}"


@dataclass(frozen=True, slots=True)
class DpBudgetGranted(_DpBudgetKeyed, Event):
    metric_set: str
    epsilon: float
    delta: float
    composition: str
    period: str
    granted_by: str


@dataclass(frozen=True, slots=True)
class DpQueryRequested(_DpBudgetKeyed, Event):
    query_id: str
    metric_set: str
    composition: str
    epsilon: float
    delta: float
    query_sha256: str
    query: str
    requested_by: str
    rho: float | None = None


@dataclass(frozen=True, slots=True)
class DpQueryRefused(_DpBudgetKeyed, Event):
    query_id: str
    metric_set: str
    reason: str
    detail: str
    epsilon: float
    delta: float
    query_sha256: str
    requested_by: str
    epsilon_remaining: float
    delta_remaining: float
    rho: float | None = None
    rho_remaining: float | None = None
    repeat_of: str | None = None


@dataclass(frozen=True, slots=True)
class DpQueryCharged(_DpBudgetKeyed, Event):
    query_id: str
    metric_set: str
    epsilon: float
    delta: float
    query_sha256: str
    requested_by: str
    epsilon_remaining: float
    delta_remaining: float
    rho: float | None = None
    rho_remaining: float | None = None


@dataclass(frozen=True, slots=True)
class DpReleasePublished(_DpBudgetKeyed, Event):
    query_id: str
    metric_set: str
    window_start: datetime
    window_end: datetime
    mechanism: str
    result: str


@dataclass(frozen=True, slots=True)
class RoutingPriorsPublished(Event):
    version: str
    algorithm: str
    context_count: int
    feedback_count: int
    trained_until: datetime
    priors: str
    priors_sha256: str
    previous_version: str | None = None


@dataclass(frozen=True, slots=True)
class RoutingRegretRecorded(Event):
    priors_version: str
    routed: int
    explored: int
    regret: float
    cumulative_routed: int
    cumulative_regret: float


@dataclass(frozen=True, slots=True)
class FeedbackReceived(Event):
    request_id: str
    api_key_id: str
    score: float
    label: str | None = None


@dataclass(frozen=True, slots=True)
class MemoryWritten(Event):
    session_id: str
    turn_index: int
    role: str
    content_sha256: str
    chars: int
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class MemoryErased(Event):
    session_id: str
    reason: str
    turns_erased: int
    erased_by: str


@dataclass(frozen=True, slots=True)
class ApiKeyIssued(Event):
    key_id: str
    key_sha256: str
    roles: list[str]
    issued_by: str
    label: str | None = None
    expires_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class ApiKeyRevoked(Event):
    key_id: str
    reason: str
    revoked_by: str


@dataclass(frozen=True, slots=True)
class SubjectErasureRequested(Event):
    subject_sha256: str
    scope: str
    requested_by: str
    due_by: datetime


@dataclass(frozen=True, slots=True)
class RequestCompleted(Event):
    request_id: str
    route: str
    method: str
    status: int
    latency_ms: int
    streamed: bool
    error_kind: str | None = None


@dataclass(frozen=True, slots=True)
class SloBurnRateAlerted(Event):
    slo: str
    objective: float
    severity: str
    state: str
    long_window_s: int
    short_window_s: int
    long_burn_rate: float
    short_burn_rate: float
    threshold: float
    long_requests: int
    long_bad: int
    short_requests: int
    short_bad: int
    evaluated_at: datetime
    source_partition: int
    source_offset: int


@dataclass(frozen=True, slots=True)
class ConsumerLagSampled(Event):
    group_id: str
    topic: str
    partition: int
    owner: str
    committed: int
    end_offset: int
    lag: int


EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls
    for cls in (
        RequestReceived,
        PolicyDecided,
        TokensCharged,
        AuditRecorded,
        TenantTotalsUpdated,
        RequestRedacted,
        PolicyPublished,
        RouteChosen,
        AdapterCalled,
        AdapterFailed,
        PriceListPublished,
        BudgetSet,
        BudgetReserved,
        BudgetSettled,
        BudgetReleased,
        BudgetThresholdCrossed,
        SavingsSnapshotted,
        CostAnomalyDetected,
        SpendForecasted,
        BudgetVarianceAlerted,
        LedgerEntryChained,
        LedgerCheckpointSigned,
        LedgerVerified,
        DpBudgetGranted,
        DpQueryRequested,
        DpQueryCharged,
        DpQueryRefused,
        DpReleasePublished,
        RoutingPriorsPublished,
        RoutingRegretRecorded,
        FeedbackReceived,
        MemoryWritten,
        MemoryErased,
        ApiKeyIssued,
        ApiKeyRevoked,
        SubjectErasureRequested,
        PolicyAttributesSet,
        PolicyShadowDiverged,
        ConsumerLagSampled,
        RequestCompleted,
        SloBurnRateAlerted,
    )
}
