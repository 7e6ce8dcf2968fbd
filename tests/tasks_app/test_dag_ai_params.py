"""The params of claude and codex tasks are checked at submit against what the agent daemon reads
(`tasks_app.dag.AI_PARAMS`): a typo or a bad value is a 422 naming the task and the param, not an attempt that
fails on an agent minutes later. Shell and simulated params stay free-form."""

from __future__ import annotations

import pytest

from tasks_app.dag import AI_PARAMS, DagError, parse_document, parse_task
from tests.conftest import assert_error, doc, http


def task(executor: str = "claude", **params) -> dict:
    return {"key": "plan", "executor": executor, "prompt": "Plan it.", "params": params}


def refusal(executor: str, **params) -> DagError:
    with pytest.raises(DagError) as caught:
        parse_task(task(executor, **params))
    error = caught.value
    assert (error.keys, error.field) == (["plan"], "params"), error.detail
    assert error.detail.startswith("task 'plan': "), error.detail
    return error


# --- what is accepted -----------------------------------------------------------------------------------

EVERY_CLAUDE_PARAM = {
    "model": "claude-opus-4-5",
    "permission_mode": "plan",
    "skip_permissions": False,
    "allowed_tools": ["Read", "Bash(git *)"],
    "disallowed_tools": ["WebFetch"],
    "max_turns": 12,
    "budget_usd": 2.5,
    "system_prompt": "Be brief.",
    "expect_changes": True,
    "stall_s": 600,
    "resume_on_retry": True,
    "on_permission": "ask",
    "input_timeout_s": 900,
}
EVERY_CODEX_PARAM = {
    "model": "gpt-5-codex",
    "sandbox": "read-only",
    "reasoning_effort": "high",
    "budget_usd": 1,
    "expect_changes": False,
    "stall_s": 0.5,
    "resume_on_retry": False,
}


def test_every_param_the_daemon_reads_is_accepted_and_kept_as_given():
    assert parse_task(task("claude", **EVERY_CLAUDE_PARAM)).params == EVERY_CLAUDE_PARAM
    assert parse_task(task("codex", **EVERY_CODEX_PARAM)).params == EVERY_CODEX_PARAM
    assert set(AI_PARAMS["claude"]) == set(EVERY_CLAUDE_PARAM)
    assert set(AI_PARAMS["codex"]) == set(EVERY_CODEX_PARAM)


def test_no_params_and_empty_params_are_fine():
    assert parse_task({"key": "plan", "executor": "codex", "prompt": "go"}).params == {}
    assert parse_task(task("claude")).params == {}


@pytest.mark.parametrize("mode", ["acceptEdits", "default", "plan", "dontAsk", "bypassPermissions"])
def test_each_claude_permission_mode_is_accepted(mode):
    assert parse_task(task("claude", permission_mode=mode)).params == {"permission_mode": mode}


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("max_turns", 1),
        ("max_turns", 1000),
        ("budget_usd", 10_000),
        ("budget_usd", 0.01),
        ("stall_s", 86_400),
        ("model", "m" * 200),
        ("system_prompt", ""),
        ("system_prompt", "s" * 100_000),
        ("allowed_tools", []),
        ("allowed_tools", ["t" * 500] * 100),
        ("skip_permissions", True),
    ],
)
def test_the_bounds_themselves_are_accepted(name, value):
    assert parse_task(task("claude", **{name: value})).params == {name: value}


@pytest.mark.parametrize("sandbox", ["read-only", "workspace-write", "danger-full-access"])
@pytest.mark.parametrize("effort", ["minimal", "low", "medium", "high"])
def test_each_codex_sandbox_and_reasoning_effort_is_accepted(sandbox, effort):
    assert parse_task(task("codex", sandbox=sandbox, reasoning_effort=effort)).params["sandbox"] == sandbox


# --- what is refused, naming the task and the param -------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("model", "", "a string of 1 to 200 characters"),
        ("model", "m" * 201, "a string of 1 to 200 characters"),
        ("model", 4, "a string of 1 to 200 characters"),
        ("model", None, "a string of 1 to 200 characters"),
        ("permission_mode", "acceptedits", "one of acceptEdits, default, plan, dontAsk, bypassPermissions"),
        ("permission_mode", None, "one of acceptEdits"),
        ("skip_permissions", "yes", "true or false"),
        ("allowed_tools", "Read", "a list of at most 100 tool patterns"),
        ("allowed_tools", ["Read", ""], "non-blank string"),
        ("allowed_tools", ["  "], "non-blank string"),
        ("allowed_tools", [3], "non-blank string"),
        ("disallowed_tools", ["t"] * 101, "a list of at most 100 tool patterns"),
        ("disallowed_tools", ["t" * 501], "at most 500 characters"),
        ("max_turns", 0, "an integer from 1 to 1000"),
        ("max_turns", 1001, "an integer from 1 to 1000"),
        ("max_turns", 2.5, "an integer from 1 to 1000"),
        ("max_turns", True, "an integer from 1 to 1000"),
        ("max_turns", "12", "an integer from 1 to 1000"),
        ("budget_usd", 0, "a number > 0 and <= 10000"),
        ("budget_usd", -1, "a number > 0 and <= 10000"),
        ("budget_usd", 10_000.5, "a number > 0 and <= 10000"),
        ("budget_usd", True, "a number > 0 and <= 10000"),
        ("budget_usd", "2", "a number > 0 and <= 10000"),
        ("budget_usd", float("inf"), "a number > 0 and <= 10000"),
        ("budget_usd", float("nan"), "a number > 0 and <= 10000"),
        ("system_prompt", "s" * 100_001, "a string of at most 100000 characters"),
        ("system_prompt", ["Be brief."], "a string of at most 100000 characters"),
        ("expect_changes", "false", "true or false"),
        ("expect_changes", 0, "true or false"),
        ("stall_s", 0, "a number > 0 and <= 86400"),
        ("stall_s", 86_401, "a number > 0 and <= 86400"),
        ("resume_on_retry", 1, "true or false"),
    ],
)
def test_a_bad_claude_value_is_refused_naming_the_param_and_what_is_allowed(name, value, says):
    detail = refusal("claude", **{name: value}).detail
    assert f"params.{name} must be " in detail and says in detail, detail


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("sandbox", "workspace_write", "one of read-only, workspace-write, danger-full-access"),
        ("sandbox", None, "one of read-only"),
        ("reasoning_effort", "max", "one of minimal, low, medium, high"),
        ("reasoning_effort", "HIGH", "one of minimal, low, medium, high"),
        ("model", "", "a string of 1 to 200 characters"),
        ("budget_usd", 0, "a number > 0 and <= 10000"),
        ("expect_changes", "no", "true or false"),
        ("stall_s", -5, "a number > 0 and <= 86400"),
        ("resume_on_retry", "true", "true or false"),
    ],
)
def test_a_bad_codex_value_is_refused_naming_the_param_and_what_is_allowed(name, value, says):
    detail = refusal("codex", **{name: value}).detail
    assert f"params.{name} must be " in detail and says in detail, detail


def test_the_refused_value_is_shown_and_a_long_one_shortened():
    assert refusal("claude", max_turns=0).detail.endswith("must be an integer from 1 to 1000, not 0")
    detail = refusal("claude", model="m" * 201).detail
    assert detail.endswith("...") and len(detail) < 200, detail


def test_on_permission_and_input_timeout_s_are_checked():
    assert refusal("claude", on_permission="maybe").detail.endswith("must be one of ask, deny, not 'maybe'")
    assert "input_timeout_s must be a number > 0" in refusal("claude", input_timeout_s=0).detail


def test_an_unknown_param_is_refused_naming_it_and_listing_the_known_ones():
    detail = refusal("claude", max_turn=3).detail
    assert detail == (
        "task 'plan': unknown param(s) 'max_turn' for claude; known: allowed_tools, budget_usd, disallowed_tools, "
        "expect_changes, input_timeout_s, max_turns, model, on_permission, permission_mode, resume_on_retry, "
        "skip_permissions, stall_s, system_prompt"
    )
    detail = refusal("codex", model="gpt-5-codex", effort="high", duration_s=3).detail
    assert "unknown param(s) 'effort', 'duration_s' for codex; known: budget_usd, " in detail, detail


def test_a_param_of_the_other_ai_executor_is_unknown():
    assert "unknown param(s) 'sandbox' for claude" in refusal("claude", sandbox="read-only").detail
    assert "unknown param(s) 'max_turns' for codex" in refusal("codex", max_turns=5).detail
    assert "unknown param(s) 'system_prompt' for codex" in refusal("codex", system_prompt="Be brief.").detail


def test_timeout_is_a_task_field_not_a_param():
    assert parse_task({**task("codex"), "timeout_s": 600}).timeout_s == 600
    assert "unknown param(s) 'timeout_s'" in refusal("codex", timeout_s=600).detail


# --- other executors, the whole document, the editor -----------------------------------------------------


def test_shell_and_simulated_params_stay_free_form():
    anything = {"max_turn": 3, "permission_mode": "whatever", "budget_usd": -1, "nested": {"x": [1]}, "n": None}
    shell = {"key": "build", "executor": "shell", "command": "make", "params": anything}
    assert parse_task(shell).params == anything
    assert parse_task({"key": "sim", "executor": "simulated", "params": anything}).params == anything


def test_parse_document_refuses_a_bad_param_naming_the_task():
    document = doc({"key": "lint", "executor": "shell", "command": "make lint"},
                   {"key": "impl", "executor": "codex", "prompt": "go", "params": {"sandbox": "rw"}})  # fmt: skip
    with pytest.raises(DagError) as caught:
        parse_document(document)
    assert caught.value.keys == ["impl"] and caught.value.field == "params"
    assert caught.value.detail.startswith("task 'impl': params.sandbox must be one of read-only, ")


@pytest.mark.django_db
def test_the_workflow_editor_shows_the_refusal_on_the_rows_params_field():
    from tasks_app.workflows.forms import WorkflowTaskForm

    row = {"key": "plan", "executor": "claude", "prompt": "go", "priority": "0"}
    form = WorkflowTaskForm(data={**row, "params": '{"max_turn": 3}'})
    assert not form.is_valid()
    assert "unknown param(s) 'max_turn' for claude" in " ".join(form.errors["params"]), form.errors
    assert WorkflowTaskForm(data={**row, "params": '{"max_turns": 3}'}).is_valid()


# --- through the API: PROTOCOL.md's 422 --------------------------------------------------------------------


def test_submitting_a_bad_ai_param_is_422_naming_the_task_and_the_param(live_server_proc, operator):
    from tasks_app.models import Run

    _user, token = operator
    url = live_server_proc.url + "/api/v1/runs"
    document = doc({"key": "plan", "executor": "claude", "prompt": "Plan it.", "params": {"max_turn": 3}})
    detail = assert_error(http("POST", url, document, token=token), 422, "invalid_dag")
    assert detail.startswith("task 'plan': unknown param(s) 'max_turn' for claude; known: "), detail
    document["tasks"][0]["params"] = {"budget_usd": -1}
    detail = assert_error(http("POST", url, document, token=token), 422, "invalid_dag")
    assert detail == "task 'plan': params.budget_usd must be a number > 0 and <= 10000, not -1"
    assert not Run.objects.exists()
    document["tasks"][0]["params"] = {"max_turns": 3, "budget_usd": 1}
    status, body = http("POST", url, document, token=token)
    assert status == 201, body
