"""PROTOCOL.md's agent endpoints, spoken over real HTTP to a real uvicorn process on the test database.

Every refusal is checked through `assert_error`, which also pins the error body to exactly
{"error", "detail"}. The server runs with the fast clocks of tests/conftest.py (heartbeat 1 s, lease 6 s,
max wait 5 s, offline after 3 s), so every test here finishes well inside those windows.
"""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta

import pytest
from django.utils import timezone

from tests.conftest import FAST_TIMINGS, assert_error, http, ok

MAX_WAIT_S = int(FAST_TIMINGS["CP_MAX_WAIT_S"])
KIB, MIB = 1024, 1024 * 1024

AGENT_POST_PATHS = (
    "/api/v1/agents/register",
    "/api/v1/agents/claim",
    "/api/v1/agents/heartbeat",
    f"/api/v1/attempts/{uuid.uuid4()}/progress",
    f"/api/v1/attempts/{uuid.uuid4()}/complete",
    f"/api/v1/attempts/{uuid.uuid4()}/artifacts",
)


# --- helpers ------------------------------------------------------------------------------------------


def register_call(server: str, token: str | None, **overrides):
    body = {"name": "cg-1", "labels": ["codex", "linux"], "hostname": "mugen", "version": "1.0.0",
            "executors": ["shell", "simulated", "codex"], "capacity": 1, **overrides}  # fmt: skip
    return http("POST", f"{server}/api/v1/agents/register", body, token=token)


def wait_until(predicate, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# --- register -----------------------------------------------------------------------------------------


def test_register_answers_201_with_identity_and_timings(server, enrollment_token):
    from agents_app.models import Agent as AgentModel
    from agents_app.tokens import hash_token

    body = ok(register_call(server, enrollment_token), 201)
    assert set(body) == {"agent_id", "token", "heartbeat_interval_s", "lease_s", "max_wait_s"}
    assert body["heartbeat_interval_s"] == int(FAST_TIMINGS["CP_HEARTBEAT_INTERVAL_S"])
    assert body["lease_s"] == int(FAST_TIMINGS["CP_LEASE_S"])
    assert body["max_wait_s"] == MAX_WAIT_S
    stored = AgentModel.objects.get(pk=uuid.UUID(body["agent_id"]))
    assert (stored.name, stored.labels, stored.capacity, stored.status) == ("cg-1", ["codex", "linux"], 1, "online")
    assert stored.executors == ["shell", "simulated", "codex"]
    assert stored.token_hash == hash_token(body["token"]) != body["token"]  # only the hash is stored


def test_register_accepts_the_boundary_values(server, enrollment_token):
    labels = [f"l{i}" for i in range(32)]
    ok(register_call(server, enrollment_token, name="a" * 64, labels=labels, capacity=64), 201)
    ok(register_call(server, enrollment_token, name="A.b_c-9", capacity=1), 201)


def test_register_without_enrollment_token_is_401(server):
    assert_error(register_call(server, None), 401)
    assert_error(register_call(server, "cpe_not-a-real-token"), 401)
    status, body = http(
        "POST", f"{server}/api/v1/agents/register", {"name": "x"}, headers={"Authorization": "Basic abc"}
    )
    assert_error((status, body), 401)


def test_revoked_enrollment_token_is_401(server, enrollment_token):
    from agents_app.models import EnrollmentToken
    from agents_app.tokens import hash_token

    EnrollmentToken.objects.filter(token_hash=hash_token(enrollment_token)).update(revoked_at=timezone.now())
    assert_error(register_call(server, enrollment_token), 401)


def test_expired_enrollment_token_is_401(server):
    from agents_app.models import EnrollmentToken
    from agents_app.registry import create_enrollment_token

    expired, _ = create_enrollment_token(expires=timedelta(seconds=-1))
    assert_error(register_call(server, expired), 401, "token_expired")

    expiring, record = create_enrollment_token(expires=timedelta(hours=1))
    ok(register_call(server, expiring, name="early"), 201)
    EnrollmentToken.objects.filter(pk=record.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert_error(register_call(server, expiring, name="late"), 401, "token_expired")


def test_used_up_enrollment_token_is_401(server):
    from agents_app.models import Agent as AgentModel
    from agents_app.registry import create_enrollment_token

    once, record = create_enrollment_token(uses=1)
    ok(register_call(server, once, name="first"), 201)
    assert_error(register_call(server, once, name="second"), 401, "token_used_up")
    record.refresh_from_db()
    assert record.uses == 1
    assert not AgentModel.objects.filter(name="second").exists()


INVALID_REGISTRATIONS = [
    {"name": "bad name"},
    {"name": ""},
    {"name": "a" * 65},
    {"name": "slash/y"},
    {"name": 5},
    {"name": None},
    {"labels": [f"l{i}" for i in range(33)]},
    {"labels": "x"},
    {"labels": ["ok", "not ok"]},
    {"labels": [1]},
    {"capacity": 0},
    {"capacity": 65},
    {"capacity": "1"},
    {"capacity": 1.5},
    {"capacity": True},
    {"executors": "shell"},
    {"executors": ["Shell!"]},
    {"hostname": 7},
    # `$` in a pattern matches before a final newline: names, labels and executors are matched whole.
    {"name": "k\n"},
    {"labels": ["gpu\n"]},
    {"executors": ["shell\n"]},
]


def test_register_with_invalid_fields_is_400(server, enrollment_token):
    from agents_app.models import Agent as AgentModel

    for overrides in INVALID_REGISTRATIONS:
        assert_error(register_call(server, enrollment_token, **overrides), 400, "bad_request", overrides)
    assert not AgentModel.objects.exists()


def test_register_name_of_an_online_agent_is_409(server, enrollment_token):
    first = ok(register_call(server, enrollment_token, name="twin"), 201)
    assert_error(register_call(server, enrollment_token, name="twin"), 409, "name_taken")
    # The first identity is untouched.
    ok(http("POST", f"{server}/api/v1/agents/heartbeat", {}, token=first["token"]))


def test_offline_agents_name_registers_again_and_old_token_is_revoked(server, enrollment_token):
    from agents_app.models import Agent as AgentModel

    old = ok(register_call(server, enrollment_token, name="phoenix"), 201)
    AgentModel.objects.filter(pk=old["agent_id"]).update(status="offline")
    new = ok(register_call(server, enrollment_token, name="phoenix"), 201)
    assert new["agent_id"] != old["agent_id"] and new["token"] != old["token"]
    assert AgentModel.objects.get(pk=old["agent_id"]).status == "retired"
    assert_error(http("POST", f"{server}/api/v1/agents/heartbeat", {}, token=old["token"]), 401)
    ok(http("POST", f"{server}/api/v1/agents/heartbeat", {}, token=new["token"]))


def test_disabled_agents_name_registers_again(server, enrollment_token):
    from agents_app.registry import set_agent_flags

    old = ok(register_call(server, enrollment_token, name="switched-off"), 201)
    set_agent_flags(old["agent_id"], "test", enabled=False)
    ok(register_call(server, enrollment_token, name="switched-off"), 201)
    assert_error(http("POST", f"{server}/api/v1/agents/heartbeat", {}, token=old["token"]), 401)


def test_reregistering_loses_the_old_identitys_live_attempts(server, enroll, run_of):
    from agents_app.models import Agent as AgentModel
    from tasks_app.models import Attempt, Task

    old = enroll("phoenix")
    run_of({"key": "a"})
    attempt = old.claim_one()
    AgentModel.objects.filter(pk=old.id).update(status="offline")
    enroll("phoenix")
    assert Attempt.objects.get(pk=attempt["attempt_id"]).state == "lost"
    assert Task.objects.get(pk=attempt["task"]["id"]).state == "ready"


# --- claim --------------------------------------------------------------------------------------------


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


# --- heartbeat ----------------------------------------------------------------------------------------


def test_heartbeat_extends_the_leases_of_listed_attempts(server, enroll, run_of):
    from tasks_app.models import Attempt

    run_of({"key": "a"}, {"key": "b"})
    agent = enroll(capacity=2)
    mine, other = agent.claim(capacity=2)
    lease_before = Attempt.objects.get(pk=mine["attempt_id"]).lease_expires_at
    other_before = Attempt.objects.get(pk=other["attempt_id"]).lease_expires_at
    assert ok(agent.heartbeat([mine["attempt_id"]]))["commands"] == []
    assert Attempt.objects.get(pk=mine["attempt_id"]).lease_expires_at > lease_before
    assert Attempt.objects.get(pk=other["attempt_id"]).lease_expires_at == other_before  # not listed


def test_heartbeat_does_not_extend_another_agents_lease(server, enroll, run_of):
    from tasks_app.models import Attempt

    run_of({"key": "a"})
    owner, stranger = enroll("owner"), enroll("stranger")
    attempt = owner.claim_one()
    before = Attempt.objects.get(pk=attempt["attempt_id"]).lease_expires_at
    commands = ok(stranger.heartbeat([attempt["attempt_id"]]))["commands"]
    assert commands == [{"type": "cancel", "attempt_id": attempt["attempt_id"]}]
    assert Attempt.objects.get(pk=attempt["attempt_id"]).lease_expires_at == before


def test_heartbeat_answers_cancel_for_an_attempt_no_longer_live(server, enroll, run_of):
    from tasks_app.actions import cancel_run

    run = run_of({"key": "a"}, {"key": "b"})
    agent = enroll(capacity=2)
    done, canceled = agent.claim(capacity=2)
    ok(agent.complete(done["attempt_id"]))
    cancel_run(run.id, "test")
    unknown = str(uuid.uuid4())
    commands = ok(agent.heartbeat([done["attempt_id"], canceled["attempt_id"], unknown]))["commands"]
    assert commands == [
        {"type": "cancel", "attempt_id": done["attempt_id"]},
        {"type": "cancel", "attempt_id": canceled["attempt_id"]},
        {"type": "cancel", "attempt_id": unknown},
    ]


def test_heartbeat_answers_drain_for_a_draining_agent_and_it_gets_no_work(server, enroll, run_of):
    from agents_app.registry import set_agent_flags

    agent = enroll()
    set_agent_flags(agent.id, "test", draining=True)
    assert ok(agent.heartbeat())["commands"] == [{"type": "drain"}]
    run_of({"key": "a"})
    assert agent.claim() == []


def test_heartbeat_answers_shutdown_when_requested(server, enroll):
    from agents_app.registry import set_agent_flags

    agent = enroll()
    set_agent_flags(agent.id, "test", shutdown_requested=True)
    assert ok(agent.heartbeat())["commands"] == [{"type": "shutdown"}]


def test_disabled_agent_is_403(server, enroll, run_of):
    from agents_app.registry import set_agent_flags

    run_of({"key": "a"})
    agent = enroll()
    set_agent_flags(agent.id, "test", enabled=False)
    assert_error(agent.heartbeat(), 403, "agent_disabled")
    assert_error(agent.post("/api/v1/agents/claim", {"wait_s": 0}), 403, "agent_disabled")
    assert_error(agent.progress(str(uuid.uuid4()), {"progress": 0.1}), 403, "agent_disabled")


def test_heartbeat_with_invalid_fields_is_400(server, enroll):
    agent = enroll()
    for body in ({"status": "sleeping"}, {"status": 1}, {"attempts": ["not-a-uuid"]}, {"attempts": "x"},
                 {"attempts": [1]}, {"first": "yes"}, {"first": 1}):  # fmt: skip
        assert_error(agent.post("/api/v1/agents/heartbeat", body), 400, "bad_request", body)


# --- progress -----------------------------------------------------------------------------------------


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


# --- complete -----------------------------------------------------------------------------------------


def test_complete_answers_the_tasks_new_state(server, enroll, run_of):
    from tasks_app.models import Attempt, Run

    run = run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()
    body = ok(agent.complete(attempt["attempt_id"], result={"answer": 42}, exit_code=0))
    assert body == {"task_state": "succeeded"}
    stored = Attempt.objects.get(pk=attempt["attempt_id"])
    assert (stored.state, stored.result, stored.exit_code) == ("succeeded", {"answer": 42}, 0)
    assert Run.objects.get(pk=run.id).state == "succeeded"


def test_failed_completion_with_attempts_left_sends_the_task_back_to_ready(server, enroll, run_of):
    run_of({"key": "flaky", "max_attempts": 2, "retry_delay_s": 0})
    agent = enroll()
    attempt = agent.claim_one()
    assert ok(agent.complete(attempt["attempt_id"], "failed", error="boom", exit_code=1)) == {"task_state": "ready"}
    again = agent.claim_one()
    assert again["task"]["attempt"] == 2
    assert ok(agent.complete(again["attempt_id"], "failed", error="boom", exit_code=1)) == {"task_state": "failed"}


def test_the_same_completion_twice_is_accepted_and_recorded_once(server, enroll, run_of):
    from tasks_app.models import Event

    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()
    fields = {"result": {"files": ["a.py"]}, "error": "", "exit_code": 0}
    assert ok(agent.complete(attempt["attempt_id"], **fields)) == {"task_state": "succeeded"}
    assert ok(agent.complete(attempt["attempt_id"], **fields)) == {"task_state": "succeeded"}
    ends = Event.objects.filter(attempt_id=attempt["attempt_id"], kind="attempt", to_state="succeeded")
    assert ends.count() == 1


def test_a_different_completion_of_a_finished_attempt_is_refused(server, enroll, run_of):
    from tasks_app.models import Attempt, Event

    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()
    ok(agent.complete(attempt["attempt_id"], result={"v": 1}, exit_code=0))
    events = Event.objects.count()
    assert_error(agent.complete(attempt["attempt_id"], result={"v": 2}, exit_code=0), 409)
    assert_error(agent.complete(attempt["attempt_id"], "failed", error="late", exit_code=1), 409)
    stored = Attempt.objects.get(pk=attempt["attempt_id"])
    assert (stored.state, stored.result) == ("succeeded", {"v": 1})
    assert Event.objects.count() == events


def test_lost_attempt_completion_is_refused(server, enroll, run_of):
    from tasks_app.actions import lose_attempts
    from tasks_app.models import Attempt, Task

    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()
    assert lose_attempts([attempt["attempt_id"]], "lease expired", "test") == 1
    assert_error(agent.complete(attempt["attempt_id"]), 409, "stale_attempt")
    assert Attempt.objects.get(pk=attempt["attempt_id"]).state == "lost"
    assert Task.objects.get(pk=attempt["task"]["id"]).state == "ready"


def test_completion_of_another_agents_attempt_is_refused(server, enroll, run_of):
    from tasks_app.models import Attempt

    run_of({"key": "a"})
    owner, stranger = enroll("owner"), enroll("stranger")
    attempt = owner.claim_one()
    assert_error(stranger.complete(attempt["attempt_id"]), 409, "stale_attempt")
    assert Attempt.objects.get(pk=attempt["attempt_id"]).state == "assigned"


def test_complete_for_an_unknown_attempt_is_404(server, enroll):
    agent = enroll()
    assert_error(agent.complete(str(uuid.uuid4())), 404, "not_found")
    assert_error(agent.complete("zzz"), 404, "not_found")


def test_complete_with_invalid_fields_is_400(server, enroll, run_of):
    from tasks_app.models import Attempt

    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()
    path = f"/api/v1/attempts/{attempt['attempt_id']}/complete"
    for body in ({}, {"outcome": "done"}, {"outcome": "succeeded", "result": [1]},
                 {"outcome": "failed", "exit_code": "1"}, {"outcome": "failed", "error": 5}):  # fmt: skip
        assert_error(agent.post(path, body), 400, "bad_request", body)
    assert Attempt.objects.get(pk=attempt["attempt_id"]).state == "assigned"


def test_complete_with_a_result_over_1_mib_is_413(server, enroll, run_of):
    from tasks_app.models import Attempt

    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()
    just_over = {"blob": "a" * MIB}  # its JSON is 1 MiB + 11 bytes
    assert_error(agent.complete(attempt["attempt_id"], result=just_over), 413, "too_large")
    assert_error(agent.complete(attempt["attempt_id"], result={"blob": "a" * (3 * MIB // 2)}), 413, "too_large")
    assert Attempt.objects.get(pk=attempt["attempt_id"]).state == "assigned"
    assert ok(agent.complete(attempt["attempt_id"], result={"blob": "a" * (MIB - 64)})) == {"task_state": "succeeded"}


# --- artifacts ----------------------------------------------------------------------------------------


def test_artifact_upload_answers_201_with_a_matching_sha256(server, enroll, run_of):
    from tasks_app.models import Artifact

    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()
    content = b"report line\n" * 1000 + bytes(range(256))
    body = ok(agent.upload(attempt["attempt_id"], {"file": ("report.txt", content)}), 201)
    assert set(body) == {"artifact_id", "name", "size", "sha256"}
    assert (body["name"], body["size"], body["sha256"]) == ("report.txt", len(content),
                                                            hashlib.sha256(content).hexdigest())  # fmt: skip
    stored = Artifact.objects.get(pk=body["artifact_id"])
    assert bytes(stored.content) == content
    assert str(stored.task_id) == attempt["task"]["id"]


def test_artifact_upload_for_a_stale_attempt_is_409(server, enroll, run_of):
    from tasks_app.models import Artifact

    run_of({"key": "a"})
    agent, stranger = enroll("owner"), enroll("stranger")
    attempt = agent.claim_one()
    assert_error(stranger.upload(attempt["attempt_id"], {"file": ("x.txt", b"x")}), 409, "stale_attempt")
    ok(agent.complete(attempt["attempt_id"]))
    assert_error(agent.upload(attempt["attempt_id"], {"file": ("x.txt", b"x")}), 409, "stale_attempt")
    assert not Artifact.objects.exists()


def test_artifact_upload_for_an_unknown_attempt_is_404(server, enroll):
    agent = enroll()
    assert_error(agent.upload(str(uuid.uuid4()), {"file": ("x.txt", b"x")}), 404, "not_found")


def test_artifact_over_the_limit_is_413(server, enroll, run_of):
    from tasks_app.models import Artifact

    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()
    assert_error(agent.upload(attempt["attempt_id"], {"file": ("big.bin", b"\0" * (10 * MIB + 1))}), 413, "too_large")
    assert not Artifact.objects.exists()
    body = ok(agent.upload(attempt["attempt_id"], {"file": ("max.bin", b"\1" * (10 * MIB))}), 201)
    assert body["size"] == 10 * MIB


CONTROLS = ["bad\x00name.txt", "report\r.txt", "two\nlines.txt", "tab\there", "del\x7f", "c1\x85"]


@pytest.mark.parametrize("name", CONTROLS)
def test_an_artifact_name_with_a_control_character_is_400_and_nothing_is_stored(server, enroll, run_of, name):
    from agents_app.cp_agent import encode_artifact
    from tasks_app.models import Artifact

    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()
    raw, content_type = encode_artifact(name, b"x")
    path = f"/api/v1/attempts/{attempt['attempt_id']}/artifacts"
    assert_error(agent.post(path, raw=raw, headers={"Content-Type": content_type}), 400, "bad_request", "control")
    assert not Artifact.objects.exists()
    fine = "out/résumé – final.txt"  # any other Unicode is a fine name
    raw, content_type = encode_artifact(fine, b"x")
    assert ok(agent.post(path, raw=raw, headers={"Content-Type": content_type}), 201)["name"] == fine


def test_artifact_upload_without_the_file_field_is_400(server, enroll, run_of):
    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()
    path = f"/api/v1/attempts/{attempt['attempt_id']}/artifacts"
    assert_error(agent.upload(attempt["attempt_id"], {"other": ("x.txt", b"x")}), 400, "bad_request")
    assert_error(agent.post(path, {"file": "x"}), 400, "bad_request")  # JSON, not multipart


# --- what every endpoint shares -----------------------------------------------------------------------


def test_malformed_json_is_400(server, enroll, enrollment_token):
    agent = enroll()
    url = f"{server}/api/v1/agents/register"
    assert_error(http("POST", url, raw=b'{"name": ', token=enrollment_token), 400, "malformed_json")
    assert_error(http("POST", url, raw=b"\xff\xfe", token=enrollment_token), 400, "malformed_json")
    for path in ("/api/v1/agents/claim", "/api/v1/agents/heartbeat", f"/api/v1/attempts/{uuid.uuid4()}/progress",
                 f"/api/v1/attempts/{uuid.uuid4()}/complete"):  # fmt: skip
        assert_error(agent.post(path, raw=b"{not json"), 400, "malformed_json")


def test_a_json_body_that_is_not_an_object_is_400(server, enroll, enrollment_token):
    agent = enroll()
    assert_error(http("POST", f"{server}/api/v1/agents/register", [1, 2], token=enrollment_token), 400)
    for path in ("/api/v1/agents/claim", "/api/v1/agents/heartbeat", f"/api/v1/attempts/{uuid.uuid4()}/progress",
                 f"/api/v1/attempts/{uuid.uuid4()}/complete"):  # fmt: skip
        assert_error(agent.post(path, ["x"]), 400, "bad_request")
        assert_error(agent.post(path, "a string"), 400, "bad_request")


def test_text_postgresql_cannot_hold_is_replaced_not_a_500(server, enroll, run_of, enrollment_token):
    from agents_app.models import Agent as AgentModel
    from tasks_app.models import Attempt

    body = {"name": "odd-host", "hostname": "h\x00st", "version": "1.\ud800"}
    ok(http("POST", f"{server}/api/v1/agents/register", body, token=enrollment_token), 201)
    assert AgentModel.objects.values_list("hostname", "version").get(name="odd-host") == ("h\ufffdst", "1.\ufffd")
    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()["attempt_id"]
    ok(agent.progress(attempt, {"message": "a\x00b", "log": "raw\x00output \udcff\n"}))
    result = {"k\x00": ["v\ud800", {"deep": "\x00"}], "emoji": "\U0001f600"}
    ok(agent.complete(attempt, result=result, error="e\x00"))
    stored = Attempt.objects.get(pk=attempt)
    assert (stored.message, stored.log, stored.error) == ("a\ufffdb", "raw\ufffdoutput \ufffd\n", "e\ufffd")
    assert stored.result == {"k\ufffd": ["v\ufffd", {"deep": "\ufffd"}], "emoji": "\U0001f600"}


def test_nan_infinity_and_absurd_nesting_are_400_not_a_500(server, enroll, run_of):
    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()["attempt_id"]
    path = f"/api/v1/attempts/{attempt}/complete"
    for raw in (b'{"outcome": "succeeded", "result": {"x": NaN}}', b'{"outcome": "failed", "exit_code": Infinity}',
                b'{"outcome": "succeeded", "result": {"x": ' + b"[" * 20000 + b"]" * 20000 + b"}}"):  # fmt: skip
        assert_error(agent.post(path, raw=raw), 400, "malformed_json", raw[:50])
    nested = b'{"outcome": "succeeded", "result": {"x": ' + b"[" * 200 + b'"\\u0000"' + b"]" * 200 + b"}}"
    assert ok(agent.post(path, raw=nested)) == {"task_state": "succeeded"}


def test_other_methods_on_a_post_endpoint_are_405_json(server):
    for path in AGENT_POST_PATHS:
        for method in ("GET", "PUT", "DELETE"):
            assert_error(http(method, server + path), 405, "method_not_allowed", f"{method} {path}")


def test_an_unknown_api_path_is_404_json(server):
    for method, path in (("GET", "/api/v1/nope"), ("POST", "/api/v1/agents/nope"), ("GET", "/api/"),
                         ("POST", "/api/v2/agents/claim"), ("GET", f"/api/v1/attempts/{uuid.uuid4()}/nope"),
                         ("GET", "/api/v1/agents/claim/"), ("POST", "/api/v1/agents/claim/")):  # fmt: skip
        answer = http(method, server + path, {} if method == "POST" else None)
        assert_error(answer, 404, "not_found", f"{method} {path}")
