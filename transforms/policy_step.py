"""The policy step of scoring: scored rows to ``ScoredDecision``s, the policy's choice on each.

``decide`` is the whole rule, pure: it takes rows decided together (a batch, or one top-k group)
and returns one ScoredDecision per row. ``ApplyPolicy`` is the DoFn around it, and always takes
a list of rows (one row is a list of one). During a rollout ``decide_arm`` decides one arm's
rows (``ApplyArmPolicy``): a row its arm's model scored gets the policy's choice, a row without
a score (the production arm while no model is in production) the blueprint's fallback, as the
decision client decides.

    >>> decide(ThresholdPolicy(0.5), [("d-1", result)], "2026-11-01T12:00:00.000Z")
    [ScoredDecision(decision_id='d-1', score=0.75, decision=1, propensity=1.0, ...)]
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.ml.inference.base import PredictionResult

from loopline.events import DecisionEvent
from loopline.experiment import ARMS
from loopline.policy import Policy, TopKPolicy
from transforms.scoring_failures import COUNTER_NAMESPACE

# The C string encoder json.dumps itself uses (ensure_ascii=True).
_json_str = json.encoder.encode_basestring_ascii
_INF = float("inf")

ScoredRow = tuple[str, PredictionResult]  # (decision_id, the model's result for it)


class ScoredDecision(NamedTuple):
    """One scored decision and the policy's choice for it."""

    decision_id: str
    score: float
    decision: int
    propensity: float
    explored: bool
    model_id: str
    scored_at: str
    event: DecisionEvent | None = None  # the decision event scored, when the input was events
    arm: str | None = None  # the rollout arm that served it (None: no challenger in traffic)

    def to_row(self) -> dict:
        """The output row (JSON lines and BigQuery); ``score`` and ``model_id`` are None for the
        fallback decision, ``arm`` outside a rollout."""
        return {
            "arm": self.arm,
            "decision_id": self.decision_id,
            "score": self.score,
            "decision": self.decision,
            "propensity": self.propensity,
            "explored": self.explored,
            "model_id": self.model_id,
            "scored_at": self.scored_at,
        }

    def to_json(self) -> str:
        """The output row as the JSON line bulk scoring writes, without building a dict.

        Equal to ``json.dumps(self.to_row(), sort_keys=True, separators=(",", ":"))`` (tests
        check it), at a fraction of the cost.
        """
        decision_id, score, decision, propensity, explored, model_id, scored_at, _, arm = self
        return (
            f'{{"arm":{_json_text(arm)},"decision":{int(decision)},'
            f'"decision_id":{_json_str(decision_id)},'
            f'"explored":{"true" if explored else "false"},"model_id":{_json_text(model_id)},'
            f'"propensity":{_json_float(float(propensity))},"score":{_json_float(score)},'
            f'"scored_at":{_json_str(scored_at)}}}'
        )

    def to_decision_event(self) -> DecisionEvent | None:
        """The scored decision as the decision event it logs (None without a source event)."""
        if self.event is None:
            return None
        # A score the model could not make finite is not logged (the event would be refused).
        score = self.score if self.score is not None and math.isfinite(self.score) else None
        return self.event.with_choice(
            self.decision, self.propensity, self.model_id, score=score, arm=self.arm
        )


def _json_text(value: str | None) -> str:
    return "null" if value is None else _json_str(value)


def _json_float(value: float | None) -> str:
    # json.dumps' own float spelling: repr, with NaN/Infinity for non-finite values.
    if value is None:
        return "null"
    if value != value:
        return "NaN"
    if value in (_INF, -_INF):
        return "Infinity" if value > 0 else "-Infinity"
    return repr(value)


def decide(policy: Policy, rows: Sequence[ScoredRow], scored_at: str) -> list[ScoredDecision]:
    """The policy's choice for each of ``rows``, decided together, as ScoredDecisions in order.

    A group policy (top-k) ranks ``rows`` as one group; every other policy decides row by row.
    Each row's PredictionResult holds the score (``inference``), the model id and the
    ``EncodedDecision`` scored (``example``), whose decision event, if any, the result keeps.
    """
    if isinstance(policy, TopKPolicy):
        choices = policy.choose_group([(decision_id, r.inference) for decision_id, r in rows])
    else:
        choose = policy.choose
        choices = [choose(r.inference, decision_id) for decision_id, r in rows]
    make = ScoredDecision._make  # a row per decision: skips __new__'s argument parsing
    return [
        make(
            (
                decision_id,
                result.inference,
                choice.decision,
                choice.propensity,
                choice.explored,
                result.model_id,
                scored_at,
                result.example.event,
                None,
            )
        )
        for (decision_id, result), choice in zip(rows, choices, strict=True)
    ]


def decide_arm(
    policy: Policy,
    fallback: Policy,
    arm: str | None,
    rows: Sequence[ScoredRow],
    scored_at: str,
) -> list[ScoredDecision]:
    """The choice for each of one arm's ``rows``, as ScoredDecisions carrying ``arm``.

    A row with a score (its arm's model scored it) gets ``policy``'s choice; a row without one
    (``inference`` None: no model serves its arm) gets ``fallback``'s, with no score and no
    model id, as ``loopline.client.DecisionClient`` decides while production has no model.
    Row policies only: a group policy (top-k) ranks rows of one model, not of two arms.
    """
    decided = []
    for decision_id, result in rows:
        score = result.inference
        if score is None:
            choice, model_id = fallback.choose(math.nan, decision_id), None
        else:
            choice, model_id = policy.choose(score, decision_id), result.model_id
        decided.append(
            ScoredDecision(
                decision_id,
                score,
                choice.decision,
                choice.propensity,
                choice.explored,
                model_id,
                scored_at,
                result.example.event,
                arm,
            )
        )
    return decided


_last_now: tuple[int, str] = (-1, "")


def utc_now() -> str:
    """Now as RFC 3339 UTC with milliseconds (formatted at most once per millisecond)."""
    global _last_now
    now_ms = time.time_ns() // 1_000_000
    if now_ms != _last_now[0]:
        moment = datetime.fromtimestamp(now_ms / 1000, tz=timezone.utc)
        _last_now = (now_ms, moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now_ms % 1000:03d}Z")
    return _last_now[1]


class ApplyPolicy(beam.DoFn):
    """A list of scored rows (a batch, or a top-k group) to ONE list of ScoredDecisions
    (``decide``); counts ``loopline.score.decisions`` and ``.explored``."""

    def __init__(self, policy: Policy, clock=utc_now):
        self._policy = policy
        self._clock = clock

    def setup(self) -> None:
        self._decisions = beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "decisions")
        self._explored = beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "explored")

    def start_bundle(self) -> None:
        self._counts = [0, 0]

    def process(self, rows: Sequence[ScoredRow]) -> Iterable[list[ScoredDecision]]:
        scored = decide(self._policy, rows, self._clock())
        self._counts[0] += len(scored)
        self._counts[1] += sum(s.explored for s in scored)
        if scored:
            yield scored

    def finish_bundle(self) -> None:
        self._decisions.inc(self._counts[0])
        self._explored.inc(self._counts[1])


class ApplyArmPolicy(beam.DoFn):
    """One arm's rows, ``(arm, (decision_id, PredictionResult))`` (a batch's rows of that arm),
    to ONE list of ScoredDecisions (``decide_arm``). Counts ``loopline.score.decisions``,
    ``.explored``, ``.decisions_<arm>`` and ``.fallback_decisions``."""

    def __init__(self, policy: Policy, fallback: Policy, clock=utc_now):
        self._policy = policy
        self._fallback = fallback
        self._clock = clock

    def setup(self) -> None:
        self._decisions = beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "decisions")
        self._explored = beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "explored")
        self._fallbacks = beam.metrics.Metrics.counter(COUNTER_NAMESPACE, "fallback_decisions")
        self._per_arm = {
            arm: beam.metrics.Metrics.counter(COUNTER_NAMESPACE, f"decisions_{arm}") for arm in ARMS
        }

    def process(self, rows: Sequence[tuple[str | None, ScoredRow]]) -> Iterable[list]:
        if not rows:
            return
        arm = rows[0][0]
        scored = decide_arm(self._policy, self._fallback, arm, [r for _, r in rows], self._clock())
        self._decisions.inc(len(scored))
        self._explored.inc(sum(s.explored for s in scored))
        self._fallbacks.inc(sum(s.score is None for s in scored))
        if arm is not None:
            self._per_arm[arm].inc(len(scored))
        yield scored


def key_by_group(rows: Sequence[ScoredRow], group_feature: str | None) -> Iterable[tuple[str, Any]]:
    """Each scored row keyed by its top-k group: the JSON of its group feature's value (one
    group for all rows without a group feature or a decision event)."""
    for decision_id, result in rows:
        event = result.example.event
        value = (
            None if group_feature is None or event is None else event.features.get(group_feature)
        )
        yield json.dumps(value, sort_keys=True), (decision_id, result)


def group_rows(group: tuple[str, Iterable[ScoredRow]]) -> list[ScoredRow]:
    """A grouped top-k group as the list of its rows, in decision_id order."""
    return sorted(group[1], key=lambda row: row[0])
