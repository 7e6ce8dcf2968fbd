"""Error pages: JSON in PROTOCOL.md's shape under /api/, Django's defaults elsewhere."""

from django.core.exceptions import DisallowedHost
from django.views import defaults

from control_plane.http_api import error_response


def not_found(request, exception=None):
    if request.path.startswith("/api/"):
        return error_response(404, "not_found", "no such endpoint")
    return defaults.page_not_found(request, exception)


def bad_request(request, exception=None):
    """A SuspiciousOperation before any view: a Host header not in ALLOWED_HOSTS (DisallowedHost), too many
    fields... Under /api/ an API client gets the error shape, not Django's HTML page."""
    if request.path.startswith("/api/"):
        return error_response(400, "bad_request", _said(exception) or "the request is malformed")
    return defaults.bad_request(request, exception)


def permission_denied(request, exception=None):
    if request.path.startswith("/api/"):
        return error_response(403, "forbidden", _said(exception) or "not allowed")
    return defaults.permission_denied(request, exception)


def _said(exception) -> str:
    """The exception's own sentence (Django's say what was wrong), but never a hint about ALLOWED_HOSTS to
    whoever sent a Host header this server does not serve."""
    if isinstance(exception, DisallowedHost):
        return "the Host header names no host this server answers to"
    return str(exception or "").strip()[:500]


def server_error(request):
    if request.path.startswith("/api/"):
        return error_response(500, "internal", "the server failed to handle this request")
    return defaults.server_error(request)
