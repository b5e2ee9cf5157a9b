"""The gate's evidence: a candidate is blessed on what its evaluation can show, not on a point.

TFMA's thresholds (pipelines.train_config.eval_config) judge point estimates: an AUC above the floor,
no regression against the baseline. On a small eval split a point estimate is noise (8 positive
labels once decided a push), so the EvidenceGate component (pipelines.train) asks two more
questions of the Evaluator's figures on the gated slices (the rows whose label is observable,
else all rows), and blesses only when the Evaluator did and both hold:

- **enough evidence**: at least ``min_positives`` positive labels, else the reason is
  ``not enough evidence: N positives``;
- **the floor with confidence**: the AUC's ``confidence`` interval lies above ``min_auc``;
- **the policy that will run is not worse** (``policy_value``): the candidate's scores, put
  through the blueprint's policy, are evaluated off-policy (doubly robust, with SNIPS next to
  it) on the eval rows and compared with the logged policy's own value, the mean reward of
  those rows. Blessed only when the lower end of the ``confidence`` interval of (candidate -
  logged) lies above ``-max_policy_value_loss`` times the logged value.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from loopline import ope

# What the gate needs from the blueprint's model.thresholds when it says nothing.
DEFAULT_MIN_POSITIVES = 50
DEFAULT_CONFIDENCE = 0.95
# The share of the logged policy's value a candidate's policy may lose (model.thresholds).
DEFAULT_MAX_POLICY_VALUE_LOSS = 0.05
# Policies that turn one score into P(decision = 1), which the off-policy check can evaluate.
JUDGED_POLICIES = ("threshold", "epsilon_greedy")
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
    metrics: dict[str, dict],
    gated: list[str],
    limits: dict,
    evaluator_blessed: bool,
    policy: PolicyValue | None = None,
) -> Evidence:
    """Judges the candidate's metrics per slice (``{slice: {"auc", "example_count",
    "mean_label"}}``, binary labels) on the ``gated`` slices against ``limits``
    (``min_auc``, ``min_positives``, ``confidence``), and its policy's value when ``policy``
    (``policy_value``) is given."""
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
    passed = [f"enough evidence: {positives_total} positives"]
    if policy is not None:
        figures["policy_value"] = policy.figures
        if policy.passed:
            passed.append(policy.why)
        else:
            reasons.append(policy.why)
    failures = tuple(reasons)
    if not evaluator_blessed:
        reasons.append("the Evaluator's thresholds were not met")
    if reasons:
        return Evidence(False, "; ".join(reasons), figures, failures)
    return Evidence(True, "; ".join(passed), figures)


# --------------------------------------------------------------------------- the policy's value


@dataclass(frozen=True)
class PolicyValue:
    """The off-policy check's verdict: passed or not, why in one sentence, and its figures."""

    passed: bool
    why: str
    figures: dict


def send_probability(policy: dict, scores: Sequence[float]) -> np.ndarray:
    """P(decision = 1) for each score under a policy described as ``Policy.describe()`` does
    (``{"type": "threshold"|"epsilon_greedy", "threshold", "epsilon"}``).

    >>> send_probability({"type": "epsilon_greedy", "threshold": 0.1, "epsilon": 0.05},
    ...                  [0.3, 0.05])
    array([0.975, 0.025])
    """
    if policy.get("type") not in JUDGED_POLICIES:
        raise ValueError(f"a {policy.get('type')} policy does not turn a score into P(send)")
    greedy = np.asarray(scores, dtype=float) >= float(policy["threshold"])
    if policy["type"] == "threshold":
        return greedy.astype(float)
    epsilon = float(policy["epsilon"])
    return np.where(greedy, 1 - epsilon / 2, epsilon / 2)


def policy_value(
    reward: Sequence[float],
    decision: Sequence[int],
    propensity: Sequence[float],
    score: Sequence[float],
    policy: dict,
    observable: tuple[bool, bool] = (True, True),
    unobservable_reward: float = 0.0,
    max_loss: float = DEFAULT_MAX_POLICY_VALUE_LOSS,
    confidence: float = DEFAULT_CONFIDENCE,
) -> PolicyValue:
    """Whether the candidate's policy (its ``score`` through ``policy``) would earn at least
    what the logged policy earned on these rows, less ``max_loss`` of it.

    One entry per logged row: its ``reward`` (the label), the logged ``decision`` (0 or 1) and
    its logged ``propensity``; rows without a usable propensity (absent: -1.0) or decision
    (absent: -1) are left out and counted. ``observable[a]`` says whether the label is
    observable after decision ``a``: the outcome model is the candidate's score there and
    ``unobservable_reward`` (the label's default: an unsent notification earns no click)
    elsewhere. The judged figure is the doubly robust difference (``ope.dr_gain``): passed when
    the lower end of its ``confidence`` interval lies above ``-max_loss * |logged value|``.
    """
    reward, decision, propensity, score = (
        np.asarray(column, dtype=float) for column in (reward, decision, propensity, score)
    )
    has_propensity = (propensity > 0) & (propensity <= 1)
    has_decision = (decision == 0) | (decision == 1)
    usable = has_propensity & has_decision
    n = int(usable.sum())
    excluded = {
        "total": int(len(usable) - n),
        "no_propensity": int((~has_propensity).sum()),
        "no_decision": int((has_propensity & ~has_decision).sum()),
    }
    figures: dict = {
        "estimator": "dr",
        "policy": policy,
        "rows": int(len(usable)),
        "n": n,
        "excluded": excluded,
        "max_loss": max_loss,
        "confidence": confidence,
    }
    if n < 2:
        why = (
            f"policy value: {n} rows with a logged propensity and decision, too few to "
            f"evaluate the candidate's policy ({excluded['total']} excluded)"
        )
        return PolicyValue(False, why, {**figures, "passed": False, "why": why})
    reward, decision, pscore, score = (
        reward[usable], decision[usable], propensity[usable], score[usable]
    )  # fmt: skip
    send = send_probability(policy, score)
    q_send = score if observable[1] else np.full(n, unobservable_reward)
    q_hold = score if observable[0] else np.full(n, unobservable_reward)
    target_pscore = np.where(decision == 1, send, 1 - send)
    q_logged = np.where(decision == 1, q_send, q_hold)
    q_target = send * q_send + (1 - send) * q_hold

    def at(estimate: ope.Estimate) -> dict:
        return _rounded(ope.with_confidence(estimate, confidence).as_dict())

    # IPS with weights 1: the mean reward, the logged policy's own value.
    logged = {**at(ope.ips(reward, pscore, pscore)), "estimator": "mean_reward"}
    figures.update(
        logged=logged,
        dr=at(ope.dr(reward, pscore, target_pscore, q_logged, q_target)),
        dr_gain=at(ope.dr_gain(reward, pscore, target_pscore, q_logged, q_target)),
        send_share=round(float(send.mean()), 6),
        logged_send_share=round(float(decision.mean()), 6),
    )
    try:
        figures["snips"] = at(ope.snips(reward, pscore, target_pscore))
        figures["snips_gain"] = at(ope.snips_gain(reward, pscore, target_pscore))
    except ValueError:  # no logged action is one the candidate would take
        figures["snips"] = figures["snips_gain"] = None
    gain = figures["dr_gain"]
    tolerance = max_loss * abs(logged["value"])
    figures["tolerance"] = round(tolerance, 6)
    passed = gain["ci_low"] > -tolerance
    compared = (
        f"DR {figures['dr']['value']:.4f} vs logged {logged['value']:.4f} per decision on "
        f"{n} rows, difference {gain['value']:+.4f} ({confidence:.0%} interval "
        f"{gain['ci_low']:+.4f} to {gain['ci_high']:+.4f})"
    )
    if excluded["total"]:
        compared += f", {excluded['total']} rows without a logged propensity or decision left out"
    allowed = f"-{tolerance:.4f} ({max_loss:.0%} of the logged value)"
    why = (
        f"policy value: {compared} is within the allowed loss {allowed}"
        if passed
        else f"policy value: the candidate's policy may earn less than the logged one: "
        f"{compared} reaches below the allowed loss {allowed}"
    )
    return PolicyValue(passed, why, {**figures, "passed": passed, "why": why})


@dataclass(frozen=True)
class LoggedRows:
    """The eval rows as the off-policy check reads them: the label (the reward), the logged
    decision and propensity (-1 and -1.0 where absent) and the candidate's score."""

    reward: np.ndarray
    decision: np.ndarray
    propensity: np.ndarray
    score: np.ndarray


def read_logged_rows(
    model_dir: str,
    example_files: list[str],
    label: str,
    label_type: str = "int",
    batch_size: int = 1024,
) -> LoggedRows:
    """Scores the examples in ``example_files`` (gzip TFRecords, local or gs://) with the
    SavedModel in ``model_dir`` (its ``serving_default``: serialized examples in, ``score``
    out) and reads their label and decision provenance with TensorFlow."""
    import tensorflow as tf

    serve = tf.saved_model.load(model_dir).signatures["serving_default"]
    spec = {
        label: tf.io.FixedLenFeature([], tf.int64 if label_type == "int" else tf.float32),
        "decision": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
        "propensity": tf.io.FixedLenFeature([], tf.float32, default_value=-1.0),
    }
    columns: dict[str, list] = {"reward": [], "decision": [], "propensity": [], "score": []}
    records = tf.data.TFRecordDataset(example_files, compression_type="GZIP").batch(batch_size)
    for batch in records:
        parsed = tf.io.parse_example(batch, spec)
        columns["reward"].append(parsed[label].numpy())
        columns["decision"].append(parsed["decision"].numpy())
        columns["propensity"].append(parsed["propensity"].numpy())
        columns["score"].append(serve(examples=batch)["score"].numpy())
    return LoggedRows(
        **{
            name: np.concatenate(parts).astype(float) if parts else np.zeros(0)
            for name, parts in columns.items()
        }
    )


def _rounded(figures: dict) -> dict:
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in figures.items()}


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
