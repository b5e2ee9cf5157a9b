"""The gate's evidence (pipelines/evidence.py): the AUC interval and the verdict's rules."""

import numpy as np
import pytest

from pipelines import evidence
from tests.train_fixtures import auc

LIMITS = {"min_auc": 0.6, "min_positives": 50, "confidence": 0.95}


def _metrics(auc_value: float, examples: int, positives: int) -> dict:
    return {"auc": auc_value, "example_count": examples, "mean_label": positives / examples}


def test_auc_interval_covers_the_true_auc_about_95_percent_of_the_time():
    """Binormal scores (true AUC = Phi(d / sqrt 2)), 60 positives and 240 negatives, 400 draws."""
    rng = np.random.default_rng(7)
    separation = 1.0
    true_auc = 0.760250  # Phi(1 / sqrt(2))
    covered = 0
    for _ in range(400):
        pos = rng.normal(separation, 1.0, 60)
        neg = rng.normal(0.0, 1.0, 240)
        measured = auc(np.concatenate([pos, neg]), [1] * 60 + [0] * 240)
        low, high = evidence.auc_interval(measured, 60, 240, 0.95)
        covered += low <= true_auc <= high
    assert 0.92 <= covered / 400 <= 0.98


def test_auc_interval_narrows_with_evidence_and_widens_with_confidence():
    few = evidence.auc_interval(0.75, 10, 90)
    many = evidence.auc_interval(0.75, 400, 3600)
    assert few[1] - few[0] > 3 * (many[1] - many[0])
    assert few[0] < 0.75 < few[1]
    low99, high99 = evidence.auc_interval(0.75, 10, 90, confidence=0.99)
    assert low99 < few[0] and high99 > few[1]


def test_auc_interval_without_both_classes_is_everything():
    assert evidence.auc_interval(0.5, 0, 100) == (0.0, 1.0)


def test_too_few_positives_is_not_blessed_whatever_the_auc():
    verdict = evidence.judge(
        {"decision=1": _metrics(0.95, 400, 12)}, ["decision=1"], LIMITS, evaluator_blessed=True
    )
    assert not verdict.blessed
    assert verdict.why.startswith("not enough evidence: 12 positives")
    assert verdict.evidence_failures[0] == verdict.why
    assert verdict.figures["positives"] == 12


def test_positives_are_counted_on_the_gated_slices_only():
    metrics = {"overall": _metrics(0.8, 1000, 200), "decision=1": _metrics(0.8, 300, 40)}
    verdict = evidence.judge(metrics, ["decision=1"], LIMITS, evaluator_blessed=True)
    assert "not enough evidence: 40 positives" in verdict.why


def test_auc_whose_interval_reaches_below_the_floor_is_not_blessed():
    """0.66 clears the floor 0.6 as a point, not with 95% confidence on 60 positives."""
    verdict = evidence.judge(
        {"overall": _metrics(0.66, 300, 60)}, ["overall"], LIMITS, evaluator_blessed=True
    )
    assert not verdict.blessed
    assert "overall: auc 0.6600 is not above the floor 0.6 at 95% confidence" in verdict.why
    low, high = verdict.figures["slices"]["overall"]["auc_interval"]
    assert low < 0.6 < 0.66 < high


def test_enough_positives_and_a_confident_auc_is_blessed():
    verdict = evidence.judge(
        {"decision=1": _metrics(0.8, 330, 166)}, ["decision=1"], LIMITS, evaluator_blessed=True
    )
    assert verdict.blessed and verdict.why == "enough evidence: 166 positives"
    assert verdict.figures["slices"]["decision=1"]["negatives"] == 164


def test_evaluator_refusal_stands_whatever_the_evidence():
    verdict = evidence.judge(
        {"overall": _metrics(0.8, 330, 166)}, ["overall"], LIMITS, evaluator_blessed=False
    )
    assert not verdict.blessed and verdict.why == "the Evaluator's thresholds were not met"
    assert verdict.evidence_failures == ()


def test_verdict_round_trips_through_its_file(tmp_path):
    verdict = evidence.judge(
        {"overall": _metrics(0.8, 100, 10)}, ["overall"], LIMITS, evaluator_blessed=True
    )
    evidence.write(verdict, str(tmp_path))
    assert evidence.read(str(tmp_path)) == verdict.to_json()
    assert evidence.read(str(tmp_path / "none")) is None


@pytest.mark.parametrize("confidence", [0.8, 0.95])
def test_interval_is_symmetric_around_a_middling_auc(confidence):
    low, high = evidence.auc_interval(0.7, 100, 100, confidence)
    assert 0.7 - low == pytest.approx(high - 0.7)
