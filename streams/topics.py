"""The topic catalogue, declared once: which events live where, partitions, retention.

Facts are kept forever (retention -1, delete policy, never compacted) because the log is the
source of truth that projections and the ledger are rebuilt from. Fact topics are keyed by
tenant so one tenant's facts stay ordered in one partition and per-tenant folds are local.
State topics (what every gateway replica folds into memory at start, e.g. API keys) are
compacted, keyed by the entity's id, and have one partition so one reader sees them in order.
Names carry a prefix so tests (and several deployments) can share one broker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streams.events import Event

DEFAULT_PARTITIONS = 12
DLQ_SUFFIX = ".dlq"


@dataclass(frozen=True)
class TopicSpec:
    key: str  # short name; full name is prefix + key
    events: tuple[str, ...]  # event types recorded on this topic
    derived: bool = False  # written by an agent rather than the gateway
    compacted: bool = False
    retention_ms: int = -1  # -1 = forever
    partitions: int | None = None  # None = the deployment's default
    keyed_by: str = "tenant"

    def configs(self) -> dict[str, str]:
        return {
            "cleanup.policy": "compact" if self.compacted else "delete",
            "retention.ms": str(self.retention_ms),
            "min.insync.replicas": "1",
        }


CATALOGUE: tuple[TopicSpec, ...] = (
    TopicSpec("requests", ("RequestReceived", "RequestRedacted")),
    TopicSpec("policy-decisions", ("PolicyDecided",)),
    TopicSpec("token-charges", ("TokensCharged",)),
    TopicSpec("audit", ("AuditRecorded",)),
    TopicSpec("tenant-totals", ("TenantTotalsUpdated",), derived=True),
    TopicSpec("feedback", ("FeedbackReceived",)),
    TopicSpec("api-keys", ("ApiKeyIssued", "ApiKeyRevoked"), compacted=True, partitions=1, keyed_by="key_id"),
    # Every bundle version is kept (the key is the version); the active one is the last record.
    TopicSpec("policy-bundles", ("PolicyPublished",), compacted=True, partitions=1, keyed_by="version"),
    TopicSpec("policy-attributes", ("PolicyAttributesSet",), compacted=True, partitions=1, keyed_by="entity_key"),
    TopicSpec("policy-shadow", ("PolicyShadowDiverged",)),
    TopicSpec("ledger", ("LedgerEntryChained",), derived=True),
    TopicSpec("ledger-checkpoints", ("LedgerCheckpointSigned",), derived=True),
    # `ledgerflow audit verify` results (issue 6): what the portal shows as the last verification
    TopicSpec("ledger-verifications", ("LedgerVerified",), derived=True),
    # issue 7 (accounting). Every price version is kept (key: models@version): charges cite versions.
    TopicSpec("price-lists", ("PriceListPublished",), compacted=True, partitions=1, keyed_by="price_key"),
    TopicSpec("budgets", ("BudgetSet",), compacted=True, partitions=1, keyed_by="budget_id"),
    TopicSpec("budget-holds", ("BudgetReserved", "BudgetSettled", "BudgetReleased", "BudgetThresholdCrossed")),
    TopicSpec("savings-snapshots", ("SavingsSnapshotted",), derived=True),
    TopicSpec("cost-anomalies", ("CostAnomalyDetected",), derived=True),
    TopicSpec("spend-forecasts", ("SpendForecasted", "BudgetVarianceAlerted"), derived=True),
    # Sizes and hashes of memory turns, and erasures: facts (the content lives on `memory()`).
    TopicSpec("memory-facts", ("MemoryWritten", "MemoryErased")),
    # issue 9 (routing). The priors topic keeps the newest priors per algorithm (what a gateway
    # loads at start); every version stays reconstructible by replaying the facts it was learned from.
    TopicSpec("routes", ("RouteChosen",)),
    # What each model call did (latency, retries, tokens) or how it failed: the router's latency term.
    TopicSpec("adapter-outcomes", ("AdapterCalled", "AdapterFailed")),
    TopicSpec(
        "routing-priors", ("RoutingPriorsPublished",), derived=True, compacted=True, partitions=1, keyed_by="algorithm"
    ),
    TopicSpec("routing-regret", ("RoutingRegretRecorded",), derived=True),
    # issue 8 (differential privacy): keyed tenant/metric_set, so one budget's grants and query
    # requests are in one partition, decided one at a time by its one owner (agents/dp_budget.py),
    # which writes each decision to the same partition number of dp-decisions.
    TopicSpec("dp-budget-log", ("DpBudgetGranted", "DpQueryRequested"), keyed_by="budget_key"),
    TopicSpec("dp-decisions", ("DpQueryCharged", "DpQueryRefused"), derived=True, keyed_by="budget_key"),
    TopicSpec("dp-releases", ("DpReleasePublished",), keyed_by="budget_key"),
    # issue 11 (SLOs): how every answered request ended, and the burn-rate alerts folded from it
    # per tenant by the slo-burn agent (co-partitioned: its table's changelog follows this topic).
    TopicSpec("request-completions", ("RequestCompleted",)),
    TopicSpec("slo-alerts", ("SloBurnRateAlerted",), derived=True),
    # issue 11 (metrics): consumer-group lag sampled by the projections service, keyed by group;
    # kept like every fact, so consumer_lag is rebuilt by replay like every table
    TopicSpec("consumer-lag", ("ConsumerLagSampled",), derived=True, keyed_by="group_id"),
)

# The memory state topic holds turn content sealed with per-session data keys, and the keys:
# compacted (tombstones erase), one partition (one follower sees a session's key before use and
# a read-your-writes barrier is one offset). Small segments and a low dirty ratio make the
# cleaner drop tombstoned records soon; the content is unreadable at once anyway (key gone).
MEMORY_CONFIGS = {
    "cleanup.policy": "compact",
    "retention.ms": "-1",
    "segment.ms": "600000",
    "min.cleanable.dirty.ratio": "0.1",
    "delete.retention.ms": "60000",
    "min.insync.replicas": "1",
}


class Topics:
    """Full topic names for one deployment prefix."""

    def __init__(self, prefix: str = "ledgerflow.", partitions: int = DEFAULT_PARTITIONS) -> None:
        self.prefix = prefix
        self.partitions = partitions
        self._by_event = {e: spec for spec in CATALOGUE for e in spec.events}

    def name(self, key: str) -> str:
        return self.prefix + key

    def for_event(self, event_type: str) -> str:
        return self.name(self._by_event[event_type].key)

    def key_for(self, event: Event) -> bytes:
        """The record key: the tenant for facts, the entity's id on a compacted state topic.

        A compacted topic keeps one record per key, so keying api keys by tenant would keep
        only a tenant's newest key; each state topic names its key attribute in the catalogue.
        """
        spec = self._by_event[event.event_type]
        return str(getattr(event, spec.keyed_by)).encode()

    def spec_for(self, full_name: str) -> TopicSpec | None:
        key = full_name.removeprefix(self.prefix)
        return next((s for s in CATALOGUE if s.key == key), None)

    def all(self) -> list[str]:
        return [self.name(s.key) for s in CATALOGUE]

    def partitions_of(self, full_name: str) -> int:
        spec = self.spec_for(full_name)
        return spec.partitions if spec is not None and spec.partitions else self.partitions

    def facts(self) -> list[str]:
        return [self.name(s.key) for s in CATALOGUE if not s.derived]

    @staticmethod
    def dlq(full_name: str) -> str:
        return full_name + DLQ_SUFFIX

    def redrives(self) -> str:
        """Compacted topic recording which dead-lettered source records were re-driven."""
        return self.prefix + "dlq-redrives"

    def ledger_heads(self) -> str:
        """Compacted state topic of the ledger worker's chain-head snapshots (JSON, keyed by tenant;
        written in the worker's transactions with the entries; see agents/ledger.py)."""
        return self.prefix + "ledger-heads"

    def memory(self) -> str:
        """Compacted state topic of sealed memory turns and session keys (raw records, not Avro facts)."""
        return self.prefix + "memory"

    def with_dlqs(self) -> list[str]:
        return self.all() + [self.dlq(t) for t in self.all()]
