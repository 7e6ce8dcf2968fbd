"""The dashboard's websocket: one per open page. It listens to the process's EventHub (PostgreSQL NOTIFY from
any server or worker process) and pushes the page's panels as htmx out-of-band fragments.

Bursts are coalesced: a page is re-rendered at most once per `CP_LIVE_MIN_INTERVAL_S`, however many
changes arrive, and heavy panels less often still. On (re)connect the whole page is sent, so a page that
reconnects after a server restart resyncs by itself."""

from __future__ import annotations

import asyncio
import logging
import time

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from control_plane.http_api import db_call

from .actions import NotFound
from .hub import EventHub
from .pages import PAGES, parse_id, render_panels

log = logging.getLogger(__name__)


class LivePageConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=4401)
            return
        kwargs = self.scope["url_route"]["kwargs"]
        self.page = kwargs["page"]
        self.obj_id = kwargs.get("obj_id")
        if self.page not in PAGES:
            await self.close(code=4404)
            return
        try:
            self.obj_id = parse_id(self.obj_id) if self.obj_id else None
        except NotFound:
            await self.close(code=4404)
            return
        self.user = user
        self.dirty = False
        self.last_sent = 0.0
        self.panel_sent: dict[str, float] = {}
        self.panel_html: dict[str, str] = {}
        self.flusher: asyncio.Task | None = None
        self.hub = EventHub.current()
        await self.accept()
        self.hub.subscribers.append(self.on_event)
        await self.flush()

    async def disconnect(self, code):
        hub = getattr(self, "hub", None)
        if hub is not None and self.on_event in hub.subscribers:
            hub.subscribers.remove(self.on_event)
        if getattr(self, "flusher", None) is not None:
            self.flusher.cancel()

    async def receive(self, text_data=None, bytes_data=None):
        # The page sends nothing we act on; operator actions are CSRF-checked POSTs.
        return

    def concerns_me(self, event: dict) -> bool:
        if self.page in ("overview", "agents"):
            return True
        if event.get("wake_all"):
            return True
        return self.run_id() in event.get("runs", ())

    def run_id(self) -> str | None:
        if self.page == "run":
            return self.obj_id
        return getattr(self, "task_run_id", None)

    def on_event(self, event: dict) -> None:
        """Called by the hub for every notification: mark dirty and make sure a flush is scheduled."""
        if self.page == "task" and getattr(self, "task_run_id", None) is None:
            self.dirty = True
        elif not self.concerns_me(event):
            return
        self.dirty = True
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self):
        interval = settings.CP_LIVE_MIN_INTERVAL_S
        while self.dirty:
            wait = self.last_sent + interval - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self.flush()

    async def flush(self):
        self.dirty = False
        now = time.monotonic()
        due = {
            p.id
            for p in PAGES[self.page]
            if p.min_interval_s == 0 or now - self.panel_sent.get(p.id, 0.0) >= p.min_interval_s
        }
        try:
            fragments, run_id = await db_call(self._render)(due)
        except NotFound:
            await self.close(code=4404)
            return
        except Exception:
            log.exception("rendering the live %s page failed", self.page)
            return
        if self.page == "task":
            self.task_run_id = run_id
        self.last_sent = time.monotonic()
        # Only panels whose HTML changed go out: less to send, and a button is not replaced under a
        # person's pointer while unrelated numbers tick.
        changed = [html for panel_id, html in fragments.items() if self.panel_html.get(panel_id) != html]
        for panel_id, html in fragments.items():
            self.panel_sent[panel_id] = self.last_sent
            self.panel_html[panel_id] = html
        if changed:
            await self.send(text_data="".join(changed))

    def _render(self, due: set[str]):
        fragments = render_panels(self.page, self.obj_id, self.user, only=due)
        run_id = None
        if self.page == "task":
            from .models import Task

            run_id = str(Task.objects.filter(pk=self.obj_id).values_list("run_id", flat=True).first())
        return fragments, run_id
