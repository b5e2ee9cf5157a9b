"""Rehearse the daily DAG locally: ``dag.test()`` for consecutive days on an emulated bucket.

    .venv/bin/python -m tests.rehearsal.rehearse --days 3 --rerun 2026-11-02 [--workdir DIR]

What it sets up, then runs (tests/test_dag_rehearsal.py runs the same with assertions):

1. a GCS emulator (``gcp-storage-emulator``, in memory, one bucket) with the TLS proxy that
   TensorFlow's own GCS filesystem goes through (tests/gcs_emulator.py);
2. the product's logs in that bucket: ``python -m loopline.simulate`` for the days (plus the
   label horizon after them) makes its decisions through the decision client, whose
   ``JsonLinesSink`` writes the log files; each is uploaded unchanged under
   ``logs/<name>/<day of its first event>/``, each day's decisions also as the next run's
   scoring candidates (``candidates/<name>/<day>/``), and the rehearsal's blueprint (the
   example's, gate and monitor flags relaxed: GATE, MONITOR_FLAGS) under ``blueprints/``;
3. Airflow 3 from .venv-airflow (tests/test_dags.py builds it) with a throwaway metadata
   database, the ``loopline_*`` Variables, and the GCS hook pointed at the emulator;
4. tests/rehearsal/airflow_side.py: ``dag.test()`` of ``loopline_<name>`` per logical day
   (``--rerun`` days again after them, as a cleared day re-runs), with Dataflow, Vertex AI and
   Cloud Run replaced at their hooks by local runs of the same entry points
   (tests/rehearsal/launchers.py).

It prints the result (per day: the run's state and every task's state), the jobs it ran (the
journal) and the bucket's contents, and exits 0 when every day's run succeeded.

What this proves: the DAG's tasks, trigger rules, templated paths and XComs drive the jobs' real
entry points with the parameters Composer would send, on ``gs://`` paths, day after day.
What it does not: anything about Dataflow, Vertex AI, Cloud Run, Composer's workers, IAM or
Secret Manager themselves (a secret is answered from the rehearsal's own value), nor a model's
quality (the gate is relaxed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import yaml

from tests.gcs_emulator import GcsEmulator, start_emulator, stop_emulator
from tests.rehearsal import launchers

REPO = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
SITE = HERE / "site"
BUCKET = "loopline-rehearsal"
BLUEPRINT = "notify.yaml"
NAME = "notify"
PII_KEY_SECRET = "projects/loopline-rehearsal/secrets/loopline-pii-key/versions/1"
PII_KEY = "rehearsal-key-not-a-secret"
RESULT_MARKER = "REHEARSAL_RESULT "
# The gate (model.thresholds), relaxed so that a model trained on a few hundred simulated
# decisions is pushed: the rehearsal is about the loop's wiring, not a model's quality.
GATE = {
    "min_auc": 0.0,
    "max_auc_regression": 1.0,
    "min_positives": 1,
    "confidence": 0.5,
    "max_policy_value_loss": 100.0,  # the off-policy check too: a few hundred rows a day
}
# The monitor's flags, relaxed for the same reason (a flag fails the monitor task).
MONITOR_FLAGS = {
    "min_auc": 0.0,
    "max_calibration_error": 1.0,
    # A few hundred scored rows against a few hundred trained on: skew is noise here.
    "max_skew_jensen_shannon": 1.0,
    "max_skew_linf": 1.0,
}
VARIABLES = {
    "AIRFLOW_VAR_LOOPLINE_PROJECT": "loopline-rehearsal",
    "AIRFLOW_VAR_LOOPLINE_REGION": "local",
    "AIRFLOW_VAR_LOOPLINE_BUCKET": BUCKET,
    "AIRFLOW_VAR_LOOPLINE_RELEASE": "rehearsal",
    "AIRFLOW_VAR_LOOPLINE_SERVICE_ACCOUNT": "loopline@loopline-rehearsal.iam.gserviceaccount.com",
    "AIRFLOW_VAR_LOOPLINE_PII_KEY_SECRET": PII_KEY_SECRET,
}


@dataclass
class Emulator:
    """The rehearsal's bucket: tests/gcs_emulator.py's emulator and TLS proxy (so TensorFlow's
    own GCS filesystem reaches it too), and the environment that points a job at them."""

    server: GcsEmulator

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def client(self):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project="loopline-rehearsal",
            credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.endpoint},
        )

    def names(self, prefix: str = "") -> list[str]:
        return sorted(b.name for b in self.client().list_blobs(BUCKET, prefix=prefix))


@contextmanager
def gcs_emulator(workdir: Path):
    """An in-memory gcp-storage-emulator with the rehearsal's bucket, stopped on exit."""
    tls = workdir / "gcs"
    tls.mkdir(parents=True, exist_ok=True)
    server = start_emulator(tls, bucket=BUCKET)
    try:
        yield Emulator(server)
    finally:
        stop_emulator(server)


def job_python() -> str:
    """The loopline environment's Python (the repository's .venv, else this one)."""
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def job_env(emulator: Emulator) -> dict[str, str]:
    """The jobs' environment: the emulator, the rehearsal's sitecustomize, no key but the secret."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW", "LOOPLINE_PII_KEY", "GOOGLE_APPLICATION_CREDENTIALS"))
    }
    return {
        **env,
        # The emulator and the TLS proxy TensorFlow goes through; this site replaces gcs_site.
        **emulator.server.env,
        "PYTHONPATH": os.pathsep.join([str(SITE), str(REPO)]),
        "LOOPLINE_REHEARSAL_SECRETS": json.dumps({PII_KEY_SECRET: PII_KEY}),
        "TF_USE_LEGACY_KERAS": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def rehearsal_blueprint(workdir: Path) -> Path:
    """examples/notify.yaml with the gate and the monitor's flags relaxed, in ``workdir/blueprints/``:
    the DAG, the jobs and training all use this one."""
    data = yaml.safe_load((REPO / "examples" / BLUEPRINT).read_text())
    data["model"]["thresholds"] = {**data["model"].get("thresholds", {}), **GATE}
    data["monitor"] = {**data.get("monitor", {}), **MONITOR_FLAGS}
    path = workdir / "blueprints" / BLUEPRINT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def upload_logs(emulator: Emulator, workdir: Path, first: date, days: int, decisions: int) -> None:
    """Simulated logs for ``days`` days (and the next, for the label horizon), per day of their
    first event, the next days' decisions as candidates, and the rehearsal's blueprint.

    The simulator makes its decisions through the decision client, whose ``JsonLinesSink``
    writes the log files (local files only: it rolls files over by size and age); they are
    uploaded unchanged, as a product's log shipper would, under the day of their first event.
    """
    blueprint = rehearsal_blueprint(workdir)
    simulated = workdir / "simulated"
    subprocess.run(
        [job_python(), "-m", "loopline.simulate", "--blueprint", str(blueprint),
         "--output", str(simulated), "--decisions", str(decisions), "--days", str(days + 1),
         "--start", first.isoformat(), "--seed", "11", "--overwrite"],
        cwd=REPO, env={**os.environ, "LOOPLINE_PII_KEY": PII_KEY}, check=True,
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    bucket = emulator.client().bucket(BUCKET)
    for path in sorted(simulated.glob("*.jsonl")):
        kind, _, stamp = path.name.partition("-")
        if kind not in ("decisions", "observations"):
            continue
        day = f"{stamp[0:4]}-{stamp[4:6]}-{stamp[6:8]}"
        bucket.blob(f"logs/{NAME}/{day}/{path.name}").upload_from_filename(str(path))
        if kind == "decisions":
            bucket.blob(f"candidates/{NAME}/{day}/{path.name}").upload_from_filename(str(path))
    bucket.blob(f"blueprints/{BLUEPRINT}").upload_from_filename(str(blueprint))


def airflow_env(emulator: Emulator, home: Path, blueprint_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "PYTHONPATH"))}
    return {
        **env,
        **VARIABLES,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGBAG_IMPORT_TIMEOUT": "300",
        "AIRFLOW__OPERATORS__DEFAULT_DEFERRABLE": "False",
        "AIRFLOW_CONN_GOOGLE_CLOUD_DEFAULT": json.dumps(
            {"conn_type": "google_cloud_platform", "extra": {"project": "loopline-rehearsal"}}
        ),
        "LOOPLINE_BLUEPRINTS_DIR": str(blueprint_dir),
        "STORAGE_EMULATOR_HOST": emulator.endpoint,
    }


def run_days(
    emulator: Emulator, workdir: Path, airflow_venv: Path, days: list[str], timeout_s: int = 3600
) -> dict:
    """``dag.test()`` for each of ``days`` in order; the result, with the jobs' journal."""
    home = workdir / "airflow_home"
    home.mkdir(parents=True, exist_ok=True)
    blueprint_dir = rehearsal_blueprint(workdir).parent
    env = airflow_env(emulator, home, blueprint_dir)
    migrate = subprocess.run(
        [str(airflow_venv / "bin" / "airflow"), "db", "migrate"],
        env=env, cwd=home, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    if migrate.returncode != 0:
        raise RuntimeError(f"airflow db migrate failed: {migrate.stderr[-3000:]}")
    journal = workdir / "journal.jsonl"
    settings = workdir / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "repo": str(REPO),
                "python": job_python(),
                "job_env": job_env(emulator),
                "journal": str(journal),
                "bucket": BUCKET,
                "blueprint_dir": str(blueprint_dir),
                "dag_id": f"loopline_{NAME}",
                "days": days,
            }
        )
    )
    log = workdir / "airflow_side.log"
    with log.open("w") as out:
        done = subprocess.run(
            [str(airflow_venv / "bin" / "python"), str(HERE / "airflow_side.py"), str(settings)],
            env=env, cwd=home, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=timeout_s,
        )  # fmt: skip
    marked = [line for line in log.read_text().splitlines() if line.startswith(RESULT_MARKER)]
    if done.returncode != 0 or len(marked) != 1:
        raise RuntimeError(f"the Airflow side failed (exit {done.returncode}); see {log}")
    result = json.loads(marked[0].removeprefix(RESULT_MARKER))
    result["jobs"] = (
        [json.loads(line) for line in journal.read_text().splitlines()] if journal.exists() else []
    )
    result["log"] = str(log)
    result["job_output"] = str(launchers.job_output(journal))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.rehearsal.rehearse")
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--first", default="2026-11-01", help="first logical day (YYYY-MM-DD)")
    parser.add_argument("--rerun", action="append", default=[], help="a day to run again after")
    parser.add_argument("--decisions", type=int, default=600, help="simulated decisions in all")
    parser.add_argument("--workdir", help="kept after the run (default: a temporary directory)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "tests"))
    from test_dags import ensure_airflow_venv

    airflow_venv = ensure_airflow_venv()
    first = date.fromisoformat(args.first)
    days = [(first + timedelta(days=i)).isoformat() for i in range(args.days)] + args.rerun
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="loopline-rehearsal-"))
    workdir.mkdir(parents=True, exist_ok=True)
    with gcs_emulator(workdir) as emulator:
        upload_logs(emulator, workdir, first, args.days, args.decisions)
        result = run_days(emulator, workdir, airflow_venv, days)
        result["bucket"] = emulator.names()
    for job in result["jobs"]:
        print(f"{job['kind']}: exit {job['returncode']} in {job['seconds']} s")
        if job["returncode"]:
            print("  " + job["stderr_tail"].strip().splitlines()[-1] if job["stderr_tail"] else "")
    for day in result["days"]:
        failed = {t: s for t, s in day["tasks"].items() if s not in ("success", "skipped")}
        print(f"{day['day']}: {day['state']} {failed or ''}")
    spans = [n for n in result["bucket"] if n.startswith(f"data/{NAME}/") and "manifest" in n]
    models = [n for n in result["bucket"] if n.startswith(f"serving/{NAME}/")]
    print(f"bucket: {len(result['bucket'])} objects; span manifests {spans}; serving {models}")
    if args.workdir:
        (workdir / "result.json").write_text(json.dumps(result, indent=1, sort_keys=True))
    print(f"workdir {workdir} (Airflow's log: airflow_side.log; the jobs: journal.jsonl)")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if all(d["state"] == "success" for d in result["days"]) else 1


if __name__ == "__main__":
    sys.exit(main())
