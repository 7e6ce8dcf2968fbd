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


def build(cur, rows: list[dict], agent_id=None) -> list[dict]:
    """The assignments for ASSIGN's rows (by column name: queries.rows_by_name), claimed by `agent_id`."""
    with_deps = [r["task_id"] for r in rows if r["has_deps"]]
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
        task_id, run_id, key, executor, repo = row["task_id"], row["run_id"], row["key"], row["executor"], row["repo"]
        deps = inputs_of.get(task_id, [])
        inputs = {
            d["key"]: {"output": d["output"], "commit": (d["commit"] or {}).get("sha"), "result": d["result"]}
            for d in deps
        }
        run_params = _json(row["run_params"]) or {}
        task = {
            "id": str(task_id),
            "run_id": str(run_id),
            "key": key,
            "title": row["title"],
            "executor": executor,
            "command": templating.render(row["command"], params=run_params, inputs=inputs, run_id=str(run_id)),
            "prompt": templating.render(row["prompt"], params=run_params, inputs=inputs, run_id=str(run_id)),
            "params": _json(row["params"]) or {},
            "timeout_s": row["timeout_s"],
            "attempt": row["attempts_used"],
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
                workspaces.result_branch(row["branch_prefix"], run_id)
                if executor == workspaces.RESULT_EXECUTOR
                else workspaces.branch_of(row["branch_prefix"], run_id, key)
            )
            task["workspace"] = {
                "repo": repo,
                "base_commit": row["base_commit"],
                "merge": workspaces.merge_list(deps),
                "branch": branch,
            }
            given.append((str(row["attempt_id"]), json.dumps(task["workspace"])))
        out.append({"attempt_id": str(row["attempt_id"]), "lease_expires_at": row["lease_expires_at"].isoformat(),
                    "task": task})  # fmt: skip
    if given:
        cur.execute(q.SET_ATTEMPT_WORKSPACES, {"ids": [g[0] for g in given], "workspaces": [g[1] for g in given]})
    return out


def _resumes(cur, rows, agent_id) -> dict:
    """{task id: {"resume_session": id} or {"resume_unavailable": why}} for retries of AI tasks whose params
    say `resume_on_retry`: a session is resumed only on the agent that holds it (its CLI's own store)."""
    wanted = [
        r["task_id"]
        for r in rows
        if r["attempts_used"] > 1
        and r["executor"] in PRICED_EXECUTORS
        and (_json(r["params"]) or {}).get("resume_on_retry")
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
