"""The task page's log in a real browser: a tab per attempt, each opening at its end (the error is at the
bottom), the streaming one following its tail unless the reader scrolled up, the chosen tab kept across
live pushes."""

from __future__ import annotations

import contextlib
import threading

import pytest
from django.db import connection
from django.utils import timezone
from playwright.sync_api import expect

from agents_app.models import Agent
from tasks_app import actions
from tasks_app.models import Task
from tests.conftest import doc
from tests.tasks_app.dashboard.test_browser import browser, login, people, submit_run  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db(transaction=True)
AT_END = "el => el.scrollTop + el.clientHeight >= el.scrollHeight - 8"


@contextlib.contextmanager
def beating(agent, live: list):
    """The agent's heartbeats (listing the attempt ids in `live`) while the test goes on: the test server calls an
    agent silent for 3 s offline and loses its attempts."""
    stop = threading.Event()

    def beat():
        try:
            while True:
                # What an agent's call does: contact recorded (the sweeper reads last_seen_at), leases extended.
                Agent.objects.filter(pk=agent["id"]).update(last_seen_at=timezone.now())
                actions.heartbeat(agent, "busy", list(live))
                if stop.wait(0.5):
                    return
        finally:
            connection.close()

    Agent.objects.filter(pk=agent["id"]).update(last_seen_at=timezone.now())  # before the first claim
    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def lines(what: str, n: int = 300) -> str:
    return "".join(f"{what} line {i}\n" for i in range(n))


def test_attempt_tabs_open_at_the_end_and_the_live_log_follows(browser, live_server_proc, people, make_agent):  # noqa: F811
    agent = make_agent("sh-1", labels=["logs"])
    run = submit_run(doc({"key": "flaky", "requires": ["logs"], "max_attempts": 3, "retry_delay_s": 0}))
    live: list = []
    with beating(agent, live):
        (first,) = actions.claim_ready_tasks(agent, 1)
        live[:] = [first["attempt_id"]]
        actions.record_progress(agent, first["attempt_id"], 0.5, "working", lines("first") + "ERROR: first failure\n")
        actions.complete_attempt(agent, first["attempt_id"], "failed", {}, "first failure", 1)
        (second,) = actions.claim_ready_tasks(agent, 1)
        live[:] = [second["attempt_id"]]
        actions.record_progress(agent, second["attempt_id"], 0.2, "working", lines("second"))
        page = login(browser, live_server_proc, people["viewer"])
        page.goto(f"{live_server_proc.url}/tasks/{Task.objects.get(run=run).id}/")
        expect(page.locator("#live-status")).to_have_text("live", timeout=10_000)
        latest, earlier = page.locator("#log-2"), page.locator("#log-1")
        expect(latest).to_be_visible()
        expect(earlier).to_be_hidden()
        assert latest.evaluate(AT_END)  # opens at its end

        # The earlier attempt's tab: its log, at its end, where the error is.
        page.click("[data-log-tab='1']")
        expect(earlier).to_be_visible()
        expect(latest).to_be_hidden()
        assert earlier.evaluate(AT_END)
        expect(page.locator("[data-log-tab='1']")).to_have_attribute("aria-selected", "true")
        # A live push keeps the chosen tab.
        actions.record_progress(agent, second["attempt_id"], 0.3, "working", "pushed while away\n")
        expect(page.locator("#log-2")).to_contain_text("pushed while away", timeout=10_000)
        expect(page.locator("#log-1")).to_be_visible()

        # Back on the streaming attempt: it follows its tail as it grows...
        page.click("[data-log-tab='2']")
        actions.record_progress(agent, second["attempt_id"], 0.4, "working", lines("more", 50) + "the newest line\n")
        expect(page.locator("#log-2")).to_contain_text("the newest line", timeout=10_000)
        assert page.locator("#log-2").evaluate(AT_END)
        # ...unless the reader scrolled up: then it stays where they are.
        page.locator("#log-2").evaluate("el => { el.scrollTop = 100; }")
        actions.record_progress(agent, second["attempt_id"], 0.5, "working", "while reading\n")
        expect(page.locator("#log-2")).to_contain_text("while reading", timeout=10_000)
        assert page.locator("#log-2").evaluate("el => el.scrollTop") == 100
    assert page.dialogs == []
