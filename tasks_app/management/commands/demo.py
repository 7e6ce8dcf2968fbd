"""`./run demo`: the server, django-q2 and 10 local agents (6 ccg, 4 cg) run the seed's 15-task DAG, then
the summary.

By default the DAG is docs/examples/webapp_package.yaml: shell tasks that build a small Python package in a
git repository, so no AI account is needed. The repository is a local bare one, `.data/demo/repo.git` (made
once, with one commit on `main`, and kept: each run's branches are its own, `cp/<run8>/...`, so runs never
meet; `--fresh-repo` starts it again). Each task runs in its agent's worktree at `main` with its
dependencies' commits merged in, commits and pushes its branch; the run's last task merges the DAG's sinks
into `cp/<run8>/result`, which the summary names with the commands to look at it.

`--simulated` runs docs/examples/webapp_framework.yaml as before: simulated executors on an accelerated
clock, no repository, no git needed. `--file` runs another document: in a repository (the demo's, unless the
document names its own `workspace`), or as it is with `--simulated`.
"""

import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandError

from agents_app.registry import create_enrollment_token
from control_plane import launch
from control_plane.login import login_link
from tasks_app.actions import submit_run
from tasks_app.dag import DagError, parse_document
from tasks_app.dashboard.reports import run_status
from tasks_app.states import APPROVAL_EXECUTOR, RunState

from .status import progress_line, summary_lines
from .submit import load_document

SEED_DAG = launch.ROOT / "docs" / "examples" / "webapp_framework.yaml"
PACKAGE_DAG = launch.ROOT / "docs" / "examples" / "webapp_package.yaml"
DEMO_REPO = "repo.git"  # under DATA_DIR/demo
BASE_BRANCH = "main"
STALLED_S = 10.0  # nothing moved for this long: the watch says what the ready tasks wait for
REPO_README = """\
# The control plane's demo repository

`./run demo` runs docs/examples/webapp_package.yaml on this repository: fifteen shell tasks, each in its own
git worktree, build a small Python web framework. Every run leaves its tasks' branches under `cp/<run>/` and
the merge of everything under `cp/<run>/result`:

    git -C .data/demo/repo.git branch --list 'cp/*/result'
    git -C .data/demo/repo.git log --graph --oneline cp/<run>/result
"""
GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "control plane demo",
    "GIT_AUTHOR_EMAIL": "demo@control-plane.invalid",
    "GIT_COMMITTER_NAME": "control plane demo",
    "GIT_COMMITTER_EMAIL": "demo@control-plane.invalid",
}
NO_GIT = (
    "git is not installed on this machine (not found on PATH): the demo's tasks work in a git repository, "
    "each in its own worktree. Install git (Debian: apt-get install git), or run the simulated demo, which "
    "needs no git: ./run demo --simulated"
)


def _git(*args: str, cwd: Path | None = None, stdin: str | None = None) -> str:
    proc = subprocess.run(
        ["git", *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **GIT_IDENTITY, "GIT_TERMINAL_PROMPT": "0", "LC_ALL": "C"},
        check=False,
    )
    if proc.returncode != 0:
        raise CommandError(f"git {' '.join(args)} failed in {cwd}: {proc.stderr.strip()}")
    return proc.stdout.strip()


def create_repo(path: Path, fresh: bool = False) -> str:
    """The demo's bare repository at `path` with one commit on `main` (a README): made when it is missing
    (or `fresh`), kept otherwise. Built in a sibling directory and renamed into place, so an interrupted
    demo never leaves half a repository. Returns the commit `main` points at."""
    if fresh and path.exists():
        shutil.rmtree(path)
    if not (path / "HEAD").is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".new")
        shutil.rmtree(tmp, ignore_errors=True)
        _git("init", "-q", "--bare", str(tmp))
        _git("symbolic-ref", "HEAD", f"refs/heads/{BASE_BRANCH}", cwd=tmp)
        blob = _git("hash-object", "-w", "--stdin", cwd=tmp, stdin=REPO_README)
        tree = _git("mktree", cwd=tmp, stdin=f"100644 blob {blob}\tREADME.md\n")
        commit = _git("commit-tree", tree, "-m", "The demo repository", cwd=tmp)
        _git("update-ref", f"refs/heads/{BASE_BRANCH}", commit, cwd=tmp)
        if path.exists():  # not a repository (no HEAD): whatever it is, it is in the way
            shutil.rmtree(path)
        tmp.rename(path)
    try:
        return _git("rev-parse", "--verify", f"refs/heads/{BASE_BRANCH}^{{commit}}", cwd=path)
    except CommandError:
        raise CommandError(f"{path} has no {BASE_BRANCH} branch: start it again with ./run demo --fresh-repo") from None


def shown_path(path: Path) -> str:
    """`path` relative to the working directory when it is under it (what a person types), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


class Command(BaseCommand):
    help = (
        "Start the server, django-q2 and 10 local agents (6 ccg, 4 cg) and run the seed's 15-task DAG: shell "
        "tasks building a Python package in a local git repository (--simulated: the simulated DAG); report."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--file", default=None,
            help="the DAG document to run (default: docs/examples/webapp_package.yaml, or with --simulated "
            "docs/examples/webapp_framework.yaml)",
        )  # fmt: skip
        parser.add_argument(
            "--simulated", action="store_true",
            help="the simulated demo: simulated executors on an accelerated clock, no repository, no git",
        )  # fmt: skip
        parser.add_argument(
            "--fresh-repo", action="store_true",
            help="make the demo's repository (.data/demo/repo.git) again, dropping earlier runs' branches",
        )  # fmt: skip
        parser.add_argument("--agents-ccg", type=int, default=6)
        parser.add_argument("--agents-cg", type=int, default=4)
        parser.add_argument(
            "--exit-when-done", action="store_true",
            help="stop when the run ends (by default the server keeps serving the run's pages until Ctrl-C)",
        )  # fmt: skip
        parser.add_argument(
            "--time-scale", type=float, default=float(os.environ.get("CP_DEMO_TIME_SCALE", "0.005")),
            help="simulated seconds per estimated second (0.005: the seed's 90 minutes in about 30 s)",
        )  # fmt: skip

    def handle(self, *args, file, simulated, fresh_repo, agents_ccg, agents_cg, time_scale, exit_when_done,
               **options):  # fmt: skip
        host = os.environ.get("HOST", "127.0.0.1")
        port = int(os.environ.get("PORT", "8000"))
        logs = Path(settings.DATA_DIR) / "demo"
        logs.mkdir(parents=True, exist_ok=True)
        path = Path(file) if file else (SEED_DAG if simulated else PACKAGE_DAG)
        document, repo = self._document(load_document(path), simulated, fresh_repo, logs)
        # Its own label, on its tasks and its agents: no other agent takes its work, nor its agents other work.
        label = f"demo-{secrets.token_hex(3)}"
        document = with_label(document, label)
        try:
            dag = parse_document(document)
        except DagError as exc:
            raise CommandError(f"{path}: invalid DAG: {exc.detail}") from None
        children = []
        # `kill` stops the demo as Ctrl-C does: its server, cluster and agents (in sessions of their own) too.
        signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(128 + signal.SIGTERM))
        try:
            self.stdout.write(f"==> server on http://{host}:{port}/  (logs in {logs})")
            children.append(launch.start_server(port, log=logs / "server.log"))
            children.append(launch.start_qcluster(log=logs / "qcluster.log"))
            token, _ = create_enrollment_token(note="demo agents")
            server = f"http://{host}:{port}"
            plan = [(f"ccg-{i}", ["ccg", label]) for i in range(1, agents_ccg + 1)]
            plan += [(f"cg-{i}", ["cg", label]) for i in range(1, agents_cg + 1)]
            for name, labels in plan:
                children.append(
                    launch.start_agent(server, token, name, labels, logs / "agents", executors=["simulated", "shell"],
                                       extra=["--time-scale", str(time_scale)], log=logs / f"agent-{name}.log")
                )  # fmt: skip
            self.stdout.write(f"==> {len(plan)} agents: {', '.join(n for n, _ in plan)} (label {label})")
            try:
                run = submit_run(dag, document, actor="cli:demo")
            except DagError as exc:
                raise CommandError(f"{path}: {exc.detail}") from None
            user = demo_user()
            self.stdout.write(f"==> run {run.id} submitted: {run.name}")
            self.stdout.write(f"    dashboard: {server}{login_link(user, f'/runs/{run.id}/')}")
            self.stdout.write(
                f"    (a one-time login link as {user.get_username()}; API: {server}/api/v1/runs/{run.id})"
            )
            status = self._watch(run.id)
            for line in summary_lines(run.id):
                self.stdout.write(line)
            if status.get("workspace"):
                for line in workspace_lines(status, repo, server):
                    self.stdout.write(line)
            if not exit_when_done:
                self._serve_until_interrupted(server, run.id)
        finally:
            for child in reversed(children):
                launch.stop(child)
        if status["state"] != RunState.SUCCEEDED:
            raise CommandError(f"the run ended {status['state']}")

    def _document(self, document: dict, simulated: bool, fresh_repo: bool, logs: Path) -> tuple[dict, Path | None]:
        """The document to run and the demo's repository (None when simulated or the document names its own)."""
        if simulated:
            return document, None
        if shutil.which("git") is None:
            raise CommandError(NO_GIT)
        if document.get("workspace"):
            return document, None  # the document's own; the summary names it from the run
        repo = logs / DEMO_REPO
        base = create_repo(repo, fresh=fresh_repo)
        self.stdout.write(f"==> repository {shown_path(repo)} ({BASE_BRANCH} at {base[:12]})")
        return {**document, "workspace": {"repo": repo.resolve().as_uri(), "base": BASE_BRANCH}}, repo

    def _serve_until_interrupted(self, server: str, run_id) -> None:
        self.stdout.write(f"==> still serving {server}/runs/{run_id}/ ; Ctrl-C stops the server and the agents")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            self.stdout.write("")

    def _watch(self, run_id) -> dict:
        tty = sys.stdout.isatty()
        last, said = "", ""
        changed = time.monotonic()
        status = run_status(run_id)
        while status["state"] in (RunState.RUNNING, RunState.PAUSED):
            line = progress_line(status)
            if line != last:
                self.stdout.write(("\r" + line) if tty else line, ending="" if tty else "\n")
                self.stdout.flush()
                last, changed = line, time.monotonic()
            elif time.monotonic() - changed > STALLED_S and (why := stalled(status)) and why != said:
                self.stdout.write(("\n" if tty else "") + why)  # e.g. the agents have no git
                said = why
            time.sleep(0.5)
            status = run_status(run_id)
        self.stdout.write(("\r" if tty else "") + progress_line(status))
        return status


def with_label(document: dict, label: str) -> dict:
    """The document with `label` required by each of its tasks that an agent runs (approvals take none)."""
    tasks = [
        t if not isinstance(t, dict) or t.get("executor") == APPROVAL_EXECUTOR
        else {**t, "requires": [*(t.get("requires") or []), label]}
        for t in document.get("tasks") or []
    ]  # fmt: skip
    return {**document, "tasks": tasks}


def demo_user():
    """The person the demo logs in: the first superuser, or a `demo` superuser made for it (no password:
    the login link is its way in; `./run manage changepassword demo` gives it one)."""
    User = get_user_model()
    user = User.objects.filter(is_superuser=True, is_active=True).order_by("pk").first()
    if user is None:
        user = User.objects.create_superuser("demo", email="", password=None)
    return user


def stalled(status: dict) -> str:
    """When nothing runs and ready tasks wait: why (the server's reasons, each with its tasks), else ""."""
    if any(t["state"] in ("assigned", "running") for t in status["tasks"]):
        return ""
    waiting: dict[str, list[str]] = {}
    for t in status["tasks"]:
        if t["state"] == "ready" and t.get("waiting"):
            waiting.setdefault(t["waiting"], []).append(t["key"])
    return "\n".join(f"    waiting: {why} ({', '.join(keys)})" for why, keys in waiting.items())


def workspace_lines(status: dict, repo: Path | None, server: str) -> list[str]:
    """The end of a workspace run's summary: the result branch and its commit, and how to look at it; or,
    when the run did not succeed, which tasks failed and where to read why."""
    ws = status["workspace"]
    where = shown_path(repo) if repo is not None else ws["repo"]
    lines = [f"repository        {where}"]
    if status["state"] != RunState.SUCCEEDED or not ws.get("result_branch"):
        failed = [t for t in status["tasks"] if t["state"] in ("failed", "canceled")]
        lines.append(f"no result branch: the run ended {status['state']}")
        lines += [f"  {t['key']:<9} {t['state']:<9} {server}/tasks/{t['id']}/" for t in failed]
        return lines
    branch, sha = ws["result_branch"], ws["result_commit"] or ""
    git_dir = f"git -C {where}" if repo is not None else "git"
    package = (status.get("params") or {}).get("package")
    lines += [
        f"result branch     {branch}",
        f"result commit     {sha}",
        "look at it:",
        f"  {git_dir} log --graph --oneline {branch}",
        f"  {git_dir} show --stat {branch}",
    ]
    if repo is not None:
        checkout = f"/tmp/{package or 'demo'}-{branch.split('/')[-2]}"
        lines.append(f"  git clone -q -b {branch} {where} {checkout}")
        if package:  # the package DAG's: its tests and its command line
            lines.append(f"  cd {checkout} && python3 -m unittest discover -s tests -t . && python3 -m {package} info")
    return lines
