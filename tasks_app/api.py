"""PROTOCOL.md's run endpoints (API token; the user's permissions apply) and artifact downloads."""

from __future__ import annotations

import uuid

from django.http import HttpResponse, JsonResponse

from agents_app import registry, tokens
from control_plane.db_outage import check_database
from control_plane.http_api import ApiError, Fields, api_view, db_call, json_body, require_method
from control_plane.web import user_actor

from . import actions
from .dag import MAX_COST_USD, parse_document
from .dashboard import panels, reports
from .models import Artifact
from .states import RunState

DOCUMENT_LIMIT = 16 * 1024 * 1024


def _uuid(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ApiError(404, "not_found", f"no {what} with that id") from None


def _user(request, permission: str | None = None):
    user = registry.authenticate_user(tokens.bearer(request.headers.get("Authorization")))
    if permission and not user.has_perm(permission):
        raise ApiError(403, "forbidden", f"this user lacks the permission {permission}")
    return user


@api_view
async def health(request):
    """200 while this process can reach the database (one round trip), 503 while it cannot."""
    await db_call(check_database)()
    return JsonResponse({"status": "ok"})


@api_view
async def runs(request):
    if request.method == "GET":
        return await _list_runs(request)
    require_method(request, "POST")
    document = json_body(request, DOCUMENT_LIMIT)

    def submit():
        user = _user(request, "tasks_app.add_run")
        dag = parse_document(document)
        run = actions.submit_run(dag, document, actor=user_actor(user), user=user)
        return {"run_id": str(run.id), "tasks": len(dag.tasks)}

    return JsonResponse(await db_call(submit)(), status=201)


async def _list_runs(request):
    """An addition to PROTOCOL.md (README, "API"): the newest runs, `?state=` and `?limit=` (1-500, 50)."""
    state = request.GET.get("state") or None
    if state is not None and state not in RunState.ALL:
        raise ApiError(400, "bad_request", f"'state' must be one of {', '.join(RunState.ALL)}")
    limit = request.GET.get("limit", "50")
    if not limit.isdigit() or not 1 <= int(limit) <= 500:
        raise ApiError(400, "bad_request", "'limit' must be from 1 to 500")

    def load():
        _user(request, "tasks_app.view_run")
        return [
            {
                "run_id": str(r["id"]),
                "name": r["name"],
                "state": r["state"],
                "tasks": r["total"],
                "counts": r["counts"],
                "progress": round(r["fraction"], 4),
                "created_at": r["created_at"].isoformat(),
                "finished_at": r["finished_at"].isoformat() if r["finished_at"] else None,
                "eta": r["eta"].isoformat() if r["eta"] else None,
            }  # fmt: skip
            for r in panels.run_summaries(limit=int(limit), state=state)
        ]

    return JsonResponse({"runs": await db_call(load)()})


@api_view
async def run_detail(request, run_id: str):
    require_method(request, "GET")
    run_id = _uuid(run_id, "run")

    def load():
        _user(request, "tasks_app.view_run")
        return reports.run_status(run_id)

    return JsonResponse(await db_call(load)())


def _run_action(action, options=None):
    """A run operation's view; `options(Fields of the body)` gives the action's keyword arguments."""

    @api_view
    async def view(request, run_id: str):
        require_method(request, "POST")
        run_id_ = _uuid(run_id, "run")
        kwargs = options(Fields(json_body(request, 4096))) if options else {}

        def act():
            user = _user(request, "tasks_app.change_run")
            return {"run_id": run_id_, "state": action(run_id_, user_actor(user), **kwargs)}

        return JsonResponse(await db_call(act)())

    view.__name__ = action.__name__
    return view


cancel_run = _run_action(actions.cancel_run)
pause_run = _run_action(actions.pause_run)
# An addition (README, "API"): resume's body may raise the run's budget, {"max_cost_usd": N}.
resume_run = _run_action(actions.resume_run, lambda f: {"max_cost_usd": f.number("max_cost_usd", 0, MAX_COST_USD)})


@api_view
async def retry_task(request, task_id: str):
    require_method(request, "POST")
    task_id = _uuid(task_id, "task")

    def act():
        user = _user(request, "tasks_app.change_task")
        return {"task_id": task_id, "state": actions.retry_task(task_id, user_actor(user))}

    return JsonResponse(await db_call(act)())


def _decision(approve: bool):
    """PROTOCOL.md v1.1's approve / reject: 200 for a task awaiting approval, 409 otherwise; operators only."""

    @api_view
    async def view(request, task_id: str):
        require_method(request, "POST")
        task_id_ = _uuid(task_id, "task")
        message = Fields(json_body(request, 64 * 1024)).str("message", 10_000, default="")

        def act():
            user = _user(request, "tasks_app.operate_run")
            return {"task_id": task_id_, "state": actions.decide_approval(task_id_, approve, user_actor(user), message)}

        return JsonResponse(await db_call(act)())

    view.__name__ = "approve_task" if approve else "reject_task"
    return view


@api_view
async def answer_input_request(request, request_id: str):
    """PROTOCOL.md v1.1: a person's answer to an agent's input request; 409 once answered."""
    require_method(request, "POST")
    request_id_ = _uuid(request_id, "input request")
    f = Fields(json_body(request, 64 * 1024))
    behavior = f.str("behavior", 8, required=True, choices=("allow", "deny"))
    message = f.str("message", 10_000, default="")

    def act():
        user = _user(request, "tasks_app.operate_run")
        answer = actions.answer_input_request(request_id_, behavior, message, user_actor(user))
        return {"request_id": request_id_, "state": "answered", "answer": answer}

    return JsonResponse(await db_call(act)())


approve_task = _decision(True)
reject_task = _decision(False)


@api_view
async def artifact(request, artifact_id: str):
    require_method(request, "GET")
    artifact_id = _uuid(artifact_id, "artifact")

    def load():
        # A signed-in person sees every task page (and its log) on the dashboard, so may download the artifacts
        # it links; an API token needs the permission.
        if not request.user.is_authenticated and not _user(request).has_perm("tasks_app.view_artifact"):
            raise ApiError(403, "forbidden", "this user may not read artifacts")
        found = Artifact.objects.filter(pk=artifact_id).first()
        if found is None:
            raise ApiError(404, "not_found", "no artifact with that id")
        return found

    found = await db_call(load)()
    response = HttpResponse(bytes(found.content), content_type="application/octet-stream")
    safe = found.name.replace('"', "").replace("\\", "").replace("\n", " ").split("/")[-1] or "artifact"
    response["Content-Disposition"] = f'attachment; filename="{safe}"'
    response["X-Content-SHA256"] = found.sha256
    return response
