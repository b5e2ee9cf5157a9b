"""The TFX training pipeline (pipelines/train.py) on small spans with a known ground truth.

The slow tests run the real components (ImportExampleGen ... Pusher) with LocalDagRunner, SQLite
ML Metadata and Beam's DirectRunner. One pipeline root serves two runs: the first blesses and
pushes; the second, whose newest span has shuffled train labels, is compared with the first
(the Resolver's latest blessed model) and must not be pushed. A third root gets an anomaly.
"""

import contextlib
import io
import json
import os
from pathlib import Path

import pytest
import tensorflow as tf
import yaml

from loopline.blueprint import blueprint_from_dict
from pipelines import train
from tests.conftest import EXAMPLE_BLUEPRINT
from tests.train_fixtures import auc, serialized_features, write_span

KEY = "test-key-not-a-secret"
BEAM = ["--direct_num_workers=1", "--direct_running_mode=in_memory"]
SPAN_SIZE = 1500  # decisions per span: ~1200 train / ~300 eval
# The first model may fall this far short of the true probabilities' AUC on the same eval data.
AUC_MARGIN = 0.06


@pytest.fixture(scope="module", autouse=True)
def pii_key_env():
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOOPLINE_PII_KEY", KEY)
        yield


def run_train(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = train.run([*argv, *BEAM])
    return rc, out.getvalue(), err.getvalue()


def versions(serving_dir: Path) -> list[str]:
    return (
        sorted(p.name for p in serving_dir.iterdir() if p.is_dir()) if serving_dir.exists() else []
    )


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
    }


@pytest.mark.slow
def test_first_run_blesses_and_pushes_a_model_near_the_ground_truth(first_run, blueprint):
    record = first_run["record"]
    assert record["blessed"] and record["pushed"], record["why"]
    assert first_run["versions"] == [record["version"]]
    assert record["model_id"] == f"notify-{record['version']}"
    assert record["baseline"] is None  # nothing was blessed before
    assert "blessed and pushed: notify-" in first_run["out"]
    # The true probabilities' AUC on the same eval examples bounds what a model can reach.
    truths = first_run["truths"]
    truth_auc = auc(
        [p for t in truths for p in t.eval_probabilities],
        [y for t in truths for y in t.eval_labels],
    )
    model_auc = record["metrics"]["overall"]["auc"]
    assert truth_auc - AUC_MARGIN <= model_auc <= truth_auc + 0.03, (model_auc, truth_auc)
    assert model_auc > 0.65
    assert record["metrics"]["overall"]["example_count"] == sum(t.n_eval for t in truths)
    # Sliced overall, by join_status and by the blueprint's slice_feature.
    assert {"join_status=observed", "join_status=default", "platform=ios"} <= set(record["metrics"])
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
    assert auc(scores.numpy(), truth.eval_labels) > 0.65


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
    assert record["baseline"]["metrics"]["auc"] > record["metrics"]["overall"]["auc"] + 0.1
    assert "auc" in record["why"] and "vs the baseline" in record["why"]
    assert f"not blessed: {record['why']}" in second_run["out"]


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
    assert rc == 1
    assert "lacks locale, declared by blueprint notify" in err
    assert not (tmp_path / "root").exists()


def test_feature_of_another_type_is_named(tmp_path, blueprint):
    span = tmp_path / "span"
    write_span(span, blueprint, 40, seed=9, key=KEY.encode())
    data = yaml.safe_load(EXAMPLE_BLUEPRINT.read_text())
    for feature in data["features"]:
        if feature["name"] == "tenure_days":
            feature["type"] = "float"
    with pytest.raises(train.ExampleMismatch, match="'tenure_days' holds int64_list"):
        train.check_examples_match_blueprint(
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
    assert rc == 1
    assert err.strip().count("\n") == 0 and "is incomplete: it has no manifest.json" in err


def test_blueprint_schema_requires_every_feature_with_its_type(blueprint):
    schema = {f.name: f for f in train.blueprint_schema(blueprint).feature}
    assert "email" not in schema  # dropped by the blueprint's privacy section
    assert schema["tenure_days"].type == train.schema_pb2.INT
    assert schema["tenure_days"].presence.min_fraction == 1.0
    assert [d.size for d in schema["tenure_days"].shape.dim] == [1]
    assert schema["recent_clicks"].type == train.schema_pb2.FLOAT
    assert not schema["recent_clicks"].HasField("shape")  # a list: any length
    assert schema["clicked"].type == train.schema_pb2.INT
    assert schema["model_id"].presence.min_fraction == 0.0  # only when the decision had one
    assert schema["join_status"].domain == "join_status"


def test_eval_config_gates_auc_on_the_overall_slice_with_blueprint_thresholds(blueprint):
    config = train.eval_config(blueprint)
    assert config.model_specs[0].signature_name == "serving_default"
    assert config.model_specs[0].label_key == "clicked"
    assert [list(s.feature_keys) for s in config.slicing_specs] == [
        [],
        ["join_status"],
        ["platform"],
    ]
    gated = [m for m in config.metrics_specs[0].metrics if m.per_slice_thresholds]
    assert [m.class_name for m in gated] == ["AUC"]
    threshold = gated[0].per_slice_thresholds[0].threshold
    assert threshold.value_threshold.lower_bound.value == pytest.approx(0.6)
    assert threshold.change_threshold.absolute.value == pytest.approx(-0.01)
    precision = next(m for m in config.metrics_specs[0].metrics if m.class_name == "Precision")
    assert json.loads(precision.config) == {"thresholds": [0.1]}  # the policy's threshold


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
    with pytest.raises(SystemExit) as stop:
        run_train(
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
    assert stop.value.code == 2
    assert not (tmp_path / "notify.json").exists()


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
        truth[row["decision_id"]] = row["probability"]
    probabilities, labels = [], []
    eval_files = [str(p) for p in sorted((span / "examples" / "eval").glob("*.tfrecord.gz"))]
    for raw in tf.data.TFRecordDataset(eval_files, compression_type="GZIP"):
        feature = tf.train.Example.FromString(raw.numpy()).features.feature
        probabilities.append(truth[feature["decision_id"].bytes_list.value[0].decode()])
        labels.append(feature["clicked"].int64_list.value[0])
    truth_auc, model_auc = auc(probabilities, labels), record["metrics"]["overall"]["auc"]
    assert truth_auc - SIMULATED_AUC_MARGIN <= model_auc <= truth_auc + 0.05, (model_auc, truth_auc)
    assert (
        record["spans"][0]["counts"]["examples_written"]
        == record["metrics"]["overall"]["example_count"]
        + record["spans"][0]["counts"]["examples_train"]
    )
