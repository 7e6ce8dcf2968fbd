"""Runs in a real browser: Rerun opens the new run's page, and the runs page's live pushes keep its filter."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tasks_app import actions
from tasks_app.models import Run
from tests.conftest import doc
from tests.tasks_app.dashboard.test_browser import browser, login, people, submit_run  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db(transaction=True)


def test_rerun_opens_the_new_runs_page(browser, live_server_proc, people):  # noqa: F811
    run = submit_run(doc({"key": "a", "requires": ["nobody-has-this"]}, name="to-rerun"))
    actions.cancel_run(str(run.id), "test")
    page = login(browser, live_server_proc, people["operator"])
    page.goto(f"{live_server_proc.url}/runs/{run.id}/")
    expect(page.locator("#live-status")).to_have_text("live", timeout=10_000)
    expect(page.locator("[data-testid=run-bar]")).to_have_attribute("aria-valuenow", "0")  # canceled: not 100%
    page.click("[data-testid=rerun]")
    expect(page.locator("[data-testid=run-state]")).to_have_text("running", timeout=10_000)
    new = Run.objects.get(rerun_of=run)
    expect(page).to_have_url(f"{live_server_proc.url}/runs/{new.id}/")
    assert any("to-rerun" in d for d in page.dialogs)  # it asked first
    expect(page.locator(".flash")).to_contain_text("Rerun started")
    page.context.close()


def test_the_runs_page_stays_filtered_as_runs_arrive(browser, live_server_proc, people):  # noqa: F811
    submit_run(doc({"key": "a"}, name="keep-1"))
    page = login(browser, live_server_proc, people["viewer"])
    page.goto(f"{live_server_proc.url}/runs/?q=keep")
    expect(page.locator("#live-status")).to_have_text("live", timeout=10_000)
    submit_run(doc({"key": "a"}, name="drop-2"))
    submit_run(doc({"key": "a"}, name="keep-3"))
    expect(page.locator("#panel-runs")).to_contain_text("keep-3", timeout=10_000)  # pushed live
    expect(page.locator("#panel-runs")).not_to_contain_text("drop-2")  # and still filtered
    expect(page.locator("[data-testid=runs-filter] input[name=q]")).to_have_value("keep")
    page.context.close()
