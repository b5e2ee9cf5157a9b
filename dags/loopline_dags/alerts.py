"""Alerting hooks for Loopline's DAGs: task failures and missed deadlines.

Every alert is logged at ERROR (Cloud Logging picks it up in Composer, where a log-based alert
policy can page). When the Airflow Variable ``loopline_alert_email`` is set, the alert is also
mailed through the SMTP provider (configure the ``smtp_default`` connection).

Airflow 3 removed task SLAs; a DAG's lateness is watched by a Deadline Alert instead (see
``deadline_missed``), and each task's own hang by ``execution_timeout``.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("loopline.alerts")

ALERT_EMAIL_VARIABLE = "loopline_alert_email"


def failure_message(context: dict[str, Any]) -> str:
    """One line naming the DAG, the task, the day and the error."""
    ti = context.get("task_instance") or context.get("ti")
    dag_id = getattr(ti, "dag_id", None) or context.get("dag_id", "?")
    task_id = getattr(ti, "task_id", "?")
    try_number = getattr(ti, "try_number", "?")
    return (
        f"Loopline task failed: {dag_id}.{task_id} for {context.get('ds', '?')} "
        f"(try {try_number}): {context.get('exception')!r}"
    )


def _mail(subject: str, body: str, context: dict[str, Any]) -> None:
    from airflow.sdk import Variable

    to = Variable.get(ALERT_EMAIL_VARIABLE, default=None)
    if not to:
        return
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier

    SmtpNotifier(to=to, subject=subject, html_content=f"<pre>{body}</pre>").notify(context)


def alert_on_failure(context: dict[str, Any]) -> None:
    """``on_failure_callback`` for every Loopline task (after its last retry)."""
    message = failure_message(context)
    log.error(message)
    try:
        _mail(message, message, context)
    except Exception:  # an alerting outage must not hide the original failure
        log.exception("could not mail the Loopline failure alert")


def deadline_missed(context: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """Deadline Alert callback: the day's run is not finished when it should have been."""
    context = context or {}
    dag_run = context.get("dag_run") or {}
    run = getattr(dag_run, "run_id", None) or (
        dag_run.get("run_id") if isinstance(dag_run, dict) else None
    )
    message = f"Loopline run missed its deadline: {kwargs.get('dag_id', '?')} run {run} {kwargs}"
    log.error(message)
    try:
        _mail(message, message, context)
    except Exception:
        log.exception("could not mail the Loopline deadline alert")
