"""When PostgreSQL goes away: which errors say the database is unreachable, one warning per outage, and the
breaker that makes every server process answer 503 at once while it lasts.

Without the breaker each call would wait for the pool (CP_DB_POOL_TIMEOUT, 10 s) and end in a 500 with a
traceback. With it, the first call that finds the database unreachable opens the breaker: from then on calls
are refused at once (`DatabaseUnavailable`, answered 503 with Retry-After) and one probe thread at a time
tries a plain connection every PROBE_INTERVAL_S. When one succeeds the pool's connections (all made before
the outage, or waiting out psycopg_pool's reconnection backoff) are replaced and calls go through again.
An outage is logged twice: a WARNING when it starts, an INFO with its length when the database is back.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import psycopg
from django.db import connections
from django.http import HttpResponse, JsonResponse

log = logging.getLogger(__name__)

RETRY_AFTER_S = 2
PROBE_INTERVAL_S = 0.5
PROBE_CONNECT_TIMEOUT_S = 2  # libpq's minimum
# Server states that refuse service rather than a statement: admin shutdown (a restart), crash shutdown,
# "the database system is starting up / shutting down", too many connections. Class 08 is the connection's.
UNAVAILABLE_SQLSTATES = {"57P01", "57P02", "57P03", "53300"}


class DatabaseUnavailable(Exception):
    """The database cannot be reached now; PROTOCOL.md's answer is 503 with Retry-After."""


class StatementRefused(Exception):
    """A statement failed the way a lost connection does (psycopg's OperationalError without an SQLSTATE: libpq
    refused to send it, e.g. more than 65,535 parameters) while its connection stayed good: a failing statement,
    not an unreachable database (see still_connected)."""


def still_connected(alias: str = "default") -> bool:
    """Whether this thread's connection is open and good: then an error that looks like a lost connection
    came from the statement alone."""
    conn = connections[alias].connection
    return conn is not None and not conn.closed and not conn.broken and conn.pgconn.status == psycopg.pq.ConnStatus.OK


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it: Django wraps psycopg's errors) says the database is unreachable, as
    opposed to a statement failing (a deadlock, a timeout, a constraint): a lost or refused connection, the
    pool's timeout, a server shutting down or starting up."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, DatabaseUnavailable):
            return True
        if isinstance(exc, StatementRefused):
            return False
        if isinstance(exc, psycopg.InterfaceError):  # "the connection is closed"
            return True
        if isinstance(exc, psycopg.OperationalError):
            # No SQLSTATE: the client's side failed (connection refused, the server closed the connection,
            # psycopg_pool's PoolTimeout and PoolClosed).
            return exc.sqlstate is None or exc.sqlstate.startswith("08") or exc.sqlstate in UNAVAILABLE_SQLSTATES
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def describe(exc: BaseException) -> str:
    """The root cause in one line, for the outage's warning."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}".rstrip(": ")


class OutageLog:
    """Logs an outage once: `failed()` warns only when one starts, `recovered()` says once that it ended.
    `who` names the loop or process kind in the message; `meanwhile` says what it does until then."""

    def __init__(self, who: str, meanwhile: str):
        self.who, self.meanwhile = who, meanwhile
        self.down_since: float | None = None
        self._lock = threading.Lock()

    def failed(self, exc: BaseException) -> bool:
        """Record a failure; True if it starts an outage."""
        with self._lock:
            if self.down_since is not None:
                return False
            self.down_since = time.monotonic()
        log.warning(
            "%s (pid %d): the database is unreachable (%s); %s", self.who, os.getpid(), describe(exc), self.meanwhile
        )
        return True

    def recovered(self) -> None:
        with self._lock:
            if self.down_since is None:
                return
            down_s, self.down_since = time.monotonic() - self.down_since, None
        log.info("%s (pid %d): the database is reachable again after %.1f s", self.who, os.getpid(), down_s)


class Breaker:
    """Per process: whether the database is known unreachable, and the probe that finds out when it is back.

    `generation` counts recoveries: a call that started before the last one and fails afterwards (on a
    connection of the old pool) says nothing about the database now, and does not open the breaker again."""

    def __init__(self, alias: str = "default"):
        self.alias = alias
        self.log = OutageLog("database calls", "answering 503 at once until it is back")
        self.down = False
        self.generation = 0
        self._lock = threading.Lock()

    def check(self) -> int:
        """Raise DatabaseUnavailable while the breaker is open (no waiting); else the generation to hand to
        `failed()`. Lock-free: the hot path of every database call."""
        if self.down:
            raise DatabaseUnavailable("the database is unreachable")
        return self.generation

    def failed(self, exc: BaseException, generation: int | None = None) -> None:
        """A call found the database unreachable: open the breaker (and start the probe) unless it is open
        already or the call began before the last recovery."""
        with self._lock:
            if self.down or (generation is not None and generation != self.generation):
                return
            self.down = True
        self.log.failed(exc)
        threading.Thread(target=self._probe_until_back, name="db-probe", daemon=True).start()

    def _probe_until_back(self) -> None:
        failures = 0
        while not self._probe():
            failures += 1
            time.sleep(PROBE_INTERVAL_S)
        self._refresh_pool(replace=failures > 0)
        with self._lock:
            self.generation += 1
            self.down = False
        self.log.recovered()

    def _probe(self) -> bool:
        params = connections[self.alias].get_connection_params()
        for key in ("cursor_factory", "context"):  # Django's own adapters: not needed to say "it answers"
            params.pop(key, None)
        params["connect_timeout"] = PROBE_CONNECT_TIMEOUT_S
        try:
            with psycopg.connect(**params, autocommit=True) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def _refresh_pool(self, replace: bool) -> None:
        """After a real outage the pool's idle connections are dead and its reconnection attempts may be
        backing off for a minute: a new pool (Django makes one on next use) serves at once. After a blip
        (the first probe succeeded), checking the idle connections is enough."""
        pools = getattr(type(connections[self.alias]), "_connection_pools", None)
        if pools is None or self.alias not in pools:
            return  # no pool in this process (the q cluster)
        if not replace:
            pools[self.alias].check()
            return
        old = pools.pop(self.alias)
        # Connections still lent out go back to the closed pool when their calls end, which closes them.
        old.close(timeout=1.0)

    def reset_after_fork(self) -> None:
        """A forked child has no probe thread: it starts with the breaker closed, and finds out for itself."""
        self._lock = threading.Lock()
        self.log = OutageLog(self.log.who, self.log.meanwhile)
        self.down = False


DATABASE = Breaker()
os.register_at_fork(after_in_child=DATABASE.reset_after_fork)


def unavailable_response(path: str) -> HttpResponse:
    """503 with Retry-After: PROTOCOL.md's error shape under /api/, a plain page elsewhere. Marked logged, so
    Django's request logger does not add a line per refused request (the outage was logged once)."""
    if path.startswith("/api/"):
        response: HttpResponse = JsonResponse(
            {"error": "database_unavailable", "detail": "the database cannot be reached now; retry shortly"},
            status=503,
        )
    else:
        response = HttpResponse(UNAVAILABLE_PAGE, status=503, content_type="text/html; charset=utf-8")
    response["Retry-After"] = str(RETRY_AFTER_S)
    response._has_been_logged = True
    return response


UNAVAILABLE_PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="{RETRY_AFTER_S * 3}">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Database unavailable</title></head>
<body style="font-family: system-ui, sans-serif; max-width: 40rem; margin: 4rem auto; padding: 0 1rem">
<h1>Database unavailable</h1>
<p>The control plane cannot reach its database right now. Nothing is lost: this page reloads by itself and
works again as soon as the database is back.</p>
</body></html>
"""


class DatabaseOutageMiddleware:
    """The full stack's side (pages, admin, run API): while the breaker is open, answer 503 before any
    middleware or view touches the database; a view that finds it unreachable gets the same answer instead
    of a 500 and a traceback. Sync and async, so it adds no thread hop under ASGI."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        from asgiref.sync import iscoroutinefunction, markcoroutinefunction

        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.is_async:
            return self.__acall__(request)
        if DATABASE.down:
            return unavailable_response(request.path)
        return self.get_response(request)

    async def __acall__(self, request):
        if DATABASE.down:
            return unavailable_response(request.path)
        return await self.get_response(request)

    def process_exception(self, request, exception):
        if not is_unavailable(exception):
            return None
        DATABASE.failed(exception)
        return unavailable_response(request.path)


def check_database() -> None:
    """One round trip (the health endpoint's): raises if the database does not answer."""
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT 1")
