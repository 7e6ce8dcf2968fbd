#!/usr/bin/env python3
"""cp-agent: the agent daemon of the control plane.

It registers with the server using an enrollment token, long-polls for tasks, runs each one in a fresh
working directory and its own process group with one of its executors (shell, simulated, claude, codex),
streams progress and output, uploads the files a task leaves in ``out/`` and reports the outcome. The HTTP
contract it speaks is the "Agent endpoints" part of the control plane's PROTOCOL.md.

It is stdlib-only: it uses the Python standard library (3.10+) and imports nothing from Django or the
rest of the repository, on purpose. Agents run on build hosts and workstations where the server's
dependencies are not installed, so the daemon must work as one file copied anywhere and started with a bare
``python3``, without pip or a virtualenv. tests/agents_app/test_cp_agent_unit.py asserts this.

    python3 cp_agent.py --server https://cp.example.com --name cg-1 --labels linux,cg   # CP_ENROLLMENT_TOKEN set
    python3 cp_agent.py --check --server https://cp-1.example.com,https://cp-2.example.com

--server (or CP_SERVER) takes one URL or several, comma-separated: server processes behind one database,
which know the same agents and tokens. The daemon uses one until it is unreachable (connection refused or
reset, a timeout, HTTP 502/503/504), then moves to the next with the same jittered backoff, cutting short a
long poll parked on the failed one, and stays on one that works. Its identity in the state file serves any
list that shares a URL with the one it was saved with.

Over https it verifies each server's certificate against the system's CAs or --ca-file; plain http is
refused to any host but loopback unless --insecure, because every call carries a bearer token. At start
and when the server asks, it checks its executors (the pre-flight) and is offered tasks only for those that
passed. A revoked or replaced identity stops it; --re-enroll registers again and rotates its token.

A task's processes do not outlive the daemon. The task runs under a supervisor, this file's supervisor part
started as ``python3 -I -S -c PART --supervise FD -- ARGV`` (see part_program), which leads the task's session
and process group and holds one end of a socket pair whose other end only the daemon holds: when the daemon
dies, by SIGKILL too, the socket reaches EOF and the supervisor kills the group (SIGTERM, then SIGKILL after
ORPHAN_GRACE_S). Each running group is also recorded in NAME.state.tasks/ beside the state file, and a daemon
starting again stops what its previous life left there (when the supervisor was killed too), once /proc shows
the group is still that task's and not a recycled pid's.

A task of a run with a workspace (PROTOCOL.md v1.1) runs in a git worktree: one bare cache clone per
repository under WORK_DIR/git, worktree slots of it used again from task to task, at the run's base commit
with the dependencies' commits merged in; afterwards every change is committed as the agent and pushed to
the task's branch. git uses the host's own credentials and never prompts. `git` is offered as an executor
whenever pre-flight finds it: the server gives workspace tasks only to agents with it.

Claude Code's permission prompts reach a person (PROTOCOL.md v1.1 "Input requests"): claude -p is started with
--permission-prompt-tool naming the tool of an MCP stdio server that is this file's relay part, ``python3 -I
-S -c PART --mcp-permissions SOCKET``. claude starts it in the task's environment, so it holds no secret: it
relays each prompt over the attempt's Unix socket (0600, in the work dir, outside the worktree) to the daemon,
which asks the server with its agent token, long-polls for the answer and sends back allow or deny
(params.on_permission, params.input_timeout_s).

Started again with its saved identity, it heartbeats at once, listing no attempts, so the server can let go
of the attempts of its previous life at once rather than when their leases run out.

SIGTERM or SIGINT drains (a second one cancels running tasks); once drained it says goodbye, one short try,
so the server counts it offline at once. A succeeded attempt's folder is removed once reported; a failed
one's stays for --keep-failed hours (--keep-task-folders keeps them all).

Exit status: 0 after a clean stop, 1 when the agent cannot go on (or --check failed), 2 for bad options.
"""

from __future__ import annotations

import abc
import argparse
import codecs
import contextlib
import fcntl
import hashlib
import http.client
import ipaddress
import json
import logging
import os
import random
import re
import select
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

VERSION = "1.2.0"
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
# The server has its own list (tasks_app.dag.EXECUTORS, plus its `git` result task and without its `approval`,
# which no agent runs); this file imports nothing of the server, so tests/agents_app/test_executor_names.py
# ties the two.
KNOWN_EXECUTORS = ("shell", "simulated", "claude", "codex", "git")
DEFAULT_TIMINGS = {"heartbeat_interval_s": 10.0, "lease_s": 60.0, "max_wait_s": 30.0}
LOG_CHUNK_BYTES = 64 * 1024  # the server's limit for the "log" of one progress call
STDOUT_TAIL_BYTES = 4 * 1024
OUTPUT_KEEP_BYTES = 512 * 1024  # of a CLI's stdout, for the result (which the server caps at 1 MiB)
RESULT_MAX_BYTES = 1024 * 1024
ARTIFACT_MAX_BYTES = 100 * 1024 * 1024  # read into memory to upload; bigger files are skipped
MESSAGE_MAX_CHARS = 1000
PROGRESS_MIN_GAP_S = 0.5  # at most two progress calls a second per task
KILL_GRACE_S = 10.0  # between SIGTERM and SIGKILL of a task's process group
GIT_NETWORK_TIMEOUT_S = 300.0  # one fetch or push; a repository that answers slower fails the attempt
GIT_LOCAL_TIMEOUT_S = 120.0  # worktree, merge, commit: local work, bounded all the same
DIFF_MAX_BYTES = 10 * 1024 * 1024  # of a task's patch, uploaded for the dashboard
KEEP_FAILED_HOURS = 24.0
GOODBYE_TIMEOUT_S = 3.0  # the goodbye at a clean stop is one try this long: it never holds up an exit
# A task's environment is an allow-list, never the daemon's whole environment (its CP_* variables hold the
# enrollment token and the server's address). These pass when set; --pass-env adds names.
TASK_ENV_BASE = ("PATH", "HOME", "LANG", "LANGUAGE", "LC_ALL", "LC_CTYPE", "TERM", "TZ", "USER", "LOGNAME",
                 "SHELL", "TMPDIR")  # fmt: skip
TASK_ENV_PROVIDERS = ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL", "CLAUDE_CODE_OAUTH_TOKEN",
                      "CLAUDE_CONFIG_DIR", "CLAUDE_CODE_USE_BEDROCK", "CLAUDE_CODE_USE_VERTEX", "AWS_REGION",
                      "AWS_PROFILE", "CLOUD_ML_REGION", "ANTHROPIC_VERTEX_PROJECT_ID", "OPENAI_API_KEY",
                      "OPENAI_BASE_URL", "OPENAI_ORG_ID", "CODEX_HOME",
                      # Claude Code's own switches (no auto-update, telemetry, error reports; its retries)
                      "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "DISABLE_AUTOUPDATER", "DISABLE_TELEMETRY",
                      "DISABLE_ERROR_REPORTING", "CLAUDE_CODE_MAX_RETRIES")  # fmt: skip
ENV_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
ORPHAN_GRACE_S = 2.0  # the same, when a supervisor stops a task whose daemon died (or a daemon its leftovers)
SUPERVISOR_START_S = 30.0  # how long the daemon waits for a task's supervisor to say it started the task
SUPERVISE_FLAG = "--supervise"  # argv[1] of a task's supervisor: this file, run by the daemon
AGENT_FILE = os.path.abspath(__file__)
REQUEST_TIMEOUT_S = 30.0
CLAIM_TIMEOUT_MARGIN_S = 15.0  # the claim's HTTP timeout is wait_s plus this
TASK_CALL_PATIENCE_S = 120.0  # progress/artifacts/complete retry this long, then give up
NAME_TAKEN_PATIENCE_S = 60.0  # > 3 heartbeats: how long a crashed predecessor with our name stays online
PROGRESS_LINE_RE = re.compile(r"CP_PROGRESS\s+([0-9]*\.?[0-9]+)[ \t]*(.*)")
# Claude Code's permission prompts, answered by a person (PROTOCOL.md v1.1 "Input requests"): claude runs this
# file as an MCP stdio server (argv[1] MCP_FLAG) whose one tool relays each prompt to the daemon over a Unix
# socket; the daemon asks the server and long-polls for the answer.
MCP_FLAG = "--mcp-permissions"
MCP_SERVER_NAME = "cp_agent"
MCP_TOOL_NAME = "permission_prompt"
PROMPT_TOOL = f"mcp__{MCP_SERVER_NAME}__{MCP_TOOL_NAME}"  # what --permission-prompt-tool names
MCP_PROTOCOL_VERSION = "2025-06-18"  # answered to a client that asks for none
ON_PERMISSION = ("ask", "deny")
INPUT_TIMEOUT_DEFAULT_S = 3600.0
INPUT_TIMEOUT_MAX_S = 7 * 86400.0  # the server's limit
INPUT_WAIT_S = 25.0  # one long poll for the answer (at most the server's max_wait_s)
INPUT_BODY_MAX_BYTES = 200 * 1024  # of the tool input shown to the person (the server takes 256 KiB)
# 401 codes that mean this identity is gone for good: registering again would undo an operator's revocation
# or fight the newer registration of our name, so the agent stops instead (an unknown token re-registers).
IDENTITY_GONE = {
    "agent_revoked": "the server revoked this agent's token",
    "agent_replaced": "a newer registration of this agent's name replaced this identity",
}

log = logging.getLogger("cp_agent")


class ConfigError(Exception):
    """Bad options or environment; the daemon exits with status 2."""


class FatalError(Exception):
    """The agent cannot go on (enrollment refused, identity lost, TLS broken); it exits with status 1."""


class TransientError(Exception):
    """A failure worth retrying: network trouble, a timeout, HTTP 5xx or 429."""


class ServerUnreachable(TransientError):
    """The server at `index` of the list did not answer (refused, reset, timed out) or cannot serve (502, 503,
    504): the next server of the list may."""

    def __init__(self, message: str, index: int):
        super().__init__(message)
        self.index = index


class ApiError(Exception):
    """A definitive answer (a 4xx other than 429): retrying would not change it."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(f"HTTP {status} {code}: {detail}")
        self.status, self.code, self.detail = status, code, detail


class TaskError(Exception):
    """The task document cannot be run as given (no command, bad timeout...); the attempt fails."""


_PROGRAMS: dict[str, str] = {}


def part_program(part: str, imports: str, constants: Iterable[str], entry: str) -> str:
    """The source of a small program made of one part of this file: the lines between `# ==== PART: a program
    of its own` and `# ==== end of PART`, after `imports` (statements) and the values of the `constants` named, then
    `entry`. The daemon starts a supervisor for every task, and claude an MCP relay for every claude task: run
    as this whole file, each would cost ~170 ms of CPU to compile and import it; its part alone costs ~40 ms.
    So a part uses only what its program gives it (tests/agents_app/test_cp_agent_unit.py checks each with
    ruff and runs it). The file is read once: a daemon whose file is replaced while it runs goes on with the
    parts it started with."""
    if part not in _PROGRAMS:
        text = Path(AGENT_FILE).read_text(encoding="utf-8")
        begin, end = f"\n# ==== {part}: a program of its own (see part_program)\n", f"\n# ==== end of {part}\n"
        body = text[text.index(begin) + len(begin) : text.index(end)].strip("\n")
        values = "".join(f"{name} = {globals()[name]!r}\n" for name in constants)
        _PROGRAMS[part] = (f"# cp-agent's {part} (agents_app/cp_agent.py)\nfrom __future__ import annotations\n"
                           f"{imports}\n{values}\n\n{body}\n\n\n{entry}\n")  # fmt: skip
    return _PROGRAMS[part]


def safe_name(text: str) -> str:
    """`text` reduced to the protocol's name alphabet, so it can never escape a directory."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)[:64] or "task"


def tail_utf8(text: str, limit: int, note: bool = True) -> str:
    """The end of `text` that fits in `limit` UTF-8 bytes, optionally led by a note of how much was cut."""
    data = text.encode("utf-8", "replace")
    if len(data) <= limit:
        return text
    keep = limit - 80 if note else limit  # 80 bytes is room for the note
    head = f"[cp-agent: {len(data) - keep} bytes of earlier output dropped]\n" if note else ""
    return head + data[-keep:].decode("utf-8", "ignore")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def validate_server_url(url: str, insecure: bool) -> str:
    """The server URL without a trailing slash; plain http is refused off loopback unless `insecure`,
    because every call carries a bearer token."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"--server must be an http(s):// URL, got {url!r}")
    if parts.scheme == "http" and not insecure and not is_loopback(parts.hostname):
        raise ConfigError(
            f"refusing plain http:// to {parts.hostname}: tokens would cross the network in clear text; "
            "use https:// or pass --insecure"
        )
    return url.rstrip("/")


def parse_server_list(text: str, insecure: bool) -> list[str]:
    """The comma-separated server URLs of --server / CP_SERVER, each checked by validate_server_url, in order
    and without repeats."""
    urls = [validate_server_url(url.strip(), insecure) for url in text.split(",") if url.strip()]
    return list(dict.fromkeys(urls))


def default_agent_name() -> str:
    host = safe_name(socket.gethostname().split(".")[0]) or "agent"
    suffix = f"-{os.getpid()}"
    return host[: 64 - len(suffix)] + suffix


# --------------------------------------------------------------------------------------------- config


@dataclass
class Config:
    servers: list[str]  # server processes behind one database, tried in this order
    enrollment_token: str
    name: str
    labels: list[str]
    executors: list[str]
    capacity: int
    work_dir: Path
    state_file: Path
    time_scale: float = 1.0
    wait_s: float | None = None
    ca_file: str | None = None
    insecure: bool = False
    re_enroll: bool = False
    check: bool = False
    once: bool = False
    log_level: str = "INFO"
    keep_failed_hours: float = KEEP_FAILED_HOURS
    keep_task_folders: bool = False
    pass_env: list[str] = field(default_factory=list)  # more variables a task gets (TASK_ENV_BASE and _PROVIDERS pass)
    sandboxed_host: bool = False
    claude_config_dir: str | None = None  # this agent's own CLAUDE_CONFIG_DIR (several agents on one host)
    codex_home: str | None = None  # this agent's own CODEX_HOME

    @classmethod
    def from_argv(cls, argv: list[str] | None = None, environ: dict[str, str] | None = None) -> Config:
        environ = dict(os.environ if environ is None else environ)
        args = build_parser(environ).parse_args(argv)
        name = args.name or default_agent_name()
        if not NAME_RE.fullmatch(name):
            raise ConfigError(f"--name must be 1-64 of [A-Za-z0-9._-], got {name!r}")
        labels = [label.strip() for label in args.labels.split(",") if label.strip()]
        bad = [label for label in labels if not NAME_RE.fullmatch(label)]
        if bad or len(labels) > 32:
            raise ConfigError(f"--labels takes at most 32 names of [A-Za-z0-9._-]; bad: {bad or labels}")
        if args.executors:
            executors = list(dict.fromkeys(e.strip() for e in args.executors.split(",") if e.strip()))
            unknown = sorted(set(executors) - set(KNOWN_EXECUTORS))
            if unknown or not executors:
                raise ConfigError(f"--executors takes some of {', '.join(KNOWN_EXECUTORS)}; unknown: {unknown}")
        else:
            executors = default_executor_names(environ)
        if "git" not in executors:
            # Not a choice but a capability: a workspace task needs git, and pre-flight says whether it is here.
            executors.append("git")
        if not 1 <= args.capacity <= 64:
            raise ConfigError("--capacity must be 1-64")
        if args.time_scale < 0 or (args.wait_s is not None and args.wait_s < 0):
            raise ConfigError("--time-scale and --wait-s must not be negative")
        values = vars(args)
        values["pass_env"] = parse_pass_env(values.pop("pass_env"))
        servers = parse_server_list(values.pop("server"), args.insecure)
        if not servers and not args.check:
            raise ConfigError("--server (or CP_SERVER) is required")
        if args.ca_file:
            tls_context(args.ca_file)  # an unreadable or malformed bundle is a bad option, said now
        work_dir = Path(args.work_dir).absolute()  # tasks get CP_OUT_DIR and may change directory
        state_file = Path(args.state_file) if args.state_file else work_dir / f"{name}.state.json"
        return cls(
            **{
                **values,
                "servers": servers,
                "name": name,
                "labels": labels,
                "executors": executors,
                "work_dir": work_dir,
                "state_file": state_file,
            }
        )


def parse_pass_env(text: str) -> list[str]:
    """--pass-env's names. The daemon's own CP_* variables are its secrets and its wiring: refused."""
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if not ENV_NAME_RE.fullmatch(n)]
    if bad:
        raise ConfigError(f"--pass-env takes environment variable names; bad: {bad}")
    ours = [n for n in names if n.upper().startswith("CP_")]
    if ours:
        raise ConfigError(f"--pass-env may not pass the daemon's own CP_* variables to tasks: {ours}")
    return names


def task_environ(environ: Mapping[str, str], extra: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """What of the daemon's environment a task gets: the allow-list (TASK_ENV_BASE, TASK_ENV_PROVIDERS and
    `extra`), those of them that are set. Nothing else, and no CP_* variable whatever `extra` says."""
    names = (*TASK_ENV_BASE, *TASK_ENV_PROVIDERS, *extra)
    return {n: environ[n] for n in names if n in environ and not n.upper().startswith("CP_")}


def build_parser(environ: dict[str, str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cp_agent.py", description="Agent daemon of the control plane (stdlib-only Python 3.10+)."
    )
    p.add_argument(
        "--server",
        default=environ.get("CP_SERVER", ""),
        help="control plane URL, or several comma-separated (server processes behind one database, used in "
        "turn when one is unreachable) [CP_SERVER]",
    )
    p.add_argument(
        "--enrollment-token",
        default=environ.get("CP_ENROLLMENT_TOKEN", ""),
        help="used to register; prefer the env var, argv is visible to other users [CP_ENROLLMENT_TOKEN]",
    )
    p.add_argument(
        "--name",
        help="agent name, 1-64 of [A-Za-z0-9._-] (default: HOST-PID; set one to keep "
        "the same identity across restarts)",
    )
    p.add_argument("--labels", default="", help="comma-separated labels, e.g. linux,cg")
    p.add_argument(
        "--executors",
        default="",
        help="comma-separated subset of shell,simulated,claude,codex "
        "(default: shell,simulated plus claude/codex when found on PATH; git is always added, for "
        "workspace tasks, when pre-flight finds it)",
    )
    p.add_argument("--capacity", type=int, default=1, help="tasks run at once (1-64)")
    p.add_argument("--work-dir", default="./cp-agent-work", help="where task directories and state live")
    p.add_argument("--state-file", help="identity file (default: WORK_DIR/NAME.state.json)")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiplies simulated durations (demo: 0.01)")
    p.add_argument("--wait-s", type=float, help="long-poll wait (default: the server's max_wait_s)")
    p.add_argument("--ca-file", help="CA bundle to verify the server's certificate with")
    p.add_argument("--insecure", action="store_true", help="allow plain http:// to a non-loopback host")
    p.add_argument(
        "--re-enroll",
        action="store_true",
        help="register again with the enrollment token even when an identity is saved (rotates the agent token)",
    )
    p.add_argument(
        "--keep-failed", type=float, default=KEEP_FAILED_HOURS, dest="keep_failed_hours", metavar="HOURS",
        help="keep a failed attempt's folder (and its git worktree) this long (0: remove at once)",
    )  # fmt: skip
    p.add_argument(
        "--keep-task-folders", action="store_true",
        help="keep every attempt's folder under WORK_DIR (default: a succeeded attempt's is removed once it is "
        "reported, a failed one's after --keep-failed hours)",
    )  # fmt: skip
    p.add_argument(
        "--pass-env", default=environ.get("CP_PASS_ENV", ""), metavar="NAMES",
        help="comma-separated environment variables tasks get besides PATH, HOME, LANG, TERM and the like and "
        "the AI providers' key variables; never CP_* [CP_PASS_ENV]",
    )  # fmt: skip
    p.add_argument(
        "--claude-config-dir", metavar="DIR",
        help="CLAUDE_CONFIG_DIR for this agent's claude tasks: agents sharing a host each need their own (parallel "
        "claude processes sharing ~/.claude.json corrupt it)",
    )  # fmt: skip
    p.add_argument("--codex-home", metavar="DIR", help="CODEX_HOME for this agent's codex tasks")
    p.add_argument(
        "--sandboxed-host", action="store_true",
        help="this host is a throwaway VM or container: claude tasks may use permission_mode bypassPermissions "
        "even as root (IS_SANDBOX=1 in their environment)",
    )  # fmt: skip
    p.add_argument("--check", action="store_true", help="pre-flight: report executors and server, then exit")
    p.add_argument("--once", action="store_true", help="exit after the first task finishes")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


# --------------------------------------------------------------------------------------------- HTTP


def tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Certificate and host name verification against the system's CAs, or only those of `ca_file` (a
    private CA); ConfigError when the bundle cannot be read."""
    try:
        return ssl.create_default_context(cafile=ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"--ca-file {ca_file}: cannot load CA certificates: {exc}") from exc


class Backoff:
    """Full-jitter exponential backoff, 0.2 s doubling to a 10 s cap: a fleet reconnecting after an outage
    spreads out instead of hitting the server in lockstep."""

    def __init__(self, base: float = 0.2, cap: float = 10.0):
        self.base, self.cap, self.attempt = base, cap, 0

    def next_delay(self) -> float:
        ceiling = min(self.cap, self.base * 2**self.attempt)
        self.attempt = min(self.attempt + 1, 30)
        return random.uniform(0, ceiling)


def _json_object(raw: bytes) -> dict:
    try:
        data = json.loads(raw.decode("utf-8"))
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


class ApiClient:
    """The agent's HTTP: JSON over one connection per request (a long poll holds its connection anyway),
    retries with backoff, and a way to cut a held long poll short.

    It knows a list of server processes behind one database (same agents, same tokens) and uses one at a
    time: when it is unreachable (connection refused or reset, a timeout, 502/503/504 from a proxy in front
    of it) the client moves to the next of the list, for every thread at once, and stays there while it
    works."""

    def __init__(self, servers: str | list[str], ca_file: str | None = None):
        self.servers = [servers] if isinstance(servers, str) else list(servers)
        self._ends: list[tuple[bool, str, int | None, str]] = []  # (https, host, port, path prefix) of each server
        for url in self.servers:
            parts = urllib.parse.urlsplit(url)
            # `or ""` for the type only: validate_server_url has refused a URL without a host.
            self._ends.append((parts.scheme == "https", parts.hostname or "", parts.port, parts.path.rstrip("/")))
        self._ssl = tls_context(ca_file) if any(end[0] for end in self._ends) else None
        self._current = 0  # index of the server in use
        self._abortable: dict[http.client.HTTPConnection, int] = {}  # held long polls -> their server's index
        self._aborted: set[http.client.HTTPConnection] = set()
        self._lock = threading.Lock()

    @property
    def server(self) -> str:
        """The URL in use."""
        return self.servers[self._current]

    def _exchange(
        self,
        index: int,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
        timeout: float,
        abort_on: threading.Event | None = None,
    ) -> tuple[int, bytes]:
        """One request to server `index`; ServerUnreachable when it does not answer."""
        https, host, port, prefix = self._ends[index]
        server = self.servers[index]
        if https:
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                host, port, timeout=timeout, context=self._ssl
            )
        else:
            conn = http.client.HTTPConnection(host, port, timeout=timeout)
        try:
            conn.connect()
            if abort_on is not None:
                with self._lock:
                    self._abortable[conn] = index
                # Checked after registering: either abort_pending() sees this socket or we see the flag.
                if abort_on.is_set():
                    raise TransientError(f"{method} {path}: aborted")
            conn.request(method, prefix + path, body=body, headers=headers)
            response = conn.getresponse()
            return response.status, response.read()
        except ssl.SSLCertVerificationError as exc:
            raise FatalError(
                f"TLS verification of {server} failed: {exc.verify_message or exc}; the agent trusts the "
                "system's CAs, or only those of --ca-file"
            ) from exc
        except ssl.SSLError as exc:
            if exc.reason in ("WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG"):
                # Retrying cannot help: the port does not speak TLS (a plain-HTTP server behind https://).
                raise FatalError(f"{server} does not speak TLS ({exc.reason}); is it an http:// server?") from exc
            raise self._failure(conn, index, f"{method} {path}: TLS error {exc}") from exc
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise self._failure(conn, index, f"{method} {path}: {exc or type(exc).__name__}") from exc
        finally:
            with self._lock:
                self._abortable.pop(conn, None)
                self._aborted.discard(conn)
            conn.close()

    def _failure(self, conn: http.client.HTTPConnection, index: int, message: str) -> TransientError:
        with self._lock:
            if conn in self._aborted:  # we cut it short ourselves: says nothing about the server
                return TransientError(f"{message} (aborted)")
        return ServerUnreachable(f"{self.servers[index]}: {message}", index)

    def abort_pending(self, index: int | None = None) -> None:
        """Cut held long polls short (only those on server `index` if given): shutting the socket down makes
        the blocked read return now instead of after up to max_wait_s. An assignment the server sent in
        that instant is lost until its lease expires; that rare retry is the price of stopping promptly."""
        with self._lock:
            for conn, on in list(self._abortable.items()):
                if conn.sock is not None and index in (None, on):
                    self._aborted.add(conn)
                    with contextlib.suppress(OSError):
                        socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)  # below TLS, on the raw fd

    def _fail_over(self, index: int, why: Exception) -> None:
        """Move on from server `index` to the next of the list, unless another thread did already. A long
        poll parked on the failed server is cut short, to be retried on the next one now rather than when
        its own socket gives up."""
        if len(self.servers) == 1:
            return
        with self._lock:
            if self._current != index:
                return
            self._current = (index + 1) % len(self.servers)
            log.warning("%s; switching to %s", why, self.servers[self._current])
        self.abort_pending(index)

    def health(self, index: int = 0, timeout: float = 10.0) -> tuple[int, dict]:
        """GET /api/v1/health of server `index` (no failover: --check reports each server)."""
        status, raw = self._exchange(index, "GET", "/api/v1/health", None, {"Accept": "application/json"}, timeout)
        return status, _json_object(raw)

    def request(
        self,
        path: str,
        payload: Any = None,
        *,
        token: str,
        body: bytes | None = None,
        content_type: str = "application/json",
        timeout: float = REQUEST_TIMEOUT_S,
        abort_on: threading.Event | None = None,
    ) -> dict:
        """POST /api/v1<path> once to the server in use and return the JSON answer; raises TransientError
        (ServerUnreachable, after moving to the next server) or ApiError."""
        if body is None:
            body = json.dumps({} if payload is None else payload).encode()
        headers = {
            "Authorization": f"Bearer {token}",
            "Content-Type": content_type,
            "Accept": "application/json",
            "User-Agent": f"cp-agent/{VERSION}",
        }
        index = self._current
        try:
            status, raw = self._exchange(index, "POST", "/api/v1" + path, body, headers, timeout, abort_on)
            data = _json_object(raw)
            if status in (502, 503, 504):  # a proxy whose upstream is down, or a server that cannot serve now
                raise ServerUnreachable(f"{self.servers[index]}: POST {path}: HTTP {status}", index)
        except ServerUnreachable as exc:
            self._fail_over(index, exc)
            raise
        if status == 429 or status >= 500:
            raise TransientError(f"POST {path}: HTTP {status} {data.get('error', '')}".rstrip())
        if status >= 400:
            detail = str(data.get("detail") or raw[:200].decode("utf-8", "replace"))
            raise ApiError(status, str(data.get("error") or f"http_{status}"), detail)
        return data

    def call(
        self,
        path: str,
        payload: Any = None,
        *,
        token: str,
        stop: threading.Event,
        patience: float | None = None,
        **kwargs: Any,
    ) -> dict:
        """request(), retrying TransientError with backoff until `patience` seconds have passed (None:
        forever) or `stop` is set; then the last TransientError is raised. A retry after a server proved
        unreachable goes to the next one."""
        deadline = None if patience is None else time.monotonic() + patience
        backoff = Backoff()
        while True:
            try:
                return self.request(path, payload, token=token, **kwargs)
            except TransientError as exc:
                delay = backoff.next_delay()
                if stop.is_set() or (deadline is not None and time.monotonic() + delay > deadline):
                    raise
                log.warning("%s; retrying in %.1f s", exc, delay)
                if stop.wait(delay):
                    raise


def encode_artifact(name: str, data: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body (RFC 7578) holding the file as field `file` and its relative path as field
    `name` (Django's parser keeps only the basename of a filename), and its Content-Type."""
    boundary = f"cp-agent-{uuid.uuid4().hex}"
    quoted = name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")  # as browsers quote filenames
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{quoted}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    )
    return head.encode() + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class StateFile:
    """The agent's identity on disk: {agent_id, token, name, servers} plus the server's timings. Only its
    owner may read it, because the token is a credential."""

    def __init__(self, path: Path):
        self.path = path

    def load(self, servers: list[str], name: str) -> dict | None:
        """The identity saved for agent `name` of the server processes `servers`: every process behind one
        database knows the same identities, so a saved identity belongs to any list sharing a URL with
        the one it was saved with (an old file names its one "server")."""
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable state file %s: %s", self.path, exc)
            return None
        if not isinstance(data, dict) or not isinstance(data.get("token"), str) or data.get("name") != name:
            return None
        saved = data.get("servers")
        saved = saved if isinstance(saved, list) else [data.get("server")]
        return data if set(saved) & set(servers) else None

    def save(self, data: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), 0o600)  # a left-over tmp file keeps its old mode through O_CREAT
            json.dump(data, fh, indent=2)
        os.replace(tmp, self.path)  # readers never see half a file


# --------------------------------------------------------------------------------------------- executors


@dataclass
class ExecResult:
    """An executor's report: the result document, the exit code (None without a process) and an error
    sentence, empty when the task succeeded."""

    result: dict
    exit_code: int | None = None
    error: str = ""
    outcome: str = ""  # "" is succeeded or failed by `error`; "rate_limited" (PROTOCOL.md v1.1)
    extra: dict = field(default_factory=dict)  # more fields of complete: usage, session_id, resets_at...


@dataclass
class ExecutorCheck:
    usable: bool
    detail: str
    version: str | None = None


@dataclass
class TaskContext:
    """What an executor may use of its attempt. `report` and `log` feed the progress stream; they never
    block on the network."""

    task: dict
    attempt_id: str
    work_dir: Path
    report: Callable[..., None]  # (progress: float | None, message: str | None)
    log: Callable[[str], None]
    agent_name: str = "cp-agent"
    time_scale: float = 1.0
    canceled: threading.Event = field(default_factory=threading.Event)
    records: LiveTasks | None = None  # where the task's process group is recorded while it runs
    worktree: Path | None = None  # a workspace task's git worktree: its processes run there
    pass_env: list[str] = field(default_factory=list)  # --pass-env: variables the task gets besides the usual
    report_usage: Callable[[dict], None] = lambda _usage: None  # an AI CLI's usage so far, sent with progress
    sandboxed_host: bool = False  # --sandboxed-host: a throwaway machine, where root may bypass permissions
    extra_env: dict[str, str] = field(default_factory=dict)  # what the executor adds to the task's environment
    # Asks a person whether the AI CLI may use a tool and blocks for the answer ({"behavior": "allow"|"deny",
    # "message"}): the TaskRun's, which holds the agent token; None where nobody can be asked.
    ask_person: Callable[[dict, Callable[[], bool]], dict] | None = None
    relay: PermissionRelay | None = None  # the attempt's permission socket while claude runs

    @property
    def cwd(self) -> Path:
        return self.worktree or self.work_dir

    @property
    def inputs_dir(self) -> Path:
        return self.work_dir / "inputs"

    @property
    def out_dir(self) -> Path:
        return self.work_dir / "out"

    @property
    def key(self) -> str:
        return str(self.task.get("key") or "task")

    @property
    def params(self) -> dict:
        params = self.task.get("params")
        return params if isinstance(params, dict) else {}

    def env(self) -> dict[str, str]:
        env = task_environ(os.environ, self.pass_env)
        env.update(
            CP_TASK_ID=str(self.task.get("id") or ""),
            CP_TASK_KEY=self.key,
            CP_RUN_ID=str(self.task.get("run_id") or ""),
            CP_ATTEMPT_ID=self.attempt_id,
            CP_OUT_DIR=str(self.out_dir),
            CP_INPUTS_DIR=str(self.inputs_dir),
            CP_WORK_DIR=str(self.cwd),
        )
        if self.sandboxed_host:
            env["IS_SANDBOX"] = "1"  # Claude Code's word for it: bypassPermissions is then allowed as root
        env.update(self.extra_env)
        return env


class Executor(abc.ABC):
    name = ""

    def __init__(self, environ: dict[str, str] | None = None):
        # Where executors that need a program look for it (tests pass their own PATH).
        self.environ = dict(os.environ if environ is None else environ)

    @abc.abstractmethod
    def check(self) -> ExecutorCheck:
        """Whether this executor can run tasks on this host, and its version when it has one."""

    @abc.abstractmethod
    def run(self, ctx: TaskContext) -> ExecResult:
        """Run the task to its end; return promptly once ctx.canceled is set."""


class SimulatedExecutor(Executor):
    """Pretends to work for params.duration_s x time scale, reporting params.steps progress updates, and
    leaves a result file: the seed system's simulated execution, for demos and tests without AI calls."""

    name = "simulated"

    def check(self) -> ExecutorCheck:
        return ExecutorCheck(True, "built in")

    def run(self, ctx: TaskContext) -> ExecResult:
        duration, steps = ctx.params.get("duration_s", 1.0), ctx.params.get("steps", 10)
        if isinstance(duration, bool) or not isinstance(duration, (int, float)) or duration < 0:
            return ExecResult({}, None, "params.duration_s must be a number >= 0")
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= 10_000:
            return ExecResult({}, None, "params.steps must be an integer 1-10000")
        fail = ctx.params.get("fail") is True
        for step in range(1, steps + 1):
            if ctx.canceled.wait(duration * ctx.time_scale / steps):  # an Event wait: cancel is prompt
                return ExecResult({"simulated": True, "steps_done": step - 1}, None, "canceled")
            ctx.report(step / steps, f"step {step}/{steps}")
            ctx.log(f"simulated step {step}/{steps}\n")
        result = {
            "task": ctx.key,
            "title": ctx.task.get("title") or "",
            "agent": ctx.agent_name,
            "simulated": True,
            "duration_s": duration,
            "time_scale": ctx.time_scale,
            "steps": steps,
            "outcome": "failed" if fail else "succeeded",
        }
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        (ctx.out_dir / f"{safe_name(ctx.key)}_result.json").write_text(json.dumps(result, indent=2) + "\n")
        return ExecResult(result, 1 if fail else 0, "simulated failure" if fail else "")


@dataclass
class ProcessOutcome:
    returncode: int
    stdout: str
    timed_out: bool = False
    canceled: bool = False
    stderr_tail: str = ""  # the last lines the program wrote to stderr: its own words when it fails
    stopped: str = ""  # why the daemon stopped it early (a `watch` reason: budget, stall)


def progress_lines(ctx: TaskContext) -> Callable[[str], None]:
    """The default handler of a task's stdout lines: CP_PROGRESS FRACTION [MESSAGE] reports progress."""

    def handle(line: str) -> None:
        match = PROGRESS_LINE_RE.fullmatch(line)
        if match:
            ctx.report(min(1.0, float(match.group(1))), match.group(2).strip() or None)

    return handle


def _pump_output(
    stream: Any,
    ctx: TaskContext,
    keep: bytearray | None = None,
    on_line: Callable[[str], None] | None = None,
    log_raw: bool = True,
    line_limit: int = 4096,
) -> None:
    """Copy one pipe of the task into its log (unless `log_raw` is off: the handler logs what it makes of
    the lines) until EOF, keeping the tail of the raw bytes in `keep`, and hand each line to `on_line`.
    Lines longer than `line_limit` are cut (a CLI's JSON event may be long; a newline-free flood is not
    hoarded)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    partial = ""
    while chunk := stream.read1(65536):  # read1: stream what is there, do not wait for a full buffer
        text = decoder.decode(chunk)
        if log_raw:
            ctx.log(text)
        if keep is not None:
            keep += chunk
            if len(keep) > 2 * OUTPUT_KEEP_BYTES:
                del keep[:-OUTPUT_KEEP_BYTES]
        if on_line is None:
            continue
        *lines, partial = (partial + text).split("\n")
        partial = partial[-line_limit:]
        for line in lines:
            on_line(line.rstrip("\r"))
    rest = decoder.decode(b"", final=True)
    if log_raw:
        ctx.log(rest)
    if on_line is not None and (partial + rest).strip():
        on_line((partial + rest).rstrip("\r"))


# ---- the supervisor: a task's group dies with its daemon


def supervisor_command(lifeline_fd: int, argv: list[str]) -> list[str]:
    # -I -S: the standard library is all it needs, and PYTHON* variables are meant for the task, not for it.
    program = part_program(
        "supervisor",
        "import contextlib, os, signal, socket, subprocess, sys, threading",
        ("ORPHAN_GRACE_S", "SUPERVISE_FLAG"),
        "sys.exit(supervise_main(sys.argv[1:]))",
    )
    return [sys.executable or "python3", "-I", "-S", "-c", program, SUPERVISE_FLAG, str(lifeline_fd), "--", *argv]


# ==== supervisor: a program of its own (see part_program)


def supervise_main(argv: list[str]) -> int:
    """`--supervise FD -- ARGV`: argv[1:] of a supervisor."""
    if len(argv) < 4 or argv[0] != SUPERVISE_FLAG or argv[2] != "--" or not argv[1].isdigit():
        print(f"cp_agent: usage: {SUPERVISE_FLAG} FD -- ARGV", file=sys.stderr)
        return 2
    return supervise(int(argv[1]), argv[3:])


def supervise(lifeline_fd: int, argv: list[str]) -> int:
    """`cp_agent.py --supervise FD -- ARGV`: the supervisor of one task, started by the daemon as the leader
    of a new session and process group, holding on FD one end of a socket pair whose other end only the
    daemon holds. It runs ARGV as its child in that group, with the supervisor's working directory,
    environment, stdin, stdout and stderr (the daemon reads the task's output directly), and tells the
    daemon `started PID`, then `exit RETURNCODE` (`error TEXT` if ARGV cannot be started).

    When the daemon dies, by SIGKILL too, the kernel closes its end and FD reaches EOF: the supervisor then
    stops the group, SIGTERM, then SIGKILL once the task's leader is gone or after ORPHAN_GRACE_S, which
    ends the supervisor too. Otherwise it outlives the leader and dies by the daemon's own SIGKILL of the
    group, so a background child the task left is never without one. It ignores SIGTERM (the daemon's
    cancel goes to the whole group) with a handler rather than SIG_IGN, which the task would inherit."""
    if os.getpgrp() != os.getpid():
        os.setsid()  # the daemon starts it so; never signal a group that is not the task's own
    lifeline = socket.socket(fileno=lifeline_fd)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda _signum, _frame: None)
    leader_gone = threading.Event()
    watcher = threading.Thread(target=_stop_group_when_daemon_dies, args=(lifeline, leader_gone), daemon=True)
    watcher.start()
    try:
        leader = subprocess.Popen(argv)
    except OSError as exc:
        _tell(lifeline, f"error {exc}")
        return 127
    # Our copies of the task's stdout and stderr would hold the daemon's pipes open after the task is done.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    _tell(lifeline, f"started {leader.pid}")
    returncode = leader.wait()
    leader_gone.set()
    _tell(lifeline, f"exit {returncode}")
    watcher.join()
    return 0


def _tell(lifeline: socket.socket, line: str) -> None:
    with contextlib.suppress(OSError):  # the daemon is gone: the watcher acts on that
        lifeline.sendall(line.replace("\n", " ").encode() + b"\n")


def _stop_group_when_daemon_dies(lifeline: socket.socket, leader_gone: threading.Event) -> None:
    with contextlib.suppress(OSError):
        while lifeline.recv(4096):  # the daemon sends nothing: this returns b"" when it is gone
            pass
    group = os.getpgrp()
    _signal_group(group, signal.SIGTERM)
    leader_gone.wait(ORPHAN_GRACE_S)
    _signal_group(group, signal.SIGKILL)  # ourselves included


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # the group is gone already
        os.killpg(pgid, sig)


# ==== end of supervisor


class TaskGroup:
    """The daemon's side of a running task: its supervisor (our child, and the leader of the task's session
    and process group, so its pid is the group's id) and the socket pair between them. See supervise()."""

    def __init__(self, argv: list[str], ctx: TaskContext, stdin_path: Path | None = None):
        ours, theirs = socket.socketpair()  # both ends close-on-exec: no other child inherits ours
        stdin = open(stdin_path, "rb") if stdin_path is not None else None  # noqa: SIM115 - closed below
        try:
            self.proc = subprocess.Popen(
                supervisor_command(theirs.fileno(), argv),
                cwd=ctx.cwd,
                env=ctx.env(),
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                start_new_session=True,
                pass_fds=(theirs.fileno(),),
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
            if stdin is not None:
                stdin.close()  # the supervisor (and the task, after it) hold their own copies
        self.pgid = self.proc.pid
        self.records, self.attempt_id = ctx.records, ctx.attempt_id
        if self.records is not None:
            self.records.add(ctx.attempt_id, ctx.key, self.pgid)
        self.returncode: int | None = None  # the task leader's, once the supervisor tells it
        self.exited = threading.Event()  # the leader has exited, or the supervisor has died
        self._lifeline = ours
        self._messages = ours.makefile("r", encoding="utf-8", errors="replace")
        ours.settimeout(SUPERVISOR_START_S)
        try:
            first = self._messages.readline()
        except OSError:  # a timeout
            first = ""
        kind, _, detail = first.strip().partition(" ")
        if kind != "started":
            raise OSError(self._abandon(detail if kind == "error" else ""))
        ours.settimeout(None)
        threading.Thread(target=self._follow, daemon=True, name=f"supervisor-{self.pgid}").start()

    def _follow(self) -> None:
        """Wait for the supervisor's word of the leader's end; EOF means the supervisor died, and then its
        own exit status stands for the task's."""
        with contextlib.suppress(OSError, ValueError):
            for line in self._messages:
                kind, _, detail = line.strip().partition(" ")
                if kind == "exit":
                    self.returncode = int(detail)
                    break
        self.exited.set()

    def _abandon(self, error: str) -> str:
        """Stop a supervisor that did not start the task; the reason, for `cannot start ...`."""
        _signal_group(self.pgid, signal.SIGKILL)
        self.proc.wait()
        said = ""
        if self.proc.stderr:  # what it said before dying, without waiting on a pipe something else may hold
            os.set_blocking(self.proc.stderr.fileno(), False)
            said = (self.proc.stderr.read() or b"").decode("utf-8", "replace").strip()
        self._close()
        if error:
            return error
        return f"its supervisor ({sys.executable}) exited with {self.proc.returncode}: {said[-500:] or 'no output'}"

    def stop(self, readers: list[threading.Thread], grace: float) -> int:
        """SIGTERM the process group, then SIGKILL it (the supervisor with it) once the task's leader has
        exited and its pipes are closed, or after `grace` seconds. Also run after a normal exit, so
        background children a task left behind do not outlive it. Returns the leader's return code."""
        _signal_group(self.pgid, signal.SIGTERM)  # the supervisor, alive till the SIGKILL, pins the group's id
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            # EOF on the pipes rather than a pid check: members that died may linger as zombies of init.
            if self.exited.is_set() and not any(reader.is_alive() for reader in readers):
                break
            time.sleep(0.05)
        _signal_group(self.pgid, signal.SIGKILL)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("process %d survived SIGKILL", self.proc.pid)
        for reader in readers:
            reader.join(timeout=1)  # a process that left our group with setsid may still hold a pipe
        self.exited.wait(1)  # the reader of the socket has seen the supervisor's end
        self._close()
        return self.returncode if self.returncode is not None else self.proc.returncode

    def _close(self) -> None:
        self._messages.close()
        self._lifeline.close()
        if self.records is not None:
            self.records.remove(self.attempt_id)


def run_in_process_group(
    argv: list[str],
    ctx: TaskContext,
    timeout_s: float | None,
    stdin_path: Path | None = None,
    on_line: Callable[[str], None] | None = None,
    log_raw: bool = True,
    watch: Callable[[], str] | None = None,
) -> ProcessOutcome:
    """Run `argv` in the work dir in a new session and process group under a supervisor (TaskGroup),
    streaming its output into the log, until it exits, times out, is canceled or `watch` (asked ten times a
    second) gives a reason to stop it; the whole group is stopped in every case, and by its supervisor if
    this daemon dies first. `stdin_path`: a file the program reads as its standard input (a prompt: no argv
    limit, never taken for an option). `on_line` gets each stdout line (default: CP_PROGRESS lines)."""
    group = TaskGroup(argv, ctx, stdin_path)
    kept, err_kept = bytearray(), bytearray()
    handler = on_line or progress_lines(ctx)
    limit = 1 << 20 if on_line is not None else 4096
    readers = [
        threading.Thread(
            target=_pump_output, args=(group.proc.stdout, ctx, kept, handler, log_raw, limit), daemon=True
        ),
        threading.Thread(target=_pump_output, args=(group.proc.stderr, ctx, err_kept), daemon=True),
    ]
    for reader in readers:
        reader.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    timed_out = canceled = False
    stopped = ""
    while not group.exited.is_set():
        if ctx.canceled.wait(0.1):
            canceled = True
            break
        if deadline is not None and time.monotonic() >= deadline:
            timed_out = True
            break
        if watch is not None and (stopped := watch()):
            break
    returncode = group.stop(readers, KILL_GRACE_S)
    stdout = bytes(kept[-OUTPUT_KEEP_BYTES:]).decode("utf-8", "replace")
    err_lines = [ln for ln in bytes(err_kept[-8192:]).decode("utf-8", "replace").splitlines() if ln.strip()]
    return ProcessOutcome(returncode, stdout, timed_out, canceled, "\n".join(err_lines[-10:]), stopped)


# ---- what a daemon's previous life left running


@dataclass(frozen=True)
class ProcStat:
    state: str
    pgrp: int
    start_time: int  # clock ticks after boot: with the pid, it names one process for good


def proc_stat(pid: int) -> ProcStat | None:
    """Fields of /proc/PID/stat; None when the process is gone, or there is no /proc (not Linux)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # after the command name, which may hold spaces and parentheses
    return ProcStat(fields[0], int(fields[2]), int(fields[19]))


def group_members(pgid: int) -> list[int]:
    """The live processes (zombies excluded) of process group `pgid`, from /proc."""
    members = []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                st = proc_stat(int(entry.name))
                if st is not None and st.pgrp == pgid and st.state not in ("Z", "X"):
                    members.append(int(entry.name))
    return members


def _environ_has(pid: int, entry: str) -> bool:
    try:
        return entry.encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


class LiveTasks:
    """The process groups of the tasks this agent runs, one JSON file each in a directory beside the state
    file ({"attempt_id", "key", "pgid", "start_time"}), written when a task's supervisor starts and removed
    once its group is stopped. A supervisor kills its group when the daemon dies; these records let the next
    daemon of the same state kill what is left when the supervisor died too (all SIGKILLed at once, the
    OOM killer). A record is acted on only as far as /proc confirms it (is_ours), since pids are recycled."""

    def __init__(self, directory: Path):
        self.directory = directory
        self._lock_fd: int | None = None

    def take_lock(self) -> bool:
        """Hold the directory's lock for the life of this process; False when another live daemon holds it
        (two daemons sharing one state file must not kill each other's tasks)."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd  # closed by the kernel when we exit, which frees the lock
        return True

    def _path(self, attempt_id: str) -> Path:
        return self.directory / f"{safe_name(attempt_id)}.json"

    def add(self, attempt_id: str, key: str, pgid: int) -> None:
        """Record the group of a task whose supervisor has just started (a failure to write is only logged:
        the supervisor is running the task by now, and it still covers its daemon's death)."""
        st = proc_stat(pgid)  # our unreaped child: the pid cannot have been recycled yet
        record = {"attempt_id": attempt_id, "key": key, "pgid": pgid, "start_time": st.start_time if st else None}
        tmp = self._path(attempt_id).with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self._path(attempt_id))
        except OSError as exc:
            log.warning("cannot record the process group of %s in %s: %s", key, self.directory, exc)

    def remove(self, attempt_id: str) -> None:
        with contextlib.suppress(OSError):
            self._path(attempt_id).unlink(missing_ok=True)

    @staticmethod
    def is_ours(record: dict) -> bool:
        """Whether process group record["pgid"] is still the recorded task's. A group's id is not handed out
        again while any process of the group lives, so one member that is certainly the task's vouches for
        the whole group: the supervisor (whose pid is the group's id) with the recorded start time, or,
        the supervisor gone, a member started after it that carries the attempt's CP_ATTEMPT_ID."""
        pgid, started, attempt_id = record.get("pgid"), record.get("start_time"), record.get("attempt_id")
        if not (isinstance(pgid, int) and isinstance(started, int) and isinstance(attempt_id, str)):
            return False
        if pgid <= 1 or pgid == os.getpgrp():
            return False
        leader = proc_stat(pgid)
        if leader is not None:  # the supervisor, or a stranger given its recycled pid
            return leader.start_time == started and leader.pgrp == pgid
        marker = f"CP_ATTEMPT_ID={attempt_id}"
        for pid in group_members(pgid):
            st = proc_stat(pid)
            if st is not None and st.start_time >= started and _environ_has(pid, marker):
                return True
        return False

    def kill_leftovers(self, grace: float = ORPHAN_GRACE_S) -> list[str]:
        """Stop the groups of recorded tasks that still run (SIGTERM, SIGKILL after `grace`) and forget every
        record; returns the keys of the tasks stopped."""
        records, ours = list(self.directory.glob("*.json")), []
        for path in records:
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if not isinstance(record, dict):
                continue
            if self.is_ours(record):
                ours.append(record)
                _signal_group(record["pgid"], signal.SIGTERM)
            elif record.get("start_time") is None and isinstance(record.get("pgid"), int):
                log.warning("cannot tell whether process group %s is still task %s here: not killing it",
                            record["pgid"], record.get("key"))  # fmt: skip
        deadline = time.monotonic() + grace
        while any(group_members(r["pgid"]) for r in ours) and time.monotonic() < deadline:
            time.sleep(0.05)
        for record in ours:
            if group_members(record["pgid"]) and self.is_ours(record):
                _signal_group(record["pgid"], signal.SIGKILL)
        for path in [*records, *self.directory.glob("*.tmp")]:
            path.unlink(missing_ok=True)
        return [str(record.get("key")) for record in ours]


def _timeout_of(task: dict) -> float | None:
    value = task.get("timeout_s")
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise TaskError(f"timeout_s must be a positive number, got {value!r}")
    return float(value)


class ProcessExecutor(Executor):
    """The executors that run one program per task (shell, claude, codex). They share process groups,
    timeouts, cancellation and output streaming, and differ in the command line and the result."""

    @abc.abstractmethod
    def command(self, ctx: TaskContext) -> list[str]:
        """The argv for this task; raises TaskError when the task cannot be run."""

    @abc.abstractmethod
    def finish(self, outcome: ProcessOutcome) -> tuple[dict, str]:
        """The result document and error sentence of a process that exited on its own."""

    def run(self, ctx: TaskContext) -> ExecResult:
        try:
            argv, timeout_s = self.command(ctx), _timeout_of(ctx.task)
        except TaskError as exc:
            return ExecResult({}, None, str(exc))
        try:
            outcome = run_in_process_group(argv, ctx, timeout_s)
        except OSError as exc:
            return ExecResult({}, None, f"cannot start {argv[0]}: {exc}")
        result, error = self.finish(outcome)
        if outcome.timed_out:
            error = f"timeout after {timeout_s:g} s"
        elif outcome.canceled:
            error = "canceled"
        return ExecResult(result, outcome.returncode, error)


class ShellExecutor(ProcessExecutor):
    name = "shell"

    def check(self) -> ExecutorCheck:
        usable = os.access("/bin/sh", os.X_OK)
        return ExecutorCheck(usable, "/bin/sh" if usable else "/bin/sh not found")

    def command(self, ctx: TaskContext) -> list[str]:
        command = ctx.task.get("command")
        if not isinstance(command, str) or not command.strip():
            raise TaskError("shell task has no command")
        return ["/bin/sh", "-c", command]

    def run(self, ctx: TaskContext) -> ExecResult:
        """As every program's, then a last report that says it finished ("exited 0", "exit 3", the timeout):
        a shell command reports no progress of its own, so its task read 0% and "started" after its end."""
        outcome = super().run(ctx)
        if outcome.exit_code is None or outcome.error.startswith(("timeout", "canceled")):
            ctx.report(None, outcome.error)  # stopped or never started: not 100%, but not "started" either
        else:
            ctx.report(1.0, "exited 0" if outcome.exit_code == 0 else f"exit {outcome.exit_code}")
        return outcome

    def finish(self, outcome: ProcessOutcome) -> tuple[dict, str]:
        result = {
            "exit_code": outcome.returncode,
            "stdout_tail": tail_utf8(outcome.stdout, STDOUT_TAIL_BYTES, note=False),
        }
        return result, "" if outcome.returncode == 0 else f"exit code {outcome.returncode}"


# ---- the AI CLIs: their event streams, usage and prices

# Prices per million tokens (input, output, cache read, cache write), for a CLI that reports tokens but no
# cost (codex); the longest matching model prefix wins. As published on 2026-11-01; a model not listed is
# priced as the most expensive of its family, so an estimate errs high, never low.
PRICES_AS_OF = "2026-11-01"
DEFAULT_PRICES: dict[str, tuple[float, float, float, float]] = {
    "claude-opus": (15.0, 75.0, 1.5, 18.75),
    "claude-opus-4-5": (5.0, 25.0, 0.5, 6.25),
    "claude-sonnet": (3.0, 15.0, 0.3, 3.75),
    "claude-haiku": (1.0, 5.0, 0.1, 1.25),
    "claude": (15.0, 75.0, 1.5, 18.75),
    "gpt-5-codex": (1.25, 10.0, 0.125, 0.0),
    "gpt-5-mini": (0.25, 2.0, 0.025, 0.0),
    "gpt-5": (1.25, 10.0, 0.125, 0.0),
    "o4-mini": (1.1, 4.4, 0.275, 0.0),
    "gpt": (15.0, 60.0, 7.5, 0.0),
    "": (15.0, 75.0, 1.5, 18.75),
}
USAGE_FIELDS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_tokens", "reasoning_tokens")


def price_usd(model: str, usage: dict, prices: dict | None = None) -> float:
    """What `usage` costs by `prices` (the server's table, which assignments carry) or DEFAULT_PRICES;
    reasoning tokens are billed as output."""
    table = _price_table(prices) or DEFAULT_PRICES
    matching = [k for k in table if model.startswith(k)]
    if not matching:  # a server table without a catch-all entry
        table, matching = DEFAULT_PRICES, [k for k in DEFAULT_PRICES if model.startswith(k)]
    inp, out, cache_read, cache_write = table[max(matching, key=len)]
    billed_out = usage.get("output_tokens", 0) + usage.get("reasoning_tokens", 0)
    return (
        usage.get("input_tokens", 0) * inp + billed_out * out + usage.get("cache_read_tokens", 0) * cache_read
        + usage.get("cache_write_tokens", 0) * cache_write
    ) / 1e6  # fmt: skip


def _price_table(prices: Any) -> dict[str, tuple[float, ...]]:
    """The assignment's `prices` ({prefix: [input, output, cache read, cache write]}), its malformed entries
    left out."""
    if not isinstance(prices, dict):
        return {}
    return {
        k: tuple(float(x) for x in v)
        for k, v in prices.items()
        if isinstance(k, str) and isinstance(v, list) and len(v) == 4
        and all(isinstance(x, int | float) and not isinstance(x, bool) and x >= 0 for x in v)
    }  # fmt: skip


def short_input(tool: str, data: Any) -> str:
    """A tool call as a progress message: `Edit router.py`, `$ pytest -q`, `Read README.md`."""
    if not isinstance(data, dict):
        return tool
    if tool == "Bash" and isinstance(data.get("command"), str):
        return "$ " + data["command"].strip().splitlines()[0][:150] if data["command"].strip() else "$"
    for name in ("file_path", "path", "notebook_path", "pattern", "url", "query", "description"):
        if isinstance(data.get(name), str):
            value = data[name]
            return f"{tool} {os.path.basename(value) if name.endswith('path') else value[:120]}"
    return tool


# "resets at 3pm", "try again at 1:05 AM", and on another day (codex) "try again at Dec 3rd, 2026 1:00 AM".
RESET_IN_TEXT_RE = re.compile(
    r"(?:resets?|try again) (?:at )?(?:(?P<month>jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.? "
    r"(?P<day>\d{1,2})(?:st|nd|rd|th)?,? (?P<year>\d{4}),? (?:at )?)?"
    r"(?P<hour>\d{1,2})(?::(?P<minute>\d{2}))?\s*(?P<half>am|pm)?",
    re.I,
)
MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
LIMIT_TEXT_RE = re.compile(r"\b429\b|rate.?limit|usage limit|quota|too many requests|overloaded", re.I)
AUTH_TEXT_RE = re.compile(
    r"\b401\b|invalid api key|not logged in|please run /login|authentication|unauthori[sz]ed"
    r"|missing environment variable: `?\w*API_KEY",
    re.I,
)


def reset_from_text(text: str, now: float | None = None) -> str | None:
    """ "resets at 3pm" / "resets 15:00" (the CLI's local clock) as an ISO-8601 instant: the next one, or
    that of the date the text names ("try again at Dec 3rd, 2026 1:00 AM")."""
    match = RESET_IN_TEXT_RE.search(text)
    if not match:
        return None
    hour, minute = int(match["hour"]), int(match["minute"] or 0)
    if match["half"]:
        hour = hour % 12 + (12 if match["half"].lower() == "pm" else 0)
    if not (0 <= hour < 24 and 0 <= minute < 60):
        return None
    now_t = time.localtime(now)
    if match["month"]:
        day = (int(match["year"]), MONTHS.index(match["month"].lower()) + 1, int(match["day"]))
        try:
            target = time.mktime((*day, hour, minute, 0, 0, 0, -1))
        except (OverflowError, ValueError):
            return None
    else:
        target = time.mktime((*now_t[:3], hour, minute, 0, 0, 0, -1))
        if target <= time.mktime(now_t):
            target += 86400
    return time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(target))


class CliStream:
    """What an AI CLI's JSON event stream says, line by line, as it arrives: the session, usage so far,
    a progress message, the text worth logging, and at the end the outcome in the CLI's own words."""

    def __init__(self, ctx: TaskContext, transcript: Path | None = None):
        self.ctx = ctx
        self.session_id = ""
        self.model = ""
        self.usage: dict[str, int] = dict.fromkeys(USAGE_FIELDS, 0)
        self.reported_cost: float | None = None  # the CLI's own total, when it gives one
        self.errors: list[str] = []
        self.final_text = ""
        self.turns = 0
        self.last_event_at = time.monotonic()
        self.rate_limited = False
        self.resets_at: str | None = None
        self.retry_after_s: float | None = None
        self._transcript = open(transcript, "a", encoding="utf-8") if transcript else None  # noqa: SIM115
        self._lock = threading.Lock()

    def feed(self, line: str) -> None:
        if not line.strip():
            return
        self.last_event_at = time.monotonic()
        if self._transcript is not None:
            self._transcript.write(line + "\n")
            self._transcript.flush()
        try:
            event = json.loads(line)
        except ValueError:
            self.ctx.log(line + "\n")  # not an event: a warning the CLI printed on stdout
            return
        if isinstance(event, dict):
            with self._lock:
                self.on_event(event)

    def close(self) -> None:
        if self._transcript is not None:
            self._transcript.close()

    @abc.abstractmethod
    def on_event(self, event: dict) -> None:
        """One event of the stream."""

    @abc.abstractmethod
    def failure(self) -> str:
        """Why the run failed, in the CLI's words; "" when it succeeded."""

    # -- usage

    @property
    def cost_usd(self) -> float:
        if self.reported_cost is not None:
            return self.reported_cost
        return price_usd(self.model, self.usage, self.ctx.task.get("prices"))

    def usage_report(self) -> dict:
        """PROTOCOL.md v1.1's usage object, cumulative for the attempt."""
        return {"model": self.model, **self.usage, "cost_usd": round(self.cost_usd, 6),
                "cost_estimated": self.reported_cost is None}  # fmt: skip

    def note_limit(self, text: str, resets_at: str | None = None, retry_after_s: float | None = None) -> None:
        self.rate_limited = True
        self.resets_at = resets_at or self.resets_at or reset_from_text(text)
        if retry_after_s is not None:
            self.retry_after_s = retry_after_s


class ClaudeStream(CliStream):
    """`claude -p --output-format stream-json --verbose`: system/init, assistant and user messages, system
    api_retry notices, rate-limit events, and one result at the end."""

    def __init__(self, ctx: TaskContext, transcript: Path | None = None, max_turns: int | None = None):
        super().__init__(ctx, transcript)
        self.max_turns = max_turns
        self.result: dict | None = None
        self._message_usage: dict[str, dict] = {}  # per message id: a message's usage repeats on each block

    def on_event(self, event: dict) -> None:
        kind, subtype = event.get("type"), event.get("subtype")
        if isinstance(event.get("session_id"), str):
            self.session_id = event["session_id"]
        if kind == "system" and subtype == "init":
            self.model = str(event.get("model") or self.model)
            self.ctx.report(None, f"claude started ({self.model or 'default model'})")
        elif kind == "system" and subtype == "api_retry":
            attempt, most = event.get("attempt"), event.get("max_retries")
            status = event.get("error_status") or event.get("status")
            what = "rate-limited" if status in (429, "429") else f"API error {status}" if status else "API error"
            self.ctx.report(None, f"{what}, retry {attempt}/{most}")
            if status in (429, "429"):
                self.note_limit(json.dumps(event))
        elif kind == "rate_limit_event" or (kind == "system" and subtype in ("rate_limit", "rate_limit_event")):
            info = given if isinstance(given := event.get("rate_limit_info"), dict) else event
            if str(info.get("status", "")).lower() in ("rejected", "blocked", "exceeded"):
                reset = info.get("resetsAt") or info.get("resets_at")
                iso = None
                if isinstance(reset, (int, float)):
                    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(float(reset)))
                elif isinstance(reset, str):
                    iso = reset
                self.note_limit(json.dumps(info), iso)
        elif kind == "system" and subtype == "permission_denied":
            said = short_input(str(event.get("tool_name") or "tool"), event.get("tool_input"))
            self.ctx.log(f"refused: {said}\n")
            self.ctx.report(None, f"refused: {said}")
        elif kind == "assistant":
            self._assistant(message if isinstance(message := event.get("message"), dict) else {})
        elif kind == "result":
            self.result = event
            self._final(event)

    def _assistant(self, message: dict) -> None:
        self.model = str(message.get("model") or self.model)
        usage = message.get("usage")
        if isinstance(usage, dict):
            self._message_usage[str(message.get("id") or len(self._message_usage))] = usage
            self.usage = self._sum(self._message_usage.values())
        self.turns += 1
        for block in message.get("content") or ():
            if not isinstance(block, dict):
                continue
            if block.get("type") == "text" and isinstance(block.get("text"), str):
                self.ctx.log(block["text"].rstrip() + "\n")
            elif block.get("type") == "tool_use":
                said = short_input(str(block.get("name") or "tool"), block.get("input"))
                self.ctx.log(f"→ {said}\n")
                fraction = min(0.95, self.turns / self.max_turns) if self.max_turns else None
                self.ctx.report(fraction, said)

    @staticmethod
    def _sum(usages: Iterable[dict]) -> dict[str, int]:
        total = dict.fromkeys(USAGE_FIELDS, 0)
        for u in usages:
            total["input_tokens"] += int(u.get("input_tokens") or 0)
            total["output_tokens"] += int(u.get("output_tokens") or 0)
            total["cache_read_tokens"] += int(u.get("cache_read_input_tokens") or 0)
            total["cache_write_tokens"] += int(u.get("cache_creation_input_tokens") or 0)
        return total

    def _final(self, event: dict) -> None:
        if isinstance(event.get("usage"), dict):
            self.usage = self._sum([event["usage"]])
        if isinstance(event.get("total_cost_usd"), (int, float)):
            self.reported_cost = float(event["total_cost_usd"])
        models = event.get("modelUsage")
        if isinstance(models, dict) and models and not self.model:
            self.model = next(iter(models))
        self.turns = int(event.get("num_turns") or self.turns)
        if isinstance(event.get("result"), str):
            self.final_text = event["result"]
        for err in event.get("errors") or ():
            self.errors.append(str(err))
        text = " ".join([self.final_text, *self.errors])
        status = event.get("api_error_status")
        if event.get("is_error") and (status in (429, "429") or LIMIT_TEXT_RE.search(text)):
            self.note_limit(text)

    def failure(self) -> str:
        """Why the run failed, in the CLI's words; "" when it succeeded."""
        res = self.result
        if res is None:
            return ""
        denials = res.get("permission_denials") or []
        subtype = str(res.get("subtype") or "")
        if res.get("is_error") or (subtype and subtype != "success"):
            # An API error ends with is_error and, oddly, subtype "success": the words are in `result`.
            words = "; ".join(self.errors) or (self.final_text if res.get("is_error") else "") or subtype
            kind = subtype if subtype and subtype != "success" else "error"
            return f"claude: {kind}: {words}"[:2000]
        if denials:
            listed = ", ".join(self._denial(d) for d in denials[:10] if isinstance(d, dict))
            return f"permission_denied: claude was refused {len(denials)} tool call(s): {listed}"[:2000]
        return ""

    def _denial(self, denial: dict) -> str:
        """A refused call as the error lists it, with the person's (or the timeout's) words when one was asked."""
        said = short_input(str(denial.get("tool_name") or "tool"), denial.get("tool_input"))
        why = self.ctx.relay.denied.get(str(denial.get("tool_use_id"))) if self.ctx.relay is not None else None
        return f"{said} (denied: {why[:200]})" if why else said


class CodexStream(CliStream):
    """`codex exec --json`: thread.started, turn.started/completed/failed, item.started/updated/completed
    (agent_message, reasoning, command_execution, file_change, mcp_tool_call, web_search, todo_list, error),
    and error events."""

    def __init__(self, ctx: TaskContext, transcript: Path | None = None, model: str = ""):
        super().__init__(ctx, transcript)
        self.model = model
        self.failed = ""

    def on_event(self, event: dict) -> None:
        kind = event.get("type")
        if kind == "thread.started" and isinstance(event.get("thread_id"), str):
            self.session_id = event["thread_id"]
            self.ctx.report(None, "codex started")
        elif kind == "turn.completed" and isinstance(event.get("usage"), dict):
            # Codex counts cached tokens within input_tokens and reasoning within output_tokens.
            u = {k: int(v) for k, v in event["usage"].items() if isinstance(v, int) and not isinstance(v, bool)}
            cached, reasoning = u.get("cached_input_tokens", 0), u.get("reasoning_output_tokens", 0)
            self.turns += 1
            self.usage["input_tokens"] += max(0, u.get("input_tokens", 0) - cached)
            self.usage["cache_read_tokens"] += cached
            self.usage["cache_write_tokens"] += u.get("cache_write_input_tokens", 0)
            self.usage["output_tokens"] += max(0, u.get("output_tokens", 0) - reasoning)
            self.usage["reasoning_tokens"] += reasoning
        elif kind == "turn.failed":
            error = given if isinstance(given := event.get("error"), dict) else {}
            self._fail(str(error.get("message") or "turn failed"))
        elif kind == "error":
            # "Reconnecting... 2/5 (...)": codex retrying on its own, not a failure (it may recover); only
            # turn.failed or a non-zero exit fail the task. The words are kept for the error if it does.
            message = str(event.get("message") or "error")
            self.errors.append(message)
            self.ctx.report(None, message[:200])
        elif kind in ("item.started", "item.completed") and isinstance(event.get("item"), dict):
            self._item(kind, event["item"])

    def _fail(self, message: str) -> None:
        self.failed = message
        self.errors.append(message)
        if LIMIT_TEXT_RE.search(message):
            self.note_limit(message)

    def _item(self, kind: str, item: dict) -> None:
        itype = item.get("type") or item.get("item_type")
        done = kind == "item.completed"
        if itype == "agent_message" and done and isinstance(item.get("text"), str):
            self.final_text = item["text"]
            self.ctx.log(item["text"].rstrip() + "\n")
        elif itype == "command_execution":
            command = str(item.get("command") or "").strip().splitlines()
            said = "$ " + (command[0][:150] if command else "")
            if done:
                said += f" → exit {item.get('exit_code')}"
            self.ctx.log(said + "\n")
            self.ctx.report(None, said)
        elif itype == "file_change" and done:
            paths = [str(c.get("path")) for c in item.get("changes") or () if isinstance(c, dict)]
            said = "Edit " + ", ".join(os.path.basename(p) for p in paths[:5]) if paths else "Edit"
            self.ctx.log(said + "\n")
            self.ctx.report(None, said)
        elif itype in ("mcp_tool_call", "web_search") and not done:
            self.ctx.report(None, f"{itype.replace('_', ' ')}: {item.get('tool') or item.get('query') or ''}".strip())
        elif itype == "error" and done:
            self.errors.append(str(item.get("message") or "error"))

    def failure(self) -> str:
        return f"codex: {self.failed}"[:2000] if self.failed else ""

    def limit_in_errors(self) -> None:
        """At the end: a run that failed on a quota refusal said so in its error events."""
        if self.failed and any(LIMIT_TEXT_RE.search(e) for e in self.errors):
            self.note_limit(" ".join(self.errors))


class CliExecutor(ProcessExecutor):
    """An AI coding CLI run headless in the task's worktree, the prompt on stdin, its JSON event stream read
    as it arrives (progress, a readable log, usage, the session), a budget and a stall watched, and an
    outcome that is honest: failed on a non-zero exit, an error result, or refused tool calls, in the CLI's
    own words; `rate_limited` when the provider refused for quota or rate. The raw events are kept as the
    artifact transcript.jsonl. The binary is found on PATH unless the override variable names one."""

    program = ""
    binary_env = ""
    expect_changes_default = False
    stall_default_s = 300

    def __init__(self, environ: dict[str, str] | None = None):
        super().__init__(environ)
        self.binary = shutil.which(self.environ.get(self.binary_env) or self.program, path=self.environ.get("PATH"))

    def check(self) -> ExecutorCheck:
        if not self.binary:
            return ExecutorCheck(False, f"{self.program} not found on PATH (nor ${self.binary_env})")
        try:
            proc = subprocess.run(
                [self.binary, "--version"],
                check=False,
                capture_output=True,
                text=True,
                timeout=10,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return ExecutorCheck(False, f"{self.binary} --version failed: {exc}")
        line = next((s.strip() for s in (proc.stdout + proc.stderr).splitlines() if s.strip()), "")
        if proc.returncode != 0:
            return ExecutorCheck(False, f"{self.binary} --version exited with {proc.returncode}: {line}")
        number = re.search(r"\d+(?:\.\d+)+", line)
        version = number.group(0) if number else line or None
        logged_in, how = self.login_status()
        if not logged_in:
            return ExecutorCheck(False, f"{self.binary}, {line}: not logged in ({how})", version)
        return ExecutorCheck(True, f"{self.binary}, {line}, logged in ({how})", version)

    def _status(self, *args: str) -> subprocess.CompletedProcess | None:
        """`BINARY ARGS` as a task would run it (the allow-listed environment), or None if it cannot run."""
        env = {**task_environ(os.environ), "PATH": self.environ.get("PATH", os.environ.get("PATH", ""))}
        try:
            return subprocess.run([self.binary or self.program, *args], check=False, capture_output=True, text=True,
                                  timeout=15, stdin=subprocess.DEVNULL, env=env)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return None

    @abc.abstractmethod
    def login_status(self) -> tuple[bool, str]:
        """Whether the CLI can reach its model with the credentials a task would have, and how it knows."""

    @abc.abstractmethod
    def arguments(self, ctx: TaskContext) -> list[str]:
        """The arguments after the binary (the prompt goes on stdin)."""

    @abc.abstractmethod
    def stream(self, ctx: TaskContext) -> CliStream:
        """A reader of this CLI's events for one attempt."""

    def command(self, ctx: TaskContext) -> list[str]:
        if not self.binary:
            raise TaskError(f"{self.program} not found on this agent")
        if not isinstance(ctx.task.get("prompt"), str) or not ctx.task["prompt"].strip():
            raise TaskError(f"{self.name} task has no prompt")
        return [self.binary, *self.arguments(ctx)]

    def finish(self, outcome: ProcessOutcome) -> tuple[dict, str]:  # ProcessExecutor's; run() is our own
        return {"exit_code": outcome.returncode}, ""

    def run(self, ctx: TaskContext) -> ExecResult:
        try:
            argv, timeout_s = self.command(ctx), _timeout_of(ctx.task)
            budget = _positive(ctx.params.get("budget_usd"), "budget_usd")
            stall_s = _positive(ctx.params.get("stall_s"), "stall_s") or self.stall_default_s
        except TaskError as exc:
            return ExecResult({}, None, str(exc))
        prompt_file = ctx.work_dir / "prompt.txt"  # outside the worktree, so it is never committed
        prompt_file.write_text(ctx.task["prompt"], encoding="utf-8")
        events = self.stream(ctx)
        last_sent = [0.0]

        def watch() -> str:
            now = time.monotonic()
            if now - last_sent[0] >= PROGRESS_MIN_GAP_S:
                ctx.report_usage(events.usage_report())
                last_sent[0] = now
            if budget is not None and events.cost_usd >= budget:
                return f"budget_exceeded: ${events.cost_usd:.4f} spent, budget_usd {budget:g}"
            if ctx.relay is not None and ctx.relay.pending:
                events.last_event_at = now  # silent while a person decides: not a stall
            if now - events.last_event_at > stall_s:
                return f"stalled: no event from {self.program} for {stall_s:g} s"
            return ""

        try:
            outcome = run_in_process_group(argv, ctx, timeout_s, prompt_file, events.feed, log_raw=False, watch=watch)
        except OSError as exc:
            return ExecResult({}, None, f"cannot start {argv[0]}: {exc}")
        finally:
            events.close()
        if isinstance(events, CodexStream):
            events.limit_in_errors()
        return self.judge(ctx, outcome, events, timeout_s)

    def judge(
        self, ctx: TaskContext, outcome: ProcessOutcome, events: CliStream, timeout_s: float | None
    ) -> ExecResult:
        extra: dict[str, Any] = {"usage": events.usage_report()}
        if events.session_id:
            extra["session_id"] = events.session_id
        result = {"output": events.final_text, "exit_code": outcome.returncode, "session_id": events.session_id,
                  "turns": events.turns}  # fmt: skip
        error = ""
        if outcome.stopped:
            error = outcome.stopped
        elif outcome.timed_out:
            error = f"timeout after {timeout_s:g} s"
        elif outcome.canceled:
            error = "canceled"
        else:
            error = events.failure()
            if not error and outcome.returncode != 0:
                said = outcome.stderr_tail or "; ".join(events.errors) or "no output on stderr"
                error = f"{self.program} exited with code {outcome.returncode}: {said}"[:2000]
            if not error and not events.final_text and not events.session_id:
                error = f"{self.program} exited without a result: {outcome.stderr_tail or 'no output'}"[:2000]
        words = " ".join([error, outcome.stderr_tail])
        if error and not outcome.stopped and (events.rate_limited or LIMIT_TEXT_RE.search(words)):
            if events.resets_at:
                extra["resets_at"] = events.resets_at
            elif events.retry_after_s is not None:
                extra["retry_after_s"] = events.retry_after_s
            return ExecResult(result, outcome.returncode, f"rate_limited: {error}", "rate_limited", extra)
        if error and not outcome.stopped and AUTH_TEXT_RE.search(words):
            error = f"not_logged_in: {error}"
        return ExecResult(result, outcome.returncode, error, "", extra)


SESSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def resume_session(ctx: TaskContext) -> str:
    """The CLI session this attempt resumes (the server's `resume_session`, given for a retry on the agent
    that ran the previous attempt when params.resume_on_retry is true), or "" for a fresh one. Why not,
    when the server says it cannot be, goes to the task's log."""
    if ctx.params.get("resume_on_retry") is not True:
        return ""
    session = ctx.task.get("resume_session")
    if isinstance(session, str) and SESSION_RE.fullmatch(session):
        return session
    why = ctx.task.get("resume_unavailable")
    if isinstance(why, str) and why:
        ctx.log(f"[cp-agent] not resuming the previous session: {why[:200]}; starting a new one\n")
    return ""


def _positive(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise TaskError(f"params.{name} must be a positive number")
    return float(value)


def _str_list(value: Any, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise TaskError(f"params.{name} must be a list of strings")
    return value


CLAUDE_PERMISSION_MODES = ("default", "acceptEdits", "plan", "bypassPermissions", "dontAsk")
CODEX_SANDBOXES = ("read-only", "workspace-write", "danger-full-access")


class ClaudeExecutor(CliExecutor):
    name = program = "claude"
    binary_env = "CP_CLAUDE_BIN"

    @staticmethod
    def permission_mode(ctx: TaskContext) -> str:
        """`--permission-mode`: params.permission_mode (or the v1 skip_permissions), bypassPermissions refused
        to root unless the host is a sandbox (TaskError)."""
        params = ctx.params
        mode = params.get("permission_mode", "acceptEdits")
        if params.get("skip_permissions") is True:  # the v1 spelling
            mode = "bypassPermissions"
        if mode not in CLAUDE_PERMISSION_MODES:
            raise TaskError(f"params.permission_mode must be one of {', '.join(CLAUDE_PERMISSION_MODES)}")
        if mode == "bypassPermissions" and os.geteuid() == 0 and not ctx.sandboxed_host:
            raise TaskError("permission_mode bypassPermissions is refused as root; start the agent with "
                            "--sandboxed-host on a throwaway VM or container")  # fmt: skip
        return mode

    def arguments(self, ctx: TaskContext) -> list[str]:
        params = ctx.params
        args = ["-p", "--output-format", "stream-json", "--verbose", "--permission-mode", self.permission_mode(ctx)]
        allowed = _str_list(params.get("allowed_tools"), "allowed_tools")  # claude never asks about these
        disallowed = _str_list(params.get("disallowed_tools"), "disallowed_tools")
        permission_policy(params)
        if ctx.relay is not None:
            # Claude asks our MCP tool, which asks a person; the model itself may not call it.
            args += ["--mcp-config", str(ctx.relay.write_mcp_config()), "--permission-prompt-tool", PROMPT_TOOL]
            disallowed = [*disallowed, PROMPT_TOOL]
        if allowed:
            args += ["--allowedTools", *allowed]
        if disallowed:
            args += ["--disallowedTools", *disallowed]
        if isinstance(params.get("model"), str) and params["model"]:
            args += ["--model", params["model"]]
        if params.get("max_turns") is not None:
            if (
                isinstance(params["max_turns"], bool)
                or not isinstance(params["max_turns"], int)
                or params["max_turns"] < 1
            ):
                raise TaskError("params.max_turns must be a positive integer")
            args += ["--max-turns", str(params["max_turns"])]
        budget = _positive(params.get("budget_usd"), "budget_usd")
        if budget is not None:
            args += ["--max-budget-usd", f"{budget:g}"]
        if isinstance(params.get("system_prompt"), str) and params["system_prompt"]:
            args += ["--append-system-prompt", params["system_prompt"]]
        resume = resume_session(ctx)
        if resume:
            args += ["--resume", resume]  # the previous attempt's conversation goes on (params.resume_on_retry)
        else:
            # A fresh session per attempt, named by us: the attempt id is a UUID.
            attempt = str(uuid.UUID(ctx.attempt_id)) if _is_uuid(ctx.attempt_id) else str(uuid.uuid4())
            args += ["--session-id", attempt]
        return args

    def login_status(self) -> tuple[bool, str]:
        proc = self._status("auth", "status")
        try:
            said = json.loads(proc.stdout) if proc is not None else None
        except ValueError:
            said = None
        if not isinstance(said, dict) or "loggedIn" not in said:
            return True, "claude auth status gave no answer: not checked"  # an older CLI; the task will say
        if said["loggedIn"]:
            return True, f"claude auth status: {said.get('authMethod') or 'yes'}"
        return False, "claude auth status: run `claude` and /login, or set ANTHROPIC_API_KEY"

    def run(self, ctx: TaskContext) -> ExecResult:
        # Its own retries kept short: on a rate limit the fleet, not one process, decides when to try again.
        ctx.extra_env.setdefault("CLAUDE_CODE_MAX_RETRIES", os.environ.get("CLAUDE_CODE_MAX_RETRIES", "2"))
        try:
            on_permission, timeout_s = permission_policy(ctx.params)
        except TaskError as exc:
            return ExecResult({}, None, str(exc))
        bypass = ctx.params.get("permission_mode") == "bypassPermissions" or ctx.params.get("skip_permissions") is True
        if on_permission != "ask" or ctx.ask_person is None or bypass:  # nothing to ask, or nobody to ask
            return super().run(ctx)
        try:
            ctx.relay = PermissionRelay(ctx.work_dir / ".cp-agent", ctx.ask_person, timeout_s)
        except OSError as exc:
            return ExecResult({}, None, f"cannot open the permission socket in {ctx.work_dir}: {exc}")
        try:
            return super().run(ctx)
        finally:
            ctx.relay.close()
            ctx.relay = None

    def stream(self, ctx: TaskContext) -> CliStream:
        max_turns = ctx.params.get("max_turns") if isinstance(ctx.params.get("max_turns"), int) else None
        return ClaudeStream(ctx, ctx.out_dir / "transcript.jsonl", max_turns)


class CodexExecutor(CliExecutor):
    name = program = "codex"
    binary_env = "CP_CODEX_BIN"
    expect_changes_default = True

    def arguments(self, ctx: TaskContext) -> list[str]:
        params = ctx.params
        sandbox = params.get("sandbox", "workspace-write")
        if sandbox not in CODEX_SANDBOXES:
            raise TaskError(f"params.sandbox must be one of {', '.join(CODEX_SANDBOXES)}")
        args = ["-a", "never", "exec", "-s", sandbox, "-C", str(ctx.cwd)]
        resume = resume_session(ctx)
        if resume:
            args.append("resume")  # `codex exec resume ID`: exec's own options above, the rest after it
        args.append("--json")
        if isinstance(params.get("model"), str) and params["model"]:
            args += ["-m", params["model"]]
        if params.get("reasoning_effort") in ("minimal", "low", "medium", "high"):
            args += ["-c", f"model_reasoning_effort={params['reasoning_effort']}"]
        args += ["-o", str(ctx.work_dir / "last_message.txt")]
        if ctx.worktree is None:
            args.append("--skip-git-repo-check")  # an empty work dir is no git repository
        if resume:
            args.append(resume)
        return [*args, "-"]  # the prompt from stdin

    def login_status(self) -> tuple[bool, str]:
        proc = self._status("login", "status")
        if proc is not None and proc.returncode == 0:
            return True, "codex login status: " + (proc.stdout + proc.stderr).strip().splitlines()[0][:80]
        # `codex login status` knows only its auth.json; a key in the environment (a provider's env_key)
        # is a login too, which it does not see.
        keys = [name for name in ("OPENAI_API_KEY", "CODEX_API_KEY") if os.environ.get(name)]
        if keys:
            return True, f"API key in {keys[0]}"
        return False, "codex login status: run `codex login`, or set OPENAI_API_KEY"

    def stream(self, ctx: TaskContext) -> CliStream:
        model = ctx.params.get("model") if isinstance(ctx.params.get("model"), str) else ""
        return CodexStream(ctx, ctx.out_dir / "transcript.jsonl", model or "gpt-5-codex")

    def judge(
        self, ctx: TaskContext, outcome: ProcessOutcome, events: CliStream, timeout_s: float | None
    ) -> ExecResult:
        last = ctx.work_dir / "last_message.txt"
        with contextlib.suppress(OSError):
            events.final_text = last.read_text(encoding="utf-8", errors="replace").strip() or events.final_text
        return super().judge(ctx, outcome, events, timeout_s)


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


# ---- a person answers claude's permission prompts (PROTOCOL.md v1.1 "Input requests")
#
# claude -p asks its --permission-prompt-tool, an MCP tool, whenever a tool call needs approval (tools in
# --allowedTools never do). Ours is served by this same file, `cp_agent.py --mcp-permissions SOCKET`, which
# claude starts inside the task's environment: so it holds no secret and only relays. Each prompt goes, one
# connection each, over the attempt's Unix socket (in its work dir, outside the worktree, 0600) to the daemon,
# which creates an input request on the server with its agent token, long-polls for the answer and sends back
# allow or deny; the relay hands that to claude as {"behavior": "allow", "updatedInput": ...} or
# {"behavior": "deny", "message": ...}.


def permission_policy(params: dict) -> tuple[str, float]:
    """params.on_permission ("ask", the default: a person answers; "deny": refused at once, as claude -p does
    without a prompt tool) and params.input_timeout_s (how long a person may take, then deny)."""
    mode = params.get("on_permission", "ask")
    if mode not in ON_PERMISSION:
        raise TaskError(f"params.on_permission must be one of {', '.join(ON_PERMISSION)}")
    timeout_s = _positive(params.get("input_timeout_s"), "input_timeout_s") or INPUT_TIMEOUT_DEFAULT_S
    if timeout_s > INPUT_TIMEOUT_MAX_S:
        raise TaskError(f"params.input_timeout_s may be at most {INPUT_TIMEOUT_MAX_S:g}")
    return mode, timeout_s


def _read_line(conn: socket.socket, limit: int = 1 << 20) -> bytes:
    """One newline-ended line from `conn` (b"" at EOF before one); ValueError past `limit`."""
    data = bytearray()
    while b"\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
        if len(data) > limit:
            raise ValueError("line too long")
    return bytes(data.split(b"\n", 1)[0])


def _peer_gone(conn: socket.socket) -> bool:
    """The other end closed (claude gave up on the prompt, or exited)."""
    try:
        readable, _, _ = select.select([conn], [], [], 0)
        return bool(readable) and conn.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


class PermissionRelay:
    """The daemon's end: a Unix socket in the attempt's work dir that the MCP relay connects to, once per
    permission prompt, sending {"tool_name", "input", "tool_use_id"} and reading back the verdict. `ask` (the
    TaskRun's) makes the server calls; this never sees the token. `pending` counts prompts awaiting a person
    (the stall watch waits while there are any); `denied` keeps each denied call's words by tool_use_id."""

    def __init__(self, directory: Path, ask: Callable[[dict, Callable[[], bool]], dict], timeout_s: float):
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(directory, 0o700)
        self.directory, self.ask, self.timeout_s = directory, ask, timeout_s
        self.path = directory / "permissions.sock"
        self.path.unlink(missing_ok=True)
        self.pending = 0
        self.denied: dict[str, str] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            _on_unix_path(self._sock.bind, self.path)
            os.chmod(self.path, 0o600)  # in a 0700 directory from the start: nobody else could reach it anyway
            self._sock.listen(16)
            self._sock.settimeout(0.5)  # accept() wakes to see close()
        except BaseException:
            self._sock.close()
            raise
        threading.Thread(target=self._accept_loop, daemon=True, name=f"permissions-{directory.parent.name}").start()

    def mcp_config(self) -> dict:
        """claude's --mcp-config: this file's MCP relay part as a stdio server, started with the task's
        environment (no token) and allowed to wait longer than any person may take."""
        timeout_ms = min(2**31 - 1, int((self.timeout_s + 120) * 1000))
        imports = ("import json, os, socket, sys, threading\nfrom collections.abc import Callable\n"
                   "from pathlib import Path\nfrom typing import Any, NoReturn")  # fmt: skip
        constants = ("VERSION", "MCP_SERVER_NAME", "MCP_TOOL_NAME", "MCP_PROTOCOL_VERSION")
        program = part_program("MCP relay", imports, constants, "sys.exit(serve_mcp_permissions(sys.argv[2]))")
        argv = ["-I", "-S", "-c", program, MCP_FLAG, str(self.path)]
        server = {"type": "stdio", "command": sys.executable or "python3", "args": argv, "timeout": timeout_ms}
        return {"mcpServers": {MCP_SERVER_NAME: server}}

    def write_mcp_config(self) -> Path:
        path = self.directory / "mcp.json"
        path.write_text(json.dumps(self.mcp_config(), indent=1), encoding="utf-8")
        return path

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="permission-prompt").start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(10)
                request = json.loads(_read_line(conn) or b"null")
                conn.settimeout(None)
            except (OSError, ValueError):
                return
            if not isinstance(request, dict) or not isinstance(request.get("tool_name"), str):
                verdict = _deny("cp-agent: a malformed permission request")
            else:
                tool_input = request.get("input") if isinstance(request.get("input"), dict) else {}
                asked = {"tool": request["tool_name"][:200], "input": tool_input,
                         "tool_use_id": str(request.get("tool_use_id") or ""), "timeout_s": self.timeout_s}  # fmt: skip
                with self._lock:
                    self.pending += 1
                try:
                    verdict = self.ask(asked, lambda: self._closed.is_set() or _peer_gone(conn))
                except Exception as exc:  # a bug must not leave claude waiting forever
                    log.exception("asking a person failed")
                    verdict = _deny(f"cp-agent could not ask a person: {exc}")
                finally:
                    with self._lock:
                        self.pending -= 1
                if verdict.get("behavior") != "allow":
                    with self._lock:
                        self.denied[asked["tool_use_id"]] = str(verdict.get("message") or "")
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps(verdict).encode() + b"\n")

    def close(self) -> None:
        self._closed.set()
        self._sock.close()
        self.path.unlink(missing_ok=True)


# ==== MCP relay: a program of its own (see part_program)


def _on_unix_path(action: Callable[[str], Any], path: Path) -> Any:
    """bind or connect to a Unix socket at `path`, also when it is longer than sun_path's ~108 bytes (a deep
    work dir): through the directory's /proc/self/fd link then (Linux, like the rest of the daemon)."""
    if len(os.fsencode(str(path))) < 100:
        return action(str(path))
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return action(f"/proc/self/fd/{fd}/{path.name}")
    finally:
        os.close(fd)


def _deny(message: str) -> dict:
    return {"behavior": "deny", "message": message}


class McpPermissionServer:
    """The JSON-RPC 2.0 side of `cp_agent.py --mcp-permissions SOCKET`: MCP over stdio, one message per line
    (initialize, notifications/initialized, ping, tools/list, tools/call; notifications/cancelled). Its one
    tool, MCP_TOOL_NAME, takes claude's {tool_name, input, tool_use_id} and answers with one text block
    holding claude's permission result. `ask(arguments, cancelled)` gives the verdict ({"behavior":
    "allow"|"deny", "message"}); each call runs in a thread of its own, so prompts may overlap. `write` gets
    each answer line (without its newline)."""

    TOOL = {
        "name": MCP_TOOL_NAME,
        "description": "How the control plane's agent asks a person whether Claude may use a tool: "
        "Claude Code's --permission-prompt-tool. Not for the model.",
        "inputSchema": {
            "type": "object",
            "properties": {
                "tool_name": {"type": "string", "description": "the tool Claude wants to use"},
                "input": {"type": "object", "description": "its input"},
                "tool_use_id": {"type": "string"},
            },
            "required": ["tool_name", "input"],
        },
    }

    def __init__(self, write: Callable[[str], None], ask: Callable[[dict, threading.Event], dict]):
        self._write, self.ask = write, ask
        self._write_lock = threading.Lock()
        self._stopped = False
        self._cancels: dict[Any, threading.Event] = {}
        self._threads: list[threading.Thread] = []

    def feed(self, line: str) -> None:
        """One line from the client."""
        if not line.strip():
            return
        try:
            message = json.loads(line)
        except ValueError:
            self._send({"jsonrpc": "2.0", "id": None, "error": {"code": -32700, "message": "parse error"}})
            return
        if not isinstance(message, dict) or not isinstance(message.get("method", ""), str):
            self._send({"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "invalid request"}})
            return
        method, params = message.get("method"), message.get("params")
        params = params if isinstance(params, dict) else {}
        if method is None:
            return  # an answer to a request of ours: we make none
        if "id" not in message:  # a notification: never answered
            self._notified(method, params)
            return
        request_id = message["id"]
        if method == "initialize":
            asked = params.get("protocolVersion")
            self._result(request_id, {
                "protocolVersion": asked if isinstance(asked, str) and asked else MCP_PROTOCOL_VERSION,
                "capabilities": {"tools": {}},
                "serverInfo": {"name": MCP_SERVER_NAME, "version": VERSION},
            })  # fmt: skip
        elif method == "ping":
            self._result(request_id, {})
        elif method == "tools/list":
            self._result(request_id, {"tools": [self.TOOL]})
        elif method == "tools/call":
            self._start_call(request_id, params)
        else:
            self._error(request_id, -32601, f"method not found: {str(method)[:100]}")

    def _notified(self, method: str, params: dict) -> None:
        """A notification: notifications/cancelled stops the prompt of the call it names; others are ignored."""
        if method == "notifications/cancelled":
            cancel = self._cancels.get(_hashable(params.get("requestId")))
            if cancel is not None:
                cancel.set()

    def _start_call(self, request_id: Any, params: dict) -> None:
        """tools/call of our one tool: answered from a thread of its own, since a person may take minutes."""
        if params.get("name") != MCP_TOOL_NAME:
            self._error(request_id, -32602, f"unknown tool {str(params.get('name'))[:100]!r}")
            return
        cancel = threading.Event()
        self._cancels[_hashable(request_id)] = cancel
        thread = threading.Thread(target=self._call, args=(request_id, params.get("arguments"), cancel),
                                  daemon=True, name="prompt")  # fmt: skip
        self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the calls under way (tests)."""
        for thread in list(self._threads):
            thread.join(timeout)

    def _call(self, request_id: Any, arguments: Any, cancel: threading.Event) -> None:
        try:
            if not isinstance(arguments, dict) or not isinstance(arguments.get("tool_name"), str):
                verdict = _deny("cp-agent: the permission request names no tool_name")
            else:
                verdict = self.ask(arguments, cancel)
        except Exception as exc:  # never leave claude without an answer
            verdict = _deny(f"cp-agent could not ask a person: {exc}")
        finally:
            self._cancels.pop(_hashable(request_id), None)
        if cancel.is_set():
            return  # claude gave up on it: MCP sends no answer to a cancelled request
        if verdict.get("behavior") == "allow":
            tool_input = arguments.get("input") if isinstance(arguments.get("input"), dict) else {}
            decision: dict = {"behavior": "allow", "updatedInput": tool_input}
        else:
            decision = _deny(str(verdict.get("message") or "denied by a person"))
        self._result(request_id, {"content": [{"type": "text", "text": json.dumps(decision)}]})

    def _result(self, request_id: Any, result: dict) -> None:
        self._send({"jsonrpc": "2.0", "id": request_id, "result": result})

    def _error(self, request_id: Any, code: int, message: str) -> None:
        self._send({"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}})

    def _send(self, message: dict) -> None:
        with self._write_lock:
            if not self._stopped:
                self._write(json.dumps(message, separators=(",", ":")))

    def stop_writing(self) -> None:
        """No answer is written after this returns; one being written is finished first."""
        with self._write_lock:
            self._stopped = True


def _hashable(value: Any) -> Any:
    return value if isinstance(value, (str, int, float, type(None))) else json.dumps(value, sort_keys=True)


def relay_to_daemon(socket_path: Path, arguments: dict, cancel: threading.Event) -> dict:
    """One prompt, over the daemon's socket: the verdict, or a deny saying why there is none."""
    request = {"tool_name": arguments.get("tool_name"), "input": arguments.get("input"),
               "tool_use_id": arguments.get("tool_use_id")}  # fmt: skip
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            _on_unix_path(conn.connect, socket_path)
            conn.sendall(json.dumps(request).encode() + b"\n")
            conn.settimeout(0.5)
            data = bytearray()
            while b"\n" not in data:
                if cancel.is_set():
                    return _deny("canceled")  # closing the connection tells the daemon to stop waiting
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    continue
                if not chunk:
                    return _deny("cp-agent: the agent daemon went away before a person answered")
                data += chunk
    except OSError as exc:
        return _deny(f"cp-agent: the agent daemon cannot be asked ({exc})")
    try:
        verdict = json.loads(bytes(data).split(b"\n", 1)[0])
    except ValueError:
        verdict = None
    return verdict if isinstance(verdict, dict) else _deny("cp-agent: the agent daemon gave no verdict")


def serve_mcp_permissions(socket_path: str) -> NoReturn:
    """`cp_agent.py --mcp-permissions SOCKET`, started by claude: serve MCP on stdin/stdout until EOF."""
    out = sys.stdout.buffer

    def write(line: str) -> None:
        out.write(line.encode() + b"\n")
        out.flush()

    server = McpPermissionServer(write, lambda args, cancel: relay_to_daemon(Path(socket_path), args, cancel))
    for raw in sys.stdin.buffer:
        server.feed(raw.decode("utf-8", "replace"))
    # claude went away: prompts still under way are moot. A call's thread may be inside write() right now, and
    # Python aborts (SIGABRT) when it finalizes while a daemon thread holds stdout's lock; so stop the writes,
    # and leave without finalizing (the daemon sees the prompts' connections close and stops waiting).
    server.stop_writing()
    os._exit(0)


# ==== end of MCP relay


# --------------------------------------------------------------------------------------------- git workspaces


class GitError(Exception):
    """A git step failed; `code` is the error's first word for the server (merge_conflict, git_failed)."""

    def __init__(self, message: str, code: str = "git_failed"):
        super().__init__(message)
        self.code = code


def git_environ(base: dict[str, str] | None = None) -> dict[str, str]:
    """git that never waits for a person: no terminal prompt, ssh in batch mode. The host's own credentials
    (ssh keys, credential helpers, ~/.gitconfig) are used; the control plane sends none."""
    env = dict(os.environ if base is None else base)
    env["GIT_TERMINAL_PROMPT"] = "0"
    env.setdefault("GIT_SSH_COMMAND", "ssh -o BatchMode=yes -o ConnectTimeout=30")
    env["LC_ALL"] = "C"
    return env


def run_git(
    args: list[str],
    cwd: Path | None = None,
    timeout: float = GIT_LOCAL_TIMEOUT_S,
    check: bool = True,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """One git command, bounded in time; GitError naming it and git's last line when it fails."""
    try:
        proc = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, errors="replace", timeout=timeout,
            env=env or git_environ(), stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise GitError(f"git {args[0]} gave no answer within {timeout:g} s") from None
    except OSError as exc:
        raise GitError(f"cannot run git: {exc}") from None
    if check and proc.returncode != 0:
        why = next((ln for ln in reversed(proc.stderr.splitlines()) if ln.strip()), f"exit {proc.returncode}")
        raise GitError(f"git {args[0]} failed: {why.strip()}")
    return proc


def check_git() -> ExecutorCheck:
    """The `git` executor's pre-flight: the binary answers and supports worktrees (git 2.17 and later)."""
    try:
        proc = run_git(["--version"], timeout=10)
    except GitError as exc:
        return ExecutorCheck(False, str(exc))
    number = re.search(r"(\d+)\.(\d+)(?:\.\d+)?", proc.stdout)
    if not number:
        return ExecutorCheck(False, f"unrecognised git version: {proc.stdout.strip()}")
    if (int(number.group(1)), int(number.group(2))) < (2, 17):
        return ExecutorCheck(False, f"git {number.group(0)} is too old: worktrees need 2.17 or later")
    return ExecutorCheck(True, proc.stdout.strip(), number.group(0))


class RepoCache:
    """One bare clone per repository under the agent's work dir, shared by its tasks. Fetches and worktree
    changes hold the cache's lock (flock: released by the kernel if the daemon dies, so a SIGKILLed agent
    leaves a usable cache); tasks then work in their own worktrees without it."""

    def __init__(self, root: Path, repo: str):
        self.repo = repo
        digest = hashlib.sha256(repo.encode()).hexdigest()[:16]
        self.path = root / f"{safe_name(repo.rsplit('/', 1)[-1].removesuffix('.git'))[:40]}-{digest}.git"
        self._lock_path = root / f"{self.path.name}.lock"

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        self._lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "a+") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                self._clear_stale_locks()  # we hold the lock: any git lock file left is a dead process's
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _clear_stale_locks(self) -> None:
        for name in ("index.lock", "shallow.lock", "packed-refs.lock", "config.lock"):
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
        refs = self.path / "refs"
        if refs.is_dir():
            for lock in refs.rglob("*.lock"):
                with contextlib.suppress(FileNotFoundError):
                    lock.unlink()

    def ensure(self, commits: list[str]) -> None:
        """The cache exists and holds every commit of `commits` (fetching what it lacks). Call locked."""
        if not (self.path / "HEAD").exists():
            if self.path.exists():
                shutil.rmtree(self.path)  # a clone that died half-way
            tmp = self.path.with_name(self.path.name + ".tmp")
            if tmp.exists():
                shutil.rmtree(tmp)
            run_git(["clone", "--bare", "--quiet", "--", self.repo, str(tmp)], timeout=GIT_NETWORK_TIMEOUT_S)
            # Several tasks work in this repository at once: no automatic gc under their feet.
            run_git(["config", "gc.auto", "0"], cwd=tmp)
            tmp.rename(self.path)
        missing = [c for c in commits if not self.has(c)]
        if missing:
            # Every branch, as it is now: task branches are force-pushed by retries.
            run_git(["fetch", "--quiet", "--prune", "--force", "origin", "+refs/heads/*:refs/heads/*",
                     "+refs/tags/*:refs/tags/*"], cwd=self.path, timeout=GIT_NETWORK_TIMEOUT_S)  # fmt: skip
        for commit in missing:
            if not self.has(commit):
                # A commit no branch holds any more (a retry replaced it) may still be fetched by its sha.
                got = run_git(["fetch", "--quiet", "origin", commit], cwd=self.path,
                              timeout=GIT_NETWORK_TIMEOUT_S, check=False)  # fmt: skip
                if got.returncode != 0 or not self.has(commit):
                    raise GitError(f"commit {commit} is not in {self.repo}")

    def take_slot(self) -> tuple[Path, Any]:
        """A free worktree slot of this cache, locked for the caller: (its path, the open lock file)."""
        slots = self.path.with_name(self.path.name.removesuffix(".git") + ".slots")
        slots.mkdir(parents=True, exist_ok=True)
        for n in range(256):
            handle = open(slots / f"{n}.lock", "a+")  # noqa: SIM115 - held for the task's whole life
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                continue
            return slots / str(n), handle
        raise GitError("every worktree slot of this repository is in use")

    def has(self, commit: str) -> bool:
        return run_git(["cat-file", "-e", f"{commit}^{{commit}}"], cwd=self.path, check=False).returncode == 0

    def prune(self) -> None:
        if (self.path / "HEAD").exists():
            run_git(["worktree", "prune"], cwd=self.path, check=False)


@dataclass
class Worktree:
    """A task's checkout: at the base commit with its dependencies' commits merged in, in DAG order.

    Worktrees are slots of their cache, used again from task to task: a task takes a free slot (its own lock,
    released by the kernel if the daemon dies), and moving it to the task's base rewrites only the files
    that differ, instead of writing out the whole tree (a 100 MB repository took seconds a task). Before
    use a slot is forced to the base and cleaned of everything untracked or ignored, so nothing of an
    earlier task is left in it."""

    cache: RepoCache
    path: Path | None = None
    merged_head: str = ""  # HEAD after the merges, before the executor: what the task's diff is against
    _slot: Any = None

    def create(self, base: str, merges: list[str], names: dict[str, str], identity: tuple[str, str]) -> None:
        """Check out `base` and merge `merges` (names: sha -> dependency keys, for a conflict's message).
        GitError `merge_conflict` naming the files and the dependencies when a merge conflicts."""
        self.path, self._slot = self.cache.take_slot()
        with self.cache.locked():
            self.cache.prune()
            self.cache.ensure([base, *merges])
            usable = (self.path / ".git").exists() and run_git(
                ["rev-parse", "--git-dir"], cwd=self.path, check=False
            ).returncode == 0
            if not usable:
                if self.path.exists():
                    shutil.rmtree(self.path)
                run_git(["worktree", "add", "--detach", "--force", str(self.path), base], cwd=self.cache.path)
        if usable:
            run_git(["merge", "--abort"], cwd=self.path, check=False)  # a killed task's half merge, if any
            run_git(["checkout", "--quiet", "--force", "--detach", base], cwd=self.path)
            run_git(["clean", "-ffdxq"], cwd=self.path)
        user, email = identity
        merged: list[str] = []
        for sha in merges:
            got = run_git(["-c", f"user.name={user}", "-c", f"user.email={email}", "merge", "--no-edit",
                           "-m", f"Merge {names.get(sha, sha[:12])}", sha], cwd=self.path, check=False)  # fmt: skip
            if got.returncode != 0:
                files = run_git(["diff", "--name-only", "--diff-filter=U"], cwd=self.path, check=False).stdout.split()
                if not files:
                    raise GitError(f"merging {names.get(sha, sha)} failed: {got.stdout.strip() or got.stderr.strip()}")
                run_git(["merge", "--abort"], cwd=self.path, check=False)
                upstream = ", ".join([names.get(s, s[:12]) for s in merged] + [names.get(sha, sha[:12])])
                raise GitError(f"merge_conflict: {', '.join(files[:50])} (merging {upstream})", "merge_conflict")
            merged.append(sha)
        self.merged_head = self.head()

    def head(self) -> str:
        return run_git(["rev-parse", "HEAD"], cwd=self.path).stdout.strip()

    def commit_all(self, message: str, identity: tuple[str, str]) -> str | None:
        """Commit every change the executor made (new files too); None when it changed nothing."""
        run_git(["add", "-A"], cwd=self.path)
        if run_git(["diff", "--cached", "--quiet"], cwd=self.path, check=False).returncode == 0:
            return None
        user, email = identity
        run_git(["-c", f"user.name={user}", "-c", f"user.email={email}", "commit", "--quiet", "--no-verify",
                 "-m", message], cwd=self.path)  # fmt: skip
        return self.head()

    def push(self, branch: str) -> None:
        """HEAD to `branch`, replacing what a previous attempt pushed there."""
        run_git(["push", "--quiet", "--force", "origin", f"HEAD:refs/heads/{branch}"], cwd=self.path,
                timeout=GIT_NETWORK_TIMEOUT_S)  # fmt: skip

    def diffstat(self, since: str) -> dict:
        """{files_changed, insertions, deletions, files: [{path, insertions, deletions}]} from `since` to HEAD."""
        out = run_git(["diff", "--numstat", "-z", "--no-renames", since, "HEAD"], cwd=self.path).stdout
        files, ins, dels = [], 0, 0
        for entry in out.split("\0"):
            parts = entry.split("\t", 2)
            if len(parts) != 3:
                continue
            added, removed, path = parts
            a = int(added) if added.isdigit() else 0  # "-" for a binary file
            r = int(removed) if removed.isdigit() else 0
            files.append({"path": path, "insertions": a, "deletions": r})
            ins, dels = ins + a, dels + r
        return {"files_changed": len(files), "insertions": ins, "deletions": dels, "files": files[:10_000]}

    def patch(self, since: str) -> bytes:
        proc = subprocess.run(
            ["git", "diff", "--no-color", "--binary", since, "HEAD"], cwd=self.path, capture_output=True,
            timeout=GIT_LOCAL_TIMEOUT_S, env=git_environ(), stdin=subprocess.DEVNULL, check=False,
        )  # fmt: skip
        return proc.stdout[:DIFF_MAX_BYTES]

    def release(self, keep_at: Path | None = None) -> None:
        """Give the slot back for the next task; or, with `keep_at`, move this worktree there for a person
        to look at (a failed attempt's) and leave the slot to be made afresh."""
        if self.path is None:
            return
        try:
            if keep_at is not None:
                with self.cache.locked():
                    run_git(["worktree", "move", str(self.path), str(keep_at)], cwd=self.cache.path, check=False)
        finally:
            if self._slot is not None:
                self._slot.close()  # the flock goes with the file
                self._slot = None


# An attempt's folder under WORK_DIR: KEY-<first 8 hex of the attempt id> (TaskRun.work_dir), with inputs/.
ATTEMPT_FOLDER_RE = re.compile(r".+-[0-9a-f]{8}")


def is_attempt_folder(path: Path) -> bool:
    return bool(ATTEMPT_FOLDER_RE.fullmatch(path.name)) and (path / "inputs").is_dir()


def prune_kept_worktrees(work_dir: Path, keep_hours: float, keep_task_folders: bool = False) -> int:
    """At start: remove failed attempts' folders and worktrees kept longer than `keep_hours` (every attempt
    folder that old unless `keep_task_folders`: a killed daemon's too), and forget worktrees that are gone
    (a SIGKILLed daemon's), in every cache. Returns how many were removed."""
    removed = 0
    cutoff = time.time() - keep_hours * 3600
    found = {p.parent for p in work_dir.glob("*/repo") if p.is_dir()}
    if not keep_task_folders:
        found |= {p for p in work_dir.iterdir() if p.is_dir() and is_attempt_folder(p)}
    for attempt_dir in found:
        try:
            if attempt_dir.stat().st_mtime < cutoff:
                shutil.rmtree(attempt_dir, ignore_errors=True)
                removed += 1
        except OSError:
            continue
    for cache in (work_dir / "git").glob("*.git"):
        run_git(["worktree", "prune"], cwd=cache, check=False)
    return removed


class GitExecutor(Executor):
    """`git`: what workspace tasks need of an agent (the server offers them only to agents whose pre-flight
    passed it), and the executor of a run's result task, whose whole work is the merge of its dependencies:
    done, as for every workspace task, before the executor runs (TaskRun._prepare_workspace)."""

    name = "git"

    def check(self) -> ExecutorCheck:
        return check_git()

    def run(self, ctx: TaskContext) -> ExecResult:
        return ExecResult({"output": ""}, 0, "")


EXECUTOR_CLASSES: dict[str, type[Executor]] = {
    "shell": ShellExecutor,
    "simulated": SimulatedExecutor,
    "claude": ClaudeExecutor,
    "codex": CodexExecutor,
    "git": GitExecutor,
}


def _shown_input(tool_input: Any) -> dict:
    """A tool's input as the person is shown it: whole, unless it is huge (a long Write), then with long
    strings cut; the CLI is given back its own input, never this."""
    if not isinstance(tool_input, dict):
        return {}
    if len(json.dumps(tool_input)) <= INPUT_BODY_MAX_BYTES:
        return tool_input
    keep = 20_000
    cut = {k: v if not isinstance(v, str) or len(v) <= keep else f"{v[:keep]}… ({len(v) - keep} more characters)"
           for k, v in tool_input.items()}  # fmt: skip
    if len(json.dumps(cut)) <= INPUT_BODY_MAX_BYTES:
        return cut
    return {"cp_agent": f"the input is too large to show ({len(json.dumps(tool_input))} bytes of JSON)"}


def build_executors(names: list[str] | tuple[str, ...], environ: dict[str, str] | None = None) -> dict[str, Executor]:
    return {name: EXECUTOR_CLASSES[name](environ) for name in names}


def default_executor_names(environ: dict[str, str] | None = None) -> list[str]:
    found = [e.name for e in (ClaudeExecutor(environ), CodexExecutor(environ)) if e.binary]
    return ["shell", "simulated", *found, "git"]


def check_executors(executors: dict[str, Executor]) -> dict[str, ExecutorCheck]:
    """Each executor's check; registration sends the versions found, --check prints them all."""
    return {name: executor.check() for name, executor in executors.items()}


# --------------------------------------------------------------------------------------------- the agent


class ProgressStream:
    """An attempt's progress, message and new output, sent from a thread of its own at most twice a second,
    so a chatty task neither floods the server nor waits on the network."""

    def __init__(self, send: Callable[[dict], None], name: str):
        self._send = send
        self._lock = threading.Lock()
        self._progress, self._message, self._log_chars = 0.0, "", 0
        self._log: list[str] = []
        self._dirty = False
        self._usage: dict = {}
        self._usage_dirty = False
        self._wake, self._closed = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"progress-{name}")

    def start(self) -> None:
        self._thread.start()

    def report(self, progress: float | None = None, message: str | None = None) -> None:
        with self._lock:
            if progress is not None:
                self._progress = min(1.0, max(0.0, float(progress)))
            if message is not None:
                self._message = message[:MESSAGE_MAX_CHARS]
            self._dirty = True
        self._wake.set()

    def log(self, text: str) -> None:
        if not text:
            return
        with self._lock:
            self._log.append(text)
            self._log_chars += len(text)
            if self._log_chars > 2 * LOG_CHUNK_BYTES:  # the server is slow: keep what one call may carry
                self._log = [tail_utf8("".join(self._log), LOG_CHUNK_BYTES)]
                self._log_chars = len(self._log[0])
            self._dirty = True
        self._wake.set()

    def usage(self, usage: dict) -> None:
        """An AI CLI's usage so far (cumulative), sent with the next progress when it changed."""
        with self._lock:
            if usage != self._usage:
                self._usage, self._usage_dirty, self._dirty = dict(usage), True, True
        self._wake.set()

    def _take(self) -> dict | None:
        with self._lock:
            if not self._dirty:
                return None
            text = tail_utf8("".join(self._log), LOG_CHUNK_BYTES)
            self._log, self._log_chars, self._dirty = [], 0, False
            payload = {"progress": self._progress, "message": self._message, "log": text}
            if self._usage_dirty:
                payload["usage"], self._usage_dirty = self._usage, False
            return payload

    def _loop(self) -> None:
        last_sent = 0.0
        while not self._closed.is_set():
            self._wake.wait(1.0)
            gap = last_sent + PROGRESS_MIN_GAP_S - time.monotonic()
            if gap > 0 and self._closed.wait(gap):
                break
            self._wake.clear()
            payload = self._take()
            if payload:
                self._send(payload)
                last_sent = time.monotonic()

    def flush(self) -> None:
        """Send what is pending now, from the caller's thread."""
        payload = self._take()
        if payload:
            self._send(payload)

    def close(self) -> None:
        """Stop the thread, then flush."""
        self._closed.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=TASK_CALL_PATIENCE_S + 5)
        self.flush()


class TaskRun:
    """One attempt on this agent, from assignment to completion, in a thread of its own."""

    def __init__(self, agent: Agent, assignment: dict):
        self.agent = agent
        self.attempt_id: str = assignment["attempt_id"]
        self.task: dict = assignment["task"]
        self.key = str(self.task.get("key") or "task")
        self.work_dir = agent.config.work_dir / f"{safe_name(self.key)}-{self.attempt_id[:8]}"
        self.canceled = threading.Event()
        self.cancel_reason = ""
        self.stale = False
        self.succeeded = False  # reported as succeeded: its folder can go at once
        self._lock = threading.Lock()
        self.stream = ProgressStream(self._send_progress, self.key)
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"task-{self.key}")

    def cancel(self, reason: str) -> None:
        with self._lock:
            self.cancel_reason = self.cancel_reason or reason
        self.canceled.set()

    def abandon(self, why: Exception) -> None:
        """The attempt is no longer ours: stop the work and never complete it."""
        if not self.stale:
            log.warning("attempt %s of %s is no longer ours (%s); stopping it", self.attempt_id, self.key, why)
        self.stale = True
        self.cancel("stale attempt")

    def _call(self, path: str, payload: Any = None, **kwargs: Any) -> dict | None:
        """An attempt call; None when it did not go through (an answer saying the attempt is no longer ours
        abandons it)."""
        try:
            return self.agent.call_for_task(f"/attempts/{self.attempt_id}/{path}", payload, **kwargs)
        except ApiError as exc:
            if exc.status == 400 and isinstance(payload, dict) and payload.get("outcome") == "rate_limited":
                # A server before PROTOCOL.md v1.1 knows no rate_limited outcome: a plain failure, then.
                log.info("the server refused outcome rate_limited (%s); completing as failed", exc.detail)
                return self._call(path, {**payload, "outcome": "failed"}, **kwargs)
            if exc.status in (401, 403, 404, 409):
                self.abandon(exc)
            else:
                log.warning("%s of attempt %s refused: %s", path, self.attempt_id, exc)
        except TransientError as exc:
            log.warning("%s of attempt %s not delivered: %s", path, self.attempt_id, exc)
        except FatalError as exc:  # may come from the progress thread: tell the agent, do not just die
            self.agent.fail(str(exc))
            self.abandon(exc)
        return None

    def _send_progress(self, payload: dict) -> None:
        answer = self._call("progress", payload)
        if answer and answer.get("cancel") is True and not self.canceled.is_set():
            why = answer.get("cancel_reason") if isinstance(answer.get("cancel_reason"), str) else "timeout"
            log.info("server canceled %s (%s)", self.key, why)
            self.cancel(f"{why}: canceled by server" if why == "budget_exceeded" else f"canceled by server ({why})")

    def _run(self) -> None:
        try:
            self._execute_and_complete()
        except Exception as exc:  # one broken task must not take the daemon down; the server still hears of it
            log.exception("attempt %s of %s crashed", self.attempt_id, self.key)
            if not self.stale:
                self._complete(ExecResult({}, None, f"agent error: {exc}"))
        finally:
            self._remove_folder()
            self.agent.run_finished(self)

    def _remove_folder(self) -> None:
        """Retention on the agent: a succeeded attempt's folder goes once it is reported; a failed one's stays
        for --keep-failed hours for a person to look at (removed at a later start: prune_kept_worktrees);
        --keep-task-folders keeps them all."""
        config = self.agent.config
        if config.keep_task_folders or (not self.succeeded and config.keep_failed_hours > 0):
            return
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def _execute_and_complete(self) -> None:
        executor_name = str(self.task.get("executor"))
        log.info("starting %s (%s, attempt %s)", self.key, executor_name, self.attempt_id)
        if self.work_dir.exists():
            shutil.rmtree(self.work_dir)
        (self.work_dir / "out").mkdir(parents=True)
        self._write_inputs()
        self.stream.report(0.0, "started")
        self.stream.flush()  # before the executor starts: an attempt that is stale already never runs
        if self.stale:
            return
        self.stream.start()
        workspace = given if isinstance(given := self.task.get("workspace"), dict) else None
        worktree, commit = None, None
        outcome = ExecResult({}, None, "not run")
        try:
            if workspace is not None:
                try:
                    worktree = self._prepare_workspace(workspace)
                except GitError as exc:
                    outcome = ExecResult({}, None, str(exc))
            if worktree is not None or workspace is None:
                outcome = self._execute(executor_name, worktree)
            if self.cancel_reason:
                outcome.error = self.cancel_reason
            if worktree is not None and workspace is not None and not outcome.error and not self.stale:
                commit = self._commit_changes(worktree, workspace, executor_name, outcome)
            self.stream.close()
            if self.stale:
                return
            self._upload_artifacts()
            if not self.stale:
                self._complete(outcome, commit)
                self.succeeded = not outcome.error and not self.stale
        finally:
            self.stream.close()
            if worktree is not None:
                self._leave_worktree(worktree, failed=bool(self.stale or outcome.error))

    def _commit_changes(
        self, worktree: Worktree, workspace: dict, executor_name: str, outcome: ExecResult
    ) -> dict | None:
        """The workspace's commit (complete's `commit`), or None with `outcome.error` saying why there is none;
        a commit of nothing when the task was expected to change something sets `outcome.error` too."""
        try:
            commit = self._commit_workspace(worktree, workspace, executor_name)
        except GitError as exc:
            outcome.error = str(exc)
            return None
        if commit.get("sha") is None and self._expects_changes(executor_name):
            outcome.error = "no_changes: the task changed nothing in the repository (params.expect_changes)"
        return commit

    def _expects_changes(self, executor_name: str) -> bool:
        params = given if isinstance(given := self.task.get("params"), dict) else {}
        if isinstance(params.get("expect_changes"), bool):
            return params["expect_changes"]
        return bool(getattr(EXECUTOR_CLASSES.get(executor_name), "expect_changes_default", False))

    def _write_inputs(self) -> None:
        """Each dependency's inputs as $CP_INPUTS_DIR/<key>.json, outside the worktree (PROTOCOL.md v1.1)."""
        inputs = self.task.get("inputs")
        folder = self.work_dir / "inputs"
        folder.mkdir(parents=True, exist_ok=True)
        if isinstance(inputs, dict):
            for key, value in inputs.items():
                (folder / f"{safe_name(str(key))}.json").write_text(json.dumps(value, indent=1))

    def _identity(self) -> tuple[str, str]:
        name = self.agent.config.name
        return name, f"{name}@cp-agent.invalid"

    def _prepare_workspace(self, workspace: dict) -> Worktree:
        """A worktree at the base commit with the dependencies' commits merged in (GitError, e.g.
        merge_conflict, when it cannot be made)."""
        repo, base = workspace.get("repo"), workspace.get("base_commit")
        merges = [m for m in workspace.get("merge") or () if isinstance(m, str)]
        if not isinstance(repo, str) or not isinstance(base, str) or not workspace.get("branch"):
            raise GitError("the assignment's workspace lacks repo, base_commit or branch")
        names: dict[str, str] = {}
        for key, given in (self.task.get("inputs") or {}).items():
            if isinstance(given, dict) and isinstance(given.get("commit"), str):
                names.setdefault(given["commit"], str(key))
        self.stream.report(None, "preparing the worktree")
        worktree = Worktree(RepoCache(self.agent.config.work_dir / "git", repo))
        try:
            worktree.create(base, merges, names, self._identity())
        except BaseException:
            worktree.release()
            raise
        return worktree

    def _commit_workspace(self, worktree: Worktree, workspace: dict, executor_name: str) -> dict:
        """Commit what the executor changed, push the task's branch, upload the patch: complete's `commit`."""
        run_id, number = self.task.get("run_id"), self.task.get("attempt")
        title = str(self.task.get("title") or self.key)
        by = self.agent.config.name
        message = f"{self.key}: {title}\n\nrun {run_id}, attempt {number} ({self.attempt_id}) by {by}"
        sha = worktree.commit_all(message, self._identity())
        if executor_name == GitExecutor.name:
            sha = worktree.head()  # the result task's work is the merge itself
        branch = str(workspace["branch"])
        self.stream.report(None, f"pushing {branch}")
        worktree.push(branch)
        since = worktree.merged_head if executor_name != GitExecutor.name else str(workspace["base_commit"])
        commit: dict[str, Any] = {"sha": sha, "branch": branch, **worktree.diffstat(since)}
        patch = worktree.patch(since) if sha else b""
        if patch:
            body, content_type = encode_artifact("commit.diff", patch)
            answer = self._call("artifacts", body=body, content_type=content_type)
            if answer and isinstance(answer.get("artifact_id"), str):
                commit["diff_artifact"] = answer["artifact_id"]
        return commit

    def _leave_worktree(self, worktree: Worktree, failed: bool) -> None:
        """Give the worktree back; a failed attempt's stays for --keep-failed hours, for a person to look at."""
        keep_at = self.work_dir / "repo" if failed and self.agent.config.keep_failed_hours > 0 else None
        try:
            worktree.release(keep_at)
        except (GitError, OSError) as exc:
            log.warning("could not give back the worktree %s: %s", worktree.path, exc)
        if keep_at is not None:
            log.info("keeping the failed worktree of %s at %s", self.key, keep_at)

    def _execute(self, executor_name: str, worktree: Worktree | None = None) -> ExecResult:
        executor = self.agent.executors.get(executor_name)
        if executor is None:
            return ExecResult({}, None, f"executor {executor_name!r} is not enabled on {self.agent.config.name}")
        if executor_name not in self.agent.usable:  # offered in the instant before a failed re-check landed
            return ExecResult({}, None, f"executor {executor_name!r} failed its pre-flight on {self.agent.config.name}")
        if self.canceled.is_set():
            return ExecResult({}, None, "canceled")
        config = self.agent.config
        ctx = TaskContext(self.task, self.attempt_id, self.work_dir, self.stream.report, self.stream.log)
        ctx.agent_name, ctx.time_scale, ctx.canceled = config.name, config.time_scale, self.canceled
        ctx.records = self.agent.live_tasks
        ctx.worktree = worktree.path if worktree is not None else None
        ctx.pass_env = config.pass_env
        ctx.report_usage, ctx.sandboxed_host = self.stream.usage, config.sandboxed_host
        ctx.ask_person = self.ask_person
        try:
            return executor.run(ctx)
        except Exception as exc:
            log.exception("executor %s failed on %s", executor_name, self.key)
            return ExecResult({}, None, f"executor error: {exc}")

    def ask_person(self, request: dict, gone: Callable[[], bool]) -> dict:
        """Ask a person whether the CLI may use request["tool"] with request["input"] (PROTOCOL.md v1.1 "Input
        requests"): create the input request, long-poll for the answer, and give the verdict, {"behavior":
        "allow"|"deny", "message"}. Denied when the server cannot ask, the attempt ends, the CLI stops
        waiting (`gone`), or nobody answers within request["timeout_s"] (the server's deny, or ours)."""
        tool, tool_input = str(request.get("tool") or "tool"), request.get("input") or {}
        timeout_s = float(request.get("timeout_s") or INPUT_TIMEOUT_DEFAULT_S)
        said = short_input(tool, tool_input)
        what = said if said.startswith(tool) else f"{tool} {said}"
        self.stream.report(None, f"waiting for a person: {what}")
        self.stream.log(
            f"[cp-agent] waiting for a person: may {self.task.get('executor') or 'the agent'} use {what}?\n"
        )
        body = {"kind": "permission", "tool": tool, "input": _shown_input(tool_input),
                "question": f"May {self.task.get('executor') or 'the agent'} use {what}?",
                "timeout_s": max(1.0, timeout_s)}  # fmt: skip
        verdict = self._ask_and_wait(body, gone, timeout_s)
        allowed = verdict.get("behavior") == "allow"
        message = str(verdict.get("message") or "")
        self.stream.report(None, f"{'allowed' if allowed else 'denied'}: {what}")
        self.stream.log(
            f"[cp-agent] {'allowed' if allowed else 'denied'}: {what}{f' ({message})' if message else ''}\n"
        )
        return {"behavior": "allow", "message": message} if allowed else _deny(message or "denied by a person")

    def _ask_and_wait(self, body: dict, gone: Callable[[], bool], timeout_s: float) -> dict:
        try:
            created = self.agent.call_for_task(f"/attempts/{self.attempt_id}/input-requests", body)
            request_id = str(created["request_id"])
        except ApiError as exc:
            if exc.status == 409:  # the attempt is no longer ours
                self.abandon(exc)
            return _deny(f"the control plane could not ask a person (HTTP {exc.status} {exc.code}: {exc.detail})")
        except (TransientError, KeyError, TypeError) as exc:
            return _deny(f"the control plane could not be reached to ask a person ({exc})")
        except FatalError as exc:
            self.agent.fail(str(exc))
            self.abandon(exc)
            return _deny("the agent stopped")
        return self._wait_for_answer(request_id, gone, timeout_s)

    def _wait_for_answer(self, request_id: str, gone: Callable[[], bool], timeout_s: float) -> dict:
        """Long-poll the input request until a person answers it (the answer), or a denial saying why not:
        the attempt canceled, claude gone, the deadline passed, the request refused, the agent stopped."""
        # The server denies at timeout_s itself; this deadline is the backstop should it not.
        deadline = time.monotonic() + timeout_s + 2 * INPUT_WAIT_S
        while True:
            if self.canceled.is_set():
                return _deny(self.cancel_reason or "canceled")
            if gone():
                return _deny("claude no longer waits for the answer")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _deny(f"nobody answered within {timeout_s:g} s (params.input_timeout_s): denied")
            wait_s = max(0.0, min(INPUT_WAIT_S, self.agent.timings["max_wait_s"], remaining))
            try:
                state = self.agent.call_for_task(
                    f"/input-requests/{request_id}/wait", {"wait_s": wait_s}, timeout=wait_s + CLAIM_TIMEOUT_MARGIN_S
                )
            except ApiError as exc:
                if exc.status == 409:
                    self.abandon(exc)
                return _deny(f"the input request failed (HTTP {exc.status} {exc.code}: {exc.detail})")
            except TransientError:
                self.canceled.wait(1.0)
                continue
            except FatalError as exc:
                self.agent.fail(str(exc))
                self.abandon(exc)
                return _deny("the agent stopped")
            answer = state.get("answer")
            if state.get("state") == "answered" and isinstance(answer, dict):
                return answer

    def _upload_artifacts(self) -> None:
        out = self.work_dir / "out"
        for root, _dirs, files in os.walk(out):  # does not descend into symlinked directories
            for filename in sorted(files):
                path = Path(root, filename)
                st = path.lstat()
                if not stat.S_ISREG(st.st_mode):  # a symlink could point anywhere on this host
                    continue
                name = path.relative_to(out).as_posix()
                if st.st_size > ARTIFACT_MAX_BYTES:
                    log.warning("not uploading %s: %d bytes is too large", name, st.st_size)
                    continue
                body, content_type = encode_artifact(name, path.read_bytes())
                if self._call("artifacts", body=body, content_type=content_type) is not None:
                    log.info("uploaded %s of %s (%d bytes)", name, self.key, st.st_size)
                if self.stale:
                    return

    def _complete(self, outcome: ExecResult, commit: dict | None = None) -> None:
        result = outcome.result
        if len(json.dumps(result)) > RESULT_MAX_BYTES:
            result = {"exit_code": outcome.exit_code, "dropped": "the result was larger than 1 MiB"}
        payload: dict[str, Any] = {
            **outcome.extra,  # usage, session_id, resets_at / retry_after_s (PROTOCOL.md v1.1)
            "outcome": outcome.outcome or ("failed" if outcome.error else "succeeded"),
            "result": result,
            "error": outcome.error,
        }
        if outcome.exit_code is not None:
            payload["exit_code"] = outcome.exit_code
        if commit is not None:
            payload["commit"] = commit
        claims = self.agent.may_claim_more()
        if claims:
            # The README's complete-and-claim: this slot's next task comes back in the same answer, one
            # request per task for a busy agent. A server that does not know `claim` ignores it.
            payload["claim"] = {"capacity": 1}
        answer = self._call("complete", payload)
        if answer is not None:
            log.info("%s %s%s", self.key, payload["outcome"], f": {outcome.error}" if outcome.error else "")
            assignments = answer.get("assignments") if claims else None
            for assignment in assignments if isinstance(assignments, list) else []:
                self.agent.start_run(assignment)


class Agent:
    """Registration, the claim loop, heartbeats, commands and shutdown; tasks run in TaskRun threads."""

    def __init__(
        self,
        config: Config,
        executors: dict[str, Executor],
        api: ApiClient | None = None,
    ):
        self.config = config
        self.executors = executors  # every configured one; tasks run only on those in self.usable
        self.usable: list[str] = []
        self._preflight_lock = threading.Lock()
        self.api = api or ApiClient(config.servers, config.ca_file)
        self.state = StateFile(config.state_file)
        self.live_tasks: LiveTasks | None = None  # set by run() once it holds the directory's lock
        self.token = self.agent_id = ""
        self.timings = dict(DEFAULT_TIMINGS)
        self.heartbeat_interval_s = self.wait_s = 0.0
        self._apply_timings({})
        self.fatal = ""
        self._runs: dict[str, TaskRun] = {}
        self._runs_lock = threading.Lock()
        self._auth_lock = threading.Lock()
        self._draining, self._hard_stop = threading.Event(), threading.Event()
        self._exited, self._slot_freed = threading.Event(), threading.Event()
        self._signals = 0

    # ---- lifecycle

    def run(self) -> int:
        """Serve until drained, shut down or unable to go on; returns the exit status."""
        self._install_signal_handlers()
        self._stop_leftovers()
        with contextlib.suppress(GitError, OSError):
            prune_kept_worktrees(self.config.work_dir, self.config.keep_failed_hours, self.config.keep_task_folders)
        report = self.preflight()
        if not [name for name in self.usable if name != GitExecutor.name]:
            log.error("stopped: no executor passed its pre-flight")
            return 1
        try:
            if self._load_or_register(report):
                self._report_preflight(report)  # the saved identity's executors may have changed since
                # Before the first claim: the server learns at once that attempts of our previous life (it
                # lists none of them) are gone, instead of when their leases run out.
                self._heartbeat(stop=self._draining, first=True)
        except FatalError as exc:
            log.error("stopped: %s", exc)
            return 1
        except TransientError:
            return 0  # a signal arrived while the server was unreachable
        log.info(
            "serving as %s (%s); executors %s, capacity %d",
            self.config.name,
            self.agent_id,
            ",".join(self.usable),
            self.config.capacity,
        )
        heartbeat = threading.Thread(target=self._heartbeat_loop, daemon=True, name="heartbeat")
        heartbeat.start()
        self._claim_loop()
        self._wait_for_runs()
        self._exited.set()
        heartbeat.join(timeout=2.0)
        if self.fatal:
            log.error("stopped: %s", self.fatal)
            return 1
        self._say_goodbye()
        log.info("stopped")
        return 0

    def _say_goodbye(self) -> None:
        """Tell the server we stopped cleanly, so the fleet counts us offline now rather than after three
        heartbeat intervals of silence (an extra endpoint, README "API"). One short try after the last
        heartbeat; a server too old to know it (404) or unreachable changes nothing but that."""
        try:
            self.api.request("/agents/goodbye", {}, token=self.token, timeout=GOODBYE_TIMEOUT_S)
        except (ApiError, TransientError, FatalError) as exc:
            log.info("goodbye not delivered: %s", exc)

    def _stop_leftovers(self) -> None:
        """Kill what a previous life of this agent left running (before the server hears from us, so no task
        runs twice), then record our own tasks in the same place."""
        live = LiveTasks(self.config.state_file.with_suffix(".tasks"))
        try:
            locked = live.take_lock()
        except OSError as exc:
            log.warning("cannot use %s, so tasks of this agent's next life may outlive it: %s", live.directory, exc)
            return
        if not locked:
            log.warning("another daemon holds %s: its tasks are not this one's to stop", live.directory)
            return
        stopped = live.kill_leftovers()
        if stopped:
            log.warning("stopped tasks the previous run of this agent left running: %s", ", ".join(stopped))
        self.live_tasks = live

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        # Python runs signal handlers on the main thread only, and an idle main thread may not get to it for
        # a long time when the kernel delivered the signal to another thread. The wakeup fd is written at once
        # by the C-level handler in whichever thread got the signal, so a thread reading it acts promptly; and
        # acting there, not in a handler, cannot deadlock on a lock the interrupted main thread holds.
        read_fd, write_fd = os.pipe()
        os.set_blocking(write_fd, False)
        signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda _signum, _frame: None)  # the work happens in _watch_signals
        threading.Thread(target=self._watch_signals, args=(read_fd,), daemon=True, name="signals").start()

    def _watch_signals(self, read_fd: int) -> None:
        while data := os.read(read_fd, 16):
            for signum in data:
                if signum in (signal.SIGTERM, signal.SIGINT):
                    self._on_signal(signum)

    def _on_signal(self, signum: int) -> None:
        self._signals += 1
        if self._signals == 1:
            log.info("%s: draining (a second signal cancels running tasks)", signal.Signals(signum).name)
            self.begin_drain()
        else:
            log.info("%s: canceling running tasks", signal.Signals(signum).name)
            self.shutdown_now()

    def begin_drain(self) -> None:
        """Claim nothing more; running tasks finish, then the agent exits."""
        self._draining.set()
        self.api.abort_pending()

    def shutdown_now(self) -> None:
        """Cancel running tasks and exit (the main loop does the canceling)."""
        self._hard_stop.set()
        self.begin_drain()
        self._slot_freed.set()

    def fail(self, message: str) -> None:
        self.fatal = self.fatal or message
        self.shutdown_now()

    # ---- identity

    def _apply_timings(self, doc: dict) -> None:
        """Take the server's timings from `doc` (keys it lacks keep their values)."""
        for key in DEFAULT_TIMINGS:
            value = doc.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                self.timings[key] = float(value)
        # Three beats per lease, so one lost heartbeat never costs a running attempt its lease.
        self.heartbeat_interval_s = min(self.timings["heartbeat_interval_s"], self.timings["lease_s"] / 3)
        wanted = self.config.wait_s
        self.wait_s = self.timings["max_wait_s"] if wanted is None else min(wanted, self.timings["max_wait_s"])

    def _load_or_register(self, report: dict) -> bool:
        """Take the saved identity (True) or register (False)."""
        saved = self.state.load(self.config.servers, self.config.name)
        if saved and not self.config.re_enroll:
            self.token, self.agent_id = saved["token"], str(saved.get("agent_id") or "")
            self._apply_timings(saved)
            if saved.get("servers") != self.config.servers:  # the identity follows the list it is used with
                self.state.save({**saved, "server": self.config.servers[0], "servers": self.config.servers})
            log.info("reusing the identity saved in %s", self.state.path)
            return True
        if not self.config.enrollment_token:
            raise FatalError(
                f"{'--re-enroll needs' if saved else f'no saved identity in {self.state.path} and no'} an "
                "enrollment token: pass --enrollment-token or set CP_ENROLLMENT_TOKEN"
            )
        # Re-enrolling proves it holds the old token, so the server rotates it even while it counts as online.
        self._register(report, replaces=saved["token"] if saved else None)
        return False

    # ---- pre-flight

    def preflight(self) -> dict:
        """Check every configured executor now (CLI found, its version); only those that pass get tasks.
        Returns the report the server keeps: {name: {"usable", "detail", "version"}}."""
        checks = check_executors(self.executors)
        self.usable = [name for name, check in checks.items() if check.usable]
        for name, check in checks.items():
            if check.usable:
                log.info("pre-flight: %s ok (%s)", name, check.detail)
            else:
                log.warning("pre-flight: %s FAILED, it gets no tasks: %s", name, check.detail)
        return {name: {"usable": c.usable, "detail": c.detail, "version": c.version} for name, c in checks.items()}

    def _report_preflight(self, report: dict) -> None:
        try:
            self._call("/agents/preflight", {"preflight": report}, stop=self._draining, patience=TASK_CALL_PATIENCE_S)
        except ApiError as exc:  # a server older than this daemon keeps the executors registered before
            log.warning("pre-flight report refused: %s", exc)
        except TransientError as exc:
            log.warning("pre-flight report not delivered: %s", exc)

    def _recheck(self) -> None:
        """The operator's `preflight` command: check again and report; a parked claim is cut short so the
        next one is matched against the new executor set."""
        if not self._preflight_lock.acquire(blocking=False):
            return  # a re-check is under way already
        try:
            before = list(self.usable)
            self._report_preflight(self.preflight())
            if self.usable != before:
                self.api.abort_pending()
        except FatalError as exc:
            self.fail(str(exc))
        finally:
            self._preflight_lock.release()

    # ---- registration

    def _register(self, report: dict, replaces: str | None = None) -> None:
        body = {
            "name": self.config.name,
            "labels": self.config.labels,
            "hostname": socket.gethostname(),
            "version": VERSION,
            "executors": list(self.usable),
            "capacity": self.config.capacity,
            "executor_versions": {name: c["version"] for name, c in report.items() if c["usable"] and c["version"]},
            "preflight": report,
        }
        if replaces:
            body["replaces_token"] = replaces
        give_up_at = time.monotonic() + NAME_TAKEN_PATIENCE_S
        while True:
            try:
                answer = self.api.call(
                    "/agents/register", body, token=self.config.enrollment_token, stop=self._draining
                )
                break
            except ApiError as exc:
                # 409: a predecessor of this name (crashed, state file lost) still counts as online.
                if exc.status != 409 or time.monotonic() > give_up_at:
                    raise FatalError(f"registration refused: {exc}") from exc
                log.warning(
                    "name %s is online on the server (%s); retrying until it goes offline", self.config.name, exc.detail
                )
                if self._draining.wait(5.0):
                    raise TransientError("registration interrupted") from exc
        token = answer.get("token")
        if not isinstance(token, str) or not token:
            raise FatalError("registration answer has no token")
        self.token, self.agent_id = token, str(answer.get("agent_id") or "")
        self._apply_timings(answer)
        # The timings are saved too: a restart reusing the token gets no register answer to learn them from.
        self.state.save(
            {
                "agent_id": self.agent_id,
                "token": token,
                "name": self.config.name,
                "server": self.config.servers[0],  # what a daemon before 1.2 reads
                "servers": self.config.servers,
                **self.timings,
            }
        )
        log.info("registered as agent %s", self.agent_id)

    def _call(self, path: str, payload: Any = None, **kwargs: Any) -> dict:
        """An agent-token call. A 401 means the server no longer knows this identity: register again (if
        the enrollment token allows) and repeat the call once."""
        token = self.token
        try:
            return self.api.call(path, payload, token=token, **kwargs)
        except ApiError as exc:
            if exc.status != 401:
                raise
            if exc.code in IDENTITY_GONE:
                raise FatalError(
                    f"{IDENTITY_GONE[exc.code]} ({exc.detail}); to enroll again, start it with --re-enroll "
                    "and an enrollment token"
                ) from exc
        with self._auth_lock:
            if self.token == token:  # else another thread has registered again already
                if not self.config.enrollment_token:
                    raise FatalError(
                        "the server does not know this agent's token and there is no enrollment token to "
                        "register again with: pass --enrollment-token or set CP_ENROLLMENT_TOKEN"
                    )
                log.warning("the server does not know the agent token; registering again")
                self._register(self.preflight())
        return self.api.call(path, payload, token=self.token, **kwargs)

    def call_for_task(self, path: str, payload: Any = None, **kwargs: Any) -> dict:
        # Bounded, and cut to one try on a hard stop so shutdown stays prompt.
        return self._call(path, payload, stop=self._hard_stop, patience=TASK_CALL_PATIENCE_S, **kwargs)

    # ---- loops

    def _claim_loop(self) -> None:
        backoff = Backoff()
        while not self._draining.is_set():
            self._slot_freed.clear()
            free = self.config.capacity - len(self._runs)
            if free <= 0:
                self._slot_freed.wait(1.0)
                continue
            started = time.monotonic()
            try:
                answer = self._call(
                    "/agents/claim",
                    {"capacity": free, "wait_s": self.wait_s},
                    stop=self._draining,
                    abort_on=self._draining,
                    timeout=self.wait_s + CLAIM_TIMEOUT_MARGIN_S,
                )
            except TransientError:
                continue  # only raised once draining
            except FatalError as exc:
                self.fail(str(exc))
                return
            except ApiError as exc:
                if exc.status == 403:
                    self.fail(f"the server refuses this agent ({exc.detail or exc.code}); is it disabled?")
                    return
                if exc.status == 400 and "wait_s" in exc.detail and self.wait_s > 0:
                    # Timings saved with the identity may predate a server change; wait less until it fits.
                    self.timings["max_wait_s"] = self.wait_s // 2
                    self._apply_timings({})
                log.error("claim refused: %s", exc)
                self._draining.wait(backoff.next_delay())
                continue
            assignments = answer.get("assignments") or []
            for assignment in assignments:
                self.start_run(assignment)
            if not assignments and time.monotonic() - started < 1.0:
                self._draining.wait(1.0)  # a server answering empty at once must not make us spin

    def may_claim_more(self) -> bool:
        """Whether a task ending now may claim the next in its completion: not while draining (nor with
        --once, which drains after one task)."""
        return not (self._draining.is_set() or self.config.once)

    def start_run(self, assignment: Any) -> None:
        """Run an assignment from a claim (or a completion's claim) in a TaskRun thread of its own."""
        if not (
            isinstance(assignment, dict)
            and isinstance(assignment.get("attempt_id"), str)
            and isinstance(assignment.get("task"), dict)
        ):
            log.error("ignoring a malformed assignment: %r", assignment)
            return
        run = TaskRun(self, assignment)
        with self._runs_lock:
            if run.attempt_id in self._runs:
                return
            self._runs[run.attempt_id] = run
        run.thread.start()

    def run_finished(self, run: TaskRun) -> None:
        with self._runs_lock:
            self._runs.pop(run.attempt_id, None)
        self._slot_freed.set()
        if self.config.once:
            self.begin_drain()

    def _wait_for_runs(self) -> None:
        give_up_at = None
        while True:
            self._slot_freed.clear()
            with self._runs_lock:
                runs = list(self._runs.values())
            if not runs:
                return
            if self._hard_stop.is_set():
                if give_up_at is None:
                    for run in runs:
                        run.cancel("canceled: agent shutting down")
                    give_up_at = time.monotonic() + KILL_GRACE_S + 5
                elif time.monotonic() > give_up_at:
                    log.error("leaving %d task(s) behind", len(runs))
                    return
            self._slot_freed.wait(0.5)

    def _heartbeat_loop(self) -> None:
        while not self._exited.wait(self.heartbeat_interval_s) and self._heartbeat(stop=self._exited):
            pass

    def _heartbeat(self, stop: threading.Event, first: bool = False) -> bool:
        """One heartbeat listing the attempts this agent runs, then the commands of the answer obeyed; False
        when the agent must stop. The `first` of this life, before any claim, tells the server that every
        attempt of ours it knows is our previous life's (an extra to PROTOCOL.md, README "API")."""
        with self._runs_lock:
            attempts = [run.attempt_id for run in self._runs.values() if not run.stale]
        status = "draining" if self._draining.is_set() else "busy" if attempts else "idle"
        body: dict[str, Any] = {"status": status, "attempts": attempts}
        if first:
            body["first"] = True
        try:
            answer = self._call("/agents/heartbeat", body, stop=stop)
        except TransientError:
            return True
        except ApiError as exc:
            if exc.status == 403:  # disabled: stop now, not heartbeat into refusals forever
                self.fail(f"the server refuses this agent ({exc.detail or exc.code}); is it disabled?")
                return False
            log.warning("heartbeat refused: %s", exc)
            return True
        except FatalError as exc:
            self.fail(str(exc))
            return False
        self._apply_timings(answer)  # a server may announce changed timings here; PROTOCOL.md has none
        for command in answer.get("commands") or []:
            self._obey(command)
        return True

    def _obey(self, command: Any) -> None:
        kind = command.get("type") if isinstance(command, dict) else None
        if kind == "cancel":
            with self._runs_lock:
                run = self._runs.get(str(command.get("attempt_id")))
            if run:
                log.info("server canceled %s", run.key)
                run.cancel("canceled by server")
        elif kind == "drain":
            if not self._draining.is_set():
                log.info("server asked to drain")
            self.begin_drain()
        elif kind == "shutdown":
            if not self._hard_stop.is_set():
                log.info("server asked to shut down")
            self.shutdown_now()
        elif kind == "preflight":
            log.info("server asked for a pre-flight")
            # CLIs answer --version slowly at times; heartbeats must not wait for them.
            threading.Thread(target=self._recheck, daemon=True, name="preflight").start()
        else:
            log.warning("ignoring unknown command %r", command)


# --------------------------------------------------------------------------------------------- entry


def run_check(config: Config) -> int:
    """The pre-flight: which executors work on this host, and whether the servers answer (one line each;
    it passes when an executor is usable and a server answers)."""
    checks = check_executors(build_executors(KNOWN_EXECUTORS))
    for name, check in checks.items():
        print(f"executor {name}: {'ok' if check.usable else 'unusable'} ({check.detail})")
    if not config.servers:
        print("server: not configured (--server or CP_SERVER)")
    api, answering = ApiClient(config.servers, config.ca_file), 0
    for index, url in enumerate(config.servers):
        try:
            status, doc = api.health(index)
        except (TransientError, FatalError) as exc:
            text = f"unreachable ({url}: {exc})"
        else:
            server_ok = status == 200 and bool(doc)
            answering += server_ok
            answer = json.dumps(doc) if server_ok else "not the expected 200 JSON"
            text = f"{'ok' if server_ok else 'error'} ({url} answered HTTP {status}, {answer})"
        print(f"server: {text}")
    return 0 if answering and any(check.usable for check in checks.values()) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [SUPERVISE_FLAG]:  # what the supervisor's own program runs (supervisor_command)
        return supervise_main(argv)
    if argv[:1] == [MCP_FLAG]:  # started by claude for a task: --mcp-permissions SOCKET
        if len(argv) != 2:
            print(f"cp_agent: usage: {MCP_FLAG} SOCKET", file=sys.stderr)
            return 2
        return serve_mcp_permissions(argv[1])
    try:
        config = Config.from_argv(argv)
    except ConfigError as exc:
        print(f"cp_agent: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level, stream=sys.stderr, format=f"%(asctime)s {config.name} %(levelname)s %(message)s"
    )
    # This agent's own CLI homes, for pre-flight's login checks and its tasks alike (both pass the allow-list).
    for variable, folder in (("CLAUDE_CONFIG_DIR", config.claude_config_dir), ("CODEX_HOME", config.codex_home)):
        if folder:
            path = Path(folder).expanduser().absolute()
            path.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.environ[variable] = str(path)
    if config.check:
        return run_check(config)
    return Agent(config, build_executors(config.executors)).run()


if __name__ == "__main__":
    sys.exit(main())
