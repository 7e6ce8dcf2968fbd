"""Read-only views of runs for the API, the CLI and the demo: status, counts and the seed's metrics."""

from __future__ import annotations

from collections import Counter

from django.db.models import Sum
from django.utils import timezone

from .. import costs
from ..errors import NotFound
from ..models import Artifact, Attempt, InputRequest, Run, Task
from ..states import AttemptState, TaskState
from . import waiting


def run_status(run_id) -> dict:
    """PROTOCOL.md's `GET /api/v1/runs/<id>` answer, in a fixed number of queries whatever the run's size."""
    run = Run.objects.filter(pk=run_id).first()
    if run is None:
        raise NotFound("no run with that id")
    tasks = list(Task.objects.filter(run=run).order_by("depth", "key"))
    live = {
        a["task_id"]: a
        for a in Attempt.objects.filter(run=run, state__in=AttemptState.LIVE).values(
            "task_id", "agent__name", "progress"
        )
    }
    latest_agent = dict(
        Attempt.objects.filter(run=run)
        .order_by("task_id", "-number")
        .distinct("task_id")
        .values_list("task_id", "agent__name")
    )
    counts = Counter(t.state for t in tasks)
    why = waiting.reasons_of(tasks)
    spent = costs.by_task(run.id)
    asking = set(
        InputRequest.objects.filter(
            run=run, state=InputRequest.PENDING, attempt__state__in=AttemptState.LIVE
        ).values_list("task_id", flat=True)
    )
    return {
        "run_id": str(run.id),
        "name": run.name,
        "state": run.state,
        "created_at": run.created_at.isoformat(),
        "finished_at": run.finished_at.isoformat() if run.finished_at else None,
        "tasks": [
            {
                "id": str(t.id),
                "key": t.key,
                "state": t.state,
                "attempt": t.attempts_used,
                "progress": live[t.id]["progress"] if t.id in live else t.progress,
                "agent": latest_agent.get(t.id),
                "started_at": t.started_at.isoformat() if t.started_at else None,
                "finished_at": t.finished_at.isoformat() if t.finished_at else None,
                # An addition to PROTOCOL.md (README, "API"): why a ready task is not assigned yet, else null.
                "waiting": why.get(t.id),
                "commit": (t.commit or {}).get("sha"),
                # PROTOCOL.md v1.1: what a person is awaited for: an approval, or an agent's input request.
                "awaiting": "approval"
                if t.state == TaskState.AWAITING_APPROVAL
                else ("input" if t.id in asking else None),
                # PROTOCOL.md v1.1: what its attempts cost and the latest CLI session (null without AI usage);
                # `usage`, summed over its attempts, is an addition.
                "cost_usd": spent[t.id]["usage"]["cost_usd"] if t.id in spent else None,
                "session_id": spent[t.id]["session_id"] or None if t.id in spent else None,
                "usage": spent[t.id]["usage"] if t.id in spent else None,
            }
            for t in tasks
        ],
        "counts": {state: counts.get(state, 0) for state in TaskState.ALL},
        "params": run.params,
        "workspace": workspace_of(run),
        "cost_usd": costs.total(spent)["cost_usd"],
        "usage": costs.total(spent),
        "max_cost_usd": run.max_cost_usd,
        # An addition: why the server paused the run (a budget reached), else "".
        "pause_reason": run.pause_reason,
        # An addition: what its attempts uploaded (GET /api/v1/artifacts/<id> downloads one).
        "artifacts": [
            {
                "id": str(a["id"]),
                "name": a["name"],
                "size": a["size"],
                "sha256": a["sha256"],
                "task_id": str(a["task_id"]),
                "task": a["task__key"],
                "attempt": a["attempt__number"],
            }
            for a in Artifact.objects.filter(task__run=run)
            .order_by("task__key", "attempt__number", "name")
            .values("id", "name", "size", "sha256", "task_id", "task__key", "attempt__number")
        ],
    }


def workspace_of(run) -> dict | None:
    """PROTOCOL.md v1.1's run `workspace`, with the base as given (`base`, an addition); None without one."""
    if not run.repo:
        return None
    return {
        "repo": run.repo,
        "base": run.base_ref,
        "base_commit": run.base_commit,
        "branch_prefix": run.branch_prefix,
        "result_branch": run.result_branch or None,
        "result_commit": run.result_commit or None,
    }


def run_metrics(run_id) -> dict:
    """The seed's headline numbers: makespan, the sum of task times (one agent's time) and the speed-up.

    Each task counts by its final attempt: after an operator's retry, the time the run stood failed and the
    attempts before the retry would make the makespan and the speed-up meaningless. `final_attempts_only`
    says when some task had more than one attempt, so the page can say so."""
    finals = list(
        Attempt.objects.filter(run_id=run_id, started_at__isnull=False)
        .order_by("task_id", "-number")
        .distinct("task_id")
        .values("number", "state", "assigned_at", "started_at", "finished_at")
    )
    now = timezone.now()
    busy = sum(
        (a["finished_at"] - a["started_at"]).total_seconds() for a in finals if a["state"] == AttemptState.SUCCEEDED
    )
    first = min((a["assigned_at"] for a in finals), default=None)
    last = max((a["finished_at"] or now for a in finals), default=None)
    makespan = (last - first).total_seconds() if first else 0.0
    estimate = Task.objects.filter(run_id=run_id).aggregate(total=Sum("estimate_s"))["total"] or 0.0
    return {
        "makespan_s": makespan,
        "task_time_s": busy,
        "speedup": busy / makespan if makespan > 0 else 0.0,
        "estimated_task_time_s": estimate,
        "final_attempts_only": Attempt.objects.filter(run_id=run_id, number__gt=1).exists(),
    }
