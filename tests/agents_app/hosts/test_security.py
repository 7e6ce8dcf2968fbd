"""What a hostile host, or a hostile value in a host's settings, can make provisioning do (issue 12): the pin is
the host key alone, whatever else this machine's user trusts; remote commands run values as data, never as
shell; uninstall removes only what deploy wrote."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import asyncssh
import pytest
from django.core.exceptions import ValidationError

from agents_app.hosts import provision
from agents_app.hosts.jobs import start_operations
from agents_app.hosts.models import Host

ATTACKER_CA = "CN=attacker CA"


class Impostor:
    """An SSH server on loopback that lets anyone in and records every command it is sent: a host that
    answers at the pinned host's address with a key of its own."""

    def __init__(self, server_host_keys):
        self.server_host_keys = server_host_keys
        self.commands: list[str] = []
        self.port = 0

    async def __aenter__(self):
        async def record(process):
            self.commands.append(process.command or "")
            process.exit(0)

        self.server = await asyncssh.create_server(
            NoAuthServer, "127.0.0.1", 0, server_host_keys=self.server_host_keys, process_factory=record
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc):
        self.server.close()
        await self.server.wait_closed()


class NoAuthServer(asyncssh.SSHServer):
    def begin_auth(self, username):
        return False  # no authentication needed: the impostor wants whatever the client sends


def target(port: int, host_key: str) -> provision.Target:
    return provision.Target(
        name="pinned", address="127.0.0.1", port=port, user="deploy", host_key=host_key,
        private_key=asyncssh.generate_private_key("ssh-ed25519"), connect_timeout_s=5.0,
        server_url="http://127.0.0.1:9", agent_names=("pinned-1",),
    )  # fmt: skip


def openssh_line(key: asyncssh.SSHKey) -> str:
    return key.export_public_key("openssh").decode().strip()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """The control plane's user's home (asyncssh reads its defaults from ~/.ssh)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ssh").mkdir()
    return tmp_path / ".ssh"


def x509_host(home: Path, where: str):
    """A host key with an X.509 certificate from a CA this machine's user trusts at `where`."""
    ca = asyncssh.generate_private_key("ecdsa-sha2-nistp256")
    ca_cert = ca.generate_x509_ca_certificate(ca, ATTACKER_CA, hash_alg="sha256")
    key = asyncssh.generate_private_key("ssh-ed25519")
    cert = ca.generate_x509_host_certificate(
        key, "CN=127.0.0.1", issuer=ATTACKER_CA, principals=["127.0.0.1"], hash_alg="sha256"
    )
    if where == "ca-bundle.crt":
        (home / "ca-bundle.crt").write_bytes(ca_cert.export_certificate("pem"))
    else:  # a directory of CA certificates named by subject hash, as OpenSSL's c_rehash makes it
        (home / "crt").mkdir()
        (home / "crt" / f"{cert.issuer_hash}.0").write_bytes(ca_cert.export_certificate("pem"))
    return key, cert


def openssh_cert_host(home: Path):
    """A host key with an OpenSSH certificate from a CA that ~/.ssh/known_hosts marks @cert-authority."""
    ca = asyncssh.generate_private_key("ssh-ed25519")
    key = asyncssh.generate_private_key("ssh-ed25519")
    cert = ca.generate_host_certificate(key, "127.0.0.1", principals=["127.0.0.1"])
    (home / "known_hosts").write_text(f"@cert-authority * {openssh_line(ca)}\n")
    return key, cert


HOSTS_WITH_A_TRUSTED_CERTIFICATE = {
    "x509 ~/.ssh/ca-bundle.crt": lambda home: x509_host(home, "ca-bundle.crt"),
    "x509 ~/.ssh/crt/": lambda home: x509_host(home, "crt"),
    "openssh @cert-authority": openssh_cert_host,
}


async def noop_report(*args, **kwargs):
    pass


@pytest.mark.parametrize("make", HOSTS_WITH_A_TRUSTED_CERTIFICATE.values(), ids=HOSTS_WITH_A_TRUSTED_CERTIFICATE)
def test_a_host_with_another_key_is_refused_even_with_a_certificate_this_user_trusts(home, make):
    key, cert = make(home)
    pinned = openssh_line(asyncssh.generate_private_key("ssh-ed25519"))

    async def scenario():
        async with Impostor([(key, cert)]) as impostor:
            with pytest.raises(provision.HostKeyChanged) as refused:
                await provision.run_operation("deploy", target(impostor.port, pinned), noop_report, token="secret")
            return impostor, refused.value

    impostor, refused = asyncio.run(scenario())
    assert impostor.commands == []  # never logged in: no agent.env, no enrollment token
    assert refused.offered == openssh_line(key)


def test_the_pinned_key_still_connects_when_it_comes_with_a_certificate(home):
    key, cert = x509_host(home, "ca-bundle.crt")

    async def scenario():
        async with (
            Impostor([(key, cert)]) as impostor,
            await provision.connect(target(impostor.port, openssh_line(key))) as conn,
        ):
            return openssh_line(conn.get_server_host_key())

    assert asyncio.run(scenario()) == openssh_line(key)


# --- hostile values in a host's settings, through a real deploy to the loopback sshd (conftest.py) ---


@pytest.mark.parametrize("remote_dir", [".", "./", "..", "~", "a/../..", "cp/./agent", "/", "/root", "/home/alice"])
def test_a_remote_dir_that_is_or_holds_a_home_is_refused(remote_dir):
    host = Host(name="h", address="127.0.0.1", user="deploy", remote_dir=remote_dir)
    with pytest.raises(ValidationError) as refused:
        host.clean_fields()
    assert "remote_dir" in refused.value.message_dict


@pytest.mark.django_db(transaction=True)
def test_a_remote_dir_of_the_home_never_reaches_the_host(make_host, sshd):
    host = make_host("home", remote_dir=".")  # straight into the database, past the form's validators
    [deploy] = start_operations("deploy", [host], "test", background=False)
    assert deploy.state == "failed" and "remote folder '.'" in deploy.error and "not folder names" in deploy.error
    assert "connecting" not in deploy.output


@pytest.mark.django_db(transaction=True)
def test_hostile_host_values_are_data_in_remote_commands(make_host, live_server_proc, tmp_path):
    pwned = tmp_path / "pwned"
    hostile = f"$(touch {pwned})"
    python = make_host("py", remote_python=f"/usr/bin/python3'{hostile}'")
    [refused] = start_operations("deploy", [python], "test", background=False)
    assert refused.state == "failed" and "not found" in refused.error

    folder = make_host("dir", remote_dir=str(tmp_path / f"remote-{hostile}"), server_url=live_server_proc.url)
    folder.agent_count = 1
    folder.save()
    [deploy] = start_operations("deploy", [folder], "test", background=False)
    assert deploy.state == "succeeded", deploy.output
    [uninstall] = start_operations("uninstall", [folder], "test", background=False)
    assert uninstall.state == "succeeded", uninstall.output
    assert not Path(folder.remote_dir).exists()
    assert not pwned.exists()


@pytest.mark.django_db(transaction=True)
def test_uninstall_removes_only_what_deploy_wrote(make_host, live_server_proc, tmp_path):
    remote = tmp_path / "existing"
    (remote / "work").mkdir(parents=True)
    (remote / "notes.txt").write_text("mine")
    (remote / "work" / "project.txt").write_text("mine too")
    victim = tmp_path / "victim.txt"
    victim.write_text("outside the install folder")
    host = make_host("owned", remote_dir=str(remote), server_url=live_server_proc.url, agent_count=1)
    [deploy] = start_operations("deploy", [host], "test", background=False)
    assert deploy.state == "succeeded", deploy.output
    # A manifest pointing outside the folder (tampered with, or a bug) removes nothing out there.
    with open(remote / ".cp-agent-manifest", "a") as manifest:
        manifest.write(f"../victim.txt\n{victim}\n")

    [uninstall] = start_operations("uninstall", [host], "test", background=False)

    assert uninstall.state == "failed" and "../victim.txt: not a path inside" in uninstall.error
    assert victim.read_text() == "outside the install folder"
    assert sorted(p.name for p in remote.iterdir()) == ["notes.txt", "work"]  # was there before the deploy
    assert (remote / "work" / "project.txt").read_text() == "mine too"


def test_deploy_refuses_a_folder_that_leads_to_the_home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "cp-agent").symlink_to(home)  # passes the validator; on the host it is the home itself
    script = provision._mkdir(provision.Target("h", "", 22, "u", "", remote_dir="cp-agent"))
    done = subprocess.run(
        ["/bin/sh", "-c", script], env={"HOME": str(home), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True
    )
    assert done.returncode == 4 and "is the login's home or holds it" in done.stderr
    assert sorted(p.name for p in home.iterdir()) == ["cp-agent"]
