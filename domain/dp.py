"""Differential privacy, pure: metric sets, query specs, contribution bounds, OpenDP plans and
releases, and the budget fold.

What this module is responsible for, and the guarantee each part gives:
- `QuerySpec`: a query in canonical form. Its SHA-256 names it, so a repeat of the same query
  over the same window is recognised and answered from the recorded release (no new noise,
  no new spend).
- Contribution bounds: the privacy unit is the API key (the only per-caller identity the facts
  carry; an end-user id is not recorded anywhere yet). Each unit contributes at most
  `max_requests_per_unit` requests to a query (its first ones in the window, in time order,
  chosen in SQL), and each request's cost is clamped to `[0, cost_max]`. So every released
  vector has L1 (and L2) sensitivity `k` for counts and `k * cost_max` for cost sums.
- `plan`: the mechanism and its scale (the textbook scale, accepted by OpenDP's privacy map,
  else found by its `binary_search_param`); the loss that is charged is what OpenDP's map says
  for that scale and sensitivity (`map()`), never a number we derive by hand. Integers
  throughout, so the samplers are OpenDP's exact discrete Laplace (basic, pure epsilon-DP) and
  discrete Gaussian (zcdp, rho).
- `release`: draws the noise, with OpenDP's measurements only (no `random`, no numpy).
- `fold`: the budget ledger of one (tenant, metric set), `fold(state, event) -> (state, output)`.
  Grants add budget; a request is admitted only if its loss, added to everything already
  charged in the period (pending releases included: a charge counts from the moment it is
  admitted), stays within the grant: OpenDP privacy-filter semantics, decided before any noise
  is drawn. The fold is deterministic, so replaying the budget log reproduces every decision
  and every budget exactly; losses are summed as Decimals (no float drift across queries).
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any

import opendp.prelude as dp
import orjson

from streams.events import DpBudgetGranted, DpQueryCharged, DpQueryRefused, DpQueryRequested, Event

# "honest-but-curious" only for the zCDP -> (epsilon, delta) conversion of a summed rho, where the
# privacy map we hand OpenDP is the sum of losses OpenDP's own maps reported (see `epsilon_of_rho`).
dp.enable_features("contrib", "honest-but-curious")

PRODUCER = "agent:dp-budget"
COMPOSITIONS = ("basic", "zcdp")
MECHANISMS = {"basic": "discrete_laplace", "zcdp": "discrete_gaussian"}
PERIODS = ("total", "day", "month")
PRIVACY_UNITS = ("api_key",)
# query kind -> the metric set whose budget pays for it
KINDS: dict[str, str] = {
    "requests_per_model_per_day": "usage",
    "mean_cost_per_request": "usage",
    "savings_distribution": "savings",
}
METRIC_SETS: dict[str, tuple[str, ...]] = {
    ms: tuple(k for k, owner in KINDS.items() if owner == ms) for ms in dict.fromkeys(KINDS.values())
}
MICRO = Decimal("0.000001")  # money is noised as whole micro-units of the currency (integers: exact samplers)
MAX_WINDOW_DAYS = 92
MAX_MODELS = 50
MAX_BINS = 50
MAX_REQUESTS_PER_UNIT = 10_000
MAX_GRANT_EPSILON = 1000  # per budget and period; far beyond any meaningful guarantee, it bounds the arithmetic


class BadQuery(ValueError):
    """A query spec that cannot be planned; the message names the fix."""


def _dec(value: Any, name: str) -> Decimal:
    try:
        d = Decimal(str(value))
    except (InvalidOperation, ValueError):
        raise BadQuery(f"{name} must be a number, got {value!r}") from None
    if not d.is_finite():
        raise BadQuery(f"{name} must be finite")
    return d


def loss_decimal(x: float) -> Decimal:
    """A loss OpenDP reported as a float, as the shortest decimal that reads back as the same float.

    Sums of these are exact and order-free, so ten charges of 0.1 fit a grant of 1.0 and a
    replay in any grouping gives the same budget (the decimal is within half an ulp of the float).
    """
    return Decimal(repr(float(x)))


# --- query specs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class QuerySpec:
    """One DP query in canonical form. `loss` is epsilon under basic composition, rho under zcdp."""

    tenant: str
    kind: str
    since: date  # first day of the window, UTC
    until: date  # last day of the window, inclusive
    composition: str
    loss: Decimal
    max_requests_per_unit: int
    models: tuple[str, ...] = ()
    currency: str = "USD"
    cost_max: Decimal = Decimal("1")
    savings_edges: tuple[Decimal, ...] = ()
    privacy_unit: str = "api_key"

    @property
    def metric_set(self) -> str:
        return KINDS[self.kind]

    @property
    def window_start(self) -> datetime:
        return datetime.combine(self.since, time(), UTC)

    @property
    def window_end(self) -> datetime:
        return datetime.combine(self.until + timedelta(days=1), time(), UTC)

    @property
    def days(self) -> tuple[date, ...]:
        return tuple(self.since + timedelta(days=i) for i in range((self.until - self.since).days + 1))

    def canonical(self) -> str:
        """Sorted-key JSON of everything that determines the release (the data aside)."""
        doc: dict[str, Any] = {
            "tenant": self.tenant,
            "kind": self.kind,
            "metric_set": self.metric_set,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "composition": self.composition,
            "epsilon" if self.composition == "basic" else "rho": str(self.loss),
            "max_requests_per_unit": self.max_requests_per_unit,
            "privacy_unit": self.privacy_unit,
            "models": list(self.models),
        }
        if self.kind in ("mean_cost_per_request", "savings_distribution"):
            doc["currency"] = self.currency
        if self.kind == "mean_cost_per_request":
            doc["cost_max"] = str(self.cost_max)
        if self.kind == "savings_distribution":
            doc["savings_edges"] = [str(e) for e in self.savings_edges]
        return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS).decode()

    def sha256(self) -> str:
        return hashlib.sha256(self.canonical().encode()).hexdigest()

    @classmethod
    def parse(cls, doc: Mapping[str, Any], tenant: str, composition: str) -> QuerySpec:
        """Validate a request body (`kind`, `since`, `until`, `epsilon` or `rho`, bounds, categories).

        `composition` is the grant's: the loss field must be the one it accounts in.
        """
        kind = str(doc.get("kind", ""))
        if kind not in KINDS:
            raise BadQuery(f"kind must be one of {sorted(KINDS)}, got {kind!r}")
        if composition not in COMPOSITIONS:
            raise BadQuery(f"composition must be one of {list(COMPOSITIONS)}")
        loss_name, other = ("epsilon", "rho") if composition == "basic" else ("rho", "epsilon")
        if doc.get(other) is not None:
            raise BadQuery(f"this budget accounts in {composition} ({loss_name}); send {loss_name!r}, not {other!r}")
        if doc.get(loss_name) is None:
            raise BadQuery(f"send the privacy loss to spend as {loss_name!r} (this budget is {composition})")
        loss = _dec(doc[loss_name], loss_name)
        if not Decimal(0) < loss <= Decimal(100):
            raise BadQuery(f"{loss_name} must be in (0, 100]")
        try:
            since = date.fromisoformat(str(doc.get("since", "")))
            until = date.fromisoformat(str(doc.get("until", "")))
        except ValueError:
            raise BadQuery("since and until must be dates (YYYY-MM-DD, until inclusive)") from None
        if until < since or (until - since).days >= MAX_WINDOW_DAYS:
            raise BadQuery(f"the window must run forward and span at most {MAX_WINDOW_DAYS} days")
        k = doc.get("max_requests_per_unit", 100)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_REQUESTS_PER_UNIT:
            raise BadQuery(f"max_requests_per_unit must be an integer in [1, {MAX_REQUESTS_PER_UNIT}]")
        unit = str(doc.get("privacy_unit", "api_key"))
        if unit not in PRIVACY_UNITS:
            raise BadQuery(f"privacy_unit must be one of {list(PRIVACY_UNITS)} (end users are not recorded)")
        models = doc.get("models") or []
        if kind != "savings_distribution":
            if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
                raise BadQuery(
                    "models must be a non-empty list of model names: the categories of a release are "
                    "public, never taken from the data (a model only one key used would reveal it)"
                )
            if len(models) > MAX_MODELS or len(set(models)) != len(models):
                raise BadQuery(f"models must be distinct and at most {MAX_MODELS}")
        spec = cls(
            tenant=tenant,
            kind=kind,
            since=since,
            until=until,
            composition=composition,
            loss=loss,
            max_requests_per_unit=k,
            models=tuple(sorted(models)) if kind != "savings_distribution" else (),
            currency=str(doc.get("currency", "USD")),
            privacy_unit=unit,
        )
        if kind == "mean_cost_per_request":
            cost_max = _dec(doc.get("cost_max", "1"), "cost_max")
            if not MICRO <= cost_max <= Decimal(1000) or cost_max % MICRO:
                raise BadQuery("cost_max must be in [0.000001, 1000] with at most 6 decimals")
            spec = replace(spec, cost_max=cost_max)
        if kind == "savings_distribution":
            edges = doc.get("savings_edges")
            if not isinstance(edges, list) or not 1 <= len(edges) <= MAX_BINS:
                raise BadQuery(f"savings_edges must be a list of 1..{MAX_BINS} increasing numbers (bin edges)")
            parsed = tuple(_dec(e, "savings_edges[]") for e in edges)
            if any(b <= a for a, b in itertools.pairwise(parsed)):
                raise BadQuery("savings_edges must increase strictly")
            spec = replace(spec, savings_edges=parsed)
        return spec

    def cells(self) -> list[str]:
        """Labels of the released vector, in order; all public (from the spec, never the data)."""
        if self.kind == "requests_per_model_per_day":
            return [f"{m}|{d.isoformat()}" for m in self.models for d in self.days]
        if self.kind == "mean_cost_per_request":
            return list(self.models)
        edges = self.savings_edges
        return [f"<{edges[0]}", *(f"[{a},{b})" for a, b in itertools.pairwise(edges)), f">={edges[-1]}"]


# --- plans: mechanisms and the loss OpenDP's privacy map reports --------------------------------


@dataclass(frozen=True)
class Component:
    """One noised vector of a release: its name, L1/L2 sensitivity (d_in), OpenDP scale and loss."""

    name: str
    sensitivity: int
    scale: float
    loss: Decimal


@dataclass(frozen=True)
class Plan:
    composition: str
    mechanism: str
    components: tuple[Component, ...]

    @property
    def loss(self) -> Decimal:
        """Total loss: components compose by summing (basic composition of epsilons, or of rhos)."""
        return sum((c.loss for c in self.components), Decimal(0))

    @property
    def epsilon(self) -> float:
        return float(self.loss) if self.composition == "basic" else 0.0

    @property
    def rho(self) -> float | None:
        return float(self.loss) if self.composition == "zcdp" else None


def measurement(composition: str, scale: float) -> dp.Measurement:
    """OpenDP's integer-vector mechanism for `composition`: discrete Laplace (L1, pure epsilon-DP)
    or discrete Gaussian (L2, zCDP rho)."""
    domain = dp.vector_domain(dp.atom_domain(T="i64"))
    if composition == "basic":
        return dp.m.make_laplace(domain, dp.l1_distance(T="i64"), scale)
    if composition == "zcdp":
        return dp.m.make_gaussian(domain, dp.l2_distance(T="i64"), scale)
    raise BadQuery(f"unknown composition {composition!r}")


@cache
def _component(name: str, composition: str, sensitivity: int, target: Decimal) -> Component:
    """The smallest scale whose OpenDP privacy map at `sensitivity` stays within `target`.

    The textbook scale (d/epsilon for Laplace, d/sqrt(2 rho) for Gaussian) is the start; OpenDP's
    map decides, and the scale is nudged up until the map accepts it (float rounding). Should
    that not settle, OpenDP's `binary_search_param` finds it (slower: ~0.15 s a search).
    """
    goal = float(target)
    scale = sensitivity / goal if composition == "basic" else sensitivity / math.sqrt(2 * goal)
    for _ in range(32):
        if measurement(composition, scale).map(sensitivity) <= goal:
            break
        scale *= 1 + 1e-12
    else:
        scale = dp.binary_search_param(lambda s: measurement(composition, s), d_in=sensitivity, d_out=goal)
    loss = loss_decimal(measurement(composition, scale).map(sensitivity))
    if loss > target:  # the map must accept the scale; hold the decimal to it too
        raise AssertionError(f"OpenDP planned {loss} over the target {target}")
    return Component(name, sensitivity, float(scale), loss)


def plan(spec: QuerySpec) -> Plan:
    """Mechanism, scales and the loss to charge for `spec` (deterministic: same spec, same plan)."""
    k = spec.max_requests_per_unit
    if spec.kind == "mean_cost_per_request":
        # the loss is split evenly between the count and the clamped cost sum
        cost_sens = k * int(spec.cost_max / MICRO)
        half = spec.loss / 2
        parts: tuple[Component, ...] = (
            _component("requests", spec.composition, k, half),
            _component("cost", spec.composition, cost_sens, half),
        )
    else:
        parts = (_component("requests", spec.composition, k, spec.loss),)
    return Plan(spec.composition, MECHANISMS[spec.composition], parts)


# --- aggregates and releases ------------------------------------------------------------------


@dataclass(frozen=True)
class Aggregates:
    """Exact, already clamped sums per public cell (from SQL); never released as they are."""

    requests: dict[str, int] = field(default_factory=dict)
    cost_micro: dict[str, int] = field(default_factory=dict)


def release(spec: QuerySpec, the_plan: Plan, exact: Aggregates) -> dict[str, Any]:
    """Noise the aggregates with OpenDP's samplers; the released JSON {"columns", "rows"}.

    Noisy values are released as drawn (they may be negative: clamping them would bias the
    small cells); a mean is given only where the noisy count is positive.
    """
    cells = spec.cells()
    noisy: dict[str, list[int]] = {}
    for comp in the_plan.components:
        source = exact.requests if comp.name == "requests" else exact.cost_micro
        vector = [int(source.get(c, 0)) for c in cells]
        noisy[comp.name] = list(measurement(spec.composition, comp.scale)(vector))
    rows: list[list[Any]]
    if spec.kind == "requests_per_model_per_day":
        columns = ["model", "day", "requests"]
        rows = [[*c.split("|", 1), n] for c, n in zip(cells, noisy["requests"], strict=True)]
    elif spec.kind == "mean_cost_per_request":
        columns = ["model", "requests", "cost", "mean_cost", "currency"]
        rows = []
        for c, n, micro in zip(cells, noisy["requests"], noisy["cost"], strict=True):
            cost = Decimal(micro) * MICRO
            mean = str((cost / n).quantize(MICRO)) if n > 0 else None
            rows.append([c, n, str(cost), mean, spec.currency])
    else:
        columns = ["savings_bin", "requests"]
        rows = [[c, n] for c, n in zip(cells, noisy["requests"], strict=True)]
    return {"columns": columns, "rows": rows}


def noise_scales(the_plan: Plan) -> dict[str, float]:
    return {c.name: c.scale for c in the_plan.components}


# --- the budget ledger --------------------------------------------------------------------------


@cache
def epsilon_of_rho(rho: Decimal, delta: float) -> float:
    """The epsilon (at `delta`) that a total zCDP loss `rho` amounts to, by OpenDP's conversion."""
    if rho <= 0:
        return 0.0
    total = dp.m.make_user_measurement(
        dp.atom_domain(T=float, nan=False),
        dp.absolute_distance(T=float),
        dp.zero_concentrated_divergence(),
        lambda x: x,
        lambda d_in: float(rho) * d_in,  # the summed rho per unit of distance
    )
    try:
        return float(dp.c.make_zCDP_to_approxDP(total).map(1.0).epsilon(delta))
    except dp.OpenDPException:  # the conversion overflows only for astronomically large rho
        return math.inf


@cache
def rho_budget(epsilon: Decimal, delta: Decimal) -> Decimal:
    """The largest total rho whose OpenDP conversion at `delta` stays within `epsilon`."""
    found = dp.binary_search(
        lambda r: epsilon_of_rho(loss_decimal(r), float(delta)) <= float(epsilon), bounds=(0.0, float(epsilon))
    )
    return loss_decimal(found)


def period_key(period: str, at: datetime) -> str:
    """Which renewal period an event at `at` falls in (its envelope time, so replay agrees)."""
    if period == "day":
        return at.astimezone(UTC).date().isoformat()
    if period == "month":
        return at.astimezone(UTC).strftime("%Y-%m")
    return "total"


@dataclass(frozen=True)
class Budget:
    """One (tenant, metric set) budget as the fold of its grants and decided requests."""

    tenant: str
    metric_set: str
    composition: str
    period: str
    epsilon: Decimal  # granted per period
    delta: Decimal
    period_key: str = "total"
    spent_epsilon: Decimal = Decimal(0)
    spent_delta: Decimal = Decimal(0)
    spent_rho: Decimal = Decimal(0)
    charged: int = 0  # queries charged this period
    refused: int = 0  # refused this period (repeats not counted)
    charged_queries: Mapping[str, str] = field(default_factory=dict)  # query_sha256 -> query_id, all periods

    @property
    def key(self) -> str:
        return f"{self.tenant}/{self.metric_set}"

    @property
    def rho(self) -> Decimal | None:
        return rho_budget(self.epsilon, self.delta) if self.composition == "zcdp" else None

    @property
    def epsilon_spent(self) -> float:
        if self.composition == "basic":
            return float(self.spent_epsilon)
        return epsilon_of_rho(self.spent_rho, float(self.delta))

    @property
    def epsilon_remaining(self) -> float:
        if self.composition == "basic":
            return float(self.epsilon - self.spent_epsilon)
        return max(0.0, float(self.epsilon) - self.epsilon_spent)

    @property
    def delta_remaining(self) -> float:
        if self.composition == "basic":
            return float(self.delta - self.spent_delta)
        return float(self.delta) if self.spent_rho == 0 else 0.0  # the conversion commits all of delta

    @property
    def rho_remaining(self) -> float | None:
        budget = self.rho
        return None if budget is None else float(budget - self.spent_rho)

    @property
    def used_fraction(self) -> float:
        """Share of the period's budget spent: epsilon under basic, rho under zcdp."""
        if self.composition == "basic":
            return float(self.spent_epsilon / self.epsilon) if self.epsilon else 1.0
        budget = self.rho or Decimal(0)
        return float(self.spent_rho / budget) if budget else 1.0

    def summary(self) -> dict[str, Any]:
        return {
            "tenant": self.tenant,
            "metric_set": self.metric_set,
            "composition": self.composition,
            "period": self.period,
            "period_key": self.period_key,
            "epsilon": float(self.epsilon),
            "delta": float(self.delta),
            "epsilon_spent": self.epsilon_spent,
            "epsilon_remaining": self.epsilon_remaining,
            "delta_remaining": self.delta_remaining,
            "rho": None if self.rho is None else float(self.rho),
            "rho_spent": None if self.composition == "basic" else float(self.spent_rho),
            "rho_remaining": self.rho_remaining,
            "used_fraction": round(self.used_fraction, 6),
            "queries_charged": self.charged,
            "queries_refused": self.refused,
        }

    def remaining_text(self) -> str:
        if self.composition == "basic":
            return f"epsilon {self.epsilon_remaining:.6g} of {float(self.epsilon):.6g} remains"
        return (
            f"rho {self.rho_remaining:.6g} of {float(self.rho or 0):.6g} remains "
            f"(epsilon {self.epsilon_remaining:.6g} of {float(self.epsilon):.6g} at delta {float(self.delta):.3g})"
        )


class GrantRejected(ValueError):
    """A grant the fold does not apply (it stays on the log, without effect, on replay too)."""


def check_grant(state: Budget | None, grant: DpBudgetGranted) -> None:
    if grant.composition not in COMPOSITIONS:
        raise GrantRejected(f"composition must be one of {list(COMPOSITIONS)}, got {grant.composition!r}")
    if grant.period not in PERIODS:
        raise GrantRejected(f"period must be one of {list(PERIODS)}, got {grant.period!r}")
    if not (0 < grant.epsilon <= MAX_GRANT_EPSILON and 0 <= grant.delta < 1):  # NaN fails both
        raise GrantRejected(f"epsilon must be in (0, {MAX_GRANT_EPSILON}] and delta in [0, 1)")
    if grant.composition == "zcdp" and not grant.delta > 0:
        raise GrantRejected("a zcdp budget needs delta > 0 (zCDP converts to (epsilon, delta)-DP)")
    if state is not None and (state.composition, state.period) != (grant.composition, grant.period):
        raise GrantRejected(
            f"{state.key} is a {state.composition}/{state.period} budget; a top-up must repeat both, "
            f"not {grant.composition}/{grant.period}"
        )
    total_epsilon = (state.epsilon if state else Decimal(0)) + loss_decimal(grant.epsilon)
    if total_epsilon > MAX_GRANT_EPSILON:
        raise GrantRejected(
            f"a budget holds at most epsilon {MAX_GRANT_EPSILON} (this grant would make {total_epsilon})"
        )
    if grant.composition == "zcdp":
        total_delta = (state.delta if state else Decimal(0)) + loss_decimal(grant.delta)
        if not total_delta < 1:
            raise GrantRejected("a budget's delta must stay below 1")
        try:
            rho_budget(total_epsilon, total_delta)
        except dp.OpenDPException as exc:
            raise GrantRejected(
                f"OpenDP cannot convert epsilon {total_epsilon}, delta {total_delta} to zCDP: {exc}"
            ) from None


def _roll(state: Budget, at: datetime) -> Budget:
    """Start a new period's spending when `at` is past the current one (grants carry over)."""
    key = period_key(state.period, at)
    if key == state.period_key:
        return state
    return replace(
        state,
        period_key=key,
        spent_epsilon=Decimal(0),
        spent_delta=Decimal(0),
        spent_rho=Decimal(0),
        charged=0,
        refused=0,
    )


def _refusal(
    state: Budget | None, req: DpQueryRequested, reason: str, detail: str, repeat_of: str | None = None
) -> DpQueryRefused:
    return DpQueryRefused(
        envelope=req.envelope.caused_by("DpQueryRefused", PRODUCER),
        query_id=req.query_id,
        metric_set=req.metric_set,
        reason=reason,
        detail=detail,
        epsilon=req.epsilon,
        delta=req.delta,
        query_sha256=req.query_sha256,
        requested_by=req.requested_by,
        epsilon_remaining=state.epsilon_remaining if state else 0.0,
        delta_remaining=state.delta_remaining if state else 0.0,
        rho=req.rho,
        rho_remaining=state.rho_remaining if state else None,
        repeat_of=repeat_of,
    )


def _valid_loss(x: float | None) -> Decimal | None:
    if x is None or not x >= 0 or x == float("inf"):
        return None
    return loss_decimal(x)


def fold(state: Budget | None, event: Event) -> tuple[Budget | None, Event | None]:
    """Apply one budget-log event: a grant (no output) or a request (its charge or refusal).

    Raises GrantRejected for a grant that does not apply; the caller logs it and goes on with
    the state unchanged (a replay skips it the same way).
    """
    if isinstance(event, DpBudgetGranted):
        check_grant(state, event)
        if state is None:
            state = Budget(
                tenant=event.tenant,
                metric_set=event.metric_set,
                composition=event.composition,
                period=event.period,
                epsilon=Decimal(0),
                delta=Decimal(0),
                period_key=period_key(event.period, event.envelope.occurred_at),
            )
        return replace(
            state, epsilon=state.epsilon + loss_decimal(event.epsilon), delta=state.delta + loss_decimal(event.delta)
        ), None
    if not isinstance(event, DpQueryRequested):
        raise TypeError(f"{event.event_type} is not on the budget log")
    req = event
    if state is None:
        return None, _refusal(None, req, "no-budget", f"no budget has been granted for {req.tenant}/{req.metric_set}")
    state = _roll(state, req.envelope.occurred_at)
    earlier = state.charged_queries.get(req.query_sha256)
    if earlier is not None:
        return state, _refusal(
            state, req, "repeat", f"the same query was charged as {earlier}; its release is the answer", earlier
        )
    if req.composition != state.composition:
        return replace(state, refused=state.refused + 1), _refusal(
            state, req, "composition-mismatch",
            f"the request was planned for {req.composition}, the budget accounts in {state.composition}; ask again",
        )  # fmt: skip
    epsilon, delta, rho = _valid_loss(req.epsilon), _valid_loss(req.delta), _valid_loss(req.rho)
    if epsilon is None or delta is None or (state.composition == "zcdp" and rho is None):
        return replace(state, refused=state.refused + 1), _refusal(
            state, req, "invalid", "the requested loss is not a finite number >= 0"
        )
    if state.composition == "basic":
        fits = state.spent_epsilon + epsilon <= state.epsilon and state.spent_delta + delta <= state.delta
        asked = f"epsilon {float(epsilon):.6g}" + (f", delta {float(delta):.3g}" if delta else "")
    else:
        assert rho is not None
        fits = delta == 0 and state.spent_rho + rho <= (state.rho or Decimal(0))
        asked = f"rho {float(rho):.6g}"
    if not fits:
        return replace(state, refused=state.refused + 1), _refusal(
            state, req, "exhausted",
            f"budget {state.key} ({state.period}: {state.period_key}) cannot pay {asked}: {state.remaining_text()}",
        )  # fmt: skip
    before = state.epsilon_spent
    after = replace(
        state,
        spent_epsilon=state.spent_epsilon + (epsilon if state.composition == "basic" else Decimal(0)),
        spent_delta=state.spent_delta + delta,
        spent_rho=state.spent_rho + (rho if state.composition == "zcdp" and rho is not None else Decimal(0)),
        charged=state.charged + 1,
        charged_queries={**state.charged_queries, req.query_sha256: req.query_id},
    )
    charge = DpQueryCharged(
        envelope=req.envelope.caused_by("DpQueryCharged", PRODUCER),
        query_id=req.query_id,
        metric_set=req.metric_set,
        epsilon=float(epsilon) if state.composition == "basic" else after.epsilon_spent - before,
        delta=float(delta),
        query_sha256=req.query_sha256,
        requested_by=req.requested_by,
        epsilon_remaining=after.epsilon_remaining,
        delta_remaining=after.delta_remaining,
        rho=float(rho) if rho is not None and state.composition == "zcdp" else None,
        rho_remaining=after.rho_remaining,
    )
    return after, charge


def replay(events: Iterable[Event]) -> tuple[dict[str, Budget], list[Event]]:
    """Every budget and every decision, from the budget log in log order (per budget key).

    The same fold the agent runs, so this reproduces its charges and refusals exactly.
    """
    budgets: dict[str, Budget] = {}
    outputs: list[Event] = []
    for event in events:
        if not isinstance(event, DpBudgetGranted | DpQueryRequested):
            continue
        key = event.budget_key
        try:
            state, out = fold(budgets.get(key), event)
        except Exception:  # skipped the same way by the agent (a rejected grant, or dead-lettered)
            continue
        if state is not None:
            budgets[key] = state
        if out is not None:
            outputs.append(out)
    return budgets, outputs


def reallocation(budgets: Sequence[Budget], near: float = 0.8, unused: float = 0.2) -> dict[str, Any]:
    """Metric sets near exhaustion (used >= `near`) beside those with unused budget (used <= `unused`).

    A suggestion only: per tenant, move grant from the under-used sets to the near-exhausted
    ones (a grant is a new DpBudgetGranted; nothing is moved automatically).
    """
    rows = sorted((b.summary() for b in budgets), key=lambda r: (r["tenant"], -r["used_fraction"], r["metric_set"]))
    near_rows = [r for r in rows if r["used_fraction"] >= near]
    unused_rows = [r for r in rows if r["used_fraction"] <= unused]
    suggestions = []
    for hot in near_rows:
        donors = [r for r in unused_rows if r["tenant"] == hot["tenant"] and r["composition"] == hot["composition"]]
        for donor in donors:
            suggestions.append(
                {
                    "tenant": hot["tenant"],
                    "from_metric_set": donor["metric_set"],
                    "to_metric_set": hot["metric_set"],
                    "unused_epsilon": donor["epsilon_remaining"],
                    "note": f"{hot['metric_set']} has used {hot['used_fraction']:.0%}; "
                    f"{donor['metric_set']} only {donor['used_fraction']:.0%}",
                }
            )
    return {
        "near_exhaustion": near_rows,
        "unused": unused_rows,
        "suggestions": suggestions,
        "thresholds": {"near": near, "unused": unused},
    }


def canonical_json(doc: Any) -> str:
    return orjson.dumps(doc, option=orjson.OPT_SORT_KEYS).decode()
