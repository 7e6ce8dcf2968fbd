"""A real OpenSSH sshd on a loopback port, as the "remote host" of the provisioning tests.

It runs as the test's user (root in CI containers, hence PermitRootLogin) with a host key and a user key made
for the session; the remote side is this machine, so a test can look at the deployed processes directly."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from control_plane import launch

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
