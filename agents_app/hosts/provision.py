"""Provisioning agents on a host over SSH (asyncssh): deploy, stop, restart, upgrade, status, uninstall, and
the host-key scan. No ORM here: a `Target` carries everything a connection needs, `report` carries progress
out, so the same code serves the django-q2 job and the management command.

On the host everything lives in one folder (`remote_dir`, relative to the login's home unless absolute):

    cp_agent.py          the daemon, copied from this server (stdlib only: a bare python3 runs it)
    agent.env            0600: CP_SERVER and the enrollment token, read by the start script (not in argv,
                         which every user of the host can see)
    ca.pem               the CA bundle the agents verify the server with, when the host has one
    run/NAME.pid         one per agent; the pid is checked against /proc/PID/cmdline before any signal,
                         so a recycled pid is never killed
    logs/NAME.log        the agent's output
    work/                the agents' task folders and identity (state) files
    .cp-agent-manifest   what deploy created here, one path a line: all that uninstall removes

Agents are started with `nohup setsid`, so they outlive the SSH session. Remote commands run under
/bin/sh, whatever the login shell. Hosts are Linux (the liveness check reads /proc).
"""

from __future__ import annotations

import asyncio
import posixpath
import re
import shlex
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import asyncssh

from .install_dir import remote_dir_problem
from .keys import fingerprint

Report = Callable[..., Awaitable[None]]
MANIFEST = ".cp-agent-manifest"
VERSION_RE = re.compile(r'^VERSION = "([^"]+)"', re.MULTILINE)
LOG_TAIL_LINES = 5
# After a second SIGTERM the daemon cancels its tasks (SIGKILL to each task 10 s later): give it that long.
CANCEL_GRACE_S = 15


class ProvisionError(Exception):
    """An operation could not be done; the message says what and where, for the operator."""


class HostKeyChanged(ProvisionError):
    """The host presented a key other than the pinned one. Possibly an attack: we do not log in."""

    def __init__(self, host: str, pinned: str, offered: str):
        self.offered = offered
        super().__init__(
            f"HOST KEY CHANGED for {host}: pinned {fingerprint(pinned)}, the host presented "
            f"{fingerprint(offered) or 'a key of another type'}. Refusing to connect. If the host was "
            "reinstalled, confirm the new fingerprint on the hosts page; otherwise investigate."
        )


@dataclass(frozen=True)
class Target:
    """One host and what should run on it."""

    name: str
    address: str
    port: int
    user: str
    host_key: str  # the pinned key, "" only for a scan
    private_key: asyncssh.SSHKey | None = None
    python: str = "python3"
    remote_dir: str = "cp-agent"
    server_url: str = ""
    ca_bundle: str = ""
    agent_names: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    executors: tuple[str, ...] = ()
    capacity: int = 1
    connect_timeout_s: float = 10.0
    stop_grace_s: float = 10.0


@dataclass
class AgentState:
    name: str
    alive: bool
    pid: str = ""
    log_tail: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------- connections


async def scan_host_key(target: Target, algs: Sequence[str] = ()) -> str:
    """The host key the server presents (canonical OpenSSH line), without logging in; of one of `algs` when
    given (to compare with a pinned key of that type)."""
    scan = asyncssh.get_server_host_key(target.address, target.port, config=[], server_host_key_algs=algs)
    try:
        key = await asyncio.wait_for(scan, target.connect_timeout_s)
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        raise ProvisionError(f"{target.name}: cannot reach {target.address}:{target.port}: {_why(exc)}") from None
    if key is None:
        raise ProvisionError(f"{target.name}: the server presented no host key")
    return _openssh(key)


async def connect(target: Target) -> asyncssh.SSHClientConnection:
    """A connection that trusts exactly the pinned host key and logs in with exactly the host's private key
    (no ssh-agent, no ~/.ssh/config, no known_hosts file of this machine's user)."""
    if not target.host_key:
        raise ProvisionError(f"{target.name}: no confirmed host key; scan the host and confirm its fingerprint")
    if target.private_key is None:
        raise ProvisionError(f"{target.name}: no private key configured")
    pinned = asyncssh.import_public_key(target.host_key)
    try:
        conn = await asyncssh.connect(
            target.address,
            target.port,
            username=target.user,
            client_keys=[target.private_key],
            # The pin is the key alone. asyncssh would otherwise also accept a host key certified by a CA
            # this machine's user trusts: X.509 CAs in ~/.ssh/ca-bundle.crt and ~/.ssh/crt/ (so any host
            # with such a certificate passed as the pinned one), @cert-authority lines of a known_hosts.
            # Only the pinned key's own signature algorithms are offered, so no certificate is negotiated.
            known_hosts=([pinned], [], []),
            x509_trusted_certs=None,
            x509_trusted_cert_paths=None,
            server_host_key_algs=[alg.decode() for alg in pinned.sig_algorithms],
            gss_host=None,  # a Kerberos key exchange would vouch for the host instead of its key
            agent_path=None,
            config=[],
            preferred_auth=["publickey"],
            connect_timeout=target.connect_timeout_s,
            login_timeout=target.connect_timeout_s,
            keepalive_interval=15,
        )
    except asyncssh.HostKeyNotVerifiable:
        raise HostKeyChanged(target.name, target.host_key, await _presented_key(target, pinned)) from None
    except asyncssh.PermissionDenied:
        raise ProvisionError(f"{target.name}: {target.user}@{target.address} refused our private key") from None
    except (OSError, asyncssh.Error, TimeoutError) as exc:
        # A host without any key of the pinned type ends the key exchange (often by just closing): look at
        # what it presents before calling it a network problem. Nothing to look at when nobody answered.
        if not isinstance(exc, (ConnectionRefusedError, TimeoutError, socket.gaierror)):
            offered = await _presented_key(target, pinned)
            if offered and offered != _openssh(pinned):
                raise HostKeyChanged(target.name, target.host_key, offered) from None
        raise ProvisionError(f"{target.name}: cannot reach {target.address}:{target.port}: {_why(exc)}") from None
    # Whatever asyncssh's defaults become: nothing is run on a host whose key is not the pinned one.
    offered = conn.get_server_host_key()
    if offered is None or _openssh(offered) != _openssh(pinned):
        conn.close()
        raise HostKeyChanged(target.name, target.host_key, _openssh(offered) if offered else "")
    return conn


def _openssh(key: asyncssh.SSHKey) -> str:
    """The key as 'type base64', without the comment a pinned line may carry."""
    return " ".join(key.export_public_key("openssh").decode().split()[:2])


async def _presented_key(target: Target, pinned: asyncssh.SSHKey) -> str:
    """What the host presents: a key of the pinned key's type if it has one, else any; "" if nothing."""
    for algs in ([alg.decode() for alg in pinned.sig_algorithms], ()):  # () = any type
        try:
            return await scan_host_key(target, algs)
        except ProvisionError:
            continue
    return ""


def _why(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


async def sh(conn, script: str, *, stdin: str | None = None, timeout: float = 60.0) -> asyncssh.SSHCompletedProcess:
    """Run `script` under /bin/sh on the host."""
    try:
        return await conn.run("/bin/sh -c " + shlex.quote(script), input=stdin, check=False, timeout=timeout)
    except asyncssh.TimeoutError:
        raise ProvisionError(f"a remote command took longer than {timeout:.0f} s") from None


def _cd(target: Target) -> str:
    """Enter the install folder (relative paths start from the login's home)."""
    path = target.remote_dir.removeprefix("~/")
    return f'cd "$HOME" && cd {shlex.quote(path)}'


def _mkdir(target: Target) -> str:
    """Create and enter the install folder, recording in the manifest what this made (a folder that was
    there before, or a run/ logs/ work/ in it, is not ours to remove). Refused when it is the login's home
    or holds it, whatever path leads there."""
    path = shlex.quote(target.remote_dir.removeprefix("~/"))
    refusal = shlex.quote(f"{target.remote_dir} is the login's home or holds it: refusing to install there")
    return f"""cd "$HOME" && home=$(pwd -P) || exit 1
{RECORD}
made=; [ -d {path} ] || made=.
mkdir -p {path} && cd {path} || exit 1
case "$home/" in "$(pwd -P)"/*) echo {refusal} >&2; exit 4;; esac
chmod 700 . && {{ [ -z "$made" ] || record .; }} || exit 1
for d in run logs work; do [ -e "$d" ] || {{ mkdir "$d" && record "$d"; }} || exit 1; done
"""


# Shell helpers shared by the scripts below. `alive NAME` is true when run/NAME.pid names a live process whose
# command line is this agent's (a zombie's cmdline is empty; a recycled pid runs something else).
ALIVE = r"""
alive() {
  p=$(cat "run/$1.pid" 2>/dev/null) || return 1
  case "$p" in ''|*[!0-9]*) return 1;; esac
  tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | grep -qF -- "cp_agent.py --name $1 "
}
names() { for f in run/*.pid; do [ -e "$f" ] && basename "$f" .pid; done; }
"""
# `record PATH` adds PATH (relative to the install folder) to the manifest, once.
RECORD = f"""record() {{ grep -qxF -- "$1" {MANIFEST} 2>/dev/null || printf '%s\\n' "$1" >> {MANIFEST}; }}"""


# ----------------------------------------------------------------------------------------- operations


async def write_file(conn, target: Target, name: str, content: str, mode: str = "600") -> None:
    """Write a file in the install folder atomically (a temporary name, then mv), private from the start."""
    q = shlex.quote(name)
    script = f"{_cd(target)} && umask 077 && cat > {q}.tmp && chmod {mode} {q}.tmp && mv -f {q}.tmp {q}"
    script = f"{RECORD}\n{script} && record {q}"
    done = await sh(conn, script, stdin=content)
    if done.exit_status != 0:
        raise ProvisionError(f"{target.name}: writing {name} failed: {_stderr(done)}")


def _stderr(done) -> str:
    return (done.stderr or done.stdout or f"exit status {done.exit_status}").strip()[-2000:]


async def check_python(conn, target: Target) -> str:
    """The remote Python's version, or ProvisionError when it is missing or older than the daemon needs."""
    py = shlex.quote(target.python)
    script = (
        f"command -v {py} >/dev/null 2>&1 || {{ echo {shlex.quote(f'remote python {target.python} not found')} >&2; "
        "exit 3; }; "
        f"{py} -c 'import sys; print(sys.version.split()[0]); sys.exit(sys.version_info < (3, 10))'"
    )
    done = await sh(conn, script)
    if done.exit_status != 0:
        raise ProvisionError(f"{target.name}: {_stderr(done) or 'the remote python is older than 3.10'}")
    return done.stdout.strip()


def env_file(target: Target, enrollment_token: str) -> str:
    return f"CP_SERVER={shlex.quote(target.server_url)}\nCP_ENROLLMENT_TOKEN={shlex.quote(enrollment_token)}\n"


def start_script(target: Target) -> str:
    """Start every agent not already running, detached; then report which are alive."""
    args = [
        "--labels", ",".join(target.labels), "--capacity", str(target.capacity), "--work-dir", "work",
    ]  # fmt: skip
    if target.executors:
        args += ["--executors", ",".join(target.executors)]
    if target.ca_bundle:
        args += ["--ca-file", "ca.pem"]
    command = f'nohup $SETSID {shlex.quote(target.python)} cp_agent.py --name "$1" {shlex.join(args)}'
    lines = [
        _cd(target),
        ALIVE,
        RECORD,
        "set -a; . ./agent.env; set +a",
        "SETSID=$(command -v setsid || true)",
        # In a non-interactive shell a background child is not a group leader, so setsid does not fork and
        # $! is the daemon's own pid.
        "start_one() {",
        '  alive "$1" && return 0',
        '  record "logs/$1.log"; record "run/$1.pid"',
        f'  {command} >>"logs/$1.log" 2>&1 </dev/null &',
        '  echo $! > "run/$1.pid"',
        "}",
    ]
    lines += [f"start_one {shlex.quote(n)}" for n in target.agent_names]
    lines.append("sleep 1")
    return "\n".join(lines)


def status_script(target: Target) -> str:
    """One '@@agent NAME alive|dead PID' line per agent we know of, each followed by its last log lines."""
    expected = " ".join(shlex.quote(n) for n in target.agent_names)
    return f"""{_cd(target)} 2>/dev/null || {{ echo '@@absent'; exit 0; }}
{ALIVE}
for n in $( (names; for e in {expected}; do echo "$e"; done) | sort -u); do
  if alive "$n"; then echo "@@agent $n alive $(cat "run/$n.pid")"; else echo "@@agent $n dead -"; fi
  tail -n {LOG_TAIL_LINES} "logs/$n.log" 2>/dev/null
done
"""


def stop_script(target: Target) -> str:
    """SIGTERM (drain: running tasks finish), then after the grace a second SIGTERM (tasks are canceled),
    then SIGKILL to the daemon's process group. Pid files of stopped agents are removed."""
    grace = max(1, round(target.stop_grace_s))
    return f"""{_cd(target)} 2>/dev/null || {{ echo 'not installed'; exit 0; }}
{ALIVE}
left() {{ for n in $(names); do alive "$n" && echo "$n"; done; }}
signal_all() {{ for n in $(left); do kill "$1" "$(cat "run/$n.pid")" 2>/dev/null; done; }}
wait_gone() {{ i=0; while [ -n "$(left)" ] && [ $i -lt "$1" ]; do sleep 1; i=$((i+1)); done; }}
before=$(left)
signal_all -TERM; wait_gone {grace}
if [ -n "$(left)" ]; then
  echo "still running after {grace} s: $(left | tr '\\n' ' ')(canceling their tasks)"
  signal_all -TERM; wait_gone {CANCEL_GRACE_S}
fi
for n in $(left); do
  echo "killing $n"; p=$(cat "run/$n.pid"); kill -KILL -- "-$p" 2>/dev/null || kill -KILL "$p"
done
sleep 0.2
for n in $before; do alive "$n" || echo "stopped $n"; done
for n in $(names); do alive "$n" || rm -f "run/$n.pid"; done
[ -z "$(left)" ]
"""


def manifest_entries(text: str) -> tuple[list[str], list[str]]:
    """The manifest's paths that uninstall may remove (deepest first) and those it refuses: anything not a
    plain relative path inside the install folder."""
    ours, refused = [], []
    for line in text.splitlines():
        if not line:
            continue
        normal = posixpath.normpath(line)
        inside = line == "." or (not line.startswith("/") and normal != "." and not normal.startswith("../"))
        (ours if inside and normal != ".." else refused).append(line)
    ours.sort(key=lambda p: (-p.count("/"), p))
    return ours, refused


def uninstall_script(target: Target, entries: Sequence[str]) -> str:
    """Remove what the manifest lists and nothing else, then the folder when deploy made it and it is empty:
    a mistyped remote_dir cannot take the files of a home with it. Each path's folder is resolved on the host,
    so a symbolic link cannot lead a removal out of the install folder either."""
    path = shlex.quote(target.remote_dir.removeprefix("~/"))
    files = [e for e in entries if e != "."]
    leftovers = " ".join(shlex.quote(f"{e}.tmp") for e in files)
    lines = [
        f"{_cd(target)} || exit 1",
        "here=$(pwd -P); kept=0",
        'inside() { p=$(cd "$(dirname -- "$1")" 2>/dev/null && pwd -P) || return 1; '
        'case "$p/" in "$here"/*) return 0;; esac; return 1; }',
    ]
    for e in files:
        q = shlex.quote(e)
        lines.append(
            f"if inside {q}; then rm -rf -- {q}; else echo {shlex.quote(f'kept {e}: outside')} >&2; kept=1; fi"
        )
    lines.append(f"rm -f -- {leftovers} {MANIFEST}" if files else f"rm -f -- {MANIFEST}")
    if "." in entries:
        removed = shlex.quote(f"removed {target.remote_dir}")
        lines.append(f'cd "$HOME" && rmdir {path} 2>/dev/null && echo {removed}')
    lines.append('[ "$kept" = 0 ]')
    return "\n".join(lines) + "\n"


async def uninstall(conn, target: Target, report: Report) -> None:
    done = await sh(conn, f"{_cd(target)} 2>/dev/null || {{ echo '@@absent'; exit 0; }}; cat {MANIFEST}")
    if done.stdout.startswith("@@absent"):
        await report(0.9, "not installed")
        return
    if done.exit_status != 0:
        raise ProvisionError(
            f"{target.name}: {target.remote_dir} has no {MANIFEST} saying what deploy wrote there (deployed by "
            "an older version?); nothing was removed: remove the install by hand"
        )
    ours, refused = manifest_entries(done.stdout)
    done = await sh(conn, uninstall_script(target, ours))
    await report(0.9, done.stdout.strip() or f"removed what deploy wrote in {target.remote_dir}")
    if refused or done.exit_status != 0:
        kept = "; ".join(
            [f"{e}: not a path inside {target.remote_dir}" for e in refused] + [_stderr(done)] * (done.exit_status != 0)
        )
        raise ProvisionError(f"{target.name}: uninstall kept what it may not remove: {kept}")


def parse_status(text: str) -> list[AgentState] | None:
    """The agents' states from status_script's output; None when nothing is installed."""
    if text.startswith("@@absent"):
        return None
    agents: list[AgentState] = []
    for line in text.splitlines():
        if line.startswith("@@agent "):
            _, name, state, pid = (line.split() + ["-"])[:4]
            agents.append(AgentState(name, state == "alive", "" if pid == "-" else pid))
        elif agents:
            agents[-1].log_tail.append(line)
    return agents


async def read_status(conn, target: Target) -> list[AgentState] | None:
    done = await sh(conn, status_script(target))
    if done.exit_status != 0:
        raise ProvisionError(f"{target.name}: status failed: {_stderr(done)}")
    return parse_status(done.stdout)


async def stop_agents(conn, target: Target, report: Report) -> None:
    done = await sh(conn, stop_script(target), timeout=target.stop_grace_s + CANCEL_GRACE_S + 60)
    await report(output=done.stdout)
    if done.exit_status != 0:
        raise ProvisionError(f"{target.name}: some agents would not stop: {_stderr(done)}")


async def install(conn, target: Target, report: Report, daemon: str | None, enrollment_token: str) -> None:
    """Copy the daemon (unless `daemon` is None), write the config, start the agents, check they live."""
    if daemon is not None:
        await write_file(conn, target, "cp_agent.py", daemon, mode="644")
        await report(0.5, f"copied cp_agent.py {daemon_version(daemon)}")
    await write_file(conn, target, "agent.env", env_file(target, enrollment_token))
    if target.ca_bundle:
        await write_file(conn, target, "ca.pem", target.ca_bundle, mode="644")
    await report(0.6, "wrote agent.env (enrollment token)" + (" and ca.pem" if target.ca_bundle else ""))
    done = await sh(conn, start_script(target))
    if done.exit_status != 0:
        raise ProvisionError(f"{target.name}: starting agents failed: {_stderr(done)}")
    agents = await read_status(conn, target) or []
    dead = [a for a in agents if a.name in target.agent_names and not a.alive]
    await report(0.8, f"{len(target.agent_names) - len(dead)}/{len(target.agent_names)} agents running")
    if dead:
        tails = "; ".join(f"{a.name}: {' | '.join(a.log_tail[-3:]) or 'no output'}" for a in dead)
        raise ProvisionError(f"{target.name}: agents exited right after starting: {tails}")


def daemon_version(source: str) -> str:
    match = VERSION_RE.search(source)
    return match[1] if match else "?"


async def remote_daemon_version(conn, target: Target) -> str | None:
    done = await sh(conn, f"{_cd(target)} && head -c 200000 cp_agent.py")
    return daemon_version(done.stdout) if done.exit_status == 0 else None


async def _deploy(conn, target: Target, report: Report, daemon: str, token: str) -> None:
    """Install the daemon and start the target's agents, in place of whatever ran there."""
    version = await check_python(conn, target)
    done = await sh(conn, _mkdir(target))
    if done.exit_status != 0:
        raise ProvisionError(f"{target.name}: cannot create {target.remote_dir}: {_stderr(done)}")
    await report(0.3, f"python {version}; {target.remote_dir} ready")
    await stop_agents(conn, target, report)  # a redeploy replaces what runs
    await install(conn, target, report, daemon, token)


async def _restart(conn, target: Target, report: Report, daemon: str | None, token: str) -> None:
    """Stop and start the deployed agents: with the daemon replaced by `daemon` (upgrade) or as deployed (None)."""
    old = await remote_daemon_version(conn, target)
    if old is None:
        raise ProvisionError(f"{target.name}: nothing deployed in {target.remote_dir}; deploy first")
    await stop_agents(conn, target, report)
    await report(0.4, "agents stopped")
    if daemon is not None:
        await report(0.45, f"upgrading the daemon {old} → {daemon_version(daemon)}")
    await install(conn, target, report, daemon, token)


async def run_operation(kind: str, target: Target, report: Report, *, daemon: str = "", token: str = "") -> dict:
    """Do `kind` on the host; returns what the dashboard shows as the result (e.g. the agents' states).
    Raises ProvisionError (HostKeyChanged for a changed key) with a sentence for the operator."""
    if kind == "scan":
        offered = await scan_host_key(target)
        await report(1.0, f"host key {fingerprint(offered)}")
        return {"offered_host_key": offered}
    if problem := remote_dir_problem(target.remote_dir):
        raise ProvisionError(f"{target.name}: remote folder {target.remote_dir!r}: {problem}")
    await report(0.05, f"connecting to {target.user}@{target.address}:{target.port}")
    async with await connect(target) as conn:
        await report(0.15, f"connected; host key {fingerprint(target.host_key)} verified")
        if kind == "deploy":
            await _deploy(conn, target, report, daemon, token)
        elif kind in ("restart", "upgrade"):
            await _restart(conn, target, report, daemon if kind == "upgrade" else None, token)
        elif kind == "stop":
            await stop_agents(conn, target, report)
        elif kind == "uninstall":
            await stop_agents(conn, target, report)
            await uninstall(conn, target, report)
            return {"agents": []}
        elif kind != "status":
            raise ProvisionError(f"unknown operation {kind!r}")
        agents = await read_status(conn, target)
    if agents is None:
        await report(output=f"nothing deployed in {target.remote_dir}\n")
        return {"installed": False, "agents": []}
    for a in agents:
        state = f"alive (pid {a.pid})" if a.alive else "not running"
        await report(output=f"{a.name}: {state}\n" + "".join(f"    {line}\n" for line in a.log_tail))
    return {"installed": True, "agents": [a.__dict__ for a in agents]}
