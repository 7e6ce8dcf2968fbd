"""CPU seconds of process trees (server, PostgreSQL) and of the bench itself, from /proc (Linux)."""

from __future__ import annotations

import os
import resource
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds of the process and of its reaped children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # after the command: state ppid ... utime(14) stime(15) cutime(16) cstime(17), 1-based over the whole line
    return int(fields[1]), sum(int(x) for x in fields[11:15]) / TICK


def tree_cpu_s(root: int | None) -> float | None:
    """CPU seconds used so far by `root` and all its descendants (exited ones count once their parent reaped
    them, as uvicorn's supervisor does for its workers)."""
    if root is None:
        return None
    table = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            info = _stat(int(entry.name))
            if info is not None:
                table[int(entry.name)] = info
    if root not in table:
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _cpu) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += table[pid][1]
        stack.extend(children.get(pid, ()))
    return total


def process_cpu_s(pid: int) -> float | None:
    """CPU seconds of one process itself (not its children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / TICK


class PostgresCpu:
    """CPU of the PostgreSQL processes working for one database (its backends and autovacuum workers) and of
    the cluster's shared background processes (WAL writer, checkpointer, ...), but not of backends of other
    databases: the cluster may be shared with test runs."""

    def __init__(self, conninfo: dict, dbname: str):
        self.conninfo, self.dbname = conninfo, dbname

    def sample(self) -> dict[int, float]:
        import psycopg

        with psycopg.connect(**self.conninfo, autocommit=True) as conn:
            pids = [
                row[0]
                for row in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE (datname = %s OR datname IS NULL)"
                    " AND pid <> pg_backend_pid()",
                    [self.dbname],
                )
            ]
        return {pid: cpu for pid in pids if (cpu := process_cpu_s(pid)) is not None}

    @staticmethod
    def delta(before: dict[int, float], after: dict[int, float]) -> float:
        # A backend born during the interval counts whole; one that ended during it is lost (rare: pooled).
        return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


def machine_busy_s() -> float:
    """CPU seconds all cores spent busy (not idle, not waiting for I/O) since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / TICK


def self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU used by the server, PostgreSQL, the load generator and the whole machine between start() and
    stop(), as a share of one core (100% = one core busy; the machine tops out at cores x 100%). "others" is
    what none of ours used: other programs on the machine, which the reader should know about."""

    def __init__(self, server_pid: int, postgres: PostgresCpu | None):
        self.server_pid, self.postgres = server_pid, postgres

    def _sample(self) -> dict:
        return {
            "server": tree_cpu_s(self.server_pid),
            "postgres": self.postgres.sample() if self.postgres else None,
            "bench client": self_cpu_s(),
            "machine": machine_busy_s(),
        }

    def start(self, now: float) -> None:
        self.t0, self.before = now, self._sample()

    def stop(self, now: float) -> dict:
        after = self._sample()
        self.wall = wall = max(now - self.t0, 1e-9)
        out = {}
        for key, value in after.items():
            old = self.before.get(key)
            if value is None or old is None:
                continue
            used = PostgresCpu.delta(old, value) if isinstance(value, dict) else value - old
            out[key] = round(100 * used / wall, 1)
        if "machine" in out:
            ours = sum(v for k, v in out.items() if k != "machine")
            out["others"] = round(max(0.0, out["machine"] - ours), 1)
        out["cores"] = os.cpu_count()
        return out
