"""Provisioning agents over SSH against a real OpenSSH sshd on loopback (see conftest.py): the "remote"
host is this machine, so the tests can look at the daemons the deploy started."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from agents_app.host_jobs import start_operations
from agents_app.host_models import Host, HostOperation
from agents_app.models import Agent
from control_plane import launch
from tasks_app.models import Attempt, Run
from tests import conftest as shared
from tests.agents_app.test_daemon_integration import process_gone, wait_for
from tests.conftest import doc

pytestmark = pytest.mark.django_db(transaction=True)


def daemon_pids(host: Host) -> dict[str, int]:
    """The deployed agents' pids by name, from the pid files the deploy wrote."""
    run = Path(host.remote_dir) / "run"
    return {p.stem: int(p.read_text()) for p in run.glob("*.pid")} if run.exists() else {}


def is_our_daemon(pid: int, name: str) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return False
    return f"cp_agent.py --name {name} " in cmdline


@pytest.fixture
def make_host(sshd, tmp_path):
    """Hosts that point at the loopback sshd, each with its own remote folder; daemons left behind by a
    failing test are killed afterwards."""
    made = []

    def make(name="loop", **fields) -> Host:
        values = {
            "address": "127.0.0.1", "port": sshd.port, "user": sshd.user, "key_path": str(sshd.user_key_path),
            "host_key": sshd.host_key_pub, "remote_python": "/usr/bin/python3",
            "remote_dir": str(tmp_path / f"remote-{name}"), "agent_count": 2, "agent_labels": ["lb"],
            "agent_executors": ["simulated", "shell"],
        }  # fmt: skip
        values.update(fields)
        host = Host.objects.create(name=name, **values)
        made.append(host)
        return host

    yield make
    for host in made:
        for name, pid in daemon_pids(host).items():
            if is_our_daemon(pid, name):
                os.killpg(pid, signal.SIGKILL)


@pytest.fixture
def qcluster(tmp_path):
    """A real django-q2 cluster process on the test database."""
    env = {"DATABASE_URL": shared.test_database_url(), "CP_Q_WORKERS": "1"}
    proc = launch.start_qcluster(env=env, log=tmp_path / "qcluster.log")
    yield proc
    launch.stop(proc)


def wait_finished(op: HostOperation, timeout: float = 90.0) -> HostOperation:
    def done():
        op.refresh_from_db()
        return op.finished

    wait_for(done, timeout=timeout, what=f"{op.kind} on {op.host_id} to finish")
    return op


def test_deploy_through_the_queue_enrolls_agents_that_run_a_dag_and_stop(make_host, live_server_proc, qcluster, submit):
    host = make_host("lb", server_url=live_server_proc.url)

    [deploy] = start_operations("deploy", [host], "user:olivia")
    assert deploy.q_task_id  # went through django-q2, not run here
    deploy = wait_finished(deploy)
    assert deploy.state == "succeeded", deploy.output
    assert deploy.progress == 1.0 and "2 agents enrolled" in deploy.output

    # Detached: alive after the SSH session ended, each the leader of its own session.
    pids = daemon_pids(host)
    assert set(pids) == {"lb-1", "lb-2"}
    for name, pid in pids.items():
        assert is_our_daemon(pid, name)
        assert os.getsid(pid) == pid
    agents = Agent.objects.filter(name__in=pids, retired_at__isnull=True)
    assert {a.enrollment_token.host_operation.host.name for a in agents} == {"lb"}
    assert {tuple(a.labels) for a in agents} == {("lb",)}

    run = submit(
        doc(
            {"key": "plan", "requires": ["lb"], "params": {"duration_s": 0.2}},
            {"key": "build", "deps": ["plan"], "requires": ["lb"], "executor": "shell", "command": "echo built"},
            {"key": "docs", "deps": ["plan"], "requires": ["lb"], "params": {"duration_s": 0.2}},
            name="on-the-host",
        )
    )
    wait_for(lambda: Run.objects.get(pk=run.pk).state == "succeeded", timeout=60, what="the run to succeed")
    ran_on = set(Attempt.objects.filter(run=run, state="succeeded").values_list("agent__name", flat=True))
    assert ran_on <= {"lb-1", "lb-2"} and ran_on

    [stop] = start_operations("stop", [host], "user:olivia")
    stop = wait_finished(stop)
    assert stop.state == "succeeded", stop.output
    wait_for(lambda: all(process_gone(pid) for pid in pids.values()), timeout=10, what="the daemons to exit")
    assert daemon_pids(host) == {}
    assert [a["alive"] for a in stop.result["agents"]] == [False, False]
