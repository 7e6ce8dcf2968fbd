"""The agents' endpoints on a lean Django handler: the fleet's hot path (claim, heartbeat, progress,
complete, artifacts) is token-authenticated JSON and needs none of the cookie-era middleware.

Under ASGI every sync middleware step and request signal is a hop to a thread, and Django's per-request
ThreadSensitiveContext starts (and joins) a fresh thread for those hops: measured, that was most of the
server's CPU per task. This handler has no middleware, no per-request context and no request_started
signal (its receivers reset this thread's query log and close this thread's connections: the event loop's
thread has none, all database work runs on the DB executor). A request's only thread hop is its database
work. Everything else (pages, admin, run API, artifact downloads with a session) goes through the full stack.
"""

from __future__ import annotations

import asyncio
import contextlib

from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response

from control_plane import metrics

AGENT_PATHS = ("/api/v1/agents/", "/api/v1/attempts/")
# An agent's long poll for a person's answer (PROTOCOL.md v1.1); the answer itself is a person's call.
INPUT_WAIT_PREFIX, INPUT_WAIT_SUFFIX = "/api/v1/input-requests/", "/wait"


def is_agent_call(path: str) -> bool:
    return path.startswith(AGENT_PATHS) or (path.startswith(INPUT_WAIT_PREFIX) and path.endswith(INPUT_WAIT_SUFFIX))


class AgentApiHandler(ASGIHandler):
    def load_middleware(self, is_async=False):
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        self._middleware_chain = convert_exception_to_response(self._host_checked)

    async def _host_checked(self, request):
        # ALLOWED_HOSTS, as the full stack's CommonMiddleware applies it: DisallowedHost is a 400 (handler400).
        request.get_host()
        return await self._get_response_async(request)

    async def __call__(self, scope, receive, send):
        # As ASGIHandler.__call__, minus the ThreadSensitiveContext (see the module's docstring).
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send):
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        try:
            request, response = self.create_request(scope, body_file)
            if request is not None:
                response = await self._respond_unless_gone(request, receive)
                if response is None:
                    return
                metrics.observe_request(request, response)
            await self.send_response(response, send)
            # Closing a JSON response only sends request_finished (see above): cheap, no thread needed.
            response.close()
        finally:
            body_file.close()

    async def _respond_unless_gone(self, request, receive):
        """The view's response, or None when the client went away first: its view is then cancelled, so a
        long poll whose agent disconnected never claims a task for nobody."""
        view = asyncio.ensure_future(self.run_get_response(request))
        gone = asyncio.ensure_future(self.listen_for_disconnect(receive))
        await asyncio.wait({view, gone}, return_when=asyncio.FIRST_COMPLETED)
        for task in (gone, view) if view.done() else (view, gone):
            if not task.done():
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RequestAborted):
                await task
        if view.cancelled():
            return None
        return view.result()


def route_http(full_app, agent_app=None):
    """An ASGI app sending agents' calls to the lean handler and everything else to `full_app`."""
    agent_app = agent_app or AgentApiHandler()

    async def app(scope, receive, send):
        target = agent_app if is_agent_call(scope["path"]) else full_app
        await target(scope, receive, send)

    return app
