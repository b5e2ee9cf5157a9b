"""Checks of dags/ that run INSIDE the Airflow environment (.venv-airflow), not under pytest.

tests/test_dags.py builds that environment, migrates a throwaway metadata database and runs
this file with ``AIRFLOW_HOME``, ``AIRFLOW__CORE__DAGS_FOLDER`` and the ``AIRFLOW_VAR_LOOPLINE_*``
Variables set; it prints one JSON document with what it found and exits non-zero on the first
failed check, naming it. Cloud services are never called: rendering a template reads only the
Variables, and no task is executed.

    .venv-airflow/bin/python tests/airflow_checks.py REPO_ROOT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LOGICAL_DATE = "2026-11-01T00:00:00+00:00"
# Each task's upstream tasks: a chain from the sensors to day_done, plus training waiting for
# the join itself (promotion may be skipped) and day_done for the steps nothing else waits on.
EXPECTED_UPSTREAM = {
    "wait_for_decision_logs": [],
    "wait_for_label_window": ["wait_for_decision_logs"],
    "wait_for_observation_logs": ["wait_for_label_window"],
    "clear_day_outputs": ["wait_for_observation_logs"],
    "stage_observations": ["clear_day_outputs"],
    "join": ["stage_observations"],
    "find_day_scores": ["join"],
    "clear_monitor_output": ["find_day_scores"],
    "find_training_stats": ["clear_monitor_output"],
    "monitor": ["find_training_stats"],
    "find_verdict": ["monitor"],
    "promote": ["find_verdict"],
    "train": ["join", "promote"],
    "check_model_pushed": ["train"],
    "clear_score_output": ["check_model_pushed"],
    "bulk_score": ["clear_score_output"],
    "day_done": ["bulk_score", "check_model_pushed", "monitor"],
}
EXPECTED_TASKS = list(EXPECTED_UPSTREAM)
# Trigger rules other than all_success, and why.
EXPECTED_TRIGGER_RULES = {
    "find_verdict": "none_skipped",  # also after a monitor failed on a flag
    "train": "none_failed",  # after the join, whether or not promotion ran
    "clear_score_output": "all_done",  # the incumbent scores whatever became of training
    "day_done": "none_failed",  # the run fails when any step failed
}
RESULT_MARKER = "AIRFLOW_CHECKS_RESULT "
PII_KEY_SECRET = "projects/acme-ml/secrets/loopline-pii-key/versions/3"  # test_dags' Variable
FLEX_TASKS = {"join": "join_decisions", "bulk_score": "bulk_score", "monitor": "monitor"}


class CheckFailed(AssertionError):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def load_dagbag(dags: Path):
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import DagBag, sync_bag_to_db

    bag = DagBag(dag_folder=str(dags))
    check(not bag.import_errors, f"DAG import errors: {bag.import_errors}")
    # The scheduler's view: serialized into the metadata DB, as the DAG processor does.
    DagBundlesManager().sync_bundles_to_db()
    sync_bag_to_db(bag, "dags-folder", None)
    return bag


def upstream_map(dag) -> dict[str, list[str]]:
    return {t.task_id: sorted(t.upstream_task_ids) for t in dag.tasks}


# What upstream tasks return, for templates that pull XComs: rendering outside a running task
# has no XCom backend to ask (the task runner's supervisor), so this stands in for it.
STATS_URI = "gs://acme-loopline/pipeline_root/notify/StatisticsGen/statistics/12"
XCOMS = {"check_model_pushed": "1793599000", "find_training_stats": STATS_URI}


class _TaskInstanceWithXComs:
    """The rendering context's task instance, answering xcom_pull from XCOMS."""

    def __init__(self, ti, xcoms: dict):
        self._ti, self._xcoms = ti, xcoms

    def xcom_pull(self, task_ids=None, key="return_value", **_):
        return self._xcoms[task_ids]

    def __getattr__(self, name):
        return getattr(self._ti, name)


def render(dag, task_id: str) -> dict:
    """The task's templated fields rendered for LOGICAL_DATE, as `airflow tasks render` does."""
    from airflow.cli.commands.task_command import _get_template_context, _get_ti
    from airflow.serialization.serialized_objects import DagSerialization

    scheduler_dag = DagSerialization.from_dict(DagSerialization.to_dict(dag))
    ti, _ = _get_ti(
        scheduler_dag.get_task(task_id),
        -1,
        logical_date_or_run_id=LOGICAL_DATE,
        create_if_necessary="memory",
    )
    task = dag.get_task(task_id)
    context = _get_template_context(ti, task)
    context["ti"] = context["task_instance"] = _TaskInstanceWithXComs(context["ti"], XCOMS)
    task.render_template_fields(context)
    return {field: getattr(task, field) for field in task.template_fields}


def check_dag(dag, repo: Path, blueprint_name: str) -> dict:
    from datetime import timedelta

    found: dict = {"dag_id": dag.dag_id}
    check(dag.dag_id == f"loopline_{blueprint_name}", f"dag id {dag.dag_id}")
    check(
        sorted(t.task_id for t in dag.tasks) == sorted(EXPECTED_TASKS),
        f"{dag.dag_id} tasks: {sorted(t.task_id for t in dag.tasks)}",
    )
    upstream = upstream_map(dag)
    for task_id, expected in EXPECTED_UPSTREAM.items():
        check(
            upstream[task_id] == expected,
            f"{task_id} runs after {upstream[task_id]}, not {expected}",
        )
    found["upstream"] = upstream
    found["trigger_rules"] = {
        t.task_id: str(getattr(t.trigger_rule, "value", t.trigger_rule)) for t in dag.tasks
    }
    for task in dag.tasks:
        rule = found["trigger_rules"][task.task_id]
        expected_rule = EXPECTED_TRIGGER_RULES.get(task.task_id, "all_success")
        check(rule == expected_rule, f"{task.task_id} trigger rule {rule}, not {expected_rule}")

    check(dag.max_active_runs == 1, "max_active_runs must be 1")
    check(dag.catchup is False, "catchup must be off")
    check(
        dag.dagrun_timeout is not None and dag.dagrun_timeout > timedelta(hours=12),
        f"dagrun_timeout {dag.dagrun_timeout}",
    )
    check(bool(dag.deadline), "a Deadline Alert watches the run")
    check(
        type(dag.timetable).__name__ == "CronDataIntervalTimetable",
        f"timetable {type(dag.timetable).__name__}",
    )
    for task in dag.tasks:
        check(task.on_failure_callback, f"{task.task_id} has no on_failure_callback")
        if task.task_id.startswith("wait_") or task.task_id == "find_day_scores":
            check(task.timeout is not None and task.timeout > 0, f"{task.task_id} timeout")
        else:
            check(task.execution_timeout is not None, f"{task.task_id} has no execution_timeout")
            check(task.retries >= 1, f"{task.task_id} is never retried")
    for task_id in ("wait_for_decision_logs", "wait_for_label_window", "wait_for_observation_logs"):
        task = dag.get_task(task_id)
        check(
            getattr(task, "deferrable", True) or "Async" in type(task).__name__,
            f"{task_id} should defer",
        )
    check(
        type(dag.get_task("check_model_pushed")).__name__ == "PythonOperator",
        "the model check records the push and gates nothing",
    )
    check(
        dag.get_task("find_verdict").ignore_downstream_trigger_rules is False,
        "a missing verdict must skip only promotion",
    )
    check(dag.get_task("find_day_scores").soft_fail, "a day without scores skips monitoring")

    rendered = {task_id: render(dag, task_id) for task_id in EXPECTED_TASKS}
    found["rendered"] = rendered
    return found


def check_notify_rendering(rendered: dict, repo: Path) -> None:
    """Every path and name for 2026-11-01 of the example blueprint (window 1h, lateness 1h)."""
    gs = "gs://acme-loopline"
    image = "europe-west4-docker.pkg.dev/acme-ml/loopline/loopline:v7"
    sa = "loopline@acme-ml.iam.gserviceaccount.com"

    check(
        rendered["wait_for_decision_logs"]["prefix"] == "logs/notify/2026-11-01/decisions-",
        f"decision sensor prefix {rendered['wait_for_decision_logs']['prefix']}",
    )
    check(rendered["wait_for_decision_logs"]["bucket"] == "acme-loopline", "sensor bucket")
    # The day ends 2026-11-02T00:00Z; + 1h window + 1h lateness + 1h log flush.
    check(
        rendered["wait_for_label_window"]["target_time"] == "2026-11-02T03:00:00+00:00",
        f"label window target {rendered['wait_for_label_window']['target_time']}",
    )
    check(
        rendered["wait_for_observation_logs"]["prefix"] == "logs/notify/2026-11-02/observations-",
        f"observation sensor prefix {rendered['wait_for_observation_logs']['prefix']}",
    )
    check(
        rendered["clear_day_outputs"]["prefix"]
        == ["data/notify/2026-11-01/", "work/notify/2026-11-01/observations/"],
        f"cleared {rendered['clear_day_outputs']['prefix']}",
    )
    stage = rendered["stage_observations"]
    check(
        stage["source_objects"]
        == [
            "logs/notify/2026-10-31/observations-",
            "logs/notify/2026-11-01/observations-",
            "logs/notify/2026-11-02/observations-",
        ],
        f"staged {stage['source_objects']}",
    )
    check(stage["destination_object"] == "work/notify/2026-11-01/observations/", "staging dir")

    join = rendered["join"]
    launch = join["body"]["launchParameter"]
    check(join["project_id"] == "acme-ml" and join["location"] == "europe-west4", "join project")
    check(launch["jobName"] == "loopline-join-notify-20261101", f"job name {launch['jobName']}")
    check(
        launch["containerSpecGcsPath"] == f"{gs}/templates/v7/join_decisions.json",
        launch["containerSpecGcsPath"],
    )
    check(
        launch["parameters"]
        == {
            "decisions": f"{gs}/logs/notify/2026-11-01/decisions-*.jsonl",
            "observations": f"{gs}/work/notify/2026-11-01/observations/*.jsonl",
            "observations_from": "2026-11-01T00:00:00Z",
            "observations_until": "2026-11-02T00:00:00Z",
            "blueprint": f"{gs}/blueprints/notify.yaml",
            "output": f"{gs}/data/notify/2026-11-01",
            "allowed_lateness": "3600s",
            # notify pseudonymises user_id: the launcher reads the key from Secret Manager.
            "pii_key_secret": PII_KEY_SECRET,
        },
        f"join parameters {launch['parameters']}",
    )
    env = launch["environment"]
    check(env["sdkContainerImage"] == image, f"image {env['sdkContainerImage']}")
    check(env["serviceAccountEmail"] == sa, "service account")
    check(env["tempLocation"] == f"{gs}/tmp/join_decisions", env["tempLocation"])
    check(env["additionalUserLabels"]["loopline-day"] == "2026-11-01", "labels")

    train = rendered["train"]
    check(train["display_name"] == "loopline-train-notify-20261101", train["display_name"])
    check(train["job_id"] == "loopline-train-notify-20261101-0", f"job id {train['job_id']}")
    check(train["template_path"] == f"{gs}/templates/v7/train-notify.json", train["template_path"])
    check(train["pipeline_root"] == f"{gs}/pipeline_root/notify", train["pipeline_root"])
    check(
        train["parameter_values"] == {"examples": f"{gs}/data/notify/2026-11-01"},
        f"train parameters {train['parameter_values']}",
    )
    check(train["region"] == "europe-west4" and train["project_id"] == "acme-ml", "train project")

    check(
        rendered["clear_score_output"]["prefix"] == "scores/notify/2026-11-02/",
        rendered["clear_score_output"]["prefix"],
    )
    score = rendered["bulk_score"]["body"]["launchParameter"]
    check(score["jobName"] == "loopline-score-notify-20261101", score["jobName"])
    check(
        score["parameters"]["input"] == f"{gs}/candidates/notify/2026-11-02/*.jsonl",
        score["parameters"]["input"],
    )
    check(
        score["parameters"]["output"] == f"{gs}/scores/notify/2026-11-02",
        score["parameters"]["output"],
    )
    check(score["parameters"]["model_dir"] == f"{gs}/serving/notify", "model dir")
    check(
        score["parameters"]["model_version"] == "rollout",
        f"scores both arms of the rollout, not {score['parameters']['model_version']}",
    )
    check(score["parameters"]["pii_key_secret"] == PII_KEY_SECRET, "scoring gets the key secret")

    check(
        rendered["find_day_scores"]["prefix"] == "scores/notify/2026-11-01/scores/",
        rendered["find_day_scores"]["prefix"],
    )
    monitor = rendered["monitor"]["body"]["launchParameter"]
    check(monitor["jobName"] == "loopline-monitor-notify-20261101", monitor["jobName"])
    check(
        monitor["parameters"]["output"] == f"{gs}/monitor/notify/2026-11-01",
        monitor["parameters"]["output"],
    )
    check(
        monitor["parameters"]["manifest"] == f"{gs}/data/notify/2026-11-01/manifest.json",
        monitor["parameters"]["manifest"],
    )
    check(
        monitor["parameters"]["training_stats"] == STATS_URI,
        f"monitor training_stats {monitor['parameters']['training_stats']}",
    )
    check(
        rendered["clear_monitor_output"]["prefix"] == "monitor/notify/2026-11-01/",
        rendered["clear_monitor_output"]["prefix"],
    )
    check(
        rendered["find_training_stats"]["op_kwargs"]
        == {"bucket": "acme-loopline", "serving_prefix": "serving/notify"},
        f"statistics lookup {rendered['find_training_stats']['op_kwargs']}",
    )
    check(
        rendered["find_verdict"]["op_kwargs"]
        == {"bucket": "acme-loopline", "name": "monitor/notify/2026-11-01/verdict.json"},
        f"verdict lookup {rendered['find_verdict']['op_kwargs']}",
    )
    promote = rendered["promote"]
    check(promote["job_name"] == "loopline-promote-v7", f"promote job {promote['job_name']}")
    check(
        promote["project_id"] == "acme-ml" and promote["region"] == "europe-west4",
        "promote project",
    )
    check(
        promote["overrides"]["container_overrides"][0]["args"]
        == [
            "--serving_dir",
            f"{gs}/serving/notify",
            "--verdict",
            f"{gs}/monitor/notify/2026-11-01/verdict.json",
        ],
        f"promote args {promote['overrides']}",
    )


def check_parameters_match_templates(rendered: dict, repo: Path) -> None:
    """Each Flex Template launch passes only parameters its template declares, and all the
    required ones."""
    for task_id, pipeline in FLEX_TASKS.items():
        metadata_path = repo / "templates" / pipeline / "metadata.json"
        check(metadata_path.exists(), f"{task_id} launches a template with no {metadata_path}")
        declared = json.loads(metadata_path.read_text())["parameters"]
        names = {p["name"] for p in declared}
        required = {p["name"] for p in declared if not p.get("isOptional", False)}
        given = set(rendered[task_id]["body"]["launchParameter"]["parameters"])
        check(given <= names, f"{task_id} passes undeclared parameters {sorted(given - names)}")
        check(required <= given, f"{task_id} misses required parameters {sorted(required - given)}")


def check_model_branch() -> None:
    """The pushed-model check and the statistics lookup on data like the serving dir's (no GCS
    call)."""
    from loopline_dags.models import find_record, production_model_id, pushed_version

    job = {"createTime": "2026-11-02T05:00:00Z"}  # epoch 1793595600
    check(
        pushed_version(["1793590000/", "1793599000/", "1793599000.record.json"], job)
        == "1793599000",
        "a version pushed after the job started is this run's",
    )
    check(
        pushed_version(["1793590000/", "1793590000.record.json"], job) is None,
        "an older version is not this run's push",
    )
    check(pushed_version([], job) is None, "an empty serving dir has no push")
    try:
        pushed_version(["1793599000/"], None)
    except ValueError:
        pass
    else:
        raise CheckFailed("a missing training job must fail the check")
    check(production_model_id({"production": None, "challenger": "c1"}) is None, "no production")
    records = [("serving/notify/1.record.json", {"model_id": "p1", "statistics": {"uri": "u"}})]
    check(find_record(records, "p1") == records[0], "the production record is found by id")


def main(repo: Path) -> dict:
    sys.path.insert(0, str(repo / "dags"))
    from loopline_dags.blueprints import find_blueprints

    bag = load_dagbag(repo / "dags")
    blueprints = find_blueprints(repo / "examples")
    check(
        sorted(bag.dag_ids) == sorted(f"loopline_{b.name}" for b in blueprints),
        f"one DAG per blueprint: {sorted(bag.dag_ids)} for {[b.name for b in blueprints]}",
    )
    report = {"dag_ids": sorted(bag.dag_ids), "dags": {}}
    for info in blueprints:
        found = check_dag(bag.dags[f"loopline_{info.name}"], repo, info.name)
        check_parameters_match_templates(found["rendered"], repo)
        if info.name == "notify":
            check_notify_rendering(found["rendered"], repo)
        report["dags"][found["dag_id"]] = found
    check_model_branch()
    return report


if __name__ == "__main__":
    try:
        result = main(Path(sys.argv[1]).resolve())
    except CheckFailed as e:
        print(f"AIRFLOW CHECK FAILED: {e}", file=sys.stderr)
        sys.exit(1)
    # One marked line: Airflow's own logging shares stdout.
    print(RESULT_MARKER + json.dumps(result, default=str, sort_keys=True))
