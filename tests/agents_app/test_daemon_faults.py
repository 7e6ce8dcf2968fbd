"""Faults, with real agent daemon processes against real server processes: a daemon SIGKILLed mid-task takes
its task's processes with it; a daemon started again stops what its previous life left running; an agent
given several servers carries on when one dies, or is dead from the start."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from control_plane import launch
from tasks_app.models import Attempt, Run
from tasks_app.states import RunState
from tests.conftest import Server, doc, http, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def stat_of(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields from the state on ([0] state, [2] process group); None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):  # gone before the open, or between the open and the read
        return None


def live_members(pgid: int) -> list[int]:
    """The processes of group `pgid` that are not zombies (in a container nobody may reap orphans)."""
    found = []
    for entry in Path("/proc").iterdir():
        fields = stat_of(int(entry.name)) if entry.name.isdigit() else None
        if fields and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            found.append(int(entry.name))
    return found


def gone(pid: int) -> bool:
    fields = stat_of(pid)
    return fields is None or fields[0] in ("Z", "X")


def written_pid(path: Path) -> int:
    return int(wait_for(lambda: path.exists() and path.read_text().endswith("\n") and path.read_text(), 30))


def submit(server_url: str, token: str, document: dict) -> str:
    status, body = http("POST", f"{server_url}/api/v1/runs", document, token=token)
    assert status == 201, body
    return body["run_id"]


def serving(tmp_path: Path, name: str) -> bool:
    path = tmp_path / f"{name}.log"
    return path.exists() and "serving as" in path.read_text()


def shell_task(key: str, label: str, command: str) -> dict:
    """`command` as the server renders it: `$$$$` reaches the shell as `$$` (PROTOCOL.md's templates)."""
    # One attempt: a lost attempt fails the task instead of being offered to the test's agents again.
    return doc({"key": key, "requires": [label], "executor": "shell", "command": command, "max_attempts": 1})


# --- a task's processes die with their daemon -----------------------------------------------------------


def test_a_daemon_sigkilled_mid_task_leaves_no_task_process_behind(live_server_proc, fleet, operator, tmp_path):
    _, token = operator
    daemon = fleet("doomed", ["doom"], executors=["shell"])
    marks = tmp_path / "marks"
    marks.mkdir()
    # The leader, and a background child that ignores SIGTERM: both would write their mark 4 s on.
    command = (
        f"echo $$$$ > {marks}/sh.pid; (trap '' TERM; sleep 4; touch {marks}/late-child) & sleep 4; touch {marks}/late"
    )
    submit(live_server_proc.url, token, shell_task("slow", "doom", command))
    pgid = int(stat_of(written_pid(marks / "sh.pid"))[2])
    assert len(live_members(pgid)) >= 4  # supervisor, shell, subshell, sleeps

    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait(5)
    killed_at = time.monotonic()
    wait_for(lambda: not live_members(pgid), 5, 0.01, "the task's process group to die with its daemon")
    print(f"\ntask group gone {time.monotonic() - killed_at:.3f} s after its daemon's SIGKILL")
    assert not (marks / "late").exists() and not (marks / "late-child").exists()


def test_a_daemon_restarted_after_sigkill_stops_what_its_previous_life_left_running(
    live_server_proc, fleet, operator, tmp_path
):
    """Its supervisor killed as well (both SIGKILLed, the OOM killer), the task runs on with no one to stop
    it, until the same agent starts again: it stops the group recorded in its state directory."""
    _, token = operator
    daemon = fleet("phoenix", ["phx"], executors=["shell"])
    marks = tmp_path / "marks"
    marks.mkdir()
    # Immune to SIGHUP: a stopped group leader's death sends SIGHUP to its orphaned group (POSIX), which would
    # do the restarted daemon's work here.
    command = f"trap '' HUP; echo $$$$ > {marks}/sh.pid; sleep 60; touch late"
    submit(live_server_proc.url, token, shell_task("held", "phx", command))
    task = written_pid(marks / "sh.pid")
    supervisor = pgid = int(stat_of(task)[2])  # the supervisor leads the task's group
    assert b"--supervise" in Path(f"/proc/{supervisor}/cmdline").read_bytes().split(b"\0")
    os.kill(supervisor, signal.SIGSTOP)  # so it cannot act on its daemon's death...
    os.kill(daemon.pid, signal.SIGKILL)
    daemon.wait(5)
    os.kill(supervisor, signal.SIGKILL)  # ...and dies too
    wait_for(lambda: gone(supervisor), 5, what="the supervisor to die")
    assert not gone(task)  # left running

    fleet("phoenix", ["phx"], executors=["shell"])  # the same agent again: its name, its work dir and state
    restarted_at = time.monotonic()
    wait_for(lambda: not live_members(pgid), 10, 0.01, "the restarted daemon to stop the leftover")
    print(f"\nleftover group gone {time.monotonic() - restarted_at:.3f} s after the daemon was started again")
    said = "stopped tasks the previous run of this agent left running: held"
    wait_for(lambda: said in (tmp_path / "phoenix.log").read_text(), 10, what="the daemon to say so")
    assert not list((tmp_path / "agents").glob("*/late"))
    wait_for(lambda: serving(tmp_path, "phoenix"), 30, what="the restarted daemon to serve")


# --- several servers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_an_agent_carries_on_with_the_second_server_when_the_first_goes(
    live_server_proc, fleet, operator, server_tmp, tmp_path, stop_signal
):
    _, token = operator
    first = Server(server_tmp)
    try:
        fleet("nomad", ["nomad"], server=SimpleNamespace(url=f"{first.url},{live_server_proc.url}"))
        wait_for(lambda: serving(tmp_path, "nomad"), 30, what="the agent to enroll through the first server")
        time.sleep(0.5)  # its claim is parked on the first server
        stopped_at = time.monotonic()
        launch.stop(first.proc, stop_signal)  # SIGTERM: uvicorn waits for the parked claim to end
        stop_took = time.monotonic() - stopped_at
        run_id = submit(live_server_proc.url, token, doc({"key": "onward", "requires": ["nomad"]}))
        wait_for(lambda: Attempt.objects.filter(run_id=run_id).exists(), 15, 0.02, "the agent to claim the task")
        claimed_after = time.monotonic() - stopped_at
        print(f"\n{stop_signal.name}: server stopped in {stop_took:.2f} s, task claimed {claimed_after:.2f} s after")
        wait_for(lambda: Run.objects.get(pk=run_id).state == RunState.SUCCEEDED, 30, what="the run to succeed")
        assert claimed_after < 5
        assert f"switching to {live_server_proc.url}" in (tmp_path / "nomad.log").read_text()
    finally:
        first.stop()


def test_an_agent_whose_first_server_is_dead_at_start_enrolls_and_works_through_the_next(
    live_server_proc, fleet, operator, tmp_path
):
    _, token = operator
    dead = f"http://127.0.0.1:{launch.free_port()}"
    fleet("riser", ["riser"], server=SimpleNamespace(url=f"{dead},{live_server_proc.url}"))
    run_id = submit(live_server_proc.url, token, doc({"key": "first-job", "requires": ["riser"]}))
    wait_for(lambda: Run.objects.get(pk=run_id).state == RunState.SUCCEEDED, 30, what="the run to succeed")
    assert Attempt.objects.get(run_id=run_id).agent.name == "riser"
    saved = json.loads((tmp_path / "agents" / "riser.state.json").read_text())
    assert saved["servers"] == [dead, live_server_proc.url]
