"""The priors agent's fold, pure: routing decisions and their outcomes in, priors and regret out.

Inputs (facts on their topics, any interleaving):
- `RouteChosen`: the chosen model, the request's features and the candidates' scores;
- `FeedbackReceived`: the quality (score in [0, 1]) of a request's answer;
- `TokensCharged`: the model's answer length and cost (per-model means for the cost estimate);
- `AdapterCalled`: the model's latency as the gateway measured it, retries included (per-model
  mean for the latency term); `AdapterFailed`, on the same topic, is not folded (yet).

Quality needs a join (the features live on RouteChosen, the score on FeedbackReceived), by
(tenant, request id) so one tenant's feedback can never teach from another's request; either
may arrive first. Joins wait in a bounded buffer (oldest dropped first), which is the one
thing a restart forgets: the priors and offsets are published together, the buffer is not.

Outputs (`publish`): a `RoutingPriorsPublished` with the whole state as canonical JSON and a
version derived from its hash, and per tenant one `RoutingRegretRecorded` with the regret of
the decisions since the previous publication. Ids and times derive from the folded events
(the newest event's time, the version), never from the wall clock, so a replay of the same
facts publishes identical events.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from domain.routing import ALGORITHM, Priors
from domain.routing_features import FeatureConfig
from streams.events import (
    AdapterCalled,
    Envelope,
    Event,
    FeedbackReceived,
    RouteChosen,
    RoutingPriorsPublished,
    RoutingRegretRecorded,
    TokensCharged,
)
from streams.ids import derived_uuid7

PRODUCER = "routing-priors"
PLATFORM_TENANT = "_platform"  # priors are learned across tenants: a platform fact
MAX_PENDING = 200_000


@dataclass
class _Pending:
    model: str | None = None
    features: dict[str, float] | None = None
    context_key: str = ""
    scores: list[float] = field(default_factory=list)  # feedback waiting for its route


@dataclass
class _Regret:
    routed: int = 0
    explored: int = 0
    regret: float = 0.0
    cumulative_routed: int = 0
    cumulative_regret: float = 0.0


@dataclass
class LearnerState:
    priors: Priors = field(default_factory=Priors)
    pending: OrderedDict[tuple[str, str], _Pending] = field(default_factory=OrderedDict)
    regret: dict[str, _Regret] = field(default_factory=dict)
    trained_until: datetime | None = None
    unpublished: int = 0  # events folded since the last publication
    previous_version: str | None = None

    @staticmethod
    def resume(
        published: RoutingPriorsPublished | None,
        regrets: Iterable[RoutingRegretRecorded] = (),
        features: FeatureConfig | None = None,
    ) -> LearnerState:
        """The state after `published` (the newest priors on the topic) and the tenants' regret records.

        `features`: the feature set wanted now. Priors learned with another embedding (or with
        one when none is wanted now) are not resumed: their regressions read other features, so
        learning starts again under the new set; the hashed and dense features' own settings
        travel with the priors and are kept.
        """
        wanted = features or FeatureConfig()
        state = LearnerState(priors=Priors(config=wanted))
        if published is not None:
            old = Priors.from_json(published.priors, published.version)
            if (old.config.embedding, old.config.embedding_dims) == (wanted.embedding, wanted.embedding_dims):
                state.priors = old
            state.trained_until = published.trained_until
            state.previous_version = published.version
        for r in regrets:  # in log order: the newest per tenant wins
            state.regret[r.tenant] = _Regret(
                cumulative_routed=r.cumulative_routed, cumulative_regret=r.cumulative_regret
            )
        return state


def fold(state: LearnerState, event: Event) -> None:
    """Fold one fact into `state` (in place); facts of other types are ignored."""
    if isinstance(event, RouteChosen):
        _route(state, event)
    elif isinstance(event, FeedbackReceived):
        _feedback(state, event)
    elif isinstance(event, TokensCharged):
        state.priors.learn_completion(event.model, event.completion_tokens)
        state.priors.learn_cost(event.model, event.cost)
    elif isinstance(event, AdapterCalled):
        state.priors.learn_latency(event.model, float(event.latency_ms))
    else:
        return
    state.unpublished += 1
    at = event.envelope.occurred_at
    if state.trained_until is None or at > state.trained_until:
        state.trained_until = at


def _slot(state: LearnerState, tenant: str, request_id: str) -> _Pending:
    key = (tenant, request_id)
    slot = state.pending.get(key)
    if slot is None:
        slot = state.pending[key] = _Pending()
        while len(state.pending) > MAX_PENDING:
            state.pending.popitem(last=False)
    return slot


def _route(state: LearnerState, ev: RouteChosen) -> None:
    if ev.strategy == "bandit":
        allowed = [c["score"] for c in ev.candidates if c["allowed"]]
        chosen = next((c["score"] for c in ev.candidates if c["model"] == ev.chosen_model), None)
        if allowed and chosen is not None:
            r = state.regret.setdefault(ev.tenant, _Regret())
            gap = max(allowed) - chosen
            r.routed += 1
            r.explored += gap > 0
            r.regret += gap
    if not ev.features:
        return  # nothing to learn quality from (pinned)
    if not _same_feature_set(state.priors.config, ev.features):
        return  # computed by a replica on another embedding (a rolling change): not these regressions' inputs
    slot = _slot(state, ev.tenant, ev.request_id)
    slot.model, slot.features, slot.context_key = ev.chosen_model, dict(ev.features), ev.context_key
    for score in slot.scores:
        state.priors.learn_quality(ev.chosen_model, slot.features, score, slot.context_key)
    slot.scores.clear()


def _same_feature_set(config: FeatureConfig, x: Mapping[str, float]) -> bool:
    """Whether `x` has exactly the embedding dimensions `config` names (none, or emb0..emb{n-1}).

    Which model computed them is not on the event; dimensions are what a replica with other
    settings most often differs in, and the gateway refuses priors whose model it lacks.
    """
    dims = config.embedding_dims
    n = sum(1 for k in x if k.startswith("emb"))
    return n == dims and (dims == 0 or f"emb{dims - 1}" in x)


def _feedback(state: LearnerState, ev: FeedbackReceived) -> None:
    score = min(1.0, max(0.0, ev.score))  # the gateway validates [0, 1]; a replayed outlier must not raise
    slot = _slot(state, ev.tenant, ev.request_id)
    if slot.model is None or slot.features is None:
        slot.scores.append(score)
        return
    state.priors.learn_quality(slot.model, slot.features, score, slot.context_key)


def version_of(priors_json: str, at: datetime) -> str:
    """The version: the newest folded fact's millisecond and the content's hash (ordered, and a replay derives it)."""
    return f"rp-{_ms(at):013d}-{_sha(priors_json)[:12]}"


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def publish(state: LearnerState) -> list[Event]:
    """Priors and per-tenant regret to publish now (empty if nothing was folded since the last time)."""
    if state.unpublished == 0 or state.trained_until is None:
        return []
    body = state.priors.to_json()
    version = version_of(body, state.trained_until)
    at = state.trained_until
    priors_event = RoutingPriorsPublished(
        envelope=_envelope("RoutingPriorsPublished", PLATFORM_TENANT, version, at),
        version=version,
        previous_version=state.previous_version,
        algorithm=ALGORITHM,
        context_count=len(state.priors.contexts),
        feedback_count=state.priors.feedback_count,
        trained_until=at,
        priors=body,
        priors_sha256=_sha(body),
    )
    out: list[Event] = [priors_event]
    for tenant in sorted(state.regret):
        r = state.regret[tenant]
        if r.routed == 0:
            continue
        r.cumulative_routed += r.routed
        r.cumulative_regret += r.regret
        out.append(
            RoutingRegretRecorded(
                envelope=_envelope("RoutingRegretRecorded", tenant, version, at),
                priors_version=version,
                routed=r.routed,
                explored=r.explored,
                regret=r.regret,
                cumulative_routed=r.cumulative_routed,
                cumulative_regret=r.cumulative_regret,
            )
        )
        r.routed, r.explored, r.regret = 0, 0, 0.0
    state.priors.version = version
    state.previous_version = version
    state.unpublished = 0
    return out


def _envelope(event_type: str, tenant: str, version: str, at: datetime) -> Envelope:
    event_id = str(derived_uuid7(uuid.UUID(int=_ms(at) << 80), version, event_type, tenant))
    return Envelope(
        event_id=event_id,
        event_type=event_type,
        schema_version=1,
        tenant=tenant,
        occurred_at=at,
        correlation_id=event_id,  # a root fact: it correlates with itself (the version is in the payload)
        producer=PRODUCER,
    )
