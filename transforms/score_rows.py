"""Bulk scoring's score rows as the monitor reads them: JSON lines to ``ScoreRow``, unusable
rows as dead letters with the parsers' reasons, and a featureless decision for a row when no
decision log is given.

    outputs = lines | ParseScores()
    outputs.scores, outputs.rejected   # ScoreRow, DeadLetter
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import TimestampedValue
from apache_beam.utils.timestamp import Timestamp

from loopline.events import DeadLetter, DecisionEvent, parse_event_time
from loopline.vocabulary import Reason

SCORE = "score"  # a dead letter's source
PARSE_SCORES_STEP = "ParseScores"

# Reason codes for score rows that cannot be used: the parsers' own (loopline.vocabulary).
SCORE_BAD_JSON = Reason.BAD_JSON
SCORE_MISSING_FIELD = Reason.MISSING_FIELD
SCORE_WRONG_TYPE = Reason.WRONG_TYPE
SCORE_BAD_TIME = Reason.BAD_TIME


@dataclass(frozen=True)
class ScoreRow:
    """One scored decision as written by bulk scoring.

    ``time_ms`` is the row's ``event_time`` (the decision's time) when it has one, else its
    ``scored_at``; it stands in for the decision time only when no decision log is given.
    """

    decision_id: str
    score: float | None  # None only for a rollout arm's fallback decision (no model scored it)
    model_id: str | None = None
    decision: Any = None
    propensity: float | None = None
    explored: bool | None = None
    time_ms: int | None = None
    blueprint_version: str | None = None
    arm: str | None = None  # "production" or "challenger" during a rollout


class ScoreOutputs(NamedTuple):
    scores: beam.PCollection  # PCollection[ScoreRow]
    rejected: beam.PCollection  # PCollection[DeadLetter]


def parse_score_row(
    line: str | bytes | dict, require_score: bool = True
) -> ScoreRow | DeadLetter | None:
    """A JSON line to a ScoreRow, or a DeadLetter saying why not.

    With ``require_score=False`` (decision logs that may carry a score) a line that is not a
    JSON object with a ``score`` gives None instead of a refusal. A row with a null score, an
    ``arm`` and a ``decision`` is a rollout arm's fallback decision (bulk scoring while that
    arm's alias is null): its score is None and it counts for the arm, not for any model.
    """
    raw = line

    def refuse(reason: str, detail: str) -> DeadLetter:
        return DeadLetter(reason, SCORE, PARSE_SCORES_STEP, detail, raw)

    if isinstance(line, dict):  # a decoded record (Avro, BigQuery) of a decision log
        obj = line
    else:
        try:
            text = line.decode("utf-8") if isinstance(line, bytes | bytearray) else line
            obj = json.loads(text.removeprefix("\ufeff"))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            # A decision log's malformed lines are the decision parser's to reject, not ours.
            return refuse(SCORE_BAD_JSON, f"not valid JSON ({e})") if require_score else None
    if not isinstance(obj, dict) or ("score" not in obj and not require_score):
        return (
            None
            if not require_score
            else refuse(SCORE_WRONG_TYPE, "a score row must be a JSON object with a score")
        )
    decision_id = obj.get("decision_id")
    if not isinstance(decision_id, str) or not decision_id:
        return refuse(SCORE_MISSING_FIELD, "field 'decision_id' must be a non-empty string")
    score = obj.get("score")
    if isinstance(score, list) and len(score) == 1:
        score = score[0]
    fallback = score is None and isinstance(obj.get("arm"), str) and obj.get("decision") is not None
    if not fallback and (
        isinstance(score, bool) or not isinstance(score, int | float) or not math.isfinite(score)
    ):
        return refuse(SCORE_WRONG_TYPE, f"field 'score' must be a finite number, got {score!r}")
    propensity = obj.get("propensity")
    if propensity is not None and (
        isinstance(propensity, bool)
        or not isinstance(propensity, int | float)
        or not 0 <= propensity <= 1
    ):
        return refuse(SCORE_WRONG_TYPE, f"field 'propensity' must be in [0, 1], got {propensity!r}")
    model_id = obj.get("model_id")
    if model_id is not None and not isinstance(model_id, str):
        return refuse(SCORE_WRONG_TYPE, f"field 'model_id' must be a string, got {model_id!r}")
    explored = obj.get("explored")
    if explored is not None and not isinstance(explored, bool):
        return refuse(SCORE_WRONG_TYPE, f"field 'explored' must be true or false, got {explored!r}")
    arm = obj.get("arm")
    if arm is not None and (not isinstance(arm, str) or not arm):
        return refuse(SCORE_WRONG_TYPE, f"field 'arm' must be a non-empty string, got {arm!r}")
    time_ms = None
    for key in ("event_time", "scored_at"):
        if obj.get(key) is not None:
            try:
                time_ms = parse_event_time(obj[key])
            except ValueError as e:
                return refuse(SCORE_BAD_TIME, str(e))
            break
    version = obj.get("blueprint_version")
    return ScoreRow(
        decision_id=decision_id,
        score=None if fallback else float(score),
        model_id=model_id,
        decision=obj.get("decision"),
        propensity=None if propensity is None else float(propensity),
        explored=explored,
        time_ms=time_ms,
        blueprint_version=None if version is None else str(version),
        arm=arm,
    )


class _ParseScoreDoFn(beam.DoFn):
    REJECTED = "rejected"

    def __init__(self, require_score: bool):
        self._require_score = require_score
        self._parsed = Metrics.counter("loopline.parse_scores", "scores_parsed")
        self._rejected = Metrics.counter("loopline.parse_scores", "scores_rejected")
        self._without = Metrics.counter("loopline.parse_scores", "rows_without_score")

    def process(self, line: str) -> Iterable[Any]:
        result = parse_score_row(line, self._require_score)
        if result is None:
            self._without.inc()
        elif isinstance(result, DeadLetter):
            self._rejected.inc()
            yield beam.pvalue.TaggedOutput(self.REJECTED, result)
        else:
            self._parsed.inc()
            yield result


class ParseScores(beam.PTransform):
    """JSON lines of score rows to ``ScoreRow``; unusable rows leave on ``rejected``.

    >>> outputs = lines | ParseScores()
    >>> outputs.scores, outputs.rejected
    """

    def __init__(self, require_score: bool = True, label: str | None = None):
        super().__init__(label)
        self._require_score = require_score

    def expand(self, lines: beam.PCollection) -> ScoreOutputs:
        results = lines | "Parse" >> beam.ParDo(_ParseScoreDoFn(self._require_score)).with_outputs(
            _ParseScoreDoFn.REJECTED, main="scores"
        )
        return ScoreOutputs(results.scores, results[_ParseScoreDoFn.REJECTED])


def decision_from_score(row: ScoreRow, decision_type: str) -> DecisionEvent:
    """A featureless decision event standing in for a score row when no decision log is given."""
    return DecisionEvent(
        decision_id=row.decision_id,
        decision_type=decision_type,
        event_time_ms=row.time_ms if row.time_ms is not None else 0,
        features={},
        blueprint_version=row.blueprint_version,
        decision=row.decision,
        model_id=row.model_id,
        propensity=row.propensity,
    )


def timestamped_decision_from_score(row: ScoreRow, decision_type: str) -> TimestampedValue:
    """``decision_from_score``, timestamped with the row's time (0 when it has none)."""
    return TimestampedValue(
        decision_from_score(row, decision_type), Timestamp(micros=(row.time_ms or 0) * 1000)
    )
