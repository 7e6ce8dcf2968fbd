"""Why a ready task is not assigned yet, in words, and which ready tasks nothing is holding back.

The scheduler itself never asks this: a claim takes what it may (tasks_app.actions.claim_ready_tasks). These
are the same limits read back for people (the run and task pages, `status`, the run API) and for the hub's
missed-wake-up check, in a fixed handful of queries however many tasks are asked about.
"""

from __future__ import annotations

import json

from django.conf import settings
from django.db import connection
from django.utils import timezone
from django.utils.dateparse import parse_datetime

from .. import queries as q
from ..models import Task
from ..states import APPROVAL_EXECUTOR, RunState, TaskState
from ..workspaces import RESULT_EXECUTOR as GIT  # in an agent's executors when its pre-flight found git

# The reasons, most binding first: a task held by its run's pause is not "waiting for a gpu agent" as well.
PAUSED = "run is paused"
CLAIMABLE = "waiting for a matching agent to claim it"
# How a task begins that no agent could run even if every agent came back: the pages flag these.
NO_AGENT = "no agent can run this"


class Reason(str):
    """A reason in words; `cannot` when no agent at all can run the task, which the pages flag."""

    @property
    def cannot(self) -> bool:
        return self.startswith((NO_AGENT, "no agent has"))


def reasons(tasks: list[dict]) -> dict:
    """{task id: reason} for the ready ones of `tasks` (dicts with id, state, run_id, executor, requires and
    ready_at): two queries whatever their number (three with a global limit)."""
    ready = [t for t in tasks if t["state"] == TaskState.READY]
    # The queries run even when nothing is ready, so a page reads as many queries whatever its runs hold.
    runs = _run_limits({t["run_id"] for t in ready})
    agents = _agents()
    global_live = _global_live()
    now = timezone.now()
    out = {}
    for t in ready:
        out[t["id"]] = Reason(_reason(t, runs.get(t["run_id"]), agents, global_live, now))
    return out


def reasons_of(tasks) -> dict:
    """reasons() for Task model instances."""
    fields = ("id", "state", "run_id", "executor", "requires", "ready_at")
    return reasons([{f: getattr(t, f) for f in fields} for t in tasks])


def _reason(task: dict, run: dict | None, agents: list[dict], global_live: int, now) -> str:
    return _held_back(task, run, global_live, now) or _no_agent_takes(task, run, agents, now)


def _held_back(task: dict, run: dict | None, global_live: int, now) -> str:
    """Why the scheduler holds the task back whatever the agents: its run paused or at max_parallel, its
    retry delay, the global limit; "" when nothing does."""
    if run is not None and run["state"] == RunState.PAUSED:
        return PAUSED
    ready_at = task.get("ready_at")
    if ready_at is not None and ready_at > now:
        return f"retry delay: offered in {max(1, round((ready_at - now).total_seconds()))} s"
    if run is not None and run["max_parallel"] is not None and run["live"] >= run["max_parallel"]:
        return f"run at max_parallel {run['max_parallel']}"
    limit = settings.CP_GLOBAL_MAX_LIVE
    if limit and global_live >= limit:
        return f"at the global limit of {limit} live attempts (CP_GLOBAL_MAX_LIVE)"
    return ""


def _no_agent_takes(task: dict, run: dict | None, agents: list[dict], now) -> str:
    """Why no agent takes the task (labels, executor, rate limits, git, draining, full), or CLAIMABLE."""
    requires = set(task["requires"] or ())
    executor = task["executor"]
    # Flagged first when some agent could take work but none, online or not, has what the task needs.
    if any(a["takes_work"] for a in agents) and (cannot := no_agent_runs(task["requires"], executor, agents)):
        return Reason(cannot)
    online = [a for a in agents if a["online"]]
    labelled = [a for a in online if requires <= a["labels"]]
    # Said when nothing online runs the task but an agent that is offline now would.
    offline = " (an offline agent could run it)" if not no_agent_runs(requires, executor, agents) else ""
    if not labelled:
        missing = sorted(requires - set().union(*(a["labels"] for a in online))) if online else []
        if not online:
            return f"no agent is online{offline}"
        if missing:
            return f"no online agent has label{'s' if len(missing) > 1 else ''} {', '.join(missing)}{offline}"
        return f"no online agent has every label of {', '.join(sorted(requires))}{offline}"
    matching = [a for a in labelled if executor in a["executors"]]
    which = f" with label{'s' if len(requires) > 1 else ''} {', '.join(sorted(requires))}" if requires else ""
    if not matching:
        return f"no online agent{which} runs executor {executor}{offline}"
    held = [until for a in matching if (until := held_until(a["holds"], executor, now)) is not None]
    if len(held) == len(matching):
        n = len(matching)
        return (f"{'the' if n == 1 else f'all {n}'} agent{'s' if n > 1 else ''}{which} running {executor}"
                f" {'is' if n == 1 else 'are'} rate-limited until {clock(min(held), now)}")  # fmt: skip
    matching = [a for a in matching if held_until(a["holds"], executor, now) is None]
    if run is not None and run["workspace"]:
        matching = [a for a in matching if GIT in a["executors"]]
        if not matching:
            return f"no online agent{which} running {executor} has git (a workspace run's tasks need it)"
    free = sum(max(0, a["capacity"] - a["live"]) for a in matching if a["takes_work"])
    if not any(a["takes_work"] for a in matching):
        return "every matching agent is draining"
    if free <= 0:
        slots = sum(a["capacity"] for a in matching if a["takes_work"])
        n = sum(1 for a in matching if a["takes_work"])
        return f"every matching agent is full ({n} agent{'s' if n > 1 else ''}, {slots} of {slots} slots in use)"
    return CLAIMABLE


def no_agent_runs(requires, executor: str, agents: list[dict], online_only: bool = False) -> str:
    """Why no agent that could take work (enabled, not draining, not retired, online or not; only online ones
    with `online_only`) has the labels and executor of a task, in words beginning with NO_AGENT or "no agent
    has"; "" when one has. Agents not seen for CP_AGENT_FORGET_DAYS are retired, so they do not count."""
    if executor == APPROVAL_EXECUTOR:  # a person's decision, never an agent's
        return ""
    requires = set(requires or ())
    able = [a for a in agents if a["takes_work"] and (a["online"] or not online_only)]
    with_executor = [a for a in able if executor in a["executors"]]
    if any(requires <= a["labels"] for a in with_executor):
        return ""
    anywhere = "online " if online_only else ""
    if not able:
        return "no agent is online" if online_only else "no agent is enabled"
    if not with_executor:
        return f"no {anywhere}agent has the {executor} executor"
    # The labels lacking on the closest agent running the executor (fewest missing): what to add or start.
    missing = min((sorted(requires - a["labels"]) for a in with_executor), key=len)
    return f"{NO_AGENT}{' online' if online_only else ''}: needs {', '.join(missing)}"


def cannot_run(tasks: list[dict]) -> dict:
    """{(executor, sorted requires): words} for the kinds of `tasks` (dicts with executor and requires) that no
    online agent can run, saying whether an offline one could: one query."""
    agents = _agents()
    out = {}
    for t in tasks:
        kind = (t["executor"], tuple(sorted(t["requires"] or ())))
        if kind in out or not (online := no_agent_runs(kind[1], kind[0], agents, online_only=True)):
            continue
        out[kind] = no_agent_runs(kind[1], kind[0], agents) or f"{online} (an offline agent could run it)"
    return out


# The labels and executors of the agents taking work now, as one jsonb value: a run's figures read it in the
# same query as its tasks (tasks_app.dashboard.panels._run_figures), for eta_unknown().
ONLINE_AGENT_KINDS = """
SELECT jsonb_agg(jsonb_build_array(g.labels, g.executors)) FROM agents_app_agent g
 WHERE g.retired_at IS NULL AND g.status = 'online' AND g.enabled AND NOT g.draining AND NOT g.shutdown_requested
"""


def eta_unknown(kinds, agents) -> str:
    """Why a run's ETA is unknown, or "": the first of `kinds` ([executor, requires] of its waiting tasks) that
    none of `agents` ([labels, executors] of those online and taking work) runs. Both as jsonb (text or
    parsed, as the driver gives it)."""
    kinds, agents = (json.loads(v) if isinstance(v, str) else v or [] for v in (kinds, agents))
    able = [{"labels": set(g[0] or ()), "executors": set(g[1] or ()), "online": True, "takes_work": True}
            for g in agents]  # fmt: skip
    for executor, requires in sorted(kinds, key=lambda k: (k[0], sorted(k[1] or ()))):
        if words := no_agent_runs(requires, executor, able, online_only=True):
            return words
    return ""


def run_warnings(run_id) -> list[str]:
    """What a newly submitted run cannot do yet, one sentence per kind of task no online agent can run:
    "3 tasks (train, eval, …): no agent can run this: needs gpu". Two queries."""
    tasks = list(Task.objects.filter(run_id=run_id).order_by("key").values("key", "executor", "requires"))
    kinds = cannot_run(tasks)
    keys: dict = {}
    for t in tasks:
        kind = (t["executor"], tuple(sorted(t["requires"] or ())))
        if kind in kinds:
            keys.setdefault(kind, []).append(t["key"])
    out = []
    for kind, words in kinds.items():
        named = ", ".join(keys[kind][:5]) + (", …" if len(keys[kind]) > 5 else "")
        n = len(keys[kind])
        out.append(f"{n} task{'s' if n > 1 else ''} ({named}): {words}")
    return out


def _run_limits(run_ids) -> dict:
    with connection.cursor() as cur:
        cur.execute(q.RUN_LIMITS, {"run_ids": list(run_ids)})
        return {
            rid: {"state": st, "max_parallel": mp, "workspace": ws, "live": live}
            for rid, st, mp, ws, live in cur.fetchall()
        }


def _agents() -> list[dict]:
    with connection.cursor() as cur:
        cur.execute(q.CURRENT_AGENTS_LOAD)
        return [
            {
                "labels": set(labels or ()),
                "executors": set(executors or ()),
                "capacity": capacity,
                "online": online,
                "takes_work": takes_work,
                "live": live,
                "holds": (json.loads(holds) if isinstance(holds, str) else holds) or {},  # jsonb: text here
            }
            for labels, executors, capacity, online, takes_work, live, holds in cur.fetchall()
        ]


def held_until(holds: dict, executor: str, now):
    """When an agent's hold on `executor` ends (a provider's usage limit), or None when it is not held."""
    until = parse_datetime(str((holds.get(executor) or {}).get("until") or ""))
    return until if until is not None and until > now else None


def clock(moment, now) -> str:
    """A moment as people read it on the pages: 15:00 UTC today, else with its date."""
    moment = moment.astimezone(timezone.get_current_timezone())
    same_day = moment.date() == now.astimezone(moment.tzinfo).date()
    return moment.strftime("%H:%M %Z" if same_day else "%Y-%m-%d %H:%M %Z")


def _global_live() -> int:
    if not settings.CP_GLOBAL_MAX_LIVE:
        return 0
    with connection.cursor() as cur:
        cur.execute(q.GLOBAL_LIVE)
        return cur.fetchone()[0]


def offerable_kinds(min_age_s: float) -> list[tuple[str, list]]:
    """(executor, requires) of ready tasks that have been offerable for `min_age_s` within their run's and
    the global limit: what a parked matching agent should have been woken for (EventHub's check)."""
    with connection.cursor() as cur:
        cur.execute(q.OFFERABLE_READY_KINDS, {"min_age_s": min_age_s, "global_limit": settings.CP_GLOBAL_MAX_LIVE})
        return [(executor, list(requires or ())) for executor, requires in cur.fetchall()]
