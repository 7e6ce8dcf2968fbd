"""The agent daemon on its own: real processes, real sockets, a tiny stand-in server; no Django.

Run: .venv/bin/python -m pytest tests/agents_app/test_cp_agent_unit.py -q -p no:django
"""

from __future__ import annotations

import ast
import calendar
import contextlib
import email.parser
import email.policy
import json
import os
import select
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agents_app import cp_agent
from agents_app.cp_agent import (
    ClaudeExecutor,
    CodexExecutor,
    Config,
    ConfigError,
    LiveTasks,
    ProgressStream,
    ShellExecutor,
    SimulatedExecutor,
    StateFile,
    TaskContext,
)

AGENT_PY = Path(cp_agent.__file__)
REPO = AGENT_PY.parent.parent


# ------------------------------------------------------------------------------------------- helpers


class Recorder:
    """What an executor reported through its context."""

    def __init__(self):
        self.progress: list[tuple[float | None, str | None]] = []
        self.output: list[str] = []

    def report(self, progress=None, message=None):
        self.progress.append((progress, message))

    def log(self, text):
        self.output.append(text)

    @property
    def text(self) -> str:
        return "".join(self.output)


def make_context(tmp_path: Path, recorder: Recorder, **task) -> TaskContext:
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True, exist_ok=True)
    task = {"id": "task-uuid", "run_id": "run-uuid", "key": "core-1", "title": "Core", **task}
    return TaskContext(
        task,
        "attempt-uuid-1234",
        work,
        agent_name="unit-agent",
        time_scale=1.0,
        report=recorder.report,
        log=recorder.log,
    )


def process_gone(pid: int) -> bool:
    """No such process, or only its zombie (an orphan's reaper may be slow or absent in containers)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state in ("Z", "X")


def write_script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


# Small fakes of the CLIs' event streams, for the parsing (the real CLIs: tests/agents_app/test_real_clis.py).
FAKE_CLAUDE = """\
if [ "$1" = "--version" ]; then echo "2.0.14 (Claude Code)"; exit 0; fi
if [ "$1" = "auth" ]; then echo '{"loggedIn": true, "authMethod": "api_key"}'; exit 0; fi
for arg in "$@"; do printf '%s\\n' "$arg"; done > "$CP_OUT_DIR/argv.txt"
prompt=$(cat)
echo '{"type":"system","subtype":"init","session_id":"s1","model":"claude-sonnet-4-5","permissionMode":"acceptEdits"}'
echo '{"type":"assistant","message":{"id":"m1","model":"claude-sonnet-4-5","content":[{"type":"text","text":"On it."},\
{"type":"tool_use","id":"t1","name":"Write","input":{"file_path":"/w/notes.md","content":"x"}}],"usage":{"input_tokens":10,"output_tokens":5}}}'
printf '{"type":"result","subtype":"success","is_error":false,"result":"claude did: %s","session_id":"s1",\
"total_cost_usd":0.0123,"num_turns":2,"permission_denials":[],\
"usage":{"input_tokens":100,"output_tokens":50,"cache_read_input_tokens":7,\
"cache_creation_input_tokens":3}}\\n' "$prompt"
"""

FAKE_CODEX = """\
if [ "$1" = "--version" ]; then echo "codex-cli 0.46.0"; exit 0; fi
if [ "$1" = "login" ]; then echo "Logged in using an API key"; exit 0; fi
for arg in "$@"; do printf '%s\\n' "$arg"; done > "$CP_OUT_DIR/argv.txt"
prompt=$(cat)
echo "thinking..." >&2
echo '{"type":"thread.started","thread_id":"th-1"}'
echo '{"type":"item.completed","item":{"id":"i1","type":"command_execution","command":"ls -la","exit_code":0}}'
echo '{"type":"item.completed","item":{"id":"i2","type":"file_change","changes":[{"path":"/w/core.py","kind":"add"}]}}'
printf '{"type":"item.completed","item":{"id":"i3","type":"agent_message","text":"codex did: %s"}}\\n' "$prompt"
echo '{"type":"turn.completed","usage":{"input_tokens":1000,"cached_input_tokens":200,"output_tokens":300}}'
"""


@pytest.fixture
def fake_clis(tmp_path: Path) -> dict[str, str]:
    """An environment whose PATH holds fake `claude` and `codex` programs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_script(bin_dir / "claude", FAKE_CLAUDE)
    write_script(bin_dir / "codex", FAKE_CODEX)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------------------------- stdlib only


def test_module_imports_only_the_standard_library():
    tree = ast.parse(AGENT_PY.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in the agent daemon"
            imported.add(node.module.split(".")[0])
    assert imported, "no imports found: the check is broken"
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
    assert "stdlib-only" in (ast.get_docstring(tree) or "")


@pytest.mark.integration  # runs the daemon script itself
def test_runs_as_a_script_and_as_a_module():
    for argv in ([str(AGENT_PY), "--help"], ["-m", "agents_app.cp_agent", "--help"]):
        proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=10)
        assert proc.returncode == 0, proc.stderr
        assert "--enrollment-token" in proc.stdout


# ------------------------------------------------------------------------------------------- shell


def test_shell_task_succeeds_with_its_stdout_tail(tmp_path):
    rec = Recorder()
    ctx = make_context(tmp_path, rec, executor="shell", command="echo hello; echo oops >&2")
    outcome = ShellExecutor().run(ctx)
    assert (outcome.error, outcome.exit_code) == ("", 0)
    assert outcome.result == {"exit_code": 0, "stdout_tail": "hello\n"}
    assert "hello" in rec.text and "oops" in rec.text


def test_shell_task_fails_with_its_exit_code(tmp_path):
    outcome = ShellExecutor().run(make_context(tmp_path, Recorder(), command="echo before; exit 3"))
    assert outcome.exit_code == 3
    assert outcome.error == "exit code 3"
    assert outcome.result["stdout_tail"] == "before\n"


def test_shell_task_runs_in_its_work_dir_with_the_cp_variables(tmp_path):
    ctx = make_context(
        tmp_path,
        Recorder(),
        command='pwd; echo "$CP_TASK_ID $CP_TASK_KEY $CP_RUN_ID $CP_ATTEMPT_ID"; echo made > "$CP_OUT_DIR/file.txt"',
    )
    outcome = ShellExecutor().run(ctx)
    lines = outcome.result["stdout_tail"].splitlines()
    assert Path(lines[0]).resolve() == ctx.work_dir.resolve()
    assert lines[1] == "task-uuid core-1 run-uuid attempt-uuid-1234"
    assert (ctx.out_dir / "file.txt").read_text() == "made\n"


def test_shell_task_without_a_command_fails_without_running(tmp_path):
    outcome = ShellExecutor().run(make_context(tmp_path, Recorder(), command=None))
    assert outcome.error == "shell task has no command" and outcome.exit_code is None


def test_timeout_kills_the_whole_process_group(tmp_path):
    ctx = make_context(
        tmp_path,
        Recorder(),
        timeout_s=0.5,
        command=("sleep 100 & echo $! > bg.pid; sleep 100 & echo $! > fg.pid; echo $$ > sh.pid; wait"),
    )
    started = time.monotonic()
    outcome = ShellExecutor().run(ctx)
    assert time.monotonic() - started < 2.5
    assert outcome.error == "timeout after 0.5 s"
    assert outcome.exit_code == -signal.SIGTERM
    pids = [int((ctx.work_dir / name).read_text()) for name in ("bg.pid", "fg.pid", "sh.pid")]
    assert all(process_gone(pid) for pid in pids), pids


def test_background_children_do_not_outlive_a_finished_task(tmp_path):
    ctx = make_context(tmp_path, Recorder(), command="sleep 100 & echo $! > bg.pid; echo done")
    started = time.monotonic()
    outcome = ShellExecutor().run(ctx)
    assert outcome.error == "" and time.monotonic() - started < 2
    assert process_gone(int((ctx.work_dir / "bg.pid").read_text()))


def test_cancel_stops_the_task_promptly(tmp_path):
    ctx = make_context(tmp_path, Recorder(), command="echo $$ > sh.pid; sleep 100")
    threading.Timer(0.3, ctx.canceled.set).start()
    started = time.monotonic()
    outcome = ShellExecutor().run(ctx)
    assert outcome.error == "canceled" and time.monotonic() - started < 2
    assert process_gone(int((ctx.work_dir / "sh.pid").read_text()))


def test_cp_progress_lines_report_progress(tmp_path):
    rec = Recorder()
    ctx = make_context(
        tmp_path,
        rec,
        command="echo 'CP_PROGRESS 0.25 compiling'; printf 'CP_PROGRESS 0.5'; "
        "echo; echo 'CP_PROGRESS 1 all done'; echo 'not CP_PROGRESS 0.9'",
    )
    ShellExecutor().run(ctx)
    # The command's own reports, then the daemon's last one: a finished shell task says so.
    assert rec.progress == [(0.25, "compiling"), (0.5, None), (1.0, "all done"), (1.0, "exited 0")]


def test_output_streams_before_the_process_ends(tmp_path):
    rec = Recorder()
    ctx = make_context(tmp_path, rec, command="printf 'partial line without newline'; sleep 1")
    worker = threading.Thread(target=ShellExecutor().run, args=(ctx,))
    worker.start()
    deadline = time.monotonic() + 0.8
    while "partial" not in rec.text and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "partial line without newline" in rec.text
    worker.join()


# ------------------------------------------------------------------------------------------- the supervisor


def stat_of(pid: int) -> list[str]:
    """/proc/PID/stat's fields from the state on: [0] state, [1] ppid, [2] pgrp, [3] session."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def live_members(pgid: int) -> list[int]:
    """The processes of group `pgid` that are not zombies."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = stat_of(int(entry.name))
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                found.append(int(entry.name))
    return found


def eventually(predicate, timeout: float = 5.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def pid_in(path: Path) -> int:
    """The pid a task wrote to `path`, once it is all there."""
    return int(eventually(lambda: path.exists() and path.read_text().endswith("\n") and path.read_text(), 10, path))


def test_a_task_runs_under_a_supervisor_that_leads_its_session_and_is_recorded_until_the_group_is_gone(tmp_path):
    records = LiveTasks(tmp_path / "unit-1.state.tasks")
    assert records.take_lock()
    ctx = make_context(tmp_path, Recorder(), command="echo $$ > sh.pid; sleep 100")
    ctx.records = records
    outcomes: list = []
    worker = threading.Thread(target=lambda: outcomes.append(ShellExecutor().run(ctx)))
    worker.start()
    task = pid_in(ctx.work_dir / "sh.pid")
    supervisor = int(stat_of(task)[1])
    argv = Path(f"/proc/{supervisor}/cmdline").read_bytes().decode().split("\0")[:-1]
    # python -I -S -c PROGRAM: the supervisor's part of this file alone, which starts in a fraction of the time
    assert argv[1:4] == ["-I", "-S", "-c"] and argv[4].startswith("# cp-agent's supervisor")
    assert argv[5] == "--supervise" and argv[7:] == ["--", "/bin/sh", "-c", ctx.task["command"]]
    assert (int(stat_of(task)[2]), int(stat_of(task)[3])) == (supervisor, supervisor)  # its group and session
    record = json.loads((records.directory / "attempt-uuid-1234.json").read_text())
    assert record == {
        "attempt_id": "attempt-uuid-1234",
        "key": "core-1",
        "pgid": supervisor,
        "start_time": int(stat_of(supervisor)[19]),
    }
    ctx.canceled.set()
    worker.join(5)
    assert (outcomes[0].error, outcomes[0].exit_code) == ("canceled", -signal.SIGTERM)
    assert process_gone(task) and process_gone(supervisor)
    assert not list(records.directory.glob("*.json"))


@pytest.mark.parametrize("part", ["supervisor", "MCP relay"])
def test_a_part_run_as_a_program_of_its_own_names_nothing_it_does_not_define(part, tmp_path):
    """Each is checked by ruff's pyflakes rules as the file it is: an unknown name would fail only when that
    line ran, in a task's supervisor or in claude's relay."""
    if part == "supervisor":
        program = cp_agent.supervisor_command(3, ["true"])[4]
    else:
        relay = cp_agent.PermissionRelay(tmp_path / ".cp-agent", lambda request, gone: {}, 1.0)
        program = relay.mcp_config()["mcpServers"]["cp_agent"]["args"][3]
        relay.close()
    assert program.startswith(f"# cp-agent's {part} (agents_app/cp_agent.py)\n")
    ruff = Path(sys.executable).with_name("ruff")
    done = subprocess.run([str(ruff), "check", "--isolated", "--select", "F", "--stdin-filename", "part.py", "-"],
                          input=program, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert len(program) < 20_000  # a part, not the whole file


def test_a_supervisor_whose_daemon_is_gone_stops_the_task_group(tmp_path):
    """The daemon's end of the socket closing, as when the kernel closes a SIGKILLed daemon's files, is the
    signal: SIGTERM to the group, SIGKILL after the grace (here the leader survives SIGTERM), the supervisor
    itself included."""
    ours, theirs = socket.socketpair()
    command = "trap 'touch got-term' TERM; echo $$ > sh.pid; while :; do sleep 0.1; done"
    supervisor = subprocess.Popen(
        cp_agent.supervisor_command(theirs.fileno(), ["/bin/sh", "-c", command]),
        cwd=tmp_path,
        start_new_session=True,
        pass_fds=(theirs.fileno(),),
    )
    theirs.close()
    assert ours.makefile().readline().startswith("started ")
    task = pid_in(tmp_path / "sh.pid")
    assert supervisor.pid in live_members(supervisor.pid) and task in live_members(supervisor.pid)
    ours.close()
    gone_at = time.monotonic()
    assert supervisor.wait(cp_agent.ORPHAN_GRACE_S + 5) == -signal.SIGKILL
    eventually(lambda: not live_members(supervisor.pid), 2, "the whole group to be gone")
    took = time.monotonic() - gone_at
    assert (tmp_path / "got-term").exists()  # SIGTERM first
    assert cp_agent.ORPHAN_GRACE_S - 0.1 < took < cp_agent.ORPHAN_GRACE_S + 2, took


def test_a_timed_out_task_that_ignores_sigterm_is_killed_after_the_grace(tmp_path, monkeypatch):
    monkeypatch.setattr(cp_agent, "KILL_GRACE_S", 0.5)
    ctx = make_context(tmp_path, Recorder(), timeout_s=0.3, command="trap '' TERM; echo $$ > sh.pid; sleep 100")
    started = time.monotonic()
    outcome = ShellExecutor().run(ctx)
    assert 0.8 <= time.monotonic() - started < 3
    assert (outcome.error, outcome.exit_code) == ("timeout after 0.3 s", -signal.SIGKILL)
    assert process_gone(int((ctx.work_dir / "sh.pid").read_text()))


def test_a_program_that_cannot_be_started_fails_the_task_saying_why(tmp_path):
    codex = tmp_path / "codex"
    codex.write_text("#!/nonexistent/interpreter\n")
    codex.chmod(0o755)
    outcome = CodexExecutor({"PATH": str(tmp_path)}).run(make_context(tmp_path, Recorder(), prompt="x"))
    assert outcome.error.startswith(f"cannot start {codex}: [Errno 2] No such file or directory"), outcome.error
    assert outcome.exit_code is None


def test_a_supervisor_that_dies_before_starting_the_task_fails_it_with_what_it_said(tmp_path, monkeypatch):
    broken = [sys.executable, "-c", "import sys; print('no python for you', file=sys.stderr); sys.exit(3)"]
    monkeypatch.setattr(cp_agent, "supervisor_command", lambda fd, argv: broken)
    outcome = ShellExecutor().run(make_context(tmp_path, Recorder(), command="touch ran"))
    assert outcome.error.startswith("cannot start /bin/sh: its supervisor (") and outcome.exit_code is None
    assert outcome.error.endswith(") exited with 3: no python for you"), outcome.error
    assert not (tmp_path / "work" / "ran").exists()


# ------------------------------------------------------------------------------------------- leftovers


def start_group(command: str, attempt_id: str, stdin=None) -> subprocess.Popen:
    """A process group of its own, as a task's, its processes carrying CP_ATTEMPT_ID=`attempt_id`."""
    env = {**os.environ, "CP_ATTEMPT_ID": attempt_id}
    return subprocess.Popen(["/bin/sh", "-c", command], env=env, start_new_session=True, stdin=stdin)


def plant(records: LiveTasks, attempt_id: str, pgid: int, start_time: int) -> None:
    record = {"attempt_id": attempt_id, "key": f"task-{attempt_id}", "pgid": pgid, "start_time": start_time}
    (records.directory / f"{attempt_id}.json").write_text(json.dumps(record))


def leaderless_group(tmp_path: Path, attempt_id: str) -> tuple[int, int, int]:
    """A group whose leader (the supervisor, say) has died while a member runs on: (pgid, leader's start
    time, the member's pid)."""
    member_file = tmp_path / f"{attempt_id}.pid"
    leader = start_group(f"sleep 60 & echo $! > {member_file}; read _", attempt_id, stdin=subprocess.PIPE)
    started = int(stat_of(leader.pid)[19])
    member = pid_in(member_file)
    leader.stdin.close()  # the leader exits; the member stays in its group
    leader.wait(5)
    return leader.pid, started, member


def test_leftovers_of_a_previous_life_are_stopped_but_never_a_recycled_pid(tmp_path):
    records = LiveTasks(tmp_path / "unit-1.state.tasks")
    assert records.take_lock()
    # Still ours: a supervisor alive with the recorded start time; a group whose supervisor died, a member
    # carrying the attempt's id.
    alive = start_group("sleep 60", "attempt-alive")
    plant(records, "attempt-alive", alive.pid, int(stat_of(alive.pid)[19]))
    pgid, started, orphan = leaderless_group(tmp_path, "attempt-orphaned")
    plant(records, "attempt-orphaned", pgid, started)
    # Not ours: the recorded pid now belongs to another process (another start time); a leaderless group
    # whose members carry another attempt's id.
    stranger = start_group("sleep 60", "attempt-new")
    plant(records, "attempt-old", stranger.pid, int(stat_of(stranger.pid)[19]) - 100)
    other_pgid, other_started, other_member = leaderless_group(tmp_path, "attempt-other")
    plant(records, "attempt-unrelated", other_pgid, other_started)
    try:
        stopped = records.kill_leftovers(grace=1.0)
        assert sorted(stopped) == ["task-attempt-alive", "task-attempt-orphaned"]
        assert alive.wait(2) == -signal.SIGTERM
        eventually(lambda: process_gone(orphan), 2, "the orphaned member to be killed")
        assert not process_gone(stranger.pid) and not process_gone(other_member)
        assert not list(records.directory.glob("*.json"))  # every record is forgotten
    finally:
        os.killpg(stranger.pid, signal.SIGKILL)
        os.killpg(other_pgid, signal.SIGKILL)
        stranger.wait()


def test_two_daemons_sharing_one_state_do_not_take_each_others_tasks_directory(tmp_path):
    first, second = LiveTasks(tmp_path / "d"), LiveTasks(tmp_path / "d")
    assert first.take_lock()
    assert not second.take_lock()


# ------------------------------------------------------------------------------------------- simulated


def test_simulated_task_reports_steps_and_writes_its_result_file(tmp_path):
    rec = Recorder()
    ctx = make_context(tmp_path, rec, executor="simulated", params={"duration_s": 0.1, "steps": 4})
    outcome = SimulatedExecutor().run(ctx)
    assert outcome.error == ""
    assert [p for p, _ in rec.progress] == [0.25, 0.5, 0.75, 1.0]
    written = json.loads((ctx.out_dir / "core-1_result.json").read_text())
    assert written == outcome.result
    assert written["task"] == "core-1" and written["title"] == "Core" and written["agent"] == "unit-agent"
    assert written["simulated"] is True and written["duration_s"] == 0.1


def test_simulated_task_honors_fail_and_time_scale(tmp_path):
    ctx = make_context(tmp_path, Recorder(), params={"duration_s": 100, "fail": True})
    ctx.time_scale = 0.001
    started = time.monotonic()
    outcome = SimulatedExecutor().run(ctx)
    assert time.monotonic() - started < 1
    assert outcome.error == "simulated failure"
    assert json.loads((ctx.out_dir / "core-1_result.json").read_text())["outcome"] == "failed"


def test_simulated_task_stops_when_canceled(tmp_path):
    ctx = make_context(tmp_path, Recorder(), params={"duration_s": 30})
    threading.Timer(0.2, ctx.canceled.set).start()
    started = time.monotonic()
    assert SimulatedExecutor().run(ctx).error == "canceled"
    assert time.monotonic() - started < 1


# ------------------------------------------------------------------------------------------- AI CLIs


def test_claude_reads_the_prompt_on_stdin_and_its_stream_gives_output_usage_cost_session_and_progress(
    tmp_path, fake_clis
):
    rec = Recorder()
    ctx = make_context(tmp_path, rec, executor="claude", prompt="- plan the framework")  # not taken for an option
    usage_sent = []
    ctx.report_usage = usage_sent.append
    outcome = ClaudeExecutor(fake_clis).run(ctx)
    assert outcome.error == "" and outcome.outcome == ""
    assert outcome.result["output"] == "claude did: - plan the framework" and outcome.result["session_id"] == "s1"
    argv = (ctx.out_dir / "argv.txt").read_text().splitlines()
    assert argv[:6] == ["-p", "--output-format", "stream-json", "--verbose", "--permission-mode", "acceptEdits"]
    assert "- plan the framework" not in argv and argv[-2] == "--session-id"
    usage = outcome.extra["usage"]
    assert usage["cost_usd"] == 0.0123 and usage["cost_estimated"] is False  # the CLI's own figure
    assert (usage["input_tokens"], usage["output_tokens"], usage["cache_read_tokens"], usage["cache_write_tokens"]) == (
        100, 50, 7, 3,
    )  # fmt: skip
    assert outcome.extra["session_id"] == "s1"
    assert (None, "Write notes.md") in rec.progress
    assert "On it." in rec.text and '"type"' not in rec.text  # the log is text, not JSON
    assert len((ctx.out_dir / "transcript.jsonl").read_text().splitlines()) == 3  # the raw events, kept


def test_claude_params_become_its_flags(tmp_path, fake_clis):
    params = {"permission_mode": "plan", "allowed_tools": ["Read", "Bash(git *)"], "disallowed_tools": ["WebFetch"],
              "model": "claude-opus-4-5", "max_turns": 12, "budget_usd": 2.5, "system_prompt": "Be brief."}  # fmt: skip
    ctx = make_context(tmp_path, Recorder(), prompt="go", params=params)
    ClaudeExecutor(fake_clis).run(ctx)
    argv = (ctx.out_dir / "argv.txt").read_text().splitlines()
    joined = " ".join(argv)
    assert "--permission-mode plan" in joined and "--allowedTools Read Bash(git *)" in joined
    assert "--disallowedTools WebFetch" in joined and "--model claude-opus-4-5" in joined
    assert "--max-turns 12" in joined and "--max-budget-usd 2.5" in joined
    assert "--append-system-prompt Be brief." in joined


@pytest.mark.skipif(os.geteuid() != 0, reason="the refusal is for root only")
def test_claude_bypass_permissions_as_root_needs_a_sandboxed_host(tmp_path, fake_clis):
    ctx = make_context(tmp_path, Recorder(), prompt="go", params={"permission_mode": "bypassPermissions"})
    outcome = ClaudeExecutor(fake_clis).run(ctx)
    assert "refused as root" in outcome.error and "--sandboxed-host" in outcome.error
    ctx.sandboxed_host = True
    assert ClaudeExecutor(fake_clis).run(ctx).error == ""
    assert "bypassPermissions" in (ctx.out_dir / "argv.txt").read_text()


def claude_result(tmp_path, result: dict, before: str = "", code: int = 0) -> Path:
    """A fake claude whose stream ends with `result`."""
    line = json.dumps({"type": "result", "session_id": "s9", **result})
    return write_script(tmp_path / "claude", f"cat > /dev/null\n{before}\necho '{line}'\nexit {code}\n")


def test_claude_refused_tool_calls_fail_the_task_naming_them(tmp_path):
    denials = [{"tool_name": "Bash", "tool_use_id": "t1", "tool_input": {"command": "rm -rf build"}}]
    claude_result(tmp_path, {"subtype": "success", "is_error": False, "result": "I could not.",
                             "permission_denials": denials})  # fmt: skip
    outcome = ClaudeExecutor({"PATH": str(tmp_path)}).run(make_context(tmp_path, Recorder(), prompt="x"))
    assert outcome.error.startswith("permission_denied: claude was refused 1 tool call(s): $ rm -rf build")


def test_claude_error_results_fail_in_its_own_words(tmp_path):
    claude_result(
        tmp_path, {"subtype": "error_max_turns", "is_error": True, "errors": ["Reached max turns (3)"]}, code=1
    )
    outcome = ClaudeExecutor({"PATH": str(tmp_path)}).run(make_context(tmp_path, Recorder(), prompt="x"))
    assert outcome.error == "claude: error_max_turns: Reached max turns (3)"


def test_claude_refused_for_rate_is_rate_limited_with_the_reset(tmp_path):
    limit = {"type": "rate_limit_event", "rate_limit_info": {"status": "rejected", "resetsAt": 1893456000}}
    claude_result(tmp_path, {"subtype": "success", "is_error": True, "result": "API Error: 429 rate_limit_error"},
                  before=f"echo '{json.dumps(limit)}'", code=1)  # fmt: skip
    outcome = ClaudeExecutor({"PATH": str(tmp_path)}).run(make_context(tmp_path, Recorder(), prompt="x"))
    assert outcome.outcome == "rate_limited" and outcome.error.startswith("rate_limited: claude:")
    assert outcome.extra["resets_at"] == "2030-01-01T00:00:00Z"


def test_claude_not_logged_in_says_so(tmp_path):
    claude_result(tmp_path, {"subtype": "success", "is_error": True, "result": "Invalid API key · Please run /login"},
                  code=1)  # fmt: skip
    outcome = ClaudeExecutor({"PATH": str(tmp_path)}).run(make_context(tmp_path, Recorder(), prompt="x"))
    assert outcome.error.startswith("not_logged_in: claude:") and outcome.outcome == ""


def test_a_cli_is_stopped_at_its_budget_from_live_usage(tmp_path):
    # Opus-priced output tokens: 100,000 of them is $7.50, past a $1 budget, long before the run would end.
    message = {"type": "assistant", "message": {"id": "m1", "model": "claude-opus-4-1", "content": [],
                                                 "usage": {"input_tokens": 10, "output_tokens": 100000}}}  # fmt: skip
    write_script(tmp_path / "claude", f"cat > /dev/null\necho '{json.dumps(message)}'\nexec sleep 30\n")
    ctx = make_context(tmp_path, Recorder(), prompt="x", params={"budget_usd": 1})
    started = time.monotonic()
    outcome = ClaudeExecutor({"PATH": f"{tmp_path}:/usr/bin:/bin"}).run(ctx)
    assert time.monotonic() - started < 5
    assert outcome.error.startswith("budget_exceeded: $7.5") and outcome.extra["usage"]["cost_estimated"] is True


def test_a_cli_that_goes_silent_is_stopped_as_stalled(tmp_path):
    write_script(
        tmp_path / "codex", 'cat > /dev/null\necho \'{"type":"thread.started","thread_id":"t"}\'\nexec sleep 30\n'
    )
    ctx = make_context(tmp_path, Recorder(), prompt="x", params={"stall_s": 1})
    started = time.monotonic()
    outcome = CodexExecutor({"PATH": f"{tmp_path}:/usr/bin:/bin"}).run(ctx)
    assert time.monotonic() - started < 5
    assert outcome.error == "stalled: no event from codex for 1 s"


def test_claude_binary_can_be_named_by_cp_claude_bin(tmp_path, fake_clis):
    other = claude_result(tmp_path, {"subtype": "success", "is_error": False, "result": "from override"})
    executor = ClaudeExecutor({"PATH": "/nonexistent", "CP_CLAUDE_BIN": str(other)})
    assert executor.run(make_context(tmp_path, Recorder(), prompt="x")).result["output"] == "from override"


def test_codex_runs_exec_json_in_its_sandbox_with_the_prompt_on_stdin(tmp_path, fake_clis):
    rec = Recorder()
    ctx = make_context(tmp_path, rec, executor="codex", prompt="implement core module 1")
    outcome = CodexExecutor(fake_clis).run(ctx)
    assert outcome.error == ""
    assert outcome.result["output"] == "codex did: implement core module 1"
    assert (ctx.out_dir / "argv.txt").read_text().splitlines() == [
        "-a", "never", "exec", "-s", "workspace-write", "-C", str(ctx.work_dir), "--json",
        "-o", str(ctx.work_dir / "last_message.txt"), "--skip-git-repo-check", "-",
    ]  # fmt: skip
    usage = outcome.extra["usage"]
    assert (usage["input_tokens"], usage["cache_read_tokens"], usage["output_tokens"]) == (800, 200, 300)
    assert usage["cost_estimated"] is True and usage["cost_usd"] == pytest.approx(
        (800 * 1.25 + 300 * 10.0 + 200 * 0.125) / 1e6
    )  # priced by the table: gpt-5-codex, the default model
    assert outcome.extra["session_id"] == "th-1"
    assert (None, "$ ls -la → exit 0") in rec.progress and (None, "Edit core.py") in rec.progress
    assert "thinking..." in rec.text


def test_a_retry_resumes_the_previous_session_only_when_asked_and_given_one(tmp_path, fake_clis):
    """params.resume_on_retry and the server's resume_session: `claude --resume ID` and `codex exec resume ID`
    (exec's own options before the subcommand); without it, or with a session id that is not one, a fresh
    session, and the server's reason for not resuming goes to the log."""
    session = "0199a213-81c0-7800-8aa1-bbab2a035a53"
    params = {"resume_on_retry": True}
    rec = Recorder()
    ctx = make_context(tmp_path, rec, executor="claude", prompt="go on", params=params, resume_session=session)
    argv = ClaudeExecutor(fake_clis).arguments(ctx)
    assert argv[argv.index("--resume") + 1] == session and "--session-id" not in argv
    ctx = make_context(tmp_path, rec, executor="codex", prompt="go on", params=params, resume_session=session)
    argv = CodexExecutor(fake_clis).arguments(ctx)
    assert argv[:7] == ["-a", "never", "exec", "-s", "workspace-write", "-C", str(ctx.work_dir)]
    assert argv[7:9] == ["resume", "--json"] and argv[-2:] == [session, "-"]
    for task in ({"resume_session": session}, {"params": params, "resume_session": "--yolo"}):
        ctx = make_context(tmp_path, rec, executor="claude", prompt="go on", **task)
        assert "--resume" not in ClaudeExecutor(fake_clis).arguments(ctx)
    ctx = make_context(tmp_path, rec, executor="claude", prompt="go on", params=params,
                       resume_unavailable="the previous attempt's session is on agent ai-2")  # fmt: skip
    assert "--session-id" in ClaudeExecutor(fake_clis).arguments(ctx)
    assert "not resuming the previous session: the previous attempt's session is on agent ai-2" in rec.text


def test_codex_turn_failed_on_quota_is_rate_limited(tmp_path):
    failed = {"type": "turn.failed", "error": {"message": "You have hit your usage limit. Try again at 3pm."}}
    write_script(tmp_path / "codex", f"cat > /dev/null\necho '{json.dumps(failed)}'\nexit 1\n")
    outcome = CodexExecutor({"PATH": str(tmp_path)}).run(make_context(tmp_path, Recorder(), prompt="x"))
    assert outcome.outcome == "rate_limited" and "usage limit" in outcome.error
    assert outcome.extra["resets_at"].split("T")[1].startswith("15:00")


def test_failing_cli_fails_the_task_in_its_own_words(tmp_path):
    write_script(tmp_path / "codex", "cat > /dev/null; echo broken config >&2; exit 2")
    outcome = CodexExecutor({"PATH": str(tmp_path)}).run(make_context(tmp_path, Recorder(), prompt="x"))
    assert outcome.error == "codex exited with code 2: broken config" and outcome.exit_code == 2


@pytest.mark.integration  # runs the daemon script itself
def test_check_reports_the_cli_versions_and_an_unreachable_server(tmp_path, fake_clis):
    proc = subprocess.run(
        [sys.executable, str(AGENT_PY), "--check", "--server", f"http://127.0.0.1:{closed_port()}"],
        capture_output=True,
        text=True,
        env=fake_clis,
        timeout=15,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = dict(line.split(":", 1) for line in proc.stdout.splitlines())
    assert lines["executor claude"].strip().startswith("ok") and "2.0.14 (Claude Code)" in lines["executor claude"]
    assert "codex-cli 0.46.0" in lines["executor codex"]
    assert lines["executor shell"].strip().startswith("ok")
    assert lines["server"].strip().startswith("unreachable")


def test_check_passes_when_the_server_answers(fake_server):
    proc = subprocess.run(
        [sys.executable, str(AGENT_PY), "--check", "--server", fake_server.url],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert proc.returncode == 0, proc.stdout
    assert "server: ok" in proc.stdout


def test_check_reports_each_server_and_passes_when_one_answers(fake_server):
    dead = f"http://127.0.0.1:{closed_port()}"
    proc = subprocess.run(
        [sys.executable, str(AGENT_PY), "--check", "--server", f"{dead},{fake_server.url}"],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    servers = [line for line in proc.stdout.splitlines() if line.startswith("server: ")]
    assert servers[0].startswith(f"server: unreachable ({dead}: ")
    assert servers[1].startswith(f"server: ok ({fake_server.url} answered HTTP 200")


# ------------------------------------------------------------------------------------------- configuration


def test_plain_http_to_a_remote_host_is_refused_without_insecure(tmp_path):
    with pytest.raises(ConfigError, match="refusing plain http"):
        Config.from_argv(["--server", "http://cp.example.com"], environ={})
    assert Config.from_argv(["--server", "http://cp.example.com/", "--insecure"], environ={}).servers == [
        "http://cp.example.com"
    ]
    for url in ("http://127.0.0.1:8000", "http://localhost:8000", "http://[::1]:8000", "https://cp.example.com"):
        assert Config.from_argv(["--server", url], environ={}).servers == [url]


@pytest.mark.integration  # runs the daemon script itself
def test_plain_http_refusal_exits_with_status_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(AGENT_PY), "--server", "http://10.1.2.3:8000", "--enrollment-token", "t"],
        capture_output=True,
        text=True,
        timeout=10,
        cwd=tmp_path,
    )
    assert proc.returncode == 2 and "--insecure" in proc.stderr


def test_options_come_from_the_environment_and_are_validated(tmp_path):
    env = {"CP_SERVER": "https://cp.example.com", "CP_ENROLLMENT_TOKEN": "enroll", "PATH": "/nonexistent"}
    config = Config.from_argv(["--work-dir", str(tmp_path), "--name", "cg-1", "--labels", "codex, linux"], env)
    assert (config.servers, config.enrollment_token, config.labels) == (
        ["https://cp.example.com"],
        "enroll",
        ["codex", "linux"],
    )
    # No claude/codex on that PATH; git is always checked (workspace tasks need it).
    assert config.executors == ["shell", "simulated", "git"]
    assert config.state_file == tmp_path / "cg-1.state.json"
    for bad in (["--name", "bad name"], ["--labels", "a/b"], ["--capacity", "0"], ["--executors", "perl"]):
        with pytest.raises(ConfigError):
            Config.from_argv(bad, env)
    assert cp_agent.NAME_RE.fullmatch(Config.from_argv([], env).name)


def test_server_takes_a_comma_separated_list_each_url_checked():
    config = Config.from_argv(["--server", "https://a.example.com/, https://b.example.com,https://a.example.com"], {})
    assert config.servers == ["https://a.example.com", "https://b.example.com"]
    env = {"CP_SERVER": "http://127.0.0.1:8001,http://localhost:8002"}
    assert Config.from_argv([], env).servers == ["http://127.0.0.1:8001", "http://localhost:8002"]
    with pytest.raises(ConfigError, match="refusing plain http:// to cp.example.com"):
        Config.from_argv(["--server", "https://a.example.com,http://cp.example.com"], environ={})
    with pytest.raises(ConfigError, match="must be an http"):
        Config.from_argv(["--server", "https://a.example.com,ftp://b.example.com"], environ={})


def test_a_saved_identity_belongs_to_any_list_of_servers_sharing_a_url(tmp_path):
    path = tmp_path / "cg-1.state.json"
    path.write_text(json.dumps({"agent_id": "a", "token": "t1", "name": "cg-1", "server": "https://a"}))  # v1.1
    assert StateFile(path).load(["https://b", "https://a"], "cg-1")["token"] == "t1"
    assert StateFile(path).load(["https://b"], "cg-1") is None
    StateFile(path).save({"agent_id": "a", "token": "t2", "name": "cg-1", "servers": ["https://a", "https://b"]})
    assert StateFile(path).load(["https://b", "https://c"], "cg-1")["token"] == "t2"
    assert StateFile(path).load(["https://c"], "cg-1") is None
    assert StateFile(path).load(["https://a"], "cg-2") is None


def test_state_file_is_created_private(tmp_path):
    path = tmp_path / "state" / "cg-1.state.json"
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "cg-1.state.json.tmp").write_text("left over")
    os.chmod(tmp_path / "state" / "cg-1.state.json.tmp", 0o644)
    StateFile(path).save({"agent_id": "a", "token": "secret", "name": "cg-1", "server": "https://s"})
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert StateFile(path).load(["https://s"], "cg-1")["token"] == "secret"
    assert StateFile(path).load(["https://other"], "cg-1") is None
    assert StateFile(path).load(["https://s"], "cg-2") is None


# ------------------------------------------------------------------------------------------- wire format


def test_multipart_body_parses_back_to_the_file_and_its_name():
    body, content_type = cp_agent.encode_artifact("reports/a b.json", b"\x00binary\r\n--data")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    name_part, file_part = message.iter_parts()
    assert name_part.get_param("name", header="content-disposition") == "name"
    assert name_part.get_content().strip() == "reports/a b.json"
    assert file_part.get_filename() == "reports/a b.json"
    assert file_part.get_payload(decode=True) == b"\x00binary\r\n--data"


def test_log_tail_fits_the_limit_and_says_what_was_dropped():
    text = "é" * 50_000  # 100,000 UTF-8 bytes
    tail = cp_agent.tail_utf8(text, 65536)
    assert len(tail.encode()) <= 65536 and tail.startswith("[cp-agent: ") and tail.endswith("é")
    assert cp_agent.tail_utf8("short", 65536) == "short"


def test_progress_stream_sends_at_most_twice_a_second():
    sent: list[tuple[float, dict]] = []
    stream = ProgressStream(lambda payload: sent.append((time.monotonic(), payload)), "t")
    stream.start()
    for i in range(200):
        stream.report(i / 200, f"step {i}")
        stream.log(f"line {i}\n")
        time.sleep(0.005)
    stream.close()
    gaps = [b[0] - a[0] for a, b in zip(sent, sent[1:-1], strict=False)]  # the flush on close is not throttled
    assert all(gap >= cp_agent.PROGRESS_MIN_GAP_S - 0.05 for gap in gaps), gaps
    assert "".join(p["log"] for _, p in sent) == "".join(f"line {i}\n" for i in range(200))
    assert sent[-1][1]["message"] == "step 199"


def test_backoff_is_jittered_and_capped():
    backoff = cp_agent.Backoff()
    delays = [backoff.next_delay() for _ in range(40)]
    assert all(0 <= d <= 10 for d in delays) and delays[0] <= 0.2
    assert len(set(delays)) > 30


# ------------------------------------------------------------------------------------------- the daemon


class FakeServer:
    """The server's side of the agent endpoints, enough to watch one agent: records every call. Like several
    server processes behind one database it may listen on more ports (listen()); one can be made to answer
    503 (`failing`), or be killed."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.via: list[tuple[str, str]] = []  # (the listener's URL, path) of every call
        self.assignments: list[dict] = []
        self.tokens = {"enroll"}
        self.stale: set[str] = set()
        self.timed_out: set[str] = set()
        self.outages: dict[str, int] = {}  # path -> how many more calls answer 503
        self.failing: set[str] = set()  # listeners' URLs answering 503 to every call
        self.commands: list[dict] = []
        self.outcomes = ["succeeded", "failed", "rate_limited"]  # what complete accepts (v1.1; v1 has two)
        self.artifacts: list[tuple[str, str, bytes]] = []
        self.timings = {"heartbeat_interval_s": 0.2, "lease_s": 60, "max_wait_s": 2}  # what register answers
        self.changed = threading.Condition()
        self.registrations = 0
        self.complete_claims = False  # a completion's `claim` is ignored, as a server before it did
        self._listeners: dict[str, tuple[ThreadingHTTPServer, set[socket.socket]]] = {}
        self.url = self.listen()

    def listen(self) -> str:
        """Another port serving the same agents; returns its URL."""
        server, connections = self, set()

        class Handler(BaseHTTPRequestHandler):
            def setup(self):
                super().setup()
                connections.add(self.connection)

            def finish(self):
                connections.discard(self.connection)
                super().finish()

            def log_message(self, *args):
                pass

            def do_GET(self):
                self.answer(200, {"status": "ok"})

            def do_POST(self):
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                token = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
                path = self.path.removeprefix("/api/v1")
                with server.changed:
                    server.via.append((url, path))
                if url in server.failing:
                    return self.answer(503, {"error": "unavailable", "detail": "this process is going away"})
                if token not in server.tokens:
                    return self.answer(401, {"error": "unauthorized", "detail": "unknown token"})
                if self.headers.get("Content-Type", "").startswith("multipart/"):
                    body = server.record_artifact(path, self.headers["Content-Type"], raw)
                else:
                    body = json.loads(raw)
                status, answer = server.route(path, body, gone=self.client_gone)
                self.answer(status, answer)

            def client_gone(self) -> bool:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""

            def answer(self, status, doc):
                data = json.dumps(doc).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        httpd.daemon_threads = True
        httpd.handle_error = lambda request, address: None  # agents cut held long polls short on purpose
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        self._listeners[url] = (httpd, connections)
        threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
        return url

    def stop_listening(self, url: str) -> None:
        """The port refuses new connections; requests under way (a parked long poll) carry on."""
        httpd, _ = self._listeners[url]
        httpd.shutdown()
        httpd.server_close()

    def kill(self, url: str) -> None:
        """As a SIGKILLed server process: the port refuses connections and those open are cut."""
        self.stop_listening(url)
        for conn in list(self._listeners.pop(url)[1]):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def close(self):
        for url in list(self._listeners):
            self.kill(url)

    def record_artifact(self, path, content_type, raw):
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + raw
        )
        name, file = message.iter_parts()
        self.artifacts.append((name.get_content().strip(), file.get_filename(), file.get_payload(decode=True)))
        return {}

    def route(self, path, body, gone=lambda: False):
        with self.changed:
            self.calls.append((path, body))
            self.changed.notify_all()
        attempt = path.split("/")[2] if path.startswith("/attempts/") else None
        if self.outages.get(path):
            self.outages[path] -= 1
            return 503, {"error": "unavailable", "detail": "try again"}
        if attempt in self.stale:
            return 409, {"error": "stale_attempt", "detail": "not yours any more"}
        if path == "/agents/register":
            self.registrations += 1
            token = f"agent-token-{self.registrations}"
            self.tokens.add(token)
            return 201, {"agent_id": f"agent-{self.registrations}", "token": token, **self.timings}
        if path == "/agents/claim":
            return self.claim(body, gone)
        if path == "/agents/heartbeat":
            commands, self.commands = self.commands, []
            return 200, {"commands": commands}
        if path == "/agents/preflight":
            return 200, {"executors": [name for name, check in body["preflight"].items() if check["usable"]]}
        if path.endswith("/progress"):
            return 200, {"lease_expires_at": "2030-01-01T00:00:00Z", "cancel": attempt in self.timed_out}
        if path.endswith("/artifacts"):
            return 201, {"artifact_id": "x", "name": self.artifacts[-1][0], "size": 1, "sha256": "0"}
        if path.endswith("/complete"):
            if body["outcome"] not in self.outcomes:
                return 400, {"error": "bad_request", "detail": f"'outcome' must be one of {', '.join(self.outcomes)}"}
            answer = {"task_state": body["outcome"]}
            if self.complete_claims and isinstance(body.get("claim"), dict):  # the README's complete-and-claim
                with self.changed:
                    n = body["claim"]["capacity"]
                    answer["assignments"], self.assignments = self.assignments[:n], self.assignments[n:]
            return 200, answer
        return 404, {"error": "not_found", "detail": path}

    def claim(self, body, gone):
        """The claim's long poll: up to `capacity` assignments, waiting up to `wait_s` for one."""
        deadline = time.monotonic() + body["wait_s"]
        with self.changed:
            while not self.assignments and time.monotonic() < deadline:
                self.changed.wait(0.05)
                if gone():  # as the real server: a long poll whose agent hung up claims nothing
                    return 200, {"assignments": []}
            taken, self.assignments = self.assignments[: body["capacity"]], self.assignments[body["capacity"] :]
        return 200, {"assignments": taken}

    def assign(self, attempt_id, **task):
        with self.changed:
            self.assignments.append(
                {
                    "attempt_id": attempt_id,
                    "lease_expires_at": "2030-01-01T00:00:00Z",
                    "task": {
                        "id": f"t-{attempt_id}",
                        "run_id": "r1",
                        "key": "core-1",
                        "title": "Core",
                        "params": {},
                        "timeout_s": 60,
                        "attempt": 1,
                        "command": None,
                        "prompt": None,
                        **task,
                    },
                }
            )
            self.changed.notify_all()

    def paths(self):
        return [path for path, _ in self.calls]

    def wait_for(self, predicate, timeout=3.0):
        with self.changed:
            assert self.changed.wait_for(lambda: predicate(self), timeout=timeout), self.paths()

    def body(self, path):
        return next(body for p, body in self.calls if p == path)


@pytest.fixture
def fake_server():
    server = FakeServer()
    yield server
    server.close()


def start_agent(
    server: FakeServer, tmp_path: Path, *extra: str, env: dict | None = None, servers: str | None = None
) -> subprocess.Popen:
    argv = [
        sys.executable,
        str(AGENT_PY),
        "--server",
        servers or server.url,
        "--name",
        "unit-1",
        "--work-dir",
        str(tmp_path / "work"),
        "--executors",
        "shell,simulated",
        "--log-level",
        "debug",
        *extra,
    ]
    env = {**os.environ, "CP_ENROLLMENT_TOKEN": "enroll", **(env or {})}
    return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 5.0) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"agent did not exit:\n{err}")
    return proc.returncode, err


def test_agent_registers_runs_a_task_uploads_its_output_and_completes(fake_server, tmp_path):
    fake_server.assign("a1b2c3d4-0000", executor="simulated", params={"duration_s": 0.2, "steps": 2})
    code, err = finish(start_agent(fake_server, tmp_path, "--once"))
    assert code == 0, err
    register = fake_server.body("/agents/register")
    assert register["name"] == "unit-1" and register["executors"] == ["shell", "simulated", "git"]
    assert register["capacity"] == 1 and register["version"] == cp_agent.VERSION
    claim = fake_server.body("/agents/claim")
    assert claim == {"capacity": 1, "wait_s": 2.0}
    progress = [body for path, body in fake_server.calls if path.endswith("/progress")]
    assert progress[0] == {"progress": 0.0, "message": "started", "log": ""}
    assert progress[-1]["progress"] == 1.0 and "simulated step 2/2" in "".join(p["log"] for p in progress)
    assert [(name, filename) for name, filename, _ in fake_server.artifacts] == [
        ("core-1_result.json", "core-1_result.json")
    ]
    complete = fake_server.body("/attempts/a1b2c3d4-0000/complete")
    assert complete["outcome"] == "succeeded" and complete["result"]["simulated"] is True
    assert "claim" not in complete  # --once: no next task
    assert fake_server.paths().index("/attempts/a1b2c3d4-0000/artifacts") < fake_server.paths().index(
        "/attempts/a1b2c3d4-0000/complete"
    )
    # Uploaded and reported, the succeeded attempt's folder is gone (--keep-task-folders would keep it).
    assert not (tmp_path / "work" / "core-1-a1b2c3d4").exists()
    state = tmp_path / "work" / "unit-1.state.json"
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert json.loads(state.read_text())["token"] == "agent-token-1"


def test_a_busy_agent_takes_its_next_task_from_its_completions_answer(fake_server, tmp_path):
    """The README's complete-and-claim: while work is waiting, one request per task, no claim between."""
    fake_server.complete_claims = True
    for n in range(3):
        fake_server.assign(f"0000000{n}", executor="shell", command=f"echo {n}")
    agent = start_agent(fake_server, tmp_path)
    fake_server.wait_for(lambda server: "/attempts/00000002/complete" in server.paths(), timeout=10)
    agent.send_signal(signal.SIGTERM)
    code, err = finish(agent)
    assert code == 0, err
    paths = fake_server.paths()
    assert paths[: paths.index("/attempts/00000002/complete")].count("/agents/claim") == 1, paths
    for n in range(3):
        complete = fake_server.body(f"/attempts/0000000{n}/complete")
        assert complete["claim"] == {"capacity": 1} and complete["outcome"] == "succeeded", complete


def test_an_agent_whose_server_ignores_a_completions_claim_claims_as_before(fake_server, tmp_path):
    for n in range(2):
        fake_server.assign(f"0000000{n}", executor="shell", command="true")
    agent = start_agent(fake_server, tmp_path)
    fake_server.wait_for(lambda server: "/attempts/00000001/complete" in server.paths(), timeout=10)
    agent.send_signal(signal.SIGTERM)
    assert finish(agent)[0] == 0
    paths = fake_server.paths()
    assert paths[: paths.index("/attempts/00000001/complete")].count("/agents/claim") >= 2, paths


def test_a_restarted_agent_reuses_its_identity(fake_server, tmp_path):
    fake_server.assign("00000001", executor="shell", command="true")
    assert finish(start_agent(fake_server, tmp_path, "--once"))[0] == 0
    fake_server.assign("00000002", executor="shell", command="mkdir -p out/sub && echo hi > out/sub/x.txt")
    assert finish(start_agent(fake_server, tmp_path, "--once"))[0] == 0
    assert fake_server.registrations == 1
    assert fake_server.artifacts[-1][0] == "sub/x.txt"
    assert fake_server.body("/attempts/00000002/complete")["exit_code"] == 0


def test_a_revoked_token_makes_the_agent_register_again(fake_server, tmp_path):
    fake_server.assign("00000001", executor="shell", command="true")
    assert finish(start_agent(fake_server, tmp_path, "--once"))[0] == 0
    fake_server.tokens.discard("agent-token-1")
    fake_server.assign("00000002", executor="shell", command="true")
    assert finish(start_agent(fake_server, tmp_path, "--once"))[0] == 0
    assert fake_server.registrations == 2
    assert json.loads((tmp_path / "work" / "unit-1.state.json").read_text())["token"] == "agent-token-2"


def test_a_task_gets_an_allow_listed_environment_never_the_daemons_secrets(fake_server, tmp_path):
    """Issue 10, item 8: a shell task once printed CP_ENROLLMENT_TOKEN into its log."""
    fake_server.assign("00000005", executor="shell", command="mkdir -p out && env > out/env.txt")
    env = {"CP_SERVER": fake_server.url, "AWS_SECRET_ACCESS_KEY": "aws-s3cret", "TEAM_FLAG": "on",
           "ANTHROPIC_API_KEY": "sk-ant-test", "OTHER": "x"}  # fmt: skip
    code, err = finish(start_agent(fake_server, tmp_path, "--once", "--pass-env", "TEAM_FLAG", env=env))
    assert code == 0, err
    [data] = [a[2] for a in fake_server.artifacts if a[0] == "env.txt"]
    seen = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
    assert "enroll" not in data.decode() and "CP_ENROLLMENT_TOKEN" not in seen and "CP_SERVER" not in seen
    assert "AWS_SECRET_ACCESS_KEY" not in seen and "OTHER" not in seen
    assert seen["TEAM_FLAG"] == "on" and seen["ANTHROPIC_API_KEY"] == "sk-ant-test"  # --pass-env; a provider's
    assert seen["PATH"] == os.environ["PATH"] and seen["CP_ATTEMPT_ID"] == "00000005"  # the task's own CP_*


def test_each_agent_on_a_host_can_have_its_own_claude_config_dir_and_codex_home(fake_server, tmp_path):
    fake_server.assign(
        "00000006", executor="shell", command='mkdir -p out && echo "$CLAUDE_CONFIG_DIR $CODEX_HOME" > out/d'
    )
    dirs = ["--claude-config-dir", str(tmp_path / "c1"), "--codex-home", str(tmp_path / "x1")]
    code, err = finish(start_agent(fake_server, tmp_path, "--once", *dirs, env={"CLAUDE_CONFIG_DIR": "/shared"}))
    assert code == 0, err
    [data] = [a[2] for a in fake_server.artifacts if a[0] == "d"]
    assert data.decode().split() == [str(tmp_path / "c1"), str(tmp_path / "x1")]
    assert (tmp_path / "c1").is_dir()


@pytest.mark.parametrize("names", ["CP_ENROLLMENT_TOKEN", "TEAM,cp_server", "BAD-NAME"])
def test_pass_env_refuses_the_daemons_own_variables_and_bad_names(names):
    with pytest.raises(cp_agent.ConfigError, match="--pass-env"):
        cp_agent.Config.from_argv(["--server", "http://127.0.0.1:1", "--pass-env", names], environ={})


def test_a_failing_task_is_completed_as_failed(fake_server, tmp_path):
    fake_server.assign("00000003", executor="shell", command="echo bad; exit 4")
    assert finish(start_agent(fake_server, tmp_path, "--once"))[0] == 0
    complete = fake_server.body("/attempts/00000003/complete")
    assert (complete["outcome"], complete["error"], complete["exit_code"]) == ("failed", "exit code 4", 4)


def test_a_rate_limited_attempt_completes_as_failed_on_a_server_that_knows_no_such_outcome(fake_server, tmp_path):
    limited = '{"type":"turn.failed","error":{"message":"exceeded retry limit, last status: 429 Too Many Requests"}}'
    codex = write_script(tmp_path / "codex", 'case "$1" in --version) echo "codex-cli 0.171.0"; exit 0;; '
                         f"login) exit 1;; esac\ncat > /dev/null; echo '{limited}'; exit 1")  # fmt: skip
    fake_server.outcomes = ["succeeded", "failed"]  # a server before PROTOCOL.md v1.1
    fake_server.assign("00000008", executor="codex", prompt="hi")
    env = {"CP_CODEX_BIN": str(codex), "OPENAI_API_KEY": "k"}
    code, err = finish(start_agent(fake_server, tmp_path, "--once", "--executors", "codex", env=env))
    assert code == 0, err
    sent = [body for path, body in fake_server.calls if path == "/attempts/00000008/complete"]
    assert [b["outcome"] for b in sent] == ["rate_limited", "failed"]
    assert sent[1]["error"].startswith("rate_limited: codex: exceeded retry limit")


def test_a_stale_attempt_is_killed_and_never_completed(fake_server, tmp_path):
    fake_server.assign("00000004", executor="shell", command="echo $$ > pid; while :; do echo tick; sleep 0.1; done")
    proc = start_agent(fake_server, tmp_path, "--once")
    fake_server.wait_for(lambda s: any(p.endswith("/progress") for p in s.paths()))
    fake_server.stale.add("00000004")  # the next progress call (the output keeps coming) answers 409
    code, err = finish(proc)
    assert code == 0, err
    assert "no longer ours" in err
    assert not any(path.endswith(("/complete", "/artifacts")) for path in fake_server.paths())
    assert process_gone(int((tmp_path / "work" / "core-1-00000004" / "pid").read_text()))


def test_a_second_signal_cancels_running_tasks(fake_server, tmp_path):
    fake_server.assign("00000007", executor="shell", command="sleep 100")
    proc = start_agent(fake_server, tmp_path)
    fake_server.wait_for(lambda s: any(p.endswith("/progress") for p in s.paths()))
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert proc.poll() is None  # draining: the task keeps running
    proc.send_signal(signal.SIGINT)
    code, err = finish(proc)
    assert code == 0, err
    complete = fake_server.body("/attempts/00000007/complete")
    assert (complete["outcome"], complete["error"]) == ("failed", "canceled: agent shutting down")


def test_sigterm_drains_an_idle_agent_at_once(fake_server, tmp_path):
    proc = start_agent(fake_server, tmp_path)
    fake_server.wait_for(lambda s: "/agents/claim" in s.paths())
    time.sleep(0.2)  # the claim is now held by the server
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 0, err
    assert time.monotonic() - started < 1.5  # not the 2 s the long poll would hold


def test_drain_command_lets_the_running_task_finish(fake_server, tmp_path):
    fake_server.assign("00000005", executor="shell", command="sleep 0.6; echo finished")
    proc = start_agent(fake_server, tmp_path)
    fake_server.wait_for(lambda s: any(p.endswith("/progress") for p in s.paths()))
    fake_server.commands.append({"type": "drain"})
    code, err = finish(proc)
    assert code == 0, err
    assert fake_server.body("/attempts/00000005/complete")["outcome"] == "succeeded"
    heartbeats = [body for path, body in fake_server.calls if path == "/agents/heartbeat"]
    assert {"status": "busy", "attempts": ["00000005"]} in heartbeats


def test_cancel_command_fails_the_task(fake_server, tmp_path):
    fake_server.assign("00000006", executor="shell", command="sleep 100")
    proc = start_agent(fake_server, tmp_path, "--once")
    fake_server.wait_for(lambda s: any(p.endswith("/progress") for p in s.paths()))
    fake_server.commands.append({"type": "cancel", "attempt_id": "00000006"})
    code, err = finish(proc)
    assert code == 0, err
    complete = fake_server.body("/attempts/00000006/complete")
    assert (complete["outcome"], complete["error"]) == ("failed", "canceled by server")


def test_server_errors_are_retried(fake_server, tmp_path):
    fake_server.outages = {"/agents/register": 2, "/agents/claim": 2, "/attempts/00000008/complete": 2}
    fake_server.assign("00000008", executor="shell", command="true")
    code, err = finish(start_agent(fake_server, tmp_path, "--once"))
    assert code == 0, err
    assert fake_server.paths().count("/attempts/00000008/complete") == 3
    assert "retrying in" in err


def test_a_timed_out_attempt_is_canceled_and_failed(fake_server, tmp_path):
    fake_server.timed_out.add("00000009")
    fake_server.assign("00000009", executor="shell", command="sleep 100")
    code, err = finish(start_agent(fake_server, tmp_path, "--once"))
    assert code == 0, err
    complete = fake_server.body("/attempts/00000009/complete")
    assert (complete["outcome"], complete["error"]) == ("failed", "canceled by server (timeout)")


def test_shutdown_command_cancels_running_tasks_and_exits(fake_server, tmp_path):
    fake_server.assign("0000000a", executor="simulated", params={"duration_s": 100})
    proc = start_agent(fake_server, tmp_path)
    fake_server.wait_for(lambda s: any(p.endswith("/progress") for p in s.paths()))
    fake_server.commands.append({"type": "shutdown"})
    code, err = finish(proc)
    assert code == 0, err
    assert fake_server.body("/attempts/0000000a/complete")["error"] == "canceled: agent shutting down"


def test_an_executor_failing_its_preflight_is_reported_but_not_offered(fake_server, tmp_path):
    broken = write_script(tmp_path / "codex", "echo 'not logged in' >&2; exit 1")
    fake_server.assign("0000000b", executor="shell", command="true")
    proc = start_agent(fake_server, tmp_path, "--executors", "shell,codex", "--once", env={"CP_CODEX_BIN": str(broken)})
    code, err = finish(proc)
    assert code == 0, err  # it serves with what works
    register = fake_server.body("/agents/register")
    assert register["executors"] == ["shell", "git"]
    assert register["preflight"]["codex"] == {
        "usable": False,
        "detail": f"{broken} --version exited with 1: not logged in",
        "version": None,
    }
    assert register["preflight"]["shell"]["usable"] is True
    assert "pre-flight: codex FAILED, it gets no tasks" in err


def test_a_preflight_command_makes_the_agent_check_again_and_report(fake_server, tmp_path):
    proc = start_agent(fake_server, tmp_path)
    fake_server.wait_for(lambda s: "/agents/claim" in s.paths())
    fake_server.commands.append({"type": "preflight"})
    fake_server.wait_for(lambda s: "/agents/preflight" in s.paths())
    proc.send_signal(signal.SIGTERM)
    assert finish(proc)[0] == 0
    report = fake_server.body("/agents/preflight")["preflight"]
    assert set(report) == {"shell", "simulated", "git"} and all(check["usable"] for check in report.values())


def test_re_enroll_registers_again_proving_the_old_identity(fake_server, tmp_path):
    fake_server.assign("0000000c", executor="shell", command="true")
    assert finish(start_agent(fake_server, tmp_path, "--once"))[0] == 0
    fake_server.assign("0000000d", executor="shell", command="true")
    assert finish(start_agent(fake_server, tmp_path, "--once", "--re-enroll"))[0] == 0
    registrations = [body for path, body in fake_server.calls if path == "/agents/register"]
    assert "replaces_token" not in registrations[0]
    assert registrations[1]["replaces_token"] == "agent-token-1"
    assert json.loads((tmp_path / "work" / "unit-1.state.json").read_text())["token"] == "agent-token-2"


# ------------------------------------------------------------------------------------------- several servers


def test_an_agent_moves_to_the_next_server_when_one_cannot_serve_and_stays_there(fake_server, tmp_path):
    second = fake_server.listen()
    fake_server.failing.add(fake_server.url)  # answers 503, as a server process going away or a proxy before it
    fake_server.assign("0000000e", executor="shell", command="true")
    code, err = finish(start_agent(fake_server, tmp_path, "--once", servers=f"{fake_server.url},{second}"))
    assert code == 0, err
    assert fake_server.body("/attempts/0000000e/complete")["outcome"] == "succeeded"
    assert [path for url, path in fake_server.via if url == fake_server.url] == ["/agents/register"]
    assert f"HTTP 503; switching to {second}" in err


@pytest.mark.parametrize("goes_away", ["stop_listening", "kill"])
def test_a_claim_parked_on_a_server_that_goes_away_moves_to_the_next_at_once(fake_server, tmp_path, goes_away):
    """Stopping (the port refuses; the parked claim is still held) or killed (its connections cut): either
    way the next claim goes to the second server long before the first's 30 s wait would have run out."""
    fake_server.timings["max_wait_s"] = 30
    second = fake_server.listen()
    proc = start_agent(fake_server, tmp_path, servers=f"{fake_server.url},{second}")
    fake_server.wait_for(lambda s: (s.url, "/agents/claim") in s.via)
    time.sleep(0.2)  # the claim is now held by the server
    getattr(fake_server, goes_away)(fake_server.url)
    gone_at = time.monotonic()
    fake_server.wait_for(lambda s: (second, "/agents/claim") in s.via, timeout=5)
    assert time.monotonic() - gone_at < 2
    fake_server.assign("0000000f", executor="shell", command="echo moved on")
    fake_server.wait_for(lambda s: "/attempts/0000000f/complete" in s.paths())
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    assert code == 0, err
    assert fake_server.body("/attempts/0000000f/complete")["result"]["stdout_tail"] == "moved on\n"


def test_a_restarted_agent_finds_its_identity_with_a_list_of_servers(fake_server, tmp_path):
    fake_server.assign("00000010", executor="shell", command="true")
    assert finish(start_agent(fake_server, tmp_path, "--once"))[0] == 0  # saved with one server
    second = fake_server.listen()
    fake_server.assign("00000011", executor="shell", command="true")
    assert finish(start_agent(fake_server, tmp_path, "--once", servers=f"{second},{fake_server.url}"))[0] == 0
    assert fake_server.registrations == 1
    saved = json.loads((tmp_path / "work" / "unit-1.state.json").read_text())
    assert (saved["server"], saved["servers"]) == (second, [second, fake_server.url])


def test_a_restarted_agent_heartbeats_at_once_listing_no_attempts_as_its_first(fake_server, tmp_path):
    """So the server can let go of the attempts of its previous life now, not when their leases run out."""
    fake_server.timings.update(heartbeat_interval_s=60, lease_s=600)
    fake_server.assign("00000012", executor="shell", command="true")
    assert finish(start_agent(fake_server, tmp_path, "--once"))[0] == 0
    first_life = len(fake_server.calls)
    proc = start_agent(fake_server, tmp_path)
    fake_server.wait_for(lambda s: "/agents/claim" in s.paths()[first_life:])
    proc.send_signal(signal.SIGTERM)
    assert finish(proc)[0] == 0
    second_life = fake_server.calls[first_life:]
    paths = [path for path, _ in second_life]
    assert "/agents/heartbeat" in paths and paths.index("/agents/heartbeat") < paths.index("/agents/claim")
    # `first`: whatever the server holds for us is our previous life's, however fresh (no grace).
    assert second_life[paths.index("/agents/heartbeat")][1] == {"status": "idle", "attempts": [], "first": True}
    later = [body for path, body in second_life[paths.index("/agents/heartbeat") + 1 :] if path == "/agents/heartbeat"]
    assert all("first" not in body for body in later)


# ------------------------------------------------------------------------------------------- a person answers claude


def rpc(method, id=None, **params) -> str:
    message = {"jsonrpc": "2.0", "method": method, "params": params}
    if id is not None:
        message["id"] = id
    return json.dumps(message)


class McpHarness:
    """cp_agent's MCP permission server fed lines, its answers collected; `verdicts` queues what ask() says,
    `hold` keeps ask() waiting until set."""

    def __init__(self):
        self.lines: list[dict] = []
        self.asked: list[dict] = []
        self.verdicts: list[dict] = []
        self.hold = threading.Event()
        self.hold.set()
        self.server = cp_agent.McpPermissionServer(lambda line: self.lines.append(json.loads(line)), self.ask)

    def ask(self, arguments, cancel):
        self.asked.append(arguments)
        while not self.hold.wait(0.02) or cancel.is_set():
            if cancel.is_set():
                return {"behavior": "deny", "message": "canceled"}
        return self.verdicts.pop(0)

    def feed(self, *lines: str) -> list[dict]:
        for line in lines:
            self.server.feed(line)
        self.server.join(5)
        return self.lines

    def answer(self, id) -> dict:
        return next(m for m in self.lines if m.get("id") == id)

    def decision(self, id) -> dict:
        [block] = self.answer(id)["result"]["content"]
        assert block["type"] == "text"
        return json.loads(block["text"])


def test_mcp_server_answers_initialize_tools_list_and_ping_and_nothing_to_notifications():
    mcp = McpHarness()
    out = mcp.feed(
        rpc("initialize", 0, protocolVersion="2025-11-25", capabilities={}, clientInfo={"name": "claude-code"}),
        rpc("notifications/initialized"),
        rpc("tools/list", 1),
        rpc("ping", 2),
        "",
    )
    assert [m["id"] for m in out] == [0, 1, 2] and all(m["jsonrpc"] == "2.0" for m in out)
    init = mcp.answer(0)["result"]
    assert init["protocolVersion"] == "2025-11-25" and init["capabilities"] == {"tools": {}}
    assert init["serverInfo"]["name"] == cp_agent.MCP_SERVER_NAME
    [tool] = mcp.answer(1)["result"]["tools"]
    assert tool["name"] == "permission_prompt" and cp_agent.PROMPT_TOOL == "mcp__cp_agent__permission_prompt"
    assert tool["inputSchema"]["required"] == ["tool_name", "input"]
    assert mcp.answer(2)["result"] == {}


def test_mcp_server_refuses_what_it_does_not_know_in_json_rpc_terms():
    mcp = McpHarness()
    out = mcp.feed(
        "{not json",
        "[1, 2]",
        json.dumps({"jsonrpc": "2.0", "id": "server-discover-probe-1", "method": "server/discover"}),
        rpc("tools/call", 3, name="rm_rf", arguments={}),
        json.dumps({"jsonrpc": "2.0", "id": 9, "result": {}}),  # an answer to nothing we asked: ignored
    )
    assert [(m["id"], m["error"]["code"]) for m in out] == [
        (None, -32700), (None, -32600), ("server-discover-probe-1", -32601), (3, -32602),
    ]  # fmt: skip
    assert mcp.asked == []


def test_mcp_tool_call_allows_with_the_input_unchanged_or_denies_with_the_persons_words():
    mcp = McpHarness()
    mcp.verdicts = [{"behavior": "allow", "message": "ok"}, {"behavior": "deny", "message": "not on prod"}]
    call = {"tool_name": "Bash", "input": {"command": "rm -rf build"}, "tool_use_id": "toolu_1"}
    mcp.feed(rpc("tools/call", 5, name="permission_prompt", arguments=call))
    mcp.feed(rpc("tools/call", 6, name="permission_prompt", arguments={**call, "tool_use_id": "toolu_2"}))
    assert mcp.decision(5) == {"behavior": "allow", "updatedInput": {"command": "rm -rf build"}}
    assert mcp.decision(6) == {"behavior": "deny", "message": "not on prod"}
    assert [a["tool_use_id"] for a in mcp.asked] == ["toolu_1", "toolu_2"]


def test_mcp_tool_call_without_a_tool_name_is_denied_without_asking_anyone():
    mcp = McpHarness()
    mcp.feed(rpc("tools/call", 7, name="permission_prompt", arguments={"input": {}}))
    assert mcp.decision(7)["behavior"] == "deny" and mcp.asked == []
    mcp.verdicts = [{"behavior": "deny", "message": ""}]
    mcp.feed(rpc("tools/call", 8, name="permission_prompt", arguments={"tool_name": "Bash", "input": {}}))
    assert mcp.decision(8) == {"behavior": "deny", "message": "denied by a person"}


def test_mcp_tool_calls_overlap_and_a_cancelled_one_gets_no_answer():
    mcp = McpHarness()
    mcp.hold.clear()
    call = {"tool_name": "Bash", "input": {"command": "make"}, "tool_use_id": "a"}
    mcp.server.feed(rpc("tools/call", 10, name="permission_prompt", arguments=call))
    mcp.server.feed(rpc("tools/call", 11, name="permission_prompt", arguments={**call, "tool_use_id": "b"}))
    mcp.server.feed(rpc("ping", 12))  # answered while both wait for a person
    deadline = time.monotonic() + 5
    while len(mcp.asked) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [m["id"] for m in mcp.lines] == [12] and len(mcp.asked) == 2
    mcp.server.feed(rpc("notifications/cancelled", requestId=10, reason="aborted"))
    mcp.verdicts = [{"behavior": "allow"}]
    mcp.hold.set()
    mcp.server.join(5)
    assert [m["id"] for m in mcp.lines] == [12, 11]
    assert mcp.decision(11)["behavior"] == "allow"


def test_permission_policy_reads_on_permission_and_input_timeout_s():
    assert cp_agent.permission_policy({}) == ("ask", 3600.0)
    assert cp_agent.permission_policy({"on_permission": "deny", "input_timeout_s": 5}) == ("deny", 5.0)
    for bad in ({"on_permission": "yes"}, {"input_timeout_s": 0}, {"input_timeout_s": "1"},
                {"input_timeout_s": 8 * 86400}):  # fmt: skip
        with pytest.raises(cp_agent.TaskError):
            cp_agent.permission_policy(bad)


def test_the_relay_socket_is_private_and_carries_a_prompt_to_the_daemon_and_back(tmp_path):
    asked, release = [], threading.Event()

    def ask(request, gone):
        asked.append(request)
        release.wait(5)
        return {"behavior": "deny", "message": "no, thanks"}

    # A work dir deeper than a Unix socket path may be long.
    folder = tmp_path / ("deep" * 30) / ".cp-agent"
    relay = cp_agent.PermissionRelay(folder, ask, 42.0)
    try:
        assert len(str(relay.path)) > 108
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700 and stat.S_IMODE(relay.path.stat().st_mode) == 0o600
        config = relay.mcp_config()["mcpServers"]["cp_agent"]
        assert config["args"][-2:] == ["--mcp-permissions", str(relay.path)] and config["timeout"] == 162_000
        assert "env" not in config  # started with the task's environment: nothing of the daemon's is added
        verdict = {}
        call = {"tool_name": "Bash", "input": {"command": "make"}, "tool_use_id": "toolu_9"}
        thread = threading.Thread(target=lambda: verdict.update(
            cp_agent.relay_to_daemon(relay.path, call, threading.Event())))  # fmt: skip
        thread.start()
        deadline = time.monotonic() + 5
        while relay.pending == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert relay.pending == 1
        release.set()
        thread.join(5)
        assert verdict == {"behavior": "deny", "message": "no, thanks"}
        assert asked == [{"tool": "Bash", "input": {"command": "make"}, "tool_use_id": "toolu_9", "timeout_s": 42.0}]
        assert relay.pending == 0 and relay.denied == {"toolu_9": "no, thanks"}
    finally:
        relay.close()
    assert not relay.path.exists()
    gone = cp_agent.relay_to_daemon(relay.path, {"tool_name": "Bash", "input": {}}, threading.Event())
    assert gone["behavior"] == "deny" and "cannot be asked" in gone["message"]


def test_the_daemon_stops_waiting_when_the_relay_gives_up(tmp_path):
    stopped = threading.Event()

    def ask(request, gone):
        while not gone():
            time.sleep(0.02)
        stopped.set()
        return {"behavior": "deny", "message": "gone"}

    relay = cp_agent.PermissionRelay(tmp_path / ".cp-agent", ask, 60.0)
    try:
        cancel = threading.Event()
        threading.Timer(0.3, cancel.set).start()
        verdict = cp_agent.relay_to_daemon(relay.path, {"tool_name": "Bash", "input": {}}, cancel)
        assert verdict == {"behavior": "deny", "message": "canceled"}
        assert stopped.wait(5)
    finally:
        relay.close()


def test_the_mcp_server_runs_as_its_own_process_over_stdio(tmp_path):
    relay = cp_agent.PermissionRelay(tmp_path / ".cp-agent", lambda r, g: {"behavior": "allow"}, 60.0)
    try:
        config = relay.mcp_config()["mcpServers"]["cp_agent"]
        lines = [
            rpc("initialize", 0, protocolVersion="2025-06-18", capabilities={}),
            rpc("notifications/initialized"),
            rpc(
                "tools/call",
                1,
                name="permission_prompt",
                arguments={"tool_name": "Write", "input": {"file_path": "a.txt", "content": "x"}},
            ),  # fmt: skip
        ]
        proc = subprocess.Popen([config["command"], *config["args"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env={"PATH": os.environ["PATH"]})  # fmt: skip
        proc.stdin.write("\n".join(lines) + "\n")
        proc.stdin.flush()
        answers = [json.loads(proc.stdout.readline()) for _ in range(2)]
        proc.stdin.close()
        assert proc.wait(5) == 0
    finally:
        relay.close()
    assert answers[0]["id"] == 0 and answers[0]["result"]["protocolVersion"] == "2025-06-18"
    decision = json.loads(answers[1]["result"]["content"][0]["text"])
    assert decision == {"behavior": "allow", "updatedInput": {"file_path": "a.txt", "content": "x"}}


# A claude stand-in that plays Claude Code's part of --permission-prompt-tool: it starts the MCP server named
# by --mcp-config (with its own environment, as claude does), asks the prompt tool about one Bash call, and
# ends the way claude -p does (a denied call listed in permission_denials).
FAKE_PROMPTING_CLAUDE = r"""
import json, os, subprocess, sys
argv = sys.argv[1:]
if argv[:1] == ["--version"]:
    print("2.1.332 (Claude Code)"); sys.exit(0)
if argv[:1] == ["auth"]:
    print('{"loggedIn": true, "authMethod": "api_key"}'); sys.exit(0)
out = os.environ["CP_OUT_DIR"]
open(os.path.join(out, "argv.txt"), "w").write("\n".join(argv) + "\n")
sys.stdin.read()
print(json.dumps({"type": "system", "subtype": "init", "session_id": "s1", "model": "claude-sonnet-4-5"}), flush=True)
denials = []
if "--mcp-config" in argv:
    server = json.load(open(argv[argv.index("--mcp-config") + 1]))["mcpServers"]["cp_agent"]
    mcp = subprocess.Popen([server["command"], *server["args"]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                           text=True)
    open(os.path.join(out, "relay_env.txt"), "w").write(open(f"/proc/{mcp.pid}/environ").read().replace("\0", "\n"))
    command = {"command": "rm -rf build"}
    for message in ({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-06-18"}},
                    {"jsonrpc": "2.0", "method": "notifications/initialized"},
                    {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "permission_prompt",
                     "arguments": {"tool_name": "Bash", "input": command, "tool_use_id": "toolu_1"}}}):
        mcp.stdin.write(json.dumps(message) + "\n"); mcp.stdin.flush()
    mcp.stdout.readline()
    decision = json.loads(json.loads(mcp.stdout.readline())["result"]["content"][0]["text"])
    open(os.path.join(out, "decision.json"), "w").write(json.dumps(decision))
    mcp.stdin.close(); mcp.wait()
    if decision["behavior"] != "allow":
        denials.append({"tool_name": "Bash", "tool_use_id": "toolu_1", "tool_input": command})
print(json.dumps({"type": "result", "subtype": "success", "is_error": False, "result": "Done.", "session_id": "s1",
                  "num_turns": 2, "permission_denials": denials}), flush=True)
"""


class InputServer(FakeServer):
    """The fake server with PROTOCOL.md v1.1's input requests: `answers` is what each wait gives once
    `answer_after_s` has passed since the request was made."""

    def __init__(self):
        super().__init__()
        self.answer = {"behavior": "allow", "message": ""}
        self.answer_after_s = 0.0
        self.created: dict[str, float] = {}

    def route(self, path, body, gone=lambda: False):
        if path.endswith("/input-requests") and path.startswith("/attempts/"):
            with self.changed:
                self.calls.append((path, body))
            request_id = f"req-{len(self.created) + 1}"
            self.created[request_id] = time.monotonic()
            return 201, {"request_id": request_id}
        if path.startswith("/input-requests/") and path.endswith("/wait"):
            with self.changed:
                self.calls.append((path, body))
            ready = self.created[path.split("/")[2]] + self.answer_after_s
            time.sleep(max(0.0, min(body["wait_s"], ready - time.monotonic())))
            if time.monotonic() >= ready:
                return 200, {"state": "answered", "answer": self.answer}
            return 200, {"state": "pending"}
        return super().route(path, body, gone)


@pytest.fixture
def input_server():
    server = InputServer()
    yield server
    server.close()


def run_prompting_claude(server: InputServer, tmp_path: Path, attempt: str, **params) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    claude = tmp_path / "claude"
    claude.write_text(f"#!{sys.executable}\n{FAKE_PROMPTING_CLAUDE}")
    claude.chmod(0o755)
    server.assign(attempt, executor="claude", prompt="clean up", params=params)
    # --keep-task-folders: the tests read what the fake claude wrote into the attempt's folder.
    code, err = finish(start_agent(server, tmp_path, "--once", "--executors", "claude", "--keep-task-folders",
                                   env={"CP_CLAUDE_BIN": str(claude)}), timeout=20)  # fmt: skip
    assert code == 0, err
    return server.body(f"/attempts/{attempt}/complete")


def test_claude_asks_a_person_through_the_daemon_which_alone_holds_the_token(input_server, tmp_path):
    input_server.answer_after_s = 1.5  # longer than the stall limit: waiting for a person is no stall
    complete = run_prompting_claude(input_server, tmp_path, "0000000a", stall_s=1, input_timeout_s=90)
    assert complete["outcome"] == "succeeded", complete
    work = tmp_path / "work" / "core-1-0000000a"
    argv = (work / "out" / "argv.txt").read_text().splitlines()
    config = argv[argv.index("--mcp-config") + 1]
    assert argv[argv.index("--permission-prompt-tool") + 1] == "mcp__cp_agent__permission_prompt"
    assert "mcp__cp_agent__permission_prompt" in argv[argv.index("--disallowedTools") + 1 :]  # not the model's
    assert "agent-token" not in Path(config).read_text() and "enroll" not in Path(config).read_text()
    relay_env = (work / "out" / "relay_env.txt").read_text()
    assert "agent-token" not in relay_env and "CP_ENROLLMENT_TOKEN" not in relay_env and "CP_SERVER" not in relay_env
    assert json.loads((work / "out" / "decision.json").read_text()) == {
        "behavior": "allow", "updatedInput": {"command": "rm -rf build"},
    }  # fmt: skip
    created = input_server.body("/attempts/0000000a/input-requests")
    assert created == {"kind": "permission", "tool": "Bash", "input": {"command": "rm -rf build"},
                       "question": "May claude use Bash $ rm -rf build?", "timeout_s": 90}  # fmt: skip
    waits = [body for path, body in input_server.calls if path == "/input-requests/req-1/wait"]
    assert waits and all(0 < w["wait_s"] <= 2 for w in waits)  # the server's max_wait_s
    messages = [body["message"] for path, body in input_server.calls if path.endswith("/progress")]
    assert "waiting for a person: Bash $ rm -rf build" in messages
    assert not (work / ".cp-agent" / "permissions.sock").exists()


def test_a_person_denying_fails_the_task_as_permission_denied_in_their_words(input_server, tmp_path):
    input_server.answer = {"behavior": "deny", "message": "not before the release"}
    complete = run_prompting_claude(input_server, tmp_path, "0000000b")
    decision = json.loads((tmp_path / "work" / "core-1-0000000b" / "out" / "decision.json").read_text())
    assert decision == {"behavior": "deny", "message": "not before the release"}
    assert complete["outcome"] == "failed"
    assert complete["error"] == ("permission_denied: claude was refused 1 tool call(s): $ rm -rf build "
                                 "(denied: not before the release)")  # fmt: skip


def test_on_permission_deny_and_a_server_without_input_requests_keep_todays_refusals(fake_server, input_server,
                                                                                    tmp_path):  # fmt: skip
    complete = run_prompting_claude(input_server, tmp_path / "a", "0000000c", on_permission="deny")
    argv = (tmp_path / "a" / "work" / "core-1-0000000c" / "out" / "argv.txt").read_text()
    assert "--permission-prompt-tool" not in argv and "--mcp-config" not in argv
    assert complete["outcome"] == "succeeded" and input_server.created == {}
    # An older server answers 404: claude is told no, as it would be without a prompt tool.
    complete = run_prompting_claude(fake_server, tmp_path / "b", "0000000d")
    decision = json.loads((tmp_path / "b" / "work" / "core-1-0000000d" / "out" / "decision.json").read_text())
    assert decision["behavior"] == "deny" and "could not ask a person (HTTP 404" in decision["message"]
    assert complete["outcome"] == "failed" and complete["error"].startswith("permission_denied: ")


# --- reset times in the CLIs' words -------------------------------------------------------------------


@contextlib.contextmanager
def local_time_zone(name: str):
    before = os.environ.get("TZ")
    os.environ["TZ"] = name
    time.tzset()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("TZ")
        else:
            os.environ["TZ"] = before
        time.tzset()


@local_time_zone("UTC")
def test_a_reset_time_alone_is_the_next_such_moment_and_one_with_a_date_is_that_date():
    now = calendar.timegm((2026, 12, 2, 23, 30, 0))
    assert cp_agent.reset_from_text("resets at 11:45pm", now) == "2026-12-02T23:45:00+0000"
    assert cp_agent.reset_from_text("try again at 1:00 AM.", now) == "2026-12-03T01:00:00+0000"  # tomorrow
    assert cp_agent.reset_from_text("resets 15:00", now) == "2026-12-03T15:00:00+0000"
    codex = "You’ve hit your usage limit. … or try again at Dec 3rd, 2026 12:35 AM."
    assert cp_agent.reset_from_text(codex, now) == "2026-12-03T00:35:00+0000"
    assert cp_agent.reset_from_text("try again at Jan 1st, 2027 9:05 PM.", now) == "2027-01-01T21:05:00+0000"
    assert cp_agent.reset_from_text("try again later", now) is None
