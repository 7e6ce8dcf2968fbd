"""django-q2 background jobs. The sweep also runs inside every server process every few seconds; this
schedule is the backstop for when no server process is up to do it (django-q2 schedules are per minute).
Webhooks are sent only from here (tasks_app.webhooks), never from a server process."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

WEBHOOKS_SCHEDULE = "send webhook notifications"
RETENTION_SCHEDULE = "prune old artifacts and logs"
RETENTION_ACTOR = "system:retention"
# What a pruned attempt's log holds instead; logs that start with it are pruned already.
PRUNED_LOG_PREFIX = "[log pruned"


def sweep_job() -> dict:
    from agents_app.registry import forget_absent_agents

    from .actions import sweep

    # The backstop of every server process's sweepers, agents_app's forgetting of absent agents included.
    return {**sweep(), "agents_forgotten": forget_absent_agents()}


def prune_old_outputs() -> dict:
    """Retention (CP_RETENTION_DAYS; 0: keep forever): delete artifacts older than that, and empty the logs of
    attempts that finished before then, leaving one line saying so. Runs, tasks, attempts (results, errors,
    commits, usage) and the audit trail stay. A pass that pruned something writes one Event with its counts
    (actor system:retention). Safe to run from several processes at once: both are single statements."""
    from .audit import EventLog
    from .models import Artifact, Attempt

    days = settings.CP_RETENTION_DAYS
    if days <= 0:
        return {"artifacts": 0, "logs": 0}
    cutoff = timezone.now() - timedelta(days=days)
    marker = f"{PRUNED_LOG_PREFIX} on {timezone.now():%Y-%m-%d}: older than CP_RETENTION_DAYS ({days:g} days)]\n"
    with transaction.atomic():
        artifacts, _ = Artifact.objects.filter(created_at__lt=cutoff).delete()
        logs = (
            Attempt.objects.filter(finished_at__lt=cutoff)
            .exclude(log="")
            .exclude(log__startswith=PRUNED_LOG_PREFIX)
            .update(log=marker)
        )
        if artifacts or logs:
            events = EventLog(RETENTION_ACTOR)
            detail = {"artifacts": artifacts, "logs": logs, "older_than_days": days, "before": cutoff.isoformat()}
            events.add("retention", "", "pruned", detail=detail)
            with connection.cursor() as cur:
                events.write(cur)
    return {"artifacts": artifacts, "logs": logs}


def webhooks_job() -> dict:
    """Scan the audit trail for what webhooks want and send their due deliveries (for up to
    CP_WEBHOOK_WINDOW_S while a webhook is enabled)."""
    from .webhooks import run_job

    return run_job()


def ensure_schedules(**kwargs) -> None:
    from django_q.models import Schedule

    with transaction.atomic():
        Schedule.objects.update_or_create(
            name="sweep expired leases and silent agents",
            defaults={"func": "tasks_app.jobs.sweep_job", "schedule_type": Schedule.MINUTES, "minutes": 1,
                      "repeats": -1},
        )  # fmt: skip
        Schedule.objects.update_or_create(
            name=WEBHOOKS_SCHEDULE,
            defaults={"func": "tasks_app.jobs.webhooks_job", "schedule_type": Schedule.MINUTES, "minutes": 1,
                      "repeats": -1},
        )  # fmt: skip
        Schedule.objects.update_or_create(
            name=RETENTION_SCHEDULE,
            defaults={"func": "tasks_app.jobs.prune_old_outputs", "schedule_type": Schedule.HOURLY, "repeats": -1},
        )
