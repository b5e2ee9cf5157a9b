"""The rehearsal's Airflow half: ``dag.test()`` for consecutive logical days (.venv-airflow).

    .venv-airflow/bin/python tests/rehearsal/airflow_side.py SETTINGS.json

``SETTINGS.json`` (written by tests/rehearsal/rehearse.py): ``repo``, ``python`` (the loopline
environment's), ``job_env`` (the jobs' environment), ``journal``, ``bucket``, ``dag_id`` and
``blueprint_dir`` (the blueprints training reads) and ``days`` (``YYYY-MM-DD`` logical dates, run in order; a day may repeat, as a cleared rerun
does). Airflow's own environment (``AIRFLOW_HOME``, the DAG folder, the ``loopline_*``
Variables, ``STORAGE_EMULATOR_HOST`` for the GCS hook) is set by the caller.

The DAG is the one the DagBag loads from dags/, run as it is, except that no task is retried
(a failure shows at once instead of after Composer's retry delays) and it has no Deadline
Alert (see main). Prints one line
``REHEARSAL_RESULT {json}``: per day, the run's state, each task's state and the bucket's
objects after it (name -> size, MD5 and a manifest's content), so a rerun can be compared with
the first run.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULT_MARKER = "REHEARSAL_RESULT "


def bucket_objects(config: dict) -> dict[str, list]:
    """Every object in the bucket after a day, through the GCS hook: name -> [size, MD5], and
    for a manifest its content too (a rerun's manifest is compared with the first run's)."""
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    objects = {}
    for blob in GCSHook().get_conn().bucket(config["bucket"]).list_blobs():
        objects[blob.name] = [blob.size, blob.md5_hash]
        if blob.name.endswith("/manifest.json"):
            objects[blob.name].append(json.loads(blob.download_as_bytes()))
    return objects


def main(settings_path: str) -> dict:
    config = json.loads(Path(settings_path).read_text())
    repo = Path(config["repo"])
    sys.path.insert(0, str(repo / "tests" / "rehearsal"))
    sys.path.insert(0, str(repo / "dags"))
    import launchers
    from airflow.dag_processing.dagbag import DagBag

    launchers.install(
        launchers.Settings(
            repo=repo,
            python=config["python"],
            env=config["job_env"],
            journal=Path(config["journal"]),
            bucket=config["bucket"],
            blueprint_dir=Path(config["blueprint_dir"]),
        )
    )
    bag = DagBag(dag_folder=str(repo / "dags"))
    if bag.import_errors:
        raise SystemExit(f"DAG import errors: {bag.import_errors}")
    dag = bag.dags[config["dag_id"]]
    for task in dag.tasks:
        task.retries = 0
    # Airflow 3.3's dag.test() hands a succeeded run's update_state the DeadlineAlert
    # definitions where the scheduler hands their stored ids (DeadlineAlertModel.get_by_id then
    # fails on a dict); the deadline is the scheduler's business, not a test run's.
    dag.deadline = None
    days = []
    for day in config["days"]:
        logical_date = datetime.fromisoformat(day).replace(tzinfo=timezone.utc)
        run = dag.test(logical_date=logical_date)
        states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
        days.append(
            {"day": day, "state": str(run.state), "tasks": states, "bucket": bucket_objects(config)}
        )
        print(f"[rehearsal] {day}: {run.state} {states}", flush=True)
    return {"days": days}


if __name__ == "__main__":
    print(RESULT_MARKER + json.dumps(main(sys.argv[1]), sort_keys=True), flush=True)
