"""A scripted stand-in for the model APIs the real AI CLIs call, on a loopback port the tests own.

The Anthropic Messages API (`POST /v1/messages`, streamed as server-sent events the way Claude Code asks for
it) and the OpenAI Responses API (`POST /v1/responses`, streamed the way codex's `wire_api = "responses"`
asks for it) are answered from one queue of scripted turns: each request for a model turn takes the next
turn, rendered in that API's own wire format. Everything received is recorded, so a test can assert what the
CLI sent back (a tool's result, its session header). Nothing else is stood in for: the CLIs themselves are
the real npm packages (tests/real_clis.py).

    api.script(tool_call("Write", {"file_path": p, "content": "hi"}), text("Done."))
    api.script(rate_limited(reset_in_s=3600))        # a 429 with the providers' reset headers
    api.script(http_error(500))

A request that finds the queue empty is answered with the text turn `UNSCRIPTED` and listed in
`api.unscripted`, so a CLI that asks once more than a test planned ends its run instead of hanging.

Several CLIs asking at once (parallel tasks of a run, on several agents) arrive in no fixed order, so one
shared queue cannot say which turn is whose. `route(marker, *turns)` gives a conversation its own queue: a
model-turn request any string of whose JSON body contains `marker` (put a unique one, say "[task:parser]",
in each task's prompt: both CLIs send the whole conversation, the first prompt included, every time) takes
the next turn of that marker's queue; routes are tried in the order first made, the first whose marker
occurs wins. An unrouted request takes from the shared queue as before; a routed one whose queue is empty
is answered `UNSCRIPTED` (it never falls back to the shared queue). `Received.route` names the marker.

    api.route("[task:plan]", tool_call("Bash", {"command": "echo 1 > PLAN.md"}), text("Planned."))
    api.route("[task:impl]", tool_call("exec_command", {"cmd": "echo x > impl.py"}), text("Done."))
    api.routed("[task:plan]")                         # the requests that marker took turns for
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

UNSCRIPTED = "(the stand-in had no scripted turn left)"


@dataclass(frozen=True)
class Usage:
    """One turn's token counts as they go on the wire. Anthropic reports cache reads and writes apart from
    `input_tokens` (`cache_read_input_tokens`, `cache_creation_input_tokens`); OpenAI counts cached tokens
    inside `input_tokens` (`input_tokens_details.cached_tokens`) and reasoning tokens inside `output_tokens`
    (`output_tokens_details.reasoning_tokens`). Each field goes to the API's field of that meaning;
    (codex also reads `input_tokens_details.cache_write_tokens`); `reasoning_tokens` has no Anthropic field."""

    input_tokens: int = 100
    output_tokens: int = 20
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0


@dataclass(frozen=True)
class Turn:
    """One scripted answer. `kind` is "text", "tool" or "error"; build one with `text`, `tool_call`,
    `http_error` or `rate_limited` rather than by hand."""

    kind: str
    text: str = ""
    tool_name: str = ""
    # A dict is a JSON tool input (Claude's tool_use input, an OpenAI function call's arguments); a str is
    # a freeform OpenAI custom tool's input (codex's apply_patch).
    tool_input: dict | str | None = None
    usage: Usage = field(default_factory=Usage)
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    # For errors: the body per API, {"anthropic": {...}, "openai": {...}}.
    error_bodies: dict[str, Any] = field(default_factory=dict)
    # Seconds to wait before answering (a slow model; a stall).
    delay_s: float = 0.0


def text(message: str, usage: Usage | None = None, delay_s: float = 0.0) -> Turn:
    """The assistant answers with text and ends its turn (Claude: stop_reason end_turn)."""
    return Turn("text", text=message, usage=usage or Usage(), delay_s=delay_s)


def tool_call(
    name: str, tool_input: dict | str, say: str = "", usage: Usage | None = None, delay_s: float = 0.0
) -> Turn:
    """The assistant calls one tool (Claude: a tool_use block, stop_reason tool_use; OpenAI: a
    function_call item, or a custom_tool_call item when `tool_input` is a str), after the text `say`."""
    return Turn("tool", text=say, tool_name=name, tool_input=tool_input, usage=usage or Usage(), delay_s=delay_s)


def http_error(status: int, message: str = "", headers: dict[str, str] | None = None) -> Turn:
    """An HTTP error in each API's error shape: 500 is an internal error, 529 Anthropic's overloaded, 401 a
    bad key, anything else an invalid request."""
    anthropic_type, openai_type = {
        401: ("authentication_error", "invalid_request_error"),
        429: ("rate_limit_error", "rate_limit_exceeded"),
        500: ("api_error", "server_error"),
        529: ("overloaded_error", "server_error"),
    }.get(status, ("invalid_request_error", "invalid_request_error"))
    message = message or {500: "Internal server error", 401: "invalid x-api-key"}.get(status, f"error {status}")
    return Turn(
        "error",
        status=status,
        headers=dict(headers or {}),
        error_bodies={
            "anthropic": {"type": "error", "error": {"type": anthropic_type, "message": message}},
            "openai": {"error": {"message": message, "type": openai_type, "code": openai_type, "param": None}},
        },
    )


def rate_limited(reset_in_s: int = 3600, retry_after_s: int | None = None, usage_limit: bool = False) -> Turn:
    """A 429 carrying the reset time the ways the providers send it: `retry-after` (seconds),
    Anthropic's `anthropic-ratelimit-unified-reset` (Unix seconds) and `-status: rejected`, OpenAI's
    `x-ratelimit-reset-requests`. With `usage_limit`, OpenAI's body is ChatGPT's "usage_limit_reached"
    with `resets_at` (codex treats it as final) instead of a retryable "rate_limit_exceeded"."""
    reset_at = int(time.time()) + reset_in_s
    retry_after = reset_in_s if retry_after_s is None else retry_after_s
    headers = {
        "retry-after": str(retry_after),
        "anthropic-ratelimit-unified-status": "rejected",
        "anthropic-ratelimit-unified-reset": str(reset_at),
        "anthropic-ratelimit-unified-representative-claim": "five_hour",
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": f"{reset_in_s}s",
    }
    if usage_limit:
        openai = {
            "error": {
                "type": "usage_limit_reached",
                "message": "The usage limit has been reached",
                "plan_type": "plus",
                "resets_at": reset_at,
                "resets_in_seconds": reset_in_s,
            }
        }
    else:
        openai = {
            "error": {
                "message": f"Rate limit reached for requests. Please try again in {retry_after}s.",
                "type": "requests",
                "code": "rate_limit_exceeded",
                "param": None,
            }
        }
    return Turn(
        "error",
        status=429,
        headers=headers,
        error_bodies={
            "anthropic": {
                "type": "error",
                "error": {"type": "rate_limit_error", "message": "This request would exceed your rate limit."},
            },
            "openai": openai,
        },
    )


@dataclass
class Received:
    """One request as the stand-in received it; `json` is the parsed body (None when it is not JSON)."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any
    turn: Turn | None = None  # the scripted turn it was answered with, for model-turn requests
    refused: bool = False  # refused 401 for want of the API key
    route: str | None = None  # the marker of the route it took its turn from (None: the shared queue)

    @property
    def api(self) -> str:
        return "openai" if self.path.startswith("/v1/responses") else "anthropic"

    def tool_results(self) -> list[dict]:
        """The tool results this request hands back for the model's last turn: the `tool_result` blocks of
        Anthropic's last user message; the `function_call_output` / `custom_tool_call_output` items ending
        OpenAI's input (codex sends the whole history every time, earlier outputs included)."""
        body = self.json or {}
        if self.api == "openai":
            trailing = []
            for item in reversed(body.get("input", [])):
                if item.get("type") not in ("function_call_output", "custom_tool_call_output"):
                    break
                trailing.insert(0, item)
            return trailing
        messages = [m for m in body.get("messages", []) if m.get("role") == "user"]
        if not messages or isinstance(messages[-1].get("content"), str):
            return []
        return [b for b in messages[-1]["content"] if b.get("type") == "tool_result"]


class ModelAPI:
    """The stand-in server: `start()` binds 127.0.0.1 on a free port, `url` is its base URL (Claude's
    ANTHROPIC_BASE_URL; codex's provider `base_url` is `url + "/v1"`), `script()` queues turns,
    `requests` lists every request received, `turns` those that asked for a model turn."""

    def __init__(self, api_key: str | None = None) -> None:
        # With `api_key`, a model request that does not carry it (`x-api-key`, or `authorization: Bearer`
        # as OAuth tokens and OpenAI keys go) is refused 401 like the real APIs do, and takes no turn.
        self.api_key = api_key
        self._queue: list[Turn] = []
        self._routes: dict[str, list[Turn]] = {}  # marker -> its own queue, in the order routes were made
        self._lock = threading.Lock()
        self.requests: list[Received] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- the tests' side -------------------------------------------------------------------------------
    def start(self) -> ModelAPI:
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="model-api", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> ModelAPI:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        assert self._server, "the stand-in is not started"
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def script(self, *turns: Turn) -> None:
        """Queue turns; each model-turn request takes the next one, whichever API it came through."""
        with self._lock:
            self._queue.extend(turns)

    def route(self, marker: str, *turns: Turn) -> None:
        """Queue turns for the requests whose body contains `marker` (see the module docstring); calling it
        again with the same marker queues more."""
        assert marker, "an empty marker would match every request"
        with self._lock:
            self._routes.setdefault(marker, []).extend(turns)

    def routed(self, marker: str) -> list[Received]:
        """The model-turn requests that took their turn from `marker`'s queue, in order."""
        return [r for r in self.turns if r.route == marker]

    @property
    def pending(self) -> list[Turn]:
        with self._lock:
            return list(self._queue)

    @property
    def pending_routes(self) -> dict[str, list[Turn]]:
        """The turns each route has left, by marker (routes with none left included)."""
        with self._lock:
            return {marker: list(turns) for marker, turns in self._routes.items()}

    @property
    def turns(self) -> list[Received]:
        """The requests that asked for a model turn, in order."""
        with self._lock:
            return [r for r in self.requests if r.turn is not None]

    @property
    def unscripted(self) -> list[Received]:
        return [r for r in self.turns if r.turn.kind == "text" and r.turn.text == UNSCRIPTED]

    # -- the server's side -----------------------------------------------------------------------------
    def _record(self, received: Received) -> None:
        with self._lock:
            self.requests.append(received)

    def _authorized(self, received: Received) -> bool:
        if self.api_key is None:
            return True
        bearer = received.headers.get("authorization", "").removeprefix("Bearer ")
        return self.api_key in (received.headers.get("x-api-key"), bearer)

    def _next_turn(self, received: Received | None = None) -> Turn:
        with self._lock:
            if received is not None and self._routes:
                found = _strings(received.json)
                for marker, queue in self._routes.items():
                    if any(marker in s for s in found):
                        received.route = marker
                        return queue.pop(0) if queue else text(UNSCRIPTED)
            return self._queue.pop(0) if self._queue else text(UNSCRIPTED)


def _strings(value: Any) -> list[str]:
    """Every string inside a JSON value, keys included."""
    out: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            out.extend(k for k in item if isinstance(k, str))
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return out


def _handler_for(api: ModelAPI) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(_Handler):
        model_api = api

    return Handler


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, chunked event streams
    model_api: ModelAPI

    def log_message(self, format, *args):  # the base class's signature; the tests keep quiet
        pass

    def _receive(self) -> Received:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        return Received(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body, parsed)

    def do_GET(self):
        received = self._receive()
        self.model_api._record(received)
        path = self.path.split("?")[0]
        if path == "/v1/models":  # both APIs list models here; an empty list is a valid answer
            self._send_json(200, {"data": [], "object": "list", "has_more": False, "first_id": None, "last_id": None})
        else:
            self._send_json(404, {"type": "error", "error": {"type": "not_found_error", "message": path}})

    def do_HEAD(self):  # connectivity probes
        self._receive()
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_POST(self):
        received = self._receive()
        path = self.path.split("?")[0]
        if path == "/v1/messages/count_tokens":
            self.model_api._record(received)
            chars = len(received.body)
            self._send_json(200, {"input_tokens": max(1, chars // 4)})
        elif path in ("/v1/messages", "/v1/responses"):
            if not self.model_api._authorized(received):
                received.refused = True
                self.model_api._record(received)
                refusal = http_error(401, "invalid x-api-key" if received.api == "anthropic" else "Incorrect API key")
                self._send_json(401, refusal.error_bodies[received.api])
                return
            turn = self.model_api._next_turn(received)
            received.turn = turn
            self.model_api._record(received)
            if turn.delay_s:
                time.sleep(turn.delay_s)
            if turn.kind == "error":
                self._send_json(turn.status, turn.error_bodies[received.api], turn.headers)
            elif received.api == "openai":
                self._send_events(_responses_events(turn, received.json or {}), turn.headers)
            elif (received.json or {}).get("stream"):
                self._send_events(_messages_events(turn, received.json or {}), turn.headers)
            else:
                self._send_json(200, _message(turn, received.json or {}), turn.headers)
        else:
            self.model_api._record(received)
            self._send_json(404, {"type": "error", "error": {"type": "not_found_error", "message": path}})

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("request-id", f"req_{uuid.uuid4().hex[:24]}")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_events(self, events: list[tuple[str, dict]], headers: dict[str, str]) -> None:
        """Server-sent events, one chunk each (`event: NAME` / `data: JSON`), as the real APIs stream."""
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("request-id", f"req_{uuid.uuid4().hex[:24]}")
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        try:
            for name, data in events:
                chunk = f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the CLI hung up (killed, or gave up on the stream)


# -- the Anthropic Messages API ---------------------------------------------------------------------------
def _anthropic_usage(usage: Usage, output_tokens: int) -> dict:
    return {
        "input_tokens": usage.input_tokens,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cache_read_tokens,
        "output_tokens": output_tokens,
    }


def _anthropic_blocks(turn: Turn) -> list[dict]:
    blocks = [{"type": "text", "text": turn.text}] if turn.text else []
    if turn.kind == "tool":
        blocks.append(
            {
                "type": "tool_use",
                "id": f"toolu_{uuid.uuid4().hex[:24]}",
                "name": turn.tool_name,
                "input": turn.tool_input,
            }
        )
    return blocks


def _message(turn: Turn, request: dict) -> dict:
    """A whole (non-streamed) message."""
    return {
        "id": f"msg_{uuid.uuid4().hex[:24]}",
        "type": "message",
        "role": "assistant",
        "model": request.get("model", "claude"),
        "content": _anthropic_blocks(turn),
        "stop_reason": "tool_use" if turn.kind == "tool" else "end_turn",
        "stop_sequence": None,
        "usage": _anthropic_usage(turn.usage, turn.usage.output_tokens),
    }


def _messages_events(turn: Turn, request: dict) -> list[tuple[str, dict]]:
    """message_start, a content block per text or tool_use (tool input streamed as input_json_delta),
    message_delta with the stop reason and the output tokens, message_stop."""
    message = _message(turn, request)
    start = {**message, "content": [], "stop_reason": None, "usage": _anthropic_usage(turn.usage, 1)}
    events: list[tuple[str, dict]] = [("message_start", {"type": "message_start", "message": start})]
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            events.append(
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
                )
            )
            delta = {"type": "text_delta", "text": block["text"]}
        else:
            events.append(
                (
                    "content_block_start",
                    {"type": "content_block_start", "index": index, "content_block": {**block, "input": {}}},
                )
            )
            delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
        events.append(("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    events.append(
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
                "usage": _anthropic_usage(turn.usage, turn.usage.output_tokens),
            },
        )
    )
    events.append(("message_stop", {"type": "message_stop"}))
    return events


# -- the OpenAI Responses API -----------------------------------------------------------------------------
def _openai_items(turn: Turn) -> list[dict]:
    items = []
    if turn.text:
        items.append(
            {
                "type": "message",
                "id": f"msg_{uuid.uuid4().hex}",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": turn.text, "annotations": []}],
            }
        )
    if turn.kind == "tool":
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        if isinstance(turn.tool_input, str):
            items.append(
                {
                    "type": "custom_tool_call",
                    "id": f"ctc_{uuid.uuid4().hex}",
                    "status": "completed",
                    "call_id": call_id,
                    "name": turn.tool_name,
                    "input": turn.tool_input,
                }
            )
        else:
            items.append(
                {
                    "type": "function_call",
                    "id": f"fc_{uuid.uuid4().hex}",
                    "status": "completed",
                    "call_id": call_id,
                    "name": turn.tool_name,
                    "arguments": json.dumps(turn.tool_input),
                }
            )
    return items


def _responses_events(turn: Turn, request: dict) -> list[tuple[str, dict]]:
    """response.created, per output item output_item.added (text deltas for a message) and
    output_item.done, then response.completed with the usage."""
    response = {
        "id": f"resp_{uuid.uuid4().hex}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "in_progress",
        "model": request.get("model", "gpt"),
        "output": [],
        "usage": None,
        "error": None,
    }
    seq = iter(range(1_000_000))
    events: list[tuple[str, dict]] = [
        ("response.created", {"type": "response.created", "sequence_number": next(seq), "response": response}),
    ]
    items = _openai_items(turn)
    for index, item in enumerate(items):
        added = {**item, "status": "in_progress"}
        if item["type"] == "message":
            added["content"] = []
        elif item["type"] == "function_call":
            added["arguments"] = ""
        events.append(
            (
                "response.output_item.added",
                {
                    "type": "response.output_item.added",
                    "sequence_number": next(seq),
                    "output_index": index,
                    "item": added,
                },
            )
        )
        if item["type"] == "message":
            events.append(
                (
                    "response.output_text.delta",
                    {
                        "type": "response.output_text.delta",
                        "sequence_number": next(seq),
                        "item_id": item["id"],
                        "output_index": index,
                        "content_index": 0,
                        "delta": item["content"][0]["text"],
                    },
                )
            )
        events.append(
            (
                "response.output_item.done",
                {
                    "type": "response.output_item.done",
                    "sequence_number": next(seq),
                    "output_index": index,
                    "item": item,
                },
            )
        )
    u = turn.usage
    usage = {
        "input_tokens": u.input_tokens,
        "input_tokens_details": {"cached_tokens": u.cache_read_tokens, "cache_write_tokens": u.cache_write_tokens},
        "output_tokens": u.output_tokens,
        "output_tokens_details": {"reasoning_tokens": u.reasoning_tokens},
        "total_tokens": u.input_tokens + u.output_tokens,
    }
    completed = {**response, "status": "completed", "output": items, "usage": usage}
    events.append(
        ("response.completed", {"type": "response.completed", "sequence_number": next(seq), "response": completed})
    )
    return events
