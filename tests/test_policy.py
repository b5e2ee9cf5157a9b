"""Decision policies: exact thresholds and top-k, exploration rates and propensities, Thompson
sampling learning, determinism for a seed."""

import json
import math
import random
from dataclasses import replace

import pytest

from loopline.policy import (
    Choice,
    EpsilonGreedyPolicy,
    FallbackPolicy,
    PolicyError,
    ThompsonSampling,
    ThresholdPolicy,
    TopKPolicy,
    policy_from_blueprint,
    reward_counts,
    unit_uniform,
)


def _within_binomial(count: int, n: int, p: float, sigmas: float = 6.0) -> bool:
    """Whether ``count`` successes of ``n`` is within ``sigmas`` standard deviations of n*p.

    The runs below are seeded, so they cannot flake; the bound is what makes them meaningful.
    """
    return abs(count - n * p) <= sigmas * math.sqrt(n * p * (1 - p))


def test_threshold_is_exact_at_the_boundary():
    policy = ThresholdPolicy(0.3)
    assert policy.choose(0.3, "a") == Choice(1, 1.0, False)
    assert policy.choose(math.nextafter(0.3, 0), "b") == Choice(0, 1.0, False)
    assert policy.choose(0.99, "c").decision == 1


def test_epsilon_zero_is_the_threshold_policy():
    policy = EpsilonGreedyPolicy(0.5, epsilon=0.0, seed=1)
    for i in range(200):
        score = i / 200
        assert policy.choose(score, f"d{i}") == Choice(int(score >= 0.5), 1.0, False)


def test_epsilon_greedy_explores_at_the_configured_rate_with_correct_propensities():
    epsilon, n = 0.2, 20_000
    policy = EpsilonGreedyPolicy(0.5, epsilon=epsilon, seed=11)
    rng = random.Random(5)
    scores = [rng.random() for _ in range(n)]
    choices = [policy.choose(s, f"d-{i}") for i, s in enumerate(scores)]

    explored = sum(c.explored for c in choices)
    assert _within_binomial(explored, n, epsilon)
    off_greedy = [c for c, s in zip(choices, scores, strict=True) if c.decision != int(s >= 0.5)]
    assert _within_binomial(len(off_greedy), n, epsilon / 2)
    assert all(c.propensity == pytest.approx(epsilon / 2) for c in off_greedy)
    on_greedy = [c for c, s in zip(choices, scores, strict=True) if c.decision == int(s >= 0.5)]
    assert all(c.propensity == pytest.approx(1 - epsilon / 2) for c in on_greedy)
    # An exploring choice picks each arm half the time.
    explored_ones = sum(c.decision for c in choices if c.explored)
    assert _within_binomial(explored_ones, explored, 0.5)


def test_epsilon_greedy_propensities_make_inverse_propensity_estimates_unbiased():
    # For "always decide 1", E[1{decision == 1} / propensity] is 1 exactly when propensities
    # are the probabilities the policy actually used.
    policy = EpsilonGreedyPolicy(0.5, epsilon=0.3, seed=2)
    n = 20_000
    choices = [policy.choose(0.1, f"x{i}") for i in range(n)]  # greedy decision is 0
    estimate = sum((c.decision == 1) / c.propensity for c in choices) / n
    assert estimate == pytest.approx(1.0, abs=0.1)


def test_same_seed_gives_same_choices_regardless_of_order():
    ids = [f"d{i}" for i in range(500)]
    scores = {d: unit_uniform(0, d, "score") for d in ids}
    first = EpsilonGreedyPolicy(0.5, 0.3, seed=4)
    forward = {d: first.choose(scores[d], d) for d in ids}
    second = EpsilonGreedyPolicy(0.5, 0.3, seed=4)
    backward = {d: second.choose(scores[d], d) for d in reversed(ids)}
    assert forward == backward
    other = EpsilonGreedyPolicy(0.5, 0.3, seed=5)
    assert {d: other.choose(scores[d], d) for d in ids} != forward


def test_top_k_selects_exactly_the_k_highest_with_ties_by_decision_id():
    policy = TopKPolicy(k=2)
    scored = [("c", 0.5), ("a", 0.9), ("b", 0.5), ("d", 0.1)]
    assert [c.decision for c in policy.choose_group(scored)] == [0, 1, 1, 0]
    assert all(c.propensity == 1.0 for c in policy.choose_group(scored))
    assert [c.decision for c in TopKPolicy(k=10).choose_group(scored)] == [1, 1, 1, 1]
    assert [c.decision for c in TopKPolicy(k=0).choose_group(scored)] == [0, 0, 0, 0]
    assert policy.choose(0.01, "alone").decision == 1


def test_top_k_matches_a_sort_on_random_groups():
    rng = random.Random(3)
    for _ in range(50):
        scored = [(f"d{rng.randrange(10**6)}", rng.choice([0.1, 0.2, 0.3])) for _ in range(12)]
        k = rng.randrange(0, 13)
        chosen = {
            d
            for (d, _), c in zip(scored, TopKPolicy(k).choose_group(scored), strict=True)
            if c.decision
        }
        expected = {d for d, _ in sorted(scored, key=lambda x: (-x[1], x[0]))[:k]}
        assert chosen == expected


def test_thompson_sampling_prefers_the_better_arm_as_evidence_accumulates():
    policy = ThompsonSampling(arms=2, seed=9)
    rng = random.Random(1)
    true_rate = [0.3, 0.6]
    share_of_best = []
    for _ in range(6):
        choices = [policy.choose(0.0, f"r{len(share_of_best)}-{i}") for i in range(2000)]
        share_of_best.append(sum(c.decision == 1 for c in choices) / len(choices))
        for arm in (0, 1):
            for _ in range(20):
                policy.update(arm, float(rng.random() < true_rate[arm]))
    assert share_of_best[0] == pytest.approx(0.5, abs=0.06)  # flat priors: a coin toss
    assert share_of_best[-1] > 0.95
    assert share_of_best[-1] > share_of_best[1]
    assert policy.arm_probabilities()[1] > 0.95


def test_thompson_propensity_is_the_frequency_of_the_chosen_arm():
    policy = ThompsonSampling(arms=3, seed=2)
    for arm, (wins, losses) in enumerate([(3, 7), (5, 5), (6, 4)]):
        for _ in range(wins):
            policy.update(arm, 1.0)
        for _ in range(losses):
            policy.update(arm, 0.0)
    n = 20_000
    choices = [policy.choose(0.0, f"t{i}") for i in range(n)]
    probabilities = policy.arm_probabilities()
    for arm in range(3):
        picked = [c for c in choices if c.decision == arm]
        assert all(c.propensity == pytest.approx(probabilities[arm]) for c in picked)
        assert _within_binomial(len(picked), n, probabilities[arm])
    assert ThompsonSampling(arms=3, seed=2).choose(0.0, "t1") == ThompsonSampling(
        arms=3, seed=2
    ).choose(0.0, "t1")


def test_fallback_policy_returns_the_blueprint_fallback(blueprint):
    assert FallbackPolicy.from_blueprint(blueprint).choose(0.0, "d") == Choice(1, 1.0, False)


def test_policy_from_blueprint_builds_each_type(blueprint):
    policy = policy_from_blueprint(blueprint)
    assert isinstance(policy, EpsilonGreedyPolicy)
    assert (policy.threshold, policy.epsilon, policy.seed) == (0.1, 0.05, 7)
    assert policy_from_blueprint(blueprint, seed=3).seed == 3
    top_k = policy_from_blueprint(
        replace(blueprint, policy={"type": "top_k", "k": 2, "group_feature": "user_id"})
    )
    assert (top_k.k, top_k.group_feature) == (2, "user_id")
    thompson = policy_from_blueprint(replace(blueprint, policy={"type": "thompson", "arms": 3}))
    assert isinstance(thompson, ThompsonSampling) and thompson.arms == 3
    assert isinstance(policy_from_blueprint(replace(blueprint, policy={})), ThresholdPolicy)


@pytest.mark.parametrize(
    "section, field",
    [
        ({"type": "bandit"}, "policy.type"),
        ({"type": "epsilon_greedy", "epsilon": 1.5}, "policy.epsilon"),
        ({"type": "top_k", "k": 2, "group_feature": "nope"}, "policy.group_feature"),
        ({"type": "threshold", "k": 2}, "not used"),
        ({"type": "thompson", "arms": 0}, "policy.arms"),
    ],
)
def test_policy_from_blueprint_refuses_bad_sections(blueprint, section, field):
    with pytest.raises(PolicyError, match=field):
        policy_from_blueprint(replace(blueprint, policy=section))


# ----------------------------------------------------------------- Thompson posteriors from spans


def test_reward_counts_sum_each_arms_rewards_and_skip_rows_without_an_arm_or_a_reward():
    successes, failures, skipped = reward_counts(3, [0, 2, 2, 1, -1, 5, 0], [1, 1, 0, 0, 1, 1, 7])
    assert (successes, failures, skipped) == ([1.0, 0.0, 1.0], [0.0, 1.0, 1.0], 3)


def test_thompson_state_round_trips_and_refuses_another_number_of_arms():
    learnt = ThompsonSampling(arms=2, seed=1)
    learnt.learn([3.0, 9.0], [40.0, 20.0])
    restored = ThompsonSampling(arms=2, seed=1).load_state(learnt.state())
    assert (restored.alpha, restored.beta) == ([4.0, 10.0], [41.0, 21.0])
    assert restored.choose(0.0, "d") == learnt.choose(0.0, "d")
    with pytest.raises(PolicyError, match="for 3 arms"):
        ThompsonSampling(arms=3).load_state(learnt.state())


def test_thompson_policy_starts_from_its_stored_posterior_or_from_the_prior(tmp_path, blueprint):
    state = tmp_path / "thompson.json"
    section = {"type": "thompson", "arms": 2, "prior": [1, 1], "posterior": str(state)}
    fresh = policy_from_blueprint(replace(blueprint, policy=section))
    assert (fresh.alpha, fresh.beta) == ([1.0, 1.0], [1.0, 1.0])  # no span learnt yet
    state.write_text(json.dumps({"arms": 2, "alpha": [2.0, 30.0], "beta": [50.0, 70.0]}))
    stored = policy_from_blueprint(replace(blueprint, policy=section))
    assert (stored.alpha, stored.beta) == ([2.0, 30.0], [50.0, 70.0])
    state.write_text("{not json")
    with pytest.raises(PolicyError, match="policy.posterior"):
        policy_from_blueprint(replace(blueprint, policy=section))


TRUE_ARM_RATES = (0.05, 0.12)  # the simulated truth: arm 1 earns more than twice as often


def _bandit_blueprint(tmp_path):
    """The example blueprint with a two-armed Thompson policy whose every reward is observed,
    written next to its state file: (path, blueprint)."""
    import yaml

    from loopline.blueprint import load_blueprint
    from tests.conftest import EXAMPLE_BLUEPRINT

    section = yaml.safe_load(EXAMPLE_BLUEPRINT.read_text())
    section["policy"] = {
        "type": "thompson",
        "arms": 2,
        "seed": 3,
        "posterior": str(tmp_path / "thompson.json"),
    }
    section["label"].pop("observable_when")
    path = tmp_path / "bandit.yaml"
    path.write_text(yaml.safe_dump(section))
    return str(path), load_blueprint(path)


def _write_span(span, rows):
    """A complete span (manifest last) of examples holding just ``decision`` and the label."""
    import tensorflow as tf

    for split in ("train", "eval"):
        folder = span / "examples" / split
        folder.mkdir(parents=True)
        options = tf.io.TFRecordOptions(compression_type="GZIP")
        with tf.io.TFRecordWriter(str(folder / "part-0.tfrecord.gz"), options) as writer:
            for i, (arm, clicked) in enumerate(rows):
                if (i % 5 == 0) == (split == "eval"):
                    feature = {
                        "decision": tf.train.Feature(int64_list=tf.train.Int64List(value=[arm])),
                        "clicked": tf.train.Feature(int64_list=tf.train.Int64List(value=[clicked])),
                    }
                    writer.write(
                        tf.train.Example(
                            features=tf.train.Features(feature=feature)
                        ).SerializeToString()
                    )
    (span / "manifest.json").write_text(json.dumps({"span": span.name, "examples": len(rows)}))


def test_posteriors_learnt_from_daily_spans_converge_and_shift_traffic_to_the_better_arm(tmp_path):
    """Day after day the policy, started from the stored posterior, decides; the simulated
    truth gives the rewards; the join's span goes to pipelines.update_bandit."""
    from pipelines import update_bandit

    path, bandit = _bandit_blueprint(tmp_path)
    rng = random.Random(11)
    shares = []
    for day in range(6):
        policy = policy_from_blueprint(bandit)
        chosen = [policy.choose(0.0, f"day{day}-{i}").decision for i in range(2000)]
        rows = [(arm, int(rng.random() < TRUE_ARM_RATES[arm])) for arm in chosen]
        shares.append(sum(chosen) / len(chosen))
        span = tmp_path / "data" / f"2026-11-0{day + 1}"
        _write_span(span, rows)
        assert update_bandit.run(["--span", str(span), "--blueprint", path]) == 0
    learnt = policy_from_blueprint(bandit)
    for arm, truth in enumerate(TRUE_ARM_RATES):
        a, b = learnt.alpha[arm], learnt.beta[arm]
        sd = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
        assert abs(a / (a + b) - truth) <= 4 * sd, (arm, a, b)
    assert learnt.beta[1] + learnt.alpha[1] > 8000  # most of the 12,000 pulls went to arm 1
    assert 0.3 <= shares[0] <= 0.7  # the prior: no arm preferred
    assert shares[-1] >= 0.95, shares


def test_a_span_is_learnt_once(tmp_path, capsys):
    from pipelines import update_bandit

    path, _ = _bandit_blueprint(tmp_path)
    span = tmp_path / "data" / "2026-11-01"
    _write_span(span, [(0, 1), (1, 0), (1, 1)] * 10)
    argv = ["--span", str(span), "--blueprint", path]
    assert update_bandit.run(argv) == 0
    once = (tmp_path / "thompson.json").read_text()
    assert update_bandit.run(argv) == 0
    assert (tmp_path / "thompson.json").read_text() == once
    assert "no change: span" in capsys.readouterr().out
    assert json.loads(once)["alpha"] == [11.0, 11.0]
