"""HTTPS end to end: a real server process serving TLS itself (uvicorn and daphne) with a certificate from a
CA the test just made, and real agent daemon processes that enroll over it, run a task, and refuse what they
must refuse (a certificate from a CA they do not trust, a plain-HTTP server behind https://, plain http://
to another host). Also: the settings behind TLS (secure cookies; the reverse-proxy header)."""

from __future__ import annotations

import http.cookies
import re
import ssl
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from agents_app.models import Agent
from control_plane import launch
from tasks_app.models import Attempt, Run
from tests.certs import make_pki
from tests.conftest import Server, doc

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"), "cp")


@pytest.fixture(scope="module")
def stranger_ca(tmp_path_factory):
    """Another CA's certificate: nothing the server presents was signed by it."""
    return make_pki(tmp_path_factory.mktemp("stranger"), "stranger").ca_file


@pytest.fixture(scope="module")
def tls_server(django_db_setup, django_db_blocker, server_tmp, pki):
    with django_db_blocker.unblock():
        server = Server(server_tmp, pki=pki)
    yield server
    server.stop()


def run_agent(server_url: str, token: str, tmp_path, *extra: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """One agent daemon process to its end (--once: it exits after its first task)."""
    argv = [sys.executable, str(launch.AGENT_SCRIPT), "--server", server_url, "--work-dir", str(tmp_path / "agent")]
    return subprocess.run(
        [*argv, *extra],
        env={"PATH": "/usr/bin:/bin", "CP_ENROLLMENT_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("kind", ["uvicorn", "daphne"])
def test_an_agent_enrolls_over_https_and_runs_a_task(kind, pki, server_tmp, enrollment_token, submit, tmp_path):
    server = Server(server_tmp, kind=kind, pki=pki)
    try:
        run = submit(doc({"key": "hello", "executor": "shell", "command": "echo over-tls > out/said.txt"}))
        done = run_agent(
            server.url, enrollment_token, tmp_path, "--name", f"tls-{kind}", "--executors", "shell",
            "--ca-file", str(pki.ca_file), "--once",
        )  # fmt: skip
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    attempt = Attempt.objects.get(task__run=run)
    assert (attempt.state, attempt.agent.name) == ("succeeded", f"tls-{kind}")
    assert attempt.artifacts.get().content == b"over-tls\n"
    assert Run.objects.get(pk=run.pk).state == "succeeded"


@pytest.mark.parametrize("trust", ["stranger CA", "system CAs"])
def test_the_agent_refuses_a_certificate_from_a_ca_it_does_not_trust(
    trust, tls_server, stranger_ca, enrollment_token, tmp_path
):
    extra = ["--ca-file", str(stranger_ca)] if trust == "stranger CA" else []
    done = run_agent(tls_server.url, enrollment_token, tmp_path, "--name", "gullible", *extra)
    assert done.returncode == 1
    assert f"TLS verification of {tls_server.url} failed" in done.stderr
    assert "unable to get local issuer certificate" in done.stderr
    assert not Agent.objects.filter(name="gullible").exists()  # the token never crossed the connection


def test_the_agent_refuses_a_plain_http_server_behind_an_https_url(live_server_proc, enrollment_token, tmp_path):
    url = live_server_proc.url.replace("http://", "https://")
    done = run_agent(url, enrollment_token, tmp_path, "--name", "confused", timeout=15)
    assert done.returncode == 1
    assert "does not speak TLS" in done.stderr


@pytest.mark.integration  # starts the daemon
@pytest.mark.parametrize("url", ["http://cp.example.com:8000", "http://10.1.2.3:8000", "http://[2001:db8::1]/"])
def test_the_agent_refuses_plain_http_to_another_host(url, enrollment_token, tmp_path):
    done = run_agent(url, enrollment_token, tmp_path, "--name", "careful", timeout=10)
    assert done.returncode == 2
    assert "refusing plain http://" in done.stderr and "use https:// or pass --insecure" in done.stderr


def test_plain_http_to_loopback_needs_no_flag(live_server_proc, enrollment_token, tmp_path):
    done = run_agent(live_server_proc.url.replace("127.0.0.1", "localhost"), "", tmp_path, "--check")
    assert "server: ok" in done.stdout, done.stdout + done.stderr


def test_an_unreadable_ca_file_is_a_bad_option(tls_server, tmp_path):
    bogus = tmp_path / "ca.pem"
    bogus.write_text("not a certificate")
    done = run_agent(tls_server.url, "cpe_x", tmp_path, "--ca-file", str(bogus))
    assert done.returncode == 2 and f"--ca-file {bogus}: cannot load CA certificates" in done.stderr


def cookies_of(url: str, context: ssl.SSLContext | None = None, headers: dict | None = None) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), context=context) as response:
        jar = http.cookies.SimpleCookie()
        for header in response.headers.get_all("Set-Cookie"):
            jar.load(header)
        return {name: morsel for name, morsel in jar.items()}


def test_cookies_are_secure_when_the_server_serves_tls(tls_server, live_server_proc, pki):
    context = ssl.create_default_context(cafile=str(pki.ca_file))
    assert cookies_of(f"{tls_server.url}/accounts/login/", context)["csrftoken"]["secure"] is True
    assert not cookies_of(f"{live_server_proc.url}/accounts/login/")["csrftoken"]["secure"]


def test_behind_a_tls_proxy_the_forwarded_scheme_is_trusted(server_tmp, operator):
    """The proxy terminates TLS and says so in X-Forwarded-Proto: the browser's https:// Origin passes CSRF's
    origin check, and cookies are secure. Without the header the same login is refused. On daphne: uvicorn
    trusts X-Forwarded-Proto from loopback by itself (--proxy-headers), which would hide the setting's part.
    The redirect to https is left to the proxy here (CP_SSL_REDIRECT=0), or it would answer first."""
    server = Server(server_tmp, extra_env={"CP_BEHIND_TLS_PROXY": "1", "CP_SSL_REDIRECT": "0"}, kind="daphne")
    try:
        host = server.url.removeprefix("http://")
        token = cookies_of(f"{server.url}/accounts/login/", headers={"X-Forwarded-Proto": "https"})["csrftoken"]

        def log_in(forwarded_proto: str | None) -> int:
            form = f"username=olivia&password=pw-olivia-123&csrfmiddlewaretoken={token.value}".encode()
            headers = {"Origin": f"https://{host}", "Cookie": f"csrftoken={token.value}"}
            if forwarded_proto:
                headers["X-Forwarded-Proto"] = forwarded_proto
            request = urllib.request.Request(f"{server.url}/accounts/login/", data=form, headers=headers)
            opener = urllib.request.build_opener(NoRedirect)
            try:
                with opener.open(request) as response:
                    return response.status
            except urllib.error.HTTPError as err:
                return err.code

        assert log_in(None) == 403  # an https:// Origin on what looks like a plain-http request
        assert log_in("https") == 302  # logged in, redirected
        assert token["secure"] is True
    finally:
        server.stop()


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


@pytest.mark.integration  # runs the server's launcher
def test_run_serve_refuses_a_certificate_without_its_key(pki):
    done = subprocess.run(
        [sys.executable, "-m", "control_plane.launch", "--cert", str(pki.cert_file)],
        cwd=launch.ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert re.search(r"TLS needs both a certificate and a key", done.stderr)


def test_daphne_gets_an_escaped_ssl_endpoint():
    argv = launch.server_command(8443, "daphne", "0.0.0.0", tls=("/etc/cp/c:ert.pem", "/etc/cp/k=ey.pem"))
    assert argv[1:3] == ["-e", r"ssl:8443:interface=0.0.0.0:privateKey=/etc/cp/k\=ey.pem:certKey=/etc/cp/c\:ert.pem"]
