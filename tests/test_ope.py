"""Off-policy estimators: hand-computed values, input checks, and interval coverage by simulation."""

import math

import numpy as np
import pytest

from loopline.ope import ValueSums, dr, ips, snips

Z = 1.959963984540054

# A four-row log: rewards, logging propensities of the logged actions, and the target policy's
# probabilities of those same actions. Weights w = target / pscore = [2, 1, 2, 0.5].
REWARD = [1.0, 0.0, 1.0, 0.0]
PSCORE = [0.5, 0.5, 0.25, 0.8]
TARGET = [1.0, 0.5, 0.5, 0.4]
Q_LOGGED = [0.5, 0.25, 0.5, 0.5]
Q_TARGET = [0.6, 0.2, 0.4, 0.3]


def _sample_sd(values):
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_ips_is_the_mean_of_weighted_rewards():
    est = ips(REWARD, PSCORE, TARGET)
    terms = [2.0, 0.0, 2.0, 0.0]  # w * reward
    assert est.value == pytest.approx(1.0)
    assert est.n == 4
    half = Z * _sample_sd(terms) / 2  # sd / sqrt(4)
    assert est.ci == pytest.approx((1.0 - half, 1.0 + half))


def test_snips_normalises_by_the_sum_of_weights_with_a_delta_method_interval():
    est = snips(REWARD, PSCORE, TARGET)
    value = 4.0 / 5.5  # sum(w * reward) / sum(w)
    assert est.value == pytest.approx(value)
    mean_w = 5.5 / 4
    influence = [w * (r - value) / mean_w for w, r in zip([2, 1, 2, 0.5], REWARD, strict=True)]
    half = Z * _sample_sd(influence) / 2
    assert est.ci == pytest.approx((value - half, value + half))


def test_dr_corrects_the_outcome_model_with_weighted_residuals():
    est = dr(REWARD, PSCORE, TARGET, Q_LOGGED, Q_TARGET)
    # q_target + w * (reward - q_logged), row by row
    terms = [0.6 + 2 * 0.5, 0.2 + 1 * -0.25, 0.4 + 2 * 0.5, 0.3 + 0.5 * -0.5]
    assert terms == pytest.approx([1.6, -0.05, 1.4, 0.05])
    assert est.value == pytest.approx(3.0 / 4)
    half = Z * _sample_sd(terms) / 2
    assert est.ci == pytest.approx((0.75 - half, 0.75 + half))


def test_dr_with_a_perfect_outcome_model_has_no_spread_from_the_weights():
    reward = [1.0, 0.0, 1.0]
    est = dr(reward, [0.2, 0.9, 0.5], [1.0, 0.0, 1.0], q_logged=reward, q_target=[0.7, 0.7, 0.7])
    assert est.value == pytest.approx(0.7)
    assert est.ci == pytest.approx((0.7, 0.7))


def test_target_equal_to_logging_policy_gives_the_observed_mean():
    reward = [1.0, 0.0, 0.0, 1.0, 1.0]
    pscore = [0.9, 0.1, 0.5, 0.5, 0.95]
    for estimate in (ips(reward, pscore, pscore), snips(reward, pscore, pscore)):
        assert estimate.value == pytest.approx(0.6)


def test_mean_weight_shows_how_much_of_the_log_speaks_for_the_target_policy():
    assert ips(REWARD, PSCORE, TARGET).mean_weight == pytest.approx(5.5 / 4)
    assert snips(REWARD, PSCORE, PSCORE).mean_weight == pytest.approx(1.0)


def test_a_single_row_has_an_unbounded_interval():
    est = ips([1.0], [0.5], [1.0])
    assert est.value == 2.0 and est.n == 1
    assert est.ci == (-math.inf, math.inf)


def test_estimate_as_dict_holds_every_figure():
    record = snips(REWARD, PSCORE, TARGET).as_dict()
    assert set(record) == {"estimator", "value", "ci_low", "ci_high", "se", "n", "mean_weight"}
    assert record["estimator"] == "snips" and record["n"] == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"reward": [1, 0], "pscore": [0.5], "target_pscore": [1, 1]}, "same length"),
        ({"reward": [], "pscore": [], "target_pscore": []}, "no rows"),
        (
            {"reward": [1, 0], "pscore": [0.5, 0.0], "target_pscore": [1, 1]},
            r"pscore must be in \(0, 1\]",
        ),
        (
            {"reward": [1, 0], "pscore": [0.5, 1.2], "target_pscore": [1, 1]},
            r"pscore must be in \(0, 1\]",
        ),
        ({"reward": [1, 0], "pscore": [0.5, -0.1], "target_pscore": [1, 1]}, "row 1"),
        ({"reward": [1, 0], "pscore": [0.5, 0.5], "target_pscore": [1, 1.5]}, "target_pscore"),
        (
            {"reward": [1, float("nan")], "pscore": [0.5, 0.5], "target_pscore": [1, 1]},
            "reward contains NaN",
        ),
        (
            {"reward": [1, 0], "pscore": [float("nan"), 0.5], "target_pscore": [1, 1]},
            "pscore contains NaN",
        ),
        (
            {"reward": [[1, 0]], "pscore": [[0.5, 0.5]], "target_pscore": [[1, 1]]},
            "one-dimensional",
        ),
        ({"reward": ["a", "b"], "pscore": [0.5, 0.5], "target_pscore": [1, 1]}, "array of numbers"),
    ],
)
def test_bad_inputs_are_refused_with_a_clear_reason(kwargs, message):
    for estimator in (ips, snips):
        with pytest.raises(ValueError, match=message):
            estimator(**kwargs)


def test_dr_refuses_outcome_estimates_of_another_length():
    with pytest.raises(ValueError, match="q_target=1"):
        dr([1, 0], [0.5, 0.5], [1, 1], q_logged=[0.5, 0.5], q_target=[0.5])


def test_snips_refuses_a_log_the_target_policy_never_agrees_with():
    with pytest.raises(ValueError, match="says nothing"):
        snips([1, 0], [0.5, 0.5], [0, 0])


# -- ValueSums: the same estimates from mergeable sums (what the monitor's combiner keeps) -------


def _random_log(seed, n=500):
    rng = np.random.default_rng(seed)
    pscore = rng.choice([0.025, 0.975, 0.5, 1.0], size=n)
    target = rng.choice([0.0, 1.0, 0.3], size=n)
    reward = rng.binomial(1, 0.2, size=n).astype(float)
    q_logged = rng.uniform(0, 1, size=n)
    return reward, pscore, target, q_logged, rng.uniform(0, 1, size=n)


def test_value_sums_give_the_estimates_of_the_array_functions():
    reward, pscore, target, q_logged, q_target = _random_log(1)
    sums = ValueSums()
    for row in zip(reward, pscore, target, q_logged, q_target, strict=True):
        sums.add(*map(float, row))
    for got, want in (
        (sums.snips(), snips(reward, pscore, target)),
        (sums.dr(), dr(reward, pscore, target, q_logged, q_target)),
    ):
        assert got.estimator == want.estimator and got.n == want.n
        assert (got.value, got.se) == pytest.approx((want.value, want.se), rel=1e-9)
        assert got.ci == pytest.approx(want.ci, rel=1e-9)
        assert got.mean_weight == pytest.approx(want.mean_weight, rel=1e-12)


def test_merged_value_sums_equal_one_pass_over_all_rows():
    rows = list(zip(*_random_log(2), strict=True))
    whole, first, second = ValueSums(), ValueSums(), ValueSums()
    for i, row in enumerate(rows):
        whole.add(*map(float, row))
        (first if i % 3 else second).add(*map(float, row))
    merged = first.merge(second)
    assert merged.snips().value == pytest.approx(whole.snips().value, rel=1e-12)
    assert merged.dr().se == pytest.approx(whole.dr().se, rel=1e-9)


def test_value_sums_without_outcome_estimates_on_every_row_give_no_dr():
    sums = ValueSums().add(1.0, 0.5, 1.0, 0.4, 0.4).add(0.0, 0.5, 1.0)
    assert sums.dr() is None and sums.snips().n == 2


def test_value_sums_with_only_zero_weights_give_no_snips():
    assert ValueSums().add(1.0, 0.5, 0.0).snips() is None and ValueSums().snips() is None


@pytest.mark.parametrize(
    "row, message",
    [
        ((1.0, 0.0, 1.0), "pscore must be in \\(0, 1\\], got 0.0"),
        ((1.0, 0.5, 1.5), "target_pscore must be in \\[0, 1\\], got 1.5"),
        ((math.nan, 0.5, 1.0), "reward must be a finite number"),
    ],
)
def test_value_sums_refuse_a_bad_row_in_one_line(row, message):
    with pytest.raises(ValueError, match=message):
        ValueSums().add(*row)


# -- coverage by simulation ----------------------------------------------------------------------
#
# A contextual bandit with known reward probabilities: 20 equally likely contexts, 3 actions.
# The logging policy is epsilon-greedy (epsilon 0.3) around an arbitrary preference; the target
# policy puts 0.8 on the truly best action and 0.1 on each other one, so the two policies
# disagree often and the weights range from 1/3.8 up to 8. The outcome model for DR is the truth
# plus a fixed error (sd 0.1), so DR is exercised with a wrong model.

CONTEXTS, ACTIONS, EPSILON, ROWS, LOGS = 20, 3, 0.3, 1_000, 200


@pytest.fixture(scope="module")
def simulated():
    rng = np.random.default_rng(20261203)
    p = rng.uniform(0.05, 0.6, size=(CONTEXTS, ACTIONS))
    preferred = rng.integers(ACTIONS, size=CONTEXTS)
    logging = np.full((CONTEXTS, ACTIONS), EPSILON / ACTIONS)
    logging[np.arange(CONTEXTS), preferred] += 1 - EPSILON
    target = np.full((CONTEXTS, ACTIONS), 0.1)
    target[np.arange(CONTEXTS), p.argmax(axis=1)] = 0.8
    truth = float((target * p).sum(axis=1).mean())
    q = np.clip(p + rng.normal(0, 0.1, size=p.shape), 0, 1)

    estimates = {"ips": [], "snips": [], "dr": []}
    for _ in range(LOGS):
        x = rng.integers(CONTEXTS, size=ROWS)
        a = (rng.random(ROWS)[:, None] > logging[x].cumsum(axis=1)).sum(axis=1)
        r = (rng.random(ROWS) < p[x, a]).astype(float)
        pscore, target_pscore = logging[x, a], target[x, a]
        estimates["ips"].append(ips(r, pscore, target_pscore))
        estimates["snips"].append(snips(r, pscore, target_pscore))
        q_target = (target[x] * q[x]).sum(axis=1)
        estimates["dr"].append(dr(r, pscore, target_pscore, q[x, a], q_target))
    return truth, estimates


def _coverage(truth, estimates):
    return np.mean([e.ci[0] <= truth <= e.ci[1] for e in estimates])


@pytest.mark.parametrize("estimator", ["snips", "dr", "ips"])
def test_95_percent_interval_covers_the_true_policy_value_in_at_least_90_percent_of_logs(
    simulated, estimator
):
    truth, estimates = simulated
    assert len(estimates[estimator]) >= 100
    assert _coverage(truth, estimates[estimator]) >= 0.90


@pytest.mark.parametrize("estimator", ["snips", "dr", "ips"])
def test_estimates_centre_on_the_true_policy_value(simulated, estimator):
    truth, estimates = simulated
    values = np.array([e.value for e in estimates[estimator]])
    # the mean of 200 estimates is within 3 of its standard errors of the truth
    assert abs(values.mean() - truth) < 3 * values.std() / np.sqrt(len(values))


def test_intervals_are_informative_and_dr_is_tighter_than_ips(simulated):
    truth, estimates = simulated
    width = {k: np.median([e.ci[1] - e.ci[0] for e in v]) for k, v in estimates.items()}
    assert width["ips"] < 0.25  # about ±0.09 around a value near 0.43 with 1,000 rows
    assert width["dr"] < width["ips"]
    assert width["snips"] < width["ips"]
