"""PROTOCOL.md's 429: an address that keeps failing authentication is refused for the rest of the minute."""

from __future__ import annotations

import pytest

from control_plane.rate_limit import FailureLimiter
from tests.conftest import Server, assert_error, http

pytestmark = pytest.mark.django_db(transaction=True)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_an_address_is_limited_after_its_failures_until_the_window_ends():
    clock = Clock()
    limiter = FailureLimiter(window_s=60, clock=clock)
    for _ in range(3):
        assert limiter.retry_after("10.0.0.1", limit=3) == 0
        limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1", limit=3) == 60
    assert limiter.retry_after("10.0.0.2", limit=3) == 0  # others are not affected
    assert limiter.retry_after("10.0.0.1", limit=0) == 0  # 0: no limit
    clock.now += 45
    assert limiter.retry_after("10.0.0.1", limit=3) == 15
    clock.now += 15
    assert limiter.retry_after("10.0.0.1", limit=3) == 0  # a new window
    limiter.failed("10.0.0.1")
    assert limiter.retry_after("10.0.0.1", limit=3) == 0


def test_the_limiter_forgets_ended_windows_and_stays_bounded(monkeypatch):
    monkeypatch.setattr("control_plane.rate_limit.MAX_ADDRESSES", 10)
    clock = Clock()
    limiter = FailureLimiter(window_s=60, clock=clock)
    for i in range(10):
        limiter.failed(f"old-{i}")
    clock.now += 61
    for i in range(5):
        limiter.failed(f"new-{i}")
    limiter.failed("one-more")  # over the bound: the ended windows go
    assert set(limiter.windows) == {f"new-{i}" for i in range(5)} | {"one-more"}
    for i in range(20):
        limiter.failed(f"burst-{i}")
    assert len(limiter.windows) <= 10


def test_a_server_answers_429_after_repeated_bad_tokens(server_tmp, enrollment_token):
    server = Server(server_tmp, extra_env={"CP_AUTH_FAILURES_PER_MIN": "3"})
    try:
        claim = f"{server.url}/api/v1/agents/claim"
        for _ in range(3):
            assert_error(http("POST", claim, {"wait_s": 0}, token="cpa_guess"), 401)
        status, body = http("POST", claim, {"wait_s": 0}, token="cpa_guess")
        assert_error((status, body), 429, "rate_limited")
        # The address is refused whatever it sends now, a valid enrollment token included.
        register = {"name": "after-guessing", "labels": [], "executors": ["shell"], "capacity": 1}
        assert_error(http("POST", f"{server.url}/api/v1/agents/register", register, token=enrollment_token), 429)
    finally:
        server.stop()
