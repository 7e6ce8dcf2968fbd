"""The daemon's side of retention and goodbye, without a server: old attempt folders pruned at start, and a
goodbye that never holds up an exit (an older server's 404, an unreachable one)."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from agents_app import cp_agent
from agents_app.cp_agent import Config


def _attempt_folder(work: Path, name: str, age_h: float) -> Path:
    folder = work / name
    (folder / "inputs").mkdir(parents=True)
    (folder / "out").mkdir()
    then = time.time() - age_h * 3600
    os.utime(folder, (then, then))
    return folder


def test_attempt_folders_older_than_keep_failed_are_removed_at_start_and_nothing_else(tmp_path):
    old = _attempt_folder(tmp_path, "build-1a2b3c4d", 30)
    fresh = _attempt_folder(tmp_path, "build-5e6f7a8b", 1)
    git = tmp_path / "git"
    git.mkdir()
    records = tmp_path / "cg-1.state.tasks"
    records.mkdir()
    stranger = tmp_path / "notes-deadbeef"  # named like one, but no inputs/: not an attempt's
    stranger.mkdir()
    for path in (git, records, stranger):
        os.utime(path, (time.time() - 100 * 3600,) * 2)
    (tmp_path / "cg-1.state.json").write_text("{}")

    assert cp_agent.prune_kept_worktrees(tmp_path, 24) == 1
    assert not old.exists() and fresh.exists()
    assert git.exists() and records.exists() and stranger.exists() and (tmp_path / "cg-1.state.json").exists()


def test_keep_task_folders_keeps_them(tmp_path):
    old = _attempt_folder(tmp_path, "build-1a2b3c4d", 30)
    assert cp_agent.prune_kept_worktrees(tmp_path, 24, keep_task_folders=True) == 0
    assert old.exists()
    config = Config.from_argv(["--server", "http://127.0.0.1:9", "--keep-task-folders"], environ={})
    assert config.keep_task_folders is True
    assert Config.from_argv(["--server", "http://127.0.0.1:9"], environ={}).keep_task_folders is False


def _agent(tmp_path: Path, server: str) -> cp_agent.Agent:
    config = Config.from_argv(["--server", server, "--name", "leaver", "--work-dir", str(tmp_path)], environ={})
    agent = cp_agent.Agent(config, {})
    agent.token = "cpa_test"
    return agent


def test_goodbye_to_a_server_without_the_endpoint_or_none_at_all_is_quiet_and_quick(tmp_path):
    class OldServer(cp_agent.ApiClient):
        def request(self, path, payload=None, **kwargs):
            self.asked = (path, kwargs.get("timeout"))
            raise cp_agent.ApiError(404, "not_found", "no such endpoint")

    agent = _agent(tmp_path, "http://127.0.0.1:9")
    agent.api = OldServer(agent.config.servers)
    agent._say_goodbye()  # raises nothing
    assert agent.api.asked == ("/agents/goodbye", cp_agent.GOODBYE_TIMEOUT_S)

    # A server that accepts the connection but never answers: one try, cut off after the short timeout.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        agent = _agent(tmp_path, f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        agent._say_goodbye()
        assert time.monotonic() - started < cp_agent.GOODBYE_TIMEOUT_S + 2
