"""Model-monitoring metrics in plain Python and numpy: no Beam, no TensorFlow.

Two layers. The functions (``auc``, ``log_loss``, ``calibration_table``, ``regression_metrics``,
``wilson_interval``, ``two_proportion_test``) take whole arrays and are the reference
definitions. ``OutcomeSummary`` holds mergeable sufficient statistics of (score, label,
decision) rows, so a Beam combiner can build it per model and day on many workers and still
arrive at exactly the numbers the functions give on the whole array.

    >>> auc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    0.75
    >>> summary = OutcomeSummary()
    >>> for s, y in [(0.1, 0), (0.4, 0), (0.35, 1), (0.8, 1)]:
    ...     summary.add(s, y)
    >>> summary.binary_metrics()["auc"]
    0.75
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import numpy as np

# Scores are probabilities; log loss clips them so a confident miss costs a finite amount.
LOG_LOSS_EPS = 1e-15
CALIBRATION_BINS = 10
# Score keys for the rank statistic are rounded to this many decimals: float32 model outputs
# carry ~7 significant digits, and the rounding bounds the number of distinct keys per summary.
SCORE_DECIMALS = 6
# A chosen arm whose propensity is below this was an exploration step, not the greedy choice.
EXPLORATION_PROPENSITY = 0.5


# ---------------------------------------------------------------------------------------------
# Reference definitions on whole arrays


def auc(scores: Sequence[float], labels: Sequence[int]) -> float | None:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties count 1/2.

    Computed from mid-ranks (the Mann-Whitney U statistic). None when only one class is present.
    """
    s = np.asarray(scores, dtype=float)
    y = np.asarray(labels) > 0
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _mid_ranks(s)
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def auc_from_counts(counts: Mapping[float, Sequence[int]]) -> float | None:
    """AUC from ``{score: (negatives, positives)}``: the same statistic as ``auc``, aggregated."""
    n_neg = sum(c[0] for c in counts.values())
    n_pos = sum(c[1] for c in counts.values())
    if n_pos == 0 or n_neg == 0:
        return None
    wins = 0.0
    negatives_below = 0
    for score in sorted(counts):
        neg, pos = counts[score]
        wins += pos * (negatives_below + 0.5 * neg)
        negatives_below += neg
    return wins / (n_pos * n_neg)


def log_loss(scores: Sequence[float], labels: Sequence[int], eps: float = LOG_LOSS_EPS) -> float:
    """Mean binary cross-entropy, with scores clipped to [eps, 1 - eps]."""
    p = np.clip(np.asarray(scores, dtype=float), eps, 1 - eps)
    y = np.asarray(labels) > 0
    if len(p) == 0:
        return float("nan")
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


@dataclass(frozen=True)
class CalibrationBin:
    """One equal-width score bin: how many rows, their mean score and their observed label rate."""

    lower: float
    upper: float
    count: int
    mean_score: float | None
    label_rate: float | None

    def to_dict(self) -> dict:
        return {
            "lower": self.lower,
            "upper": self.upper,
            "count": self.count,
            "mean_score": self.mean_score,
            "label_rate": self.label_rate,
        }


def calibration_table(
    scores: Sequence[float], labels: Sequence[int], bins: int = CALIBRATION_BINS
) -> list[CalibrationBin]:
    """Equal-width bins over [0, 1] (the last one closed); scores outside are clipped in."""
    count = [0] * bins
    score_sum = [0.0] * bins
    label_sum = [0.0] * bins
    for s, y in zip(scores, labels, strict=True):
        b = calibration_bin(s, bins)
        count[b] += 1
        score_sum[b] += float(s)
        label_sum[b] += 1.0 if y > 0 else 0.0
    return _calibration_bins(count, score_sum, label_sum)


def calibration_bin(score: float, bins: int = CALIBRATION_BINS) -> int:
    """The index of the equal-width bin over [0, 1] that ``score`` falls in."""
    return min(max(int(math.floor(float(score) * bins)), 0), bins - 1)


def expected_calibration_error(table: Sequence[CalibrationBin]) -> float | None:
    """Row-weighted mean of |mean score - label rate| over the bins (ECE)."""
    total = sum(b.count for b in table)
    if total == 0:
        return None
    return sum(b.count * abs(b.mean_score - b.label_rate) for b in table if b.count) / total


def regression_metrics(predictions: Sequence[float], targets: Sequence[float]) -> dict:
    """RMSE, MAE and R² (1 - SSE/SST; None when the targets do not vary)."""
    p = np.asarray(predictions, dtype=float)
    t = np.asarray(targets, dtype=float)
    if len(t) == 0:
        return {"rmse": None, "mae": None, "r2": None}
    err = p - t
    sst = float(np.sum((t - t.mean()) ** 2))
    sse = float(np.sum(err**2))
    return {
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "r2": 1.0 - sse / sst if sst > 0 else None,
    }


# ---------------------------------------------------------------------------------------------
# Intervals and the A/B test


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion; (0, 1) when there are no trials."""
    if n <= 0:
        return 0.0, 1.0
    z = _z(confidence)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def normal_interval(mean: float, std_error: float, confidence: float = 0.95) -> tuple[float, float]:
    """mean ± z·SE, the Wald interval."""
    z = _z(confidence)
    return mean - z * std_error, mean + z * std_error


@dataclass(frozen=True)
class ProportionComparison:
    """Two observed rates, their difference (B - A) with a Wald interval, and a pooled z-test."""

    name_a: str
    name_b: str
    successes_a: int
    n_a: int
    successes_b: int
    n_b: int
    rate_a: float
    rate_b: float
    interval_a: tuple[float, float]
    interval_b: tuple[float, float]
    difference: float
    difference_interval: tuple[float, float]
    z: float | None
    p_value: float | None
    alpha: float
    metric: str = "label rate"

    @property
    def significant(self) -> bool:
        return self.p_value is not None and self.p_value < self.alpha

    def sentence(self) -> str:
        """The comparison in plain words, e.g. for the report's A/B section."""
        pct = 100 * (1 - self.alpha)
        lo, hi = self.difference_interval
        head = (
            f"{self.name_b}'s {self.metric} {_pct(self.rate_b)} vs {self.name_a}'s "
            f"{_pct(self.rate_a)}: {_pp(self.difference)}, {pct:g}% CI "
            f"[{_pp(lo)}, {_pp(hi)}]"
        )
        if self.p_value is None:
            return f"{head}; no test possible (a group is empty or the rate is 0% or 100% in both)."
        verdict = (
            f"significant at {100 * self.alpha:g}%"
            if self.significant
            else f"not significant at {100 * self.alpha:g}%"
        )
        return f"{head}, {_p(self.p_value)} — {verdict}."

    def to_dict(self) -> dict:
        return {
            "a": self.name_a,
            "b": self.name_b,
            "successes_a": self.successes_a,
            "n_a": self.n_a,
            "successes_b": self.successes_b,
            "n_b": self.n_b,
            "rate_a": self.rate_a,
            "rate_b": self.rate_b,
            "interval_a": list(self.interval_a),
            "interval_b": list(self.interval_b),
            "difference": self.difference,
            "difference_interval": list(self.difference_interval),
            "z": self.z,
            "p_value": self.p_value,
            "alpha": self.alpha,
            "significant": self.significant,
            "sentence": self.sentence(),
        }


def two_proportion_test(
    successes_a: int,
    n_a: int,
    successes_b: int,
    n_b: int,
    name_a: str = "A",
    name_b: str = "B",
    alpha: float = 0.05,
    metric: str = "label rate",
) -> ProportionComparison:
    """Two-sided two-proportion z-test (pooled SE) of rate B vs rate A.

    The rates get Wilson intervals; their difference gets an unpooled Wald interval.

    >>> two_proportion_test(360, 10_000, 410, 10_000, "A", "B").p_value < 0.1
    True
    """
    for name, s, n in ((name_a, successes_a, n_a), (name_b, successes_b, n_b)):
        if n < 0 or s < 0 or s > n:
            raise ValueError(f"{name}: successes must be in [0, n], got {s} of {n}")
    rate_a = successes_a / n_a if n_a else 0.0
    rate_b = successes_b / n_b if n_b else 0.0
    diff = rate_b - rate_a
    confidence = 1 - alpha
    if n_a and n_b:
        se = math.sqrt(rate_a * (1 - rate_a) / n_a + rate_b * (1 - rate_b) / n_b)
        diff_interval = normal_interval(diff, se, confidence)
        pooled = (successes_a + successes_b) / (n_a + n_b)
        se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    else:
        diff_interval = (-1.0, 1.0)
        se_pooled = 0.0
    if se_pooled > 0:
        z = diff / se_pooled
        p_value = 2 * (1 - NormalDist().cdf(abs(z)))
    else:
        z = p_value = None
    return ProportionComparison(
        name_a,
        name_b,
        successes_a,
        n_a,
        successes_b,
        n_b,
        rate_a,
        rate_b,
        wilson_interval(successes_a, n_a, confidence),
        wilson_interval(successes_b, n_b, confidence),
        diff,
        diff_interval,
        z,
        p_value,
        alpha,
        metric,
    )


def _pct(rate: float) -> str:
    return f"{100 * rate:.2f}%"


def _pp(diff: float) -> str:
    return f"{100 * diff:+.2f} pp"


def _p(p: float) -> str:
    return f"p={p:.2g}" if p >= 0.001 else "p<0.001"


# ---------------------------------------------------------------------------------------------
# Mergeable summaries


def is_positive_decision(decision: Any) -> bool | None:
    """Whether a decision acted (1/True/non-zero); None when it is absent or not a number."""
    if decision is None:
        return None
    if isinstance(decision, bool):
        return decision
    if isinstance(decision, int | float):
        return decision != 0
    return None


def was_explored(explored: bool | None, propensity: float | None) -> bool | None:
    """The explicit explored flag when the row has one, else propensity < 0.5 on the chosen arm."""
    if explored is not None:
        return bool(explored)
    if propensity is not None:
        return propensity < EXPLORATION_PROPENSITY
    return None


@dataclass
class OutcomeSummary:
    """Mergeable statistics of scored, labelled decisions (one model, one day or all days).

    ``add`` one row at a time, ``merge`` partial summaries in any order; ``binary_metrics`` and
    ``regression_metrics`` then equal the reference functions on the concatenated rows (AUC to
    the ``SCORE_DECIMALS`` rounding of the scores).
    """

    count: int = 0
    observed: int = 0  # rows whose label came from an observation, not the default
    score_sum: float = 0.0
    label_sum: float = 0.0
    # Binary labels.
    log_loss_sum: float = 0.0
    score_label_counts: dict = field(default_factory=dict)  # rounded score -> [neg, pos]
    calibration_count: list = field(default_factory=lambda: [0] * CALIBRATION_BINS)
    calibration_score_sum: list = field(default_factory=lambda: [0.0] * CALIBRATION_BINS)
    calibration_label_sum: list = field(default_factory=lambda: [0.0] * CALIBRATION_BINS)
    # Numeric labels: errors and the label's mean / sum of squared deviations (Chan's merge).
    sq_err_sum: float = 0.0
    abs_err_sum: float = 0.0
    label_mean: float = 0.0
    label_m2: float = 0.0
    # Decisions.
    decisions_known: int = 0
    decisions_positive: int = 0
    exploration_known: int = 0
    explored: int = 0
    propensity_sum: float = 0.0
    propensity_known: int = 0

    def add(
        self,
        score: float,
        label: float,
        decision: Any = None,
        propensity: float | None = None,
        explored: bool | None = None,
        observed: bool = True,
    ) -> OutcomeSummary:
        score = float(score)
        label = float(label)
        self.count += 1
        self.observed += 1 if observed else 0
        self.score_sum += score
        self.label_sum += label
        positive = label > 0
        p = min(max(score, LOG_LOSS_EPS), 1 - LOG_LOSS_EPS)
        self.log_loss_sum += -math.log(p) if positive else -math.log1p(-p)
        key = round(score, SCORE_DECIMALS)
        counts = self.score_label_counts.setdefault(key, [0, 0])
        counts[1 if positive else 0] += 1
        b = calibration_bin(score)
        self.calibration_count[b] += 1
        self.calibration_score_sum[b] += score
        self.calibration_label_sum[b] += 1.0 if positive else 0.0
        err = score - label
        self.sq_err_sum += err * err
        self.abs_err_sum += abs(err)
        delta = label - self.label_mean
        self.label_mean += delta / self.count
        self.label_m2 += delta * (label - self.label_mean)
        acted = is_positive_decision(decision)
        if acted is not None:
            self.decisions_known += 1
            self.decisions_positive += 1 if acted else 0
        chose_to_explore = was_explored(explored, propensity)
        if chose_to_explore is not None:
            self.exploration_known += 1
            self.explored += 1 if chose_to_explore else 0
        if propensity is not None:
            self.propensity_known += 1
            self.propensity_sum += float(propensity)
        return self

    def merge(self, other: OutcomeSummary) -> OutcomeSummary:
        """Folds ``other`` into this summary (in place) and returns it."""
        n_a, n_b = self.count, other.count
        if n_b:
            n = n_a + n_b
            delta = other.label_mean - self.label_mean
            self.label_m2 += other.label_m2 + delta * delta * n_a * n_b / n
            self.label_mean += delta * n_b / n
        for name in (
            "count",
            "observed",
            "score_sum",
            "label_sum",
            "log_loss_sum",
            "sq_err_sum",
            "abs_err_sum",
            "decisions_known",
            "decisions_positive",
            "exploration_known",
            "explored",
            "propensity_sum",
            "propensity_known",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for key, (neg, pos) in other.score_label_counts.items():
            counts = self.score_label_counts.setdefault(key, [0, 0])
            counts[0] += neg
            counts[1] += pos
        for i in range(CALIBRATION_BINS):
            self.calibration_count[i] += other.calibration_count[i]
            self.calibration_score_sum[i] += other.calibration_score_sum[i]
            self.calibration_label_sum[i] += other.calibration_label_sum[i]
        return self

    def common_metrics(self) -> dict:
        """Counts, mean label vs mean score, decision rate and exploration share."""
        n = self.count
        return {
            "count": n,
            "observed": self.observed,
            "observed_share": self.observed / n if n else None,
            "label_rate": self.label_sum / n if n else None,
            # The label's sum and sum of squares: what a sequential test between arms needs.
            "label_sum": self.label_sum,
            "label_sum_sq": self.label_m2 + n * self.label_mean * self.label_mean,
            "mean_score": self.score_sum / n if n else None,
            "decision_rate": (
                self.decisions_positive / self.decisions_known if self.decisions_known else None
            ),
            "decisions_known": self.decisions_known,
            "exploration_share": self.explored / self.exploration_known
            if self.exploration_known
            else None,
            "exploration_known": self.exploration_known,
            "mean_propensity": (
                self.propensity_sum / self.propensity_known if self.propensity_known else None
            ),
        }

    def calibration(self) -> list[CalibrationBin]:
        return _calibration_bins(
            self.calibration_count, self.calibration_score_sum, self.calibration_label_sum
        )

    def binary_metrics(self) -> dict:
        """``common_metrics`` plus AUC, log loss, the calibration table and its ECE."""
        table = self.calibration()
        out = self.common_metrics()
        out.update(
            {
                "positives": int(round(self.label_sum)),
                "auc": auc_from_counts(self.score_label_counts),
                "log_loss": self.log_loss_sum / self.count if self.count else None,
                "calibration_error": expected_calibration_error(table),
                "calibration": [b.to_dict() for b in table],
            }
        )
        return out

    def regression_metrics(self) -> dict:
        """``common_metrics`` plus RMSE, MAE and R²."""
        n = self.count
        out = self.common_metrics()
        out.update(
            {
                "rmse": math.sqrt(self.sq_err_sum / n) if n else None,
                "mae": self.abs_err_sum / n if n else None,
                "r2": 1.0 - self.sq_err_sum / self.label_m2 if n and self.label_m2 > 0 else None,
            }
        )
        return out

    def metrics(self, label_type: str) -> dict:
        """``binary_metrics`` for an ``int`` label, ``regression_metrics`` for a ``float`` one."""
        return self.binary_metrics() if label_type == "int" else self.regression_metrics()

    def score_histogram(self, bins: int = 20) -> dict:
        """Counts of the (rounded) scores in ``bins`` equal-width bins between their min and max."""
        if not self.score_label_counts:
            return {"edges": [], "counts": []}
        keys = np.array(list(self.score_label_counts), dtype=float)
        weights = np.array([sum(c) for c in self.score_label_counts.values()], dtype=float)
        lo, hi = float(keys.min()), float(keys.max())
        if lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
        elif lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        counts, edges = np.histogram(keys, bins=bins, range=(lo, hi), weights=weights)
        return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def _calibration_bins(
    count: Sequence[int], score_sum: Sequence[float], label_sum: Sequence[float]
) -> list[CalibrationBin]:
    bins = len(count)
    return [
        CalibrationBin(
            lower=i / bins,
            upper=(i + 1) / bins,
            count=count[i],
            mean_score=score_sum[i] / count[i] if count[i] else None,
            label_rate=label_sum[i] / count[i] if count[i] else None,
        )
        for i in range(bins)
    ]


def summarise(rows: Iterable[Mapping[str, Any]]) -> OutcomeSummary:
    """An OutcomeSummary of dict rows with ``score`` and ``label`` (and optional decision fields)."""
    summary = OutcomeSummary()
    for row in rows:
        summary.add(
            row["score"],
            row["label"],
            row.get("decision"),
            row.get("propensity"),
            row.get("explored"),
            row.get("observed", True),
        )
    return summary


def _mid_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    ranks = np.empty(len(values), dtype=float)
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2.0 + 1
        i = j + 1
    return ranks
