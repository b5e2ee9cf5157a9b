"""The daily DAG rehearsed: ``dag.test()`` of ``loopline_notify`` for three consecutive days on
an emulated bucket, then day 2 cleared and run again.

tests/rehearsal/rehearse.py sets it up: a gcp-storage-emulator with the TLS proxy TensorFlow
goes through (tests/gcs_emulator.py), the simulator's logs (written by the decision client's
``JsonLinesSink``) uploaded into the bucket, Airflow 3 from .venv-airflow. The DAG runs as it
is, with Dataflow, Vertex AI and Cloud Run replaced at their hooks by the jobs' own entry
points (tests/rehearsal/launchers.py): the Flex Templates' pipeline files on the DirectRunner
with worker processes, training (TFX, LocalDagRunner) and promotion as local processes, every
path on ``gs://``. The module fixture runs the four DAG runs once (one Airflow process, one
TFX run per DAG run); each test reads what they left in the bucket.

The gate is relaxed in the rehearsal's blueprint (rehearse.GATE): a few hundred simulated
decisions a day cannot earn a push under the example's thresholds, and the rehearsal is about
the loop's wiring, not the model's quality.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import subprocess
from datetime import date, timedelta
from pathlib import Path

import pytest

from tests.rehearsal import launchers, rehearse
from tests.test_dags import ensure_airflow_venv
from transforms.manifest import listed_files

DAYS = ["2026-11-01", "2026-11-02", "2026-11-03"]
RERUN = DAYS[1]
DECISIONS = 600  # over the three days and the label horizon's day after them
NAME = rehearse.NAME
SERVING = f"serving/{NAME}/"
# Written by the product (and staged copies of it), not by a job: raw identifiers belong there.
PRODUCT_INPUTS = (f"logs/{NAME}/", f"candidates/{NAME}/", f"work/{NAME}/")
# What a rerun of a day may add: a new training run's artifacts and what it pushed.
RERUN_MAY_ADD = ("pipeline_root/", SERVING)


def _next(day: str) -> str:
    return (date.fromisoformat(day) + timedelta(days=1)).isoformat()


def _download_all(emulator) -> dict[str, bytes]:
    """Every object in the bucket, gzip files decompressed (TFRecords are written gzipped)."""
    objects = {}
    bucket = emulator.client().bucket(rehearse.BUCKET)
    for name in emulator.names():
        # By name: a listed object's media link names the host it was written through, and
        # TensorFlow writes through the proxy as www.googleapis.com.
        data = bucket.blob(name).download_as_bytes(raw_download=True)
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
        objects[name] = data
    return objects


def _raw_identifiers(workdir) -> set[str]:
    """The simulator's user ids and emails, as they appear in the product's logs."""
    text = "".join(p.read_text() for p in (workdir / "simulated").glob("decisions-*.jsonl"))
    found = re.findall(r'"(?:user_id|email)":\s*"([^"]+)"', text)
    return {value for value in found if len(value) >= 6}  # not a malformed line's stub


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory) -> dict:
    """Days 1, 2, 3, then day 2 again (a fresh dag.test() clears the day and replaces its run)."""
    workdir = tmp_path_factory.mktemp("rehearsal")
    airflow_venv = ensure_airflow_venv()
    with rehearse.gcs_emulator(workdir) as emulator:
        rehearse.upload_logs(emulator, workdir, date.fromisoformat(DAYS[0]), len(DAYS), DECISIONS)
        result = rehearse.run_days(emulator, workdir, airflow_venv, [*DAYS, RERUN])
        result["objects"] = _download_all(emulator)
    result["identifiers"] = _raw_identifiers(workdir)
    # For a look after a failure: the day's states, the bucket after each day, the jobs.
    (workdir / "result.json").write_text(json.dumps(result["days"] + result["jobs"], indent=1))
    return result


def _day(rehearsal, index: int) -> dict:
    return rehearsal["days"][index]


def _json(rehearsal, name: str):
    return json.loads(rehearsal["objects"][name])


def _jobs(rehearsal, kind: str) -> list[dict]:
    return [job for job in rehearsal["jobs"] if job["kind"] == kind]


def _argument(job: dict, flag: str) -> str:
    [value] = [a.split("=", 1)[1] for a in job["argv"] if a.startswith(f"--{flag}=")]
    return value


@pytest.mark.slow
def test_each_day_joins_and_trains_on_its_span(rehearsal):
    for index, day in enumerate(DAYS):
        tasks = _day(rehearsal, index)["tasks"]
        for task_id in ("stage_observations", "join", "train", "check_model_pushed"):
            assert tasks[task_id] == "success", (day, task_id, tasks[task_id], rehearsal["log"])
    trained_on = [
        job["argv"][job["argv"].index("--examples") + 1] for job in _jobs(rehearsal, "vertex:train")
    ]
    bucket = f"gs://{rehearse.BUCKET}"
    assert trained_on == [f"{bucket}/data/{NAME}/{day}" for day in [*DAYS, RERUN]]


@pytest.mark.slow
def test_each_span_has_a_manifest_describing_exactly_the_files_beside_it(rehearsal):
    for day in DAYS:
        span = f"data/{NAME}/{day}/"
        manifest = _json(rehearsal, f"{span}manifest.json")
        beside = {
            f"gs://{rehearse.BUCKET}/{n}"
            for n in rehearsal["objects"]
            if n.startswith(span) and n != f"{span}manifest.json"
        }
        assert beside == set(listed_files(manifest)), day
        train_records = sum(manifest["records_per_file"][f] for f in manifest["files"]["train"])
        assert train_records == manifest["examples_train"], day
        assert manifest["reconciles"] and manifest["examples_written"] > 0, day


@pytest.mark.slow
def test_a_pushed_model_is_registered_with_its_aliases_in_the_bucket(rehearsal):
    aliases = _json(rehearsal, f"{SERVING}aliases.json")
    registered = aliases["challenger"] or aliases["production"]
    records = [
        _json(rehearsal, n)
        for n in rehearsal["objects"]
        if n.startswith(SERVING) and n.endswith(".record.json")
    ]
    [record] = [r for r in records if r["model_id"] == registered]
    assert record["blessed"]
    assert f"{SERVING}{record['version']}/saved_model.pb" in rehearsal["objects"]
    [span] = record["spans"]
    assert span["path"] in {f"gs://{rehearse.BUCKET}/data/{NAME}/{day}" for day in DAYS}


@pytest.mark.slow
def test_every_day_run_succeeds(rehearsal):
    for day in rehearsal["days"]:
        assert day["state"] == "success", (day["day"], day["tasks"], rehearsal["log"])


@pytest.mark.slow
def test_the_next_day_is_scored_by_the_pushed_model(rehearsal):
    aliases = _json(rehearsal, f"{SERVING}aliases.json")
    first_model = aliases["history"][0]["to"]
    prefix = f"scores/{NAME}/{_next(DAYS[0])}/scores/"
    rows = [
        json.loads(line)
        for name, data in rehearsal["objects"].items()
        if name.startswith(prefix)
        for line in data.decode().splitlines()
    ]
    assert rows
    assert first_model in {row.get("model_id") for row in rows}


@pytest.mark.slow
def test_the_monitor_reports_a_scored_day_with_the_models_training_statistics(rehearsal):
    day = DAYS[1]
    assert _day(rehearsal, 1)["tasks"]["monitor"] == "success"
    assert f"monitor/{NAME}/{day}/metrics.json" in rehearsal["objects"]
    monitor = next(
        job
        for job in _jobs(rehearsal, "dataflow:monitor")
        if _argument(job, "output").endswith(f"/monitor/{NAME}/{day}")
    )
    statistics = _argument(monitor, "training_stats")
    assert statistics.startswith(f"gs://{rehearse.BUCKET}/pipeline_root/{NAME}/StatisticsGen/")


@pytest.mark.slow
def test_day_two_cleared_and_rerun_rewrites_the_same_outputs_with_nothing_duplicated(rehearsal):
    before, after = _day(rehearsal, 2)["bucket"], _day(rehearsal, 3)["bucket"]
    assert _day(rehearsal, 3)["tasks"]["join"] == "success"
    for prefix in (
        f"data/{NAME}/{RERUN}/",
        f"work/{NAME}/{RERUN}/",
        f"monitor/{NAME}/{RERUN}/",
        f"scores/{NAME}/{_next(RERUN)}/",
    ):
        assert sorted(n for n in after if n.startswith(prefix)) == sorted(
            n for n in before if n.startswith(prefix)
        ), prefix
    added = sorted(set(after) - set(before))
    assert [n for n in added if not n.startswith(RERUN_MAY_ADD)] == []
    # Same decisions, same examples: the rerun's manifest lists the same files and counts.
    manifest = f"data/{NAME}/{RERUN}/manifest.json"
    first, again = before[manifest][2], after[manifest][2]
    assert again["files"] == first["files"]
    counts = {k: v for k, v in first.items() if isinstance(v, int)}
    assert counts and {k: again[k] for k in counts} == counts


@pytest.mark.slow
def test_no_object_a_job_wrote_holds_a_raw_identifier(rehearsal):
    identifiers = rehearsal["identifiers"]
    assert len(identifiers) > 10  # the simulator's users and emails were found
    pattern = re.compile("|".join(re.escape(i) for i in sorted(identifiers)).encode())
    # The scan finds them where they belong: the product's own logs.
    logs = [d for n, d in rehearsal["objects"].items() if n.startswith(f"logs/{NAME}/")]
    assert any(pattern.search(d) for d in logs)
    written = {n: d for n, d in rehearsal["objects"].items() if not n.startswith(PRODUCT_INPUTS)}
    assert any(n.startswith(f"data/{NAME}/") for n in written)
    assert any(n.startswith(f"scores/{NAME}/") for n in written)
    # And what the jobs and Airflow logged: every job's whole output, the scheduler's log.
    for log in (rehearsal["job_output"], rehearsal["log"]):
        written[log] = Path(log).read_bytes()
    assert b"[dataflow:" in written[rehearsal["job_output"]]
    leaks = {n: pattern.search(d).group().decode() for n, d in written.items() if pattern.search(d)}
    assert leaks == {}


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
        "--metadata_path",
        str(tmp_path / "vertex-metadata-notify.sqlite"),
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
