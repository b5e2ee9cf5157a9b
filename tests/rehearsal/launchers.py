"""The rehearsal's stand-ins for Dataflow, Vertex AI and Cloud Run, at the hooks' boundary.

Runs inside the Airflow environment (.venv-airflow). ``install(settings)`` replaces only the
methods of the Google provider's hooks that call a Google API to start work; the operators'
own code (rendering, XCom, job-name handling, waiting, failing on a failed job) runs as in
Composer:

- ``DataflowHook.start_flex_template``: runs the template's own entry file,
  ``python pipelines/<template>.py`` (the file ``FLEX_TEMPLATE_PYTHON_PY_FILE`` names in the
  image), with one ``--name=value`` flag per launch parameter of the rendered request, exactly as
  the Flex Template launcher does, on the DirectRunner with separate worker processes
  (``--direct_running_mode multi_processing --direct_num_workers 2``, as Dataflow's workers
  are separate processes) and the request's ``tempLocation``;
- ``PipelineJobHook.submit_pipeline_job``: runs the training pipeline locally,
  ``python -m pipelines.train`` with the arguments cloudbuild.yaml compiles into
  ``train-<name>.json`` (the blueprint baked into the image, the span from the job's
  ``examples`` parameter, the job's pipeline root, ``serving/<name>``);
- ``CloudRunHook.execute_job`` / ``get_job``: runs the job's command, ``python -m
  pipelines.promote``, with the execution's container args; the operator's Cloud Logging
  read (``_log_container_output``) prints the process's output instead.

Every job runs in the loopline environment (``settings.python``, the repository's .venv) with
the rehearsal's ``sitecustomize`` first on ``PYTHONPATH`` (anonymous credentials for the GCS
emulator, Secret Manager answered from the rehearsal's secrets). Each run is appended to
``settings.journal`` (JSON lines: what ran, its argv and exit status), which the rehearsal's
assertions read.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

DIRECT_RUNNER = [
    "--runner=DirectRunner",
    "--direct_running_mode=multi_processing",
    "--direct_num_workers=2",
]


@dataclass(frozen=True)
class Settings:
    """Where the jobs run: the repository, its Python, their environment and the journal."""

    repo: Path
    python: str
    env: dict[str, str]
    journal: Path
    bucket: str
    timeout_s: int = 1800
    # The blueprints baked into the image (cloudbuild.yaml compiles train-<name>.json with
    # <name>.yaml from there); default the repository's examples/.
    blueprint_dir: Path | None = None


class JobFailed(RuntimeError):
    pass


def job_output(journal: Path) -> Path:
    """Where ``run_job`` appends each job's whole stdout and stderr, beside the journal."""
    return journal.with_name(journal.stem + "-output.log")


def run_job(settings: Settings, kind: str, argv: list[str]) -> subprocess.CompletedProcess:
    """Runs one job to completion in the loopline environment and journals it."""
    started = time.time()
    result = subprocess.run(
        argv,
        cwd=settings.repo,
        env=settings.env,
        capture_output=True,
        text=True,
        timeout=settings.timeout_s,
    )
    entry = {
        "kind": kind,
        "argv": argv[1:],
        "returncode": result.returncode,
        "seconds": round(time.time() - started, 1),
        "stderr_tail": result.stderr[-3000:],
        "stdout_tail": result.stdout[-2000:],
    }
    with settings.journal.open("a") as f:
        f.write(json.dumps(entry) + "\n")
    # Every job's whole output, for the rehearsal's scan of what the jobs wrote (logs included).
    with job_output(settings.journal).open("a") as f:
        f.write(f"[{kind}] {' '.join(argv[1:])}\n{result.stdout}\n{result.stderr}\n")
    print(f"[rehearsal] {kind}: exit {result.returncode} in {entry['seconds']} s")
    print(result.stdout[-4000:])
    print(result.stderr[-4000:])
    return result


def flex_template_argv(settings: Settings, body: dict) -> tuple[str, list[str]]:
    """The launcher's command for a rendered Flex Template launch request."""
    launch = body["launchParameter"]
    template = Path(launch["containerSpecGcsPath"]).stem  # templates/<release>/<template>.json
    entry_file = settings.repo / "pipelines" / f"{template}.py"
    if not entry_file.is_file():
        raise JobFailed(f"no entry file {entry_file} for template {template}")
    flags = [f"--{name}={value}" for name, value in launch.get("parameters", {}).items()]
    temp = launch.get("environment", {}).get("tempLocation")
    options = [f"--temp_location={temp}"] if temp else []
    return template, [settings.python, str(entry_file), *flags, *DIRECT_RUNNER, *options]


def train_argv(settings: Settings, template_path: str, pipeline_root: str, parameters: dict):
    """``python -m pipelines.train`` as cloudbuild.yaml compiled it into ``train-<name>.json``."""
    name = Path(template_path).stem.removeprefix("train-")
    blueprint = (settings.blueprint_dir or settings.repo / "examples") / f"{name}.yaml"
    return [
        settings.python,
        "-m",
        "pipelines.train",
        "--blueprint",
        str(blueprint),
        "--examples",
        parameters["examples"],
        "--pipeline_root",
        pipeline_root,
        "--serving_dir",
        f"gs://{settings.bucket}/serving/{name}",
        # Vertex AI keeps ML Metadata in its own store, not under the pipeline root (SQLite
        # cannot live on gs://); one file per blueprint, kept across days for the baseline.
        "--metadata_path",
        str(settings.journal.parent / f"vertex-metadata-{name}.sqlite"),
    ]


class _LocalPipelineJob:
    """What PipelineJobHook.submit_pipeline_job returns, for a run that already finished."""

    def __init__(self, job_id: str, created: datetime, display_name: str):
        self.job_id, self.created, self.display_name = job_id, created, display_name
        self.location = "local"

    def wait(self) -> None:
        pass

    def wait_for_resource_creation(self) -> None:
        pass

    def to_dict(self) -> dict:
        return {
            "name": f"projects/rehearsal/locations/local/pipelineJobs/{self.job_id}",
            "displayName": self.display_name,
            "createTime": self.created.isoformat().replace("+00:00", "Z"),
            "state": "PIPELINE_STATE_SUCCEEDED",
        }


class _LocalOperation:
    """What CloudRunHook.execute_job returns: a long-running operation already done."""

    def __init__(self, job_name: str, returncode: int):
        from google.cloud.run_v2 import Execution

        name = (
            f"projects/rehearsal/locations/local/jobs/{job_name}/executions/{uuid.uuid4().hex[:8]}"
        )
        self.metadata = SimpleNamespace(log_uri="", name=name)
        self._execution = Execution(
            name=name,
            job=job_name,
            task_count=1,
            succeeded_count=int(returncode == 0),
            failed_count=int(returncode != 0),
        )

    def result(self, timeout=None):
        return self._execution


def install(settings: Settings) -> None:
    """Replaces the hooks' job-starting methods (and Google credentials) for this process."""
    from airflow.exceptions import AirflowException
    from airflow.providers.google.cloud.hooks.cloud_run import CloudRunHook
    from airflow.providers.google.cloud.hooks.dataflow import DataflowHook
    from airflow.providers.google.cloud.hooks.vertex_ai.pipeline_job import PipelineJobHook
    from airflow.providers.google.cloud.operators.cloud_run import CloudRunExecuteJobOperator
    from airflow.providers.google.common.hooks.base_google import GoogleBaseHook
    from google.auth.credentials import AnonymousCredentials

    def credentials_and_project(self):
        return AnonymousCredentials(), "loopline-rehearsal"

    def start_flex_template(
        self, body, location, project_id, on_new_job_id_callback=None, on_new_job_callback=None
    ):
        template, argv = flex_template_argv(settings, body)
        job = {
            "id": f"rehearsal-{uuid.uuid4().hex[:12]}",
            "name": body["launchParameter"]["jobName"],
            "projectId": project_id,
            "location": location,
            "currentState": "JOB_STATE_RUNNING",
        }
        if on_new_job_id_callback:
            on_new_job_id_callback(job["id"])
        if on_new_job_callback:
            on_new_job_callback(job)
        result = run_job(settings, f"dataflow:{template}", argv)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise AirflowException(f"Dataflow job {job['name']} failed: {last}")
        return {**job, "currentState": "JOB_STATE_DONE"}

    def submit_pipeline_job(
        self, project_id, region, display_name, template_path, job_id=None, **kwargs
    ):
        created = datetime.now(timezone.utc)
        argv = train_argv(
            settings, template_path, kwargs["pipeline_root"], kwargs.get("parameter_values") or {}
        )
        result = run_job(settings, "vertex:train", argv)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise AirflowException(f"Vertex AI pipeline job {job_id} failed: {last}")
        return _LocalPipelineJob(job_id or display_name, created, display_name)

    def execute_job(self, job_name, region, use_regional_endpoint=False, project_id=None,
                    overrides=None):  # fmt: skip
        args = [a for o in (overrides or {}).get("container_overrides", []) for a in o["args"]]
        result = run_job(
            settings, f"cloud_run:{job_name}", [settings.python, "-m", "pipelines.promote", *args]
        )
        self._rehearsal_output = result.stdout + result.stderr
        return _LocalOperation(job_name, result.returncode)

    def get_job(self, job_name, region, use_regional_endpoint=False, project_id=None):
        from google.cloud.run_v2 import Job

        return Job(name=job_name)

    def container_output(self, execution_name):
        self.log.info("Cloud Run job output: %s", getattr(self.hook, "_rehearsal_output", ""))

    GoogleBaseHook.get_credentials_and_project_id = credentials_and_project
    DataflowHook.start_flex_template = start_flex_template
    PipelineJobHook.submit_pipeline_job = submit_pipeline_job
    CloudRunHook.execute_job = execute_job
    CloudRunHook.get_job = get_job
    CloudRunExecuteJobOperator._log_container_output = container_output
