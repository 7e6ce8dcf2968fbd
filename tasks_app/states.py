"""The state machine of runs, tasks, attempts and agents: pure data and functions, no ORM.

`tasks_app.actions` is the only code that changes a run's, task's or attempt's state, and it asks this module
first; `agents_app.registry` is its counterpart for an agent's status (the sweep's and the contact's SQL in
`tasks_app.queries` follow the same table, and a test holds them to it).
"""

from __future__ import annotations

from collections.abc import Iterable


class InvalidTransition(Exception):
    """A state change the machine forbids; the API answers it with 409."""

    def __init__(self, kind: str, current: str, target: str):
        self.kind, self.current, self.target = kind, current, target
        super().__init__(f"{kind} cannot go from {current} to {target}")


class TaskState:
    BLOCKED = "blocked"
    READY = "ready"
    ASSIGNED = "assigned"
    RUNNING = "running"
    # An approval task (APPROVAL_EXECUTOR) whose dependencies succeeded: held by the server, not by an agent,
    # until an operator approves or rejects it (PROTOCOL.md v1.1, approvals).
    AWAITING_APPROVAL = "awaiting_approval"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"
    SKIPPED = "skipped"

    ALL = (BLOCKED, READY, ASSIGNED, RUNNING, AWAITING_APPROVAL, SUCCEEDED, FAILED, CANCELED, SKIPPED)
    LIVE = (ASSIGNED, RUNNING)
    PENDING = (BLOCKED, READY, ASSIGNED, RUNNING, AWAITING_APPROVAL)
    TERMINAL = (SUCCEEDED, FAILED, CANCELED, SKIPPED)


# The executor of tasks no agent runs: a person approves or rejects them.
APPROVAL_EXECUTOR = "approval"


def waiting_state(executor: str) -> str:
    """The state a task enters when it may go on (its dependencies succeeded, or it has none): ready for an
    agent to claim, or awaiting an operator's approval."""
    return TaskState.AWAITING_APPROVAL if executor == APPROVAL_EXECUTOR else TaskState.READY


class RunState:
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"

    ALL = (RUNNING, PAUSED, SUCCEEDED, FAILED, CANCELED)
    ACTIVE = (RUNNING, PAUSED)
    TERMINAL = (SUCCEEDED, FAILED, CANCELED)


class AttemptState:
    ASSIGNED = "assigned"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"  # lease expired or agent went silent
    CANCELED = "canceled"

    ALL = (ASSIGNED, RUNNING, SUCCEEDED, FAILED, LOST, CANCELED)
    LIVE = (ASSIGNED, RUNNING)
    TERMINAL = (SUCCEEDED, FAILED, LOST, CANCELED)


class AgentStatus:
    ONLINE = "online"
    OFFLINE = "offline"
    RETIRED = "retired"  # its name was registered again or its token revoked; the identity is gone for good

    ALL = (ONLINE, OFFLINE, RETIRED)


T = TaskState
TASK_TRANSITIONS: dict[str, frozenset[str]] = {
    # Dependencies met (an approval task then awaits approval), upstream failed/canceled, run canceled.
    T.BLOCKED: frozenset({T.READY, T.AWAITING_APPROVAL, T.SKIPPED, T.CANCELED}),
    # Claimed by an agent, or canceled with its run.
    T.READY: frozenset({T.ASSIGNED, T.CANCELED}),
    # The agent started it, finished it without a progress report, lost it (back to ready or failed), cancel.
    T.ASSIGNED: frozenset({T.RUNNING, T.SUCCEEDED, T.FAILED, T.READY, T.CANCELED}),
    T.RUNNING: frozenset({T.SUCCEEDED, T.FAILED, T.READY, T.CANCELED}),
    # Approved, rejected (or nobody answered in time), canceled with its run.
    T.AWAITING_APPROVAL: frozenset({T.SUCCEEDED, T.FAILED, T.CANCELED}),
    T.SUCCEEDED: frozenset(),
    # An operator's retry (an approval task awaits approval again).
    T.FAILED: frozenset({T.READY, T.AWAITING_APPROVAL}),
    T.CANCELED: frozenset({T.READY, T.AWAITING_APPROVAL}),
    # The upstream task that skipped it was retried.
    T.SKIPPED: frozenset({T.BLOCKED}),
}

R = RunState
RUN_TRANSITIONS: dict[str, frozenset[str]] = {
    R.RUNNING: frozenset({R.PAUSED, R.SUCCEEDED, R.FAILED, R.CANCELED}),
    R.PAUSED: frozenset({R.RUNNING, R.SUCCEEDED, R.FAILED, R.CANCELED}),
    R.SUCCEEDED: frozenset(),
    # Retrying a task of a finished run reopens it.
    R.FAILED: frozenset({R.RUNNING}),
    R.CANCELED: frozenset({R.RUNNING}),
}

A = AttemptState
ATTEMPT_TRANSITIONS: dict[str, frozenset[str]] = {
    A.ASSIGNED: frozenset({A.RUNNING, A.SUCCEEDED, A.FAILED, A.LOST, A.CANCELED}),
    A.RUNNING: frozenset({A.SUCCEEDED, A.FAILED, A.LOST, A.CANCELED}),
    A.SUCCEEDED: frozenset(),
    A.FAILED: frozenset(),
    A.LOST: frozenset(),
    A.CANCELED: frozenset(),
}

G = AgentStatus
AGENT_TRANSITIONS: dict[str, frozenset[str]] = {
    # Silent past the offline threshold (the sweep: queries.SILENT_AGENTS); its name registered again or its
    # token revoked (agents_app.registry).
    G.ONLINE: frozenset({G.OFFLINE, G.RETIRED}),
    # Heard from again while enabled (queries.TOUCH_AGENT); retired as above.
    G.OFFLINE: frozenset({G.ONLINE, G.RETIRED}),
    # Final: a retired identity's token never works again; enrolling anew makes a new agent row.
    G.RETIRED: frozenset(),
}

# What an operator may do to a run, by the run's current state. Narrower than RUN_TRANSITIONS: a finished run
# reopens only through a task retry, never through "resume".
RUN_OPERATIONS: dict[str, tuple[str, tuple[str, ...]]] = {
    "pause": (R.PAUSED, (R.RUNNING,)),
    "resume": (R.RUNNING, (R.PAUSED,)),
    "cancel": (R.CANCELED, (R.RUNNING, R.PAUSED)),
}

_TABLES = {"task": TASK_TRANSITIONS, "run": RUN_TRANSITIONS, "attempt": ATTEMPT_TRANSITIONS, "agent": AGENT_TRANSITIONS}


def can_transition(kind: str, current: str, target: str) -> bool:
    return target in _TABLES[kind].get(current, frozenset())


def check_transition(kind: str, current: str, target: str) -> None:
    """Raise InvalidTransition unless `kind` may move from `current` to `target`."""
    if not can_transition(kind, current, target):
        raise InvalidTransition(kind, current, target)


# Failures another attempt cannot mend: the task fails at once, whatever attempts remain (an operator's retry
# after fixing the cause still works). A merge conflict between dependencies stays a conflict on a retry.
FINAL_ERRORS = ("merge_conflict",)


def task_after_failed_attempt(attempts_used: int, max_attempts: int, error: str = "") -> str:
    """A failed or lost attempt sends its task back to ready while attempts remain, else to failed; so does
    an error no retry can mend (FINAL_ERRORS), at once."""
    if error.split(":", 1)[0].strip() in FINAL_ERRORS:
        return T.FAILED
    return T.READY if attempts_used < max_attempts else T.FAILED


def run_outcome(task_states: Iterable[str], canceled: bool = False) -> str | None:
    """The state a run ends in once none of its tasks is pending, or None while some still are."""
    states = list(task_states)
    if any(s in T.PENDING for s in states):
        return None
    if canceled:
        return R.CANCELED
    if all(s == T.SUCCEEDED for s in states):
        return R.SUCCEEDED
    return R.FAILED


def dependents_state_after(upstream_state: str) -> str | None:
    """What an upstream task's final state does to its blocked dependents (None: they wait on)."""
    if upstream_state in (T.FAILED, T.CANCELED, T.SKIPPED):
        return T.SKIPPED
    return None
