"""What every JSON endpoint shares: PROTOCOL.md's error shape and body parsing (fields: api_spec.py; the database
calls of async views are control_plane/db.py's)."""

from __future__ import annotations

import functools
import json
import logging
import math
import re

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import JsonResponse

from control_plane import rate_limit
from control_plane.db import db_call
from control_plane.db_outage import DATABASE, DatabaseUnavailable, is_unavailable, unavailable_response
from tasks_app.dag import DagError
from tasks_app.errors import ActionError
from tasks_app.states import InvalidTransition

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status, self.code, self.detail = status, code, detail


def error_response(status: int, code: str, detail: str) -> JsonResponse:
    return JsonResponse({"error": code, "detail": detail}, status=status)


def api_view(view):
    """Turn every refusal into PROTOCOL.md's error shape; an unreachable database is a 503 with Retry-After
    (logged once per outage, by the breaker); an unexpected failure is logged and becomes a JSON 500 (never
    an HTML page on /api/)."""

    @functools.wraps(view)
    async def wrapper(request, *args, **kwargs):
        try:
            return await view(request, *args, **kwargs)
        except (ApiError, ActionError) as exc:
            if exc.status == 401:
                return await _authentication_failed(request, exc)
            return error_response(exc.status, exc.code, exc.detail)
        except DagError as exc:
            return error_response(422, "invalid_dag", exc.detail)
        except InvalidTransition as exc:
            return error_response(409, "invalid_state", str(exc))
        except RequestDataTooBig:
            return error_response(413, "too_large", "the request body is larger than this endpoint accepts")
        except DatabaseUnavailable:
            return unavailable_response(request.path)
        except Exception as exc:
            if is_unavailable(exc):  # database work outside db_call
                DATABASE.failed(exc)
                return unavailable_response(request.path)
            log.exception("unhandled error in %s", view.__name__)
            return error_response(500, "internal", "the server failed to handle this request")

    wrapper.csrf_exempt = True  # token-authenticated, never cookie-authenticated
    return wrapper


async def _authentication_failed(request, exc) -> JsonResponse:
    """A 401, counted against the client's address by every server process alike; past
    CP_AUTH_FAILURES_PER_MIN this minute it is a 429 instead (rate_limit.py: valid tokens are never refused)."""
    limit = settings.CP_AUTH_FAILURES_PER_MIN
    if limit > 0:
        try:
            count, left_s = await db_call(rate_limit.failed)(rate_limit.API_ADDRESS, rate_limit.client_address(request))
        except DatabaseUnavailable:
            count = 0  # uncounted: the 401 stands
        if count > limit:
            response = error_response(
                429, "rate_limited", "too many failed authentications from this address; try again later"
            )
            response["Retry-After"] = str(max(1, math.ceil(left_s)))
            return response
    return error_response(exc.status, exc.code, exc.detail)


def json_body(request, max_bytes: int | None = None) -> dict:
    """The request's JSON object; 413 past the size limit, 400 for anything but a JSON object."""
    length = request.META.get("CONTENT_LENGTH") or "0"
    if max_bytes is not None and length.isdigit() and int(length) > max_bytes:
        raise ApiError(413, "too_large", f"the body may be at most {max_bytes} bytes")
    raw = request.body
    if max_bytes is not None and len(raw) > max_bytes:
        raise ApiError(413, "too_large", f"the body may be at most {max_bytes} bytes")
    if not raw.strip():
        return {}
    try:
        data = _storable(json.loads(raw, parse_constant=_no_constant), raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return data


def _no_constant(name: str):
    # NaN and Infinity are not JSON (Python accepts them); PostgreSQL's jsonb refuses them.
    raise ValueError(f"{name} is not a JSON value")


_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")
# Only an escape can put NUL or a lone surrogate in a string (raw ones are not valid JSON/UTF-8).
_MAYBE_UNSTORABLE = re.compile(rb"\\u(?:0000|[dD][89a-fA-F])")


def _storable(value, raw: bytes):
    """Replace what PostgreSQL text cannot hold (NUL, unpaired surrogates) with U+FFFD, in keys and values.
    Iterative: a deeply nested body must not exhaust the stack."""
    if not _MAYBE_UNSTORABLE.search(raw):
        return value

    def clean(item):
        return _UNSTORABLE.sub("\ufffd", item) if isinstance(item, str) else item

    root = [value]
    stack: list = [root]
    while stack:
        container = stack.pop()
        pairs = list(container.items()) if isinstance(container, dict) else list(enumerate(container))
        if isinstance(container, dict):
            container.clear()
        for key, item in pairs:
            container[clean(key)] = clean(item)
            if isinstance(item, dict | list):
                stack.append(item)
    return root[0]
