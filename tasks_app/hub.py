"""Each server process's one LISTEN connection, the long polls it holds, and its sweeper.

A parked long poll is an `asyncio.Event` in `EventHub.waiters`: no thread, no database connection. When a
notification says tasks became ready, one matching waiter per task is woken (not all of them: fifty agents
stampeding for one task would cost fifty claim queries to hand out one).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import psycopg
from django.conf import settings
from django.db import connection

from control_plane.db import db_call
from control_plane.db_outage import DATABASE, DatabaseUnavailable, describe, is_unavailable

from . import actions
from .notify import CHANNEL, parse

log = logging.getLogger(__name__)


class Waiter:
    """One parked long poll. An inactive waiter (its agent takes no work now: draining) is woken only by
    wake_all, never by a task's wake_one: it would spend the task's one wake-up and take nothing."""

    __slots__ = ("labels", "executors", "event", "active", "parked_at", "woken_for")

    def __init__(self, labels, executors, active: bool = True):
        self.labels = frozenset(labels)
        self.executors = frozenset(executors)
        self.event = asyncio.Event()
        self.active = active
        self.parked_at = time.monotonic()
        self.woken_for: tuple | None = None  # the (executor, requires) of the task wake_one woke it for

    def matches(self, executor: str, requires) -> bool:
        return executor in self.executors and self.labels.issuperset(requires)


# Periodic work of other apps, run by every server process's sweeper beside the scheduler's own sweep, as
# (function, at most every so many seconds); added from an AppConfig.ready(). agents_app adds the host
# operations that will never finish.
ADDED_SWEEPS: list[tuple[Callable[[], object], float]] = []


def add_sweep(fn: Callable[[], object], every_s: float) -> None:
    ADDED_SWEEPS.append((fn, every_s))


class EventHub:
    _by_loop: dict = {}

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.waiters: list[Waiter] = []
        self.subscribers: list[Callable[[dict], None]] = []
        self.listening = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.notifications = 0
        self.missed_wakeups = 0  # parked agents woken by wake_missed: each one a wake-up that went astray
        self._offerable_before: set[tuple] = set()  # the kinds wake_missed's last check found offerable

    @classmethod
    def current(cls) -> EventHub:
        """This event loop's hub, started on first use (daphne has no lifespan events to start it)."""
        loop = asyncio.get_running_loop()
        hub = cls._by_loop.get(loop)
        if hub is None:
            hub = cls._by_loop[loop] = cls(loop)
            hub._tasks = [loop.create_task(hub._listen_forever()), loop.create_task(hub._sweep_forever())]
        return hub

    # --- waiters ---

    def register(self, labels, executors, active: bool = True) -> Waiter:
        waiter = Waiter(labels, executors, active)
        self.waiters.append(waiter)
        return waiter

    def unregister(self, waiter: Waiter) -> None:
        try:
            self.waiters.remove(waiter)
        except ValueError:
            pass

    def pass_on(self, woken_for: tuple | None) -> None:
        """A long poll woken for a task ended before it could claim (its agent hung up): the wake-up goes on
        to another matching waiter instead of being spent on nobody."""
        if woken_for is not None:
            self.wake_one(*woken_for)

    def wake_all(self) -> None:
        for waiter in self.waiters:
            waiter.event.set()

    def wake_one(self, executor: str, requires) -> None:
        for waiter in self.waiters:  # oldest first
            if waiter.active and not waiter.event.is_set() and waiter.matches(executor, requires):
                waiter.woken_for = (executor, requires)
                waiter.event.set()
                return

    async def wake_missed(self, min_age_s: float = 1.0) -> int:
        """The check behind every wake-up: wake a parked agent for each kind of ready task that has been
        offerable, within every limit, for `min_age_s` while that agent waited as long. Every wake-up takes
        milliseconds, so such a pair means one went astray; each is counted and logged. Costs nothing while
        no agent is parked (the busy fleet's case), one query otherwise.
        A kind counts only when the check before this one found it offerable too: a task's timestamps are its
        transaction's start, so a transaction that took a second to commit makes a task look a second old
        the moment it becomes visible, while its notification is still on its way."""
        now = time.monotonic()
        parked = [w for w in self.waiters if w.active and not w.event.is_set() and now - w.parked_at >= min_age_s]
        if not parked:
            self._offerable_before = set()
            return 0

        from .dashboard import waiting

        offerable = await db_call(waiting.offerable_kinds)(min_age_s)
        kinds = [(executor, tuple(requires)) for executor, requires in offerable]
        before, self._offerable_before = self._offerable_before, set(kinds)
        woken = 0
        for executor, requires in kinds:
            if (executor, requires) not in before:
                continue
            for waiter in parked:
                if not waiter.event.is_set() and waiter.matches(executor, requires):
                    waiter.event.set()
                    woken += 1
                    break
        if woken:
            self.missed_wakeups += woken
            log.warning("woke %d parked agent(s) for ready tasks nobody announced to them", woken)
        return woken

    def dispatch(self, data: dict) -> None:
        self.notifications += 1
        for subscriber in list(self.subscribers):
            try:
                subscriber(data)
            except Exception:
                log.exception("event subscriber failed")
        if data.get("wake_all"):
            self.wake_all()
            if after := data.get("wake_all_after"):
                self.loop.call_later(float(after), self.wake_all)
        for executor, requires, delay in data.get("ready", ()):
            if delay and delay > 0:
                # A retry delay: the task becomes offerable later; wake someone then.
                self.loop.call_later(float(delay) + 0.05, self.wake_one, executor, requires)
            else:
                self.wake_one(executor, requires)

    # --- background loops ---

    async def _listen_forever(self) -> None:
        params = connection.get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        lost = False  # logged once per loss, not at every attempt to reconnect
        while True:
            try:
                conn = await psycopg.AsyncConnection.connect(**params, autocommit=True)
                async with conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    self.listening.set()
                    if lost:
                        log.info("LISTEN connection restored")
                        lost = False
                    # Anything that happened while we were not listening went unheard: everyone looks again.
                    self.wake_all()
                    async for note in conn.notifies():
                        self.dispatch(parse(note.payload))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.listening.clear()
                if is_unavailable(exc):
                    DATABASE.failed(exc)  # the first to know: API calls are refused at once from now on
                if not lost:
                    log.warning("LISTEN connection lost (%s); reconnecting", describe(exc))
                lost = True
                await asyncio.sleep(1.0)

    async def _sweep_forever(self) -> None:
        tick = db_call(actions.tick_sweep_clock)
        sweep = db_call(actions.sweep)
        added = [(db_call(fn), every_s) for fn, every_s in ADDED_SWEEPS]
        due = [0.0] * len(added)
        starting = True
        while True:
            started = time.monotonic()
            try:
                await tick(starting=starting)
                starting = False
                await sweep()
                await self.wake_missed()
                for i, (call, every_s) in enumerate(added):
                    if started >= due[i]:
                        due[i] = started + every_s
                        await call()
            except asyncio.CancelledError:
                raise
            except DatabaseUnavailable:
                pass  # logged once per outage, by control_plane.db_outage
            except Exception:
                log.exception("sweep failed")
            await asyncio.sleep(max(0.1, settings.CP_SWEEP_INTERVAL_S - (time.monotonic() - started)))

    async def wait_listening(self, timeout: float = 5.0) -> None:
        await asyncio.wait_for(self.listening.wait(), timeout)
