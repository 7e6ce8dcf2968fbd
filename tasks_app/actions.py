"""Every run, task and attempt transition, each in one transaction that writes its Event rows and sends
one NOTIFY (delivered on commit). Nothing else in the code base writes a state field.

The state machine's rules come from `tasks_app.states`; the SQL from `tasks_app.queries`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID, uuid4

from django.conf import settings
from django.db import connection, transaction
from django.db.backends.utils import CursorWrapper
from django.utils import timezone

from control_plane import metrics

from . import assignments, workspaces
from . import queries as q
from .audit import EventLog
from .dag import Dag, DagError, check_templates, parse_task
from .errors import ActionError, NotFound, StaleAttempt
from .models import Run, Task, TaskDependency
from .notify import CHANNEL, Changes
from .states import (
    APPROVAL_EXECUTOR,
    RUN_OPERATIONS,
    AttemptState,
    RunState,
    TaskState,
    check_transition,
    run_outcome,
    task_after_failed_attempt,
    waiting_state,
)

if TYPE_CHECKING:
    from django.contrib.auth.models import User

    from .models import Artifact, Workflow

log = logging.getLogger(__name__)
# A row's id: a UUID from the database or a URL's converter, or its text from an agent's JSON.
Id = UUID | str


def _commit(cursor: CursorWrapper, events: EventLog, changes: Changes) -> None:
    """Write the events and send the notification, in one round trip (both take effect at commit)."""
    insert, params = events.insert_sql()
    payload = changes.payload()
    if payload is None:
        if insert:
            cursor.execute(insert, params)
        return
    if insert:
        # A data-modifying CTE always runs, referenced or not.
        cursor.execute(f"WITH ev AS ({insert}) {q.NOTIFY}", [*params, CHANNEL, payload])
    else:
        cursor.execute(q.NOTIFY, [CHANNEL, payload])


# --- Submitting ---------------------------------------------------------------------------------------


def submit_run(
    dag: Dag,
    document: dict,
    *,
    actor: str,
    user: User | None = None,
    workflow: Workflow | None = None,
    priority: int | None = None,
    max_parallel: int | None = None,
    rerun_of: Run | None = None,
) -> Run:
    """Create a run from a validated DAG: tasks without dependencies start ready, the rest blocked. A
    workspace's base is resolved to a commit first (`git ls-remote`, DagError when it cannot be), and the
    run gains its result task (tasks_app.workspaces)."""
    run_priority = dag.priority if priority is None else priority
    ws = dag.workspace
    base_commit = workspaces.resolve_base(ws) if ws else ""
    specs = list(dag.tasks) + ([workspaces.result_task(dag)] if ws else [])
    daily = settings.CP_DAILY_MAX_COST_USD
    held = f"budget_exceeded: today's cost reached the daily cap ${daily:g} (CP_DAILY_MAX_COST_USD)" if (
        daily > 0 and cost_today() >= daily
    ) else ""  # fmt: skip
    with transaction.atomic():
        run = Run.objects.create(
            state=RunState.PAUSED if held else RunState.RUNNING,
            pause_reason=held,
            max_cost_usd=dag.max_cost_usd,
            name=dag.name,
            workflow=workflow,
            document=document,
            priority=run_priority,
            max_parallel=dag.max_parallel if max_parallel is None else max_parallel,
            created_by=user,
            repo=ws.repo if ws else "",
            base_ref=(ws.base or "HEAD") if ws else "",
            base_commit=base_commit,
            branch_prefix=ws.branch_prefix if ws else "",
            params=dag.params,
            rerun_of=rerun_of,
        )
        now = timezone.now()
        tasks: list[dict[str, Any]] = [
            {
                "id": uuid4(),
                "run_id": run.id,
                "key": s.key,
                "title": s.title,
                "state": TaskState.BLOCKED if s.deps else waiting_state(s.executor),
                # An approval without dependencies waits from now (its timeout counts from ready_at).
                "ready_at": None if s.deps or s.executor != APPROVAL_EXECUTOR else now,
                "priority": s.priority + run_priority,
                "requires": s.requires,
                "executor": s.executor,
                "command": s.command,
                "prompt": s.prompt,
                "params": s.params,
                "estimate_s": s.estimate_s,
                "critical_path_s": s.critical_path_s,
                "depth": s.depth,
                "max_attempts": s.max_attempts,
                "timeout_s": s.timeout_s,
                "retry_delay_s": s.retry_delay_s,
            }
            for s in specs
        ]
        ids = {t["key"]: t["id"] for t in tasks}
        with connection.cursor() as cur:
            q.copy_insert(cur, Task, tasks)
            deps = [{"task_id": ids[s.key], "depends_on_id": ids[d]} for s in specs for d in s.deps]
            q.copy_insert(cur, TaskDependency, deps)
        changes = Changes(runs={run.id})
        for t in tasks:
            if t["state"] == TaskState.READY:
                changes.task_ready(t["executor"], t["requires"])
        events = EventLog(actor)
        detail = {"tasks": len(tasks), **({"reason": held} if held else {})}
        if rerun_of is not None:
            detail["rerun_of"] = str(rerun_of.id)
            events.add("rerun", "", "", run=rerun_of.id, detail={"rerun": str(run.id)})  # in the old run's trail
        events.add("run", "", run.state, run=run.id, detail=detail)
        for t in tasks:
            if t["state"] == TaskState.AWAITING_APPROVAL:  # the audit trail (and webhooks) hear that it waits
                events.add("task", "", t["state"], run=run.id, task=t["id"])
        with connection.cursor() as cur:
            _commit(cur, events, changes)
    return run


# --- Claiming -----------------------------------------------------------------------------------------


def may_claim(agent: dict) -> bool:
    """Whether the agent is offered work at all (a draining or stopping agent is not)."""
    return bool(agent["enabled"] and not agent["draining"] and not agent["shutdown_requested"])


def claim_ready_tasks(agent: dict, capacity: int) -> list[dict]:
    """Assign up to `capacity` ready tasks the agent can run, within every limit. Never waits on a lock
    another claimer holds for a task (SKIP LOCKED), so concurrent claims never hand out one task twice, and
    never locks more ready tasks than it has free slots (see queries.CANDIDATES)."""
    if not may_claim(agent):
        return []
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(q.LOCK_AGENT_LIVE, {"agent_id": agent["id"]})
        agent_capacity, _, agent_live = cur.fetchone()
        free = min(capacity, agent_capacity - agent_live)
        if free <= 0:
            return []
        choice = _choose_tasks(cur, agent, free)
        if not choice.chosen:
            return []
        cur.execute(
            q.ASSIGN,
            {
                "task_ids": choice.chosen,
                "agent_id": agent["id"],
                "lease_s": settings.CP_LEASE_S,
                "actor": f"agent:{agent['name']}",
                "channel": CHANNEL,
                "payload": Changes(runs=choice.chosen_runs).payload(),
            },
        )
        rows = q.rows_by_name(cur)
        built = assignments.build(cur, rows, agent["id"])
    for row in rows:
        metrics.READY_TO_ASSIGNED.observe(float(row["waited_s"]))
    return built


@dataclass
class _Choice:
    """The tasks a claim has chosen so far, and the free slots it counts as it chooses: the agent's, each
    limited run's and the global limit's (each counted under its lock, see _lock_limits)."""

    free: int
    chosen: list = field(default_factory=list)
    chosen_runs: set = field(default_factory=set)
    full_runs: list = field(default_factory=list)
    run_slots: dict = field(default_factory=dict)  # run id -> free slots, for runs with max_parallel
    global_free: int | None = None  # with CP_GLOBAL_MAX_LIVE set

    def complete(self) -> bool:
        return len(self.chosen) >= self.free or (self.global_free is not None and self.global_free <= 0)

    def take(self, rows: list[tuple]) -> None:
        """Choose from CANDIDATES' rows, in their order, while slots are free; note the runs found full."""
        for task_id, run_id, _max_parallel in rows:
            if self.complete():
                break
            if run_id in self.run_slots:
                if self.run_slots[run_id] <= 0:
                    if run_id not in self.full_runs:
                        self.full_runs.append(run_id)
                    continue
                self.run_slots[run_id] -= 1
            self.chosen.append(task_id)
            self.chosen_runs.add(run_id)
            if self.global_free is not None:
                self.global_free -= 1


def _choose_tasks(cur: CursorWrapper, agent: dict, free: int) -> _Choice:
    """Up to `free` candidate tasks within their runs' max_parallel and the global limit, locked."""
    choice = _Choice(free)
    for _ in range(4):  # a few rounds: candidates of runs found full are replaced by others
        cur.execute(
            q.CANDIDATES,
            {
                "labels": list(agent["labels"]),
                "executors": list(agent["executors"]),
                "full_runs": choice.full_runs,
                "chosen": choice.chosen,
                "has_git": workspaces.RESULT_EXECUTOR in agent["executors"],
                "limit": free - len(choice.chosen),
            },
        )
        rows = cur.fetchall()
        if not rows:
            break
        _lock_limits(cur, choice, rows)
        choice.take(rows)
        if choice.complete() or not choice.full_runs:
            break
    return choice


def _lock_limits(cur: CursorWrapper, choice: _Choice, rows: list[tuple]) -> None:
    """Count the free slots of the candidates' limited runs not counted yet (under their run locks) and of the
    global limit (under its advisory lock), once each per claim."""
    limited = sorted({run_id for _, run_id, max_parallel in rows if max_parallel is not None} - choice.run_slots.keys())
    if limited:
        cur.execute(q.LOCK_RUNS_LIVE, {"run_ids": limited})
        for run_id, max_parallel, live in cur.fetchall():
            choice.run_slots[run_id] = max_parallel - live
    global_limit = settings.CP_GLOBAL_MAX_LIVE
    if global_limit and choice.global_free is None:
        cur.execute(q.LOCK_GLOBAL_LIVE)
        choice.global_free = global_limit - cur.fetchone()[1]


# --- Agent reports on an attempt ----------------------------------------------------------------------


def _lock_attempt(cur: CursorWrapper, attempt_id: Id) -> dict:
    """The attempt and what its transitions need of its task and run (queries.LOCK_ATTEMPT's columns, by
    name), attempt and task locked."""
    cur.execute(q.LOCK_ATTEMPT, {"attempt_id": attempt_id})
    att = q.row_by_name(cur)
    if att is None:
        raise NotFound("no attempt with that id")
    if isinstance(att["workspace"], str):  # jsonb comes back as text on a raw cursor
        att["workspace"] = json.loads(att["workspace"])
    return att


def _require_live(att: dict, agent_id: Id) -> None:
    if att["agent_id"] != agent_id:
        raise StaleAttempt("that attempt is not this agent's")
    if att["state"] not in AttemptState.LIVE:
        raise StaleAttempt(f"that attempt is {att['state']}, no longer live")


def record_progress(
    agent: dict, attempt_id: Id, progress: float | None, message: str | None, log_text: str | None,
    usage: dict | None = None,
) -> dict:  # fmt: skip
    """Progress, message, log and usage so far from the agent; extends the lease. The first report marks the
    start. Usage that brings the run to its budget (or every run to the daily cap) pauses it and asks its live
    attempts to stop (enforce_budgets); the answer tells this one so at once."""
    with transaction.atomic(), connection.cursor() as cur:
        att = _lock_attempt(cur, attempt_id)
        _require_live(att, agent["id"])
        events, changes = EventLog(f"agent:{agent['name']}"), Changes(runs={att["run_id"]})
        if att["state"] == AttemptState.ASSIGNED:
            check_transition("attempt", att["state"], AttemptState.RUNNING)
            check_transition("task", att["task_state"], TaskState.RUNNING)
            events.add("attempt", AttemptState.ASSIGNED, AttemptState.RUNNING, run=att["run_id"],
                       task=att["task_id"], attempt=att["id"], agent=agent["id"])  # fmt: skip
            events.add("task", att["task_state"], TaskState.RUNNING, run=att["run_id"], task=att["task_id"],
                       attempt=att["id"], agent=agent["id"])  # fmt: skip
        keep = settings.CP_ATTEMPT_LOG_KEEP_BYTES
        cur.execute(
            q.PROGRESS_ATTEMPT,
            {"lease_s": settings.CP_LEASE_S, "progress": progress, "message": message, "log": log_text or None,
             "keep": keep, "id": att["id"], **_usage_params(usage, None)},
        )  # fmt: skip
        lease = cur.fetchone()[0]
        cur.execute(q.PROGRESS_TASK, {"progress": progress, "message": message, "task_id": att["task_id"]})
        _commit(cur, events, changes)
    stop = att["cancel_reason"]
    if usage is not None and not stop and budgets_apply(att["max_cost_usd"]):
        stop = enforce_budgets(att["run_id"]).get(att["id"], "")
    # Past its timeout (on our clock) the agent is told to stop; it then reports the attempt failed.
    grace = max(5, settings.CP_HEARTBEAT_INTERVAL_S)
    answer = {"lease_expires_at": lease.isoformat(), "cancel": False}
    if stop:
        answer.update(cancel=True, cancel_reason=stop.split(":", 1)[0])
    elif att["elapsed_s"] > att["timeout_s"] + grace:
        answer.update(cancel=True, cancel_reason="timeout")
    return answer


def _usage_params(usage: dict | None, session_id: str | None) -> dict:
    """ATTEMPT_USAGE's parameters: None leaves a column as it is."""
    return {
        "a_usage": json.dumps(usage) if usage is not None else None,
        "a_cost_usd": usage.get("cost_usd") if usage is not None else None,
        "a_session_id": session_id,
    }


# Outcomes an agent may report (PROTOCOL.md, v1.1): `rate_limited` ends the attempt as failed but returns
# its task (see _ending_of).
RATE_LIMITED = "rate_limited"
NOT_LOGGED_IN = "not_logged_in"


def complete_attempt(
    agent: dict, attempt_id: Id, outcome: str, result: Any, error: str, exit_code: int | None,
    commit: dict | None = None, *,
    usage: dict | None = None, session_id: str | None = None, hold_until: datetime | None = None,
) -> str:  # fmt: skip
    """The agent's final word on an attempt. The same completion again is accepted and changes nothing;
    any other completion of a finished or foreign attempt is stale. A success hands its output and commit
    down the DAG (tasks_app.workspaces); the result task's commit becomes the run's result.

    An attempt that ended for a reason that is not its task's returns the task to ready without using up an
    attempt: the provider's usage limit (`rate_limited`: that executor is also held back on this agent until
    `hold_until`), a lost login (`not_logged_in: …`: the executor is no longer offered to this agent until
    its next pre-flight passes), or the server's request to stop it (a budget reached)."""
    actor = f"agent:{agent['name']}"
    if holds_executor(outcome, error):
        _hold_executor(agent, attempt_id, outcome, error, hold_until)  # the agent row first: its own transaction
    ended = False
    with transaction.atomic(), connection.cursor() as cur:
        att = _lock_attempt(cur, attempt_id)
        attempt_state, stored_error, returned = _ending_of(att, outcome, error or "")
        if (
            att["agent_id"] == agent["id"]
            and att["state"] == attempt_state
            and _same_completion(att, result, stored_error, exit_code)
        ):
            task_state = att["task_state"]  # the same again: nothing changes (the run is settled below)
        else:
            _require_live(att, agent["id"])
            events, changes = EventLog(actor), Changes(runs={att["run_id"]})
            ending = {"state": attempt_state, "result": json.dumps(result) if result is not None else None,
                      "error": stored_error, "exit_code": exit_code,
                      "commit": json.dumps(commit) if commit is not None else None,
                      **{k.removeprefix("a_"): v for k, v in _usage_params(usage, session_id).items()}}  # fmt: skip
            handed_down = _handed_down(att, result, commit) if attempt_state == AttemptState.SUCCEEDED else None
            ended = True
            task_state = _end_attempt(
                cur, att, attempt_state, events, changes, q.END_ATTEMPT_COMPLETED, ending, agent["id"],
                handed_down=handed_down, returned=returned,
                detail={"returned": _error_code(stored_error)} if returned else None,
            )  # fmt: skip
            if handed_down and att["executor"] == workspaces.RESULT_EXECUTOR and att["workspace"]:
                heads = handed_down["heads"]
                sha = (commit or {}).get("sha") or (heads[0] if len(heads) == 1 else "")
                cur.execute(q.SET_RUN_RESULT, {"run_id": att["run_id"], "branch": att["workspace"].get("branch", ""),
                                               "sha": sha or att["workspace"].get("base_commit", "")})  # fmt: skip
            _commit(cur, events, changes)
    if ended:
        metrics.attempt_ended(att["executor"], attempt_state, att["elapsed_s"])
    settle_run(att["run_id"], actor)
    if usage is not None and budgets_apply(att["max_cost_usd"]):
        enforce_budgets(att["run_id"])  # the last figures may be the ones that reach a cap
    return task_state


def holds_executor(outcome: str, error: str) -> bool:
    """Whether this completion holds its executor back on the agent: a usage limit until its reset, a lost
    login until the next pre-flight passes."""
    return outcome == RATE_LIMITED or _error_code(error) == NOT_LOGGED_IN


def _error_code(error: str) -> str:
    """The machine-readable word an error starts with (`rate_limited: …` → rate_limited)."""
    return error.split(":", 1)[0].strip() if ":" in error else ""


def _ending_of(att: dict, outcome: str, error: str) -> tuple[str, str, bool]:
    """(attempt state, stored error, whether the task is returned without using an attempt) for an agent's
    completion of `att`."""
    if outcome == RATE_LIMITED:
        return AttemptState.FAILED, error if _error_code(error) == RATE_LIMITED else f"rate_limited: {error}", True
    if outcome == AttemptState.FAILED and _error_code(error) == NOT_LOGGED_IN:
        return AttemptState.FAILED, error, True
    if att["cancel_reason"] and outcome != AttemptState.SUCCEEDED:
        # The server asked it to stop (a budget reached): the server's words, the agent's after them.
        said = f"{att['cancel_reason']} (agent: {error})" if error else att["cancel_reason"]
        return AttemptState.CANCELED, said, True
    return outcome, error, False


def _hold_executor(agent: dict, attempt_id: Id, outcome: str, error: str, hold_until: datetime | None) -> None:
    """Hold back the attempt's executor on this agent: until `hold_until` for a usage limit, until the next
    passing pre-flight for a lost login. Only for the agent's own live attempt (anything else is refused as
    stale by the completion that follows)."""
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(q.EXECUTOR_OF_LIVE_ATTEMPT, {"attempt_id": attempt_id, "agent_id": agent["id"]})
        row = cur.fetchone()
        if row is None:
            return
        executor = row[0]
        events = EventLog(f"agent:{agent['name']}")
        reason = error[:300]
        if outcome == RATE_LIMITED:
            assert hold_until is not None  # agents_app.api sets it for every rate_limited completion
            until = hold_until.isoformat()
            cur.execute(q.HOLD_EXECUTOR, {"agent_id": agent["id"], "executor": executor, "until": until,
                                          "reason": reason})  # fmt: skip
            detail = {"executor": executor, "until": until, "reason": reason}
            events.add("agent", "", "executor_held", agent=agent["id"], detail=detail)
        else:
            cur.execute(q.EXECUTOR_LOGGED_OUT, {"agent_id": agent["id"], "executor": executor, "detail": reason})
            events.add("agent", "", "executor_logged_out", agent=agent["id"],
                       detail={"executor": executor, "reason": reason})  # fmt: skip
        _commit(cur, events, Changes(agents=True))


# --- Budgets --------------------------------------------------------------------------------------------


def budgets_apply(run_max_cost_usd: float | None) -> bool:
    """Whether an attempt's new usage can reach a cap: its run has one, or the daily cap is set."""
    return run_max_cost_usd is not None or settings.CP_DAILY_MAX_COST_USD > 0


def enforce_budgets(run_id: Id) -> dict:
    """Pause the run when its cost has reached its `max_cost_usd`, or every running run when today's cost has
    reached CP_DAILY_MAX_COST_USD, and ask their live attempts to stop. Returns {attempt id: reason} of the
    attempts asked now. Each run is locked alone, then its attempts (the lock order)."""
    with connection.cursor() as cur:
        cur.execute(q.RUN_COST, {"run_id": run_id})
        state, cap, spent = cur.fetchone()
        daily = settings.CP_DAILY_MAX_COST_USD
        today = None
        if daily > 0:
            cur.execute(q.COST_TODAY)
            today = cur.fetchone()[0]
    if today is not None and today >= daily:
        reason = f"budget_exceeded: ${today:.4f} spent today reached the daily cap ${daily:g} (CP_DAILY_MAX_COST_USD)"
        with connection.cursor() as cur:
            cur.execute(q.RUNNING_RUNS)
            run_ids = [r[0] for r in cur.fetchall()]
        return {k: v for rid in run_ids for k, v in _pause_for_budget(rid, reason).items()}
    if cap is not None and spent >= cap and state == RunState.RUNNING:
        return _pause_for_budget(run_id, f"budget_exceeded: the run's cost ${spent:.4f} reached max_cost_usd ${cap:g}")
    return {}


def _pause_for_budget(run_id: Id, reason: str) -> dict:
    with transaction.atomic(), connection.cursor() as cur:
        current = _lock_run(cur, run_id)
        if current != RunState.RUNNING:
            return {}
        check_transition("run", current, RunState.PAUSED)
        cur.execute(q.PAUSE_RUN_FOR_BUDGET, {"run_id": run_id, "reason": reason})
        events = EventLog("system:budget")
        events.add("run", current, RunState.PAUSED, run=run_id, detail={"reason": reason})
        _commit(cur, events, Changes(runs={run_id}))
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(q.ASK_TO_STOP, {"run_ids": [run_id], "reason": reason})
        return {r[0]: reason for r in cur.fetchall()}


def cost_today() -> float:
    with connection.cursor() as cur:
        cur.execute(q.COST_TODAY)
        return cur.fetchone()[0]


def _handed_down(att: dict, result: Any, commit: dict | None) -> dict:
    """What a succeeded attempt leaves its task for the dependents: output, commit, head commits."""
    merged = (att["workspace"] or {}).get("merge") or []
    return {
        "output": workspaces.output_of(result),
        "commit": json.dumps(commit) if commit is not None else None,
        "heads": workspaces.head_commits_after(commit, merged) if att["workspace"] else [],
    }


def _same_completion(att: dict, result: Any, error: str, exit_code: int | None) -> bool:
    stored = att["result"]
    if isinstance(stored, str):
        stored = json.loads(stored)
    return stored == result and (att["error"] or "") == (error or "") and att["exit_code"] == exit_code


def _end_attempt(
    cur: CursorWrapper,
    att: dict,
    attempt_state: str,
    events: EventLog,
    changes: Changes,
    statement: str,
    ending: dict,
    agent_id: Id | None = None,
    detail: dict | None = None,
    handed_down: dict | None = None,
    returned: bool = False,
) -> str:
    """End the attempt (`statement`: queries.END_ATTEMPT_COMPLETED or END_ATTEMPT_ENDED, with `ending` as the
    parameters of its attempt's SET list) and apply that to its task, its dependents and its run. Returns the
    task's new state.
    `returned`: the attempt ended for a reason that is not the task's (a provider's usage limit, a lost
    login, a budget reached): the task goes back to ready at once without using up an attempt."""
    check_transition("attempt", att["state"], attempt_state)
    ids = {"run": att["run_id"], "task": att["task_id"], "attempt": att["id"], "agent": agent_id or att["agent_id"]}
    events.add("attempt", att["state"], attempt_state, **ids, detail=detail)
    task_from = att["task_state"]
    if returned:
        target = TaskState.READY
    elif attempt_state == AttemptState.SUCCEEDED:
        target = TaskState.SUCCEEDED
    elif attempt_state == AttemptState.CANCELED:
        target = TaskState.CANCELED
    else:
        target = task_after_failed_attempt(
            att["attempts_used"] - att["attempt_base"], att["max_attempts"], ending.get("error") or ""
        )
    check_transition("task", task_from, target)
    # A lost attempt is its agent's failure, not the task's: offered again at once, without the retry delay
    # that paces a task that failed on its own (the agent's silence already cost the offline threshold).
    lost_or_returned = returned or attempt_state == AttemptState.LOST
    delay = att["retry_delay_s"] if target == TaskState.READY and not lost_or_returned else 0
    cur.execute(
        statement,
        {**{f"a_{k}": v for k, v in ending.items()}, "attempt_id": att["id"], "state": target, "delay": delay,
         "returned": returned,
         "task_id": att["task_id"], "handed": handed_down is not None, "output": (handed_down or {}).get("output"),
         "commit": (handed_down or {}).get("commit"), "heads": (handed_down or {}).get("heads") or []},
    )  # fmt: skip
    executor, requires = cur.fetchone()
    events.add("task", task_from, target, **ids,
               detail={"attempt": att["number"], **({"attempt_not_counted": True} if returned else {})})  # fmt: skip
    if target == TaskState.READY:
        changes.task_ready(executor, requires, delay)
    elif att["has_dependents"]:
        _hand_on(cur, att["run_id"], att["task_id"], target, events, changes)
    if att["run_state"] == RunState.RUNNING and (att["max_parallel"] or settings.CP_GLOBAL_MAX_LIVE):
        # A slot of a limited run (or of the global limit) freed up: wake an agent for the run's next task.
        cur.execute(q.TOP_READY_OF_RUN, {"run_id": att["run_id"], "limit": 1})
        for executor, requires in cur.fetchall():
            changes.task_ready(executor, requires)
    return target


def _hand_on(cur: CursorWrapper, run_id: Id, task_id: Id, target: str, events: EventLog, changes: Changes) -> None:
    """What a task's end does to its dependents: a success releases those whose dependencies have all
    succeeded (to ready, or an approval task to awaiting approval); anything else skips what is downstream."""
    if target != TaskState.SUCCEEDED:
        _skip_downstream(cur, run_id, task_id, events)
        return
    cur.execute(q.LOCK_DEPENDENTS, {"task_id": task_id})
    cur.execute(q.RELEASE_DEPENDENTS, {"task_id": task_id})
    for dep_id, dep_executor, dep_requires, dep_state in cur.fetchall():
        events.add("task", TaskState.BLOCKED, dep_state, run=run_id, task=dep_id,
                   detail={"because": "dependencies succeeded"})  # fmt: skip
        if dep_state == TaskState.READY:
            changes.task_ready(dep_executor, dep_requires)


def _skip_downstream(cur: CursorWrapper, run_id: Id, task_id: Id, events: EventLog) -> None:
    cur.execute(q.SKIP_DOWNSTREAM, {"task_id": task_id})
    for (skipped_id,) in cur.fetchall():
        events.add("task", TaskState.BLOCKED, TaskState.SKIPPED, run=run_id, task=skipped_id,
                   detail={"because": str(task_id)})  # fmt: skip


def settle_run(run_id: Id, actor: str = "system:scheduler") -> str | None:
    """End the run if nothing of it is pending; returns its new state, or None. Called after the commit of
    every change that can finish a run's last pending task (see queries.LOCK_RUN), and by the sweeper."""
    with connection.cursor() as cur:
        cur.execute(q.RUN_HAS_PENDING, {"run_id": run_id})
        if cur.fetchone()[0]:
            return None
    with transaction.atomic(), connection.cursor() as cur:
        run_state = _lock_run(cur, run_id)
        cur.execute(q.RUN_HAS_PENDING, {"run_id": run_id})
        if run_state not in RunState.ACTIVE or cur.fetchone()[0]:
            return None
        cur.execute(q.RUN_TASK_STATES, {"run_id": run_id})
        outcome = run_outcome(state for state, n in cur.fetchall())
        assert outcome is not None  # nothing of the run is pending (checked under its lock)
        check_transition("run", run_state, outcome)
        cur.execute(q.END_RUN, {"state": outcome, "run_id": run_id})
        events = EventLog(actor)
        events.add("run", run_state, outcome, run=run_id)
        _commit(cur, events, Changes(runs={run_id}))
    return outcome


# --- Heartbeats and sweeps ----------------------------------------------------------------------------


def heartbeat(agent: dict, status: str, attempt_ids: list[str], first: bool = False) -> list[dict]:
    """Extend the leases of the listed attempts still this agent's; answer with commands for it. Live
    attempts of this agent that it no longer lists (it restarted, or dropped them) are lost at once rather
    than held until their lease runs out (see queries.HEARTBEAT_LEASES for the grace of a fresh one). The
    `first` heartbeat of a daemon's life comes before its first claim: whatever it does not list is its
    previous life's, however fresh, so no grace applies."""
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(
            q.HEARTBEAT_LEASES,
            {"status": status, "lease_s": settings.CP_LEASE_S, "ids": attempt_ids, "agent_id": agent["id"],
             "grace_s": 0 if first else settings.CP_UNLISTED_GRACE_S},
        )  # fmt: skip
        extended, forgotten, asked_to_stop = cur.fetchone()
        live = {str(a) for a in extended or ()}
    if forgotten:
        lose_attempts(forgotten, "the agent no longer runs it", f"agent:{agent['name']}")
    stop = {str(a) for a in asked_to_stop or ()}
    commands = [{"type": "cancel", "attempt_id": a} for a in attempt_ids if a not in live or a in stop]
    if agent["shutdown_requested"]:
        commands.append({"type": "shutdown"})
    elif agent["draining"]:
        commands.append({"type": "drain"})
    return commands


def lose_attempts(attempt_ids: Iterable[Id], reason: str, actor: str) -> int:
    """Mark live attempts lost (lease expired, agent silent); their tasks go back to ready or fail."""
    lost = 0
    for attempt_id in attempt_ids:
        with transaction.atomic(), connection.cursor() as cur:
            att = _lock_attempt(cur, attempt_id)
            if att["state"] not in AttemptState.LIVE:
                continue
            events, changes = EventLog(actor), Changes(runs={att["run_id"]})
            ending = {"state": AttemptState.LOST, "error": reason}
            # One the server had asked to stop (a budget reached) is returned like the rest of its run's.
            _end_attempt(
                cur, att, AttemptState.LOST, events, changes, q.END_ATTEMPT_ENDED, ending, detail={"reason": reason},
                returned=bool(att["cancel_reason"]),
            )  # fmt: skip
            _commit(cur, events, changes)
        metrics.attempt_ended(att["executor"], AttemptState.LOST, att["elapsed_s"])
        metrics.ATTEMPTS_LOST.labels(reason).inc()
        settle_run(att["run_id"], actor)  # a task that failed for good may have been the run's last
        lost += 1
    return lost


def _server_gap_s() -> float:
    """A silence of every server process longer than this counts as our downtime, not the agents'.

    An agent heartbeating every H seconds looks silent after a server silence of O - H (O: the offline
    threshold), so the gap must be shorter than that: half of it, at most 10 s; but at least three sweep
    intervals, so that a slow sweep is not taken for a downtime (which would only delay expiry by a lease)."""
    margin = (settings.CP_OFFLINE_AFTER_S - settings.CP_HEARTBEAT_INTERVAL_S) / 2
    return max(3 * settings.CP_SWEEP_INTERVAL_S, min(10.0, margin))


def sweep(force: bool = False) -> dict:
    """Expire leases, mark silent agents offline, end runs left with nothing pending (settle_run's backstop).
    Safe to run from many processes at once. Expires nothing while the sweep clock forbids it (just after
    every server process was down)."""
    with connection.cursor() as cur:
        cur.execute(q.EXPIRY_ALLOWED, {"gap_s": _server_gap_s()})
        allowed = cur.fetchone()[0] or force
        cur.execute(q.UNSETTLED_RUNS)
        unsettled = [r[0] for r in cur.fetchall()]
    settled = sum(settle_run(run_id, "system:sweeper") is not None for run_id in unsettled)
    if not allowed:
        return {"expired": 0, "offline": 0, "runs_settled": settled}
    # Like leases, not just after our own downtime: nobody could answer while every server was down.
    expire_approvals()
    settle_input_requests()
    with connection.cursor() as cur, transaction.atomic():
        cur.execute(q.SILENT_AGENTS, {"offline_after_s": settings.CP_OFFLINE_AFTER_S})
        silent = cur.fetchall()
        attempts = []
        for agent_id, _name in silent:
            cur.execute(q.LIVE_ATTEMPTS_OF_AGENT, {"agent_id": agent_id})
            attempts += [r[0] for r in cur.fetchall()]
        if silent:
            events = EventLog("system:sweeper")
            for agent_id, _name in silent:
                events.add("agent", "online", "offline", agent=agent_id, detail={"reason": "silent"})
            _commit(cur, events, Changes(agents=True))
    offline = lose_attempts(attempts, "agent went silent", "system:sweeper")
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(q.EXPIRED_ATTEMPTS)
        expired_ids = [r[0] for r in cur.fetchall()]
    expired = lose_attempts(expired_ids, "lease expired", "system:sweeper")
    return {"expired": expired, "offline": offline, "agents_offline": len(silent), "runs_settled": settled}


def tick_sweep_clock(starting: bool = False) -> None:
    """Record that a server process is alive (and, at its start, whether every one of them was down)."""
    params = {"gap_s": _server_gap_s(), "lease_s": settings.CP_LEASE_S}
    with connection.cursor() as cur:
        cur.execute(q.SERVER_START if starting else q.SWEEP_CLOCK_TICK, params)


# --- Operators ----------------------------------------------------------------------------------------


def _lock_run(cur: CursorWrapper, run_id: Id) -> str:
    cur.execute(q.LOCK_RUN, {"run_id": run_id})
    row = cur.fetchone()
    if row is None:
        raise NotFound("no run with that id")
    return row[0]


# For refusals: "it cannot be canceled" (not "canceld").
PAST_TENSE = {"pause": "paused", "resume": "resumed", "cancel": "canceled"}


def _operate_run(run_id: Id, operation: str, actor: str) -> str:
    """Pause, resume or cancel a run (RUN_OPERATIONS says from which states). Returns the new state."""
    target, allowed_from = RUN_OPERATIONS[operation]
    with transaction.atomic(), connection.cursor() as cur:
        current = _lock_run(cur, run_id)
        if current not in allowed_from:
            raise ActionError(f"the run is {current}: it cannot be {PAST_TENSE[operation]}", "invalid_state")
        check_transition("run", current, target)
        cur.execute(q.SET_RUN_STATE, {"state": target, "run_id": run_id})
        events, changes = EventLog(actor), Changes(runs={run_id})
        events.add("run", current, target, run=run_id)
        if target == RunState.RUNNING:
            changes.wake_all = True  # resumed: its ready tasks may go to any waiting agent
        _commit(cur, events, changes)
    return target


def pause_run(run_id: Id, actor: str) -> str:
    return _operate_run(run_id, "pause", actor)


def resume_run(run_id: Id, actor: str, max_cost_usd: float | None = None) -> str:
    """Resume a paused run, first raising its budget to `max_cost_usd` when given. A run whose cost has
    reached its budget is not resumed (it would pause again at its next report): raise the budget with it."""
    with transaction.atomic(), connection.cursor() as cur:
        _lock_run(cur, run_id)
        if max_cost_usd is not None:
            cur.execute(q.SET_RUN_BUDGET, {"max_cost_usd": max_cost_usd, "run_id": run_id})
            events = EventLog(actor)
            events.add("run", "", "budget", run=run_id, detail={"max_cost_usd": max_cost_usd})
            events.write(cur)
        cur.execute(q.RUN_COST, {"run_id": run_id})
        _state, cap, spent = cur.fetchone()
        if cap is not None and spent >= cap:
            raise ActionError(
                f"the run has spent ${spent:.4f} of its max_cost_usd ${cap:g}: resume with a higher max_cost_usd",
                "budget_exceeded",
            )
    daily = settings.CP_DAILY_MAX_COST_USD
    if daily > 0 and cost_today() >= daily:
        raise ActionError(
            f"today's cost has reached the daily cap ${daily:g} (CP_DAILY_MAX_COST_USD)", "budget_exceeded"
        )
    return _operate_run(run_id, "resume", actor)


def cancel_run(run_id: Id, actor: str) -> str:
    """Cancel the run at once, then its tasks: pending ones are canceled, live attempts too (their agents
    are told on their next heartbeat or progress report). Tasks are touched in later transactions than the
    run's, keeping the global lock order; claims in flight finish first (we wait on their task locks) and
    their attempts are then canceled like the rest."""
    _operate_run(run_id, "cancel", actor)
    events, changes = EventLog(actor), Changes(runs={run_id})
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(q.LOCK_PENDING_TASKS_OF_RUN, {"run_id": run_id})
        pending = cur.fetchall()
        for task_id, state in pending:
            events.add("task", state, TaskState.CANCELED, run=run_id, task=task_id)
        cur.execute(q.CANCEL_TASKS, {"task_ids": [t for t, _ in pending]})
        _commit(cur, events, changes)
    with connection.cursor() as cur:
        cur.execute(q.LIVE_ATTEMPTS_OF_RUN, {"run_id": run_id})
        live = [r[0] for r in cur.fetchall()]
    for attempt_id in live:
        with transaction.atomic(), connection.cursor() as cur:
            att = _lock_attempt(cur, attempt_id)
            if att["state"] not in AttemptState.LIVE:
                continue
            ending = {"state": AttemptState.CANCELED, "error": "run canceled"}
            _end_attempt(
                cur,
                att,
                AttemptState.CANCELED,
                events,
                changes,
                q.END_ATTEMPT_ENDED,
                ending,
                detail={"reason": "run canceled"},
            )
            _commit(cur, events, changes)
    return RunState.CANCELED


def retry_task(task_id: Id, actor: str, edits: dict | None = None) -> str:
    """An operator's retry of a failed or canceled task: it gets a fresh set of attempts, its skipped
    descendants wait again, and a finished run reopens. `edits` ({"command", "prompt", "params"}, each
    optional) change what the retry runs, checked as a DAG document's task is; the audit trail keeps the
    old and new values."""
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(q.LOCK_TASK, {"task_id": task_id})
        row = cur.fetchone()
        if row is None:
            raise NotFound("no task with that id")
        state, run_id, executor, requires = row
        if state not in (TaskState.FAILED, TaskState.CANCELED):
            raise ActionError(f"only a failed or canceled task can be retried; this one is {state}", "invalid_state")
        events, changes = EventLog(actor), Changes(runs={run_id})
        target = waiting_state(executor)  # a rejected approval is asked again
        check_transition("task", state, target)
        detail: dict = {"retry": True}
        if edits:
            detail["edited"] = edit_task(task_id, edits)
        cur.execute(q.RETRY_TASK, {"state": target, "task_id": task_id})  # a fresh budget of attempts
        events.add("task", state, target, run=run_id, task=task_id, detail=detail)
        if target == TaskState.READY:
            changes.task_ready(executor, requires)
        cur.execute(q.UNSKIP_DOWNSTREAM, {"task_id": task_id})
        for (down_id,) in cur.fetchall():
            events.add("task", TaskState.SKIPPED, TaskState.BLOCKED, run=run_id, task=down_id,
                       detail={"because": str(task_id)})  # fmt: skip
        run_state = _lock_run(cur, run_id)
        if run_state in RunState.TERMINAL:
            check_transition("run", run_state, RunState.RUNNING)
            cur.execute(q.REOPEN_RUN, {"run_id": run_id})
            events.add("run", run_state, RunState.RUNNING, run=run_id, detail={"retry": str(task_id)})
        _commit(cur, events, changes)
    return target


EDITABLE = ("command", "prompt", "params")


def edit_task(task_id: Id, edits: dict) -> dict:
    """Change a task's command, prompt or params (the caller holds its row lock), checked as the task would
    be in a document: its executor's rules, its templates against its deps and the run's params. Returns
    {field: {"from", "to"}} for what changed; DagError (422) for a bad value."""
    unknown = set(edits) - set(EDITABLE)
    if unknown:
        raise DagError(f"a retry may change only {', '.join(EDITABLE)}, not {', '.join(sorted(unknown))}")
    task = Task.objects.select_related("run").get(pk=task_id)
    deps = list(Task.objects.filter(downstream_links__task=task).values_list("key", flat=True))
    raw = {"key": task.key, "executor": task.executor, "requires": task.requires, "command": task.command,
           "prompt": task.prompt, "params": task.params, "deps": deps}  # fmt: skip
    raw.update({k: v for k, v in edits.items() if k in EDITABLE})
    spec = parse_task({k: v for k, v in raw.items() if v not in (None, [], {})})
    check_templates([spec], task.run.params)
    changed = {f: {"from": getattr(task, f), "to": getattr(spec, f)} for f in EDITABLE
               if f in edits and getattr(task, f) != getattr(spec, f)}  # fmt: skip
    if changed:
        Task.objects.filter(pk=task_id).update(**{f: v["to"] for f, v in changed.items()})
    return changed


def retry_failed(run_id: Id, actor: str) -> list[str]:
    """Retry every failed or canceled task of the run, in one transaction (their skipped descendants wait
    again); the ids retried, none when nothing had failed."""
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(q.LOCK_RETRYABLE_TASKS, {"run_id": run_id})  # lock order: tasks, then (in retry_task) the run
        ids = [str(task_id) for (task_id,) in cur.fetchall()]
        if not ids and not Run.objects.filter(pk=run_id).exists():
            raise NotFound("no run with that id")
        for task_id in ids:
            retry_task(task_id, actor)
    return ids


# --- Approvals ----------------------------------------------------------------------------------------


def decide_approval(task_id: Id, approve: bool, actor: str, message: str = "") -> str:
    """An operator's answer to an approval task (PROTOCOL.md v1.1): approved, it succeeds and hands its
    dependencies' commits on (its output is the comment); rejected, it fails and what is downstream is
    skipped. Anything but a task awaiting approval is refused. Who decided, and why, go in the audit trail."""
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(q.LOCK_APPROVAL, {"task_id": task_id})
        row = cur.fetchone()
        if row is None:
            raise NotFound("no task with that id")
        state, run_id, executor, has_dependents = row
        if state != TaskState.AWAITING_APPROVAL:
            what = "an approval task" if executor == APPROVAL_EXECUTOR else f"a {executor} task"
            raise ActionError(f"only a task awaiting approval can be decided; this is {what}, {state}", "invalid_state")
        target = TaskState.SUCCEEDED if approve else TaskState.FAILED
        check_transition("task", state, target)
        heads: list[str] = []
        if approve:
            cur.execute(q.HEADS_OF_DEPENDENCIES, {"task_id": task_id})
            heads = workspaces.merge_list([{"key": k, "depth": d, "head_commits": h} for k, d, h in cur.fetchall()])
        said = message or ("approved" if approve else "rejected")
        cur.execute(q.DECIDE_APPROVAL, {"task_id": task_id, "state": target, "output": message, "heads": heads,
                                        "message": f"{said} by {actor}"[:1000]})  # fmt: skip
        events, changes = EventLog(actor), Changes(runs={run_id})
        decision = {"decision": "approved" if approve else "rejected", "by": actor, "message": message}
        events.add("task", state, target, run=run_id, task=task_id, detail=decision)
        if has_dependents:
            _hand_on(cur, run_id, task_id, target, events, changes)
        _commit(cur, events, changes)
    settle_run(run_id, actor)
    return target


def expire_approvals() -> int:
    """Reject approvals nobody answered within their timeout_s (the sweeper's part)."""
    with connection.cursor() as cur:
        cur.execute(q.EXPIRED_APPROVALS)
        expired = cur.fetchall()
    n = 0
    for task_id, timeout_s in expired:
        try:
            decide_approval(task_id, False, "system:timeout", f"nobody answered within {timeout_s} s (timeout_s)")
            n += 1
        except ActionError:
            pass  # decided meanwhile
    return n


# --- Input requests -----------------------------------------------------------------------------------


def create_input_request(agent: dict, attempt_id: Id, *, kind: str, tool: str, tool_input: dict, question: str,
                         timeout_s: float) -> str:  # fmt: skip
    """The agent's live attempt waits for a person (PROTOCOL.md v1.1): its task shows as awaiting input
    until someone answers, or `timeout_s` passes and the server answers deny."""
    with transaction.atomic(), connection.cursor() as cur:
        att = _lock_attempt(cur, attempt_id)
        _require_live(att, agent["id"])
        cur.execute(q.CREATE_INPUT_REQUEST, {
            "attempt_id": att["id"], "task_id": att["task_id"], "run_id": att["run_id"], "kind": kind, "tool": tool,
            "input": json.dumps(tool_input), "question": question, "timeout_s": timeout_s,
        })  # fmt: skip
        request_id = cur.fetchone()[0]
        events = EventLog(f"agent:{agent['name']}")
        events.add("input", "", "pending", run=att["run_id"], task=att["task_id"], attempt=att["id"], agent=agent["id"],
                   detail={"request": str(request_id), "kind": kind, "tool": tool})  # fmt: skip
        _commit(cur, events, Changes(runs={att["run_id"]}))
    return str(request_id)


def input_request_state(agent: dict, request_id: Id) -> dict:
    """What the waiting agent is told: {"state": "pending"} or {"state": "answered", "answer": {...}}. A
    request past its time is answered deny here and now, so the agent never waits for the sweeper."""
    with connection.cursor() as cur:
        cur.execute(q.INPUT_REQUEST_OF_AGENT, {"request_id": request_id})
        row = cur.fetchone()
    if row is None or row[3] != agent["id"]:
        raise NotFound("no input request with that id")
    state, answer, overdue, _agent_id, attempt_state = row
    if state == "pending" and overdue:
        try:
            answer_input_request(request_id, "deny", "", "system:timeout")
        except ActionError:
            pass  # the sweeper answered it first, or it turned moot: the re-read below says which
        return input_request_state(agent, request_id)
    if state == "answered":
        return {"state": "answered", "answer": json.loads(answer) if isinstance(answer, str) else answer}
    if attempt_state not in AttemptState.LIVE:
        raise StaleAttempt(f"that request's attempt is {attempt_state}, no longer live")
    return {"state": "pending"}


def answer_input_request(request_id: Id, behavior: str, message: str, actor: str) -> dict:
    """A person's (or the timeout's) answer to a pending input request: allow or deny, with a message for
    the agent. 409 once answered, or when its attempt has ended (the request is then moot)."""
    if actor == "system:timeout" and not message:
        message = "nobody answered in time (params.input_timeout_s): denied"
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(q.LOCK_INPUT_REQUEST, {"request_id": request_id})
        row = cur.fetchone()
        if row is None:
            raise NotFound("no input request with that id")
        state, run_id, task_id, attempt_id, tool, live = row
        if state != "pending":
            raise ActionError(f"that request is {state} already", "invalid_state")
        events = EventLog(actor)
        answer = {"behavior": behavior, "message": message}
        if live:
            cur.execute(q.ANSWER_INPUT_REQUEST, {"request_id": request_id, "answer": json.dumps(answer), "by": actor})
            events.add("input", "pending", "answered", run=run_id, task=task_id, attempt=attempt_id,
                       detail={"request": str(request_id), "tool": tool, "by": actor, **answer})  # fmt: skip
        else:
            cur.execute(q.EXPIRE_INPUT_REQUEST, {"request_id": request_id})
            events.add("input", "pending", "expired", run=run_id, task=task_id, attempt=attempt_id,
                       detail={"request": str(request_id)})  # fmt: skip
        _commit(cur, events, Changes(runs={run_id}))
    if not live:  # refused after the commit: the request stays marked moot
        raise ActionError("that request's attempt has ended: nobody waits for the answer", "invalid_state")
    return answer


def settle_input_requests() -> int:
    """The sweeper's part: deny pending requests past their time, drop those whose attempt ended."""
    with connection.cursor() as cur:
        cur.execute(q.OVERDUE_INPUT_REQUESTS)
        overdue = [r[0] for r in cur.fetchall()]
    n = 0
    for request_id in overdue:
        try:
            answer_input_request(request_id, "deny", "", "system:timeout")
            n += 1
        except ActionError:
            pass  # answered meanwhile, or moot (now marked expired)
    return n


# --- Artifacts ----------------------------------------------------------------------------------------


def add_artifact(agent: dict, attempt_id: Id, *, name: str, content: bytes, sha256: str, content_type: str) -> Artifact:
    """Store a file a live attempt produced (a stale attempt's upload is refused like its other calls)."""
    from .models import Artifact

    with transaction.atomic(), connection.cursor() as cur:
        att = _lock_attempt(cur, attempt_id)
        _require_live(att, agent["id"])
        return Artifact.objects.create(
            attempt_id=att["id"],
            task_id=att["task_id"],
            name=name,
            size=len(content),
            sha256=sha256,
            content_type=content_type,
            content=content,
        )
