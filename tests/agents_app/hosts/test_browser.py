"""The hosts page in a real browser (Chromium via Playwright) against a real server, a real sshd and a real
django-q2 cluster: an operator confirms a fingerprint, deploys, is refused a second operation while the
first runs, and watches the operation finish without reloading (pushed over the page's websocket); the
agents page marks the agents."""

from __future__ import annotations

import re

import pytest
from playwright.sync_api import expect

from tests.agents_app.conftest import daemon_pids
from tests.tasks_app.dashboard import test_browser as dashboard

# The dashboard's browser tests' Chromium, people and helpers.
browser, people = dashboard.browser, dashboard.people
login, shoot = dashboard.login, dashboard.shoot

pytestmark = pytest.mark.django_db(transaction=True)


def test_an_operator_confirms_deploys_and_watches_it_finish(
    browser, live_server_proc, people, make_host, qcluster, sshd, artifacts_dir
):
    host = make_host("web", host_key="", offered_host_key=sshd.host_key_pub, server_url=live_server_proc.url,
                     agent_count=1)  # fmt: skip
    page = login(browser, live_server_proc, people["operator"])
    page.goto(f"{live_server_proc.url}/hosts/")
    row = page.locator("tr[data-host=web]")
    expect(row).to_contain_text("not confirmed")
    shoot(page, artifacts_dir, "hosts-unconfirmed")

    row.locator("button.confirm").click()
    expect(page.locator("#flash")).to_contain_text(f"web: host key {host.offered_fingerprint} pinned")
    assert page.dialogs and host.offered_fingerprint in page.dialogs[-1]  # the operator was shown it first

    row.locator("input[type=checkbox]").check()
    page.click("button[value=deploy]")
    expect(page.locator("#flash")).to_contain_text("Deploy queued for web")
    page.click("button[value=uninstall]")  # while the deploy is queued or running: refused, with a reason
    expect(page.locator("#flash")).to_contain_text(re.compile(r"web has a deploy (queued|running): wait for it"))

    operations = page.locator("#panel-host-operations")
    deploy_row = operations.locator("tbody tr", has_text="deploy")
    expect(deploy_row.locator(".badge")).to_have_text("succeeded", timeout=90_000)  # no reload
    expect(row.locator(".badge")).to_have_text("succeeded")  # the host's last operation too
    expect(row.locator("input[type=checkbox]")).to_be_checked()  # and the selection stays
    # Pushed over the page's websocket by the q cluster's NOTIFYs, not polled: the panel asks by itself
    # only while an operation waits in the queue.
    expect(operations).not_to_have_attribute("hx-trigger", re.compile(".+"))
    expect(page.locator("#live-status")).to_have_text("live")
    shoot(page, artifacts_dir, "hosts-deployed")

    page.goto(f"{live_server_proc.url}/agents/")
    expect(page.locator("tr[data-agent=web-1]")).to_contain_text("provisioned · web")

    page.goto(f"{live_server_proc.url}/hosts/")
    page.locator("tr[data-host=web] input[type=checkbox]").check()
    page.click("button[value=stop]")
    stop_row = page.locator("#panel-host-operations tbody tr", has_text="stop")
    expect(stop_row.locator(".badge")).to_have_text("succeeded", timeout=90_000)
    assert daemon_pids(host) == {}


def test_a_viewer_sees_hosts_but_no_buttons(browser, live_server_proc, people, make_host):
    make_host("watched")
    page = login(browser, live_server_proc, people["viewer"])
    page.goto(f"{live_server_proc.url}/hosts/")
    expect(page.locator("tr[data-host=watched]")).to_contain_text("SHA256:")
    expect(page.locator("button[value=deploy]")).to_have_count(0)
    expect(page.locator("input[name=host]")).to_have_count(0)
