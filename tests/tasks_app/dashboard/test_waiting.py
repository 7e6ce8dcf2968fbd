"""Why a ready task is not assigned yet (tasks_app.dashboard.waiting): each limit in words, the most binding first, as
the run API, `status`, the run page and the task page show it."""

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from agents_app import registry
from agents_app.models import Agent
from tasks_app import actions
from tasks_app.dashboard import waiting
from tasks_app.models import Task
from tests.conftest import doc

pytestmark = pytest.mark.django_db


def why(run, key):
    return waiting.reasons_of([Task.objects.get(run=run, key=key)]).get(Task.objects.get(run=run, key=key).id)


def test_no_online_agent_is_named_first(submit):
    run = submit(doc({"key": "a"}))
    assert why(run, "a") == "no agent is online"


def test_a_label_no_online_agent_has_is_named(submit, make_agent):
    make_agent("cpu-1", labels=["linux"])
    run = submit(doc({"key": "train", "requires": ["gpu", "linux"]}))
    assert why(run, "train") == "no agent can run this: needs gpu"


def test_an_executor_no_labelled_agent_runs_is_named(submit, make_agent):
    make_agent("cg-1", labels=["cg"], executors=["shell"])
    away = make_agent("cg-2", labels=["cg"], executors=["codex"])
    Agent.objects.filter(pk=away["id"]).update(status="offline")
    run = submit(doc({"key": "impl", "requires": ["cg"], "executor": "codex", "prompt": "go"}))
    assert why(run, "impl") == "no online agent with label cg runs executor codex (an offline agent could run it)"


def test_every_matching_agent_full(submit, make_agent):
    busy = make_agent("busy", labels=[], capacity=2)
    run = submit(doc({"key": "a"}, {"key": "b"}, {"key": "c"}))
    actions.claim_ready_tasks(busy, 2)
    waiting_key = Task.objects.get(run=run, state="ready").key
    assert why(run, waiting_key) == "every matching agent is full (1 agent, 2 of 2 slots in use)"


def test_a_run_at_max_parallel(submit, make_agent):
    agent = make_agent("big", labels=[], capacity=4)
    run = submit(doc({"key": "a"}, {"key": "b"}, max_parallel=1))
    actions.claim_ready_tasks(agent, 4)
    waiting_key = Task.objects.get(run=run, state="ready").key
    assert why(run, waiting_key) == "run at max_parallel 1"


def test_the_global_limit(submit, make_agent, settings):
    settings.CP_GLOBAL_MAX_LIVE = 1
    agent = make_agent("big", labels=[], capacity=4)
    submit(doc({"key": "first"}))
    run = submit(doc({"key": "second"}))
    actions.claim_ready_tasks(agent, 4)
    assert why(run, "second") == "at the global limit of 1 live attempts (CP_GLOBAL_MAX_LIVE)"


def test_a_paused_run_and_a_retry_delay(submit, make_agent):
    make_agent("idle", labels=[])
    paused = submit(doc({"key": "a"}))
    actions.pause_run(paused.id, "user:olivia")
    assert why(paused, "a") == "run is paused"
    delayed = submit(doc({"key": "b"}))
    Task.objects.filter(run=delayed).update(ready_at=timezone.now() + timedelta(seconds=30))
    assert why(delayed, "b") == "retry delay: offered in 30 s"


def test_a_draining_agent_takes_nothing(submit, make_agent):
    agent = make_agent("leaving", labels=[])
    registry.set_agent_flags(agent["id"], "user:olivia", draining=True)
    run = submit(doc({"key": "a"}))
    assert why(run, "a") == "every matching agent is draining"


def test_nothing_holding_it_back_says_so(submit, make_agent):
    make_agent("idle", labels=[])
    run = submit(doc({"key": "a"}))
    assert why(run, "a") == waiting.CLAIMABLE


def test_offerable_kinds_leave_out_full_runs_and_fresh_tasks(submit, make_agent):
    agent = make_agent("big", labels=[], capacity=4)
    full = submit(doc({"key": "a"}, {"key": "b", "requires": ["gpu"]}, max_parallel=1))
    actions.claim_ready_tasks(agent, 4)
    assert Task.objects.filter(run=full, state="ready").count() == 1
    submit(doc({"key": "fresh", "requires": ["arm"]}))
    assert waiting.offerable_kinds(min_age_s=60) == []  # nothing has waited a minute
    assert waiting.offerable_kinds(min_age_s=0) == [("simulated", ["arm"])]  # the full run's task is held


def test_the_run_api_the_status_command_and_the_pages_say_why(submit, make_agent, viewer, capsys):
    make_agent("cpu-1", labels=["linux"])
    run = submit(doc({"key": "train", "requires": ["gpu"]}))
    task = Task.objects.get(run=run)
    from tasks_app.dashboard.reports import run_status

    assert run_status(run.id)["tasks"][0]["waiting"] == "no agent can run this: needs gpu"
    call_command("status", str(run.id))
    assert "(no agent can run this: needs gpu)" in capsys.readouterr().out
    for url in (f"/runs/{run.id}/", f"/tasks/{task.id}/", "/"):
        assert "no agent can run this: needs gpu" in viewer.get(url).content.decode(), url


def test_a_workspace_task_needs_an_agent_with_git(submit, make_agent):
    make_agent("plain", labels=[], executors=["simulated"])
    run = submit(doc({"key": "a"}, workspace={"repo": "file:///r.git", "base": "c" * 40}))
    assert why(run, "a") == "no online agent running simulated has git (a workspace run's tasks need it)"
