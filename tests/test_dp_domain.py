"""The pure DP layer: query specs, OpenDP plans, the noise they draw, and the budget fold."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from domain.dp import (
    Aggregates,
    BadQuery,
    Budget,
    GrantRejected,
    QuerySpec,
    fold,
    measurement,
    plan,
    reallocation,
    release,
    replay,
)
from streams.events import DpBudgetGranted, DpQueryCharged, DpQueryRefused, DpQueryRequested, Envelope, Event
from streams.ids import uuid7

T0 = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def _env(event_type: str, tenant: str = "acme", at: datetime = T0) -> Envelope:
    eid = str(uuid7())
    return Envelope(eid, event_type, 1, tenant, at, eid, "test")


def grant(
    epsilon: float = 1.0, delta: float = 0.0, composition: str = "basic", period: str = "total", **kw: object
) -> DpBudgetGranted:
    return DpBudgetGranted(
        envelope=_env("DpBudgetGranted", at=kw.pop("at", T0)),  # type: ignore[arg-type]
        metric_set=str(kw.pop("metric_set", "usage")),
        epsilon=epsilon, delta=delta, composition=composition, period=period, granted_by="ops",
    )  # fmt: skip


def request(spec: QuerySpec, at: datetime = T0, tenant: str = "acme") -> DpQueryRequested:
    p = plan(spec)
    return DpQueryRequested(
        envelope=_env("DpQueryRequested", tenant, at),
        query_id=str(uuid7()),
        metric_set=spec.metric_set,
        composition=spec.composition,
        epsilon=p.epsilon,
        delta=0.0,
        query_sha256=spec.sha256(),
        query=spec.canonical(),
        requested_by="key-1",
        rho=p.rho,
    )


def spec(epsilon: str = "0.1", since: str = "2026-11-01", composition: str = "basic", **kw: object) -> QuerySpec:
    doc: dict[str, object] = {
        "kind": "requests_per_model_per_day",
        "since": since,
        "until": "2026-11-03",
        "models": ["big", "small"],
        "max_requests_per_unit": 5,
        ("epsilon" if composition == "basic" else "rho"): epsilon,
    }
    doc.update(kw)
    return QuerySpec.parse(doc, "acme", composition)


def run(events: list[Event]) -> tuple[Budget | None, list[Event]]:
    state: Budget | None = None
    outs: list[Event] = []
    for e in events:
        state, out = fold(state, e)
        if out is not None:
            outs.append(out)
    return state, outs


# --- specs ------------------------------------------------------------------------------------


def test_canonical_query_names_the_query_and_its_window() -> None:
    a, b = spec(), spec()
    assert a.sha256() == b.sha256()
    assert spec(since="2026-11-02").sha256() != a.sha256()  # another window is another query
    assert spec(epsilon="0.2").sha256() != a.sha256()
    # model order is not part of the identity
    assert spec(models=["small", "big"]).sha256() == a.sha256()
    assert a.cells()[:3] == ["big|2026-11-01", "big|2026-11-02", "big|2026-11-03"]


@pytest.mark.parametrize(
    ("doc", "composition", "message"),
    [
        ({"kind": "nope"}, "basic", "kind must be one of"),
        ({"rho": "0.1"}, "basic", "send 'epsilon', not 'rho'"),
        ({"epsilon": "0.1"}, "zcdp", "send 'rho'"),
        ({"epsilon": "-1"}, "basic", "epsilon must be in (0, 100]"),
        ({"models": []}, "basic", "categories of a release are public"),
        ({"until": "2026-10-01"}, "basic", "the window must run forward"),
        ({"max_requests_per_unit": 0}, "basic", "max_requests_per_unit"),
        ({"privacy_unit": "end_user"}, "basic", "end users are not recorded"),
    ],
)
def test_bad_queries_are_refused_naming_the_fix(doc: dict[str, object], composition: str, message: str) -> None:
    base: dict[str, object] = {
        "kind": "requests_per_model_per_day", "since": "2026-11-01", "until": "2026-11-03",
        "models": ["m"], "epsilon": "0.1",
    }  # fmt: skip
    if composition == "zcdp":
        base.pop("epsilon")
    base.update(doc)
    with pytest.raises(BadQuery, match=message.replace("(", r"\(").replace(")", r"\)")):
        QuerySpec.parse(base, "acme", composition)


def test_savings_bins_and_mean_cost_specs() -> None:
    doc: dict[str, object] = {
        "kind": "savings_distribution",
        "since": "2026-11-01",
        "until": "2026-11-01",
        "epsilon": 1,
    }
    s = QuerySpec.parse({**doc, "savings_edges": [0, "0.01", "0.1"]}, "acme", "basic")
    assert s.metric_set == "savings"
    assert s.cells() == ["<0", "[0,0.01)", "[0.01,0.1)", ">=0.1"]
    with pytest.raises(BadQuery, match="increase strictly"):
        QuerySpec.parse({**doc, "savings_edges": [1, 1]}, "acme", "basic")
    m = spec(kind="mean_cost_per_request", cost_max="0.25")
    p = plan(m)
    # the loss is split between the count and the clamped cost sum (sensitivity k * cost_max, in micro-units)
    assert [c.name for c in p.components] == ["requests", "cost"]
    assert p.components[1].sensitivity == 5 * 250_000
    assert p.loss <= Decimal("0.1")


# --- plans: the charged loss is OpenDP's map of the planned measurement ----------------------------


@pytest.mark.parametrize("composition", ["basic", "zcdp"])
def test_plan_charges_what_opendp_maps(composition: str) -> None:
    s = spec(composition=composition, epsilon="0.1")
    p = plan(s)
    (comp,) = p.components
    mapped = measurement(composition, comp.scale).map(comp.sensitivity)
    assert comp.loss == Decimal(repr(mapped))
    assert p.loss <= Decimal("0.1") and p.loss > Decimal("0.0999")
    assert p.mechanism == ("discrete_laplace" if composition == "basic" else "discrete_gaussian")


def test_release_shapes_and_noises_every_public_cell() -> None:
    s = spec(epsilon="1")
    exact = Aggregates(requests={"big|2026-11-01": 1000, "secret-model|2026-11-01": 5})
    out = release(s, plan(s), exact)
    assert out["columns"] == ["model", "day", "requests"]
    assert [r[:2] for r in out["rows"]] == [c.split("|") for c in s.cells()]  # only public cells, none from the data
    # scale 5 (k=5, epsilon=1): a count of 1000 lands near 1000, never exactly on every cell
    assert abs(out["rows"][0][2] - 1000) < 200
    draws = {tuple(r[2] for r in release(s, plan(s), exact)["rows"]) for _ in range(5)}
    assert len(draws) > 1


def test_laplace_noise_scale_matches_epsilon_over_20k_draws() -> None:
    """The discrete Laplace noise our plan configures has the spread epsilon implies.

    For discrete Laplace with scale b (p = exp(-1/b)): E|X| = 2p / (1 - p^2) and
    E X^2 = 2p / (1 - p)^2. With k = 5 and epsilon = 0.1, b = k / epsilon = 50. Over N = 20,000
    draws the sample mean of |X| is within z = 5 standard errors of E|X| except with
    probability about 5.7e-7 (two-sided normal tail, CLT; |X| has all moments), which is this
    test's false-failure rate. A plan off by 10% in epsilon would shift E|X| by ~5 (about 14
    standard errors), so the test fails on a mis-scaled mechanism.
    """
    s = spec(epsilon="0.1")
    (comp,) = plan(s).components
    assert comp.scale == pytest.approx(comp.sensitivity / 0.1, rel=1e-9)
    n = 20_000
    draws = measurement("basic", comp.scale)([0] * n)
    p = math.exp(-1 / comp.scale)
    mean_abs = 2 * p / (1 - p * p)
    var_abs = 2 * p / (1 - p) ** 2 - mean_abs**2
    tolerance = 5 * math.sqrt(var_abs / n)
    observed = sum(abs(x) for x in draws) / n
    assert abs(observed - mean_abs) < tolerance, (observed, mean_abs, tolerance)
    # power: the band excludes the spread of a mechanism with 10% more epsilon
    p_wrong = math.exp(-1 / (comp.scale / 1.1))
    assert abs(2 * p_wrong / (1 - p_wrong**2) - mean_abs) > 2 * tolerance


def test_gaussian_noise_variance_matches_rho_over_20k_draws() -> None:
    """Under zcdp the discrete Gaussian's variance is sigma^2 = k^2 / (2 rho) (to within 1e-12
    for sigma >= 10). The sample variance of N = 20,000 draws has standard error about
    sigma^2 * sqrt(2 / N); z = 5 gives a false-failure rate of about 5.7e-7.
    """
    s = spec(composition="zcdp", epsilon="0.02")
    (comp,) = plan(s).components
    sigma2 = comp.sensitivity**2 / (2 * 0.02)
    assert comp.scale**2 == pytest.approx(sigma2, rel=1e-6)
    n = 20_000
    draws = measurement("zcdp", comp.scale)([0] * n)
    observed = sum(x * x for x in draws) / n  # the mean is known to be 0
    assert abs(observed - sigma2) < 5 * sigma2 * math.sqrt(2 / n)


# --- the budget fold ----------------------------------------------------------------------------------


def test_exactly_ten_charges_fit_a_budget_for_ten() -> None:
    s = [spec(since=f"2026-10-{d:02d}", until="2026-11-03") for d in range(1, 16)]
    state, outs = run([grant(1.0), *(request(x) for x in s)])
    charged = [o for o in outs if isinstance(o, DpQueryCharged)]
    refused = [o for o in outs if isinstance(o, DpQueryRefused)]
    assert len(charged) == 10 and len(refused) == 5
    assert state is not None and state.spent_epsilon == Decimal("1.0") and state.epsilon_remaining == 0.0
    assert {r.reason for r in refused} == {"exhausted"}
    assert "cannot pay epsilon 0.1: epsilon 0 of 1 remains" in refused[0].detail
    assert charged[-1].epsilon_remaining == 0.0 and charged[0].epsilon_remaining == pytest.approx(0.9)


def test_refusal_shows_what_remains_and_spends_nothing() -> None:
    state, outs = run([grant(0.25), request(spec(epsilon="0.2")), request(spec(epsilon="0.1", since="2026-10-31"))])
    assert isinstance(outs[1], DpQueryRefused)
    assert "epsilon 0.05 of 0.25 remains" in outs[1].detail
    assert outs[1].epsilon_remaining == pytest.approx(0.05)
    assert state is not None and state.spent_epsilon == Decimal("0.2") and state.refused == 1


def test_repeat_is_answered_with_the_query_that_paid() -> None:
    first = request(spec())
    again = request(spec())
    state, outs = run([grant(1.0), first, again])
    assert isinstance(outs[0], DpQueryCharged) and isinstance(outs[1], DpQueryRefused)
    assert outs[1].reason == "repeat" and outs[1].repeat_of == first.query_id
    assert state is not None and state.charged == 1 and state.spent_epsilon == Decimal("0.1")


def test_no_budget_and_composition_mismatch_are_refused() -> None:
    _, outs = run([request(spec())])
    assert isinstance(outs[0], DpQueryRefused) and outs[0].reason == "no-budget"
    _, outs = run([grant(1.0, 1e-6, "zcdp"), request(spec())])
    assert isinstance(outs[0], DpQueryRefused) and outs[0].reason == "composition-mismatch"


def test_grants_top_up_and_reject_a_change_of_accounting() -> None:
    state, _ = run([grant(0.5), grant(0.5)])
    assert state is not None and state.epsilon == Decimal("1.0")
    with pytest.raises(GrantRejected, match="top-up must repeat"):
        fold(state, grant(1.0, 1e-6, "zcdp"))
    with pytest.raises(GrantRejected, match="delta > 0"):
        fold(None, grant(1.0, 0.0, "zcdp"))


def test_zcdp_budget_converts_with_opendp_and_sums_rho() -> None:
    state, outs = run(
        [
            grant(1.0, 1e-6, "zcdp"),
            *(request(spec(composition="zcdp", epsilon="0.005", since=f"2026-10-{d:02d}")) for d in range(1, 11)),
        ]
    )
    assert state is not None and state.rho is not None
    charged = [o for o in outs if isinstance(o, DpQueryCharged)]
    # rho budget for (1, 1e-6) is ~0.0244: four charges of 0.005 fit (0.02), the fifth would not (0.025)
    assert len(charged) == 4
    assert state.spent_rho == Decimal("0.02")
    assert charged[-1].rho_remaining == pytest.approx(float(state.rho) - 0.02)
    assert 0 < charged[0].epsilon < charged[0].epsilon + charged[1].epsilon < 1.0
    assert all(o.reason == "exhausted" for o in outs if isinstance(o, DpQueryRefused))


def test_a_daily_budget_renews_each_day() -> None:
    day2 = T0 + timedelta(days=1)
    state, outs = run(
        [
            grant(0.1, period="day"),
            request(spec()),
            request(spec(since="2026-10-31")),
            request(spec(since="2026-10-30"), at=day2),
        ]
    )
    assert [type(o).__name__ for o in outs] == ["DpQueryCharged", "DpQueryRefused", "DpQueryCharged"]
    assert state is not None and state.period_key == day2.date().isoformat() and state.charged == 1


def test_replay_reproduces_every_decision_and_budget() -> None:
    log: list[Event] = [grant(0.3), grant(1.0, 1e-6, "zcdp", metric_set="savings")]
    for d in range(1, 6):
        log.append(request(spec(since=f"2026-10-{d:02d}")))
    sav = QuerySpec.parse(
        {
            "kind": "savings_distribution",
            "since": "2026-11-01",
            "until": "2026-11-01",
            "rho": "0.01",
            "savings_edges": [0],
        },
        "acme",
        "zcdp",
    )
    log += [request(sav), request(sav)]
    budgets, outs = replay(log)
    budgets2, outs2 = replay(log)
    assert budgets == budgets2 and outs == outs2  # same ids too: envelopes derive from the request
    assert budgets["acme/usage"].charged == 3 and budgets["acme/savings"].charged == 1
    assert [type(o).__name__ for o in outs].count("DpQueryRefused") == 3


def test_reallocation_pairs_near_exhaustion_with_unused() -> None:
    budgets, _ = replay([grant(0.2), grant(5.0, metric_set="savings"), request(spec())])
    report = reallocation(list(budgets.values()), near=0.5, unused=0.2)
    assert [r["metric_set"] for r in report["near_exhaustion"]] == ["usage"]
    assert [r["metric_set"] for r in report["unused"]] == ["savings"]
    assert report["suggestions"][0]["from_metric_set"] == "savings"
