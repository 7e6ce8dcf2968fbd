"""The README's reverse-proxy alternative, run for real: nginx with the README's own `server` block (only
the certificate, ports and upstream substituted) terminating TLS in front of a server started with
CP_BEHIND_TLS_PROXY=1. An agent enrolls and runs a task through it; a browser logs in through it (CSRF's
origin check with the forwarded scheme, secure cookies) and its page goes live over the proxied websocket."""

from __future__ import annotations

import getpass
import re
import shutil
import ssl
import subprocess
import sys
from pathlib import Path

import pytest
from playwright.sync_api import expect

from control_plane import launch
from tasks_app.models import Attempt
from tests.certs import make_pki
from tests.conftest import Server, doc
from tests.tasks_app.dashboard.test_browser import browser, login, people  # noqa: F401 - fixtures

pytestmark = pytest.mark.django_db(transaction=True)
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_nginx_block() -> str:
    match = re.search(r"```nginx\n(.*?)```", README.read_text(), re.S)
    assert match, "README.md has no nginx block"
    return match.group(1)


def nginx_config(tmp: Path, port: int, upstream: int, pki) -> str:
    """The README's block, made to run unprivileged on loopback ports inside the test's directory."""
    block = readme_nginx_block()
    replacements = [
        (r"listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;"),
        (r"ssl_certificate \s+\S+;", f"ssl_certificate {pki.cert_file};"),
        (r"ssl_certificate_key \S+;", f"ssl_certificate_key {pki.key_file};"),
        (r"proxy_pass http://127\.0\.0\.1:8000;", f"proxy_pass http://127.0.0.1:{upstream};"),
    ]
    for pattern, value in replacements:
        block, count = re.subn(pattern, value, block)
        assert count == 1, f"README's nginx block changed: {pattern!r} matched {count} times"
    temp = " ".join(f"{kind}_temp_path {tmp}/{kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (
        f"user {getpass.getuser()}; daemon off; worker_processes 1; pid {tmp}/nginx.pid; error_log {tmp}/error.log;\n"
        f"events {{}}\nhttp {{ access_log off; {temp}\n{block}}}\n"
    )


@pytest.fixture(scope="module")
def proxied(django_db_setup, django_db_blocker, tmp_path_factory):
    """(nginx URL, its CA file): nginx terminating TLS in front of a CP_BEHIND_TLS_PROXY server."""
    tmp = tmp_path_factory.mktemp("nginx")
    pki = make_pki(tmp / "pki", "proxy")
    with django_db_blocker.unblock():
        upstream = Server(tmp, extra_env={"CP_BEHIND_TLS_PROXY": "1"})
    port = launch.free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(nginx_config(tmp, port, upstream.port, pki))
    nginx = subprocess.Popen(
        [shutil.which("nginx") or "/usr/sbin/nginx", "-p", str(tmp), "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        launch.wait_http(f"https://127.0.0.1:{port}/api/v1/health", nginx, timeout=15, context=context)
        yield f"https://127.0.0.1:{port}", pki.ca_file
    finally:
        launch.stop(nginx)
        upstream.stop()


def test_an_agent_enrolls_and_runs_a_task_through_the_proxy(proxied, enrollment_token, submit, tmp_path):
    url, ca_file = proxied
    run = submit(doc({"key": "via-proxy", "executor": "shell", "command": "echo proxied > out/p.txt"}))
    done = subprocess.run(
        [
            sys.executable, str(launch.AGENT_SCRIPT), "--server", url, "--ca-file", str(ca_file),
            "--name", "behind-nginx", "--executors", "shell", "--work-dir", str(tmp_path), "--once",
        ],
        env={"PATH": "/usr/bin:/bin", "CP_ENROLLMENT_TOKEN": enrollment_token},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    attempt = Attempt.objects.get(task__run=run)
    assert (attempt.state, attempt.agent.name) == ("succeeded", "behind-nginx")
    assert attempt.artifacts.get().content == b"proxied\n"


def test_a_browser_logs_in_through_the_proxy_and_its_page_is_live(proxied, browser, people, fleet):  # noqa: F811
    url, _ = proxied

    class Proxy:  # what login() needs of a server
        pass

    proxy = Proxy()
    proxy.url = url
    # The login form's POST passes CSRF's origin check only if Django sees the forwarded https scheme.
    page = login(browser, proxy, people["viewer"], ignore_https_errors=True)
    cookies = {c["name"]: c for c in page.context.cookies()}
    assert cookies["sessionid"]["secure"] and cookies["csrftoken"]["secure"]
    page.goto(f"{url}/agents/")
    expect(page.locator("#live-status")).to_have_attribute("data-state", "live")  # the wss:// upgrade passed
    # An agent enrolling now shows up without a reload: the panel came over the proxied websocket.
    fleet("seen-live", ["x"])
    expect(page.locator('tr[data-agent="seen-live"]')).to_be_visible(timeout=15_000)
