"""Scoring's dead letters: the shared ``DeadLetter`` of a decision that could not be scored, and
how a failed model call becomes one per row.

scoring_failure("encode_failed", "EncodeDecisions", "KeyError: 'country'", "d-1", "{...}")
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import apache_beam as beam

from loopline.events import DECISION, DeadLetter, DecisionEvent
from loopline.vocabulary import Reason

# Dead-letter reasons of the scoring steps (parse refusals keep loopline.events' reasons).
ENCODE_FAILED = Reason.ENCODE_FAILED
INFERENCE_FAILED = Reason.INFERENCE_FAILED
MISSING_DECISION_ID = Reason.MISSING_DECISION_ID
BAD_EXAMPLE = Reason.BAD_EXAMPLE

ENCODE_STEP = "EncodeDecisions"
INFERENCE_STEP = "RunInference"
COUNTER_NAMESPACE = "loopline.score"


def scoring_failure(
    reason: str, step: str, detail: str, decision_id: str | None, payload: str | dict
) -> DeadLetter:
    """The dead letter of a decision that could not be scored (``failed/``): the same record
    as the join's ``rejected/``, its source a decision."""
    return DeadLetter(reason, DECISION, step, detail, payload, decision_id)


def payload(value: Any) -> str:
    """A row as its dead letter keeps it: the event's JSON, or a serialized example's hex."""
    if isinstance(value, DecisionEvent):
        return value.to_json()
    if isinstance(value, bytes):
        return value.hex()
    return repr(value)


def exception_detail(error: Any) -> str:
    """One line (at most 2,000 characters) for the error Beam's dead-letter output carries."""
    # Beam's dead letters carry (exception type, repr, formatted traceback); the traceback's
    # last line has the message (TF errors' repr is only their class name).
    if isinstance(error, tuple) and len(error) >= 3 and error[2]:
        return str(error[2][-1]).strip()[:2000]
    if isinstance(error, tuple) and len(error) >= 2:
        return f"{getattr(error[0], '__name__', error[0])}: {str(error[1])[:2000]}"
    return str(error)[:2000]


def inference_failures(failed: tuple) -> Iterable[DeadLetter]:
    """One failure per row of a batch whose model call raised (RunInference's dead letter:
    ``(batch of (decision_id, EncodedDecision), error)``)."""
    batch, error = failed
    detail = exception_detail(error)
    beam.metrics.Metrics.counter(COUNTER_NAMESPACE, INFERENCE_FAILED).inc(len(batch))
    for decision_id, encoded in batch:
        yield scoring_failure(
            INFERENCE_FAILED, INFERENCE_STEP, detail, decision_id, payload(encoded.source)
        )
