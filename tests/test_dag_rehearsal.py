"""The daily DAG rehearsed: ``dag.test()`` of ``loopline_notify`` on an emulated bucket.

tests/rehearsal/rehearse.py sets it up (a gcp-storage-emulator, simulated logs in the bucket,
Airflow 3 from .venv-airflow) and runs the DAG with Dataflow, Vertex AI and Cloud Run replaced
at their hooks by the jobs' own entry points: the Flex Templates' pipeline files on the
DirectRunner with worker processes, training and promotion as local processes.

These tests cover the first logical day up to its span: the sensors find the day's logs, the
observations are staged, and the join, launched exactly as the Flex launcher launches it, writes
a span with its manifest into the bucket; the day cleared and run again rewrites the same span. (The rest of the loop on ``gs://`` — training, scoring
with the registry, monitoring and promotion over three days — needs the storage layer and the
TensorFlow GCS proxy that are being built; tests/rehearsal/rehearse.py runs it as far as it
goes: ``python -m tests.rehearsal.rehearse --days 3``.)
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from tests.rehearsal import launchers, rehearse
from tests.test_dags import ensure_airflow_venv

DAY = "2026-11-01"
SPAN = f"data/notify/{DAY}"


def _run_day(emulator, workdir, airflow_venv) -> dict:
    result = rehearse.run_days(emulator, workdir, airflow_venv, [DAY])
    bucket = emulator.client().bucket(rehearse.BUCKET)
    result["manifest"] = json.loads(bucket.blob(f"{SPAN}/manifest.json").download_as_text())
    result["span"] = emulator.names(f"{SPAN}/")
    result["staged"] = emulator.names(f"work/notify/{DAY}/observations/")
    [result["tasks"]] = [d["tasks"] for d in result["days"]]
    return result


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict]:
    """Day 1, then day 1 cleared and run again (a fresh dag.test() replaces the run)."""
    workdir = tmp_path_factory.mktemp("rehearsal")
    airflow_venv = ensure_airflow_venv()
    with rehearse.gcs_emulator(rehearse.job_python()) as emulator:
        rehearse.upload_logs(emulator, workdir, rehearse.date.fromisoformat(DAY), 1, 300)
        return _run_day(emulator, workdir, airflow_venv), _run_day(emulator, workdir, airflow_venv)


@pytest.fixture(scope="module")
def day_one(runs) -> dict:
    return runs[0]


@pytest.mark.slow
def test_sensors_find_the_days_logs_and_the_join_runs(day_one):
    tasks = day_one["tasks"]
    for task_id in (
        "wait_for_decision_logs",
        "wait_for_label_window",
        "wait_for_observation_logs",
        "clear_day_outputs",
        "stage_observations",
        "join",
    ):
        assert tasks[task_id] == "success", (task_id, tasks[task_id], day_one["log"])


@pytest.mark.slow
def test_observations_of_the_label_horizon_are_staged_for_the_join(day_one):
    staged_days = {
        name.rsplit("/", 1)[-1][len("observations-") :][:8] for name in day_one["staged"]
    }
    # The day itself and the next (the 1 h window + 1 h lateness reach past midnight).
    assert staged_days == {"20261101", "20261102"}


@pytest.mark.slow
def test_join_is_launched_as_the_flex_launcher_runs_its_entry_file(day_one):
    [join] = [job for job in day_one["jobs"] if job["kind"] == "dataflow:join_decisions"]
    argv = join["argv"]
    assert argv[0].endswith("pipelines/join_decisions.py")
    assert "--direct_running_mode=multi_processing" in argv
    assert "--direct_num_workers=2" in argv
    assert f"--output=gs://{rehearse.BUCKET}/{SPAN}" in argv
    # The key comes from the (emulated) Secret Manager, as on Dataflow.
    assert f"--pii_key_secret={rehearse.PII_KEY_SECRET}" in argv
    assert join["returncode"] == 0


@pytest.mark.slow
def test_span_on_the_bucket_has_a_manifest_that_reconciles(day_one):
    manifest = day_one["manifest"]
    assert manifest["decisions_in"] > 0
    assert manifest["examples_written"] == (
        manifest["examples_observed"] + manifest["examples_default"]
    )
    assert any(name.endswith(".tfrecord.gz") for name in day_one["span"])


@pytest.mark.slow
def test_first_day_has_no_scores_so_monitoring_and_promotion_are_skipped(day_one):
    tasks = day_one["tasks"]
    for task_id in ("find_day_scores", "monitor", "find_verdict", "promote"):
        assert tasks[task_id] == "skipped", (task_id, tasks[task_id])


@pytest.mark.slow
def test_rerunning_the_day_rewrites_the_same_span_with_nothing_duplicated(runs):
    first, again = runs
    assert again["tasks"]["join"] == "success"
    assert again["span"] == first["span"]
    assert again["staged"] == first["staged"]
    counts = {k: v for k, v in first["manifest"].items() if isinstance(v, int)}
    assert counts and counts == {k: again["manifest"][k] for k in counts}


def _settings(tmp_path) -> launchers.Settings:
    return launchers.Settings(
        repo=rehearse.REPO, python="python", env={}, journal=tmp_path / "j", bucket="b"
    )


def test_flex_launch_runs_the_templates_entry_file_with_its_parameters(tmp_path):
    body = {
        "launchParameter": {
            "jobName": "loopline-join-notify-20261101",
            "containerSpecGcsPath": "gs://b/templates/v7/join_decisions.json",
            "parameters": {"output": "gs://b/data/notify/2026-11-01", "num_shards": "2"},
            "environment": {"tempLocation": "gs://b/tmp/join_decisions"},
        }
    }
    template, argv = launchers.flex_template_argv(_settings(tmp_path), body)
    assert template == "join_decisions"
    assert argv == [
        "python",
        str(rehearse.REPO / "pipelines" / "join_decisions.py"),
        "--output=gs://b/data/notify/2026-11-01",
        "--num_shards=2",
        "--runner=DirectRunner",
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=2",
        "--temp_location=gs://b/tmp/join_decisions",
    ]


def test_flex_launch_of_a_template_without_entry_file_is_refused(tmp_path):
    body = {"launchParameter": {"containerSpecGcsPath": "gs://b/templates/v7/nope.json"}}
    with pytest.raises(launchers.JobFailed, match="no entry file"):
        launchers.flex_template_argv(_settings(tmp_path), body)


def test_vertex_training_runs_the_pipeline_as_cloudbuild_compiled_it(tmp_path):
    argv = launchers.train_argv(
        _settings(tmp_path),
        "gs://b/templates/v7/train-notify.json",
        "gs://b/pipeline_root/notify",
        {"examples": "gs://b/data/notify/2026-11-01"},
    )
    assert argv == [
        "python",
        "-m",
        "pipelines.train",
        "--blueprint",
        str(rehearse.REPO / "examples" / "notify.yaml"),
        "--examples",
        "gs://b/data/notify/2026-11-01",
        "--pipeline_root",
        "gs://b/pipeline_root/notify",
        "--serving_dir",
        "gs://b/serving/notify",
    ]


def _promote_with(job_python: str, tmp_path) -> tuple[str, dict]:
    """The promote task's operator, run with the rehearsal's Cloud Run stand-in."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTHONPATH"))},
        "AIRFLOW_HOME": str(tmp_path / "airflow_home"),
        "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": json.dumps({"conn_type": "google_cloud_platform"}),
    }
    journal = tmp_path / "journal.jsonl"
    check = rehearse.HERE / "cloud_run_check.py"
    done = subprocess.run(
        [str(ensure_airflow_venv() / "bin" / "python"), str(check), str(rehearse.REPO),
         job_python, str(journal)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    [line] = [x for x in done.stdout.splitlines() if x.startswith("CLOUD_RUN_CHECK ")]
    return line.removeprefix("CLOUD_RUN_CHECK "), json.loads(journal.read_text())


@pytest.mark.slow
def test_promote_task_runs_pipelines_promote_with_the_days_args(tmp_path):
    outcome, job = _promote_with("true", tmp_path)
    assert outcome == "ok loopline-promote-v7"
    assert job["argv"] == ["-m", "pipelines.promote", "--serving_dir", "gs://b/serving/n"]


@pytest.mark.slow
def test_promote_task_fails_when_promote_exits_non_zero(tmp_path):
    outcome, job = _promote_with("false", tmp_path)
    assert outcome == "failed Some tasks failed execution"
    assert job["returncode"] == 1
