"""The code a workspace run wrote, on the dashboard: the run's repository, base, result and files per task,
overlaps between tasks that ran in parallel, +/- counts on the DAG's nodes, and a task's diff (parsed,
coloured, cut when long, the whole patch downloadable), every agent-written line escaped."""

import hashlib

import pytest

from tasks_app import actions
from tasks_app.dashboard import diffs
from tasks_app.models import Task
from tests.conftest import doc
from tests.tasks_app.dashboard.test_views import dag_data

pytestmark = pytest.mark.django_db
BASE = "c" * 40
HOSTILE = '<script>alert("diff")</script>'


def patch_text(path: str, added: list[str], removed: list[str] = ()) -> str:
    lines = [f"diff --git a/{path} b/{path}", "index 1111111..2222222 100644", f"--- a/{path}", f"+++ b/{path}",
             "@@ -1,2 +1,3 @@", " context"]  # fmt: skip
    lines += [f"-{r}" for r in removed] + [f"+{a}" for a in added]
    return "\n".join(lines) + "\n"


def finish_with_commit(agent, assignment, sha: str, files: list[str], patch: str):
    artifact = actions.add_artifact(
        agent, assignment["attempt_id"], name="commit.diff", content=patch.encode(),
        sha256=hashlib.sha256(patch.encode()).hexdigest(), content_type="text/x-diff",
    )  # fmt: skip
    commit = {"sha": sha, "branch": assignment["task"]["workspace"]["branch"], "files_changed": len(files),
              "insertions": 3, "deletions": 1, "files": [{"path": f, "insertions": 3, "deletions": 1} for f in files],
              "diff_artifact": str(artifact.id)}  # fmt: skip
    actions.complete_attempt(agent, assignment["attempt_id"], "succeeded", {}, "", 0, commit)


@pytest.fixture
def code_run(submit, make_agent):
    agent = make_agent("gitty", labels=[], executors=["simulated", "git"], capacity=4)
    run = submit(
        doc({"key": "api"}, {"key": "ui"}, {"key": "docs", "deps": ["api", "ui"]},
            workspace={"repo": "file:///srv/webapp.git", "base": BASE}, params={"feature": "login"})
    )  # fmt: skip
    claimed = {a["task"]["key"]: a for a in actions.claim_ready_tasks(agent, 4)}
    finish_with_commit(agent, claimed["api"], "a" * 40, ["app/routes.py", "app/models.py"],
                       patch_text("app/routes.py", [HOSTILE, "ok", "fine"], ["old"]))  # fmt: skip
    finish_with_commit(agent, claimed["ui"], "b" * 40, ["app/routes.py", "ui/page.html"],
                       patch_text("ui/page.html", ["<b>", "x", "y"]))  # fmt: skip
    return run


def test_the_run_page_shows_repository_base_files_per_task_and_overlaps(code_run, viewer):
    page = viewer.get(f"/runs/{code_run.id}/").content.decode()
    assert "file:///srv/webapp.git" in page and BASE[:12] in page and "feature=login" in page
    assert 'data-testid="overlaps"' in page
    overlaps = page[page.index('data-testid="overlaps"') :]
    assert "app/routes.py</code> by api, ui" in overlaps
    assert "app/models.py</code> by" not in overlaps  # only one task changed it
    picture = dag_data(page)  # the DAG's nodes carry their counts, drawn on them in the normal style
    assert picture["diff"][str(picture["keys"].index("api"))][0] == 3 and not picture["compact"]


def test_tasks_in_a_chain_changing_one_file_are_no_overlap(submit, make_agent, viewer):
    agent = make_agent("gitty", labels=[], executors=["simulated", "git"])
    run = submit(doc({"key": "a"}, {"key": "b", "deps": ["a"]}, workspace={"repo": "file:///r.git", "base": BASE}))
    for sha in ("a" * 40, "b" * 40):
        [got] = actions.claim_ready_tasks(agent, 1)
        finish_with_commit(agent, got, sha, ["same.py"], patch_text("same.py", ["x"]))
    assert 'data-testid="overlaps"' not in viewer.get(f"/runs/{run.id}/").content.decode()


def test_the_task_page_shows_the_diff_escaped_with_the_patch_downloadable(code_run, viewer):
    api = Task.objects.get(run=code_run, key="api")
    page = viewer.get(f"/tasks/{api.id}/").content.decode()
    assert HOSTILE not in page
    assert "+&lt;script&gt;alert(&quot;diff&quot;)&lt;/script&gt;" in page
    assert 'class="d-add"' in page and 'class="d-del"' in page and "app/routes.py" in page
    assert "the whole patch" in page and "aaaaaaaaaaaa" in page


def test_a_long_diff_is_cut_with_counts_intact():
    text = patch_text("big.py", [f"line {i}" for i in range(50)])
    files, cut = diffs.parse(text, max_lines=10)
    assert cut and files[0].cut and files[0].added == 50 and len(files[0].lines) == 10


def test_renames_additions_and_binaries_are_named():
    text = (
        "diff --git a/old.py b/new.py\nsimilarity index 90%\nrename from old.py\nrename to new.py\n"
        "diff --git a/n.txt b/n.txt\nnew file mode 100644\n--- /dev/null\n+++ b/n.txt\n@@ -0,0 +1 @@\n+hi\n"
        "diff --git a/img.png b/img.png\nBinary files a/img.png and b/img.png differ\n"
    )
    files, _ = diffs.parse(text)
    assert [(f.path, f.status) for f in files] == [("new.py", "renamed"), ("n.txt", "added"), ("img.png", "binary")]
    assert files[0].old_path == "old.py" and files[1].added == 1


def test_a_run_without_a_workspace_shows_its_parameters(submit, viewer):
    run = submit(doc({"key": "a", "executor": "shell", "command": "echo ${params.who}"}, params={"who": "<ada>"}))
    page = viewer.get(f"/runs/{run.id}/").content.decode()
    assert "<h2>Parameters</h2>" in page and "who=&lt;ada&gt;" in page and "Repository" not in page
