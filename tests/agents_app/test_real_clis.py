"""The real Claude Code and Codex CLIs (the npm packages pinned in package.json) against the scripted model
API stand-in: what they do, print and send back for a file written, a command run, a permission denied, a
429, a 500 and a missing login. The daemon's executors are built on these facts; each test fails if a CLI
upgrade changes one of them."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.model_api import Usage, http_error, rate_limited, text, tool_call
from tests.real_clis import (
    CLAUDE,
    CODEX,
    TEST_API_KEY,
    claude_command,
    claude_env,
    cli_binary,
    codex_command,
    codex_env,
    pinned_versions,
    run_cli,
)

pytestmark = pytest.mark.integration  # the real CLIs, every one of them


@pytest.fixture
def workdir(tmp_path):
    """A git repository to work in, as the daemon's worktrees are."""
    path = tmp_path / "work"
    path.mkdir()
    subprocess.run(["git", "init", "-q", str(path)], check=True)
    return path


def test_the_pinned_versions_are_installed():
    pinned = pinned_versions()
    claude = subprocess.run([cli_binary(CLAUDE), "--version"], capture_output=True, text=True, check=True)
    codex = subprocess.run([cli_binary(CODEX), "--version"], capture_output=True, text=True, check=True)
    assert claude.stdout.split()[0] == pinned["@anthropic-ai/claude-code"]
    assert codex.stdout.split() == ["codex-cli", pinned["@openai/codex"]]


# -- Claude Code ------------------------------------------------------------------------------------------
def test_claude_in_accept_edits_writes_and_edits_a_file_and_reports_usage_and_cost(tmp_path, model_api, workdir):
    session_id = str(uuid.uuid4())
    target = workdir / "hello.txt"
    model_api.script(
        tool_call(
            "Write",
            {"file_path": str(target), "content": "hello from the stand-in\n"},
            say="Writing hello.txt.",
            usage=Usage(input_tokens=100, output_tokens=20, cache_read_tokens=50, cache_write_tokens=30),
        ),
        tool_call(
            "Edit",
            {"file_path": str(target), "old_string": "hello", "new_string": "goodbye"},
            usage=Usage(input_tokens=110, output_tokens=15, cache_read_tokens=150),
        ),
        text("Done: hello.txt says goodbye.", usage=Usage(input_tokens=120, output_tokens=10, cache_read_tokens=200)),
    )

    run = run_cli(claude_command(session_id), claude_env(tmp_path, model_api), workdir, "Write hello.txt.\n")

    assert run.returncode == 0, run
    assert target.read_text() == "goodbye from the stand-in\n"
    [init] = run.of("system", "init")
    assert init["session_id"] == session_id
    assert init["permissionMode"] == "acceptEdits"
    assert init["cwd"] == str(workdir)
    assert {"Write", "Edit", "Bash"} <= set(init["tools"])
    assert init["apiKeySource"] == "ANTHROPIC_API_KEY"
    # One assistant event per content block, one user event per tool result, all with the session id.
    blocks = [block for event in run.of("assistant") for block in event["message"]["content"]]
    assert [b["type"] for b in blocks] == ["text", "tool_use", "tool_use", "text"]
    write, edit = blocks[1], blocks[2]
    assert (write["name"], edit["name"]) == ("Write", "Edit")
    results = [block for event in run.of("user") for block in event["message"]["content"]]
    assert [(r["type"], r["tool_use_id"], r.get("is_error", False)) for r in results] == [
        ("tool_result", write["id"], False),
        ("tool_result", edit["id"], False),
    ]
    assert {e["session_id"] for e in run.of("assistant") + run.of("user")} == {session_id}

    result = run.result
    assert result["subtype"] == "success" and result["is_error"] is False
    assert result["result"] == "Done: hello.txt says goodbye."
    assert result["session_id"] == session_id
    assert result["num_turns"] == 3
    assert result["permission_denials"] == []
    usage = result["usage"]
    assert (usage["input_tokens"], usage["output_tokens"]) == (330, 45)
    assert (usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"]) == (400, 30)
    assert result["total_cost_usd"] > 0
    [(model, model_usage)] = result["modelUsage"].items()
    assert model_usage["costUSD"] == result["total_cost_usd"] and model_usage["inputTokens"] == 330

    # Nothing asked of the API but the three turns (no token counting, no model list); each tool's result
    # came back, and the session id and key came with every request.
    assert [r.path for r in model_api.requests] == ["/v1/messages?beta=true"] * 3
    turns = model_api.turns
    assert len(turns) == 3 and not model_api.unscripted
    assert [r["tool_use_id"] for r in turns[1].tool_results()] == [write["id"]]
    assert [r["tool_use_id"] for r in turns[2].tool_results()] == [edit["id"]]
    assert "created successfully" in turns[1].tool_results()[0]["content"]
    assert {r.headers["x-claude-code-session-id"] for r in turns} == {session_id}
    assert {r.headers["x-api-key"] for r in turns} == {TEST_API_KEY}
    assert turns[0].json["model"] == model and turns[0].json["stream"] is True


def test_claude_in_the_default_mode_denies_a_bash_write_and_still_exits_0(tmp_path, model_api, workdir):
    model_api.script(
        tool_call("Bash", {"command": "echo hi > out.txt", "description": "Write out.txt"}),
        text("I could not write out.txt."),
    )

    run = run_cli(claude_command(str(uuid.uuid4()), None), claude_env(tmp_path, model_api), workdir, "Write out.txt.\n")

    # Nothing written, yet a clean exit and a "success" result: only permission_denials tells.
    assert run.returncode == 0, run
    assert not (workdir / "out.txt").exists()
    result = run.result
    assert (result["subtype"], result["is_error"]) == ("success", False)
    [denial] = result["permission_denials"]
    assert denial["tool_name"] == "Bash"
    assert denial["tool_input"]["command"] == "echo hi > out.txt"
    [event] = run.of("system", "permission_denied")
    assert event["tool_name"] == "Bash" and event["tool_use_id"] == denial["tool_use_id"]
    assert "needs approval" in event["message"]
    [returned] = model_api.turns[1].tool_results()
    assert returned["tool_use_id"] == denial["tool_use_id"] and returned["is_error"] is True


def test_claude_on_a_429_with_no_retries_ends_at_once_with_an_error_result(tmp_path, model_api, workdir):
    model_api.script(*[rate_limited(reset_in_s=3600, retry_after_s=30)] * 3)

    run = run_cli(claude_command(str(uuid.uuid4())), claude_env(tmp_path, model_api), workdir, "Hello.\n")

    assert run.returncode == 1, run
    assert run.seconds < 30
    assert len(model_api.turns) == 1  # CLAUDE_CODE_MAX_RETRIES=0: one request, no retry
    result = run.result
    assert result["is_error"] is True and result["subtype"] == "success"  # the subtype alone does not tell
    assert (result["api_error_status"], result["api_error_type"]) == (429, "rate_limit_error")
    assert result["terminal_reason"] == "api_error"
    assert result["result"] == "API Error: Request rejected (429) · This request would exceed your rate limit."
    [message] = run.of("assistant")
    assert message["error"] == "rate_limit" and message["is_api_error_message"] is True
    assert message["message"]["model"] == "<synthetic>"
    # With an API key the unified reset headers go unreported: no rate_limit_event, no reset time.
    assert run.of("rate_limit_event") == []


def test_claude_with_a_subscription_reports_a_usage_limit_and_its_reset_time(tmp_path, model_api, workdir):
    model_api.script(rate_limited(reset_in_s=3600))
    reset_at = int(model_api.pending[0].headers["anthropic-ratelimit-unified-reset"])
    env = claude_env(tmp_path, model_api, oauth=True)

    run = run_cli(claude_command(str(uuid.uuid4())), env, workdir, "Hello.\n")

    assert run.returncode == 1, run
    [event] = run.of("rate_limit_event")
    assert event["rate_limit_info"] == {
        "status": "rejected",
        "resetsAt": reset_at,
        "rateLimitType": "five_hour",
        "isUsingOverage": False,
    }
    result = run.result
    assert result["is_error"] is True
    assert (result["api_error_status"], result["api_error"]) == (429, "usage_limit_reached")
    assert re.fullmatch(r"You've hit your 5-hour limit · resets \d{1,2}(:\d\d)?[ap]m \(UTC\)", result["result"])
    [turn] = model_api.turns
    assert turn.headers["authorization"] == f"Bearer {TEST_API_KEY}" and "x-api-key" not in turn.headers


def test_claude_on_a_500_retries_as_told_then_fails(tmp_path, model_api, workdir):
    model_api.script(http_error(500), http_error(500))
    env = claude_env(tmp_path, model_api, max_retries=1)

    run = run_cli(claude_command(str(uuid.uuid4())), env, workdir, "Hello.\n")

    assert run.returncode == 1, run
    [retry] = run.of("system", "api_retry")
    assert (retry["attempt"], retry["max_retries"], retry["error_status"]) == (1, 1, 500)
    assert retry["error"] == "server_error"
    assert 0 < retry["retry_delay_ms"] < 5000
    result = run.result
    assert result["is_error"] is True and result["api_error_status"] == 500
    assert result["result"].startswith("API Error: 500 Internal server error")
    assert len(model_api.turns) == 2


def test_claude_not_logged_in_fails_before_any_request(tmp_path, model_api, workdir):
    env = claude_env(tmp_path, model_api, api_key=None)

    run = run_cli(claude_command(str(uuid.uuid4())), env, workdir, "Hello.\n")
    status = subprocess.run([cli_binary(CLAUDE), "auth", "status"], env=env, capture_output=True, text=True)

    assert run.returncode == 1, run
    assert run.result["is_error"] is True and run.result["result"] == "Not logged in · Please run /login"
    assert [m["error"] for m in run.of("assistant")] == ["authentication_failed"]
    assert model_api.requests == []
    assert status.returncode == 1 and json.loads(status.stdout)["loggedIn"] is False
    logged_in = subprocess.run(
        [cli_binary(CLAUDE), "auth", "status"], env=claude_env(tmp_path, model_api), capture_output=True, text=True
    )
    assert logged_in.returncode == 0
    assert (json.loads(logged_in.stdout)["loggedIn"], json.loads(logged_in.stdout)["authMethod"]) == (True, "api_key")


# -- Codex ------------------------------------------------------------------------------------------------
def test_codex_in_workspace_write_runs_a_command_and_applies_a_patch(tmp_path, model_api, workdir):
    last_message = tmp_path / "last-message.txt"
    patch = "*** Begin Patch\n*** Add File: notes.md\n+patched by codex\n*** End Patch\n"
    model_api.script(
        tool_call(
            "exec_command",
            {"cmd": "echo from-codex > made.txt && cat made.txt"},
            usage=Usage(input_tokens=200, output_tokens=30, cache_read_tokens=50, reasoning_tokens=10),
        ),
        tool_call("apply_patch", patch, usage=Usage(input_tokens=250, output_tokens=40, cache_read_tokens=150)),
        text("Wrote made.txt and notes.md.", usage=Usage(input_tokens=300, output_tokens=15, cache_read_tokens=250)),
    )

    run = run_cli(codex_command(workdir, last_message), codex_env(tmp_path, model_api), workdir, "Make files.\n")

    assert run.returncode == 0, run
    assert (workdir / "made.txt").read_text() == "from-codex\n"
    assert (workdir / "notes.md").read_text() == "patched by codex\n"
    assert last_message.read_text() == "Wrote made.txt and notes.md."
    types = [e["type"] for e in run.events]
    assert types[:2] == ["thread.started", "turn.started"] and types[-1] == "turn.completed"
    thread_id = run.events[0]["thread_id"]
    assert uuid.UUID(thread_id)
    command = [e["item"] for e in run.of("item.completed") if e["item"]["type"] == "command_execution"]
    assert command == [
        {
            "id": command[0]["id"],
            "type": "command_execution",
            "command": "/bin/bash -lc 'echo from-codex > made.txt && cat made.txt'",
            "aggregated_output": "from-codex\n",
            "exit_code": 0,
            "status": "completed",
        }
    ]
    started = [e["item"] for e in run.of("item.started")]
    assert [(i["type"], i["status"]) for i in started] == [
        ("command_execution", "in_progress"),
        ("file_change", "in_progress"),
    ]
    [change] = [e["item"] for e in run.of("item.completed") if e["item"]["type"] == "file_change"]
    assert change["changes"] == [{"path": str(workdir / "notes.md"), "kind": "add"}] and change["status"] == "completed"
    [message] = [e["item"] for e in run.of("item.completed") if e["item"]["type"] == "agent_message"]
    assert message["text"] == "Wrote made.txt and notes.md."
    # Summed over the turn's three requests; cached tokens are part of input_tokens, reasoning of output.
    assert run.events[-1]["usage"] == {
        "input_tokens": 750,
        "cached_input_tokens": 450,
        "cache_write_input_tokens": 0,
        "output_tokens": 85,
        "reasoning_output_tokens": 10,
    }

    assert [(r.method, r.path) for r in model_api.requests] == [("POST", "/v1/responses")] * 3  # nothing else
    turns = model_api.turns
    assert len(turns) == 3 and not model_api.unscripted
    [command_output] = turns[1].tool_results()
    assert command_output["type"] == "function_call_output" and "Process exited with code 0" in command_output["output"]
    [patch_output] = turns[2].tool_results()
    assert patch_output["type"] == "custom_tool_call_output" and "A notes.md" in patch_output["output"]
    assert {r.headers["thread-id"] for r in turns} == {thread_id}
    assert {r.headers["authorization"] for r in turns} == {f"Bearer {TEST_API_KEY}"}
    assert turns[0].json["model"] == "gpt-5.5"


def test_codex_sandboxes_confine_writes_to_the_workspace(tmp_path, model_api, workdir):
    """Landlock/seccomp work in this container: workspace-write writes in the workspace only, read-only
    nowhere. A command the sandbox refuses is not codex's failure, and mostly leaves no item in --json (at
    most a failed one): the model is told."""
    outside = Path("/var/tmp") / f"cp-codex-sandbox-probe-{uuid.uuid4().hex}"
    model_api.script(
        tool_call("exec_command", {"cmd": f"echo in > inside.txt; echo out > {outside}; echo done"}),
        tool_call("exec_command", {"cmd": f"echo out > {outside}"}),
        text("Tried."),
        tool_call("exec_command", {"cmd": "echo in > second.txt"}),
        text("Tried."),
    )
    env = codex_env(tmp_path, model_api)

    try:
        workspace_write = run_cli(codex_command(workdir, tmp_path / "1.txt"), env, workdir, "Write.\n")
        read_only = run_cli(codex_command(workdir, tmp_path / "2.txt", "read-only"), env, workdir, "Write.\n")
        assert not outside.exists()
    finally:
        outside.unlink(missing_ok=True)

    assert workspace_write.returncode == 0 and read_only.returncode == 0
    assert (workdir / "inside.txt").read_text() == "in\n"
    assert not (workdir / "second.txt").exists()
    # The command that failed only in part is an item. Those refused outright mostly leave none, but codex
    # 0.171.0 sometimes reports one as a failed item (exit 1) too: the partial one is the item that exited 0.
    items = [e["item"] for e in workspace_write.of("item.completed") if e["item"]["type"] == "command_execution"]
    [item] = [i for i in items if i["exit_code"] == 0]
    others = [i for i in items if i is not item]
    assert all(i["exit_code"] != 0 and "Read-only file system" in i["aggregated_output"] for i in others)
    assert f"{outside}: Read-only file system\n" in item["aggregated_output"]  # stderr and stdout, in either order
    assert "done\n" in item["aggregated_output"]
    refused_items = [e["item"] for e in read_only.events
                     if e["type"].startswith("item.") and e["item"]["type"] != "agent_message"]  # fmt: skip
    assert all(i.get("exit_code") not in (0, None) or i.get("status") == "in_progress" for i in refused_items)
    refused = [model_api.turns[2].tool_results(), model_api.turns[4].tool_results()]
    for [output], path in zip(refused, [str(outside), "second.txt"], strict=True):
        assert "Process exited with code 1" in output["output"]
        assert f"{path}: Read-only file system" in output["output"]


def test_codex_outside_git_needs_skip_git_repo_check(tmp_path, model_api):
    plain = tmp_path / "plain"
    plain.mkdir()
    model_api.script(text("Hi."))
    env = codex_env(tmp_path, model_api)

    refused = run_cli(codex_command(plain, tmp_path / "1.txt"), env, plain, "Hi.\n")
    allowed = run_cli(codex_command(plain, tmp_path / "2.txt", git=False), env, plain, "Hi.\n")

    assert refused.returncode == 1 and "Not inside a trusted directory" in refused.stderr, refused
    assert allowed.returncode == 0 and (tmp_path / "2.txt").read_text() == "Hi."


def test_codex_on_a_500_fails_the_turn(tmp_path, model_api, workdir):
    model_api.script(http_error(500))
    last_message = tmp_path / "last.txt"

    run = run_cli(codex_command(workdir, last_message), codex_env(tmp_path, model_api), workdir, "Hi.\n")

    assert run.returncode == 1, run
    overloaded = "We’re currently experiencing high demand, which may cause temporary errors."
    assert run.events[-2:] == [
        {"type": "error", "message": overloaded},
        {"type": "turn.failed", "error": {"message": overloaded}},
    ]
    assert len(model_api.turns) == 1
    assert last_message.read_text() == ""


def test_codex_reconnecting_errors_are_not_failures(tmp_path, model_api, workdir):
    model_api.script(http_error(500), text("Recovered."))
    env = codex_env(tmp_path, model_api, stream_max_retries=1)

    run = run_cli(codex_command(workdir, tmp_path / "last.txt"), env, workdir, "Hi.\n")

    assert run.returncode == 0, run
    [error] = run.of("error")
    assert error["message"].startswith("Reconnecting... 1/1 (")
    assert run.of("turn.failed") == [] and run.events[-1]["type"] == "turn.completed"
    assert (tmp_path / "last.txt").read_text() == "Recovered."


def test_codex_on_a_429_gives_up_without_the_reset_time(tmp_path, model_api, workdir):
    model_api.script(*[rate_limited(reset_in_s=3600, retry_after_s=1)] * 3)
    env = codex_env(tmp_path, model_api, stream_max_retries=1)

    run = run_cli(codex_command(workdir, tmp_path / "last.txt"), env, workdir, "Hi.\n")

    assert run.returncode == 1, run
    gave_up = "exceeded retry limit, last status: 429 Too Many Requests"
    assert [e["message"] for e in run.of("error")] == [f"Reconnecting... 1/1 ({gave_up})", gave_up]
    assert run.of("turn.failed") == [{"type": "turn.failed", "error": {"message": gave_up}}]
    assert len(model_api.turns) == 2


def test_codex_on_a_usage_limit_stops_at_once_and_says_when_it_resets(tmp_path, model_api, workdir):
    model_api.script(*[rate_limited(reset_in_s=3600, usage_limit=True)] * 3)
    env = codex_env(tmp_path, model_api, request_max_retries=2, stream_max_retries=2)

    run = run_cli(codex_command(workdir, tmp_path / "last.txt"), env, workdir, "Hi.\n")

    assert run.returncode == 1, run
    [failed] = run.of("turn.failed")
    assert failed["error"]["message"].startswith("You’ve hit your usage limit.")
    # The time alone for a reset later today; on another day its date first ("Dec 3rd, 2026 1:00 AM").
    assert re.search(r"try again at ([A-Z][a-z]{2} \d{1,2}(st|nd|rd|th), \d{4} )?\d{1,2}:\d\d [AP]M\.$",
                     failed["error"]["message"])  # fmt: skip
    assert len(model_api.turns) == 1  # final: retries configured, none made


def test_codex_not_logged_in(tmp_path, model_api, workdir):
    env = codex_env(tmp_path, model_api, api_key=None)

    run = run_cli(codex_command(workdir, tmp_path / "last.txt"), env, workdir, "Hi.\n")
    status = subprocess.run([cli_binary(CODEX), "login", "status"], env=env, capture_output=True, text=True)

    assert run.returncode == 1, run
    missing = "Missing environment variable: `OPENAI_API_KEY`."
    assert run.of("turn.failed") == [{"type": "turn.failed", "error": {"message": missing}}]
    assert model_api.requests == []
    # `codex login status` knows only auth.json: it says "Not logged in" even when OPENAI_API_KEY is set.
    assert status.returncode == 1 and "Not logged in" in status.stderr
    with_key = subprocess.run(
        [cli_binary(CODEX), "login", "status"], env=codex_env(tmp_path, model_api), capture_output=True, text=True
    )
    assert with_key.returncode == 1 and "Not logged in" in with_key.stderr


def test_codex_logged_in_with_an_api_key_passes_login_status_and_sends_the_key(tmp_path, model_api, workdir):
    env = codex_env(tmp_path, model_api, login=True)
    model_api.script(text("Hi."))

    status = subprocess.run([cli_binary(CODEX), "login", "status"], env=env, capture_output=True, text=True)
    run = run_cli(codex_command(workdir, tmp_path / "last.txt"), env, workdir, "Hi.\n")

    assert status.returncode == 0 and "API key configured" in status.stderr
    assert "OPENAI_API_KEY" not in env
    assert run.returncode == 0, run
    assert model_api.turns[0].headers["authorization"] == f"Bearer {TEST_API_KEY}"


# -- no internet ------------------------------------------------------------------------------------------
def _addresses_reached(trace: Path) -> set[str]:
    """Every IPv4/IPv6 address a traced process tree connected or sent to (DNS servers included)."""
    found = set()
    for line in trace.read_text().splitlines():
        found.update(re.findall(r'inet_addr\("([^"]+)"\)', line))
        found.update(re.findall(r'inet_pton\(AF_INET6, "([^"]+)"', line))
    return found


STRACE = ["strace", "-f", "-qq", "-e", "trace=connect,sendto,sendmsg,sendmmsg"]


def test_claude_reaches_nothing_but_the_stand_in(tmp_path, model_api, workdir):
    trace = tmp_path / "claude.strace"
    model_api.script(tool_call("Write", {"file_path": str(workdir / "a.txt"), "content": "a"}), text("Done."))
    command = [*STRACE, "-o", str(trace), *claude_command(str(uuid.uuid4()))]

    run = run_cli(command, claude_env(tmp_path, model_api), workdir, "Write a.txt.\n")

    assert run.returncode == 0, run
    assert _addresses_reached(trace) == {"127.0.0.1"}


def test_codex_reaches_nothing_but_the_stand_in(tmp_path, model_api, workdir):
    trace = tmp_path / "codex.strace"
    model_api.script(tool_call("exec_command", {"cmd": "echo a > a.txt"}), text("Done."))
    command = [*STRACE, "-o", str(trace), *codex_command(workdir, tmp_path / "last.txt")]

    run = run_cli(command, codex_env(tmp_path, model_api), workdir, "Write a.txt.\n")

    assert run.returncode == 0 and (workdir / "a.txt").exists(), run
    assert _addresses_reached(trace) == {"127.0.0.1"}
