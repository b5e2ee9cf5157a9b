"""What the training pipeline's components are told about a blueprint: the schema its feature
types imply, the module file's custom config, TFMA's evaluation settings (slices, metrics, the
blessing thresholds) and the EvidenceGate's settings.
"""

from __future__ import annotations

import itertools
import json
import os

import tensorflow_model_analysis as tfma
from tensorflow_metadata.proto.v0 import schema_pb2
from tfx import v1 as tfx

from loopline.blueprint import Blueprint, BlueprintError
from loopline.policy import PolicyError, policy_from_blueprint
from loopline.vocabulary import JoinStatus
from pipelines import evidence

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
    schema.string_domain.add(name="join_status", value=[s.value for s in JoinStatus])
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
