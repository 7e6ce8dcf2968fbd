"""What the dashboard and the terminal monitor show, read in a bounded number of queries whatever the size
of a run: runs with counts and ETAs, the fleet, active attempts, recently completed, the queue, the DAG and
the timeline. Plain dicts and lists, so the web pages and the `monitor` command share them."""

from __future__ import annotations

import json
from collections import defaultdict
from datetime import UTC, timedelta

from django.db import connection
from django.db.models import Count, F, Q, Window
from django.utils import timezone

from agents_app import preflight
from agents_app.models import Agent, AgentStatus

from .. import costs
from ..models import Attempt, InputRequest, Run, Task, TaskDependency, claim_order_expressions
from ..states import AttemptState, RunState, TaskState
from . import waiting
from .dagsvg import natural_key

# The scheduler's order (tasks_app.queries.CLAIM_ORDER), for showing the queue as it will be served.
QUEUE_ORDER = claim_order_expressions()
# How the errors of attempts that did not count begin (tasks_app.actions: the task was returned to ready
# without using up an attempt), and how the reason of a run the server paused for its budget begins.
RETURNED_CODES = ("rate_limited", "not_logged_in", "budget_exceeded")
BUDGET_EXCEEDED = "budget_exceeded"
# Tasks that wait for an agent: a run's ETA is unknown while no online agent can run one of them.
WAITS = (TaskState.BLOCKED, TaskState.READY)


def _fraction(counts: dict, progress_sum: float) -> float:
    """How far the run got: its succeeded tasks and the live tasks' progress, over all its tasks. A failed,
    canceled or skipped task is not progress, so a failed run never reads 100%."""
    total = sum(counts.values())
    if not total:
        return 0.0
    return min(1.0, (counts.get(TaskState.SUCCEEDED, 0) + progress_sum) / total)


# The run bar's segments, left to right: what succeeded, how far live tasks are, then what ended otherwise.
BAR_SEGMENTS = (TaskState.SUCCEEDED, "progress", TaskState.FAILED, TaskState.CANCELED, TaskState.SKIPPED)


def _bar_segments(counts: dict, progress_sum: float) -> list[dict]:
    """The run bar as its states' shares (percent of all tasks), each with a word for the tooltip: a failed
    run shows its succeeded, failed and skipped parts rather than one full bar."""
    total = sum(counts.values())
    if not total:
        return []
    sizes = {s: counts.get(s, 0) for s in BAR_SEGMENTS if s != "progress"}
    sizes["progress"] = progress_sum
    return [
        {"state": s, "share": round(100 * sizes[s] / total, 2), "n": sizes[s]} for s in BAR_SEGMENTS if sizes[s] > 0
    ]


def run_summaries(
    run_ids=None, limit: int = 50, state: str | None = None, workflow: str | None = None,
    search: str | None = None, offset: int = 0,
) -> list[dict]:  # fmt: skip
    """Runs (newest first; `search`: a part of the name, any case; from the `offset`-th) with counts by state,
    progress, start, end and ETA: two queries in all."""
    # Only the fields shown: a run's document (its tasks as submitted) is ~1 MB of JSON at 10,000 tasks, and
    # parsing it took most of the run page's time.
    runs = (
        Run.objects.select_related("workflow")
        .only(
            "id",
            "name",
            "state",
            "workflow__name",
            "rerun_of",
            "created_at",
            "finished_at",
            "max_cost_usd",
            "pause_reason",
        )  # fmt: skip
        .order_by("-created_at", "-id")
    )
    if workflow is not None:
        runs = runs.filter(workflow__name=workflow)
    if run_ids is not None:
        runs = runs.filter(pk__in=run_ids)
    if state is not None:
        runs = runs.filter(state=state)
    if search:
        runs = runs.filter(name__icontains=search)
    runs = list(runs[offset : offset + limit])
    figures = _run_figures([r.id for r in runs])
    out = []
    for r in runs:
        f = figures.get(r.id, {"counts": {}, "progress": 0.0, "eta": None})
        out.append(
            {
                "id": r.id,
                "name": r.name,
                "state": r.state,
                "workflow": r.workflow.name if r.workflow is not None else None,
                "rerun_of": r.rerun_of_id,
                "created_at": r.created_at,
                "finished_at": r.finished_at,
                "counts": {s: f["counts"].get(s, 0) for s in TaskState.ALL},
                "total": sum(f["counts"].values()),
                "fraction": _fraction(f["counts"], f["progress"]),
                "segments": _bar_segments(f["counts"], f["progress"]),
                "eta": f["eta"] if r.state in RunState.ACTIVE else None,
                "eta_unknown": f.get("eta_unknown", "") if r.state in RunState.ACTIVE else "",
                "max_cost_usd": r.max_cost_usd,
                "pause_reason": r.pause_reason,
                # Paused by the server for a budget (tasks_app.actions.enforce_budgets): the page says why.
                "budget_paused": r.state == RunState.PAUSED and r.pause_reason.startswith(BUDGET_EXCEEDED),
                "daily_cap": "CP_DAILY_MAX_COST_USD" in r.pause_reason,
                "pause_why": r.pause_reason.removeprefix(BUDGET_EXCEEDED).lstrip(": "),
            }
        )
    return out


def with_costs(runs: list[dict]) -> list[dict]:
    """The runs of run_summaries() with what each cost so far as `cost_usd` (0 for none): one query."""
    spent = costs.by_run([r["id"] for r in runs])
    for r in runs:
        r["cost_usd"] = spent.get(r["id"], 0.0)
    return runs


def _run_figures(run_ids) -> dict:
    """Per run, in one pass over its tasks (one query: the live dashboard asks several times a second):
    counts by state, the progress of live tasks (a task's progress is its live attempt's), and the ETA: the
    longest remaining critical path by estimates, scaled by how actual durations compared with estimates so
    far in that run. A task has at most one succeeded attempt (the database enforces it), so the join adds
    no rows to count."""
    if not run_ids:
        return {}
    counts = ", ".join("count(*) FILTER (WHERE t.state = %s)" for _ in TaskState.ALL)
    with connection.cursor() as cur:
        cur.execute(
            f"""
            SELECT t.run_id, {counts},
                   coalesce(sum(t.progress) FILTER (WHERE t.state = ANY(%s)), 0),
                   max(t.critical_path_s * (1 - t.progress)) FILTER (WHERE t.state = ANY(%s)),
                   sum(EXTRACT(EPOCH FROM (a.finished_at - a.started_at))),
                   sum(t.estimate_s) FILTER (WHERE a.id IS NOT NULL),
                   jsonb_agg(DISTINCT jsonb_build_array(t.executor, t.requires)) FILTER (WHERE t.state = ANY(%s)),
                   ({waiting.ONLINE_AGENT_KINDS})
              FROM tasks_app_task t
              LEFT JOIN tasks_app_attempt a ON a.task_id = t.id AND a.state = 'succeeded'
             WHERE t.run_id = ANY(%s::uuid[])
             GROUP BY t.run_id
            """,
            [*TaskState.ALL, list(TaskState.LIVE), list(TaskState.PENDING), list(WAITS), list(run_ids)],
        )
        rows = cur.fetchall()
    now = timezone.now()
    out = {}
    n = len(TaskState.ALL)
    for run_id, *values in rows:
        progress, remaining, actual, estimated, kinds, agents = values[n:]
        # Unknown, not "in 0.0s", while a task waits for an agent nothing online can stand in for.
        eta, unknown = None, waiting.eta_unknown(kinds, agents)
        if remaining is not None and not unknown:
            # EXTRACT(EPOCH ...) comes back as Decimal, estimates as float.
            ratio = (float(actual) / float(estimated)) if actual and estimated else 1.0
            eta = now + timedelta(seconds=float(remaining) * ratio)
        out[run_id] = {
            "counts": {s: c for s, c in zip(TaskState.ALL, values[:n], strict=True) if c},
            "progress": float(progress),
            "eta": eta,
            "eta_unknown": unknown,
        }
    return out


def fleet_summary() -> dict:
    """Agents online / busy / offline / draining / disabled (one query)."""
    busy_ids = Attempt.objects.filter(state__in=AttemptState.LIVE).values("agent_id")
    live = Q(retired_at__isnull=True)
    row = Agent.objects.filter(live).aggregate(
        online=Count("id", filter=Q(status=AgentStatus.ONLINE, enabled=True)),
        busy=Count("id", filter=Q(status=AgentStatus.ONLINE, pk__in=busy_ids)),
        offline=Count("id", filter=Q(status=AgentStatus.OFFLINE)),
        draining=Count("id", filter=Q(draining=True)),
        disabled=Count("id", filter=Q(enabled=False)),
        total=Count("id"),
    )
    row["idle"] = max(0, row["online"] - row["busy"])
    return row


def _attempt_rows(qs, *extra: str) -> list[dict]:
    now = timezone.now()
    rows = []
    for a in qs.values(
        "id", "state", "progress", "message", "assigned_at", "started_at", "finished_at", "number", "error",
        "cost_usd", "agent__name", "agent_id", "task_id", "task__key", "task__title", "task__estimate_s", "run_id",
        "run__name", *extra,
    ):  # fmt: skip
        start = a["started_at"] or a["assigned_at"]
        end = a["finished_at"] or now
        a["elapsed_s"] = max(0.0, (end - start).total_seconds()) if start else 0.0
        rows.append(a)
    return rows


def active_attempts(run_id=None, limit: int = 200) -> list[dict]:
    qs = Attempt.objects.filter(state__in=AttemptState.LIVE)
    if run_id is not None:
        qs = qs.filter(run_id=run_id)
    return _attempt_rows(qs.order_by("assigned_at")[:limit])


def recently_completed(run_id=None, limit: int = 10) -> list[dict]:
    qs = Attempt.objects.filter(state__in=AttemptState.TERMINAL, finished_at__isnull=False)
    if run_id is not None:
        qs = qs.filter(run_id=run_id)
    return _attempt_rows(qs.order_by("-finished_at")[:limit])


def queue(run_id=None, limit: int = 20) -> list[dict]:
    """Ready tasks in the order the scheduler will hand them out (paused runs' tasks are left out), each
    with why it is not assigned yet (`waiting`: tasks_app.dashboard.waiting)."""
    qs = Task.objects.filter(state=TaskState.READY, run__state=RunState.RUNNING)
    if run_id is not None:
        qs = qs.filter(run_id=run_id)
    rows = list(
        qs.order_by(*QUEUE_ORDER).values(
            "id", "key", "title", "state", "priority", "critical_path_s", "requires", "executor", "ready_at",
            "run_id", "run__name", "attempts_used",
        )[:limit]
    )  # fmt: skip
    why = waiting.reasons(rows)
    for row in rows:
        row["waiting"] = why.get(row["id"])
    return rows


def waiting_for_people(limit: int = 50) -> list[dict]:
    """What waits for a person, in every run: tasks awaiting approval, then agents' pending input requests
    (only those whose attempt is still live), longest waiting first (two queries)."""
    approvals = [
        {**t, "what": "approval", "since": t["ready_at"]}
        for t in Task.objects.filter(state=TaskState.AWAITING_APPROVAL)
        .order_by("ready_at", "id")
        .values("id", "key", "prompt", "ready_at", "timeout_s", "run_id", "run__name")[:limit]
    ]
    return approvals + input_requests(limit=limit)


def input_requests(task_id=None, limit: int = 50) -> list[dict]:
    """Pending input requests of live attempts (of one task, or of all), oldest first."""
    qs = InputRequest.objects.filter(state=InputRequest.PENDING, attempt__state__in=AttemptState.LIVE)
    if task_id is not None:
        qs = qs.filter(task_id=task_id)
    rows = qs.order_by("created_at").values(
        "id", "kind", "tool", "input", "question", "created_at", "expires_at", "task_id", "task__key", "run_id",
        "run__name", "attempt__agent__name",
    )[:limit]  # fmt: skip
    return [{**r, "what": "input", "since": r["created_at"], "shown": shown_input(r["tool"], r["input"])} for r in rows]


def shown_input(tool: str, tool_input) -> str:
    """A tool call's input as a person reads it: a Bash command as its command, a file tool as its path and
    content, anything else as JSON. Plain text: the template escapes it."""
    if not isinstance(tool_input, dict):
        return str(tool_input)
    if tool == "Bash" and isinstance(tool_input.get("command"), str):
        return tool_input["command"]
    return json.dumps(tool_input, indent=2, ensure_ascii=False)[:20_000]


def agents_table() -> list[dict]:
    """Every current agent with its live attempts (two queries)."""
    agents = list(
        Agent.objects.filter(retired_at__isnull=True).order_by("name").values(
            "id", "name", "labels", "executors", "executor_versions", "capacity", "hostname", "version", "status",
            "reported_status", "enabled", "draining", "last_seen_at", "preflight", "preflight_at", "executor_holds",
            # Set when the agent enrolled with a token a host operation wrote: we provisioned it there.
            provisioned_host=F("enrollment_token__host_operation__host__name"),
        )
    )  # fmt: skip
    live: dict = defaultdict(list)
    for a in Attempt.objects.filter(state__in=AttemptState.LIVE).values(
        "id", "agent_id", "progress", "message", "task_id", "task__key", "run_id"
    ):
        live[a["agent_id"]].append(a)
    now = timezone.now()
    for agent in agents:
        agent["attempts"] = live.get(agent["id"], [])
        seen = agent["last_seen_at"]
        agent["heartbeat_age_s"] = (now - seen).total_seconds() if seen else None
        agent["display_status"] = display_status(agent)
        agent["executor_list"] = preflight.executor_rows(
            agent["executors"], agent["executor_versions"] or {}, agent["preflight"] or {}
        )
        agent["holds"] = executor_holds(agent["executor_holds"] or {}, now)
    return agents


def executor_holds(holds: dict, now) -> list[dict]:
    """The executors an agent may not run yet (a provider's usage limit: tasks_app.dashboard.waiting), each with when
    that ends, for people ("15:00 UTC"), and the agent's reason; holds that have ended are left out."""
    out = []
    for executor in sorted(holds):
        until = waiting.held_until(holds, executor, now)
        if until is not None:
            reason = str((holds[executor] or {}).get("reason") or "")
            out.append({"executor": executor, "until": until, "clock": waiting.clock(until, now), "reason": reason})
    return out


def with_agent_costs(agents: list[dict]) -> list[dict]:
    """The agents of agents_table() with what their attempts cost, today (UTC) and in all: one query."""
    spent = costs.by_agent()
    for agent in agents:
        agent["cost"] = spent.get(agent["id"], {"total": 0.0, "today": 0.0})
    return agents


# --- What AI attempts cost (issue 10): the overview's spend panel and the run page's ---------------------

SPEND_DAYS = 14
SPEND_WORKFLOWS = 5
CHART_BAR_W, CHART_GAP, CHART_H = 14, 4, 48  # the spend chart's bars, in SVG user units


def spend_summary(days: int = SPEND_DAYS) -> dict:
    """Today's cost (UTC), the last `days` days as bars for a small chart (oldest first, today last, days
    without cost included) and the dearest workflows over those days: two queries."""
    per_day = {d: (cost, n) for d, cost, n in costs.by_day(days)}
    today = timezone.now().astimezone(UTC).date()
    dates = [today - timedelta(days=i) for i in range(days - 1, -1, -1)]
    peak = max((per_day.get(d, (0.0, 0))[0] for d in dates), default=0.0)
    bars = []
    for i, d in enumerate(dates):
        cost, n = per_day.get(d, (0.0, 0))
        # A day that cost something is at least 2 units tall, so it never looks like a day that cost nothing.
        h = round(max(2.0, CHART_H * cost / peak), 1) if cost and peak else 0.0
        bars.append({"date": d, "cost": cost, "attempts": n, "x": i * (CHART_BAR_W + CHART_GAP),
                     "y": round(CHART_H - h, 1), "h": h, "today": d == today})  # fmt: skip
    total = sum(b["cost"] for b in bars)
    workflows = [
        {"name": name, "cost": cost, "share": cost / total if total else 0.0}
        for name, cost in costs.by_workflow(days)[:SPEND_WORKFLOWS]
    ]
    return {
        "days": days,
        "today": per_day.get(today, (0.0, 0))[0],
        "total": total,
        "peak": peak,
        "bars": bars,
        "workflows": workflows,
        "chart_w": days * (CHART_BAR_W + CHART_GAP) - CHART_GAP,
        "chart_h": CHART_H,
        "bar_w": CHART_BAR_W,
    }


RUN_SPEND_TASKS = 20  # the dearest tasks the run page lists


def run_spend(run: dict) -> dict:
    """What a run's AI attempts cost: its usage summed (tokens by kind, cost, whether any figure is an
    estimate), the budget and how much of it is spent, and its dearest tasks with their model, tokens and
    latest CLI session. Two queries (one for a run without AI usage)."""
    per_task = costs.by_task(run["id"])
    usage = costs.total(per_task)
    keys = dict(Task.objects.filter(pk__in=list(per_task)).values_list("id", "key")) if per_task else {}
    tasks = sorted(
        ({"id": task_id, "key": keys.get(task_id, "?"), "usage": entry["usage"], "session_id": entry["session_id"]}
         for task_id, entry in per_task.items()),
        key=lambda t: (-t["usage"]["cost_usd"], t["key"]),
    )  # fmt: skip
    budget = run["max_cost_usd"]
    return {
        "usage": usage,
        "cost": usage["cost_usd"],
        "budget": budget,
        "fraction": (usage["cost_usd"] / budget) if budget else None,
        "over": budget is not None and usage["cost_usd"] >= budget,
        "tasks": tasks[:RUN_SPEND_TASKS],
        "more_tasks": max(0, len(tasks) - RUN_SPEND_TASKS),
        "any": bool(per_task) or budget is not None,
    }


def display_status(agent: dict) -> str:
    """One word for people: disabled, offline, draining, busy or idle."""
    if not agent["enabled"]:
        return "disabled"
    if agent["status"] != AgentStatus.ONLINE:
        return "offline"
    if agent["draining"]:
        return "draining"
    return "busy" if agent.get("attempts") else "idle"


def run_tasks(run_id, state: str | None = None, search: str | None = None) -> list[dict]:
    """A run's task list (of one state, and/or whose key contains `search`, any case) in natural key order
    (impl-2 before impl-10), each with its attempts, its latest attempt's agent and how long that attempt
    ran (runs: so far). Two queries whatever the number of tasks."""
    tasks = Task.objects.filter(run_id=run_id)
    if state is not None:
        tasks = tasks.filter(state=state)
    if search:
        tasks = tasks.filter(key__icontains=search)
    rows = list(tasks.values("id", "key", "title", "state", "executor", "attempts_used", "max_attempts", "progress"))
    latest: dict = {}
    if rows:
        attempts = Attempt.objects.filter(run_id=run_id).order_by("task_id", "number")
        if state is not None or search:
            attempts = attempts.filter(task_id__in=[r["id"] for r in rows])
        fields = ("task_id", "number", "state", "agent__name", "assigned_at", "started_at", "finished_at")
        for a in attempts.values(*fields):
            latest[a["task_id"]] = a  # ordered by number: the last one wins
    now = timezone.now()
    for row in rows:
        a = latest.get(row["id"])
        row["attempt"] = a
        row["agent"] = a["agent__name"] if a else None
        start = a and (a["started_at"] or a["assigned_at"])
        row["duration_s"] = max(0.0, ((a["finished_at"] or now) - start).total_seconds()) if start else None
    rows.sort(key=lambda r: natural_key(r["key"]))
    return rows


def run_graph(run_id) -> tuple[list[dict], list[tuple]]:
    """The run's tasks (for the DAG picture) and its edges (upstream id, downstream id): two queries."""
    tasks = list(
        Task.objects.filter(run_id=run_id)
        .order_by("depth", "key")
        .values("id", "key", "title", "state", "depth", "progress", "estimate_s", "critical_path_s", "commit")
    )
    edges = list(TaskDependency.objects.filter(task__run_id=run_id).values_list("depends_on_id", "task_id"))
    return tasks, edges


def task_states(run_id, commits: bool = False) -> list[dict]:
    """Each task's key, state and progress: what a live update of the DAG picture needs (one query; no ids:
    parsing 10,000 UUIDs costs more than the rest of the rows); `commits` adds each task's commit (a workspace
    run's diffstat, drawn in the normal style only)."""
    fields = ("key", "state", "progress") + (("commit",) if commits else ())
    return list(Task.objects.filter(run_id=run_id).values(*fields))


def task_id_by_key(run_id, key: str):
    """The id of the run's task with that key, or None (keys are unique in a run)."""
    return Task.objects.filter(run_id=run_id, key=key).values_list("id", flat=True).first()


def timeline(run_id, limit: int | None = None) -> tuple[list[dict], int]:
    """The run's attempts with their agent, times and the task's estimate (the Gantt chart), and how many the
    run has: every one, or the `limit` assigned last (one query either way: the total is a window count)."""
    qs = Attempt.objects.filter(run_id=run_id).annotate(total=Window(Count("id")))
    rows = _attempt_rows(qs.order_by("-assigned_at", "-id")[:limit] if limit else qs, "total")
    return rows, (rows[0]["total"] if rows else 0)


# --- The code a workspace run wrote (issue 9) -------------------------------------------------------------


def run_code(run_id) -> dict | None:
    """A workspace run's repository, base, result and parameters, each task's commit with its diffstat, and
    the overlaps: files changed by tasks that ran in parallel (neither upstream of the other), which git may
    have merged cleanly or not at all. Only the parameters for a run with no workspace; None for a run with
    neither. Three queries at most."""
    run = Run.objects.filter(pk=run_id).values("repo", "base_ref", "base_commit", "result_branch",
                                               "result_commit", "params").first()  # fmt: skip
    if run is None or not (run["repo"] or run["params"]):
        return None
    if not run["repo"]:  # parameters only: nothing else to show
        return {**run, "tasks": [], "overlaps": []}
    tasks = list(
        Task.objects.filter(run_id=run_id, commit__isnull=False).order_by("depth", "key").values("id", "key", "commit")
    )
    changed: dict = defaultdict(list)
    for t in tasks:
        for f in t["commit"].get("files") or ():
            changed[f.get("path")].append(t)
    shared = {path: ts for path, ts in changed.items() if len(ts) > 1}
    overlaps = []
    if shared:
        upstream: dict = defaultdict(set)
        for up, down in TaskDependency.objects.filter(task__run_id=run_id).values_list("depends_on_id", "task_id"):
            upstream[down].add(up)
        ancestors = _ancestors(upstream)
        for path in sorted(shared):
            ts = shared[path]
            parallel = sorted(
                {a["key"] for a in ts for b in ts if a is not b and a["id"] not in ancestors(b["id"])
                 and b["id"] not in ancestors(a["id"])}
            )  # fmt: skip
            if parallel:
                overlaps.append({"path": path, "tasks": parallel})
    return {**run, "tasks": tasks, "overlaps": overlaps}


def _ancestors(upstream: dict):
    memo: dict = {}

    def of(task_id) -> set:
        if task_id not in memo:
            found: set = set()
            stack = list(upstream.get(task_id, ()))
            while stack:
                node = stack.pop()
                if node not in found:
                    found.add(node)
                    stack.extend(upstream.get(node, ()))
            memo[task_id] = found
        return memo[task_id]

    return of


def task_commit(task, attempts) -> dict | None:
    """The commit of a task (its succeeded attempt's, else its latest attempt's) with the diff parsed from the
    patch the agent uploaded: {commit, branch, files, cut, patch_id}. None when no attempt reported one."""
    from ..models import Artifact
    from . import diffs

    attempt = next((a for a in attempts if a.state == AttemptState.SUCCEEDED), None) or next(
        (a for a in attempts if a.commit), None
    )
    if attempt is None or not attempt.commit:
        return None
    commit = attempt.commit
    files, cut, patch_id = [], False, None
    artifact_id = commit.get("diff_artifact")
    if artifact_id:
        patch = Artifact.objects.filter(pk=artifact_id, attempt=attempt).values("id", "content").first()
        if patch is not None:
            patch_id = patch["id"]
            files, cut = diffs.parse(bytes(patch["content"][: 2 * 1024 * 1024]).decode("utf-8", "replace"))
    return {"commit": commit, "files": files, "cut": cut, "patch_id": patch_id, "attempt": attempt}
