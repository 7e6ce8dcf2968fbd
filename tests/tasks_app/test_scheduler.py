"""The scheduler and the transitions around it, on real PostgreSQL: dependencies, labels, executors, limits,
order, failures, leases, and concurrent claimers."""

import json
import threading
from datetime import timedelta

import pytest
from django.db import IntegrityError, connection, connections, transaction
from django.utils import timezone

from tasks_app import actions
from tasks_app import queries as q
from tasks_app.models import Attempt, Event, Task
from tasks_app.states import AttemptState, RunState, TaskState
from tests.conftest import doc


def claim(agent, capacity=1):
    return actions.claim_ready_tasks(agent, capacity)


def keys(assignments):
    return sorted(a["task"]["key"] for a in assignments)


def finish(agent, assignment, outcome="succeeded", result=None, error="", exit_code=0):
    return actions.complete_attempt(agent, assignment["attempt_id"], outcome, result or {}, error, exit_code)


def finish_at_once(claims) -> None:
    """Complete each (agent, assignment) from a thread of its own, all released at the same moment."""
    barrier = threading.Barrier(len(claims))

    def done(agent, assignment):
        try:
            barrier.wait()
            finish(agent, assignment)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=done, args=c) for c in claims]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)


def state_of(run, key):
    return Task.objects.get(run=run, key=key).state


pytestmark = pytest.mark.django_db


def test_only_tasks_whose_dependencies_succeeded_are_offered(make_agent, submit):
    alice = make_agent("alice", labels=[], capacity=4)
    run = submit(doc({"key": "a"}, {"key": "b", "deps": ["a"]}, {"key": "c", "deps": ["a", "b"]}))
    first = claim(alice, 4)
    assert keys(first) == ["a"]
    assert state_of(run, "b") == TaskState.BLOCKED
    finish(alice, first[0])
    assert state_of(run, "b") == TaskState.READY
    assert state_of(run, "c") == TaskState.BLOCKED
    second = claim(alice, 4)
    assert keys(second) == ["b"]
    finish(alice, second[0])
    third = claim(alice, 4)
    assert keys(third) == ["c"]
    finish(alice, third[0])
    run.refresh_from_db()
    assert run.state == RunState.SUCCEEDED
    assert run.finished_at is not None


def test_task_goes_only_to_an_agent_with_all_required_labels(make_agent, submit):
    coder = make_agent("cg-1", labels=["cg"])
    planner = make_agent("ccg-1", labels=["ccg", "linux"])
    submit(doc({"key": "plan", "requires": ["ccg", "linux"]}))
    assert claim(coder) == []
    assert keys(claim(planner)) == ["plan"]


def test_task_goes_only_to_an_agent_with_its_executor(make_agent, submit):
    shell_only = make_agent("sh-1", labels=[], executors=["shell"])
    codex = make_agent("cg-1", labels=[], executors=["codex"])
    submit(doc({"key": "impl", "executor": "codex", "prompt": "write it"}))
    assert claim(shell_only) == []
    assert keys(claim(codex)) == ["impl"]


def test_run_max_parallel_bounds_live_attempts(make_agent, submit):
    run = submit(doc(*[{"key": f"t{i}"} for i in range(5)], max_parallel=2))
    agents = [make_agent(f"a{i}", labels=[]) for i in range(5)]
    got = [claim(a) for a in agents]
    assert sum(len(g) for g in got) == 2
    assert Attempt.objects.filter(run=run, state__in=AttemptState.LIVE).count() == 2
    # A slot frees up when an attempt ends.
    holder = next(i for i, g in enumerate(got) if g)
    finish(agents[holder], got[holder][0])
    idle = next(a for a, g in zip(agents, got, strict=True) if not g)
    assert len(claim(idle)) == 1


def test_global_limit_bounds_live_attempts_across_runs(make_agent, submit, settings):
    settings.CP_GLOBAL_MAX_LIVE = 3
    submit(doc({"key": "a"}, {"key": "b"}, name="r1"))
    submit(doc({"key": "c"}, {"key": "d"}, name="r2"))
    big = make_agent("big", labels=[], capacity=10)
    assert len(claim(big, 10)) == 3


def test_agent_capacity_bounds_what_it_holds(make_agent, submit):
    submit(doc(*[{"key": f"t{i}"} for i in range(5)]))
    two = make_agent("two", labels=[], capacity=2)
    assert len(claim(two, 5)) == 2
    assert claim(two, 5) == []


def test_order_is_priority_then_critical_path_then_age(make_agent, submit):
    agent = make_agent("solo", labels=[])
    submit(doc({"key": "old-short", "estimate_s": 1}, name="older"))
    submit(
        doc(
            {"key": "short", "estimate_s": 1},
            {"key": "long", "estimate_s": 1},
            {"key": "tail", "deps": ["long"], "estimate_s": 100},
            {"key": "urgent", "estimate_s": 1, "priority": 5},
            name="newer",
        )
    )
    order = []
    while got := claim(agent):
        order.append(got[0]["task"]["key"])
        finish(agent, got[0])
    # Priority first; then the longest remaining critical path; then the oldest.
    assert order[:3] == ["urgent", "long", "tail"] or order[:2] == ["urgent", "long"]
    assert order.index("old-short") < order.index("short")


def test_paused_run_is_passed_over_until_resumed(make_agent, submit):
    agent = make_agent("solo", labels=[])
    run = submit(doc({"key": "a"}))
    actions.pause_run(run.id, "user:olivia")
    assert claim(agent) == []
    actions.resume_run(run.id, "user:olivia")
    assert keys(claim(agent)) == ["a"]


def test_failed_attempt_with_attempts_left_returns_to_ready_after_its_delay(make_agent, submit):
    agent = make_agent("solo", labels=[])
    run = submit(doc({"key": "a", "max_attempts": 2, "retry_delay_s": 30}))
    got = claim(agent)
    assert finish(agent, got[0], "failed", error="boom", exit_code=1) == TaskState.READY
    task = Task.objects.get(run=run, key="a")
    assert task.ready_at > timezone.now() + timedelta(seconds=20)
    assert claim(agent) == []  # not before its retry delay
    Task.objects.filter(pk=task.pk).update(ready_at=timezone.now() - timedelta(hours=1))
    again = claim(agent)
    assert again[0]["task"]["attempt"] == 2


def test_failure_for_good_skips_downstream_and_fails_the_run(make_agent, submit):
    agent = make_agent("solo", labels=[])
    run = submit(
        doc({"key": "a", "max_attempts": 1}, {"key": "b", "deps": ["a"]}, {"key": "c", "deps": ["b"]}, {"key": "x"})
    )
    two = make_agent("two", labels=[])
    held = {a["task"]["key"]: (who, a) for who in (agent, two) for a in claim(who, 1)}
    who, assignment = held["a"]
    assert finish(who, assignment, "failed", error="boom", exit_code=2) == TaskState.FAILED
    assert state_of(run, "b") == TaskState.SKIPPED
    assert state_of(run, "c") == TaskState.SKIPPED
    run.refresh_from_db()
    assert run.state == RunState.RUNNING  # x is still live
    finish(*held["x"])
    run.refresh_from_db()
    assert run.state == RunState.FAILED


def test_retry_reopens_the_run_and_unskips_downstream(make_agent, submit):
    agent = make_agent("solo", labels=[])
    run = submit(doc({"key": "a", "max_attempts": 1}, {"key": "b", "deps": ["a"]}))
    finish(agent, claim(agent)[0], "failed", exit_code=1)
    assert state_of(run, "b") == TaskState.SKIPPED
    run.refresh_from_db()
    assert run.state == RunState.FAILED
    task = Task.objects.get(run=run, key="a")
    actions.retry_task(task.id, "user:olivia")
    run.refresh_from_db()
    assert run.state == RunState.RUNNING
    assert state_of(run, "b") == TaskState.BLOCKED
    again = claim(agent)
    assert again[0]["task"]["attempt"] == 2
    finish(agent, again[0])
    finish(agent, claim(agent)[0])
    run.refresh_from_db()
    assert run.state == RunState.SUCCEEDED


def test_retry_of_a_succeeded_task_is_refused(make_agent, submit):
    agent = make_agent("solo", labels=[])
    run = submit(doc({"key": "a"}))
    finish(agent, claim(agent)[0])
    with pytest.raises(actions.ActionError):
        actions.retry_task(Task.objects.get(run=run).id, "user:olivia")


def test_lost_attempt_completion_is_refused(make_agent, submit):
    slow = make_agent("slow", labels=[])
    fast = make_agent("fast", labels=[])
    run = submit(doc({"key": "a", "retry_delay_s": 0}))
    first = claim(slow)[0]
    Attempt.objects.filter(pk=first["attempt_id"]).update(lease_expires_at=timezone.now() - timedelta(hours=1))
    assert actions.sweep(force=True)["expired"] == 1
    assert Attempt.objects.get(pk=first["attempt_id"]).state == AttemptState.LOST
    second = claim(fast)[0]
    assert second["task"]["attempt"] == 2
    with pytest.raises(actions.StaleAttempt):
        finish(slow, first)
    with pytest.raises(actions.StaleAttempt):
        actions.record_progress(slow, first["attempt_id"], 0.5, "late", None)
    finish(fast, second)
    assert Attempt.objects.filter(task__run=run, state="succeeded").count() == 1


def test_silent_agent_goes_offline_and_its_work_is_requeued(make_agent, submit, settings):
    ghost = make_agent("ghost", labels=[])
    run = submit(doc({"key": "a"}))
    claim(ghost)
    from agents_app.models import Agent

    Agent.objects.filter(pk=ghost["id"]).update(last_seen_at=timezone.now() - timedelta(minutes=5))
    result = actions.sweep(force=True)
    assert result["agents_offline"] == 1 and result["offline"] == 1
    assert Agent.objects.get(pk=ghost["id"]).status == "offline"
    assert state_of(run, "a") == TaskState.READY


def test_nothing_expires_for_one_lease_after_a_server_restart(make_agent, submit, settings):
    agent = make_agent("solo", labels=[])
    submit(doc({"key": "a"}))
    got = claim(agent)[0]
    Attempt.objects.filter(pk=got["attempt_id"]).update(lease_expires_at=timezone.now() - timedelta(hours=1))
    from tasks_app.models import SweepClock

    an_hour_ago = timezone.now() - timedelta(hours=1)  # when the last server process was alive
    SweepClock.objects.update_or_create(
        id=1, defaults={"server_alive_at": an_hour_ago, "expiry_not_before": an_hour_ago}
    )
    actions.tick_sweep_clock(starting=True)  # first server after a downtime
    assert actions.sweep() == {"expired": 0, "offline": 0, "runs_settled": 0}

    SweepClock.objects.update(expiry_not_before=timezone.now() - timedelta(hours=1))
    assert actions.sweep()["expired"] == 1


@pytest.mark.parametrize(
    "heartbeat_s, offline_s, sweep_s", [(10, 30, 2), (1, 3, 0.5), (5, 12, 1)], ids=["production", "fast", "mid"]
)
def test_a_server_silence_too_short_to_make_agents_look_silent_is_not_a_downtime_but_a_longer_one_is(
    make_agent, submit, settings, heartbeat_s, offline_s, sweep_s
):
    settings.CP_HEARTBEAT_INTERVAL_S, settings.CP_OFFLINE_AFTER_S = heartbeat_s, offline_s
    settings.CP_SWEEP_INTERVAL_S = sweep_s
    from tasks_app.models import SweepClock

    # Every server down for just long enough that an agent's heartbeat, due just after it went down, leaves
    # its last one past the offline threshold.
    silence = timedelta(seconds=offline_s - heartbeat_s + 0.1)
    agent = make_agent("solo", labels=[])
    submit(doc({"key": "a"}))
    claim(agent)
    from agents_app.models import Agent

    Agent.objects.filter(pk=agent["id"]).update(last_seen_at=timezone.now() - timedelta(seconds=offline_s + 1))
    SweepClock.objects.update_or_create(
        id=1, defaults={"server_alive_at": timezone.now() - silence, "expiry_not_before": timezone.now() - silence}
    )
    actions.tick_sweep_clock(starting=True)
    assert actions.sweep()["offline"] == 0, "the agent was blamed for our downtime"
    # A silence shorter than three sweeps is not a downtime: the clock allows expiry again. (The test runs in
    # one transaction, whose now() is its start: the times set here are in its past.)
    SweepClock.objects.update(
        server_alive_at=timezone.now() - timedelta(seconds=2 * sweep_s), expiry_not_before=timezone.now() - silence
    )
    actions.tick_sweep_clock()
    assert actions.sweep()["offline"] == 1


def test_database_refuses_a_second_success_or_a_second_live_attempt(make_agent, submit):
    agent = make_agent("solo", labels=[])
    run = submit(doc({"key": "a"}))
    got = claim(agent)[0]
    task = Task.objects.get(run=run)
    with pytest.raises(IntegrityError), transaction.atomic():
        Attempt.objects.create(task=task, run=run, number=9, state="running", lease_expires_at=timezone.now())
    finish(agent, got)
    with pytest.raises(IntegrityError), transaction.atomic():
        Attempt.objects.create(task=task, run=run, number=10, state="succeeded", lease_expires_at=timezone.now())


def test_cancel_run_cancels_live_and_pending_work(make_agent, submit):
    agent = make_agent("solo", labels=[])
    run = submit(doc({"key": "a"}, {"key": "b", "deps": ["a"]}, {"key": "c"}))
    got = claim(agent)[0]
    assert actions.cancel_run(run.id, "user:olivia") == RunState.CANCELED
    assert set(Task.objects.filter(run=run).values_list("state", flat=True)) == {TaskState.CANCELED}
    with pytest.raises(actions.StaleAttempt):
        actions.record_progress(agent, got["attempt_id"], 0.5, None, None)
    cmds = actions.heartbeat(agent, "busy", [got["attempt_id"]])
    assert {"type": "cancel", "attempt_id": got["attempt_id"]} in cmds
    with pytest.raises(actions.ActionError):
        actions.pause_run(run.id, "user:olivia")


def test_every_transition_is_in_the_audit_trail(make_agent, submit):
    agent = make_agent("solo", labels=[])
    run = submit(doc({"key": "a"}, {"key": "b", "deps": ["a"]}))
    got = claim(agent)[0]
    actions.record_progress(agent, got["attempt_id"], 0.5, "half", "log line\n")
    finish(agent, got)
    trail = list(Event.objects.filter(run=run).values_list("kind", "from_state", "to_state", "actor"))
    assert ("task", "ready", "assigned", "agent:solo") in trail
    assert ("task", "assigned", "running", "agent:solo") in trail
    assert ("attempt", "running", "succeeded", "agent:solo") in trail
    assert ("task", "running", "succeeded", "agent:solo") in trail
    assert ("task", "blocked", "ready", "agent:solo") in trail
    attempt = Attempt.objects.get(pk=got["attempt_id"])
    assert attempt.log == "log line\n" and attempt.progress == 1


@pytest.mark.django_db(transaction=True)
def test_twenty_concurrent_claimers_never_double_assign(make_agent, submit):
    run = submit(doc(*[{"key": f"t{i}"} for i in range(200)]))
    agents = [make_agent(f"w{i}", labels=[], capacity=3) for i in range(20)]
    claimed: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(len(agents))

    def work(agent):
        try:
            barrier.wait()
            while True:
                got = actions.claim_ready_tasks(agent, 3)
                if not got:
                    if not Task.objects.filter(run=run, state="ready").exists():
                        return
                    continue
                with lock:
                    claimed.extend(a["task"]["id"] for a in got)
                for a in got:
                    actions.complete_attempt(agent, a["attempt_id"], "succeeded", {}, "", 0)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=work, args=(a,)) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(claimed) == 200
    assert len(set(claimed)) == 200
    assert Attempt.objects.filter(run=run).count() == 200
    run.refresh_from_db()
    assert run.state == RunState.SUCCEEDED


@pytest.mark.django_db(transaction=True)
def test_concurrent_completions_of_two_parents_release_their_child(make_agent, submit):
    """The race of a diamond: both parents finish at once; the child must become ready exactly once."""
    for round_ in range(10):
        run = submit(doc({"key": "p1"}, {"key": "p2"}, {"key": "child", "deps": ["p1", "p2"]}, name=f"r{round_}"))
        a1, a2 = make_agent(f"x{round_}", labels=[]), make_agent(f"y{round_}", labels=[])
        finish_at_once([(a1, claim(a1)[0]), (a2, claim(a2)[0])])
        assert state_of(run, "child") == TaskState.READY, f"round {round_}"
        assert Event.objects.filter(run=run, task__key="child", to_state="ready").count() == 1


@pytest.mark.django_db(transaction=True)
def test_the_last_tasks_finishing_at_once_end_the_run_exactly_once(make_agent, submit):
    """No run row lock per completion: each completion looks for pending work after its own commit, so the
    last of several finishing at once sees the others' work and ends the run - once."""
    for round_ in range(8):
        run = submit(doc(*[{"key": f"t{i}"} for i in range(4)], name=f"end-{round_}"))
        agents = [make_agent(f"e{round_}-{i}", labels=[]) for i in range(4)]
        finish_at_once([(a, claim(a)[0]) for a in agents])
        run.refresh_from_db()
        assert run.state == RunState.SUCCEEDED, f"round {round_}"
        assert Event.objects.filter(run=run, kind="run", to_state="succeeded").count() == 1


def test_the_sweeper_ends_a_run_whose_completion_stopped_before_settling(make_agent, submit, monkeypatch):
    run = submit(doc({"key": "only"}))
    agent = make_agent("solo", labels=[])
    got = claim(agent)[0]
    with monkeypatch.context() as m:
        m.setattr(actions, "settle_run", lambda *args, **kwargs: None)  # the process died right after commit
        finish(agent, got)
    run.refresh_from_db()
    assert run.state == RunState.RUNNING and state_of(run, "only") == TaskState.SUCCEEDED
    assert actions.sweep()["runs_settled"] == 1
    run.refresh_from_db()
    assert run.state == RunState.SUCCEEDED
    assert Event.objects.get(run=run, kind="run", to_state="succeeded").actor == "system:sweeper"


@pytest.mark.django_db(transaction=True)
def test_a_claim_locks_no_more_ready_tasks_than_it_can_take(make_agent, submit, monkeypatch):
    """The missed wake-up: a claim that locked (SKIP LOCKED) a ready task it would not take hid it from a
    concurrent claimer, who found nothing and parked with nothing left to wake it. Here one claim is held in
    its transaction, rows locked, while another claims: the other must get the task the first cannot take."""
    root_of_three = doc({"key": "a"}, {"key": "b"}, {"key": "c"})
    submit(root_of_three)
    ada = make_agent("ada", labels=[], capacity=2)
    bob = make_agent("bob", labels=[], capacity=2)
    # Hold the claim's transaction open after its candidates are locked: its ASSIGN sleeps before returning.
    held = actions.q.ASSIGN.replace("AS announce", "AS announce, (SELECT pg_sleep(1.5)) AS held")
    monkeypatch.setattr(actions.q, "ASSIGN", held)
    got: dict = {}

    def ada_claims():
        try:
            got["ada"] = claim(ada, 2)
        finally:
            connections.close_all()

    thread = threading.Thread(target=ada_claims)
    thread.start()
    with connections["default"].cursor() as cur:
        for _ in range(100):  # until ada's claim sleeps inside its transaction, its rows locked
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%%pg_sleep(1.5)%%AS held%%'")
            if cur.fetchone()[0] > 1:  # ada's statement (and this one, which names it)
                break
            threading.Event().wait(0.02)
    monkeypatch.setattr(actions.q, "ASSIGN", held.replace("pg_sleep(1.5)", "pg_sleep(0)"))
    got["bob"] = claim(bob, 2)
    thread.join(10)
    assert len(got["ada"]) == 2
    assert len(got["bob"]) == 1, "a task ada could not take was locked away from bob"
    assert keys(got["ada"] + got["bob"]) == ["a", "b", "c"]


def test_a_lost_attempt_is_offered_again_at_once_without_the_retry_delay(make_agent, submit):
    gone = make_agent("gone", labels=[])
    spare = make_agent("spare", labels=[])
    run = submit(doc({"key": "a", "retry_delay_s": 600}))
    first = claim(gone)[0]
    actions.lose_attempts([first["attempt_id"]], "agent went silent", "system:sweeper")
    again = claim(spare)
    assert keys(again) == ["a"] and again[0]["task"]["attempt"] == 2
    # A failure of the task itself still waits its retry delay.
    finish(spare, again[0], "failed", error="boom", exit_code=1)
    assert claim(gone) == []
    assert Task.objects.get(run=run).ready_at > timezone.now() + timedelta(seconds=590)


def test_a_heartbeat_that_no_longer_lists_an_attempt_loses_it_at_once(make_agent, submit):
    phoenix = make_agent("phoenix", labels=[], capacity=2)
    spare = make_agent("spare", labels=[])
    run = submit(doc({"key": "old", "retry_delay_s": 600}, {"key": "new", "retry_delay_s": 600}))
    old = next(a for a in claim(phoenix, 2) if a["task"]["key"] == "old")
    # "old" was assigned well before this heartbeat; "new" a moment ago (its answer may still be in flight).
    Attempt.objects.filter(pk=old["attempt_id"]).update(assigned_at=timezone.now() - timedelta(seconds=30))
    commands = actions.heartbeat(phoenix, "idle", [])  # a daemon restarted with its saved identity lists none
    assert commands == []
    assert Attempt.objects.get(pk=old["attempt_id"]).state == AttemptState.LOST
    assert state_of(run, "old") == TaskState.READY
    assert state_of(run, "new") == TaskState.ASSIGNED
    assert keys(claim(spare)) == ["old"]
    lost = Event.objects.get(attempt_id=old["attempt_id"], kind="attempt", to_state=AttemptState.LOST)
    assert lost.detail["reason"] == "the agent no longer runs it"


def test_the_first_heartbeat_of_a_daemons_life_loses_every_attempt_it_does_not_list_however_fresh(make_agent, submit):
    phoenix = make_agent("phoenix", labels=[], capacity=2)
    run = submit(doc({"key": "a"}, {"key": "b"}))
    claimed = claim(phoenix, 2)  # a moment ago, by the life that was then SIGKILLed
    held = claimed[0]["attempt_id"]
    commands = actions.heartbeat(phoenix, "busy", [held], first=True)
    assert commands == []
    lost = [a for a in claimed if a["attempt_id"] != held]
    assert Attempt.objects.get(pk=lost[0]["attempt_id"]).state == AttemptState.LOST
    assert Attempt.objects.get(pk=held).state == AttemptState.ASSIGNED
    assert state_of(run, lost[0]["task"]["key"]) == TaskState.READY


def test_a_first_server_start_on_a_new_database_lets_leases_expire_but_not_with_agents_unheard(make_agent, submit):
    from agents_app.models import Agent
    from tasks_app.models import SweepClock

    agent = make_agent("solo", labels=[])  # registered by the very request that started the hub
    SweepClock.objects.all().delete()
    actions.tick_sweep_clock(starting=True)
    assert "agents_offline" in actions.sweep()  # expiry allowed: it looked for silent agents
    assert SweepClock.objects.get().expiry_not_before <= timezone.now()
    submit(doc({"key": "a"}))
    claim(agent)
    # An upgrade: agents online from before and unheard since, no clock row yet: that start is after a
    # downtime.
    SweepClock.objects.all().delete()
    Agent.objects.filter(pk=agent["id"]).update(last_seen_at=timezone.now() - timedelta(minutes=5))
    actions.tick_sweep_clock(starting=True)
    assert actions.sweep() == {"expired": 0, "offline": 0, "runs_settled": 0}  # expiry held for a lease
    assert Agent.objects.get(pk=agent["id"]).status == "online"


def test_a_heartbeat_extends_the_leases_it_lists_and_cancels_what_is_no_longer_the_agents(make_agent, submit):
    agent = make_agent("solo", labels=[])
    submit(doc({"key": "a"}))
    got = claim(agent)[0]
    Attempt.objects.filter(pk=got["attempt_id"]).update(lease_expires_at=timezone.now() + timedelta(seconds=1))
    foreign = "00000000-0000-0000-0000-000000000001"
    assert actions.heartbeat(agent, "busy", [got["attempt_id"], foreign]) == [{"type": "cancel", "attempt_id": foreign}]
    assert Attempt.objects.get(pk=got["attempt_id"]).lease_expires_at > timezone.now() + timedelta(seconds=30)


def test_the_claim_walks_task_ready_order_idx_instead_of_sorting_the_backlog(make_agent, submit):
    # queries.CLAIM_ORDER builds both the claim's ORDER BY and the index: an index in another order would
    # leave the claim sorting every ready task (slow, but no test would fail without this one).
    agent = make_agent("solo", labels=[])
    submit(doc(*[{"key": f"t{i}", "priority": i % 3, "estimate_s": i % 7} for i in range(3000)], name="backlog"))
    with connection.cursor() as cur:
        cur.execute("ANALYZE tasks_app_task")
        cur.execute("ANALYZE tasks_app_run")
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(q.LOCK_AGENT_LIVE, {"agent_id": agent["id"]})  # as the claim does: sorting off for it
        nodes = plan_nodes(cur, q.CANDIDATES,
                           {"labels": agent["labels"], "executors": agent["executors"], "full_runs": [], "chosen": [],
                            "has_git": False, "limit": 1})  # fmt: skip
    assert any(n.get("Index Name") == "task_ready_order_idx" for n in nodes), nodes
    assert not any(n["Node Type"] in ("Sort", "Incremental Sort") for n in nodes), nodes


def plan_nodes(cur, statement: str, params: dict) -> list[dict]:
    """Every node of the plan PostgreSQL makes for `statement` (EXPLAIN, not run)."""
    cur.execute("EXPLAIN (FORMAT JSON) " + statement, params)
    (plan,) = cur.fetchone()
    plan = json.loads(plan) if isinstance(plan, str) else plan
    nodes, todo = [], [plan[0]["Plan"]]
    while todo:
        node = todo.pop()
        nodes.append(node)
        todo.extend(node.get("Plans", ()))
    return nodes


def test_a_release_reads_tasks_by_index_even_when_the_statistics_say_the_tables_are_empty(submit):
    # Autoanalyze may last have seen the tables emptied (pages, no live rows: any later row count is then
    # guessed as 1) just before a big submit; the plan chosen from that for a release (every task scanned for
    # each dependent, and again for each of its dependencies) took 18 s for one release.
    old = submit(doc(*[{"key": f"old{i}", "deps": [f"old{i - 1}"] if i else []} for i in range(2000)], name="old"))
    old.delete()
    with connection.cursor() as cur:
        cur.execute("ANALYZE tasks_app_task")  # rows this transaction deleted count as dead: pages, no rows
        cur.execute("ANALYZE tasks_app_taskdependency")
        cur.execute("SELECT relpages > 0 AND reltuples = 0 FROM pg_class WHERE relname = 'tasks_app_task'")
        assert cur.fetchone() == (True,)
    middles = [{"key": f"m{i}", "deps": ["root"]} for i in range(300)]
    run = submit(doc({"key": "root"}, *middles, {"key": "sink", "deps": [m["key"] for m in middles]}))
    for key in ("root", "m0"):
        task_id = Task.objects.get(run=run, key=key).pk
        with transaction.atomic(), connection.cursor() as cur:
            for statement in (q.LOCK_DEPENDENTS, q.RELEASE_DEPENDENTS):
                reads = [n for n in plan_nodes(cur, statement, {"task_id": task_id}) if n["Node Type"] != "ModifyTable"
                         and n.get("Relation Name") in ("tasks_app_task", "tasks_app_taskdependency")]  # fmt: skip
                # every read looks rows up by a condition on an index (a bitmap heap scan rechecks its index's)
                assert reads and all({"Index Cond", "Recheck Cond"} & n.keys() for n in reads), (key, statement, reads)
