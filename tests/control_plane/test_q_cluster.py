"""The django-q2 cluster as it runs in production: a real `manage.py qcluster` (sentinel, pusher, monitor,
workers) on a PostgreSQL of the test's own, running the backstop sweep as queued and as scheduled jobs past
the pool's idle and lifetime limits and across a PostgreSQL restart, and stopping promptly on SIGTERM."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import psycopg
import pytest
from django.utils import timezone
from django_q.signing import SignedPackage

from control_plane import launch
from tests.conftest import wait_for

JOB = "tasks_app.jobs.sweep_job"  # a real job: it reads and writes the database in the worker
SCHEDULE = "sweep expired leases and silent agents"  # the backstop schedule the migrations create
LOG_ALARMS = (
    "Could not save task result",
    "Failed to pull task",
    "reincarnated",
    "server closed the connection",
    "Could not create task from schedule",
    "Traceback",
)


class QCluster:
    """A `manage.py qcluster` process (its own process group) on `db_url`, logging to `log`."""

    def __init__(self, db_url: str, folder: Path, env: dict | None = None):
        self.log = folder / "qcluster.log"
        self.proc = launch.start_qcluster(env={"DATABASE_URL": db_url, **(env or {})}, log=self.log)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alarms(self) -> list[str]:
        return [line for line in self.log_text().splitlines() if any(a in line for a in LOG_ALARMS)]

    def sigterm(self, timeout: float = 30.0) -> float:
        """SIGTERM to the cluster's main process only (as `kill PID` or a service manager's main-process
        signal does); seconds until it and every process it started are gone."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
            wait_for(lambda: not _group_alive(self.proc.pid), timeout, what="the cluster's processes to end")
        finally:
            launch.stop(self.proc, signal.SIGKILL)
        return time.monotonic() - started


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is left in process group `pgid`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def enqueue(conninfo: str, func: str = JOB) -> str:
    """Queue a job the way `async_task` does (a signed package in django-q2's ORM queue); its task id."""
    task_id = uuid.uuid4().hex
    task = {"id": task_id, "name": f"test-{task_id[:8]}", "func": func, "args": (), "kwargs": {}}
    package = SignedPackage.dumps({**task, "started": timezone.now()})
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("INSERT INTO django_q_ormq (key, payload, lock) VALUES ('control_plane', %s, now())", [package])
    return task_id


def succeeded(conninfo: str, task_id: str) -> bool:
    """Whether the job ran and the monitor saved its success."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        row = conn.execute("SELECT success FROM django_q_task WHERE id = %s", [task_id]).fetchone()
    return bool(row and row[0])


def scheduled_runs(conninfo: str) -> int:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        sql = 'SELECT count(*) FROM django_q_task WHERE "group" = %s AND success'
        return conn.execute(sql, [SCHEDULE]).fetchone()[0]


def run_job(conninfo: str, within: float) -> float:
    """Queue a job and wait until it has succeeded; seconds it took."""
    started = time.monotonic()
    task_id = enqueue(conninfo)
    wait_for(lambda: succeeded(conninfo, task_id), within, 0.1, f"job {task_id} to succeed within {within} s")
    return time.monotonic() - started


@pytest.fixture
def cluster_factory(tmp_path):
    clusters = []

    def start(db_url: str, env: dict | None = None) -> QCluster:
        cluster = QCluster(db_url, tmp_path, env)
        clusters.append(cluster)
        return cluster

    yield start
    for cluster in clusters:
        launch.stop(cluster.proc, signal.SIGKILL)


def test_cluster_runs_jobs_past_the_pools_idle_and_lifetime_limits(pg_db, cluster_factory):
    url, conninfo = pg_db
    # Limits of a second or three: the 10 minutes and the hour of the defaults, many times over in 20 s.
    cluster = cluster_factory(url, {"CP_DB_POOL_MAX_IDLE_S": "1", "CP_DB_POOL_MAX_LIFETIME_S": "3"})
    run_job(conninfo, within=30)  # the cluster has started
    took = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        took.append(run_job(conninfo, within=5))
        time.sleep(1.5)  # every connection idle past max_idle between two jobs
    assert len(took) >= 6, took
    assert cluster.alarms() == []
    assert cluster.sigterm() < 5


def test_cluster_survives_a_postgresql_restart(pg, pg_db, cluster_factory):
    url, conninfo = pg_db
    cluster = cluster_factory(url)
    run_job(conninfo, within=30)
    # The scheduler runs in the sentinel every 30 s: its first pass runs the backstop sweep (due since migrate).
    wait_for(lambda: scheduled_runs(conninfo) >= 1, 45, 0.5, "the scheduled sweep")

    pg.restart(down_s=1.0)
    back = time.monotonic()
    took = [run_job(conninfo, within=5) for _ in range(3)]  # every process's old connection is dead
    assert time.monotonic() - back < 10, took

    # The scheduler's next pass, after the restart, runs the schedule again once it is due.
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("UPDATE django_q_schedule SET next_run = now() - interval '1 second' WHERE name = %s", [SCHEDULE])
    wait_for(lambda: scheduled_runs(conninfo) >= 2, 45, 0.5, "the scheduled sweep after the restart")
    run_job(conninfo, within=5)

    assert [line for line in cluster.alarms() if "reincarnated" in line] == []
    assert cluster.sigterm() < 5


def test_sigterm_stops_the_cluster_promptly_after_a_postgresql_restart(pg, pg_db, cluster_factory):
    """Jobs queued when the signal comes, every process's connection broken by a restart just before: the
    cluster still ends within seconds, and says it stopped."""
    url, conninfo = pg_db
    cluster = cluster_factory(url)
    run_job(conninfo, within=30)
    pg.restart(down_s=0.5)
    time.sleep(1.5)  # the pusher has polled on its broken connection
    for _ in range(3):
        enqueue(conninfo)
    assert cluster.sigterm() < 5
    assert "has stopped" in cluster.log_text()
