"""django-q2 background jobs. The sweep also runs inside every server process every few seconds; this
schedule is the backstop for when no server process is up to do it (django-q2 schedules are per minute).
Webhooks are sent only from here (tasks_app.webhooks), never from a server process."""

from __future__ import annotations

from django.db import transaction

WEBHOOKS_SCHEDULE = "send webhook notifications"


def sweep_job() -> dict:
    from .actions import sweep

    return sweep()


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
