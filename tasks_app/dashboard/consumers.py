"""The dashboard's websocket: one per open page. It listens to the process's EventHub (PostgreSQL NOTIFY from
any server or worker process) and pushes the page's panels as htmx out-of-band fragments.

Bursts are coalesced: a page is re-rendered at most once per `CP_LIVE_MIN_INTERVAL_S`, however many
changes arrive, and heavy panels less often still (the larger, the less often). On (re)connect the whole
page is sent, so a page that reconnects after a server restart resyncs by itself."""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from importlib import import_module

from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.contrib.auth.signals import user_logged_out
from django.http import QueryDict

from control_plane.db import db_call
from control_plane.web import same_origin

from ..errors import NotFound
from ..hub import EventHub
from .pages import ADDED_PAGES, PAGES, parse_id, render_panels

log = logging.getLogger(__name__)
# Heavy panels (those with a minimum interval) are re-sent at no more than this many bytes a second.
HEAVY_PANEL_BYTES_PER_S = 50_000
# This process's open sockets by session key: a logout here closes them at once (another process's within
# CP_WS_SESSION_CHECK_S).
OPEN_SOCKETS: dict[str, weakref.WeakSet] = {}


def _session_is_live(session_key: str | None, user_id) -> bool:
    """The session still exists, still names this user, and the user is still active."""
    from django.contrib.auth import get_user_model

    if not session_key:
        return False
    session = import_module(settings.SESSION_ENGINE).SessionStore(session_key)
    if str(session.get("_auth_user_id")) != str(user_id):
        return False
    return get_user_model().objects.filter(pk=user_id, is_active=True).exists()


def _close_sockets_of(sender, request, user, **kwargs):
    session_key = getattr(getattr(request, "session", None), "session_key", None)
    for consumer in list(OPEN_SOCKETS.get(session_key or "", ())):
        consumer.loop.call_soon_threadsafe(consumer.session_ended)


user_logged_out.connect(_close_sockets_of, dispatch_uid="tasks_app.dashboard.consumers.close_sockets_on_logout")


class LivePageConsumer(AsyncWebsocketConsumer):
    async def connect(self):
        if not same_origin(self.scope):
            await self.close(code=4403)
            return
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
        # The runs page's filters and page number (state, q, page, workflow), as its URL had them.
        self.query = QueryDict(self.scope.get("query_string", b"").decode("latin-1"))
        self.dirty = False
        self.last_sent = 0.0
        self.panel_sent: dict[str, float] = {}
        self.panel_html: dict[str, str] = {}
        # Heavy panels: panel id -> (the panel's own minimum interval, the interval its last size calls for).
        self.panel_interval = {p.id: (p.min_interval_s, p.min_interval_s) for p in PAGES[self.page] if p.min_interval_s}
        self.flusher: asyncio.Task | None = None
        # One render at a time: the first one (on connect) may still run when the next is due.
        self.render_lock = asyncio.Lock()
        self.shown_states: dict = {}  # the DAG states the page shows: pushes carry only changes
        self.held_timer: asyncio.TimerHandle | None = None
        self.hub = EventHub.current()
        self.session_key = getattr(self.scope.get("session"), "session_key", None)
        self.loop = asyncio.get_running_loop()
        await self.accept()
        OPEN_SOCKETS.setdefault(self.session_key or "", weakref.WeakSet()).add(self)
        self.session_watch = self.loop.create_task(self._watch_session())
        self.hub.subscribers.append(self.on_event)
        await self.flush()

    async def _watch_session(self):
        # A socket outlives the page's request: without this, a logged-out or deactivated person's open tab
        # would go on receiving pushes. Logout in this process closes it at once (session_ended).
        while True:
            await asyncio.sleep(settings.CP_WS_SESSION_CHECK_S)
            try:
                live = await db_call(_session_is_live)(self.session_key, self.user.pk)
            except Exception:
                log.exception("checking a live page's session failed")
                continue
            if not live:
                self.session_ended()
                return

    def session_ended(self) -> None:
        self.loop.create_task(self.close(code=4401))

    async def disconnect(self, code):
        sockets = OPEN_SOCKETS.get(getattr(self, "session_key", None) or "")
        if sockets is not None:
            sockets.discard(self)
            if not sockets:
                OPEN_SOCKETS.pop(self.session_key or "", None)
        if getattr(self, "session_watch", None) is not None:
            self.session_watch.cancel()
        hub = getattr(self, "hub", None)
        if hub is not None and self.on_event in hub.subscribers:
            hub.subscribers.remove(self.on_event)
        if getattr(self, "flusher", None) is not None:
            self.flusher.cancel()
        if getattr(self, "held_timer", None) is not None:
            self.held_timer.cancel()

    async def receive(self, text_data=None, bytes_data=None):
        # The page sends nothing we act on; operator actions are CSRF-checked POSTs.
        return

    def concerns_me(self, event: dict) -> bool:
        if self.page in ("overview", "agents", "runs"):
            return True
        if self.page in ADDED_PAGES:
            return ADDED_PAGES[self.page].concerns(event)
        if event.get("wake_all"):
            return True
        return self.run_id() in event.get("runs", ())

    def run_id(self) -> str | None:
        if self.page in ("run", "run-tasks"):
            return self.obj_id
        return getattr(self, "task_run_id", None)

    def on_event(self, event: dict) -> None:
        """Called by the hub for every notification: mark dirty and make sure a flush is scheduled."""
        if self.page == "task" and getattr(self, "task_run_id", None) is None:
            self.dirty = True
        elif not self.concerns_me(event):
            return
        self._flush_later()

    def _flush_later(self) -> None:
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
        async with self.render_lock:
            await self._flush()

    async def _flush(self):
        self.dirty = False
        # The interval counts from the start of a render, not its end: a page is re-rendered every
        # interval under a steady stream of changes, rather than every interval plus a render's time.
        now = self.last_sent = time.monotonic()
        due = {
            p.id
            for p in PAGES[self.page]
            if p.min_interval_s == 0 or now - self.panel_sent.get(p.id, 0.0) >= self.panel_interval[p.id][1]
        }
        held = [p for p in PAGES[self.page] if p.id not in due]
        if held:
            # A held panel still owes the page this change: come back when it is due, even if nothing else
            # happens by then (the last change of a run must reach its Gantt chart too).
            if self.held_timer is not None:
                self.held_timer.cancel()
            delay = min(self.panel_interval[p.id][1] - (now - self.panel_sent[p.id]) for p in held)
            self.held_timer = asyncio.get_running_loop().call_later(delay, self._flush_later)
        try:
            fragments, run_id = await db_call(self._render)(due)
        except NotFound:
            await self.close(code=4404)
            return
        except Exception:
            log.exception("rendering the live %s page failed", self.page)
            self.shown_states.clear()  # it may be ahead of the page now: send every state next time
            return
        if self.page == "task":
            self.task_run_id = run_id
        # Only panels whose HTML changed go out: less to send, and a button is not replaced under a
        # person's pointer while unrelated numbers tick.
        changed = [html for panel_id, html in fragments.items() if self.panel_html.get(panel_id) != html]
        for panel_id, html in fragments.items():
            self.panel_sent[panel_id] = now
            self.panel_html[panel_id] = html
            if panel_id in self.panel_interval:
                # A heavy panel's pace follows its size: a 1,000-attempt Gantt chart (~450 KiB) costs the
                # browser a few hundred milliseconds to swap in, time in which no other update shows.
                base = self.panel_interval[panel_id][0]
                self.panel_interval[panel_id] = (base, max(base, len(html) / HEAVY_PANEL_BYTES_PER_S))
        if changed:
            await self.send(text_data="".join(changed))

    def _render(self, due: set[str]):
        fragments = render_panels(
            self.page, self.obj_id, self.user, only=due, shown_states=self.shown_states, query=self.query
        )
        run_id = None
        if self.page == "task":
            from ..models import Task

            run_id = str(Task.objects.filter(pk=self.obj_id).values_list("run_id", flat=True).first())
        return fragments, run_id
