"""The TFX training pipeline (pipelines/train.py) on small spans with a known ground truth.

The slow tests run the real components (ImportExampleGen ... Pusher) with LocalDagRunner, SQLite
ML Metadata and Beam's DirectRunner. One pipeline root serves two runs: the first blesses and
pushes; the second, whose newest span has shuffled train labels, is compared with the first
(the Resolver's latest blessed model) and must not be pushed. A third root gets an anomaly, a
fourth too few positive labels to judge.

The fixture spans come from a known logging policy (tests/train_fixtures.py): a click is only
observable on a sent notification, and every example carries its decision provenance.
"""

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import tensorflow as tf
import tensorflow_model_analysis as tfma
import yaml
from tensorflow_metadata.proto.v0 import schema_pb2

from loopline import registry
from loopline.blueprint import blueprint_from_dict
from pipelines import evidence, gates, train, train_config, train_examples, trainer_module
from tests.conftest import EXAMPLE_BLUEPRINT
from tests.train_fixtures import (
    LOGGING_EPSILON,
    LOGGING_THRESHOLD,
    auc,
    logging_decision,
    serialized_features,
    write_span,
)

KEY = "test-key-not-a-secret"
BEAM = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]
SPAN_SIZE = 2500  # decisions per span: ~2000 train / ~500 eval, about 55% of them sent
# On the observable (sent) eval rows of two spans (~560 rows), the first model's AUC lies this
# close to the true probabilities' AUC on the same rows: measured 0.709 against 0.744 (with
# 1500 decisions per span, before notify logged the user's profile: 0.759 against 0.798; with
# the profile's three more inputs, 1500 gave 0.672 against 0.726 and 2000 0.693 against 0.738).
# Learning from a couple of thousand sent train rows, a network of this size gets no closer;
# the 0.02 goal of issue 14 is for the demo's size.
AUC_MARGIN = 0.05
# The served model's mean score on unsent eval rows lies this close to their mean true
# probability (~0.25); a treatment-unaware model, which learnt their label 0, lies far below.
UNSENT_CALIBRATION = 0.06


@pytest.fixture(scope="module", autouse=True)
def pii_key_env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOPLINE_PII_KEY", KEY)
        yield


def run_train(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = train.main([*argv, *BEAM])
    return rc, out.getvalue(), err.getvalue()


def versions(serving_dir: Path) -> list[str]:
    return (
        sorted(p.name for p in serving_dir.iterdir() if p.is_dir()) if serving_dir.exists() else []
    )


def gate_verdict(root: Path) -> dict:
    """The verdict of the latest EvidenceGate run under a pipeline root."""
    written = sorted(
        (root / gates.EVIDENCE_GATE_ID).glob(f"blessing/*/{evidence.EVIDENCE_FILE}"),
        key=os.path.getmtime,
    )
    return json.loads(written[-1].read_text())


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, blueprint):
    base = tmp_path_factory.mktemp("train")
    data, root, serving = base / "data", base / "pipeline_root", base / "serving"
    truths = [
        write_span(
            data / "notify" / f"2026-11-0{day + 1}",
            blueprint,
            SPAN_SIZE,
            seed=day + 1,
            day=day,
            key=KEY.encode(),
        )
        for day in range(2)
    ]
    rc, out, err = run_train(
        "--blueprint",
        str(EXAMPLE_BLUEPRINT),
        "--dataset_root",
        str(data),
        "--spans",
        "2",
        "--pipeline_root",
        str(root),
        "--serving_dir",
        str(serving),
    )
    assert rc == 0, err
    records = sorted((root / "records").glob("*.json"))
    return {
        "base": base,
        "data": data,
        "root": root,
        "serving": serving,
        "truths": truths,
        "out": out,
        "record": json.loads(records[-1].read_text()),
        "verdict": gate_verdict(root),
        "versions": versions(serving),
    }


@pytest.fixture(scope="module")
def second_run(first_run, blueprint):
    newest = write_span(
        first_run["data"] / "notify" / "2026-11-03",
        blueprint,
        SPAN_SIZE,
        seed=3,
        day=2,
        key=KEY.encode(),
        shuffle_train_labels=True,
    )
    rc, out, err = run_train(
        "--blueprint",
        str(EXAMPLE_BLUEPRINT),
        "--dataset_root",
        str(first_run["data"]),
        "--spans",
        "1",
        "--pipeline_root",
        str(first_run["root"]),
        "--serving_dir",
        str(first_run["serving"]),
    )
    assert rc == 0, err
    records = sorted((first_run["root"] / "records").glob("*.json"), key=os.path.getmtime)
    return {
        "truth": newest,
        "out": out,
        "records": records,
        "record": json.loads(records[-1].read_text()),
        "verdict": gate_verdict(first_run["root"]),
    }


@pytest.mark.slow
def test_first_run_blesses_and_pushes_a_model_near_the_ground_truth(first_run, blueprint):
    record = first_run["record"]
    assert record["blessed"] and record["pushed"], record["why"]
    assert first_run["versions"] == [record["version"]]
    assert record["name"] == f"notify-{record['version']}"
    assert registry.read_aliases(str(first_run["serving"])).challenger == record["model_id"]
    assert record["baseline"] is None  # nothing was blessed before
    assert "blessed and pushed: notify-" in first_run["out"]
    truths = first_run["truths"]
    assert record["metrics"]["overall"]["example_count"] == sum(t.n_eval for t in truths)
    # Sliced overall, by join_status, on the observable rows and by the slice_feature.
    assert {
        "join_status=observed",
        "join_status=default",
        "decision=1",
        "platform=ios",
    } <= set(record["metrics"])
    assert {"binary_crossentropy", "calibration", "precision", "recall"} <= set(
        record["metrics"]["overall"]
    )
    assert record["blueprint"] == blueprint.summary()
    assert [s["date"] for s in record["spans"]] == ["2026-11-01", "2026-11-02"]
    assert [s["counts"]["examples_written"] for s in record["spans"]] == [SPAN_SIZE, SPAN_SIZE]
    assert record["training"]["start"] <= record["training"]["end"]
    # The record sits next to the pushed version.
    pushed_record = first_run["serving"] / f"{record['version']}.record.json"
    assert json.loads(pushed_record.read_text()) == record


@pytest.mark.slow
def test_model_auc_on_observable_rows_is_near_the_ground_truth_on_the_same_rows(first_run):
    """Learnt from the sent decisions only, IPS-weighted: on the sent eval rows the model ranks
    nearly as well as the true probabilities do on those same rows."""
    truths = first_run["truths"]
    observable = [(t, i) for t in truths for i in t.eval_observable]
    truth_auc = auc(
        [t.eval_probabilities[i] for t, i in observable], [t.eval_labels[i] for t, i in observable]
    )
    slice_metrics = first_run["record"]["metrics"]["decision=1"]
    assert slice_metrics["example_count"] == len(observable)
    assert abs(slice_metrics["auc"] - truth_auc) <= AUC_MARGIN, (slice_metrics["auc"], truth_auc)


@pytest.mark.slow
def test_gate_judged_the_observable_rows_with_an_interval_and_enough_positives(first_run):
    truths = first_run["truths"]
    positives = sum(t.eval_labels[i] for t in truths for i in t.eval_observable)
    verdict = first_run["verdict"]
    assert verdict["blessed"] and verdict["why"].startswith(
        f"enough evidence: {positives} positives"
    )
    figures = verdict["figures"]["slices"]["decision=1"]
    assert figures["positives"] == positives
    low, high = figures["auc_interval"]
    assert low < figures["auc"] < high and low > 0.6  # the notify blueprint's floor


@pytest.mark.slow
def test_unsent_decisions_are_scored_as_if_sent(first_run, blueprint):
    """A treatment-unaware model learns "what was not sent was not clicked" and scores unsent
    rows near zero; this one scores them near their true probability of a click if sent."""
    version_dir = first_run["serving"] / first_run["record"]["version"]
    signature = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    unsent = [(t, i) for t in first_run["truths"] for i, d in enumerate(t.eval_decisions) if d == 0]
    examples = serialized_features([t.eval_features[i] for t, i in unsent], blueprint, KEY.encode())
    scores = signature(examples=tf.constant(examples))["score"].numpy()
    true_mean = sum(t.eval_probabilities[i] for t, i in unsent) / len(unsent)
    assert all(t.eval_labels[i] == 0 for t, i in unsent)  # what the unaware model would learn
    assert abs(scores.mean() - true_mean) <= UNSENT_CALIBRATION, (scores.mean(), true_mean)


@pytest.mark.slow
def test_pushed_model_scores_raw_examples_through_serving_default(first_run, blueprint):
    version_dir = first_run["serving"] / first_run["record"]["version"]
    signature = tf.saved_model.load(str(version_dir)).signatures["serving_default"]
    # One input, serialized raw features: no label, no join columns.
    _, inputs = signature.structured_input_signature
    assert list(inputs) == ["examples"]
    assert inputs["examples"].dtype == tf.string
    truth = first_run["truths"][1]
    examples = serialized_features(list(truth.eval_features), blueprint, KEY.encode())
    scores = signature(examples=tf.constant(examples))["score"]
    assert scores.dtype == tf.float32 and scores.shape == (len(examples),)
    assert 0.0 <= float(tf.reduce_min(scores)) <= float(tf.reduce_max(scores)) <= 1.0
    sent = truth.eval_observable
    assert auc(scores.numpy()[list(sent)], [truth.eval_labels[i] for i in sent]) > 0.65


@pytest.mark.slow
def test_candidate_trained_on_shuffled_labels_is_not_blessed_nor_pushed(first_run, second_run):
    record = second_run["record"]
    assert not record["blessed"] and not record["pushed"]
    assert record["version"] is None and record["model_id"] is None
    assert versions(first_run["serving"]) == first_run["versions"]  # nothing new was pushed
    assert len(second_run["records"]) == 2  # a record for every run, blessed or not
    assert [s["date"] for s in record["spans"]] == ["2026-11-03"]
    # Compared with the first run's blessed model, and the record says why it lost.
    assert record["baseline"]["pushed_version"] == first_run["record"]["version"]
    assert "auc" in record["why"] and "vs the baseline" in record["why"]
    assert f"not blessed: {record['why']}" in second_run["out"]
    assert not second_run["verdict"]["blessed"]
    assert "the Evaluator's thresholds were not met" in second_run["verdict"]["why"]


@pytest.mark.slow
def test_candidate_judged_on_too_few_positives_is_not_blessed(tmp_path, blueprint):
    span = tmp_path / "span"
    truth = write_span(span, blueprint, 400, seed=11, key=KEY.encode())
    positives = sum(truth.eval_labels[i] for i in truth.eval_observable)
    assert positives < 50  # the default min_positives
    root, serving = tmp_path / "pipeline_root", tmp_path / "serving"
    rc, out, err = run_train(
        "--blueprint",
        str(EXAMPLE_BLUEPRINT),
        "--examples",
        str(span),
        "--pipeline_root",
        str(root),
        "--serving_dir",
        str(serving),
    )
    assert rc == 0, err
    verdict = gate_verdict(root)
    assert not verdict["blessed"]
    assert verdict["why"].startswith(f"not enough evidence: {positives} positives")
    assert versions(serving) == []


@pytest.mark.slow
def test_missing_feature_stops_the_run_at_example_validator(tmp_path, blueprint):
    span = tmp_path / "span"
    write_span(span, blueprint, 600, seed=5, key=KEY.encode(), drop_feature_every=("country", 5))
    root, serving = tmp_path / "pipeline_root", tmp_path / "serving"
    rc, _, err = run_train(
        "--blueprint",
        str(EXAMPLE_BLUEPRINT),
        "--examples",
        str(span),
        "--pipeline_root",
        str(root),
        "--serving_dir",
        str(serving),
    )
    assert rc == 1
    assert "stopped at ExampleValidator" in err and "feature 'country'" in err
    assert not (root / "Transform").exists() and not (root / "Trainer").exists()
    assert versions(serving) == []


# ----------------------------------------------------------------------------- fast checks


def test_examples_of_another_blueprint_fail_before_any_component(tmp_path, blueprint):
    span = tmp_path / "span"
    write_span(span, blueprint, 40, seed=9, key=KEY.encode())
    data = yaml.safe_load(EXAMPLE_BLUEPRINT.read_text())
    data["features"].append({"name": "locale", "type": "string"})
    other = tmp_path / "notify-v2.yaml"
    other.write_text(yaml.safe_dump(data))
    rc, _, err = run_train(
        "--blueprint",
        str(other),
        "--examples",
        str(span),
        "--pipeline_root",
        str(tmp_path / "root"),
        "--serving_dir",
        str(tmp_path / "serving"),
    )
    assert rc == 2
    assert err.startswith("train: error: ") and "lacks locale, declared by blueprint notify" in err
    assert not (tmp_path / "root").exists()


def test_feature_of_another_type_is_named(tmp_path, blueprint):
    span = tmp_path / "span"
    write_span(span, blueprint, 40, seed=9, key=KEY.encode())
    data = yaml.safe_load(EXAMPLE_BLUEPRINT.read_text())
    for feature in data["features"]:
        if feature["name"] == "tenure_days":
            feature["type"] = "float"
    with pytest.raises(train_examples.ExampleMismatch, match="'tenure_days' holds int64_list"):
        train_examples.check_examples_match_blueprint(
            [train.read_span(span)], blueprint_from_dict(data, source="changed.yaml")
        )


def test_incomplete_span_is_a_one_line_error(tmp_path, blueprint):
    span = tmp_path / "span"
    write_span(span, blueprint, 40, seed=9, key=KEY.encode())
    (span / "manifest.json").unlink()
    rc, _, err = run_train(
        "--blueprint",
        str(EXAMPLE_BLUEPRINT),
        "--examples",
        str(span),
        "--pipeline_root",
        str(tmp_path / "root"),
        "--serving_dir",
        str(tmp_path / "serving"),
    )
    assert rc == 2
    assert err.strip().count("\n") == 0 and "is incomplete: it has no manifest.json" in err


def test_blueprint_schema_requires_every_feature_with_its_type(blueprint):
    schema = {f.name: f for f in train_config.blueprint_schema(blueprint).feature}
    assert "email" not in schema  # dropped by the blueprint's privacy section
    assert schema["tenure_days"].type == schema_pb2.INT
    assert schema["tenure_days"].presence.min_fraction == 1.0
    assert [d.size for d in schema["tenure_days"].shape.dim] == [1]
    assert schema["recent_clicks"].type == schema_pb2.FLOAT
    assert not schema["recent_clicks"].HasField("shape")  # a list: any length
    assert schema["clicked"].type == schema_pb2.INT
    assert schema["model_id"].presence.min_fraction == 0.0  # only when the decision had one
    assert schema["join_status"].domain == "join_status"


def test_eval_config_gates_auc_on_the_observable_rows_with_blueprint_thresholds(blueprint):
    config = train_config.eval_config(blueprint)
    assert config.model_specs[0].signature_name == "serving_default"
    assert config.model_specs[0].label_key == "clicked"
    assert [(list(s.feature_keys), dict(s.feature_values)) for s in config.slicing_specs] == [
        ([], {}),
        (["join_status"], {}),
        ([], {"decision": "1"}),
        (["platform"], {}),
    ]
    gated = [m for m in config.metrics_specs[0].metrics if m.per_slice_thresholds]
    assert [m.class_name for m in gated] == ["AUC"]
    (per_slice,) = gated[0].per_slice_thresholds
    assert [dict(s.feature_values) for s in per_slice.slicing_specs] == [{"decision": "1"}]
    threshold = per_slice.threshold
    assert threshold.value_threshold.lower_bound.value == pytest.approx(0.6)
    assert threshold.change_threshold.absolute.value == pytest.approx(-0.01)
    precision = next(m for m in config.metrics_specs[0].metrics if m.class_name == "Precision")
    assert json.loads(precision.config) == {"thresholds": [0.1]}  # the policy's threshold


def test_without_observable_when_the_gate_judges_every_row(blueprint):
    data = yaml.safe_load(EXAMPLE_BLUEPRINT.read_text())
    del data["label"]["observable_when"]
    config = train_config.eval_config(blueprint_from_dict(data))
    assert [list(s.feature_keys) for s in config.slicing_specs] == [
        [],
        ["join_status"],
        ["platform"],
    ]
    gated = next(m for m in config.metrics_specs[0].metrics if m.per_slice_thresholds)
    assert list(gated.per_slice_thresholds[0].slicing_specs) == [tfma.SlicingSpec()]


def test_several_observable_values_gate_each_combination_as_its_own_slice(blueprint):
    data = yaml.safe_load(EXAMPLE_BLUEPRINT.read_text())
    data["label"]["observable_when"] = {"decision": [1, 2], "arm": ["production"]}
    names = [
        train_config.slice_name(s) for s in train_config.gated_slices(blueprint_from_dict(data))
    ]
    assert names == ["arm=production, decision=1", "arm=production, decision=2"]


def test_thresholds_ask_for_50_positives_at_95_percent_confidence_by_default(blueprint):
    limits = train_config.thresholds(blueprint)
    assert limits == {
        "min_auc": 0.6,
        "max_auc_regression": 0.01,
        "min_positives": 50,
        "confidence": 0.95,
        "max_policy_value_loss": 0.6,  # examples/notify.yaml's
    }
    settings = json.loads(train_config.gate_settings(blueprint))
    assert settings == {
        "gated": ["decision=1"],
        "thresholds": limits,
        "binary": True,
        "policy_check": train_config.policy_check_settings(blueprint),
    }


@pytest.mark.parametrize(
    "field, value", [("min_positives", -1), ("min_positives", 2.5), ("confidence", 1.0)]
)
def test_bad_evidence_threshold_names_the_field(field, value):
    data = yaml.safe_load(EXAMPLE_BLUEPRINT.read_text())
    data["model"]["thresholds"][field] = value
    with pytest.raises(train.BlueprintError, match=rf"bp.yaml: model.thresholds.{field}: must"):
        train_config.thresholds(blueprint_from_dict(data, source="bp.yaml"))


def test_spans_without_provenance_are_judged_on_every_row(tmp_path, blueprint):
    """Written before the join recorded the decision, every row of such a span is observable
    (and weighs 1): the gate judges all rows rather than a slice the data cannot have."""
    write_span(tmp_path / "old", blueprint, 40, seed=9, key=KEY.encode(), provenance=False)
    write_span(tmp_path / "new", blueprint, 40, seed=9, key=KEY.encode())
    old, new = train.read_span(tmp_path / "old"), train.read_span(tmp_path / "new")
    assert train_examples.provenance_recorded([new], blueprint)
    assert not train_examples.provenance_recorded([new, old], blueprint)
    settings = json.loads(train_config.gate_settings(blueprint, recorded=False))
    assert settings["gated"] == ["overall"]
    slices = train_config.eval_config(blueprint, recorded=False).slicing_specs
    assert all(not s.feature_values for s in slices)


def test_pusher_and_resolver_read_the_evidence_gates_blessing(tmp_path, blueprint):
    """A model the evidence refused is neither pushed nor, in later runs, the baseline, even
    when the Evaluator's point-estimate thresholds blessed it."""
    from tfx.dsl.compiler import compiler

    span = tmp_path / "span"
    write_span(span, blueprint, 40, seed=9, key=KEY.encode())
    source = train_examples.example_source([train.read_span(span)], str(tmp_path / "root"))
    pipeline = train.create_pipeline(
        blueprint, source, str(tmp_path / "root"), str(tmp_path / "serving"), "schema.pbtxt"
    )
    ir = compiler.Compiler().compile(pipeline)
    nodes = {n.pipeline_node.node_info.id: n.pipeline_node for n in ir.nodes}
    pusher_input = nodes["Pusher"].inputs.inputs["model_blessing"].channels[0]
    assert pusher_input.producer_node_query.id == gates.EVIDENCE_GATE_ID
    # The Resolver's query for blessings: the EvidenceGate's output only.
    resolver = nodes["latest_blessed_model_resolver"].inputs.inputs
    (blessings,) = [
        spec.channels[0]
        for spec in resolver.values()
        if spec.channels and spec.channels[0].artifact_query.type.name == "ModelBlessing"
    ]
    contexts = [q.name.field_value.string_value for q in blessings.context_queries]
    assert f"{train.pipeline_name(blueprint)}.{gates.EVIDENCE_GATE_ID}" in contexts
    assert blessings.output_key == "blessing"
    # The Evaluator's verdict, and the candidate and the eval examples for the off-policy check.
    assert set(nodes["EvidenceGate"].upstream_nodes) == {"Evaluator", "Trainer", "ImportExampleGen"}


def test_vertex_spec_compiles_from_options(tmp_path):
    """Compiling reads no span: the span is the spec's runtime parameter ``examples``, whose
    default is the gs:// path given; gs:// paths reach the spec as they are."""
    examples = "gs://bucket/data/notify/2026-11-01"  # never read while compiling
    spec = tmp_path / "vertex" / "notify.json"
    spec.parent.mkdir()
    rc, out, err = run_train(
        "--blueprint",
        str(EXAMPLE_BLUEPRINT),
        "--examples",
        examples,
        "--pipeline_root",
        str(tmp_path / "root"),
        "--serving_dir",
        "gs://bucket/serving/notify",
        "--compile_vertex",
        str(spec),
        "--image",
        "europe-west4-docker.pkg.dev/p/loopline/loopline:v7",
        "--runner=DataflowRunner",
        "--project=p",
        "--region=r",
    )
    assert rc == 0, err
    compiled = json.loads(spec.read_text())
    pipeline_spec = compiled.get("pipelineSpec", compiled)
    tasks = pipeline_spec["root"]["dag"]["tasks"]
    assert {
        "ImportExampleGen",
        "ExampleValidator",
        "ValidationGate",
        "Transform",
        "Trainer",
        "Evaluator",
        "Pusher",
    } <= set(tasks)
    # The runtime parameter the DAG sets (parameter_values={"examples": <span>}), read by
    # ImportExampleGen as its input_base, with the given default.
    assert pipeline_spec["root"]["inputDefinitions"]["parameters"] == {
        "examples": {"type": "STRING"}
    }
    input_base = tasks["ImportExampleGen"]["inputs"]["parameters"]["input_base"]
    assert input_base == {"componentInputParameter": "examples"}
    default = compiled["runtimeConfig"]["parameters"]["examples"]
    assert default == {"stringValue": examples}
    text = json.dumps(compiled)
    assert "--runner=DataflowRunner" in text
    assert "gs://bucket/serving/notify" in text and "gs:/bucket" not in text  # not absolutised
    images = {
        e["container"]["image"]
        for e in pipeline_spec["deploymentSpec"]["executors"].values()
        if "container" in e  # the Resolver's two steps run no container
    }
    assert images == {"europe-west4-docker.pkg.dev/p/loopline/loopline:v7"}
    schemas = list((tmp_path / "root" / "schemas").glob("notify-*/schema.pbtxt"))
    assert len(schemas) == 1 and str(schemas[0]) in text  # what ImportSchemaGen imports
    assert "a Vertex AI job cannot read it" in err  # the local pipeline root is pointed out
    assert not Path(tmp_path / "root" / "metadata.sqlite").exists()  # compiled, not run
    assert not (tmp_path / "root" / "staged_spans").exists()


def test_vertex_spec_refuses_dataset_root(tmp_path):
    rc, _, err = run_train(
        "--blueprint",
        str(EXAMPLE_BLUEPRINT),
        "--dataset_root",
        str(tmp_path),
        "--pipeline_root",
        str(tmp_path / "root"),
        "--serving_dir",
        "gs://bucket/serving/notify",
        "--compile_vertex",
        str(tmp_path / "notify.json"),
    )
    assert rc == 2
    assert err.startswith("train: error: --compile_vertex takes the span as the runtime")
    assert not (tmp_path / "notify.json").exists()


# ------------------------------------------------------------------------ bad command lines


def train_argv(tmp_path: Path, **flags: str) -> list[str]:
    """A command line for a span under tmp_path, with ``flags`` replacing or adding flags
    (a value None leaves the flag out)."""
    given = {
        "blueprint": str(EXAMPLE_BLUEPRINT),
        "examples": str(tmp_path / "span"),
        "pipeline_root": str(tmp_path / "root"),
        "serving_dir": str(tmp_path / "serving"),
        **flags,
    }
    return [part for k, v in given.items() if v is not None for part in (f"--{k}", v)]


@pytest.fixture
def span(tmp_path, blueprint) -> Path:
    write_span(tmp_path / "span", blueprint, 40, seed=9, key=KEY.encode())
    return tmp_path / "span"


def assert_usage_error(tmp_path: Path, argv: list[str], message: str) -> None:
    """Exit 2 with one line ``train: error: ...`` saying ``message``; nothing written."""
    rc, out, err = run_train(*argv)
    assert rc == 2, err
    assert err.startswith("train: error: ") and err.count("\n") == 1, err
    assert message in err
    assert out == "" and not (tmp_path / "root").exists()


def test_a_misspelt_flag_is_refused_not_handed_to_beam(tmp_path, span):
    argv = [*train_argv(tmp_path), "--pipline_root", str(tmp_path / "other")]
    assert_usage_error(tmp_path, argv, "unknown argument '--pipline_root'")


def test_an_abbreviated_flag_is_refused(tmp_path, span):
    argv = [*train_argv(tmp_path), "--metadata", str(tmp_path / "metadata.sqlite")]
    assert_usage_error(tmp_path, argv, "unknown argument '--metadata'")


def test_a_misspelt_beam_option_is_refused(tmp_path, span):
    argv = [*train_argv(tmp_path), "--runer=DataflowRunner"]
    assert_usage_error(tmp_path, argv, "unknown argument '--runer=DataflowRunner'")


def test_a_missing_blueprint_file_is_named(tmp_path, span):
    missing = str(tmp_path / "nowhere.yaml")
    argv = train_argv(tmp_path, blueprint=missing)
    assert_usage_error(tmp_path, argv, f"{missing}")


def test_a_missing_required_flag_is_named(tmp_path, span):
    argv = train_argv(tmp_path, pipeline_root=None)
    assert_usage_error(tmp_path, argv, "the following arguments are required: --pipeline_root")


def test_examples_and_dataset_root_are_exclusive(tmp_path, span):
    argv = train_argv(tmp_path, dataset_root=str(tmp_path))
    assert_usage_error(tmp_path, argv, "not allowed with argument")


def test_a_span_that_does_not_exist_is_named(tmp_path):
    argv = train_argv(tmp_path)
    assert_usage_error(tmp_path, argv, f"span {tmp_path / 'span'} does not exist")


def test_no_spans_under_the_dataset_root_is_named(tmp_path):
    argv = train_argv(tmp_path, examples=None, dataset_root=str(tmp_path / "data"))
    assert_usage_error(tmp_path, argv, "no spans for 'notify'")


def test_a_missing_curated_schema_is_named(tmp_path, span):
    argv = train_argv(tmp_path, schema=str(tmp_path / "schema.pbtxt"))
    assert_usage_error(tmp_path, argv, f"--schema {tmp_path / 'schema.pbtxt'} does not exist")


def test_a_bad_number_of_spans_is_named(tmp_path, span):
    argv = train_argv(tmp_path, examples=None, dataset_root=str(tmp_path), spans="two")
    assert_usage_error(tmp_path, argv, "argument --spans: invalid int value: 'two'")


# The simulator's eval split is small and its clicks rare (~10%): a wider margin than above.
SIMULATED_AUC_MARGIN = 0.10


@pytest.mark.slow
def test_simulator_output_joined_by_the_join_pipeline_trains_and_pushes(tmp_path, blueprint):
    """The README's loop on real upstream output: simulate -> join_decisions -> train."""
    from loopline import simulate
    from pipelines import join_decisions

    logs, span = tmp_path / "logs", tmp_path / "data" / "notify" / "2026-11-01"
    with contextlib.redirect_stdout(io.StringIO()):
        assert (
            simulate.main(
                [
                    "--blueprint",
                    str(EXAMPLE_BLUEPRINT),
                    "--output",
                    str(logs),
                    "--decisions",
                    "3000",
                    "--days",
                    "1",
                    "--start",
                    "2026-11-01",
                    "--seed",
                    "3",
                ]
            )
            == 0
        )
        join_decisions.run(
            [
                "--decisions",
                str(logs / "decisions-*.jsonl"),
                "--observations",
                str(logs / "observations-*.jsonl"),
                "--blueprint",
                str(EXAMPLE_BLUEPRINT),
                "--output",
                str(span),
            ]
        )
    serving = tmp_path / "serving"
    rc, out, err = run_train(
        "--blueprint",
        str(EXAMPLE_BLUEPRINT),
        "--dataset_root",
        str(tmp_path / "data"),
        "--pipeline_root",
        str(tmp_path / "pipeline_root"),
        "--serving_dir",
        str(serving),
    )
    assert rc == 0, err
    record = json.loads(next((tmp_path / "pipeline_root" / "records").glob("*.json")).read_text())
    assert record["blessed"] and versions(serving) == [record["version"]], record["why"]
    # Ground truth: the simulator's probability of a click within the label window.
    truth = {}
    for line in (logs / "truth.jsonl").read_text().splitlines():
        row = json.loads(line)
        truth[row["decision_id"]] = row
    # Once the join writes each example's decision (issue 14), the model is judged on the
    # observable rows (sent: decision=1); before, every row is observable.
    metrics = record["metrics"]
    observable_only = "decision=1" in metrics
    probabilities, labels = [], []
    eval_files = [str(p) for p in sorted((span / "examples" / "eval").glob("*.tfrecord.gz"))]
    for raw in tf.data.TFRecordDataset(eval_files, compression_type="GZIP"):
        feature = tf.train.Example.FromString(raw.numpy()).features.feature
        row = truth[feature["decision_id"].bytes_list.value[0].decode()]
        if observable_only and row["decision"] != 1:
            continue
        probabilities.append(row["probability"])
        labels.append(feature["clicked"].int64_list.value[0])
    model_auc = metrics["decision=1" if observable_only else "overall"]["auc"]
    truth_auc = auc(probabilities, labels)
    assert truth_auc - SIMULATED_AUC_MARGIN <= model_auc <= truth_auc + 0.05, (model_auc, truth_auc)
    assert (
        record["spans"][0]["counts"]["examples_written"]
        == record["metrics"]["overall"]["example_count"]
        + record["spans"][0]["counts"]["examples_train"]
    )


# ----------------------------------------------------------------- treatment-aware training


def test_fixture_logging_policy_logs_the_probability_of_its_decision():
    """The fixture's propensities are the logging policy's: the share of sends among rows with
    the same greedy decision matches the logged propensity of a send."""
    import random

    rng = random.Random(0)
    for p, greedy_send in ((0.9, True), (0.1, False)):
        draws = [logging_decision(p, rng) for _ in range(4000)]
        sent = [propensity for decision, propensity in draws if decision == 1]
        expected = 1 - LOGGING_EPSILON / 2 if greedy_send else LOGGING_EPSILON / 2
        assert set(sent) == {expected}
        assert len(sent) / len(draws) == pytest.approx(expected, abs=0.03)
    assert LOGGING_THRESHOLD == 0.3


def test_blueprint_schema_types_the_provenance_columns_and_leaves_them_optional(blueprint):
    schema = {f.name: f for f in train_config.blueprint_schema(blueprint).feature}
    types = {name: schema[name].type for name in train_config.PROVENANCE_COLUMNS}
    assert types == {
        "decision": schema_pb2.INT,
        "propensity": schema_pb2.FLOAT,
        "arm": schema_pb2.BYTES,
        "model_id": schema_pb2.BYTES,
    }
    # Spans written before the join recorded provenance lack them.
    assert all(schema[name].presence.min_fraction == 0.0 for name in types)


def test_provenance_columns_are_not_model_inputs(blueprint):
    inputs = set(trainer_module.transformed_features(train_config.custom_config(blueprint)))
    assert inputs and not inputs & {*train_config.PROVENANCE_COLUMNS, trainer_module.SAMPLE_WEIGHT}


def test_custom_config_carries_the_labels_observability_and_ips_clip(blueprint):
    label = train_config.custom_config(blueprint)["label"]
    assert label == {
        "name": "clicked",
        "type": "int",
        "observable_when": {"decision": [1]},
        "ips_clip": 10.0,
    }
    json.dumps(label)  # TFX passes custom_config as JSON


def _provenance(decisions, propensities, present):
    """Sparse provenance columns as Transform parses optional scalars: rows not in ``present``
    lack them."""
    rows = [[i, 0] for i in present]
    shape = [len(decisions), 1]
    return {
        "decision": tf.SparseTensor(
            rows, tf.constant([decisions[i] for i in present], tf.int64), shape
        ),
        "propensity": tf.SparseTensor(
            rows, tf.constant([propensities[i] for i in present], tf.float32), shape
        ),
    }


def test_sample_weight_is_zero_where_the_label_is_not_observable():
    inputs = _provenance([1, 0, -1], [0.5, 0.5, 0.5], present=[0, 1, 2])
    config = {"observable_when": {"decision": [1]}, "ips_clip": 10.0}
    weight = trainer_module.sample_weight(inputs, config, tf.zeros([3, 1]))
    assert weight.numpy().ravel().tolist() == [2.0, 0.0, 0.0]


def test_sample_weight_is_the_inverse_propensity_capped_at_the_clip():
    inputs = _provenance([1, 1, 1, 1], [0.85, 0.15, 0.01, -1.0], present=[0, 1, 2, 3])
    config = {"observable_when": {"decision": [1]}, "ips_clip": 10.0}
    weight = trainer_module.sample_weight(inputs, config, tf.zeros([4, 1])).numpy().ravel()
    # -1.0: the decision carried no propensity, the row weighs 1.
    assert weight == pytest.approx([1 / 0.85, 1 / 0.15, 10.0, 1.0])


def test_row_without_provenance_columns_weighs_one():
    """A span written before the join recorded the decision trains as it did before, even
    where the decision carried a propensity."""
    decision = tf.SparseTensor([[0, 0]], tf.constant([1], tf.int64), [3, 1])
    propensity = tf.SparseTensor([[0, 0], [1, 0]], tf.constant([0.5, 0.025]), [3, 1])
    config = {"observable_when": {"decision": [1]}, "ips_clip": 10.0}
    weight = trainer_module.sample_weight(
        {"decision": decision, "propensity": propensity}, config, tf.zeros([3, 1])
    )
    assert weight.numpy().ravel().tolist() == [2.0, 1.0, 1.0]


def test_sample_weight_matches_string_columns_and_every_condition():
    arm = tf.SparseTensor([[0, 0], [1, 0], [2, 0]], tf.constant([b"production", b"", b"x"]), [3, 1])
    inputs = {**_provenance([1, 1, 1], [1.0, 1.0, 1.0], present=[0, 1, 2]), "arm": arm}
    config = {"observable_when": {"decision": [1], "arm": ["production", ""]}, "ips_clip": 10.0}
    weight = trainer_module.sample_weight(inputs, config, tf.zeros([3, 1]))
    assert weight.numpy().ravel().tolist() == [1.0, 1.0, 0.0]


def test_weight_reaches_keras_as_sample_weight_not_as_a_model_input():
    features = {"tenure_days": tf.zeros([2, 1]), trainer_module.SAMPLE_WEIGHT: tf.ones([2, 1])}
    inputs, label, weight = trainer_module.with_sample_weight(features, tf.zeros([2, 1]))
    assert list(inputs) == ["tenure_days"]
    assert weight.shape == (2,)


def _run_watching_workers(argv: list[str], env: dict) -> tuple[int, str, set[str]]:
    """Runs ``argv`` to completion, noting the Beam SDK worker processes it starts below itself
    (the FnApiRunner's multi_processing mode runs each as ``-m ...sdk_worker_main``)."""
    import subprocess
    import time

    import psutil

    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    parent, workers = psutil.Process(proc.pid), set()
    while proc.poll() is None:
        try:
            for child in parent.children(recursive=True):
                if "apache_beam.runners.worker.sdk_worker_main" in " ".join(child.cmdline()):
                    workers.add(f"{child.pid}:{child.create_time()}")
        except psutil.Error:  # a child that ended while being looked at
            pass
        time.sleep(0.2)
    return proc.returncode, proc.stdout.read().decode(errors="replace"), workers


@pytest.mark.slow
def test_tfx_beam_steps_run_with_workers_in_separate_processes(tmp_path, blueprint):
    """``python -m pipelines.train`` with the DirectRunner's worker processes (as Dataflow runs
    TFX's Beam steps on workers): ExampleGen, StatisticsGen, Transform (our preprocessing_fn)
    and the Evaluator run in SDK worker processes, and the run judges the span as in-process."""
    import sys

    span = tmp_path / "span"
    truth = write_span(span, blueprint, 400, seed=11, key=KEY.encode())
    positives = sum(truth.eval_labels[i] for i in truth.eval_observable)
    root, serving = tmp_path / "pipeline_root", tmp_path / "serving"
    argv = [
        sys.executable, "-m", "pipelines.train", "--blueprint", str(EXAMPLE_BLUEPRINT),
        "--examples", str(span), "--pipeline_root", str(root), "--serving_dir", str(serving),
        "--direct_running_mode=multi_processing", "--direct_num_workers=2",
    ]  # fmt: skip
    rc, output, workers = _run_watching_workers(argv, {**os.environ, "LOOPLINE_PII_KEY": KEY})
    assert rc == 0, output[-3000:]
    assert len(workers) >= 2, "no Beam step ran in SDK worker processes"
    verdict = gate_verdict(root)
    assert verdict["why"].startswith(f"not enough evidence: {positives} positives")
    [statistics] = root.glob("StatisticsGen/statistics/*/Split-train/FeatureStats.pb")
    assert statistics.stat().st_size > 0
    assert list(root.glob("Transform/transformed_examples/*/Split-train/*.gz"))
