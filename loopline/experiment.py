"""The rollout experiment: which arm a unit is in, and a readout that stays valid under daily looks.

A pushed model serves as the ``challenger`` to a share of units (``assign_arm``); the monitor
aggregates each day's outcomes per arm (``Moments``, one ``DayComparison`` per day) and
``readout`` turns them into a verdict: ``challenger_better``, ``challenger_worse``,
``inconclusive`` or ``invalid: <reason>``, with its figures and a sentence a product manager can
read.

Why a mixture SPRT. The monitor looks at the experiment every day and acts on the first
significant result. A fixed-horizon test read daily that way rejects a true null far more often
than its alpha (a two-proportion z-test at 5% looked at daily for 14 days declares a winner in
about 22% of A/A experiments). The mixture
sequential probability ratio test (mSPRT, Johari, Koomen, Pekelis and Walsh, "Peeking at A/B
tests", KDD 2017) instead gives an *always-valid* p-value and confidence sequence: the chance
that the p-value ever drops below alpha, at any look, under no difference, is at most alpha. It
needs no planned number of looks or horizon, unlike a group-sequential design with an
alpha-spending function (which must fix the maximum information up front and spends alpha on a
schedule that a daily job with varying traffic does not keep). docs/monitoring.md says more.

    >>> from loopline.blueprint import Rollout
    >>> rollout = Rollout(unit="user_id", challenger_share=0.2, salt="notify-1")
    >>> assign_arm("u0000042", rollout) == assign_arm("u0000042", rollout)
    True
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats

from loopline.blueprint import Guardrail, Rollout

PRODUCTION, CHALLENGER = "production", "challenger"
ARMS = (PRODUCTION, CHALLENGER)
BETTER, WORSE, INCONCLUSIVE = "challenger_better", "challenger_worse", "inconclusive"
SRM_REASON = "invalid: sample ratio mismatch"

# The mixing distribution's spread, as a fraction of the metric's standard deviation: the
# effect sizes the test is most sensitive to. 0.1 sd is a 3 pp lift on a 10% click rate.
MIXTURE_SD_RATIO = 0.1


def assign_arm(unit_value: str | int, rollout: Rollout) -> str:
    """``"challenger"`` for a ``rollout.challenger_share`` of units, else ``"production"``.

    The arm is a salted hash of the unit's value (BLAKE2b of ``salt`` and the value): the same
    for a unit on every day and in every process, and independent of any model's score, so the
    arms are comparable. A new salt reshuffles the units for the next experiment. Strings and
    ints are hashed by their text (``7`` and ``"7"`` are the same unit).
    """
    if isinstance(unit_value, bool) or not isinstance(unit_value, str | int):
        raise ValueError(
            f"rollout unit {rollout.unit!r} must be a string or an int, got {unit_value!r}"
        )
    digest = hashlib.blake2b(
        f"{rollout.salt}\x1f{unit_value}".encode(), digest_size=8, person=b"loopline-arm"
    ).digest()
    u = int.from_bytes(digest, "big") / 2.0**64
    return CHALLENGER if u < rollout.challenger_share else PRODUCTION


@dataclass(frozen=True)
class Moments:
    """One arm's outcomes on one day: ``n`` rows, the sum and the sum of squares of their values.

    A row is one independent observation. When a unit makes several decisions a day, make a
    row per unit-day: ``total``/``total_sq`` over the unit's summed outcome ``y``, and pass its
    decision count ``d`` as ``decisions`` (sum of d), ``decisions_sq`` (sum of d²) and
    ``cross`` (sum of y·d). The mean is then the rate per decision, ``total / decisions``, with
    the ratio estimator's (delta method) variance, which accounts for a unit's decisions being
    alike. Left out, each row is one decision.
    """

    n: int
    total: float
    total_sq: float
    decisions: float | None = None
    decisions_sq: float | None = None
    cross: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Moments:
        """The moments of one value per row."""
        values = np.asarray(values, dtype=float)
        return cls(len(values), float(values.sum()), float((values**2).sum()))

    @property
    def exposure(self) -> float:
        """Decisions behind these rows."""
        return self.n if self.decisions is None else self.decisions

    @property
    def mean(self) -> float:
        return self.total / self.exposure if self.exposure else math.nan

    @property
    def variance_of_mean(self) -> float:
        """The squared standard error of ``mean`` (nan with fewer than two rows)."""
        if self.n < 2:
            return math.nan
        r = self.mean
        d, d_sq, cross = (
            (self.n, self.n, self.total)
            if self.decisions is None
            else (self.decisions, self.decisions_sq, self.cross)
        )
        # sum over rows of (y - r d)^2, divided by n - 1: the spread of the rows' residuals
        spread = max(self.total_sq - 2 * r * cross + r * r * d_sq, 0.0) / (self.n - 1)
        return spread * self.n / (d * d)


@dataclass(frozen=True)
class DayComparison:
    """Both arms' moments of one metric on one day (``day`` sorts in time, e.g. ``2026-12-03``)."""

    day: str
    production: Moments
    challenger: Moments


def day_comparisons(
    day: Sequence[str],
    arm: Sequence[str],
    value: Sequence[float],
    unit: Sequence[str | int] | None = None,
) -> list[DayComparison]:
    """Per-day per-arm ``Moments`` from one row per decision (its day, arm and metric value).

    With ``unit``, a unit's decisions on a day become one row (its summed value and its
    decision count), so that the readout's variance counts units, not decisions: the decisions
    of one unit are alike, and counting them as independent makes chance differences look
    significant. Days sort as strings (use ISO dates).

        >>> [c.challenger.mean for c in day_comparisons(
        ...     ["d1"] * 4, ["production", "challenger", "challenger", "production"], [0, 1, 0, 1])]
        [0.5]
    """
    day, arm = np.asarray(day, dtype=str), np.asarray(arm, dtype=str)
    value = np.asarray(value, dtype=float)
    if not len(day) == len(arm) == len(value) or (unit is not None and len(unit) != len(day)):
        raise ValueError("day, arm, value (and unit) must have the same length")
    if np.isnan(value).any():
        raise ValueError("value contains NaN: rows without an outcome must be left out or filled")
    unknown = {str(a) for a in np.unique(arm)} - set(ARMS)
    if unknown:
        raise ValueError(f"arm must be production or challenger, got {sorted(unknown)}")
    if unit is None:
        unit = np.arange(len(day)).astype(str)  # every decision its own unit
        per_decision = True
    else:
        unit = np.asarray([str(u) for u in unit])
        per_decision = False
    keys = [f"{d}\x1f{a}\x1f{u}" for d, a, u in zip(day, arm, unit, strict=True)]
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    y = np.bincount(inverse, weights=value)
    d = np.bincount(inverse).astype(float)
    unit_day, unit_arm = day[first], arm[first]
    comparisons = []
    for today in np.unique(day):
        moments = {}
        for name in ARMS:
            rows = (unit_day == today) & (unit_arm == name)
            yy, dd = y[rows], d[rows]
            if per_decision:
                moments[name] = Moments(len(yy), float(yy.sum()), float((yy**2).sum()))
            else:
                moments[name] = Moments(
                    len(yy),
                    float(yy.sum()),
                    float((yy**2).sum()),
                    float(dd.sum()),
                    float((dd**2).sum()),
                    float((yy * dd).sum()),
                )
        comparisons.append(DayComparison(str(today), moments[PRODUCTION], moments[CHALLENGER]))
    return comparisons


@dataclass(frozen=True)
class SequentialResult:
    """The mixture SPRT after each look: always-valid p-values and confidence sequence.

    Arrays have one entry per look (per day compared, in order); ``difference`` and ``variance``
    are the within-day estimate of challenger minus production and its variance at that look.
    """

    difference: np.ndarray
    variance: np.ndarray
    p_value: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray


def mixture_sprt(
    difference: np.ndarray, variance: np.ndarray, mixture_sd: float | np.ndarray, alpha: float
) -> SequentialResult:
    """Always-valid p-values and (1 - alpha) confidence sequence of a normal mixture SPRT.

    ``difference[..., t]`` is the estimate after look ``t`` with variance ``variance[..., t]``
    (any leading dimensions: several experiments at once). With a normal mixing distribution of
    spread ``tau = mixture_sd`` over the true difference ``theta``, the mixture likelihood ratio
    against ``theta`` is

        L_t(theta) = sqrt(V / (V + tau²)) · exp(tau² (D - theta)² / (2 V (V + tau²)))

    (for one day and equal arms this is Johari et al.'s formula with ``V = 2 sigma² / n``). The
    p-value is the running minimum of ``1 / L_t(0)``; the confidence sequence is the running
    intersection of ``{theta : L_t(theta) < 1 / alpha}``, so that it never widens.
    """
    d = np.asarray(difference, dtype=float)
    v = np.asarray(variance, dtype=float)
    tau2 = np.asarray(mixture_sd, dtype=float) ** 2
    if tau2.ndim:
        tau2 = tau2[..., None]
    ratio = v / (v + tau2)
    log_lr = 0.5 * np.log(ratio) + tau2 * d**2 / (2 * v * (v + tau2))
    p = np.minimum.accumulate(np.minimum(1.0, np.exp(-log_lr)), axis=-1)
    half = np.sqrt(2 * v * (v + tau2) / tau2 * (math.log(1 / alpha) - 0.5 * np.log(ratio)))
    low = np.maximum.accumulate(d - half, axis=-1)
    high = np.minimum.accumulate(d + half, axis=-1)
    return SequentialResult(d, v, p, low, high)


@dataclass(frozen=True)
class MetricReadout:
    """One metric's comparison over the days both arms served.

    ``difference`` is challenger minus production estimated within days, and the two means are
    weighted over days the same way (so they differ by exactly ``difference``); ``ci`` is the
    always-valid (1 - alpha) confidence sequence at the last look and ``p_value`` the
    always-valid p-value. ``outcome`` is ``better``, ``worse`` (by the metric's ``direction``)
    or ``no difference detected``.
    """

    name: str
    metric: str
    direction: str
    production_mean: float
    challenger_mean: float
    production_decisions: float
    challenger_decisions: float
    difference: float
    ci: tuple[float, float]
    p_value: float
    alpha: float
    days: int
    outcome: str


@dataclass(frozen=True)
class SrmCheck:
    """Chi-square test of the assignment counts against the configured challenger share."""

    production: float
    challenger: float
    expected_share: float
    observed_share: float
    p_value: float
    alpha: float

    @property
    def mismatch(self) -> bool:
        return self.p_value < self.alpha


@dataclass(frozen=True)
class Readout:
    """The experiment's verdict, its figures, and ``sentence``: the verdict in plain words."""

    verdict: str
    sentence: str
    primary: MetricReadout | None
    guardrails: tuple[MetricReadout, ...]
    srm: SrmCheck
    days: int
    max_days_reached: bool

    def as_dict(self) -> dict:
        """The readout as JSON-ready data, for the monitor's metrics and report."""
        return asdict(self)


def srm_check(production: float, challenger: float, share: float, alpha: float = 0.001) -> SrmCheck:
    """Sample-ratio mismatch: are ``(production, challenger)`` counts consistent with ``share``?

    A mismatch means the assignment or the logging is broken (one arm's decisions are lost,
    a cache bypasses the hash, a bot hits one arm), and no comparison of the arms can be
    trusted. The small default ``alpha`` keeps a daily check from crying wolf.
    """
    total = production + challenger
    if total <= 0:
        return SrmCheck(production, challenger, share, math.nan, 1.0, alpha)
    expected = np.array([(1 - share) * total, share * total])
    chi2 = float((((np.array([production, challenger]) - expected) ** 2) / expected).sum())
    p_value = float(stats.chi2.sf(chi2, df=1))
    return SrmCheck(production, challenger, share, challenger / total, p_value, alpha)


def readout(
    primary: Sequence[DayComparison],
    rollout: Rollout,
    guardrails: Mapping[str, Sequence[DayComparison]] | None = None,
    assignment: tuple[float, float] | None = None,
    primary_name: str = "primary",
    mixture_sd_ratio: float = MIXTURE_SD_RATIO,
) -> Readout:
    """The verdict on a rollout from per-day per-arm aggregates.

    Arms are compared within each day and never pooled across days. The challenger's share of
    traffic may differ from day to day (a late start, a changed share, a day one arm did not
    serve), and days differ in their outcome rates (weekends, news, seasonality). Pooling all
    rows per arm would then mix day effects into the arm difference (Simpson's paradox). So
    each day gives its own difference of means, with its own variance, and the days are combined
    by inverse-variance weights; a day where an arm has fewer than two rows is not compared.
    The days are taken as independent samples of units, which holds when units are assigned by
    a stable hash and a day's outcomes do not depend on the previous days' (a unit that is
    always more active than average, in both arms, makes its days alike; its rows should then
    be unit-days, see ``Moments``).

    The combined difference is tested daily with the mixture SPRT (``mixture_sprt``) on the
    primary metric at ``rollout.alpha``; each guardrail is tested for harm at
    ``rollout.alpha / len(guardrails)``. The mixing spread is ``mixture_sd_ratio`` times the
    metric's standard deviation in production on the first compared day (a plug-in, like the
    variances).

    Args:
      primary: the label's per-day aggregates, in any order (sorted by ``day``).
      rollout: the blueprint's rollout section.
      guardrails: per guardrail name (``rollout.guardrails``' names), its per-day aggregates.
      assignment: ``(production, challenger)`` units assigned over the experiment, for the
        sample-ratio check; without it, the primary metric's rows over all days are counted
        (right when rows are independent units; with returning units pass distinct units).
      primary_name: what the primary metric is called in the sentence (the label's name).

    Verdicts, in order of precedence: ``invalid: sample ratio mismatch``; ``inconclusive``
    while an arm has fewer than ``rollout.min_exposure`` decisions; ``challenger_worse`` when a
    guardrail or the primary metric is significantly worse; ``challenger_better`` when the
    primary metric is significantly better; ``inconclusive`` otherwise.
    """
    guardrails = dict(guardrails or {})
    known = {g.name: g for g in rollout.guardrails}
    unknown = set(guardrails) - set(known)
    if unknown:
        raise ValueError(
            f"guardrails {sorted(unknown)} are not in the rollout's guardrails {sorted(known)}"
        )
    primary = sorted(primary, key=lambda c: c.day)
    for name, comparisons in [(primary_name, primary), *guardrails.items()]:
        seen = [c.day for c in comparisons]
        if len(set(seen)) != len(seen):
            raise ValueError(f"{name}: each day must come once, got {sorted(seen)}")
    if assignment is None:
        assignment = (
            sum(c.production.n for c in primary),
            sum(c.challenger.n for c in primary),
        )
    srm = srm_check(*assignment, rollout.challenger_share, rollout.srm_alpha)
    days = len({c.day for c in primary})
    max_days_reached = days >= rollout.max_days

    main = _compare(
        primary_name, rollout.metric, rollout.direction, primary, rollout.alpha, mixture_sd_ratio
    )
    guard_alpha = rollout.alpha / max(len(rollout.guardrails), 1)
    guards = tuple(
        _compare(
            name,
            "mean",
            known[name].direction,
            sorted(guardrails[name], key=lambda c: c.day),
            guard_alpha,
            mixture_sd_ratio,
        )
        for name in known
        if name in guardrails
    )
    guards = tuple(g for g in guards if g is not None)

    def result(verdict: str, sentence: str) -> Readout:
        return Readout(verdict, sentence, main, guards, srm, days, max_days_reached)

    if srm.mismatch:
        return result(SRM_REASON, _srm_sentence(srm))
    if main is None:
        return result(
            INCONCLUSIVE, "Too early to tell: there is no day yet on which both arms served."
        )
    exposure = min(main.production_decisions, main.challenger_decisions)
    if exposure < rollout.min_exposure:
        return result(
            INCONCLUSIVE,
            f"Too early to tell: the smaller arm has {exposure:,.0f} decisions; "
            f"{rollout.min_exposure:,} per arm are needed before any verdict.",
        )
    harmed = [g for g in guards if g.outcome == "worse"]
    if harmed:
        return result(
            WORSE,
            f"The challenger made {_guardrail_list(harmed, known)} worse: {_describe(harmed[0])}. "
            "Take it off traffic.",
        )
    if main.outcome == "worse":
        return result(WORSE, f"The challenger is worse: {_describe(main)}. Take it off traffic.")
    if main.outcome == "better":
        return result(
            BETTER,
            f"The challenger is better: {_describe(main)}, and no guardrail is worse. "
            "It can replace production.",
        )
    if max_days_reached:
        return result(
            INCONCLUSIVE,
            f"No difference found in {days} days (the maximum is {rollout.max_days}): "
            f"{_describe(main)}. "
            "The challenger has not shown it is better; end the split.",
        )
    return result(
        INCONCLUSIVE,
        f"No difference detected yet: {_describe(main)}. Keep the split (day {days} of at "
        f"most {rollout.max_days}).",
    )


def _compare(
    name: str,
    metric: str,
    direction: str,
    days: Sequence[DayComparison],
    alpha: float,
    mixture_sd_ratio: float,
) -> MetricReadout | None:
    """The within-day comparison of one metric over its days, or None with no comparable day."""
    compared = [
        c
        for c in days
        if c.production.n >= 2
        and c.challenger.n >= 2
        and c.production.variance_of_mean + c.challenger.variance_of_mean > 0
    ]
    if not compared:
        return None
    diff = np.array([c.challenger.mean - c.production.mean for c in compared])
    var = np.array(
        [c.challenger.variance_of_mean + c.production.variance_of_mean for c in compared]
    )
    weights = 1 / var
    info = np.cumsum(weights)
    cumulative = np.cumsum(weights * diff) / info
    first = compared[0].production
    sd = math.sqrt(first.variance_of_mean * first.exposure)
    if sd == 0:
        sd = math.sqrt(compared[0].challenger.variance_of_mean * compared[0].challenger.exposure)
    test = mixture_sprt(cumulative, 1 / info, mixture_sd_ratio * sd, alpha)
    low, high = float(test.ci_low[-1]), float(test.ci_high[-1])
    if low > high:  # the running intersection emptied: fall back to the last look's interval
        low, high = _last_interval(cumulative[-1], 1 / info[-1], mixture_sd_ratio * sd, alpha)
    p_value = float(test.p_value[-1])
    outcome = "no difference detected"
    if p_value <= alpha:
        higher = low > 0 if low > 0 or high < 0 else cumulative[-1] > 0
        outcome = "better" if higher == (direction == "increase") else "worse"
    # The means shown next to the difference are weighted over days like it, so they differ by it.
    production_means = np.array([c.production.mean for c in compared])
    production_mean = float((weights * production_means).sum() / info[-1])
    return MetricReadout(
        name=name,
        metric=metric,
        direction=direction,
        production_mean=production_mean,
        challenger_mean=production_mean + float(cumulative[-1]),
        production_decisions=sum(c.production.exposure for c in compared),
        challenger_decisions=sum(c.challenger.exposure for c in compared),
        difference=float(cumulative[-1]),
        ci=(low, high),
        p_value=p_value,
        alpha=alpha,
        days=len(compared),
        outcome=outcome,
    )


def _last_interval(d: float, v: float, tau: float, alpha: float) -> tuple[float, float]:
    test = mixture_sprt(np.array([d]), np.array([v]), tau, alpha)
    return float(test.ci_low[0]), float(test.ci_high[0])


def _value(metric: str, x: float) -> str:
    return f"{x:.2%}" if metric == "rate" else f"{x:.4g}"


def _change(metric: str, x: float) -> str:
    return f"{x * 100:+.2f} pp" if metric == "rate" else f"{x:+.4g}"


def _describe(m: MetricReadout) -> str:
    """``clicked rate 10.02% vs 13.11% in production (+3.09 pp, ...)`` in words."""
    kind = "rate" if m.metric == "rate" else "mean"
    return (
        f"{m.name} {kind} {_value(m.metric, m.challenger_mean)} for the challenger vs "
        f"{_value(m.metric, m.production_mean)} in production "
        f"({_change(m.metric, m.difference)}, {1 - m.alpha:.0%} always-valid interval "
        f"{_change(m.metric, m.ci[0])} to {_change(m.metric, m.ci[1])}, p={m.p_value:.3g}) "
        f"over {m.days} day{'s' if m.days != 1 else ''} with "
        f"{m.challenger_decisions:,.0f} and {m.production_decisions:,.0f} decisions"
    )


def _guardrail_list(guards: list[MetricReadout], known: Mapping[str, Guardrail]) -> str:
    """``guardrail dwell_time (dwell_seconds per decision, higher is better)``."""
    names = []
    for g in guards:
        spec = known[g.name]
        better = "higher" if spec.direction == "increase" else "lower"
        names.append(f"{g.name} ({spec.observation} per decision, {better} is better)")
    return ("guardrail " if len(names) == 1 else "guardrails ") + ", ".join(names)


def _srm_sentence(srm: SrmCheck) -> str:
    return (
        f"The experiment is invalid: the challenger got {srm.observed_share:.1%} of the "
        f"assignments where {srm.expected_share:.0%} was configured "
        f"({srm.challenger:,.0f} of {srm.production + srm.challenger:,.0f}, sample-ratio "
        f"p={srm.p_value:.2g}). Assignment or logging is broken, so no result can be trusted; "
        "fix it before reading the figures."
    )
