"""Starting the real processes (server, django-q2 cluster, agent daemons) for the demo, tests and bench,
and the server command of `./run serve` (python -m control_plane.launch --help)."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import ssl
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


def _twisted_escape(path: str) -> str:
    # Twisted endpoint strings separate fields with ':' and '='; a backslash makes either literal.
    return path.replace("\\", "\\\\").replace(":", "\\:").replace("=", "\\=")


def server_command(
    port: int,
    kind: str = "uvicorn",
    host: str = "127.0.0.1",
    workers: int = 1,
    tls: tuple[str, str] | None = None,
    log_level: str = "warning",
) -> list[str]:
    """The ASGI server's argv; `tls` = (certificate file, key file) serves HTTPS on `port` instead of HTTP."""
    bindir = Path(sys.executable).parent
    if kind == "daphne":
        if tls:
            cert, key = (_twisted_escape(str(Path(f).absolute())) for f in tls)
            where = ["-e", f"ssl:{port}:interface={_twisted_escape(host)}:privateKey={key}:certKey={cert}"]
        else:
            where = ["-b", host, "-p", str(port)]
        return [str(bindir / "daphne"), *where, "control_plane.asgi:application"]
    tls_args = ["--ssl-certfile", tls[0], "--ssl-keyfile", tls[1]] if tls else []
    return [
        str(bindir / "uvicorn"), "control_plane.asgi:application", "--host", host, "--port", str(port),
        "--no-access-log", "--log-level", log_level, "--workers", str(workers), *tls_args,
    ]  # fmt: skip


def metrics_env(port: int, env: dict | None = None) -> dict:
    """PROMETHEUS_MULTIPROC_DIR for a server on `port` (unless `env` or this process names one): a folder made
    empty now, where each of the server's worker processes keeps its counts (control_plane/metrics.py)."""
    given = (env or {}).get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if given:
        return {"PROMETHEUS_MULTIPROC_DIR": given}
    folder = Path(os.environ.get("CP_DATA_DIR") or ROOT / ".data") / "metrics" / str(port)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return {"PROMETHEUS_MULTIPROC_DIR": str(folder)}


def start_server(
    port: int,
    env: dict | None = None,
    kind: str = "uvicorn",
    workers: int = 1,
    log: Path | None = None,
    tls: tuple[str, str] | None = None,
    ca_file: str | None = None,
) -> subprocess.Popen:
    """A server process, returned once it answers its health check (over HTTPS with `tls`, verified against
    `ca_file`). The settings learn of TLS from CP_TLS_CERT/CP_TLS_KEY, as with `./run serve --cert`."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
    tls_env = {"CP_TLS_CERT": str(tls[0]), "CP_TLS_KEY": str(tls[1])} if tls else {}
    proc = subprocess.Popen(
        server_command(port, kind, workers=workers, tls=tls),
        cwd=ROOT,
        env={**os.environ, **tls_env, **metrics_env(port, env), **(env or {})},
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    scheme = "https" if tls else "http"
    context = ssl.create_default_context(cafile=ca_file) if tls else None
    wait_http(f"{scheme}://127.0.0.1:{port}/api/v1/health", proc, context=context)
    return proc


def wait_http(
    url: str, proc: subprocess.Popen | None = None, timeout: float = 30.0, context: ssl.SSLContext | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2, context=context) as response:
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


def tls_files(cert: str, key: str) -> tuple[str, str] | None:
    """(certificate, key) as absolute paths, None for plain HTTP; ValueError naming what is wrong. Checked
    here so a typo fails with a sentence before the server starts, not deep inside uvicorn or Twisted."""
    if not cert and not key:
        return None
    if not (cert and key):
        raise ValueError("TLS needs both a certificate and a key (--cert and --key, or CP_TLS_CERT and CP_TLS_KEY)")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot use certificate {cert} with key {key}: {exc}") from exc
    return str(Path(cert).absolute()), str(Path(key).absolute())


def serve(argv: list[str] | None = None) -> None:
    """`./run serve`: replace this process with the ASGI server, over HTTPS when given a certificate."""
    env = os.environ
    p = argparse.ArgumentParser(prog="./run serve", description="Serve the control plane (HTTP, or HTTPS).")
    p.add_argument("--host", default=env.get("HOST", "127.0.0.1"), help="interface [HOST]")
    p.add_argument("--port", type=int, default=int(env.get("PORT", "8000")), help="port [PORT]")
    p.add_argument("--cert", default=env.get("CP_TLS_CERT", ""), help="PEM certificate chain [CP_TLS_CERT]")
    p.add_argument("--key", default=env.get("CP_TLS_KEY", ""), help="PEM private key [CP_TLS_KEY]")
    p.add_argument(
        "--server",
        choices=["uvicorn", "daphne"],
        # uvicorn is the production default (bench/ measured it well ahead of daphne); daphne for development.
        default=env.get("CP_WEB_SERVER", "uvicorn"),
        help="ASGI server [CP_WEB_SERVER]",
    )
    p.add_argument("--workers", type=int, default=int(env.get("WEB_WORKERS", "1")), help="uvicorn [WEB_WORKERS]")
    args = p.parse_args(argv)
    try:
        tls = tls_files(args.cert, args.key)
    except ValueError as exc:
        p.error(str(exc))
    if tls:  # the settings of the server process see TLS (secure cookies) however it was asked for
        os.environ.update({"CP_TLS_CERT": tls[0], "CP_TLS_KEY": tls[1]})
    os.environ.update(metrics_env(args.port))
    cmd = server_command(args.port, args.server, args.host, args.workers, tls, log_level="info")
    print(f"==> serving on {'https' if tls else 'http'}://{args.host}:{args.port}/ ({args.server})", file=sys.stderr)
    os.chdir(ROOT)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    serve()
