"""Bulk scoring: decisions in, scores and policy decisions out, with the registry's models.

    python -m pipelines.bulk_score --input 'logs/decisions-*.jsonl' \\
        --model_dir serving/notify --blueprint examples/notify.yaml --output scored/ \\
        [--model_version rollout|production|challenger|ID|VERSION] \\
        [--log_decisions] [--min_batch_size 64 --max_batch_size 1024] [--device GPU] [beam options]

Reads decision events (JSON lines or Avro, ``--input``; or a BigQuery table, ``--input_table``)
or serialized ``tf.Example`` TFRecords (the join's examples), scores them with Beam RunInference
(``transforms.inference``), applies the blueprint's policy and writes::

    OUTPUT/scores/*.jsonl      arm, decision_id, score, decision, propensity, explored, model_id,
                               scored_at
    OUTPUT/failed/*.jsonl      reason, step, detail, decision_id, payload (refused or failed rows)
    OUTPUT/decisions/*.jsonl   with --log_decisions: the scored decisions as decision events
    OUTPUT/manifest.json       written last by a local run: counters, batch sizes, model(s)

Which model scores: by default (``--model_version rollout``) the registry's aliases, as the
decision client serves them (``transforms.arms``): while a challenger is in traffic, each row's
unit is assigned to an arm exactly as the client assigns it (the blueprint's ``rollout``
section) and scored by its arm's model, both models in one RunInference; an arm whose alias is
null gets the blueprint's fallback decision (no score, no model id), so a day before the first
promotion is scored too. Any other ``--model_version`` (an alias, a model id, a version) scores
every row with that one model, without arms.

and/or appends the score rows to ``--output_table``. Exits with status 2 and one line for a bad
argument or a missing model, and with status 1 and one line when more than
``--max_failed_fraction`` of the rows failed (the outputs are written all the same).
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, replace

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from loopline import registry, storage
from loopline.blueprint import Blueprint, BlueprintError
from loopline.events import DECISION
from loopline.examples import PiiKeyMissing, check_pii_key_secret, pii_key
from loopline.experiment import CHALLENGER, PRODUCTION
from loopline.policy import FallbackPolicy, PolicyError, TopKPolicy, policy_from_blueprint
from loopline.privacy import PayloadPrivacy
from loopline.registry import ModelNotFound, RegistryError, ServingModel, resolve_serving_model
from loopline.scorer import DEVICES
from loopline.vocabulary import SCORING_FILE_FORMATS as INPUT_FORMATS
from pipelines.blueprint_io import read_blueprint
from pipelines.launch import (
    COUNTER_PREFIX,
    FailedRun,
    UsageError,
    boolean_flag,
    counter_summary,
    parse_options,
)
from pipelines.launch import main as launch_main
from pipelines.options import PII_KEY_SECRET_HELP, add_shared_argument
from transforms.arms import ScoreArms
from transforms.encoding import DecisionEncoder
from transforms.inference import ScoreBatches
from transforms.model_handler import SavedModelHandler
from transforms.score_output import WriteFailures, WriteScores
from transforms.scoring_failures import BAD_EXAMPLE, MISSING_DECISION_ID
from transforms.scoring_input import ReadDecisionBatches
from transforms.sources import ReadEvents

PROG = "bulk_score"
ROLLOUT = "rollout"  # --model_version: both arms of the blueprint's rollout
DEFAULT_MIN_BATCH_SIZE = 256
DEFAULT_MAX_BATCH_SIZE = 2048

DEFAULT_MAX_FAILED_FRACTION = 0.01


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
        parser.add_argument(
            "--model_version",
            help="The model(s) to score with. 'rollout' (the default): the registry's aliases, "
            "as the decision client serves them: while a challenger is in traffic each row's "
            "unit is assigned to an arm by the blueprint's rollout section and scored by its "
            "arm's model (production or challenger, both in one RunInference); an arm whose "
            "alias is null gets the blueprint's fallback decision (no score, no model id). "
            "Or one model for every row, without arms: a registry alias (production, "
            "challenger), a model id or a version (never the newest directory).",
        )
        add_shared_argument(
            parser, "--blueprint", help="Blueprint YAML; default the one the model record names."
        )
        add_shared_argument(parser, "--output", help="Output directory for JSON lines.")
        add_shared_argument(parser, "--pii_key_secret", help=PII_KEY_SECRET_HELP)
        parser.add_argument("--output_table", help="BigQuery table to append score rows to.")
        parser.add_argument(
            "--log_decisions",
            type=boolean_flag,
            nargs="?",
            const=True,
            default=False,
            help="Also write the scored decisions as decision events under OUTPUT/decisions/: the "
            "product's decision log, raw features included as the decision client logs them "
            "(the join pseudonymises them): the one output of this job with raw values, off "
            "by default; keep it with the product's logs.",
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
            help="Exact number of model copies per worker, shared across SDK processes "
            "(one model only; with two arms Beam loads each model once per worker).",
        )
        parser.add_argument(
            "--large_model",
            type=boolean_flag,
            nargs="?",
            const=True,
            default=False,
            help="Load one model per worker shared across SDK processes.",
        )
        parser.add_argument(
            "--seed", type=int, default=None, help="Policy seed; default policy.seed."
        )
        parser.add_argument(
            "--max_failed_fraction",
            type=float,
            default=DEFAULT_MAX_FAILED_FRACTION,
            help="Largest share of input rows that may fail (refused, not encodable, or in a "
            "batch the model failed on) before the job exits non-zero "
            f"(default {DEFAULT_MAX_FAILED_FRACTION}).",
        )


class ConfigError(UsageError):
    """A bad argument or setting, reported as one line before the pipeline is built."""


@dataclass(frozen=True)
class ArmModels:
    """The rollout's models: each alias's model, or None while the alias is null (that arm
    gets the blueprint's fallback decision)."""

    production: ServingModel | None
    challenger: ServingModel | None

    def ids(self) -> dict[str, str | None]:
        return {
            arm: model.model_id if model else None
            for arm, model in ((PRODUCTION, self.production), (CHALLENGER, self.challenger))
        }

    def describe(self) -> str:
        """``production <id>, challenger <id>`` for the run's last line."""
        return ", ".join(f"{arm} {model_id or 'null'}" for arm, model_id in self.ids().items())


@dataclass(frozen=True)
class ScoringJob:
    """Everything resolved on the launcher before the pipeline is built: one serving model,
    or (rollout mode) the arms' models."""

    options: BulkScoreOptions
    blueprint: Blueprint
    source: ReadEvents  # batched
    key: bytes | None
    arms: ArmModels | None = None

    @property
    def input_format(self) -> str:
        return self.source.parse_format


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


def _rollout_aliases(options: BulkScoreOptions) -> registry.Aliases | None:
    """The registry's aliases, read once, when they decide which models score
    (``--model_version rollout``, the default, on a serving dir); None when one model is asked
    for (any other ``--model_version``, or one version dir as ``--model_dir``)."""
    if options.model_version not in (None, ROLLOUT):
        return None
    model_dir = options.model_dir.rstrip("/")
    if storage.exists(storage.join(model_dir, registry.SAVED_MODEL)):
        if options.model_version == ROLLOUT:
            raise ConfigError(
                f"--model_version rollout needs a serving dir with a registry, not the one "
                f"version dir {model_dir}"
            )
        return None
    if not storage.is_dir(model_dir):
        raise ModelNotFound(f"model dir {model_dir} does not exist")
    return registry.read_aliases(model_dir)


def _arm_models(
    options: BulkScoreOptions, aliases: registry.Aliases
) -> tuple[Blueprint, ArmModels]:
    """The blueprint (``--blueprint``, else the one a model's record names) and each alias's
    model (None while null). A challenger needs the blueprint's rollout section to get its
    units (the decision client refuses one without it): without it production (or the
    fallback) serves every row, and a warning says so."""
    model_id = aliases.production or aliases.challenger
    if model_id is None and not options.blueprint:
        raise ConfigError(
            "--blueprint is required: the registry has no production or challenger model "
            "whose record names one"
        )
    record = registry.resolve(options.model_dir, model_id).record if model_id else {}
    blueprint = _blueprint(options, dict(record))
    if aliases.challenger is not None and blueprint.rollout is None:
        logging.warning(
            "challenger %s is not served: blueprint %s has no rollout section to assign units",
            aliases.challenger,
            blueprint.name,
        )
        aliases = replace(aliases, challenger=None)
    production, challenger = (
        resolve_serving_model(options.model_dir, blueprint.name, model_id) if model_id else None
        for model_id in (aliases.production, aliases.challenger)
    )
    return blueprint, ArmModels(production, challenger)


def _check_arms(
    options: BulkScoreOptions, job_format: str, blueprint: Blueprint, arms: ArmModels
) -> None:
    """What the two-arm mode cannot do, refused in one line while a challenger serves."""
    if arms.challenger is None:
        return
    if job_format == "tfrecord":
        raise ConfigError(
            f"a challenger is in traffic: assigning arms needs the raw {blueprint.rollout.unit} "
            "of decision events, not TFRecord examples (or score one model with --model_version)"
        )
    if isinstance(policy_from_blueprint(blueprint, options.seed), TopKPolicy):
        raise ConfigError(
            "a challenger is in traffic: a top_k policy ranks one model's scores, not two "
            "arms' (score one model with --model_version)"
        )
    if options.model_copies is not None:
        raise ConfigError(
            "--model_copies applies to one model; with two arms Beam loads each model once "
            "per worker (give --model_version to score one model)"
        )


def resolve_job(options: BulkScoreOptions) -> tuple[ScoringJob, ServingModel | None]:
    """Validates the options and resolves the blueprint, model(s) and PII key: in rollout mode
    the job's ``arms`` (and no single serving model), else the one serving model."""
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
    if not 0 <= options.max_failed_fraction <= 1:
        raise ConfigError(
            f"--max_failed_fraction must be in [0, 1], got {options.max_failed_fraction}"
        )
    try:
        source = ReadEvents(
            DECISION,
            pattern=options.input,
            table=options.input_table,
            format=options.input_format if options.input else "auto",
            batching=batching(options),
            validate=False,  # checked below, naming --input
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    input_format = source.parse_format
    if options.log_decisions and input_format == "tfrecord":
        raise ConfigError("--log_decisions needs decision events as input, not TFRecord examples")
    aliases = _rollout_aliases(options)
    arms, serving_model = None, None
    if aliases is not None:
        blueprint, arms = _arm_models(options, aliases)
        _check_arms(options, input_format, blueprint, arms)
    else:
        # The record sits beside the version; read it once for the blueprint default.
        probe = resolve_serving_model(options.model_dir, None, options.model_version)
        blueprint = _blueprint(options, dict(probe.record))
        serving_model = resolve_serving_model(
            options.model_dir, blueprint.name, options.model_version
        )
    # TFRecord examples are already encoded (and pseudonymised) by the join.
    if input_format == "tfrecord":
        if options.pii_key_secret:
            check_pii_key_secret(options.pii_key_secret)
        key = None
    else:
        key = pii_key(blueprint, options.pii_key_secret)
    if options.input and not FileSystems.match([options.input])[0].metadata_list:
        raise ConfigError(f"no files match --input {options.input}")
    return ScoringJob(options, blueprint, source, key, arms), serving_model


def batch_bounds(min_batch_size: int | None, max_batch_size: int | None) -> tuple[int, int]:
    """BatchElements' bounds: the given ones, else large defaults (256 to 2048) that keep the
    per-batch model call and Beam's per-batch costs small per row.

        >>> batch_bounds(None, None), batch_bounds(None, 100), batch_bounds(8, 32)
        ((256, 2048), (100, 100), (8, 32))
    """
    low = min_batch_size or min(DEFAULT_MIN_BATCH_SIZE, max_batch_size or DEFAULT_MIN_BATCH_SIZE)
    high = max_batch_size or max(DEFAULT_MAX_BATCH_SIZE, low)
    return low, high


def _handler(options: BulkScoreOptions, serving_model: ServingModel) -> SavedModelHandler:
    min_batch, max_batch = batch_bounds(options.min_batch_size, options.max_batch_size)
    return SavedModelHandler(
        serving_model,
        device=options.device,
        min_batch_size=min_batch,
        max_batch_size=max_batch,
        target_batch_duration_secs=options.target_batch_duration_secs,
        max_batch_duration_secs=options.max_batch_duration_secs,
        model_copies=options.model_copies,
        large_model=options.large_model,
    )


def _scoring(job: ScoringJob, serving_model: ServingModel | None) -> beam.PTransform:
    """The scoring transform: one model (``ScoreBatches``, also the rollout's production model
    while no challenger serves), or the two arms (``ScoreArms``)."""
    options, blueprint = job.options, job.blueprint
    encoder = DecisionEncoder(blueprint, job.key)
    policy = policy_from_blueprint(blueprint, options.seed)
    arms = job.arms
    if arms is not None and arms.challenger is None and arms.production is not None:
        serving_model, arms = arms.production, None  # all traffic is production's: no arms
    if arms is None:
        return ScoreBatches(_handler(options, serving_model), encoder, policy)
    handlers = {
        arm: SavedModelHandler(model, device=options.device)
        for arm, model in ((PRODUCTION, arms.production), (CHALLENGER, arms.challenger))
        if model is not None
    }
    # Without a challenger no row has an arm (and, production null, every row falls back).
    rollout = blueprint.rollout if arms.challenger is not None else None
    fallback = FallbackPolicy.from_blueprint(blueprint)
    return ScoreArms(handlers, encoder, policy, fallback, rollout)


def batching(options: BulkScoreOptions) -> dict:
    """``beam.BatchElements``' arguments for the read's batches."""
    min_batch, max_batch = batch_bounds(options.min_batch_size, options.max_batch_size)
    settings = {
        "min_batch_size": min_batch,
        "max_batch_size": max_batch,
        "target_batch_duration_secs": options.target_batch_duration_secs,
        "max_batch_duration_secs": options.max_batch_duration_secs,
    }
    return {k: v for k, v in settings.items() if v is not None}


def build_pipeline(pipeline: beam.Pipeline, job: ScoringJob, serving_model) -> None:
    """Adds the read+batch+parse -> encode -> (assign arms ->) RunInference -> policy -> write
    steps.

    Rows are batched right after the read, so every later step handles a whole batch as one
    element (``transforms.scoring_input``, ``transforms.inference``, ``transforms.arms``);
    formatting for the sinks is the last step (``transforms.score_output``). No shuffle except
    top-k's GroupByKey.
    """
    options, blueprint = job.options, job.blueprint
    read = pipeline | "ReadDecisions" >> ReadDecisionBatches(job.source, blueprint)
    scoring = read.keyed | "ScoreDecisions" >> _scoring(job, serving_model)
    _ = scoring.scored | "WriteScores" >> WriteScores(
        options.output, options.output_table, options.log_decisions
    )
    if options.output:
        failed = (read.failed, scoring.failed) | "AllFailures" >> beam.Flatten()
        # Without a key (TFRecord input: the join already pseudonymised it) there is nothing
        # raw to redact; a failed example is kept as its hex.
        privacy = PayloadPrivacy.from_blueprint(blueprint, job.key) if job.key else None
        _ = failed | "WriteFailed" >> WriteFailures(options.output, privacy)


def _metrics_summary(result) -> dict:
    """Counters as every Loopline manifest spells them (``score.decisions``), and the
    distributions (batch sizes) the same way."""
    distributions = {}
    for dist in result.metrics().query(MetricsFilter())["distributions"]:
        value = dist.committed
        namespace = dist.key.metric.namespace
        if value is None or not value.count or not namespace.startswith(COUNTER_PREFIX):
            continue
        name = f"{namespace.removeprefix(COUNTER_PREFIX)}.{dist.key.metric.name}"
        distributions[name] = {
            "count": value.count,
            "sum": value.sum,
            "min": value.min,
            "max": value.max,
            "mean": value.mean,
        }
    return {"counters": counter_summary(result), "distributions": distributions}


def _write_manifest(job: ScoringJob, serving_model, summary: dict) -> None:
    rollout = job.blueprint.rollout
    if job.arms is None:
        models = {"model_id": serving_model.model_id, "model_path": serving_model.path}
    else:
        models = {
            "mode": ROLLOUT,
            "model_id": job.arms.ids()[PRODUCTION],
            "arms": job.arms.ids(),
            "model_paths": {
                arm: model.path
                for arm, model in (
                    (PRODUCTION, job.arms.production),
                    (CHALLENGER, job.arms.challenger),
                )
                if model is not None
            },
            "rollout": {
                "unit": rollout.unit,
                "challenger_share": rollout.challenger_share,
                "salt": rollout.salt,
            }
            if rollout
            else None,
        }
    manifest = {
        **models,
        "blueprint": job.blueprint.summary(),
        "policy": policy_from_blueprint(job.blueprint, job.options.seed).describe(),
        "input": job.options.input or job.options.input_table,
        "input_format": job.input_format,
        **summary,
    }
    with FileSystems.create(f"{job.options.output.rstrip('/')}/manifest.json") as f:
        f.write(json.dumps(manifest, indent=2, sort_keys=True).encode("utf-8"))


def resolve(options: BulkScoreOptions) -> tuple[ScoringJob, ServingModel | None]:
    """``resolve_job``, with every refusal of the blueprint, registry, key or policy as the one
    UsageError of the launch path."""
    try:
        job, serving_model = resolve_job(options)
        policy_from_blueprint(job.blueprint, options.seed)
    except (BlueprintError, RegistryError, PiiKeyMissing, PolicyError) as e:
        raise UsageError(str(e)) from None
    return job, serving_model


def run(argv: list[str] | None = None):
    """Resolves, builds and runs the pipeline, writes its manifest and prints its last line;
    returns the finished PipelineResult.

    Raises UsageError for bad arguments or a missing model (before anything runs) and FailedRun
    when more than ``--max_failed_fraction`` of the rows failed (after the outputs are written).
    """
    options, scoring_options = parse_options(argv, BulkScoreOptions, PROG)
    job, serving_model = resolve(scoring_options)
    pipeline = beam.Pipeline(options=options)
    build_pipeline(pipeline, job, serving_model)
    result = pipeline.run()
    result.wait_until_finish()
    summary = _metrics_summary(result)
    if scoring_options.output:
        _write_manifest(job, serving_model, summary)
    counters = summary["counters"]
    models = serving_model.model_id if job.arms is None else job.arms.describe()
    logging.info("bulk_score %s: %s", models, json.dumps(counters, sort_keys=True))
    scored, refused, failed = row_counts(counters)
    fallbacks = counters.get("score.fallback_decisions", 0)
    by_fallback = f" ({fallbacks} by the fallback decision)" if fallbacks else ""
    print(f"bulk_score: {models}: {scored} scored{by_fallback}, {refused} refused, {failed} failed")
    check_failed_fraction(scored, refused + failed, scoring_options.max_failed_fraction)
    return result


def row_counts(counters: dict) -> tuple[int, int, int]:
    """Rows scored, refused (not parsed or keyed) and failed (encoding or the model) by a run."""
    scored = counters.get("score.decisions", 0)
    refused = counters.get("parse.decisions_rejected", 0) + sum(
        counters.get(f"score.{reason}", 0) for reason in (BAD_EXAMPLE, MISSING_DECISION_ID)
    )
    failed = counters.get("score.encode_failed", 0) + counters.get("score.inference_failed", 0)
    return scored, refused, failed


def check_failed_fraction(scored: int, failed: int, max_failed_fraction: float) -> None:
    """Raises FailedRun (status 1, one line) when more than ``max_failed_fraction`` of the rows
    failed: the outputs are written, but a day of mostly dead letters must not pass for a run."""
    total = scored + failed
    if total and failed / total > max_failed_fraction:
        raise FailedRun(
            f"{failed} of {total} rows failed ({failed / total:.1%}), more than "
            f"--max_failed_fraction {max_failed_fraction}; see the failed/ output"
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.bulk_score``: the exit status (2 bad arguments, 1 too many failed
    rows), with one line on stderr for either."""
    return launch_main(run, PROG, argv)


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.WARNING)
    sys.exit(main())
