"""Every page carries the Content-Security-Policy, and nothing on any of them breaks it: in Chromium, no
`securitypolicyviolation` event and no "Refused to" console message, on the dashboard and the admin alike."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tests.conftest import doc
from tests.tasks_app.dashboard.test_browser import browser, submit_run  # noqa: F401  (browser: a fixture)

pytestmark = pytest.mark.django_db(transaction=True)
# Records violations from the first script on: before any of the page's own can run.
LISTEN = """
window.__violations = [];
document.addEventListener("securitypolicyviolation",
    e => window.__violations.push(e.violatedDirective + " " + e.blockedURI));
"""


def visit(page, url) -> list[str]:
    refused: list[str] = []
    page.on("console", lambda m: refused.append(m.text) if "Refused to" in m.text else None)
    answer = page.goto(url)
    assert "script-src 'self'" in answer.headers["content-security-policy"], url
    page.wait_for_load_state("networkidle")
    return refused + page.evaluate("window.__violations")


def test_no_page_breaks_the_content_security_policy(browser, live_server_proc, django_user_model):  # noqa: F811
    base = live_server_proc.url
    run = submit_run(doc({"key": "a"}, name="csp"))
    task = run.tasks.get()
    django_user_model.objects.create_superuser("ada", "ada@example.com", "pw-ada-12345")
    context = browser.new_context()
    context.add_init_script(LISTEN)
    page = context.new_page()
    violations = {"login": visit(page, f"{base}/accounts/login/")}
    page.goto(f"{base}/admin/login/?next=/admin/")
    page.fill("#id_username", "ada")
    page.fill("#id_password", "pw-ada-12345")
    page.click("input[type=submit]")
    expect(page).to_have_url(f"{base}/admin/")
    pages = {
        "overview": "/",
        "run": f"/runs/{run.pk}/",
        "task": f"/tasks/{task.pk}/",
        "agents": "/agents/",
        "hosts": "/hosts/",
        "api reference": "/docs/api/",
        "admin index": "/admin/",
        "workflows": "/admin/tasks_app/workflow/",
        "workflow form": "/admin/tasks_app/workflow/add/",
        "run changelist": "/admin/tasks_app/run/",
        "run change form": f"/admin/tasks_app/run/{run.pk}/change/",
        "user change form": f"/admin/auth/user/{django_user_model.objects.get(username='ada').pk}/change/",
    }
    for name, path in pages.items():
        violations[name] = visit(page, base + path)
    context.close()
    assert {name: v for name, v in violations.items() if v} == {}
