"""Routing, pure parts: features, the capped exploration and its propensities, priors snapshots,
the priors fold, and `route-eval` on a synthetic file (three models, none of the dev file's)."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest

from domain.pricing import Price
from domain.routing import Candidate, Exploration, Priors, Weights, choose, unit_draw
from domain.routing_features import FeatureConfig, context_key, features
from domain.routing_priors import LearnerState, fold, publish
from ledgerflow import route_eval
from streams.codec import Codec
from streams.events import (
    AdapterCalled,
    AdapterFailed,
    Envelope,
    FeedbackReceived,
    RouteChosen,
    RoutingPriorsPublished,
    RoutingRegretRecorded,
)
from streams.ids import uuid7

CODE = "def add(a, b):\n    return a + b\n# why does this function() fail?"
PLAIN = "Tell me about the history of the city of Lyon and its bridges."


# --- features -------------------------------------------------------------------------------


def test_features_are_deterministic_bounded_and_see_code_maths_and_script() -> None:
    x = features(CODE)
    assert x == features(CODE)  # CRC-32 buckets: no per-process hash salt
    assert all(-1.0 <= v <= 1.0 for v in x.values())
    assert x["code"] > 0 and features(PLAIN)["code"] == 0
    assert features("Solve the equation x^2 + 3x = 10")["math_share"] > 0
    assert features("日本の首都はどこですか")["script_cjk"] > 0.9
    assert features("Какая столица России?")["script_cyrillic"] > 0.9
    assert {k for k in x if k.startswith("h")} <= {f"h{i}" for i in range(FeatureConfig().buckets)}
    assert context_key(x).split("|")[1] == "code"
    assert features(PLAIN * 200)["len_long"] == 1.0


def test_script_and_symbol_counts_match_a_plain_per_character_count() -> None:
    """The byte-level counts (fast on any text) agree with the obvious definition, mixed scripts included."""
    text = "Привет, мир! 日本語 x² + √9 = 3, naïve “café” ½ 42 ∑ Ελλάδα \ud800 end"
    x = features(text)
    letters = sum(1 for ch in text if ch.isalnum() and not ch.isdecimal())  # the regex's [^\W\d_]: ² and ½ count
    assert x["script_cyrillic"] == pytest.approx(sum("\u0400" <= c <= "\u04ff" for c in text) / letters)
    assert x["script_cjk"] == pytest.approx(3 / letters)
    assert x["script_other"] == pytest.approx(6 / letters)  # Ελλάδα
    assert x["digit_share"] == pytest.approx(min(1.0, 4 * sum(c in "0123456789" for c in text) / len(text)))
    maths = sum(c in "=+-*/^<>√∑∫π θ∞≤≥±×÷".replace(" ", "") for c in text)
    assert x["math_share"] == pytest.approx(min(1.0, 8 * maths / len(text)))


def test_words_come_from_a_bounded_head_and_older_priors_keep_theirs() -> None:
    long = PLAIN + " " + " ".join(f"w{i}x" for i in range(2000))
    short, legacy = features(long), features(long, FeatureConfig(ngram_chars=4000))
    assert {k: v for k, v in short.items() if not k.startswith("h") and k != "word_len"} == {
        k: v for k, v in legacy.items() if not k.startswith("h") and k != "word_len"
    }  # length, markers and script see the whole prompt either way
    assert short != legacy
    assert FeatureConfig.from_dict({"version": "f1", "buckets": 16, "bigrams": True}).ngram_chars == 4000
    cfg = FeatureConfig(buckets=8, ngram_chars=512)
    assert FeatureConfig.from_dict(cfg.as_dict()) == cfg  # priors carry it


# --- the decision ---------------------------------------------------------------------------


def _trained(rounds: int = 200) -> Priors:
    """`big` is right on code, `small` is not; both are right on plain prompts."""
    priors = Priors()
    rng = random.Random(1)
    for i in range(rounds):
        is_code = i % 2 == 0
        x = priors.features((CODE if is_code else PLAIN) + f" {rng.random()}")
        priors.learn_quality("big", x, 1.0)
        priors.learn_quality("small", x, 0.0 if is_code else 1.0)
    return priors


CANDS = [Candidate("big", Decimal("0.01")), Candidate("small", Decimal("0.001"))]


def test_the_router_sends_code_to_the_model_that_gets_it_right_and_plain_to_the_cheap_one() -> None:
    priors = _trained()
    w, ex = Weights(1.0, 0.2), Exploration(cap=0.1)
    code = choose(priors, priors.features(CODE), CANDS, w, ex, "r1")
    plain = choose(priors, priors.features(PLAIN), CANDS, w, ex, "r2")
    assert code.greedy == "big" and plain.greedy == "small"
    assert code.candidates[0].model == "big" and code.candidates[0].quality > code.candidates[1].quality + 0.5


def test_propensities_are_exact_capped_and_never_on_a_forbidden_model() -> None:
    priors = Priors()  # nothing learned: the most uncertain case, exploration wants the most
    x = priors.features(PLAIN)
    cands = [*CANDS, Candidate("eu-only", Decimal("0.0001"), allowed=False, excluded_by="region")]
    ex = Exploration(cap=0.1)
    seen: dict[str, int] = {}
    for i in range(2000):
        c = choose(priors, x, cands, Weights(1.0, 0.05), ex, f"req-{i}")
        probs = {s.model: s.probability for s in c.candidates}
        assert probs["eu-only"] == 0.0 and c.model != "eu-only"
        assert sum(probs.values()) == pytest.approx(1.0)
        assert 1.0 - probs[c.greedy] <= ex.cap + 1e-12
        assert c.propensity == probs[c.model] > 0
        assert [s.model for s in c.candidates][-1] == "eu-only"  # forbidden ones listed last, with the reason
        assert c.candidates[-1].excluded_by == "region"
        seen[c.model] = seen.get(c.model, 0) + 1
    greedy_p = probs[c.greedy]
    assert seen[c.greedy] / 2000 == pytest.approx(greedy_p, abs=0.03)  # the logged propensity is the real rate


def test_the_choice_is_a_function_of_the_request_id() -> None:
    priors = _trained(40)
    x = priors.features(CODE)
    a = [choose(priors, x, CANDS, Weights(), Exploration(0.4), f"id-{i}").model for i in range(50)]
    b = [choose(priors, x, CANDS, Weights(), Exploration(0.4), f"id-{i}").model for i in range(50)]
    assert a == b
    assert unit_draw("x") == unit_draw("x") != unit_draw("y")


def test_no_allowed_candidate_is_refused() -> None:
    with pytest.raises(ValueError, match="no allowed candidate"):
        choose(Priors(), {"bias": 1.0}, [Candidate("m", allowed=False)], Weights(), Exploration(), "r")
    with pytest.raises(ValueError):
        Weights(0, 0, 0)
    with pytest.raises(ValueError):
        Exploration(cap=0.1, floor=0.2)


def test_priors_snapshot_round_trips_exactly() -> None:
    priors = _trained(60)
    priors.learn_latency("big", 900.0)
    priors.learn_cost("big", Decimal("0.000123000000"))
    priors.learn_completion("small", 40)
    text = priors.to_json()
    back = Priors.from_json(text, "v2")
    assert back.to_json() == text and back.sha256() == priors.sha256()
    for prompt in (CODE, PLAIN):
        x = priors.features(prompt)
        for m in ("big", "small"):
            assert back.predict(m, x) == pytest.approx(priors.predict(m, x), rel=1e-9, abs=1e-12)
    assert back.models["big"].cost_sum == Decimal("0.000123000000")
    # learning goes on from the restored posterior as from the original
    x = priors.features(CODE)
    priors.learn_quality("small", x, 1.0)
    back.learn_quality("small", x, 1.0)
    assert back.predict("small", x) == pytest.approx(priors.predict("small", x), rel=1e-9)


def test_priors_of_another_algorithm_are_refused() -> None:
    raw = json.loads(Priors().to_json())
    raw["meta"]["algorithm"] = "beta-bernoulli"
    with pytest.raises(ValueError, match="algorithm"):
        Priors.from_json(json.dumps(raw))


# --- the priors fold ------------------------------------------------------------------------

T0 = datetime(2026, 11, 29, 1, 0, tzinfo=UTC)


def _env(kind: str, tenant: str, rid: str, at: datetime) -> Envelope:
    return Envelope(str(uuid7()), kind, 1, tenant, at, rid, "gateway")


def _route(tenant: str, rid: str, model: str, text: str, at: datetime, scores: tuple[float, float]) -> RouteChosen:
    return RouteChosen(
        envelope=_env("RouteChosen", tenant, rid, at),
        request_id=rid,
        attempt=1,
        strategy="bandit",
        context_key="s",
        priors_version="none",
        candidates=[
            {"model": "big", "score": scores[0], "allowed": True, "excluded_by": None},
            {"model": "small", "score": scores[1], "allowed": True, "excluded_by": None},
        ],
        chosen_model=model,
        propensity=0.9,
        features=features(text),
    )


def _feedback(tenant: str, rid: str, score: float, at: datetime) -> FeedbackReceived:
    return FeedbackReceived(
        envelope=_env("FeedbackReceived", tenant, rid, at), request_id=rid, api_key_id="k", score=score
    )


def _history() -> list[RouteChosen | FeedbackReceived]:
    events: list[RouteChosen | FeedbackReceived] = []
    for i in range(60):
        at = T0 + timedelta(seconds=i)
        rid = str(uuid7())
        model = "big" if i % 3 else "small"
        route = _route("acme", rid, model, CODE + str(i), at, (0.9, 0.5))  # `small` scored lower: explored
        fb = _feedback("acme", rid, 1.0 if model == "big" else 0.0, at + timedelta(milliseconds=5))
        events += [fb, route] if i % 2 else [route, fb]  # either may come first
    return events


def test_the_fold_joins_feedback_to_routes_in_either_order_and_publishes_deterministically() -> None:
    state = LearnerState()
    for e in _history():
        fold(state, e)
    assert state.priors.feedback_count == 60
    x = features(CODE + "x")
    assert state.priors.predict("big", x)[0] > state.priors.predict("small", x)[0] + 0.5
    out = publish(state)
    priors_event, regret = out
    assert isinstance(priors_event, RoutingPriorsPublished) and isinstance(regret, RoutingRegretRecorded)
    assert priors_event.feedback_count == 60 and priors_event.previous_version is None
    assert priors_event.trained_until == T0 + timedelta(seconds=59, milliseconds=5)
    assert (regret.tenant, regret.routed, regret.explored) == ("acme", 60, 20)  # 20 choices of `small` scored 0.5
    assert regret.regret == pytest.approx(20 * 0.4) and regret.cumulative_regret == pytest.approx(8.0)
    assert publish(state) == []  # nothing new
    # a replay of the same facts publishes byte-identical events
    again = LearnerState()
    for e in _history():
        fold(again, e)
    codec = Codec()
    replayed = publish(again)
    assert replayed[0].priors == priors_event.priors and replayed[0].version == priors_event.version
    assert codec.encode(replayed[0]) == codec.encode(priors_event)
    assert all(codec.decode(codec.encode(e)) == e for e in out)  # valid envelopes, as consumers check them
    # resuming from what was published continues the version chain and the cumulative regret
    resumed = LearnerState.resume(priors_event, [regret])
    fold(resumed, _route("acme", str(uuid7()), "small", PLAIN, T0 + timedelta(minutes=5), (0.8, 0.3)))
    nxt = publish(resumed)
    assert nxt[0].previous_version == priors_event.version  # type: ignore[attr-defined]
    assert nxt[1].cumulative_regret == pytest.approx(8.5) and nxt[1].cumulative_routed == 61  # type: ignore[attr-defined]


def test_adapter_outcomes_feed_the_latency_term_and_failures_are_skipped() -> None:
    state = LearnerState()
    for i, (model, ms) in enumerate([("big", 900), ("big", 1100), ("small", 150)]):
        at = T0 + timedelta(seconds=i)
        rid = str(uuid7())
        fold(state, AdapterCalled(_env("AdapterCalled", "acme", rid, at), rid, model, "sim", 200, 0, ms, False, 5, 9))
    lost = str(uuid7())
    fold(state, AdapterFailed(_env("AdapterFailed", "acme", lost, T0), lost, "big", "sim", "timeout", 2, 30_000, False))
    assert state.unpublished == 3  # the failure is not a latency sample
    assert state.priors.models["big"].latency_ms(0) == 1000.0 and state.priors.models["small"].latency_ms(0) == 150.0
    [published] = publish(state)
    assert isinstance(published, RoutingPriorsPublished)
    back = Priors.from_json(published.priors, published.version)
    assert back.models["big"].latency_n == 2 and back.models["big"].latency_ms(0) == 1000.0
    # and the decision weighs it: with a latency weight the slow model loses a tie on quality
    slow, fast = Candidate("big", Decimal(1), 1000.0), Candidate("small", Decimal(1), 150.0)
    choice = choose(Priors(), features(PLAIN), [slow, fast], Weights(1.0, 0.0, 0.5), Exploration(0.0), "r")
    assert choice.model == "small" and choice.candidates[0].model == "small"


def test_feedback_from_another_tenant_never_teaches_from_this_tenants_request() -> None:
    state = LearnerState()
    rid = str(uuid7())
    fold(state, _route("acme", rid, "big", CODE, T0, (0.9, 0.5)))
    fold(state, _feedback("globex", rid, 0.0, T0))  # same request id, other tenant
    assert state.priors.feedback_count == 0
    fold(state, _feedback("acme", rid, 1.0, T0))
    assert state.priors.feedback_count == 1


# --- route-eval -----------------------------------------------------------------------------

MODELS = {"alpha-xl": ("5", "15"), "beta-m": ("1", "3"), "gamma-s": ("0.1", "0.3")}


def _synthetic(path: Path, n: int = 900) -> Path:
    """Three models with a hidden rule by topic: only `alpha-xl` gets maths right; `beta-m` does
    prose as well as `alpha-xl`; `gamma-s` gets half the prose right. Topics come in runs."""
    rng = random.Random(7)
    topics = ["maths", "prose", "trivia"]
    with path.open("w") as fh:
        for i in range(n):
            topic = topics[(i // 50) % 3]
            if topic == "maths":
                prompt = f"Solve the equation {rng.randint(2, 99)}x + {rng.randint(1, 9)} = {rng.randint(10, 999)}"
                q = {"alpha-xl": 1, "beta-m": int(rng.random() < 0.3), "gamma-s": int(rng.random() < 0.1)}
            elif topic == "prose":
                prompt = f"Write a short poem about the {rng.choice(['sea', 'wind', 'moon', 'forest'])} at dusk"
                q = {"alpha-xl": 1, "beta-m": 1, "gamma-s": int(rng.random() < 0.5)}
            else:
                prompt = f"Which river flows through {rng.choice(['Paris', 'Rome', 'Vienna', 'Cairo'])}?"
                q = {m: 1 for m in MODELS}
            row = {"id": f"s-{i}", "source": topic, "prompt": prompt}
            row["outcomes"] = {m: {"quality": v, "completion_chars": 40} for m, v in q.items()}
            fh.write(json.dumps(row) + "\n")
    return path


def _prices() -> dict[str, Price]:
    return route_eval.resolve_prices(MODELS, {}, [f"{m}={i}/{o}" for m, (i, o) in MODELS.items()])


def test_route_eval_on_any_models_beats_random_mixing_when_there_is_something_to_learn(tmp_path: Path) -> None:
    rows = route_eval.load_rows(_synthetic(tmp_path / "synthetic.jsonl"))
    report = route_eval.evaluate(rows, _prices(), cost_weight=0.1, sweep=(0.0, 0.05, 0.1, 0.3, 1.0))
    assert report["strongest"] == "alpha-xl" and report["cheapest"] == "gamma-s"
    router, strongest, cheapest, mixing = report["policies"][:4]
    assert strongest["quality_share_of_best"] == 1.0 and strongest["cost_vs_strongest"] == 1.0
    assert cheapest["calls"]["gamma-s"] == 1.0 and cheapest["cost_vs_strongest"] < 0.1
    assert sum(router["calls"].values()) == pytest.approx(1.0)
    # it learns the rule: near the strongest's quality at a fraction of its cost, ahead of mixing
    assert router["quality_share_of_best"] > 0.95
    assert router["cost_vs_strongest"] < 0.6
    assert router["quality"] > mixing["quality"] + 0.02
    assert router["regret"] < mixing["regret"]
    shares = [c["strong_share"] for c in report["curve"]]
    assert shares == sorted(shares, reverse=True)  # dearer counts for more: fewer calls to the strongest
    assert report["router_share_for_95"] is not None
    assert report["router_share_for_95"] < report["mixing_share_for_95"]
    assert "random mixing" in route_eval.format_report(report)


def test_route_eval_split_by_source_and_saved_priors(tmp_path: Path) -> None:
    rows = route_eval.load_rows(_synthetic(tmp_path / "synthetic.jsonl", 600))
    saved = tmp_path / "priors.json"
    report = route_eval.evaluate(
        rows, _prices(), split_by="row", train_fraction=0.5, train_feedback="full", sweep=(0.1,), save_priors=saved
    )
    assert report["rows"] == {"train": 300, "eval": 300}
    priors = Priors.from_json(saved.read_text())
    assert priors.feedback_count == 300 * 3  # full feedback: every model's outcome on every training row
    again = route_eval.evaluate(rows, _prices(), split_by="row", train_fraction=0.5, priors_from=saved, sweep=(0.1,))
    assert again["policies"][0]["quality"] >= report["policies"][3]["quality"]
    train, held = route_eval.split(rows, "source", 0.5)
    assert train and held and not {r.source for r in train} & {r.source for r in held}


def test_route_eval_refuses_a_model_without_a_price(tmp_path: Path) -> None:
    rows = route_eval.load_rows(_synthetic(tmp_path / "synthetic.jsonl", 30))
    with pytest.raises(ValueError, match="no price for alpha-xl, beta-m"):
        route_eval.resolve_prices(rows[0].quality, {}, ["gamma-s=0.1/0.3"])
    mapped = route_eval.resolve_prices(
        rows[0].quality,
        route_eval.catalogue(None),
        ["gamma-s=0.1/0.3"],
        mapping=["alpha-xl=sim-large", "beta-m=sim-small"],
    )
    assert mapped["alpha-xl"].output_per_mtok == Decimal("10.00")


def test_route_eval_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ledgerflow import cli

    data = _synthetic(tmp_path / "synthetic.jsonl", 150)
    args = ["route-eval", "--data", str(data), "--cost-weight", "0.1", "--json"]
    args += [a for m, (i, o) in MODELS.items() for a in ("--price", f"{m}={i}/{o}")]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["models"] == sorted(MODELS) and len(report["curve"]) == len(route_eval.DEFAULT_SWEEP)
    assert cli.main(["route-eval", "--data", str(data)]) == 1  # no prices: a clear error, not a guess
    assert "no price for" in capsys.readouterr().err


def test_the_fast_posterior_is_rivers_own() -> None:
    """`ArmModel.predict` reads river's state without building a distribution: same numbers."""
    from domain.routing import ArmModel

    arm, rng = ArmModel(), random.Random(1)
    words = ["a", "b", "c", "def", "x", "=", "y", "(", ")", "while", "the", "river", "42"]
    texts = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) for _ in range(120)]
    for t in texts[:100]:
        arm.learn(features(t), float(rng.random() < 0.5))
    for t in texts[100:]:
        x = {**features(t), "never-seen": 0.3}
        dist = arm.blr.predict_one(x, with_dist=True)
        mean, std = arm.predict(x)
        assert mean == pytest.approx(dist.mu, abs=1e-9)
        assert std**2 == pytest.approx(dist.sigma**2 - 1 / arm.beta, abs=1e-9)


def test_the_gateway_router_lists_what_the_policy_forbids_and_never_picks_it() -> None:
    from domain.pricing import DEFAULT_PRICES
    from gateway.router import Router

    router = Router(exploration=Exploration(cap=0.5))
    prices = {**DEFAULT_PRICES, "sim-eu": Price("sim-eu", Decimal("0.1"), Decimal("0.4"), "USD", "t")}
    models = ["sim-small", "sim-large", "sim-eu"]
    for i in range(300):
        choice, x = router.decide(
            "acme", f"r{i}", CODE, models, ["sim-small", "sim-large"], prices, 20, 1000, max_cost=Decimal("0.005")
        )
        why = {c.model: c.excluded_by for c in choice.candidates}
        # sim-eu: not in an allowed region; sim-large: 20 + 1000 tokens could cost 0.01005 > the 0.005 cap
        assert why == {"sim-small": None, "sim-large": "cost_cap", "sim-eu": "region"}
        assert choice.model == "sim-small" and choice.propensity == 1.0
    assert x == features(CODE)
