"""An assignment as PROTOCOL.md's claim answer shows it: the task, its `workspace` (repository, pinned base,
the commits to merge, its branch) and its `inputs` (what each dependency handed down), with `prompt` and
`command` rendered (tasks_app.templating).

Called by the claim inside its transaction, with its cursor, after ASSIGN: tasks without dependencies,
workspace or templates (the common case of a busy fleet) cost no query here.
"""

from __future__ import annotations

import json

from . import costs, templating, workspaces
from . import queries as q

# Executors whose agents price tokens a CLI reports without a cost: their assignments carry the price table.
PRICED_EXECUTORS = ("claude", "codex")


def _json(value):
    return value if isinstance(value, dict | list) or value is None else json.loads(value)


def build(cur, rows, agent_id=None) -> list[dict]:
    """The assignments for ASSIGN's rows, claimed by `agent_id`."""
    with_deps = [r[2] for r in rows if r[12]]
    inputs_of: dict = {}
    if with_deps:
        cur.execute(q.INPUTS_OF, {"task_ids": with_deps})
        for task_id, key, depth, output, commit, head_commits, result in cur.fetchall():
            inputs_of.setdefault(task_id, []).append(
                {"key": key, "depth": depth, "output": output, "commit": _json(commit),
                 "head_commits": head_commits, "result": _json(result)}
            )  # fmt: skip
    resumes = _resumes(cur, rows, agent_id)
    out, given = [], []
    for row in rows:
        (attempt_id, lease, task_id, run_id, key, title, executor, command, prompt, params, timeout_s, number,
         _has_deps, repo, base_commit, branch_prefix, run_params) = row  # fmt: skip
        deps = inputs_of.get(task_id, [])
        inputs = {
            d["key"]: {"output": d["output"], "commit": (d["commit"] or {}).get("sha"), "result": d["result"]}
            for d in deps
        }
        run_params = _json(run_params) or {}
        task = {
            "id": str(task_id),
            "run_id": str(run_id),
            "key": key,
            "title": title,
            "executor": executor,
            "command": templating.render(command, params=run_params, inputs=inputs, run_id=str(run_id)),
            "prompt": templating.render(prompt, params=run_params, inputs=inputs, run_id=str(run_id)),
            "params": _json(params) or {},
            "timeout_s": timeout_s,
            "attempt": number,
        }
        task["inputs"] = inputs
        if task_id in resumes:
            # Additions (README, "API"): the previous attempt's CLI session to resume, or why it cannot be.
            task.update(resumes[task_id])
        if executor in PRICED_EXECUTORS:
            # An addition to PROTOCOL.md (README, "API"): the server's price table (tasks_app.costs).
            task["prices"] = costs.price_table()
        if repo:
            branch = (
                workspaces.result_branch(branch_prefix, run_id)
                if executor == workspaces.RESULT_EXECUTOR
                else workspaces.branch_of(branch_prefix, run_id, key)
            )
            task["workspace"] = {
                "repo": repo,
                "base_commit": base_commit,
                "merge": workspaces.merge_list(deps),
                "branch": branch,
            }
            given.append((str(attempt_id), json.dumps(task["workspace"])))
        out.append({"attempt_id": str(attempt_id), "lease_expires_at": lease.isoformat(), "task": task})
    if given:
        cur.execute(q.SET_ATTEMPT_WORKSPACES, {"ids": [g[0] for g in given], "workspaces": [g[1] for g in given]})
    return out


def _resumes(cur, rows, agent_id) -> dict:
    """{task id: {"resume_session": id} or {"resume_unavailable": why}} for retries of AI tasks whose params
    say `resume_on_retry`: a session is resumed only on the agent that holds it (its CLI's own store)."""
    wanted = [
        r[2] for r in rows if r[11] > 1 and r[6] in PRICED_EXECUTORS and (_json(r[9]) or {}).get("resume_on_retry")
    ]
    if not wanted:
        return {}
    cur.execute(q.PREVIOUS_SESSIONS, {"task_ids": wanted})
    out = {}
    for task_id, previous_agent, session_id, agent_name in cur.fetchall():
        if not session_id:
            out[task_id] = {"resume_unavailable": "the previous attempt recorded no session"}
        elif str(previous_agent) != str(agent_id):
            out[task_id] = {"resume_unavailable": f"the previous attempt's session is on agent {agent_name or '?'}"}
        else:
            out[task_id] = {"resume_session": session_id}
    return out
