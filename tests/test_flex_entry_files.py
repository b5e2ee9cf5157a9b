"""The Flex Templates' entry files, run as the launcher runs them, with workers in other processes.

The launcher runs ``python <FLEX_TEMPLATE_PYTHON_PY_FILE>`` (cloudbuild.yaml names the file of
each template) with one ``--name=value`` flag per template parameter; the package itself is
installed in the image (docker/Dockerfile), so the entry file is ``__main__`` and everything
else is imported. Here the same file runs from a directory that is not the repository, with the
package on PYTHONPATH, flags checked against ``templates/<name>/metadata.json`` (names, required
parameters, and each value against the parameter's regexes, a local path standing in for its
gs:// URL), on the DirectRunner in multi-processing mode: every DoFn is pickled, sent to another
process and run there, as on Dataflow, so one that needs a global of ``__main__`` fails.

Each run's outputs must equal those of the same job run in this process (in memory): the join's
manifest and the examples of each split, the monitor's metrics.json. One pipeline run per
fixture, on one simulated day (``python -m loopline.simulate``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from pipelines import join_decisions, monitor
from tests.conftest import EXAMPLE_BLUEPRINT
from tests.flex_templates import REPO, check_parameters, entry_file, flags, package_env
from transforms.manifest import COUNT_NAMES, MANIFEST

WORKERS = ["--runner=DirectRunner", "--direct_running_mode=multi_processing",
           "--direct_num_workers=2"]  # fmt: skip
KEY = "flex-entry-test-key"
SPLITS = ("train", "eval")
MODEL_ID = "notify-sim"
# metrics.json fields that differ between any two runs: the wall clock and where it was written.
VOLATILE = ("generated_at", "report")


def launch(template: str, parameters: dict[str, str], env: dict[str, str], cwd: Path) -> str:
    """``python <entry file> --name=value ...`` on multi-process workers; returns its stdout."""
    check_parameters(template, parameters)
    argv = [sys.executable, str(entry_file(template)), *WORKERS, *flags(parameters)]
    job = subprocess.run(
        argv, cwd=cwd, env={**package_env(env), "LOOPLINE_PII_KEY": KEY},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert job.returncode == 0, f"{template}: {job.stderr[-4000:]}"
    return job.stdout


def in_process(run, argv: list[str]):
    """The same job in this process on the in-memory DirectRunner: the reference."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOOPLINE_PII_KEY", KEY)
        return run(["--runner=DirectRunner", *argv])


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("logs")
    subprocess.run(
        [sys.executable, "-m", "loopline.simulate", "--blueprint", str(EXAMPLE_BLUEPRINT),
         "--output", str(out), "--decisions", "300", "--start", "2026-11-01", "--seed", "1"],
        cwd=REPO, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return out


@pytest.fixture(scope="module")
def outside(tmp_path_factory) -> Path:
    """The launcher's working directory: anywhere but the repository."""
    return tmp_path_factory.mktemp("cwd")


# The join --------------------------------------------------------------------------------------


def join_parameters(logs: str, blueprint: str, output: str) -> dict[str, str]:
    return {
        "decisions": f"{logs}/decisions-*.jsonl",
        "observations": f"{logs}/observations-*.jsonl",
        "blueprint": blueprint,
        "output": output,
        "allowed_lateness": "10m",
        "num_shards": "2",
    }


@pytest.fixture(scope="module")
def launched_span(logs, outside, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("launched") / "notify" / "2026-11-01"
    env = dict(os.environ)
    launch("join_decisions", join_parameters(str(logs), str(EXAMPLE_BLUEPRINT), str(output)),
           env, outside)  # fmt: skip
    return output


@pytest.fixture(scope="module")
def reference_span(logs, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("reference") / "notify" / "2026-11-01"
    in_process(
        join_decisions.run,
        flags(join_parameters(str(logs), str(EXAMPLE_BLUEPRINT), str(output))),
    )
    return output


def manifest_of(span: Path | str) -> dict:
    """The span's manifest with its file paths relative to the span."""
    with FileSystems.open(f"{span}/{MANIFEST}") as f:
        manifest = json.loads(f.read())
    prefix = f"{span}/"
    manifest["files"] = {
        kind: sorted(path.removeprefix(prefix) for path in paths)
        for kind, paths in manifest["files"].items()
    }
    # Which shard a record lands in is the runner's choice: compare the records per directory.
    per_directory: dict[str, int] = {}
    for path, n in manifest.pop("records_per_file", {}).items():
        directory = path.removeprefix(prefix).rsplit("/", 1)[0]
        per_directory[directory] = per_directory.get(directory, 0) + n
    manifest["records_per_directory"] = per_directory
    return manifest


def records(files: list[Path]) -> dict[bytes, tf.train.Example]:
    """Every example of gzip TFRecord files by decision_id (shards are filled in no fixed
    order, and an example's feature map has no fixed wire order)."""
    examples = (
        tf.train.Example.FromString(r.numpy())
        for r in tf.data.TFRecordDataset([str(f) for f in files], "GZIP")
    )
    return {e.features.feature["decision_id"].bytes_list.value[0]: e for e in examples}


def lines(files: list[Path]) -> list[str]:
    return sorted(line for f in files for line in f.read_text().splitlines())


def test_join_entry_file_is_the_file_the_join_template_runs():
    assert entry_file("join_decisions") == REPO / "pipelines" / "join_decisions.py"


@pytest.mark.slow
def test_join_entry_file_writes_a_span_that_reconciles(launched_span, logs):
    manifest = manifest_of(launched_span)
    simulated = json.loads((logs / "simulation.json").read_text())["counts"]
    assert manifest["reconciles"] is True
    assert manifest["decisions_in"] == simulated["decision_lines"]
    assert manifest["observations_in"] == simulated["observation_lines"]
    assert manifest["examples_written"] == simulated["decisions"]


@pytest.mark.slow
def test_join_entry_file_counts_what_the_in_process_join_counts(launched_span, reference_span):
    launched, reference = manifest_of(launched_span), manifest_of(reference_span)
    assert {n: launched[n] for n in COUNT_NAMES} == {n: reference[n] for n in COUNT_NAMES}
    assert launched["counters"] == reference["counters"]


@pytest.mark.slow
def test_join_entry_file_writes_the_manifest_the_in_process_join_writes(
    launched_span, reference_span
):
    assert manifest_of(launched_span) == manifest_of(reference_span)


@pytest.mark.slow
@pytest.mark.parametrize("split", SPLITS)
def test_join_entry_file_writes_the_examples_the_in_process_join_writes(
    launched_span, reference_span, split
):
    launched = records(sorted(launched_span.glob(f"examples/{split}/*.tfrecord.gz")))
    reference = records(sorted(reference_span.glob(f"examples/{split}/*.tfrecord.gz")))
    assert len(launched) == manifest_of(launched_span)[f"examples_{split}"] > 0
    assert launched == reference


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rejected", "unmatched_observations"])
def test_join_entry_file_writes_the_side_outputs_the_in_process_join_writes(
    launched_span, reference_span, kind
):
    assert lines(sorted(launched_span.glob(f"{kind}/*"))) == lines(
        sorted(reference_span.glob(f"{kind}/*"))
    )


# The monitor -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scores(logs) -> Path:
    """Score rows for every logged decision, scored with the simulator's true probability."""
    truth = {}
    for line in (logs / "truth.jsonl").read_text().splitlines():
        row = json.loads(line)
        truth[row["decision_id"]] = row["probability"]
    rows = []
    for path in sorted(logs.glob("decisions-*.jsonl")):
        for line in path.read_text().splitlines():
            event = json.loads(line)
            rows.append({
                "decision_id": event["decision_id"],
                "score": truth[event["decision_id"]],
                "model_id": MODEL_ID,
                "event_time": event["event_time"],
                "decision": event["decision"],
                "propensity": event["propensity"],
                "blueprint_version": event["blueprint_version"],
            })  # fmt: skip
    out = logs.parent / f"{logs.name}-scores"
    out.mkdir()
    (out / "scores-00000.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def monitor_parameters(logs: Path, scores: Path, output: Path, decisions: bool) -> dict[str, str]:
    parameters = {
        "scores": f"{scores}/*.jsonl",
        "observations": f"{logs}/observations-*.jsonl",
        "blueprint": str(EXAMPLE_BLUEPRINT),
        "output": str(output),
    }
    if decisions:
        parameters["decisions"] = f"{logs}/decisions-*.jsonl"
    return parameters


def metrics_of(output: Path) -> dict:
    """metrics.json without its volatile fields, every float to 12 significant digits: sums
    combined across workers in another order differ in the last bits."""
    metrics = json.loads((output / monitor.METRICS_JSON).read_text())
    return figures({name: value for name, value in metrics.items() if name not in VOLATILE})


def figures(value):
    if isinstance(value, float):
        return float(f"{value:.12g}")
    if isinstance(value, dict):
        return {name: figures(v) for name, v in value.items()}
    if isinstance(value, list):
        return [figures(v) for v in value]
    return value


@pytest.fixture(scope="module")
def launched_monitor(logs, scores, outside, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("launched-monitor")
    launch("monitor", monitor_parameters(logs, scores, output, decisions=True),
           dict(os.environ), outside)  # fmt: skip
    return output


@pytest.fixture(scope="module")
def reference_monitor(logs, scores, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("reference-monitor")
    in_process(monitor.run, flags(monitor_parameters(logs, scores, output, decisions=True)))
    return output


def test_monitor_entry_file_is_the_file_the_monitor_template_runs():
    assert entry_file("monitor") == REPO / "pipelines" / "monitor.py"


@pytest.mark.slow
def test_monitor_entry_file_monitors_every_scored_decision(launched_monitor):
    overall = metrics_of(launched_monitor)["models"][MODEL_ID]["overall"]
    assert overall["count"] == 300
    assert 0.5 < overall["auc"] < 1.0


@pytest.mark.slow
def test_monitor_entry_file_reports_the_model_figures_of_the_in_process_monitor(
    launched_monitor, reference_monitor
):
    assert metrics_of(launched_monitor)["models"] == metrics_of(reference_monitor)["models"]


@pytest.mark.slow
def test_monitor_entry_file_counts_what_the_in_process_monitor_counts(
    launched_monitor, reference_monitor
):
    launched, reference = metrics_of(launched_monitor), metrics_of(reference_monitor)
    assert launched["inputs"] == reference["inputs"]
    assert launched["label_delay"] == reference["label_delay"]


@pytest.mark.slow
def test_monitor_entry_file_writes_the_metrics_of_the_in_process_monitor(
    launched_monitor, reference_monitor
):
    assert metrics_of(launched_monitor) == metrics_of(reference_monitor)


@pytest.mark.slow
def test_monitor_entry_file_writes_the_report_and_its_plots(launched_monitor):
    plots = metrics_of(launched_monitor)["plots"]
    assert plots
    assert (launched_monitor / "report.html").is_file()
    assert all((launched_monitor / name).is_file() for name in plots.values())


@pytest.mark.slow
def test_monitor_entry_file_monitors_score_rows_without_a_decision_log(
    logs, scores, outside, reference_monitor, tmp_path
):
    launch("monitor", monitor_parameters(logs, scores, tmp_path, decisions=False),
           dict(os.environ), outside)  # fmt: skip
    assert metrics_of(tmp_path)["models"] == metrics_of(reference_monitor)["models"]


# The join with every path on gs:// (the GCS emulator) ------------------------------------------


def upload(local: Path, url: str) -> None:
    with FileSystems.create(url) as f:
        f.write(local.read_bytes())


def download(url: str, local: Path) -> Path:
    local.parent.mkdir(parents=True, exist_ok=True)
    with FileSystems.open(url, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        local.write_bytes(f.read())  # the object's own bytes, gzip and all
    return local


@pytest.fixture(scope="module")
def gcs_span(gcs_emulator, logs, outside) -> str:
    root = gcs_emulator.url("flex-entry")
    for path in sorted(logs.glob("*.jsonl")):
        upload(path, f"{root}/logs/{path.name}")
    upload(EXAMPLE_BLUEPRINT, f"{root}/blueprints/notify.yaml")
    output = f"{root}/data/notify/2026-11-01"
    parameters = join_parameters(f"{root}/logs", f"{root}/blueprints/notify.yaml", output)
    launch("join_decisions", parameters, gcs_emulator.subprocess_env(), outside)
    return output


@pytest.mark.slow
def test_join_entry_file_on_gcs_writes_the_manifest_the_in_process_join_writes(
    gcs_span, reference_span
):
    assert manifest_of(gcs_span) == manifest_of(reference_span)


@pytest.mark.slow
@pytest.mark.parametrize("split", SPLITS)
def test_join_entry_file_on_gcs_writes_the_examples_the_in_process_join_writes(
    gcs_span, reference_span, split, tmp_path
):
    shards = manifest_of(gcs_span)["files"][split]
    local = [download(f"{gcs_span}/{name}", tmp_path / name) for name in shards]
    reference = records(sorted(reference_span.glob(f"examples/{split}/*.tfrecord.gz")))
    assert records(local) == reference
