"""ASGI entry point: HTTP through Django (agents' calls on a lean handler, see agent_asgi); the dashboard's
websockets through Channels, behind the allowed-hosts origin check and the session authentication
(consumers refuse anonymous users). Every HTTP request's body is held to its route's limit while it streams
in, before any of that (body_limits)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "control_plane.settings")

from django.core.asgi import get_asgi_application

django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.urls import path  # noqa: E402

from control_plane.agent_asgi import route_http  # noqa: E402
from control_plane.body_limits import limit_bodies  # noqa: E402
from tasks_app.dashboard.consumers import LivePageConsumer  # noqa: E402

websocket_urls = [
    path("ws/<str:page>/", LivePageConsumer.as_asgi()),
    path("ws/<str:page>/<str:obj_id>/", LivePageConsumer.as_asgi()),
]

application = ProtocolTypeRouter(
    {
        "http": limit_bodies(route_http(django_asgi_app)),
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urls))),
    }
)
