"""A Content-Security-Policy on every response (Django 5.2 has none built in): scripts, stylesheets, images,
sockets and form targets from this server only, and no framing. A script that got into a page some other
way (an agent's text the templates failed to escape) would not run.

Style attributes are allowed (`style-src-attr 'unsafe-inline'`), <style> elements are not: the dashboard
draws sizes that come from data (progress bars' widths, the DAG's aspect ratio) and the Django admin writes
a few style attributes of its own; an attribute cannot run script, and moving every one of them to a
stylesheet would mean a class per value."""

from django.utils.deprecation import MiddlewareMixin

POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "style-src-attr 'unsafe-inline'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "object-src 'none'",
    ]
)


class ContentSecurityPolicyMiddleware(MiddlewareMixin):
    """Sync and async alike (MiddlewareMixin); a view that sets its own policy keeps it."""

    def process_response(self, request, response):
        response.headers.setdefault("Content-Security-Policy", POLICY)
        return response
