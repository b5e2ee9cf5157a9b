"""The daily Loopline DAG for one blueprint: wait for the day's logs and labels, join, monitor
the day's scored decisions, move the registry's aliases on the monitor's verdict, train, and
score the next day with both arms of the registry (bulk_score's rollout mode).

The order closes the loop within one run: the verdict on the challenger that served day D is
acted on (``promote``) before day D's training registers a new challenger, and the next day is
scored after both, with whatever the registry then calls ``production`` (and ``challenger``).
Scoring never waits for a new model: when the gate refuses one, or training fails, the
incumbent keeps scoring (``clear_score_output`` runs once training is done, whatever its
outcome). ``check_model_pushed`` only records in the log and as XCom whether training pushed.

Promotion runs ``python -m pipelines.promote`` in the released loopline image as a Cloud Run
job (``loopline-promote-<release>``, deployed by cloudbuild.yaml with that command), because
Composer's Airflow workers do not have the loopline stack (its TFX pins clash with Airflow's).
A Cloud Run job rather than a Kubernetes pod: its operator is in the Google provider the DAGs
already use (KubernetesPodOperator needs the cncf.kubernetes provider, and in Composer runs in
the environment's own cluster beside the Airflow workers; GKEStartPodOperator needs a GKE
cluster of our own), it runs serverless as the loopline service account, and each execution
is waited for, with its container output forwarded to the task log (``verbose``). The day's
paths are passed as the execution's container args. Promotion is skipped when the monitor
wrote no ``verdict.json`` (no scored decisions for the day, or no arms in them), and runs when
the monitor failed on a flag (that verdict rolls the challenger back); rerunning it on the same
verdict moves nothing twice.

A monitor or training failure does not stop the loop's other steps, so ``day_done`` (no work)
is the run's last task: it fails the run when the monitor, training or scoring failed.

Everything environment-specific comes from Airflow Variables at run time (never at parse time):

    loopline_project, loopline_region   where the Dataflow and Vertex AI jobs run
    loopline_bucket                     the bucket holding logs, spans, models and templates
    loopline_release                    the image and template tag built by cloudbuild.yaml
    loopline_service_account            the service account the jobs run as
    loopline_repository                 Artifact Registry repository (default "loopline")
                                        The release names the promote job too, so it must be
                                        lowercase letters, digits and hyphens (Cloud Run).
    loopline_alert_email                optional, see loopline_dags.alerts
    loopline_pii_key_secret             the pseudonymisation key's Secret Manager version
                                        (projects/P/secrets/S/versions/V); needed only by
                                        blueprints that pseudonymise (join, bulk scoring, and
                                        monitoring when it has training statistics)

Bucket layout (one day = one UTC date, ``{{ ds }}``; every path is a function of the blueprint
and the day, so re-running a day rewrites the same paths, which are cleared first):

    logs/<name>/<day>/decisions-*.jsonl, observations-*.jsonl   the product's logs
    work/<name>/<day>/observations/      the observation logs that can hold the day's labels
                                        (the day before through the label horizon's day),
                                        staged; the join reads them with the day as its
                                        --observations_from/--observations_until, so the
                                        other days' own observations are out of its range,
                                        never its orphans
    data/<name>/<day>/                   the join's span (manifest.json written last)
    pipeline_root/<name>/, serving/<name>/<version>/   TFX artifacts and pushed models
    serving/<name>/aliases.json          the registry: production, challenger, previous
    scores/<name>/<day>/                 bulk scores made for that day (by the previous run)
    monitor/<name>/<day>/                monitoring of that day's scored decisions
                                        (verdict.json: what promote acts on)
    templates/<release>/<pipeline>.json  Flex Template specs; train-<name>.json Vertex spec
    blueprints/<file>                    the blueprints the jobs read
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

from airflow.providers.google.cloud.operators.cloud_run import CloudRunExecuteJobOperator
from airflow.providers.google.cloud.operators.dataflow import DataflowStartFlexTemplateOperator
from airflow.providers.google.cloud.operators.gcs import GCSDeleteObjectsOperator
from airflow.providers.google.cloud.operators.vertex_ai.pipeline_job import (
    RunPipelineJobOperator,
)
from airflow.providers.google.cloud.sensors.gcs import GCSObjectsWithPrefixExistenceSensor
from airflow.providers.google.cloud.transfers.gcs_to_gcs import GCSToGCSOperator
from airflow.providers.standard.operators.empty import EmptyOperator
from airflow.providers.standard.operators.python import PythonOperator, ShortCircuitOperator
from airflow.providers.standard.sensors.date_time import DateTimeSensorAsync
from airflow.sdk import (
    DAG,
    CronDataIntervalTimetable,
    DeadlineAlert,
    DeadlineReference,
    SyncCallback,
    TriggerRule,
    chain,
)

from loopline_dags.alerts import alert_on_failure, deadline_missed
from loopline_dags.blueprints import BlueprintInfo
from loopline_dags.models import check_model_pushed, find_training_stats, verdict_written

# Observations may arrive this long after a decision's label window and still count; the join
# keeps decisions open as long (its --allowed_lateness).
ALLOWED_LATENESS = timedelta(hours=1)
# Loopline's JSON-lines logger finishes a file at most this long after opening it
# (JsonLinesSink max_age_s), so a log file holding an event appears at most this long after it.
LOG_FLUSH_DELAY = timedelta(hours=1)
# Expected processing once the labels are mature: join, training, scoring and monitoring.
PROCESSING_BUDGET = timedelta(hours=12)
START_DATE = datetime(2026, 1, 1, tzinfo=timezone.utc)
PIPELINES = ("join_decisions", "bulk_score", "monitor")
# How the next day is scored: bulk_score's rollout mode serves the registry's production and
# challenger models to their arms' units, the blueprint's fallback while production is null.
SCORING_ALIAS = "rollout"
VERDICT = "verdict.json"

BUCKET = "{{ var.value.loopline_bucket }}"
GS = "gs://{{ var.value.loopline_bucket }}"
PROJECT = "{{ var.value.loopline_project }}"
REGION = "{{ var.value.loopline_region }}"
RELEASE = "{{ var.value.loopline_release }}"
SERVICE_ACCOUNT = "{{ var.value.loopline_service_account }}"
PII_KEY_SECRET = "{{ var.value.loopline_pii_key_secret }}"
IMAGE = (
    "{{ var.value.loopline_region }}-docker.pkg.dev/{{ var.value.loopline_project }}/"
    "{{ var.value.get('loopline_repository', 'loopline') }}/loopline:{{ var.value.loopline_release }}"
)
NEXT_DS = "{{ macros.ds_add(ds, 1) }}"
PROMOTE_JOB = "loopline-promote-{{ var.value.loopline_release }}"
# The end of day {{ ds }} (UTC midnight after it). Everything is derived from ds, so a manual
# run for a day behaves like the scheduled one (a manual run's data interval is inferred
# differently from a scheduled run's).
DAY_END = "macros.datetime.fromisoformat(macros.ds_add(ds, 1) + 'T00:00:00+00:00')"


def label_horizon(info: BlueprintInfo) -> timedelta:
    """How long after the day ends its last decision's label is final."""
    return info.label_window + ALLOWED_LATENESS


def observation_days(info: BlueprintInfo) -> int:
    """How many log days hold observations for one day of decisions (the day itself onward)."""
    return 1 + math.ceil(label_horizon(info) / timedelta(days=1))


def observation_log_days(info: BlueprintInfo) -> range:
    """The log days (offsets from the day) the join reads observations from: the day before
    too, since a log file is filed under the day it was opened (up to ``LOG_FLUSH_DELAY``
    before its last event) and an observation may precede its decision by the backward slack."""
    return range(-1, observation_days(info))


def duration_param(delta: timedelta) -> str:
    """A duration as loopline's pipelines read it (whole seconds: ``3600s``)."""
    return f"{int(delta.total_seconds())}s"


def dag_id(info: BlueprintInfo) -> str:
    return f"loopline_{info.name}"


def flex_template_body(pipeline: str, job_name: str, info: BlueprintInfo, parameters: dict) -> dict:
    """The Flex Template launch request: the released spec, the released image, our SA."""
    return {
        "launchParameter": {
            "jobName": job_name,
            "containerSpecGcsPath": f"{GS}/templates/{RELEASE}/{pipeline}.json",
            "parameters": parameters,
            "environment": {
                "tempLocation": f"{GS}/tmp/{pipeline}",
                "stagingLocation": f"{GS}/staging/{pipeline}",
                "serviceAccountEmail": SERVICE_ACCOUNT,
                "sdkContainerImage": IMAGE,
                "additionalUserLabels": {
                    "loopline-blueprint": info.slug,
                    "loopline-day": "{{ ds }}",
                    "loopline-pipeline": pipeline.replace("_", "-"),
                },
            },
        }
    }


def _flex_template_job(
    task_id: str, pipeline: str, job: str, info: BlueprintInfo, parameters: dict, hours: int
) -> DataflowStartFlexTemplateOperator:
    """A Dataflow job from the released Flex Template of ``pipeline``, waited for, retried once.

    Its name is fixed per day (``loopline-<job>-<blueprint>-<day>``) and never suffixed, so a
    second launch for the same day is refused instead of running twice.
    """
    return DataflowStartFlexTemplateOperator(
        task_id=task_id,
        project_id=PROJECT,
        location=REGION,
        body=flex_template_body(
            pipeline, f"loopline-{job}-{info.slug}-{{{{ ds_nodash }}}}", info, parameters
        ),
        append_job_name=False,
        wait_until_finished=True,
        retries=1,
        execution_timeout=timedelta(hours=hours),
    )


class LooplinePipelineJobOperator(RunPipelineJobOperator):
    """RunPipelineJobOperator whose display name, job id and labels take the day's templates."""

    template_fields = (*RunPipelineJobOperator.template_fields, "display_name", "job_id", "labels")


def promote_args(serving_dir: str, verdict: str) -> list[str]:
    """The promote job's container args (its command is ``python -m pipelines.promote``)."""
    return ["--serving_dir", serving_dir, "--verdict", verdict]


def _wait_for_logs(task_id: str, prefix: str) -> GCSObjectsWithPrefixExistenceSensor:
    """A deferrable sensor that waits (up to 6 h, checking every 10 min) for a log prefix."""
    return GCSObjectsWithPrefixExistenceSensor(
        task_id=task_id,
        bucket=BUCKET,
        prefix=prefix,
        deferrable=True,
        poke_interval=600,
        timeout=timedelta(hours=6).total_seconds(),
        execution_timeout=None,
        retries=0,
    )


def build_dag(info: BlueprintInfo) -> DAG:
    """The daily DAG for one blueprint (dag_id ``loopline_<name>``)."""
    name, slug = info.name, info.slug
    blueprint = f"{GS}/blueprints/{info.file_name}"
    span = f"{GS}/data/{name}/{{{{ ds }}}}"
    staged_observations = f"work/{name}/{{{{ ds }}}}/observations/"
    horizon = label_horizon(info)
    horizon_end_s = int((horizon + LOG_FLUSH_DELAY).total_seconds())
    horizon_s = int(horizon.total_seconds())
    horizon_end = f"{{{{ ({DAY_END} + macros.timedelta(seconds={horizon_end_s})).isoformat() }}}}"
    horizon_ds = (
        f"{{{{ ({DAY_END} + macros.timedelta(seconds={horizon_s})).strftime('%Y-%m-%d') }}}}"
    )
    wait_time = horizon + LOG_FLUSH_DELAY
    # A template launcher has no per-run environment for the key: it reads it from Secret Manager.
    pii_key = {"pii_key_secret": PII_KEY_SECRET} if info.pseudonymises else {}

    with DAG(
        dag_id=dag_id(info),
        description=f"Loopline daily loop for blueprint {name} v{info.version}",
        doc_md=__doc__,
        # Data-interval schedule: the run for day D starts when D ends, and {{ ds }} is D.
        schedule=CronDataIntervalTimetable("0 0 * * *", timezone="UTC"),
        start_date=START_DATE,
        catchup=False,  # backfill past days explicitly: `airflow backfill create`
        max_active_runs=1,
        dagrun_timeout=wait_time + PROCESSING_BUDGET + timedelta(hours=12),
        # Airflow 3 has no task SLAs: a Deadline Alert fires when the day is not done in time.
        deadline=DeadlineAlert(
            reference=DeadlineReference.DAGRUN_LOGICAL_DATE,
            interval=timedelta(days=1) + wait_time + PROCESSING_BUDGET,
            callback=SyncCallback(deadline_missed, kwargs={"dag_id": dag_id(info)}),
        ),
        default_args={
            "owner": "loopline",
            "retries": 2,
            "retry_delay": timedelta(minutes=10),
            "retry_exponential_backoff": True,
            "max_retry_delay": timedelta(hours=1),
            "execution_timeout": timedelta(hours=2),
            "on_failure_callback": alert_on_failure,
        },
        tags=["loopline", name],
    ) as dag:
        wait_for_decision_logs = _wait_for_logs(
            "wait_for_decision_logs", f"logs/{name}/{{{{ ds }}}}/decisions-"
        )
        wait_for_label_window = DateTimeSensorAsync(
            task_id="wait_for_label_window",
            target_time=horizon_end,
            timeout=(wait_time + timedelta(hours=1)).total_seconds(),
            execution_timeout=None,
            retries=0,
        )
        wait_for_observation_logs = _wait_for_logs(
            "wait_for_observation_logs", f"logs/{name}/{horizon_ds}/observations-"
        )
        clear_day_outputs = GCSDeleteObjectsOperator(
            task_id="clear_day_outputs",
            bucket_name=BUCKET,
            prefix=[f"data/{name}/{{{{ ds }}}}/", staged_observations],
        )
        stage_observations = GCSToGCSOperator(
            task_id="stage_observations",
            source_bucket=BUCKET,
            source_objects=[
                f"logs/{name}/{{{{ macros.ds_add(ds, {day}) }}}}/observations-"
                for day in observation_log_days(info)
            ],
            destination_bucket=BUCKET,
            destination_object=staged_observations,
            replace=True,
        )
        join = _flex_template_job(
            "join",
            "join_decisions",
            "join",
            info,
            {
                "decisions": f"{GS}/logs/{name}/{{{{ ds }}}}/decisions-*.jsonl",
                "observations": f"{GS}/{staged_observations}*.jsonl",
                # The day's own observations; the staged logs around it only label its decisions.
                "observations_from": "{{ ds }}T00:00:00Z",
                "observations_until": f"{NEXT_DS}T00:00:00Z",
                "blueprint": blueprint,
                "output": span,
                "allowed_lateness": duration_param(ALLOWED_LATENESS),
                **pii_key,
            },
            hours=4,
        )
        serving_prefix = f"serving/{name}"
        monitor_prefix = f"monitor/{name}/{{{{ ds }}}}/"
        find_day_scores = GCSObjectsWithPrefixExistenceSensor(
            task_id="find_day_scores",
            bucket=BUCKET,
            prefix=f"scores/{name}/{{{{ ds }}}}/scores/",
            # No scores were made for this day (e.g. the first day): skip monitoring.
            soft_fail=True,
            poke_interval=30,
            timeout=120,
            retries=0,
        )
        clear_monitor_output = GCSDeleteObjectsOperator(
            task_id="clear_monitor_output",
            bucket_name=BUCKET,
            prefix=monitor_prefix,
        )
        training_stats = PythonOperator(
            task_id="find_training_stats",
            python_callable=find_training_stats,
            op_kwargs={"bucket": BUCKET, "serving_prefix": serving_prefix},
            retries=2,
            execution_timeout=timedelta(minutes=10),
        )
        monitor = _flex_template_job(
            "monitor",
            "monitor",
            "monitor",
            info,
            {
                "scores": f"{GS}/scores/{name}/{{{{ ds }}}}/scores/*.jsonl",
                "decisions": f"{GS}/logs/{name}/{{{{ ds }}}}/decisions-*.jsonl",
                "observations": f"{GS}/{staged_observations}*.jsonl",
                "blueprint": blueprint,
                "manifest": f"{span}/manifest.json",
                "output": f"{GS}/{monitor_prefix.rstrip('/')}",
                # The serving model's StatisticsGen output, for the skew report ("" = none).
                "training_stats": "{{ ti.xcom_pull(task_ids='find_training_stats') or '' }}",
                # With training statistics, the scored features are pseudonymised as in training.
                **pii_key,
            },
            hours=2,
        )
        find_verdict = ShortCircuitOperator(
            task_id="find_verdict",
            python_callable=verdict_written,
            op_kwargs={"bucket": BUCKET, "name": monitor_prefix + VERDICT},
            # Also after a failed monitor: a fired flag fails it and its verdict rolls back.
            trigger_rule=TriggerRule.NONE_SKIPPED,
            # Skip only promotion; training and scoring go on.
            ignore_downstream_trigger_rules=False,
            retries=2,
            execution_timeout=timedelta(minutes=10),
        )
        promote = CloudRunExecuteJobOperator(
            task_id="promote",
            project_id=PROJECT,
            region=REGION,
            job_name=PROMOTE_JOB,
            overrides={
                "container_overrides": [
                    {
                        "args": promote_args(
                            f"{GS}/{serving_prefix}", f"{GS}/{monitor_prefix}{VERDICT}"
                        )
                    }
                ],
                "task_count": 1,
            },
            verbose=True,
            retries=1,
            execution_timeout=timedelta(minutes=30),
        )
        train = LooplinePipelineJobOperator(
            task_id="train",
            project_id=PROJECT,
            region=REGION,
            display_name=f"loopline-train-{slug}-{{{{ ds_nodash }}}}",
            job_id=f"loopline-train-{slug}-{{{{ ds_nodash }}}}-{{{{ ti.try_number }}}}",
            template_path=f"{GS}/templates/{RELEASE}/train-{name}.json",
            pipeline_root=f"{GS}/pipeline_root/{name}",
            parameter_values={"examples": span},
            service_account=SERVICE_ACCOUNT,
            labels={"loopline-blueprint": slug, "loopline-day": "{{ ds }}"},
            enable_caching=False,
            # After the join, and after promotion when it ran (it may have been skipped); a
            # failed promotion (an invalid experiment) holds back new challengers.
            trigger_rule=TriggerRule.NONE_FAILED,
            retries=1,
            execution_timeout=timedelta(hours=8),
        )
        model_pushed = PythonOperator(
            task_id="check_model_pushed",
            python_callable=check_model_pushed,
            op_kwargs={"bucket": BUCKET, "serving_prefix": serving_prefix},
            retries=2,
            execution_timeout=timedelta(minutes=10),
        )
        clear_score_output = GCSDeleteObjectsOperator(
            task_id="clear_score_output",
            bucket_name=BUCKET,
            prefix=f"scores/{name}/{NEXT_DS}/",
            # The incumbent scores the next day whatever became of training.
            trigger_rule=TriggerRule.ALL_DONE,
        )
        bulk_score = _flex_template_job(
            "bulk_score",
            "bulk_score",
            "score",
            info,
            {
                # The product's candidates for the next day, scored by the registry's models.
                "input": f"{GS}/candidates/{name}/{NEXT_DS}/*.jsonl",
                "model_dir": f"{GS}/{serving_prefix}",
                "model_version": SCORING_ALIAS,
                "blueprint": blueprint,
                "output": f"{GS}/scores/{name}/{NEXT_DS}",
                # No --log_decisions: the product logs what it serves with the decision
                # client, and a job writes no raw feature (the blueprint's privacy).
                **pii_key,
            },
            hours=4,
        )
        # Fails the run when a step that others do not wait on failed (DAG run state follows
        # the last tasks only); skipped steps are fine.
        day_done = EmptyOperator(task_id="day_done", trigger_rule=TriggerRule.NONE_FAILED)

        chain(
            wait_for_decision_logs,
            wait_for_label_window,
            wait_for_observation_logs,
            clear_day_outputs,
            stage_observations,
            join,
            find_day_scores,
            clear_monitor_output,
            training_stats,
            monitor,
            find_verdict,
            promote,
            train,
            model_pushed,
            clear_score_output,
            bulk_score,
            day_done,
        )
        join >> train
        [monitor, model_pushed] >> day_done
    return dag
