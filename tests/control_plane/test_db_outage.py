"""When PostgreSQL goes away: a real server on a PostgreSQL of the test's own answers every /api/ call with
a fast 503 in PROTOCOL.md's shape (agents' endpoints on the lean handler, the run API and health through the
full stack), dashboard pages with a plain 503 page, logs the outage once, and serves again within seconds of
the database's return. Also which errors count as the database being unreachable."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from http.cookiejar import CookieJar
from urllib.parse import urlencode

import psycopg
import pytest
from django.db import utils as db_utils
from psycopg import errors as pg_errors
from psycopg_pool import PoolTimeout

from control_plane import launch
from control_plane.db_outage import DATABASE, DatabaseUnavailable, StatementRefused, is_unavailable
from tests.conftest import FAST_TIMINGS, assert_error, http, ok, register, wait_for

SETUP = """
from django.contrib.auth import get_user_model
from agents_app.registry import create_api_token, create_enrollment_token
user = get_user_model().objects.create_superuser("olivia", "olivia@example.com", "pw-olivia-123")
print(create_api_token(user)[0])
print(create_enrollment_token(note="outage tests")[0])
"""


def _django_wrapped(exc: Exception) -> Exception:
    """The exception as Django raises it: its own class, psycopg's as the cause."""
    wrapped = getattr(db_utils, type(exc).__mro__[1].__name__, db_utils.OperationalError)(str(exc))
    wrapped.__cause__ = exc
    return wrapped


@pytest.mark.parametrize(
    "exc",
    [
        psycopg.OperationalError("connection failed: Connection refused"),
        psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly"),
        pg_errors.AdminShutdown("terminating connection due to administrator command"),
        pg_errors.CannotConnectNow("the database system is starting up"),
        pg_errors.TooManyConnections("sorry, too many clients already"),
        psycopg.InterfaceError("the connection is closed"),
        PoolTimeout("couldn't get a connection after 10.00 sec"),
        DatabaseUnavailable("the database is unreachable"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_unreachable_database_errors_are_recognised(exc):
    assert is_unavailable(exc)
    assert is_unavailable(_django_wrapped(exc))


@pytest.mark.parametrize(
    "exc",
    [
        pg_errors.QueryCanceled("canceling statement due to statement timeout"),
        pg_errors.DeadlockDetected("deadlock detected"),
        pg_errors.SerializationFailure("could not serialize access"),
        pg_errors.UniqueViolation("duplicate key value"),
        ValueError("not a database error"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_failing_statements_are_not_an_unreachable_database(exc):
    assert not is_unavailable(exc)
    assert not is_unavailable(_django_wrapped(exc))


@pytest.mark.django_db(transaction=True)
def test_a_statement_libpq_refuses_to_send_is_a_failing_statement_and_opens_no_breaker():
    # psycopg's OperationalError without an SQLSTATE, as a lost connection's is; but the connection is good.
    import asyncio

    from django.db import connection

    from control_plane.db import db_call

    def too_many_parameters():
        connection.ensure_connection()
        # psycopg's own Cursor binds on the server, where a statement takes at most 65,535 parameters
        psycopg.Cursor(connection.connection).execute("SELECT " + ", ".join(["%s"] * 70_000), [1] * 70_000)

    def one():
        with connection.cursor() as cur:
            cur.execute("SELECT 1")
            return cur.fetchone()[0]

    with pytest.raises(StatementRefused) as refused:
        asyncio.run(db_call(too_many_parameters)())
    assert isinstance(refused.value.__cause__, psycopg.OperationalError) and not is_unavailable(refused.value)
    assert not DATABASE.down and asyncio.run(db_call(one)()) == 1


class Actors:
    """A server process on `pg_db` with an operator (API token), a registered agent and a logged-in browser."""

    def __init__(self, url: str, folder):
        setup = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", SETUP],
            cwd=launch.ROOT,
            env={**os.environ, "DATABASE_URL": url},
            capture_output=True,
            text=True,
            check=True,
        )
        self.api_token, enrollment = setup.stdout.split()[-2:]
        self.port = launch.free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = folder / "server.log"
        env = {"DATABASE_URL": url, **FAST_TIMINGS}
        self.proc = launch.start_server(self.port, env=env, log=self.log)
        self.agent_token = register(self.base, enrollment, "ccg-1", labels=["ccg"])["token"]
        self.browser = _logged_in(self.base, "olivia", "pw-olivia-123")

    def calls(self):
        """(name, lambda) for one call of each kind: agents' endpoints, the run API, health."""
        return [
            ("heartbeat", lambda: http("POST", f"{self.base}/api/v1/agents/heartbeat", {}, token=self.agent_token)),
            ("claim", lambda: http("POST", f"{self.base}/api/v1/agents/claim", {"wait_s": 0}, token=self.agent_token)),
            ("runs", lambda: http("GET", f"{self.base}/api/v1/runs", token=self.api_token)),
            ("health", lambda: http("GET", f"{self.base}/api/v1/health")),
        ]

    def page(self, path: str = "/") -> tuple[int, str, str]:
        """(status, content type, body) of a dashboard page for the logged-in browser."""
        try:
            with self.browser.open(self.base + path, timeout=30) as response:
                return response.status, response.headers.get("Content-Type", ""), response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.headers.get("Content-Type", ""), err.read().decode()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def _logged_in(base: str, username: str, password: str) -> urllib.request.OpenerDirector:
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    form = opener.open(f"{base}/accounts/login/", timeout=30).read().decode()
    csrf = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form).group(1)
    data = urlencode({"username": username, "password": password, "csrfmiddlewaretoken": csrf}).encode()
    opener.open(urllib.request.Request(f"{base}/accounts/login/", data=data), timeout=30).read()
    return opener


@pytest.fixture
def actors(pg_db, tmp_path):
    url, _ = pg_db
    a = Actors(url, tmp_path)
    yield a
    launch.stop(a.proc)


def _timed(call):
    started = time.monotonic()
    answer = call()
    return answer, time.monotonic() - started


def test_database_outage_is_a_fast_503_logged_once_and_recovers_by_itself(pg, actors):
    for _name, call in actors.calls():
        ok(call())
    status, _, body = actors.page("/")
    assert status == 200, body[:300]

    # An outage as long as the issue's: 11 s, longer than the pool's 10 s timeout.
    pg.stop("fast")
    down_at = time.monotonic()
    answers = []
    while time.monotonic() - down_at < 11:
        for name, call in actors.calls():
            (status, body), took = _timed(call)
            answers.append((name, status, body, took))
        time.sleep(0.1)
    page_status, page_type, page_body = actors.page("/")
    assert page_status == 503 and page_type.startswith("text/html"), page_body[:300]
    assert "Database unavailable" in page_body and "Traceback" not in page_body

    for name, status, body, _took in answers:
        assert_error((status, body), 503, "database_unavailable", case=name)
    latencies = [took for *_, took in answers]
    assert max(latencies) < 2.0, max(latencies)  # never the pool's 10 s wait
    assert statistics.median(latencies) < 0.1, statistics.median(latencies)
    for path, token in [("/api/v1/agents/heartbeat", actors.agent_token), ("/api/v1/runs", actors.api_token)]:
        status, headers, _ = with_headers("POST" if "agents" in path else "GET", actors.base + path, token)
        assert status == 503 and headers.get("Retry-After", "").isdigit(), (path, status, dict(headers))

    pg.start()
    back_at = time.monotonic()
    while actors.calls()[0][1]()[0] != 200:
        assert time.monotonic() - back_at < 5, "the server did not serve again within 5 s of PostgreSQL's return"
        time.sleep(0.05)
    for _name, call in actors.calls():
        ok(call())
    assert actors.page("/")[0] == 200

    log = actors.log_text()
    assert "Traceback" not in log and "Internal Server Error" not in log, log[-3000:]
    assert "sweep failed" not in log, log[-3000:]
    assert log.count("the database is unreachable") == 1, log[-3000:]
    assert log.count("the database is reachable again") == 1, log[-3000:]
    assert log.count("LISTEN connection lost") <= 1, log[-3000:]


def with_headers(method: str, url: str, token: str):
    """(status, headers, body) of one call, an error status included."""
    request = urllib.request.Request(url, data=b"{}" if method == "POST" else None, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, err.headers, json.loads(err.read())


def test_a_quick_postgresql_restart_costs_a_few_503s_at_most(pg, actors):
    """A restart of a second: the pool's connections are all dead afterwards; the server notices, replaces
    them and serves again, without a 500 on the way."""
    for _name, call in actors.calls():
        ok(call())
    pg.restart(down_s=1.0)
    back_at = time.monotonic()
    statuses = []
    while time.monotonic() - back_at < 5:
        for _name, call in actors.calls():
            statuses.append(call()[0])
        time.sleep(0.05)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses[-8:] == [200] * 8, statuses
    assert "Traceback" not in actors.log_text()


# --- in process: the breaker's answers, without stopping a database ------------------------------------------


@pytest.fixture
def breaker_open():
    from control_plane.db_outage import DATABASE

    DATABASE.down = True
    yield DATABASE
    DATABASE.down = False


def test_while_the_breaker_is_open_pages_and_api_answer_503_without_touching_the_database(breaker_open, client):
    page = client.get("/runs/00000000-0000-0000-0000-000000000000/")
    assert page.status_code == 503 and page["Content-Type"].startswith("text/html")
    assert page["Retry-After"].isdigit() and b"Database unavailable" in page.content
    api = client.get("/api/v1/runs", HTTP_AUTHORIZATION="Bearer nobody")
    assert api.status_code == 503 and api["Retry-After"].isdigit()
    assert_error((api.status_code, api.json()), 503, "database_unavailable")


def test_a_page_whose_view_finds_the_database_unreachable_gets_the_503_page(rf, monkeypatch):
    """process_exception: the view's error becomes the plain 503 page (no 500, no traceback) and opens the
    breaker, whose probe (the test database is up) closes it again at once."""
    from control_plane import db_outage

    probes = []
    monkeypatch.setattr(db_outage.Breaker, "_probe_until_back", lambda self: probes.append(self))
    middleware = db_outage.DatabaseOutageMiddleware(lambda request: None)
    error = _django_wrapped(psycopg.OperationalError("connection failed: Connection refused"))
    try:
        response = middleware.process_exception(rf.get("/agents/"), error)
        assert response.status_code == 503 and b"Database unavailable" in response.content
        assert db_outage.DATABASE.down
        wait_for(lambda: len(probes) == 1, 5, 0.01, "the probe to start")
        assert middleware.process_exception(rf.get("/"), ValueError("a bug")) is None  # a 500 as before
    finally:
        db_outage.DATABASE.down = False
