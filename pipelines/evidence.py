"""The gate's evidence: a candidate is blessed on what its evaluation can show, not on a point.

TFMA's thresholds (pipelines.train.eval_config) judge point estimates: an AUC above the floor,
no regression against the baseline. On a small eval split a point estimate is noise (8 positive
labels once decided a push), so the EvidenceGate component (pipelines.train) asks two more
questions of the Evaluator's figures on the gated slices (the rows whose label is observable,
else all rows), and blesses only when the Evaluator did and both hold:

- **enough evidence**: at least ``min_positives`` positive labels, else the reason is
  ``not enough evidence: N positives``;
- **the floor with confidence**: the AUC's ``confidence`` interval lies above ``min_auc``.

The interval is Hanley and McNeil's (1982): the AUC's standard error from the AUC and the
numbers of positives and negatives alone, so it needs no second pass over the predictions
(TFMA's own intervals recompute every metric on 20 jackknife partitions).

    >>> auc_interval(0.75, positives=40, negatives=360)
    (0.659..., 0.840...)
    >>> judge({"decision=1": {"auc": 0.8, "example_count": 90, "mean_label": 0.1}},
    ...       ["decision=1"], {"min_auc": 0.6, "min_positives": 50, "confidence": 0.95},
    ...       evaluator_blessed=True).why
    'not enough evidence: 9 positives (at least 50 needed)'
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from statistics import NormalDist

# What the gate needs from the blueprint's model.thresholds when it says nothing.
DEFAULT_MIN_POSITIVES = 50
DEFAULT_CONFIDENCE = 0.95
EVIDENCE_FILE = "evidence.json"


def auc_interval(
    auc: float, positives: int, negatives: int, confidence: float = DEFAULT_CONFIDENCE
) -> tuple[float, float]:
    """The two-sided ``confidence`` interval of an AUC measured on that many positives and
    negatives (Hanley & McNeil's standard error, normal approximation, clipped to [0, 1])."""
    if positives < 1 or negatives < 1:
        return (0.0, 1.0)
    q1 = auc / (2 - auc)
    q2 = 2 * auc * auc / (1 + auc)
    variance = (
        auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc)
    ) / (positives * negatives)
    half = NormalDist().inv_cdf((1 + confidence) / 2) * math.sqrt(max(variance, 0.0))
    return (max(0.0, auc - half), min(1.0, auc + half))


@dataclass(frozen=True)
class Evidence:
    """The gate's verdict: blessed or not, why in words, and the figures it judged.

    ``evidence_failures`` are the evidence's own reasons (not the Evaluator's), for a record
    that lists the Evaluator's failures next to them."""

    blessed: bool
    why: str
    figures: dict = field(default_factory=dict)
    evidence_failures: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {
            "blessed": self.blessed,
            "why": self.why,
            "figures": self.figures,
            "evidence_failures": list(self.evidence_failures),
        }


def judge(
    metrics: dict[str, dict], gated: list[str], limits: dict, evaluator_blessed: bool
) -> Evidence:
    """Judges the candidate's metrics per slice (``{slice: {"auc", "example_count",
    "mean_label"}}``, binary labels) on the ``gated`` slices against ``limits``
    (``min_auc``, ``min_positives``, ``confidence``)."""
    confidence = float(limits.get("confidence", DEFAULT_CONFIDENCE))
    min_positives = int(limits.get("min_positives", DEFAULT_MIN_POSITIVES))
    figures: dict = {"confidence": confidence, "min_positives": min_positives, "slices": {}}
    reasons = []
    positives_total = 0
    for name in gated:
        values = metrics.get(name, {})
        count = int(values.get("example_count", 0))
        positives = int(round(count * float(values.get("mean_label", 0.0))))
        negatives = count - positives
        positives_total += positives
        entry = {"examples": count, "positives": positives, "negatives": negatives}
        if "auc" in values and positives and negatives:
            low, high = auc_interval(values["auc"], positives, negatives, confidence)
            entry.update(auc=values["auc"], auc_interval=[round(low, 6), round(high, 6)])
            floor = limits.get("min_auc")
            if floor is not None and low < floor:
                reasons.append(
                    f"{name}: auc {values['auc']:.4f} is not above the floor {floor:g} at "
                    f"{confidence:.0%} confidence (interval {low:.4f}-{high:.4f})"
                )
        figures["slices"][name] = entry
    figures["positives"] = positives_total
    if positives_total < min_positives:
        reasons.insert(
            0,
            f"not enough evidence: {positives_total} positives (at least {min_positives} needed)",
        )
    failures = tuple(reasons)
    if not evaluator_blessed:
        reasons.append("the Evaluator's thresholds were not met")
    if reasons:
        return Evidence(False, "; ".join(reasons), figures, failures)
    return Evidence(True, f"enough evidence: {positives_total} positives", figures)


def write(evidence: Evidence, directory: str) -> str:
    """Writes the verdict as ``evidence.json`` into an artifact directory (local or gs://)."""
    from tfx import v1 as tfx

    path = os.path.join(directory, EVIDENCE_FILE)
    with tfx.dsl.io.fileio.open(path, "w") as f:
        f.write(json.dumps(evidence.to_json(), indent=2, sort_keys=True))
    return path


def read(directory: str) -> dict | None:
    """The verdict an EvidenceGate wrote into its blessing's directory (None when absent)."""
    from tfx import v1 as tfx

    path = os.path.join(directory, EVIDENCE_FILE)
    if not tfx.dsl.io.fileio.exists(path):
        return None
    with tfx.dsl.io.fileio.open(path, "r") as f:
        return json.loads(f.read())
