"""Request bodies are held to their route's limit while they stream in, before any authentication
(control_plane/body_limits.py), spoken over raw sockets to a real uvicorn process: an oversize body is refused
with a 413 before the client has sent it, and the server writes nothing of it."""

from __future__ import annotations

import asyncio
import json
import select
import socket
import time
import uuid

from control_plane import body_limits
from tests.agents_app.protocol_agent import Agent
from tests.conftest import doc, register

KIB, MIB = 1024, 1024 * 1024
HOSTILE_BYTES = 48 * MIB


def chunked(total: int, size: int = 64 * KIB):
    """A chunked transfer coding of `total` bytes, chunk by chunk, then its last chunk."""
    chunk = b"a" * size
    for _ in range(total // size):
        yield b"%x\r\n%s\r\n" % (size, chunk)
    yield b"0\r\n\r\n"


def _complete(response: bytes) -> bool:
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return False


def exchange(port: int, head: bytes, pieces=(), timeout: float = 60.0) -> tuple[int, dict, bytes, int]:
    """Send `head`, then `pieces` while reading the answer: (status, headers, body, bytes of `pieces` sent
    before the answer was whole or the server closed)."""
    sent, response, pending = 0, b"", b""
    pieces = iter(pieces)
    sending = True
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        sock.setblocking(False)
        deadline = time.monotonic() + timeout
        while not _complete(response):
            assert time.monotonic() < deadline, f"no whole answer within {timeout} s: {response[:300]!r}"
            readable, writable, _ = select.select([sock], [sock] if sending else [], [], 1.0)
            if readable:
                try:
                    data = sock.recv(64 * KIB)
                except ConnectionResetError:
                    break
                if not data:
                    break
                response += data
            elif writable:
                pending = pending or next(pieces, b"")
                if not pending:
                    sending = False
                    continue
                try:
                    n = sock.send(pending)
                except (BrokenPipeError, ConnectionResetError):
                    sending = False
                    continue
                sent, pending = sent + n, pending[n:]
    head_bytes, _, body = response.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body, sent


def post_head(path: str, content_type: str, length: int | None = None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n".encode()


def bytes_written(pid: int) -> int:
    """What the process has written through write(2) so far (to its temporary files among others)."""
    with open(f"/proc/{pid}/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def assert_too_large(status: int, headers: dict, body: bytes) -> None:
    assert status == 413, body[:300]
    assert headers["content-type"] == "application/json"
    answer = json.loads(body)
    assert set(answer) == {"error", "detail"} and answer["error"] == "too_large", answer


def test_an_anonymous_oversize_chunked_login_post_is_refused_before_it_is_sent_and_nothing_is_written(
    live_server_proc,
):
    pid = live_server_proc.proc.pid
    written_before = bytes_written(pid)
    head = post_head("/accounts/login/", "application/x-www-form-urlencoded")
    status, headers, body, sent = exchange(live_server_proc.port, head, chunked(HOSTILE_BYTES))
    assert status == 413, body[:300]
    assert headers["content-type"].startswith("text/html") and b"Request body too large" in body
    assert headers["connection"] == "close"
    # What the loopback's socket buffers hold, at most, beyond the limit: far from the whole body.
    assert sent < HOSTILE_BYTES // 2
    # Django spools a body past 2 MiB to a temporary file: the server read no more than the limit (1 MiB).
    assert bytes_written(pid) - written_before < body_limits.FORM_MAX_BYTES


def test_an_oversize_chunked_agent_call_without_a_token_is_413_in_the_protocol_shape(live_server_proc):
    head = post_head("/api/v1/agents/heartbeat", "application/json")
    status, headers, body, sent = exchange(live_server_proc.port, head, chunked(HOSTILE_BYTES))
    assert_too_large(status, headers, body)
    assert sent < HOSTILE_BYTES // 2


def test_a_content_length_over_the_limit_is_413_at_once_without_a_byte_of_the_body(live_server_proc):
    head = post_head("/api/v1/agents/register", "application/json", length=HOSTILE_BYTES)
    status, headers, body, _ = exchange(live_server_proc.port, head, timeout=10)
    assert_too_large(status, headers, body)
    assert json.loads(body)["detail"] == f"the body may be at most {64 * KIB} bytes"
    head = post_head("/accounts/login/", "application/x-www-form-urlencoded", length=HOSTILE_BYTES)
    assert exchange(live_server_proc.port, head, timeout=10)[0] == 413


def test_a_client_a_little_over_the_limit_reads_its_413_every_time(live_server_proc):
    """Sent whole by a client that reads only afterwards (urllib), a body 512 KiB over its limit is answered
    413 every time, not cut off by a reset mid-send."""
    from tests.conftest import http

    for _ in range(5):
        status, body = http("POST", f"{live_server_proc.url}/api/v1/agents/heartbeat",
                            raw=b"x" * (body_limits._limits()["agent"] + 512 * KIB))  # fmt: skip
        assert (status, body["error"]) == (413, "too_large")


def test_an_artifact_of_the_largest_size_still_uploads(live_server_proc, enrollment_token, submit, settings):
    submit(doc({"key": "a"}))
    agent = Agent(live_server_proc.url, register(live_server_proc.url, enrollment_token, "cg-1"), "cg-1")
    attempt = agent.claim_one()
    largest = b"\1" * settings.CP_ARTIFACT_MAX_BYTES
    status, body = agent.upload(attempt["attempt_id"], {"file": ("max.bin", largest)})
    assert (status, body["size"]) == (201, len(largest)), body


def test_a_dag_document_of_the_largest_size_is_read_to_its_own_check(live_server_proc, operator):
    """A submit just under the document limit passes the body limit: the run API reads it and answers (here
    400, as it is no DAG document), not the body limit's 413."""
    _, token = operator
    filler = json.dumps({"padding": "a" * (body_limits.DOCUMENT_LIMIT - 64)}).encode()
    head = post_head("/api/v1/runs", "application/json", length=len(filler))
    head = head.replace(b"\r\n\r\n", f"\r\nAuthorization: Bearer {token}\r\n\r\n".encode(), 1)
    status, _, body, _ = exchange(live_server_proc.port, head, [filler])
    assert status not in (413, 500), body[:300]


def test_the_application_never_receives_a_byte_past_the_limit(monkeypatch):
    """Measured at the application behind the wrapper: chunks stop at the one that passes the limit; the
    wrapper then reads and drops at most LINGER_BYTES more (so a client a little over reads its 413)."""
    monkeypatch.setattr(body_limits, "LINGER_BYTES", 3000)
    seen = []

    async def app(scope, receive, send):
        while (message := await receive())["type"] == "http.request":
            seen.append(len(message["body"]))
            if not message.get("more_body"):
                break

    async def run():
        messages = [{"type": "http.request", "body": b"x" * 1000, "more_body": True} for _ in range(20)]
        sent = []

        async def receive():
            return messages.pop(0)

        async def send(message):
            sent.append(message)

        wrapped = body_limits.limit_bodies(app, {name: 2500 for name in body_limits._limits()})
        await wrapped({"type": "http", "path": f"/api/v1/attempts/{uuid.uuid4()}/progress", "headers": []},
                      receive, send)  # fmt: skip
        return sent, len(messages)

    sent, unread = asyncio.run(run())
    assert sum(seen) <= 2500 and seen == [1000, 1000]
    assert unread == 14  # the third chunk passed the limit, three more were dropped, then reading stopped
    assert sent[0]["status"] == 413


def test_the_routes_limits_are_at_least_what_their_endpoints_read(settings):
    limits = body_limits._limits()
    attempt = f"/api/v1/attempts/{uuid.uuid4()}"
    assert limits[body_limits.route_of(f"{attempt}/artifacts")] > settings.CP_ARTIFACT_MAX_BYTES
    assert limits[body_limits.route_of(f"{attempt}/complete")] > settings.CP_RESULT_MAX_BYTES
    assert limits[body_limits.route_of("/api/v1/runs")] == body_limits.DOCUMENT_LIMIT
    assert limits[body_limits.route_of("/admin/tasks_app/workflow/import/")] >= settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    assert body_limits.route_of("/accounts/login/") == "form"
