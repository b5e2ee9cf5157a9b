"""The rehearsal's Airflow half: ``dag.test()`` for consecutive logical days (.venv-airflow).

    .venv-airflow/bin/python tests/rehearsal/airflow_side.py SETTINGS.json

``SETTINGS.json`` (written by tests/rehearsal/rehearse.py): ``repo``, ``python`` (the loopline
environment's), ``job_env`` (the jobs' environment), ``journal``, ``bucket``, ``dag_id`` and
``days`` (``YYYY-MM-DD`` logical dates, run in order; a day may repeat, as a cleared rerun
does). Airflow's own environment (``AIRFLOW_HOME``, the DAG folder, the ``loopline_*``
Variables, ``STORAGE_EMULATOR_HOST`` for the GCS hook) is set by the caller.

The DAG is the one the DagBag loads from dags/, run as it is, except that no task is retried
(a failure shows at once instead of after Composer's retry delays). Prints one line
``REHEARSAL_RESULT {json}``: per day, the run's state and each task's state.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from pathlib import Path

RESULT_MARKER = "REHEARSAL_RESULT "


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
        )
    )
    bag = DagBag(dag_folder=str(repo / "dags"))
    if bag.import_errors:
        raise SystemExit(f"DAG import errors: {bag.import_errors}")
    dag = bag.dags[config["dag_id"]]
    for task in dag.tasks:
        task.retries = 0
    days = []
    for day in config["days"]:
        logical_date = datetime.fromisoformat(day).replace(tzinfo=timezone.utc)
        run = dag.test(logical_date=logical_date)
        states = {ti.task_id: str(ti.state) for ti in run.get_task_instances()}
        days.append({"day": day, "state": str(run.state), "tasks": states})
        print(f"[rehearsal] {day}: {run.state} {states}", flush=True)
    return {"days": days}


if __name__ == "__main__":
    print(RESULT_MARKER + json.dumps(main(sys.argv[1]), sort_keys=True), flush=True)
