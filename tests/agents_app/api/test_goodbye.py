"""POST /api/v1/agents/goodbye (an addition to PROTOCOL.md, README "API"): a daemon stopping cleanly is
offline at once, its fleet counts with it; attempts it still holds are lost as the sweep would lose them."""

from __future__ import annotations

from tests.conftest import assert_error, http, ok


def test_goodbye_marks_the_agent_offline_at_once_with_an_event(server, enroll):
    from agents_app.models import Agent
    from tasks_app.dashboard.panels import fleet_summary
    from tasks_app.models import Event

    agent = enroll("leaver-1")
    ok(agent.heartbeat(status="idle"))
    assert fleet_summary()["online"] == 1
    assert ok(agent.post("/api/v1/agents/goodbye", {})) == {"lost": 0}
    assert Agent.objects.get(pk=agent.id).status == "offline"
    counts = fleet_summary()
    assert counts["online"] == 0 and counts["offline"] == 1
    event = Event.objects.filter(agent_id=agent.id, to_state="offline").get()
    assert (event.from_state, event.actor, event.detail) == ("online", "agent:leaver-1", {"reason": "goodbye"})


def test_goodbye_loses_what_the_agent_still_holds(server, enroll, run_of):
    from tasks_app.models import Attempt, Task

    run_of({"key": "held", "max_attempts": 3})
    agent = enroll("leaver-2")
    attempt = agent.claim_one()
    assert ok(agent.post("/api/v1/agents/goodbye")) == {"lost": 1}
    lost = Attempt.objects.get(pk=attempt["attempt_id"])
    assert lost.state == "lost" and lost.error == "agent said goodbye"
    assert Task.objects.get(pk=attempt["task"]["id"]).state == "ready"
    # Its late completion is refused like any lost attempt's.
    assert_error(agent.complete(attempt["attempt_id"]), 409)


def test_an_agent_that_calls_again_after_goodbye_is_online_again(server, enroll):
    from agents_app.models import Agent

    agent = enroll("leaver-3")
    ok(agent.post("/api/v1/agents/goodbye"))
    ok(agent.heartbeat(status="idle"))
    assert Agent.objects.get(pk=agent.id).status == "online"


def test_goodbye_needs_an_agent_token_and_a_post(server, enroll):
    assert_error(http("POST", f"{server}/api/v1/agents/goodbye", {}), 401)
    assert_error(http("POST", f"{server}/api/v1/agents/goodbye", {}, token="cpa_nonsense"), 401)
    agent = enroll("leaver-4")
    got, _ = http("GET", f"{server}/api/v1/agents/goodbye", token=agent.token)
    assert got == 405
    assert_error(agent.post("/api/v1/agents/goodbye", raw=b"[1]"), 400)
