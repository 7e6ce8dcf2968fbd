#!/usr/bin/env python
"""The control plane beside two PostgreSQL job queues (`./run bench peers`), in one run, on one cluster.

  ours           3,000 no-op tasks through 50 long-polling simulated agents, uvicorn with one worker:
                 scenarios.throughput, as figure 2 of run_all.py, on cp_bench (benchdb.recreate)
  procrastinate  3,000 no-op jobs (batch_defer_async), one worker with concurrency=50 (LISTEN/NOTIFY on,
                 its default psycopg pool), database peers_procrastinate
  pgqueuer       3,000 no-op jobs (one batch enqueue), one QueueManager over one asyncpg connection,
                 max_concurrent_tasks=50, batch_size=10 (its default), database peers_pgqueuer

Each repeat runs the three in turn; each peer gets a fresh database every repeat. The peers run in their own
virtualenv (.data/peers-venv, made here from bench/peers-requirements.txt), as bench/peers_worker.py
subprocesses: a worker process parked before the work arrives (as our agents are), then an enqueuing process.

For each: tasks/s from the first start to the last completion (median over the repeats), CPU ms per task of
the process doing the work (our server; the peer's worker process) + the PostgreSQL backends of its database
(cpu.CpuMeter), enqueue->start p50/p99: from the moment the enqueuing call returned (the jobs committed) to
the moment the worker's code (our agent; the peer's task function) got the job; the jobs are enqueued all at
once, so this is mostly the wait in the queue, about half the run at p50. Also PostgreSQL's transactions and
rows written per task (pg_stat_database of the system's database, enqueue included). Then the issue's ratios:
ours / procrastinate throughput (target >= 2) and pgqueuer / ours (target <= 3). Results also go to
bench/peers_results.json. Exit status 0 whether or not the targets were met.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(BENCH), str(ROOT)]

import benchdb  # noqa: E402
import run_all  # noqa: E402
import scenarios  # noqa: E402
from cpu import CpuMeter, PostgresCpu  # noqa: E402
from run_all import say  # noqa: E402

from control_plane import launch  # noqa: E402

PEERS_VENV = ROOT / ".data" / "peers-venv"
REQUIREMENTS = BENCH / "peers-requirements.txt"
WORKER = BENCH / "peers_worker.py"
PEERS = ("procrastinate", "pgqueuer")
OURS_OVER_PROCRASTINATE_TARGET = 2.0
PGQUEUER_OVER_OURS_TARGET = 3.0
now = time.perf_counter


# --- the peers' virtualenv ------------------------------------------------------------------------------------


def peers_python() -> Path:
    """The peers' interpreter, (re)made when bench/peers-requirements.txt changed since it was installed."""
    python = PEERS_VENV / "bin" / "python"
    stamp = PEERS_VENV / "requirements.sha256"
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()
    if python.exists() and stamp.exists() and stamp.read_text().strip() == digest:
        return python
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info.major}.{sys.version_info.minor}"
    say(f"making {PEERS_VENV} from {REQUIREMENTS.name} ...")
    subprocess.run([str(base), "-m", "venv", "--clear", str(PEERS_VENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"]
    subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
    subprocess.run([str(python), "-m", "pip", "check", "--disable-pip-version-check"], check=True)
    stamp.write_text(digest + "\n")
    return python


# --- measurements -----------------------------------------------------------------------------------------


def per_task_ms(cpu: dict, wall: float, completed: int, worker_key: str = "server") -> dict:
    """CPU ms per task of the working process(es) and of PostgreSQL, as scenarios.throughput counts them."""
    out = {
        name: round(cpu[key] / 100 * wall * 1000 / max(completed, 1), 2)
        for name, key in (("worker", worker_key), ("postgres", "postgres"))
        if key in cpu
    }
    if len(out) == 2:
        out["total"] = round(out["worker"] + out["postgres"], 2)
    return out


COUNTERS = ("xact_commit", "xact_rollback", "tup_returned", "tup_fetched", "tup_inserted", "tup_updated", "tup_deleted")
# A backend reports its counters to pg_stat_database when it ends, or after some 10 s idle (PGSTAT_IDLE_INTERVAL):
# the peers' backends end before the counters are read again; our server's are pooled, so the bench waits.
STATS_IDLE_FLUSH_S = 11.0


def db_counters(admin: dict, dbname: str) -> dict:
    import psycopg

    with psycopg.connect(**admin, autocommit=True) as conn:
        row = conn.execute(
            f"SELECT {', '.join(COUNTERS)} FROM pg_stat_database WHERE datname = %s", [dbname]
        ).fetchone()
    return dict(zip(COUNTERS, row, strict=True))


def per_task_counters(before: dict, after: dict, completed: int) -> dict:
    """The database's work per task (enqueue included), from pg_stat_database."""
    d = {k: after[k] - before[k] for k in COUNTERS}
    n = max(completed, 1)
    return {
        "transactions": round((d["xact_commit"] + d["xact_rollback"]) / n, 2),
        "rows_written": round((d["tup_inserted"] + d["tup_updated"] + d["tup_deleted"]) / n, 2),
        "rows_read": round((d["tup_returned"] + d["tup_fetched"]) / n, 1),
    }


def run_ours(args, db: dict, port: int, server_pid: int, repeat: int) -> dict:
    postgres = PostgresCpu(db["admin"], benchdb.BENCH_DB) if db["local"] else None
    common = {"host": "127.0.0.1", "port": port, "enrollment": db["enrollment"], "api_token": db["api"]}
    counted = db_counters(db["admin"], benchdb.BENCH_DB)
    tp = run_all.run_async(
        scenarios.throughput(
            **common,
            tag=f"peers{repeat}",
            server_pid=server_pid,
            postgres=postgres,
            n_agents=args.concurrency,
            n_tasks=args.tasks,
            time_limit_s=args.time_limit,
        )
    )
    time.sleep(STATS_IDLE_FLUSH_S)
    pg_work = per_task_counters(counted, db_counters(db["admin"], benchdb.BENCH_DB), tp["completed"])
    ms = tp["cpu_ms_per_task"]
    return {
        "tasks_per_s": tp["tasks_per_s"],
        "completed": tp["completed"],
        "finished": tp["finished"],
        "seconds": tp["seconds"],
        "enqueue_s": tp["submit_s"],
        "cpu_pct_of_one_core": tp["cpu_pct_of_one_core"],
        "cpu_ms_per_task": {"worker": ms.get("server"), "postgres": ms.get("postgres"), "total": ms.get("total")},
        "enqueue_to_start": tp["enqueue_to_start"],
        "postgres_per_task": pg_work,
        "mode": tp.get("mode"),
    }


def recreate_peer_db(admin: dict, name: str) -> dict:
    import psycopg

    with psycopg.connect(**admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return {**admin, "dbname": name}


def _lines(stream, into: queue.Queue) -> None:
    for line in stream:
        into.put(line.rstrip("\n"))
    into.put(None)


def _wait_for(lines: queue.Queue, prefix: str, deadline: float) -> str:
    while True:
        try:
            line = lines.get(timeout=max(0.01, deadline - now()))
        except queue.Empty:
            raise TimeoutError(f"no {prefix} from the worker in time") from None
        if line is None:
            raise RuntimeError(f"the worker ended before {prefix}")
        if line.startswith(prefix):
            return line


def run_peer(args, python: Path, admin: dict, system: str, repeat: int, logdir: Path) -> dict:
    conninfo = recreate_peer_db(admin, f"peers_{system}")
    info = json.dumps(conninfo)
    log = logdir / f"{system}-{repeat}.log"
    with open(log, "ab") as err:
        subprocess.run([str(python), str(WORKER), "setup", system, info], stdout=err, stderr=err, cwd=BENCH, check=True)
        proc = subprocess.Popen(
            [str(python), str(WORKER), "work", system, info, str(args.tasks), str(args.concurrency)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=BENCH,
        )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, lines), daemon=True).start()
    try:
        _wait_for(lines, "READY", now() + 60)
        counted = db_counters(admin, conninfo["dbname"])
        meter = CpuMeter(proc.pid, PostgresCpu(admin, conninfo["dbname"]))
        # Started before the enqueuing process: the worker was idle (parked) until then, and the enqueuer's
        # backend has ended by the stop, so cpu.PostgresCpu does not count it; per-task figures are CPU
        # seconds over tasks, whatever the window.
        meter.start(now())
        enq = subprocess.run(
            [str(python), str(WORKER), "enqueue", system, info, str(args.tasks)],
            capture_output=True,
            text=True,
            cwd=BENCH,
            timeout=120,
        )
        if enq.returncode != 0:
            raise RuntimeError(f"{system} enqueue failed: {enq.stderr[-2000:]}")
        times = json.loads(next(x for x in enq.stdout.splitlines() if x.startswith("RESULT ")).split(" ", 1)[1])
        try:
            _wait_for(lines, "DONE", now() + args.time_limit)
        except TimeoutError:
            pass
        cpu = meter.stop(now())  # the worker's backends are still there: it waits for our word to stop
        wall = meter.wall
        proc.stdin.write("stop\n")
        proc.stdin.close()
        result = json.loads(_wait_for(lines, "RESULT ", now() + 30).split(" ", 1)[1])
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        if proc.poll() is None:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    time.sleep(0.3)  # the worker's backends have ended, and with them reported their counters
    counted_after = db_counters(admin, conninfo["dbname"])
    starts, completed = result["starts"], result["completed"]
    span = (result["last_done"] - result["first_start"]) if result["last_done"] and result["first_start"] else None
    return {
        "tasks_per_s": round(completed / span, 1) if span else 0.0,
        "completed": completed,
        "finished": completed >= args.tasks,
        "seconds": round(span, 3) if span else None,
        "enqueue_s": round(times["acked"] - times["sent"], 3),
        "cpu_pct_of_one_core": cpu,
        "cpu_ms_per_task": per_task_ms(cpu, wall, completed),
        "enqueue_to_start": scenarios.ms_summary([t - times["acked"] for t in starts]),
        "postgres_per_task": per_task_counters(counted, counted_after, completed),
        "settings": result.get("settings"),
        "log": str(log),
    }


# --- summary -------------------------------------------------------------------------------------------


def median_of(runs: list[dict], *keys: str):
    values = []
    for run in runs:
        value = run
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, int | float):
            values.append(value)
    return round(statistics.median(values), 2) if values else None


def summarize(runs: list[dict]) -> dict:
    return {
        "tasks_per_s": median_of(runs, "tasks_per_s"),
        "cpu_ms_per_task": {k: median_of(runs, "cpu_ms_per_task", k) for k in ("worker", "postgres", "total")},
        "enqueue_to_start_p50_ms": median_of(runs, "enqueue_to_start", "p50_ms"),
        "enqueue_to_start_p99_ms": median_of(runs, "enqueue_to_start", "p99_ms"),
        "enqueue_s": median_of(runs, "enqueue_s"),
        "postgres_per_task": {
            k: median_of(runs, "postgres_per_task", k) for k in ("transactions", "rows_written", "rows_read")
        },
        "all_finished": all(r["finished"] for r in runs),
        "repeats": len(runs),
    }


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        load = os.getloadavg()
        return f"load average: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"


def print_summary(summary: dict, ratios: dict) -> None:
    header = (
        "system",
        "tasks/s",
        "CPU ms/task (worker + postgres = total)",
        "enqueue->start p50 / p99",
        "PG xacts / rows written per task",
    )
    rows = []
    for name, s in summary.items():
        ms, pg = s["cpu_ms_per_task"], s["postgres_per_task"]
        rows.append(
            (
                name + ("" if s["all_finished"] else " (unfinished)"),
                f"{s['tasks_per_s']}",
                f"{ms['worker']} + {ms['postgres']} = {ms['total']}",
                f"{s['enqueue_to_start_p50_ms']} / {s['enqueue_to_start_p99_ms']} ms",
                f"{pg['transactions']} / {pg['rows_written']}",
            )
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    say()
    for r in [header, tuple("-" * w for w in widths), *rows]:
        say("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    say()
    for r in ratios.values():
        value = "n/a" if r["value"] is None else f"{r['value']:g}"
        say(f"{r['what']}: {value} (target {r['target']}) -> target {r['verdict']}")


def ratio(what: str, num, den, target: str, ok) -> dict:
    value = round(num / den, 2) if num and den else None
    return {
        "what": what,
        "value": value,
        "target": target,
        "verdict": "n/a" if value is None else ("met" if ok(value) else "missed"),
    }


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3000, help="no-op tasks/jobs per run")
    parser.add_argument("--concurrency", type=int, default=50, help="our agents; the peers' concurrent slots")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each system (median reported)")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds at most per run")
    parser.add_argument("--systems", default="ours," + ",".join(PEERS), help="comma-separated, of %(default)s")
    parser.add_argument("--output", type=Path, default=BENCH / "peers_results.json")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    systems = [s for s in args.systems.split(",") if s]
    started = time.monotonic()
    os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/runtime-{os.getuid()}")
    load_before = uptime()
    say(f"machine: {os.cpu_count()} cores; {load_before}")
    python = peers_python() if any(s in PEERS for s in systems) else None
    say(f"recreating database {benchdb.BENCH_DB} ...")
    db = benchdb.recreate(say)
    logdir = Path(tempfile.mkdtemp(prefix="cp-bench-peers-"))
    server = None
    runs: dict[str, list[dict]] = {s: [] for s in systems}
    try:
        if "ours" in systems:
            port = launch.free_port()
            log = logdir / "server-uvicorn-1.log"
            say(f"uvicorn --workers 1 on 127.0.0.1:{port} (log: {log})")
            server = launch.start_server(
                port, env={"DATABASE_URL": db["url"], "LOG_LEVEL": "WARNING"}, kind="uvicorn", workers=1, log=log
            )
        for repeat in range(args.repeats):
            for system in systems:
                say(
                    f"repeat {repeat + 1}/{args.repeats}: {system}, {args.tasks} no-op tasks,"
                    f" {args.concurrency} slots ..."
                )
                if system == "ours":
                    res = run_ours(args, db, port, server.pid, repeat)
                else:
                    res = run_peer(args, python, db["admin"], system, repeat, logdir)
                runs[system].append(res)
                ms, lat = res["cpu_ms_per_task"], res["enqueue_to_start"] or {}
                say(
                    f"    {res['tasks_per_s']} tasks/s ({res['completed']} in {res['seconds']} s); CPU ms/task"
                    f" worker {ms.get('worker')} + postgres {ms.get('postgres')} = {ms.get('total')};"
                    f" enqueue->start p50 {lat.get('p50_ms')} / p99 {lat.get('p99_ms')} ms;"
                    f" enqueue took {res['enqueue_s']} s; per task PostgreSQL {res['postgres_per_task']}"
                )
    finally:
        if server is not None:
            launch.stop(server)
    summary = {s: summarize(r) for s, r in runs.items() if r}
    tp = {s: summary.get(s, {}).get("tasks_per_s") for s in ("ours", *PEERS)}
    ratios = {
        "ours_over_procrastinate": ratio(
            "ours / procrastinate throughput",
            tp["ours"],
            tp["procrastinate"],
            f">= {OURS_OVER_PROCRASTINATE_TARGET:g}",
            lambda v: v >= OURS_OVER_PROCRASTINATE_TARGET,
        ),
        "pgqueuer_over_ours": ratio(
            "pgqueuer / ours throughput",
            tp["pgqueuer"],
            tp["ours"],
            f"<= {PGQUEUER_OVER_OURS_TARGET:g}",
            lambda v: v <= PGQUEUER_OVER_OURS_TARGET,
        ),
    }
    load_after = uptime()
    results = {
        "machine": {
            "cores": os.cpu_count(),
            "uptime_at_start": load_before,
            "uptime_at_end": load_after,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print_summary(summary, ratios)
    say(f"\n{load_after}")
    say(f"results: {args.output}; logs: {logdir}; {results['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
