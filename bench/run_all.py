#!/usr/bin/env python
"""The control plane's benchmarks (`./run bench`): real server processes on loopback, a real PostgreSQL
database of their own (`cp_bench`, recreated each time), simulated agents speaking HTTP/1.1.

  Figure 1  ready -> assigned latency for an agent parked in a long poll (p50/p99; target p99 <= 50 ms)
  Figure 2  throughput of 50 long-polling agents over one run of independent no-op tasks (target >= 300/s)
  Figure 3  the same agents polling with wait_s 0 every 2 s, as the seed's agents did, and the ratio 2 : 3
  Figure 4  figures 1 and 2 under uvicorn (1 and 2 workers) and daphne side by side

Everything (server, PostgreSQL, this load generator) shares the machine's cores; CPU shares are reported,
including what other programs used meanwhile, so the reader can see who had the cores. Results go to the
terminal and to bench/results.json. Exit status 1 when the production default (uvicorn, one worker) missed a
target; the other servers are measured beside it for comparison.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(BENCH), str(ROOT)]

import benchdb  # noqa: E402
import scenarios  # noqa: E402
from cpu import PostgresCpu  # noqa: E402

from control_plane import launch  # noqa: E402

LATENCY_TARGET_MS = 50.0
THROUGHPUT_TARGET = 300.0
SERVERS = [("uvicorn", 1, ""), ("uvicorn", 2, ""), ("daphne", 1, "")]


def label(kind: str, workers: int, setting: str = "") -> str:
    name = f"uvicorn --workers {workers}" if kind == "uvicorn" else kind
    return f"{name} {setting}" if setting else name


def run_async(coro):
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def say(text: str = "") -> None:
    print(text, flush=True)


def cpu_text(cpu: dict) -> str:
    return ", ".join(f"{k} {v:g}%" for k, v in cpu.items() if k != "cores")


def per_task_text(per_task: dict) -> str:
    if "total" not in per_task:
        return ", ".join(f"{k} {v:g}" for k, v in per_task.items()) or "n/a"
    return (
        f"server {per_task['server']:g} + postgres {per_task['postgres']:g} = {per_task['total']:g} ms"
        f" (at most {per_task['ceiling_tasks_per_s']:g} tasks/s on these cores)"
    )


async def measure_server(args, db: dict, port: int, server_pid: int, tag: str, with_polling: bool) -> dict:
    common = {"host": "127.0.0.1", "port": port, "enrollment": db["enrollment"], "api_token": db["api"]}
    postgres = PostgresCpu(db["admin"], benchdb.BENCH_DB) if db["local"] else None
    out = {}

    say(f"  figure 1: {args.samples} single-task runs, {args.parked} agents parked in a long poll ...")
    out["latency"] = lat = await scenarios.latency(**common, tag=tag, n_agents=args.parked, samples=args.samples)
    e2e = lat["ready_to_assigned"]
    say(f"    ready->assigned p50 {e2e['p50_ms']} ms, p99 {e2e['p99_ms']} ms (n={e2e['n']}, missed {lat['missed']})")

    say(f"  figure 2: {args.agents} long-polling agents, one run of {args.tasks} no-op tasks ...")
    out["throughput"] = tp = await scenarios.throughput(
        **common,
        tag=tag,
        server_pid=server_pid,
        postgres=postgres,
        n_agents=args.agents,
        n_tasks=args.tasks,
        time_limit_s=args.time_limit,
        complete_and_claim=not args.claim_separately,
    )
    say(f"    {tp['mode']}: {tp['tasks_per_s']} tasks/s ({tp['completed']} in {tp['seconds']} s)")
    say(f"    CPU, % of one core: {cpu_text(tp['cpu_pct_of_one_core'])}")
    say(f"    CPU ms per task: {per_task_text(tp['cpu_ms_per_task'])}")

    if with_polling:
        say(f"  figure 3: {args.agents} agents polling with wait_s 0 every 2 s, {args.poll_tasks} no-op tasks ...")
        out["polling"] = poll = await scenarios.throughput(
            **common,
            tag=f"{tag}-poll",
            server_pid=server_pid,
            postgres=postgres,
            n_agents=args.agents,
            n_tasks=args.poll_tasks,
            poll_every_s=2.0,
            time_limit_s=args.time_limit,
        )
        say(f"    {poll['tasks_per_s']} tasks/s ({poll['completed']} in {poll['seconds']} s)")
    return out


def bench_server(args, db: dict, kind: str, workers: int, setting: str, logdir: Path, with_polling: bool) -> dict:
    port = launch.free_port()
    log = logdir / f"server-{kind}-{workers}-{len(setting)}.log"
    env = {"DATABASE_URL": db["url"], "LOG_LEVEL": "WARNING"}
    if setting:  # a variant of the same server: one setting changed (kind:workers:NAME=VALUE)
        name, _, value = setting.partition("=")
        env[name] = value
    say(f"{label(kind, workers, setting)} on 127.0.0.1:{port} (log: {log})")
    proc = launch.start_server(port, env=env, kind=kind, workers=workers, log=log)
    try:
        if workers > 1:
            time.sleep(2.0)  # the health check answered from one worker; let the others finish starting
        return run_async(measure_server(args, db, port, proc.pid, f"{kind}{workers}", with_polling))
    finally:
        launch.stop(proc)


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def ms_pair(summary: dict) -> str:
    return f"{summary['p50_ms']} / {summary['p99_ms']} ms"


def summary_rows(results: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    # The targets bind the production default (the first server measured, uvicorn with one worker);
    # the other servers are measured beside it for comparison (figure 4).
    default = next(iter(results["servers"]), None)

    def judged(name: str, target: str, ok: bool) -> tuple[str, str]:
        return (target, verdict(ok)) if name == default else (f"({target})", "")

    lat_target, tp_target = f"<= {LATENCY_TARGET_MS:g} ms", f">= {THROUGHPUT_TARGET:g}/s"
    for name, res in results["servers"].items():
        lat = res["latency"]
        e2e = lat["ready_to_assigned"]
        ok = e2e["p99_ms"] <= LATENCY_TARGET_MS and not lat["missed"]
        rows += [
            (f"F1 ready->assigned p99 [{name}]", f"{e2e['p99_ms']} ms", *judged(name, lat_target, ok)),
            (f"F1 ready->assigned p50 [{name}]", f"{e2e['p50_ms']} ms", "", ""),
            (f"F1   submit round trip p50 / p99 [{name}]", ms_pair(lat["submit_rtt"]), "", ""),
            (f"F1   claim answer after the 201 p50 / p99 [{name}]", ms_pair(lat["claim_after_submit_201"]), "", ""),
        ]
        if lat["missed"]:
            rows.append((f"F1   missed wake-ups [{name}]", str(lat["missed"]), "0", "FAIL"))
    for name, res in results["servers"].items():
        tp = res["throughput"]
        ok = tp["tasks_per_s"] >= THROUGHPUT_TARGET
        figure = f"{tp['tasks_per_s']} tasks/s"
        rows.append((f"F2 throughput, {tp['agents']} agents [{name}]", figure, *judged(name, tp_target, ok)))
        rows.append((f"F2   CPU % of one core [{name}]", cpu_text(tp["cpu_pct_of_one_core"]), "", ""))
        rows.append((f"F2   CPU ms per task [{name}]", per_task_text(tp["cpu_ms_per_task"]), "", ""))
    poll = results.get("polling")
    if poll:
        expected = f"~{poll['agents'] / 2:g}/s"
        rows.append((f"F3 throughput, 2 s polling [{poll['server']}]", f"{poll['tasks_per_s']} tasks/s", expected, ""))
        ratio = results.get("ratio_long_poll_to_polling")
        ratio_ok = ratio is not None and ratio > 1
        rows.append(("F3 ratio F2 / F3 (same server)", f"{ratio:g}x" if ratio else "n/a", "> 1", verdict(ratio_ok)))
    cmp = results.get("daphne_vs_uvicorn")
    if cmp:
        rows.append(("F4 daphne / uvicorn (1 worker): throughput", f"{cmp['throughput_ratio']:g}", "", ""))
        rows.append(("F4 daphne / uvicorn (1 worker): latency p99", f"{cmp['latency_p99_ratio']:g}", "", ""))
    rows.append(("total bench time", f"{results['elapsed_s']:g} s", "<= ~300 s", verdict(results["elapsed_s"] <= 330)))
    return rows


def print_table(rows) -> None:
    header = ("metric", "value", "target", "result")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]

    def line(cells) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    say()
    say(line(header))
    say(line(["-" * w for w in widths]))
    for r in rows:
        say(line(r))


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=3000, help="tasks of the throughput run (figure 2)")
    parser.add_argument("--agents", type=int, default=50, help="simulated agents (figures 2 and 3)")
    parser.add_argument("--samples", type=int, default=200, help="latency samples (figure 1)")
    parser.add_argument("--parked", type=int, default=3, help="agents parked in a long poll (figure 1)")
    parser.add_argument("--claim-separately", action="store_true",
                        help="figure 2's agents claim after each completion, not in it")  # fmt: skip
    parser.add_argument("--poll-tasks", type=int, default=600, help="tasks of the 2-second polling run (figure 3)")
    parser.add_argument("--time-limit", type=float, default=45.0, help="seconds at most per throughput run")
    parser.add_argument(
        "--servers",
        default=",".join(f"{k}:{w}" for k, w, _ in SERVERS),
        help="comma-separated kind:workers[:SETTING=VALUE] (default %(default)s; a setting makes a variant, e.g. "
        "uvicorn:1:CP_DB_SERVER_SIDE_BINDING=0); figure 3 runs on the first",
    )
    parser.add_argument("--output", type=Path, default=BENCH / "results.json")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    servers = []
    for item in filter(None, args.servers.split(",")):
        kind, _, rest = item.partition(":")
        workers, _, setting = rest.partition(":")
        servers.append((kind, int(workers or 1), setting))

    started = time.monotonic()
    os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/runtime-{os.getuid()}")
    load = os.getloadavg()
    say(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    if load[0] > 0.5:
        say("  (other programs are busy: the figures below share the cores with them; see 'others' in CPU)")
    say(f"recreating database {benchdb.BENCH_DB} ...")
    db = benchdb.recreate(say)
    logdir = Path(tempfile.mkdtemp(prefix="cp-bench-"))
    results: dict = {
        "machine": {
            "cores": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in load],
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "parameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "servers": {},
    }
    for i, (kind, workers, setting) in enumerate(servers):
        name = label(kind, workers, setting)
        res = bench_server(args, db, kind, workers, setting, logdir, with_polling=i == 0)
        if "polling" in res:
            results["polling"] = {**res.pop("polling"), "server": name}
            fig2, fig3 = res["throughput"]["tasks_per_s"], results["polling"]["tasks_per_s"]
            results["ratio_long_poll_to_polling"] = round(fig2 / fig3, 1) if fig3 else None
        results["servers"][name] = res
    uv, da = results["servers"].get("uvicorn --workers 1"), results["servers"].get("daphne")
    if uv and da and uv["throughput"]["tasks_per_s"] and uv["latency"]["ready_to_assigned"]["p99_ms"]:
        results["daphne_vs_uvicorn"] = {
            "throughput_ratio": round(da["throughput"]["tasks_per_s"] / uv["throughput"]["tasks_per_s"], 2),
            "latency_p99_ratio": round(
                da["latency"]["ready_to_assigned"]["p99_ms"] / uv["latency"]["ready_to_assigned"]["p99_ms"], 2
            ),
        }
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    rows = summary_rows(results)
    results["table"] = [dict(zip(("metric", "value", "target", "result"), r, strict=True)) for r in rows]
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print_table(rows)
    say(f"\nresults: {args.output}; server logs: {logdir}")
    return 1 if any(r[3] == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
