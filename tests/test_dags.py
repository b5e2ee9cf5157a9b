"""dags/ in a real Airflow 3 DagBag, in Airflow's own virtual environment.

Airflow's pins clash with TFX's, so it lives in ``.venv-airflow`` (Python 3.11) built here from
requirements/airflow-lock.txt with uv when missing or stale (a stamp file holds the lock's hash).
tests/airflow_checks.py runs inside it against a throwaway ``AIRFLOW_HOME`` after ``airflow db
migrate``: the DagBag loads with no import errors, every DAG is serialized as the scheduler
would, the task graph is as specified, and every templated field is rendered for the logical
date 2026-11-01 with the ``loopline_*`` Variables set. No Google Cloud API is called: rendering
reads Variables only, and no task runs (the XCom the monitor pulls is a stand-in there).

The blueprint reader and the serving-dir readers the DAGs use (model-push check, the
production model's training statistics) need only PyYAML and the standard library, so they are
also tested directly here.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
AIRFLOW_VENV = REPO / ".venv-airflow"
AIRFLOW_LOCK = REPO / "requirements" / "airflow-lock.txt"
STAMP = AIRFLOW_VENV / ".installed-lock-sha256"
UV = REPO / ".venv" / "bin" / "uv"
VARIABLES = {
    "AIRFLOW_VAR_LOOPLINE_PROJECT": "acme-ml",
    "AIRFLOW_VAR_LOOPLINE_REGION": "europe-west4",
    "AIRFLOW_VAR_LOOPLINE_BUCKET": "acme-loopline",
    "AIRFLOW_VAR_LOOPLINE_RELEASE": "v7",
    "AIRFLOW_VAR_LOOPLINE_SERVICE_ACCOUNT": "loopline@acme-ml.iam.gserviceaccount.com",
    "AIRFLOW_VAR_LOOPLINE_PII_KEY_SECRET": "projects/acme-ml/secrets/loopline-pii-key/versions/3",
}

sys.path.insert(0, str(REPO / "dags"))
from loopline_dags.blueprints import (  # noqa: E402
    BlueprintFileError,
    find_blueprints,
    parse_duration,
    read_blueprint,
)
from loopline_dags.models import (  # noqa: E402
    find_record,
    newest_version,
    production_model_id,
    pushed_version,
    record_names,
    training_statistics,
)


def ensure_airflow_venv() -> Path:
    """Builds .venv-airflow from the lock unless the stamp says it already matches it."""
    lock_hash = hashlib.sha256(AIRFLOW_LOCK.read_bytes()).hexdigest()
    python = AIRFLOW_VENV / "bin" / "python"
    if python.exists() and STAMP.exists() and STAMP.read_text().strip() == lock_hash:
        return AIRFLOW_VENV
    uv = str(UV) if UV.exists() else shutil.which("uv")
    assert uv, "uv is needed to build the Airflow environment (make env installs it in .venv)"
    env = {**os.environ, "UV_PYTHON_DOWNLOADS": "never"}
    if not python.exists():
        subprocess.run(
            [uv, "venv", "--python", "python3.11", str(AIRFLOW_VENV)], check=True, env=env
        )
    subprocess.run(
        [uv, "pip", "sync", "--python", str(python), str(AIRFLOW_LOCK)], check=True, env=env
    )
    STAMP.write_text(lock_hash + "\n")
    return AIRFLOW_VENV


@pytest.fixture(scope="session")
def airflow_venv() -> Path:
    return ensure_airflow_venv()


@pytest.fixture(scope="module")
def airflow_report(airflow_venv, tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("airflow_home")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")},
        **VARIABLES,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        # This machine is small and shared; Composer's default of 30 s is for real workers.
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "300",
        "LOOPLINE_BLUEPRINTS_DIR": str(REPO / "examples"),
    }
    bin_dir = airflow_venv / "bin"
    migrate = subprocess.run(
        [str(bin_dir / "airflow"), "db", "migrate"],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert migrate.returncode == 0, migrate.stdout[-3000:] + migrate.stderr[-3000:]
    checks = subprocess.run(
        [str(bin_dir / "python"), str(REPO / "tests" / "airflow_checks.py"), str(REPO)],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=900,
    )
    failure = [line for line in checks.stderr.splitlines() if "AIRFLOW CHECK FAILED" in line]
    assert checks.returncode == 0, "\n".join(failure) or checks.stderr[-5000:]
    marked = [
        line for line in checks.stdout.splitlines() if line.startswith("AIRFLOW_CHECKS_RESULT ")
    ]
    assert len(marked) == 1, checks.stdout[-3000:]
    return json.loads(marked[0].removeprefix("AIRFLOW_CHECKS_RESULT "))


@pytest.mark.slow
def test_dagbag_has_one_dag_per_blueprint_and_no_import_errors(airflow_report):
    expected = [f"loopline_{b.name}" for b in find_blueprints(REPO / "examples")]
    assert airflow_report["dag_ids"] == sorted(expected) == ["loopline_notify"]


@pytest.mark.slow
def test_task_graph_joins_monitors_promotes_trains_then_scores(airflow_report):
    upstream = airflow_report["dags"]["loopline_notify"]["upstream"]
    order = [
        "wait_for_decision_logs",
        "wait_for_label_window",
        "wait_for_observation_logs",
        "clear_day_outputs",
        "stage_observations",
        "join",
        "find_day_scores",
        "clear_monitor_output",
        "find_training_stats",
        "monitor",
        "find_verdict",
        "promote",
        "train",
        "check_model_pushed",
        "clear_score_output",
        "bulk_score",
        "day_done",
    ]
    assert upstream[order[0]] == []
    for before, after in zip(order, order[1:], strict=False):
        assert before in upstream[after]
    assert upstream["train"] == ["join", "promote"]
    assert upstream["day_done"] == ["bulk_score", "check_model_pushed", "monitor"]


@pytest.mark.slow
def test_next_day_is_scored_with_both_arms_whatever_training_did(airflow_report):
    notify = airflow_report["dags"]["loopline_notify"]
    launch = notify["rendered"]["bulk_score"]["body"]["launchParameter"]
    assert launch["parameters"]["model_version"] == "rollout"
    assert notify["upstream"]["clear_score_output"] == ["check_model_pushed"]
    assert notify["trigger_rules"]["clear_score_output"] == "all_done"


@pytest.mark.slow
def test_promote_runs_in_the_loopline_image_on_the_days_verdict(airflow_report):
    notify = airflow_report["dags"]["loopline_notify"]
    promote = notify["rendered"]["promote"]
    assert promote["job_name"] == "loopline-promote-v7"
    assert promote["overrides"]["container_overrides"][0]["args"] == [
        "--serving_dir",
        "gs://acme-loopline/serving/notify",
        "--verdict",
        "gs://acme-loopline/monitor/notify/2026-11-01/verdict.json",
    ]
    # Also after a monitor that failed on a flag; skipped when it wrote no verdict.
    assert notify["trigger_rules"]["find_verdict"] == "none_skipped"


@pytest.mark.slow
def test_monitor_gets_the_production_models_training_statistics(airflow_report):
    rendered = airflow_report["dags"]["loopline_notify"]["rendered"]
    assert rendered["find_training_stats"]["op_kwargs"] == {
        "bucket": "acme-loopline",
        "serving_prefix": "serving/notify",
    }
    parameters = rendered["monitor"]["body"]["launchParameter"]["parameters"]
    assert parameters["training_stats"] == (
        "gs://acme-loopline/pipeline_root/notify/StatisticsGen/statistics/12"
    )


@pytest.mark.slow
def test_join_renders_day_paths_and_job_name_for_2026_11_01(airflow_report):
    rendered = airflow_report["dags"]["loopline_notify"]["rendered"]
    launch = rendered["join"]["body"]["launchParameter"]
    assert launch["jobName"] == "loopline-join-notify-20261101"
    assert launch["parameters"]["output"] == "gs://acme-loopline/data/notify/2026-11-01"
    assert launch["parameters"]["decisions"] == (
        "gs://acme-loopline/logs/notify/2026-11-01/decisions-*.jsonl"
    )
    assert rendered["join"]["project_id"] == "acme-ml"
    # The day's own observations; the staged logs of the days around it only label its decisions.
    assert launch["parameters"]["observations_from"] == "2026-11-01T00:00:00Z"
    assert launch["parameters"]["observations_until"] == "2026-11-02T00:00:00Z"
    assert rendered["stage_observations"]["source_objects"] == [
        f"logs/notify/{day}/observations-" for day in ("2026-10-31", "2026-11-01", "2026-11-02")
    ]
    # Day end 2026-11-02T00:00Z + 1h label window + 1h lateness + 1h log flush.
    assert rendered["wait_for_label_window"]["target_time"] == "2026-11-02T03:00:00+00:00"
    assert rendered["train"]["parameter_values"] == {
        "examples": "gs://acme-loopline/data/notify/2026-11-01"
    }


def test_blueprint_reader_gets_label_timing_with_plain_yaml():
    info = read_blueprint(REPO / "examples" / "notify.yaml")
    assert (info.name, info.version, info.file_name) == ("notify", "1", "notify.yaml")
    assert info.label_window == timedelta(hours=1)
    assert info.backward_slack == timedelta(minutes=2)
    assert info.pseudonymises  # privacy.pseudonymise: [user_id]
    assert parse_duration("250ms") == timedelta(milliseconds=250)
    assert parse_duration(90) == timedelta(seconds=90)
    with pytest.raises(ValueError):
        parse_duration("soon")


def test_two_blueprint_files_with_one_name_are_refused(tmp_path):
    text = (REPO / "examples" / "notify.yaml").read_text()
    (tmp_path / "a.yaml").write_text(text)
    (tmp_path / "b.yaml").write_text(text)
    with pytest.raises(BlueprintFileError, match="also defined"):
        find_blueprints(tmp_path)


def test_blueprint_without_pseudonymised_identifiers_needs_no_key(tmp_path):
    (tmp_path / "x.yaml").write_text(
        "name: x\nversion: 1\nlabel: {window: 1h}\nprivacy: {drop: [email]}\n"
    )
    assert find_blueprints(tmp_path)[0].pseudonymises is False


def test_blueprint_without_label_window_is_refused(tmp_path):
    (tmp_path / "x.yaml").write_text("name: x\nversion: 1\nlabel: {name: y}\n")
    with pytest.raises(BlueprintFileError, match="label.window"):
        find_blueprints(tmp_path)


def test_model_push_check_takes_only_versions_pushed_by_this_job():
    job = {"createTime": "2026-11-02T05:00:00Z"}  # 1793595600
    assert newest_version(["17/", "170/x", "9.record.json", "notes/"]) == 170
    assert pushed_version(["1793590000/", "1793599000/saved_model.pb"], job) == "1793599000"
    assert pushed_version(["1793590000/"], job) is None
    with pytest.raises(ValueError):
        pushed_version(["1793599000/"], {})


def test_production_model_id_is_read_from_aliases():
    assert production_model_id({"production": "p1", "challenger": "c2", "history": []}) == "p1"
    assert production_model_id({"production": None, "challenger": "c2"}) is None
    with pytest.raises(ValueError, match="production"):
        production_model_id({"production": 7})


def test_production_record_is_found_by_model_id_name_or_version():
    records = [
        ("serving/notify/1793590000.record.json", {"model_id": "a0c5", "version": 1793590000}),
        ("serving/notify/1793599000.record.json", {"name": "notify-1793599000"}),
    ]
    assert find_record(records, "a0c5") == records[0]
    assert find_record(records, "1793590000") == records[0]
    assert find_record(records, "notify-1793599000") == records[1]
    assert find_record(records, "b111") is None


def test_records_are_the_files_beside_the_version_directories():
    # A full listing of the serving prefix, as GCSHook.list gives it without a delimiter (with
    # one it returns only the directories, and the records were never found).
    names = [
        "serving/notify/aliases.json",
        "serving/notify/1793590000.record.json",
        "serving/notify/1793590000/saved_model.pb",
        "serving/notify/1793590000/assets/x.record.json",
        "serving/notify/1793599000.record.json",
    ]
    assert record_names(names, "serving/notify/") == [
        "serving/notify/1793590000.record.json",
        "serving/notify/1793599000.record.json",
    ]


def test_training_statistics_uri_comes_from_the_record():
    uri = "gs://b/pipeline_root/notify/StatisticsGen/statistics/12"
    assert training_statistics({"statistics": {"uri": uri, "splits": ["train", "eval"]}}) == uri
    assert training_statistics({"statistics": uri}) == uri
    assert training_statistics({"model_id": "a0c5"}) is None
