"""pipelines.join_decisions with every path on gs:// (the GCS emulator), as a launcher runs it.

The job runs in its own process with the emulator's environment, reading logs and the
blueprint from gs:// and writing the span there; the same logs joined on local disk are the
reference: same counts, same files, same examples.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tensorflow as tf
from apache_beam.io.filesystems import FileSystems

from pipelines.join_decisions import run
from tests.conftest import EXAMPLE_BLUEPRINT
from tests.join_fixtures import simulate_logs
from transforms.manifest import COUNT_NAMES, MANIFEST

START_MS = 1_793_491_200_000  # 2026-11-01T00:00:00Z
KEY = "gcs-join-test-key"
SPLITS = ("train", "eval")


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    return simulate_logs(tmp_path_factory.mktemp("logs"), seed=5, decisions=300)


def _upload(local: Path, url: str) -> None:
    with FileSystems.create(url) as f:
        f.write(local.read_bytes())


def _args(decisions: str, observations: str, blueprint: str, output: str) -> list[str]:
    return [
        "--decisions", decisions, "--observations", observations,
        "--blueprint", blueprint, "--output", output, "--num_shards", "2",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def gcs_span(gcs_emulator, logs) -> tuple[str, dict]:
    root = gcs_emulator.url("join")
    for path in logs.glob("*.jsonl"):
        _upload(path, f"{root}/logs/{path.name}")
    _upload(EXAMPLE_BLUEPRINT, f"{root}/blueprints/notify.yaml")
    output = f"{root}/data/notify/2026-11-01"
    argv = _args(
        f"{root}/logs/decisions-*.jsonl", f"{root}/logs/observations-*.jsonl",
        f"{root}/blueprints/notify.yaml", output,
    )  # fmt: skip
    env = {**gcs_emulator.subprocess_env(), "LOOPLINE_PII_KEY": KEY}
    job = subprocess.run(
        [sys.executable, "-m", "pipelines.join_decisions", *argv],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr[-3000:]
    with FileSystems.open(f"{output}/{MANIFEST}") as f:
        return output, json.loads(f.read())


@pytest.fixture(scope="module")
def local_span(logs, tmp_path_factory) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("span") / "notify" / "2026-11-01"
    argv = _args(
        str(logs / "decisions-*.jsonl"), str(logs / "observations-*.jsonl"),
        str(EXAMPLE_BLUEPRINT), str(output),
    )  # fmt: skip
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LOOPLINE_PII_KEY", KEY)
        return output, run(argv)


def _gcs_files(prefix: str) -> list[str]:
    """Object names under ``prefix``, relative to it."""
    found = FileSystems.match([f"{prefix}/**"])[0].metadata_list
    return sorted(m.path.removeprefix(f"{prefix}/") for m in found)


def _examples(files: list[str]) -> dict[bytes, tf.train.Example]:
    """The examples by decision_id (a map's wire order is not part of an example's meaning)."""
    examples = (
        tf.train.Example.FromString(r.numpy())
        for r in tf.data.TFRecordDataset(files, compression_type="GZIP")
    )
    return {e.features.feature["decision_id"].bytes_list.value[0]: e for e in examples}


def test_join_on_gcs_writes_a_manifest_that_reconciles(gcs_span, logs):
    _, manifest = gcs_span
    assert manifest["reconciles"] is True
    assert manifest["decisions_in"] == (
        manifest["examples_written"] + manifest["duplicate_decisions"]
        + manifest["rejected_decisions"]
    )  # fmt: skip
    assert manifest["observations_in"] == (
        manifest["observations_used"] + manifest["observations_out_of_window"]
        + manifest["observations_orphan"] + manifest["duplicate_observations"]
        + manifest["rejected_observations"]
    )  # fmt: skip
    simulated = json.loads((logs / "simulation.json").read_text())["counts"]
    assert manifest["decisions_in"] == simulated["decision_lines"]
    assert manifest["observations_in"] == simulated["observation_lines"]
    assert manifest["examples_written"] == simulated["decisions"]


def test_join_on_gcs_counts_what_the_join_on_local_disk_counts(gcs_span, local_span):
    (_, on_gcs), (_, on_disk) = gcs_span, local_span
    assert {name: on_gcs[name] for name in COUNT_NAMES} == {
        name: on_disk[name] for name in COUNT_NAMES
    }
    assert on_gcs["counters"] == on_disk["counters"]


def test_join_on_gcs_writes_the_files_it_writes_on_local_disk(gcs_span, local_span):
    (gcs_output, _), (local_output, _) = gcs_span, local_span
    local_files = sorted(
        str(p.relative_to(local_output)) for p in local_output.rglob("*") if p.is_file()
    )
    assert _gcs_files(gcs_output) == local_files


@pytest.mark.parametrize("split", SPLITS)
def test_join_on_gcs_examples_read_back_with_tensorflow_match_the_manifest(gcs_span, split):
    output, manifest = gcs_span
    files = tf.io.gfile.glob(f"{output}/examples/{split}/*.tfrecord.gz")
    assert len(files) == 2  # --num_shards 2
    assert len(_examples(files)) == manifest[f"examples_{split}"] > 0


@pytest.mark.parametrize("split", SPLITS)
def test_join_on_gcs_writes_the_examples_it_writes_on_local_disk(gcs_span, local_span, split):
    (gcs_output, _), (local_output, _) = gcs_span, local_span
    on_gcs = _examples(tf.io.gfile.glob(f"{gcs_output}/examples/{split}/*.tfrecord.gz"))
    on_disk = _examples([str(p) for p in local_output.glob(f"examples/{split}/*.tfrecord.gz")])
    assert on_gcs == on_disk
