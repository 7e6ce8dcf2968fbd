"""The demo's DAG (docs/examples/webapp_package.yaml) replayed by hand, as the agents run it: in a bare
repository made by the demo's own `create_repo`, each task in topological order gets a worktree at the base
with its dependencies' commits merged in (the server's merge list), its command rendered by the server's
templating with its dependencies' outputs and commits, run with /bin/sh, then every change committed and the
task's branch pushed; the run's result task merges the sinks. Then the result branch must hold the whole
package, its tests must pass and its final verification too; tasks of one wave must not have written the
same files; and the test and review tasks must fail when a test fails or a module has no test.

No server and no agent here: this checks that the example stays correct, whatever the daemon does."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tasks_app import templating, workspaces
from tasks_app.dag import parse_document, with_overrides
from tasks_app.management.commands import demo
from tasks_app.management.commands.submit import load_document

pytestmark = pytest.mark.skipif(not demo.shutil.which("git"), reason="git is not installed")

STDOUT_TAIL_BYTES = 4096  # what the daemon reports of a shell task's stdout, its `${deps.KEY.output}`
MODULES = ("http", "routing", "middleware", "config", "templating", "sessions", "orm", "auth")


def git(*args, cwd=None, check=True) -> str:
    proc = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, **demo.GIT_IDENTITY}, timeout=60
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {proc.stderr}")
    return proc.stdout.strip()


def sh(command: str, cwd: Path, key: str, run_id: str) -> subprocess.CompletedProcess:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(cwd.parent),
        "LANG": "C.UTF-8",
        "CP_TASK_KEY": key,
        "CP_RUN_ID": run_id,
    }
    return subprocess.run(["/bin/sh", "-c", command], cwd=cwd, env=env, capture_output=True, timeout=180)


class Replay:
    """One run of the document, by hand: `tasks[key]` holds each task's commit, files, output, depth."""

    def __init__(self, tmp: Path, params: dict | None = None):
        self.tmp = tmp
        self.bare = tmp / "repo.git"
        self.base = demo.create_repo(self.bare)
        document = load_document(demo.PACKAGE_DAG)
        document = with_overrides(document, repo=self.bare.as_uri(), base=demo.BASE_BRANCH, params=params)
        self.dag = parse_document(document)
        self.run_id = str(uuid.uuid4())
        self.clone = tmp / "cache"
        git("clone", "-q", "--bare", self.bare.as_uri(), str(self.clone))
        self.tasks: dict[str, dict] = {}

    def branch(self, key: str) -> str:
        return workspaces.branch_of(self.dag.workspace.branch_prefix, self.run_id, key)

    def worktree(self, key: str, deps: list[str]) -> tuple[Path, list[str]]:
        """A worktree at the base with the merge list of `deps` merged in, in DAG order."""
        merge = workspaces.merge_list([self.tasks[d] for d in deps])
        path = self.tmp / "wt" / key
        git("worktree", "add", "-q", "--detach", str(path), self.base, cwd=self.clone)
        for sha in merge:
            git("merge", "-q", "--no-edit", "-m", f"{key}: merge {sha[:12]}", sha, cwd=path)
        return path, merge

    def run_task(self, spec) -> None:
        path, merge = self.worktree(spec.key, spec.deps)
        inputs = {d: {"output": self.tasks[d]["output"], "commit": self.tasks[d]["sha"]} for d in spec.deps}
        command = templating.render(spec.command, params=self.dag.params, inputs=inputs, run_id=self.run_id)
        proc = sh(command, path, spec.key, self.run_id)
        out, err = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
        assert proc.returncode == 0, f"{spec.key} exited {proc.returncode}\n--- stdout\n{out}\n--- stderr\n{err}"
        git("add", "-A", cwd=path)
        sha = None
        if git("status", "--porcelain", cwd=path):
            git("commit", "-q", "-m", f"{spec.key}: {spec.title}", cwd=path)
            sha = git("rev-parse", "HEAD", cwd=path)
            git("push", "-q", "--force", self.bare.as_uri(), f"HEAD:refs/heads/{self.branch(spec.key)}", cwd=path)
        files = git("diff", "--name-only", "HEAD~1", "HEAD", cwd=path).splitlines() if sha else []
        self.tasks[spec.key] = {
            "key": spec.key,
            "depth": spec.depth,
            "sha": sha,
            "head_commits": workspaces.head_commits_after({"sha": sha}, merge),
            "output": proc.stdout[-STDOUT_TAIL_BYTES:].decode(errors="replace"),
            "files": files,
            "path": path,
        }

    def run(self) -> Path:
        """Every task, then the result task's merge of the sinks, pushed: the result's worktree."""
        for spec in self.dag.tasks:
            self.run_task(spec)
        result = workspaces.result_task(self.dag)
        path, _merge = self.worktree(result.key, result.deps)
        git("push", "-q", self.bare.as_uri(), f"HEAD:refs/heads/{self.branch('result')}", cwd=path)
        return path


@pytest.fixture(scope="module")
def replay(tmp_path_factory) -> tuple[Replay, Path]:
    r = Replay(tmp_path_factory.mktemp("demo-package"))
    return r, r.run()


def test_the_document_keeps_the_seeds_shape():
    """The same keys, titles, dependencies, labels and estimates as the seed's DAG; shell tasks only."""
    package = parse_document(load_document(demo.PACKAGE_DAG))
    seed = parse_document(load_document(demo.SEED_DAG))
    shape = [(t.key, t.title, t.deps, t.requires, t.estimate_s, t.depth) for t in package.tasks]
    assert shape == [(t.key, t.title, t.deps, t.requires, t.estimate_s, t.depth) for t in seed.tasks]
    assert {t.executor for t in package.tasks} == {"shell"}
    assert package.max_parallel == seed.max_parallel
    assert package.params == {"package": "minifw"}


def test_the_result_branch_holds_the_package_and_its_tests_pass(replay):
    r, result = replay
    assert all(r.tasks[t.key]["sha"] for t in r.dag.tasks), "every task commits something"
    tree = set(git("ls-tree", "-r", "--name-only", r.branch("result"), cwd=r.bare).splitlines())
    want = {f"minifw/{m}.py" for m in (*MODULES, "__init__", "__main__", "cli")}
    want |= {f"tests/test_{m}.py" for m in (*MODULES, "package", "cli", "integration")}
    want |= {"README.md", "PLAN.md", ".gitignore", "runtests.py", "TEST_REPORT.md", "docs/API.md"}
    want |= {"tools/gendocs.py", "pyproject.toml", "config.example.ini", "tools/review.py", "REVIEW.md"}
    want.add("VERIFICATION.md")
    assert want <= tree, want - tree
    assert [f for f in tree if f.startswith(".")] == [".gitignore"]  # no leftovers (.unittest.out, ...)
    assert not [f for f in tree if "__pycache__" in f or f.endswith(".pyc")]
    # The result contains every task's commit; its history is the DAG's.
    for key, task in r.tasks.items():
        assert git("merge-base", "--is-ancestor", task["sha"], r.branch("result"), cwd=r.bare, check=False) == "", key
    subjects = git("log", "--no-merges", "--format=%s", r.branch("result"), cwd=r.bare).splitlines()
    assert sorted(s.split(":")[0] for s in subjects if s.startswith("task-")) == sorted(r.tasks)
    # Its tests pass with the standard library alone, and the final verification passes on it.
    env = {"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
    proc = subprocess.run(["python3", "-m", "unittest", "discover", "-s", "tests", "-t", "."], cwd=result, env=env,
                          capture_output=True, text=True, timeout=180)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "OK" in proc.stderr.splitlines()[-1]
    verify = r.dag.by_key()["task-15"]
    proc = sh(templating.render(verify.command, params=r.dag.params, inputs={}, run_id=r.run_id), result, "v", "")
    assert proc.returncode == 0, proc.stderr.decode()
    proc = subprocess.run(["python3", "-m", "minifw", "request", "GET /hello/Ada"], cwd=result, env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "HTTP/1.1 200 OK" in proc.stdout and "Hello, Ada!" in proc.stdout


def test_tasks_of_one_wave_write_different_files(replay):
    """Their merges are clean, and the run page's overlap flag stays quiet."""
    r, _ = replay
    by_depth: dict[int, list[dict]] = {}
    for task in r.tasks.values():
        by_depth.setdefault(task["depth"], []).append(task)
    for depth, tasks in by_depth.items():
        seen: dict[str, str] = {}
        for task in tasks:
            assert task["files"], task["key"]
            for f in task["files"]:
                assert f not in seen, f"wave {depth}: {task['key']} and {seen[f]} both write {f}"
                seen[f] = task["key"]
    # Each module task wrote its module and its test, nothing else.
    for n, module in enumerate(MODULES, start=2):
        assert sorted(r.tasks[f"task-{n}"]["files"]) == [f"minifw/{module}.py", f"tests/test_{module}.py"]


def test_inputs_are_handed_down(replay):
    """The run id and the package parameter reach the files; the review quotes the test wave's output and
    commit (`${deps.task-11.output}`, `${deps.task-11.commit}`)."""
    r, result = replay
    assert f"Planned by task-1 of run {r.run_id}." in (result / "PLAN.md").read_text()
    review = (result / "REVIEW.md").read_text()
    assert "approved: every module has a test and docstrings" in review
    assert f"its commit {r.tasks['task-11']['sha']}" in review
    assert r.tasks["task-11"]["output"].strip() in review
    assert "tests of minifw passed (python3 -m unittest discover)" in review
    for module in MODULES:
        assert f"## `minifw.{module}`" in (result / "docs" / "API.md").read_text()


def test_the_test_wave_fails_when_a_test_fails(replay):
    r, _ = replay
    path, _ = r.worktree("broken-tests", ["task-10"])
    (path / "tests" / "test_broken.py").write_text(
        "import unittest\n\nclass T(unittest.TestCase):\n    def test_x(self):\n        self.assertEqual(1, 2)\n"
    )
    spec = r.dag.by_key()["task-11"]
    proc = sh(templating.render(spec.command, params=r.dag.params, inputs={}, run_id=r.run_id), path, "t", "")
    assert proc.returncode == 1
    assert b"the test suite of minifw FAILED" in proc.stderr and b"test_x" in proc.stderr


def test_the_review_fails_when_a_module_has_no_test(replay):
    r, _ = replay
    path, _ = r.worktree("broken-review", ["task-11", "task-12", "task-13"])
    (path / "tests" / "test_orm.py").unlink()
    spec = r.dag.by_key()["task-14"]
    inputs = {k: {"output": "", "commit": ""} for k in spec.deps}
    proc = sh(templating.render(spec.command, params=r.dag.params, inputs=inputs, run_id=r.run_id), path, "t", "")
    assert proc.returncode == 1
    assert b"orm: no tests/test_orm.py" in proc.stderr


def test_the_package_is_a_run_parameter(tmp_path):
    """`submit --param package=webkit` builds another package: the first two waves, enough to see it."""
    r = Replay(tmp_path, params={"package": "webkit"})
    for spec in r.dag.tasks[:5]:
        r.run_task(spec)
    assert sorted(r.tasks["task-2"]["files"]) == ["tests/test_http.py", "webkit/http.py"]
    assert "from webkit.http import" in (r.tasks["task-2"]["path"] / "tests" / "test_http.py").read_text()
    bad = Replay(tmp_path / "bad", params={"package": "no-dashes"})
    path, _ = bad.worktree("task-1", [])
    spec = bad.dag.by_key()["task-1"]
    proc = sh(templating.render(spec.command, params=bad.dag.params, inputs={}, run_id=bad.run_id), path, "t", "")
    assert proc.returncode == 1 and b"is not a Python identifier" in proc.stderr


def test_the_demo_repository_is_made_once_and_kept(tmp_path):
    repo = tmp_path / "demo" / "repo.git"
    first = demo.create_repo(repo)
    git("update-ref", "refs/heads/cp/12345678/result", first, cwd=repo)
    assert demo.create_repo(repo) == first
    assert git("branch", "--list", "cp/*", cwd=repo) == "cp/12345678/result"
    assert git("ls-tree", "--name-only", "main", cwd=repo) == "README.md"
    demo.create_repo(repo, fresh=True)
    assert git("branch", "--list", "cp/*", cwd=repo) == ""
    assert not (tmp_path / "demo" / "repo.git.new").exists()
