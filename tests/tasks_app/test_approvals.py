"""Approval tasks (PROTOCOL.md v1.1, issue 11 item 1): no agent takes one; when its dependencies succeed it
awaits approval until an operator approves (it succeeds, its dependents go on) or rejects it (it fails, what
depends on it is skipped), with a comment; the decider and the comment go in the audit trail; nobody
answering within its timeout_s rejects it; viewers are refused; it holds no max_parallel slot."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import Permission
from django.core.management import call_command
from django.core.management.base import CommandError

from agents_app.registry import create_api_token
from tasks_app import actions
from tasks_app.dag import DagError, parse_document
from tasks_app.models import Event, Run, Task
from tasks_app.states import RunState, TaskState
from tests.conftest import assert_error, doc, http, ok

pytestmark = pytest.mark.django_db(transaction=True)

APPROVAL = {"key": "sign-off", "executor": "approval", "deps": ["build"], "prompt": "Ship the build?"}


def sim(key: str, **fields) -> dict:
    return {"key": key, "executor": "simulated", **fields}


def state_of(run: Run, key: str) -> str:
    return Task.objects.get(run=run, key=key).state


def task_of(run: Run, key: str) -> Task:
    return Task.objects.get(run=run, key=key)


def finish(agent, assignment, outcome="succeeded"):
    return actions.complete_attempt(agent, assignment["attempt_id"], outcome, None, "", 0)


def build_then_sign_off(submit, make_agent, **document):
    """A run build → sign-off (approval) → deploy, its build done: the sign-off awaits approval."""
    run = submit(doc(sim("build"), APPROVAL, sim("deploy", deps=["sign-off"]), **document))
    agent = make_agent(executors=("simulated", "approval"))  # even an agent naming the executor gets none
    [build] = actions.claim_ready_tasks(agent, 5)
    assert build["task"]["key"] == "build"
    finish(agent, build)
    return run, agent


def test_an_approval_awaits_once_its_dependencies_succeed_and_no_agent_takes_it(submit, make_agent):
    run, agent = build_then_sign_off(submit, make_agent)
    assert state_of(run, "sign-off") == TaskState.AWAITING_APPROVAL
    assert actions.claim_ready_tasks(agent, 5) == []
    assert actions.settle_run(run.id) is None  # the run waits for the person
    assert Event.objects.filter(task=task_of(run, "sign-off"), to_state="awaiting_approval").count() == 1


def test_approving_succeeds_the_task_and_its_dependents_go_on(submit, make_agent):
    run, agent = build_then_sign_off(submit, make_agent)
    sign_off = task_of(run, "sign-off")
    assert actions.decide_approval(sign_off.id, True, "user:olivia", "looks good") == TaskState.SUCCEEDED
    sign_off.refresh_from_db()
    assert (sign_off.state, sign_off.output) == (TaskState.SUCCEEDED, "looks good")
    event = Event.objects.get(task=sign_off, to_state="succeeded")
    assert (event.actor, event.detail) == ("user:olivia", {"decision": "approved", "by": "user:olivia",
                                                           "message": "looks good"})  # fmt: skip
    [deploy] = actions.claim_ready_tasks(agent, 5)
    assert deploy["task"]["key"] == "deploy"
    assert deploy["task"]["inputs"]["sign-off"]["output"] == "looks good"
    finish(agent, deploy)
    run.refresh_from_db()
    assert run.state == RunState.SUCCEEDED


def test_rejecting_fails_the_task_skips_what_depends_on_it_and_fails_the_run(submit, make_agent):
    run, _agent = build_then_sign_off(submit, make_agent)
    assert actions.decide_approval(task_of(run, "sign-off").id, False, "user:olivia", "not today") == "failed"
    assert (state_of(run, "sign-off"), state_of(run, "deploy")) == (TaskState.FAILED, TaskState.SKIPPED)
    run.refresh_from_db()
    assert run.state == RunState.FAILED
    assert Event.objects.get(task=task_of(run, "sign-off"), to_state="failed").detail["message"] == "not today"


def test_only_a_task_awaiting_approval_can_be_decided(submit, make_agent):
    run = submit(doc(sim("build"), APPROVAL))
    for key in ("build", "sign-off"):  # a simulated task; an approval still blocked
        with pytest.raises(actions.ActionError, match="only a task awaiting approval"):
            actions.decide_approval(task_of(run, key).id, True, "user:olivia")
    with pytest.raises(actions.NotFound):
        actions.decide_approval("00000000-0000-0000-0000-000000000000", True, "user:olivia")


def test_an_approval_without_dependencies_awaits_from_the_start(submit):
    run = submit(doc({"key": "go", "executor": "approval"}, sim("after", deps=["go"])))
    go = task_of(run, "go")
    assert go.state == TaskState.AWAITING_APPROVAL and go.ready_at is not None


def test_nobody_answering_within_timeout_s_rejects_it(submit, make_agent):
    run, _agent = build_then_sign_off(submit, make_agent)
    Task.objects.filter(run=run, key="sign-off").update(timeout_s=1)
    Task.objects.filter(run=run, key="sign-off").update(ready_at=task_of(run, "sign-off").ready_at.replace(year=2020))
    assert actions.expire_approvals() == 1
    sign_off = task_of(run, "sign-off")
    assert sign_off.state == TaskState.FAILED and state_of(run, "deploy") == TaskState.SKIPPED
    event = Event.objects.get(task=sign_off, to_state="failed")
    assert event.actor == "system:timeout" and "nobody answered within 1 s" in event.detail["message"]


def test_an_approval_defaults_to_a_week_and_takes_no_command_labels_or_params():
    spec = parse_document(doc(APPROVAL | {"deps": []})).tasks[0]
    assert spec.timeout_s == 7 * 86400
    for extra, field in ({"command": "true"}, "command"), ({"requires": ["gpu"]}, "requires"), (
        {"params": {"x": 1}}, "params",
    ):  # fmt: skip
        with pytest.raises(DagError, match=f"an approval task takes no {field}"):
            parse_document(doc({"key": "a", "executor": "approval", **extra}))


def test_a_retried_rejection_awaits_approval_again(submit, make_agent):
    run, _agent = build_then_sign_off(submit, make_agent)
    sign_off = task_of(run, "sign-off")
    actions.decide_approval(sign_off.id, False, "user:olivia", "no")
    assert actions.retry_task(sign_off.id, "user:olivia") == TaskState.AWAITING_APPROVAL
    assert (state_of(run, "sign-off"), state_of(run, "deploy")) == (TaskState.AWAITING_APPROVAL, TaskState.BLOCKED)
    run.refresh_from_db()
    assert run.state == RunState.RUNNING


def test_an_awaiting_approval_holds_no_max_parallel_slot(submit, make_agent):
    run = submit(doc({"key": "go", "executor": "approval"}, sim("other"), max_parallel=1))
    agent = make_agent()
    [other] = actions.claim_ready_tasks(agent, 5)
    assert other["task"]["key"] == "other"
    assert state_of(run, "go") == TaskState.AWAITING_APPROVAL


def test_canceling_the_run_cancels_a_waiting_approval(submit, make_agent):
    run, _agent = build_then_sign_off(submit, make_agent)
    actions.cancel_run(run.id, "user:olivia")
    assert state_of(run, "sign-off") == TaskState.CANCELED


# --- the API and the command -------------------------------------------------------------------------


def test_the_api_approves_and_rejects_with_a_message_and_says_what_is_awaited(live_server_proc, operator, submit,
                                                                              make_agent):  # fmt: skip
    _, token = operator
    run, _agent = build_then_sign_off(submit, make_agent)
    sign_off = task_of(run, "sign-off")
    status = ok(http("GET", f"{live_server_proc.url}/api/v1/runs/{run.id}", token=token))
    awaiting = {t["key"]: t["awaiting"] for t in status["tasks"]}
    assert awaiting == {"build": None, "sign-off": "approval", "deploy": None}
    url = f"{live_server_proc.url}/api/v1/tasks/{sign_off.id}"
    answer = ok(http("POST", f"{url}/approve", {"message": "ship it"}, token=token))
    assert answer == {"task_id": str(sign_off.id), "state": "succeeded"}
    assert_error(http("POST", f"{url}/approve", {}, token=token), 409, "invalid_state")
    assert_error(http("POST", f"{url}/reject", {"message": 3}, token=token), 400, "bad_request")
    assert Event.objects.get(task=sign_off, to_state="succeeded").actor == "user:olivia"


def test_a_viewer_may_not_decide(live_server_proc, submit, make_agent, django_user_model):
    viewer = django_user_model.objects.create_user("vic", password="pw-vic-123456")
    viewer.user_permissions.add(Permission.objects.get(codename="view_run"))
    token, _ = create_api_token(viewer)
    run, _agent = build_then_sign_off(submit, make_agent)
    url = f"{live_server_proc.url}/api/v1/tasks/{task_of(run, 'sign-off').id}/approve"
    assert_error(http("POST", url, {}, token=token), 403, "forbidden")
    assert state_of(run, "sign-off") == TaskState.AWAITING_APPROVAL


def test_manage_py_approve_and_reject(submit, make_agent, capsys):
    run, _agent = build_then_sign_off(submit, make_agent)
    sign_off = task_of(run, "sign-off")
    call_command("status", str(run.id))
    said = capsys.readouterr().out
    assert "awaiting approval 1" in said and "sign-off" in said and "manage.py approve|reject TASK_ID" in said
    with pytest.raises(CommandError, match="is not a task id"):
        call_command("approve", "nope")
    call_command("reject", str(sign_off.id), "--message", "wrong build")
    assert capsys.readouterr().out.strip() == f"{sign_off.id}: failed"
    assert Event.objects.get(task=sign_off, to_state="failed").actor.startswith("cli:")
    with pytest.raises(CommandError, match="only a task awaiting approval"):
        call_command("approve", str(sign_off.id))
