#!/usr/bin/env python
"""How fast a person's answer reaches Claude Code (issue 11, item 2): from the answer's POST
(/api/v1/input-requests/<id>/answer) to the real claude CLI's next request to the model, the command it was
allowed run in between, over N answers in one session; and, for scale, claude's own turn (one model request to
the next) running the same commands unasked.

It runs the end-to-end test that measures it (tests/agents_app/test_mcp_permissions.py, the real server, daemon
and claude against the model API stand-in, PostgreSQL's test database) and prints its figures.

    .venv/bin/python bench/input_latency.py [--answers 20]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TEST = "tests/agents_app/test_mcp_permissions.py::test_an_answer_reaches_claude_within_a_second"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=20)
    args = parser.parse_args()
    env = {**os.environ, "CP_BENCH_ANSWERS": str(args.answers)}
    env.setdefault("CP_TEST_DB_NAME", "test_cp_bench_input")
    proc = subprocess.run([sys.executable, "-m", "pytest", TEST, "-q", "-p", "no:cacheprovider"], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("INPUT_LATENCY ")), None)
    if line is None:
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n")
        return 1
    figures = json.loads(line.removeprefix("INPUT_LATENCY "))
    load = os.getloadavg()
    for name, what in (("answer_to_resume", "answer POST -> claude's next model request"),
                       ("answer_post", "the answer POST itself"),
                       ("claude_turn_unasked", "claude's own turn, nobody asked")):  # fmt: skip
        f = figures[name]
        print(f"{what:45s} n={f['n']:3d}  p50 {f['p50_ms']:7.1f} ms  p95 {f['p95_ms']:7.1f} ms  "
              f"(min {f['min_ms']:.1f}, max {f['max_ms']:.1f})")  # fmt: skip
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return 0 if proc.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
