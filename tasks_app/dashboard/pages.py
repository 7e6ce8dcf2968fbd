"""The dashboard's pages as lists of panels. A page view renders every panel inside the page; the live
websocket re-renders the same panel templates as out-of-band swaps. One definition serves both, so a live
update can never drift from what a reload would show."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlencode

from django.core.cache import cache
from django.template.loader import render_to_string

from ..errors import NotFound
from ..models import Artifact, Attempt, Event, Task, Workflow
from ..states import RunState, TaskState
from . import panels, waiting
from .dagsvg import picture_data, picture_states, state_map
from .gantt import render_gantt_svg
from .reports import run_metrics


@dataclass(frozen=True)
class Panel:
    id: str
    template: str
    # The run page's context entries the template reads beyond `run`: a live push computes only what the
    # panels it re-renders need (at 1,000 tasks the Gantt chart's data alone costs more than all the rest).
    needs: tuple[str, ...] = ()
    # Heavy panels (the Gantt chart) are re-sent at most this often, whatever the rate of changes.
    min_interval_s: float = 0.0


PAGES: dict[str, list[Panel]] = {
    "overview": [
        Panel("panel-waiting", "dashboard/panels/waiting.html"),
        Panel("panel-runs", "dashboard/panels/runs.html"),
        Panel("panel-fleet", "dashboard/panels/fleet.html"),
        Panel("panel-spend", "dashboard/panels/spend.html"),
        Panel("panel-active", "dashboard/panels/active.html"),
        Panel("panel-recent", "dashboard/panels/recent.html"),
        Panel("panel-queue", "dashboard/panels/queue.html"),
    ],
    "run": [
        Panel("panel-run-head", "dashboard/panels/run_head.html", needs=("metrics",)),
        Panel("panel-run-actions", "dashboard/panels/run_actions.html"),
        Panel("panel-run-cost", "dashboard/panels/run_cost.html", needs=("spend",)),
        Panel("dag-states", "dashboard/panels/dag_states.html", needs=("states",)),
        Panel("panel-active", "dashboard/panels/active.html", needs=("active",)),
        Panel("panel-recent", "dashboard/panels/recent.html", needs=("recent",)),
        Panel("panel-queue", "dashboard/panels/queue.html", needs=("queue",)),
        Panel("panel-code", "dashboard/panels/code.html", needs=("code",)),
        Panel("panel-gantt", "dashboard/panels/gantt.html", needs=("gantt",), min_interval_s=2.0),
    ],
    "task": [
        Panel("panel-task-head", "dashboard/panels/task_head.html"),
        Panel("panel-commit", "dashboard/panels/commit.html"),
        Panel("panel-attempts", "dashboard/panels/attempts.html"),
        Panel("panel-log", "dashboard/panels/log.html"),
        Panel("panel-artifacts", "dashboard/panels/artifacts.html"),
        Panel("panel-trail", "dashboard/panels/trail.html"),
    ],
    # The runs page (/runs/, a workflow's /workflows/<name>/runs/): its filters and page number reach the live
    # push through the websocket URL's query string, so a push re-renders the page the person is on.
    "runs": [Panel("panel-runs", "dashboard/panels/runs.html")],
    # A run's task list (/runs/<id>/tasks/), its state and key filters passed the same way.
    "run-tasks": [Panel("panel-run-tasks", "dashboard/panels/run_tasks.html")],
    "agents": [
        Panel("panel-fleet", "dashboard/panels/fleet.html"),
        Panel("panel-agents", "dashboard/panels/agents.html"),
    ],
}


@dataclass(frozen=True)
class AddedPage:
    """A live page another app adds (the hosts page is agents_app's): what its panels show, and which
    notifications concern it. The dashboard draws and pushes it like its own without importing its code."""

    context: Callable[[], dict]
    concerns: Callable[[dict], bool]


ADDED_PAGES: dict[str, AddedPage] = {}


def add_page(name: str, panels: list[Panel], context: Callable[[], dict], concerns: Callable[[dict], bool]) -> None:
    """Called from an app's AppConfig.ready()."""
    PAGES[name] = panels
    ADDED_PAGES[name] = AddedPage(context, concerns)


def parse_id(value) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise NotFound("no such object") from None


def page_context(
    page: str, obj_id: str | None = None, *, full: bool = True, wanted: set[str] | None = None, query=None
) -> dict:
    """Everything the page's panels show. `full` adds what only the first render needs (the DAG picture);
    `wanted` limits the run page to those context entries (None: all); `query` is the runs page's filters
    (a QueryDict or dict: state, q, page, workflow)."""
    if page == "runs":
        query = query or {}
        return runs_list_context(query, workflow=query.get("workflow") or None)
    if page == "overview":
        return {
            "waiting_for_you": panels.waiting_for_people(),
            "runs": panels.with_costs(panels.run_summaries(limit=50)),
            "fleet": panels.fleet_summary(),
            "spend": panels.spend_summary(),
            "active": panels.active_attempts(limit=30),
            "recent": panels.recently_completed(limit=10),
            "queue": panels.queue(limit=15),
            "show_run": True,
        }
    if page == "agents":
        return {"fleet": panels.fleet_summary(), "agents": panels.with_agent_costs(panels.agents_table())}
    if page in ADDED_PAGES:
        return ADDED_PAGES[page].context()
    if page == "run":
        return _run_context(parse_id(obj_id), full, wanted)
    if page == "task":
        return _task_context(parse_id(obj_id))
    if page == "run-tasks":
        return run_tasks_context(parse_id(obj_id), query or {})
    raise NotFound(f"no page {page!r}")


# The run page's context entries that need nothing but the run (its id, its summary), by name: a live push
# computes those its panels need (Panel.needs).
RUN_ENTRIES: dict[str, Callable[[str, dict], object]] = {
    "active": lambda run_id, run: panels.active_attempts(run_id),
    "recent": lambda run_id, run: panels.recently_completed(run_id, limit=10),
    "queue": lambda run_id, run: panels.queue(run_id, limit=15),
    "spend": lambda run_id, run: panels.run_spend(run),
    "code": lambda run_id, run: panels.run_code(run_id),
    "gantt": lambda run_id, run: gantt_chart(run_id, limit=GANTT_MAX_BARS),
}
# The run page's Gantt chart draws the attempts assigned last, this many at most (~450 bytes of SVG each):
# a 10,000-task run's whole chart is 4 MB. Its full timeline is a page of its own (/runs/<id>/timeline/).
GANTT_MAX_BARS = 300
# Titles and estimates (the tooltips) travel with the picture's data up to this many tasks (~30 KB at 1,000).
DAG_DETAILS_UP_TO = 1000
# A laid-out picture is cached this long: a run's graph does not change, only its states (sent apart).
DAG_PICTURE_CACHE_S = 3600


def gantt_chart(run_id: str, limit: int | None = None) -> dict:
    """The Gantt chart's SVG, with how many attempts it shows of how many the run has."""
    attempts, total = panels.timeline(run_id, limit=limit)
    return {"svg": render_gantt_svg(attempts), "shown": len(attempts), "total": total}


def dag_picture(run_id: str, task_count: int) -> dict:
    """The run's laid-out graph (`dagsvg.picture_data`), cached per run and task count: laying out 10,000
    tasks takes ~0.3 s, a cached picture nothing, and its graph is the same on every load."""
    key = f"dashboard:dag-picture:{run_id}:{task_count}"
    picture = cache.get(key)
    if picture is None:
        tasks, edges = panels.run_graph(run_id)
        picture = picture_data(tasks, edges, details=len(tasks) <= DAG_DETAILS_UP_TO)
        cache.set(key, picture, DAG_PICTURE_CACHE_S)
    return picture


def _run_context(run_id: str, full: bool, wanted: set[str] | None = None) -> dict:
    summaries = panels.run_summaries([run_id], limit=1)
    if not summaries:
        raise NotFound("no run with that id")
    run = summaries[0]
    finished = run["state"] not in RunState.ACTIVE

    def want(key: str) -> bool:
        return wanted is None or key in wanted

    context = {"run": run, "show_run": False}
    # The whole graph only for a finished run's critical path (the picture's layout is cached, `dag_picture`);
    # the picture and live pushes need states alone.
    tasks, edges = panels.run_graph(run_id) if finished and want("metrics") else (None, None)
    if full:  # the picture carries the states it is drawn with: the states panel starts empty
        data = dag_picture(run_id, sum(run["counts"].values()))
        rows = tasks if tasks is not None else panels.task_states(run_id, commits=not data["compact"])
        context["dag_data"] = {**data, **picture_states(data["keys"], rows), "href": f"/runs/{run_id}/tasks/{{key}}/"}
        context["dag_size"] = (data["w"], data["h"])
        context["task_count"] = len(data["keys"])
        context["states"] = {}
        context["dag_legend"] = [(state, state.replace("_", " ")) for state in data["states"]]
    elif want("states"):
        context["states"] = state_map(tasks if tasks is not None else panels.task_states(run_id))
    for key, compute in RUN_ENTRIES.items():
        if want(key):
            context[key] = compute(run_id, run)
    if want("metrics"):
        context["metrics"] = run_metrics(run_id) if finished else None
        if context["metrics"]:
            context["critical_path"] = _critical_chain({t["id"]: t for t in tasks}, edges)
    return context


def _critical_chain(by_id: dict, edges) -> list[str]:
    """The keys along the longest chain of estimates, from the tasks' stored critical path lengths."""
    children: dict = {}
    has_parent = set()
    for up, down in edges:
        children.setdefault(up, []).append(down)
        has_parent.add(down)
    roots = [t for i, t in by_id.items() if i not in has_parent]
    if not roots:
        return []
    node = max(roots, key=lambda t: t["critical_path_s"])
    chain = [node["key"]]
    while children.get(node["id"]):
        node = max((by_id[c] for c in children[node["id"]]), key=lambda t: t["critical_path_s"])
        chain.append(node["key"])
    return chain


def _task_context(task_id: str) -> dict:
    task = Task.objects.select_related("run").filter(pk=task_id).first()
    if task is None:
        raise NotFound("no task with that id")
    attempts = list(Attempt.objects.filter(task=task).select_related("agent").order_by("-number"))
    for a in attempts:
        # Ended for a reason that is not the task's (a usage limit, a lost login, a budget): the task went back
        # to ready and the attempt did not count against max_attempts.
        a.returned = a.error.split(":", 1)[0].strip() in panels.RETURNED_CODES if ":" in a.error else False
    latest = attempts[0] if attempts else None
    return {
        "task": task,
        "cost": {
            "total": sum(a.cost_usd or 0 for a in attempts),
            "estimated": any((a.usage or {}).get("cost_estimated") for a in attempts),
            "any": any(a.usage for a in attempts),
        },
        "change": panels.task_commit(task, attempts),
        "retry_params": json.dumps(task.params or {}, indent=2, ensure_ascii=False),  # the retry form's
        "waiting": waiting.reasons_of([task]).get(task.id),
        "asking": panels.input_requests(task_id=task.id),
        "attempts": attempts,
        "latest": latest,
        "result": _shown_result(task.executor, latest.result if latest else None),
        "deps": list(Task.objects.filter(downstream_links__task=task).values("id", "key", "state")),
        "artifacts": list(
            Artifact.objects.filter(task=task).order_by("name").values("id", "name", "size", "sha256", "attempt_id")
        ),
        "trail": list(
            Event.objects.filter(task=task).select_related("agent").order_by("-id")[:200]
        ),  # the newest 200 changes
    }


# Result keys that repeat what the log shows already, left out of the Result panel.
RESULT_IN_THE_LOG = ("stdout_tail",)


def _shown_result(executor: str, result) -> dict | None:
    """The latest attempt's result as a person reads it: `text`, an AI CLI's final message (claude, codex);
    `json`, the rest pretty-printed (the template escapes it); `omitted`, the keys the log shows already."""
    if result is None:
        return None
    shown, text = result, ""
    if isinstance(result, dict):
        shown = {k: v for k, v in result.items() if k not in RESULT_IN_THE_LOG}
        if executor in ("claude", "codex") and isinstance(shown.get("output"), str):
            text = shown.pop("output")
    omitted = [k for k in RESULT_IN_THE_LOG if isinstance(result, dict) and k in result]
    return {"text": text, "json": json.dumps(shown, indent=2, ensure_ascii=False, default=str), "omitted": omitted}


# --- Plain (not live) pages: runs filtered and paginated, a workflow's runs, a run's task list ---------------

RUNS_PER_PAGE = 50


def _choice(value, allowed) -> str | None:
    return value if value in allowed else None


def runs_list_context(query, workflow: str | None = None) -> dict:
    """The runs page: `?state=` (a run state), `?q=` (a part of the name), `?page=` (from 1), RUNS_PER_PAGE a
    page, newest first; `workflow` limits it to that workflow's runs (NotFound when there is none)."""
    if workflow is not None and not Workflow.objects.filter(name=workflow).exists():
        raise NotFound(f"no workflow named {workflow!r}")
    state = _choice(query.get("state"), RunState.ALL)
    search = query.get("q", "").strip()[:200]
    page = int(query["page"]) if query.get("page", "").isdigit() and int(query["page"]) >= 1 else 1
    runs = panels.run_summaries(limit=RUNS_PER_PAGE + 1, offset=(page - 1) * RUNS_PER_PAGE, state=state,
                                workflow=workflow, search=search)  # fmt: skip
    more = len(runs) > RUNS_PER_PAGE
    kept = {k: v for k, v in (("state", state), ("q", search)) if v}
    return {
        "runs": panels.with_costs(runs[:RUNS_PER_PAGE]),
        "show_run": True,
        "filters": {"state": state or "", "q": search, "states": RunState.ALL, "workflow": workflow},
        "page_number": page,
        "prev_query": urlencode({**kept, "page": page - 1}) if page > 1 else None,
        "next_query": urlencode({**kept, "page": page + 1}) if more else None,
    }


def run_tasks_context(run_id: str, query) -> dict:
    """A run's task list: `?state=` (a task state) and `?q=` (a part of the key), in natural key order."""
    summaries = panels.run_summaries([run_id], limit=1)
    if not summaries:
        raise NotFound("no run with that id")
    state = _choice(query.get("state"), TaskState.ALL)
    search = query.get("q", "").strip()[:200]
    return {
        "run": summaries[0],
        "tasks": panels.run_tasks(run_id, state=state, search=search),
        "filters": {"state": state or "", "q": search, "states": TaskState.ALL},
        "state_counts": [(s, summaries[0]["counts"][s]) for s in TaskState.ALL],
    }


def render_panels(
    page: str, obj_id: str | None, user, only: set[str] | None = None, shown_states: dict | None = None,
    query=None,
) -> dict[str, str]:  # fmt: skip
    """The page's panels as out-of-band fragments for the websocket, by panel id.

    `shown_states`, when given, is the DAG states the page shows already (the caller keeps it, starting
    empty): the states panel then carries only the tasks whose state or progress differ, or is left out when
    none do, and `shown_states` is brought up to date. At 1,000 tasks the whole map is ~60 KiB a push."""
    chosen = [p for p in PAGES[page] if only is None or p.id in only]
    wanted = {need for p in chosen for need in p.needs}
    context = page_context(page, obj_id, full=False, wanted=wanted, query=query)
    if shown_states is not None and "states" in context:
        current = context["states"]
        context["states"] = {k: v for k, v in current.items() if shown_states.get(k) != v}
        shown_states.update(current)
        if not context["states"]:
            chosen = [p for p in chosen if "states" not in p.needs]
    context.update({"oob": True, "user": user, "perms_operate": user.has_perm("tasks_app.operate_run")})
    return {p.id: render_to_string(p.template, {**context, "panel_id": p.id}) for p in chosen}
