"""The dashboard's pages and the operators' actions. Thin: a page renders `pages.page_context`; an action
checks the permission, calls one action function and answers with a flash message (the websocket pushes the
new state to every open page)."""

from __future__ import annotations

import json
import math

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import redirect, render

from agents_app import registry
from control_plane.web import OPERATE, actor_of, answer, operator_only

from .. import actions, costs
from ..dag import MAX_COST_USD, DagError  # MAX_COST_USD: the largest budget the resume form takes, as the API
from ..workflows import documents
from . import panels
from .pages import PAGES, gantt_chart, page_context, parse_id


def _page(request, page: str, template: str, obj_id=None, query=None):
    try:
        context = page_context(page, obj_id, query=query)
    except actions.NotFound:
        raise Http404 from None
    context.update(
        {
            "page": page,
            "obj_id": obj_id,
            "panels": PAGES[page],
            "perms_operate": request.user.has_perm(OPERATE),
            # The query (the runs page's filters) goes to the socket too: its pushes show the same runs.
            "ws_path": f"/ws/{page}/" + (f"{obj_id}/" if obj_id else "") + (f"?{query.urlencode()}" if query else ""),
        }
    )
    return render(request, template, context)


@login_required
def overview(request):
    return _page(request, "overview", "dashboard/overview.html")


@login_required
def run_page(request, run_id):
    return _page(request, "run", "dashboard/run.html", str(run_id))


@login_required
def task_page(request, task_id):
    return _page(request, "task", "dashboard/task.html", str(task_id))


@login_required
def runs_page(request):
    """Every run, filtered by state, searched by name, 50 a page, live (the overview shows the newest 50)."""
    return _page(request, "runs", "dashboard/runs.html", query=request.GET)


@login_required
def workflow_runs_page(request, name: str):
    """One workflow's run history: the runs page limited to it."""
    query = request.GET.copy()
    query["workflow"] = name
    return _page(request, "runs", "dashboard/runs.html", query=query)


@login_required
def run_tasks_page(request, run_id):
    """A run's tasks, filtered by state and searched by key, in natural key order, live."""
    return _page(request, "run-tasks", "dashboard/run_tasks.html", str(run_id), query=request.GET)


@login_required
def run_task_by_key(request, run_id, key: str):
    """A task of a run named by its key (the DAG picture's nodes link here: keys are what it carries)."""
    task_id = panels.task_id_by_key(run_id, key)
    if task_id is None:
        raise Http404("no task with that key in this run")
    return redirect("task", task_id=task_id)


@login_required
def run_timeline_page(request, run_id):
    """A run's whole Gantt chart, every attempt (the run page's shows the last GANTT_MAX_BARS); not live."""
    summaries = panels.run_summaries([str(run_id)], limit=1)
    if not summaries:
        raise Http404("no run with that id")
    return render(request, "dashboard/run_timeline.html", {"run": summaries[0], "gantt": gantt_chart(str(run_id))})


@login_required
def agents_page(request):
    return _page(request, "agents", "dashboard/agents.html")


RUN_OPERATIONS = {"cancel": actions.cancel_run, "pause": actions.pause_run, "resume": actions.resume_run}


@operator_only
def operate_run(request, run_id, operation: str):
    action = RUN_OPERATIONS.get(operation)
    if action is None:
        raise Http404
    back = f"/runs/{run_id}/"
    options, said = {}, ""
    if operation == "resume" and request.POST.get("max_cost_usd", "").strip():
        budget = _budget(request.POST["max_cost_usd"])
        if budget is None:
            return answer(request, f"A new budget must be an amount in USD above 0 and at most {MAX_COST_USD:,}.",
                           ok=False, back=back)  # fmt: skip
        options["max_cost_usd"] = budget
        said = f" Budget now {costs.money(budget)}."
    try:
        state = action(str(run_id), actor_of(request), **options)
    except actions.ActionError as exc:
        if exc.code != "budget_exceeded":
            raise
        # The budget is spent (or today's cap reached): say so in words the operator can act on.
        return answer(request, f"Not resumed: {exc.detail}.", ok=False, back=back)
    return answer(request, f"Run {operation}: now {state}.{said}", back=back)


def _budget(raw: str) -> float | None:
    """A budget typed into the resume form (USD, '$' and ',' allowed), or None when it is not one."""
    try:
        value = float(raw.strip().removeprefix("$").replace(",", ""))
    except ValueError:
        return None
    return value if math.isfinite(value) and 0 < value <= MAX_COST_USD else None


@operator_only
def rerun(request, run_id):
    """A new run of the same document (tasks_app.workflows.documents.rerun); the answer opens its page."""
    run = documents.rerun(str(run_id), actor=actor_of(request), user=request.user)
    messages.success(request, f"Rerun started: {run.name}.")
    if request.headers.get("HX-Request"):
        return HttpResponse(status=204, headers={"HX-Redirect": f"/runs/{run.id}/"})
    return redirect(f"/runs/{run.id}/")


@operator_only
def retry_failed(request, run_id):
    retried = actions.retry_failed(str(run_id), actor_of(request))
    said = f"{len(retried)} task{'' if len(retried) == 1 else 's'} queued again." if retried else "Nothing had failed."
    return answer(request, said, back=f"/runs/{run_id}/")


# What the task page's *Retry with changes* form may change (actions.edit_task checks the values).
RETRY_FIELDS = ("command", "prompt", "params")


@operator_only
def retry_task(request, task_id):
    """Retry a failed or canceled task; with the form's command, prompt or params (JSON), retry it changed.
    A bad value is refused with a flash naming the field, and nothing is retried."""
    back = f"/tasks/{task_id}/"
    try:
        edits = _retry_edits(request.POST)
        actions.retry_task(str(task_id), actor_of(request), edits=edits or None)
    except DagError as exc:
        field = f"{exc.field}: " if exc.field and exc.field not in exc.detail else ""
        return answer(request, f"Not retried: {field}{exc.detail.rstrip('.')}.", ok=False, status=422, back=back)
    return answer(request, "Task queued again with your changes." if edits else "Task queued again.", back=back)


def _retry_edits(form) -> dict:
    """The fields the form sent, params parsed from JSON (DagError naming `params` when it is not an object)."""
    edits = {f: form[f].replace("\r\n", "\n") for f in RETRY_FIELDS if f in form}
    if "params" in edits:
        text = edits["params"].strip() or "{}"
        try:
            edits["params"] = json.loads(text)
        except ValueError as exc:
            raise DagError(f"params must be JSON ({exc.msg} at line {exc.lineno})", field="params") from None
        if not isinstance(edits["params"], dict):
            raise DagError("params must be a JSON object ({...})", field="params")
    return edits


@operator_only
def decide_task(request, task_id):
    """The task page's Approve / Reject (with the comment field) of a task awaiting approval."""
    decision = request.POST.get("decision")
    if decision not in ("approve", "reject"):
        return answer(request, "Say approve or reject.", ok=False, status=400, back=f"/tasks/{task_id}/")
    message = request.POST.get("message", "").strip()[:10_000]
    state = actions.decide_approval(str(task_id), decision == "approve", actor_of(request), message)
    return answer(request, f"{'Approved' if decision == 'approve' else 'Rejected'}: the task {state}.",
                   back=f"/tasks/{task_id}/")  # fmt: skip


@operator_only
def answer_input(request, request_id):
    """Allow or Deny (with a message to the agent) of an agent's input request, on the task page or the
    overview's Waiting for you."""
    behavior = request.POST.get("behavior")
    if behavior not in ("allow", "deny"):
        return answer(request, "Say allow or deny.", ok=False, status=400)
    message = request.POST.get("message", "").strip()[:10_000]
    actions.answer_input_request(str(request_id), behavior, message, actor_of(request))
    return answer(request, f"{'Allowed' if behavior == 'allow' else 'Denied'}: the agent goes on.")


AGENT_OPERATIONS = {
    "drain": {"draining": True},
    "undrain": {"draining": False},
    "disable": {"enabled": False},
    "enable": {"enabled": True},
    "shutdown": {"shutdown_requested": True},
}


# Operations that are not a flag: a new pre-flight (delivered with the next heartbeat), revoking the token.
AGENT_ACTIONS = {
    "preflight": (registry.request_preflight, "pre-flight requested; it runs at the next heartbeat"),
    "revoke": (registry.revoke_agent, "token revoked; the agent stops at its next call"),
    "forget": (registry.forget_agent, "forgotten; its attempts and audit trail are kept"),
}


@operator_only
def operate_agent(request, agent_id, operation: str):
    if operation in AGENT_ACTIONS:
        action, done = AGENT_ACTIONS[operation]
        agent = action(parse_id(agent_id), actor_of(request))
        return answer(request, f"Agent {agent.name}: {done}.", back="/agents/")
    flags = AGENT_OPERATIONS.get(operation)
    if flags is None:
        raise Http404
    agent = registry.set_agent_flags(parse_id(agent_id), actor_of(request), **flags)
    return answer(request, f"Agent {agent.name}: {operation} done.", back="/agents/")
