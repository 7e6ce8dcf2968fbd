"""Executor pre-flight: at enrollment and on demand, with real daemon processes whose PATH holds fake
`claude` and `codex` programs (one of them failing its pre-flight), the real server, the agents page, and
the endpoint's refusals."""

from __future__ import annotations

import os
from io import StringIO

import pytest
from django.core.management import call_command

from agents_app import preflight
from agents_app.models import Agent
from tasks_app.models import Attempt, Task
from tests.agents_app.test_cp_agent_unit import FAKE_CLAUDE, FAKE_CODEX, write_script
from tests.conftest import doc, http, parked_claim, register, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

# A codex that is installed but cannot work here, as when it was never logged in.
BROKEN_CODEX = """\
echo "Error: not logged in; run 'codex login'" >&2
exit 1
"""


@pytest.fixture
def ai_path(tmp_path):
    """A PATH with a working fake `claude` and a broken fake `codex`; returns (env, codex script path)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_script(bin_dir / "claude", FAKE_CLAUDE)
    codex = write_script(bin_dir / "codex", BROKEN_CODEX)
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}, codex


def state_of(task_key: str, run) -> str:
    return Task.objects.get(run=run, key=task_key).state


def test_a_failed_executor_is_never_offered_a_task_until_an_operator_rechecks_it(
    fleet, ai_path, submit, operator, client, tmp_path
):
    env, codex = ai_path
    fleet("ai-1", ["ai"], executors=["shell", "claude", "codex"], env=env)
    agent = wait_for(lambda: Agent.objects.filter(name="ai-1", preflight__has_key="codex").first(), 30)

    # At enrollment: offered only what passed; the whole report kept.
    assert agent.executors == ["shell", "claude", "git"]  # git: a capability every agent checks (workspaces)
    assert agent.executor_versions == {"claude": "2.0.14", "git": agent.executor_versions["git"]}
    assert agent.preflight["claude"]["usable"] and agent.preflight["claude"]["version"] == "2.0.14"
    assert agent.preflight["codex"]["usable"] is False
    assert "exited with 1: Error: not logged in" in agent.preflight["codex"]["detail"]

    # The codex task comes first in the scheduler's order, yet the agent gets the claude task.
    run = submit(
        doc(
            {"key": "implement", "executor": "codex", "prompt": "write it", "requires": ["ai"], "priority": 10},
            {"key": "plan", "executor": "claude", "prompt": "plan it", "requires": ["ai"]},
        )
    )
    wait_for(lambda: state_of("plan", run) == "succeeded", 30, what="the claude task")
    assert state_of("implement", run) == "ready"
    assert not Attempt.objects.filter(task__run=run, task__key="implement").exists()

    # The agents page says which executors work, with versions, and why codex does not.
    user, _ = operator
    client.force_login(user)
    page = client.get("/agents/").content.decode()
    assert '<span class="ex-ok" data-executor="claude" title="' in page and "claude <small>2.0.14</small>" in page
    assert '<span class="ex-failed" data-executor="codex" title="pre-flight failed:' in page
    assert "not logged in" in page

    # Codex gets fixed on the host; the operator's Re-check reaches the daemon with its next heartbeat.
    write_script(codex, FAKE_CODEX)
    answer = client.post(f"/agents/{agent.pk}/preflight/", headers={"HX-Request": "true"})
    assert answer.status_code == 200 and "pre-flight requested" in answer.content.decode()
    wait_for(lambda: state_of("implement", run) == "succeeded", 30, what="the codex task after the re-check")
    agent.refresh_from_db()
    assert agent.executors == ["shell", "claude", "codex", "git"]
    assert agent.preflight["codex"] == {
        "usable": True,
        "version": "0.46.0",
        "detail": agent.preflight["codex"]["detail"],
    }
    assert "codex-cli 0.46.0" in agent.preflight["codex"]["detail"]
    assert agent.preflight_requested is False  # delivered once
    assert "server asked for a pre-flight" in (tmp_path / "ai-1.log").read_text()


def test_a_restarted_agent_reports_a_new_preflight_with_its_saved_identity(fleet, ai_path, tmp_path):
    env, codex = ai_path
    write_script(codex, FAKE_CODEX)
    first = fleet("ai-2", ["ai"], executors=["claude", "codex"], env=env)
    agent = wait_for(lambda: Agent.objects.filter(name="ai-2", executors__contains=["codex"]).first(), 30)
    first.terminate()
    assert first.wait(15) == 0

    write_script(codex, BROKEN_CODEX)  # broke while the agent was down
    fleet("ai-2", ["ai"], executors=["claude", "codex"], env=env)
    wait_for(lambda: Agent.objects.get(pk=agent.pk).executors == ["claude", "git"], 30, what="the new pre-flight")
    assert Agent.objects.filter(name="ai-2").count() == 1  # the same identity, not a new registration
    assert Agent.objects.get(pk=agent.pk).preflight["codex"]["usable"] is False


def test_an_agent_whose_every_executor_fails_does_not_enroll(fleet, ai_path, tmp_path):
    env, _ = ai_path
    proc = fleet("ai-3", ["ai"], executors=["codex"], env=env)
    assert proc.wait(30) == 1
    log = (tmp_path / "ai-3.log").read_text()
    assert "pre-flight: codex FAILED" in log and "no executor passed its pre-flight" in log
    assert not Agent.objects.filter(name="ai-3").exists()


# --- the server's side, over HTTP ---------------------------------------------------------------------


def preflight_call(server: str, token: str | None, body):
    return http("POST", f"{server}/api/v1/agents/preflight", body, token=token)


CODEX_OK = {"usable": True, "detail": "codex-cli 0.46.0", "version": "0.46.0"}
CODEX_BROKEN = {"usable": False, "detail": "codex --version exited with 1", "version": None}


def test_registration_drops_an_executor_its_own_report_marks_failed(live_server_proc, enrollment_token):
    answer = register(
        live_server_proc.url, enrollment_token, "cg-9", executors=("shell", "codex")
    )  # an older daemon: no report, it keeps what it declared
    assert Agent.objects.get(pk=answer["agent_id"]).executors == ["shell", "codex"]
    status, answer = http(
        "POST",
        f"{live_server_proc.url}/api/v1/agents/register",
        {"name": "cg-10", "executors": ["shell", "codex"], "preflight": {"codex": CODEX_BROKEN}},
        token=enrollment_token,
    )
    assert status == 201
    assert Agent.objects.get(pk=answer["agent_id"]).executors == ["shell"]


def test_the_preflight_endpoint_sets_the_offered_executors(live_server_proc, enrollment_token):
    agent = register(live_server_proc.url, enrollment_token, "cg-11", executors=("shell", "codex"))
    report = {"shell": {"usable": True, "detail": "/bin/sh", "version": None}, "codex": CODEX_BROKEN}
    assert preflight_call(live_server_proc.url, agent["token"], {"preflight": report}) == (
        200,
        {"executors": ["shell"]},
    )
    stored = Agent.objects.get(pk=agent["agent_id"])
    assert (stored.executors, stored.preflight["codex"]["usable"]) == (["shell"], False)
    assert stored.preflight_at is not None
    report["codex"] = CODEX_OK
    assert preflight_call(live_server_proc.url, agent["token"], {"preflight": report})[1]["executors"] == [
        "shell",
        "codex",
    ]
    assert Agent.objects.get(pk=agent["agent_id"]).executor_versions == {"codex": "0.46.0"}


@pytest.mark.parametrize(
    "body, fragment",
    [
        ({}, "'preflight' is required"),
        ({"preflight": []}, "'preflight' must be an object"),
        ({"preflight": {"Bad Name": CODEX_OK}}, "invalid executor"),
        ({"preflight": {"codex": {"usable": "yes"}}}, "boolean 'usable'"),
        ({"preflight": {"codex": {"usable": True, "version": 3}}}, "must be strings"),
        ({"preflight": {f"e{i}": CODEX_OK for i in range(17)}}, "at most 16"),
    ],
)
def test_a_malformed_report_is_400_naming_the_field(live_server_proc, enrollment_token, body, fragment):
    agent = register(live_server_proc.url, enrollment_token, "cg-12")
    status, answer = preflight_call(live_server_proc.url, agent["token"], body)
    assert status == 400 and set(answer) == {"error", "detail"} and fragment in answer["detail"], answer


def test_a_report_needs_an_agent_token(live_server_proc):
    status, answer = preflight_call(live_server_proc.url, None, {"preflight": {"codex": CODEX_OK}})
    assert (status, answer["error"]) == (401, "unauthorized")


def test_a_requested_preflight_rides_on_exactly_one_heartbeat_answer(live_server_proc, enrollment_token):
    agent = register(live_server_proc.url, enrollment_token, "cg-13")
    out = StringIO()
    call_command("preflight_agents", "cg-13", stdout=out)
    assert "cg-13: pre-flight requested" in out.getvalue()
    heartbeat = f"{live_server_proc.url}/api/v1/agents/heartbeat"
    first = http("POST", heartbeat, {"status": "idle"}, token=agent["token"])[1]
    second = http("POST", heartbeat, {"status": "idle"}, token=agent["token"])[1]
    assert first["commands"] == [{"type": "preflight"}] and second["commands"] == []


def test_preflight_agents_needs_names_or_all(transactional_db):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="name some agents, or pass --all"):
        call_command("preflight_agents")
    with pytest.raises(CommandError, match="no current agent named ghost"):
        call_command("preflight_agents", "ghost")


def test_executor_rows_fall_back_to_what_an_agent_declared():
    assert preflight.executor_rows(["shell"], {}, {}) == [
        {"name": "shell", "usable": True, "version": "", "detail": ""}
    ]
    rows = preflight.executor_rows(["shell"], {}, {"codex": CODEX_BROKEN, "shell": {**CODEX_OK, "version": None}})
    assert [(r["name"], r["usable"]) for r in rows] == [("codex", False), ("shell", True)]


def test_a_claim_parked_before_a_failed_preflight_is_not_given_that_executors_task(
    live_server_proc, enrollment_token, submit
):
    agent = register(live_server_proc.url, enrollment_token, "cg-14", executors=("shell", "codex"))
    poll, answer = parked_claim(live_server_proc.url, agent["token"], agent["agent_id"], wait_s=2)
    report = {"shell": {"usable": True, "detail": "/bin/sh", "version": None}, "codex": CODEX_BROKEN}
    assert preflight_call(live_server_proc.url, agent["token"], {"preflight": report})[0] == 200
    run = submit(doc({"key": "implement", "executor": "codex", "prompt": "write it"}))
    poll.join(10)
    assert answer["result"] == (200, {"assignments": []})
    assert not Attempt.objects.filter(run=run).exists()
