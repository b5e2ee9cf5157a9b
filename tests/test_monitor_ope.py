"""The monitor's off-policy values of live policies and its observable-rows split, checked
against the simulator's ground truth: per-row terms by hand, coverage of the 95% intervals over
many simulated logs, and one monitor run on simulator output against an independent
computation from the raw files."""

import glob
import json
import random
from pathlib import Path

import numpy as np
import pytest

from loopline.blueprint import load_blueprint
from loopline.events import DecisionEvent, parse_event_time
from loopline.ope import ValueSums, dr, snips
from loopline.policy import EpsilonGreedyPolicy
from loopline.simulate import (
    FaultRates,
    Simulator,
    TruthScorer,
    make_population,
    notify_features,
    scenario_scorers,
)
from pipelines import monitor
from transforms.monitoring import MonitoredDecision, policy_value_rows

REPO = Path(__file__).resolve().parents[1]
NOTIFY = load_blueprint(REPO / "examples" / "notify.yaml")  # label observable only when sent
THRESHOLD = NOTIFY.policy["threshold"]
START_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z


def scored(decision, propensity, score, label, arm="production"):
    return MonitoredDecision(
        decision_id="d", model_id="m", blueprint_version="1", day="2026-11-01",
        decision_time_ms=0, score=score, label=label, observed=bool(label),
        decision=decision, propensity=propensity, arm=arm,
    )  # fmt: skip


def test_an_explored_send_weighs_for_the_logged_policy_only():
    # score 0.05 is under the threshold: the greedy policy holds, the logged one explored a send
    rows = dict(policy_value_rows(scored(1, 0.025, 0.05, 1.0), NOTIFY.label, THRESHOLD))
    # logged: target = pscore; q(send) = score, q(hold) = 0 (an unsent notification is not
    # clicked), so q_target = 0.025 * 0.05 + 0.975 * 0
    assert rows["logged"] == pytest.approx((1.0, 0.025, 0.025, 0.05, 0.025 * 0.05))
    # greedy would hold: target 0 for this send; its q_target is q(hold) = 0
    assert rows["greedy"] == pytest.approx((1.0, 0.025, 0.0, 0.05, 0.0))


def test_a_greedy_hold_is_the_greedy_policys_own_action():
    rows = dict(policy_value_rows(scored(0, 0.975, 0.05, 0.0), NOTIFY.label, THRESHOLD))
    assert rows["greedy"] == pytest.approx((0.0, 0.975, 1.0, 0.0, 0.0))
    assert rows["logged"] == pytest.approx((0.0, 0.975, 0.975, 0.0, 0.025 * 0.05))


def test_a_row_without_propensity_gives_no_off_policy_row():
    assert policy_value_rows(scored(1, None, 0.5, 1.0), NOTIFY.label, THRESHOLD) == []


def test_without_a_threshold_policy_only_the_logged_policy_is_valued():
    rows = policy_value_rows(scored(1, 1.0, 0.5, 1.0), NOTIFY.label, None)
    assert [policy for policy, _ in rows] == ["logged"]


# -- coverage by simulation ----------------------------------------------------------------------
#
# Logs of the notify product from the simulator's population and hidden response model, decided
# by the blueprint's epsilon-greedy policy on the true click probability (the demo's production
# scorer). A decision's true value is P(click within the window | sent) = p * share_within, and
# 0 unsent; the true value of a policy on a log is the mean over its decisions of
# P(send) * p * share_within under that policy (the logged policy's P(send) from its epsilon,
# the greedy one's 1 at or above the threshold). The score is used as DR's outcome model, and
# it is miscalibrated on purpose (p, not p * share_within), so DR leans on the propensities.

LOGS, ROWS = 100, 1_500


def simulated_log(seed: int, epsilon: float):
    sim = Simulator(NOTIFY, seed)
    policy = EpsilonGreedyPolicy(THRESHOLD, epsilon, seed)
    scorer = TruthScorer(sim.response)
    share = sim.delays.share_within(NOTIFY.label.window_ms)
    users = make_population(300, seed)
    rng = random.Random(f"{seed}/contexts")
    rows, logged_truth, greedy_truth = [], 0.0, 0.0
    for i in range(ROWS):
        time_ms = START_MS + rng.randrange(86_400_000)
        features = notify_features(rng.choice(users), time_ms, 0, rng)
        p = sim.response.click_probability(features)
        score = scorer(features)
        choice = policy.choose(score, f"{seed}-{i}")
        event = DecisionEvent(f"{seed}-{i}", "notify", time_ms, features, decision=choice.decision)
        positive, _ = sim.outcome(event, p)
        rows.append(scored(choice.decision, choice.propensity, score, float(positive)))
        send = choice.propensity if choice.decision == 1 else 1 - choice.propensity
        logged_truth += send * p * share
        greedy_truth += (score >= THRESHOLD) * p * share
    return rows, {"logged": logged_truth / ROWS, "greedy": greedy_truth / ROWS}


@pytest.fixture(scope="module", params=[0.05, 0.3], ids=["epsilon=0.05", "epsilon=0.3"])
def coverage(request):
    hits = {(p, e): [] for p in ("logged", "greedy") for e in ("snips", "dr")}
    for seed in range(LOGS):
        rows, truth = simulated_log(seed, request.param)
        sums = {"logged": ValueSums(), "greedy": ValueSums()}
        for row in rows:
            for policy, values in policy_value_rows(row, NOTIFY.label, THRESHOLD):
                sums[policy].add(*values)
        for policy, s in sums.items():
            for name, estimate in (("snips", s.snips()), ("dr", s.dr())):
                hits[(policy, name)].append(estimate.ci[0] <= truth[policy] <= estimate.ci[1])
    return {key: float(np.mean(v)) for key, v in hits.items()}


@pytest.mark.parametrize("policy", ["logged", "greedy"])
@pytest.mark.parametrize("estimator", ["snips", "dr"])
def test_the_95_percent_interval_covers_the_true_policy_value_in_90_percent_of_logs(
    coverage, policy, estimator
):
    assert coverage[(policy, estimator)] >= 0.90, coverage


# -- one monitor run on simulator output -------------------------------------------------------


@pytest.fixture(scope="module")
def simulated_rollout(tmp_path_factory):
    """Two days of the notify product with a truly better challenger (``--rollout better``),
    monitored from its decision logs (which carry score, propensity, arm and model id). No
    faults are injected, so that the raw files can be read back independently below."""
    root = tmp_path_factory.mktemp("simulated")
    logs = root / "logs"
    sim = Simulator(NOTIFY, seed=3, faults=FaultRates(duplicate=0, orphan=0, malformed=0))
    sim.scorer, sim.challenger = scenario_scorers(sim.response, "better")
    sim.run(logs, decisions=6000, days=2, start_ms=START_MS)
    metrics = monitor.run(
        [
            "--decisions", str(logs / "decisions-*.jsonl"),
            "--observations", str(logs / "observations-*.jsonl"),
            "--blueprint", str(REPO / "examples" / "notify.yaml"),
            "--output", str(root / "out"), "--fail_on_flags", "false",
        ]
    )  # fmt: skip
    return metrics, logs, sim


def independent_rows(logs: Path) -> list[dict]:
    """Each decision with its label computed straight from the raw files:
    1 when a click observation falls in [t - 2 min, t + 1 h], and its ground truth."""
    decisions, clicks = {}, {}
    for pattern, sink in (("decisions-*.jsonl", decisions), ("observations-*.jsonl", clicks)):
        for path in sorted(glob.glob(str(logs / pattern))):
            for line in Path(path).read_bytes().splitlines():
                row = json.loads(line)
                time_ms = parse_event_time(row["event_time"])
                if pattern.startswith("decisions"):
                    sink[row["decision_id"]] = (row, time_ms)
                elif "click" in row["observations"]:
                    sink.setdefault(row["decision_id"], []).append(time_ms)
    truth = {}
    for line in (logs / "truth.jsonl").read_text().splitlines():
        row = json.loads(line)
        truth[row["decision_id"]] = row
    out = []
    for decision_id, (row, td) in decisions.items():
        label = any(td - 120_000 <= to <= td + 3_600_000 for to in clicks.get(decision_id, []))
        out.append({**row, "label": float(label), "p_click": truth[decision_id]["p_click"]})
    return out


@pytest.mark.slow
def test_policy_values_equal_the_estimators_on_the_raw_log(simulated_rollout):
    metrics, logs, _ = simulated_rollout
    rows = independent_rows(logs)
    figures = {(r["arm"], r["policy"]): r for r in metrics["policy_values"]["rows"]}
    assert set(figures) == {(a, p) for a in ("production", "challenger") for p in ("logged", "greedy")}  # fmt: skip
    for arm in ("production", "challenger"):
        mine = [r for r in rows if r["arm"] == arm]
        reward = np.array([r["label"] for r in mine])
        pscore = np.array([r["propensity"] for r in mine])
        sent = np.array([r["decision"] for r in mine])
        score = np.array([r["score"] for r in mine])
        greedy = (score >= THRESHOLD).astype(int)
        q_logged = np.where(sent == 1, score, 0.0)
        send_probability = np.where(sent == 1, pscore, 1 - pscore)
        for policy, target, q_target in (
            ("logged", pscore, send_probability * score),
            ("greedy", (sent == greedy).astype(float), greedy * score),
        ):
            got = figures[(arm, policy)]
            assert got["rows"] == len(mine)
            want_snips = snips(reward, pscore, target)
            want_dr = dr(reward, pscore, target, q_logged, q_target)
            assert got["snips"]["value"] == pytest.approx(want_snips.value, rel=1e-9)
            assert got["snips"]["ci_low"] == pytest.approx(want_snips.ci[0], rel=1e-6)
            assert got["dr"]["value"] == pytest.approx(want_dr.value, rel=1e-9)
            assert got["dr"]["se"] == pytest.approx(want_dr.se, rel=1e-6)


@pytest.mark.slow
def test_policy_values_sit_near_the_simulators_truth(simulated_rollout):
    """Within 4 standard errors of the truth (a band a correct estimator leaves once in
    16,000 runs; the 95% coverage itself is the simulation test above)."""
    metrics, logs, sim = simulated_rollout
    share = sim.delays.share_within(NOTIFY.label.window_ms)
    rows = independent_rows(logs)
    for row in metrics["policy_values"]["rows"]:
        mine = [r for r in rows if r["arm"] == row["arm"]]
        if row["policy"] == "logged":
            send = [r["propensity"] if r["decision"] == 1 else 1 - r["propensity"] for r in mine]
        else:
            send = [float(r["score"] >= THRESHOLD) for r in mine]
        truth = float(np.mean([s * r["p_click"] * share for s, r in zip(send, mine, strict=True)]))
        for estimator in ("snips", "dr"):
            e = row[estimator]
            assert abs(e["value"] - truth) < 4 * e["se"], (row["arm"], row["policy"], estimator)


@pytest.mark.slow
def test_auc_and_calibration_are_reported_on_observable_rows_apart(simulated_rollout):
    metrics, logs, _ = simulated_rollout
    rows = independent_rows(logs)
    for model_id, model in metrics["models"].items():
        mine = [r for r in rows if r["model_id"] == model_id]
        sent = [r for r in mine if r["decision"] == 1]
        assert model["overall"]["count"] == len(mine)
        assert model["observable"]["count"] == len(sent)
        assert model["observable"]["positives"] == sum(r["label"] for r in sent)
        # every unsent row is a sure 0 the model is not asked about: all rows flatter the AUC
        assert model["observable"]["auc"] < model["overall"]["auc"]
        assert model["observable"]["calibration_error"] is not None
    assert metrics["label"]["observable_when"] == {"decision": [1]}


@pytest.mark.slow
def test_the_report_shows_observable_rows_and_policy_values(simulated_rollout, tmp_path):
    metrics, _, _ = simulated_rollout
    html = Path(metrics["report"]).read_text()
    assert "<h2>Observable rows</h2>" in html and "decision in [1]" in html
    assert "<h2>Policy values (off-policy)</h2>" in html and "greedy" in html
