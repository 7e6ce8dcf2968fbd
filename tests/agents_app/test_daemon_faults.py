"""Faults, with real agent daemon processes against real server processes: an agent given several servers
carries on when one dies, or is dead from the start."""

from __future__ import annotations

import json
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


def submit(server_url: str, token: str, document: dict) -> str:
    status, body = http("POST", f"{server_url}/api/v1/runs", document, token=token)
    assert status == 201, body
    return body["run_id"]


def serving(tmp_path: Path, name: str) -> bool:
    path = tmp_path / f"{name}.log"
    return path.exists() and "serving as" in path.read_text()


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
