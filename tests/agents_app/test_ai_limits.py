"""Usage limits, budgets and sessions with the real claude CLI through the real daemon and server (issue 10,
items 5, 6 and 9): a provider's usage limit holds claude back on the agent that hit it while another agent
takes the task, a run's budget stops a live attempt and resuming with a higher budget finishes the run, and a
retry resumes the previous attempt's session. The model API stand-in is the only thing stood in for."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from agents_app.models import Agent
from tasks_app.models import Attempt, Run, Task
from tasks_app.states import AttemptState, RunState, TaskState
from tests.agents_app.test_daemon_workspaces import ended, submit
from tests.conftest import doc, http, ok, wait_for
from tests.model_api import Usage, rate_limited, text, tool_call
from tests.real_clis import CLAUDE, CODEX, TEST_API_KEY, claude_env, cli_binary, codex_env

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def claude_fleet(fleet, model_api, tmp_path):
    """start(name): a daemon running the real claude, each with its own claude config dir."""

    def start(name: str, oauth: bool = False, api_key: str = TEST_API_KEY):
        home = tmp_path / name
        home.mkdir()
        env = {**claude_env(home, model_api, oauth=oauth, api_key=api_key), "CP_CLAUDE_BIN": cli_binary(CLAUDE)}
        return fleet(name, [], executors=("shell", "claude"), env=env)

    return start


def only_task(run_id) -> Task:
    return Task.objects.get(run_id=run_id)


def test_a_usage_limit_holds_claude_on_that_agent_and_another_agent_takes_the_task(
    live_server_proc, operator, model_api, claude_fleet
):
    _, token = operator
    model_api.script(rate_limited(reset_in_s=3600, usage_limit=True))  # a subscription's limit, with its reset
    claude_fleet("limited-1", oauth=True)  # a subscription: its limit comes with a reset time
    run_id = submit(live_server_proc, token, doc({"key": "write", "executor": "claude", "prompt": "Write x.txt"}))

    def held():
        agent = Agent.objects.filter(name="limited-1", retired_at=None).first()
        return agent and agent.executor_holds.get("claude")

    hold = wait_for(held, timeout=60, what="claude held back on limited-1")
    until = parse_datetime(hold["until"])
    assert timezone.now() + timedelta(minutes=50) < until < timezone.now() + timedelta(minutes=70)
    # The hold is written first, then the completion returns the task.
    task = wait_for(lambda: Task.objects.filter(run_id=run_id, state=TaskState.READY).first(), timeout=10,
                    what="the task returned to ready")  # fmt: skip
    assert task.attempts_used - task.attempt_base == 0
    first = Attempt.objects.get(task=task)
    assert first.state == AttemptState.FAILED and first.error.startswith("rate_limited: ")
    # Another agent, on another account, takes the work; the limited one is not offered it again.
    model_api.script(tool_call("Write", {"file_path": "x.txt", "content": "x"}), text("Wrote x.txt."))
    claude_fleet("fresh-1")
    run = ended(run_id, timeout=90)
    assert run.state == RunState.SUCCEEDED
    attempts = list(Attempt.objects.filter(task=task).order_by("number").values_list("agent__name", "state"))
    assert attempts == [("limited-1", "failed"), ("fresh-1", "succeeded")]
    assert model_api.unscripted == []


def test_a_run_budget_stops_a_live_claude_attempt_and_a_higher_budget_finishes_the_run(
    live_server_proc, operator, model_api, claude_fleet
):
    _, token = operator
    # The first turn alone costs ~$3 (200k input tokens at the dearest price): past the run's $1 budget while
    # its command still runs.
    model_api.script(
        tool_call("Bash", {"command": "python3 -c 'import time; time.sleep(30)'"}, usage=Usage(input_tokens=200_000)),
        text("Finished.", usage=Usage(input_tokens=10, output_tokens=5)),
    )
    claude_fleet("spender-1")
    task = {"key": "work", "executor": "claude", "prompt": "Work.", "params": {"allowed_tools": ["Bash"]}}
    document = doc(task, max_cost_usd=1)
    run_id = submit(live_server_proc, token, document)
    wait_for(lambda: Run.objects.get(pk=run_id).state == RunState.PAUSED, timeout=60, what="the run paused")
    run = Run.objects.get(pk=run_id)
    assert run.pause_reason.startswith("budget_exceeded: the run's cost $")
    task = only_task(run_id)
    stopped = wait_for(lambda: Attempt.objects.filter(task=task, state=AttemptState.CANCELED).first(), timeout=30,
                       what="the live attempt stopped")  # fmt: skip
    assert stopped.error.startswith("budget_exceeded") and stopped.cost_usd >= 1
    started = stopped.started_at
    assert (stopped.finished_at - started).total_seconds() < 25  # stopped, not left to finish its 30 s command
    task.refresh_from_db()
    assert (task.state, task.attempts_used - task.attempt_base) == (TaskState.READY, 0)
    resume = f"{live_server_proc.url}/api/v1/runs/{run_id}/resume"
    assert http("POST", resume, {}, token=token)[0] == 409
    # The stand-in's queue still holds the first attempt's next turn; the retry starts a fresh conversation.
    assert ok(http("POST", resume, {"max_cost_usd": 100}, token=token))["state"] == RunState.RUNNING
    run = ended(run_id, timeout=90)
    assert run.state == RunState.SUCCEEDED
    assert list(Attempt.objects.filter(task=task).order_by("number").values_list("state", flat=True)) == [
        AttemptState.CANCELED, AttemptState.SUCCEEDED,
    ]  # fmt: skip


def test_a_retry_resumes_the_previous_attempts_claude_session_on_the_same_agent(
    live_server_proc, operator, model_api, claude_fleet, origin
):
    _, token = operator
    url, _shas = origin
    # The first attempt writes nothing and fails no_changes (params.expect_changes); the retry, on the same
    # agent, resumes its conversation and writes the file.
    model_api.script(
        tool_call("Bash", {"command": "true"}),
        text("I could not do it."),
        tool_call("Write", {"file_path": "fixed.txt", "content": "ok"}),
        text("Fixed it."),
    )
    claude_fleet("resumer-1")
    task_doc = {"key": "fix", "executor": "claude", "prompt": "Fix it.", "retry_delay_s": 0, "max_attempts": 2,
                "params": {"resume_on_retry": True, "expect_changes": True}}  # fmt: skip
    run_id = submit(live_server_proc, token, doc(task_doc, workspace={"repo": url, "base": "main"}))
    run = ended(run_id, timeout=120)
    attempts = list(Attempt.objects.filter(task__run_id=run_id, task__key="fix").order_by("number"))
    assert [a.state for a in attempts] == [AttemptState.FAILED, AttemptState.SUCCEEDED], [a.error for a in attempts]
    assert attempts[0].error.startswith("no_changes")
    assert run.state == RunState.SUCCEEDED
    assert attempts[0].session_id and attempts[1].session_id == attempts[0].session_id
    # The retry's requests to the model carried the first attempt's conversation.
    later = [r for r in model_api.turns if r.api == "anthropic" and "Fixed it." not in str(r.json)]
    assert any("I could not do it." in str(r.json.get("messages")) for r in later)


def test_a_revoked_key_returns_the_task_and_claude_is_no_longer_offered_to_that_agent(
    live_server_proc, operator, model_api, claude_fleet
):
    _, token = operator
    # Logged in as far as `claude auth status` can tell (a key is set), but the provider refuses the key.
    claude_fleet("revoked-1", api_key="sk-ant-revoked")
    run_id = submit(live_server_proc, token, doc({"key": "write", "executor": "claude", "prompt": "Hi."}))

    def dropped():
        agent = Agent.objects.filter(name="revoked-1", retired_at=None).first()
        return agent if agent and "claude" not in agent.executors and agent.preflight.get("claude") else None

    agent = wait_for(dropped, timeout=60, what="claude dropped from revoked-1")
    assert agent.preflight["claude"]["usable"] is False
    assert agent.preflight["claude"]["detail"].startswith("not_logged_in: ")
    task = wait_for(lambda: Task.objects.filter(run_id=run_id, state=TaskState.READY).first(), timeout=10,
                    what="the task returned to ready")  # fmt: skip
    assert task.attempts_used - task.attempt_base == 0
    reason = http("GET", f"{live_server_proc.url}/api/v1/runs/{run_id}", token=token)[1]["tasks"][0]["waiting"]
    assert reason == "no agent has the claude executor"


def test_codex_on_a_usage_limit_is_held_back_until_the_time_it_names(live_server_proc, operator, model_api, fleet,
                                                                     tmp_path):  # fmt: skip
    _, token = operator
    model_api.script(rate_limited(reset_in_s=5400, usage_limit=True))
    env = {**codex_env(tmp_path, model_api), "CP_CODEX_BIN": cli_binary(CODEX)}
    fleet("codex-1", [], executors=("shell", "codex"), env=env)
    run_id = submit(live_server_proc, token, doc({"key": "impl", "executor": "codex", "prompt": "Implement."}))
    task = wait_for(lambda: Task.objects.filter(run_id=run_id, state=TaskState.READY, attempts_used=1).first(),
                    timeout=60, what="the task returned to ready")  # fmt: skip
    assert task.attempts_used - task.attempt_base == 0
    hold = Agent.objects.get(name="codex-1", retired_at=None).executor_holds["codex"]
    until = parse_datetime(hold["until"])
    assert timezone.now() + timedelta(minutes=80) < until < timezone.now() + timedelta(minutes=100), hold
    assert "usage limit" in hold["reason"]
    reason = http("GET", f"{live_server_proc.url}/api/v1/runs/{run_id}", token=token)[1]["tasks"][0]["waiting"]
    assert reason.startswith("the agent running codex is rate-limited until "), reason
