"""PROTOCOL.md's 429: an address that keeps failing authentication has its failures refused for the rest of
the minute, counted by every server process alike; a valid token is still served (agents behind the NAT
of a misbehaving client keep working)."""

from __future__ import annotations

import time
import urllib.error
import urllib.request

import pytest

from tests.conftest import Server, assert_error, http

pytestmark = pytest.mark.django_db(transaction=True)


def test_bad_tokens_on_one_server_make_another_answer_429_but_valid_tokens_still_pass(server_tmp, enrollment_token):
    servers = [Server(server_tmp, extra_env={"CP_AUTH_FAILURES_PER_MIN": "3"}) for _ in range(2)]
    try:
        if time.time() % 60 > 45:  # the counts are per wall-clock minute: keep the test inside one
            time.sleep(61 - time.time() % 60)
        first, second = (f"{server.url}/api/v1/agents/claim" for server in servers)
        for _ in range(3):
            assert_error(http("POST", first, {"wait_s": 0}, token="cpa_guess"), 401)
        status, body = http("POST", second, {"wait_s": 0}, token="cpa_guess")
        assert_error((status, body), 429, "rate_limited")
        # Only failures are refused: a valid enrollment token from the same address registers.
        register = {"name": "behind-the-same-nat", "labels": [], "executors": ["shell"], "capacity": 1}
        status, body = http("POST", f"{servers[1].url}/api/v1/agents/register", register, token=enrollment_token)
        assert status == 201, body
    finally:
        for server in servers:
            server.stop()


def test_the_429_says_when_to_try_again(server_tmp):
    server = Server(server_tmp, extra_env={"CP_AUTH_FAILURES_PER_MIN": "1"})
    try:
        claim = f"{server.url}/api/v1/agents/claim"
        http("POST", claim, {"wait_s": 0}, token="cpa_guess")
        request = urllib.request.Request(claim, b"{}", {"Authorization": "Bearer cpa_guess"}, method="POST")
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=30)
        assert refused.value.code == 429 and 1 <= int(refused.value.headers["Retry-After"]) <= 60
    finally:
        server.stop()
