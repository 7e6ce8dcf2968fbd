"""The DAG document's validation reports every problem at once, each naming its task and field."""

from __future__ import annotations

import pytest

from tasks_app.dag import DagError, parse_document


def problems_of(document: dict) -> DagError:
    with pytest.raises(DagError) as caught:
        parse_document(document)
    return caught.value


def test_a_document_with_three_bad_tasks_is_refused_with_all_three():
    err = problems_of({
        "name": "three",
        "tasks": [
            {"key": "a", "executor": "shell"},
            {"key": "b", "executor": "simulated", "max_attempts": 0},
            {"key": "c", "executor": "teleport"},
            {"key": "d", "executor": "simulated"},
        ],
    })  # fmt: skip
    assert [(p.keys, p.field) for p in err.problems] == [(["a"], "command"), (["b"], "max_attempts"),
                                                          (["c"], "executor")]  # fmt: skip
    assert err.detail.startswith("3 problems: ")
    assert "task 'a': a shell task needs a command" in err.detail
    assert "task 'b': max_attempts must be an integer from 1 to 100" in err.detail
    assert "task 'c': executor must be one of" in err.detail
    assert err.keys == ["a", "b", "c"]


def test_every_field_of_one_task_is_reported():
    err = problems_of({"name": "one", "tasks": [
        {"key": "a", "executor": "shell", "timeout_s": 0, "retry_delay_s": -1, "title": 5, "extra": 1},
    ]})  # fmt: skip
    assert [p.field for p in err.problems] == [None, "command", "title", "timeout_s", "retry_delay_s"]
    assert all(p.detail.startswith("task 'a': ") and p.keys == ["a"] for p in err.problems)


def test_a_dependency_typo_says_what_was_meant():
    err = problems_of({"name": "typo", "tasks": [
        {"key": "impl-core", "executor": "simulated"},
        {"key": "test", "executor": "simulated", "deps": ["impl-cor", "docs"]},
    ]})  # fmt: skip
    [problem] = err.problems
    assert problem.field == "deps" and problem.keys == ["test", "impl-cor", "docs"]
    assert problem.detail == "task 'test' depends on unknown key(s): impl-cor (did you mean 'impl-core'?), docs"


def test_a_dependency_on_a_task_that_is_itself_invalid_is_not_reported_twice():
    err = problems_of({"name": "x", "tasks": [
        {"key": "a", "executor": "shell"},
        {"key": "b", "executor": "simulated", "deps": ["a"]},
    ]})  # fmt: skip
    assert [p.detail for p in err.problems] == ["task 'a': a shell task needs a command"]


def test_document_fields_and_templates_are_reported_beside_the_tasks():
    err = problems_of({"name": "", "priority": "high", "params": {"who": "x"}, "tasks": [
        {"key": "a", "executor": "shell", "command": "echo ${params.whom}"},
        {"key": "a", "executor": "simulated"},
    ]})  # fmt: skip
    details = [p.detail for p in err.problems]
    assert details[0] == "name must be a string of 1 to 128 characters"
    assert "priority must be an integer" in details[1]
    assert "duplicate task key 'a'" in details
    assert any(d.startswith("task 'a': command:") and "whom" in d for d in details)


def test_a_cycle_is_named_once_the_tasks_are_valid():
    err = problems_of({"name": "loop", "tasks": [
        {"key": "a", "executor": "simulated", "deps": ["b"]},
        {"key": "b", "executor": "simulated", "deps": ["a"]},
    ]})  # fmt: skip
    assert "cycle" in err.detail and err.problems == [err]


def test_one_problem_is_its_own_error():
    err = problems_of({"name": "one", "tasks": [{"key": "a", "executor": "shell"}]})
    assert err.problems == [err] and err.detail == "task 'a': a shell task needs a command"
