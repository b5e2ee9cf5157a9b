"""Scored decisions with their labels, and what the monitor computes from them: summaries per
model and day, the rollout arms' outcomes, policy values and label delays (DESIGN.md, "The
loop": scores ⨝ outcomes → metrics per model version).

Decisions are labelled by the same ``JoinDecisions`` transform (and blueprint window) that makes
training examples, so a live label means exactly what a training label means. Scores come from
bulk scoring (``transforms.score_rows``, or decision logs that carry a ``score``) and are
attached by ``decision_id``; training/serving skew is ``transforms.skew``.

    decisions, observations = ...                      # timestamped by event time
    joined = (decisions, observations) | JoinDecisions(blueprint)
    monitored = (joined.joined, scores.scores) | AttachScores()
    summaries = monitored.outcomes | SummariseOutcomes(blueprint.label.type)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from loopline.blueprint import Label
from loopline.events import DecisionEvent
from loopline.metrics import OutcomeSummary
from loopline.ope import ValueSums
from loopline.readout import (
    ALL_DAYS,
    ARM,
    BLUEPRINT,
    GREEDY,
    LOGGED,
    MODEL,
    OBSERVABLE,
    DelayBins,
)
from transforms.join import DEFAULT, JoinedDecision
from transforms.score_rows import ScoreRow

UNKNOWN_MODEL = "unknown"


@dataclass(frozen=True)
class MonitoredDecision:
    """A scored decision with its label: one row of the monitor's tables."""

    decision_id: str
    model_id: str
    blueprint_version: str
    day: str  # UTC day of the decision time, YYYY-MM-DD
    decision_time_ms: int
    score: float
    label: float
    observed: bool
    decision: Any = None
    propensity: float | None = None
    explored: bool | None = None
    arm: str | None = None
    unit: str | None = None  # the rollout unit's value (e.g. user_id): grouping only, never written
    observable: bool = True  # the label could have been observed (``label.observable_when``)


@dataclass(frozen=True)
class ArmOutcome:
    """One labelled decision of a rollout arm: what the experiment counts. Every decision with an
    arm counts, scored or not (the production arm may be the blueprint's fallback, which gives
    no score)."""

    decision_id: str
    arm: str
    model_id: str
    day: str
    label: float
    unit: str | None = None


class MonitorOutputs(NamedTuple):
    outcomes: beam.PCollection  # PCollection[MonitoredDecision]
    unscored: beam.PCollection  # PCollection[JoinedDecision]: labelled but never scored
    unmatched_scores: beam.PCollection  # PCollection[ScoreRow]: no decision with that id
    arm_outcomes: beam.PCollection  # PCollection[ArmOutcome]: decisions served by a rollout arm


def utc_day(ms: int) -> str:
    """The UTC calendar day of epoch milliseconds (``2026-11-01``)."""
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d")


def _latest_score(rows: list[ScoreRow]) -> ScoreRow:
    # A decision rescored (retried job, second model run) keeps its latest score; ties broken
    # by the row's own fields so the choice does not depend on arrival order.
    return max(
        rows,
        key=lambda r: (r.time_ms or 0, r.model_id or "", -math.inf if r.score is None else r.score),
    )


class _AttachScoreDoFn(beam.DoFn):
    UNSCORED = "unscored"
    UNMATCHED = "unmatched_scores"
    ARMS = "arm_outcomes"

    def __init__(
        self, default_version: str, unit_feature: str | None = None, label: Label | None = None
    ):
        self._default_version = default_version
        self._unit_feature = unit_feature
        self._label = label
        self._monitored = Metrics.counter("loopline.attach_scores", "decisions_monitored")
        self._unscored = Metrics.counter("loopline.attach_scores", "decisions_without_score")
        self._unmatched = Metrics.counter("loopline.attach_scores", "scores_without_decision")
        self._rescored = Metrics.counter("loopline.attach_scores", "duplicate_scores")

    def process(self, element: tuple[str, dict]) -> Iterable[Any]:
        _, grouped = element
        joined = list(grouped["joined"])
        scores = list(grouped["scores"])
        if not joined:
            self._unmatched.inc(len(scores))
            for row in scores:
                yield beam.pvalue.TaggedOutput(self.UNMATCHED, row)
            return
        decision_row = joined[0]  # the join already deduplicated decisions
        decision = decision_row.decision
        row = _latest_score(scores) if scores else None
        arm = (row.arm if row else None) or decision.arm
        if arm is not None:
            yield beam.pvalue.TaggedOutput(
                self.ARMS,
                ArmOutcome(
                    decision_id=decision.decision_id,
                    arm=arm,
                    model_id=(row.model_id if row else None) or decision.model_id or UNKNOWN_MODEL,
                    day=utc_day(decision.event_time_ms),
                    label=float(decision_row.label),
                    unit=_unit(decision, self._unit_feature),
                ),
            )
        if row is None or row.score is None:  # no score, or the arm's fallback decision
            self._unscored.inc()
            yield beam.pvalue.TaggedOutput(self.UNSCORED, decision_row)
            return
        if len(scores) > 1:
            self._rescored.inc(len(scores) - 1)
        self._monitored.inc()
        model_id = row.model_id or decision.model_id or UNKNOWN_MODEL
        chosen = row.decision if row.decision is not None else decision.decision
        yield MonitoredDecision(
            decision_id=decision.decision_id,
            model_id=model_id,
            blueprint_version=str(
                decision.blueprint_version or row.blueprint_version or self._default_version
            ),
            day=utc_day(decision.event_time_ms),
            decision_time_ms=decision.event_time_ms,
            score=row.score,
            label=float(decision_row.label),
            observed=decision_row.join_status != DEFAULT,
            decision=chosen,
            propensity=row.propensity if row.propensity is not None else decision.propensity,
            explored=row.explored,
            arm=arm,
            unit=_unit(decision, self._unit_feature),
            observable=self._label is None
            or self._label.is_observable(provenance(chosen, arm, model_id)),
        )


def provenance(decision: Any, arm: str | None, model_id: str | None) -> dict[str, Any]:
    """A scored decision's provenance columns as the join writes them into examples (absent
    values explicit: decision -1, arm and model_id empty), for ``Label.is_observable``."""
    if decision is None:
        decision = -1
    elif isinstance(decision, bool):  # a JSON true/false decision is the action 1/0
        decision = int(decision)
    return {"decision": decision, "arm": arm or "", "model_id": model_id or ""}


def _unit(decision: DecisionEvent, feature: str | None) -> str | None:
    value = decision.features.get(feature) if feature else None
    return None if value is None else str(value)


class AttachScores(beam.PTransform):
    """Attaches each labelled decision's score by ``decision_id``.

    Applied to ``(joined, scores)``: PCollections of ``JoinedDecision`` and ``ScoreRow``. The
    score row's model_id, decision and propensity win over the decision event's (the row is what
    the model actually said); a decision with no score and a score with no decision are kept
    apart on ``unscored`` and ``unmatched_scores``.

    With ``unit_feature`` (the blueprint's ``rollout.unit``) each row also carries its unit's
    value, so the experiment can count units rather than decisions. With ``label_spec`` (the
    blueprint's label) each row says whether its label was observable (``observable_when``).

    >>> monitored = (join.joined, scores.scores) | AttachScores(blueprint.version)
    """

    def __init__(
        self,
        default_version: str = "",
        unit_feature: str | None = None,
        label: str | None = None,
        label_spec: Label | None = None,
    ):
        super().__init__(label)
        self._default_version = default_version
        self._unit_feature = unit_feature
        self._label_spec = label_spec

    def expand(self, inputs: tuple[beam.PCollection, beam.PCollection]) -> MonitorOutputs:
        joined, scores = inputs
        keyed_joined = joined | "KeyJoined" >> beam.Map(lambda j: (j.decision.decision_id, j))
        keyed_scores = scores | "KeyScores" >> beam.Map(lambda s: (s.decision_id, s))
        results = (
            {"joined": keyed_joined, "scores": keyed_scores}
            | "GroupByDecisionId" >> beam.CoGroupByKey()
            | "Attach"
            >> beam.ParDo(
                _AttachScoreDoFn(self._default_version, self._unit_feature, self._label_spec)
            ).with_outputs(
                _AttachScoreDoFn.UNSCORED,
                _AttachScoreDoFn.UNMATCHED,
                _AttachScoreDoFn.ARMS,
                main="outcomes",
            )
        )
        return MonitorOutputs(
            results.outcomes,
            results[_AttachScoreDoFn.UNSCORED],
            results[_AttachScoreDoFn.UNMATCHED],
            results[_AttachScoreDoFn.ARMS],
        )


class OutcomeSummaryCombineFn(beam.CombineFn):
    """Combines MonitoredDecisions into one OutcomeSummary; outputs its metrics dict."""

    def __init__(self, label_type: str):
        self._label_type = label_type

    def create_accumulator(self) -> OutcomeSummary:
        return OutcomeSummary()

    def add_input(self, summary: OutcomeSummary, row: MonitoredDecision) -> OutcomeSummary:
        return summary.add(
            row.score, row.label, row.decision, row.propensity, row.explored, row.observed
        )

    def merge_accumulators(self, summaries: Iterable[OutcomeSummary]) -> OutcomeSummary:
        summaries = iter(summaries)
        merged = next(summaries)
        for s in summaries:
            merged.merge(s)
        return merged

    def extract_output(self, summary: OutcomeSummary) -> dict:
        out = summary.metrics(self._label_type)
        out["score_histogram"] = summary.score_histogram()
        return out


def summary_keys(row: MonitoredDecision) -> list[tuple[str, str, str]]:
    """The (dimension, value, day) groups one row counts in: its model per day and over all
    days, its blueprint version over all days (for A/B between blueprint versions), its model
    over all days once more when its label was observable (AUC and calibration where the label
    means something) and, during a rollout, its arm per day (the experiment compares arms
    within a day, never across days)."""
    keys = [
        (MODEL, row.model_id, row.day),
        (MODEL, row.model_id, ALL_DAYS),
        (BLUEPRINT, row.blueprint_version, ALL_DAYS),
    ]
    if row.observable:
        keys.append((OBSERVABLE, row.model_id, ALL_DAYS))
    if row.arm is not None:
        keys.append((ARM, row.arm, row.day))
    return keys


class SummariseOutcomes(beam.PTransform):
    """Per model and UTC day (and per model and blueprint version over all days): the metrics of
    ``loopline.metrics.OutcomeSummary``, as JSON-ready dicts with ``dimension``/``group``/``day``.

    >>> rows = monitored.outcomes | SummariseOutcomes("int")
    """

    def __init__(self, label_type: str, label: str | None = None):
        super().__init__(label)
        self._label_type = label_type

    def expand(self, outcomes: beam.PCollection) -> beam.PCollection:
        return (
            outcomes
            | "KeyByModelAndDay" >> beam.FlatMap(lambda r: [(k, r) for k in summary_keys(r)])
            | "Summarise" >> beam.CombinePerKey(OutcomeSummaryCombineFn(self._label_type))
            | "ToRows"
            >> beam.MapTuple(
                lambda key, metrics: {
                    "dimension": key[0],
                    "group": key[1],
                    "day": key[2],
                    **metrics,
                }
            )
        )


def _unit_day_key(row: ArmOutcome) -> tuple[tuple[str, str, str, str], tuple[float, int]]:
    # A row without a unit (no rollout unit in its features) is its own unit.
    unit = row.unit if row.unit is not None else f"decision:{row.decision_id}"
    return (row.arm, row.model_id, row.day, unit), (row.label, 1)


def _arm_and_unit(row: ArmOutcome) -> tuple[str, str]:
    return row.arm, _unit_day_key(row)[0][3]


def _sum_value_and_count(pairs: Iterable[tuple[float, int]]) -> tuple[float, int]:
    total, count = 0.0, 0
    for value, n in pairs:
        total += value
        count += n
    return total, count


def _moments(rows: Iterable[tuple[float, int]]) -> dict:
    """Moments of unit-day rows (y = summed label, d = decisions), the fields of
    ``loopline.experiment.Moments``."""
    out = dict.fromkeys(("n", "total", "total_sq", "decisions", "decisions_sq", "cross"), 0.0)
    for y, d in rows:
        out["n"] += 1
        out["total"] += y
        out["total_sq"] += y * y
        out["decisions"] += d
        out["decisions_sq"] += d * d
        out["cross"] += y * d
    out["n"] = int(out["n"])
    return out


class SummariseArms(beam.PTransform):
    """Per arm, model and UTC day: the moments of unit-day rows of the label, for the rollout
    experiment (``loopline.experiment.readout``). A unit's decisions on one day are one row (its
    summed label and decision count), so the experiment's variance counts units, not decisions.
    It reads ``ArmOutcome`` rows (``AttachScores``' ``arm_outcomes``). With ``metric`` (a
    guardrail's name, whose values the rows carry as their label) each row is tagged with it.

    >>> moments = monitored.arm_outcomes | SummariseArms()
    """

    def __init__(self, metric: str | None = None, label: str | None = None):
        super().__init__(label)
        self._metric = metric

    def expand(self, outcomes: beam.PCollection) -> beam.PCollection:
        tag = {} if self._metric is None else {"metric": self._metric}
        return (
            outcomes
            | "KeyByUnitDay" >> beam.Map(_unit_day_key)
            | "SumPerUnitDay" >> beam.CombinePerKey(_sum_value_and_count)
            | "KeyByArmDay" >> beam.MapTuple(lambda k, yd: ((k[0], k[1], k[2]), yd))
            | "GroupPerArmDay" >> beam.GroupByKey()
            | "ToMoments"
            >> beam.MapTuple(
                lambda k, rows: {
                    "arm": k[0],
                    "model_id": k[1],
                    "day": k[2],
                    **tag,
                    **_moments(rows),
                }
            )
        )


class CountUnitsPerArm(beam.PTransform):
    """Distinct units per arm over the whole input: ``{"arm": ..., "units": n}`` rows, the
    counts the sample-ratio check compares with the configured share (a unit seen on several
    days counts once). It reads ``ArmOutcome`` rows.

    >>> units = monitored.arm_outcomes | CountUnitsPerArm()
    """

    def expand(self, outcomes: beam.PCollection) -> beam.PCollection:
        return (
            outcomes
            | "ArmAndUnit" >> beam.Map(_arm_and_unit)
            | "Distinct" >> beam.Distinct()
            | "CountPerArm" >> beam.combiners.Count.PerKey()
            | "ToRows" >> beam.MapTuple(lambda arm, n: {"arm": arm, "units": n})
        )


def policy_value_rows(
    row: MonitoredDecision, label: Label, threshold: float | None
) -> list[tuple[str, tuple]]:
    """The off-policy rows one scored decision gives: ``(policy, (reward, pscore, target_pscore,
    q_logged, q_target))`` for the arm's logged policy and, with a ``threshold`` (the blueprint's
    threshold or epsilon-greedy policy), for its greedy policy. None without a propensity.

    The reward is the label. The logged policy is evaluated on its own log (``target_pscore =
    pscore``: SNIPS is then the plain mean, with its interval). The greedy policy takes decision
    1 when ``score >= threshold``: ``target_pscore`` is 1 when the logged decision is the greedy
    one, else 0 -- a genuine off-policy estimate from the exploration in the log. The outcome
    model for DR is the score itself: the reward of a decision whose label would be observable
    is estimated by the score, of one whose label would not be by the label's default (an
    unsent notification is never clicked). DR needs the two decisions 0 and 1.
    """
    if row.propensity is None or not row.propensity > 0 or row.decision is None:
        return []
    decision = provenance(row.decision, row.arm, row.model_id)["decision"]
    binary = decision in (0, 1)

    def q(action: int) -> float:
        observable = label.is_observable(provenance(action, row.arm, row.model_id))
        return row.score if observable else float(label.default)

    pscore = row.propensity
    q_logged = q(decision) if binary else None
    q_target = pscore * q(decision) + (1 - pscore) * q(1 - decision) if binary else None
    rows = [(LOGGED, (row.label, pscore, pscore, q_logged, q_target))]
    if threshold is not None and binary:
        greedy = 1 if row.score >= threshold else 0
        target = 1.0 if decision == greedy else 0.0
        rows.append((GREEDY, (row.label, pscore, target, q_logged, q(greedy))))
    return rows


class ValueSumsCombineFn(beam.CombineFn):
    """Combines off-policy rows ``(reward, pscore, target_pscore, q_logged, q_target)`` into
    ``loopline.ope.ValueSums``; outputs its SNIPS and DR estimates."""

    def create_accumulator(self) -> ValueSums:
        return ValueSums()

    def add_input(self, sums: ValueSums, row: tuple) -> ValueSums:
        return sums.add(*row)

    def merge_accumulators(self, accumulators: Iterable[ValueSums]) -> ValueSums:
        merged = ValueSums()
        for sums in accumulators:
            merged.merge(sums)
        return merged

    def extract_output(self, sums: ValueSums) -> dict:
        snips, dr = sums.snips(), sums.dr()
        return {
            "rows": sums.n,
            "snips": None if snips is None else snips.as_dict(),
            "dr": None if dr is None else dr.as_dict(),
        }


class EstimatePolicyValues(beam.PTransform):
    """Per arm and model: the value (mean label per decision) of the policy that served it and
    of that policy without exploration (greedy), estimated off-policy from the logged
    propensities (``policy_value_rows``). One dict per (arm, model, policy) with the SNIPS and
    DR estimates (``loopline.ope.Estimate.as_dict``).

    >>> rows = monitored.outcomes | EstimatePolicyValues(blueprint.label, threshold=0.1)
    """

    def __init__(self, label_spec: Label, threshold: float | None, label: str | None = None):
        super().__init__(label)
        self._label_spec = label_spec
        self._threshold = threshold

    def expand(self, outcomes: beam.PCollection) -> beam.PCollection:
        spec, threshold = self._label_spec, self._threshold

        def keyed(row: MonitoredDecision) -> list[tuple[tuple[str, str, str], tuple]]:
            return [
                ((row.arm or "", row.model_id, policy), values)
                for policy, values in policy_value_rows(row, spec, threshold)
            ]

        return (
            outcomes
            | "OffPolicyRows" >> beam.FlatMap(keyed)
            | "SumPerArmAndPolicy" >> beam.CombinePerKey(ValueSumsCombineFn())
            | "ToRows"
            >> beam.MapTuple(
                lambda k, out: {"arm": k[0] or None, "model_id": k[1], "policy": k[2], **out}
            )
        )


class LabelDelayHistogram(beam.PTransform):
    """Counts of every observation offset of the joined decisions in ``DelayBins``, counted
    toward the label or not; one dict ``{"bin": i, "count": n, "counted": m}`` per bin.

    >>> join.joined | LabelDelayHistogram(DelayBins.for_window(3_600_000, 120_000))
    """

    def __init__(self, bins: DelayBins, label: str | None = None):
        super().__init__(label)
        self._bins = bins

    def expand(self, joined: beam.PCollection) -> beam.PCollection:
        bins = self._bins

        def offsets(j: JoinedDecision) -> Iterable[tuple[int, tuple[int, int]]]:
            counted = list(j.label_delays_ms)
            for offset in j.observation_offsets_ms:
                is_counted = offset in counted
                if is_counted:
                    counted.remove(offset)
                yield bins.index(offset), (1, 1 if is_counted else 0)

        return (
            joined
            | "Offsets" >> beam.FlatMap(offsets)
            | "CountPerBin" >> beam.CombinePerKey(_sum_pairs)
            | "ToRows" >> beam.MapTuple(lambda b, c: {"bin": b, "count": c[0], "counted": c[1]})
        )


def _sum_pairs(pairs: Iterable[tuple[int, int]]) -> tuple[int, int]:
    total = counted = 0
    for t, c in pairs:
        total += t
        counted += c
    return total, counted
