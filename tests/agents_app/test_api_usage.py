"""PROTOCOL.md v1.1's AI usage over real HTTP: usage and sessions stored and summed, the price table on AI
assignments, run budgets and the daily cap enforced, and a provider's usage limit (outcome `rate_limited`)
or a lost login returning the task without using up an attempt while that agent's executor is held back.

The agents here speak the protocol by hand (tests/agents_app/test_api_agents.py's Agent), so each rule is
pinned on the server alone; tests/agents_app/test_ai_limits.py has the same through the real daemon and CLIs.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from agents_app.cp_agent import DEFAULT_PRICES, PRICES_AS_OF
from agents_app.models import Agent as AgentRow
from tasks_app.models import Attempt, Event, ModelPrice, Run, Task
from tasks_app.states import AttemptState, RunState, TaskState
from tests.agents_app.protocol_agent import Agent
from tests.conftest import Server, assert_error, doc, http, ok, wait_for

pytestmark = pytest.mark.django_db(transaction=True)

AI = ("shell", "claude", "codex")


@pytest.fixture
def api_token(operator) -> str:
    return operator[1]


def usage(cost: float, **tokens) -> dict:
    return {"model": "claude-sonnet-4-5", "input_tokens": 1000, "output_tokens": 50, "cache_read_tokens": 0,
            "cache_write_tokens": 0, "reasoning_tokens": 0, "cost_usd": cost, "cost_estimated": False,
            **tokens}  # fmt: skip


def shell_task(key: str) -> dict:
    return {"key": key, "executor": "shell", "command": "true"}


def claude_task(key: str, **fields) -> dict:
    return {"key": key, "executor": "claude", "prompt": f"do {key}", **fields}


def status_of(server_url: str, api_token: str, run_id) -> dict:
    return ok(http("GET", f"{server_url}/api/v1/runs/{run_id}", token=api_token))


def task_of(attempt_id: str) -> Task:
    return Attempt.objects.select_related("task").get(pk=attempt_id).task


# --- usage, cost and sessions ------------------------------------------------------------------------


def test_usage_from_progress_and_completion_is_stored_per_attempt_and_summed_per_task_and_run(
    server, enroll, run_of, api_token
):
    run = run_of(claude_task("a"), claude_task("b"))
    agent = enroll(executors=AI, capacity=2)
    first, second = sorted(agent.claim(capacity=2), key=lambda a: a["task"]["key"])
    ok(agent.progress(first["attempt_id"], {"progress": 0.5, "usage": usage(0.01)}))
    assert Attempt.objects.get(pk=first["attempt_id"]).cost_usd == pytest.approx(0.01)
    # Cumulative: the completion's figures replace the progress's.
    ok(agent.complete(first["attempt_id"], usage=usage(0.03, output_tokens=70), session_id="sess-a"))
    ok(agent.complete(second["attempt_id"], usage=usage(0.02, cost_estimated=True), session_id="sess-b"))
    stored = Attempt.objects.get(pk=first["attempt_id"])
    assert (stored.cost_usd, stored.usage["output_tokens"], stored.session_id) == (pytest.approx(0.03), 70, "sess-a")
    body = status_of(server, api_token, run.id)
    assert body["cost_usd"] == pytest.approx(0.05)
    assert body["usage"]["input_tokens"] == 2000 and body["usage"]["output_tokens"] == 120
    assert body["usage"]["cost_estimated"] is True  # one of its figures was an estimate
    tasks = {t["key"]: t for t in body["tasks"]}
    assert (tasks["a"]["cost_usd"], tasks["a"]["session_id"]) == (pytest.approx(0.03), "sess-a")
    assert tasks["b"]["usage"]["cost_estimated"] is True


def test_a_task_without_ai_usage_answers_null_cost_and_session(server, enroll, run_of, api_token):
    run = run_of({"key": "plain"})
    agent = enroll()
    ok(agent.complete(agent.claim_one()["attempt_id"]))
    body = status_of(server, api_token, run.id)
    assert (body["tasks"][0]["cost_usd"], body["tasks"][0]["session_id"], body["cost_usd"]) == (None, None, 0)


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ("lots", "usage"),
        ({"input_tokens": -1}, "usage.input_tokens"),
        ({"output_tokens": 1.5}, "usage.output_tokens"),
        ({"cost_usd": "0.1"}, "usage.cost_usd"),
        ({"cost_estimated": "yes"}, "usage.cost_estimated"),
        ({"model": 7}, "usage.model"),
    ],
)
def test_malformed_usage_is_a_400_naming_the_field_and_changes_nothing(server, enroll, run_of, bad, field):
    run_of(claude_task("a"))
    agent = enroll(executors=AI)
    attempt_id = agent.claim_one()["attempt_id"]
    for call in (agent.progress(attempt_id, {"usage": bad}), agent.complete(attempt_id, usage=bad)):
        assert_error(call, 400, "bad_request", f"'{field}'")
    stored = Attempt.objects.get(pk=attempt_id)
    assert (stored.state, stored.usage, stored.cost_usd) == (AttemptState.ASSIGNED, None, 0)


def test_ai_assignments_carry_the_price_table_as_edited_and_other_assignments_do_not(server, enroll, run_of):
    # The migration seeds the table from the daemon's own; transactional tests empty it, so seed it again.
    for prefix, (inp, out, cache_read, cache_write) in DEFAULT_PRICES.items():
        ModelPrice.objects.update_or_create(
            model_prefix=prefix, defaults={"input_per_mtok": inp, "output_per_mtok": out, "as_of": PRICES_AS_OF,
                                           "cache_read_per_mtok": cache_read, "cache_write_per_mtok": cache_write},
        )  # fmt: skip
    run_of(claude_task("ai", priority=10), {**shell_task("plain"), "priority": 5}, claude_task("later"))
    agent = enroll(executors=AI, capacity=3)
    tasks = {a["task"]["key"]: a["task"] for a in agent.claim(capacity=2)}
    prices = tasks["ai"]["prices"]
    assert prices["claude-sonnet"] == [3.0, 15.0, 0.3, 3.75] and "" in prices
    assert "prices" not in tasks["plain"]
    ModelPrice.objects.filter(model_prefix="claude-sonnet").update(input_per_mtok=2.5)  # an edit in the admin
    assert agent.claim_one()["task"]["prices"]["claude-sonnet"] == [2.5, 15.0, 0.3, 3.75]


# --- run budgets ---------------------------------------------------------------------------------------


def test_a_run_reaching_its_budget_pauses_and_its_live_attempts_are_asked_to_stop(server, enroll, run_of,
                                                                                  api_token):  # fmt: skip
    run = run_of(claude_task("a"), claude_task("b"), shell_task("shell"),
                 max_cost_usd=0.05)  # fmt: skip
    agent = enroll(executors=AI, capacity=3)
    claimed = {a["task"]["key"]: a["attempt_id"] for a in agent.claim(capacity=3)}
    answer = ok(agent.progress(claimed["a"], {"usage": usage(0.02)}))
    assert answer["cancel"] is False
    answer = ok(agent.progress(claimed["a"], {"usage": usage(0.06)}))
    assert (answer["cancel"], answer["cancel_reason"]) == (True, "budget_exceeded")
    run.refresh_from_db()
    assert run.state == RunState.PAUSED and "reached max_cost_usd $0.05" in run.pause_reason
    # The other live attempts hear it on their next progress report, or (a shell task) their next heartbeat.
    answer = ok(agent.progress(claimed["b"], {"progress": 0.3}))
    assert (answer["cancel"], answer["cancel_reason"]) == (True, "budget_exceeded")
    commands = ok(agent.heartbeat(list(claimed.values())))["commands"]
    assert {c["attempt_id"] for c in commands if c["type"] == "cancel"} == set(claimed.values())
    # Their endings return the tasks to ready without using up an attempt; the last figures still count.
    for key, attempt_id in claimed.items():
        ok(agent.complete(attempt_id, "failed", error="budget_exceeded: canceled by server",
                          **({"usage": usage(0.07)} if key == "a" else {})))  # fmt: skip
    for key, attempt_id in claimed.items():
        attempt, task = Attempt.objects.get(pk=attempt_id), task_of(attempt_id)
        assert attempt.state == AttemptState.CANCELED and attempt.error.startswith("budget_exceeded: the run's cost")
        assert (task.state, task.attempts_used - task.attempt_base) == (TaskState.READY, 0), key
    body = status_of(server, api_token, run.id)
    assert (body["state"], body["cost_usd"], body["max_cost_usd"]) == ("paused", pytest.approx(0.07), 0.05)
    assert "max_cost_usd" in body["pause_reason"]
    assert agent.claim(capacity=3) == []  # paused: nothing is offered


def test_a_run_over_budget_resumes_only_with_a_higher_budget_and_then_goes_on(server, enroll, run_of, api_token):
    run = run_of(claude_task("a"), max_cost_usd=0.01)
    agent = enroll(executors=AI)
    attempt_id = agent.claim_one()["attempt_id"]
    ok(agent.progress(attempt_id, {"usage": usage(0.02)}))
    ok(agent.complete(attempt_id, "failed", error="budget_exceeded: canceled by server"))
    resume = f"{server}/api/v1/runs/{run.id}/resume"
    assert_error(http("POST", resume, {}, token=api_token), 409, "budget_exceeded", "higher max_cost_usd")
    assert_error(http("POST", resume, {"max_cost_usd": 0.015}, token=api_token), 409, "budget_exceeded")
    assert_error(http("POST", resume, {"max_cost_usd": "lots"}, token=api_token), 400, "bad_request")
    assert ok(http("POST", resume, {"max_cost_usd": 1}, token=api_token))["state"] == RunState.RUNNING
    run.refresh_from_db()
    assert (run.max_cost_usd, run.pause_reason) == (1.0, "")
    again = agent.claim_one()
    assert again["task"]["attempt"] == 2 and again["task"]["key"] == "a"
    ok(agent.complete(again["attempt_id"], usage=usage(0.01)))
    wait_for(lambda: Run.objects.get(pk=run.id).state == RunState.SUCCEEDED, what="the run succeeded")
    assert Event.objects.filter(run=run, kind="run", to_state="paused", actor="system:budget").count() == 1


@pytest.mark.integration  # a server of its own
def test_the_daily_cap_pauses_every_running_run_and_holds_new_ones(tmp_path, transactional_db, enrollment_token,
                                                                    api_token, submit):  # fmt: skip
    capped = Server(tmp_path, {"CP_DAILY_MAX_COST_USD": "0.1"})
    try:
        body = {"name": "capped-1", "executors": list(AI)}
        agent = Agent(capped.url, ok(http("POST", f"{capped.url}/api/v1/agents/register", body,
                                          token=enrollment_token), 201), "capped-1")  # fmt: skip
        first = submit(doc(claude_task("a")))
        other = submit(doc(shell_task("later")))
        claimed = {a["task"]["key"]: a["attempt_id"] for a in agent.claim(capacity=1)}
        answer = ok(agent.progress(claimed["a"], {"usage": usage(0.11)}))
        assert (answer["cancel"], answer["cancel_reason"]) == (True, "budget_exceeded")
        for run in (first, other):
            run.refresh_from_db()
            assert run.state == RunState.PAUSED and "daily cap $0.1" in run.pause_reason
        resume = f"{capped.url}/api/v1/runs/{other.id}/resume"
        assert_error(http("POST", resume, {}, token=api_token), 409, "budget_exceeded", "CP_DAILY_MAX_COST_USD")
        # A run submitted while the cap is reached starts paused, saying why.
        late = ok(http("POST", f"{capped.url}/api/v1/runs", doc({"key": "late"}), token=api_token), 201)
        late_run = Run.objects.get(pk=late["run_id"])
        assert late_run.state == RunState.PAUSED and "daily cap" in late_run.pause_reason
    finally:
        capped.stop()


# --- usage limits and lost logins ----------------------------------------------------------------------


def test_rate_limited_returns_the_task_and_holds_that_executor_on_that_agent_until_the_reset(
    server, enroll, run_of, api_token
):
    run = run_of(claude_task("a", priority=10), shell_task("plain"))
    limited, other = enroll("limited-1", executors=AI), enroll("other-1", executors=AI)
    attempt = limited.claim_one()
    assert attempt["task"]["key"] == "a"  # the claude task first: its priority
    resets_at = (timezone.now() + timedelta(hours=2)).replace(microsecond=0)
    answer = ok(limited.complete(attempt["attempt_id"], "rate_limited", error="429: usage limit reached",
                                 resets_at=resets_at.isoformat(), usage=usage(0.001)))  # fmt: skip
    assert answer["task_state"] == TaskState.READY
    stored, task = Attempt.objects.get(pk=attempt["attempt_id"]), task_of(attempt["attempt_id"])
    assert (stored.state, stored.error) == (AttemptState.FAILED, "rate_limited: 429: usage limit reached")
    assert (task.attempts_used - task.attempt_base, task.ready_at <= timezone.now()) == (0, True)
    holds = AgentRow.objects.get(pk=limited.id).executor_holds
    assert set(holds) == {"claude"} and holds["claude"]["until"].startswith(resets_at.isoformat()[:19])
    # The limited agent gets the shell task, never the claude one; the other agent takes the claude task.
    assert limited.claim_one()["task"]["key"] == "plain"
    waiting = {t["key"]: t["waiting"] for t in status_of(server, api_token, run.id)["tasks"]}
    assert waiting["a"] == "waiting for a matching agent to claim it"  # other-1 could take it
    assert other.claim_one()["task"]["key"] == "a"


def test_a_held_executor_is_offered_again_after_the_reset(server, enroll, run_of, api_token):
    run = run_of(claude_task("a"))
    agent = enroll(executors=AI)
    attempt_id = agent.claim_one()["attempt_id"]
    ok(agent.complete(attempt_id, "rate_limited", error="rate_limited: 429", retry_after_s=2))
    assert agent.claim() == []
    reason = status_of(server, api_token, run.id)["tasks"][0]["waiting"]
    assert reason.startswith("the agent running claude is rate-limited until "), reason
    again = wait_for(lambda: agent.claim(), timeout=10, what="the claude task offered after the reset")
    assert again[0]["task"]["attempt"] == 2


def test_rate_limited_with_a_bad_reset_time_is_a_400_and_changes_nothing(server, enroll, run_of):
    run_of(claude_task("a"))
    agent = enroll(executors=AI)
    attempt_id = agent.claim_one()["attempt_id"]
    for fields in ({"resets_at": "at three"}, {"resets_at": "2026-12-02T15:00:00"}, {"retry_after_s": -1}):
        assert_error(agent.complete(attempt_id, "rate_limited", error="429", **fields), 400, "bad_request")
    assert Attempt.objects.get(pk=attempt_id).state == AttemptState.ASSIGNED
    assert AgentRow.objects.get(pk=agent.id).executor_holds == {}


def test_not_logged_in_returns_the_task_and_that_executor_is_no_longer_offered_to_that_agent(server, enroll, run_of):
    run_of(claude_task("a"))
    agent = enroll(executors=AI)
    attempt_id = agent.claim_one()["attempt_id"]
    answer = ok(agent.complete(attempt_id, "failed", error="not_logged_in: Invalid API key · Please run /login"))
    assert answer["task_state"] == TaskState.READY
    task = task_of(attempt_id)
    assert task.attempts_used - task.attempt_base == 0
    row = AgentRow.objects.get(pk=agent.id)
    assert "claude" not in row.executors and set(row.executors) == {"shell", "codex"}
    assert row.preflight["claude"]["usable"] is False and "Please run /login" in row.preflight["claude"]["detail"]
    assert agent.claim() == []
