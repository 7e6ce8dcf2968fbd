"""Shared fixtures: real PostgreSQL (pytest-django's test database), real server processes on loopback
ports, real agent daemon processes. Named actors and small factories keep tests readable."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from datetime import timedelta
from pathlib import Path
from urllib.parse import quote

import pytest
from django.db import connection
from django.utils import timezone

from control_plane import launch
from tests.real_clis import model_api  # noqa: F401 - the model API stand-in's fixture (tests/model_api.py)

pytest_plugins = ["tests.durations"]  # the long tests first (tests/durations.py)

# Fast clocks for the server processes the tests start: agents heartbeat every second, are offline after 3 s.
FAST_TIMINGS = {
    "CP_HEARTBEAT_INTERVAL_S": "1",
    "CP_OFFLINE_AFTER_S": "3",
    "CP_LEASE_S": "6",
    "CP_SWEEP_INTERVAL_S": "0.5",
    "CP_MAX_WAIT_S": "5",
    # The error tests send bad tokens on purpose, from one address: the limit has a test of its own.
    "CP_AUTH_FAILURES_PER_MIN": "0",
    # The tests edit the price table between claims (and transactional tests empty it).
    "CP_PRICE_TABLE_TTL_S": "0",
}
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


def test_database_url() -> str:
    s = connection.settings_dict
    host = s["HOST"]
    auth = quote(s["USER"]) + (":" + quote(s["PASSWORD"]) if s.get("PASSWORD") else "")
    if host.startswith("/"):
        return f"postgresql://{auth}@/{quote(s['NAME'])}?host={quote(host)}"
    return f"postgresql://{auth}@{host}:{s['PORT'] or 5432}/{quote(s['NAME'])}"


class Server:
    """A real ASGI server process against the test database; over HTTPS with `pki` (tests/certs.py)."""

    def __init__(self, tmp: Path, extra_env: dict | None = None, kind: str = "uvicorn", pki=None):
        self.port = launch.free_port()
        self.url = f"{'https' if pki else 'http'}://127.0.0.1:{self.port}"
        self.log = tmp / f"server-{self.port}.log"
        env = {"DATABASE_URL": test_database_url(), **FAST_TIMINGS, **(extra_env or {})}
        tls = (str(pki.cert_file), str(pki.key_file)) if pki else None
        ca_file = str(pki.ca_file) if pki else None
        self.proc = launch.start_server(self.port, env=env, kind=kind, log=self.log, tls=tls, ca_file=ca_file)

    def stop(self):
        launch.stop(self.proc)


@pytest.fixture(scope="session")
def server_tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def live_server_proc(django_db_setup, django_db_blocker, server_tmp):
    """One server process for the session (tests using it need `transactional_db`)."""
    with django_db_blocker.unblock():
        server = Server(server_tmp)
    yield server
    server.stop()


def wait_for(predicate, timeout=60.0, interval=0.1, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def fleet(live_server_proc, enrollment_token, tmp_path):
    """Starts agent daemon processes (on the session's server unless told another, with the test's enrollment
    token unless given one); stops them all afterwards. Each logs to tmp_path/NAME.log."""
    procs = []

    def start(name, labels, executors=("simulated", "shell"), extra=(), server=None, env=None, token=None):
        proc = launch.start_agent(
            (server or live_server_proc).url, token or enrollment_token, name, list(labels), tmp_path / "agents",
            executors=list(executors), extra=list(extra), log=tmp_path / f"{name}.log", env=env,
        )  # fmt: skip
        procs.append(proc)
        return proc

    yield start
    stop_daemons(procs)


def stop_daemons(procs: list[subprocess.Popen], drain_s: float = 2.0, timeout: float = 15.0) -> None:
    """Stop daemons the way an operator would, all at once: SIGTERM drains (nothing more is claimed, goodbye
    is said); one still running a task after `drain_s` (a `sleep 60` the test left) gets the second SIGTERM,
    which cancels its tasks; SIGKILL after `timeout`. The test is over: waiting out a task helps no one."""
    running = [proc for proc in procs if proc.poll() is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    drained = time.monotonic() + drain_s
    for proc in running:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(max(0.0, drained - time.monotonic()))
    for proc in running:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    for proc in running:
        launch.stop(proc, timeout=max(0.1, drained + timeout - time.monotonic()))


def parked_claim(server_url: str, token: str, agent_id, wait_s: float) -> tuple[threading.Thread, dict]:
    """A claim long poll from another thread, returned once the server has authenticated it (and is about to
    park it); `answer` gets the (status, body) when it ends."""
    from agents_app.models import Agent

    # Contact is written at most once a second per agent: age it, so the claim's touch shows.
    seen_before = timezone.now() - timedelta(seconds=10)
    Agent.objects.filter(pk=agent_id).update(last_seen_at=seen_before)
    answer: dict = {}
    url = f"{server_url}/api/v1/agents/claim"
    thread = threading.Thread(
        target=lambda: answer.update(result=http("POST", url, {"capacity": 1, "wait_s": wait_s}, token=token))
    )
    thread.start()
    wait_for(lambda: Agent.objects.get(pk=agent_id).last_seen_at > seen_before, 10, 0.02, "the claim to arrive")
    time.sleep(0.2)  # from authenticated to parked takes a claim query; none can be observed from outside
    return thread, answer


def assert_error(answer, status: int, code: str | None = None, case=None) -> str:
    """An error answer in PROTOCOL.md's shape: exactly {"error", "detail"}, both non-empty strings.
    `case` names the input in failure messages when one test walks through several."""
    got, body = answer
    where = f"{case!r}: " if case is not None else ""
    assert got == status, f"{where}{got} {body!r:.300}"
    assert isinstance(body, dict), f"{where}not a JSON error body: {body[:200]!r}"
    assert set(body) == {"error", "detail"}, f"{where}{body}"
    assert isinstance(body["error"], str) and body["error"], f"{where}{body}"
    assert isinstance(body["detail"], str) and body["detail"], f"{where}{body}"
    if code is not None:
        assert body["error"] == code, f"{where}{body}"
    return body["detail"]


def ok(answer, status: int = 200) -> dict:
    got, body = answer
    assert got == status, body
    return body


def http(method: str, url: str, body=None, token: str | None = None, raw: bytes | None = None, headers=None):
    """(status, parsed JSON or raw bytes) for one HTTP call; never raises for HTTP error statuses."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None and raw is None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        req.add_header(k, v)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            status, payload, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        status, payload, ctype = err.code, err.read(), err.headers.get("Content-Type", "")
    if "json" in ctype:
        return status, json.loads(payload)
    return status, payload


@pytest.fixture
def enrollment_token(transactional_db):
    from agents_app.registry import create_enrollment_token

    token, _ = create_enrollment_token(note="tests")
    return token


@pytest.fixture
def operator(transactional_db, django_user_model):
    """A superuser with an API token: (user, token)."""
    from agents_app.registry import create_api_token

    user = django_user_model.objects.create_superuser("olivia", "olivia@example.com", "pw-olivia-123")
    token, _ = create_api_token(user)
    return user, token


def register(server_url: str, enrollment: str, name: str, labels=(), executors=("shell", "simulated"), capacity=1):
    status, body = http(
        "POST",
        f"{server_url}/api/v1/agents/register",
        {"name": name, "labels": list(labels), "executors": list(executors), "capacity": capacity},
        token=enrollment,
    )
    assert status == 201, body
    return body


@pytest.fixture
def make_agent(db):
    """Register an agent directly (no HTTP) and return the dict the actions take."""
    from agents_app.registry import authenticate_agent, create_enrollment_token, register_agent

    token, _ = create_enrollment_token()

    def make(name="ccg-1", labels=("ccg",), executors=("shell", "simulated", "claude", "codex"), capacity=1):
        info = {"name": name, "labels": list(labels), "executors": list(executors), "capacity": capacity}
        _agent, agent_token = register_agent(token, info)
        return authenticate_agent(agent_token)

    return make


@pytest.fixture
def submit(db):
    """Submit a DAG document (dict) and return the Run."""
    from tasks_app.actions import submit_run
    from tasks_app.dag import parse_document

    def do(doc: dict, **kwargs):
        return submit_run(parse_document(doc), doc, actor="test", **kwargs)

    return do


def doc(*tasks, name="t", max_parallel=None, **extra) -> dict:
    """A DAG document from task dicts; tasks default to the simulated executor."""
    out = {"name": name, "tasks": [{"executor": "simulated", **t} for t in tasks], **extra}
    if max_parallel is not None:
        out["max_parallel"] = max_parallel
    return out


def git(*args, cwd=None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def origin(tmp_path):
    """A bare repository with `main` (two commits), a lightweight tag and an annotated one: (file:// url, shas
    by commit message)."""
    bare, work = tmp_path / "origin.git", tmp_path / "seed"
    git("init", "-q", "--bare", "-b", "main", str(bare))
    git("init", "-q", "-b", "main", str(work))
    shas = {}
    for name in ("first", "second"):
        (work / f"{name}.txt").write_text(name)
        git("add", ".", cwd=work)
        git("-c", "user.name=t", "-c", "user.email=t@e", "commit", "-qm", name, cwd=work)
        shas[name] = git("rev-parse", "HEAD", cwd=work)
    git("tag", "light", shas["first"], cwd=work)
    git("-c", "user.name=t", "-c", "user.email=t@e", "tag", "-a", "-m", "v", "v1", shas["first"], cwd=work)
    git("push", "-q", str(bare), "main", "light", "v1", cwd=work)
    return f"file://{bare}", shas


@pytest.fixture(scope="session")
def artifacts_dir():
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture
def viewer(django_user_model):
    """A logged-in dashboard client who may watch."""
    from django.test import Client

    client = Client()
    client.force_login(django_user_model.objects.create_user("vera", password="pw-vera-12345"))
    return client


@pytest.fixture
def operator_client(django_user_model):
    """A logged-in dashboard client with the operator permission, CSRF checks on as in a browser."""
    from django.contrib.auth.models import Permission
    from django.test import Client

    user = django_user_model.objects.create_user("otto", password="pw-otto-12345")
    user.user_permissions.add(Permission.objects.get(codename="operate_run"))
    client = Client(enforce_csrf_checks=True)
    client.force_login(user)
    return client


@pytest.fixture(scope="session", autouse=True)
def static_files():
    """Static files collected once, as in production: whitenoise serves them from STATIC_ROOT, to the
    in-process test client as to the live servers."""
    import fcntl

    from django.conf import settings
    from django.core.management import call_command

    # One xdist worker at a time: collectstatic deletes and copies a changed file, and a server that another
    # worker started may be serving it.
    Path(settings.STATIC_ROOT).parent.mkdir(parents=True, exist_ok=True)
    with open(Path(settings.STATIC_ROOT).parent / "collectstatic.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        call_command("collectstatic", "--noinput", verbosity=0)


def pytest_configure(config):
    os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/runtime-{os.getuid()}")
    _retry_flush_on_deadlock()
    # One migrated template for every throwaway PostgreSQL of this run (tests/pg_instance.py), xdist's
    # workers included (they inherit the variable): the first cluster migrates, the others restore its dump.
    from tests.pg_instance import TEMPLATE_CACHE_ENV

    if not hasattr(config, "workerinput") and not os.environ.get(TEMPLATE_CACHE_ENV):
        config._pg_template_cache = tempfile.mkdtemp(prefix="cp-test-pg-template-")
        os.environ[TEMPLATE_CACHE_ENV] = config._pg_template_cache


def pytest_unconfigure(config):
    import shutil

    from tests.pg_instance import TEMPLATE_CACHE_ENV

    folder = getattr(config, "_pg_template_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop(TEMPLATE_CACHE_ENV, None)


def _retry_flush_on_deadlock():
    """A transactional test's flush (one TRUNCATE of every table) runs while the session's server processes
    are still sweeping, or finishing a stopped daemon's goodbye; PostgreSQL may then pick the flush as a
    deadlock's victim, which failed that test's teardown and the next test's setup. The flush is tried again
    (the server's short statements are done by then); any other failure is raised as it was."""
    from django.core.management.base import CommandError
    from django.test import TransactionTestCase
    from psycopg.errors import DeadlockDetected

    original = TransactionTestCase._fixture_teardown

    def teardown(self):
        for attempt in range(5):
            try:
                return original(self)
            except CommandError as exc:
                cause = getattr(exc.__cause__, "__cause__", None) or exc.__cause__
                if attempt == 4 or not isinstance(cause, DeadlockDetected):
                    raise
                time.sleep(0.2 * (attempt + 1))

    TransactionTestCase._fixture_teardown = teardown


# --- test layers (markers registered in pyproject.toml; `./run test` runs them fastest first) ---
#
# A test's layer comes from the fixtures it uses (its whole fixture closure, so `make_host` counts as `sshd`):
# the heaviest wins. A test that starts processes without one of these fixtures says so with an explicit
# mark (`pytestmark = pytest.mark.integration`); a test with neither is `unit`, and the guard below makes a
# misfiled one fail loudly instead of quietly slowing the unit layer down.
LAYERS = ("unit", "integration", "browser", "ssh")  # fastest first
LAYER_FIXTURES = {
    "ssh": {"sshd"},
    "browser": {"browser", "people_browser", "page", "context", "browser_type"},
    "integration": {
        "live_server_proc", "server_tmp", "fleet", "qcluster", "pg", "pg_db", "cluster_factory", "two_servers",
        "behind_proxy", "proxied", "tls_server", "https_server", "model_api", "fake_server", "input_server",
        "suite",  # tests/faults: bench/faults.py's clusters, servers and agents
    },
}  # fmt: skip


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(item.fixturenames)
        derived = next((layer for layer in reversed(LAYERS) if LAYER_FIXTURES.get(layer, set()) & fixtures), "unit")
        marked = {m.name for m in item.iter_markers() if m.name in LAYERS}
        if len(marked) > 1:
            raise pytest.UsageError(f"{item.nodeid} has more than one layer mark: {sorted(marked)}")
        if marked and LAYERS.index(next(iter(marked))) < LAYERS.index(derived):
            raise pytest.UsageError(f"{item.nodeid} is marked {next(iter(marked))} but uses {derived} fixtures")
        if not marked:
            item.add_marker(derived)
        item.layer = next(iter(marked)) if marked else derived


# What a unit test must not start: servers, daemons, browsers, databases, the real AI CLIs (the fake
# claude/codex scripts of the daemon's unit tests, git, sh and ruff are fine).
NOT_UNIT_PROGRAMS = {"sshd", "nginx", "chromium", "chrome", "headless_shell", "postgres", "pg_ctl", "initdb", "node",
                     "uvicorn", "daphne"}  # fmt: skip


def _not_unit(words: list[str]) -> str | None:
    for word in words[:2]:
        if os.path.basename(word) in NOT_UNIT_PROGRAMS:
            return os.path.basename(word)
    for word in words:
        # the daemon's own helpers (a task's supervisor, the MCP permission relay) are no daemon
        if word.endswith("cp_agent.py") and not {"--supervise", "--mcp-permissions"} & set(words):
            return word
        if "/node_modules/" in word or "/ms-playwright/" in word:
            return word
        if word in {"qcluster", "uvicorn", "daphne", "control_plane.launch"}:
            return word
    return None


@pytest.fixture(scope="session", autouse=True)
def _passwords_hashed_once():
    """PBKDF2's million rounds cost half a second of CPU for each user a test makes (and each password this
    process checks), and the tests make the same few users again and again (olivia, otto, vera...): in this
    process each password is hashed once, and each (password, salt, rounds) computed once. The hashes are
    real PBKDF2 ones, which the server processes (where the logins are checked) verify as before."""
    from django.conf import settings
    from django.contrib.auth import base_user, hashers
    from django.contrib.auth import models as auth_models

    make_password, encode = hashers.make_password, hashers.PBKDF2PasswordHasher.encode
    made, encoded = {}, {}

    def make_once(password, salt=None, hasher="default"):
        if not isinstance(password, str) or salt is not None:  # unusable passwords stay random
            return make_password(password, salt, hasher)
        key = (password, hasher, tuple(settings.PASSWORD_HASHERS))
        if key not in made:
            made[key] = make_password(password, salt, hasher)
        return made[key]

    def encode_once(self, password, salt, iterations=None):
        key = (type(self), password, salt, iterations)
        if key not in encoded:
            encoded[key] = encode(self, password, salt, iterations)
        return encoded[key]

    patched = [(hashers, "make_password"), (base_user, "make_password"), (auth_models, "make_password")]
    for module, name in patched:
        setattr(module, name, make_once)
    hashers.PBKDF2PasswordHasher.encode = encode_once
    yield
    for module, name in patched:
        setattr(module, name, make_password)
    hashers.PBKDF2PasswordHasher.encode = encode


@pytest.fixture(autouse=True)
def _unit_starts_no_process(request, monkeypatch):
    """A unit test that starts a server, an agent daemon, a browser or sshd fails with a message saying so."""
    if getattr(request.node, "layer", "unit") != "unit":
        return
    # No server process checks what a unit test hashes: a fast hasher instead of PBKDF2's million rounds
    # (a second of CPU per user made, the unit layer's largest cost).
    from django.test import override_settings

    fast_hashes = override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"])
    fast_hashes.enable()
    request.addfinalizer(fast_hashes.disable)

    def refuse(what):
        def refused(*args, **kwargs):
            raise AssertionError(f"this test starts {what}: it is not a unit test (mark it, or use a fixture)")

        return refused

    monkeypatch.setattr(launch, "start_server", refuse("a server"))
    monkeypatch.setattr(launch, "start_agent", refuse("an agent daemon"))
    monkeypatch.setattr(launch, "start_qcluster", refuse("a django-q2 cluster"))
    execute_child = subprocess.Popen._execute_child

    def checked(self, args, executable, *rest, **kwargs):
        argv = [args] if isinstance(args, str | bytes | os.PathLike) else list(args)
        words = [os.fsdecode(a) if isinstance(a, bytes | os.PathLike) else str(a) for a in argv]
        if executable:
            words.insert(0, os.fsdecode(executable))
        if len(words) == 1 and " " in words[0]:  # a shell string
            words = words[0].split()
        if _not_unit(words):
            refuse(f"a process, {_not_unit(words)} ({' '.join(words)[:200]})")()
        return execute_child(self, args, executable, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "_execute_child", checked)


# Tests marked `alone` read state that PostgreSQL keeps for the whole cluster, not per database: the webhook
# cursor settles once pg_current_snapshot()'s xmin passes the transactions that wrote what it read, and any
# test's open transaction in any database of the cluster holds that xmin back. An `alone` test waits until no
# other test runs on the cluster (in any xdist worker or pytest process), and the others wait for it: a
# reader/writer lock around each test's whole protocol, fixtures included, with a turnstile so that a waiting
# `alone` test is not starved by the others' next tests.
def cluster_locks() -> Path:
    """The lock folder of this run's PostgreSQL cluster: the embedded one's data folder, or one per host:port."""
    import hashlib

    s = connection.settings_dict
    if s.get("EMBEDDED"):
        folder = Path(s["EMBEDDED"]["DATA_DIR"]) / "test-locks"
    else:
        where = hashlib.sha256(f"{s['HOST']}:{s['PORT']}".encode()).hexdigest()[:12]
        folder = Path(tempfile.gettempdir()) / f"control-plane-tests-{os.getuid()}-{where}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import fcntl

    locks = cluster_locks()
    alone = item.get_closest_marker("alone") is not None
    with open(locks / "turnstile", "a") as turnstile, open(locks / "tests", "a") as tests:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(tests, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        if not alone:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        return (yield)
