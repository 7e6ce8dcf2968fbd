"""Enrollment tokens limited in uses and time (also when registrations race for the last use), revoking an
agent's token, disabling an agent, and re-enrolling to rotate a token: with real agent daemon processes
against a real server process, since what matters is what the daemon does when the server says no."""

from __future__ import annotations

import json
import threading
import time
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction
from django.utils import timezone

from agents_app import registry
from agents_app.models import Agent, EnrollmentToken
from agents_app.tokens import hash_token
from tasks_app.models import Attempt, Task
from tests.conftest import FAST_TIMINGS, doc, http, parked_claim, wait_for

pytestmark = pytest.mark.django_db(transaction=True)
HEARTBEAT_S = float(FAST_TIMINGS["CP_HEARTBEAT_INTERVAL_S"])


def current(name: str) -> Agent | None:
    return Agent.objects.filter(name=name, retired_at__isnull=True).first()


def log_of(tmp_path, name: str) -> str:
    return (tmp_path / f"{name}.log").read_text()


def serving(tmp_path, name: str) -> bool:
    """The daemon has its identity and runs its loops."""
    path = tmp_path / f"{name}.log"
    return path.exists() and "serving as" in path.read_text()


def register_call(server: str, token: str, name: str, **extra):
    body = {"name": name, "labels": [], "executors": ["shell"], "capacity": 1, **extra}
    return http("POST", f"{server}/api/v1/agents/register", body, token=token)


# --- limited tokens -----------------------------------------------------------------------------------


def test_create_enrollment_token_limits_uses_and_lifetime_and_stores_only_a_hash():
    out = StringIO()
    call_command("create_enrollment_token", "--uses", "2", "--expires", "24h", "--note", "ci", stdout=out)
    token = out.getvalue().strip()
    record = EnrollmentToken.objects.get(token_hash=hash_token(token))
    assert (record.max_uses, record.uses, record.note) == (2, 0, "ci")
    assert abs(record.expires_at - timezone.now() - timedelta(hours=24)) < timedelta(minutes=1)
    assert token.startswith("cpe_") and token not in (record.token_hash, record.prefix)


def test_a_single_use_token_enrolls_one_agent_and_the_next_daemon_is_told_why_not(fleet, tmp_path):
    token, record = registry.create_enrollment_token(uses=1)
    first = fleet("solo-1", ["x"], token=token)
    wait_for(lambda: serving(tmp_path, "solo-1"), 30, what="the first agent to enroll")
    second = fleet("solo-2", ["x"], token=token)
    assert second.wait(30) == 1
    assert "registration refused: HTTP 401 token_used_up" in log_of(tmp_path, "solo-2")
    assert current("solo-2") is None
    record.refresh_from_db()
    assert record.uses == 1
    assert first.poll() is None  # the first one keeps working: only registering counts a use


def test_an_expired_token_is_refused(fleet, tmp_path):
    token, record = registry.create_enrollment_token(expires=timedelta(hours=1))
    EnrollmentToken.objects.filter(pk=record.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    proc = fleet("late", ["x"], token=token)
    assert proc.wait(30) == 1
    assert "registration refused: HTTP 401 token_expired" in log_of(tmp_path, "late")
    assert current("late") is None


def lock_waiters() -> int:
    """Backends of this database waiting for a lock, as PostgreSQL sees them now (not as this transaction's
    statistics snapshot remembers them)."""
    with connection.cursor() as cur:
        cur.execute("SELECT pg_stat_clear_snapshot()")
        cur.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
        )
        return cur.fetchone()[0]


def test_registrations_racing_for_the_last_use_of_a_token_let_exactly_one_win(live_server_proc):
    token, record = registry.create_enrollment_token(uses=3)
    EnrollmentToken.objects.filter(pk=record.pk).update(uses=2)  # one use left
    racers = 6
    answers: list = []
    threads = [
        threading.Thread(target=lambda i=i: answers.append(register_call(live_server_proc.url, token, f"racer-{i}")))
        for i in range(racers)
    ]
    # Hold the token's row so every registration arrives before any decides: each must queue on the row lock
    # (a registration that read the use count without locking would not wait, and several would win).
    with transaction.atomic():
        EnrollmentToken.objects.select_for_update().get(pk=record.pk)
        for thread in threads:
            thread.start()
        wait_for(lambda: lock_waiters() >= racers, 30, what="every registration to wait for the token's row")
    for thread in threads:
        thread.join(30)
    statuses = sorted(status for status, _ in answers)
    assert statuses == [201] + [401] * (racers - 1), answers
    assert {body["error"] for status, body in answers if status == 401} == {"token_used_up"}
    record.refresh_from_db()
    assert record.uses == 3
    assert Agent.objects.filter(enrollment_token=record).count() == 1


# --- revocation, disabling, rotation ---------------------------------------------------------------------


def test_revoking_an_agent_stops_it_within_one_heartbeat_and_it_does_not_enroll_itself_again(fleet, submit, tmp_path):
    proc = fleet("doomed", ["doom"], executors=["shell"])
    run = submit(doc({"key": "long", "executor": "shell", "command": "sleep 60", "requires": ["doom"]}))
    attempt = wait_for(lambda: Attempt.objects.filter(run=run, state="running").first(), 30, what="the task")
    agent = current("doomed")

    revoked = time.monotonic()
    registry.revoke_agent(agent.pk, "user:test")
    assert proc.wait(HEARTBEAT_S + 10) == 1
    # One heartbeat to hear it, then a prompt stop (its task's process group is killed on the way out).
    assert time.monotonic() - revoked < HEARTBEAT_S + 4
    log = log_of(tmp_path, "doomed")
    assert "stopped: the server revoked this agent's token" in log and "--re-enroll" in log
    attempt.refresh_from_db()
    assert attempt.state == "lost"
    assert Task.objects.get(run=run).state == "ready"  # offered again to another agent
    # Its enrollment token would still allow it, yet it did not register itself back in...
    assert Agent.objects.filter(name="doomed").count() == 1 and current("doomed") is None
    # ...nor does a restart, which finds the revoked identity saved...
    again = fleet("doomed", ["doom"], executors=["shell"])
    assert again.wait(30) == 1
    assert Agent.objects.filter(name="doomed").count() == 1
    # ...until an operator re-enrolls it on purpose.
    fleet("doomed", ["doom"], executors=["shell"], extra=["--re-enroll"])
    back = wait_for(lambda: current("doomed"), 30, what="the re-enrolled agent")
    assert back.pk != agent.pk


def test_a_revoked_token_answers_401_agent_revoked_and_an_unknown_one_401_unauthorized(live_server_proc):
    token, _ = registry.create_enrollment_token()
    status, body = register_call(live_server_proc.url, token, "victim")
    assert status == 201
    registry.revoke_agent(body["agent_id"], "user:test")
    heartbeat = f"{live_server_proc.url}/api/v1/agents/heartbeat"
    assert http("POST", heartbeat, {"status": "idle"}, token=body["token"]) == (
        401,
        {"error": "agent_revoked", "detail": "this agent's token was revoked by an operator"},
    )
    status, body = http("POST", heartbeat, {"status": "idle"}, token="cpa_never-issued")
    assert (status, body["error"]) == (401, "unauthorized")


def test_disabling_an_agent_stops_its_daemon_within_one_heartbeat(fleet, tmp_path):
    proc = fleet("sleepy", ["x"])
    wait_for(lambda: serving(tmp_path, "sleepy"), 30, what="the agent to enroll")
    disabled = time.monotonic()
    registry.set_agent_flags(current("sleepy").pk, "user:test", enabled=False)
    assert proc.wait(HEARTBEAT_S + 10) == 1
    assert time.monotonic() - disabled < HEARTBEAT_S + 4
    assert "the server refuses this agent (this agent is disabled)" in log_of(tmp_path, "sleepy")


def test_re_enrolling_rotates_the_token_at_once_and_the_old_one_answers_401(live_server_proc, fleet, tmp_path):
    first = fleet("rotor", ["x"])
    wait_for(lambda: serving(tmp_path, "rotor"), 30, what="the agent to enroll")
    old = current("rotor")
    state_file = tmp_path / "agents" / "rotor.state.json"
    old_token = json.loads(state_file.read_text())["token"]
    first.terminate()
    assert first.wait(15) == 0
    # Its clean stop said goodbye (offline at once); one call with its token and it is online again, as a
    # daemon restarting within the offline threshold would be: a stranger could not take the name now.
    heartbeat = f"{live_server_proc.url}/api/v1/agents/heartbeat"
    assert http("POST", heartbeat, {"status": "idle"}, token=old_token)[0] == 200
    assert current("rotor").is_online

    fleet("rotor", ["x"], extra=["--re-enroll"])
    new = wait_for(lambda: (a := current("rotor")) and a.pk != old.pk and a, 30, what="the new identity")

    # The server has the new identity a moment before the daemon has saved it (its state file is replaced whole).
    def saved():
        token = json.loads(state_file.read_text())["token"]
        return token != old_token and token

    new_token = wait_for(saved, 10, 0.02, "the daemon to save its new token")
    # It proved it held the old token, so it did not wait for its old identity to go offline.
    assert "is online on the server" not in log_of(tmp_path, "rotor")
    status, body = http("POST", heartbeat, {"status": "idle"}, token=old_token)
    assert (status, body["error"]) == (401, "agent_replaced")
    assert http("POST", heartbeat, {"status": "idle"}, token=new_token)[0] == 200
    assert new.token_hash == hash_token(new_token)


def test_only_the_holder_of_an_online_agents_token_may_take_its_name(live_server_proc):
    token, _ = registry.create_enrollment_token()
    status, first = register_call(live_server_proc.url, token, "taken")
    assert status == 201
    status, body = register_call(live_server_proc.url, token, "taken", replaces_token="cpa_a-guess")
    assert (status, body["error"]) == (409, "name_taken")
    status, body = register_call(live_server_proc.url, token, "taken", replaces_token=first["token"])
    assert status == 201 and body["token"] != first["token"]


def test_an_operator_revokes_from_the_agents_page_and_a_viewer_may_not(
    live_server_proc, operator, django_user_model, client
):
    token, _ = registry.create_enrollment_token()
    status, body = register_call(live_server_proc.url, token, "paged")
    assert status == 201
    viewer = django_user_model.objects.create_user("vera", password="pw-vera-12345")
    client.force_login(viewer)
    assert client.post(f"/agents/{body['agent_id']}/revoke/").status_code == 403
    assert current("paged") is not None

    client.force_login(operator[0])
    answer = client.post(f"/agents/{body['agent_id']}/revoke/", headers={"HX-Request": "true"})
    assert answer.status_code == 200 and "token revoked" in answer.content.decode()
    agent = Agent.objects.get(pk=body["agent_id"])
    assert (agent.status, agent.retired_at is not None, agent.revoked_at is not None) == ("retired", True, True)
    assert client.post(f"/agents/{body['agent_id']}/revoke/").status_code == 404  # nothing current to revoke


def test_revoke_agent_command_names_what_it_revoked(live_server_proc):
    token, _ = registry.create_enrollment_token()
    assert register_call(live_server_proc.url, token, "cmd-1")[0] == 201
    out = StringIO()
    call_command("revoke_agent", "cmd-1", stdout=out)
    assert out.getvalue().strip() == "cmd-1: token revoked"
    assert current("cmd-1") is None
    with pytest.raises(CommandError, match="no current agent named cmd-1"):
        call_command("revoke_agent", "cmd-1")


def test_a_claim_parked_before_the_revocation_gets_401_when_work_arrives_not_the_work(live_server_proc, submit):
    token, _ = registry.create_enrollment_token()
    status, body = register_call(live_server_proc.url, token, "parked")
    assert status == 201
    poll, answer = parked_claim(live_server_proc.url, body["token"], body["agent_id"], wait_s=5)
    registry.revoke_agent(body["agent_id"], "user:test")
    run = submit(doc({"key": "bait", "executor": "shell", "command": "true"}))
    poll.join(10)
    status, refusal = answer["result"]
    assert (status, refusal["error"]) == (401, "agent_revoked")
    assert not Attempt.objects.filter(run=run).exists()
