#!/usr/bin/env python
"""What one task costs in SQL: claim and complete, one after the other, in this process (no HTTP, no
concurrency), against a fresh `cp_bench` holding one run of --backlog ready no-op tasks. Prints the wall time
of each statement per task, most expensive first, so a change to the scheduler's SQL can be checked here
before the full benchmark (`.venv/bin/python bench/statement_costs.py --backlog 3000 --tasks 300`).

It shows, for instance, whether the claim query's cost grows with the backlog (it should not).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

import benchdb  # noqa: E402
import scenarios  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backlog", type=int, default=3000, help="ready tasks when the measurement starts")
    parser.add_argument("--tasks", type=int, default=300, help="tasks to claim and complete")
    parser.add_argument("--analyze", action="store_true", help="ANALYZE the database before measuring")
    parser.add_argument("--chain", action="store_true",
                        help="the run is a chain: each completion releases the task the next claim takes")  # fmt: skip
    args = parser.parse_args()
    if args.tasks > args.backlog:
        parser.error("--tasks may be at most --backlog")

    db = benchdb.recreate()
    os.environ["DATABASE_URL"] = db["url"]  # before django.setup(): this process works on cp_bench only
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "control_plane.settings")
    os.environ.setdefault("LOG_LEVEL", "WARNING")
    import django

    django.setup()
    from django.db import connection

    from agents_app import registry
    from tasks_app import actions
    from tasks_app.dag import parse_document

    assert connection.settings_dict["NAME"] == benchdb.BENCH_DB, connection.settings_dict["NAME"]
    document = (scenarios.chain_run if args.chain else scenarios.noop_run)("statement-costs", args.backlog)
    actions.submit_run(parse_document(document), document, actor="bench")
    if args.analyze:
        with connection.cursor() as cur:
            cur.execute("ANALYZE")
    info = {"name": "statement-costs", "labels": ["bench"], "executors": ["shell"], "capacity": 1}
    _agent, token = registry.register_agent(db["enrollment"], info)

    per_statement: dict[str, list] = defaultdict(lambda: [0, 0.0])

    def timed(execute, sql, params, many, context):
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            entry = per_statement[" ".join(sql.split())[:70]]
            entry[0] += 1
            entry[1] += time.perf_counter() - started

    phases = {"authenticate (x2)": 0.0, "claim": 0.0, "complete": 0.0}
    with connection.execute_wrapper(timed):
        for _ in range(args.tasks):
            t0 = time.perf_counter()
            agent = registry.authenticate_agent(token)
            t1 = time.perf_counter()
            assignment = actions.claim_ready_tasks(agent, 1)[0]
            t2 = time.perf_counter()
            agent = registry.authenticate_agent(token)
            t3 = time.perf_counter()
            actions.complete_attempt(agent, assignment["attempt_id"], "succeeded", None, "", 0)
            t4 = time.perf_counter()
            phases["authenticate (x2)"] += (t1 - t0) + (t3 - t2)
            phases["claim"] += t2 - t1
            phases["complete"] += t4 - t3

    n = args.tasks
    what = f"a chain of {args.backlog} tasks" if args.chain else f"backlog {args.backlog} ready tasks at the start"
    print(f"{n} tasks claimed and completed one at a time, {what}")
    print("per task, ms:  " + ", ".join(f"{k} {v / n * 1000:.2f}" for k, v in phases.items()))
    print(f"{'ms/task':>8}  {'calls':>6}  statement")
    total = 0.0
    for sql, (calls, seconds) in sorted(per_statement.items(), key=lambda kv: -kv[1][1]):
        total += seconds
        print(f"{seconds / n * 1000:8.3f}  {calls:6d}  {sql}")
    print(f"{total / n * 1000:8.3f}  {'':6}  all statements")
    return 0


if __name__ == "__main__":
    sys.exit(main())
