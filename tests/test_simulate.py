"""The product simulator: deterministic, and what it reports is what its files hold."""

import dataclasses
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loopline.blueprint import parse_blueprint
from loopline.events import (
    DeadLetter,
    DecisionEvent,
    ObservationEvent,
    parse_decision_json,
    parse_observation_json,
)
from loopline.simulate import (
    BASE_CLICK_LOGIT,
    FaultRates,
    ResponseModel,
    Simulator,
    main,
    parse_start,
    roc_auc,
    scenario_scorers,
)

REPO = Path(__file__).resolve().parent.parent
START_MS = parse_start("2026-11-01")
FAULTS = FaultRates(duplicate=0.05, orphan=0.03, malformed=0.03)


def read_kind(directory: Path, prefix: str, parse, blueprint) -> list:
    assert not list(directory.glob("*.inprogress"))
    parsed = []
    for path in sorted(directory.glob(f"{prefix}-*.jsonl")):
        text = path.read_text()
        assert text.endswith("\n")
        parsed += [(line, parse(line, blueprint)) for line in text.splitlines()]
    return parsed


@pytest.fixture(scope="module")
def simulated(tmp_path_factory, blueprint):
    """1500 decisions over two days, scored with the hidden truth so some are not sent."""
    output = tmp_path_factory.mktemp("logs")
    sim = Simulator(blueprint, seed=3, faults=FAULTS)
    sim.scorer = lambda features: sim.response.click_probability(features) * 4
    report = sim.run(output, decisions=1500, days=2, start_ms=START_MS)
    return output, report


def test_the_same_seed_writes_byte_identical_files(tmp_path, blueprint):
    def run(name, seed):
        Simulator(blueprint, seed=seed, faults=FAULTS).run(
            tmp_path / name, decisions=400, days=2, start_ms=START_MS
        )
        return {p.name: p.read_bytes() for p in sorted((tmp_path / name).iterdir())}

    first, again, other = run("a", 5), run("b", 5), run("c", 6)
    assert first == again
    assert first.keys() != other.keys() or first != other
    assert {"truth.jsonl", "simulation.json"} <= first.keys()


def test_reported_counts_match_the_files(simulated, blueprint):
    output, report = simulated
    counts = report["counts"]
    decision_lines = read_kind(output, "decisions", parse_decision_json, blueprint)
    observation_lines = read_kind(output, "observations", parse_observation_json, blueprint)
    assert len(decision_lines) == counts["decision_lines"]
    assert len(observation_lines) == counts["observation_lines"]

    # malformed lines: every one is refused, for the reason the report gives
    decision_refusals = Counter(e.reason for _, e in decision_lines if isinstance(e, DeadLetter))
    observation_refusals = Counter(
        e.reason for _, e in observation_lines if isinstance(e, DeadLetter)
    )
    assert sum(decision_refusals.values()) == counts["malformed_decision_lines_injected"] > 0
    assert sum(observation_refusals.values()) == counts["malformed_observation_lines_injected"] > 0
    assert decision_refusals == report["malformed_by_reason"]["decision"]
    assert observation_refusals == report["malformed_by_reason"]["observation"]

    # duplicate decisions are exact re-deliveries of a decision already logged
    decisions = [(line, e) for line, e in decision_lines if isinstance(e, DecisionEvent)]
    first = {}
    for line, event in decisions:
        assert first.setdefault(event.decision_id, line) == line
    assert len(first) == counts["decisions"] == 1500
    assert len(decisions) - len(first) == counts["duplicate_decisions_injected"] > 0

    # observations: orphans have no decision; exact repeats are the injected duplicates
    observations = [(line, e) for line, e in observation_lines if isinstance(e, ObservationEvent)]
    orphans = [e for _, e in observations if e.decision_id not in first]
    assert len(orphans) == counts["orphan_observations_injected"] > 0
    known = Counter(line for line, e in observations if e.decision_id in first)
    assert sum(known.values()) - len(known) == counts["duplicate_observations_injected"] > 0
    assert len(known) == counts["observations"]

    truth = [json.loads(x) for x in (output / "truth.jsonl").read_text().splitlines()]
    assert [row["decision_id"] for row in truth] == list(first)


def test_clicks_follow_sent_decisions_some_after_the_window(simulated, blueprint):
    output, report = simulated
    decisions = {}
    for _, e in read_kind(output, "decisions", parse_decision_json, blueprint):
        if isinstance(e, DecisionEvent):
            decisions.setdefault(e.decision_id, e)
    observations = {
        line: e
        for line, e in read_kind(output, "observations", parse_observation_json, blueprint)
        if isinstance(e, ObservationEvent) and e.decision_id in decisions
    }.values()
    sent = {d for d, e in decisions.items() if e.decision != 0}
    assert 0 < len(sent) < len(decisions)  # the truth scorer holds some notifications back
    assert {o.decision_id for o in observations} <= sent

    window = blueprint.label.window_ms
    late = [
        o for o in observations if o.event_time_ms > decisions[o.decision_id].event_time_ms + window
    ]
    assert len(late) == report["counts"]["observations_after_window"] > 0
    clicks = [o for o in observations if "click" in o.observations]
    with_dwell = {o.decision_id for o in observations if "dwell_seconds" in o.observations}
    assert len(clicks) == report["counts"]["clicks"] and with_dwell  # several per decision
    assert with_dwell <= {o.decision_id for o in clicks}

    # the reported ground-truth AUC is the truth's probability against these very labels
    labels = {d: 0 for d in decisions}
    for o in clicks:
        if blueprint.label.counts(decisions[o.decision_id].event_time_ms, o.event_time_ms):
            labels[o.decision_id] = 1
    truth = [json.loads(x) for x in (output / "truth.jsonl").read_text().splitlines()]
    auc = roc_auc(
        [row["probability"] for row in truth], [labels[row["decision_id"]] for row in truth]
    )
    assert auc == report["ground_truth"]["auc"]
    assert sum(labels.values()) == report["counts"]["labels_positive"]


def test_the_truth_has_real_but_imperfect_signal(tmp_path, blueprint):
    report = Simulator(blueprint, seed=11).run(tmp_path, decisions=6000, days=1, start_ms=START_MS)
    truth = report["ground_truth"]
    assert 0.7 < truth["auc"] < 0.9
    assert 0.03 < truth["positive_rate"] < 0.3


def test_the_logged_profile_carries_exactly_the_truths_per_user_parts(simulated, blueprint):
    """notify logs the product's profile of the user, so a model can learn the whole truth: the
    truth's per-user parts are a function of the profile, and the profile is stable per user."""
    import math

    output, _ = simulated
    response = ResponseModel(blueprint)
    profiles = {}
    decisions = [e for _, e in read_kind(output, "decisions", parse_decision_json, blueprint)]
    decisions = [e for e in decisions if isinstance(e, DecisionEvent)]
    assert len(decisions) > 1000
    for event in decisions:
        f = event.features
        assert f["favourite_topic_match"] == int(f["favourite_topic"] in f["topics"])
        profile = (f["click_rate_90d"], f["favourite_topic"])
        assert profiles.setdefault(f["user_id"], profile) == profile
        per_user = response.logit(f) - response.logit({**f, "user_id": None})
        rate = f["click_rate_90d"]  # rounded to 4 decimals in the log
        taste = math.log(rate / (1 - rate)) - BASE_CLICK_LOGIT
        assert per_user == pytest.approx(
            taste + response.FAVOURITE_LIFT * f["favourite_topic_match"], abs=5e-3
        )
    assert len(profiles) > 50
    assert len({match for _, match in profiles.values()}) > 1


def test_the_profile_never_enters_the_response(blueprint):
    f = {
        "user_id": "u0000042", "tenure_days": 40, "country": "DE", "platform": "ios",
        "hour_of_day": 20, "sends_last_7d": 3, "open_rate_30d": 0.3,
        "recent_clicks": [1.0, 0.0], "topics": ["news"], "email": "x@example.com",
        "click_rate_90d": 0.1, "favourite_topic": "news", "favourite_topic_match": 1,
    }  # fmt: skip
    response = ResponseModel(blueprint)
    other = {**f, "click_rate_90d": 0.9, "favourite_topic": "deals", "favourite_topic_match": 0}
    assert response.logit(other) == response.logit(f)


def test_outcomes_of_logged_decisions_match_what_the_simulation_wrote(simulated, blueprint):
    output, _ = simulated
    decisions, written = {}, set()
    for _, e in read_kind(output, "decisions", parse_decision_json, blueprint):
        if isinstance(e, DecisionEvent):
            decisions.setdefault(e.decision_id, e)
    for line, e in read_kind(output, "observations", parse_observation_json, blueprint):
        if isinstance(e, ObservationEvent) and e.decision_id in decisions:
            written.add(line)
    sim = Simulator(blueprint, seed=3)
    outcomes = sim.outcomes(decisions.values())
    assert {o.to_json() for o in outcomes} == written
    assert sim.outcomes(reversed(list(decisions.values()))) == outcomes  # order does not matter
    assert [o.event_time_ms for o in outcomes] == sorted(o.event_time_ms for o in outcomes)


def test_a_blueprint_with_unknown_features_gets_generic_values(tmp_path):
    blueprint = parse_blueprint(
        """
name: offer
version: 2
features:
  - {name: tenure_days, type: float}
  - {name: platform, type: string_list}
  - {name: basket_size, type: int}
  - {name: price, type: float}
  - {name: segment, type: string}
  - {name: tags, type: string_list}
  - {name: history, type: int_list}
label: {name: converted, observation: purchase, aggregation: sum, window: 30m, default: 0, type: float}
policy: {type: threshold, fallback: 1}
"""
    )
    report = Simulator(blueprint, seed=1).run(tmp_path, decisions=300, days=1, start_ms=START_MS)
    decisions = read_kind(tmp_path, "decisions", parse_decision_json, blueprint)
    events = [e for _, e in decisions if isinstance(e, DecisionEvent)]
    assert len({e.decision_id for e in events}) == 300
    assert len(events) + report["counts"]["malformed_decision_lines_injected"] == len(decisions)
    observations = read_kind(tmp_path, "observations", parse_observation_json, blueprint)
    purchases = [
        e
        for _, e in observations
        if isinstance(e, ObservationEvent) and "purchase" in e.observations
    ]
    assert purchases and all(isinstance(e.observations["purchase"], float) for e in purchases)


_anything = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=6,
)


@settings(max_examples=50, deadline=None)
@given(
    features=st.dictionaries(
        st.sampled_from(["user_id", "topics", "platform", "hour_of_day", "sends_last_7d",
                         "recent_clicks", "open_rate_30d", "tenure_days", "other"]),
        _anything,
    ),
    decision=st.sampled_from([0, 1, None, "send"]),
)  # fmt: skip
def test_outcomes_of_decisions_from_elsewhere_never_crash(blueprint, features, decision):
    event = DecisionEvent("d-1", "notify", START_MS, features, decision=decision)
    sim = Simulator(blueprint, seed=2)
    truth = sim.truth(event)
    assert 0 <= truth["probability"] <= truth["p_click"] <= 1
    outcomes = sim.outcomes([event])
    assert all(o.decision_id == "d-1" and o.event_time_ms > START_MS for o in outcomes)
    if decision == 0:
        assert outcomes == [] and truth["probability"] == 0


@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=1, max_size=30))
def test_roc_auc_is_the_share_of_correctly_ordered_pairs(pairs):
    scores, labels = [p[0] for p in pairs], [p[1] for p in pairs]
    positives = [s for s, y in pairs if y]
    negatives = [s for s, y in pairs if not y]
    if not positives or not negatives:
        assert roc_auc(scores, labels) is None
        return
    wins = sum((p > n) + 0.5 * (p == n) for p in positives for n in negatives)
    assert roc_auc(scores, labels) == pytest.approx(
        wins / (len(positives) * len(negatives)), abs=1e-6
    )


# ---------------------------------------------------------------------------------------------
# Command line


def simulate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "loopline.simulate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_cli_writes_logs_and_reports_them(tmp_path):
    logs = tmp_path / "logs"
    done = simulate("--blueprint", "examples/notify.yaml", "--output", str(logs),
                    "--decisions", "500", "--days", "1", "--start", "2026-11-01", "--seed", "4",
                    "--duplicate_rate", "0.1", "--orphan_rate", "0.05", "--malformed_rate", "0.05")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report = json.loads((logs / "simulation.json").read_text())
    assert report["counts"]["decisions"] == 500
    printed = dict(line.split() for line in done.stdout.splitlines() if len(line.split()) == 2)
    assert {key: int(printed[key]) for key in report["counts"]} == report["counts"]
    assert report["files"]["decisions"] == sorted(p.name for p in logs.glob("decisions-*.jsonl"))

    # outcomes for decision logs written by another job, with the same seed: the same clicks
    outcomes = tmp_path / "outcomes"
    done = simulate("--blueprint", "examples/notify.yaml", "--output", str(outcomes),
                    "--outcomes_for", str(logs / "decisions-*.jsonl"), "--seed", "4")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert not list(outcomes.glob("decisions-*"))
    again = json.loads((outcomes / "simulation.json").read_text())
    assert again["counts"]["decisions"] == 500
    assert (
        again["skipped"]["refused_lines"] == report["counts"]["malformed_decision_lines_injected"]
    )
    assert again["counts"]["observations"] == report["counts"]["observations"]
    assert (outcomes / "truth.jsonl").read_text() == (logs / "truth.jsonl").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--blueprint", "missing.yaml"], "missing.yaml"),
        (["--decisions", "100"], "--blueprint"),
        (["--blueprint", "examples/notify.yaml", "--decisions", "many"], "--decisions"),
        (["--blueprint", "examples/notify.yaml", "--decisions", "0"], "--decisions"),
        (["--blueprint", "examples/notify.yaml", "--orphan_rate", "2"], "--orphan_rate"),
        (["--blueprint", "examples/notify.yaml", "--start", "soon"], "soon"),
        (
            ["--blueprint", "examples/notify.yaml", "--outcomes_for", "/nonexistent/*.jsonl"],
            "matches no files",
        ),
    ],
)
def test_cli_errors_exit_non_zero_with_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(REPO)
    with pytest.raises(SystemExit) as exited:
        sys.exit(main(["--output", str(tmp_path / "out"), *args]))
    assert exited.value.code != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err


def test_cli_refuses_to_mix_with_earlier_output_unless_asked(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    args = ["--blueprint", "examples/notify.yaml", "--output", str(tmp_path), "--decisions", "50"]
    assert main(args) == 0
    assert main(args) != 0 and "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0


# ---------------------------------------------------------------------------------------------
# Rollout scenarios with a known answer


def rollout_run(tmp_path, blueprint, scenario, decisions=4000):
    half = dataclasses.replace(blueprint.rollout, challenger_share=0.5)
    sim = Simulator(
        dataclasses.replace(blueprint, rollout=half), seed=1, faults=FaultRates(0, 0, 0), users=2000
    )
    sim.scorer, sim.challenger = scenario_scorers(sim.response, scenario, "prod", "new")
    report = sim.run(tmp_path / scenario, decisions=decisions, days=1, start_ms=START_MS)
    return sim, report


@pytest.mark.parametrize("scenario", ["better", "worse", "same"])
def test_a_scenario_challenger_ranks_decisions_exactly_as_production(tmp_path, blueprint, scenario):
    sim, _ = rollout_run(tmp_path, blueprint, scenario, decisions=300)
    production, challenger = scenario_scorers(sim.response, scenario)
    decisions = [
        e for _, e in read_kind(tmp_path / scenario, "decisions", parse_decision_json, blueprint)
    ]
    pairs = sorted((production(e.features), challenger(e.features)) for e in decisions)
    assert [c for _, c in pairs] == sorted(c for _, c in pairs)  # same order: same AUC


def test_the_better_challenger_has_the_higher_true_click_rate(tmp_path, blueprint):
    _, report = rollout_run(tmp_path, blueprint, "better")
    arms = report["ground_truth"]["arms"]
    assert (
        arms["challenger"]["expected_label_rate"] > 1.1 * arms["production"]["expected_label_rate"]
    )


def test_the_worse_challenger_has_the_lower_true_click_rate(tmp_path, blueprint):
    _, report = rollout_run(tmp_path, blueprint, "worse")
    arms = report["ground_truth"]["arms"]
    assert (
        arms["challenger"]["expected_label_rate"] < 0.7 * arms["production"]["expected_label_rate"]
    )


def test_the_same_challenger_decides_every_decision_as_production_would(tmp_path, blueprint):
    sim, _ = rollout_run(tmp_path, blueprint, "same", decisions=500)
    production, _ = scenario_scorers(sim.response, "same")
    decisions = [
        e for _, e in read_kind(tmp_path / "same", "decisions", parse_decision_json, blueprint)
    ]
    assert {e.arm for e in decisions} == {"production", "challenger"}
    assert all(e.score == production(e.features) for e in decisions)


def test_decisions_and_truth_rows_carry_the_arm_that_served_them(tmp_path, blueprint):
    _, report = rollout_run(tmp_path, blueprint, "better", decisions=300)
    decisions = [
        e for _, e in read_kind(tmp_path / "better", "decisions", parse_decision_json, blueprint)
    ]
    truth = [json.loads(line) for line in (tmp_path / "better" / "truth.jsonl").open()]
    arm_of = {e.decision_id: e.arm for e in decisions}
    assert all(row["arm"] == arm_of[row["decision_id"]] for row in truth)
    arms = report["ground_truth"]["arms"]
    assert sum(a["decisions"] for a in arms.values()) == len(decisions) == 300
    assert {e.model_id for e in decisions if e.arm == "challenger" and e.score is not None} == {
        "new"
    }


def test_a_scenario_that_is_not_known_is_refused(blueprint):
    with pytest.raises(ValueError, match="better, worse, same"):
        scenario_scorers(Simulator(blueprint).response, "faster")


def test_the_command_line_runs_a_rollout_scenario(tmp_path, blueprint_path):
    status = main(
        ["--blueprint", str(blueprint_path), "--output", str(tmp_path), "--decisions", "400",
         "--rollout", "worse", "--seed", "2"]
    )  # fmt: skip
    assert status == 0
    report = json.loads((tmp_path / "simulation.json").read_text())
    arms = report["ground_truth"]["arms"]
    assert set(arms) == {"production", "challenger"}
    assert sum(a["decisions"] for a in arms.values()) == 400
