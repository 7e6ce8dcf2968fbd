"""PROTOCOL.md's run endpoints (API token; the user's permissions apply) and artifact downloads."""

from __future__ import annotations

import uuid

from django.db.models.functions import Length
from django.http import HttpResponse, JsonResponse

from agents_app import registry, tokens
from control_plane import openapi
from control_plane.api_spec import (
    BOOL,
    INT,
    NUM,
    OBJECT,
    PUBLIC,
    STR,
    TIME,
    USER,
    UUID,
    Body,
    Int,
    Number,
    Query,
    QueryChoice,
    QueryInt,
    Str,
    StrMap,
    array,
    endpoint,
    enum,
    nullable,
    obj,
)
from control_plane.db_outage import check_database
from control_plane.http_api import ApiError, db_call, json_body
from control_plane.web import user_actor

from . import actions
from .dag import MAX_COST_USD, document_schema, params_from_pairs, parse_document, with_overrides
from .dashboard import panels, reports, waiting
from .models import Artifact, Attempt, Run, Task, Workflow
from .states import AttemptState, RunState, TaskState
from .workflows import documents

DOCUMENT_LIMIT = 16 * 1024 * 1024
RUNS, TASKS, FLEET = "runs", "tasks", "fleet"


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


@endpoint("GET", "health", auth=PUBLIC, tag="service", limit=None, answers={200: obj({"status": enum("ok")})})
async def health(request):
    """Health: 200 while this process can reach the database (one round trip), 503 while it cannot."""
    await db_call(check_database)()
    return JsonResponse({"status": "ok"})


START_QUERY = (
    Query("repo", "an addition: the repository, overriding the document's workspace.repo"),
    Query("base", "an addition: the base branch, tag or commit, overriding workspace.base"),
    Query("param", "an addition: NAME=VALUE, overriding the document's params (repeatable)", repeat=True),
)
SUBMITTED = obj({"run_id": UUID, "tasks": INT}, {"warnings": array(STR)})


@endpoint("POST", "runs", auth=USER, tag=RUNS, limit=None, body_kind="document", body_schema=document_schema(),
          query=START_QUERY, errors=(400, 403, 413, 422), answers={201: SUBMITTED})  # fmt: skip
async def submit_run(request, query):
    """Submit a DAG document (JSON, or YAML with Content-Type application/yaml): a new run.

    The answer's `warnings` (an addition) name the tasks no online agent can run."""
    document = _document_body(request)
    overrides = _overrides(query["repo"], query["base"], query["param"])

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


COUNTS = {"type": "object", "properties": {state: INT for state in TaskState.ALL}}
RUN_SUMMARY = obj(
    {"run_id": UUID, "name": STR, "state": enum(*RunState.ALL), "tasks": INT, "counts": COUNTS, "progress": NUM,
     "created_at": TIME, "finished_at": nullable(TIME), "eta": nullable(TIME)}
)  # fmt: skip


@endpoint("GET", "runs", auth=USER, tag=RUNS, limit=None, errors=(400, 403, 404),
          query=(QueryChoice("state", RunState.ALL), Query("workflow", "a workflow's name"),
                 QueryInt("limit", 1, 500, default=50)),
          answers={200: obj({"runs": array(RUN_SUMMARY)})})  # fmt: skip
async def list_runs(request, query):
    """An addition: the newest runs, filtered by state or workflow."""
    state, workflow, limit = query["state"], query["workflow"], query["limit"]

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
            for r in panels.run_summaries(limit=limit, state=state, workflow=workflow)
        ]

    return JsonResponse({"runs": await db_call(load)()})


RUN_TASK = obj(
    {"id": UUID, "key": STR, "state": enum(*TaskState.ALL), "attempt": INT, "progress": NUM, "agent": nullable(STR),
     "started_at": nullable(TIME), "finished_at": nullable(TIME)},
    {"waiting": nullable(STR), "commit": nullable(STR), "awaiting": enum(None, "input", "approval"),
     "cost_usd": nullable(NUM), "session_id": nullable(STR), "usage": nullable(OBJECT)},
)  # fmt: skip
ARTIFACT = obj({"id": UUID, "name": STR, "size": INT, "sha256": STR}, {"task_id": UUID, "task": STR, "attempt": INT})
RUN = obj(
    {"run_id": UUID, "name": STR, "state": enum(*RunState.ALL), "tasks": array(RUN_TASK), "counts": COUNTS},
    {"created_at": TIME, "finished_at": nullable(TIME), "params": OBJECT, "cost_usd": NUM, "usage": OBJECT,
     "max_cost_usd": nullable(NUM), "pause_reason": STR, "artifacts": array(ARTIFACT),
     "workspace": nullable(obj({"repo": STR}, {"base": nullable(STR), "base_commit": nullable(STR),
                                               "branch_prefix": STR, "result_branch": nullable(STR),
                                               "result_commit": nullable(STR)}))},
)  # fmt: skip


@endpoint("GET", "runs/<str:run_id>", auth=USER, tag=RUNS, limit=None, errors=(403, 404), answers={200: RUN})
async def run_detail(request, run_id: str):
    """A run: its state, its tasks, their counts, cost and artifacts."""
    run_id = _uuid(run_id, "run")

    def load():
        _user(request, "tasks_app.view_run")
        return reports.run_status(run_id)

    return JsonResponse(await db_call(load)())


RUN_STATE = obj({"run_id": UUID, "state": enum(*RunState.ALL)})


def _run_action(action, verb: str, doc: str, body: Body | None = None):
    """A run operation's endpoint; the checked `body` gives the action's keyword arguments."""

    async def view(request, run_id: str, body=None):
        run_id_ = _uuid(run_id, "run")

        def act():
            user = _user(request, "tasks_app.change_run")
            return {"run_id": run_id_, "state": action(run_id_, user_actor(user), **(body or {}))}

        return JsonResponse(await db_call(act)())

    view.__name__, view.__doc__ = f"{verb}_run", doc
    return endpoint("POST", f"runs/<str:run_id>/{verb}", auth=USER, tag=RUNS, body=body, limit=4096,
                    errors=(400, 403, 404, 409, 413), answers={200: RUN_STATE})(view)  # fmt: skip


cancel_run = _run_action(actions.cancel_run, "cancel", "Cancel a run: its live attempts are told to stop.")
pause_run = _run_action(actions.pause_run, "pause", "Pause a run: nothing new is assigned; live attempts finish.")
# An addition (README, "API"): resume's body may raise the run's budget, {"max_cost_usd": N}.
resume_run = _run_action(
    actions.resume_run, "resume", "Resume a paused run (an addition: the body may raise its budget).",
    Body(Number("max_cost_usd", 0, MAX_COST_USD, doc="an addition: the run's new budget in US dollars")),
)  # fmt: skip


TASK_STATE = obj({"task_id": UUID, "state": enum(*TaskState.ALL)})
# Checked by actions.edit_task as a document's task is (a 422 naming the field): described from its list.
RETRY_EDITS = {
    "type": "object",
    "additionalProperties": False,
    "properties": {k: v for k, v in document_schema()["properties"]["tasks"]["items"]["properties"].items()
                   if k in actions.EDITABLE},
}  # fmt: skip


@endpoint("POST", "tasks/<str:task_id>/retry", auth=USER, tag=TASKS, limit=None, body_kind="json",
          body_schema=RETRY_EDITS, errors=(400, 403, 404, 409, 413, 422), answers={200: TASK_STATE})  # fmt: skip
async def retry_task(request, task_id: str):
    """Retry a failed or canceled task; an addition: the body may change its command, prompt or params.

    Each edit is checked as in a document (a 422 naming the field) and audited; downstream tasks that were
    skipped wait again."""
    task_id = _uuid(task_id, "task")
    edits = json_body(request, 64 * 1024)

    def act():
        user = _user(request, "tasks_app.change_task")
        return {"task_id": task_id, "state": actions.retry_task(task_id, user_actor(user), edits=edits or None)}

    return JsonResponse(await db_call(act)())


@endpoint("POST", "runs/<str:run_id>/retry-failed", auth=USER, tag=RUNS, limit=4096, errors=(400, 403, 404, 413),
          answers={200: obj({"run_id": UUID, "retried": array(STR), "state": enum(*RunState.ALL)})})  # fmt: skip
async def retry_failed(request, run_id: str):
    """An addition: retry every failed or canceled task of the run."""
    run_id = _uuid(run_id, "run")

    def act():
        user = _user(request, "tasks_app.change_task")
        retried = actions.retry_failed(run_id, user_actor(user))
        return {"run_id": run_id, "retried": retried, "state": Run.objects.get(pk=run_id).state}

    return JsonResponse(await db_call(act)())


@endpoint("POST", "runs/<str:run_id>/rerun", auth=USER, tag=RUNS, limit=4096, errors=(400, 403, 404, 413, 422),
          answers={201: obj({"run_id": UUID, "rerun_of": UUID, "tasks": INT})})  # fmt: skip
async def rerun(request, run_id: str):
    """An addition: a new run of the same document, linked to this one."""
    run_id = _uuid(run_id, "run")

    def act():
        user = _user(request, "tasks_app.add_run")
        run = documents.rerun(run_id, actor=user_actor(user), user=user)
        return {"run_id": str(run.id), "rerun_of": run_id, "tasks": run.tasks.count()}

    return JsonResponse(await db_call(act)(), status=201)


MESSAGE = Body(Str("message", 10_000, default=""))


def _decision(approve: bool):
    """PROTOCOL.md v1.1's approve / reject: 200 for a task awaiting approval, 409 otherwise; operators only."""

    async def view(request, task_id: str, body):
        task_id_ = _uuid(task_id, "task")

        def act():
            user = _user(request, "tasks_app.operate_run")
            state = actions.decide_approval(task_id_, approve, user_actor(user), body["message"])
            return {"task_id": task_id_, "state": state}

        return JsonResponse(await db_call(act)())

    verb = "approve" if approve else "reject"
    view.__name__ = f"{verb}_task"
    view.__doc__ = f"{verb.capitalize()} a task awaiting approval (it then {'succeeds' if approve else 'fails'})."
    return endpoint("POST", f"tasks/<str:task_id>/{verb}", auth=USER, tag=TASKS, body=MESSAGE,
                    errors=(403, 404, 409), answers={200: TASK_STATE})(view)  # fmt: skip


ANSWER_BODY = Body(Str("behavior", 8, required=True, choices=("allow", "deny")), Str("message", 10_000, default=""))


@endpoint("POST", "input-requests/<str:request_id>/answer", auth=USER, tag=TASKS, body=ANSWER_BODY,
          errors=(403, 404, 409),
          answers={200: obj({"request_id": UUID, "state": enum("answered"),
                             "answer": obj({"behavior": enum("allow", "deny"), "message": STR})})})  # fmt: skip
async def answer_input_request(request, request_id: str, body):
    """A person's answer to an agent's input request; 409 once answered."""
    request_id_ = _uuid(request_id, "input request")
    behavior, message = body["behavior"], body["message"]

    def act():
        user = _user(request, "tasks_app.operate_run")
        answer = actions.answer_input_request(request_id_, behavior, message, user_actor(user))
        return {"request_id": request_id_, "state": "answered", "answer": answer}

    return JsonResponse(await db_call(act)())


approve_task = _decision(True)
reject_task = _decision(False)


@endpoint("GET", "artifacts/<str:artifact_id>", auth=USER, tag=TASKS, limit=None, errors=(403, 404),
          answers={200: {"content": "application/octet-stream", "description": "the file"}})  # fmt: skip
async def artifact(request, artifact_id: str):
    """Download an artifact (an API token with view_artifact, or a signed-in person's session)."""
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


START = Body(
    StrMap("params", default={}, doc="run parameters overriding the workflow's defaults"),
    Str("repo", 2000, default=""),
    Str("base", 255, default=""),
    Int("priority", -1_000_000, 1_000_000),
    Int("max_parallel", 1, 100_000),
)


@endpoint("POST", "workflows/<str:name>/runs", auth=USER, tag=RUNS, body=START, errors=(403, 404, 422),
          answers={201: obj({"run_id": UUID, "tasks": INT})})  # fmt: skip
async def start_workflow(request, name: str, body):
    """An addition: a run of the workflow NAME, with a start's overrides (all optional), as `POST /runs`."""
    pairs = [f"{k}={v}" for k, v in body["params"].items()]
    overrides = _overrides(body["repo"], body["base"], pairs)
    priority, max_parallel = body["priority"], body["max_parallel"]

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


TASK = obj(
    {"id": UUID, "key": STR, "run_id": UUID, "state": enum(*TaskState.ALL), "executor": STR,
     "attempts": array(obj({"number": INT, "state": STR, "agent": nullable(STR), "started_at": nullable(TIME),
                            "finished_at": nullable(TIME), "exit_code": nullable(INT), "error": STR,
                            "log_chars": INT})),
     "artifacts": array(ARTIFACT)}
)  # fmt: skip


@endpoint("GET", "tasks/<str:task_id>", auth=USER, tag=TASKS, limit=None, errors=(403, 404), answers={200: TASK})
async def task_detail(request, task_id: str):
    """An addition: one task with every attempt and its artifacts."""
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


LOG_PAGE = obj(
    {"task_id": UUID, "attempt": INT, "attempts": INT, "state": STR, "done": BOOL, "offset": INT,
     "next_offset": INT, "log": STR}
)  # fmt: skip


@endpoint("GET", "tasks/<str:task_id>/log", auth=USER, tag=TASKS, limit=None, errors=(400, 403, 404),
          query=(QueryInt("attempt", 1, 2**31 - 1, doc="the attempt's number (default: the latest)"),
                 QueryInt("offset", 0, None, default=0, doc="the first character to read")),
          answers={200: LOG_PAGE})  # fmt: skip
async def task_log(request, task_id: str, query):
    """An addition: one attempt's log from a character offset, a page at a time.

    `done` once the attempt has ended and `next_offset` is the end of its log."""
    task_id = _uuid(task_id, "task")
    number, offset = query["attempt"], query["offset"]

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


AGENT_ENTRY = obj(
    {"id": UUID, "name": STR, "status": enum("disabled", "offline", "draining", "busy", "idle"), "labels": array(STR),
     "executors": array(STR), "capacity": INT, "tasks": array(STR), "last_seen_at": nullable(TIME),
     "version": STR}
)  # fmt: skip


@endpoint("GET", "agents", auth=USER, tag=FLEET, limit=None, errors=(403,),
          answers={200: obj({"agents": array(AGENT_ENTRY)})})  # fmt: skip
async def agents(request):
    """An addition: the fleet (the view_agent permission)."""

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


@endpoint("GET", "openapi.json", auth=PUBLIC, tag="service", limit=None, answers={200: OBJECT})
async def openapi_description(request):
    """This description: OpenAPI 3.1, built from the code that checks the requests."""
    return JsonResponse(openapi.document(), json_dumps_params={"indent": 1})
