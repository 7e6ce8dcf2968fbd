"""A run of real AI CLIs through the real server and daemon (issue 10): a claude task plans in the run's
repository, a codex task implements what the plan says (its prompt rendered from the plan's output), both
edits committed on their branches and merged into the result branch; the CLIs talk to the scripted model API
stand-in, the only thing stood in for."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks_app.models import Attempt, Task
from tasks_app.states import RunState
from tests.agents_app.test_daemon_workspaces import ended, files_on, submit
from tests.conftest import doc, git
from tests.model_api import Usage, text, tool_call
from tests.real_clis import CLAUDE, CODEX, claude_env, cli_binary, codex_env

pytestmark = pytest.mark.django_db(transaction=True)


def test_claude_plans_and_codex_implements_on_one_repository(live_server_proc, fleet, operator, origin, model_api,
                                                             tmp_path):  # fmt: skip
    _, token = operator
    url, _shas = origin
    bare = Path(url.removeprefix("file://"))
    model_api.script(
        tool_call("Bash", {"command": "printf '1. add impl.py\\n' > PLAN.md"}, usage=Usage(input_tokens=50)),
        text("Plan: add impl.py", usage=Usage(input_tokens=60, output_tokens=8)),
        tool_call("exec_command", {"cmd": "echo 'VALUE = 42' > impl.py"}, usage=Usage(input_tokens=200)),
        text("Implemented impl.py.", usage=Usage(input_tokens=220, output_tokens=12)),
    )
    env = {**claude_env(tmp_path, model_api), **codex_env(tmp_path, model_api),
           "CP_CLAUDE_BIN": cli_binary(CLAUDE), "CP_CODEX_BIN": cli_binary(CODEX)}  # fmt: skip
    fleet("ai-1", [], executors=("shell", "claude", "codex"), env=env)
    document = doc(
        {"key": "plan", "executor": "claude", "prompt": "Write PLAN.md for impl.py."},
        {"key": "impl", "executor": "codex", "deps": ["plan"], "prompt": "Implement this plan:\n${deps.plan.output}"},
        name="plan-and-implement",
        workspace={"repo": url, "base": "main"},
    )
    run = ended(submit(live_server_proc, token, document), timeout=120)
    tasks = {t.key: t for t in Task.objects.filter(run=run)}
    errors = {k: list(Attempt.objects.filter(task=t).values_list("error", flat=True)) for k, t in tasks.items()}
    assert run.state == RunState.SUCCEEDED, errors
    assert {"PLAN.md", "impl.py", "first.txt"} <= files_on(bare, run.result_branch)
    assert git("show", f"{run.result_branch}:impl.py", cwd=bare).strip() == "VALUE = 42"
    assert tasks["plan"].output == "Plan: add impl.py" and tasks["impl"].output == "Implemented impl.py."
    assert tasks["plan"].commit["files"] == [{"path": "PLAN.md", "insertions": 1, "deletions": 0}]
    # The codex task's prompt was rendered from the plan's output and reached the model whole, via stdin.
    codex_turn = next(r for r in model_api.turns if r.api == "openai")
    assert any("Implement this plan:\nPlan: add impl.py" in s for s in strings(codex_turn.json))


def strings(value) -> list[str]:
    """Every string inside a JSON value."""
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return [s for item in items for s in strings(item)]
