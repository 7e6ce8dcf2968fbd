"""When PostgreSQL goes away: which errors say the database is unreachable, and one warning per outage.

An outage is logged twice: a WARNING when it starts, an INFO with its length when the database is back.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import psycopg

log = logging.getLogger(__name__)

# Server states that refuse service rather than a statement: admin shutdown (a restart), crash shutdown,
# "the database system is starting up / shutting down", too many connections. Class 08 is the connection's.
UNAVAILABLE_SQLSTATES = {"57P01", "57P02", "57P03", "53300"}


class DatabaseUnavailable(Exception):
    """The database cannot be reached now; PROTOCOL.md's answer is 503 with Retry-After."""


def is_unavailable(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it: Django wraps psycopg's errors) says the database is unreachable, as
    opposed to a statement failing (a deadlock, a timeout, a constraint): a lost or refused connection, the
    pool's timeout, a server shutting down or starting up."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, DatabaseUnavailable):
            return True
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
