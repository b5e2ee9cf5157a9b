"""pipelines.registration.RegisterPush: where it sits in the training pipeline, what it skips.

What it writes on a real push is checked end to end by tests/test_train.py's slow runs (the
record next to the pushed version, its model_id in aliases.json as the challenger)."""

import json

from tfx import v1 as tfx

from pipelines import train, train_config, train_examples
from pipelines.registration import push_record, registration_context


def test_the_training_pipeline_registers_after_the_pusher(tmp_path, blueprint):
    source = train_examples.runtime_example_source("gs://b/data/notify/2026-11-01")
    schema = train_config.write_blueprint_schema(blueprint, str(tmp_path))
    pipeline = train.create_pipeline(blueprint, source, str(tmp_path), "gs://b/serving", schema)
    register = pipeline.components[-1]
    assert register.id == "RegisterPush"
    assert register.inputs["pushed_model"].producer_component_id == "Pusher"
    assert register.inputs["statistics"].producer_component_id == "StatisticsGen"
    assert register.exec_properties["serving_dir"] == "gs://b/serving"


def test_the_context_names_hyperparameters_thresholds_and_blueprint(blueprint):
    context = json.loads(registration_context(blueprint, []))
    assert context["blueprint"] == blueprint.summary()
    assert context["hyperparameters"]["hidden_units"] == blueprint.model["hidden_units"]
    assert context["thresholds"] == train_config.thresholds(blueprint)
    assert context["spans"] == []  # compiled for Vertex AI: the span is a runtime parameter


def test_a_run_that_did_not_push_has_no_push_record():
    pushed_model = tfx.types.standard_artifacts.PushedModel()
    pushed_model.set_int_custom_property("pushed", 0)
    assert push_record(pushed_model, evaluation=None, statistics=None, context={}) is None
