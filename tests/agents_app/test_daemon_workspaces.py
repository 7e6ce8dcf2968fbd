"""Real daemons working on a real git repository (issue 9): each task in a worktree of the agent's cache clone
at the run's base with its dependencies' commits merged, its changes committed and pushed to its branch,
the result branch holding every task's work; conflicts, tasks that change nothing, the patch on the task's
page, a retry replacing its branch, a SIGKILLed agent's cache used again."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from agents_app import cp_agent
from tasks_app.models import Attempt, Run, Task
from tasks_app.states import RunState
from tests.conftest import doc, git, http, wait_for

pytestmark = pytest.mark.django_db(transaction=True)


def submit(server, token, document) -> str:
    status, body = http("POST", f"{server.url}/api/v1/runs", document, token=token)
    assert status == 201, body
    return body["run_id"]


def ended(run_id, timeout=90) -> Run:
    wait_for(lambda: Run.objects.get(pk=run_id).state not in RunState.ACTIVE, timeout, what="the run to end")
    return Run.objects.get(pk=run_id)


def files_on(bare: Path, ref: str) -> set[str]:
    return set(git("ls-tree", "-r", "--name-only", ref, cwd=bare).split())


def sh(key, command, deps=(), **extra):
    return {"key": key, "executor": "shell", "command": command, "deps": list(deps), **extra}


def test_a_three_level_dag_on_one_agent_of_capacity_four_builds_one_result_branch(
    live_server_proc, fleet, operator, origin, tmp_path
):
    _, token = operator
    url, shas = origin
    bare = Path(url.removeprefix("file://"))
    fleet("gitty", [], extra=["--capacity", "4"])
    document = doc(
        sh("models", "mkdir -p app && echo 'class User: pass' > app/models.py"),
        sh("views", "mkdir -p app && echo 'def index(): return 1' > app/views.py"),
        sh(
            "glue",
            "test -f app/models.py && test -f app/views.py && cat app/*.py > app/all.txt && echo glued",
            deps=["models", "views"],
        ),  # fmt: skip
        sh("check", "test -f app/all.txt && test -f first.txt && grep -q User app/all.txt", deps=["glue"]),
        name="three-levels",
        workspace={"repo": url, "base": "main"},
    )
    run = ended(submit(live_server_proc, token, document))
    assert run.state == RunState.SUCCEEDED, [(t.key, t.state) for t in Task.objects.filter(run=run)]
    assert run.base_commit == shas["second"]
    prefix = f"cp/{run.id.hex[:8]}"
    assert run.result_branch == f"{prefix}/result"
    assert git("rev-parse", run.result_branch, cwd=bare) == run.result_commit
    assert {"first.txt", "second.txt", "app/models.py", "app/views.py", "app/all.txt"} <= files_on(
        bare, run.result_branch
    )
    for key in ("models", "views", "glue"):
        task = Task.objects.get(run=run, key=key)
        assert task.commit["sha"] and task.commit["branch"] == f"{prefix}/{key}", key
        assert git("rev-parse", f"{prefix}/{key}", cwd=bare) == task.commit["sha"]
    glue = Task.objects.get(run=run, key="glue")
    assert glue.output.strip() == "glued"
    assert [f["path"] for f in glue.commit["files"]] == ["app/all.txt"]  # its own change, not its inputs'
    check = Task.objects.get(run=run, key="check")
    assert check.commit["sha"] is None  # it changed nothing
    log = git("log", "--format=%an %s", run.result_branch, cwd=bare)
    assert "gitty glue: glue" in log
    # Succeeded attempts leave no worktree in their folders; the one cache clone and its worktree slots
    # (no more than the agent's capacity, each used again by the next task) stay for the next run.
    agent_dir = tmp_path / "agents"
    assert not list(agent_dir.rglob("*/repo/.git"))
    [cache] = (agent_dir / "git").glob("*.git")
    worktrees = git("worktree", "list", "--porcelain", cwd=cache).split("\n\n")
    slots = [w.split("\n")[0].removeprefix("worktree ") for w in worktrees[1:] if w.strip()]
    assert 1 <= len(slots) <= 4 and all(Path(s).parent.name.endswith(".slots") for s in slots), slots


def test_parallel_tasks_editing_one_line_conflict_and_the_dependent_fails_at_once(
    live_server_proc, fleet, operator, origin
):
    _, token = operator
    url, _ = origin
    fleet("gitty", [], extra=["--capacity", "2"])
    document = doc(
        sh("left", "echo left > first.txt"),
        sh("right", "echo right > first.txt"),
        sh("join", "true", deps=["left", "right"], max_attempts=3),
        name="conflict",
        workspace={"repo": url},
    )
    run = ended(submit(live_server_proc, token, document))
    assert run.state == RunState.FAILED
    join = Task.objects.get(run=run, key="join")
    assert join.state == "failed" and join.attempts_used == 1  # not retried: a retry would conflict again
    error = Attempt.objects.get(task=join).error
    assert error.startswith("merge_conflict: first.txt") and "left" in error and "right" in error


def test_the_task_page_gets_the_patch(live_server_proc, fleet, operator, origin, viewer):
    _, token = operator
    url, _ = origin
    fleet("gitty", [])
    run_id = submit(
        live_server_proc, token, doc(sh("edit", "printf 'one\\ntwo\\n' > notes.md"), workspace={"repo": url})
    )
    assert ended(run_id).state == RunState.SUCCEEDED
    task = Task.objects.get(run_id=run_id, key="edit")
    assert task.commit["diff_artifact"] and task.commit["insertions"] == 2
    page = viewer.get(f"/tasks/{task.id}/").content.decode()
    assert "notes.md" in page and "+two" in page


def test_a_retry_replaces_its_branch(origin, tmp_path):
    """The daemon's git steps, directly: a second attempt of a task pushes over the first one's branch."""
    url, shas = origin
    cache = cp_agent.RepoCache(tmp_path / "git", url)
    pushed = []
    for n in (1, 2):
        tree = cp_agent.Worktree(cache)
        tree.create(shas["second"], [], {}, ("ada", "ada@x"))
        (tree.path / "out.txt").write_text(f"attempt {n}\n")
        pushed.append(tree.commit_all(f"attempt {n}", ("ada", "ada@x")))
        tree.push("cp/12345678/task")
        tree.release()
    assert git("rev-parse", "cp/12345678/task", cwd=Path(url.removeprefix("file://"))) == pushed[1]
    assert pushed[0] != pushed[1]


def test_a_worktree_slot_used_again_keeps_nothing_of_the_task_before(origin, tmp_path):
    url, shas = origin
    cache = cp_agent.RepoCache(tmp_path / "git", url)
    first = cp_agent.Worktree(cache)
    first.create(shas["second"], [], {}, ("ada", "ada@x"))
    (first.path / "first.txt").write_text("scribbled over\n")  # a tracked file changed
    (first.path / "stray.log").write_text("untracked\n")
    (first.path / "build").mkdir()
    (first.path / "build" / "x.o").write_text("ignored or not, gone\n")
    first.release()  # as a daemon killed mid-task would leave it
    second = cp_agent.Worktree(cache)
    second.create(shas["first"], [], {}, ("ada", "ada@x"))
    assert second.path == first.path  # the same slot, moved
    assert second.head() == shas["first"]
    assert sorted(p.name for p in second.path.iterdir() if p.name != ".git") == ["first.txt"]
    assert (second.path / "first.txt").read_text() == "first"
    busy = cp_agent.Worktree(cache)
    busy.create(shas["second"], [], {}, ("ada", "ada@x"))
    assert busy.path != second.path  # a slot in use is never handed out twice
    second.release()
    busy.release()


def test_an_agent_killed_mid_task_leaves_a_cache_the_next_attempt_uses(
    live_server_proc, fleet, operator, origin, tmp_path
):
    _, token = operator
    url, _ = origin
    marker = tmp_path / "started"
    first = fleet("phoenix", [])
    document = doc(
        sh("slow", f"if [ ! -e {marker} ]; then touch {marker}; sleep 60; fi; echo done > slow.txt"),
        name="killed", workspace={"repo": url},
    )  # fmt: skip
    run_id = submit(live_server_proc, token, document)
    wait_for(marker.exists, 30, what="the task to start")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(10)
    fleet("phoenix", [])  # the same identity and work dir: its cache clone, a worktree left behind
    run = ended(run_id, timeout=120)
    assert run.state == RunState.SUCCEEDED
    attempts = list(Attempt.objects.filter(task__run=run, task__key="slow").order_by("number"))
    assert [a.state for a in attempts] == ["lost", "succeeded"]
    assert "slow.txt" in files_on(Path(url.removeprefix("file://")), run.result_branch)


def test_the_repository_over_ssh_through_a_real_sshd(live_server_proc, fleet, operator, origin, sshd, tmp_path):
    """The agent fetches and pushes with its host's own credentials (here a key in GIT_SSH_COMMAND); the
    base is a full sha, so the server itself never needs to reach the repository."""
    _, token = operator
    url, shas = origin
    bare = Path(url.removeprefix("file://"))
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_key_pub}\n")
    ssh = f"ssh -i {sshd.user_key_path} -o UserKnownHostsFile={known} -o StrictHostKeyChecking=yes -o BatchMode=yes"
    fleet("remote", [], env={**os.environ, "GIT_SSH_COMMAND": ssh})
    ssh_url = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}{bare}"
    document = doc(
        sh("one", "echo 1 > one.txt"),
        sh("two", "test -f one.txt && echo 2 > two.txt", deps=["one"]),
        workspace={"repo": ssh_url, "base": shas["second"]},
    )
    run = ended(submit(live_server_proc, token, document))
    assert run.state == RunState.SUCCEEDED, list(Attempt.objects.filter(run=run).values_list("error", flat=True))
    assert {"one.txt", "two.txt", "second.txt"} <= files_on(bare, run.result_branch)
