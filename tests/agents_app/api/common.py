"""What the agent endpoint tests share."""

from __future__ import annotations

import time
import uuid

from tests.conftest import FAST_TIMINGS, http

MAX_WAIT_S = int(FAST_TIMINGS["CP_MAX_WAIT_S"])
KIB, MIB = 1024, 1024 * 1024

AGENT_POST_PATHS = (
    "/api/v1/agents/register",
    "/api/v1/agents/claim",
    "/api/v1/agents/heartbeat",
    f"/api/v1/attempts/{uuid.uuid4()}/progress",
    f"/api/v1/attempts/{uuid.uuid4()}/complete",
    f"/api/v1/attempts/{uuid.uuid4()}/artifacts",
)


def register_call(server: str, token: str | None, **overrides):
    body = {"name": "cg-1", "labels": ["codex", "linux"], "hostname": "mugen", "version": "1.0.0",
            "executors": ["shell", "simulated", "codex"], "capacity": 1, **overrides}  # fmt: skip
    return http("POST", f"{server}/api/v1/agents/register", body, token=token)


def wait_until(predicate, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")
