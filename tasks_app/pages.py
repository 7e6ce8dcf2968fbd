"""The dashboard's pages as lists of panels. A page view renders every panel inside the page; the live
websocket re-renders the same panel templates as out-of-band swaps. One definition serves both, so a live
update can never drift from what a reload would show."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from django.template.loader import render_to_string

from . import panels
from .actions import NotFound
from .dagsvg import render_svg, state_map
from .gantt import render_gantt_svg
from .models import Artifact, Attempt, Event, Task
from .reports import run_metrics
from .states import RunState


@dataclass(frozen=True)
class Panel:
    id: str
    template: str
    # Heavy panels (the Gantt chart) are re-sent at most this often, whatever the rate of changes.
    min_interval_s: float = 0.0


PAGES: dict[str, list[Panel]] = {
    "overview": [
        Panel("panel-runs", "dashboard/panels/runs.html"),
        Panel("panel-fleet", "dashboard/panels/fleet.html"),
        Panel("panel-active", "dashboard/panels/active.html"),
        Panel("panel-recent", "dashboard/panels/recent.html"),
        Panel("panel-queue", "dashboard/panels/queue.html"),
    ],
    "run": [
        Panel("panel-run-head", "dashboard/panels/run_head.html"),
        Panel("panel-run-actions", "dashboard/panels/run_actions.html"),
        Panel("dag-states", "dashboard/panels/dag_states.html"),
        Panel("panel-active", "dashboard/panels/active.html"),
        Panel("panel-recent", "dashboard/panels/recent.html"),
        Panel("panel-queue", "dashboard/panels/queue.html"),
        Panel("panel-gantt", "dashboard/panels/gantt.html", min_interval_s=2.0),
    ],
    "task": [
        Panel("panel-task-head", "dashboard/panels/task_head.html"),
        Panel("panel-attempts", "dashboard/panels/attempts.html"),
        Panel("panel-log", "dashboard/panels/log.html"),
        Panel("panel-artifacts", "dashboard/panels/artifacts.html"),
        Panel("panel-trail", "dashboard/panels/trail.html"),
    ],
    "agents": [
        Panel("panel-fleet", "dashboard/panels/fleet.html"),
        Panel("panel-agents", "dashboard/panels/agents.html"),
    ],
}


def parse_id(value) -> str:
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise NotFound("no such object") from None


def page_context(page: str, obj_id: str | None = None, *, full: bool = True) -> dict:
    """Everything the page's panels show. `full` adds what only the first render needs (the DAG picture)."""
    if page == "overview":
        return {
            "runs": panels.run_summaries(limit=50),
            "fleet": panels.fleet_summary(),
            "active": panels.active_attempts(limit=30),
            "recent": panels.recently_completed(limit=10),
            "queue": panels.queue(limit=15),
            "show_run": True,
        }
    if page == "agents":
        return {"fleet": panels.fleet_summary(), "agents": panels.agents_table()}
    if page == "run":
        return _run_context(parse_id(obj_id), full)
    if page == "task":
        return _task_context(parse_id(obj_id))
    raise NotFound(f"no page {page!r}")


def _run_context(run_id: str, full: bool) -> dict:
    summaries = panels.run_summaries([run_id], limit=1)
    if not summaries:
        raise NotFound("no run with that id")
    run = summaries[0]
    tasks, edges = panels.run_graph(run_id)
    attempts = panels.timeline(run_id)
    context = {
        "run": run,
        "states": state_map(tasks),
        "active": panels.active_attempts(run_id),
        "recent": panels.recently_completed(run_id, limit=10),
        "queue": panels.queue(run_id, limit=15),
        "gantt_svg": render_gantt_svg(attempts),
        "metrics": run_metrics(run_id) if run["state"] not in RunState.ACTIVE else None,
        "show_run": False,
    }
    if context["metrics"]:
        by_id = {t["id"]: t for t in tasks}
        context["critical_path"] = _critical_chain(by_id, edges)
    if full:
        context["dag_svg"] = render_svg(tasks, edges)
        context["task_count"] = len(tasks)
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
    latest = attempts[0] if attempts else None
    return {
        "task": task,
        "attempts": attempts,
        "latest": latest,
        "deps": list(Task.objects.filter(downstream_links__task=task).values("id", "key", "state")),
        "artifacts": list(
            Artifact.objects.filter(task=task).order_by("name").values("id", "name", "size", "sha256", "attempt_id")
        ),
        "trail": list(
            Event.objects.filter(task=task).select_related("agent").order_by("-id")[:200]
        ),  # the newest 200 changes
    }


def render_panels(page: str, obj_id: str | None, user, only: set[str] | None = None) -> dict[str, str]:
    """The page's panels as out-of-band fragments for the websocket, by panel id."""
    context = page_context(page, obj_id, full=False)
    context.update({"oob": True, "user": user, "perms_operate": user.has_perm("tasks_app.operate_run")})
    return {
        p.id: render_to_string(p.template, {**context, "panel_id": p.id})
        for p in PAGES[page]
        if only is None or p.id in only
    }
