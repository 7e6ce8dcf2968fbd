"""A real daemon's clean stop (issue 14, item 6): SIGTERM drains, then the daemon says goodbye and the fleet
counts it offline at once (not three heartbeat intervals later); and the daemon removes a succeeded
attempt's folder once it is reported, keeping a failed one's for --keep-failed hours."""

from __future__ import annotations

import os
import signal

import pytest

from agents_app.models import Agent
from tasks_app.dashboard.panels import fleet_summary
from tasks_app.models import Event, Task
from tests.agents_app.test_daemon_faults import serving
from tests.agents_app.test_daemon_integration import submit_via_api
from tests.conftest import doc, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def _shell(key: str, command: str, **extra) -> dict:
    return {"key": key, "executor": "shell", "command": command, "requires": ["bye"], "max_attempts": 1, **extra}


def _state(run_id, key: str) -> str:
    return Task.objects.get(run_id=run_id, key=key).state


def test_sigterm_drains_then_says_goodbye_and_the_fleet_counts_it_offline_at_once(
    live_server_proc, fleet, operator, tmp_path
):
    _, token = operator
    proc = fleet("byebye", ["bye"], executors=["shell"])
    wait_for(lambda: serving(tmp_path, "byebye"), 30, what="the daemon to serve")
    agent = Agent.objects.get(name="byebye", retired_at__isnull=True)
    started = tmp_path / "started"
    run_id = submit_via_api(live_server_proc.url, token, doc(_shell("drained", f"touch {started}; sleep 1")))
    wait_for(started.exists, 30, what="the task to start")

    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(30) == 0
    # The running task was drained (finished, not lost), and the agent is offline by its own goodbye: no
    # sweep could have marked it so yet (it went silent just now), and the Event says who did.
    assert _state(run_id, "drained") == "succeeded"
    row = Agent.objects.get(pk=agent.pk)
    assert row.status == "offline"
    event = Event.objects.filter(agent_id=agent.pk, to_state="offline").latest("id")
    assert (event.actor, event.detail) == ("agent:byebye", {"reason": "goodbye"})
    counts = fleet_summary()
    assert counts["online"] == 0 and counts["offline"] == 1
    assert "goodbye not delivered" not in (tmp_path / "byebye.log").read_text()


def test_a_succeeded_attempts_folder_is_removed_and_a_failed_ones_kept(live_server_proc, fleet, operator, tmp_path):
    _, token = operator
    fleet("tidy", ["bye"], executors=["shell"])
    work = tmp_path / "agents"
    run_id = submit_via_api(
        live_server_proc.url, token,
        doc(_shell("fine", "echo done > out/result.txt"), _shell("broken", "echo oops > notes.txt; exit 3")),
    )  # fmt: skip
    wait_for(lambda: {_state(run_id, "fine"), _state(run_id, "broken")} == {"succeeded", "failed"}, 60,
             what="both tasks to end")  # fmt: skip
    # The folders are KEY-<attempt id's first 8 hex>; the succeeded one goes once its completion is sent.
    wait_for(lambda: not list(work.glob("fine-*")), 10, what="the succeeded attempt's folder to go")
    [kept] = work.glob("broken-*")
    assert (kept / "notes.txt").read_text() == "oops\n"
    # What the daemon needs stays: its identity and its task records.
    assert (work / "tidy.state.json").exists() and (work / "tidy.state.tasks").is_dir()
    # The artifact the succeeded task wrote under out/ had been uploaded before its folder went.
    assert Task.objects.get(run_id=run_id, key="fine").artifacts.filter(name="result.txt").exists()
