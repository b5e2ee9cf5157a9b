"""The TFX training pipeline: from the join's spans to a gated, pushed model.

    python -m pipelines.train --examples DIR --blueprint FILE --pipeline_root DIR --serving_dir DIR
    python -m pipelines.train --dataset_root ROOT --spans 3 --blueprint FILE --pipeline_root DIR \
        --serving_dir DIR [--schema FILE] [--compile_vertex SPEC.json] [beam options]

ImportExampleGen (the join's own train/eval split) -> StatisticsGen -> ImportSchemaGen (the
schema the blueprint's feature types imply, or a curated ``--schema``) -> ExampleValidator ->
ValidationGate (stops the run on any anomaly, naming the feature) -> Transform -> Trainer ->
Evaluator (TFMA, against the latest blessed model found by a Resolver, with the blueprint's
thresholds) -> Pusher (``SERVING_DIR/<version>/``). Locally it runs with LocalDagRunner,
SQLite ML Metadata and Beam's DirectRunner under one ``--pipeline_root``; Beam's standard
options (``--runner=...``; any other flag is refused) and ``--beam_pipeline_args`` reach Beam
(Dataflow in production), and ``--compile_vertex``
writes a Vertex AI Pipelines spec instead of running: one that reads no local span and takes
the span to train on as its runtime parameter ``examples`` (``--examples`` is its default)::

    python -m pipelines.train --compile_vertex gs://B/templates/v7/train-notify.json \
        --blueprint examples/notify.yaml --examples gs://B/data/notify/2026-11-01 \
        --pipeline_root gs://B/pipeline_root/notify --serving_dir gs://B/serving/notify \
        --image REGION-docker.pkg.dev/P/loopline/loopline:v7

After a run, a model record (pipelines.model_record) is written to
``PIPELINE_ROOT/records/<run>.json``, and next to the pushed version as
``SERVING_DIR/<version>.record.json`` when the model was blessed.

Exit status (``pipelines.launch``): 0 when the run finished, blessed or not; 2 with ``train:
error: <line>`` on bad arguments or inputs (a span that is missing or incomplete, examples that
do not match the blueprint), before anything is written; 1 when a component failed.
"""

# No `from __future__ import annotations`: the @component decorator reads real annotations.

import os

# TFX 1.16 wants Keras 2; this must be set before TensorFlow is first imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402

from tfx import v1 as tfx  # noqa: E402

from loopline import storage  # noqa: E402
from loopline.blueprint import Blueprint, BlueprintError  # noqa: E402
from loopline.errors import UsageError  # noqa: E402
from loopline.spans import Span, SpanError, find_spans, read_span  # noqa: E402
from pipelines.blueprint_io import read_blueprint  # noqa: E402
from pipelines.gates import EVIDENCE_GATE_ID, EvidenceGate, ValidationGate  # noqa: E402
from pipelines.launch import EntryOptions, FailedRun, parse_flags  # noqa: E402
from pipelines.launch import main as launch_main  # noqa: E402
from pipelines.registration import RegisterPush, registration_context  # noqa: E402
from pipelines.train_config import (  # noqa: E402
    custom_config,
    eval_config,
    gate_settings,
    write_blueprint_schema,
)
from pipelines.train_examples import (  # noqa: E402
    EXAMPLES_PARAMETER,
    ExampleMismatch,
    ExampleSource,
    absolute,
    check_examples_match_blueprint,
    example_source,
    provenance_recorded,
    runtime_example_source,
)

PROG = "train"
# The module file's functions by import path: the package is installed (here and in the worker
# images), so TFX need not build and pip-install a wheel of it on every run.
PREPROCESSING_FN = "pipelines.trainer_module.preprocessing_fn"
RUN_FN = "pipelines.trainer_module.run_fn"
DEFAULT_IMAGE = "gcr.io/tfx-oss-public/tfx:1.16.0"

# --------------------------------------------------------------------------- the pipeline


def create_pipeline(
    blueprint: Blueprint,
    source: ExampleSource,
    pipeline_root: str,
    serving_dir: str,
    schema_file: str,
    metadata_path: str | None = None,
    beam_pipeline_args: list[str] | None = None,
) -> tfx.dsl.Pipeline:
    """The TFX pipeline for one blueprint: one pipeline name per decision type, so the
    Resolver finds the latest blessed model of earlier runs under the same pipeline root.

    The gate judges the observable rows when the spans record the decision provenance (a
    compiled spec's span, unknown now, is assumed to), else all rows."""
    recorded = provenance_recorded(list(source.spans), blueprint)
    example_gen = tfx.components.ImportExampleGen(
        input_base=source.input_base, input_config=source.input_config
    )
    statistics_gen = tfx.components.StatisticsGen(examples=example_gen.outputs["examples"])
    schema_gen = tfx.components.ImportSchemaGen(schema_file=schema_file)
    example_validator = tfx.components.ExampleValidator(
        statistics=statistics_gen.outputs["statistics"], schema=schema_gen.outputs["schema"]
    )
    gate = ValidationGate(
        anomalies=example_validator.outputs["anomalies"], schema=schema_gen.outputs["schema"]
    )
    config = custom_config(blueprint)
    transform = tfx.components.Transform(
        examples=example_gen.outputs["examples"],
        schema=gate.outputs["validated_schema"],
        preprocessing_fn=PREPROCESSING_FN,
        custom_config=config,
        # Statistics of the transformed data and the analyzer cache cost a pass each and are
        # not used downstream; TFDV has already checked the raw examples.
        disable_statistics=True,
        disable_analyzer_cache=True,
    )
    trainer = tfx.components.Trainer(
        run_fn=RUN_FN,
        examples=transform.outputs["transformed_examples"],
        transform_graph=transform.outputs["transform_graph"],
        train_args=tfx.proto.TrainArgs(splits=["train"]),
        eval_args=tfx.proto.EvalArgs(splits=["eval"]),
        custom_config=config,
    )
    baseline = tfx.dsl.Resolver(
        strategy_class=tfx.dsl.experimental.LatestBlessedModelStrategy,
        model=tfx.dsl.Channel(type=tfx.types.standard_artifacts.Model),
        # The EvidenceGate's blessings only: the Evaluator's own blessing does not know about
        # the evidence, and a model that was not pushed must not become the baseline.
        model_blessing=tfx.dsl.Channel(
            type=tfx.types.standard_artifacts.ModelBlessing,
            producer_component_id=EVIDENCE_GATE_ID,
            output_key="blessing",
        ),
    ).with_id("latest_blessed_model_resolver")
    evaluator = tfx.components.Evaluator(
        examples=example_gen.outputs["examples"],
        model=trainer.outputs["model"],
        baseline_model=baseline.outputs["model"],
        example_splits=["eval"],
        eval_config=eval_config(blueprint, recorded),
    )
    evidence_gate = EvidenceGate(
        evaluation=evaluator.outputs["evaluation"],
        evaluator_blessing=evaluator.outputs["blessing"],
        model=trainer.outputs["model"],
        examples=example_gen.outputs["examples"],
        settings=gate_settings(blueprint, recorded),
    ).with_id(EVIDENCE_GATE_ID)
    pusher = tfx.components.Pusher(
        model=trainer.outputs["model"],
        model_blessing=evidence_gate.outputs["blessing"],
        push_destination=tfx.proto.PushDestination(
            filesystem=tfx.proto.PushDestination.Filesystem(base_directory=serving_dir)
        ),
    )
    # After the Pusher, inside the pipeline (so a Vertex AI run does it too): record the push
    # and register it as the challenger.
    register = RegisterPush(
        pushed_model=pusher.outputs["pushed_model"],
        evaluation=evaluator.outputs["evaluation"],
        blessing=evidence_gate.outputs["blessing"],
        statistics=statistics_gen.outputs["statistics"],
        serving_dir=serving_dir,
        context=registration_context(blueprint, list(source.spans)),
    )
    return tfx.dsl.Pipeline(
        pipeline_name=pipeline_name(blueprint),
        pipeline_root=pipeline_root,
        components=[
            example_gen,
            statistics_gen,
            schema_gen,
            example_validator,
            gate,
            transform,
            trainer,
            baseline,
            evaluator,
            evidence_gate,
            pusher,
            register,
        ],
        enable_cache=False,
        metadata_connection_config=(
            tfx.orchestration.metadata.sqlite_metadata_connection_config(metadata_path)
            if metadata_path
            else None
        ),
        beam_pipeline_args=beam_pipeline_args or [],
    )


def pipeline_name(blueprint: Blueprint) -> str:
    return f"loopline-{blueprint.name.replace('_', '-').lower()}"


def metadata_path(pipeline_root: str) -> str:
    return os.path.join(pipeline_root, "metadata.sqlite")


def compile_vertex(
    pipeline: tfx.dsl.Pipeline,
    spec_path: str,
    image: str,
    parameter_values: dict[str, str] | None = None,
) -> str:
    """Compiles the pipeline into a Vertex AI Pipelines (Kubeflow V2) JSON spec at
    ``spec_path`` (local or gs://); ``parameter_values`` become its runtime parameters'
    defaults (``runtimeConfig``), which a job's own parameter values override."""
    try:
        import kfp.pipeline_spec  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "compiling a Vertex AI Pipelines spec needs the kfp-pipeline-spec package "
            "(pip install 'kfp-pipeline-spec>=0.2.2,<0.3')"
        ) from None
    runner = tfx.orchestration.experimental.KubeflowV2DagRunner(
        config=tfx.orchestration.experimental.KubeflowV2DagRunnerConfig(default_image=image),
        output_dir=os.path.dirname(absolute(spec_path)),
        output_filename=os.path.basename(spec_path),
    )
    runner.run(pipeline, parameter_values=parameter_values, write_out=True)
    return spec_path


# --------------------------------------------------------------------------- command line


class TrainOptions(EntryOptions):
    """Trains a model with TFX on the join's spans, gates it and pushes it (or compiles a
    Vertex AI Pipelines spec that does)."""

    @classmethod
    def _add_argparse_args(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--blueprint", required=True, help="blueprint YAML file")
        where = parser.add_mutually_exclusive_group(required=True)
        where.add_argument(
            "--examples",
            help="one span: a join output directory; with --compile_vertex, the default of the "
            "spec's runtime parameter 'examples' (not read when compiling)",
        )
        where.add_argument("--dataset_root", help="ROOT holding spans as ROOT/<name>/<YYYY-MM-DD>/")
        parser.add_argument(
            "--spans",
            type=int,
            default=1,
            help="with --dataset_root: train on the newest N complete spans",
        )
        parser.add_argument(
            "--pipeline_root", required=True, help="artifacts, ML Metadata, records"
        )
        parser.add_argument("--serving_dir", required=True, help="push destination (versioned)")
        parser.add_argument("--schema", help="a curated schema.pbtxt instead of the blueprint's")
        parser.add_argument(
            "--metadata_path", help="SQLite ML Metadata (default PIPELINE_ROOT/metadata.sqlite)"
        )
        parser.add_argument(
            "--beam_pipeline_args",
            default="",
            help="Beam options for every Beam-based component, e.g. for Dataflow",
        )
        parser.add_argument(
            "--compile_vertex",
            metavar="SPEC.json",
            help="write a Vertex AI Pipelines spec (local or gs://) instead of running locally",
        )
        parser.add_argument(
            "--image", default=DEFAULT_IMAGE, help="container image for --compile_vertex"
        )


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs, checked: what ``resolve`` returns. Paths are absolute (the
    components run elsewhere); a URI such as gs://... stays as given."""

    blueprint: Blueprint
    pipeline_root: str
    serving_dir: str
    spans: tuple[Span, ...]  # the spans to train on; none when compiling
    examples: str | None  # with compile_vertex: the default of the spec's 'examples'
    schema: str | None  # a curated schema, else the blueprint's is written
    metadata_path: str
    beam_args: tuple[str, ...]
    compile_vertex: str | None
    image: str


@dataclass(frozen=True)
class TrainOutcome:
    """What a run did: the model record of a local run, or the Vertex AI spec it compiled."""

    serving_dir: str
    record: dict | None = None
    spec: str | None = None


def resolve(options: argparse.Namespace, beam_args: Sequence[str] = ()) -> TrainConfig:
    """Checks every argument and input before anything is written: the blueprint, the spans
    and that their examples match it, a curated schema. Raises UsageError in one sentence."""
    if options.compile_vertex and options.dataset_root:
        raise UsageError(
            "--compile_vertex takes the span as the runtime parameter 'examples': give its "
            "default with --examples, not --dataset_root"
        )
    try:
        blueprint = read_blueprint(options.blueprint)
        if options.compile_vertex:  # the span is a runtime parameter: nothing is read now
            spans = []
        elif options.examples:
            spans = [read_span(options.examples)]
        else:
            spans = find_spans(options.dataset_root, blueprint.name, newest=options.spans)
        check_examples_match_blueprint(spans, blueprint)
    except (BlueprintError, SpanError, ExampleMismatch) as e:
        raise UsageError(str(e)) from None
    if options.schema and not options.compile_vertex and not storage.exists(options.schema):
        raise UsageError(f"--schema {options.schema} does not exist")
    pipeline_root = absolute(options.pipeline_root)
    return TrainConfig(
        blueprint=blueprint,
        pipeline_root=pipeline_root,
        serving_dir=absolute(options.serving_dir),
        spans=tuple(spans),
        examples=absolute(options.examples) if options.examples else None,
        schema=absolute(options.schema) if options.schema else None,
        metadata_path=options.metadata_path or metadata_path(pipeline_root),
        beam_args=(*shlex.split(options.beam_pipeline_args), *beam_args),
        compile_vertex=options.compile_vertex,
        image=options.image,
    )


def build(config: TrainConfig) -> tfx.dsl.Pipeline:
    """The TFX pipeline for a checked config: stages the spans' files (or, compiling, takes the
    span as a runtime parameter) and writes the blueprint's schema unless one was given."""
    if config.compile_vertex:
        source = runtime_example_source(config.examples)
    else:
        if not storage.is_remote(config.pipeline_root):
            os.makedirs(config.pipeline_root, exist_ok=True)
        source = example_source(list(config.spans), config.pipeline_root)
    schema_file = config.schema or write_blueprint_schema(config.blueprint, config.pipeline_root)
    return create_pipeline(
        config.blueprint,
        source,
        config.pipeline_root,
        config.serving_dir,
        schema_file,
        metadata_path=None if config.compile_vertex else config.metadata_path,
        beam_pipeline_args=list(config.beam_args),
    )


def _warn_local_paths(config: TrainConfig) -> None:
    """A compiled spec runs on Vertex AI, which cannot read this machine's paths: say so."""
    for flag, path in (
        ("--examples", config.examples),
        ("--pipeline_root", config.pipeline_root),
        ("--serving_dir", config.serving_dir),
        ("--schema", config.schema),
    ):
        if path and "://" not in path:
            print(
                f"warning: {flag} {path} is a local path; a Vertex AI job cannot read it",
                file=sys.stderr,
            )


def run(argv: list[str] | None = None) -> TrainOutcome:
    """Runs (or compiles) the pipeline and writes the model record.

    A run that finished, blessed or not ("not blessed: <why>" is a normal outcome), returns its
    record; UsageError (exit 2) when an argument or input is unusable, before anything is
    written; FailedRun (exit 1) when a component failed (anomalies stop the run at the
    ExampleValidator) or the spec cannot be compiled."""
    from pipelines import model_record

    options, beam_args = parse_flags(argv, TrainOptions, PROG, beam_options=True)
    config = resolve(options, beam_args)
    try:
        pipeline = build(config)
    except BlueprintError as e:  # a blueprint setting only the evaluation's config reads
        raise UsageError(str(e)) from None
    if config.compile_vertex:
        _warn_local_paths(config)
        try:
            compile_vertex(
                pipeline,
                config.compile_vertex,
                config.image,
                parameter_values={EXAMPLES_PARAMETER: config.examples},
            )
        except RuntimeError as e:
            raise FailedRun(str(e)) from None
        return TrainOutcome(config.serving_dir, spec=config.compile_vertex)
    started = model_record.now()
    try:
        tfx.orchestration.LocalDagRunner().run(pipeline)
    except Exception as e:  # a component failed: say why in one line when we can
        stop = model_record.anomalies_of_latest_run(config.metadata_path)
        if stop:
            raise FailedRun(f"stopped at ExampleValidator: {' | '.join(stop)}") from None
        raise FailedRun(f"the training pipeline failed: {e}") from None
    # RegisterPush recorded and registered a push; the record gains what ML Metadata knows.
    spans = list(config.spans)
    record = model_record.build(
        config.blueprint, spans, config.metadata_path, started, config.serving_dir
    )
    model_record.write(record, config.pipeline_root, config.serving_dir)
    return TrainOutcome(config.serving_dir, record=record)


def print_outcome(outcome: TrainOutcome) -> None:
    """The compiled spec's path, or the model record and whether it was blessed and
    registered."""
    from loopline import registry

    if outcome.spec:
        print(f"wrote Vertex AI Pipelines spec {outcome.spec}")
        return
    record = outcome.record
    print(json.dumps(record, indent=2, sort_keys=True))
    if not record["blessed"]:
        print(f"not blessed: {record['why']}")
        return
    challenger = registry.read_aliases(outcome.serving_dir).challenger
    registered = (
        f"registered as the challenger in {registry.aliases_path(outcome.serving_dir)}"
        if challenger == record["model_id"]
        else f"not registered: challenger {challenger} is still under test"
    )
    print(
        f"blessed and pushed: {record['name']} (model id {record['model_id']}) -> "
        f"{record['pushed_to']}; {registered}"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m pipelines.train``: 0 when the run finished (blessed or not) or the spec was
    compiled; 2 with ``train: error: <line>`` on bad arguments or inputs; 1 when it failed."""
    return launch_main(run, PROG, argv, report=print_outcome)


if __name__ == "__main__":
    sys.exit(main())
