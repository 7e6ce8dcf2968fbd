"""The scheduler's SQL, in one place, each query named for what it does and the race it prevents.

Lock order, everywhere, so that no two transactions can wait on each other:
agent row -> attempt rows -> task rows (by id) -> run row(s) (by id).
Run-wide operations (cancel) lock the run alone first and touch its tasks in later transactions.

A statement whose rows are read by column name (`row_by_name`, `rows_by_name`) names every column it returns.
"""

from typing import TYPE_CHECKING, Any

from .states import TaskState, dependents_state_after

if TYPE_CHECKING:
    from django.db.backends.utils import CursorWrapper


def row_by_name(cur: "CursorWrapper") -> dict[str, Any] | None:
    """The next row of the cursor's last statement as {column name: value}, or None: a column added to the
    statement cannot shift the others."""
    row = cur.fetchone()
    return None if row is None else dict(zip([c.name for c in cur.description], row, strict=True))


def copy_insert(cur: "CursorWrapper", model: Any, rows: list[dict[str, Any]]) -> None:
    """INSERT rows ({attname: value}, each with the same keys) of `model` with COPY: a 10,000-task submit is
    one stream instead of statements of 20,000 parameters each, which Django spent seconds building and
    psycopg parsing. A field a row leaves out gets its default (the primary key's, such as uuid4, per row);
    what the database makes itself (an auto id, a db_default) is left to it."""
    from django.db import connection
    from django.db.models import JSONField
    from django.db.models.fields import NOT_PROVIDED, AutoFieldMixin
    from django.utils import timezone
    from psycopg.types.json import Jsonb

    if not rows:
        return
    given = rows[0].keys()
    fields, fixed = [], {}
    for f in model._meta.concrete_fields:
        if f.attname in given:
            fields.append(f)
        elif not isinstance(f, AutoFieldMixin) and f.db_default is NOT_PROVIDED:
            fields.append(f)
            if not f.primary_key:
                fixed[f.attname] = timezone.now() if getattr(f, "auto_now_add", False) else f.get_default()
    json = {f.attname for f in fields if isinstance(f, JSONField)}
    columns = ", ".join(connection.ops.quote_name(f.column) for f in fields)
    with cur.cursor.copy(f"COPY {connection.ops.quote_name(model._meta.db_table)} ({columns}) FROM STDIN") as copy:
        for row in rows:
            values = []
            for f in fields:
                name = f.attname
                value = row[name] if name in row else fixed[name] if name in fixed else f.get_default()
                values.append(Jsonb(value) if name in json and value is not None else value)
            copy.write_row(values)


def rows_by_name(cur: "CursorWrapper") -> list[dict[str, Any]]:
    """The remaining rows of the cursor's last statement as {column name: value} each."""
    names = [c.name for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


# The claim order, the most significant first: priority (task + run), the longest remaining critical path by
# estimates, then age (a task ready since its submission, ready_at NULL, before one released later). The
# claim (CANDIDATES), the queue panel (tasks_app.dashboard.panels) and the index the claim walks
# (task_ready_order_idx, models.claim_order_expressions) are all built from it: an index in any other order
# would make every claim sort the whole backlog.
CLAIM_ORDER = (
    ("priority", "DESC"),
    ("critical_path_s", "DESC"),
    ("ready_at", "ASC NULLS FIRST"),
    ("created_at", "ASC"),
    ("id", "ASC"),
)


def claim_order_sql(alias: str) -> str:
    """CLAIM_ORDER as an ORDER BY list on the task table's `alias`."""
    return ", ".join(f"{alias}.{column} {direction}" for column, direction in CLAIM_ORDER)


# Authenticate an agent, outside the caller's transaction (so no work transaction ever holds the agent row
# while waiting for a run lock). The call counts as contact: `stale` says whether to record it (TOUCH_AGENT).
# Contact is written at most once a second per agent (or at once when it comes back online): a busy agent's
# calls then cost an index read, not a row version and WAL each, and "last seen" stays far finer than the
# offline threshold.
# Its executors are those it may be offered now: an executor held back on it (a provider's usage limit, see
# HOLD_EXECUTOR) is left out until the hold's time has passed.
AUTH_AGENT = """
SELECT id, name, labels,
       CASE WHEN executor_holds = '{}'::jsonb THEN executors
            ELSE ARRAY(SELECT e FROM unnest(executors) e
                        WHERE COALESCE((executor_holds -> e ->> 'until')::timestamptz <= now(), true)) END,
       capacity, enabled, draining, shutdown_requested,
       last_seen_at IS NULL OR last_seen_at < now() - interval '1 second' OR (enabled AND status <> 'online')
  FROM agents_app_agent WHERE token_hash = %(token_hash)s AND retired_at IS NULL
"""
# Record an agent's contact; an enabled agent the sweep marked offline is online again, audited in the same
# statement (the Event and the dashboard's NOTIFY only then). The status moves only offline -> online
# (states.AGENT_TRANSITIONS): `back` re-checks its WHERE on the row's newest version, so a retirement or a
# concurrent contact committed meanwhile makes it change nothing, and two calls at once write one Event. Just
# one of the two UPDATEs writes the row (`touched` only when `back` did not): a row updated twice in one
# statement keeps one change, unpredictably which. Still one statement: no round trip is added to a call.
TOUCH_AGENT = """
WITH back AS (
    UPDATE agents_app_agent SET last_seen_at = now(), status = 'online'
     WHERE id = %(agent_id)s AND enabled AND status = 'offline'
    RETURNING id, name
), touched AS (
    UPDATE agents_app_agent SET last_seen_at = now()
     WHERE id = %(agent_id)s AND NOT EXISTS (SELECT 1 FROM back)
), ev AS (
    INSERT INTO tasks_app_event (run_id, task_id, attempt_id, agent_id, kind, from_state, to_state, actor, detail,
                                 created_at)
    SELECT NULL, NULL, NULL, back.id, 'agent', 'offline', 'online', 'agent:' || back.name,
           '{"reason": "contact"}'::jsonb, now()
      FROM back
)
SELECT pg_notify(%(channel)s, %(payload)s) FROM back
"""

# Claim, step 1: the agent's row lock serialises its own concurrent claims (capacity is per agent).
# It also turns sorting off for the rest of this transaction only: the planner's default guess for
# `requires <@ labels` (half a percent of rows) makes it sort every ready task rather than walk
# task_ready_order_idx in the claim order and stop after `limit` rows; with a backlog of thousands that sort
# was most of a claim's cost.
LOCK_AGENT_LIVE = """
SELECT a.capacity, set_config('enable_sort', 'off', true),
       (SELECT count(*) FROM tasks_app_attempt x WHERE x.agent_id = a.id AND x.state IN ('assigned', 'running'))
  FROM agents_app_agent a WHERE a.id = %(agent_id)s FOR UPDATE
"""

# Claim, step 2: ready tasks this agent may run, in the scheduler's order. SKIP LOCKED makes concurrent
# claimers pass over rows another claimer holds instead of waiting for (and then double-taking) them. So a
# claim must lock no more rows than it can take (`limit` is its free slots, never more): a row it locked and
# left would be invisible to a concurrent claimer, who then parks with nothing left to wake it (the task's
# notification already spent on waking it) - a ready task beside an idle agent until its long poll ends.
# `ready_at` is compared with the statement's clock, not the transaction's: a task released after this
# transaction began (ready_at = its releaser's now()) is offerable to this statement. A workspace run's tasks
# go only to agents with git (it is in their executors when their pre-flight found it).
CANDIDATES = f"""
SELECT t.id, t.run_id, r.max_parallel
  FROM tasks_app_task t JOIN tasks_app_run r ON r.id = t.run_id
 WHERE t.state = 'ready'
   AND (t.ready_at IS NULL OR t.ready_at <= statement_timestamp())
   AND r.state = 'running'
   AND t.requires <@ %(labels)s::varchar[]
   AND t.executor = ANY(%(executors)s::varchar[])
   AND NOT (t.run_id = ANY(%(full_runs)s::uuid[]))
   AND NOT (t.id = ANY(%(chosen)s::uuid[]))
   AND (r.repo = '' OR %(has_git)s)
 ORDER BY {claim_order_sql("t")}
 LIMIT %(limit)s
   FOR UPDATE OF t SKIP LOCKED
"""

# Claim, step 3 (runs with max_parallel): the run row lock serialises claimers of one run, so two of them
# cannot both see "one slot left" and both take it.
LOCK_RUNS_LIVE = """
SELECT r.id, r.max_parallel,
       (SELECT count(*) FROM tasks_app_attempt x WHERE x.run_id = r.id AND x.state IN ('assigned', 'running'))
  FROM tasks_app_run r WHERE r.id = ANY(%(run_ids)s::uuid[]) ORDER BY r.id FOR UPDATE
"""

# Claim, step 3 (global limit): a transaction-scoped advisory lock plays the run lock's part for all runs.
LOCK_GLOBAL_LIVE = """
SELECT pg_advisory_xact_lock(7262001),
       (SELECT count(*) FROM tasks_app_attempt WHERE state IN ('assigned', 'running'))
"""

# Claim, step 4: assign the chosen tasks, create their attempts (leased from this moment, on the database's
# clock), write the audit events and queue the notification (sent on commit), in one statement. The partial
# unique index on live attempts is the last line of defence against a second live attempt of one task.
# Its rows are read by column name (assignments.build).
ASSIGN = """
WITH upd AS (
    UPDATE tasks_app_task
       SET state = 'assigned', attempts_used = attempts_used + 1, progress = 0, message = '',
           started_at = COALESCE(started_at, now())
     WHERE id = ANY(%(task_ids)s::uuid[]) AND state = 'ready'
 RETURNING id, run_id, key, title, executor, command, prompt, params, timeout_s, attempts_used,
           EXTRACT(EPOCH FROM now() - COALESCE(ready_at, created_at)) AS waited_s
), ins AS (
    INSERT INTO tasks_app_attempt
           (id, task_id, run_id, agent_id, number, state, lease_expires_at, progress, message, log, error,
            assigned_at)
    SELECT gen_random_uuid(), upd.id, upd.run_id, %(agent_id)s::uuid, upd.attempts_used, 'assigned',
           now() + make_interval(secs => %(lease_s)s), 0, '', '', '', now()
      FROM upd
 RETURNING id, task_id, lease_expires_at
), ev AS (
    INSERT INTO tasks_app_event (run_id, task_id, attempt_id, agent_id, kind, from_state, to_state, actor, detail,
                                 created_at)
    SELECT upd.run_id, upd.id, ins.id, %(agent_id)s::uuid, 'task', 'ready', 'assigned', %(actor)s, '{}'::jsonb, now()
      FROM upd JOIN ins ON ins.task_id = upd.id
)
SELECT ins.id AS attempt_id, ins.lease_expires_at, upd.id AS task_id, upd.run_id, upd.key, upd.title,
       upd.executor, upd.command, upd.prompt, upd.params, upd.timeout_s, upd.attempts_used,
       EXISTS (SELECT 1 FROM tasks_app_taskdependency d WHERE d.task_id = upd.id) AS has_deps, r.repo,
       r.base_commit, r.branch_prefix, r.params AS run_params, upd.waited_s
  FROM upd JOIN ins ON ins.task_id = upd.id JOIN tasks_app_run r ON r.id = upd.run_id,
       (SELECT pg_notify(%(channel)s, %(payload)s)) AS announce
"""

# What an assignment's dependencies hand down (PROTOCOL.md v1.1 `inputs` and `workspace.merge`): each one's
# output, commit, head commits and succeeded attempt's result. Only for assigned tasks that have deps. Each
# dependency is looked up by its primary key (the LATERAL subquery's OFFSET 0 keeps the planner from making
# it a join) and its result by attempt_one_success (at most one a task): as joins, the planner hashed every
# task of the table for a chain's one dependency when its statistics were older than the run (0.6 ms a hop
# at 3,000 tasks, growing with the table).
INPUTS_OF = """
SELECT d.task_id, u.key, u.depth, u.output, u.commit, u.head_commits,
       (SELECT a.result FROM tasks_app_attempt a WHERE a.task_id = u.id AND a.state = 'succeeded') AS result
  FROM tasks_app_taskdependency d
 CROSS JOIN LATERAL (SELECT t.id, t.key, t.depth, t.output, t.commit, t.head_commits
                       FROM tasks_app_task t WHERE t.id = d.depends_on_id OFFSET 0) u
 WHERE d.task_id = ANY(%(task_ids)s::uuid[])
"""
# The latest finished attempt of each assigned task whose params ask to resume its session on a retry
# (`resume_on_retry`): who ran it and its CLI session.
PREVIOUS_SESSIONS = """
SELECT DISTINCT ON (a.task_id) a.task_id, a.agent_id, a.session_id, g.name
  FROM tasks_app_attempt a LEFT JOIN agents_app_agent g ON g.id = a.agent_id
 WHERE a.task_id = ANY(%(task_ids)s::uuid[]) AND a.state NOT IN ('assigned', 'running')
 ORDER BY a.task_id, a.number DESC
"""
# The workspace each assignment was given, kept with its attempt (what a completion hands down without a
# commit of its own).
SET_ATTEMPT_WORKSPACES = """
UPDATE tasks_app_attempt a SET workspace = w.workspace
  FROM (SELECT unnest(%(ids)s::uuid[]) AS id, unnest(%(workspaces)s::jsonb[]) AS workspace) w
 WHERE a.id = w.id
"""

# A heartbeat, in one statement: the agent's reported status, the leases of the attempts it lists extended,
# and its live attempts it does not list - which it no longer runs (a daemon that restarted with its saved
# identity lists none), so they are lost at once instead of held for a whole lease. An attempt assigned less
# than `grace_s` ago is spared: its claim answer may still be on its way to the agent, and this heartbeat's
# list was taken before it arrived. Last, its attempts the server asked to stop (ASK_TO_STOP): an agent whose
# task sends no progress (a shell task) learns it here.
HEARTBEAT_LEASES = """
WITH status AS (
    UPDATE agents_app_agent SET reported_status = %(status)s WHERE id = %(agent_id)s
), extended AS (
    UPDATE tasks_app_attempt SET lease_expires_at = now() + make_interval(secs => %(lease_s)s)
     WHERE id = ANY(%(ids)s::uuid[]) AND agent_id = %(agent_id)s AND state IN ('assigned', 'running')
    RETURNING id
)
SELECT (SELECT array_agg(id) FROM extended),
       (SELECT array_agg(id ORDER BY id) FROM tasks_app_attempt
         WHERE agent_id = %(agent_id)s AND state IN ('assigned', 'running')
           AND NOT (id = ANY(%(ids)s::uuid[]))
           AND assigned_at <= now() - make_interval(secs => %(grace_s)s)),
       (SELECT array_agg(id) FROM tasks_app_attempt
         WHERE agent_id = %(agent_id)s AND state IN ('assigned', 'running') AND cancel_reason <> '')
"""

# An agent's call about one attempt: lock the attempt, then its task (the global lock order). Read by column
# name (actions._lock_attempt).
LOCK_ATTEMPT = """
SELECT a.id, a.state, a.agent_id, a.task_id, a.run_id, a.number, a.result, a.error, a.exit_code,
       t.state AS task_state, t.max_attempts, t.attempts_used, t.attempt_base, t.retry_delay_s, t.timeout_s,
       EXTRACT(EPOCH FROM (now() - COALESCE(a.started_at, a.assigned_at))) AS elapsed_s,
       EXISTS (SELECT 1 FROM tasks_app_taskdependency d WHERE d.depends_on_id = t.id) AS has_dependents,
       r.state AS run_state, r.max_parallel, t.executor, a.workspace, a.cancel_reason, r.max_cost_usd
  FROM tasks_app_attempt a JOIN tasks_app_task t ON t.id = a.task_id JOIN tasks_app_run r ON r.id = a.run_id
 WHERE a.id = %(attempt_id)s
   FOR UPDATE OF a, t
"""

# Ending an attempt: the SET list of its UPDATE, which runs in the same statement as its task's update
# (actions._end_attempt), with parameters prefixed a_. The agent's completion...
ATTEMPT_COMPLETED = """
state = %(a_state)s::varchar, result = %(a_result)s::jsonb, error = %(a_error)s, exit_code = %(a_exit_code)s,
commit = %(a_commit)s::jsonb,
finished_at = now(), started_at = COALESCE(started_at, now()),
progress = CASE WHEN %(a_state)s::varchar = 'succeeded' THEN 1 ELSE progress END
"""
# ... and the server's (lost, canceled).
ATTEMPT_ENDED = "state = %(a_state)s, error = %(a_error)s, finished_at = now()"
# What an AI attempt spent (PROTOCOL.md v1.1 `usage`, cumulative) and its CLI session, with progress and with
# the completion; a call without them leaves them as they are. Part of ATTEMPT_COMPLETED's SET list and of
# the progress update's.
ATTEMPT_USAGE = """
usage = COALESCE(%(a_usage)s::jsonb, usage), cost_usd = COALESCE(%(a_cost_usd)s, cost_usd),
session_id = COALESCE(%(a_session_id)s, session_id)
"""
ATTEMPT_COMPLETED += "," + ATTEMPT_USAGE

# Ending an attempt and applying that to its task, in one statement (actions._end_attempt): the attempt's SET
# list is ATTEMPT_COMPLETED's or ATTEMPT_ENDED's. A task going back to ready is offered again after `delay`;
# `returned` (an attempt that ended for a reason not its task's) gives the attempt back to the task's budget.
_END_ATTEMPT = """
WITH ended AS (UPDATE tasks_app_attempt SET {attempt_set} WHERE id = %(attempt_id)s)
UPDATE tasks_app_task
   SET state = %(state)s::varchar, attempt_base = attempt_base + %(returned)s::int,
       progress = CASE WHEN %(state)s::varchar = 'succeeded' THEN 1 WHEN %(state)s::varchar = 'ready' THEN 0
                       ELSE progress END,
       ready_at = CASE WHEN %(state)s::varchar = 'ready' THEN now() + make_interval(secs => %(delay)s)
                       ELSE ready_at END,
       finished_at = CASE WHEN %(state)s::varchar = 'ready' THEN NULL ELSE now() END,
       output = CASE WHEN %(handed)s THEN %(output)s ELSE output END,
       commit = CASE WHEN %(handed)s THEN %(commit)s::jsonb ELSE commit END,
       head_commits = CASE WHEN %(handed)s THEN %(heads)s::varchar[] ELSE head_commits END
 WHERE id = %(task_id)s
RETURNING executor, requires
"""
END_ATTEMPT_COMPLETED = _END_ATTEMPT.format(attempt_set=ATTEMPT_COMPLETED)
END_ATTEMPT_ENDED = _END_ATTEMPT.format(attempt_set=ATTEMPT_ENDED)

# An agent's progress report (after LOCK_ATTEMPT): the attempt is running, its lease extended from now, the
# log's tail kept to `keep` bytes; a value left out (None) stays as it was. Then its task's copy.
PROGRESS_ATTEMPT = f"""
UPDATE tasks_app_attempt
   SET state = 'running', started_at = COALESCE(started_at, now()),
       lease_expires_at = now() + make_interval(secs => %(lease_s)s),
       progress = COALESCE(%(progress)s, progress),
       message = COALESCE(%(message)s, message),
       log = CASE WHEN %(log)s::text IS NULL THEN log
                  ELSE right(log || %(log)s::text, %(keep)s) END,
       {ATTEMPT_USAGE}
 WHERE id = %(id)s
RETURNING lease_expires_at
"""
PROGRESS_TASK = """
UPDATE tasks_app_task SET state = 'running', progress = COALESCE(%(progress)s, progress),
       message = COALESCE(%(message)s, message)
 WHERE id = %(task_id)s
"""

# The notification of a transition (notify.Changes), sent on commit. Positional, like the EventLog INSERT it
# may follow in one statement (actions._commit).
NOTIFY = "SELECT pg_notify(%s, %s)"

# The audit trail's rows of one transaction (tasks_app.audit.EventLog), each column an array: one statement
# and nine parameters however many events.
INSERT_EVENTS = """
INSERT INTO tasks_app_event (run_id, task_id, attempt_id, agent_id, kind, from_state, to_state, actor, detail,
                             created_at)
SELECT run_id, task_id, attempt_id, agent_id, kind, from_state, to_state, actor, detail::jsonb, now()
  FROM unnest(%s::uuid[], %s::uuid[], %s::uuid[], %s::uuid[], %s::varchar[], %s::varchar[], %s::varchar[],
              %s::varchar[], %s::text[])
       AS e(run_id, task_id, attempt_id, agent_id, kind, from_state, to_state, actor, detail)
"""


# --- Costs and budgets (PROTOCOL.md v1.1 `max_cost_usd`; tasks_app.budgets). ---
# What a run has spent, with its cap and state.
RUN_COST = """
SELECT r.state, r.max_cost_usd, (SELECT COALESCE(sum(x.cost_usd), 0) FROM tasks_app_attempt x WHERE x.run_id = r.id)
  FROM tasks_app_run r WHERE r.id = %(run_id)s
"""
# What every run has spent since the start of the day (UTC): the global daily cap's measure. Walks
# attempt_costly_day_idx, which holds only attempts that cost something.
COST_TODAY = """
SELECT COALESCE(sum(cost_usd), 0) FROM tasks_app_attempt
 WHERE cost_usd > 0 AND assigned_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
"""
# A run paused by the server for its budget (after LOCK_RUN): why goes with it, for the run page.
PAUSE_RUN_FOR_BUDGET = "UPDATE tasks_app_run SET state = 'paused', pause_reason = %(reason)s WHERE id = %(run_id)s"
# Running runs the daily cap pauses, locked in id order (each alone, LOCK_RUN's place in the lock order).
RUNNING_RUNS = "SELECT id FROM tasks_app_run WHERE state = 'running' ORDER BY id"
# The live attempts of a run the server asks to stop: each is told with its next progress answer (and its
# next heartbeat), and its ending returns its task to ready without using up an attempt. Locked in id order.
ASK_TO_STOP = """
UPDATE tasks_app_attempt SET cancel_reason = %(reason)s
 WHERE id IN (SELECT id FROM tasks_app_attempt WHERE run_id = ANY(%(run_ids)s::uuid[])
                 AND state IN ('assigned', 'running') AND cancel_reason = '' ORDER BY id FOR UPDATE)
RETURNING id
"""
# --- Usage limits (PROTOCOL.md v1.1 outcome `rate_limited`) and lost logins, per agent and executor. ---
# The executor of the agent's own live attempt (nothing for any other attempt: its completion is then stale).
EXECUTOR_OF_LIVE_ATTEMPT = """
SELECT t.executor FROM tasks_app_attempt a JOIN tasks_app_task t ON t.id = a.task_id
 WHERE a.id = %(attempt_id)s AND a.agent_id = %(agent_id)s AND a.state IN ('assigned', 'running')
"""
# Hold an executor back on an agent until a time (its own transaction, before the completion: the agent row
# comes first in the lock order). A later hold of the same executor replaces the earlier one.
HOLD_EXECUTOR = """
UPDATE agents_app_agent
   SET executor_holds = executor_holds || jsonb_build_object(%(executor)s::text,
                                                             jsonb_build_object('until', %(until)s::text,
                                                                                'reason', %(reason)s::text))
 WHERE id = %(agent_id)s
"""
# An executor found not logged in on an agent: no longer offered there (as a failed pre-flight would have
# it) until its next pre-flight passes.
EXECUTOR_LOGGED_OUT = """
UPDATE agents_app_agent
   SET executors = array_remove(executors, %(executor)s::varchar),
       preflight = jsonb_set(preflight, ARRAY[%(executor)s::text],
                             COALESCE(preflight -> %(executor)s::text, '{}'::jsonb)
                             || jsonb_build_object('usable', false, 'detail', %(detail)s::text))
 WHERE id = %(agent_id)s
"""

# A workspace run's result task succeeded: its commit is the run's result (the merge of the DAG's sinks).
SET_RUN_RESULT = """
UPDATE tasks_app_run SET result_branch = %(branch)s, result_commit = %(sha)s WHERE id = %(run_id)s
"""

# A task's dependents and a task's dependencies, as arrays the task table is then read by (`id = ANY(...)`).
# Written as joins or IN, the planner chose their order from the statistics, and with none yet for the rows
# of a fresh submit (autoanalyze had seen the tables empty) it scanned every task for each dependent and again
# for each of its dependencies: one release took 18 s in a unit test. ARRAY(...) is not flattened into the
# query, so each lookup walks its index whatever the statistics say.
DEPENDENTS_OF = "ARRAY(SELECT task_id FROM tasks_app_taskdependency WHERE depends_on_id = {task})"
DEPENDENCIES_OF = "ARRAY(SELECT depends_on_id FROM tasks_app_taskdependency WHERE task_id = {task})"

# Dependents of a task, locked in id order: two upstream tasks finishing at once then take turns, and the
# second sees the first's success (READ COMMITTED re-reads after the wait), so no dependent stays blocked.
LOCK_DEPENDENTS = f"""
SELECT t.id FROM tasks_app_task t
 WHERE t.id = ANY({DEPENDENTS_OF.format(task="%(task_id)s")})
 ORDER BY t.id FOR UPDATE
"""

# Blocked dependents whose dependencies have all succeeded become ready (an approval task: awaiting
# approval, `ready_at` then the moment it began to wait, for its timeout).
RELEASE_DEPENDENTS = f"""
UPDATE tasks_app_task c SET state = CASE WHEN c.executor = 'approval' THEN 'awaiting_approval' ELSE 'ready' END,
       ready_at = now()
 WHERE c.id = ANY({DEPENDENTS_OF.format(task="%(task_id)s")})
   AND c.state = 'blocked'
   AND NOT EXISTS (SELECT 1 FROM tasks_app_task u
                    WHERE u.id = ANY({DEPENDENCIES_OF.format(task="c.id")}) AND u.state <> 'succeeded')
RETURNING c.id, c.executor, c.requires, c.state
"""

# Everything downstream of a task that failed for good (or was canceled) is skipped, after its own update.
# Which upstream states skip their dependents is the state machine's rule (states.dependents_state_after);
# the walk goes on through what it skips, as that rule skips a skipped task's dependents too.
STATES_THAT_SKIP_DEPENDENTS = tuple(s for s in TaskState.ALL if dependents_state_after(s) == TaskState.SKIPPED)
SKIP_DOWNSTREAM = f"""
WITH RECURSIVE down(id) AS (
    SELECT d.task_id FROM tasks_app_taskdependency d JOIN tasks_app_task u ON u.id = d.depends_on_id
     WHERE d.depends_on_id = %(task_id)s AND u.state IN ({", ".join(f"'{s}'" for s in STATES_THAT_SKIP_DEPENDENTS)})
    UNION
    SELECT d.task_id FROM tasks_app_taskdependency d JOIN down ON d.depends_on_id = down.id
)
UPDATE tasks_app_task t SET state = '{TaskState.SKIPPED}', finished_at = now()
 WHERE t.id IN (SELECT id FROM down) AND t.state = 'blocked'
RETURNING t.id
"""

# Retry every failed task of a run: their rows locked first, in id order, before each retry locks the run.
LOCK_RETRYABLE_TASKS = """
SELECT id FROM tasks_app_task WHERE run_id = %(run_id)s AND state IN ('failed', 'canceled') ORDER BY id FOR UPDATE
"""

# A retried task's skipped descendants wait again.
UNSKIP_DOWNSTREAM = """
WITH RECURSIVE down(id) AS (
    SELECT task_id FROM tasks_app_taskdependency WHERE depends_on_id = %(task_id)s
    UNION
    SELECT d.task_id FROM tasks_app_taskdependency d JOIN down ON d.depends_on_id = down.id
)
UPDATE tasks_app_task t SET state = 'blocked', finished_at = NULL
 WHERE t.id IN (SELECT id FROM down) AND t.state = 'skipped'
RETURNING t.id
"""

# Run end (actions.settle_run). Every change that can finish a run's last pending task looks for pending
# tasks after its commit, in a statement of its own: of several such changes committing at once, the last
# to commit then sees all the others' work, so some change always sees "nothing pending" - without making
# every completion of a run wait for one run row lock (that lock, held through each commit, capped a run's
# throughput). Only then is the run row locked, the check repeated, and the run ended, exactly once.
LOCK_RUN = "SELECT state FROM tasks_app_run WHERE id = %(run_id)s FOR UPDATE"
RUN_HAS_PENDING = """
SELECT EXISTS (SELECT 1 FROM tasks_app_task WHERE run_id = %(run_id)s
                  AND state IN ('blocked', 'ready', 'assigned', 'running', 'awaiting_approval'))
"""
RUN_TASK_STATES = "SELECT state, count(*) FROM tasks_app_task WHERE run_id = %(run_id)s GROUP BY state"
END_RUN = "UPDATE tasks_app_run SET state = %(state)s, finished_at = now() WHERE id = %(run_id)s"
# The sweeper's backstop, for a process that stopped between a commit and its settle_run.
UNSETTLED_RUNS = """
SELECT r.id FROM tasks_app_run r
 WHERE r.state IN ('running', 'paused')
   AND NOT EXISTS (SELECT 1 FROM tasks_app_task t WHERE t.run_id = r.id
                      AND t.state IN ('blocked', 'ready', 'assigned', 'running', 'awaiting_approval'))
"""

# --- Approvals (PROTOCOL.md v1.1): tasks held by the server until an operator decides. ---
# An approval task, locked, with what its decision needs: its run, whether it has dependents, how long it
# has waited and its timeout.
LOCK_APPROVAL = """
SELECT t.state, t.run_id, t.executor,
       EXISTS (SELECT 1 FROM tasks_app_taskdependency d WHERE d.depends_on_id = t.id)
  FROM tasks_app_task t WHERE t.id = %(task_id)s FOR UPDATE
"""
# What an approved task hands down: what its dependencies handed it (it changes nothing itself).
HEADS_OF_DEPENDENCIES = """
SELECT u.key, u.depth, u.head_commits FROM tasks_app_taskdependency d JOIN tasks_app_task u ON u.id = d.depends_on_id
 WHERE d.task_id = %(task_id)s
"""
DECIDE_APPROVAL = """
UPDATE tasks_app_task SET state = %(state)s, finished_at = now(), progress = 1, output = %(output)s,
       head_commits = %(heads)s::varchar[], message = %(message)s
 WHERE id = %(task_id)s
"""
# Approvals nobody answered within their timeout_s (counted from when they began to wait, ready_at).
EXPIRED_APPROVALS = """
SELECT id, timeout_s FROM tasks_app_task
 WHERE state = 'awaiting_approval' AND ready_at + make_interval(secs => timeout_s) < now()
 ORDER BY ready_at LIMIT 100
"""

# The best ready task of a run, to wake one waiting agent when a slot of that run frees up.
TOP_READY_OF_RUN = f"""
SELECT t.executor, t.requires FROM tasks_app_task t
 WHERE t.run_id = %(run_id)s AND t.state = 'ready'
 ORDER BY {claim_order_sql("t")} LIMIT %(limit)s
"""

# Sweep: live attempts whose lease ran out (the agent stopped reporting on them).
EXPIRED_ATTEMPTS = """
SELECT id FROM tasks_app_attempt
 WHERE state IN ('assigned', 'running') AND lease_expires_at < now()
 ORDER BY lease_expires_at LIMIT 500
   FOR UPDATE SKIP LOCKED
"""

# Sweep: agents silent for longer than the offline threshold (online -> offline, states.AGENT_TRANSITIONS;
# actions.sweep writes the Events). A contact committed meanwhile (TOUCH_AGENT) fails the re-checked WHERE.
SILENT_AGENTS = """
UPDATE agents_app_agent SET status = 'offline'
 WHERE status = 'online' AND last_seen_at < now() - make_interval(secs => %(offline_after_s)s)
RETURNING id, name
"""
LIVE_ATTEMPTS_OF_AGENT = """
SELECT id FROM tasks_app_attempt WHERE agent_id = %(agent_id)s AND state IN ('assigned', 'running') ORDER BY id
"""

# The sweep clock (see SweepClock): may anything expire now? Also records that a server process is alive.
SWEEP_CLOCK_TICK = """
INSERT INTO tasks_app_sweepclock (id, server_alive_at, expiry_not_before) VALUES (1, now(), now())
ON CONFLICT (id) DO UPDATE SET
    -- After a gap with no server alive, agents could not reach us: give them one lease length.
    expiry_not_before = CASE
        WHEN tasks_app_sweepclock.server_alive_at < now() - make_interval(secs => %(gap_s)s)
        THEN now() + make_interval(secs => %(lease_s)s)
        ELSE tasks_app_sweepclock.expiry_not_before END,
    server_alive_at = now()
RETURNING expiry_not_before <= now()
"""
# The first start on a database no server has swept yet (a new one, or one upgraded to the sweep clock) is
# after a downtime only if online agents have gone unheard for a gap: on a new database the agents are
# those just registering (the hub starts with the first request), and a lease of no expiry would only
# leave the first agents to die unnoticed for a minute.
SERVER_START = """
INSERT INTO tasks_app_sweepclock (id, server_alive_at, expiry_not_before)
VALUES (1, now(), CASE WHEN EXISTS (SELECT 1 FROM agents_app_agent WHERE status = 'online'
                                       AND last_seen_at < now() - make_interval(secs => %(gap_s)s))
                       THEN now() + make_interval(secs => %(lease_s)s) ELSE now() END)
ON CONFLICT (id) DO UPDATE SET
    expiry_not_before = CASE
        WHEN tasks_app_sweepclock.server_alive_at IS NULL
          OR tasks_app_sweepclock.server_alive_at < now() - make_interval(secs => %(gap_s)s)
        THEN now() + make_interval(secs => %(lease_s)s)
        ELSE tasks_app_sweepclock.expiry_not_before END,
    server_alive_at = now()
"""
EXPIRY_ALLOWED = """
SELECT COALESCE((SELECT expiry_not_before <= now()
                        AND server_alive_at >= now() - make_interval(secs => %(gap_s)s)
                   FROM tasks_app_sweepclock WHERE id = 1), false)
"""

# Retry delays: ready tasks not yet offerable, with how long until they are.
DELAYED_READY = """
SELECT executor, requires, EXTRACT(EPOCH FROM (ready_at - now())) FROM tasks_app_task
 WHERE state = 'ready' AND ready_at > now()
"""

# --- Operators (actions: pause, resume, cancel, retry), each after LOCK_RUN or its task's lock. ---
# Pause, resume or cancel: a run that ends (canceled) has finished now; one that goes on has not finished.
SET_RUN_STATE = """
UPDATE tasks_app_run SET state = %(state)s::varchar, pause_reason = '',
       finished_at = CASE WHEN %(state)s::varchar IN ('succeeded', 'failed', 'canceled') THEN now() ELSE NULL END
 WHERE id = %(run_id)s
"""
SET_RUN_BUDGET = "UPDATE tasks_app_run SET max_cost_usd = %(max_cost_usd)s WHERE id = %(run_id)s"
# Cancel, after the run's own transaction: its pending tasks locked in id order (a claim in flight holds its
# tasks' locks; we wait for it, and its attempts are canceled with the rest), then canceled.
LOCK_PENDING_TASKS_OF_RUN = """
SELECT id, state FROM tasks_app_task
 WHERE run_id = %(run_id)s AND state IN ('blocked', 'ready', 'awaiting_approval') ORDER BY id
   FOR UPDATE
"""
CANCEL_TASKS = "UPDATE tasks_app_task SET state = 'canceled', finished_at = now() WHERE id = ANY(%(task_ids)s::uuid[])"
# Its live attempts, each then locked alone (LOCK_ATTEMPT) and canceled.
LIVE_ATTEMPTS_OF_RUN = """
SELECT id FROM tasks_app_attempt WHERE run_id = %(run_id)s AND state IN ('assigned', 'running') ORDER BY id
"""
# An operator's retry: the task locked first (then its run, the lock order), with what its retry needs.
LOCK_TASK = "SELECT state, run_id, executor, requires FROM tasks_app_task WHERE id = %(task_id)s FOR UPDATE"
# A fresh budget of attempts: those used so far no longer count against max_attempts.
RETRY_TASK = """
UPDATE tasks_app_task SET state = %(state)s, ready_at = now(), finished_at = NULL, progress = 0,
       attempt_base = attempts_used
 WHERE id = %(task_id)s
"""
REOPEN_RUN = "UPDATE tasks_app_run SET state = 'running', finished_at = NULL WHERE id = %(run_id)s"

# --- Reading the limits back (tasks_app.dashboard.waiting): why a ready task waits, and what nothing holds back. ---
# None of these lock: they describe, the claim decides.
RUN_LIMITS = """
SELECT r.id, r.state, r.max_parallel, r.repo <> '',
       (SELECT count(*) FROM tasks_app_attempt x WHERE x.run_id = r.id AND x.state IN ('assigned', 'running'))
  FROM tasks_app_run r WHERE r.id = ANY(%(run_ids)s::uuid[])
"""
GLOBAL_LIVE = "SELECT count(*) FROM tasks_app_attempt WHERE state IN ('assigned', 'running')"
# Current agents with what they may take: online (status) and taking work (enabled, not draining/stopping).
CURRENT_AGENTS_LOAD = """
SELECT a.labels, a.executors, a.capacity, a.status = 'online' AND a.enabled,
       a.enabled AND NOT a.draining AND NOT a.shutdown_requested,
       (SELECT count(*) FROM tasks_app_attempt x WHERE x.agent_id = a.id AND x.state IN ('assigned', 'running')),
       a.executor_holds
  FROM agents_app_agent a WHERE a.retired_at IS NULL
"""
# Kinds of ready tasks offerable for at least `min_age_s` within their run's max_parallel and the global
# limit. A parked agent matching one of them missed its wake-up (EventHub.wake_missed): each wake-up takes
# milliseconds, so anything older was not announced to it. Runs first, so the live count is taken per run,
# not per task.
OFFERABLE_READY_KINDS = """
WITH open_runs AS (
    SELECT r.id FROM tasks_app_run r
     WHERE r.state = 'running'
       AND (r.max_parallel IS NULL
            OR r.max_parallel > (SELECT count(*) FROM tasks_app_attempt x
                                  WHERE x.run_id = r.id AND x.state IN ('assigned', 'running')))
)
SELECT DISTINCT t.executor, t.requires
  FROM tasks_app_task t JOIN open_runs ON open_runs.id = t.run_id
 WHERE t.state = 'ready'
   AND COALESCE(t.ready_at, t.created_at) <= clock_timestamp() - make_interval(secs => %(min_age_s)s)
   AND (%(global_limit)s = 0
        OR %(global_limit)s > (SELECT count(*) FROM tasks_app_attempt WHERE state IN ('assigned', 'running')))
 LIMIT 50
"""

# --- What AI attempts spent, summed for people (tasks_app.costs). None of these lock. ---
_USAGE_SUMS = """
sum(x.cost_usd), sum((x.usage ->> 'input_tokens')::bigint), sum((x.usage ->> 'output_tokens')::bigint),
sum((x.usage ->> 'cache_read_tokens')::bigint), sum((x.usage ->> 'cache_write_tokens')::bigint),
sum((x.usage ->> 'reasoning_tokens')::bigint), COALESCE(bool_or((x.usage ->> 'cost_estimated')::boolean), false)
"""
# Per task of a run: the sums, the latest attempt's model and session.
USAGE_BY_TASK = f"""
SELECT x.task_id, {_USAGE_SUMS},
       (array_agg(x.usage ->> 'model' ORDER BY x.number DESC))[1],
       COALESCE((array_agg(x.session_id ORDER BY x.number DESC) FILTER (WHERE x.session_id <> ''))[1], '')
  FROM tasks_app_attempt x WHERE x.run_id = %(run_id)s AND x.usage IS NOT NULL GROUP BY x.task_id
"""
# Per run, for lists of runs.
COST_BY_RUN = """
SELECT x.run_id, sum(x.cost_usd) FROM tasks_app_attempt x
 WHERE x.run_id = ANY(%(run_ids)s::uuid[]) AND x.cost_usd > 0 GROUP BY x.run_id
"""
# Per agent: today (UTC) and in all.
COST_BY_AGENT = """
SELECT x.agent_id, sum(x.cost_usd),
       sum(x.cost_usd) FILTER (WHERE x.assigned_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC')
  FROM tasks_app_attempt x WHERE x.cost_usd > 0 AND x.agent_id IS NOT NULL GROUP BY x.agent_id
"""
# Per day (UTC) of the last `days`, and per workflow over the same days.
COST_BY_DAY = """
SELECT (x.assigned_at AT TIME ZONE 'UTC')::date, sum(x.cost_usd), count(*) FROM tasks_app_attempt x
 WHERE x.cost_usd > 0 AND x.assigned_at >= now() - make_interval(days => %(days)s) GROUP BY 1 ORDER BY 1
"""
COST_BY_WORKFLOW = """
SELECT COALESCE(w.name, r.name), sum(x.cost_usd) FROM tasks_app_attempt x
  JOIN tasks_app_run r ON r.id = x.run_id LEFT JOIN tasks_app_workflow w ON w.id = r.workflow_id
 WHERE x.cost_usd > 0 AND x.assigned_at >= now() - make_interval(days => %(days)s) GROUP BY 1 ORDER BY 2 DESC
"""

# --- Input requests (PROTOCOL.md v1.1): an agent waiting for a person. None of the reads lock. ---
CREATE_INPUT_REQUEST = """
INSERT INTO tasks_app_inputrequest (id, attempt_id, task_id, run_id, kind, tool, input, question, state,
                                    answered_by, created_at, expires_at)
VALUES (gen_random_uuid(), %(attempt_id)s, %(task_id)s, %(run_id)s, %(kind)s, %(tool)s, %(input)s::jsonb,
        %(question)s, 'pending', '', now(), now() + make_interval(secs => %(timeout_s)s))
RETURNING id
"""
# What the waiting agent learns: the request's state and answer, and whether it is still its own live one.
INPUT_REQUEST_OF_AGENT = """
SELECT i.state, i.answer, i.expires_at <= now(), a.agent_id, a.state
  FROM tasks_app_inputrequest i JOIN tasks_app_attempt a ON a.id = i.attempt_id WHERE i.id = %(request_id)s
"""
# An answer: the request locked alone (nothing else is locked after it), with its attempt's liveness.
LOCK_INPUT_REQUEST = """
SELECT i.state, i.run_id, i.task_id, i.attempt_id, i.tool, a.state IN ('assigned', 'running')
  FROM tasks_app_inputrequest i JOIN tasks_app_attempt a ON a.id = i.attempt_id
 WHERE i.id = %(request_id)s FOR UPDATE OF i
"""
ANSWER_INPUT_REQUEST = """
UPDATE tasks_app_inputrequest SET state = 'answered', answer = %(answer)s::jsonb, answered_by = %(by)s,
       answered_at = now()
 WHERE id = %(request_id)s
"""
# A request whose attempt ended unanswered is moot.
EXPIRE_INPUT_REQUEST = "UPDATE tasks_app_inputrequest SET state = 'expired' WHERE id = %(request_id)s"
# Pending requests past their time (the sweeper answers them deny), or whose attempt ended (moot).
OVERDUE_INPUT_REQUESTS = """
SELECT i.id FROM tasks_app_inputrequest i JOIN tasks_app_attempt a ON a.id = i.attempt_id
 WHERE i.state = 'pending' AND (i.expires_at <= now() OR a.state NOT IN ('assigned', 'running'))
 ORDER BY i.created_at LIMIT 100
"""
