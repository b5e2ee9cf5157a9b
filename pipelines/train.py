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
import hashlib  # noqa: E402
import itertools  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path, PurePosixPath  # noqa: E402

import tensorflow_model_analysis as tfma  # noqa: E402
from tensorflow.core.example import example_pb2  # noqa: E402
from tensorflow_metadata.proto.v0 import anomalies_pb2, schema_pb2  # noqa: E402
from tfx import v1 as tfx  # noqa: E402
from tfx.types import artifact_utils  # noqa: E402

from loopline import storage  # noqa: E402
from loopline.blueprint import RESERVED_NAMES, Blueprint, BlueprintError  # noqa: E402
from loopline.errors import UsageError  # noqa: E402
from loopline.policy import PolicyError, policy_from_blueprint  # noqa: E402
from loopline.spans import Span, SpanError, find_spans, read_span  # noqa: E402
from pipelines import evidence  # noqa: E402
from pipelines.blueprint_io import read_blueprint  # noqa: E402
from pipelines.launch import EntryOptions, FailedRun, parse_flags  # noqa: E402
from pipelines.launch import main as launch_main  # noqa: E402
from pipelines.registration import RegisterPush, registration_context  # noqa: E402

PROG = "train"
# The module file's functions by import path: the package is installed (here and in the worker
# images), so TFX need not build and pip-install a wheel of it on every run.
PREPROCESSING_FN = "pipelines.trainer_module.preprocessing_fn"
RUN_FN = "pipelines.trainer_module.run_fn"
DEFAULT_IMAGE = "gcr.io/tfx-oss-public/tfx:1.16.0"
# The compiled Vertex AI spec's runtime parameter naming the span to train on (the DAG sets it).
EXAMPLES_PARAMETER = "examples"
EVIDENCE_GATE_ID = "EvidenceGate"
JOIN_STATUSES = ("observed", "default")
_KIND = {"int": "int64_list", "float": "float_list", "string": "bytes_list"}
_SCHEMA_TYPE = {"int": schema_pb2.INT, "float": schema_pb2.FLOAT, "string": schema_pb2.BYTES}
# The decision's provenance, written by the join into every example (absent values explicit:
# decision -1, propensity -1.0, arm and model_id empty). Training reads decision (through
# label.observable_when) and propensity (the inverse-propensity weight); none is a model input.
PROVENANCE_COLUMNS = {
    "decision": "int",
    "propensity": "float",
    "arm": "string",
    "model_id": "string",
}


class ExampleMismatch(ValueError):
    """The examples do not carry what the blueprint declares (names or types)."""


class ExampleAnomaliesFound(ValueError):
    """ExampleValidator found anomalies: the run stops before Transform and Trainer."""


# --------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class ExampleSource:
    """Where ImportExampleGen reads: a base directory and one file pattern per split.

    ``input_base`` is a path, or for a compiled Vertex AI spec the runtime parameter that
    names the span at run time (see ``runtime_example_source``)."""

    input_base: str | tfx.dsl.experimental.RuntimeParameter
    spans: tuple[Span, ...]

    @property
    def input_config(self):
        return tfx.proto.Input(
            splits=[
                tfx.proto.Input.Split(name=split, pattern=f"examples/{split}/*.tfrecord.gz")
                for split in ("train", "eval")
            ]
        )


def example_source(spans: list[Span], pipeline_root: str) -> ExampleSource:
    """Where ImportExampleGen reads exactly the example files the spans' manifests list.

    One span whose split directories hold just those files is read in place; otherwise
    (several spans, or a span holding files its manifest does not list) the listed files are
    staged (symlinked) into one tree under the pipeline root, keyed by the spans and their
    listings, so one ImportExampleGen reads them all while keeping the train/eval split."""
    listed = {(i, split): manifest_files(span, split) for i, span in enumerate(spans)
              for split in ("train", "eval")}  # fmt: skip
    if len(spans) == 1 and all(
        files == spans[0].example_files(split) for (_, split), files in listed.items()
    ):
        # Read in place, local or gs:// (the daily DAG trains on the day's span in its bucket).
        return ExampleSource(spans[0].uri, tuple(spans))
    # Staging symlinks needs local spans (Span.path says so in one line for a remote one).
    listed = {key: [Path(f) for f in files] for key, files in listed.items()}
    identity = "\n".join(
        f"{spans[i].path.resolve()}|{split}|{f.name}" for (i, split), files in listed.items()
        for f in files
    )  # fmt: skip
    key = hashlib.sha256(identity.encode()).hexdigest()
    staged = Path(pipeline_root) / "staged_spans" / key[:16]
    for (i, split), files in listed.items():
        span = spans[i]
        target = staged / "examples" / split
        target.mkdir(parents=True, exist_ok=True)
        for f in files:
            link = target / f"span{i:03d}-{span.date or span.path.name}-{f.name}"
            if not link.exists():
                link.symlink_to(f.resolve())
    return ExampleSource(str(staged), tuple(spans))


def manifest_files(span: Span, split: str) -> list[str]:
    """The example files of one split that the span's manifest lists, found by name in the
    span's own directory (so a copied or moved span still reads), as paths or URIs like the
    span's. A manifest written before spans listed their files (no ``files``) falls back to
    every file of the split."""
    listed = span.manifest.get("files", {}).get(split)
    if listed is None:
        return span.example_files(split)
    return sorted(storage.join(span.uri, "examples", split, PurePosixPath(p).name) for p in listed)


def runtime_example_source(default: str) -> ExampleSource:
    """For a compiled spec: ImportExampleGen reads the span named at run time by the pipeline
    parameter ``examples`` (``default`` when the job does not set it); nothing is read now.

    >>> runtime_example_source("gs://b/data/notify/2026-11-01").input_base.name
    'examples'
    """
    parameter = tfx.dsl.experimental.RuntimeParameter(
        name=EXAMPLES_PARAMETER, ptype=str, default=default
    )
    return ExampleSource(parameter, ())


def absolute(path: str) -> str:
    """A local path made absolute (components run elsewhere); a URI such as gs://... as is."""
    return path if "://" in path else os.path.abspath(path)


def check_examples_match_blueprint(spans: list[Span], blueprint: Blueprint) -> None:
    """Fails fast, before any component runs, when the first example of a split lacks a
    blueprint feature or the label, carries a feature the blueprint does not declare, or holds
    a feature of another type (a blueprint version that does not match the data)."""
    expected = {f.name: _KIND[f.base_type] for f in blueprint.example_features}
    expected[blueprint.label.name] = _KIND[blueprint.label.type]
    for span in spans:
        for split in ("train", "eval"):
            example = _first_example(span.example_files(split))
            if example is None:
                continue
            where = f"span {span.uri} ({split})"
            present = example.features.feature
            missing = sorted(set(expected) - set(present))
            if missing:
                raise ExampleMismatch(
                    f"{where} lacks {', '.join(missing)}, declared by blueprint "
                    f"{blueprint.name} v{blueprint.version}"
                )
            extra = sorted(set(present) - set(expected) - RESERVED_NAMES)
            if extra:
                raise ExampleMismatch(
                    f"{where} carries {', '.join(extra)}, not declared by blueprint "
                    f"{blueprint.name} v{blueprint.version}"
                )
            for name, kind in expected.items():
                actual = present[name].WhichOneof("kind")
                if actual is not None and actual != kind:
                    raise ExampleMismatch(
                        f"{where}: feature {name!r} holds {actual}, but the blueprint's type "
                        f"implies {kind}"
                    )


def _first_example(files: list[str]) -> example_pb2.Example | None:
    """The first example of the first non-empty file, read by TensorFlow (through tf.io.gfile,
    so a local path or gs://), CRCs checked."""
    import tensorflow as tf

    for path in files:
        for record in tf.data.TFRecordDataset(path, compression_type="GZIP").take(1):
            return example_pb2.Example.FromString(record.numpy())
    return None


# --------------------------------------------------------------------------- schema & config


def blueprint_schema(blueprint: Blueprint) -> schema_pb2.Schema:
    """The schema the blueprint implies: every example feature and the label present in every
    example with its type (scalars of shape [1]), the join's columns, and join_status's domain.

    ExampleValidator checks statistics against it, so a missing feature, a feature of another
    type or a feature the blueprint does not know stops the run. The provenance columns
    (PROVENANCE_COLUMNS) are typed but optional: spans written before the join recorded them
    still train, every row observable and weighing 1."""
    schema = schema_pb2.Schema()

    def add(name: str, base_type: str, scalar: bool = True, required: bool = True):
        feature = schema.feature.add(name=name, type=_SCHEMA_TYPE[base_type])
        feature.presence.min_fraction = 1.0 if required else 0.0
        feature.presence.min_count = 1 if required else 0
        if scalar and required:
            feature.shape.dim.add(size=1)
        return feature

    for f in blueprint.example_features:
        add(f.name, f.base_type, scalar=not f.is_list)
    add(blueprint.label.name, blueprint.label.type)
    add("decision_id", "string")
    add("decision_time_ms", "int")
    add("blueprint_version", "string")
    add("join_status", "string").domain = "join_status"
    schema.string_domain.add(name="join_status", value=list(JOIN_STATUSES))
    for name, base_type in PROVENANCE_COLUMNS.items():
        add(name, base_type, required=False)
    return schema


def write_blueprint_schema(blueprint: Blueprint, pipeline_root: str) -> str:
    """Writes the blueprint's schema once per blueprint version; returns its directory."""
    from google.protobuf import text_format

    fileio = tfx.dsl.io.fileio  # local or gs://: a compiled spec's schema is read on Vertex AI
    name = f"{blueprint.name}-{blueprint.content_hash[:12]}"
    directory = os.path.join(pipeline_root, "schemas", name)
    fileio.makedirs(directory)
    path = os.path.join(directory, "schema.pbtxt")
    with fileio.open(path, "w") as f:
        f.write(text_format.MessageToString(blueprint_schema(blueprint)))
    return path


def custom_config(blueprint: Blueprint) -> dict:
    """What the module file (pipelines/trainer_module.py) needs to know about the blueprint."""
    label = blueprint.label
    return {
        "features": [{"name": f.name, "type": f.type} for f in blueprint.example_features],
        "hashed": list(blueprint.privacy.pseudonymise),
        "label": {
            "name": label.name,
            "type": label.type,
            "observable_when": {column: list(values) for column, values in label.observable_when},
            "ips_clip": label.ips_clip,
        },
        "model": {k: v for k, v in blueprint.model.items() if k not in ("thresholds",)},
    }


def thresholds(blueprint: Blueprint) -> dict:
    """The blessing thresholds from ``model.thresholds``, with defaults.

    For a binary label the gate also wants ``min_positives`` positive labels in the gated
    slices, the AUC above ``min_auc`` at ``confidence``, and the candidate's policy to lose
    at most ``max_policy_value_loss`` of the logged policy's value at ``confidence``
    (pipelines.evidence)."""
    given = dict(blueprint.model.get("thresholds") or {})
    if blueprint.label.type == "int":
        min_positives = given.get("min_positives", evidence.DEFAULT_MIN_POSITIVES)
        if (
            isinstance(min_positives, bool)
            or not isinstance(min_positives, int)
            or min_positives < 0
        ):
            raise BlueprintError(
                blueprint.source,
                "model.thresholds.min_positives",
                f"must be a whole number >= 0, got {min_positives!r}",
            )
        confidence = given.get("confidence", evidence.DEFAULT_CONFIDENCE)
        if (
            isinstance(confidence, bool)
            or not isinstance(confidence, int | float)
            or not (0 < confidence < 1)
        ):
            raise BlueprintError(
                blueprint.source,
                "model.thresholds.confidence",
                f"must be a number in (0, 1), such as 0.95, got {confidence!r}",
            )
        max_loss = given.get("max_policy_value_loss", evidence.DEFAULT_MAX_POLICY_VALUE_LOSS)
        if isinstance(max_loss, bool) or not isinstance(max_loss, int | float) or max_loss < 0:
            raise BlueprintError(
                blueprint.source,
                "model.thresholds.max_policy_value_loss",
                f"must be a number >= 0 (a share of the logged policy's value, such as 0.05), "
                f"got {max_loss!r}",
            )
        return {
            "min_auc": float(given.get("min_auc", 0.5)),
            "max_auc_regression": float(given.get("max_auc_regression", 0.01)),
            "min_positives": min_positives,
            "confidence": float(confidence),
            "max_policy_value_loss": float(max_loss),
        }
    out = {"max_rmse_regression": float(given.get("max_rmse_regression", 0.0))}
    if "max_rmse" in given:
        out["max_rmse"] = float(given["max_rmse"])
    return out


def observable_slices(blueprint: Blueprint) -> list[tfma.SlicingSpec]:
    """The slices holding the rows whose label is observable (``label.observable_when``): one
    per combination of the listed values (``decision=1`` for notify); none when every row is."""
    conditions = blueprint.label.observable_when
    if not conditions:
        return []
    columns = [column for column, _ in conditions]
    return [
        tfma.SlicingSpec(feature_values={c: str(v) for c, v in zip(columns, values, strict=True)})
        for values in itertools.product(*(values for _, values in conditions))
    ]


def gated_slices(blueprint: Blueprint, recorded: bool = True) -> list[tfma.SlicingSpec]:
    """Where the gate judges a candidate: the observable rows, else all rows. A treatment-aware
    model predicts the label as if observed, so an unsent row's default label says nothing of
    it. ``recorded`` False: the examples do not carry the provenance columns (spans written
    before the join recorded them), so every row is observable (see ``provenance_recorded``)."""
    return (observable_slices(blueprint) if recorded else []) or [tfma.SlicingSpec()]


def provenance_recorded(spans: list[Span], blueprint: Blueprint) -> bool:
    """Whether every span's examples carry the columns ``label.observable_when`` names (read
    from a span's first example). Without them the trainer weighs every row as observable, and
    the gate must judge all rows: the observable slice would be missing."""
    columns = {column for column, _ in blueprint.label.observable_when}
    for span in spans:
        example = _first_example(span.example_files("eval")) or _first_example(
            span.example_files("train")
        )
        if example is not None and not columns <= set(example.features.feature):
            return False
    return True


def slice_name(spec: tfma.SlicingSpec) -> str:
    """A slice's name as the model record spells it: ``overall``, ``decision=1``, ``a=x, b=y``."""
    return ", ".join(f"{k}={v}" for k, v in sorted(spec.feature_values.items())) or "overall"


def eval_config(blueprint: Blueprint, recorded: bool = True) -> tfma.EvalConfig:
    """TFMA settings: metrics for the label type, sliced overall, by join_status, on the rows
    whose label is observable and by ``model.slice_feature``; the gate metric carries the
    blueprint's absolute floor and its maximum regression against the baseline, on the gated
    slices (``gated_slices``; ``recorded``: whether the examples carry the provenance)."""
    label = blueprint.label.name
    slices = [tfma.SlicingSpec(), tfma.SlicingSpec(feature_keys=["join_status"])]
    slices += observable_slices(blueprint) if recorded else []
    slice_feature = blueprint.model.get("slice_feature")
    if slice_feature:
        usable = {f.name for f in blueprint.example_features} - set(blueprint.privacy.pseudonymise)
        if slice_feature not in usable:
            raise BlueprintError(
                blueprint.source,
                "model.slice_feature",
                f"{slice_feature!r} is not a (non-pseudonymised) example feature",
            )
        slices.append(tfma.SlicingSpec(feature_keys=[slice_feature]))
    limits = thresholds(blueprint)
    if blueprint.label.type == "int":
        cut = json.dumps({"thresholds": [float(blueprint.policy.get("threshold", 0.5))]})
        gate = _gate(
            "AUC",
            tfma.GenericValueThreshold(lower_bound={"value": limits["min_auc"]}),
            tfma.GenericChangeThreshold(
                direction=tfma.MetricDirection.HIGHER_IS_BETTER,
                absolute={"value": -limits["max_auc_regression"]},
            ),
            gated_slices(blueprint, recorded),
        )
        metrics = [
            tfma.MetricConfig(class_name="ExampleCount"),
            gate,
            tfma.MetricConfig(class_name="BinaryCrossentropy"),
            tfma.MetricConfig(class_name="Calibration"),
            tfma.MetricConfig(class_name="MeanLabel"),
            tfma.MetricConfig(class_name="MeanPrediction"),
            tfma.MetricConfig(class_name="Precision", config=cut),
            tfma.MetricConfig(class_name="Recall", config=cut),
        ]
    else:
        value = (
            tfma.GenericValueThreshold(upper_bound={"value": limits["max_rmse"]})
            if "max_rmse" in limits
            else None
        )
        gate = _gate(
            "RootMeanSquaredError",
            value,
            tfma.GenericChangeThreshold(
                direction=tfma.MetricDirection.LOWER_IS_BETTER,
                absolute={"value": limits["max_rmse_regression"]},
            ),
            gated_slices(blueprint, recorded),
        )
        metrics = [
            tfma.MetricConfig(class_name="ExampleCount"),
            gate,
            tfma.MetricConfig(class_name="MeanAbsoluteError"),
            tfma.MetricConfig(class_name="MeanLabel"),
            tfma.MetricConfig(class_name="MeanPrediction"),
        ]
    return tfma.EvalConfig(
        model_specs=[
            tfma.ModelSpec(
                signature_name="serving_default", label_key=label, prediction_key="score"
            )
        ],
        slicing_specs=slices,
        metrics_specs=[tfma.MetricsSpec(metrics=metrics)],
    )


def _gate(
    metric: str, value_threshold, change_threshold, slices: list[tfma.SlicingSpec]
) -> tfma.MetricConfig:
    """The blessing metric, thresholded on the gated slices only (other slices' values are
    reported, not gated: a slice such as join_status=default holds one class)."""
    return tfma.MetricConfig(
        class_name=metric,
        per_slice_thresholds=[
            tfma.PerSliceMetricThreshold(
                slicing_specs=slices,
                threshold=tfma.MetricThreshold(
                    value_threshold=value_threshold, change_threshold=change_threshold
                ),
            )
        ],
    )


def gate_settings(blueprint: Blueprint, recorded: bool = True) -> str:
    """The EvidenceGate's parameter: the gated slices' names, the thresholds and what the
    off-policy check of the candidate's policy needs (``policy_check``), as JSON."""
    return json.dumps(
        {
            "gated": [slice_name(s) for s in gated_slices(blueprint, recorded)],
            "thresholds": thresholds(blueprint),
            "binary": blueprint.label.type == "int",
            "policy_check": policy_check_settings(blueprint, recorded),
        },
        sort_keys=True,
    )


def policy_check_settings(blueprint: Blueprint, recorded: bool = True) -> dict:
    """What the gate's off-policy check needs: the blueprint's policy, the label (the reward),
    after which decisions it is observable and what it is otherwise (its default). Without a
    binary label, a policy that turns one score into a decision, or examples that record the
    decision provenance, the check cannot run, and ``skipped`` says why."""
    label = blueprint.label
    try:
        policy = policy_from_blueprint(blueprint).describe()
    except PolicyError as e:
        raise BlueprintError(blueprint.source, "policy", str(e)) from None
    skipped = None
    if label.type != "int":
        skipped = "the off-policy check needs a binary label"
    elif policy["type"] not in evidence.JUDGED_POLICIES:
        skipped = f"the off-policy check cannot evaluate a {policy['type']} policy"
    elif not recorded:
        skipped = "the examples do not record the decision and its propensity"
    return {
        "skipped": skipped,
        "policy": policy,
        "label": label.name,
        "label_type": label.type,
        "observable": [label.is_observable({"decision": d}) for d in (0, 1)],
        "unobservable_reward": float(label.default),
    }


# --------------------------------------------------------------------------- the gate


def anomalies_summary(anomalies_uri: str, split_names: str) -> list[str]:
    """One line per anomaly in an ExampleAnomalies artifact: split, feature, what is wrong."""
    lines = []
    for split in artifact_utils.decode_split_names(split_names):
        path = os.path.join(anomalies_uri, f"Split-{split}", "SchemaDiff.pb")
        if not tfx.dsl.io.fileio.exists(path):
            continue
        with tfx.dsl.io.fileio.open(path, "rb") as f:
            anomalies = anomalies_pb2.Anomalies.FromString(f.read())
        for feature, info in sorted(anomalies.anomaly_info.items()):
            detail = "; ".join(r.description for r in info.reason) or info.description
            lines.append(f"split '{split}': feature '{feature}': {detail}")
        if anomalies.HasField("dataset_anomaly_info"):
            info = anomalies.dataset_anomaly_info
            detail = "; ".join(r.description for r in info.reason) or info.description
            lines.append(f"split '{split}': dataset: {detail}")
    return lines


@tfx.dsl.components.component
def ValidationGate(
    anomalies: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.ExampleAnomalies],
    schema: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Schema],
    validated_schema: tfx.dsl.components.OutputArtifact[tfx.types.standard_artifacts.Schema],
) -> None:
    """Stops the pipeline when ExampleValidator found anomalies; otherwise passes the schema on,
    so Transform (and everything after it) depends on a clean validation."""
    problems = anomalies_summary(anomalies.uri, anomalies.split_names)
    if problems:
        raise ExampleAnomaliesFound("examples do not match the schema: " + " | ".join(problems))
    for name in tfx.dsl.io.fileio.listdir(schema.uri):
        tfx.dsl.io.fileio.copy(
            os.path.join(schema.uri, name), os.path.join(validated_schema.uri, name), True
        )


def _candidate_metrics(evaluation_uri: str) -> dict[str, dict]:
    """The candidate's metrics per slice name from an Evaluator's output."""
    metrics: dict[str, dict] = {}
    for per_slice in tfma.load_metrics(evaluation_uri):
        parts = []
        for single in per_slice.slice_key.single_slice_keys:
            value = getattr(single, single.WhichOneof("kind"))
            parts.append(f"{single.column}={value.decode() if isinstance(value, bytes) else value}")
        name = ", ".join(parts) or "overall"
        for item in per_slice.metric_keys_and_values:
            key = item.key
            if key.is_diff or key.model_name not in ("", "candidate"):
                continue
            if item.value.HasField("double_value"):
                metrics.setdefault(name, {})[key.name] = item.value.double_value.value
    return metrics


def check_policy_value(model_uri: str, examples_uri: str, config: dict):
    """The gate's off-policy check (pipelines.evidence.policy_value) of the candidate in a
    Trainer's model artifact, on the eval split of an ExampleGen's examples artifact (the rows
    the Evaluator judged): the candidate's SavedModel scores them, the blueprint's policy turns
    the scores into decisions. A check that cannot run (``config["policy_check"]["skipped"]``)
    does not refuse the candidate; its reason is recorded."""
    from tfx.utils import path_utils

    check = config["policy_check"]
    if check["skipped"]:
        why = f"policy value not checked: {check['skipped']}"
        return evidence.PolicyValue(True, why, {"skipped": check["skipped"], "why": why})
    files = tfx.dsl.io.fileio.glob(os.path.join(examples_uri, "Split-eval", "*"))
    rows = evidence.read_logged_rows(
        path_utils.serving_model_path(model_uri), files, check["label"], check["label_type"]
    )
    limits = config["thresholds"]
    return evidence.policy_value(
        rows.reward,
        rows.decision,
        rows.propensity,
        rows.score,
        check["policy"],
        observable=tuple(check["observable"]),
        unobservable_reward=check["unobservable_reward"],
        max_loss=limits["max_policy_value_loss"],
        confidence=limits["confidence"],
    )


@tfx.dsl.components.component
def EvidenceGate(
    evaluation: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.ModelEvaluation],
    evaluator_blessing: tfx.dsl.components.InputArtifact[
        tfx.types.standard_artifacts.ModelBlessing
    ],
    model: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Model],
    examples: tfx.dsl.components.InputArtifact[tfx.types.standard_artifacts.Examples],
    blessing: tfx.dsl.components.OutputArtifact[tfx.types.standard_artifacts.ModelBlessing],
    settings: tfx.dsl.components.Parameter[str],
) -> None:
    """Blesses the candidate when the Evaluator did and the evidence holds (pipelines.evidence:
    enough positive labels, the AUC's interval above the floor, its policy evaluated off-policy
    on the eval split not worse than the logged policy); the Pusher and the Resolver of later
    runs read this blessing. Its ``why`` and ``evidence.json`` say what was judged."""
    config = json.loads(settings)
    evaluator_blessed = evaluator_blessing.get_int_custom_property("blessed") == 1
    if config["binary"]:
        verdict = evidence.judge(
            _candidate_metrics(evaluation.uri),
            config["gated"],
            config["thresholds"],
            evaluator_blessed,
            policy=check_policy_value(model.uri, examples.uri, config),
        )
    else:
        verdict = evidence.Evidence(
            evaluator_blessed,
            "the Evaluator's thresholds were met"
            if evaluator_blessed
            else "the Evaluator's thresholds were not met",
        )
    # The model the blessing is about (and the baseline), as the Evaluator named them: the
    # Resolver's LatestBlessedModelStrategy maps a blessing to its model by current_model_id.
    for name, value in evaluator_blessing.mlmd_artifact.custom_properties.items():
        if name != "blessed":
            blessing.mlmd_artifact.custom_properties[name].CopyFrom(value)
    blessing.set_int_custom_property("blessed", int(verdict.blessed))
    blessing.set_string_custom_property("why", verdict.why)
    evidence.write(verdict, blessing.uri)
    marker = "BLESSED" if verdict.blessed else "NOT_BLESSED"
    with tfx.dsl.io.fileio.open(os.path.join(blessing.uri, marker), "w") as f:
        f.write("")


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
