"""A run's workspace on the server (PROTOCOL.md v1.1): the base resolved with real `git ls-remote` and pinned,
each assignment's branch and merge list, inputs and rendered templates handed down the DAG, the result task,
merge conflicts that no retry can mend. The agents' git work is tested with the daemon."""

import pytest

from tasks_app import actions, workspaces
from tasks_app.dag import DagError, parse_document
from tasks_app.models import Run, Task
from tests.conftest import doc  # the `origin` repository is a fixture of tests/conftest.py

pytestmark = pytest.mark.django_db


def ws_doc(repo, *tasks, base=None, **extra):
    workspace = {"repo": repo} if base is None else {"repo": repo, "base": base}
    return doc(*tasks, workspace=workspace, **extra)


def test_the_base_is_resolved_at_submit_and_pinned(origin, submit):
    url, shas = origin
    for base, want in ((None, shas["second"]), ("main", shas["second"]), ("light", shas["first"]),
                       ("v1", shas["first"]), (shas["first"], shas["first"])):  # fmt: skip
        run = submit(ws_doc(url, {"key": "a"}, base=base))
        assert (run.repo, run.base_commit, run.branch_prefix) == (url, want, "cp/"), base


@pytest.mark.parametrize(
    "base, says",
    [("nope", "has no branch or tag 'nope'"), ("abc1234", "give a full commit sha")],
)
def test_an_unknown_base_is_refused_naming_it(origin, base, says):
    url, _ = origin
    dag = parse_document(ws_doc(url, {"key": "a"}, base=base))
    with pytest.raises(DagError, match=says):
        actions.submit_run(dag, {}, actor="test")
    assert not Run.objects.exists()


def test_an_unreachable_repository_is_refused(tmp_path):
    dag = parse_document(ws_doc(f"file://{tmp_path}/missing.git", {"key": "a"}))
    with pytest.raises(DagError, match="cannot be reached"):
        actions.submit_run(dag, {}, actor="test")


@pytest.mark.parametrize(
    "workspace",
    [
        {"repo": "-uhttp://evil"},
        {"repo": "a b"},
        {"repo": ""},
        {"repo": 5},
        {"repo": "x", "base": "-x"},
        {"repo": "x", "branch_prefix": "../x"},
        {"repo": "x", "branch_prefix": "/abs"},
        {"repo": "x", "depth": 1},
        "x",
    ],  # fmt: skip
)
def test_a_bad_workspace_is_refused_before_git_is_asked(workspace):
    with pytest.raises(DagError, match="workspace"):
        parse_document(doc({"key": "a"}, workspace=workspace))


@pytest.mark.parametrize(
    "task, says",
    [
        ({"key": "b", "command": "echo ${deps.a.output}"}, "'a', which is not one of this task's deps"),
        ({"key": "b", "command": "echo ${params.nope}"}, "names no parameter"),
        ({"key": "b", "command": "echo ${deps.a.log}", "deps": ["a"]}, "deps.KEY.output"),
        ({"key": "b", "command": "echo ${run.name}"}, "only ${run.id}"),
    ],
)
def test_template_references_are_checked_at_submit_naming_task_and_reference(task, says):
    document = doc({"key": "a"}, {"executor": "shell", **task}, params={"feature": "login"})
    with pytest.raises(DagError, match="task 'b'") as refused:
        parse_document(document)
    assert says in refused.value.detail


def test_shell_variables_are_not_templates():
    parse_document(doc({"key": "a", "executor": "shell", "command": "echo ${HOME} $PATH"}))


def test_assignments_carry_the_workspace_inputs_and_rendered_templates(origin, submit, make_agent):
    url, shas = origin
    agent = make_agent("gitty", labels=[], executors=["shell", "simulated", "git"], capacity=4)
    run = submit(
        ws_doc(
            url,
            {"key": "plan", "executor": "shell", "command": "echo plan for ${params.feature} in ${run.id}"},
            {
                "key": "impl",
                "deps": ["plan"],
                "executor": "shell",
                "command": "echo '${deps.plan.output}' at ${deps.plan.commit}, costs $$5",
            },
            params={"feature": "login"},
        )  # fmt: skip
    )
    [plan] = actions.claim_ready_tasks(agent, 4)
    prefix = f"cp/{run.id.hex[:8]}"
    assert plan["task"]["command"] == f"echo plan for login in {run.id}"
    assert plan["task"]["workspace"] == {"repo": url, "base_commit": shas["second"], "merge": [],
                                         "branch": f"{prefix}/plan"}  # fmt: skip
    sha = "a" * 40
    commit = {"sha": sha, "branch": f"{prefix}/plan", "files_changed": 1, "insertions": 3, "deletions": 0}
    actions.complete_attempt(agent, plan["attempt_id"], "succeeded", {"stdout_tail": "the plan"}, "", 0, commit)
    [impl] = actions.claim_ready_tasks(agent, 4)
    assert impl["task"]["command"] == f"echo 'the plan' at {sha}, costs $5"
    assert impl["task"]["inputs"]["plan"] == {
        "output": "the plan",
        "commit": sha,
        "result": {"stdout_tail": "the plan"},
    }
    assert impl["task"]["workspace"]["merge"] == [sha]
    # impl changed nothing: its dependents (here the result task) merge what it was given.
    actions.complete_attempt(agent, impl["attempt_id"], "succeeded", {}, "", 0, {"sha": None})
    [result] = actions.claim_ready_tasks(agent, 4)
    assert result["task"]["key"] == workspaces.RESULT_KEY and result["task"]["executor"] == "git"
    assert result["task"]["workspace"]["merge"] == [sha]
    assert result["task"]["workspace"]["branch"] == f"{prefix}/result"
    merged = "b" * 40
    actions.complete_attempt(agent, result["attempt_id"], "succeeded", {}, "", 0, {"sha": merged})
    run.refresh_from_db()
    assert (run.state, run.result_branch, run.result_commit) == ("succeeded", f"{prefix}/result", merged)


def test_the_result_task_merges_every_sink(origin, submit):
    url, _ = origin
    run = submit(ws_doc(url, {"key": "a"}, {"key": "b", "deps": ["a"]}, {"key": "c", "deps": ["a"]}, {"key": "d"}))
    result = Task.objects.get(run=run, key=workspaces.RESULT_KEY)
    assert sorted(result.upstream_links.values_list("depends_on__key", flat=True)) == ["b", "c", "d"]
    assert result.state == "blocked" and result.executor == "git"


def test_a_document_task_named_like_the_result_task_keeps_its_name(origin, submit):
    url, _ = origin
    run = submit(ws_doc(url, {"key": "_result"}))
    assert set(Task.objects.filter(run=run).values_list("key", flat=True)) == {"_result", "_result-2"}


def test_a_workspace_task_goes_only_to_an_agent_with_git(origin, submit, make_agent):
    url, _ = origin
    submit(ws_doc(url, {"key": "a"}))
    plain = make_agent("plain", labels=[], executors=["simulated"])
    assert actions.claim_ready_tasks(plain, 1) == []
    gitty = make_agent("gitty", labels=[], executors=["simulated", "git"])
    assert len(actions.claim_ready_tasks(gitty, 1)) == 1


def test_a_merge_conflict_fails_the_task_at_once_whatever_attempts_remain(origin, submit, make_agent):
    url, _ = origin
    agent = make_agent("gitty", labels=[], executors=["simulated", "git"])
    run = submit(ws_doc(url, {"key": "a", "max_attempts": 5}))
    [a] = actions.claim_ready_tasks(agent, 1)
    state = actions.complete_attempt(agent, a["attempt_id"], "failed", {}, "merge_conflict: x.py (from b, c)", None)
    assert state == "failed"
    run.refresh_from_db()
    assert run.state == "failed"
