"""An agent speaking PROTOCOL.md by hand over real HTTP, for the tests that pin the server's side of each
call (tests/agents_app/test_api_*.py); the `server`, `enroll` and `run_of` fixtures (conftest.py) make them."""

from __future__ import annotations

import uuid

from tests.conftest import http, ok


def multipart(fields: dict[str, tuple[str, bytes]]) -> tuple[bytes, dict]:
    """A multipart/form-data body of file fields {field: (filename, content)} and its Content-Type."""
    boundary = uuid.uuid4().hex
    out = bytearray()
    for field, (filename, content) in fields.items():
        out += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        out += content + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), {"Content-Type": f"multipart/form-data; boundary={boundary}"}


class Agent:
    """One registered agent and the calls it makes."""

    def __init__(self, url: str, body: dict, name: str):
        self.url, self.name = url, name
        self.id, self.token = body["agent_id"], body["token"]

    def post(self, path: str, body=None, **kwargs):
        return http("POST", self.url + path, body, token=self.token, **kwargs)

    def claim(self, wait_s: float = 0, capacity: int = 1) -> list[dict]:
        return ok(self.post("/api/v1/agents/claim", {"capacity": capacity, "wait_s": wait_s}))["assignments"]

    def claim_one(self) -> dict:
        assignments = self.claim()
        assert len(assignments) == 1, assignments
        return assignments[0]

    def heartbeat(self, attempts=(), status="busy"):
        return self.post("/api/v1/agents/heartbeat", {"status": status, "attempts": list(attempts)})

    def progress(self, attempt_id: str, body: dict):
        return self.post(f"/api/v1/attempts/{attempt_id}/progress", body)

    def complete(self, attempt_id: str, outcome="succeeded", **fields):
        return self.post(f"/api/v1/attempts/{attempt_id}/complete", {"outcome": outcome, **fields})

    def upload(self, attempt_id: str, fields: dict[str, tuple[str, bytes]]):
        raw, headers = multipart(fields)
        return self.post(f"/api/v1/attempts/{attempt_id}/artifacts", raw=raw, headers=headers)
