"""Request bodies refused past their route's limit while they stream in, before any authentication.

Django reads a request's whole body (into a temporary file past FILE_UPLOAD_MAX_MEMORY_SIZE) before a view,
its login or its CSRF check sees it, and uvicorn sets no limit: an anonymous 48 MiB POST to the login page
was read and written whole before its 403. This ASGI wrapper, around every HTTP request both servers take
(control_plane.asgi), answers 413 at once to a Content-Length over the route's limit, without reading the
body, and to a chunked body as soon as its running total passes the limit: the application then sees a
disconnect, never a byte past the limit. The 413 says `Connection: close`, so uvicorn closes the connection
instead of reading (and discarding) the rest, past a small allowance (LINGER_BYTES).

Each limit is the one its endpoint already applies after reading, plus room for the framing around it, so a
body the endpoint would take is never refused here. Daphne (Twisted) buffers a whole body before it calls the
application, so under daphne (development only) this refuses the body only after it has been read.
"""

from __future__ import annotations

import json
import os

from django.conf import settings

from agents_app.api import JSON_LIMIT as AGENT_JSON_LIMIT
from tasks_app.api import DOCUMENT_LIMIT
from tasks_app.workflows.admin_views import IMPORT_MAX_BYTES

KIB = 1024
# The dashboard's own forms (login, decide, answer, operate): a few fields, messages cut at 10,000 characters,
# a hosts page's list of ids. The admin has its own, larger limit (below).
FORM_MAX_BYTES = int(os.environ.get("CP_MAX_BODY_BYTES_FORMS", 1024 * KIB))
# The run API's calls other than a submit (tasks_app.api reads at most 64 KiB of them).
RUN_API_MAX_BYTES = 64 * KIB
# Multipart framing around an artifact (boundaries, part headers, the relative path as field `name`): as
# agents_app.api.upload_artifact's own Content-Length check allows.
MULTIPART_OVERHEAD = 64 * KIB

AGENT_ATTEMPT_PREFIX = "/api/v1/attempts/"
# A client a little over the limit is still sending when the 413 goes out, and closing the connection then
# resets it under the client, which never reads the answer. Up to this much more is read and dropped (never
# stored) first, so such a client gets its 413; a body far over the limit is cut off at once.
LINGER_BYTES = 1024 * KIB


def _limits() -> dict[str, int]:
    # Read once, when the wrapper is built: the settings are final by then, and a request costs no lookups.
    return {
        "artifacts": settings.CP_ARTIFACT_MAX_BYTES + MULTIPART_OVERHEAD,
        "complete": settings.CP_RESULT_MAX_BYTES + 128 * KIB,  # as agents_app.api.complete
        "progress": settings.CP_LOG_MAX_BYTES * 4 + 8 * KIB,  # as agents_app.api.progress
        "input-requests": 256 * KIB,  # as agents_app.api.create_input_request
        "agent": AGENT_JSON_LIMIT,
        "submit": DOCUMENT_LIMIT,
        "api": RUN_API_MAX_BYTES,
        # The workflow editor's form fields (up to DATA_UPLOAD_MAX_MEMORY_SIZE) or a DAG document's import.
        "admin": max(settings.DATA_UPLOAD_MAX_MEMORY_SIZE, IMPORT_MAX_BYTES + MULTIPART_OVERHEAD),
        "form": FORM_MAX_BYTES,
    }


def route_of(path: str) -> str:
    """Which limit of `_limits()` a request to `path` gets."""
    if path.startswith(AGENT_ATTEMPT_PREFIX):
        last = path.rstrip("/").rsplit("/", 1)[-1]
        return last if last in ("artifacts", "complete", "progress", "input-requests") else "agent"
    if path.startswith("/api/v1/agents/") or (path.startswith("/api/v1/input-requests/") and path.endswith("/wait")):
        return "agent"
    if path == "/api/v1/runs":
        return "submit"
    if path.startswith("/api/"):
        return "api"
    if path.startswith("/admin/"):
        return "admin"
    return "form"


def too_large_response(path: str, limit: int) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """(status, headers, body) of the 413: PROTOCOL.md's error shape on /api/, a plain page elsewhere."""
    if path.startswith("/api/"):
        body = json.dumps({"error": "too_large", "detail": f"the body may be at most {limit} bytes"}).encode()
        content_type = b"application/json"
    else:
        body = (
            '<!doctype html>\n<html lang="en"><head><title>Request body too large (413)</title></head>'
            f"<body><h1>Request body too large (413)</h1><p>A request here may carry at most {limit} bytes."
            "</p></body></html>\n"
        ).encode()
        content_type = b"text/html; charset=utf-8"
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        # The rest of the body is never read: the connection cannot carry another request.
        (b"connection", b"close"),
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
    ]
    return 413, headers, body


def _declared_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            return int(value) if value.strip().isdigit() else None
    return None


async def _drain(receive, budget: int) -> None:
    while budget > 0:
        message = await receive()
        if message["type"] != "http.request":
            return
        budget -= len(message.get("body", b""))
        if not message.get("more_body"):
            return


async def _refuse(send, path: str, limit: int) -> None:
    status, headers, body = too_large_response(path, limit)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _LimitedBody:
    """One request's receive and send, counting the body as it comes: past `limit`, the rest (up to
    LINGER_BYTES) is read and dropped, the 413 goes out unless the application has started its answer, the
    application sees a disconnect, and whatever it sends after that is dropped."""

    def __init__(self, receive, send, path: str, limit: int):
        self._receive, self._send, self.path, self.limit = receive, send, path, limit
        self.received = 0
        self.started = self.refused = False

    async def receive(self):
        if self.refused:
            return {"type": "http.disconnect"}
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                self.refused = True
                if message.get("more_body"):
                    await _drain(self._receive, LINGER_BYTES)
                if not self.started:
                    await _refuse(self._send, self.path, self.limit)
                # The application stops reading as for a client gone: it never sees the bytes past the limit.
                return {"type": "http.disconnect"}
        return message

    async def send(self, message) -> None:
        if self.refused:
            return  # the 413 is the answer; whatever the application says after its disconnect is dropped
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


def limit_bodies(app, limits: dict[str, int] | None = None):
    """`app` behind the body limits (route name -> bytes, `_limits()` unless given)."""
    limits = limits or _limits()

    async def wrapper(scope, receive, send):
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        path = scope["path"]
        limit = limits[route_of(path)]
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            if declared - limit <= LINGER_BYTES:
                await _drain(receive, declared)
            await _refuse(send, path, limit)
            return
        body = _LimitedBody(receive, send, path, limit)
        await app(scope, body.receive, body.send)

    return wrapper
