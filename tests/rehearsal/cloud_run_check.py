"""The rehearsal's Cloud Run stand-in under the real CloudRunExecuteJobOperator (.venv-airflow).

    .venv-airflow/bin/python tests/rehearsal/cloud_run_check.py REPO JOB_PYTHON JOURNAL

Runs the operator's ``execute`` as the DAG's ``promote`` task configures it, with the hooks
replaced as in the rehearsal and ``JOB_PYTHON`` as the job's interpreter (so a test can make
the job succeed or fail without a serving dir). Prints ``CLOUD_RUN_CHECK ok <job name>`` when
the operator returned the job, ``CLOUD_RUN_CHECK failed <message>`` when it raised.
"""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace


def main(repo: Path, python: str, journal: Path) -> str:
    sys.path.insert(0, str(repo / "tests" / "rehearsal"))
    import launchers
    from airflow.providers.google.cloud.operators.cloud_run import CloudRunExecuteJobOperator

    launchers.install(
        launchers.Settings(repo=repo, python=python, env={}, journal=journal, bucket="b")
    )
    operator = CloudRunExecuteJobOperator(
        task_id="promote",
        project_id="p",
        region="local",
        job_name="loopline-promote-v7",
        overrides={"container_overrides": [{"args": ["--serving_dir", "gs://b/serving/n"]}]},
        verbose=True,
        deferrable=False,
    )
    ti = SimpleNamespace(xcom_push=lambda **_: None)
    try:
        job = operator.execute({"ti": ti, "task_instance": ti})
    except Exception as e:  # noqa: BLE001 - the operator's own failure is the result
        return f"failed {e}"
    return f"ok {job['name']}"


if __name__ == "__main__":
    repo, python, journal = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    print("CLOUD_RUN_CHECK " + main(repo, python, journal), flush=True)
