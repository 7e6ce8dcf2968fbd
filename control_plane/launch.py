"""Starting the real processes (server, django-q2 cluster, agent daemons) for the demo, tests and bench."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AGENT_SCRIPT = ROOT / "agents_app" / "cp_agent.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(port: int, kind: str = "uvicorn", host: str = "127.0.0.1", workers: int = 1) -> list[str]:
    bindir = Path(sys.executable).parent
    if kind == "daphne":
        return [str(bindir / "daphne"), "-b", host, "-p", str(port), "control_plane.asgi:application"]
    return [
        str(bindir / "uvicorn"), "control_plane.asgi:application", "--host", host, "--port", str(port),
        "--no-access-log", "--log-level", "warning", "--workers", str(workers),
    ]  # fmt: skip


def start_server(
    port: int, env: dict | None = None, kind: str = "uvicorn", workers: int = 1, log: Path | None = None
) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    proc = subprocess.Popen(
        server_command(port, kind, workers=workers),
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    wait_http(f"http://127.0.0.1:{port}/api/v1/health", proc)
    return proc


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def start_qcluster(env: dict | None = None, log: Path | None = None) -> subprocess.Popen:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        [sys.executable, "manage.py", "qcluster"],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def start_agent(
    server: str,
    enrollment_token: str,
    name: str,
    labels: list[str],
    work_dir: Path,
    executors: list[str] | None = None,
    extra: list[str] | None = None,
    env: dict | None = None,
    log: Path | None = None,
    python: str | None = None,
) -> subprocess.Popen:
    """An agent daemon process, exactly as a remote host would run it (stdlib only, one file)."""
    cmd = [
        python or sys.executable, str(AGENT_SCRIPT), "--server", server, "--name", name,
        "--labels", ",".join(labels), "--work-dir", str(work_dir),
    ]  # fmt: skip
    if executors:
        cmd += ["--executors", ",".join(executors)]
    cmd += extra or []
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    return subprocess.Popen(
        cmd,
        env={**os.environ, "CP_ENROLLMENT_TOKEN": enrollment_token, **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    """Signal the process (and its group); kill it if it does not exit in time."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)
