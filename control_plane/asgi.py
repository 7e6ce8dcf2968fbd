"""ASGI entry point: HTTP through Django; websockets (the dashboard) through Channels."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "control_plane.settings")

from django.core.asgi import get_asgi_application

django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

application = ProtocolTypeRouter({"http": django_asgi_app})
