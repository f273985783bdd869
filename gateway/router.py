"""The replica's router: picks the model of a call that does not pin one, with the newest priors.

Why here: the decision is on the request path, so it uses only memory. The priors reach every
replica as `RoutingPriorsPublished` on the compacted `routing-priors` topic, which this
router follows (`streams.follower`) and swaps in whole when a new version arrives (~100 ms
after the priors agent publishes it); until the first one arrives it routes with empty
priors (every model equally unknown: the cheapest by score, the others explored up to the
cap). The decision itself is `domain.routing.choose`, the same code `ledgerflow route-eval`
judges.

Candidates are the models the gateway can serve and price, minus what the policy forbids for
this call: the obligations' regions (`PolicyPoint.allowed_models`) and the cost cap (a model
whose worst-case cost for this call is over the cap). Forbidden models are still listed in
RouteChosen, with why, and get probability 0. Features are computed from the messages as the
model will see them (already masked), and only their numbers are recorded, never text.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import TYPE_CHECKING

from domain.pricing import Price, cost
from domain.routing import ALGORITHM, Candidate, Choice, Exploration, NoCandidate, Priors, Weights, choose
from domain.routing_embedding import check_embedding_dims
from domain.routing_features import FeatureConfig, context_key
from gateway.facts import CallContext
from streams.events import Event, RouteChosen, RoutingPriorsPublished
from streams.follower import StateFollower

if TYPE_CHECKING:
    from domain.routing_embedding import SentenceEncoder

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = Weights(quality=1.0, cost=0.05, latency=0.0)
DEFAULT_COMPLETION_TOKENS = 256  # expected answer length for the cost term until the priors know better


class Router:
    def __init__(
        self,
        weights: Mapping[str, Weights] | None = None,
        default_weights: Weights = DEFAULT_WEIGHTS,
        exploration: Exploration | None = None,
        encoder: SentenceEncoder | None = None,
        embedding_dims: int = 0,
    ) -> None:
        """`encoder`/`embedding_dims`: add a sentence embedding to the features (`routing_embedding_model`)."""
        self._encoder = encoder
        config = FeatureConfig()
        if encoder is not None:
            check_embedding_dims(encoder, embedding_dims)
            config = FeatureConfig(embedding=encoder.model_id, embedding_dims=embedding_dims)
        self._priors = Priors(config=config)
        self._weights = dict(weights or {})
        self._default = default_weights
        self._exploration = exploration or Exploration()
        self._follower: StateFollower | None = None
        self.loaded = threading.Event()
        self.applied_versions = 0
        self._executor: ThreadPoolExecutor | None = None

    @property
    def slow(self) -> bool:
        """Whether a decision runs an embedding model (milliseconds: the gateway runs it off its event loop)."""
        return self._encoder is not None

    @property
    def executor(self) -> ThreadPoolExecutor:
        """Threads of its own for slow decisions: the loop's default pool also serves health checks,
        budgets and memory, which a burst of long prompts must not queue behind."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="router-embedding")
        return self._executor

    @property
    def priors(self) -> Priors:
        return self._priors

    def weights_for(self, tenant: str) -> Weights:
        return self._weights.get(tenant, self._default)

    # -- following the priors topic --

    def apply(self, event: Event) -> None:
        """Swap in a published priors version (one assignment: a decision sees old or new, whole)."""
        if not isinstance(event, RoutingPriorsPublished) or event.algorithm != ALGORITHM:
            return
        priors = Priors.from_json(event.priors, event.version)
        wanted = priors.config.embedding
        enc = self._encoder
        if wanted and (enc is None or enc.model_id != wanted or priors.config.embedding_dims > enc.dim):
            # Refused, not half-applied: its regressions read features this replica cannot compute.
            have = self._encoder.model_id if self._encoder is not None else "none"
            log.error("routing priors %s need the embedding model %s (this replica: %s): kept %s",
                      event.version, wanted, have, self._priors.version)  # fmt: skip
            return
        self._priors = priors
        self.applied_versions += 1
        log.info("routing priors %s loaded (%d feedback)", event.version, event.feedback_count)

    def follow(self, bootstrap: str, topic: str) -> None:
        self._follower = StateFollower(bootstrap, [topic], self.apply, name="routing-priors")

    def start(self) -> None:
        if self._follower is not None:
            self._follower.start()
            self.loaded = self._follower.loaded

    def close(self) -> None:
        if self._follower is not None:
            self._follower.close()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the decision --

    def decide(
        self,
        tenant: str,
        request_id: str,
        text: str,
        models: Sequence[str],
        allowed: Sequence[str],
        prices: Mapping[str, Price],
        prompt_tokens: int,
        max_tokens: int,
        max_cost: Decimal | None = None,
    ) -> tuple[Choice, dict[str, float]]:
        """The choice among `models` (those not in `allowed` are listed as forbidden) and the features."""
        priors = self._priors  # one read: the whole decision uses one version
        x = priors.features(text, self._encoder)
        permitted = set(allowed)
        candidates = []
        for m in models:
            price = prices[m]
            stats = priors.models.get(m)  # read only: the priors are shared by concurrent requests
            answer = stats.completion_tokens(DEFAULT_COMPLETION_TOKENS) if stats else DEFAULT_COMPLETION_TOKENS
            expected = cost(prompt_tokens, min(answer, max_tokens), price)
            worst = cost(prompt_tokens, max_tokens, price)
            excluded = None if m in permitted else "region"
            if excluded is None and max_cost is not None and worst > max_cost:
                excluded = "cost_cap"
            latency = stats.latency_ms(0.0) if stats is not None else 0.0
            candidates.append(Candidate(m, expected, latency, excluded is None, excluded))
        choice = choose(priors, x, candidates, self.weights_for(tenant), self._exploration, request_id, context_key(x))
        return choice, x

    def route(
        self,
        ctx: CallContext,
        models: Sequence[str],
        allowed: Sequence[str],
        prices: Mapping[str, Price],
        prompt_tokens: int,
        max_tokens: int,
    ) -> CallContext:
        """The call context routed: model set to the choice, RouteChosen attached (unchanged if pinned)."""
        if ctx.model_hint:
            return ctx
        max_cost = ctx.decision.obligations.max_cost
        text = "\n".join(m.content for m in ctx.messages)
        try:
            choice, x = self.decide(
                ctx.principal.tenant, ctx.request_id, text, models, allowed, prices, prompt_tokens, max_tokens, max_cost
            )
        except NoCandidate:  # nothing allowed: the obligations step has already refused or rerouted
            return ctx
        event = RouteChosen(
            envelope=ctx.envelope("RouteChosen"),
            request_id=ctx.request_id,
            attempt=1,
            strategy="bandit",
            context_key=choice.context_key,
            priors_version=choice.priors_version,
            candidates=choice.route_candidates(),  # type: ignore[arg-type]
            chosen_model=choice.model,
            propensity=choice.propensity,
            features=x,
        )
        return dataclasses.replace(ctx, model=choice.model, route_chosen=event)
