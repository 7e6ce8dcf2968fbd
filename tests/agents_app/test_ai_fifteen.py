"""Fifteen real AI agents write one codebase (issue 10's headline): a DAG of real `claude` and `codex` CLIs,
through the real server and three real daemons on one host, on a real git repository, builds `calc`, a tiny
arithmetic package (tests/agents_app/ai_fifteen_files.py). Claude plans; five codex tasks write its modules
in parallel; a codex task writes the command line on the merge of all five; claude tasks write a unittest
module each on the merge of the modules it imports, and the docs; a claude review reads the README and runs
the suite. At the end the result branch's own suite passes with the machine's python3.

The only thing stood in for is the model API (tests/model_api.py): each task's prompt carries a marker,
"[task:KEY]", and its scripted turns are routed by it, since parallel tasks ask in no fixed order.

    wave 1  plan (claude)
    wave 2  impl-tokens impl-nodes impl-parser impl-evaluator impl-formatter (codex, each on plan)
    wave 3  impl-cli (codex, on all five)  test-tokens test-parser test-evaluator test-formatter docs-api
    wave 4  test-cli docs-readme (on impl-cli)
    wave 5  review (on every test and docs task)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tasks_app.models import Artifact, Attempt, Task
from tasks_app.states import RunState
from tests.agents_app import ai_fifteen_files as files
from tests.agents_app.test_daemon_workspaces import ended, files_on, submit
from tests.conftest import doc, git, http, ok
from tests.model_api import Turn, Usage, text, tool_call
from tests.real_clis import CLAUDE, CODEX, claude_env, cli_binary, codex_env

pytestmark = pytest.mark.django_db(transaction=True)

AGENTS = ("ai15-a", "ai15-b", "ai15-c")
PLAN_OUTPUT = "Plan: calc in six modules (tokens, nodes, parser, evaluator, formatter, cli), tested and documented."
UNITTEST = "python3 -m unittest discover -s tests"


@dataclass
class Spec:
    """One task of the DAG and what its scripted model does: write `writes` (path -> text), then answer
    `output`. `index` makes its token counts its own, so that usage mixed up between tasks shows."""

    key: str
    executor: str
    deps: list[str]
    does: str
    writes: dict[str, str]
    output: str
    index: int = 0
    params: dict = field(default_factory=dict)
    extra_turns: list[Turn] = field(default_factory=list)  # tool calls after the writes (the review's)

    @property
    def marker(self) -> str:
        return f"[task:{self.key}]"

    @property
    def usage(self) -> Usage:
        return Usage(input_tokens=1000 + 10 * self.index, output_tokens=20 + self.index)

    def prompt(self) -> str:
        plan = "\n\nThe plan:\n${deps.plan.output}" if "plan" in self.deps else ""
        return f"{self.marker} {self.does}{plan}"

    def turns(self) -> list[Turn]:
        if self.executor == "codex":  # one shell command writing every file, as codex does with exec_command
            script = "\n".join(
                f"mkdir -p {Path(path).parent} && cat > {path} <<'CALC_EOF'\n{content}CALC_EOF"
                for path, content in self.writes.items()
            )
            # Slow enough (1 s) that the tasks of a wave are seen running at the same time.
            calls = [tool_call("exec_command", {"cmd": script}, usage=self.usage, delay_s=1.0)] if script else []
        else:
            calls = [
                tool_call("Write", {"file_path": path, "content": content}, usage=self.usage)
                for path, content in self.writes.items()
            ]
        return [*calls, *self.extra_turns, text(self.output, usage=self.usage)]

    def document(self) -> dict:
        task = {"key": self.key, "executor": self.executor, "deps": self.deps, "prompt": self.prompt()}
        return {**task, "params": self.params} if self.params else task


IMPL = ["impl-tokens", "impl-nodes", "impl-parser", "impl-evaluator", "impl-formatter"]
TESTS = ["test-tokens", "test-parser", "test-evaluator", "test-formatter", "test-cli"]
DOCS = ["docs-api", "docs-readme"]


def specs() -> list[Spec]:
    listed = [
        Spec("plan", "claude", [], "Plan the calc package; write PLAN.md and a .gitignore.",
             {"PLAN.md": files.PLAN, ".gitignore": files.GITIGNORE}, PLAN_OUTPUT),
        Spec("impl-tokens", "codex", ["plan"], "Write calc/tokens.py (and the package's __init__.py).",
             {"calc/__init__.py": files.INIT, "calc/tokens.py": files.TOKENS}, "Wrote calc/tokens.py."),
        Spec("impl-nodes", "codex", ["plan"], "Write calc/nodes.py.", {"calc/nodes.py": files.NODES},
             "Wrote calc/nodes.py."),
        Spec("impl-parser", "codex", ["plan"], "Write calc/parser.py over calc.tokens and calc.nodes.",
             {"calc/parser.py": files.PARSER}, "Wrote calc/parser.py."),
        Spec("impl-evaluator", "codex", ["plan"], "Write calc/evaluator.py over calc.nodes.",
             {"calc/evaluator.py": files.EVALUATOR}, "Wrote calc/evaluator.py."),
        Spec("impl-formatter", "codex", ["plan"], "Write calc/formatter.py over calc.nodes.",
             {"calc/formatter.py": files.FORMATTER}, "Wrote calc/formatter.py."),
        Spec("impl-cli", "codex", IMPL, "Write calc/cli.py and calc/__main__.py using the parser, evaluator and "
             "formatter.", {"calc/cli.py": files.CLI, "calc/__main__.py": files.MAIN}, "Wrote the command line."),
        Spec("test-tokens", "claude", ["impl-tokens"], "Write tests/test_tokens.py.",
             {"tests/test_tokens.py": files.TEST_TOKENS}, "Tests for the tokens."),
        Spec("test-parser", "claude", ["impl-tokens", "impl-nodes", "impl-parser"], "Write tests/test_parser.py.",
             {"tests/test_parser.py": files.TEST_PARSER}, "Tests for the parser."),
        Spec("test-evaluator", "claude", ["impl-parser", "impl-evaluator"], "Write tests/test_evaluator.py.",
             {"tests/test_evaluator.py": files.TEST_EVALUATOR}, "Tests for the evaluator."),
        Spec("test-formatter", "claude", ["impl-parser", "impl-formatter"], "Write tests/test_formatter.py.",
             {"tests/test_formatter.py": files.TEST_FORMATTER}, "Tests for the formatter."),
        Spec("test-cli", "claude", ["impl-cli"], "Write tests/test_cli.py.", {"tests/test_cli.py": files.TEST_CLI},
             "Tests for the command line."),
        Spec("docs-api", "claude", ["impl-parser", "impl-evaluator", "impl-formatter"], "Write docs/API.md.",
             {"docs/API.md": files.API}, "Documented the API."),
        Spec("docs-readme", "claude", ["impl-cli"], "Write README.md.", {"README.md": files.README},
             "Wrote the README."),
        Spec("review", "claude", TESTS + DOCS, "Review the package: read README.md and run the test suite.", {},
             "Review: the README matches the code and the suite passes.",
             params={"allowed_tools": [f"Bash({UNITTEST}:*)", "Read"]}),
    ]  # fmt: skip
    for index, spec in enumerate(listed):
        spec.index = index
    review = listed[-1]  # reads the README, then runs the suite
    review.extra_turns = [tool_call("Read", {"file_path": "README.md"}, usage=review.usage),
                          tool_call("Bash", {"command": UNITTEST}, usage=review.usage)]  # fmt: skip
    return listed


def test_fifteen_real_agents_write_one_codebase_whose_tests_pass(live_server_proc, fleet, operator, origin,
                                                                  model_api, tmp_path):  # fmt: skip
    _, token = operator
    url, _shas = origin
    bare = Path(url.removeprefix("file://"))
    dag = specs()
    by_key = {s.key: s for s in dag}
    assert len(dag) == 15 and {s.executor for s in dag} == {"claude", "codex"}
    for spec in dag:
        model_api.route(spec.marker, *spec.turns())

    # One host, three agents: the host's login and keys shared, each agent its own CLI homes.
    host_env = {**claude_env(tmp_path, model_api), **codex_env(tmp_path, model_api),
                "CP_CLAUDE_BIN": cli_binary(CLAUDE), "CP_CODEX_BIN": cli_binary(CODEX)}  # fmt: skip
    for name in AGENTS:
        own = tmp_path / name
        own.mkdir()
        codex_home = codex_env(own, model_api)["CODEX_HOME"]  # a CODEX_HOME with the stand-in's config.toml
        extra = ["--claude-config-dir", str(own / "claude-config"), "--codex-home", codex_home]
        fleet(name, [], executors=("shell", "claude", "codex"), env=host_env, extra=extra)

    document = doc(*[s.document() for s in dag], name="fifteen", workspace={"repo": url, "base": "main"})
    run = ended(submit(live_server_proc, token, document), timeout=240)

    tasks = {t.key: t for t in Task.objects.filter(run=run)}
    attempts = {k: list(Attempt.objects.filter(task=t).order_by("number")) for k, t in tasks.items()}
    errors = {k: [(a.state, a.error) for a in atts] for k, atts in attempts.items()}
    assert run.state == RunState.SUCCEEDED, errors
    assert set(tasks) == {*by_key, "_result"}
    assert all(t.state == "succeeded" and len(attempts[k]) == 1 for k, t in tasks.items()), errors
    assert model_api.unscripted == [], [(r.route, r.path) for r in model_api.unscripted]
    assert all(not turns for turns in model_api.pending_routes.values()), model_api.pending_routes
    assert {k: t.output for k, t in tasks.items() if k in by_key} == {k: s.output for k, s in by_key.items()}

    # Every task's commit is in the result branch, and holds that task's own files and nothing else.
    result = run.result_commit
    assert git("rev-parse", run.result_branch, cwd=bare) == result
    for key, spec in by_key.items():
        commit = tasks[key].commit
        if not spec.writes:
            assert commit["sha"] is None, (key, commit)  # the review changed nothing (.gitignore: __pycache__)
            continue
        assert commit["sha"], (key, commit)
        assert subprocess.run(["git", "merge-base", "--is-ancestor", commit["sha"], result], cwd=bare).returncode == 0
        assert sorted(f["path"] for f in commit["files"]) == sorted(spec.writes), key
    expected = {"first.txt", "second.txt"} | {path for s in dag for path in s.writes}
    assert files_on(bare, run.result_branch) == expected
    for spec in dag:
        for path, content in spec.writes.items():
            assert git("show", f"{run.result_branch}:{path}", cwd=bare) == content.strip(), path

    # Each task's worktree was the merge of its dependencies' commits: what the prompt's task saw.
    for key, spec in by_key.items():
        merge = attempts[key][0].workspace["merge"]
        assert set(merge) <= {tasks[d].commit["sha"] for d in tasks if tasks[d].commit}, key
        assert {tasks[d].commit["sha"] for d in spec.deps} <= set(merge), key
    # The codex prompts were rendered from the plan's output.
    parser_turn = model_api.routed("[task:impl-parser]")[0]
    assert any(f"The plan:\n{PLAN_OUTPUT}" in s for s in strings(parser_turn.json))

    # The review ran the merged suite inside its own worktree, through claude's Bash tool.
    [unittest_result] = model_api.routed("[task:review]")[2].tool_results()
    said = "\n".join(strings(unittest_result["content"]))
    assert f"Ran {files.SUITE_TESTS} tests" in said and "OK" in said and not unittest_result.get("is_error"), said

    # The result branch's own tests pass with the machine's python3, in a clone of the branch.
    checkout = tmp_path / "checkout"
    git("clone", "-q", "--branch", run.result_branch, url, str(checkout))
    python3 = shutil.which("python3")
    assert python3, "no python3 on PATH"
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    suite = subprocess.run([python3, *UNITTEST.split()[1:], "-v"], cwd=checkout, env=env,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    assert suite.returncode == 0, suite.stdout + suite.stderr
    assert f"Ran {files.SUITE_TESTS} tests" in suite.stderr and "\nOK" in suite.stderr, suite.stderr
    cli = subprocess.run([python3, "-m", "calc", "2 * (3 + 4) - -1"], cwd=checkout, env=env,
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert (cli.returncode, cli.stdout) == (0, "15\n"), cli.stderr

    # Parallel: at least two tasks ran at the same time, on distinct agents.
    ran = [(a.started_at, a.finished_at, a.agent_id, k) for k, atts in attempts.items() for a in atts]
    assert all(start and end for start, end, _, _ in ran), ran
    overlapping = [
        (k1, k2)
        for i, (s1, e1, a1, k1) in enumerate(ran)
        for (s2, e2, a2, k2) in ran[i + 1 :]
        if s1 < e2 and s2 < e1 and a1 != a2
    ]
    assert overlapping, sorted(ran)
    assert len({agent for _, _, agent, _ in ran}) >= 2, sorted(ran)

    # Usage: what each CLI reported reached the server: the transcript artifact, and the attempt's usage,
    # cost and session (PROTOCOL.md v1.1), summed in the run's answer.
    for key, spec in by_key.items():
        [attempt] = attempts[key]
        scripted = [r.turn for r in model_api.routed(spec.marker)]
        input_tokens = sum(t.usage.input_tokens for t in scripted)
        output_tokens = sum(t.usage.output_tokens for t in scripted)
        transcript = Artifact.objects.get(attempt=attempt, name="transcript.jsonl")
        events = [json.loads(line) for line in bytes(transcript.content).decode().splitlines() if line.strip()]
        if spec.executor == "claude":
            [final] = [e for e in events if e.get("type") == "result"]
            assert final["usage"]["input_tokens"] == input_tokens and final["total_cost_usd"] > 0, (key, final)
            assert attempt.session_id == str(attempt.id), key  # claude's session is the attempt's id
        else:
            [completed] = [e for e in events if e.get("type") == "turn.completed"]
            assert completed["usage"]["input_tokens"] == input_tokens, (key, completed)
            assert attempt.session_id and attempt.usage["cost_estimated"] is True, (key, attempt.usage)
        assert attempt.usage["input_tokens"] == input_tokens, (key, attempt.usage)
        assert attempt.usage["output_tokens"] == output_tokens, (key, attempt.usage)
        assert attempt.cost_usd > 0 and attempt.cost_usd == pytest.approx(attempt.usage["cost_usd"]), key
    assert attempts["_result"][0].usage is None and attempts["_result"][0].cost_usd == 0
    answer = ok(http("GET", f"{live_server_proc.url}/api/v1/runs/{run.id}", token=token))
    assert answer["usage"]["input_tokens"] == sum(r.turn.usage.input_tokens for r in model_api.turns)
    assert answer["cost_usd"] == pytest.approx(sum(a.cost_usd for atts in attempts.values() for a in atts), abs=1e-5)
    costs = {t["key"]: t["cost_usd"] for t in answer["tasks"]}
    assert all(costs[key] > 0 for key in by_key) and costs["_result"] is None, costs


def strings(value) -> list[str]:
    """Every string inside a JSON value."""
    if isinstance(value, str):
        return [value]
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return [s for item in items for s in strings(item)]
