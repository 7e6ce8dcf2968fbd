"""POST /api/v1/agents/claim: assignments, labels and executors, capacity, the long poll."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta

from django.utils import timezone

from tests.agents_app.api.common import MAX_WAIT_S, wait_until
from tests.conftest import assert_error, http


def test_claim_answers_at_once_with_an_assignment_for_a_ready_task(server, enroll, run_of):
    agent = enroll()
    run = run_of(
        {"key": "build", "title": "Build it", "executor": "shell", "command": "make", "timeout_s": 99,
         "params": {"x": 1}},
        {"key": "later", "deps": ["build"]},
    )  # fmt: skip
    started = time.monotonic()
    assignments = agent.claim(wait_s=MAX_WAIT_S)
    assert time.monotonic() - started < 2.0
    assert len(assignments) == 1
    a = assignments[0]
    assert set(a) == {"attempt_id", "lease_expires_at", "task"}
    uuid.UUID(a["attempt_id"])
    assert datetime.fromisoformat(a["lease_expires_at"]) > timezone.now()
    task = a["task"]
    assert set(task) == {"id", "run_id", "key", "title", "executor", "command", "prompt", "params", "timeout_s",
                         "attempt", "inputs"}  # fmt: skip
    assert task["inputs"] == {} and "workspace" not in task  # v1.1: no dependencies, no workspace
    assert task["run_id"] == str(run.id)
    assert (task["key"], task["title"], task["executor"], task["command"], task["prompt"]) == (
        "build", "Build it", "shell", "make", None,
    )  # fmt: skip
    assert (task["params"], task["timeout_s"], task["attempt"]) == ({"x": 1}, 99, 1)
    # The blocked task is not offered, and the agent (capacity 1) is full anyway.
    assert agent.claim() == []


def test_claim_offers_a_task_only_to_agents_with_its_labels_and_executor(server, enroll, run_of):
    run_of({"key": "gpu-job", "requires": ["gpu", "linux"], "executor": "shell", "command": "nvidia-smi"})
    no_labels = enroll("plain", labels=[], executors=["shell"])
    half_labels = enroll("half", labels=["gpu"], executors=["shell"])
    wrong_executor = enroll("sim-only", labels=["gpu", "linux"], executors=["simulated"])
    for agent in (no_labels, half_labels, wrong_executor):
        assert agent.claim() == [], agent.name
    fit = enroll("fit", labels=["linux", "gpu", "extra"], executors=["simulated", "shell"])
    assert [a["task"]["key"] for a in fit.claim()] == ["gpu-job"]


def test_a_task_is_never_handed_to_two_agents(server, enroll, run_of):
    run_of({"key": "only"})
    agents = [enroll(f"racer-{i}") for i in range(4)]
    results: list = [None] * len(agents)

    def claim(i):
        results[i] = agents[i].claim()

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(len(agents))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(len(r) for r in results) == [0, 0, 0, 1]


def test_claim_hands_out_at_most_the_free_capacity(server, enroll, run_of):
    run_of(*({"key": f"t{i}"} for i in range(5)))
    agent = enroll(capacity=3)
    assert len(agent.claim(capacity=2)) == 2
    assert len(agent.claim(capacity=64)) == 1  # one slot left of three
    assert agent.claim(capacity=64) == []


def test_claim_with_out_of_range_fields_is_400(server, enroll):
    agent = enroll()
    for body in ({"wait_s": -1}, {"wait_s": MAX_WAIT_S + 0.5}, {"wait_s": "5"}, {"capacity": 0}, {"capacity": 65},
                 {"capacity": "2"}):  # fmt: skip
        assert_error(agent.post("/api/v1/agents/claim", body), 400, "bad_request", body)


def test_claim_answers_an_empty_list_when_wait_runs_out(server, enroll):
    agent = enroll()
    started = time.monotonic()
    assert agent.claim(wait_s=1) == []
    assert 1.0 <= time.monotonic() - started < 3.0


def test_long_poll_is_woken_by_a_run_submitted_while_it_waits(server, enroll, run_of):
    from agents_app.models import Agent as AgentModel

    agent = enroll()
    # Contact is written at most once a second per agent: age it, so the claim's touch shows.
    seen_before = timezone.now() - timedelta(seconds=10)
    AgentModel.objects.filter(pk=agent.id).update(last_seen_at=seen_before)
    answer: dict = {}

    def poll():
        answer["assignments"] = agent.claim(wait_s=MAX_WAIT_S)
        answer["at"] = time.monotonic()

    poller = threading.Thread(target=poll)
    poller.start()
    # The claim has authenticated (it touched the agent) and is about to park.
    wait_until(lambda: AgentModel.objects.get(pk=agent.id).last_seen_at > seen_before, what="the claim to arrive")
    time.sleep(0.2)  # let the request park; a claim that had not parked yet would answer at once anyway
    submitted = time.monotonic()
    run_of({"key": "wake-up"})
    poller.join(MAX_WAIT_S + 5)
    assert [a["task"]["key"] for a in answer["assignments"]] == ["wake-up"]
    assert answer["at"] - submitted < 1.5, "the long poll was not woken by the new task"


def test_long_poll_is_not_woken_by_a_task_it_cannot_run(server, enroll, run_of):
    agent = enroll(labels=[], executors=["simulated"])
    answer: dict = {}

    def poll():
        answer["assignments"] = agent.claim(wait_s=1)

    poller = threading.Thread(target=poll)
    poller.start()
    run_of({"key": "needs-gpu", "requires": ["gpu"]})
    poller.join(5)
    assert answer["assignments"] == []


def test_a_long_poll_whose_agent_hung_up_claims_nothing(server, enroll, run_of):
    """The server drops a parked long poll when its client disconnects, instead of handing the next task to
    a connection nobody reads (it would sit assigned until its lease ran out)."""
    from tasks_app.models import Attempt

    gone, other = enroll("gone-1"), enroll("other-1")
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"capacity": 1, "wait_s": MAX_WAIT_S}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(
            b"POST /api/v1/agents/claim HTTP/1.1\r\nHost: " + host.encode() + b"\r\nAuthorization: Bearer "
            + gone.token.encode() + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body
        )  # fmt: skip
        time.sleep(0.5)  # parked
    time.sleep(0.3)  # the server has seen the hang-up
    run = run_of({"key": "for-someone-listening"})
    assert [a["task"]["key"] for a in other.claim(wait_s=2)] == ["for-someone-listening"]
    assert not Attempt.objects.filter(task__run=run, agent_id=gone.id).exists()


def test_claim_without_a_valid_agent_token_is_401(server, enrollment_token):
    url = f"{server}/api/v1/agents/claim"
    assert_error(http("POST", url, {"wait_s": 0}), 401)
    assert_error(http("POST", url, {"wait_s": 0}, token="cpa_unknown"), 401)
    # An enrollment token is not an agent token.
    assert_error(http("POST", url, {"wait_s": 0}, token=enrollment_token), 401)
