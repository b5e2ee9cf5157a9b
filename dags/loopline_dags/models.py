"""Did the day's training push a model? (the branch before bulk scoring)

The Pusher pushes each blessed model to ``SERVING_DIR/<version>/``, where ``version`` is the
push time in epoch seconds (DESIGN.md, "Model serving contract"). The training task returns the
Vertex AI pipeline job (its ``createTime``), so a model was pushed by this day's run exactly
when the newest version under the serving dir is not older than that job. Re-running the branch
for the same day gives the same answer, and scoring then uses that exact version.

    >>> newest_version(["1762000000/", "1762000000.record.json", "1762003600/saved_model.pb"])
    1762003600
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any


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
    """ShortCircuitOperator callable: the pushed version (truthy, kept as XCom) or None."""
    from airflow.providers.google.cloud.hooks.gcs import GCSHook

    job = context["ti"].xcom_pull(task_ids="train")
    names = GCSHook().list(bucket, prefix=serving_prefix.rstrip("/") + "/", delimiter="/")
    version = pushed_version([n[len(serving_prefix.rstrip("/")) + 1 :] for n in names], job)
    print(f"newest pushed version under gs://{bucket}/{serving_prefix}: {version or 'none new'}")
    return version
