"""The decision client, with the real policy and the real JSON-lines sink."""

import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopline.client import Decision, DecisionClient
from loopline.events import (
    DecisionEvent,
    ObservationEvent,
    parse_decision_json,
    parse_observation_json,
    validate_features,
)
from loopline.policy import EpsilonGreedyPolicy, ThresholdPolicy, policy_from_blueprint
from loopline.sinks import JsonLinesSink

REPO = Path(__file__).resolve().parent.parent
NOW_S = 1_793_527_200.25  # 2026-11-01T10:00:00.250Z


def context() -> dict:
    return {
        "user_id": "u0000042",
        "tenure_days": 120,
        "country": "KR",
        "platform": "ios",
        "hour_of_day": 19,
        "sends_last_7d": 3,
        "open_rate_30d": 0.31,
        "recent_clicks": [1.0, 0.0, 2.0, 0.0, 0.0, 1.0, 0.0],
        "topics": ["news", "sports"],
        "click_rate_90d": 0.12,
        "favourite_topic": "deals",
        "favourite_topic_match": 0,
        "email": "someone@example.com",
    }


class Scorer:
    """A model stand-in: a fixed score, remembering what it was asked to score."""

    model_id = "notify-00017"

    def __init__(self, score=0.8):
        self.score = score
        self.seen = []

    def __call__(self, features):
        self.seen.append(features)
        if isinstance(self.score, Exception):
            raise self.score
        return self.score


def logged(directory, blueprint, kind="decisions"):
    parse = parse_decision_json if kind == "decisions" else parse_observation_json
    events = []
    for path in sorted(directory.glob(f"{kind}-*.jsonl")):
        events += [parse(line, blueprint) for line in path.read_text().splitlines()]
    return events


def make_client(tmp_path, blueprint, **kwargs):
    sink = JsonLinesSink(tmp_path, clock=lambda: NOW_S)
    return DecisionClient(blueprint, sink, clock=lambda: NOW_S, **kwargs), sink


def test_without_a_scorer_the_blueprint_fallback_decides_and_is_logged(tmp_path, blueprint):
    client, sink = make_client(tmp_path, blueprint)
    result = client.get_decision("d-1", context())
    sink.close()
    assert result == Decision(
        decision=blueprint.fallback_decision,
        score=None,
        propensity=1.0,
        model_id=None,
        explored=False,
    )
    [event] = logged(tmp_path, blueprint)
    assert event == DecisionEvent(
        decision_id="d-1",
        decision_type="notify",
        event_time_ms=1_793_527_200_250,
        features=context(),
        blueprint_version=blueprint.version,
        decision=blueprint.fallback_decision,
        model_id=None,
        propensity=1.0,
    )
    assert client.stats["fallbacks"] == 1 and client.stats["scorer_errors"] == 0


def test_a_scored_decision_logs_the_policy_choice_and_its_propensity(tmp_path, blueprint):
    scorer = Scorer(0.8)
    client, sink = make_client(tmp_path, blueprint, scorer=scorer)
    policy = policy_from_blueprint(blueprint)
    results = {f"d-{i}": client.get_decision(f"d-{i}", context()) for i in range(300)}
    sink.close()
    events = {e.decision_id: e for e in logged(tmp_path, blueprint)}
    assert len(events) == 300
    for decision_id, result in results.items():
        choice = policy.choose(0.8, decision_id)
        assert (result.decision, result.propensity, result.explored) == (
            choice.decision,
            choice.propensity,
            choice.explored,
        )
        assert events[decision_id].decision == choice.decision
        assert events[decision_id].propensity == choice.propensity
        assert events[decision_id].model_id == "notify-00017" == result.model_id
        assert result.score == 0.8
    # epsilon-greedy explores now and then, and those decisions carry the small propensity
    explored = [r for r in results.values() if r.explored and r.decision == 0]
    assert explored and all(r.propensity == pytest.approx(0.025) for r in explored)


def test_the_logged_features_are_exactly_those_scored(tmp_path, blueprint):
    scorer = Scorer(0.3)
    client, sink = make_client(tmp_path, blueprint, scorer=scorer)
    ctx = context()
    client.get_decision("d-1", ctx)
    ctx["recent_clicks"].append(9.0)  # the product reuses its dict afterwards
    ctx["country"] = "US"
    sink.close()
    [event] = logged(tmp_path, blueprint)
    assert event.features == context() == scorer.seen[0]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c: c.pop("country"), "'country' .* missing"),
        (lambda c: c.update(favourite_color="red"), "'favourite_color' is not in blueprint"),
        (lambda c: c.update(tenure_days="120"), "'tenure_days' must be int"),
        (lambda c: c.update(topics="news"), "'topics' must be string_list"),
    ],
)
def test_a_context_that_breaks_the_blueprint_is_refused_and_not_logged(
    tmp_path, blueprint, change, message
):
    client, sink = make_client(tmp_path, blueprint, scorer=Scorer())
    ctx = context()
    change(ctx)
    with pytest.raises(ValueError, match=message):
        client.get_decision("d-1", ctx)
    with pytest.raises(ValueError, match="decision_id"):
        client.get_decision("", context())
    sink.close()
    assert logged(tmp_path, blueprint) == []
    assert client.stats["decisions"] == 0


@pytest.mark.parametrize("bad_score", [RuntimeError("model crashed"), math.nan, "high"])
def test_a_failing_scorer_falls_back_without_failing_the_request(tmp_path, blueprint, bad_score):
    client, sink = make_client(tmp_path, blueprint, scorer=Scorer(bad_score))
    result = client.get_decision("d-1", context())
    sink.close()
    assert result.decision == blueprint.fallback_decision
    assert (result.score, result.propensity, result.model_id) == (None, 1.0, None)
    [event] = logged(tmp_path, blueprint)
    assert event.model_id is None and event.propensity == 1.0
    assert client.stats == {"decisions": 1, "fallbacks": 1, "scorer_errors": 1, "observations": 0}


def test_an_explicit_policy_and_model_id_win(tmp_path, blueprint):
    client, sink = make_client(
        tmp_path, blueprint, scorer=Scorer(0.4), policy=ThresholdPolicy(0.3), model_id="m-2"
    )
    result = client.get_decision("d-1", context())
    sink.close()
    assert (result.decision, result.propensity, result.model_id) == (1, 1.0, "m-2")
    assert logged(tmp_path, blueprint)[0].model_id == "m-2"


def test_observations_are_logged_now_or_at_the_given_time(tmp_path, blueprint):
    client, sink = make_client(tmp_path, blueprint)
    first = client.log_observations("d-1", {"click": 1})
    second = client.log_observations(
        "d-1", {"dwell_seconds": 12.5}, event_time_ms=1_793_527_260_000
    )
    with pytest.raises(ValueError, match="'click'.*must be a number"):
        client.log_observations("d-1", {"click": "yes"})
    with pytest.raises(ValueError, match="decision_id"):
        client.log_observations(None, {"click": 1})
    sink.close()
    assert logged(tmp_path, blueprint, "observations") == [
        ObservationEvent("d-1", 1_793_527_200_250, {"click": 1}),
        ObservationEvent("d-1", 1_793_527_260_000, {"dwell_seconds": 12.5}),
    ]
    assert [first, second] == logged(tmp_path, blueprint, "observations")
    assert client.stats["observations"] == 2


def test_one_client_serves_many_threads(tmp_path, blueprint):
    sink = JsonLinesSink(tmp_path, max_bytes=8192)
    client = DecisionClient(
        blueprint, sink, scorer=Scorer(0.9), policy=EpsilonGreedyPolicy(0.5, 0.1)
    )

    def product(t):
        for i in range(200):
            client.get_decision(f"d-{t}-{i}", context())
            client.log_observations(f"d-{t}-{i}", {"click": 1})

    threads = [threading.Thread(target=product, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sink.close()
    decisions = logged(tmp_path, blueprint)
    assert len({d.decision_id for d in decisions}) == 1200
    assert all(isinstance(d, DecisionEvent) for d in decisions)
    assert len(logged(tmp_path, blueprint, "observations")) == 1200
    assert client.stats["decisions"] == 1200 and client.stats["observations"] == 1200


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=5),
    st.lists(st.one_of(st.integers(0, 3), st.floats(0, 3), st.text(max_size=3)), max_size=3),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    replaced=st.dictionaries(st.sampled_from(sorted(context()) + ["extra"]), _values, max_size=3),
    removed=st.sets(st.sampled_from(sorted(context())), max_size=2),
)
def test_any_context_is_either_refused_or_logged_as_a_valid_event(
    tmp_path_factory, blueprint, replaced, removed
):
    directory = tmp_path_factory.mktemp("client")
    client, sink = make_client(directory, blueprint, scorer=Scorer(0.6))
    ctx = {k: v for k, v in {**context(), **replaced}.items() if k not in removed}
    problem = validate_features(ctx, blueprint)
    if problem:
        with pytest.raises(ValueError):
            client.get_decision("d-1", ctx)
    else:
        client.get_decision("d-1", ctx)
    sink.close()
    events = logged(directory, blueprint)
    assert len(events) == (0 if problem else 1)
    assert all(isinstance(e, DecisionEvent) and e.features == ctx for e in events)


def test_a_product_service_importing_the_client_and_scorer_does_not_import_beam_or_tensorflow():
    script = (
        "import sys, loopline.client, loopline.scorer\n"
        "assert 'apache_beam' not in sys.modules, 'apache_beam imported'\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_a_product_service_scoring_with_a_local_saved_model_never_imports_beam(tmp_path, blueprint):
    """Resolving the production alias, loading the SavedModel, encoding and scoring a row: all
    with TensorFlow and loopline alone (the score is the model's own, computed apart)."""
    from loopline.examples import features_to_example
    from tests.scoring_fixtures import export_scoring_model, make_decisions, score_serialized

    version = export_scoring_model(blueprint, tmp_path / "serving" / "1793534400", seed=3)
    features = make_decisions(blueprint, 1, seed=5)[0].features
    script = (
        "import json, sys\n"
        "import loopline.client, loopline.scorer\n"
        "from loopline.blueprint import load_blueprint\n"
        "blueprint = load_blueprint(sys.argv[1])\n"
        "scorer = loopline.scorer.SavedModelScorer(sys.argv[2], blueprint, key=b'k')\n"
        "print(json.dumps([scorer.model_id, scorer(json.loads(sys.argv[3]))]))\n"
        "assert 'apache_beam' not in sys.modules, 'apache_beam imported'\n"
    )
    argv = [blueprint.source, str(tmp_path / "serving"), json.dumps(features)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        [sys.executable, "-c", script, *argv], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    model_id, score = json.loads(done.stdout.strip().splitlines()[-1])
    example = features_to_example(features, blueprint, b"k").SerializeToString()
    expected = score_serialized(version, [example])[0]
    assert model_id == "notify-1793534400" and score == pytest.approx(float(expected), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Rollout: production and challenger serve side by side, each unit in one arm

import dataclasses  # noqa: E402 - this section's own imports
import json  # noqa: E402


def named_scorer(score, model_id):
    scorer = Scorer(score)
    scorer.model_id = model_id
    return scorer


def user_context(user_id):
    return {**context(), "user_id": user_id}


def decide_for_users(client, users, prefix="d"):
    return {user: client.get_decision(f"{prefix}-{user}", user_context(user)) for user in users}


USERS = [f"u{i:07d}" for i in range(2000)]


def test_a_scored_decision_event_carries_the_score_and_no_arm_without_a_challenger(
    tmp_path, blueprint
):
    client, sink = make_client(tmp_path, blueprint, scorer=Scorer(0.3))
    client.get_decision("d-1", context())
    sink.close()
    [event] = logged(tmp_path, blueprint)
    assert event.score == 0.3 and event.model_id == "notify-00017"
    assert event.arm is None


def test_the_challenger_serves_about_its_share_of_units(tmp_path, blueprint):
    client, sink = make_client(
        tmp_path, blueprint, scorer=named_scorer(0.8, "prod"), challenger=named_scorer(0.8, "new")
    )
    results = decide_for_users(client, USERS)
    sink.close()
    share = sum(r.arm == "challenger" for r in results.values()) / len(USERS)
    assert blueprint.rollout.challenger_share == 0.2
    assert 0.17 < share < 0.23  # 2000 units: the binomial's sd is 0.009


def test_a_unit_keeps_its_arm_across_clients_and_processes(tmp_path, blueprint):
    arms = []
    for name in ("a", "b"):
        client, sink = make_client(
            tmp_path / name, blueprint, scorer=Scorer(0.8), challenger=Scorer(0.8)
        )
        arms.append({u: r.arm for u, r in decide_for_users(client, USERS[:200], name).items()})
        sink.close()
    script = (
        "import json, sys; from loopline.blueprint import load_blueprint; "
        "from loopline.experiment import assign_arm; b = load_blueprint(sys.argv[1]); "
        "print(json.dumps({u: assign_arm(u, b.rollout) for u in json.loads(sys.argv[2])}))"
    )
    other = subprocess.run(
        [sys.executable, "-c", script, blueprint.source, json.dumps(USERS[:200])],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},
    )
    assert arms[0] == arms[1] == json.loads(other.stdout)
    assert set(arms[0].values()) == {"production", "challenger"}


def test_each_arm_is_scored_by_its_own_model(tmp_path, blueprint):
    production, challenger = named_scorer(0.8, "prod"), named_scorer(0.35, "new")
    client, sink = make_client(tmp_path, blueprint, scorer=production, challenger=challenger)
    results = decide_for_users(client, USERS[:300])
    sink.close()
    by_arm = {"production": ("prod", 0.8), "challenger": ("new", 0.35)}
    for event in logged(tmp_path, blueprint):
        assert (event.model_id, event.score) == by_arm[event.arm]
        assert event.propensity == results[event.features["user_id"]].propensity
    served = {arm: {f["user_id"] for f in s.seen} for arm, s in
              (("production", production), ("challenger", challenger))}  # fmt: skip
    for user, result in results.items():
        assert user in served[result.arm] and result.model_id == by_arm[result.arm][0]
    assert served["production"].isdisjoint(served["challenger"])


def test_a_failing_challenger_falls_back_within_its_arm(tmp_path, blueprint):
    client, sink = make_client(
        tmp_path,
        blueprint,
        scorer=named_scorer(0.8, "prod"),
        challenger=named_scorer(RuntimeError("broken model"), "new"),
    )
    results = decide_for_users(client, USERS[:300])
    sink.close()
    events = logged(tmp_path, blueprint)
    challenged = [e for e in events if e.arm == "challenger"]
    assert challenged and client.stats["scorer_errors"] == len(challenged)
    for event in challenged:
        assert (event.model_id, event.score, event.propensity) == (None, None, 1.0)
        assert event.decision == blueprint.fallback_decision
    assert all(e.model_id == "prod" for e in events if e.arm == "production")
    assert {r.arm for r in results.values()} == {"production", "challenger"}


def test_without_a_production_model_the_production_arm_gets_the_fallback(tmp_path, blueprint):
    client, sink = make_client(tmp_path, blueprint, challenger=named_scorer(0.8, "first"))
    decide_for_users(client, USERS[:300])
    sink.close()
    events = logged(tmp_path, blueprint)
    assert {e.arm for e in events} == {"production", "challenger"}
    for event in events:
        if event.arm == "production":
            assert (event.model_id, event.score) == (None, None)
        else:
            assert (event.model_id, event.score) == ("first", 0.8)


def test_a_decision_without_a_unit_value_goes_to_production(tmp_path, blueprint):
    client, sink = make_client(tmp_path, blueprint, scorer=Scorer(0.8), challenger=Scorer(0.8))
    assert client.get_decision("d-1", user_context("")).arm == "production"
    sink.close()


def test_the_challenger_model_id_argument_wins(tmp_path, blueprint):
    client, sink = make_client(
        tmp_path,
        blueprint,
        scorer=Scorer(0.8),
        challenger=named_scorer(0.8, "attribute"),
        challenger_model_id="argument",
    )
    results = decide_for_users(client, USERS[:100])
    sink.close()
    assert {r.model_id for r in results.values() if r.arm == "challenger"} == {"argument"}


def test_a_challenger_without_a_rollout_section_is_refused(tmp_path, blueprint):
    without = dataclasses.replace(blueprint, rollout=None)
    with pytest.raises(ValueError, match="challenger needs a rollout section"):
        make_client(tmp_path, without, scorer=Scorer(0.8), challenger=Scorer(0.8))
