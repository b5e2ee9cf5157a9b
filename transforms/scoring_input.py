"""Bulk scoring's input: decisions read and cut into batches right after the read, each batch
parsed and keyed by ``decision_id`` as one element, refusals as dead letters.

    source = ReadEvents(DECISION, pattern="logs/decisions-*.jsonl", batching=batching)
    read = p | ReadDecisionBatches(source, blueprint)
    read.keyed    # lists of (decision_id, DecisionEvent | serialized tf.Example)
    read.failed   # DeadLetter, one per row that could not be parsed or keyed

Scoring needs no event-time timestamps, so none are set (the join's ParseDecisions sets them
for its windows).
"""

from __future__ import annotations

from typing import NamedTuple

import apache_beam as beam
import tensorflow as tf

from loopline.blueprint import Blueprint
from loopline.events import DECISION, DeadLetter, DecisionEvent
from loopline.vocabulary import SCORING_INPUT_FORMATS as FORMATS
from transforms.batch_coder import RowBatch
from transforms.events import METRICS_NAMESPACE as PARSE_NAMESPACE
from transforms.events import parse_one
from transforms.scoring_failures import (
    BAD_EXAMPLE,
    COUNTER_NAMESPACE,
    MISSING_DECISION_ID,
    scoring_failure,
)
from transforms.sources import ReadEvents

FAILED = "failed"
KEY_STEP = "KeyExamples"

Keyed = tuple[str, DecisionEvent | bytes]


def key_example(serialized: bytes) -> Keyed | DeadLetter:
    """A serialized tf.Example to ``(decision_id, bytes)`` using its ``decision_id`` feature."""
    try:
        example = tf.train.Example.FromString(serialized)
    except Exception as e:  # noqa: BLE001 - a corrupt record is a dead letter
        return scoring_failure(
            BAD_EXAMPLE, KEY_STEP, f"{type(e).__name__}: {e}", None, serialized.hex()
        )
    ids = example.features.feature["decision_id"].bytes_list.value
    if len(ids) != 1:
        return scoring_failure(
            MISSING_DECISION_ID,
            KEY_STEP,
            "the example has no single decision_id",
            None,
            serialized.hex(),
        )
    try:
        return ids[0].decode("utf-8"), serialized
    except UnicodeDecodeError as e:
        return scoring_failure(
            BAD_EXAMPLE, KEY_STEP, f"decision_id is not UTF-8 ({e})", None, serialized.hex()
        )


class KeyBatch(beam.DoFn):
    """A batch of raw rows to ONE list of ``(decision_id, value)`` (none for an empty one); rows
    that cannot be keyed leave one by one, tagged ``failed``, as dead letters (``scoring_failure``).

    For decision events (JSON lines, Avro records, BigQuery rows as ``ReadEvents`` decodes them;
    ``fmt`` says which) the value is
    the ``DecisionEvent``, with ``transforms.events.parse_one``'s validation and ParseDecisions'
    counters (``loopline.parse``); for TFRecords (``fmt="tfrecord"``) it is the serialized
    example, keyed by its ``decision_id`` feature (refusals counted as ``loopline.score.<reason>``).

        raw | beam.BatchElements() | beam.ParDo(KeyBatch(blueprint, "json"))
    """

    def __init__(self, blueprint: Blueprint, fmt: str):
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self._blueprint = blueprint
        self._fmt = fmt

    def setup(self) -> None:
        self._parsed = beam.metrics.Metrics.counter(PARSE_NAMESPACE, "decisions_parsed")
        self._rejected = beam.metrics.Metrics.counter(PARSE_NAMESPACE, "decisions_rejected")

    def process(self, batch: list):
        if self._fmt == "tfrecord":
            keyed = [key_example(raw) for raw in batch]
        else:
            keyed = [self._parse(raw) for raw in batch]
        kept = [row for row in keyed if type(row) is tuple]
        if len(kept) < len(keyed):
            for row in keyed:
                if type(row) is not tuple:
                    if self._fmt == "tfrecord":
                        beam.metrics.Metrics.counter(COUNTER_NAMESPACE, row.reason).inc()
                    yield beam.pvalue.TaggedOutput(FAILED, row)
        if self._fmt != "tfrecord":
            self._parsed.inc(len(kept))
        if kept:
            yield kept

    def _parse(self, raw) -> Keyed | DeadLetter:
        result = parse_one(raw, DECISION, self._fmt, self._blueprint)
        if isinstance(result, DeadLetter):
            self._rejected.inc()
            beam.metrics.Metrics.counter(
                PARSE_NAMESPACE, f"decisions_rejected_{result.reason}"
            ).inc()
            return result  # already the dead letter: step ParseDecisions, source decision
        return result.decision_id, result


class DecisionBatches(NamedTuple):
    keyed: beam.PCollection  # list[(decision_id, DecisionEvent | bytes)]
    failed: beam.PCollection  # DeadLetter


class ReadDecisionBatches(beam.PTransform):
    """Decisions from a batched ``ReadEvents`` source (one made with ``batching``), parsed and
    keyed a batch at a time (``KeyBatch``).

        source = ReadEvents(DECISION, pattern="logs/d-*.jsonl", batching={"min_batch_size": 256})
        read = p | ReadDecisionBatches(source, blueprint)
    """

    def __init__(self, source: ReadEvents, blueprint: Blueprint):
        super().__init__()
        if source.kind != DECISION or source.batching is None:
            raise ValueError("ReadDecisionBatches reads a batched ReadEvents source of decisions")
        self._source = source
        self._blueprint = blueprint

    def expand(self, pbegin: beam.pvalue.PBegin) -> DecisionBatches:
        batches = pbegin | "Read" >> self._source
        keyed = batches | "ParseDecisions" >> beam.ParDo(
            KeyBatch(self._blueprint, self._source.parse_format)
        ).with_output_types(RowBatch).with_outputs(FAILED, main="keyed")
        return DecisionBatches(keyed.keyed, keyed[FAILED])
