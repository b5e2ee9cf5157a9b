"""The model record: what a user needs to trust (or question) a push.

One JSON document per training run, read back from ML Metadata and the Evaluator's output
after the run: for a pushed model its registry id (``model_id``, a UUID) and human-readable
``name`` (``<blueprint>-<version>``), the blueprint (name, version, content hash), the spans
trained on with their manifest counts, the StatisticsGen output the model was trained on, the
hyperparameters the Trainer used, when training started and ended, the candidate's metrics per
slice, the baseline it was compared with (and its metrics and the differences), the blessing
decision and why, and the gate's figures (``evidence``) with the off-policy value of the
candidate's policy next to the logged policy's (``policy_value``, pipelines.evidence). It is written for every run to ``PIPELINE_ROOT/records/<run>.json`` and, for
a pushed model, next to the pushed version as ``SERVING_DIR/<version>.record.json``, where
``loopline.registry`` reads it. Both may be ``gs://`` paths (written through
``loopline.storage``).

    >>> record = build(blueprint, spans, "root/metadata.sqlite", started=now())
    >>> record["blessed"], record["why"]
    (False, 'auc 0.51 is below the floor 0.6; auc changed by -0.29 vs the baseline ...')
"""

from __future__ import annotations

import json
import os
import uuid
from datetime import datetime, timezone

import tensorflow_model_analysis as tfma
from ml_metadata.metadata_store import metadata_store
from ml_metadata.proto import metadata_store_pb2
from tfx import v1 as tfx
from tfx.types import artifact_utils

from loopline import storage
from loopline.blueprint import Blueprint
from loopline.registry import record_path
from loopline.spans import Span


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")


class _Run:
    """The executions of the latest pipeline run in an ML Metadata store, by component."""

    def __init__(self, mlmd_path: str):
        config = tfx.orchestration.metadata.sqlite_metadata_connection_config(mlmd_path)
        self.store = metadata_store.MetadataStore(config)
        runs = self.store.get_contexts_by_type("pipeline_run")
        if not runs:
            raise ValueError(f"no pipeline run recorded in {mlmd_path}")
        self.context = max(runs, key=lambda c: c.id)
        self.executions = self.store.get_executions_by_context(self.context.id)
        type_ids = {e.type_id for e in self.executions}
        names = {t.id: t.name for t in self.store.get_execution_types_by_id(list(type_ids))}
        self.component = {e.id: names[e.type_id].rsplit(".", 1)[-1] for e in self.executions}

    @property
    def run_id(self) -> str:
        return self.context.name

    def execution(self, component: str):
        found = [e for e in self.executions if self.component[e.id] == component]
        return found[-1] if found else None

    def artifacts(self, component: str, key: str, inputs: bool = False) -> list:
        execution = self.execution(component)
        if execution is None:
            return []
        kind = metadata_store_pb2.Event.INPUT if inputs else metadata_store_pb2.Event.OUTPUT
        events = self.store.get_events_by_execution_ids([execution.id])
        ids = [
            ev.artifact_id
            for ev in events
            if ev.type == kind and ev.path.steps and ev.path.steps[0].key == key
        ]
        return self.store.get_artifacts_by_id(ids) if ids else []


def anomalies_of_latest_run(mlmd_path: str) -> list[str]:
    """The anomalies ExampleValidator reported in the latest run (empty when none, or when the
    run did not get that far)."""
    from pipelines.gates import anomalies_summary

    if not os.path.exists(mlmd_path):
        return []
    run = _Run(mlmd_path)
    found = run.artifacts("ExampleValidator", "anomalies")
    lines = []
    for artifact in found:
        split_names = artifact.properties["split_names"].string_value
        lines += anomalies_summary(artifact.uri, split_names)
    return lines


def _prop(artifact, name: str):
    if name in artifact.custom_properties:
        value = artifact.custom_properties[name]
        return value.int_value if value.HasField("int_value") else value.string_value
    return None


def _slice_name(slice_key) -> str:
    parts = []
    for single in slice_key.single_slice_keys:
        kind = single.WhichOneof("kind")
        value = getattr(single, kind)
        parts.append(f"{single.column}={value.decode() if isinstance(value, bytes) else value}")
    return ", ".join(parts) or "overall"


def read_metrics(evaluation_uri: str) -> dict:
    """Metrics per slice and per model: ``{slice: {"candidate"|"baseline"|"diff": {name: v}}}``."""
    metrics: dict = {}
    for per_slice in tfma.load_metrics(evaluation_uri):
        name = _slice_name(per_slice.slice_key)
        for item in per_slice.metric_keys_and_values:
            if not item.value.HasField("double_value"):
                continue
            key = item.key
            model = "diff" if key.is_diff else (key.model_name or "candidate")
            metrics.setdefault(name, {}).setdefault(model, {})[key.name] = round(
                item.value.double_value.value, 6
            )
    return metrics


def _failure_text(failure) -> str:
    key, threshold = failure.metric_key, failure.metric_threshold
    value = failure.metric_value.double_value.value
    if key.is_diff:
        allowed = threshold.change_threshold.absolute.value
        return f"{key.name} changed by {value:+.4f} vs the baseline (allowed {allowed:+.4f})"
    bound = threshold.value_threshold
    if bound.HasField("lower_bound") and value < bound.lower_bound.value:
        return f"{key.name} {value:.4f} is below the floor {bound.lower_bound.value:g}"
    if bound.HasField("upper_bound") and value > bound.upper_bound.value:
        return f"{key.name} {value:.4f} is above the ceiling {bound.upper_bound.value:g}"
    return failure.message or f"{key.name} {value:.4f} fails its threshold"


def read_validation(evaluation_uri: str) -> tuple[bool, list[str]]:
    """The Evaluator's verdict: whether validation passed, and each failure as one sentence."""
    result = tfma.load_validation_result(evaluation_uri)
    failures = []
    for per_slice in result.metric_validations_per_slice:
        where = _slice_name(per_slice.slice_key)
        for failure in per_slice.failures:
            text = _failure_text(failure)
            failures.append(text if where == "overall" else f"{where}: {text}")
    if not result.validation_ok and not failures:
        failures.append(f"validation failed without a metric failure (see {evaluation_uri})")
    return result.validation_ok, failures


def _baseline(run: _Run) -> dict | None:
    """The baseline the Evaluator compared with, and the version it was pushed as."""
    models = run.artifacts("Evaluator", "baseline_model", inputs=True)
    if not models:
        return None
    model = models[0]
    pushed_as = None
    events = run.store.get_events_by_artifact_ids([model.id])
    pusher_runs = [ev.execution_id for ev in events if ev.type == metadata_store_pb2.Event.INPUT]
    for ev in run.store.get_events_by_execution_ids(pusher_runs) if pusher_runs else []:
        if ev.type != metadata_store_pb2.Event.OUTPUT:
            continue
        for artifact in run.store.get_artifacts_by_id([ev.artifact_id]):
            if _prop(artifact, "pushed") == 1:
                pushed_as = _prop(artifact, "pushed_version")
    return {"model_uri": model.uri, "pushed_version": pushed_as}


def _statistics(run: _Run) -> dict | None:
    """The StatisticsGen output the run trained on: where it is and its splits."""
    found = run.artifacts("StatisticsGen", "statistics")
    if not found:
        return None
    artifact = found[-1]
    splits = artifact_utils.decode_split_names(artifact.properties["split_names"].string_value)
    return {"uri": artifact.uri, "splits": splits}


def _registered_id(serving_dir: str | None, version: str) -> str | None:
    """The model id RegisterPush gave the pushed ``version`` (None if it wrote no record)."""
    if serving_dir is None:
        return None
    found = storage.read_if_exists(record_path(serving_dir, version))
    return json.loads(found).get("model_id") if found else None


def build(
    blueprint: Blueprint,
    spans: list[Span],
    mlmd_path: str,
    started: str,
    serving_dir: str | None = None,
) -> dict:
    """The record of the latest run in ``mlmd_path``, which trained ``blueprint`` on ``spans``.

    A pushed model keeps the ``model_id`` the pipeline's RegisterPush gave it in
    ``serving_dir`` (a new one when there is no such record)."""
    from pipelines import evidence
    from pipelines.gates import EVIDENCE_GATE_ID
    from pipelines.train_config import custom_config, thresholds
    from pipelines.trainer_module import model_settings

    run = _Run(mlmd_path)
    trainer = run.execution("Trainer")
    evaluation = run.artifacts("Evaluator", "evaluation")
    # The EvidenceGate's blessing is the one the Pusher obeys: the Evaluator's, plus enough
    # positives and an AUC interval clear of the floor.
    blessing = run.artifacts(EVIDENCE_GATE_ID, "blessing")
    verdict = evidence.read(blessing[0].uri) if blessing else None
    pushed = run.artifacts("Pusher", "pushed_model")
    metrics = read_metrics(evaluation[0].uri) if evaluation else {}
    ok, failures = read_validation(evaluation[0].uri) if evaluation else (False, ["no evaluation"])
    blessed = bool(blessing and _prop(blessing[0], "blessed") == 1)
    baseline = _baseline(run)
    overall = metrics.get("overall", {})
    if baseline is not None:
        baseline["metrics"] = overall.get("baseline", {})
        baseline["diff"] = overall.get("diff", {})
    version = _prop(pushed[0], "pushed_version") if pushed and _prop(pushed[0], "pushed") else None
    if blessed:
        compared = (
            "no blessed baseline yet"
            if baseline is None
            else (f"compared with baseline {baseline['pushed_version'] or baseline['model_uri']}")
        )
        gate = f"; {verdict['why']}" if verdict else ""
        why = f"passed every threshold {thresholds(blueprint)}{gate}; {compared}"
    else:
        reasons = failures + (verdict["evidence_failures"] if verdict else [])
        why = "; ".join(reasons) or "the Evaluator did not bless the model"
    return {
        # One id per pushed model: the registry's aliases and every scored decision name it,
        # so two models pushed as the same version (another serving dir) never mix.
        "model_id": (_registered_id(serving_dir, version) or str(uuid.uuid4()))
        if version
        else None,
        "name": f"{blueprint.name}-{version}" if version else None,
        "blessed": blessed,
        "pushed": version is not None,
        "pushed_to": _prop(pushed[0], "pushed_destination") if version else None,
        "version": version,
        "why": why,
        "validation_ok": ok,
        "blueprint": blueprint.summary(),
        "spans": [span.summary() for span in spans],
        "run_id": run.run_id,
        "run_started": started,
        "run_finished": now(),
        "training": {
            "start": _iso(trainer.create_time_since_epoch) if trainer else None,
            "end": _iso(trainer.last_update_time_since_epoch) if trainer else None,
            "model_uri": (run.artifacts("Trainer", "model") or [None])[0].uri if trainer else None,
        },
        "statistics": _statistics(run),
        "hyperparameters": model_settings(custom_config(blueprint)),
        "thresholds": thresholds(blueprint),
        "metrics": {name: by_model.get("candidate", {}) for name, by_model in metrics.items()},
        "baseline": baseline,
        "evidence": verdict["figures"] if verdict else None,
        # The candidate's policy evaluated off-policy against the logged one (DR, SNIPS, the
        # logged value, their intervals, rows used and left out, and the reason in words).
        "policy_value": verdict["figures"].get("policy_value") if verdict else None,
    }


def write(record: dict, pipeline_root: str, serving_dir: str) -> list[str]:
    """Writes the record under the pipeline root, and next to the pushed version if any
    (local or ``gs://``; each file replaced atomically)."""
    paths = [storage.join(pipeline_root, "records", _file_safe(record["run_id"]) + ".json")]
    if record["version"]:
        paths.append(record_path(serving_dir, record["version"]))
    for path in paths:
        storage.write_json(path, record)
    return paths


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
