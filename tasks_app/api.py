"""PROTOCOL.md's run endpoints (API token; the user's permissions apply) and artifact downloads."""

from __future__ import annotations

import uuid

from django.db.models.functions import Length
from django.http import HttpResponse, JsonResponse

from agents_app import registry, tokens
from control_plane.db_outage import check_database
from control_plane.http_api import ApiError, Fields, api_view, db_call, json_body, require_method
from control_plane.web import user_actor

from . import actions
from .dag import MAX_COST_USD, params_from_pairs, parse_document, with_overrides
from .dashboard import panels, reports, waiting
from .models import Artifact, Attempt, Run, Task, Workflow
from .states import AttemptState, RunState
from .workflows import documents

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
    document = _document_body(request)
    overrides = _overrides(request.GET.get("repo"), request.GET.get("base"), request.GET.getlist("param"))

    def submit():
        user = _user(request, "tasks_app.add_run")
        with_them = with_overrides(document, **overrides)
        dag = parse_document(with_them)
        run = actions.submit_run(dag, with_them, actor=user_actor(user), user=user)
        # An addition: what no online agent can run, so a submitter learns it now, not after a long wait.
        return {"run_id": str(run.id), "tasks": len(dag.tasks), "warnings": waiting.run_warnings(run.id)}

    return JsonResponse(await db_call(submit)(), status=201)


def _document_body(request):
    """A DAG document as JSON (PROTOCOL.md) or, an addition, as YAML (`Content-Type: application/yaml`)."""
    kind = request.content_type or ""
    if kind not in ("application/yaml", "application/x-yaml", "text/yaml"):
        return json_body(request, DOCUMENT_LIMIT)
    if len(request.body) > DOCUMENT_LIMIT:
        raise ApiError(413, "too_large", f"the body may be at most {DOCUMENT_LIMIT} bytes")
    try:
        text = request.body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "bad_request", "the YAML document is not UTF-8 text") from None
    if "\x00" in text:
        raise ApiError(400, "bad_request", "the YAML document contains a NUL character")
    return documents.load_document_text(text)


def _overrides(repo, base, pairs) -> dict:
    """A start's overrides (`?repo=`, `?base=`, `?param=NAME=VALUE`, repeatable; the CLI's --repo, --base,
    --param): the same as `manage.py submit` and the admin's *Start a run…* take."""
    return {"repo": repo or None, "base": base or None, "params": params_from_pairs(pairs)}


async def _list_runs(request):
    """An addition to PROTOCOL.md (README, "API"): the newest runs, `?state=`, `?workflow=NAME` and `?limit=`
    (1-500, 50)."""
    state = request.GET.get("state") or None
    if state is not None and state not in RunState.ALL:
        raise ApiError(400, "bad_request", f"'state' must be one of {', '.join(RunState.ALL)}")
    limit = request.GET.get("limit", "50")
    if not limit.isdigit() or not 1 <= int(limit) <= 500:
        raise ApiError(400, "bad_request", "'limit' must be from 1 to 500")
    workflow = request.GET.get("workflow") or None

    def load():
        _user(request, "tasks_app.view_run")
        if workflow is not None and not Workflow.objects.filter(name=workflow).exists():
            raise ApiError(404, "not_found", f"no workflow named {workflow!r}")
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
            for r in panels.run_summaries(limit=int(limit), state=state, workflow=workflow)
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
    """PROTOCOL.md's retry; an addition: the body may change what the retry runs, `{"command", "prompt",
    "params"}` (each optional, checked as in a document: 422 naming the field)."""
    require_method(request, "POST")
    task_id = _uuid(task_id, "task")
    edits = json_body(request, 64 * 1024)

    def act():
        user = _user(request, "tasks_app.change_task")
        return {"task_id": task_id, "state": actions.retry_task(task_id, user_actor(user), edits=edits or None)}

    return JsonResponse(await db_call(act)())


@api_view
async def retry_failed(request, run_id: str):
    """An addition (README, "API"): retry every failed or canceled task of the run."""
    require_method(request, "POST")
    run_id = _uuid(run_id, "run")

    def act():
        user = _user(request, "tasks_app.change_task")
        retried = actions.retry_failed(run_id, user_actor(user))
        return {"run_id": run_id, "retried": retried, "state": Run.objects.get(pk=run_id).state}

    return JsonResponse(await db_call(act)())


@api_view
async def rerun(request, run_id: str):
    """An addition (README, "API"): a new run of the same document, linked to this one → 201."""
    require_method(request, "POST")
    run_id = _uuid(run_id, "run")

    def act():
        user = _user(request, "tasks_app.add_run")
        run = documents.rerun(run_id, actor=user_actor(user), user=user)
        return {"run_id": str(run.id), "rerun_of": run_id, "tasks": run.tasks.count()}

    return JsonResponse(await db_call(act)(), status=201)


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


@api_view
async def start_workflow(request, name: str):
    """An addition (README, "API"): a run of the workflow NAME, with a start's overrides in the body:
    `{"params": {...}, "repo", "base", "priority", "max_parallel"}` (all optional) → 201 as `POST /runs`."""
    require_method(request, "POST")
    f = Fields(json_body(request, 64 * 1024))
    params = f.obj("params", default={})
    pairs = [f"{k}={v}" for k, v in params.items()] if isinstance(params, dict) else None
    if pairs is None or not all(isinstance(v, str) for v in params.values()):
        raise ApiError(400, "bad_request", "'params' must be an object of strings")
    overrides = _overrides(f.str("repo", 2000, default=""), f.str("base", 255, default=""), pairs)
    priority = f.int("priority", -1_000_000, 1_000_000) if "priority" in f.data else None
    max_parallel = f.int("max_parallel", 1, 100_000) if "max_parallel" in f.data else None

    def start():
        user = _user(request, "tasks_app.add_run")
        workflow = Workflow.objects.filter(name=name).first()
        if workflow is None:
            raise ApiError(404, "not_found", f"no workflow named {name!r}")
        run = documents.start_run(
            workflow, actor=user_actor(user), user=user, priority=priority, max_parallel=max_parallel, **overrides
        )
        return {"run_id": str(run.id), "tasks": run.tasks.count()}

    return JsonResponse(await db_call(start)(), status=201)


@api_view
async def task_detail(request, task_id: str):
    """An addition (README, "API"): one task with every attempt and its artifacts."""
    require_method(request, "GET")
    task_id = _uuid(task_id, "task")

    def load():
        _user(request, "tasks_app.view_run")
        task = Task.objects.filter(pk=task_id).first()
        if task is None:
            raise ApiError(404, "not_found", "no task with that id")
        attempts = Attempt.objects.filter(task=task).order_by("number")
        return {
            "id": str(task.id),
            "key": task.key,
            "run_id": str(task.run_id),
            "state": task.state,
            "executor": task.executor,
            "attempts": [
                {
                    "number": a["number"],
                    "state": a["state"],
                    "agent": a["agent__name"],
                    "started_at": a["started_at"].isoformat() if a["started_at"] else None,
                    "finished_at": a["finished_at"].isoformat() if a["finished_at"] else None,
                    "exit_code": a["exit_code"],
                    "error": a["error"],
                    "log_chars": a["log_chars"],
                }
                for a in attempts.values(
                    "number",
                    "state",
                    "agent__name",
                    "started_at",
                    "finished_at",
                    "exit_code",
                    "error",
                    log_chars=Length("log"),
                )
            ],  # fmt: skip
            "artifacts": [
                {
                    "id": str(a["id"]),
                    "name": a["name"],
                    "size": a["size"],
                    "sha256": a["sha256"],
                    "attempt": a["attempt__number"],
                }
                for a in Artifact.objects.filter(task=task)
                .order_by("attempt__number", "name")
                .values("id", "name", "size", "sha256", "attempt__number")
            ],  # fmt: skip
        }

    return JsonResponse(await db_call(load)())


# A log page's most characters: `-f` follows a long log a page at a time.
LOG_PAGE_CHARS = 1_000_000


@api_view
async def task_log(request, task_id: str):
    """An addition (README, "API"): one attempt's log from a character offset. `?attempt=N` (default: the
    latest), `?offset=C` (default 0) → `{"task_id", "attempt", "attempts", "state", "done", "offset",
    "next_offset", "log"}`; `done` once the attempt has ended and `next_offset` is the end of its log."""
    require_method(request, "GET")
    task_id = _uuid(task_id, "task")
    number, offset = request.GET.get("attempt", ""), request.GET.get("offset", "0")
    if number and not number.isdigit() or not offset.isdigit():
        raise ApiError(400, "bad_request", "'attempt' and 'offset' must be whole numbers")

    def load():
        _user(request, "tasks_app.view_run")
        task = Task.objects.filter(pk=task_id).only("id", "attempts_used").first()
        if task is None:
            raise ApiError(404, "not_found", "no task with that id")
        attempts = Attempt.objects.filter(task_id=task_id)
        chosen = attempts.filter(number=int(number)) if number else attempts.order_by("-number")
        att = chosen.values("number", "state", "log").first()
        if att is None:
            raise ApiError(404, "not_found", f"task has no attempt {number}" if number else "task has no attempts yet")
        start = min(int(offset), len(att["log"]))
        piece = att["log"][start : start + LOG_PAGE_CHARS]
        return {
            "task_id": task_id,
            "attempt": att["number"],
            "attempts": attempts.count(),
            "state": att["state"],
            "done": att["state"] in AttemptState.TERMINAL and start + len(piece) >= len(att["log"]),
            "offset": start,
            "next_offset": start + len(piece),
            "log": piece,
        }

    return JsonResponse(await db_call(load)())


@api_view
async def agents(request):
    """An addition (README, "API"): the fleet, for `cpctl agents` (API token, `view_agent`)."""
    require_method(request, "GET")

    def load():
        _user(request, "agents_app.view_agent")
        return {"agents": [_agent_entry(a) for a in panels.agents_table()]}

    return JsonResponse(await db_call(load)())


def _agent_entry(a: dict) -> dict:
    return {
        "id": str(a["id"]),
        "name": a["name"],
        "status": a["display_status"],  # disabled, offline, draining, busy or idle, as the agents page says
        "labels": a["labels"],
        "executors": a["executors"],
        "capacity": a["capacity"],
        "tasks": [x["task__key"] for x in a["attempts"]],
        "last_seen_at": a["last_seen_at"].isoformat() if a["last_seen_at"] else None,
        "version": a["version"],
    }
