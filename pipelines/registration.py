"""RegisterPush: the training pipeline's last component, which records and registers a push.

It runs after the Pusher, inside the pipeline, so a Vertex AI run (where no code of ours runs
after the pipeline) registers its pushes exactly like a local run: for a pushed model it writes
``SERVING_DIR/<version>.record.json`` (a new ``model_id``, the blueprint, the StatisticsGen
output, the hyperparameters, the Evaluator's metrics and verdict, the EvidenceGate's reasons
and figures with the candidate policy's off-policy value) and makes it the challenger
in ``SERVING_DIR/aliases.json`` (``loopline.registry.register``). A run that did not push
changes nothing. Locally, ``pipelines.train`` afterwards enriches the same record from ML
Metadata (baseline, run times), keeping its ``model_id``.

    register = RegisterPush(
        pushed_model=pusher.outputs["pushed_model"],
        evaluation=evaluator.outputs["evaluation"],
        statistics=statistics_gen.outputs["statistics"],
        blessing=evidence_gate.outputs["blessing"],
        serving_dir=serving_dir,
        context=registration_context(blueprint, spans),
    )
"""

# No `from __future__ import annotations`: the @component decorator reads real annotations.

import json
import logging
import uuid

from tfx import v1 as tfx
from tfx.types import artifact_utils

_Input = tfx.dsl.components.InputArtifact
_artifacts = tfx.types.standard_artifacts


def registration_context(blueprint, spans) -> str:
    """What RegisterPush needs to know beyond the artifacts, as its JSON parameter: the
    blueprint's summary, the spans (none when compiled for Vertex AI, where the span is a
    runtime parameter), the blessing thresholds and the Trainer's hyperparameters."""
    from pipelines.train_config import custom_config, thresholds
    from pipelines.trainer_module import model_settings

    return json.dumps(
        {
            "blueprint": blueprint.summary(),
            "spans": [span.summary() for span in spans],
            "thresholds": thresholds(blueprint),
            "hyperparameters": model_settings(custom_config(blueprint)),
        },
        sort_keys=True,
    )


def push_record(pushed_model, evaluation, statistics, context: dict, blessing=None) -> dict | None:
    """The serving record of a push (None when the Pusher did not push); with the
    EvidenceGate's ``blessing``, its reasons and figures (the off-policy value among them)."""
    from pipelines import evidence
    from pipelines.model_record import read_metrics, read_validation

    if pushed_model.get_int_custom_property("pushed") != 1:
        return None
    verdict = evidence.read(blessing.uri) if blessing is not None else None
    figures = verdict["figures"] if verdict else {}
    gate = f"; {verdict['why']}" if verdict else ""
    version = pushed_model.get_string_custom_property("pushed_version")
    ok, failures = read_validation(evaluation.uri)
    metrics = read_metrics(evaluation.uri)
    name = f"{context['blueprint']['name']}-{version}"
    return {
        "model_id": str(uuid.uuid4()),
        "name": name,
        "version": version,
        "blessed": True,  # the Pusher pushes blessed models only
        "pushed": True,
        "pushed_to": pushed_model.get_string_custom_property("pushed_destination"),
        "why": f"passed every threshold {context['thresholds']}{gate}",
        "validation_ok": ok,
        "blueprint": context["blueprint"],
        "spans": context["spans"],
        "statistics": {
            "uri": statistics.uri,
            "splits": artifact_utils.decode_split_names(statistics.split_names),
        },
        "hyperparameters": context["hyperparameters"],
        "thresholds": context["thresholds"],
        "metrics": {name: by_model.get("candidate", {}) for name, by_model in metrics.items()},
        "evidence": figures or None,
        "policy_value": figures.get("policy_value"),
    }


@tfx.dsl.components.component
def RegisterPush(
    pushed_model: _Input[_artifacts.PushedModel],
    evaluation: _Input[_artifacts.ModelEvaluation],
    statistics: _Input[_artifacts.ExampleStatistics],
    blessing: _Input[_artifacts.ModelBlessing],
    serving_dir: tfx.dsl.components.Parameter[str],
    context: tfx.dsl.components.Parameter[str],
) -> None:
    """Writes the record of a push next to it and registers it as the challenger."""
    from loopline import registry, storage

    record = push_record(pushed_model, evaluation, statistics, json.loads(context), blessing)
    if record is None:
        return
    storage.write_json(registry.record_path(serving_dir, record["version"]), record)
    try:
        registry.register(serving_dir, record)
    except registry.ChallengerInTraffic as e:
        logging.warning("RegisterPush: %s", e)
