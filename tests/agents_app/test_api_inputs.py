"""PROTOCOL.md v1.1's input requests over real HTTP (issue 11, item 2, the server's side): an agent's live
attempt asks a person (a permission Claude Code was not given), long-polls for the answer, and a person
answers allow or deny with a message, from the API or the dashboard; the task shows as awaiting input until
then; unanswered past its time the server answers deny; a request whose attempt ended is moot."""

from __future__ import annotations

import threading
import time

import pytest
from django.contrib.auth.models import Permission

from agents_app.registry import create_api_token
from tasks_app.models import Event, InputRequest
from tests.conftest import assert_error, http, ok

pytestmark = pytest.mark.django_db(transaction=True)

AI = ("shell", "claude")
BASH = {"kind": "permission", "tool": "Bash", "input": {"command": "rm -rf build"}, "question": "May I?"}


@pytest.fixture
def api_token(operator) -> str:
    return operator[1]


def claude_task(key: str) -> dict:
    return {"key": key, "executor": "claude", "prompt": f"do {key}"}


def ask(agent, attempt_id: str, body=BASH):
    return agent.post(f"/api/v1/attempts/{attempt_id}/input-requests", body)


def wait(agent, request_id: str, wait_s: float = 0):
    return agent.post(f"/api/v1/input-requests/{request_id}/wait", {"wait_s": wait_s})


def answer(server: str, token: str, request_id: str, behavior: str = "allow", message: str = ""):
    body = {"behavior": behavior, "message": message}
    return http("POST", f"{server}/api/v1/input-requests/{request_id}/answer", body, token=token)


def awaiting(server: str, token: str, run_id) -> dict:
    return {t["key"]: t["awaiting"] for t in ok(http("GET", f"{server}/api/v1/runs/{run_id}", token=token))["tasks"]}


def test_an_agent_asks_a_person_answers_and_the_long_poll_hears_it_at_once(server, enroll, run_of, api_token):
    run = run_of({**claude_task("a"), "priority": 1}, claude_task("b"))
    agent = enroll(executors=AI)
    attempt_id = agent.claim_one()["attempt_id"]
    request_id = ok(ask(agent, attempt_id), 201)["request_id"]
    assert awaiting(server, api_token, run.id) == {"a": "input", "b": None}
    assert ok(wait(agent, request_id, 0.3)) == {"state": "pending"}
    heard: dict = {}

    def long_poll():
        heard["answer"] = ok(wait(agent, request_id, 5))
        heard["at"] = time.monotonic()

    poller = threading.Thread(target=long_poll)
    poller.start()
    time.sleep(0.5)
    answered_at = time.monotonic()
    said = ok(answer(server, api_token, request_id, "allow", "go ahead"))
    assert said["answer"] == {"behavior": "allow", "message": "go ahead"}
    poller.join(10)
    assert heard["answer"] == {"state": "answered", "answer": {"behavior": "allow", "message": "go ahead"}}
    # The answer ends the long poll (its 5 s would otherwise run out); how fast is bench/input_latency.py's.
    assert heard["at"] - answered_at < 3.0
    assert_error(answer(server, api_token, request_id, "deny"), 409, "invalid_state", "answered already")
    assert awaiting(server, api_token, run.id) == {"a": None, "b": None}
    trail = list(Event.objects.filter(kind="input").order_by("id").values_list("from_state", "to_state", "actor"))
    assert trail == [("", "pending", "agent:cg-1"), ("pending", "answered", "user:olivia")]


def test_unanswered_past_its_time_the_server_answers_deny(server, enroll, run_of):
    run_of(claude_task("a"))
    agent = enroll(executors=AI)
    attempt_id = agent.claim_one()["attempt_id"]
    request_id = ok(ask(agent, attempt_id, {**BASH, "timeout_s": 1}), 201)["request_id"]
    got = ok(wait(agent, request_id, 4))
    assert got["state"] == "answered" and got["answer"]["behavior"] == "deny"
    assert "nobody answered in time" in got["answer"]["message"]
    assert InputRequest.objects.get(pk=request_id).answered_by == "system:timeout"


def test_when_the_sweeper_denies_first_the_waiting_agent_reads_its_deny(server, enroll, run_of, monkeypatch):
    """The agent's wait and the sweeper both find the request overdue; the sweeper answers first. The wait
    must read the sweeper's deny, not answer a 409 (the daemon would take that as losing its attempt)."""
    from django.utils import timezone

    from tasks_app import actions

    run_of(claude_task("a"))
    agent = enroll(executors=AI)
    attempt_id = agent.claim_one()["attempt_id"]
    request_id = ok(ask(agent, attempt_id), 201)["request_id"]
    request = InputRequest.objects.get(pk=request_id)
    InputRequest.objects.filter(pk=request_id).update(expires_at=timezone.now())
    real_answer = actions.answer_input_request

    def sweeper_first(*args):
        monkeypatch.setattr(actions, "answer_input_request", real_answer)
        actions.settle_input_requests()  # the sweeper wins the race between the wait's read and its answer
        return real_answer(*args)

    monkeypatch.setattr(actions, "answer_input_request", sweeper_first)
    got = actions.input_request_state({"id": request.attempt.agent_id}, request_id)
    assert got["state"] == "answered" and got["answer"]["behavior"] == "deny"
    assert "nobody answered in time" in got["answer"]["message"]


def test_a_request_whose_attempt_ended_is_moot(server, enroll, run_of, api_token):
    run_of(claude_task("a"))
    agent = enroll(executors=AI)
    attempt_id = agent.claim_one()["attempt_id"]
    request_id = ok(ask(agent, attempt_id), 201)["request_id"]
    ok(agent.complete(attempt_id, "failed", error="claude exited"))
    assert_error(answer(server, api_token, request_id), 409, "invalid_state", "attempt has ended")
    assert InputRequest.objects.get(pk=request_id).state == InputRequest.EXPIRED
    assert_error(ask(agent, attempt_id), 409, "stale_attempt")


def test_only_the_attempts_agent_asks_and_waits_and_bad_requests_are_400(server, enroll, run_of):
    run_of(claude_task("a"))
    agent, other = enroll(executors=AI), enroll("cg-2", executors=AI)
    attempt_id = agent.claim_one()["attempt_id"]
    assert_error(ask(other, attempt_id), 409, "stale_attempt")
    request_id = ok(ask(agent, attempt_id), 201)["request_id"]
    assert_error(wait(other, request_id), 404, "not_found")
    assert_error(wait(agent, "not-a-uuid"), 404, "not_found")
    for body, field in (({**BASH, "tool": ""}, "tool"), ({**BASH, "input": "rm"}, "input"),
                        ({**BASH, "kind": "bribe"}, "kind"), ({**BASH, "timeout_s": 0}, "timeout_s")):  # fmt: skip
        assert_error(ask(agent, attempt_id, body), 400, "bad_request", field)
    assert InputRequest.objects.count() == 1


def test_a_viewer_may_not_answer_and_a_bad_answer_is_400(server, enroll, run_of, api_token, django_user_model):
    run_of(claude_task("a"))
    agent = enroll(executors=AI)
    request_id = ok(ask(agent, agent.claim_one()["attempt_id"]), 201)["request_id"]
    viewer = django_user_model.objects.create_user("vic", password="pw-vic-123456")
    viewer.user_permissions.add(Permission.objects.get(codename="view_run"))
    viewer_token, _ = create_api_token(viewer)
    assert_error(answer(server, viewer_token, request_id), 403, "forbidden")
    assert_error(answer(server, api_token, request_id, "maybe"), 400, "bad_request", "behavior")
    assert InputRequest.objects.get(pk=request_id).state == InputRequest.PENDING


def test_the_task_page_shows_the_command_escaped_and_the_operator_answers_there(server, enroll, run_of,
                                                                                operator_client):  # fmt: skip
    run = run_of(claude_task("a"))
    agent = enroll(executors=AI)
    attempt_id = agent.claim_one()["attempt_id"]
    hostile = {**BASH, "input": {"command": "echo '<script>alert(1)</script>' > x"}}
    request_id = ok(ask(agent, attempt_id, hostile), 201)["request_id"]
    task_id = run.tasks.get(key="a").id
    page = operator_client.get(f"/tasks/{task_id}/").content.decode()
    assert "echo &#x27;&lt;script&gt;alert(1)&lt;/script&gt;&#x27; &gt; x" in page and "<script>alert" not in page
    assert f'hx-post="/input-requests/{request_id}/answer/"' in page
    overview = operator_client.get("/").content.decode()
    assert 'data-testid="input-request"' in overview and "&lt;script&gt;" in overview
    token = operator_client.cookies["csrftoken"].value  # the client enforces CSRF, as a browser would
    answered = operator_client.post(f"/input-requests/{request_id}/answer/", {"behavior": "deny", "message": "no"},
                                    HTTP_X_CSRFTOKEN=token, HTTP_HX_REQUEST="true")  # fmt: skip
    assert answered.status_code == 200 and "Denied" in answered.content.decode()
    assert ok(wait(agent, request_id))["answer"] == {"behavior": "deny", "message": "no"}
