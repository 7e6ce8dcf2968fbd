"""A finished shell task says it finished: the daemon's last report before completing is progress 1.0 and
"exited 0" or "exit N" (a shell command reports no progress of its own), not 0% and "started"."""

from __future__ import annotations

import pytest

from tasks_app.models import Attempt, Run
from tasks_app.states import RunState
from tests.conftest import doc, http, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def test_a_finished_shell_task_reads_100_percent_and_its_exit(live_server_proc, fleet, operator):
    _, token = operator
    fleet("sh-1", ["sh"], executors=["shell"])
    document = doc(
        {"key": "ok", "requires": ["sh"], "executor": "shell", "command": "echo fine"},
        {"key": "bad", "requires": ["sh"], "executor": "shell", "command": "echo oops; exit 3", "max_attempts": 1},
        name="shell-ends",
    )
    status, body = http("POST", f"{live_server_proc.url}/api/v1/runs", document, token=token)
    assert status == 201, body
    run_id = body["run_id"]
    wait_for(lambda: Run.objects.get(pk=run_id).state != RunState.RUNNING, 60, what="the run to end")
    ended = {a.task.key: a for a in Attempt.objects.filter(run_id=run_id).select_related("task")}
    assert (ended["ok"].state, ended["ok"].progress, ended["ok"].message) == ("succeeded", 1.0, "exited 0")
    assert (ended["bad"].state, ended["bad"].progress, ended["bad"].message) == ("failed", 1.0, "exit 3")
    assert (ended["ok"].task.progress, ended["ok"].task.message) == (1.0, "exited 0")
