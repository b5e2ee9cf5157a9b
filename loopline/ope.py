"""Off-policy evaluation: what a policy *would* have earned, estimated from another policy's log.

Every logged decision carries the propensity the logging policy gave the action it took. That
is what makes these estimators possible: a row whose action the evaluated (target) policy would
also take is re-weighted by ``w = target_pscore / pscore``, so that the weighted log looks as if
the target policy had made the decisions.

* ``ips`` (inverse propensity scoring): ``mean(w * reward)``. Unbiased when every action the
  target policy takes had a non-zero logging propensity; its variance grows with the weights.
* ``snips`` (self-normalised IPS): ``sum(w * reward) / sum(w)``. Slightly biased, usually far
  less variable, and always within the range of the rewards.
* ``dr`` (doubly robust): ``mean(q_target + w * (reward - q_logged))``. Starts from an outcome
  model's estimate of the target policy's value and corrects it with the weighted residuals of
  the logged rows; unbiased if either the propensities or the outcome model are right, and
  usually the least variable of the three.

Each returns an ``Estimate`` with ``.value``, a 95% confidence interval ``.ci = (low, high)``
and the number of rows ``.n``. The intervals are normal approximations on the per-row terms
(their influence functions): ``value ± 1.96 · sd(terms) / sqrt(n)``; for SNIPS the terms are
the ratio estimator's linearisation ``w · (reward - value) / mean(w)`` (the delta method).

    >>> ips([1, 0, 1], pscore=[0.5, 0.5, 0.25], target_pscore=[1, 0, 0.5]).value
    1.3333333333333333
    >>> snips([1, 0, 1], pscore=[0.5, 0.5, 0.25], target_pscore=[1, 0, 0.5]).value
    1.0

With a deterministic target policy, ``target_pscore`` is 1 where it would have taken the
logged action and 0 elsewhere. See docs/ope.md for how to read the figures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
_Z = float(stats.norm.ppf(0.5 + CONFIDENCE / 2))  # 1.959963984540054

ArrayLike = Sequence[float] | np.ndarray


@dataclass(frozen=True)
class Estimate:
    """A policy value estimated off-policy: the point estimate, its 95% interval and its size.

    ``se`` is the standard error the interval was built from, ``estimator`` names the method
    (``ips``, ``snips`` or ``dr``), and ``mean_weight`` is the mean of ``target_pscore /
    pscore``: close to 1 when the propensities are right and the sample covers the target
    policy; far from 1, the estimate rests on few rows. With a single row the spread cannot be
    estimated, and the interval is ``(-inf, inf)``.
    """

    value: float
    ci: tuple[float, float]
    n: int
    se: float
    estimator: str
    mean_weight: float

    def as_dict(self) -> dict:
        """The figures for a JSON record (a model record, a monitor's metrics)."""
        return {
            "estimator": self.estimator,
            "value": self.value,
            "ci_low": self.ci[0],
            "ci_high": self.ci[1],
            "se": self.se,
            "n": self.n,
            "mean_weight": self.mean_weight,
        }


def ips(reward: ArrayLike, pscore: ArrayLike, target_pscore: ArrayLike) -> Estimate:
    """Inverse propensity scoring: ``mean(target_pscore / pscore * reward)``.

    Args:
      reward: the observed reward of each logged decision.
      pscore: the logging policy's probability of the logged action, in (0, 1].
      target_pscore: the evaluated policy's probability of that same action, in [0, 1].
    """
    reward, pscore, target_pscore = _checked(
        reward=reward, pscore=pscore, target_pscore=target_pscore
    )
    weights = target_pscore / pscore
    return _mean_estimate(weights * reward, weights, "ips")


def snips(reward: ArrayLike, pscore: ArrayLike, target_pscore: ArrayLike) -> Estimate:
    """Self-normalised IPS: ``sum(w * reward) / sum(w)`` with ``w = target_pscore / pscore``.

    The interval uses the ratio estimator's variance (delta method): the standard deviation of
    ``w * (reward - value) / mean(w)`` over ``sqrt(n)``. When no logged action is one the
    target policy would take (all weights zero) there is no evidence at all, and a ValueError
    says so.
    """
    reward, pscore, target_pscore = _checked(
        reward=reward, pscore=pscore, target_pscore=target_pscore
    )
    weights = target_pscore / pscore
    mean_weight = weights.mean()
    if mean_weight == 0:
        raise ValueError(
            "snips: target_pscore is 0 on every logged row, so the log says nothing about the "
            "evaluated policy"
        )
    value = float((weights * reward).sum() / weights.sum())
    influence = weights * (reward - value) / mean_weight
    return _estimate(value, influence, weights, "snips")


def dr(
    reward: ArrayLike,
    pscore: ArrayLike,
    target_pscore: ArrayLike,
    q_logged: ArrayLike,
    q_target: ArrayLike,
) -> Estimate:
    """Doubly robust: ``mean(q_target + w * (reward - q_logged))``, ``w = target_pscore / pscore``.

    Args:
      reward, pscore, target_pscore: as for ``ips``.
      q_logged: the outcome model's estimate of the reward of the logged action.
      q_target: the outcome model's expected reward under the evaluated policy for that row's
        context (``sum over actions of target probability * estimate``).
    """
    terms, weights, _ = _dr_terms(reward, pscore, target_pscore, q_logged, q_target)
    return _mean_estimate(terms, weights, "dr")


# --------------------------------------------------------------------------- against the log
# A target policy compared with the policy that logged the data, on the same rows: the
# training gate's question (pipelines.evidence), "would the candidate's policy earn less?".


def with_confidence(estimate: Estimate, confidence: float) -> Estimate:
    """The same estimate with its interval at another two-sided ``confidence`` (same ``se``).

    >>> with_confidence(ips([1, 0, 1, 0], [1] * 4, [1] * 4), 0.90).ci
    (0.0252..., 0.9747...)
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if not math.isfinite(estimate.se):
        return estimate
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    half = z * estimate.se
    return replace(estimate, ci=(estimate.value - half, estimate.value + half))


def dr_gain(
    reward: ArrayLike,
    pscore: ArrayLike,
    target_pscore: ArrayLike,
    q_logged: ArrayLike,
    q_target: ArrayLike,
) -> Estimate:
    """The target policy's DR value minus the logged policy's own value (the mean reward), on
    the same rows: ``mean(q_target + w * (reward - q_logged) - reward)``.

    Paired row by row, so what both values share (which rows, how they turned out) cancels in
    the interval: it is much narrower than the two separate intervals would suggest.
    """
    terms, weights, reward = _dr_terms(reward, pscore, target_pscore, q_logged, q_target)
    return _mean_estimate(terms - reward, weights, "dr_gain")


def snips_gain(reward: ArrayLike, pscore: ArrayLike, target_pscore: ArrayLike) -> Estimate:
    """The target policy's SNIPS value minus the logged policy's mean reward, on the same rows;
    the interval from the paired influence terms ``w * (reward - snips) / mean(w) - (reward -
    mean(reward))``. A ValueError when no logged action is one the target policy would take."""
    reward, pscore, target_pscore = _checked(
        reward=reward, pscore=pscore, target_pscore=target_pscore
    )
    target = snips(reward, pscore, target_pscore)
    weights = target_pscore / pscore
    logged = reward.mean()
    influence = weights * (reward - target.value) / weights.mean() - (reward - logged)
    return _estimate(target.value - float(logged), influence, weights, "snips_gain")


def _dr_terms(
    reward: ArrayLike,
    pscore: ArrayLike,
    target_pscore: ArrayLike,
    q_logged: ArrayLike,
    q_target: ArrayLike,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """DR's per-row terms ``q_target + w * (reward - q_logged)``, the weights and the rewards."""
    reward, pscore, target_pscore, q_logged, q_target = _checked(
        reward=reward,
        pscore=pscore,
        target_pscore=target_pscore,
        q_logged=q_logged,
        q_target=q_target,
    )
    weights = target_pscore / pscore
    return q_target + weights * (reward - q_logged), weights, reward


def _mean_estimate(terms: np.ndarray, weights: np.ndarray, estimator: str) -> Estimate:
    value = float(terms.mean())
    return _estimate(value, terms - value, weights, estimator)


def _estimate(
    value: float, centred_terms: np.ndarray, weights: np.ndarray, estimator: str
) -> Estimate:
    n = len(centred_terms)
    mean_weight = float(weights.mean())
    if n < 2:
        return Estimate(value, (-math.inf, math.inf), n, math.inf, estimator, mean_weight)
    se = float(math.sqrt((centred_terms**2).sum() / (n - 1) / n))
    return Estimate(value, (value - _Z * se, value + _Z * se), n, se, estimator, mean_weight)


def _checked(**columns: ArrayLike) -> list[np.ndarray]:
    """The columns as float arrays, or a ValueError naming the column and what is wrong."""
    arrays = {}
    for name, column in columns.items():
        try:
            array = np.asarray(column, dtype=float)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be an array of numbers") from None
        if array.ndim != 1:
            raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
        if np.isnan(array).any():
            raise ValueError(
                f"{name} contains NaN at row {int(np.flatnonzero(np.isnan(array))[0])}"
            )
        if not np.isfinite(array).all():
            raise ValueError(f"{name} contains an infinite value")
        arrays[name] = array
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) > 1:
        described = ", ".join(f"{name}={n}" for name, n in lengths.items())
        raise ValueError(f"all inputs must have the same length, got {described}")
    if not next(iter(lengths.values())):
        raise ValueError("no rows: an estimate needs at least one logged decision")
    pscore = arrays["pscore"]
    if ((pscore <= 0) | (pscore > 1)).any():
        bad = int(np.flatnonzero((pscore <= 0) | (pscore > 1))[0])
        raise ValueError(
            f"pscore must be in (0, 1] (a logged action had a non-zero probability), "
            f"got {pscore[bad]!r} at row {bad}"
        )
    target = arrays["target_pscore"]
    if ((target < 0) | (target > 1)).any():
        bad = int(np.flatnonzero((target < 0) | (target > 1))[0])
        raise ValueError(f"target_pscore must be in [0, 1], got {target[bad]!r} at row {bad}")
    return list(arrays.values())


@dataclass
class ValueSums:
    """The sums that ``snips`` and ``dr`` need, accumulated row by row and mergeable, so that a
    Beam combiner can estimate a policy's value over any number of rows without holding them.

    ``add`` takes one logged row (as the array functions' columns); ``snips()`` and ``dr()`` give
    the same ``Estimate`` as ``snips``/``dr`` over those rows (up to rounding). ``dr()`` is None
    unless every row came with its outcome-model estimates.

        >>> sums = ValueSums()
        >>> for r, p, t in [(1, 0.5, 1), (0, 0.5, 0), (1, 0.25, 0.5)]:
        ...     sums.add(r, p, t)
        >>> sums.snips().value
        1.0
    """

    n: int = 0
    weight: float = 0.0
    weight_reward: float = 0.0
    weight_sq: float = 0.0
    weight_sq_reward: float = 0.0
    weight_sq_reward_sq: float = 0.0
    dr_rows: int = 0
    dr_term: float = 0.0
    dr_term_sq: float = 0.0

    def add(
        self,
        reward: float,
        pscore: float,
        target_pscore: float,
        q_logged: float | None = None,
        q_target: float | None = None,
    ) -> ValueSums:
        """Adds one logged row; returns self. Refuses what ``snips`` refuses, in one line."""
        if not 0 < pscore <= 1:
            raise ValueError(f"pscore must be in (0, 1], got {pscore!r}")
        if not 0 <= target_pscore <= 1:
            raise ValueError(f"target_pscore must be in [0, 1], got {target_pscore!r}")
        if not math.isfinite(reward):
            raise ValueError(f"reward must be a finite number, got {reward!r}")
        w = target_pscore / pscore
        self.n += 1
        self.weight += w
        self.weight_reward += w * reward
        self.weight_sq += w * w
        self.weight_sq_reward += w * w * reward
        self.weight_sq_reward_sq += w * w * reward * reward
        if q_logged is not None and q_target is not None:
            term = q_target + w * (reward - q_logged)
            self.dr_rows += 1
            self.dr_term += term
            self.dr_term_sq += term * term
        return self

    def merge(self, other: ValueSums) -> ValueSums:
        """Adds another accumulator's rows; returns self."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def snips(self) -> Estimate | None:
        """SNIPS over the rows added; None with no row or when every weight is zero."""
        if not self.n or self.weight == 0:
            return None
        value = self.weight_reward / self.weight
        mean_weight = self.weight / self.n
        # sum of squared influences w (r - value) / mean_weight, expanded into the sums
        spread = (
            self.weight_sq_reward_sq - 2 * value * self.weight_sq_reward + value**2 * self.weight_sq
        )
        return _from_spread(value, max(spread, 0.0) / mean_weight**2, self.n, "snips", mean_weight)

    def dr(self) -> Estimate | None:
        """DR over the rows added; None unless every row had ``q_logged`` and ``q_target``."""
        if not self.n or self.dr_rows != self.n:
            return None
        value = self.dr_term / self.n
        spread = max(self.dr_term_sq - self.n * value**2, 0.0)
        return _from_spread(value, spread, self.n, "dr", self.weight / self.n)


def _from_spread(value: float, spread: float, n: int, estimator: str, mean_weight: float):
    """An ``Estimate`` from the sum of squared centred terms (what ``_estimate`` computes)."""
    if n < 2:
        return Estimate(value, (-math.inf, math.inf), n, math.inf, estimator, mean_weight)
    se = math.sqrt(spread / (n - 1) / n)
    return Estimate(value, (value - _Z * se, value + _Z * se), n, se, estimator, mean_weight)
