"""The daemon's claude and codex executors (agents_app/cp_agent.py) running the real CLIs against the
scripted model API stand-in: the prompt on stdin, edits allowed in the worktree, outcomes that are honest
(refused tool calls, rate limits, a missing login), the event stream turned into progress, a text log,
usage, cost and the session id. tests/agents_app/test_real_clis.py pins what the CLIs themselves do."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from agents_app.cp_agent import ClaudeExecutor, CodexExecutor, TaskContext
from tests.agents_app.test_cp_agent_unit import Recorder
from tests.model_api import Usage, rate_limited, text, tool_call
from tests.real_clis import CLAUDE, CODEX, claude_env, cli_binary, codex_env


@pytest.fixture
def worktree(tmp_path):
    path = tmp_path / "worktree"
    path.mkdir()
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    return path


def context(tmp_path: Path, worktree: Path | None, rec: Recorder, **task) -> TaskContext:
    work = tmp_path / "attempt"
    (work / "out").mkdir(parents=True, exist_ok=True)
    task = {"id": "t", "run_id": "r", "key": "impl", "title": "Implement", **task}
    ctx = TaskContext(task, str(uuid.uuid4()), work, rec.report, rec.log)
    ctx.worktree = worktree
    return ctx


@pytest.fixture
def claude(tmp_path, model_api, monkeypatch):
    """The real claude, its environment as the daemon's own (a task gets the allow-listed part of it)."""
    for name, value in claude_env(tmp_path, model_api).items():
        monkeypatch.setenv(name, value)
    return ClaudeExecutor({"PATH": "/usr/bin:/bin", "CP_CLAUDE_BIN": cli_binary(CLAUDE)})


@pytest.fixture
def codex(tmp_path, model_api, monkeypatch):
    for name, value in codex_env(tmp_path, model_api, stream_max_retries=1).items():
        monkeypatch.setenv(name, value)
    return CodexExecutor({"PATH": "/usr/bin:/bin", "CP_CODEX_BIN": cli_binary(CODEX)})


def test_claude_edits_in_the_worktree_and_reports_output_usage_cost_session_and_progress(
    tmp_path, model_api, worktree, claude
):
    target = worktree / "router.py"
    model_api.script(
        tool_call("Write", {"file_path": str(target), "content": "ROUTES = []\n"}, say="Writing the router.",
                  usage=Usage(input_tokens=100, output_tokens=20, cache_read_tokens=50, cache_write_tokens=30)),
        text("Done: router.py.", usage=Usage(input_tokens=120, output_tokens=10, cache_read_tokens=200)),
    )  # fmt: skip
    rec = Recorder()
    ctx = context(tmp_path, worktree, rec, prompt="- write router.py\n" + "x" * 200_000)  # a list item; > 128 KiB
    outcome = claude.run(ctx)
    assert outcome.error == "", outcome
    assert target.read_text() == "ROUTES = []\n"
    assert outcome.result["output"] == "Done: router.py."
    assert outcome.extra["session_id"] == ctx.attempt_id  # --session-id: the attempt's own
    usage = outcome.extra["usage"]
    assert usage["cost_estimated"] is False and usage["cost_usd"] > 0  # Claude Code's own total_cost_usd
    assert usage["output_tokens"] == 30 and usage["cache_read_tokens"] == 250
    assert (None, "Write router.py") in rec.progress
    assert "Writing the router." in rec.text and '"type":' not in rec.text
    assert (ctx.out_dir / "transcript.jsonl").exists()
    first = model_api.turns[0].json["messages"][0]["content"]
    sent = first if isinstance(first, str) else " ".join(b.get("text", "") for b in first)
    assert "- write router.py" in sent  # the prompt arrived whole, on stdin


def test_claude_refused_a_tool_call_fails_the_task_instead_of_succeeding(tmp_path, model_api, worktree, claude):
    model_api.script(
        tool_call("Bash", {"command": "curl -s http://example.invalid > page.html"}), text("I could not fetch it.")
    )
    ctx = context(tmp_path, worktree, Recorder(), prompt="Fetch the page.", params={"permission_mode": "default"})
    outcome = claude.run(ctx)
    assert outcome.error.startswith("permission_denied: claude was refused 1 tool call(s): $ curl -s"), outcome
    assert outcome.outcome == ""


def test_claude_on_a_429_is_rate_limited_not_failed(tmp_path, model_api, worktree, claude):
    model_api.script(rate_limited(reset_in_s=3600))
    outcome = claude.run(context(tmp_path, worktree, Recorder(), prompt="Hi."))
    assert outcome.outcome == "rate_limited" and outcome.error.startswith("rate_limited: claude: error: API Error:")
    assert "429" in outcome.error and "resets_at" not in outcome.extra  # an API key's 429 names no reset


def test_claude_on_a_subscription_usage_limit_is_rate_limited_until_its_reset(
    tmp_path, model_api, worktree, monkeypatch
):
    for name, value in claude_env(tmp_path, model_api, oauth=True).items():
        monkeypatch.setenv(name, value)
    model_api.script(rate_limited(reset_in_s=7200, usage_limit=True))
    executor = ClaudeExecutor({"PATH": "/usr/bin:/bin", "CP_CLAUDE_BIN": cli_binary(CLAUDE)})
    outcome = executor.run(context(tmp_path, worktree, Recorder(), prompt="Hi."))
    assert outcome.outcome == "rate_limited", outcome
    assert outcome.extra["resets_at"].endswith("Z")  # from the rate_limit_event's resetsAt


def test_claude_not_logged_in_says_so(tmp_path, model_api, worktree, monkeypatch):
    for name, value in claude_env(tmp_path, model_api, api_key=None).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    executor = ClaudeExecutor({"PATH": "/usr/bin:/bin", "CP_CLAUDE_BIN": cli_binary(CLAUDE)})
    outcome = executor.run(context(tmp_path, worktree, Recorder(), prompt="Hi."))
    assert outcome.error.startswith("not_logged_in: claude:") and "Not logged in" in outcome.error
    assert model_api.requests == []


def test_codex_writes_in_its_sandbox_and_reports_output_estimated_cost_and_thread(tmp_path, model_api, worktree, codex):
    model_api.script(
        tool_call("exec_command", {"cmd": "echo from-codex > made.txt"},
                  usage=Usage(input_tokens=200, output_tokens=30, cache_read_tokens=50, reasoning_tokens=10)),
        text("Wrote made.txt.", usage=Usage(input_tokens=300, output_tokens=15, cache_read_tokens=250)),
    )  # fmt: skip
    rec = Recorder()
    ctx = context(tmp_path, worktree, rec, prompt="- make a file")
    outcome = codex.run(ctx)
    assert outcome.error == "", outcome
    assert (worktree / "made.txt").read_text() == "from-codex\n"
    assert outcome.result["output"] == "Wrote made.txt."
    assert uuid.UUID(outcome.extra["session_id"])  # the thread id
    usage = outcome.extra["usage"]
    assert usage["cost_estimated"] is True and usage["cost_usd"] > 0 and usage["reasoning_tokens"] == 10
    assert any(m and m.startswith("$ /bin/bash -lc 'echo from-codex > made.txt'") for _, m in rec.progress)


def test_codex_reconnecting_then_recovering_succeeds(tmp_path, model_api, worktree, codex):
    from tests.model_api import http_error

    model_api.script(http_error(500), text("Recovered."))
    outcome = codex.run(context(tmp_path, worktree, Recorder(), prompt="Hi.", params={"expect_changes": False}))
    assert outcome.error == "" and outcome.result["output"] == "Recovered."


def test_codex_on_a_429_is_rate_limited(tmp_path, model_api, worktree, codex):
    model_api.script(*[rate_limited(reset_in_s=3600, retry_after_s=1)] * 3)
    outcome = codex.run(context(tmp_path, worktree, Recorder(), prompt="Hi."))
    assert outcome.outcome == "rate_limited" and "429" in outcome.error


def test_codex_on_a_usage_limit_is_rate_limited_until_the_time_it_names(tmp_path, model_api, worktree, codex):
    model_api.script(rate_limited(reset_in_s=3600, usage_limit=True))
    outcome = codex.run(context(tmp_path, worktree, Recorder(), prompt="Hi."))
    assert outcome.outcome == "rate_limited" and "usage limit" in outcome.error
    assert "T" in outcome.extra["resets_at"]  # "try again at 8:24 AM." as an instant


def test_codex_not_logged_in_says_so(tmp_path, model_api, worktree, monkeypatch):
    for name, value in codex_env(tmp_path, model_api, api_key=None).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    executor = CodexExecutor({"PATH": "/usr/bin:/bin", "CP_CODEX_BIN": cli_binary(CODEX)})
    outcome = executor.run(context(tmp_path, worktree, Recorder(), prompt="Hi."))
    assert outcome.error.startswith("not_logged_in: codex: Missing environment variable"), outcome


# -- pre-flight: logged in or not (issue 10, item 7) ---------------------------------------------------------


def test_preflight_asks_claude_whether_it_is_logged_in(tmp_path, model_api, monkeypatch):
    executor = ClaudeExecutor({"PATH": "/usr/bin:/bin", "CP_CLAUDE_BIN": cli_binary(CLAUDE)})
    for name, value in claude_env(tmp_path, model_api).items():
        monkeypatch.setenv(name, value)
    check = executor.check()
    assert check.usable and "logged in (claude auth status: api_key)" in check.detail, check
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    check = executor.check()
    assert not check.usable and "not logged in" in check.detail and check.version, check


def test_preflight_takes_codex_login_status_or_a_key_in_the_environment(tmp_path, model_api, monkeypatch):
    executor = CodexExecutor({"PATH": "/usr/bin:/bin", "CP_CODEX_BIN": cli_binary(CODEX)})
    for name, value in codex_env(tmp_path, model_api).items():
        monkeypatch.setenv(name, value)
    check = executor.check()
    assert check.usable and "API key in OPENAI_API_KEY" in check.detail, check
    monkeypatch.delenv("OPENAI_API_KEY")
    check = executor.check()
    assert not check.usable and "not logged in" in check.detail, check
    (tmp_path / "logged").mkdir()
    for name, value in codex_env(tmp_path / "logged", model_api, login=True).items():  # codex login --with-api-key
        monkeypatch.setenv(name, value)
    check = executor.check()
    assert check.usable and "codex login status" in check.detail, check
