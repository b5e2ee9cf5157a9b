"""loopline.metrics against hand-computed answers and brute-force definitions."""

import math
import random

import pytest

from loopline.metrics import (
    OutcomeSummary,
    auc,
    auc_from_counts,
    calibration_table,
    expected_calibration_error,
    log_loss,
    regression_metrics,
    summarise,
    two_proportion_test,
    was_explored,
    wilson_interval,
)


def brute_force_auc(scores, labels):
    """The Mann-Whitney definition: over every (positive, negative) pair, 1 if the positive
    scores higher, 1/2 on a tie."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_on_a_hand_made_fixture():
    # Pairs (pos, neg): (0.35, 0.1) win, (0.35, 0.4) loss, (0.8, 0.1) win, (0.8, 0.4) win.
    assert auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(3 / 4)
    # A tie between a positive and a negative counts one half.
    assert auc([0.5, 0.5, 0.9], [0, 1, 1]) == pytest.approx((0.5 + 1) / 2)
    assert auc([0.2, 0.9], [1, 0]) == 0.0


def test_auc_is_none_with_one_class():
    assert auc([0.1, 0.2], [1, 1]) is None
    assert auc_from_counts({0.1: (2, 0)}) is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_equals_brute_force_pair_count_on_random_data(seed):
    rng = random.Random(seed)
    # Coarse scores so that ties happen.
    scores = [round(rng.random(), 2) for _ in range(300)]
    labels = [int(rng.random() < 0.2 + 0.6 * s) for s in scores]
    expected = brute_force_auc(scores, labels)
    assert auc(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert summarise(
        {"score": s, "label": y} for s, y in zip(scores, labels, strict=True)
    ).binary_metrics()["auc"] == pytest.approx(expected, abs=1e-12)


def test_log_loss_by_hand():
    assert log_loss([0.5, 0.5], [0, 1]) == pytest.approx(math.log(2))
    expected = -(math.log(0.9) + math.log(1 - 0.2) + math.log(0.3)) / 3
    assert log_loss([0.9, 0.2, 0.3], [1, 0, 1]) == pytest.approx(expected)
    # A confident miss is clipped, not infinite.
    assert math.isfinite(log_loss([1.0], [0]))


def test_calibration_table_and_ece_by_hand():
    scores = [0.05, 0.15, 0.12, 0.95, 1.0]
    labels = [0, 1, 0, 1, 1]
    table = calibration_table(scores, labels)
    assert [b.count for b in table] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 2]
    assert table[1].mean_score == pytest.approx(0.135)
    assert table[1].label_rate == 0.5
    assert table[9].upper == 1.0 and table[9].label_rate == 1.0
    expected = (1 * 0.05 + 2 * abs(0.135 - 0.5) + 2 * abs(0.975 - 1.0)) / 5
    assert expected_calibration_error(table) == pytest.approx(expected)


def test_regression_metrics_by_hand():
    out = regression_metrics([1.0, 2.0, 3.0], [1.0, 3.0, 2.0])
    assert out["rmse"] == pytest.approx(math.sqrt(2 / 3))
    assert out["mae"] == pytest.approx(2 / 3)
    # SSE = 2, SST around the mean 2 = 2, so R² = 0.
    assert out["r2"] == pytest.approx(0.0)
    assert regression_metrics([1.0, 1.0], [2.0, 2.0])["r2"] is None


def test_merged_summaries_equal_one_summary_of_all_rows():
    rng = random.Random(5)
    rows = [
        {
            "score": rng.random(),
            "label": rng.choice([0, 1]),
            "decision": rng.choice([0, 1]),
            "propensity": rng.choice([0.975, 0.025]),
        }
        for _ in range(400)
    ]
    whole = summarise(rows)
    parts = [summarise(rows[i : i + 70]) for i in range(0, 400, 70)]
    merged = OutcomeSummary()
    for part in reversed(parts):
        merged.merge(part)
    a, b = whole.binary_metrics(), merged.binary_metrics()
    for key in (
        "count",
        "auc",
        "log_loss",
        "calibration_error",
        "label_rate",
        "mean_score",
        "decision_rate",
        "exploration_share",
    ):
        assert a[key] == pytest.approx(b[key], abs=1e-12), key
    scores = [r["score"] for r in rows]
    labels = [r["label"] for r in rows]
    assert a["log_loss"] == pytest.approx(log_loss(scores, labels))
    assert a["calibration_error"] == pytest.approx(
        expected_calibration_error(calibration_table(scores, labels))
    )
    assert a["decision_rate"] == pytest.approx(sum(r["decision"] for r in rows) / 400)
    assert a["exploration_share"] == pytest.approx(sum(r["propensity"] < 0.5 for r in rows) / 400)


def test_merged_regression_summary_equals_reference():
    rng = random.Random(9)
    preds = [rng.gauss(3, 1) for _ in range(200)]
    targets = [p + rng.gauss(0, 0.5) for p in preds]
    rows = [{"score": p, "label": t} for p, t in zip(preds, targets, strict=True)]
    merged = summarise(rows[:50]).merge(summarise(rows[50:]))
    expected = regression_metrics(preds, targets)
    got = merged.regression_metrics()
    for key in ("rmse", "mae", "r2"):
        assert got[key] == pytest.approx(expected[key], rel=1e-9), key


def test_exploration_uses_the_flag_before_the_propensity():
    assert was_explored(True, 0.99) is True
    assert was_explored(None, 0.025) is True
    assert was_explored(None, 0.975) is False
    assert was_explored(None, None) is None


def test_wilson_interval_with_no_successes_has_the_closed_form_upper_bound():
    z = 1.959963984540054
    lo, hi = wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12)
    assert hi == pytest.approx(z * z / (10 + z * z))
    lo, hi = wilson_interval(50, 100)
    assert lo < 0.5 < hi and lo == pytest.approx(1 - hi)


def test_two_proportion_test_by_hand():
    # 30/100 vs 45/100: pooled p = 0.375, SE = sqrt(p(1-p)(1/100 + 1/100)).
    result = two_proportion_test(30, 100, 45, 100, "A", "B")
    se = math.sqrt(0.375 * 0.625 * 0.02)
    z = 0.15 / se
    p = math.erfc(z / math.sqrt(2))
    assert result.z == pytest.approx(z)
    assert result.p_value == pytest.approx(p)
    assert result.significant and p < 0.05
    se_diff = math.sqrt(0.3 * 0.7 / 100 + 0.45 * 0.55 / 100)
    assert result.difference_interval[0] == pytest.approx(0.15 - 1.959963984540054 * se_diff)
    sentence = result.sentence()
    assert "B's label rate 45.00% vs A's 30.00%: +15.00 pp" in sentence
    assert "significant at 5%" in sentence and "not significant" not in sentence


def test_two_proportion_test_with_no_difference_is_not_significant():
    result = two_proportion_test(36, 1000, 37, 1000, "model-1", "model-2", metric="click rate")
    assert not result.significant
    assert result.sentence().startswith("model-2's click rate 3.70% vs model-1's 3.60%: +0.10 pp")
    assert "not significant at 5%" in result.sentence()


def test_two_proportion_test_refuses_impossible_counts():
    with pytest.raises(ValueError, match="successes must be in"):
        two_proportion_test(5, 3, 1, 10)
