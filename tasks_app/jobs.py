"""django-q2 background jobs. The sweep also runs inside every server process every few seconds; this
schedule is the backstop for when no server process is up to do it (django-q2 schedules are per minute)."""

from __future__ import annotations

from django.db import transaction


def sweep_job() -> dict:
    from .actions import sweep

    return sweep()


def ensure_schedules(**kwargs) -> None:
    from django_q.models import Schedule

    with transaction.atomic():
        Schedule.objects.update_or_create(
            name="sweep expired leases and silent agents",
            defaults={"func": "tasks_app.jobs.sweep_job", "schedule_type": Schedule.MINUTES, "minutes": 1,
                      "repeats": -1},
        )  # fmt: skip
