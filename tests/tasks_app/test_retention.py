"""Retention (issue 14, item 6): artifacts and attempt logs older than CP_RETENTION_DAYS are pruned by a
django-q2 job, one audited Event a pass; 0 keeps them forever."""

import hashlib
from datetime import timedelta

import pytest
from django.utils import timezone

from tasks_app import actions, jobs
from tasks_app.models import Artifact, Attempt, Event, Task
from tests.conftest import doc

pytestmark = pytest.mark.django_db


def _attempt_with_outputs(submit, make_agent, key: str, days_ago: float) -> Attempt:
    """A finished attempt with a log and one artifact, finished (and its artifact made) `days_ago`."""
    submit(doc({"key": key}, name=f"run-{key}"))
    agent = make_agent(f"agent-{key}", labels=[])
    got = actions.claim_ready_tasks(agent, 1)[0]
    actions.record_progress(agent, got["attempt_id"], 0.5, "working", f"the log of {key}\n")
    content = f"report of {key}".encode()
    actions.add_artifact(agent, got["attempt_id"], name="report.txt", content=content,
                         sha256=hashlib.sha256(content).hexdigest(), content_type="text/plain")  # fmt: skip
    actions.complete_attempt(agent, got["attempt_id"], "succeeded", {"out": key}, "", 0)
    when = timezone.now() - timedelta(days=days_ago)
    Attempt.objects.filter(pk=got["attempt_id"]).update(finished_at=when)
    Artifact.objects.filter(attempt_id=got["attempt_id"]).update(created_at=when)
    return Attempt.objects.get(pk=got["attempt_id"])


def test_outputs_older_than_the_retention_days_are_pruned_with_one_event(submit, make_agent, settings):
    settings.CP_RETENTION_DAYS = 30
    old = _attempt_with_outputs(submit, make_agent, "old", 31)
    new = _attempt_with_outputs(submit, make_agent, "new", 29)

    assert jobs.prune_old_outputs() == {"artifacts": 1, "logs": 1}
    assert not Artifact.objects.filter(attempt=old).exists()
    assert Artifact.objects.filter(attempt=new).count() == 1
    old.refresh_from_db()
    assert old.log.startswith("[log pruned") and "CP_RETENTION_DAYS (30 days)" in old.log
    assert old.log.count("\n") == 1  # one marker line, nothing of the log
    assert Attempt.objects.get(pk=new.pk).log == "the log of new\n"
    # The rest of the history stays: the attempt, its result, its task's state, the task's audit trail.
    assert old.result == {"out": "old"} and old.state == "succeeded"
    assert Task.objects.get(pk=old.task_id).state == "succeeded"
    assert Event.objects.filter(task_id=old.task_id).exists()
    [event] = Event.objects.filter(kind="retention")
    assert event.actor == "system:retention" and event.to_state == "pruned"
    assert event.detail["artifacts"] == 1 and event.detail["logs"] == 1 and event.detail["older_than_days"] == 30

    # A second pass finds nothing more (a pruned log is not pruned again) and writes no Event.
    assert jobs.prune_old_outputs() == {"artifacts": 0, "logs": 0}
    assert Event.objects.filter(kind="retention").count() == 1


def test_the_setting_moves_the_cutoff(submit, make_agent, settings):
    attempt = _attempt_with_outputs(submit, make_agent, "week", 8)
    settings.CP_RETENTION_DAYS = 30
    assert jobs.prune_old_outputs() == {"artifacts": 0, "logs": 0}
    settings.CP_RETENTION_DAYS = 7
    assert jobs.prune_old_outputs() == {"artifacts": 1, "logs": 1}
    assert Attempt.objects.get(pk=attempt.pk).log.startswith("[log pruned")


def test_retention_zero_keeps_everything_forever(submit, make_agent, settings):
    settings.CP_RETENTION_DAYS = 0
    attempt = _attempt_with_outputs(submit, make_agent, "ancient", 3650)
    assert jobs.prune_old_outputs() == {"artifacts": 0, "logs": 0}
    assert Artifact.objects.filter(attempt=attempt).count() == 1
    assert Attempt.objects.get(pk=attempt.pk).log == "the log of ancient\n"
    assert not Event.objects.filter(kind="retention").exists()


def test_a_live_attempts_log_is_never_pruned(submit, make_agent, settings):
    settings.CP_RETENTION_DAYS = 1
    submit(doc({"key": "slow"}))
    agent = make_agent("slowpoke", labels=[])
    got = actions.claim_ready_tasks(agent, 1)[0]
    actions.record_progress(agent, got["attempt_id"], 0.1, "still going", "early line\n")
    Attempt.objects.filter(pk=got["attempt_id"]).update(assigned_at=timezone.now() - timedelta(days=5))
    jobs.prune_old_outputs()
    assert Attempt.objects.get(pk=got["attempt_id"]).log == "early line\n"


def test_the_prune_job_is_a_django_q2_schedule():
    from django_q.models import Schedule

    jobs.ensure_schedules()
    schedule = Schedule.objects.get(name=jobs.RETENTION_SCHEDULE)
    assert schedule.func == "tasks_app.jobs.prune_old_outputs" and schedule.repeats == -1
