"""The rollout experiment: stable assignment, and a sequential readout valid under daily looks."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from loopline.blueprint import Guardrail, Rollout
from loopline.experiment import (
    BETTER,
    CHALLENGER,
    INCONCLUSIVE,
    PRODUCTION,
    SRM_REASON,
    WORSE,
    DayComparison,
    Moments,
    assign_arm,
    day_comparisons,
    mixture_sprt,
    readout,
    srm_check,
)

ROLLOUT = Rollout(unit="user_id", challenger_share=0.2, salt="notify-rollout-1", min_exposure=1000)

# The demo's experiment: 4,000 decisions a day, 20% to the challenger, a click rate of 10% in
# production, 14 daily looks. A truly better challenger raises it to 13%.
DECISIONS_PER_DAY, SHARE, DAYS, BASE_RATE, LIFTED_RATE = 4_000, 0.2, 14, 0.10, 0.13
SEEDS = 300


# -- assignment ---------------------------------------------------------------------------------


def test_assignment_gives_the_challenger_its_share_of_units():
    arms = [assign_arm(f"u{i:07d}", ROLLOUT) for i in range(20_000)]
    share = arms.count(CHALLENGER) / len(arms)
    assert abs(share - 0.2) < 0.01  # the binomial sd is 0.003
    assert set(arms) == {PRODUCTION, CHALLENGER}


def test_assignment_is_stable_across_processes():
    units = [f"u{i:07d}" for i in range(50)] + [17, 123456789]
    here = [assign_arm(u, ROLLOUT) for u in units]
    script = (
        "import json, sys; from loopline.blueprint import Rollout; "
        "from loopline.experiment import assign_arm; "
        "r = Rollout(unit='user_id', challenger_share=0.2, salt='notify-rollout-1'); "
        "print(json.dumps([assign_arm(u, r) for u in json.loads(sys.argv[1])]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps(units)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "12345"},  # str hashes differ, arms must not
    )
    assert json.loads(done.stdout) == here


def test_a_new_salt_reshuffles_the_units():
    other = Rollout(unit="user_id", challenger_share=0.2, salt="notify-rollout-2")
    units = [f"u{i:07d}" for i in range(5_000)]
    same = np.mean([assign_arm(u, ROLLOUT) == assign_arm(u, other) for u in units])
    # independent assignments agree with probability 0.8² + 0.2² = 0.68
    assert 0.65 < same < 0.71


def test_int_and_string_units_with_the_same_text_are_one_unit():
    assert assign_arm(42, ROLLOUT) == assign_arm("42", ROLLOUT)


@pytest.mark.parametrize("bad", [None, 1.5, True, ["u1"]])
def test_a_unit_that_is_not_a_string_or_int_is_refused(bad):
    with pytest.raises(ValueError, match="must be a string or an int"):
        assign_arm(bad, ROLLOUT)


# -- moments and the mixture SPRT ----------------------------------------------------------------


def test_moments_of_rows_give_the_mean_and_its_squared_standard_error():
    m = Moments.of([1, 0, 0, 1, 1])
    assert (m.n, m.total, m.total_sq) == (5, 3.0, 3.0)
    assert m.mean == pytest.approx(0.6)
    assert m.variance_of_mean == pytest.approx(0.3 / 5)  # sample variance 0.3 over n


def test_unit_day_rows_give_the_rate_per_decision_with_a_ratio_variance():
    # three units: (clicks, decisions) = (2, 4), (0, 1), (1, 5)
    y, d = np.array([2.0, 0, 1]), np.array([4.0, 1, 5])
    m = Moments(3, y.sum(), (y**2).sum(), d.sum(), (d**2).sum(), (y * d).sum())
    r = 3 / 10
    assert m.mean == pytest.approx(r)
    residual_var = ((y - r * d) ** 2).sum() / 2
    assert m.variance_of_mean == pytest.approx(residual_var / (3 * (10 / 3) ** 2))
    assert m.exposure == 10


def test_unit_day_rows_of_one_decision_each_are_plain_rows():
    values = [1.0, 0.0, 1.0, 1.0]
    plain = Moments.of(values)
    per_unit = Moments(4, 3.0, 3.0, decisions=4, decisions_sq=4, cross=3.0)
    assert per_unit.variance_of_mean == pytest.approx(plain.variance_of_mean)


def test_mixture_likelihood_ratio_matches_the_formula():
    d, v, tau, alpha = 0.03, 0.0001, 0.02, 0.05
    test = mixture_sprt(np.array([d]), np.array([v]), tau, alpha)
    lr = math.sqrt(v / (v + tau**2)) * math.exp(tau**2 * d**2 / (2 * v * (v + tau**2)))
    assert test.p_value[0] == pytest.approx(1 / lr)
    # the interval's ends are where the likelihood ratio reaches 1 / alpha
    for end in (test.ci_low[0], test.ci_high[0]):
        at_end = math.sqrt(v / (v + tau**2)) * math.exp(
            tau**2 * (d - end) ** 2 / (2 * v * (v + tau**2))
        )
        assert at_end == pytest.approx(1 / alpha)


def test_p_values_never_rise_and_the_confidence_sequence_never_widens():
    rng = np.random.default_rng(3)
    looks = np.arange(1, 15)
    d = rng.normal(0, 0.01, size=14) / np.sqrt(looks)
    test = mixture_sprt(d, 0.0004 / looks, 0.03, 0.05)
    assert (np.diff(test.p_value) <= 0).all()
    assert (np.diff(test.ci_low) >= 0).all() and (np.diff(test.ci_high) <= 0).all()


# -- the readout ---------------------------------------------------------------------------------


def _binary_days(rng, seeds, share, p_production, p_challenger, days=DAYS, n=DECISIONS_PER_DAY):
    """Per-day per-arm click counts for ``seeds`` experiments at once: arrays (seeds, days)."""
    n_challenger = rng.binomial(n, share, size=(seeds, days))
    n_production = n - n_challenger
    clicks_c = rng.binomial(n_challenger, p_challenger)
    clicks_p = rng.binomial(n_production, p_production)
    return n_production, clicks_p, n_challenger, clicks_c


def _comparisons(n_p, k_p, n_c, k_c):
    # a click is 0/1, so the sum of squares is the sum
    return [
        DayComparison(
            f"2026-12-{i + 1:02d}",
            Moments(int(n_p[i]), float(k_p[i]), float(k_p[i])),
            Moments(int(n_c[i]), float(k_c[i]), float(k_c[i])),
        )
        for i in range(len(n_p))
    ]


def _verdicts(arrays, rollout=ROLLOUT):
    return [readout(_comparisons(*(a[s] for a in arrays)), rollout).verdict for s in range(SEEDS)]


def test_an_a_a_experiment_looked_at_daily_declares_a_winner_in_at_most_5_percent():
    rng = np.random.default_rng(20261203)
    verdicts = _verdicts(_binary_days(rng, SEEDS, SHARE, BASE_RATE, BASE_RATE))
    # readout at day 14 reports any earlier significant look: the p-value is a running minimum
    declared = np.mean([v != INCONCLUSIVE for v in verdicts])
    assert declared <= 0.05


@pytest.mark.parametrize("decisions_per_day", [DECISIONS_PER_DAY, 1_000])
def test_a_lift_from_10_to_13_percent_is_detected_in_80_percent_within_14_days(
    decisions_per_day,
):
    # at the demo's 4,000 decisions a day it is found in every run, mostly by day 2; at 1,000 a
    # day (200 for the challenger) the power is just over 80%
    rng = np.random.default_rng(7)
    days = _binary_days(rng, SEEDS, SHARE, BASE_RATE, LIFTED_RATE, n=decisions_per_day)
    assert np.mean([v == BETTER for v in _verdicts(days)]) >= 0.80


def test_an_a_a_experiment_with_two_guardrails_rolls_back_in_at_most_5_percent():
    guarded = Rollout(
        unit="user_id",
        challenger_share=SHARE,
        salt="s",
        guardrails=(
            Guardrail("unsubscribe_max", "unsubscribe", "max", "decrease"),
            Guardrail("dwell_seconds_sum", "dwell_seconds", "sum", "increase"),
        ),
    )
    rng = np.random.default_rng(12)
    clicks = _binary_days(rng, SEEDS, SHARE, BASE_RATE, BASE_RATE)
    unsubscribes = _binary_days(rng, SEEDS, SHARE, 0.02, 0.02)
    dwell = _binary_days(rng, SEEDS, SHARE, 0.3, 0.3)
    verdicts = [
        readout(
            _comparisons(*(a[s] for a in clicks)),
            guarded,
            guardrails={
                "unsubscribe_max": _comparisons(*(a[s] for a in unsubscribes)),
                "dwell_seconds_sum": _comparisons(*(a[s] for a in dwell)),
            },
        ).verdict
        for s in range(SEEDS)
    ]
    assert np.mean([v == WORSE for v in verdicts]) <= 0.05


def test_a_drop_is_called_worse():
    rng = np.random.default_rng(8)
    arrays = _binary_days(rng, 1, SHARE, BASE_RATE, 0.07)
    assert readout(_comparisons(*(a[0] for a in arrays)), ROLLOUT).verdict == WORSE


def test_a_lower_is_better_primary_metric_turns_the_verdict_around():
    rng = np.random.default_rng(8)
    arrays = _binary_days(rng, 1, SHARE, BASE_RATE, 0.07)
    lower_is_better = Rollout(
        unit="user_id", challenger_share=SHARE, salt="s", direction="decrease"
    )
    assert readout(_comparisons(*(a[0] for a in arrays)), lower_is_better).verdict == BETTER


def test_a_challenger_share_off_its_setting_is_a_sample_ratio_mismatch():
    rng = np.random.default_rng(9)
    arrays = _binary_days(rng, 1, 0.23, BASE_RATE, LIFTED_RATE)  # configured 0.2
    result = readout(_comparisons(*(a[0] for a in arrays)), ROLLOUT)
    assert result.verdict == SRM_REASON == "invalid: sample ratio mismatch"
    assert result.srm.p_value < 0.001
    assert "invalid" in result.sentence and "20%" in result.sentence


def test_sample_ratio_check_counts_assigned_units_when_given():
    rng = np.random.default_rng(9)
    arrays = _binary_days(rng, 1, SHARE, BASE_RATE, BASE_RATE)
    comparisons = _comparisons(*(a[0] for a in arrays))
    assert readout(comparisons, ROLLOUT, assignment=(700, 300)).verdict == SRM_REASON
    assert not srm_check(8_000, 2_000, 0.2).mismatch


def test_a_worse_guardrail_makes_an_otherwise_better_challenger_worse():
    rng = np.random.default_rng(10)
    guarded = Rollout(
        unit="user_id",
        challenger_share=SHARE,
        salt="s",
        guardrails=(Guardrail("unsubscribe_max", "unsubscribe", "max", "decrease"),),
    )
    clicks = _comparisons(*(a[0] for a in _binary_days(rng, 1, SHARE, BASE_RATE, LIFTED_RATE)))
    unsubscribes = _comparisons(*(a[0] for a in _binary_days(rng, 1, SHARE, 0.01, 0.03)))
    result = readout(clicks, guarded, guardrails={"unsubscribe_max": unsubscribes})
    assert result.primary.outcome == "better"
    assert result.guardrails[0].outcome == "worse"
    assert result.verdict == WORSE
    assert "unsubscribe_max" in result.sentence


def test_too_little_exposure_is_inconclusive_whatever_the_difference():
    rng = np.random.default_rng(11)
    arrays = _binary_days(rng, 1, SHARE, BASE_RATE, 0.30, days=2, n=1_000)
    result = readout(_comparisons(*(a[0] for a in arrays)), ROLLOUT)  # ~400 challenger decisions
    assert result.primary.p_value < 0.05
    assert result.verdict == INCONCLUSIVE
    assert "Too early" in result.sentence and "1,000" in result.sentence


def test_arms_are_compared_within_days_not_pooled_across_days():
    # Day 1: high click rate, challenger gets 10%. Day 2: low click rate, challenger gets 30%.
    # The arms are equal each day, but pooled the challenger looks worse (Simpson's paradox).
    day1 = DayComparison("2026-12-01", _rate(9_000, 0.30), _rate(1_000, 0.30))
    day2 = DayComparison("2026-12-02", _rate(7_000, 0.05), _rate(3_000, 0.05))
    pooled = {
        arm: sum(getattr(d, arm).total for d in (day1, day2))
        / sum(getattr(d, arm).n for d in (day1, day2))
        for arm in (PRODUCTION, CHALLENGER)
    }
    assert pooled[CHALLENGER] < pooled[PRODUCTION] - 0.05
    result = readout([day2, day1], ROLLOUT)
    assert result.primary.difference == pytest.approx(0.0)
    assert result.primary.challenger_mean == pytest.approx(result.primary.production_mean)
    assert result.verdict == INCONCLUSIVE


def _rate(n, rate):
    clicks = round(n * rate)
    return Moments(n, clicks, clicks)


def test_an_inconclusive_experiment_at_its_maximum_duration_says_to_end_the_split():
    short = Rollout(unit="user_id", challenger_share=SHARE, salt="s", max_days=3)
    days = [DayComparison(f"2026-12-0{i}", _rate(3_200, 0.10), _rate(800, 0.10)) for i in (1, 2, 3)]
    result = readout(days, short)
    assert result.verdict == INCONCLUSIVE and result.max_days_reached
    assert "No difference found in 3 days (the maximum is 3)" in result.sentence
    assert "end the split" in result.sentence


def test_the_sentence_gives_rates_difference_and_interval_in_plain_words():
    days = [
        DayComparison(f"2026-12-0{i}", _rate(3_200, 0.10), _rate(800, 0.14)) for i in range(1, 8)
    ]
    result = readout(days, ROLLOUT, primary_name="clicked")
    assert result.verdict == BETTER
    assert result.sentence.startswith("The challenger is better: clicked rate 14.00% for the")
    assert "10.00% in production (+4.00 pp, 95% always-valid interval +" in result.sentence
    assert "It can replace production." in result.sentence
    low, high = result.primary.ci
    assert 0 < low < 0.04 < high


def test_no_common_day_is_inconclusive():
    result = readout([], ROLLOUT)
    assert result.verdict == INCONCLUSIVE and result.primary is None


def test_readout_is_json_ready():
    days = [DayComparison("2026-12-01", _rate(3_200, 0.10), _rate(800, 0.11))]
    record = json.loads(json.dumps(readout(days, ROLLOUT).as_dict()))
    assert record["verdict"] == INCONCLUSIVE
    assert record["primary"]["production_decisions"] == 3_200
    assert record["srm"]["expected_share"] == 0.2


def test_a_guardrail_the_rollout_does_not_declare_is_refused():
    with pytest.raises(ValueError, match="not in the rollout's guardrails"):
        readout([], ROLLOUT, guardrails={"dwell_mean": []})


# -- units that decide many times a day ----------------------------------------------------------


def test_day_comparisons_make_one_row_per_unit_day_when_units_are_given():
    day = ["2026-12-02", "2026-12-01", "2026-12-01", "2026-12-01", "2026-12-01", "2026-12-01"]
    arm = [PRODUCTION, PRODUCTION, PRODUCTION, CHALLENGER, CHALLENGER, PRODUCTION]
    value = [1, 1, 0, 1, 1, 0]
    unit = ["a", "a", "a", "b", "b", "c"]
    first, second = day_comparisons(day, arm, value, unit)
    assert first.day == "2026-12-01" and second.day == "2026-12-02"
    # on the 1st, production has units a (1 click in 2 decisions) and c (0 in 1)
    assert first.production == Moments(2, 1.0, 1.0, 3.0, 5.0, 2.0)
    assert first.challenger == Moments(1, 2.0, 4.0, 2.0, 4.0, 4.0)
    assert second.challenger == Moments(0, 0.0, 0.0, 0.0, 0.0, 0.0)
    assert first.production.mean == pytest.approx(1 / 3)  # the rate per decision


def test_day_comparisons_without_units_count_every_decision_as_a_row():
    (only,) = day_comparisons(["d1"] * 3, [PRODUCTION] * 3, [1.0, 0.0, 2.0])
    assert only.production == Moments.of([1.0, 0.0, 2.0])


def test_day_comparisons_refuse_an_unknown_arm():
    with pytest.raises(ValueError, match="production or challenger"):
        day_comparisons(["d1"], ["canary"], [1.0])


def test_clustered_a_a_stays_valid_with_unit_day_rows_and_not_with_decision_rows():
    # 400 users a day, each with their own click rate (Beta(2, 8)) and 1 + Poisson(9) decisions
    rng = np.random.default_rng(11)
    seeds, users = 200, 400
    challenger = rng.random((seeds, DAYS, users)) < SHARE
    decisions = 1 + rng.poisson(9, size=(seeds, DAYS, users))
    clicks = rng.binomial(decisions, rng.beta(2, 8, size=(seeds, DAYS, users))).astype(float)

    def moments(mask, s, i, by_unit):
        y, d = clicks[s, i][mask[s, i]], decisions[s, i][mask[s, i]]
        if by_unit:
            sums = (y.sum(), (y**2).sum(), d.sum(), (d**2).sum(), (y * d).sum())
            return Moments(len(y), *(float(x) for x in sums))
        return Moments(int(d.sum()), float(y.sum()), float(y.sum()))  # one 0/1 row per decision

    def false_verdicts(by_unit):
        verdicts = [
            readout(
                [
                    DayComparison(
                        f"d{i:02d}",
                        moments(~challenger, s, i, by_unit),
                        moments(challenger, s, i, by_unit),
                    )
                    for i in range(DAYS)
                ],
                ROLLOUT,
            ).verdict
            for s in range(seeds)
        ]
        return np.mean([v != INCONCLUSIVE for v in verdicts])

    assert false_verdicts(by_unit=True) <= 0.05
    assert false_verdicts(by_unit=False) > 0.15  # decisions of one user are not independent


def test_a_day_given_twice_is_refused():
    day = DayComparison("2026-12-01", _rate(3_200, 0.10), _rate(800, 0.10))
    with pytest.raises(ValueError, match="each day must come once"):
        readout([day, day], ROLLOUT)
