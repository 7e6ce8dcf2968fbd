"""The agents' endpoints on a lean Django handler: the fleet's hot path (claim, heartbeat, progress,
complete, artifacts) is token-authenticated JSON and needs none of the cookie-era middleware.

Under ASGI every sync middleware step and request signal is a hop to a thread, and Django's per-request
ThreadSensitiveContext starts (and joins) a fresh thread for those hops: measured, that was most of the
server's CPU per task. This handler has no middleware and no per-request context, so a request's only
thread hops are its database work (on the DB executor) and the two request signals (on asgiref's one
shared sync thread). Everything else (pages, admin, run API, artifact downloads with a session) goes
through the full stack.
"""

from __future__ import annotations

from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response

AGENT_PATHS = ("/api/v1/agents/", "/api/v1/attempts/")


class AgentApiHandler(ASGIHandler):
    def load_middleware(self, is_async=False):
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        self._middleware_chain = convert_exception_to_response(self._get_response_async)

    async def __call__(self, scope, receive, send):
        # As ASGIHandler.__call__, minus the ThreadSensitiveContext (see the module's docstring).
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        await self.handle(scope, receive, send)


def route_http(full_app, agent_app=None):
    """An ASGI app sending agents' calls to the lean handler and everything else to `full_app`."""
    agent_app = agent_app or AgentApiHandler()

    async def app(scope, receive, send):
        target = agent_app if scope["path"].startswith(AGENT_PATHS) else full_app
        await target(scope, receive, send)

    return app
