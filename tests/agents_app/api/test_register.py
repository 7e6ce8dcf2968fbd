"""POST /api/v1/agents/register: enrollment tokens, fields, names taken and taken back."""

from __future__ import annotations

import uuid
from datetime import timedelta

from django.utils import timezone

from tests.agents_app.api.common import MAX_WAIT_S, register_call
from tests.conftest import FAST_TIMINGS, assert_error, http, ok


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
