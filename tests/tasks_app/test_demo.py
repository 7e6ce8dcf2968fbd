"""`./run demo` for a newcomer, run for real (its server, q cluster and agents, on the test database): it
prints a one-time login link that opens the run's page, runs on a label of its own so that no other agent
takes its tasks, and exits non-zero when its run does not succeed."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
from django.conf import settings
from django.test import Client

from control_plane import launch
from tasks_app.models import Attempt, Run
from tests import conftest

pytestmark = pytest.mark.django_db(transaction=True)
ROOT = launch.ROOT


def run_demo(tmp_path, document: dict) -> subprocess.CompletedProcess:
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(document))
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"}
    env.update(conftest.FAST_TIMINGS, DATABASE_URL=conftest.test_database_url(), PORT=str(launch.free_port()),
               CP_DATA_DIR=str(tmp_path), SECRET_KEY=settings.SECRET_KEY)  # fmt: skip
    return subprocess.run(
        [sys.executable, "manage.py", "demo", "--simulated", "--file", str(path), "--agents-ccg", "2",
         "--agents-cg", "1", "--time-scale", "0.01", "--exit-when-done"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


def small(fail: bool = False) -> dict:
    tasks = [{"key": "plan", "executor": "simulated", "requires": ["ccg"], "estimate_s": 60},
             {"key": "build", "executor": "simulated", "requires": ["cg"], "deps": ["plan"], "estimate_s": 60,
              "params": {"fail": fail}, "max_attempts": 1}]  # fmt: skip
    return {"name": "newcomer", "tasks": tasks}


def test_the_demo_logs_a_newcomer_in_once_and_keeps_its_tasks_to_its_agents(tmp_path, fleet):
    fleet("intruder", ["ccg", "cg"], executors=["simulated"])  # online before the demo, with the same labels
    done = run_demo(tmp_path, small())
    assert done.returncode == 0, done.stdout + done.stderr
    link = re.search(r"dashboard: http://[\d.:]+(/accounts/link/\S+)", done.stdout)
    assert link, done.stdout
    run = Run.objects.get(name="newcomer")
    assert f"next=%2Fruns%2F{run.id}%2F" in link.group(1)
    label = re.search(r"\(label (demo-[0-9a-f]{6})\)", done.stdout).group(1)
    assert all(label in t.requires for t in run.tasks.all())
    assert not Attempt.objects.filter(run=run, agent__name="intruder").exists()

    browser = Client()
    opened = browser.get(link.group(1))
    assert opened.status_code == 302 and opened["Location"] == f"/runs/{run.id}/"
    assert browser.get(f"/runs/{run.id}/").status_code == 200  # logged in
    assert Client().get(link.group(1)).status_code == 403  # once only
    assert b"Log in with a password" in Client().get(link.group(1)).content


def test_the_demo_exits_non_zero_when_its_run_fails(tmp_path):
    done = run_demo(tmp_path, small(fail=True))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "the run ended failed" in done.stderr


def test_a_forged_login_link_is_refused(django_user_model):
    from control_plane.login import login_link

    user = django_user_model.objects.create_user("nina")
    path = login_link(user, "/")
    forged = path.replace(path.split("/")[4], "abc-123")
    assert Client().get(forged).status_code == 403
    assert Client().get("/accounts/link/zz/abc/").status_code == 403
    offsite = login_link(user, "https://evil.example/")
    assert Client().get(offsite)["Location"] == "/"
