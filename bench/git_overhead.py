#!/usr/bin/env python
"""The git overhead of one workspace task on the agent, with the daemon's own code (agents_app/cp_agent.py:
RepoCache, Worktree): worktree at the base + merge of its dependencies' commits, then commit and push, on a
repository of 10,000 files / 100 MB served by `git daemon` on a loopback port (git:// over TCP).

    .venv/bin/python bench/git_overhead.py [--files 10000] [--mb 100] [--tasks 40]

Tasks form waves of four, each task merging the four of the wave before (the fan-in of the seed's DAG), so
every worktree merges, as most tasks of a real run do. The first clone into the agent's cache and the first
checkout of a worktree slot are reported apart (once per agent and repository, and per slot).
Target: p50 <= 1 s per task. Figures in bench/git_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agents_app import cp_agent  # noqa: E402

IDENTITY = ("bench", "bench@cp-agent.invalid")


def git(*args, cwd=None) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_repository(root: Path, files: int, megabytes: int) -> Path:
    """A bare repository whose one commit holds `files` files of incompressible bytes, `megabytes` in all."""
    seed, bare = root / "seed", root / "srv" / "big.git"
    git("init", "-q", "-b", "main", str(seed))
    size = megabytes * 1024 * 1024 // files
    for i in range(files):
        folder = seed / f"pkg{i // 500:02d}"
        folder.mkdir(exist_ok=True)
        (folder / f"mod{i:05d}.py").write_bytes(os.urandom(size // 2).hex().encode()[:size])
    git("add", ".", cwd=seed)
    git("-c", f"user.name={IDENTITY[0]}", "-c", f"user.email={IDENTITY[1]}", "commit", "-qm", "big", cwd=seed)
    bare.parent.mkdir(parents=True)
    git("clone", "-q", "--bare", str(seed), str(bare))
    shutil.rmtree(seed)
    return bare


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--tasks", type=int, default=40)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cp-git-bench-"))
    daemon = None
    try:
        started = time.monotonic()
        bare = make_repository(root, args.files, args.mb)
        print(f"repository: {args.files} files, {args.mb} MB, made in {time.monotonic() - started:.1f} s")
        port = free_port()
        daemon = subprocess.Popen(
            ["git", "daemon", "--reuseaddr", "--export-all", "--enable=receive-pack", f"--base-path={bare.parent}",
             "--listen=127.0.0.1", f"--port={port}", str(bare.parent)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"git://127.0.0.1:{port}/big.git"
        for _ in range(100):
            if subprocess.run(["git", "ls-remote", url], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        base = git("rev-parse", "main", cwd=bare)
        cache = cp_agent.RepoCache(root / "agent" / "git", url)
        t0 = time.monotonic()
        with cache.locked():
            cache.ensure([base])
        first_clone = time.monotonic() - t0
        print(f"first clone into the agent's cache: {first_clone:.2f} s")
        steps: dict[str, list[float]] = {"worktree+merge": [], "commit": [], "push": [], "total": []}
        previous_wave: list[str] = []
        wave: list[str] = []
        for n in range(args.tasks):
            if n and n % 4 == 0:
                previous_wave, wave = wave, []
            tree = cp_agent.Worktree(cache)
            a = time.monotonic()
            tree.create(base, previous_wave, {}, IDENTITY)
            b = time.monotonic()
            (tree.path / f"pkg{n % 20:02d}" / f"task_{n}.py").write_text(f"VALUE = {n}\n" * 20)
            sha = tree.commit_all(f"task {n}", IDENTITY)
            c = time.monotonic()
            tree.push(f"cp/bench/task-{n}")
            d = time.monotonic()
            tree.release()
            wave.append(sha)
            steps["worktree+merge"].append(b - a)
            steps["commit"].append(c - b)
            steps["push"].append(d - c)
            steps["total"].append(d - a)
        figures = {
            "files": args.files, "megabytes": args.mb, "tasks": args.tasks, "first_clone_s": round(first_clone, 3),
            "first_slot_checkout_s": round(steps["worktree+merge"][0], 3),  # in the figures below too
            "load_average": os.getloadavg()[0],
            **{f"{k}_p50_s": round(statistics.median(v), 3) for k, v in steps.items()},
            "total_p90_s": round(sorted(steps["total"])[int(0.9 * len(steps["total"])) - 1], 3),
            "total_max_s": round(max(steps["total"]), 3),
        }  # fmt: skip
        for k, v in figures.items():
            print(f"{k:>22}  {v}")
        ok = figures["total_p50_s"] <= 1.0
        print(f"target p50 <= 1 s per task: {'met' if ok else 'MISSED'}")
        (ROOT / "bench" / "git_results.json").write_text(json.dumps(figures, indent=2) + "\n")
        return 0 if ok else 1
    finally:
        if daemon is not None:
            daemon.terminate()
            daemon.wait(10)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
