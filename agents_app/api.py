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

from control_plane.http_api import ApiError, Fields, api_view, db_call, json_body, require_method
from tasks_app import actions
from tasks_app.dag import NAME_RE
from tasks_app.hub import EventHub
from tasks_app.models import Artifact

from . import preflight, registry, tokens
from .preflight import EXECUTOR_RE

JSON_LIMIT = 64 * 1024  # agent calls other than complete/progress carry small bodies


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
complete_as_agent = _as_agent(actions.complete_attempt)
create_input_as_agent = _as_agent(actions.create_input_request)
goodbye_as_agent = _as_agent(registry.say_goodbye)


@api_view
async def register(request):
    require_method(request, "POST")
    f = Fields(json_body(request, JSON_LIMIT))
    info = {
        "name": f.str("name", 64, required=True),
        "labels": f.str_list("labels", 32, NAME_RE),
        "executors": f.str_list("executors", 16, EXECUTOR_RE, default=["shell"]),
        "capacity": f.int("capacity", 1, 64, default=1),
        "hostname": f.str("hostname", 255, default=""),
        "version": f.str("version", 64, default=""),
        "executor_versions": f.obj("executor_versions", default={}),
        # Extras to PROTOCOL.md (README, "API"): the daemon's pre-flight of every executor it was configured
        # with, and the current token of the identity it re-enrolls (so it may take its own online name).
        "preflight": preflight.parse_report(f.obj("preflight", default={})),
        "replaces_token": f.str("replaces_token", 128),
    }
    if not NAME_RE.fullmatch(info["name"]):
        raise ApiError(400, "bad_request", "'name' must be 1-64 of [A-Za-z0-9._-]")
    token = tokens.bearer(request.headers.get("Authorization"))
    agent, agent_token = await db_call(registry.register_agent)(token, info)
    return JsonResponse({"agent_id": str(agent.id), "token": agent_token, **_timings()}, status=201)


def _timings() -> dict:
    return {
        "heartbeat_interval_s": settings.CP_HEARTBEAT_INTERVAL_S,
        "lease_s": settings.CP_LEASE_S,
        "max_wait_s": settings.CP_MAX_WAIT_S,
    }


@api_view
async def claim(request):
    """The long poll. In the waiting loop the waiter is registered before each claim query, so a task made
    ready while the query runs still wakes us: no notification can fall between "nothing for you" and "wait".
    The first query, before any waiter exists, only serves work already waiting; finding none, the loop
    registers and looks again."""
    require_method(request, "POST")
    f = Fields(json_body(request, JSON_LIMIT))
    capacity = f.int("capacity", 1, 64, default=1)
    wait_s = f.number("wait_s", 0, settings.CP_MAX_WAIT_S, default=0)
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


@api_view
async def heartbeat(request):
    require_method(request, "POST")
    f = Fields(json_body(request, JSON_LIMIT))
    status = f.str("status", 16, default="idle", choices=("idle", "busy", "draining"))
    attempt_ids = f.str_list("attempts", 256)
    try:
        attempt_ids = [str(uuid.UUID(a)) for a in attempt_ids]
    except ValueError:
        raise ApiError(400, "bad_request", "'attempts' must list attempt ids") from None
    # An extra (README, "API"): `first`, the first heartbeat of a daemon's life, sent before its first claim.
    first = f.bool("first")
    commands = await heartbeat_as_agent(request, status, attempt_ids, first)
    # The timings ride along (an extra to PROTOCOL.md) so an agent that re-used its identity after a restart
    # learns them without registering again.
    return JsonResponse({"commands": commands, **_timings()})


@api_view
async def report_preflight(request):
    """An extra endpoint (README, "API"): the agent's new pre-flight, sent at start-up with a saved identity
    and after a `preflight` command. Its offered executors become those that passed."""
    require_method(request, "POST")
    f = Fields(json_body(request, JSON_LIMIT))
    report = preflight.parse_report(f.obj("preflight", required=True))
    agent = await _agent(request)
    passed = await db_call(registry.record_preflight)(agent["id"], report)
    return JsonResponse({"executors": passed})


@api_view
async def goodbye(request):
    """An extra endpoint (README, "API"): a daemon stopping cleanly says so, and is offline at once rather
    than after 3 heartbeat intervals of silence; attempts it still holds are lost. Body: {} (ignored)."""
    require_method(request, "POST")
    json_body(request, JSON_LIMIT)
    return JsonResponse(await goodbye_as_agent(request))


@api_view
async def progress(request, attempt_id: str):
    require_method(request, "POST")
    body_limit = settings.CP_LOG_MAX_BYTES * 4 + 8192
    f = Fields(json_body(request, body_limit))
    value = f.number("progress", 0, 1)
    message = f.str("message", 1000)
    # Only the type here: a log over the limit is "too large" (413, below), not a malformed field (400).
    log_text = f.str("log", body_limit)
    if log_text is not None and len(log_text.encode("utf-8", "surrogatepass")) > settings.CP_LOG_MAX_BYTES:
        raise ApiError(413, "too_large", f"'log' may be at most {settings.CP_LOG_MAX_BYTES} bytes a call")
    usage = _usage_report(f.obj("usage"))
    answer = await progress_as_agent(request, _attempt_id(attempt_id), value, message, log_text, usage)
    return JsonResponse(answer)


@api_view
async def complete(request, attempt_id: str):
    require_method(request, "POST")
    f = Fields(json_body(request, settings.CP_RESULT_MAX_BYTES + 128 * 1024))
    outcome = f.str("outcome", 16, required=True, choices=("succeeded", "failed", actions.RATE_LIMITED))
    result = f.obj("result")
    if result is not None and _json_size(result) > settings.CP_RESULT_MAX_BYTES:
        raise ApiError(413, "too_large", f"'result' may be at most {settings.CP_RESULT_MAX_BYTES} bytes")
    error = f.str("error", 100_000, default="")
    exit_code = f.int("exit_code", -(2**31), 2**31 - 1)
    commit = _commit_report(f.obj("commit"))
    usage = _usage_report(f.obj("usage"))
    session_id = f.str("session_id", 128)
    hold_until = _hold_until(f) if outcome == actions.RATE_LIMITED else None
    task_state = await complete_as_agent(
        request, _attempt_id(attempt_id), outcome, result, error or "", exit_code, commit,
        usage=usage, session_id=session_id, hold_until=hold_until,
    )  # fmt: skip
    return JsonResponse({"task_state": task_state})


USAGE_TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")


def _usage_report(value: dict | None) -> dict | None:
    """PROTOCOL.md v1.1's `usage`: {model, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens,
    reasoning_tokens, cost_usd, cost_estimated}, cumulative for the attempt; what is missing counts 0."""
    if value is None:
        return None
    u = Fields(value, "usage.")
    report = {"model": u.str("model", 200, default="")}
    for name in USAGE_TOKENS:
        report[name] = u.int(name, 0, 10**13, default=0)
    report["cost_usd"] = float(u.number("cost_usd", 0, 10**7, default=0))
    report["cost_estimated"] = u.bool("cost_estimated")
    return report


# A provider's reset is honoured up to a week ahead: a later one is more likely a misread date than a limit.
MAX_HOLD_S = 7 * 86400


def _hold_until(f: Fields):
    """Until when outcome rate_limited holds the executor back: `resets_at`, else `retry_after_s` from now,
    else CP_RATE_LIMIT_HOLD_S; never in the past, at most MAX_HOLD_S ahead."""
    now = timezone.now()
    resets_at, after = f.str("resets_at", 64), f.number("retry_after_s", 0, MAX_HOLD_S)
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


SHA_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")


def _commit_report(value: dict | None) -> dict | None:
    """PROTOCOL.md v1.1 complete's `commit`: {sha (null when the task changed nothing), branch, files_changed,
    insertions, deletions}, and as additions `files`: [{path, insertions, deletions}] and `diff_artifact`
    (README, "API")."""
    if value is None:
        return None
    c = Fields(value)
    sha = c.str("sha", 64)
    if sha is not None and not SHA_RE.fullmatch(sha):
        raise ApiError(400, "bad_request", "'commit.sha' must be a full commit sha or null")
    report = {
        "sha": sha,
        "branch": c.str("branch", 400, default=""),
        "files_changed": c.int("files_changed", 0, 10**9, default=0),
        "insertions": c.int("insertions", 0, 10**12, default=0),
        "deletions": c.int("deletions", 0, 10**12, default=0),
    }
    # An addition (README, "API"): the artifact this attempt uploaded holding the whole patch.
    diff_artifact = c.str("diff_artifact", 64)
    if diff_artifact is not None:
        try:
            report["diff_artifact"] = str(uuid.UUID(diff_artifact))
        except ValueError:
            raise ApiError(400, "bad_request", "'commit.diff_artifact' must be an artifact id") from None
    files = value.get("files")
    if files is not None:
        if not isinstance(files, list) or len(files) > 10_000:
            raise ApiError(400, "bad_request", "'commit.files' must be a list of at most 10000 files")
        report["files"] = []
        for entry in files:
            e = Fields(entry if isinstance(entry, dict) else {"path": None})
            report["files"].append(
                {"path": e.str("path", 4096, required=True), "insertions": e.int("insertions", 0, 10**12, default=0),
                 "deletions": e.int("deletions", 0, 10**12, default=0)}
            )  # fmt: skip
    return report


def _json_size(value) -> int:
    """The size of `value` as compact UTF-8 JSON: what PROTOCOL.md's "result at most 1 MiB" measures."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass"))


# Input requests (PROTOCOL.md v1.1): the longest a permission may wait for a person, and how often a waiting
# agent's long poll looks for the answer. A plain poll of one indexed row: waiting agents are few (one per
# question a person has not answered), and 0.2 s keeps "answer -> agent" well under a second.
INPUT_TIMEOUT_MAX_S = 7 * 86400
INPUT_POLL_S = 0.2


@api_view
async def create_input_request(request, attempt_id: str):
    require_method(request, "POST")
    f = Fields(json_body(request, 256 * 1024))
    kind = f.str("kind", 32, default="permission", choices=("permission", "question"))
    tool = f.str("tool", 200, default="")
    tool_input = f.obj("input", default={})
    question = f.str("question", 10_000, default="")
    # An addition (README, "API"): after this long unanswered, the server answers deny (params.input_timeout_s).
    timeout_s = f.number("timeout_s", 1, INPUT_TIMEOUT_MAX_S, default=3600)
    if kind == "permission" and not tool:
        raise ApiError(400, "bad_request", "a permission request names its 'tool'")
    request_id = await create_input_as_agent(
        request, _attempt_id(attempt_id), kind=kind, tool=tool, tool_input=tool_input, question=question,
        timeout_s=timeout_s,
    )  # fmt: skip
    return JsonResponse({"request_id": request_id}, status=201)


@api_view
async def wait_input_request(request, request_id: str):
    """The long poll for a person's answer: {"state": "pending"} after `wait_s`, or the answer at once."""
    require_method(request, "POST")
    f = Fields(json_body(request, JSON_LIMIT))
    wait_s = f.number("wait_s", 0, settings.CP_MAX_WAIT_S, default=0)
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


@api_view
async def upload_artifact(request, attempt_id: str):
    require_method(request, "POST")
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
