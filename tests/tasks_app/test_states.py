"""The state machine, as a specification: every allowed transition and a sample of the forbidden ones."""

import itertools

import pytest

from tasks_app import queries
from tasks_app.states import (
    ATTEMPT_TRANSITIONS,
    RUN_TRANSITIONS,
    TASK_TRANSITIONS,
    AttemptState,
    InvalidTransition,
    RunState,
    TaskState,
    can_transition,
    check_transition,
    dependents_state_after,
    run_outcome,
    task_after_failed_attempt,
)

T, R, A = TaskState, RunState, AttemptState

ALLOWED_TASK = {
    (T.BLOCKED, T.READY), (T.BLOCKED, T.SKIPPED), (T.BLOCKED, T.CANCELED),
    (T.READY, T.ASSIGNED), (T.READY, T.CANCELED),
    (T.ASSIGNED, T.RUNNING), (T.ASSIGNED, T.SUCCEEDED), (T.ASSIGNED, T.FAILED), (T.ASSIGNED, T.READY),
    (T.ASSIGNED, T.CANCELED),
    (T.RUNNING, T.SUCCEEDED), (T.RUNNING, T.FAILED), (T.RUNNING, T.READY), (T.RUNNING, T.CANCELED),
    (T.FAILED, T.READY), (T.CANCELED, T.READY), (T.SKIPPED, T.BLOCKED),
    # Approval tasks: held by the server, decided by a person (or their timeout), asked again on a retry.
    (T.BLOCKED, T.AWAITING_APPROVAL), (T.AWAITING_APPROVAL, T.SUCCEEDED), (T.AWAITING_APPROVAL, T.FAILED),
    (T.AWAITING_APPROVAL, T.CANCELED), (T.FAILED, T.AWAITING_APPROVAL), (T.CANCELED, T.AWAITING_APPROVAL),
}  # fmt: skip


@pytest.mark.parametrize("current,target", list(itertools.product(T.ALL, T.ALL)))
def test_task_transition_table_is_exactly_the_documented_one(current, target):
    assert can_transition("task", current, target) == ((current, target) in ALLOWED_TASK)


def test_every_state_has_a_row():
    assert set(TASK_TRANSITIONS) == set(T.ALL)
    assert set(RUN_TRANSITIONS) == set(R.ALL)
    assert set(ATTEMPT_TRANSITIONS) == set(A.ALL)


def test_succeeded_task_is_final():
    for target in T.ALL:
        with pytest.raises(InvalidTransition):
            check_transition("task", T.SUCCEEDED, target)


@pytest.mark.parametrize("final", A.TERMINAL)
def test_finished_attempt_never_changes_again(final):
    for target in A.ALL:
        assert not can_transition("attempt", final, target)


@pytest.mark.parametrize("live", A.LIVE)
def test_live_attempt_may_end_every_way(live):
    for target in (A.SUCCEEDED, A.FAILED, A.LOST, A.CANCELED):
        check_transition("attempt", live, target)


def test_run_transitions():
    check_transition("run", R.RUNNING, R.PAUSED)
    check_transition("run", R.PAUSED, R.RUNNING)
    check_transition("run", R.PAUSED, R.CANCELED)
    check_transition("run", R.FAILED, R.RUNNING)  # a retried task reopens the run
    with pytest.raises(InvalidTransition, match="run cannot go from succeeded to running"):
        check_transition("run", R.SUCCEEDED, R.RUNNING)
    with pytest.raises(InvalidTransition):
        check_transition("run", R.CANCELED, R.PAUSED)


def test_failed_attempt_retries_until_budget_is_spent():
    assert task_after_failed_attempt(1, 3) == T.READY
    assert task_after_failed_attempt(2, 3) == T.READY
    assert task_after_failed_attempt(3, 3) == T.FAILED


def test_run_outcome():
    assert run_outcome([T.SUCCEEDED, T.RUNNING]) is None
    assert run_outcome([T.SUCCEEDED, T.BLOCKED]) is None
    assert run_outcome([T.SUCCEEDED, T.SUCCEEDED]) == R.SUCCEEDED
    assert run_outcome([T.SUCCEEDED, T.FAILED, T.SKIPPED]) == R.FAILED
    assert run_outcome([T.CANCELED, T.SUCCEEDED], canceled=True) == R.CANCELED


def test_downstream_of_a_failure_is_skipped():
    assert dependents_state_after(T.FAILED) == T.SKIPPED
    assert dependents_state_after(T.CANCELED) == T.SKIPPED
    assert dependents_state_after(T.SUCCEEDED) is None


def test_a_skipped_task_skips_its_own_dependents_so_the_skip_walks_all_the_way_down():
    assert dependents_state_after(T.SKIPPED) == T.SKIPPED


def test_the_skip_statement_takes_its_upstream_states_from_the_state_machine():
    # queries.SKIP_DOWNSTREAM applies dependents_state_after: the states it skips below are exactly those
    # the rule answers "skipped" for, and nothing else is written in the SQL.
    skipping = {s for s in T.ALL if dependents_state_after(s) == T.SKIPPED}
    assert set(queries.STATES_THAT_SKIP_DEPENDENTS) == skipping == {T.FAILED, T.CANCELED, T.SKIPPED}
    listed = queries.SKIP_DOWNSTREAM.split("u.state IN (", 1)[1].split(")", 1)[0]
    assert {s.strip(" '") for s in listed.split(",")} == skipping
