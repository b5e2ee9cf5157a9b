"""Where scoring's results go, formatted for each sink: score rows as JSON lines or BigQuery
rows, the scored decisions as logged decision events, and the dead letters.

    _ = outputs.scored | WriteScores(output="scored/", table=None, log_decisions=True)
    _ = outputs.failed | WriteFailures("scored/")

    OUTPUT/scores/*.jsonl      arm, decision_id, score, decision, propensity, explored, model_id,
                               scored_at (score and model_id null for a fallback decision)
    OUTPUT/decisions/*.jsonl   with log_decisions: the scored decisions as decision events
    OUTPUT/failed/*.jsonl      reason, step, detail, decision_id, payload
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence

import apache_beam as beam

from loopline.events import DeadLetter
from loopline.privacy import PayloadPrivacy
from transforms.policy_step import ScoredDecision

# score and model_id are null for the blueprint's fallback decision (a rollout arm without a
# model), arm outside a rollout; a table created before they were nullable needs them relaxed
# (``bq update``) and the arm column added.
SCORE_TABLE_SCHEMA = {
    "fields": [
        {"name": "decision_id", "type": "STRING", "mode": "REQUIRED"},
        {"name": "score", "type": "FLOAT", "mode": "NULLABLE"},
        {"name": "decision", "type": "INTEGER", "mode": "REQUIRED"},
        {"name": "propensity", "type": "FLOAT", "mode": "REQUIRED"},
        {"name": "explored", "type": "BOOLEAN", "mode": "NULLABLE"},
        {"name": "model_id", "type": "STRING", "mode": "NULLABLE"},
        {"name": "scored_at", "type": "TIMESTAMP", "mode": "REQUIRED"},
        {"name": "arm", "type": "STRING", "mode": "NULLABLE"},
    ]
}


def score_lines(scored: Sequence[ScoredDecision]) -> str:
    """A list of scored decisions as one block of JSON lines (WriteToText writes it as lines)."""
    return "\n".join([s.to_json() for s in scored])


def decision_lines(scored: Sequence[ScoredDecision]) -> Iterable[str]:
    """The logged decision events of a list of scored decisions as one block of JSON lines
    (nothing for rows scored from serialized examples, which have no event)."""
    events = [s.to_decision_event() for s in scored if s.event is not None]
    if events:
        yield "\n".join([e.to_json() for e in events])


def table_rows(scored: Sequence[ScoredDecision]) -> list[dict]:
    return [s.to_row() for s in scored]


def _redacted(failure: DeadLetter, privacy: PayloadPrivacy) -> DeadLetter:
    return dataclasses.replace(failure, payload=privacy.redact(failure.payload))


def failure_json(failure: DeadLetter) -> str:
    return json.dumps(failure.to_dict(), sort_keys=True, separators=(",", ":"))


class WriteScores(beam.PTransform):
    """Writes lists of ScoredDecisions: JSON lines under ``output`` (and, with
    ``log_decisions``, the decision events under ``output/decisions``) and/or rows appended to
    the BigQuery ``table``."""

    def __init__(self, output: str | None, table: str | None = None, log_decisions: bool = False):
        super().__init__()
        if not output and not table:
            raise ValueError("WriteScores needs an output directory or a table")
        if log_decisions and not output:
            raise ValueError("log_decisions writes under an output directory; give one")
        self._output = output.rstrip("/") if output else None
        self._table = table
        self._log_decisions = log_decisions

    def expand(self, scored: beam.PCollection) -> None:
        if self._output:
            lines = scored | "ScoreLines" >> beam.Map(score_lines)
            _ = lines | "WriteScoreLines" >> _json_lines(f"{self._output}/scores")
        if self._log_decisions:
            events = scored | "DecisionLines" >> beam.FlatMap(decision_lines)
            _ = events | "WriteDecisionLines" >> _json_lines(f"{self._output}/decisions")
        if self._table:
            _ = (
                scored
                | "TableRows" >> beam.FlatMap(table_rows)
                | "WriteScoresTable"
                >> beam.io.WriteToBigQuery(
                    self._table,
                    schema=SCORE_TABLE_SCHEMA,
                    create_disposition=beam.io.BigQueryDisposition.CREATE_IF_NEEDED,
                    write_disposition=beam.io.BigQueryDisposition.WRITE_APPEND,
                )
            )


class WriteFailures(beam.PTransform):
    """Writes scoring's dead letters (``DeadLetter``) as JSON lines under ``output/failed``.

    With ``privacy`` (the blueprint's, with its key) each payload is redacted first: a JSON
    event keeps its shape with dropped fields removed and pseudonymised ones HMAC'd, anything
    else becomes its SHA-256 and length (``loopline.privacy.redact_payload``).
    """

    def __init__(self, output: str, privacy: PayloadPrivacy | None = None):
        super().__init__()
        self._output = output.rstrip("/")
        self._privacy = privacy

    def expand(self, failed: beam.PCollection) -> None:
        if self._privacy is not None:
            failed = failed | "RedactPayloads" >> beam.Map(_redacted, self._privacy)
        lines = failed | "FailureLines" >> beam.Map(failure_json)
        _ = lines | "WriteFailureLines" >> _json_lines(f"{self._output}/failed")


def _json_lines(directory: str) -> beam.io.WriteToText:
    return beam.io.WriteToText(f"{directory}/part", file_name_suffix=".jsonl")
