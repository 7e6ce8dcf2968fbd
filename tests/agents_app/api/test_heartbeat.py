"""POST /api/v1/agents/heartbeat: leases, cancel, drain, shutdown, disabled agents."""

from __future__ import annotations

import uuid

from tests.conftest import assert_error, ok


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
