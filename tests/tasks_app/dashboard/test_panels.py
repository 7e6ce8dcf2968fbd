"""What the dashboard's panels read: a run's figures (counts, progress, ETA) in a fixed number of queries."""

import uuid

import pytest
from django.utils import timezone

from tasks_app import actions
from tasks_app.dashboard import panels
from tasks_app.models import Task
from tests.conftest import doc

pytestmark = pytest.mark.django_db


def test_run_summary_counts_states_weighs_live_progress_and_estimates_the_end(
    submit, make_agent, django_assert_num_queries
):
    run = submit(
        doc({"key": "plan", "estimate_s": 60}, {"key": "build", "estimate_s": 60},
            {"key": "ship", "deps": ["plan", "build"], "estimate_s": 600}, name="figures")
    )  # fmt: skip
    agent, other = make_agent("ccg-1", labels=[]), make_agent("ccg-2", labels=[])
    first = actions.claim_ready_tasks(agent, 1)[0]
    actions.complete_attempt(agent, first["attempt_id"], "succeeded", {}, "", 0)
    second = actions.claim_ready_tasks(other, 1)[0]
    actions.record_progress(other, second["attempt_id"], 0.5, "halfway", None)
    with django_assert_num_queries(2):
        (summary,) = panels.run_summaries([run.id])
    assert summary["counts"] == {
        "blocked": 1, "ready": 0, "assigned": 0, "running": 1, "awaiting_approval": 0, "succeeded": 1, "failed": 0,
        "canceled": 0, "skipped": 0,
    }  # fmt: skip
    assert summary["total"] == 3
    assert summary["fraction"] == pytest.approx((1 + 0.5) / 3)
    # The remaining chain is half of `build` then `ship`; `plan` took far less than its estimate, so the ETA
    # scales down (never into the past).
    assert summary["eta"] is not None and summary["eta"] >= timezone.now() - timezone.timedelta(seconds=1)
    actions.cancel_run(str(run.id), "test")
    (ended,) = panels.run_summaries([run.id])
    assert ended["eta"] is None and ended["counts"]["canceled"] + ended["counts"]["skipped"] >= 2


def test_the_queue_lists_ready_tasks_in_the_order_they_are_claimed(submit, make_agent):
    # Ties on every key of queries.CLAIM_ORDER: two priorities, two critical paths, ready_at unset (ready
    # since the submission) or set (released, or past a retry delay), and one run's tasks sharing created_at
    # (one transaction), so the id decides.
    tasks = [{"key": f"t{i}", "priority": i % 2, "estimate_s": 1 + 4 * (i // 2 % 2)} for i in range(12)]
    first, second = submit(doc(*tasks, name="first")), submit(doc(*tasks, name="second"))
    past = timezone.now() - timezone.timedelta(minutes=5)
    for n, key in enumerate(["t0", "t3", "t5", "t8"]):
        Task.objects.filter(run__in=[first, second], key=key).update(ready_at=past + timezone.timedelta(seconds=n))
    listed = [row["id"] for row in panels.queue(limit=100)]
    agent = make_agent("solo", labels=[], capacity=len(listed))
    claimed = []
    while got := actions.claim_ready_tasks(agent, 1):
        claimed.append(uuid.UUID(got[0]["task"]["id"]))
    assert len(listed) == 24
    assert claimed == listed
