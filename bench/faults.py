#!/usr/bin/env python
"""The fault suite (`./run bench faults`; `--short` is the form tests/faults/ runs in CI).

Real processes only: uvicorn server processes (control_plane.launch), agent daemons (agents_app/cp_agent.py)
running shell tasks that record each execution (bench/fault_fleet.py), and a throwaway PostgreSQL cluster of
the suite's own (tests/pg_instance.py), with a fresh database per scenario, since one scenario restarts it.

  agents-killed     a DAG of 1,000 shell tasks on 10 agents while agents are SIGKILLed at random (16 kills):
                    every other victim is restarted at once with its saved identity, the others only after
                    the server must have declared them offline
  server-killed     the server SIGKILLed mid-run, twice, and started again on its port
  two-servers       two server processes behind one database, the agents given both URLs; one SIGKILLed
  postgres-restart  PostgreSQL restarted mid-run (a fast shutdown, then an immediate one: a crash)

Each prints lost tasks (not succeeded), tasks succeeded twice (more than one succeeded attempt: the database
forbids it, so this checks it), tasks executed twice (two executions ran to their end, from the marks), and
for agents-killed the re-offer time of a killed agent's task, from the SIGKILL (PostgreSQL's clock) to the
task's next attempt being assigned (tasks_app_attempt), and to its attempt being lost (tasks_app_event).
The full mode uses the production timings (heartbeat 10 s, offline after 30 s, sweep 2 s) and keeps its
figures in bench/faults_results.json; --short uses the tests' fast timings (tests/conftest.py FAST_TIMINGS).
Exit status 1 when a figure misses its target (0 lost, 0 succeeded twice, 0 executed twice, re-offer <= 35 s
with the production timings).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(BENCH), str(ROOT)]

from fault_fleet import (  # noqa: E402
    AgentProc,
    Databases,
    Reader,
    Scenario,
    ServerProc,
    cp_agent_supports_several_servers,
    fault_dag,
    read_marks,
    say,
    spread,
    submit,
)

RESULTS = BENCH / "faults_results.json"
REOFFER_TARGET_S = 35.0
# Environment variables that would change the production timings the full mode promises to measure.
TIMING_VARS = ("CP_HEARTBEAT_INTERVAL_S", "CP_OFFLINE_AFTER_S", "CP_LEASE_S", "CP_SWEEP_INTERVAL_S", "CP_MAX_WAIT_S")


@dataclass(frozen=True)
class Mode:
    """The sizes and clocks of one form of the suite."""

    name: str
    timings: dict  # the server processes' environment: {} is the production defaults
    tasks: int  # agents-killed
    agents: int
    kills: int
    prompt_restart_s: float  # a victim restarted at once (its attempts: lost once it is back)
    late_restart_s: float  # a victim restarted after the server declared it offline
    other_tasks: int  # the other scenarios
    other_agents: int
    durations: tuple[float, float]
    fault_points: tuple[float, ...]  # fractions of the run done when server / PostgreSQL faults strike
    server_down_s: float
    pg_down_s: float
    timeout_s: float  # per scenario


FULL = Mode(
    name="full", timings={}, tasks=1000, agents=10, kills=16, prompt_restart_s=1.0, late_restart_s=40.0,
    other_tasks=300, other_agents=8, durations=(0.2, 2.0), fault_points=(0.3, 0.65), server_down_s=3.0,
    pg_down_s=3.0, timeout_s=900.0,
)  # fmt: skip


def short_mode() -> Mode:
    from tests.conftest import FAST_TIMINGS  # the tests' clocks: heartbeat 1 s, offline after 3 s, sweep 0.5 s

    return Mode(
        name="short", timings=dict(FAST_TIMINGS), tasks=120, agents=5, kills=4, prompt_restart_s=0.5,
        late_restart_s=5.0, other_tasks=60, other_agents=4, durations=(0.3, 1.0), fault_points=(0.4,),
        server_down_s=1.0, pg_down_s=1.0, timeout_s=90.0,
    )  # fmt: skip


def throwaway_postgres():
    """A started throwaway cluster of the suite's own (tests/pg_instance.py)."""
    from tests.pg_instance import PgInstance

    pg = PgInstance(durable=True)  # PostgreSQL is crashed on purpose: what it acknowledged must survive
    pg.start()
    return pg


@dataclass
class Suite:
    """The throwaway cluster, its template database and a folder for the scenarios' files."""

    mode: Mode
    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cp-faults-")))
    several_servers: bool = field(default_factory=cp_agent_supports_several_servers)

    def __post_init__(self):
        self.pg = throwaway_postgres()
        self.dbs = Databases(self.pg)
        self.seed = 8

    def start(self, name: str, n_tasks: int, n_agents: int, n_servers: int = 1, agent_servers=None) -> Scenario:
        """A database, servers and agents (capacity 1 and 2 in turn) for one scenario; its DAG submitted once
        every agent is online. `agent_servers(i, servers)` is the --server value of agent i."""
        folder = self.folder / name
        folder.mkdir()
        db_url = self.dbs.fresh(name.replace("-", "_"))
        servers = [ServerProc(db_url, self.mode.timings, folder / f"server-{i}.log") for i in range(n_servers)]
        pick = agent_servers or (lambda _i, servers: servers[0].url)
        agents = [
            AgentProc(f"{name}-{i:02d}", pick(i, servers), self.dbs.enrollment_token, folder, 1 + i % 2, {})
            for i in range(n_agents)
        ]
        sc = Scenario(name, folder, db_url, Reader(db_url), servers, agents, folder / "marks.log")
        try:
            sc.wait_agents_online()
            self.seed += 1
            document, sc.durations = fault_dag(name, n_tasks, self.seed, self.mode.durations, sc.marks)
            sc.run_id = submit(servers[0].url, self.dbs.api_token, document)
        except BaseException:
            sc.stop_all()
            raise
        say(f"{name}: {n_tasks} tasks on {n_agents} agents, {n_servers} server(s); run {sc.run_id}")
        return sc

    def close(self, remove_files: bool = True) -> None:
        self.pg.close()
        if remove_files:
            shutil.rmtree(self.folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------- scenarios


def _pick_victim(sc: Scenario, rng: random.Random, hit: set[str], timeout: float = 20.0):
    """An agent process alive and busy, every live attempt of it assigned in its current life, of a task no
    earlier kill hit, its shell started at least 0.1 s ago and 0.3 s from its end: a kill mid-task, not one
    racing its completion (an execution that ended before its daemon could report it is run again by any
    design). A task is hit once at most: a lost attempt counts as one of its 3, and a re-offered task
    often goes to the victim just restarted, so random kills would otherwise fail tasks for good now and
    then, which is not what this scenario is about."""

    def candidates():
        if sc.run_state() != "running":
            return ["the run ended"]
        now, live, runs = time.time(), sc.live_attempts(), read_marks(sc.marks)
        out = []
        for agent in sc.agents:
            held = live.get(agent.name)
            if not agent.alive or not held or any(assigned < agent.started_at for _, _, _, assigned in held):
                continue
            ok = True
            for attempt_id, key, _state, _assigned in held:
                e = runs.get(attempt_id)
                ok = ok and key not in hit
                if not e or e.ended or now - e.started < 0.1 or e.started + sc.durations[key] - now < 0.3:
                    ok = False
            if ok:
                out.append((agent, held))
        return out

    found = sc.wait(candidates, timeout, "a busy agent to kill", interval=0.05)
    return (None, []) if found == ["the run ended"] else rng.choice(found)


def agents_killed(suite: Suite) -> dict:
    """Scenario 1: agents SIGKILLed at random through the run, restarted with their saved identity."""
    mode = suite.mode
    sc = suite.start("agents-killed", mode.tasks, mode.agents)
    rng, hit = random.Random(suite.seed), set()
    deadline = time.monotonic() + mode.timeout_s
    try:
        for i in range(mode.kills):
            sc.wait_progress(int(mode.tasks * (0.05 + 0.7 * i / max(1, mode.kills - 1))), deadline - time.monotonic())
            victim, held = _pick_victim(sc, rng, hit) if sc.run_state() == "running" else (None, [])
            if victim is None:
                sc.notes.append(f"the run ended before kill {i + 1}")
                break
            hit.update(key for _, key, *_ in held)
            path = "offline" if i % 2 else "restarted"
            delay = mode.late_restart_s if path == "offline" else mode.prompt_restart_s
            killed_at = sc.pg_now()
            victim.kill()
            sc.pending.append((time.monotonic() + delay, victim))
            sc.faults.append({
                "fault": "agent SIGKILL", "agent": victim.name, "path": path, "restart_after_s": delay,
                "at": killed_at.isoformat(), "attempts": [attempt_id for attempt_id, *_ in held],
                "tasks_done": sc.succeeded(),
            })  # fmt: skip
            say(f"  kill {i + 1}/{mode.kills}: {victim.name} holding {len(held)}, restart in {delay:g} s ({path})")
        state = sc.wait_end(max(1.0, deadline - time.monotonic()))
        figures = sc.figures(state)
        figures["reoffer"] = _reoffer_times(sc)
        figures["announced_timings"] = sc.agents[0].announced_timings()
        return figures
    finally:
        sc.stop_all()


def _reoffer_times(sc: Scenario) -> dict:
    """Per kill path: from the SIGKILL to each attempt its agent held being lost (its event) and to the task's
    next attempt being assigned. Held: assigned to that agent by the moment of the kill and not ended before
    it, read afterwards, so an attempt assigned between the choice of the victim and the kill counts too.
    Attempts that succeeded all the same (their completion was already on its way) are counted apart."""
    out: dict = {}
    for path in ("offline", "restarted"):
        lost_s, assigned_s, reasons, completed = [], [], {}, 0
        for kill in (k for k in sc.faults if k["path"] == path):
            rows = sc.reader.rows(
                """
                SELECT a.state,
                       EXTRACT(EPOCH FROM (SELECT min(e.created_at) FROM tasks_app_event e
                                            WHERE e.attempt_id = a.id AND e.to_state = 'lost') - %(at)s)::float,
                       (SELECT e.detail->>'reason' FROM tasks_app_event e
                         WHERE e.attempt_id = a.id AND e.to_state = 'lost' ORDER BY e.id LIMIT 1),
                       EXTRACT(EPOCH FROM (SELECT min(b.assigned_at) FROM tasks_app_attempt b
                                            WHERE b.task_id = a.task_id AND b.number > a.number) - %(at)s)::float
                  FROM tasks_app_attempt a JOIN agents_app_agent g ON g.id = a.agent_id
                 WHERE a.run_id = %(run)s AND g.name = %(agent)s AND a.assigned_at <= %(at)s
                   AND (a.finished_at IS NULL OR a.finished_at > %(at)s)
                """,
                {"at": kill["at"], "run": sc.run_id, "agent": kill["agent"]},
            )
            for state, lost, reason, reassigned in rows:
                if state == "succeeded":
                    completed += 1
                    continue
                if lost is not None:
                    lost_s.append(lost)
                    reasons[reason] = reasons.get(reason, 0) + 1
                if reassigned is not None:
                    assigned_s.append(reassigned)
        out[path] = {
            "kill_to_lost_s": spread(lost_s),
            "kill_to_reassigned_s": spread(assigned_s),
            "lost_reasons": reasons,
            "succeeded_despite_kill": completed,
        }
    return out


def server_killed(suite: Suite) -> dict:
    """Scenario 2: the only server SIGKILLed mid-run and started again on its port."""
    mode = suite.mode
    sc = suite.start("server-killed", mode.other_tasks, mode.other_agents)
    deadline = time.monotonic() + mode.timeout_s
    try:
        server = sc.servers[0]
        for point in mode.fault_points:
            sc.wait_progress(int(mode.other_tasks * point), deadline - time.monotonic())
            done = sc.succeeded()
            began = time.monotonic()
            server.kill()
            time.sleep(mode.server_down_s)
            server.start()
            down = time.monotonic() - began
            sc.faults.append({"fault": "server SIGKILL", "tasks_done": done, "down_s": round(down, 2)})
            say(f"  server killed at {done} tasks done, answering again after {down:.1f} s")
        return sc.figures(sc.wait_end(max(1.0, deadline - time.monotonic())))
    finally:
        sc.stop_all()


def two_servers(suite: Suite) -> dict:
    """Scenario 3: two servers behind one database, every agent given both URLs; the first one SIGKILLed.
    A daemon that takes one URL only (before issue 8, item 8) gets one of them, alternately."""
    mode = suite.mode
    if suite.several_servers:
        pick = lambda _i, servers: ",".join(s.url for s in servers)  # noqa: E731
    else:
        pick = lambda i, servers: servers[i % 2].url  # noqa: E731
    sc = suite.start("two-servers", mode.other_tasks, mode.other_agents, n_servers=2, agent_servers=pick)
    deadline = time.monotonic() + mode.timeout_s
    try:
        if not suite.several_servers:
            sc.notes.append("the daemon takes one --server URL: half the agents were given the killed server")
        sc.wait_progress(int(mode.other_tasks * mode.fault_points[0]), deadline - time.monotonic())
        done = sc.succeeded()
        sc.servers[0].kill()
        sc.faults.append({"fault": "server SIGKILL, not restarted", "tasks_done": done})
        say(f"  server 1 of 2 killed at {done} tasks done")
        return sc.figures(sc.wait_end(max(1.0, deadline - time.monotonic())))
    finally:
        sc.stop_all()


def postgres_restart(suite: Suite) -> dict:
    """Scenario 4: PostgreSQL restarted mid-run: a fast shutdown, then (full mode) an immediate one."""
    mode = suite.mode
    sc = suite.start("postgres-restart", mode.other_tasks, mode.other_agents)
    deadline = time.monotonic() + mode.timeout_s
    try:
        for point, how in zip(mode.fault_points, ("fast", "immediate"), strict=False):
            sc.wait_progress(int(mode.other_tasks * point), deadline - time.monotonic())
            done = sc.succeeded()
            began = time.monotonic()
            suite.pg.restart(mode.pg_down_s, how)
            down = time.monotonic() - began
            sc.faults.append(
                {"fault": f"PostgreSQL stop -m {how}, start", "tasks_done": done, "down_s": round(down, 2)}
            )
            say(f"  PostgreSQL stopped ({how}) at {done} tasks done, back after {down:.1f} s")
        return sc.figures(sc.wait_end(max(1.0, deadline - time.monotonic())))
    finally:
        sc.stop_all()


SCENARIOS = {
    "agents-killed": agents_killed,
    "server-killed": server_killed,
    "two-servers": two_servers,
    "postgres-restart": postgres_restart,
}


# --------------------------------------------------------------------------------------------- report


def misses(fig: dict, mode: Mode) -> list[str]:
    """What in one scenario's figures misses its target."""
    out = []
    if fig["run_state"] != "succeeded":
        out.append(f"run {fig['run_state']}")
    for key in ("lost_tasks", "tasks_succeeded_twice", "tasks_executed_twice"):
        if fig[key]:
            out.append(f"{key.replace('_', ' ')}: {fig[key]}")
    offline = fig.get("reoffer", {}).get("offline", {}).get("kill_to_reassigned_s", {})
    if mode.name == "full" and offline.get("n") and offline["max"] > REOFFER_TARGET_S:
        out.append(f"re-offer max {offline['max']} s > {REOFFER_TARGET_S:g} s")
    return out


def print_figures(fig: dict) -> None:
    say(
        f"{fig['scenario']}: run {fig['run_state']}, {fig['tasks']} tasks, makespan {fig['makespan_s']} s;"
        f" lost tasks {fig['lost_tasks']}, tasks succeeded twice {fig['tasks_succeeded_twice']},"
        f" tasks executed twice {fig['tasks_executed_twice']}"
        f" (executions of attempts not succeeded that ran to their end: {fig['unsucceeded_attempts_that_ran_to_end']});"
        f" attempts {fig['attempts']}"
    )
    for path, r in fig.get("reoffer", {}).items():
        a, lost = r["kill_to_reassigned_s"], r["kill_to_lost_s"]
        if a.get("n"):
            say(
                f"  re-offer, victims {'down past the offline limit' if path == 'offline' else 'restarted at once'}:"
                f" SIGKILL -> next attempt assigned min {a['min']} / median {a['median']} / max {a['max']} s"
                f" (n {a['n']}); -> attempt lost median {lost.get('median')} s; reasons {r['lost_reasons']}"
            )
    for note in fig["notes"]:
        say(f"  note: {note}")


def machine() -> dict:
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()  # noqa: E731
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        # Under --rev the code is a git archive of that revision: nothing uncommitted in it.
        "code": os.environ.get("CP_FAULTS_REV") or f"work tree at {git('rev-parse', '--short', 'HEAD')}",
        "uncommitted": [] if os.environ.get("CP_FAULTS_REV") else git("status", "--short", "-uno").splitlines(),
    }


SUITE_FILES = ("bench/faults.py", "bench/fault_fleet.py")


def run_on_revision(rev: str, argv: list[str], out_path: Path | None) -> int:
    """Run the suite on the code of a committed revision (`git archive`, never touching this checkout's work
    tree or index), with this checkout's copy of the suite's own files: the figures are then those of that
    commit, whatever is being edited here meanwhile."""
    sha = subprocess.run(["git", "rev-parse", rev], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    code = Path(tempfile.mkdtemp(prefix="cp-faults-code-"))
    try:
        archive = subprocess.Popen(["git", "archive", sha.strip()], cwd=ROOT, stdout=subprocess.PIPE)
        subprocess.run(["tar", "-x", "-C", str(code)], stdin=archive.stdout, check=True)
        if archive.wait() != 0:
            raise RuntimeError(f"git archive {rev} failed")
        for name in SUITE_FILES:
            shutil.copy2(ROOT / name, code / name)
        say(f"running on {rev} ({sha.strip()[:10]}) from {code}")
        out = ["--out", str(out_path.absolute())] if out_path else []
        env = {**os.environ, "CP_FAULTS_REV": f"{rev} {sha.strip()}"}
        return subprocess.run(
            [sys.executable, str(code / "bench" / "faults.py"), *argv, *out], cwd=code, env=env
        ).returncode
    finally:
        shutil.rmtree(code, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--short", action="store_true", help="the small form with the tests' fast timings")
    p.add_argument("--only", choices=list(SCENARIOS), action="append", help="run only this scenario (repeatable)")
    p.add_argument("--out", type=Path, help=f"where to keep the figures (full mode default: {RESULTS.name})")
    p.add_argument("--keep", action="store_true", help="keep the scenarios' folder (logs, marks, state files)")
    p.add_argument("--rev", help="run on this committed revision (a git archive of it), not on the work tree")
    args = p.parse_args(argv)
    mode = short_mode() if args.short else FULL
    out_path = args.out or (RESULTS if mode.name == "full" else None)
    if args.rev:
        again = ["--short"] * args.short + ["--keep"] * args.keep
        again += [x for name in args.only or [] for x in ("--only", name)]
        return run_on_revision(args.rev, again, out_path)
    if mode.name == "full":
        for var in TIMING_VARS:
            os.environ.pop(var, None)
    started = machine()
    say(f"fault suite, {mode.name} mode; load average {started['load_average']} on {started['cpus']} cores")
    suite = Suite(mode)
    say(f"  files under {suite.folder}; daemon takes several servers: {suite.several_servers}")
    results, failed, finished = [], [], False
    try:
        for name in args.only or list(SCENARIOS):
            began = time.monotonic()
            fig = SCENARIOS[name](suite)
            fig["wall_s"] = round(time.monotonic() - began, 1)
            fig["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
            results.append(fig)
            print_figures(fig)
            failed += [f"{name}: {m}" for m in misses(fig, mode)]
        finished = True
    finally:
        if args.keep or failed or not finished:
            say(f"  scenario files kept in {suite.folder}, the stopped cluster in {suite.pg.root}")
            suite.pg.stop()
        else:
            suite.close()
    report = {"mode": mode.name, "machine": started, "timings": mode.timings or "production defaults",
              "scenarios": results, "missed": failed}  # fmt: skip
    if out_path:
        out_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        say(f"figures kept in {out_path}")
    for line in failed:
        say(f"MISSED {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
