"""Writing one join output (a span) with its accounting (DESIGN.md, "Join outputs").

``WriteSpan`` takes everything the parse and join steps produced and writes:

    OUTPUT/examples/train/part-*.tfrecord.gz    gzip tf.Example, split by a stable hash of decision_id
    OUTPUT/examples/eval/part-*.tfrecord.gz
    OUTPUT/unmatched_observations/part-*.jsonl  {"reason": "orphan"|"out_of_window", "event": {...}}
    OUTPUT/rejected/part-*.jsonl                {"reason", "detail", "source", "payload"}
    OUTPUT/late/part-*.jsonl                    the same shape, reason "late" (streaming only)
    OUTPUT/manifest.json                        last: counts, and every file with its records

The counts are computed inside the pipeline (``transforms.span_stats``, one combine per input),
never by reading files back. A span is atomic (``transforms.span_commit``): files are written
under a temp directory and moved into place by one commit step that writes the manifest last,
so a span directory with a manifest holds exactly the files it lists.

Batch writes one span in ``OUTPUT``. Streaming (``output_window_ms``) writes one complete span
per fixed event-time window, in ``OUTPUT/<window start>`` (RFC 3339 without ``:``, e.g.
``2026-11-01T120000.000Z``), each with its own manifest; ``pipelines.train`` reads either.
Both run the same ``expand`` over a layout (``transforms.span_layout``) that says
how inputs are windowed, how files are sharded and when a span is committed.

    >>> parsed_decisions = raw_decisions | ParseDecisions(blueprint)
    >>> parsed_observations = raw_observations | ParseObservations(blueprint)
    >>> join = (parsed_decisions.events, parsed_observations.events) | JoinDecisions(blueprint)
    >>> SpanInputs.from_join(join, parsed_decisions.rejected, parsed_observations.rejected,
    ...                      raw_decisions, raw_observations) | WriteSpan("out/", blueprint, key)
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Any, NamedTuple

import apache_beam as beam
import pyarrow as pa
from apache_beam.metrics import Metrics
from apache_beam.utils.windowed_value import WindowedValue

from loopline.blueprint import Blueprint
from loopline.events import DeadLetter
from loopline.examples import PiiKeyMissing
from loopline.privacy import apply_privacy
from transforms.examples import joined_to_example, joined_to_examples
from transforms.join import JoinedDecision, JoinOutputs, session_gap_ms
from transforms.manifest import (
    COUNTER_NAMESPACE,
    EXAMPLES_EVAL_COUNTER,
    EXAMPLES_TRAIN_COUNTER,
)
from transforms.span_commit import temp_dir
from transforms.span_files import JSON_LINES, TFRECORD_GZIP
from transforms.span_layout import BatchLayout, ManifestSpec, WindowedLayout
from transforms.span_stats import SpanStats, SpanStatsFn, adders
from transforms.span_writers import WriteSpanOutput
from transforms.split import EVAL, TRAIN, is_eval

__all__ = ["SpanInputs", "SpanResult", "WriteSpan"]

# Joined decisions encoded per call of the columnar encoder. Small on purpose: a batch that
# lives through several young-generation collections gets its decisions promoted to Python's
# oldest generation, and the full collections that follow walk every object TensorFlow and Beam
# hold. At 1024 those took about a sixth of the join's CPU at 200k decisions; at 128 a batch is
# gone before that, and the columnar encoder costs about the same per row.
ENCODE_BATCH = 128


class SpanInputs(NamedTuple):
    """Every PCollection a span accounts for; all are always present (possibly empty).

    ``raw_decisions`` / ``raw_observations`` are what was read, before parsing: counted, they
    give ``decisions_in`` / ``observations_in``, so the manifest's reconciliation is a real
    check that nothing was lost between reading and writing. ``from_join`` stands in the
    parsed outputs for them when the caller has no raw input to give.
    """

    joined: Any  # PCollection[JoinedDecision]
    unmatched: Any  # PCollection[UnmatchedObservation]
    duplicate_decisions: Any  # PCollection[DecisionEvent]
    duplicate_observations: Any  # PCollection[ObservationEvent]
    out_of_range_observations: Any  # PCollection[ObservationEvent]: another span's, not written
    rejected_decisions: Any  # PCollection[DeadLetter]
    rejected_observations: Any  # PCollection[DeadLetter]
    late_decisions: Any  # PCollection[DeadLetter]: behind the watermark beyond the lateness
    late_observations: Any  # PCollection[DeadLetter]
    raw_decisions: Any  # PCollection of what was read
    raw_observations: Any

    @classmethod
    def from_join(
        cls,
        join: JoinOutputs,
        rejected_decisions: Any,
        rejected_observations: Any,
        raw_decisions: Any = None,
        raw_observations: Any = None,
        late_decisions: Any = None,
        late_observations: Any = None,
    ) -> SpanInputs:
        """Bundles a ``JoinDecisions`` result with the parse steps' dead letters.

        Without ``raw_decisions`` (``raw_observations``), every decision (observation) the
        outputs hold counts as read: the input count is then the sum of its parts. Without
        ``late_decisions`` (``late_observations``: what ``transforms.streaming`` found late),
        there are none: a batch job has no watermark to be behind.
        """
        where = join.joined.producer.full_label
        pipeline = join.joined.pipeline
        if late_decisions is None:
            late_decisions = pipeline | f"NoLateDecisions[{where}]" >> beam.Create([])
        if late_observations is None:
            late_observations = pipeline | f"NoLateObservations[{where}]" >> beam.Create([])
        if raw_decisions is None:
            raw_decisions = (
                join.joined,
                join.duplicate_decisions,
                rejected_decisions,
                late_decisions,
            ) | f"DecisionsSeen[{where}]" >> beam.Flatten()
        if raw_observations is None:
            raw_observations = (
                join.joined | f"UsedObservations[{where}]" >> beam.FlatMap(_used_observations),
                join.unmatched,
                join.duplicate_observations,
                join.out_of_range,
                rejected_observations,
                late_observations,
            ) | f"ObservationsSeen[{where}]" >> beam.Flatten()
        return cls(
            join.joined,
            join.unmatched,
            join.duplicate_decisions,
            join.duplicate_observations,
            join.out_of_range,
            rejected_decisions,
            rejected_observations,
            late_decisions,
            late_observations,
            raw_decisions,
            raw_observations,
        )


def _used_observations(joined: JoinedDecision) -> Iterable[int]:
    return range(joined.observations_used)


class SpanResult(NamedTuple):
    """What ``WriteSpan`` returns: the manifests it committed (one per span)."""

    manifests: Any  # PCollection[dict]


# ---------------------------------------------------------------------------------------------
# Encoding and writing


class EncodeExamples(beam.DoFn):
    """JoinedDecision -> serialized tf.Example on the ``train`` or ``eval`` output.

    Encodes ``ENCODE_BATCH`` decisions at a time with ``joined_to_examples`` (the columnar
    encoder scoring uses too); a batch it refuses is encoded row by row with
    ``joined_to_example``, which names the bad row. Each example keeps its decision's
    timestamp and windows.
    """

    def __init__(self, blueprint: Blueprint, key: bytes | None, batch_size: int = ENCODE_BATCH):
        self.blueprint = blueprint
        self.key = key
        self.batch_size = batch_size
        self.train_counter = Metrics.counter(COUNTER_NAMESPACE, EXAMPLES_TRAIN_COUNTER)
        self.eval_counter = Metrics.counter(COUNTER_NAMESPACE, EXAMPLES_EVAL_COUNTER)

    def start_bundle(self) -> None:
        self._batch: list[WindowedValue] = []

    def process(
        self, joined: JoinedDecision, windowed: Any = beam.DoFn.WindowedValueParam
    ) -> Iterable[Any]:
        # The whole WindowedValue rather than TimestampParam and WindowParam, which take a
        # slower path through Beam's invoker (windows exploded, each parameter looked up):
        # about 1 us an element against 4.
        self._batch.append(windowed)
        if len(self._batch) >= self.batch_size:
            yield from self._flush()

    def finish_bundle(self) -> Iterable[Any]:
        yield from self._flush()

    def _flush(self) -> Iterable[Any]:
        batch, self._batch = self._batch, []
        rows = [windowed.value for windowed in batch]
        try:
            encoded = joined_to_examples(rows, self.blueprint, self.key)
        except (TypeError, ValueError, OverflowError, pa.ArrowException):
            encoded = [
                joined_to_example(j, self.blueprint, self.key).SerializeToString() for j in rows
            ]
        eval_fraction = self.blueprint.eval_fraction
        evals = [is_eval(joined.decision.decision_id, eval_fraction) for joined in rows]
        # Counted once a batch: a counter update costs about a microsecond.
        self.eval_counter.inc(sum(evals))
        self.train_counter.inc(len(evals) - sum(evals))
        for windowed, example, to_eval in zip(batch, encoded, evals, strict=True):
            value = WindowedValue(example, windowed.timestamp, windowed.windows)
            yield beam.pvalue.TaggedOutput(EVAL, value) if to_eval else value


def _unmatched_json(unmatched: Any, blueprint: Blueprint, key: bytes | None) -> str:
    # An observation may carry fields the blueprint keeps private: they never leave raw.
    record = unmatched.to_dict()
    record["event"]["observations"] = apply_privacy(record["event"]["observations"], blueprint, key)
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def _refusal_json(refusal: DeadLetter) -> str:
    return json.dumps(refusal.to_dict(), sort_keys=True, separators=(",", ":"))


class WriteSpan(beam.PTransform):
    """Writes a span (examples, unmatched observations, dead letters) and then its manifest.

    Args:
        output_dir: the span directory (local or any Beam filesystem such as gs://); with
            ``output_window_ms``, the directory of one span per output window.
        blueprint: the parsed blueprint the join ran with.
        key: the pseudonymisation key from ``loopline.examples.pii_key`` (None when the
            blueprint pseudonymises nothing). Given here so workers never read the environment.
        num_shards: files per output (per window when streaming); None lets the runner choose
            in batch (one file per bundle, no shuffle) and means 1 in streaming.
        allowed_lateness_ms: recorded in the manifest's window settings.
        observation_range: the span's own observation range ``(from_ms, until_ms)`` the join
            ran with (``JoinDecisions(observation_range=...)``), recorded in the manifest.
        output_window_ms: streaming: the event-time length of each output window's span.

    Applied to ``SpanInputs``; returns ``SpanResult``.

    >>> inputs = SpanInputs.from_join(join, rejected_decisions, rejected_observations)
    >>> inputs | "WriteSpan" >> WriteSpan("out/notify/2026-11-01", blueprint, key)
    """

    def __init__(
        self,
        output_dir: str,
        blueprint: Blueprint,
        key: bytes | None = None,
        num_shards: int | None = None,
        allowed_lateness_ms: int = 0,
        output_window_ms: int | None = None,
        observation_range: tuple[int | None, int | None] = (None, None),
    ):
        super().__init__()
        if blueprint.privacy.pseudonymise and not key:
            raise PiiKeyMissing(
                f"blueprint {blueprint.name} pseudonymises {', '.join(blueprint.privacy.pseudonymise)}"
                f" but WriteSpan got no key; pass loopline.examples.pii_key(blueprint)"
            )
        if num_shards is not None and num_shards < 1:
            raise ValueError(
                f"num_shards must be at least 1 (or None to let the runner choose), got {num_shards}"
            )
        self.output_dir = output_dir
        self.blueprint = blueprint
        self.key = key
        self.allowed_lateness_ms = allowed_lateness_ms
        self.observation_range = tuple(observation_range)
        self.run_id = uuid.uuid4().hex[:16]
        if output_window_ms is None:
            self.layout: Any = BatchLayout(output_dir, num_shards)
        else:
            # What the join emits after a decision's session fired comes in a late pane, behind
            # the watermark: moved forward by the join's lateness (its session gap) it is on
            # time for the current output window. A dead letter keeps its message's event time:
            # moved by the allowed lateness it is on time whenever its message was.
            self.layout = WindowedLayout(
                output_dir,
                num_shards,
                output_window_ms,
                session_gap_ms(blueprint, allowed_lateness_ms),
                allowed_lateness_ms,
            )

    def expand(self, inputs: SpanInputs) -> SpanResult:
        bp, layout = self.blueprint, self.layout
        pipeline = inputs.joined.pipeline
        gate = layout.claim(pipeline, self.run_id)
        parts = {
            "joined": layout.join_output("joined", inputs.joined),
            "unmatched": layout.join_output("unmatched", inputs.unmatched),
            "duplicate_decisions": layout.join_output(
                "duplicate_decisions", inputs.duplicate_decisions
            ),
            "duplicate_observations": layout.join_output(
                "duplicate_observations", inputs.duplicate_observations
            ),
            "out_of_range_observations": layout.join_output(
                "out_of_range_observations", inputs.out_of_range_observations
            ),
            "rejected_decisions": layout.dead_letters(
                "rejected_decisions", inputs.rejected_decisions
            ),
            "rejected_observations": layout.dead_letters(
                "rejected_observations", inputs.rejected_observations
            ),
            "late_decisions": layout.dead_letters("late_decisions", inputs.late_decisions),
            "late_observations": layout.dead_letters("late_observations", inputs.late_observations),
        }
        encoded = parts["joined"] | "EncodeExamples" >> beam.ParDo(
            EncodeExamples(bp, self.key)
        ).with_outputs(EVAL, main=TRAIN)
        records = {
            TRAIN: encoded[TRAIN],
            EVAL: encoded[EVAL],
            "unmatched_observations": parts["unmatched"]
            | "UnmatchedToJson" >> beam.Map(_unmatched_json, bp, self.key),
            "rejected": (parts["rejected_decisions"], parts["rejected_observations"])
            | "FlattenRejected" >> beam.Flatten()
            | "RejectedToJson" >> beam.Map(_refusal_json),
            "late": (parts["late_decisions"], parts["late_observations"])
            | "FlattenLate" >> beam.Flatten()
            | "LateToJson" >> beam.Map(_refusal_json),
        }
        formats = {TRAIN: TFRECORD_GZIP, EVAL: TFRECORD_GZIP}
        temp_root = temp_dir(self.output_dir, self.run_id)
        files = [
            pcoll
            | f"Write[{output}]"
            >> WriteSpanOutput(
                output, formats.get(output, JSON_LINES), temp_root, layout.num_shards, gate
            )
            for output, pcoll in records.items()
        ] | "FlattenFiles" >> beam.Flatten()

        add = adders(bp)
        stats = [
            layout.combine(name, pcoll, SpanStatsFn(add[name])) for name, pcoll in parts.items()
        ]
        # Raw inputs are the largest collections and only need a count: Beam's own counter.
        for name, pcoll in (
            ("decisions_in", inputs.raw_decisions),
            ("observations_in", inputs.raw_observations),
        ):
            if name in layout.counted_inputs:
                stats.append(
                    layout.join_output(name, pcoll)
                    | f"Count[{name}]" >> beam.combiners.Count.Globally()
                    | f"ToStats[{name}]" >> beam.Map(SpanStats.of_count, name)
                )
        all_stats = stats | "FlattenStats" >> beam.Flatten()
        spec = ManifestSpec(
            bp, self.allowed_lateness_ms, layout.counted_inputs, self.observation_range
        )
        manifests = layout.commit(pipeline, all_stats, files, gate, self.run_id, spec)
        return SpanResult(manifests)
