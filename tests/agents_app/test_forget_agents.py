"""Forgetting agents (issue 14, item 6): an offline agent not seen for CP_AGENT_FORGET_DAYS is retired by the
sweep, or by an operator's Forget button; it leaves the agents page and the fleet counts, and its attempts
and audit trail keep naming it."""

from datetime import timedelta

import pytest
from django.utils import timezone

from agents_app import registry
from agents_app.models import Agent, AgentStatus
from tasks_app import actions, jobs
from tasks_app.dashboard import panels
from tasks_app.errors import ActionError
from tasks_app.models import Attempt, Event
from tests.conftest import doc
from tests.tasks_app.dashboard.test_views import csrf_post

pytestmark = pytest.mark.django_db


def _offline_since(agent_id, days: float) -> None:
    Agent.objects.filter(pk=agent_id).update(
        status=AgentStatus.OFFLINE, last_seen_at=timezone.now() - timedelta(days=days)
    )


def _worked(submit, make_agent, name: str) -> tuple[dict, Attempt]:
    """An agent that ran one task to the end: (its dict, the attempt)."""
    submit(doc({"key": f"by-{name}"}, name=f"run-{name}"))
    agent = make_agent(name, labels=[])
    got = actions.claim_ready_tasks(agent, 1)[0]
    actions.complete_attempt(agent, got["attempt_id"], "succeeded", {}, "", 0)
    return agent, Attempt.objects.get(pk=got["attempt_id"])


def test_an_agent_offline_past_the_forget_days_is_forgotten_and_its_history_kept(submit, make_agent, settings):
    settings.CP_AGENT_FORGET_DAYS = 7
    old, attempt = _worked(submit, make_agent, "old-1")
    recent = make_agent("recent-1", labels=[])
    online = make_agent("online-1", labels=[])
    Agent.objects.filter(pk=online["id"]).update(last_seen_at=timezone.now() - timedelta(days=30))  # unswept
    _offline_since(old["id"], 8)
    _offline_since(recent["id"], 6)
    assert panels.fleet_summary()["offline"] == 2

    assert registry.forget_absent_agents() == 1
    row = Agent.objects.get(pk=old["id"])
    assert row.status == AgentStatus.RETIRED and row.retired_at is not None and row.revoked_at is None
    event = Event.objects.get(agent_id=old["id"], to_state=AgentStatus.RETIRED)
    assert (event.from_state, event.actor, event.detail) == ("offline", "system:forgetter", {"reason": "forgotten"})
    # History: the attempt still names its agent, and the agent's earlier events are all still there.
    assert Attempt.objects.filter(pk=attempt.pk).values_list("agent__name", flat=True).get() == "old-1"
    assert Event.objects.filter(agent_id=old["id"]).count() >= 2
    # Off the agents page and the fleet counts; the others untouched.
    assert [a["name"] for a in panels.agents_table()] == ["online-1", "recent-1"]
    assert panels.fleet_summary()["offline"] == 1 and panels.fleet_summary()["total"] == 2
    assert registry.forget_absent_agents() == 0  # nothing more to forget, no more events
    # Its name is free for a new agent.
    assert make_agent("old-1", labels=[])["name"] == "old-1"


def test_the_cluster_sweep_job_forgets_too(make_agent, settings):
    settings.CP_AGENT_FORGET_DAYS = 7
    agent = make_agent("gone-1", labels=[])
    _offline_since(agent["id"], 10)
    assert jobs.sweep_job()["agents_forgotten"] == 1
    assert Agent.objects.get(pk=agent["id"]).status == AgentStatus.RETIRED


def test_forget_days_zero_forgets_nobody(make_agent, settings):
    settings.CP_AGENT_FORGET_DAYS = 0
    agent = make_agent("ancient-1", labels=[])
    _offline_since(agent["id"], 3650)
    assert registry.forget_absent_agents() == 0
    assert Agent.objects.get(pk=agent["id"]).status == AgentStatus.OFFLINE


def test_a_forgotten_agents_token_answers_as_unknown_so_its_daemon_enrolls_again(make_agent, settings):
    from agents_app import tokens

    enrollment, _ = registry.create_enrollment_token()
    agent, token = registry.register_agent(enrollment, {"name": "lost-1", "labels": [], "executors": ["shell"],
                                                        "capacity": 1})  # fmt: skip
    _offline_since(agent.id, 1)
    registry.forget_agent(agent.id, "user:otto")
    with pytest.raises(registry.AuthError) as refused:
        registry.authenticate_agent(token)
    assert refused.value.code == "unauthorized" and "forgotten" in refused.value.detail
    assert tokens.hash_token(token) == Agent.objects.get(pk=agent.id).token_hash  # the row is kept


def test_an_online_agent_cannot_be_forgotten(make_agent):
    agent = make_agent("busy-1", labels=[])
    with pytest.raises(ActionError):
        registry.forget_agent(agent["id"], "user:otto")
    assert Agent.objects.get(pk=agent["id"]).status == AgentStatus.ONLINE


def test_the_forget_button_is_offered_for_an_offline_agent_and_audited(operator_client, viewer, make_agent):
    online = make_agent("up-1", labels=[])
    offline = make_agent("down-1", labels=[])
    _offline_since(offline["id"], 0.01)
    page = operator_client.get("/agents/").content.decode()
    assert f"/agents/{offline['id']}/forget/" in page and f"/agents/{online['id']}/forget/" not in page
    assert "/forget/" not in viewer.get("/agents/").content.decode()

    assert viewer.post(f"/agents/{offline['id']}/forget/").status_code == 403
    refused = csrf_post(operator_client, f"/agents/{online['id']}/forget/")
    assert refused.status_code == 409 and "only an offline agent" in refused.content.decode()
    done = csrf_post(operator_client, f"/agents/{offline['id']}/forget/")
    assert done.status_code == 200 and "forgotten" in done.content.decode()
    assert Agent.objects.get(pk=offline["id"]).status == AgentStatus.RETIRED
    event = Event.objects.get(agent_id=offline["id"], to_state=AgentStatus.RETIRED)
    assert event.actor == "user:otto" and event.detail == {"reason": "forgotten"}
    assert "down-1" not in operator_client.get("/agents/").content.decode()
    # Once forgotten, it is no current agent: a second press finds nothing.
    assert csrf_post(operator_client, f"/agents/{offline['id']}/forget/").status_code == 404
