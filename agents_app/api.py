"""PROTOCOL.md's agent endpoints: thin async views that parse, call one action, shape the answer."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
from datetime import datetime, timedelta

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse
from django.utils import timezone

from control_plane.api_spec import (
    AGENT,
    BOOL,
    ENROLLMENT,
    INT,
    STR,
    TIME,
    UUID,
    Body,
    Bool,
    Int,
    Number,
    Obj,
    ObjList,
    Str,
    StrList,
    array,
    endpoint,
    enum,
    nullable,
    obj,
)
from control_plane.http_api import ApiError, db_call
from tasks_app import actions
from tasks_app.dag import NAME_RE
from tasks_app.hub import EventHub
from tasks_app.models import Artifact

from . import preflight, registry, tokens
from .preflight import EXECUTOR_RE

JSON_LIMIT = 64 * 1024  # agent calls other than complete/progress carry small bodies
TAG = "agents"


def _attempt_id(value: str) -> str:
    return _uuid_or_404(value, "attempt")


async def _agent(request) -> dict:
    EventHub.current()  # this process listens and sweeps from its first agent call on
    return await db_call(registry.authenticate_agent)(tokens.bearer(request.headers.get("Authorization")))


def _as_agent(action):
    """`action(agent, *args)` after authenticating the request's agent token, in one trip to the database
    executor (one thread hop, one pooled connection): the hot path of every task makes two such calls."""

    def run(token, *args, **kwargs):
        return action(registry.authenticate_agent(token), *args, **kwargs)

    call = db_call(run)

    async def act(request, *args, **kwargs):
        EventHub.current()
        return await call(tokens.bearer(request.headers.get("Authorization")), *args, **kwargs)

    return act


def _claim_now(agent: dict, capacity: int) -> tuple[dict, list]:
    return agent, actions.claim_ready_tasks(agent, capacity)


def _heartbeat_now(agent: dict, status: str, attempt_ids: list[str], first: bool) -> list[dict]:
    commands = actions.heartbeat(agent, status, attempt_ids, first=first)
    if registry.take_preflight_request(agent["id"]):
        commands.append({"type": "preflight"})  # an extra command (README, "API"): check executors again
    return commands


claim_as_agent = _as_agent(_claim_now)
heartbeat_as_agent = _as_agent(_heartbeat_now)
progress_as_agent = _as_agent(actions.record_progress)


def _complete_now(agent: dict, attempt_id: str, *args, claim: int | None = None, **kwargs) -> tuple[str, list | None]:
    """Complete, then (with `claim`, a capacity) claim the agent's next tasks in the same trip: a busy agent
    makes one request per task instead of two. No claim after a completion that held an executor back on this
    agent (a usage limit, a lost login): `agent` predates the hold, and the agent's next claim reads it."""
    task_state = actions.complete_attempt(agent, attempt_id, *args, **kwargs)
    if claim is None:
        return task_state, None
    outcome, _, error = args[:3]
    return task_state, [] if actions.holds_executor(outcome, error) else actions.claim_ready_tasks(agent, claim)


complete_as_agent = _as_agent(_complete_now)
create_input_as_agent = _as_agent(actions.create_input_request)
goodbye_as_agent = _as_agent(registry.say_goodbye)


TIMINGS = {"heartbeat_interval_s": INT, "lease_s": INT, "max_wait_s": INT}
REGISTER = Body(
    Str("name", 64, required=True, pattern=NAME_RE, shape="1-64 of [A-Za-z0-9._-]"),
    StrList("labels", 32, NAME_RE),
    StrList("executors", 16, EXECUTOR_RE, default=["shell"]),
    Int("capacity", 1, 64, default=1, doc="tasks at once"),
    Str("hostname", 255, default=""),
    Str("version", 64, default=""),
    Obj("executor_versions", default={}),
    # Extras to PROTOCOL.md (README, "API"): the daemon's pre-flight of every executor it was configured
    # with, and the current token of the identity it re-enrolls (so it may take its own online name).
    Obj("preflight", default={}, doc="an addition: {executor: {ok, version, error}} of the daemon's checks"),
    Str("replaces_token", 128, doc="an addition: the token of the identity this daemon re-enrolls"),
)


@endpoint(
    "POST",
    "agents/register",
    auth=ENROLLMENT,
    tag=TAG,
    body=REGISTER,
    errors=(403, 409),
    answers={201: obj({"agent_id": UUID, "token": STR, **TIMINGS})},
)
async def register(request, body):
    """Enroll an agent (enrollment token): its identity and token, once."""
    info = {**body, "preflight": preflight.parse_report(body["preflight"])}
    token = tokens.bearer(request.headers.get("Authorization"))
    agent, agent_token = await db_call(registry.register_agent)(token, info)
    return JsonResponse({"agent_id": str(agent.id), "token": agent_token, **_timings()}, status=201)


def _timings() -> dict:
    return {
        "heartbeat_interval_s": settings.CP_HEARTBEAT_INTERVAL_S,
        "lease_s": settings.CP_LEASE_S,
        "max_wait_s": settings.CP_MAX_WAIT_S,
    }


TASK = obj(
    {"id": UUID, "run_id": UUID, "key": STR, "title": STR, "executor": STR, "command": nullable(STR),
     "prompt": nullable(STR), "params": {"type": "object"}, "timeout_s": INT, "attempt": INT},
    {"inputs": {"type": "object"}, "workspace": obj({"repo": STR, "base_commit": nullable(STR),
     "merge": array(STR), "branch": STR}), "prices": {"type": "object"}, "resume_session": STR,
     "resume_unavailable": STR},
)  # fmt: skip
ASSIGNMENT_LIST = array(obj({"attempt_id": UUID, "lease_expires_at": TIME, "task": TASK}))
ASSIGNMENTS = obj({"assignments": ASSIGNMENT_LIST})


@endpoint(
    "POST",
    "agents/claim",
    auth=AGENT,
    tag=TAG,
    answers={200: ASSIGNMENTS},
    errors=(403,),
    body=Body(
        Int("capacity", 1, 64, default=1),
        Number(
            "wait_s", 0, lambda: settings.CP_MAX_WAIT_S, default=0, doc="how long to hold the request open for work"
        ),
    ),
)
async def claim(request, body):
    """Claim ready tasks: the long poll.

    In the waiting loop the waiter is registered before each claim query, so a task made
    ready while the query runs still wakes us: no notification can fall between "nothing for you" and "wait".
    The first query, before any waiter exists, only serves work already waiting; finding none, the loop
    registers and looks again."""
    capacity, wait_s = body["capacity"], body["wait_s"]
    deadline = time.monotonic() + wait_s
    # The busy fleet's case first: work is waiting, so authenticate and claim in one go.
    agent, assignments = await claim_as_agent(request, capacity)
    if assignments or wait_s <= 0:
        return JsonResponse({"assignments": assignments})
    hub = EventHub.current()
    claim_tasks = db_call(actions.claim_ready_tasks)
    woken, woken_for = False, None
    while True:
        # A draining agent still parks (PROTOCOL.md: the call holds), but must not spend tasks' wake-ups.
        waiter = hub.register(agent["labels"], agent["executors"], active=actions.may_claim(agent))
        try:
            if woken:
                # Meanwhile the agent may have been revoked, disabled, or have reported a failed pre-flight:
                # who it is and what it may run are read again (in the claim's own trip to the database).
                agent, assignments = await claim_as_agent(request, capacity)
            else:
                assignments = await claim_tasks(agent, capacity)
            remaining = deadline - time.monotonic()
            if assignments or remaining <= 0:
                return JsonResponse({"assignments": assignments})
            try:
                await asyncio.wait_for(waiter.event.wait(), remaining)
            except TimeoutError:
                return JsonResponse({"assignments": []})
            woken = True
        except asyncio.CancelledError:
            # The agent hung up (control_plane/agent_asgi.py cancels the view), perhaps woken for a task it
            # will now never claim: while parked, or claiming after the wake-up of the round before.
            hub.unregister(waiter)  # first, so that the wake-up goes to another
            hub.pass_on(waiter.woken_for or woken_for)
            raise
        finally:
            hub.unregister(waiter)
        woken_for = waiter.woken_for


COMMAND = obj({"type": enum("cancel", "drain", "shutdown", "preflight")}, {"attempt_id": UUID})
HEARTBEAT = Body(
    Str("status", 16, default="idle", choices=("idle", "busy", "draining")),
    StrList("attempts", 256, doc="the attempts this agent is running"),
    # An extra (README, "API"): `first`, the first heartbeat of a daemon's life, sent before its first claim.
    Bool("first", doc="an addition: the first heartbeat of a daemon's life"),
)


@endpoint(
    "POST",
    "agents/heartbeat",
    auth=AGENT,
    tag=TAG,
    body=HEARTBEAT,
    errors=(403,),
    answers={200: obj({"commands": array(COMMAND), **TIMINGS})},
)
async def heartbeat(request, body):
    """Extend the leases of this agent's attempts; answer with commands for it."""
    try:
        attempt_ids = [str(uuid.UUID(a)) for a in body["attempts"]]
    except ValueError:
        raise ApiError(400, "bad_request", "'attempts' must list attempt ids") from None
    commands = await heartbeat_as_agent(request, body["status"], attempt_ids, body["first"])
    # The timings ride along (an extra to PROTOCOL.md) so an agent that re-used its identity after a restart
    # learns them without registering again.
    return JsonResponse({"commands": commands, **_timings()})


@endpoint(
    "POST",
    "agents/preflight",
    auth=AGENT,
    tag=TAG,
    body=Body(Obj("preflight", required=True)),
    errors=(403,),
    answers={200: obj({"executors": array(STR)})},
)
async def report_preflight(request, body):
    """An addition: the agent's new pre-flight, its offered executors become those that passed.

    Sent at start-up with a saved identity and after a `preflight` command."""
    report = preflight.parse_report(body["preflight"])
    agent = await _agent(request)
    passed = await db_call(registry.record_preflight)(agent["id"], report)
    return JsonResponse({"executors": passed})


@endpoint("POST", "agents/goodbye", auth=AGENT, tag=TAG, errors=(400, 403, 413), answers={200: obj({"lost": INT})})
async def goodbye(request):
    """An addition: a daemon stopping cleanly goes offline at once.

    Rather than after 3 heartbeat intervals of silence; attempts it still holds are lost. Body: {} (ignored)."""
    return JsonResponse(await goodbye_as_agent(request))


def _progress_limit() -> int:
    return settings.CP_LOG_MAX_BYTES * 4 + 8192


USAGE_TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")
# PROTOCOL.md v1.1's `usage`, cumulative for the attempt; what is missing counts 0.
USAGE = Obj(
    "usage",
    Body(
        Str("model", 200, default=""),
        *(Int(name, 0, 10**13, default=0) for name in USAGE_TOKENS),
        Number("cost_usd", 0, 10**7, default=0),
        Bool("cost_estimated"),
    ),
)
PROGRESS = Body(
    Number("progress", 0, 1),
    Str("message", 1000),
    # Only the type here: a log over the limit is "too large" (413, below), not a malformed field (400).
    Str("log", _progress_limit, doc="text to append, at most CP_LOG_MAX_BYTES (64 KiB) a call"),
    USAGE,
)


@endpoint(
    "POST",
    "attempts/<str:attempt_id>/progress",
    auth=AGENT,
    tag=TAG,
    body=PROGRESS,
    limit=_progress_limit,
    errors=(403, 404, 409),
    answers={200: obj({"lease_expires_at": TIME, "cancel": BOOL}, {"cancel_reason": STR})},
)
async def progress(request, attempt_id: str, body):
    """Report progress, a message and log text; extends the lease."""
    log_text = body["log"]
    if log_text is not None and len(log_text.encode("utf-8", "surrogatepass")) > settings.CP_LOG_MAX_BYTES:
        raise ApiError(413, "too_large", f"'log' may be at most {settings.CP_LOG_MAX_BYTES} bytes a call")
    usage = _usage_report(body["usage"])
    answer = await progress_as_agent(request, _attempt_id(attempt_id), body["progress"], body["message"], log_text,
                                     usage)  # fmt: skip
    return JsonResponse(answer)


def _result_limit() -> int:
    return settings.CP_RESULT_MAX_BYTES + 128 * 1024


# A provider's reset is honoured up to a week ahead: a later one is more likely a misread date than a limit.
MAX_HOLD_S = 7 * 86400
SHA_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def _uuid_text(value: str) -> str:
    return str(uuid.UUID(value))


# PROTOCOL.md v1.1 complete's `commit`, and as additions `files` and `diff_artifact` (README, "API").
COMMIT = Obj(
    "commit",
    Body(
        Str("sha", 64, pattern=SHA_RE, shape="a full commit sha or null", doc="null when the task changed nothing"),
        Str("branch", 400, default=""),
        Int("files_changed", 0, 10**9, default=0),
        Int("insertions", 0, 10**12, default=0),
        Int("deletions", 0, 10**12, default=0),
        Str("diff_artifact", 64, convert=_uuid_text, shape="an artifact id", format="uuid",
            doc="an addition: the artifact this attempt uploaded holding the whole patch"),
        ObjList("files", Body(Str("path", 4096, required=True), Int("insertions", 0, 10**12, default=0),
                              Int("deletions", 0, 10**12, default=0)), 10_000, doc="an addition: per file"),
    ),
)  # fmt: skip
COMPLETE = Body(
    Str("outcome", 16, required=True, choices=("succeeded", "failed", actions.RATE_LIMITED)),
    Obj("result", doc="at most CP_RESULT_MAX_BYTES (1 MiB) as compact JSON"),
    Str("error", 100_000, default=""),
    Int("exit_code", -(2**31), 2**31 - 1),
    COMMIT,
    USAGE,
    Str("session_id", 128, doc="the CLI's session or thread id"),
    Str("resets_at", 64, doc="outcome rate_limited: when the provider's limit resets (ISO-8601 with a zone)"),
    Number("retry_after_s", 0, MAX_HOLD_S, doc="outcome rate_limited: else, seconds from now"),
    # An addition (README, "API"): complete and claim the next tasks in one request.
    Obj("claim", Body(Int("capacity", 1, 64, default=1)),
        doc="an addition: claim up to `capacity` tasks in the same request, answered as `assignments`"),
)  # fmt: skip


@endpoint(
    "POST",
    "attempts/<str:attempt_id>/complete",
    auth=AGENT,
    tag=TAG,
    body=COMPLETE,
    limit=_result_limit,
    errors=(403, 404, 409),
    answers={200: obj({"task_state": STR}, {"assignments": ASSIGNMENT_LIST})},
)
async def complete(request, attempt_id: str, body):
    """Report an attempt's outcome; the same completion sent again changes nothing."""
    result = body["result"]
    if result is not None and _json_size(result) > settings.CP_RESULT_MAX_BYTES:
        raise ApiError(413, "too_large", f"'result' may be at most {settings.CP_RESULT_MAX_BYTES} bytes")
    rate_limited = body["outcome"] == actions.RATE_LIMITED
    hold_until = _hold_until(body["resets_at"], body["retry_after_s"]) if rate_limited else None
    claim = body["claim"]["capacity"] if body["claim"] is not None else None
    task_state, assignments = await complete_as_agent(
        request, _attempt_id(attempt_id), body["outcome"], result, body["error"] or "", body["exit_code"],
        _commit_report(body["commit"]), usage=_usage_report(body["usage"]), session_id=body["session_id"],
        hold_until=hold_until, claim=claim,
    )  # fmt: skip
    if assignments is None:
        return JsonResponse({"task_state": task_state})
    return JsonResponse({"task_state": task_state, "assignments": assignments})


def _usage_report(report: dict | None) -> dict | None:
    if report is not None:
        report["cost_usd"] = float(report["cost_usd"])
    return report


def _hold_until(resets_at: str | None, after: float | None):
    """Until when outcome rate_limited holds the executor back: `resets_at`, else `retry_after_s` from now,
    else CP_RATE_LIMIT_HOLD_S; never in the past, at most MAX_HOLD_S ahead."""
    now = timezone.now()
    if resets_at is not None:
        try:
            until = datetime.fromisoformat(resets_at)
        except ValueError:
            raise ApiError(400, "bad_request", "'resets_at' must be an ISO-8601 time") from None
        if until.tzinfo is None:
            raise ApiError(400, "bad_request", "'resets_at' must name its time zone (an offset or Z)")
    else:
        until = now + timedelta(seconds=after if after is not None else settings.CP_RATE_LIMIT_HOLD_S)
    return min(max(until, now + timedelta(seconds=1)), now + timedelta(seconds=MAX_HOLD_S))


def _commit_report(report: dict | None) -> dict | None:
    """The checked `commit`, keeping only the additions it was sent (files, diff_artifact)."""
    if report is None:
        return None
    for addition in ("diff_artifact", "files"):
        if report[addition] is None:
            del report[addition]
    return report


def _json_size(value) -> int:
    """The size of `value` as compact UTF-8 JSON: what PROTOCOL.md's "result at most 1 MiB" measures."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"))


# Input requests (PROTOCOL.md v1.1): the longest a permission may wait for a person, and how often a waiting
# agent's long poll looks for the answer. A plain poll of one indexed row: waiting agents are few (one per
# question a person has not answered), and 0.2 s keeps "answer -> agent" well under a second.
INPUT_TIMEOUT_MAX_S = 7 * 86400
INPUT_POLL_S = 0.2


INPUT_REQUEST = Body(
    Str("kind", 32, default="permission", choices=("permission", "question")),
    Str("tool", 200, default="", doc="a permission's tool (required for kind permission)"),
    Obj("input", default={}, doc="the tool's input"),
    Str("question", 10_000, default=""),
    # An addition (README, "API"): after this long unanswered, the server answers deny (params.input_timeout_s).
    Number("timeout_s", 1, INPUT_TIMEOUT_MAX_S, default=3600, doc="an addition: answered deny after this long"),
)


@endpoint(
    "POST",
    "attempts/<str:attempt_id>/input-requests",
    auth=AGENT,
    tag=TAG,
    body=INPUT_REQUEST,
    limit=256 * 1024,
    errors=(403, 404, 409),
    answers={201: obj({"request_id": UUID})},
)
async def create_input_request(request, attempt_id: str, body):
    """Ask a person: a permission for a tool, or a question."""
    if body["kind"] == "permission" and not body["tool"]:
        raise ApiError(400, "bad_request", "a permission request names its 'tool'")
    request_id = await create_input_as_agent(
        request, _attempt_id(attempt_id), kind=body["kind"], tool=body["tool"], tool_input=body["input"],
        question=body["question"], timeout_s=body["timeout_s"],
    )  # fmt: skip
    return JsonResponse({"request_id": request_id}, status=201)


ANSWER = obj({"behavior": enum("allow", "deny"), "message": STR})
INPUT_STATE = obj({"state": enum("pending", "answered")}, {"answer": ANSWER})


@endpoint(
    "POST",
    "input-requests/<str:request_id>/wait",
    auth=AGENT,
    tag=TAG,
    errors=(403, 404, 409),
    body=Body(Number("wait_s", 0, lambda: settings.CP_MAX_WAIT_S, default=0)),
    answers={200: INPUT_STATE},
)
async def wait_input_request(request, request_id: str, body):
    """The long poll for a person's answer: {"state": "pending"} after `wait_s`, or the answer at once."""
    wait_s = body["wait_s"]
    request_id = _uuid_or_404(request_id, "input request")
    agent = await _agent(request)
    look = db_call(actions.input_request_state)
    deadline = time.monotonic() + wait_s
    while True:
        answer = await look(agent, request_id)
        if answer["state"] != "pending" or time.monotonic() + INPUT_POLL_S > deadline:
            return JsonResponse(answer)
        await asyncio.sleep(INPUT_POLL_S)


def _uuid_or_404(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ApiError(404, "not_found", f"no {what} with that id") from None


ARTIFACT_FORM = {
    "type": "object",
    "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary"}, "name": {"type": "string", "maxLength": 512}},
}


@endpoint(
    "POST",
    "attempts/<str:attempt_id>/artifacts",
    auth=AGENT,
    tag=TAG,
    limit=None,
    body_kind="multipart",
    body_schema=ARTIFACT_FORM,
    errors=(400, 403, 404, 409, 413),
    answers={201: obj({"artifact_id": UUID, "name": STR, "size": INT, "sha256": STR})},
)
async def upload_artifact(request, attempt_id: str):
    """Upload a file of the attempt (multipart field `file`, optional `name`)."""
    limit = settings.CP_ARTIFACT_MAX_BYTES
    length = request.META.get("CONTENT_LENGTH") or "0"
    if length.isdigit() and int(length) > limit + 64 * 1024:
        raise ApiError(413, "too_large", f"an artifact may be at most {limit} bytes")
    agent = await _agent(request)
    attempt_id = _attempt_id(attempt_id)
    artifact = await db_call(_store_artifact)(request, agent, attempt_id, limit)
    return JsonResponse(
        {"artifact_id": str(artifact.id), "name": artifact.name, "size": artifact.size, "sha256": artifact.sha256},
        status=201,
    )


# C0 and C1 controls and DEL: a NUL cannot be stored in PostgreSQL text, a CR or LF would split the download's
# Content-Disposition header, and none of them belongs in a name a person reads on the task page.
_CONTROL_CHARACTER = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _artifact_name(name: str) -> str:
    if found := _CONTROL_CHARACTER.search(name):
        raise ApiError(400, "bad_request", f"an artifact's name may not hold control characters ({found[0]!r} found)")
    return name[:512]


def _store_artifact(request, agent: dict, attempt_id: str, limit: int) -> Artifact:
    content_type = request.META.get("CONTENT_TYPE", "")
    if not content_type.startswith("multipart/form-data"):
        raise ApiError(400, "bad_request", "send the file as multipart/form-data, field 'file'")
    try:
        upload = request.FILES.get("file")
    except RequestDataTooBig:
        raise ApiError(413, "too_large", f"an artifact may be at most {limit} bytes") from None
    except Exception as exc:  # a malformed multipart body
        raise ApiError(400, "bad_request", f"unreadable multipart body: {exc}") from None
    if upload is None:
        raise ApiError(400, "bad_request", "the multipart field 'file' is missing")
    if upload.size > limit:
        raise ApiError(413, "too_large", f"an artifact may be at most {limit} bytes")
    content = upload.read()
    name = _artifact_name(request.POST.get("name") or upload.name or "artifact")
    return actions.add_artifact(
        agent,
        attempt_id,
        name=name,
        content=content,
        sha256=hashlib.sha256(content).hexdigest(),
        content_type=(upload.content_type or "application/octet-stream")[:128],
    )
