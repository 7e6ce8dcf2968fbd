"""What the dashboard's panels read: a run's figures (counts, progress, ETA) in a fixed number of queries."""

import pytest
from django.utils import timezone

from tasks_app import actions
from tasks_app.dashboard import panels
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
