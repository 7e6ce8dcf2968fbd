"""POST /api/v1/attempts/ID/complete: the task's new state, retries, repeats, stale attempts, limits."""

from __future__ import annotations

import uuid

from tests.agents_app.api.common import MIB
from tests.conftest import assert_error, ok


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


# --- complete and claim the next (an addition, README "API") ---


def test_a_completion_with_claim_carries_the_next_assignment_and_the_agent_needs_no_claim(server, enroll, run_of):
    from tasks_app.models import Attempt

    run_of({"key": "a"}, {"key": "b", "deps": ["a"]}, {"key": "c"})
    agent = enroll(capacity=1)
    first = agent.claim_one()
    answer = ok(agent.complete(first["attempt_id"], exit_code=0, claim={"capacity": 1}))
    assert answer["task_state"] == "succeeded" and len(answer["assignments"]) == 1
    [second] = answer["assignments"]
    ready_once_first_is_done = {"a": {"b", "c"}, "c": {"a"}}[first["task"]["key"]]  # b waits for a
    assert second["task"]["key"] in ready_once_first_is_done
    assert Attempt.objects.get(pk=second["attempt_id"]).agent_id == uuid.UUID(agent.id)
    third = ok(agent.complete(second["attempt_id"], exit_code=0, claim={"capacity": 1}))["assignments"]
    assert {first["task"]["key"], second["task"]["key"], third[0]["task"]["key"]} == {"a", "b", "c"}
    # Nothing left: the answer says so with an empty list, and without `claim` it is the answer it always was.
    assert ok(agent.complete(third[0]["attempt_id"], exit_code=0, claim={"capacity": 1}))["assignments"] == []


def test_a_completions_claim_takes_no_more_than_the_agents_free_slots(server, enroll, run_of):
    run_of(*[{"key": f"t{i}"} for i in range(6)])
    agent = enroll(capacity=3)
    running = agent.claim(capacity=2)
    assert len(running) == 2
    answer = ok(agent.complete(running[0]["attempt_id"], exit_code=0, claim={"capacity": 64}))
    assert len(answer["assignments"]) == 2  # capacity 3, one still running
    assert "claim.capacity" in assert_error(agent.complete(running[1]["attempt_id"], claim={"capacity": 0}), 400)


def test_a_refused_completion_claims_nothing(server, enroll, run_of):
    from tasks_app.models import Task

    run_of({"key": "a"}, {"key": "b"})
    agent = enroll()
    attempt = agent.claim_one()
    ok(agent.complete(attempt["attempt_id"], result={"v": 1}, exit_code=0))
    assert_error(agent.complete(attempt["attempt_id"], result={"v": 2}, exit_code=0, claim={"capacity": 1}), 409)
    assert Task.objects.exclude(key=attempt["task"]["key"]).get().state == "ready"


def test_a_usage_limit_claims_nothing_in_the_same_request(server, enroll, run_of):
    """The hold on that executor is written by the completion; the agent's next claim respects it."""
    from tasks_app.models import Task

    run_of({"key": "a", "max_attempts": 3}, {"key": "b"})
    agent = enroll()
    attempt = agent.claim_one()
    answer = ok(agent.complete(attempt["attempt_id"], "rate_limited", error="429", retry_after_s=60,
                               claim={"capacity": 1}))  # fmt: skip
    assert answer == {"task_state": "ready", "assignments": []}
    assert set(Task.objects.values_list("state", flat=True)) == {"ready"}
    assert agent.claim() == []  # both tasks are simulated: held on this agent until the reset
