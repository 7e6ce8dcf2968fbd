#!/usr/bin/env python
"""A 10,000-task DAG through a real server: how long `POST /api/v1/runs` takes to answer (fan-out and chain),
how soon a parked agent holds the first task after the answer, and how fast one agent hands a chain's tasks
off one after the other (complete and claim the next: each needs the one before).

    .venv/bin/python bench/big_dag.py [--tasks 10000] [--chain-tasks 2000]

Targets (the speed issue): submit <= 1 s, first task assigned <= 10 ms after the answer, a chain's hand-off
>= 300 tasks/s. Results go to bench/big_dag_results.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

import benchdb  # noqa: E402
import scenarios  # noqa: E402
from wire import Connection  # noqa: E402

from control_plane import launch  # noqa: E402

now = time.perf_counter


async def submit_with_parked_agent(port: int, api: str, agent: scenarios.SimAgent, document: dict) -> dict:
    """Submit while the agent is parked in a long poll: the answer's time, and the assignment's after it."""
    held_at: list[float] = []

    async def parked() -> list:
        got = await agent.claim(scenarios.LONG_POLL_S)
        held_at.append(now())
        return got

    claim = asyncio.ensure_future(parked())
    await asyncio.sleep(0.3)  # parked
    client = Connection("127.0.0.1", port, token=api)
    body = json.dumps(document).encode()
    started = now()
    answer = await client.json("POST", f"{scenarios.API}/runs", document, expect=201, timeout=120)
    answered = now()
    assignments = await claim
    assigned = held_at[0]
    client.close()
    assert assignments, "the parked agent got nothing"
    return {
        "tasks": answer["tasks"],
        "body_kb": round(len(body) / 1024),
        "submit_ms": round((answered - started) * 1000, 1),
        # Negative: the parked agent held the first task before the submit's answer arrived.
        "first_assigned_after_answer_ms": round((assigned - answered) * 1000, 1),
        "first_attempt": assignments[0]["attempt_id"],
        "run_id": answer["run_id"],
    }


async def hand_off(agent: scenarios.SimAgent, first_attempt: str, n: int, complete_and_claim: bool) -> dict:
    """Complete and claim the next, for n tasks of the chain: tasks/s. The completion releases the next task
    and, with complete_and_claim (as the daemon does), claims it in the same request; else a claim follows."""
    attempt, started = first_attempt, now()
    for _ in range(n):
        got = await agent.complete(attempt, claim=complete_and_claim)
        if not got:
            got = await agent.claim(scenarios.LONG_POLL_S)
        attempt = got[0]["attempt_id"]
    seconds = now() - started
    return {"tasks": n, "seconds": round(seconds, 2), "tasks_per_s": round(n / seconds, 1),
            "requests_per_task": 1 if complete_and_claim else 2}  # fmt: skip


async def measure(args, db: dict, port: int) -> dict:
    (agent,) = await scenarios.register_all("127.0.0.1", port, db["enrollment"], "big", 1)
    out = {}
    try:
        for name, document in (
            ("fan_out", scenarios.noop_run(f"fan-out-{args.tasks}", args.tasks)),
            ("chain", scenarios.chain_run(f"chain-{args.tasks}", args.tasks)),
        ):
            result = await submit_with_parked_agent(port, db["api"], agent, document)
            print(f"  {name}: {result['tasks']} tasks ({result['body_kb']} KB) answered in {result['submit_ms']} ms; "
                  f"first task assigned {result['first_assigned_after_answer_ms']} ms after the answer")  # fmt: skip
            if name == "fan_out":
                await agent.complete(result.pop("first_attempt"))
                # Its other 9,999 tasks stay ready: canceled, so that the chain's claims get the chain's.
                client = Connection("127.0.0.1", port, token=db["api"])
                await client.json("POST", f"{scenarios.API}/runs/{result.pop('run_id')}/cancel", {})
                client.close()
            else:
                result.pop("run_id")
                first = result.pop("first_attempt")
                hops = min(args.chain_tasks, args.tasks - 1)
                result["hand_off"] = await hand_off(agent, first, hops, not args.claim_separately)
                h = result["hand_off"]
                print(f"  chain hand-off: {h['tasks']} tasks in {h['seconds']} s, {h['tasks_per_s']} tasks/s")
            out[name] = result
    finally:
        agent.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--chain-tasks", type=int, default=2000, help="hand-offs to time along the chain")
    parser.add_argument("--claim-separately", action="store_true", help="a claim after each completion")
    parser.add_argument("--output", type=Path, default=BENCH / "big_dag_results.json")
    args = parser.parse_args()
    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    db = benchdb.recreate(print)
    port = launch.free_port()
    log = Path(f"/tmp/cp-big-dag-{port}.log")
    proc = launch.start_server(port, env={"DATABASE_URL": db["url"], "LOG_LEVEL": "WARNING"}, log=log)
    try:
        results = asyncio.run(measure(args, db, port))
    finally:
        launch.stop(proc)
    results["machine"] = {"cores": os.cpu_count(), "load_average_at_start": [round(x, 2) for x in load]}
    args.output.write_text(json.dumps(results, indent=2) + "\n")
    print(f"results: {args.output}; server log: {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
