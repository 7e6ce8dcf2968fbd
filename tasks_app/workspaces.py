"""The server's side of a run's workspace (PROTOCOL.md v1.1): the base resolved to a commit at submit, the
branch of each task, what each assignment merges, and the run's result.

The server never clones, merges or pushes: the agents do all of that with their hosts' own git credentials,
and the control plane holds none. The run's result (the merge of the DAG's sinks) is one more task of the
run, `_result`, of the `git` executor, which any agent with git takes: it merges like any task and pushes
the result branch. The one network call here is `git ls-remote`, bounded by CP_GIT_TIMEOUT_S.
"""

from __future__ import annotations

import os
import re
import subprocess

from django.conf import settings

from .dag import Dag, DagError, TaskSpec, Workspace

FULL_SHA_RE = re.compile(r"[0-9a-f]{40}|[0-9a-f]{64}")
RESULT_KEY = "_result"
RESULT_EXECUTOR = "git"


def git_env() -> dict:
    """git that never waits for a person: no terminal prompts, ssh in batch mode with a connect timeout."""
    timeout = max(1, int(settings.CP_GIT_TIMEOUT_S))
    return {
        **os.environ,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_SSH_COMMAND": os.environ.get("GIT_SSH_COMMAND")
        or f"ssh -o BatchMode=yes -o ConnectTimeout={timeout} -o StrictHostKeyChecking=accept-new",
        "LC_ALL": "C",
    }


def resolve_base(workspace: Workspace) -> str:
    """The commit `workspace.base` names now (a full sha is taken as it is): DagError (422) when the
    repository cannot be reached in time or has no such branch or tag."""
    base = workspace.base
    if base and FULL_SHA_RE.fullmatch(base):
        return base
    if base and re.fullmatch(r"[0-9a-f]{7,39}", base):
        raise DagError(f"workspace.base {base!r}: give a full commit sha, or a branch or tag", field="workspace")
    pattern = base or "HEAD"
    try:
        proc = subprocess.run(
            ["git", "ls-remote", "--", workspace.repo, pattern, pattern + "^{}"],  # the second: a tag's commit
            capture_output=True,
            text=True,
            timeout=settings.CP_GIT_TIMEOUT_S,
            env=git_env(),
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except FileNotFoundError:
        raise DagError("the server cannot check the workspace: git is not installed on it", field="workspace") from None
    except subprocess.TimeoutExpired:
        raise DagError(
            f"workspace.repo {workspace.repo!r} did not answer within {settings.CP_GIT_TIMEOUT_S:g} s",
            field="workspace",
        ) from None
    if proc.returncode != 0:
        why = next((line for line in reversed(proc.stderr.splitlines()) if line.strip()), f"exit {proc.returncode}")
        raise DagError(f"workspace.repo {workspace.repo!r} cannot be reached: {why.strip()[:300]}", field="workspace")
    refs = {}
    for line in proc.stdout.splitlines():
        sha, _, ref = line.partition("\t")
        refs[ref] = sha
    for candidate in _candidates(pattern):
        # An annotated tag's commit is its peeled entry.
        sha = refs.get(candidate + "^{}") or refs.get(candidate)
        if sha:
            return sha
    what = "no HEAD" if base is None else f"no branch or tag {base!r}"
    raise DagError(f"workspace.repo {workspace.repo!r} has {what}", field="workspace")


def _candidates(pattern: str) -> list[str]:
    if pattern == "HEAD" or pattern.startswith("refs/"):
        return [pattern]
    return [f"refs/heads/{pattern}", f"refs/tags/{pattern}"]


def result_task(dag: Dag) -> TaskSpec:
    """The run's last task: merge the DAG's sinks and push the result branch. Its key is `_result` unless
    the document has a task of that name."""
    keys = {t.key for t in dag.tasks}
    key, n = RESULT_KEY, 2
    while key in keys:
        key, n = f"{RESULT_KEY}-{n}", n + 1
    upstream = {d for t in dag.tasks for d in t.deps}
    sinks = [t.key for t in dag.tasks if t.key not in upstream]
    # It runs where every task of the run could: the labels all of them require (the demo's own label).
    run_on = [label for label in dag.tasks[0].requires if all(label in t.requires for t in dag.tasks)]
    return TaskSpec(
        key=key,
        title="Merge the result",
        deps=sinks,
        requires=run_on,
        executor=RESULT_EXECUTOR,
        command=None,
        prompt=None,
        params={},
        estimate_s=None,
        priority=0,
        max_attempts=dag.defaults["max_attempts"],
        timeout_s=600,
        retry_delay_s=dag.defaults["retry_delay_s"],
        depth=max(t.depth for t in dag.tasks) + 1,
    )


def branch_of(branch_prefix: str, run_id, key: str) -> str:
    """`<prefix><run id, first 8 hex>/<task key>` (PROTOCOL.md)."""
    return f"{branch_prefix}{str(run_id).replace('-', '')[:8]}/{key}"


def result_branch(branch_prefix: str, run_id) -> str:
    return branch_of(branch_prefix, run_id, "result")


def merge_list(deps: list[dict]) -> list[str]:
    """The commits an assignment merges, in DAG order (dependencies by depth, then key): each dependency's
    head commits, each once. A dependency that changed nothing hands down what it was given, so nothing
    upstream of it is lost."""
    seen: list[str] = []
    for dep in sorted(deps, key=lambda d: (d["depth"], d["key"])):
        for sha in dep["head_commits"] or ():
            if sha not in seen:
                seen.append(sha)
    return seen


def head_commits_after(commit: dict | None, merged: list[str]) -> list[str]:
    """What a succeeded task hands down: its own commit, or (it changed nothing) what it merged."""
    sha = (commit or {}).get("sha")
    return [sha] if sha else list(merged)


def output_of(result) -> str:
    """A task's final text output (`${deps.KEY.output}`): the CLI's last message, or a shell task's stdout
    tail, as the daemon reports them in its result."""
    if not isinstance(result, dict):
        return ""
    for field in ("output", "stdout_tail"):
        value = result.get(field)
        if isinstance(value, str):
            return value[-65536:]
    return ""
