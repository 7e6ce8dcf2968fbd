"""POST /api/v1/attempts/ID/progress: the lease, running, stale attempts, limits."""

from __future__ import annotations

import uuid
from datetime import datetime

from django.utils import timezone

from tests.agents_app.api.common import KIB
from tests.conftest import assert_error, ok


def test_progress_answers_the_lease_and_marks_the_task_running(server, enroll, run_of):
    from tasks_app.models import Attempt, Task

    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()
    body = ok(agent.progress(attempt["attempt_id"], {"progress": 0.75, "message": "tests passing", "log": "one\n"}))
    assert set(body) == {"lease_expires_at", "cancel"} and body["cancel"] is False
    assert datetime.fromisoformat(body["lease_expires_at"]) > timezone.now()
    ok(agent.progress(attempt["attempt_id"], {"log": "two\n"}))
    stored = Attempt.objects.get(pk=attempt["attempt_id"])
    assert (stored.state, stored.progress, stored.message, stored.log) == ("running", 0.75, "tests passing",
                                                                           "one\ntwo\n")  # fmt: skip
    assert stored.started_at is not None
    assert Task.objects.get(pk=attempt["task"]["id"]).state == "running"


def test_progress_extends_the_lease(server, enroll, run_of):
    from tasks_app.models import Attempt

    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()
    before = Attempt.objects.get(pk=attempt["attempt_id"]).lease_expires_at
    ok(agent.progress(attempt["attempt_id"], {"progress": 0.1}))
    assert Attempt.objects.get(pk=attempt["attempt_id"]).lease_expires_at > before


def test_progress_on_another_agents_attempt_is_stale(server, enroll, run_of):
    from tasks_app.models import Attempt

    run_of({"key": "a"})
    owner, stranger = enroll("owner"), enroll("stranger")
    attempt = owner.claim_one()
    assert_error(stranger.progress(attempt["attempt_id"], {"progress": 0.5}), 409, "stale_attempt")
    stored = Attempt.objects.get(pk=attempt["attempt_id"])
    assert (stored.state, stored.progress) == ("assigned", 0)


def test_progress_after_completion_is_stale(server, enroll, run_of):
    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()
    ok(agent.complete(attempt["attempt_id"]))
    assert_error(agent.progress(attempt["attempt_id"], {"progress": 0.5}), 409, "stale_attempt")


def test_progress_for_an_unknown_attempt_is_404(server, enroll):
    agent = enroll()
    assert_error(agent.progress(str(uuid.uuid4()), {"progress": 0.5}), 404, "not_found")
    assert_error(agent.progress("not-a-uuid", {"progress": 0.5}), 404, "not_found")


def test_progress_with_invalid_fields_is_400(server, enroll, run_of):
    from tasks_app.models import Attempt

    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()
    for body in ({"progress": 1.5}, {"progress": -0.1}, {"progress": "x"}, {"progress": True},
                 {"message": "m" * 1001}, {"message": 3}, {"log": ["x"]}):  # fmt: skip
        assert_error(agent.progress(attempt["attempt_id"], body), 400, "bad_request", body)
    assert Attempt.objects.get(pk=attempt["attempt_id"]).state == "assigned"  # nothing was recorded


def test_progress_log_over_64_kib_is_413(server, enroll, run_of):
    from tasks_app.models import Attempt

    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()
    assert_error(agent.progress(attempt["attempt_id"], {"log": "x" * (64 * KIB + 1)}), 413, "too_large")
    assert_error(agent.progress(attempt["attempt_id"], {"log": "é" * (40 * KIB)}), 413, "too_large")  # 80 KiB
    assert Attempt.objects.get(pk=attempt["attempt_id"]).log == ""
    ok(agent.progress(attempt["attempt_id"], {"log": "x" * (64 * KIB)}))
