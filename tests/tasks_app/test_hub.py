"""The hub's wake-ups (tasks_app.hub): one matching parked agent per ready task, never one that would take
nothing, and the check that wakes a parked agent a wake-up missed."""

import asyncio

import pytest

from control_plane.http_api import db_call
from tasks_app import actions
from tasks_app.hub import EventHub
from tests.conftest import doc


def hub() -> EventHub:
    return EventHub(asyncio.get_running_loop())  # no LISTEN, no sweeper: the tests drive it


@pytest.mark.asyncio
async def test_a_ready_task_wakes_one_matching_waiter_oldest_first():
    h = hub()
    gpu = h.register(["gpu"], ["shell"])
    first = h.register([], ["shell"])
    second = h.register([], ["shell"])
    h.dispatch({"ready": [["shell", [], 0]]})
    assert gpu.event.is_set()  # its labels cover an empty `requires`: it is the oldest match
    assert not first.event.is_set() and not second.event.is_set()
    h.dispatch({"ready": [["shell", ["gpu"], 0]]})
    assert not first.event.is_set(), "an agent without the label is not woken"


@pytest.mark.asyncio
async def test_a_wake_up_given_to_a_long_poll_whose_agent_hung_up_goes_on_to_the_next_waiter():
    h = hub()
    dead = h.register([], ["shell"])  # a SIGKILLed agent's long poll, not yet cancelled when woken
    alive = h.register([], ["shell"])
    h.dispatch({"ready": [["shell", [], 0]]})
    assert dead.event.is_set() and not alive.event.is_set()
    h.unregister(dead)
    h.pass_on(dead.woken_for)
    assert alive.event.is_set()
    h.unregister(alive)
    third = h.register([], ["shell"])
    h.pass_on(None)  # a poll that was never woken for a task passes nothing on
    assert not third.event.is_set()


@pytest.mark.asyncio
async def test_a_draining_agents_waiter_does_not_spend_a_tasks_wake_up():
    h = hub()
    draining = h.register([], ["shell"], active=False)
    idle = h.register([], ["shell"])
    h.dispatch({"ready": [["shell", [], 0]]})
    assert idle.event.is_set() and not draining.event.is_set()
    h.dispatch({"wake_all": True})
    assert draining.event.is_set()  # everyone looks again (e.g. after a lost LISTEN connection)


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_parked_agent_beside_an_offerable_task_is_woken_and_counted(make_agent, submit):
    await db_call(make_agent)("idle", labels=[])
    await db_call(submit)(doc({"key": "a"}))
    h = hub()
    missed = h.register([], ["simulated"])  # parked, and nobody told it about "a"
    unable = h.register(["gpu"], ["shell"])
    # Seen once, "a" may be a task whose transaction has just committed (its notification on its way)...
    assert await h.wake_missed(min_age_s=0) == 0 and not missed.event.is_set()
    # ... seen by the next check too, it was missed.
    assert await h.wake_missed(min_age_s=0) == 1
    assert missed.event.is_set() and not unable.event.is_set()
    assert h.missed_wakeups == 1
    # Nothing is parked any more: the check costs no query and wakes nobody.
    h.unregister(missed)
    assert await h.wake_missed(min_age_s=0) == 0


@pytest.mark.asyncio
@pytest.mark.django_db(transaction=True)
async def test_a_task_held_by_its_runs_limit_wakes_nobody(make_agent, submit):
    agent = await db_call(make_agent)("busy", labels=[], capacity=2)
    await db_call(submit)(doc({"key": "a"}, {"key": "b"}, max_parallel=1))
    await db_call(actions.claim_ready_tasks)(agent, 2)
    h = hub()
    parked = h.register([], ["simulated"])
    assert await h.wake_missed(min_age_s=0) == 0
    assert await h.wake_missed(min_age_s=0) == 0  # not at the second look either
    assert not parked.event.is_set()
