"""Error pages: JSON in PROTOCOL.md's shape under /api/, Django's defaults elsewhere."""

from django.views import defaults

from control_plane.http_api import error_response


def not_found(request, exception=None):
    if request.path.startswith("/api/"):
        return error_response(404, "not_found", "no such endpoint")
    return defaults.page_not_found(request, exception)


def server_error(request):
    if request.path.startswith("/api/"):
        return error_response(500, "internal", "the server failed to handle this request")
    return defaults.server_error(request)
