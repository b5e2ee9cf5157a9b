"""Bulk scoring: decisions in, scores and policy decisions out, with the pushed model.

    python -m pipelines.bulk_score --input 'logs/decisions-*.jsonl' \\
        --model_dir serving/notify --blueprint examples/notify.yaml --output scored/ \\
        [--log_decisions] [--min_batch_size 64 --max_batch_size 1024] [--device GPU] [beam options]

Reads decision events (JSON lines or Avro, ``--input``; or a BigQuery table, ``--input_table``)
or serialized ``tf.Example`` TFRecords (the join's examples), scores them with Beam RunInference
(``transforms.inference``), applies the blueprint's policy and writes::

    OUTPUT/scores/*.jsonl      decision_id, score, decision, propensity, explored, model_id, scored_at
    OUTPUT/failed/*.jsonl      reason, step, detail, decision_id, payload (refused or failed rows)
    OUTPUT/decisions/*.jsonl   with --log_decisions: the scored decisions as decision events
    OUTPUT/manifest.json       written last by a local run: counters, batch sizes, model_id

and/or appends the score rows to ``--output_table``.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import logging
import sys
from dataclasses import dataclass

import apache_beam as beam
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from loopline.blueprint import Blueprint, BlueprintError
from loopline.events import DECISION, DecisionEvent, Refusal
from loopline.policy import PolicyError, policy_from_blueprint
from pipelines.blueprint_io import read_blueprint
from pipelines.options import PII_KEY_SECRET_HELP, add_shared_argument
from transforms.events import METRICS_NAMESPACE as PARSE_NAMESPACE
from transforms.events import parse_one
from transforms.examples import PiiKeyMissing, check_pii_key_secret, pii_key
from transforms.inference import (
    DEVICES,
    ModelNotFound,
    ScoreBatches,
    ScoringFailure,
    decision_model_handler,
    resolve_serving_model,
)
from transforms.sources import ReadLineBatches

INPUT_FORMATS = ("auto", "json", "avro", "tfrecord")
MISSING_DECISION_ID = "missing_decision_id"
BAD_EXAMPLE = "bad_example"
DEFAULT_MIN_BATCH_SIZE = 256
DEFAULT_MAX_BATCH_SIZE = 2048

SCORE_TABLE_SCHEMA = {
    "fields": [
        {"name": "decision_id", "type": "STRING", "mode": "REQUIRED"},
        {"name": "score", "type": "FLOAT", "mode": "REQUIRED"},
        {"name": "decision", "type": "INTEGER", "mode": "REQUIRED"},
        {"name": "propensity", "type": "FLOAT", "mode": "REQUIRED"},
        {"name": "explored", "type": "BOOLEAN", "mode": "NULLABLE"},
        {"name": "model_id", "type": "STRING", "mode": "REQUIRED"},
        {"name": "scored_at", "type": "TIMESTAMP", "mode": "REQUIRED"},
    ]
}


def _flag(value: str | bool) -> bool:
    """A boolean flag that also takes ``=true``/``=false`` (Flex Template parameters do)."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


class BulkScoreOptions(PipelineOptions):
    """The parameters of ``pipelines.bulk_score`` (and of its Flex Template)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument(
            "--input", help="Glob of decision events (JSON lines, Avro) or TFRecord examples."
        )
        parser.add_argument(
            "--input_format",
            default="auto",
            choices=INPUT_FORMATS,
            help="Format of --input; auto picks by file extension.",
        )
        parser.add_argument(
            "--input_table", help="BigQuery table of decision events, PROJECT:DATASET.TABLE."
        )
        parser.add_argument(
            "--model_dir", help="Serving dir the Pusher pushes versions to (or one version dir)."
        )
        parser.add_argument("--model_version", help="Version to score with; default the latest.")
        add_shared_argument(
            parser, "--blueprint", help="Blueprint YAML; default the one the model record names."
        )
        add_shared_argument(parser, "--output", help="Output directory for JSON lines.")
        add_shared_argument(parser, "--pii_key_secret", help=PII_KEY_SECRET_HELP)
        parser.add_argument("--output_table", help="BigQuery table to append score rows to.")
        parser.add_argument(
            "--log_decisions",
            type=_flag,
            nargs="?",
            const=True,
            default=False,
            help="Also write the scored decisions as decision events under OUTPUT/decisions/.",
        )
        parser.add_argument(
            "--min_batch_size",
            type=int,
            default=None,
            help=f"Smallest model batch (default {DEFAULT_MIN_BATCH_SIZE}, or --max_batch_size).",
        )
        parser.add_argument(
            "--max_batch_size",
            type=int,
            default=None,
            help=f"Largest model batch (default {DEFAULT_MAX_BATCH_SIZE}).",
        )
        parser.add_argument(
            "--target_batch_duration_secs",
            type=float,
            default=None,
            help="BatchElements' target time per batch (adaptive batch size).",
        )
        parser.add_argument(
            "--max_batch_duration_secs",
            type=float,
            default=None,
            help="Longest a batch may buffer (stateful batching, for streaming).",
        )
        parser.add_argument(
            "--device", default="CPU", choices=DEVICES, help="Where TensorFlow runs the model."
        )
        parser.add_argument(
            "--model_copies",
            type=int,
            default=None,
            help="Exact number of model copies per worker, shared across SDK processes.",
        )
        parser.add_argument(
            "--large_model",
            type=_flag,
            nargs="?",
            const=True,
            default=False,
            help="Load one model per worker shared across SDK processes.",
        )
        parser.add_argument(
            "--seed", type=int, default=None, help="Policy seed; default policy.seed."
        )


class ConfigError(ValueError):
    """A bad argument or setting, reported as one line before the pipeline is built."""


@dataclass(frozen=True)
class ScoringJob:
    """Everything resolved on the launcher before the pipeline is built."""

    options: BulkScoreOptions
    blueprint: Blueprint
    input_format: str
    key: bytes | None


def _input_format(options: BulkScoreOptions) -> str:
    if options.input_format != "auto":
        return options.input_format
    pattern = options.input.lower()
    if pattern.endswith((".avro",)):
        return "avro"
    if ".tfrecord" in pattern or pattern.endswith((".tfr", ".tfr.gz")):
        return "tfrecord"
    return "json"


def _blueprint(options: BulkScoreOptions, record: dict) -> Blueprint:
    path = options.blueprint
    if path is None:
        recorded = record.get("blueprint") or {}
        path = record.get("blueprint_path") or recorded.get("path") or recorded.get("source")
        if not path or not FileSystems.exists(path):
            raise ConfigError(
                "--blueprint is required: the model record does not name a readable blueprint file"
            )
    blueprint = read_blueprint(path)
    recorded_hash = (record.get("blueprint") or {}).get("content_hash")
    if recorded_hash and recorded_hash != blueprint.content_hash:
        logging.warning(
            "blueprint %s (hash %s) differs from the one the model was trained with (%s)",
            path,
            blueprint.content_hash[:12],
            recorded_hash[:12],
        )
    return blueprint


def resolve_job(options: BulkScoreOptions) -> tuple[ScoringJob, object]:
    """Validates the options and resolves the blueprint, model version and PII key."""
    if bool(options.input) == bool(options.input_table):
        raise ConfigError("give exactly one of --input (a glob) or --input_table (BigQuery)")
    if not options.model_dir:
        raise ConfigError("--model_dir is required (the serving dir the Pusher pushes to)")
    if not options.output and not options.output_table:
        raise ConfigError("give --output (a directory) and/or --output_table (BigQuery)")
    if options.log_decisions and not options.output:
        raise ConfigError("--log_decisions writes under --output; give --output too")
    for name in ("min_batch_size", "max_batch_size", "model_copies"):
        value = getattr(options, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name} must be at least 1, got {value}")
    if (
        options.min_batch_size
        and options.max_batch_size
        and options.min_batch_size > options.max_batch_size
    ):
        raise ConfigError(
            f"--min_batch_size {options.min_batch_size} is larger than --max_batch_size {options.max_batch_size}"
        )
    input_format = "record" if options.input_table else _input_format(options)
    if options.log_decisions and input_format == "tfrecord":
        raise ConfigError("--log_decisions needs decision events as input, not TFRecord examples")
    # The record sits beside the version; read it once for the blueprint default.
    probe = resolve_serving_model(options.model_dir, None, options.model_version)
    blueprint = _blueprint(options, dict(probe.record))
    serving_model = resolve_serving_model(options.model_dir, blueprint.name, options.model_version)
    # TFRecord examples are already encoded (and pseudonymised) by the join.
    if input_format == "tfrecord":
        if options.pii_key_secret:
            check_pii_key_secret(options.pii_key_secret)
        key = None
    else:
        key = pii_key(blueprint, options.pii_key_secret)
    if options.input and not FileSystems.match([options.input])[0].metadata_list:
        raise ConfigError(f"no files match --input {options.input}")
    return ScoringJob(options, blueprint, input_format, key), serving_model


def _key_example(serialized: bytes) -> tuple[str, bytes] | ScoringFailure:
    """A serialized tf.Example to ``(decision_id, bytes)`` using its ``decision_id`` feature."""
    try:
        example = tf.train.Example.FromString(serialized)
    except Exception as e:  # noqa: BLE001 - a corrupt record is a dead letter
        return ScoringFailure(
            BAD_EXAMPLE, "KeyExamples", f"{type(e).__name__}: {e}", None, serialized.hex()
        )
    ids = example.features.feature["decision_id"].bytes_list.value
    if len(ids) != 1:
        return ScoringFailure(
            MISSING_DECISION_ID,
            "KeyExamples",
            "the example has no single decision_id",
            None,
            serialized.hex(),
        )
    try:
        return ids[0].decode("utf-8"), serialized
    except UnicodeDecodeError as e:
        return ScoringFailure(
            BAD_EXAMPLE, "KeyExamples", f"decision_id is not UTF-8 ({e})", None, serialized.hex()
        )


def _refusal_to_failure(refusal: Refusal) -> ScoringFailure:
    return ScoringFailure(refusal.reason, "ParseDecisions", refusal.detail, None, refusal.payload)


def _bigquery_row(row: dict) -> dict:
    """BigQuery keeps ``features`` as a JSON string column; decode it for the parser."""
    features = row.get("features")
    if isinstance(features, str):
        # Undecodable JSON stays a string: the parser refuses it with the right reason.
        with contextlib.suppress(ValueError):
            row = {**row, "features": json.loads(features)}
    return row


def _to_json(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class _KeyBatch(beam.DoFn):
    """A batch of raw rows to ONE list of ``(decision_id, value)`` (none for an empty one); rows
    that cannot be keyed leave one by one, tagged ``failed``, as ScoringFailures.

    For decision events (JSON lines, Avro records, BigQuery rows; ``fmt`` says which) the value is
    the ``DecisionEvent``, with ``transforms.events.parse_one``'s validation and ParseDecisions'
    counters (``loopline.parse``); for TFRecords (``fmt="tfrecord"``) it is the serialized
    example, keyed by its ``decision_id`` feature. Scoring needs no event-time timestamps, so
    none are set (ParseDecisions sets them for the join's windows).

        raw | beam.BatchElements() | beam.ParDo(_KeyBatch(blueprint, "json"))
    """

    def __init__(self, blueprint: Blueprint, fmt: str):
        self._blueprint = blueprint
        self._fmt = fmt

    def setup(self) -> None:
        self._parsed_counter = beam.metrics.Metrics.counter(PARSE_NAMESPACE, "decisions_parsed")
        self._rejected_total = beam.metrics.Metrics.counter(PARSE_NAMESPACE, "decisions_rejected")

    def process(self, batch: list):
        if self._fmt == "tfrecord":
            keyed = [_key_example(raw) for raw in batch]
        else:
            keyed = [self._parse(raw) for raw in batch]
        kept = [row for row in keyed if type(row) is tuple]
        if len(kept) < len(keyed):
            for row in keyed:
                if type(row) is not tuple:
                    yield beam.pvalue.TaggedOutput("failed", row)
        if self._fmt != "tfrecord":
            self._parsed_counter.inc(len(kept))
        if kept:
            yield kept

    def _parse(self, raw) -> tuple[str, DecisionEvent] | ScoringFailure:
        if self._fmt == "record":
            raw = _bigquery_row(raw)
        result = parse_one(raw, DECISION, self._fmt, self._blueprint)
        if isinstance(result, Refusal):
            self._rejected_total.inc()
            beam.metrics.Metrics.counter(
                PARSE_NAMESPACE, f"decisions_rejected_{result.reason}"
            ).inc()
            return _refusal_to_failure(result)
        return result.decision_id, result


def batch_bounds(min_batch_size: int | None, max_batch_size: int | None) -> tuple[int, int]:
    """BatchElements' bounds: the given ones, else large defaults (256 to 2048) that keep the
    per-batch model call and Beam's per-batch costs small per row.

        >>> batch_bounds(None, None), batch_bounds(None, 100), batch_bounds(8, 32)
        ((256, 2048), (100, 100), (8, 32))
    """
    low = min_batch_size or min(DEFAULT_MIN_BATCH_SIZE, max_batch_size or DEFAULT_MIN_BATCH_SIZE)
    high = max_batch_size or max(DEFAULT_MAX_BATCH_SIZE, low)
    return low, high


def build_pipeline(pipeline: beam.Pipeline, job: ScoringJob, serving_model) -> None:
    """Adds the read -> batch -> parse+key -> RunInference -> policy+format -> write steps.

    Rows are batched right after the read (BatchElements with the batching options), so every
    later step handles a whole batch as one element: parse+key per batch (refusals leave one by
    one as dead letters), one RunInference call per batch (``ScoreBatches``), and one policy step
    that formats the batch's output lines together. No shuffle except top-k's GroupByKey.
    """
    options, blueprint = job.options, job.blueprint
    failures = []
    min_batch, max_batch = batch_bounds(options.min_batch_size, options.max_batch_size)
    handler = decision_model_handler(
        serving_model,
        blueprint,
        job.key,
        device=options.device,
        min_batch_size=min_batch,
        max_batch_size=max_batch,
        target_batch_duration_secs=options.target_batch_duration_secs,
        max_batch_duration_secs=options.max_batch_duration_secs,
        model_copies=options.model_copies,
        large_model=options.large_model,
    )
    batching = handler.batch_elements_kwargs()
    if job.input_format == "json":
        chunks = pipeline | "ReadDecisions" >> ReadLineBatches(options.input, batch_lines=min_batch)
        if options.max_batch_duration_secs is None:
            # Chunks of min_batch lines, batched by their line count: no step sees single lines
            # and every batch holds min_batch to max_batch rows (but the last of a file range).
            batches = (
                chunks
                | "Batch" >> beam.BatchElements(element_size_fn=len, **batching)
                | "JoinChunks" >> beam.Map(lambda cs: list(itertools.chain.from_iterable(cs)))
            )
        else:
            # BatchElements then batches statefully and counts elements, not element_size_fn:
            # lines must reach it one by one to keep batches within bounds.
            batches = (
                chunks
                | "Lines" >> beam.FlatMap(lambda chunk: chunk)
                | "Batch" >> beam.BatchElements(**batching)
            )
    else:
        if job.input_format == "tfrecord":
            raw = pipeline | "ReadExamples" >> beam.io.ReadFromTFRecord(options.input)
        elif job.input_format == "record":
            raw = pipeline | "ReadTable" >> beam.io.ReadFromBigQuery(table=options.input_table)
        else:
            raw = pipeline | "ReadAvro" >> beam.io.ReadFromAvro(options.input)
        batches = raw | "Batch" >> beam.BatchElements(**batching)
    batches = batches | "ParseDecisions" >> beam.ParDo(
        _KeyBatch(blueprint, job.input_format)
    ).with_outputs("failed", main="keyed")
    failures.append(batches.failed)
    policy = policy_from_blueprint(blueprint, options.seed)
    scoring = batches.keyed | "ScoreDecisions" >> ScoreBatches(
        handler, policy, log_decisions=options.log_decisions
    )
    failures.append(scoring.failed)
    failed = failures | "AllFailures" >> beam.Flatten()

    if options.output:
        out = options.output.rstrip("/")
        _ = scoring.scored | "WriteScores" >> beam.io.WriteToText(
            f"{out}/scores/part", file_name_suffix=".jsonl"
        )
        _ = (
            failed
            | "FailuresToJson" >> beam.Map(lambda f: _to_json(f.to_dict()))
            | "WriteFailed" >> beam.io.WriteToText(f"{out}/failed/part", file_name_suffix=".jsonl")
        )
        if options.log_decisions:
            _ = scoring.logged | "WriteDecisions" >> beam.io.WriteToText(
                f"{out}/decisions/part", file_name_suffix=".jsonl"
            )
    if options.output_table:
        rows = scoring.scored | "ToRows" >> beam.FlatMap(
            lambda lines: [json.loads(line) for line in lines.split("\n")]
        )
        _ = rows | "WriteScoresTable" >> beam.io.WriteToBigQuery(
            options.output_table,
            schema=SCORE_TABLE_SCHEMA,
            create_disposition=beam.io.BigQueryDisposition.CREATE_IF_NEEDED,
            write_disposition=beam.io.BigQueryDisposition.WRITE_APPEND,
        )


def _metrics_summary(result) -> dict:
    metrics = result.metrics().query(MetricsFilter())
    counters = {}
    for counter in metrics["counters"]:
        name = f"{counter.key.metric.namespace}.{counter.key.metric.name}"
        counters[name] = counters.get(name, 0) + (counter.committed or 0)
    distributions = {}
    for dist in metrics["distributions"]:
        value = dist.committed
        if value is None or not value.count:
            continue
        name = f"{dist.key.metric.namespace}.{dist.key.metric.name}"
        distributions[name] = {
            "count": value.count,
            "sum": value.sum,
            "min": value.min,
            "max": value.max,
            "mean": value.mean,
        }
    return {"counters": counters, "distributions": distributions}


def _write_manifest(job: ScoringJob, serving_model, summary: dict) -> None:
    manifest = {
        "model_id": serving_model.model_id,
        "model_path": serving_model.path,
        "blueprint": job.blueprint.summary(),
        "policy": policy_from_blueprint(job.blueprint, job.options.seed).describe(),
        "input": job.options.input or job.options.input_table,
        "input_format": job.input_format,
        **summary,
    }
    with FileSystems.create(f"{job.options.output.rstrip('/')}/manifest.json") as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))


def run(argv: list[str] | None = None, save_main_session: bool = False):
    """Builds and runs the pipeline; returns the finished PipelineResult.

    Exits with status 2 and one line on stderr for bad arguments or a missing model.
    """
    options = PipelineOptions(argv if argv is not None else sys.argv[1:])
    scoring_options = options.view_as(BulkScoreOptions)
    try:
        job, serving_model = resolve_job(scoring_options)
        policy_from_blueprint(job.blueprint, scoring_options.seed)
    except (ConfigError, BlueprintError, ModelNotFound, PiiKeyMissing, PolicyError) as e:
        print(f"bulk_score: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, job, serving_model)
    result = pipeline.run()
    result.wait_until_finish()
    summary = _metrics_summary(result)
    if scoring_options.output:
        _write_manifest(job, serving_model, summary)
    counters = summary["counters"]
    logging.info("bulk_score %s: %s", serving_model.model_id, json.dumps(counters, sort_keys=True))
    print(
        f"bulk_score: {serving_model.model_id}: "
        f"{counters.get('loopline.score.decisions', 0)} scored, "
        f"{counters.get('loopline.parse.decisions_rejected', 0)} refused, "
        f"{counters.get('loopline.score.encode_failed', 0) + counters.get('loopline.score.inference_failed', 0)} failed"
    )
    return result


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.WARNING)
    run()
