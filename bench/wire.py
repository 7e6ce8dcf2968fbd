"""A lean HTTP/1.1 keep-alive JSON client on asyncio streams, for the simulated agents of the bench.

httpx costs several hundred microseconds of CPU a request; on a two-core machine that the server and
PostgreSQL share, the load generator must stay a small fraction of the total, so this speaks just enough
HTTP/1.1 for the control plane's JSON API: one connection per client, Content-Length or chunked bodies.
"""

from __future__ import annotations

import asyncio
import json

REQUEST_TIMEOUT_S = 30.0


class HttpError(Exception):
    def __init__(self, status: int, body: bytes, what: str = ""):
        super().__init__(f"{what} -> HTTP {status}: {body[:300]!r}")
        self.status, self.body = status, body


class Connection:
    """One keep-alive connection to host:port, opened on first use and re-opened when the server closed it."""

    def __init__(self, host: str, port: int, token: str | None = None):
        self.host, self.port, self.token = host, port, token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.requests = 0

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    def _encode(self, method: str, path: str, body, token: str | None) -> bytes:
        payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        auth = f"Authorization: Bearer {token}\r\n" if token else ""
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{auth}"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        return head.encode() + payload

    async def request(self, method: str, path: str, body=None, token: str | None = None, timeout=REQUEST_TIMEOUT_S):
        """(status, raw body). A request on a reused connection that the server had closed is sent again once
        on a new connection (the server never saw it)."""
        data = self._encode(method, path, body, token or self.token)
        async with asyncio.timeout(timeout):
            for retry in (False, True):
                fresh = self.writer is None
                if fresh:
                    await self._open()
                try:
                    self.writer.write(data)
                    status, raw = await self._read_response()
                    self.requests += 1
                    return status, raw
                except (ConnectionError, asyncio.IncompleteReadError):
                    self.close()
                    if fresh or retry:
                        raise
        raise AssertionError("unreachable")

    async def json(self, method: str, path: str, body=None, token: str | None = None, expect=200, timeout=None):
        status, raw = await self.request(method, path, body, token, timeout or REQUEST_TIMEOUT_S)
        if status != expect:
            raise HttpError(status, raw, f"{method} {path}")
        return json.loads(raw)

    async def _read_response(self) -> tuple[int, bytes]:
        reader = self.reader
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, chunked, close = None, False, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        if chunked:
            parts = []
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")  # no trailers from our servers
                    break
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
            body = b"".join(parts)
        elif length is not None:
            body = await reader.readexactly(length)
        else:
            body, close = await reader.read(), True
        if close:
            self.close()
        return status, body
