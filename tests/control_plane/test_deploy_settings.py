"""Production settings: a deployment over TLS (served directly or behind a TLS proxy) passes Django's
`check --deploy` with no warning, redirects plain http to https and sends HSTS; plain HTTP on loopback, the
default, does neither."""

from __future__ import annotations

import http.client
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Server

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.django_db(transaction=True)


def check_deploy(**env: str) -> str:
    # The test process's own switches are no deployment's: pytest-playwright sets DJANGO_ALLOW_ASYNC_UNSAFE.
    unset = ("CP_", "SECRET_KEY", "DEBUG", "DJANGO_ALLOW_ASYNC_UNSAFE")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(unset)}
    done = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy"],
        cwd=ROOT,
        env={**clean, "SECRET_KEY": secrets.token_urlsafe(50), **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.stdout + done.stderr


@pytest.mark.parametrize(
    "env",
    [{"CP_BEHIND_TLS_PROXY": "1"}, {"CP_TLS_CERT": "/etc/cp/cert.pem", "CP_TLS_KEY": "/etc/cp/key.pem"}],
    ids=["behind a TLS proxy", "serving TLS itself"],
)
def test_a_deployment_over_tls_passes_check_deploy_with_no_warning(env):
    out = check_deploy(**env)
    assert "System check identified no issues" in out, out


def test_plain_http_on_loopback_is_not_passed_off_as_a_deployment():
    out = check_deploy()
    assert "security.W004" in out and "security.W008" in out  # no HSTS, no redirect: nothing to redirect to


@pytest.fixture(scope="module")
def behind_proxy(django_db_setup, django_db_blocker, tmp_path_factory):
    with django_db_blocker.unblock():
        server = Server(tmp_path_factory.mktemp("deploy"), extra_env={"CP_BEHIND_TLS_PROXY": "1"})
    yield server
    server.stop()


def get(server: Server, path: str, headers: dict | None = None) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("GET", path, headers={"Host": f"127.0.0.1:{server.port}", **(headers or {})})
    response = conn.getresponse()
    response.read()
    conn.close()
    return response


def test_behind_a_tls_proxy_plain_http_is_redirected_to_https(behind_proxy):
    response = get(behind_proxy, "/runs/?x=1")
    assert response.status == 301
    assert response.getheader("Location") == f"https://127.0.0.1:{behind_proxy.port}/runs/?x=1"


def test_behind_a_tls_proxy_https_pages_carry_hsts(behind_proxy):
    response = get(behind_proxy, "/", {"X-Forwarded-Proto": "https"})
    assert response.status == 302 and "/accounts/login/" in response.getheader("Location")
    assert response.getheader("Strict-Transport-Security") == "max-age=31536000; includeSubDomains; preload"


def test_the_health_check_answers_over_plain_http_for_a_proxys_probes(behind_proxy):
    assert get(behind_proxy, "/api/v1/health").status == 200


def test_plain_http_on_loopback_neither_redirects_nor_sends_hsts(live_server_proc):
    response = get(live_server_proc, "/")
    assert response.status == 302 and "/accounts/login/" in response.getheader("Location")
    assert response.getheader("Strict-Transport-Security") is None
