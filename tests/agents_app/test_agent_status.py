"""An agent's status, as a specification: the table in tasks_app.states, the registry and the two statements
that move it (the sweep's SILENT_AGENTS, the contact's TOUCH_AGENT) keeping to it, and an Event naming its
actor for every change."""

import itertools
import threading
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.utils import timezone

from agents_app import models, registry
from agents_app.models import Agent
from tasks_app import actions
from tasks_app import queries as q
from tasks_app.audit import EventLog
from tasks_app.models import Event
from tasks_app.states import AGENT_TRANSITIONS, AgentStatus, InvalidTransition, can_transition, check_transition
from tests.agents_app.test_enrollment import lock_waiters
from tests.conftest import wait_for

G = AgentStatus
ALLOWED = {(G.ONLINE, G.OFFLINE), (G.ONLINE, G.RETIRED), (G.OFFLINE, G.ONLINE), (G.OFFLINE, G.RETIRED)}
FORBIDDEN = [pair for pair in itertools.product(G.ALL, G.ALL) if pair not in ALLOWED]


@pytest.mark.parametrize("current,target", list(itertools.product(G.ALL, G.ALL)))
def test_agent_status_table_is_exactly_the_documented_one(current, target):
    assert can_transition("agent", current, target) == ((current, target) in ALLOWED)


@pytest.mark.parametrize("current,target", FORBIDDEN)
def test_every_transition_the_table_forbids_is_refused(current, target):
    with pytest.raises(InvalidTransition):
        check_transition("agent", current, target)


def test_retired_is_final_and_every_status_has_a_row():
    assert set(AGENT_TRANSITIONS) == set(G.ALL)
    assert AGENT_TRANSITIONS[G.RETIRED] == frozenset()


def test_the_status_columns_choices_are_the_state_machines_statuses():
    assert list(models.AgentStatus.values) == list(G.ALL)


# --- the registry and the SQL keep to the table ------------------------------------------------------


@pytest.fixture
def enroll(db):
    """Register an agent directly: (Agent, its token)."""
    enrollment, _ = registry.create_enrollment_token()

    def make(name="ccg-1"):
        info = {"name": name, "labels": [], "executors": ["shell"], "capacity": 1}
        return registry.register_agent(enrollment, info)

    return make


def _silence(agent_id) -> None:
    Agent.objects.filter(pk=agent_id).update(last_seen_at=timezone.now() - timedelta(minutes=5))


def _status_events(agent_id):
    return list(
        Event.objects.filter(agent_id=agent_id, kind="agent", to_state__in=G.ALL)
        .order_by("id")
        .values_list("from_state", "to_state", "actor", "detail")
    )


def test_an_agent_that_went_offline_and_calls_again_is_online_with_an_event(enroll):
    agent, token = enroll("ccg-1")
    _silence(agent.pk)
    assert actions.sweep(force=True)["agents_offline"] == 1
    assert Agent.objects.get(pk=agent.pk).status == G.OFFLINE

    registry.authenticate_agent(token)
    registry.authenticate_agent(token)  # already online: no second Event

    assert Agent.objects.get(pk=agent.pk).status == G.ONLINE
    assert _status_events(agent.pk) == [
        ("", G.ONLINE, "agent:ccg-1", {"labels": []}),
        (G.ONLINE, G.OFFLINE, "system:sweeper", {"reason": "silent"}),
        (G.OFFLINE, G.ONLINE, "agent:ccg-1", {"reason": "contact"}),
    ]


@pytest.mark.django_db(transaction=True)
def test_calls_at_once_of_an_agent_coming_back_write_one_event(enroll):
    """Each call's contact queues on the agent's row; the first brings it online, the others, re-reading the
    row after their wait, find it online and only record contact."""
    agent, token = enroll("ccg-1")
    Agent.objects.filter(pk=agent.pk).update(status=G.OFFLINE)
    callers, failures = 4, []

    def call():
        try:
            registry.authenticate_agent(token)
        except Exception as exc:  # reported below, in the test's thread
            failures.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=call) for _ in range(callers)]
    with transaction.atomic():
        Agent.objects.select_for_update().get(pk=agent.pk)  # every call arrives before any decides
        for thread in threads:
            thread.start()
        wait_for(lambda: lock_waiters() >= callers, 30, what="every call to wait for the agent's row")
    for thread in threads:
        thread.join(30)
    assert not failures
    assert Agent.objects.get(pk=agent.pk).status == G.ONLINE
    assert [e[:2] for e in _status_events(agent.pk)] == [("", G.ONLINE), (G.OFFLINE, G.ONLINE)]


def test_an_online_agents_call_records_contact_and_writes_no_event(enroll):
    agent, token = enroll("ccg-1")
    _silence(agent.pk)  # stale contact, but not swept: still online
    before = Event.objects.count()
    registry.authenticate_agent(token)
    row = Agent.objects.get(pk=agent.pk)
    assert row.status == G.ONLINE and row.last_seen_at > timezone.now() - timedelta(seconds=5)
    assert Event.objects.count() == before


def test_a_disabled_agent_that_calls_stays_offline(enroll):
    agent, token = enroll("ccg-1")
    registry.set_agent_flags(agent.pk, "user:olivia", enabled=False)
    _silence(agent.pk)
    actions.sweep(force=True)
    with pytest.raises(registry.Forbidden):
        registry.authenticate_agent(token)
    assert Agent.objects.get(pk=agent.pk).status == G.OFFLINE
    assert _status_events(agent.pk)[-1][:2] == (G.ONLINE, G.OFFLINE)


def _touch(agent_id) -> None:
    with connection.cursor() as cur:
        cur.execute(q.TOUCH_AGENT, {"agent_id": agent_id, **registry._BACK_ONLINE})


def _sweep_silent() -> None:
    with connection.cursor() as cur:
        cur.execute(q.SILENT_AGENTS, {"offline_after_s": 1})


@pytest.mark.parametrize("statement", [_touch, _sweep_silent], ids=["TOUCH_AGENT", "SILENT_AGENTS"])
@pytest.mark.parametrize("status", G.ALL)
def test_the_agent_statements_move_a_status_only_as_the_table_allows(enroll, statement, status):
    """Whatever status an agent row is in when the statement runs (a retirement may commit between the
    authentication and the contact it records), the statement moves it only along the table."""
    agent, _token = enroll("ccg-1")
    Agent.objects.filter(pk=agent.pk).update(status=status, last_seen_at=timezone.now() - timedelta(minutes=5))
    statement(agent.pk) if statement is _touch else statement()
    after = Agent.objects.get(pk=agent.pk).status
    assert after == status or can_transition("agent", status, after), f"{status} -> {after}"
    if statement is _touch:
        assert after == (G.ONLINE if status != G.RETIRED else G.RETIRED)


def test_retiring_a_retired_agent_is_refused(enroll):
    agent, _token = enroll("ccg-1")
    registry.revoke_agent(agent.pk, "user:olivia")
    retired = Agent.objects.get(pk=agent.pk)
    with pytest.raises(InvalidTransition):
        registry._retire(retired, timezone.now(), EventLog("user:olivia"), "again")
    with pytest.raises(registry.NotFound):
        registry.revoke_agent(agent.pk, "user:olivia")


def test_every_agent_change_writes_an_event_naming_its_actor(enroll):
    agent, token = enroll("ccg-1")
    registry.set_agent_flags(agent.pk, "user:olivia", draining=True)
    registry.request_preflight(agent.pk, "user:olivia")
    assert registry.take_preflight_request(agent.pk) and not registry.take_preflight_request(agent.pk)
    registry.record_preflight(agent.pk, {"shell": {"usable": True, "detail": "", "version": None}})
    _silence(agent.pk)
    actions.sweep(force=True)
    registry.authenticate_agent(token)
    registry.revoke_agent(agent.pk, "user:olivia")
    trail = list(Event.objects.filter(agent_id=agent.pk).order_by("id").values_list("to_state", "actor"))
    assert trail == [
        (G.ONLINE, "agent:ccg-1"),
        ("draining=True", "user:olivia"),
        ("preflight_requested", "user:olivia"),
        ("preflight", "agent:ccg-1"),
        (G.OFFLINE, "system:sweeper"),
        (G.ONLINE, "agent:ccg-1"),
        (G.RETIRED, "user:olivia"),
    ]
