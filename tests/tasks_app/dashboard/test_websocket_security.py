"""The dashboard's websocket against a real server process: only the server's own origin (scheme, host and
port, as CSRF has it) may open one with a person's cookie, and a socket ends with its session."""

from __future__ import annotations

import asyncio
import secrets
import urllib.request

import pytest
import websockets
from django.test import Client

from tests.conftest import Server

pytestmark = pytest.mark.django_db(transaction=True)
PASSWORD = "pw-wanda-12345"


@pytest.fixture
def wanda(django_user_model):
    return django_user_model.objects.create_user("wanda", password=PASSWORD)


def session_cookie(user) -> str:
    client = Client()
    assert client.login(username=user.username, password=PASSWORD)
    return client.cookies["sessionid"].value


async def _handshake(url, headers) -> str:
    try:
        async with websockets.connect(url, additional_headers=headers, open_timeout=5) as ws:
            await asyncio.wait_for(ws.recv(), 5)
            return "accepted"
    except websockets.exceptions.InvalidStatus as exc:
        return f"refused:{exc.response.status_code}"
    except websockets.exceptions.ConnectionClosed as exc:
        return f"closed:{exc.rcvd.code if exc.rcvd else None}"


def test_only_the_servers_own_origin_opens_a_socket(live_server_proc, wanda):
    port = live_server_proc.port
    cookie = f"sessionid={session_cookie(wanda)}"
    origins = {
        "own": f"http://127.0.0.1:{port}",
        "other port": f"http://127.0.0.1:{port + 1}",
        "other scheme": f"https://127.0.0.1:{port}",
        "other host": f"http://localhost:{port}",
        "dev server": "http://localhost:3000",
        "testserver": "http://testserver",
    }

    async def main():
        url = f"ws://127.0.0.1:{port}/ws/overview/"
        answers = [_handshake(url, {"Origin": o, "Cookie": cookie}) for o in origins.values()]
        return dict(zip(origins, await asyncio.gather(*answers), strict=True))

    answers = asyncio.run(main())
    assert answers["own"] == "accepted", answers
    assert all(a.startswith(("refused", "closed")) for name, a in answers.items() if name != "own"), answers


async def _close_code_after(url, headers, act) -> int | None:
    async with websockets.connect(url, additional_headers=headers, open_timeout=5, max_size=None) as ws:
        await asyncio.wait_for(ws.recv(), 5)
        await asyncio.to_thread(act)
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 10)
        except websockets.exceptions.ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None


def test_a_socket_closes_at_once_when_its_session_logs_out(live_server_proc, wanda):
    # The session's server checks sessions only every minute: this closing in seconds is the logout's doing.
    own = live_server_proc.url
    session = session_cookie(wanda)
    csrf = secrets.token_hex(16)  # an unmasked 32-character CSRF secret, sent as cookie and header

    def log_out():
        request = urllib.request.Request(
            f"{own}/accounts/logout/",
            method="POST",
            headers={"Origin": own, "Cookie": f"sessionid={session}; csrftoken={csrf}", "X-CSRFToken": csrf},
        )
        with urllib.request.urlopen(request) as answer:
            assert answer.status == 200

    url = f"ws://127.0.0.1:{live_server_proc.port}/ws/overview/"
    code = asyncio.run(_close_code_after(url, {"Origin": own, "Cookie": f"sessionid={session}"}, log_out))
    assert code == 4401


def test_a_socket_closes_when_its_user_is_deactivated(django_db_blocker, server_tmp, wanda):
    with django_db_blocker.unblock():
        server = Server(server_tmp, extra_env={"CP_WS_SESSION_CHECK_S": "1"})
    try:

        def deactivate():
            type(wanda).objects.filter(pk=wanda.pk).update(is_active=False)

        url = f"ws://127.0.0.1:{server.port}/ws/overview/"
        headers = {"Origin": server.url, "Cookie": f"sessionid={session_cookie(wanda)}"}
        assert asyncio.run(_close_code_after(url, headers, deactivate)) == 4401
    finally:
        server.stop()
