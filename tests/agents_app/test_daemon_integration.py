"""Real agent daemon processes against real server processes: the seed's integration test, the 15-task DAG
on 10 agents, an agent killed mid-task, cancel reaching a running process, and cross-process wake-ups."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import yaml

from tasks_app.models import Artifact, Attempt, Run, Task
from tasks_app.states import RunState
from tests.conftest import Server, doc, http, wait_for

pytestmark = pytest.mark.django_db(transaction=True)
SEED = Path(__file__).resolve().parents[2] / "docs" / "examples" / "webapp_framework.yaml"


def process_gone(pid: int) -> bool:
    """Exited, or a zombie nobody reaps (in a container PID 1 may not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def run_state(run_id) -> str:
    return Run.objects.get(pk=run_id).state


def submit_via_api(server_url, token, document) -> str:
    status, body = http("POST", f"{server_url}/api/v1/runs", document, token=token)
    assert status == 201, body
    return body["run_id"]


def test_seed_integration_planning_then_two_implementations(live_server_proc, fleet, operator):
    """The seed's own test: Task-1 (planning, CCG-1), then Task-2 and Task-3 (CG-1, CG-2) that depend on it."""
    _, token = operator
    fleet("ccg-1", ["ccg"])
    fleet("cg-1", ["cg"])
    fleet("cg-2", ["cg"])
    document = doc(
        {"key": "Task-1", "title": "Planning", "requires": ["ccg"], "params": {"duration_s": 0.3}},
        {"key": "Task-2", "title": "Core", "deps": ["Task-1"], "requires": ["cg"], "params": {"duration_s": 0.5}},
        {"key": "Task-3", "title": "HTTP", "deps": ["Task-1"], "requires": ["cg"], "params": {"duration_s": 0.5}},
        name="seed-integration",
    )
    run_id = submit_via_api(live_server_proc.url, token, document)
    wait_for(lambda: run_state(run_id) not in (RunState.RUNNING,), 60, what="the run to end")
    assert run_state(run_id) == RunState.SUCCEEDED
    tasks = {t.key: t for t in Task.objects.filter(run_id=run_id)}
    done_by = {key: Attempt.objects.get(task=t, state="succeeded").agent.name for key, t in tasks.items()}
    assert done_by["Task-1"] == "ccg-1"
    assert {done_by["Task-2"], done_by["Task-3"]} <= {"cg-1", "cg-2"}
    # Both implementations started only after planning finished.
    plan_end = Attempt.objects.get(task=tasks["Task-1"], state="succeeded").finished_at
    for key in ("Task-2", "Task-3"):
        assert Attempt.objects.get(task=tasks[key], state="succeeded").assigned_at >= plan_end
    # Each task's result file came back as an artifact.
    names = set(Artifact.objects.filter(task__run_id=run_id).values_list("name", flat=True))
    assert {"Task-1_result.json", "Task-2_result.json", "Task-3_result.json"} <= names


def test_seed_dag_of_15_tasks_on_10_agents(live_server_proc, fleet, operator):
    _, token = operator
    for i in range(1, 7):
        fleet(f"ccg-{i}", ["ccg"], extra=["--time-scale", "0.001"])
    for i in range(1, 5):
        fleet(f"cg-{i}", ["cg"], extra=["--time-scale", "0.001"])
    document = yaml.safe_load(SEED.read_text())
    run_id = submit_via_api(live_server_proc.url, token, document)
    wait_for(lambda: run_state(run_id) != RunState.RUNNING, 120, what="the 15-task run to end")
    assert run_state(run_id) == RunState.SUCCEEDED
    assert Task.objects.filter(run_id=run_id, state="succeeded").count() == 15
    attempts = Attempt.objects.filter(run_id=run_id, state="succeeded").select_related("agent", "task")
    for a in attempts:
        assert a.agent.name.startswith("ccg-" if "ccg" in a.task.requires else "cg-")
    # max_parallel 5 held at every moment: replay the attempts' intervals.
    points = sorted([(a.assigned_at, 1) for a in attempts] + [(a.finished_at, -1) for a in attempts])
    live = peak = 0
    for _, step in points:
        live += step
        peak = max(peak, live)
    assert peak <= 5
    assert len({a.agent_id for a in attempts}) >= 4  # the work was spread over the fleet


def test_agent_killed_mid_task_is_requeued_and_done_once_elsewhere(live_server_proc, fleet, operator, tmp_path):
    _, token = operator
    victim = fleet("victim", ["gpu"])
    document = doc(
        {"key": "long", "requires": ["gpu"], "params": {"duration_s": 3}, "retry_delay_s": 0}, name="kill-test"
    )
    run_id = submit_via_api(live_server_proc.url, token, document)
    first = wait_for(
        lambda: Attempt.objects.filter(run_id=run_id, state="running").first(), 30, what="the task to start"
    )
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait(5)
    # Nobody else could take it before: the only other agent arrives now.
    fleet("rescuer", ["gpu"])
    wait_for(lambda: run_state(run_id) != RunState.RUNNING, 60, what="the rescued run to end")
    assert run_state(run_id) == RunState.SUCCEEDED
    first.refresh_from_db()
    assert first.state == "lost"
    succeeded = Attempt.objects.filter(run_id=run_id, state="succeeded")
    assert succeeded.count() == 1 and succeeded.get().agent.name == "rescuer"
    # The victim's late completion (its token still valid: it was only offline) is refused and changes nothing.
    import json

    state = json.loads(next((tmp_path / "agents").glob("victim*.json")).read_text())
    status, body = http(
        "POST",
        f"{live_server_proc.url}/api/v1/attempts/{first.id}/complete",
        {"outcome": "succeeded", "result": {}, "exit_code": 0},
        token=state["token"],
    )
    assert status == 409 and body["error"] == "stale_attempt"
    assert Attempt.objects.filter(run_id=run_id, state="succeeded").count() == 1


def test_cancel_reaches_the_running_process_group(live_server_proc, fleet, operator, tmp_path):
    _, token = operator
    fleet("sh-1", ["sh"], executors=["shell"])
    pidfile = tmp_path / "child.pid"
    document = doc(
        {"key": "sleepy", "requires": ["sh"], "executor": "shell", "command": f"sleep 300 & echo $! > {pidfile}; wait"},
        name="cancel-test",
    )
    run_id = submit_via_api(live_server_proc.url, token, document)
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 30, what="the task's child process")
    child = int(pidfile.read_text())
    status, body = http("POST", f"{live_server_proc.url}/api/v1/runs/{run_id}/cancel", token=token)
    assert status == 200 and body["state"] == "canceled"

    wait_for(lambda: process_gone(child), 20, what="the canceled task's process group to be killed")
    assert run_state(run_id) == RunState.CANCELED


def test_agent_waiting_on_one_server_is_woken_by_a_task_made_ready_through_another(
    live_server_proc, fleet, operator, server_tmp
):
    """Two server processes, one database: the agent long-polls process 1; the run arrives via process 2."""
    _, token = operator
    second = Server(server_tmp)
    try:
        fleet("listener", ["x"], server=live_server_proc)
        wait_for(lambda: http("GET", f"{live_server_proc.url}/api/v1/health")[0] == 200, 10)
        time.sleep(1.0)  # let the agent park its long poll on process 1
        sent = time.monotonic()
        run_id = submit_via_api(second.url, token, doc({"key": "hop", "requires": ["x"], "params": {"duration_s": 0}}))
        wait_for(lambda: Attempt.objects.filter(run_id=run_id).exists(), 10, interval=0.01, what="the assignment")
        latency = time.monotonic() - sent
        assert latency < 1.0, f"the waiting agent took {latency:.3f} s to get the task"
        wait_for(lambda: run_state(run_id) == RunState.SUCCEEDED, 30, what="the run to succeed")
    finally:
        second.stop()
