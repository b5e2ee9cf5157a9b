"""Bulk scoring's input: decisions read and cut into batches right after the read, each batch
parsed and keyed by ``decision_id`` as one element, refusals as dead letters.

    read = p | ReadDecisionBatches("json", "logs/decisions-*.jsonl", blueprint, batching)
    read.keyed    # lists of (decision_id, DecisionEvent | serialized tf.Example)
    read.failed   # ScoringFailure, one per row that could not be parsed or keyed

Scoring needs no event-time timestamps, so none are set (the join's ParseDecisions sets them
for its windows).
"""

from __future__ import annotations

import contextlib
import itertools
import json
from collections.abc import Mapping
from typing import Any, NamedTuple

import apache_beam as beam
import tensorflow as tf

from loopline.blueprint import Blueprint
from loopline.events import DECISION, DecisionEvent, Refusal
from loopline.vocabulary import SCORING_INPUT_FORMATS as FORMATS
from transforms.batch_coder import RowBatch
from transforms.events import METRICS_NAMESPACE as PARSE_NAMESPACE
from transforms.events import parse_one
from transforms.scoring_failures import (
    BAD_EXAMPLE,
    COUNTER_NAMESPACE,
    MISSING_DECISION_ID,
    ScoringFailure,
)
from transforms.sources import ReadLineBatches

FAILED = "failed"
KEY_STEP = "KeyExamples"
PARSE_STEP = "ParseDecisions"

Keyed = tuple[str, DecisionEvent | bytes]


def key_example(serialized: bytes) -> Keyed | ScoringFailure:
    """A serialized tf.Example to ``(decision_id, bytes)`` using its ``decision_id`` feature."""
    try:
        example = tf.train.Example.FromString(serialized)
    except Exception as e:  # noqa: BLE001 - a corrupt record is a dead letter
        return ScoringFailure(
            BAD_EXAMPLE, KEY_STEP, f"{type(e).__name__}: {e}", None, serialized.hex()
        )
    ids = example.features.feature["decision_id"].bytes_list.value
    if len(ids) != 1:
        return ScoringFailure(
            MISSING_DECISION_ID,
            KEY_STEP,
            "the example has no single decision_id",
            None,
            serialized.hex(),
        )
    try:
        return ids[0].decode("utf-8"), serialized
    except UnicodeDecodeError as e:
        return ScoringFailure(
            BAD_EXAMPLE, KEY_STEP, f"decision_id is not UTF-8 ({e})", None, serialized.hex()
        )


def bigquery_row(row: Mapping[str, Any]) -> Mapping[str, Any]:
    """BigQuery keeps ``features`` as a JSON string column; decode it for the parser."""
    features = row.get("features")
    if isinstance(features, str):
        # Undecodable JSON stays a string: the parser refuses it with the right reason.
        with contextlib.suppress(ValueError):
            row = {**row, "features": json.loads(features)}
    return row


class KeyBatch(beam.DoFn):
    """A batch of raw rows to ONE list of ``(decision_id, value)`` (none for an empty one); rows
    that cannot be keyed leave one by one, tagged ``failed``, as ScoringFailures.

    For decision events (JSON lines, Avro records, BigQuery rows; ``fmt`` says which) the value is
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

    def _parse(self, raw) -> Keyed | ScoringFailure:
        if self._fmt == "record":
            raw = bigquery_row(raw)
        result = parse_one(raw, DECISION, self._fmt, self._blueprint)
        if isinstance(result, Refusal):
            self._rejected.inc()
            beam.metrics.Metrics.counter(
                PARSE_NAMESPACE, f"decisions_rejected_{result.reason}"
            ).inc()
            return ScoringFailure(result.reason, PARSE_STEP, result.detail, None, result.payload)
        return result.decision_id, result


def join_chunks(chunks: list[list]) -> list:
    """Batched chunks of lines as one batch of lines."""
    return list(itertools.chain.from_iterable(chunks))


def lines_of(chunk: list) -> list:
    return chunk


class DecisionBatches(NamedTuple):
    keyed: beam.PCollection  # list[(decision_id, DecisionEvent | bytes)]
    failed: beam.PCollection  # ScoringFailure


class ReadDecisionBatches(beam.PTransform):
    """Reads decisions in ``fmt`` from a file ``pattern`` (or, for ``record``, a BigQuery
    ``table``) as batches within ``batching`` (``beam.BatchElements``' arguments), parsed and
    keyed (``KeyBatch``).

    JSON lines are read in chunks of ``min_batch_size`` lines (``ReadLineBatches``) and batched
    by line count, so that no step sees single lines; with ``max_batch_duration_secs`` (stateful
    batching, which counts elements) the chunks are split back into lines first.
    """

    def __init__(
        self,
        fmt: str,
        pattern: str | None,
        blueprint: Blueprint,
        batching: Mapping[str, Any],
        table: str | None = None,
    ):
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
        self._fmt = fmt
        self._pattern = pattern
        self._table = table
        self._blueprint = blueprint
        self._batching = dict(batching)

    def expand(self, pbegin: beam.pvalue.PBegin) -> DecisionBatches:
        batching = self._batching
        if self._fmt == "json":
            chunks = pbegin | "ReadLines" >> ReadLineBatches(
                self._pattern, batch_lines=batching.get("min_batch_size", 1)
            )
            if "max_batch_duration_secs" in batching:
                batches = (
                    chunks
                    | "Lines" >> beam.FlatMap(lines_of)
                    | "Batch" >> beam.BatchElements(**batching)
                )
            else:
                # Every batch holds min to max rows (but the last of a file range).
                batches = (
                    chunks
                    | "Batch" >> beam.BatchElements(element_size_fn=len, **batching)
                    | "JoinChunks" >> beam.Map(join_chunks)
                )
        else:
            if self._fmt == "tfrecord":
                raw = pbegin | "ReadExamples" >> beam.io.ReadFromTFRecord(self._pattern)
            elif self._fmt == "record":
                raw = pbegin | "ReadTable" >> beam.io.ReadFromBigQuery(table=self._table)
            else:
                raw = pbegin | "ReadAvro" >> beam.io.ReadFromAvro(self._pattern)
            batches = raw | "Batch" >> beam.BatchElements(**batching)
        keyed = batches | "ParseDecisions" >> beam.ParDo(
            KeyBatch(self._blueprint, self._fmt)
        ).with_output_types(RowBatch).with_outputs(FAILED, main="keyed")
        return DecisionBatches(keyed.keyed, keyed[FAILED])
