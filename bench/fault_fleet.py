"""The fault suite's moving parts: a database per scenario on a throwaway PostgreSQL cluster, real server and
agent daemon processes, a DAG of shell tasks that record each execution, and the readings taken afterwards
from PostgreSQL (tasks_app_attempt, tasks_app_event) and from the executions' marks.

A task's command appends `start KEY ATTEMPT_ID EPOCH` to one marks file, sleeps its duration, then appends
`end KEY ATTEMPT_ID EPOCH`: an `end` line is an execution that ran to its end. Each line is one short
O_APPEND write, so lines from concurrent tasks never interleave.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import benchdb

from control_plane import launch

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE_DB = "faults_template"
LABEL = "faults"
TERMINAL_RUN_STATES = ("succeeded", "failed", "canceled")


def say(text: str = "") -> None:
    print(text, flush=True)


def cp_agent_supports_several_servers() -> bool:
    """Whether this checkout's daemon takes `--server URL1,URL2` (issue 8, item 8): asked of its own
    argument parser in a separate interpreter, since the daemon is a standalone script."""
    probe = (
        "import sys; sys.path.insert(0, 'agents_app'); import cp_agent; "
        "c = cp_agent.Config.from_argv(['--server', 'http://127.0.0.1:1,http://127.0.0.1:2', '--name', 'probe']); "
        "sys.exit(0 if len(getattr(c, 'servers', None) or []) == 2 else 1)"
    )
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, timeout=30)
    return done.returncode == 0


# --------------------------------------------------------------------------------------------- databases


class Databases:
    """Databases on a throwaway cluster (tests/pg_instance.py): a template cloned from the cluster's migrated
    one with the bench's user, API and enrollment tokens added; `fresh(name)` clones it into a new database
    and returns its URL."""

    def __init__(self, pg):
        self.pg = pg
        pg.fresh_database(TEMPLATE_DB)
        env = {**os.environ, "DATABASE_URL": pg.url(TEMPLATE_DB), "LOG_LEVEL": "WARNING"}
        out = subprocess.run(
            [sys.executable, "manage.py", "shell", "-c", benchdb.SETUP_CODE],
            cwd=ROOT, env=env, check=True, capture_output=True, text=True, timeout=120,
        ).stdout  # fmt: skip
        line = next(x for x in out.splitlines() if x.startswith("BENCH-TOKENS "))
        tokens = json.loads(line.split(" ", 1)[1])
        self.api_token, self.enrollment_token = tokens["api"], tokens["enrollment"]

    def fresh(self, name: str) -> str:
        self.pg.drop_database(name)
        return self.pg.create_database(name, template=TEMPLATE_DB)


class Reader:
    """Read-only queries on one scenario's database over one autocommit connection, reconnecting (bounded)
    when PostgreSQL went away under it."""

    def __init__(self, url: str):
        self.url = url
        self.conn = None

    def rows(self, sql: str, params=None, patience_s: float = 60.0) -> list[tuple]:
        import psycopg

        deadline = time.monotonic() + patience_s
        while True:
            try:
                if self.conn is None or self.conn.closed:
                    self.conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
                return self.conn.execute(sql, params).fetchall()
            except psycopg.OperationalError:
                if self.conn is not None:
                    self.conn.close()
                self.conn = None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def one(self, sql: str, params=None):
        return self.rows(sql, params)[0][0]

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


# --------------------------------------------------------------------------------------------- processes


class ServerProc:
    """One uvicorn server process (launch.start_server) on a fixed loopback port, so it can be killed and
    started again where its agents look for it."""

    def __init__(self, db_url: str, timings: dict, log: Path):
        self.port = launch.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {"DATABASE_URL": db_url, **timings}
        self.log = log
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = launch.start_server(self.port, env=self.env, log=self.log)

    def kill(self) -> None:
        """SIGKILL, no shutdown of any kind: what a crash or the OOM killer does."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc:
            launch.stop(self.proc, timeout=10)


class AgentProc:
    """One agent daemon (launch.start_agent) with its own work dir, so a restart finds its saved identity."""

    def __init__(self, name: str, servers: str, token: str, folder: Path, capacity: int, env: dict):
        self.name, self.servers, self.token, self.capacity = name, servers, token, capacity
        self.work_dir, self.log = folder / name, folder / f"{name}.log"
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.started_at = time.time()
        self.proc = launch.start_agent(
            self.servers, self.token, self.name, [LABEL], self.work_dir, executors=["shell"],
            extra=["--capacity", str(self.capacity)], log=self.log, env=self.env,
        )  # fmt: skip

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the daemon alone, as a crash would: its task processes are left to whatever it arranged."""
        if self.alive:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc:
            launch.stop(self.proc, timeout=5)

    def announced_timings(self) -> dict:
        """The timings the server gave this agent at registration (kept in its state file)."""
        try:
            state = json.loads((self.work_dir / f"{self.name}.state.json").read_text())
        except (OSError, ValueError):
            return {}
        return {k: v for k, v in state.items() if k.endswith("_s")}


# --------------------------------------------------------------------------------------------- the DAG


def fault_dag(name: str, n: int, seed: int, durations: tuple[float, float], marks: Path) -> tuple[dict, dict]:
    """A DAG document of `n` shell tasks with dependencies (about half the tasks depend on 1-3 earlier
    ones, every 100th joins 5), and {key: duration}. Defaults otherwise: max_attempts 3, retry delay 10 s."""
    rng = random.Random(seed)
    path = shlex.quote(str(marks))
    tasks, duration_of = [], {}
    for i in range(n):
        key = f"t{i:04d}"
        duration = round(rng.uniform(*durations), 2)
        duration_of[key] = duration
        earlier = range(max(0, i - 200), max(0, i - 10))
        deps: list[str] = []
        if i % 100 == 99 and len(earlier) >= 5:
            deps = [f"t{j:04d}" for j in rng.sample(earlier, 5)]
        elif len(earlier) and rng.random() < 0.5:
            deps = [f"t{j:04d}" for j in rng.sample(earlier, min(len(earlier), rng.randint(1, 3)))]
        mark = f'"$CP_TASK_KEY" "$CP_ATTEMPT_ID" "$(date +%s.%N)" >> {path}'
        command = f"echo start {mark}; sleep {duration}; echo end {mark}"
        task = {"key": key, "executor": "shell", "command": command, "requires": [LABEL], "estimate_s": duration}
        if deps:
            task["deps"] = sorted(set(deps))
        tasks.append(task)
    return {"name": name, "tasks": tasks}, duration_of


def submit(server_url: str, api_token: str, document: dict) -> str:
    req = urllib.request.Request(
        f"{server_url}/api/v1/runs",
        data=json.dumps(document).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {api_token}"},
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())["run_id"]


@dataclass
class Execution:
    key: str
    attempt_id: str
    started: float
    ended: float | None = None


def read_marks(marks: Path) -> dict[str, Execution]:
    """Every execution by attempt id, from the marks file (a partial last line is left for later)."""
    out: dict[str, Execution] = {}
    try:
        text = marks.read_text()
    except FileNotFoundError:
        return out
    for line in text.splitlines(keepends=True):
        parts = line.split()
        if not line.endswith("\n") or len(parts) != 4:
            continue
        what, key, attempt_id, at = parts
        if what == "start":
            out[attempt_id] = Execution(key, attempt_id, float(at))
        elif what == "end" and attempt_id in out:
            out[attempt_id].ended = float(at)
    return out


def spread(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": round(min(values), 2),
        "median": round(statistics.median(values), 2),
        "max": round(max(values), 2),
    }


# --------------------------------------------------------------------------------------------- a scenario


@dataclass
class Scenario:
    """One run of the fault DAG on a database of its own, its servers and fleet, and what it measured."""

    name: str
    folder: Path
    db_url: str
    reader: Reader
    servers: list[ServerProc]
    agents: list[AgentProc]
    marks: Path
    durations: dict = field(default_factory=dict)
    run_id: str = ""
    notes: list[str] = field(default_factory=list)
    faults: list[dict] = field(default_factory=list)
    pending: list[tuple[float, AgentProc]] = field(default_factory=list)  # (monotonic due, agent) restarts

    def wait_agents_online(self, timeout: float = 60.0) -> None:
        names = [a.name for a in self.agents]
        self.wait(
            lambda: (
                self.reader.one(
                    "SELECT count(*) FROM agents_app_agent WHERE name = ANY(%s) AND status = 'online'"
                    " AND retired_at IS NULL",
                    [names],
                )
                == len(names)
            ),
            timeout,
            "every agent to be online",
        )

    def tick(self) -> None:
        """Restart the agents whose restart is due (with the identity they saved)."""
        now = time.monotonic()
        for due, agent in list(self.pending):
            if due <= now:
                self.pending.remove((due, agent))
                agent.start()

    def wait(self, predicate, timeout: float, what: str, interval: float = 0.1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.tick()
            value = predicate()
            if value:
                return value
            time.sleep(interval)
        raise TimeoutError(f"{self.name}: timed out after {timeout:g} s waiting for {what}; {self.situation()}")

    def situation(self) -> str:
        """Where the run stands, for a timeout's message."""
        try:
            tasks = self.reader.rows(
                "SELECT state, count(*) FROM tasks_app_task WHERE run_id = %s GROUP BY 1", [self.run_id or None]
            )
            agents = self.reader.rows(
                "SELECT status, count(*) FROM agents_app_agent WHERE retired_at IS NULL GROUP BY 1"
            )
        except Exception as exc:  # the database may be what is wrong
            return f"the database does not answer: {exc}"
        return f"tasks {dict(tasks)}, agents {dict(agents)}, agent processes alive {sum(a.alive for a in self.agents)}"

    def succeeded(self) -> int:
        return self.reader.one(
            "SELECT count(*) FROM tasks_app_task WHERE run_id = %s AND state = 'succeeded'", [self.run_id]
        )

    def run_state(self) -> str:
        return self.reader.one("SELECT state FROM tasks_app_run WHERE id = %s", [self.run_id])

    def wait_progress(self, tasks_done: int, timeout: float) -> None:
        self.wait(
            lambda: self.succeeded() >= tasks_done or self.run_state() in TERMINAL_RUN_STATES,
            timeout,
            f"{tasks_done} tasks to succeed",
        )

    def pg_now(self):
        return self.reader.one("SELECT clock_timestamp()")

    def live_attempts(self) -> dict[str, list[tuple[str, str, str, float]]]:
        """{agent name: [(attempt id, task key, state, assigned at as a Unix time)]} for this run's assigned
        and running attempts."""
        rows = self.reader.rows(
            """
            SELECT g.name, a.id::text, t.key, a.state, EXTRACT(EPOCH FROM a.assigned_at)::float
              FROM tasks_app_attempt a
              JOIN tasks_app_task t ON t.id = a.task_id JOIN agents_app_agent g ON g.id = a.agent_id
             WHERE a.run_id = %s AND a.state IN ('assigned', 'running')
            """,
            [self.run_id],
        )
        out: dict[str, list] = {}
        for name, *attempt in rows:
            out.setdefault(name, []).append(tuple(attempt))
        return out

    def wait_end(self, timeout: float) -> str:
        try:
            return self.wait(lambda: (s := self.run_state()) in TERMINAL_RUN_STATES and s, timeout, "the run to end")
        except TimeoutError as exc:
            self.notes.append(str(exc))
            return self.run_state()

    def figures(self, run_state: str) -> dict:
        """Lost tasks, tasks succeeded twice (from the database), tasks executed twice (from the marks), the
        attempts by outcome, and every execution of an attempt that did not succeed which ran to its end."""
        # Processes of lost attempts may still be running (the defect of issue 8, item 5): give them the
        # longest task's duration to reach their end before counting.
        time.sleep(max(self.durations.values(), default=0) + 0.5)
        r, run = self.reader, [self.run_id]
        n = r.one("SELECT count(*) FROM tasks_app_task WHERE run_id = %s", run)
        not_succeeded = r.one("SELECT count(*) FROM tasks_app_task WHERE run_id = %s AND state <> 'succeeded'", run)
        twice = r.one(
            "SELECT count(*) FROM (SELECT task_id FROM tasks_app_attempt WHERE run_id = %s AND state = 'succeeded'"
            " GROUP BY task_id HAVING count(*) > 1) x",
            run,
        )
        attempts = dict(r.rows("SELECT state, count(*) FROM tasks_app_attempt WHERE run_id = %s GROUP BY 1", run))
        makespan = r.one(
            "SELECT EXTRACT(EPOCH FROM (finished_at - created_at))::float FROM tasks_app_run WHERE id = %s", run
        )
        state_of = dict(r.rows("SELECT id::text, state FROM tasks_app_attempt WHERE run_id = %s", run))
        executions = read_marks(self.marks)
        ended: dict[str, list[Execution]] = {}
        for e in executions.values():
            if e.ended is not None:
                ended.setdefault(e.key, []).append(e)
        executed_twice = {k: v for k, v in ended.items() if len(v) > 1}
        unsucceeded_ran = [e.attempt_id for v in ended.values() for e in v if state_of.get(e.attempt_id) != "succeeded"]
        return {
            "scenario": self.name,
            "run_state": run_state,
            "tasks": n,
            "agents": len(self.agents),
            "servers": len(self.servers),
            "makespan_s": round(makespan, 1) if makespan is not None else None,
            "lost_tasks": not_succeeded,
            "tasks_succeeded_twice": twice,
            "tasks_executed_twice": len(executed_twice),
            "executed_twice": {
                k: [{"attempt": e.attempt_id, "state": state_of.get(e.attempt_id)} for e in v]
                for k, v in sorted(executed_twice.items())
            },
            "unsucceeded_attempts_that_ran_to_end": len(unsucceeded_ran),
            "attempts": attempts,
            "faults": self.faults,
            "notes": self.notes,
        }

    def stop_all(self) -> None:
        for agent in self.agents:
            agent.stop()
        for server in self.servers:
            server.stop()
        self.reader.close()
