"""What the DAG reads from the serving dir (the model registry) with the GCS hook alone.

Did the day's training push a model? The Pusher pushes each blessed model to
``SERVING_DIR/<version>/``, where ``version`` is the push time in epoch seconds (DESIGN.md,
"Model serving contract"), and the training pipeline registers it as the ``challenger``. The
training task returns the Vertex AI pipeline job (its ``createTime``), so a model was pushed by
this day's run exactly when the newest version under the serving dir is not older than that
job. The answer is logged and kept as XCom for the record; it gates nothing: the next day is
scored with the ``production`` alias whether or not a model was pushed (the incumbent keeps
scoring when the gate refuses a new model).

Which statistics was the serving model trained on? ``aliases.json`` names the production
model id (until the first promotion, when production is the blueprint's fallback and no model,
the challenger's: the only model that scored); its record (``SERVING_DIR/<version>.record.json``)
names the StatisticsGen output (``"statistics": {"uri": ...}``), which the monitor compares the
scored features with (skew).

    >>> newest_version(["1762000000/", "1762000000.record.json", "1762003600/saved_model.pb"])
    1762003600
    >>> training_statistics({"model_id": "a0c5", "statistics": {"uri": "gs://b/root/Stat/7"}})
    'gs://b/root/Stat/7'
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import datetime
from typing import Any

ALIASES = "aliases.json"
RECORD_SUFFIX = ".record.json"


def newest_version(names: Iterable[str]) -> int | None:
    """The largest integer directory name among names relative to the serving dir, or None."""
    versions = set()
    for name in names:
        head, slash, _ = name.partition("/")
        if slash and head.isdigit():
            versions.add(int(head))
    return max(versions) if versions else None


def job_created_epoch(pipeline_job: dict[str, Any] | None) -> float:
    """The creation time of a Vertex AI pipeline job (as the operator returns it), epoch s."""
    if not pipeline_job:
        raise ValueError("the training task returned no pipeline job to compare pushes with")
    created = pipeline_job.get("createTime") or pipeline_job.get("create_time")
    if not created:
        raise ValueError("the training pipeline job has no createTime")
    if isinstance(created, datetime):
        return created.timestamp()
    return datetime.fromisoformat(str(created).replace("Z", "+00:00")).timestamp()


def pushed_version(object_names: Iterable[str], pipeline_job: dict[str, Any] | None) -> str | None:
    """The version pushed by this pipeline job, as a string, or None if it pushed none."""
    newest = newest_version(object_names)
    if newest is None or newest < job_created_epoch(pipeline_job):
        return None
    return str(newest)


def check_model_pushed(bucket: str, serving_prefix: str, **context: Any) -> str | None:
    """PythonOperator callable: the version this day's training pushed (XCom), or None."""
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    job = context["ti"].xcom_pull(task_ids="train")
    names = GCSHook().list(bucket, prefix=serving_prefix.rstrip("/") + "/", delimiter="/")
    version = pushed_version([n[len(serving_prefix.rstrip("/")) + 1 :] for n in names], job)
    if version:
        print(f"training pushed version {version} to gs://{bucket}/{serving_prefix} (challenger)")
    else:
        print(f"training pushed no model; the production model keeps scoring ({bucket})")
    return version


def production_model_id(aliases: Any) -> str | None:
    """The model id ``aliases.json`` names as production, or None (no production model yet)."""
    return alias_model_id(aliases, "production")


def alias_model_id(aliases: Any, alias: str) -> str | None:
    """The model id ``aliases.json`` names as ``alias``, or None (none yet)."""
    if not isinstance(aliases, dict):
        raise ValueError(f"{ALIASES} is not a JSON object")
    model_id = aliases.get(alias)
    if model_id is not None and not isinstance(model_id, str):
        raise ValueError(f"{ALIASES}: {alias} must be a model id or null, not {model_id!r}")
    return model_id or None


def serving_model_id(aliases: Any) -> tuple[str, str] | None:
    """(alias, model id) of the model whose training data the scored features are compared
    with: production's, else the challenger's (before the first promotion production is the
    fallback policy, and the challenger the only model scoring), else None."""
    for alias in ("production", "challenger"):
        model_id = alias_model_id(aliases, alias)
        if model_id is not None:
            return alias, model_id
    return None


def training_statistics(record: Any) -> str | None:
    """The StatisticsGen output a model record says the model was trained on, or None."""
    if not isinstance(record, dict):
        return None
    statistics = record.get("statistics")
    if isinstance(statistics, dict):
        statistics = statistics.get("uri")
    return statistics if isinstance(statistics, str) and statistics else None


def record_names(names: Iterable[str], prefix: str) -> list[str]:
    """The model records (``<prefix><version>.record.json``) among object ``names`` listed under
    the serving ``prefix``; files inside version directories are not records."""
    return [n for n in names if n.endswith(RECORD_SUFFIX) and "/" not in n[len(prefix) :]]


def find_record(records: Iterable[tuple[str, Any]], model_id: str) -> tuple[str, dict] | None:
    """The (name, record) among ``records`` whose ``model_id`` is ``model_id``, or None.

    A record written before the registry had ids is found by its name (``<blueprint>-<version>``)
    or its version, as the registry itself resolves them."""
    for name, record in records:
        if not isinstance(record, dict):
            continue
        ids = (record.get("model_id"), record.get("name"), str(record.get("version")))
        if model_id in ids:
            return name, record
    return None


def find_training_stats(bucket: str, serving_prefix: str, **_: Any) -> str:
    """PythonOperator callable: the serving model's training statistics uri (XCom; production's,
    else the challenger's), or "" when there is no model yet or its record names none (the
    monitor then makes no skew report; the reason is logged)."""
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    hook = GCSHook()
    prefix = serving_prefix.rstrip("/") + "/"
    where = f"gs://{bucket}/{prefix}"
    if not hook.exists(bucket, prefix + ALIASES):
        print(f"no {ALIASES} in {where}: no production model, no training statistics for skew")
        return ""
    serving = serving_model_id(json.loads(hook.download(bucket, prefix + ALIASES)))
    if serving is None:
        print(f"{where}{ALIASES} names no model: no training statistics for skew")
        return ""
    alias, model_id = serving
    # No delimiter: GCSHook.list returns only the "directories" when a level has any, and the
    # records sit beside the version directories.
    names = record_names(hook.list(bucket, prefix=prefix), prefix)
    found = find_record(((n, json.loads(hook.download(bucket, n))) for n in names), model_id)
    if found is None:
        # A version pushed before the registry wrote records: serveable, but nothing says
        # what it was trained on.
        print(f"{alias} model {model_id} has no record in {where}: no skew report")
        return ""
    name, record = found
    uri = training_statistics(record)
    if uri is None:
        print(f"record gs://{bucket}/{name} names no training statistics: no skew report")
        return ""
    print(f"{alias} model {model_id} was trained on statistics {uri}")
    return uri


def verdict_written(bucket: str, name: str, **_: Any) -> bool:
    """ShortCircuitOperator callable: did the monitor write its verdict (``name``)?"""
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    if GCSHook().exists(bucket, name):
        print(f"monitor verdict gs://{bucket}/{name}: promoting on it")
        return True
    print(f"no monitor verdict at gs://{bucket}/{name} (no arms scored that day): no promotion")
    return False
