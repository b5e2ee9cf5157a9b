"""The training pipeline's own TFX components: ValidationGate (no anomaly reaches Transform)
and EvidenceGate (a candidate is blessed only when the evidence holds, pipelines.evidence).
"""

# No `from __future__ import annotations`: the @component decorator reads real annotations.

import json
import os

import tensorflow_model_analysis as tfma
from tensorflow_metadata.proto.v0 import anomalies_pb2
from tfx import v1 as tfx
from tfx.types import artifact_utils

from pipelines import evidence

EVIDENCE_GATE_ID = "EvidenceGate"


class ExampleAnomaliesFound(ValueError):
    """ExampleValidator found anomalies: the run stops before Transform and Trainer."""


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
