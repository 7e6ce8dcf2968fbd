"""A real OpenSSH sshd on a loopback port, as the "remote host" of the provisioning tests; hosts pointing at
it; a real django-q2 cluster.

It runs as the test's user (root in CI containers, hence PermitRootLogin) with a host key and a user key made
for the session; the remote side is this machine, so a test can look at the deployed processes directly."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from agents_app.hosts.models import Host
from control_plane import launch
from tests import conftest as shared
from tests.agents_app.protocol_agent import Agent
from tests.conftest import doc, http, ok

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


@dataclass
class Sshd:
    port: int
    host_key_pub: str  # the server's public host key line
    user: str
    user_key_path: Path  # the private key that may log in
    user_key_text: str
    log: Path


def keygen(path: Path, kind: str = "ed25519") -> str:
    """A new key pair at `path` (and `path`.pub); returns the public key line."""
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    return path.with_suffix(".pub").read_text().strip()


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sshd")
    keygen(tmp / "ssh_host_ed25519_key")
    user_pub = keygen(tmp / "id_user")
    (tmp / "authorized_keys").write_text(user_pub + "\n")
    port = launch.free_port()
    (tmp / "sshd_config").write_text(
        f"""Port {port}
ListenAddress 127.0.0.1
HostKey {tmp}/ssh_host_ed25519_key
PidFile {tmp}/sshd.pid
AuthorizedKeysFile {tmp}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
LogLevel VERBOSE
"""
    )
    # sshd started as root insists on its privilege separation directory, which the distribution's service
    # normally creates at boot.
    if os.getuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
    log = tmp / "sshd.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(tmp / "sshd_config")], stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    wait_port(port, proc, log)
    import pwd

    yield Sshd(
        port=port,
        host_key_pub=(tmp / "ssh_host_ed25519_key.pub").read_text().strip(),
        user=pwd.getpwuid(os.getuid()).pw_name,
        user_key_path=tmp / "id_user",
        user_key_text=(tmp / "id_user").read_text(),
        log=log,
    )
    launch.stop(proc)


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 10.0) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sshd exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"sshd did not listen on {port}: {log.read_text()[-2000:]}")


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
            "agent_executors": ["simulated", "shell"], "server_url": "http://127.0.0.1:9",
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
    launch.stop(proc, timeout=3)  # its jobs are done; a graceful django-q2 shutdown takes ~8 s


# --- agents speaking the protocol by hand (tests/agents_app/protocol_agent.py) ---


@pytest.fixture
def server(live_server_proc, transactional_db) -> str:
    return live_server_proc.url


@pytest.fixture
def enroll(server, enrollment_token):
    """Register an agent over HTTP: enroll(name, labels=..., executors=..., capacity=...) -> Agent."""

    def make(name="cg-1", labels=(), executors=("shell", "simulated"), capacity=1) -> Agent:
        body = {"name": name, "labels": list(labels), "executors": list(executors), "capacity": capacity}
        answer = ok(http("POST", f"{server}/api/v1/agents/register", body, token=enrollment_token), 201)
        return Agent(server, answer, name)

    return make


@pytest.fixture
def run_of(submit):
    """Submit a DAG (task dicts, simulated by default) and return the Run."""

    def make(*tasks, **kwargs):
        return submit(doc(*tasks, **kwargs))

    return make
