"""Provisioning agents over SSH against a real OpenSSH sshd on loopback (see conftest.py): the "remote"
host is this machine, so the tests can look at the daemons the deploy started."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from django.utils import timezone

from agents_app.hosts.jobs import abandon_stale_operations, start_operations
from agents_app.hosts.keys import fingerprint
from agents_app.hosts.models import Host, HostOperation
from agents_app.hosts.secrets import encrypt_private_key
from agents_app.hosts.trust import confirm_offered_key
from agents_app.models import Agent
from control_plane import launch
from tasks_app.errors import ActionError
from tasks_app.models import Attempt, Run
from tests import conftest as shared
from tests.agents_app.conftest import daemon_pids, is_our_daemon
from tests.agents_app.conftest import keygen as shared_keygen
from tests.agents_app.test_daemon_integration import process_gone, wait_for
from tests.certs import make_pki
from tests.conftest import doc

pytestmark = pytest.mark.django_db(transaction=True)


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
    assert deploy.progress == 1.0 and "2 agents online" in deploy.output

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


# Another key of the same type, or a key of a type the host no longer has at all.
@pytest.mark.parametrize("kind", ["ed25519", "ecdsa"])
def test_a_changed_host_key_is_refused_loudly_and_nothing_is_run(make_host, sshd, tmp_path, caplog, kind):
    impostor_pin = shared_keygen(tmp_path / "other_host_key", kind)
    host = make_host("moved", host_key=impostor_pin)

    [op] = start_operations("deploy", [host], "test", background=False)

    assert op.state == "failed"
    assert "HOST KEY CHANGED for moved" in op.error and "Refusing to connect" in op.error
    assert op.message == "host key changed: refused"
    assert "HOST KEY CHANGED" in caplog.text  # logged as an error too, not only stored
    host.refresh_from_db()
    assert host.host_key_changed
    assert host.offered_fingerprint == fingerprint(sshd.host_key_pub) != host.host_key_fingerprint
    assert host.host_key == impostor_pin  # the pin is not replaced by what the host said
    assert not Path(host.remote_dir).exists()  # we never logged in


def test_unreachable_hosts_fail_within_bounds_and_do_not_stop_a_good_one(make_host, live_server_proc, settings):
    settings.CP_SSH_CONNECT_TIMEOUT_S = 2.0
    good = make_host("good", server_url=live_server_proc.url, agent_count=1)
    closed = make_host("closed", port=launch.free_port())  # nothing listens there
    blackhole = make_host("blackhole", address="192.0.2.1", port=22)  # TEST-NET-1: never answers

    started = time.monotonic()
    ops = {op.host.name: op for op in start_operations("deploy", [good, closed, blackhole], "test", background=False)}
    elapsed = time.monotonic() - started

    assert ops["good"].state == "succeeded", ops["good"].output
    assert ops["closed"].state == "failed" and "cannot reach 127.0.0.1" in ops["closed"].error
    assert ops["blackhole"].state == "failed" and "cannot reach 192.0.2.1:22" in ops["blackhole"].error
    # The bad hosts cost at most their connect timeout, in parallel with the good one's deploy.
    assert elapsed < 45
    # Concurrent, not one after the other: the good host comes first in the batch, yet the closed port's
    # failure was recorded while the good host's deploy was still going.
    assert ops["closed"].finished_at < ops["good"].finished_at
    blackhole_s = (ops["blackhole"].finished_at - ops["blackhole"].started_at).total_seconds()
    assert blackhole_s < 2.0 + 3.0
    start_operations("stop", [good], "test", background=False)


def test_first_use_needs_the_operator_to_confirm_the_fingerprint(make_host, sshd):
    host = make_host("fresh", host_key="")

    [refused] = start_operations("status", [host], "test", background=False)
    assert refused.state == "failed" and "no confirmed host key" in refused.error

    [scan] = start_operations("scan", [host], "test", background=False)
    assert scan.state == "succeeded", scan.error
    host.refresh_from_db()
    assert host.host_key == "" and host.offered_fingerprint == fingerprint(sshd.host_key_pub)
    assert host.offered_fingerprint == ssh_keygen_fingerprint(sshd.host_key_pub)

    with pytest.raises(ActionError, match="not the SHA256:wrong"):
        confirm_offered_key(host.pk, "SHA256:wrong", "user:olivia")
    confirm_offered_key(host.pk, host.offered_fingerprint, "user:olivia")
    host.refresh_from_db()
    assert host.host_key_fingerprint == fingerprint(sshd.host_key_pub)
    assert host.host_key_confirmed_by == "user:olivia" and host.host_key_confirmed_at

    [status] = start_operations("status", [host], "test", background=False)
    assert status.state == "succeeded", status.error
    assert status.result == {"installed": False, "agents": []}


def test_restart_upgrade_status_uninstall(make_host, live_server_proc):
    host = make_host("cycle", server_url=live_server_proc.url, agent_count=1, agent_capacity=2)
    [deploy] = start_operations("deploy", [host], "test", background=False)
    assert deploy.state == "succeeded", deploy.output
    first = daemon_pids(host)["cycle-1"]
    agent = Agent.objects.get(name="cycle-1", retired_at__isnull=True)
    assert agent.capacity == 2

    [status] = start_operations("status", [host], "test", background=False)
    [row] = status.result["agents"]
    assert row["name"] == "cycle-1" and row["alive"] and row["pid"] == str(first)
    assert any("registered as agent" in line for line in row["log_tail"]), row

    [restart] = start_operations("restart", [host], "test", background=False)
    assert restart.state == "succeeded", restart.output
    second = daemon_pids(host)["cycle-1"]
    assert second != first and process_gone(first) and is_our_daemon(second, "cycle-1")

    # An older daemon on the host is replaced by the server's copy.
    daemon = Path(host.remote_dir) / "cp_agent.py"
    daemon.write_text(daemon.read_text().replace('VERSION = "', 'VERSION = "0.9-old-', 1))
    [upgrade] = start_operations("upgrade", [host], "test", background=False)
    assert upgrade.state == "succeeded", upgrade.output
    assert "upgrading the daemon 0.9-old-" in upgrade.output
    assert daemon.read_text() == (Path(launch.AGENT_SCRIPT)).read_text()
    third = daemon_pids(host)["cycle-1"]
    assert is_our_daemon(third, "cycle-1") and process_gone(second)

    [uninstall] = start_operations("uninstall", [host], "test", background=False)
    assert uninstall.state == "succeeded", uninstall.output
    wait_for(lambda: process_gone(third), timeout=10, what="the daemon to exit")
    assert not Path(host.remote_dir).exists()

    [again] = start_operations("restart", [host], "test", background=False)
    assert again.state == "failed" and "nothing deployed" in again.error


def test_a_private_key_stored_encrypted_logs_in(make_host, sshd, settings):
    settings.CP_HOST_KEY_SECRET = Fernet.generate_key().decode()
    host = make_host("vault", key_path="")
    host.key_encrypted = encrypt_private_key(sshd.user_key_text)
    host.save()
    assert "PRIVATE KEY" not in Host.objects.values_list("key_encrypted", flat=True).get(pk=host.pk)

    [status] = start_operations("status", [host], "test", background=False)
    assert status.state == "succeeded", status.error

    settings.CP_HOST_KEY_SECRET = Fernet.generate_key().decode()  # rotated away without re-saving the key
    [refused] = start_operations("status", [host], "test", background=False)
    assert refused.state == "failed" and "does not decrypt with CP_HOST_KEY_SECRET" in refused.error
    settings.CP_HOST_KEY_SECRET = ""
    [refused] = start_operations("status", [host], "test", background=False)
    assert refused.state == "failed" and "set CP_HOST_KEY_SECRET" in refused.error


def test_a_key_the_host_does_not_accept_is_reported(make_host, tmp_path):
    stranger = tmp_path / "stranger"
    shared_keygen(stranger)
    host = make_host("locked", key_path=str(stranger))
    [op] = start_operations("status", [host], "test", background=False)
    assert op.state == "failed" and "refused our private key" in op.error


def ssh_keygen_fingerprint(pub: str) -> str:
    out = subprocess.run(["ssh-keygen", "-l", "-f", "-"], input=pub, capture_output=True, text=True, check=True)
    return out.stdout.split()[1]


@pytest.fixture
def https_server(tmp_path):
    """A server process serving HTTPS with a certificate from a throwaway CA (tests/certs.py)."""
    pki = make_pki(tmp_path / "pki", "hosts")
    server = shared.Server(tmp_path, pki=pki)
    yield server, pki
    server.stop()


def test_deploy_over_https_the_agents_verify_the_server_with_the_hosts_ca(make_host, https_server, submit, settings):
    server, pki = https_server
    settings.CP_HOST_ENROLL_WAIT_S = 6.0
    # Without the CA the agents refuse the server's certificate: the deploy says so instead of succeeding.
    blind = make_host("blind", server_url=server.url, agent_count=1)
    [refused] = start_operations("deploy", [blind], "test", background=False)
    assert refused.state == "failed"
    # The agent gives up at once ("exited right after starting") or is not online in time; either way its log
    # lines say why.
    assert "unable to get local issuer certificate" in refused.error + refused.output
    assert refused.enrollment_token.revoked_at is not None  # a failed deploy's unused token is revoked
    start_operations("stop", [blind], "test", background=False)

    host = make_host("tls", server_url=server.url, agent_count=1, ca_bundle=pki.ca_file.read_text())
    [deploy] = start_operations("deploy", [host], "test", background=False)
    assert deploy.state == "succeeded", deploy.output
    assert (Path(host.remote_dir) / "ca.pem").read_text() == pki.ca_file.read_text()
    run = submit(doc({"key": "hello", "requires": ["lb"], "executor": "shell", "command": "echo over tls"}))
    wait_for(lambda: Run.objects.get(pk=run.pk).state == "succeeded", timeout=60, what="the run to succeed")
    assert Attempt.objects.get(run=run).agent.name == "tls-1"

    # A second successful start leaves the host with one working enrollment token: the newest.
    [restart] = start_operations("restart", [host], "test", background=False)
    assert restart.state == "succeeded", restart.output
    deploy.enrollment_token.refresh_from_db()
    restart.enrollment_token.refresh_from_db()
    assert deploy.enrollment_token.revoked_at is not None and restart.enrollment_token.revoked_at is None
    [stop] = start_operations("stop", [host], "test", background=False)
    assert stop.state == "succeeded" and daemon_pids(host) == {}


def test_operations_that_will_never_finish_are_failed_and_a_busy_host_takes_no_other(make_host, settings):
    host = make_host("orphan")
    settings.CP_HOST_OPERATION_TIMEOUT_S = 1
    settings.CP_HOST_ENROLL_WAIT_S = 1
    stuck = HostOperation.objects.create(
        batch=uuid.uuid4(), host=host, kind="deploy", state="running",
        started_at=timezone.now() - timedelta(seconds=120),
    )  # fmt: skip
    fresh = HostOperation.objects.create(
        batch=uuid.uuid4(), host=host, kind="deploy", state="running", started_at=timezone.now()
    )
    unpicked = HostOperation.objects.create(batch=uuid.uuid4(), host=host, kind="status")
    HostOperation.objects.filter(pk=unpicked.pk).update(created_at=timezone.now() - timedelta(minutes=20))

    assert abandon_stale_operations() == 2
    for op in (stuck, fresh, unpicked):
        op.refresh_from_db()
    assert stuck.state == "failed" and "stopped before it finished" in stuck.error
    assert unpicked.state == "failed" and "no django-q2 cluster picked this operation up" in unpicked.error
    assert fresh.state == "running"
    with pytest.raises(ActionError, match="orphan has a deploy running"):
        start_operations("stop", [host], "test", background=False)


def test_stop_lets_agents_drain_then_cancels_their_tasks_after_the_grace(make_host, live_server_proc, submit, settings):
    settings.CP_HOST_STOP_GRACE_S = 1.0
    host = make_host("busy", server_url=live_server_proc.url, agent_count=1)
    [deploy] = start_operations("deploy", [host], "test", background=False)
    assert deploy.state == "succeeded", deploy.output
    pid = daemon_pids(host)["busy-1"]
    run = submit(doc({"key": "long", "requires": ["lb"], "params": {"duration_s": 120}, "max_attempts": 1}))
    wait_for(lambda: Attempt.objects.filter(run=run, state="running").exists(), timeout=30, what="the task to run")

    started = time.monotonic()
    [stop] = start_operations("stop", [host], "test", background=False)

    assert stop.state == "succeeded", stop.output
    assert "still running after 1 s: busy-1 (canceling their tasks)" in stop.output
    assert "stopped busy-1" in stop.output
    assert time.monotonic() - started < 30  # not the task's 120 s
    assert process_gone(pid)
    attempt = Attempt.objects.get(run=run)
    assert attempt.state not in ("assigned", "running")
