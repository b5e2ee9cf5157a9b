"""The daily DAG rehearsed: ``dag.test()`` of ``loopline_notify`` on an emulated bucket.

tests/rehearsal/rehearse.py sets it up (a gcp-storage-emulator, simulated logs in the bucket,
Airflow 3 from .venv-airflow) and runs the DAG with Dataflow, Vertex AI and Cloud Run replaced
at their hooks by the jobs' own entry points: the Flex Templates' pipeline files on the
DirectRunner with worker processes, training and promotion as local processes.

These tests cover the first logical day up to its span: the sensors find the day's logs, the
observations are staged, and the join, launched exactly as the Flex launcher launches it, writes
a span with its manifest into the bucket. (The rest of the loop on ``gs://`` — training, scoring
with the registry, monitoring and promotion over three days — needs the storage layer and the
TensorFlow GCS proxy that are being built; tests/rehearsal/rehearse.py runs it as far as it
goes: ``python -m tests.rehearsal.rehearse --days 3``.)
"""

from __future__ import annotations

import json

import pytest

from tests.rehearsal import rehearse
from tests.test_dags import ensure_airflow_venv

DAY = "2026-11-01"
SPAN = f"data/notify/{DAY}"


@pytest.fixture(scope="module")
def day_one(tmp_path_factory) -> dict:
    workdir = tmp_path_factory.mktemp("rehearsal")
    airflow_venv = ensure_airflow_venv()
    with rehearse.gcs_emulator(rehearse.job_python()) as emulator:
        rehearse.upload_logs(emulator, workdir, rehearse.date.fromisoformat(DAY), 1, 300)
        result = rehearse.run_days(emulator, workdir, airflow_venv, [DAY])
        bucket = emulator.client().bucket(rehearse.BUCKET)
        result["manifest"] = json.loads(bucket.blob(f"{SPAN}/manifest.json").download_as_text())
        result["span"] = emulator.names(f"{SPAN}/")
        result["staged"] = emulator.names(f"work/notify/{DAY}/observations/")
    [result["tasks"]] = [d["tasks"] for d in result["days"]]
    return result


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
