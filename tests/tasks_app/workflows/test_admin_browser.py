"""The workflow editor in a real browser (Debian's Chromium driven by Playwright) against a real server: the DAG
picture follows the form as it is typed, without a reload, says what saving would refuse, and the deps fields
suggest the workflow's own keys. Screenshots land in test-artifacts/screenshots/."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tasks_app.models import Workflow
from tasks_app.workflows import documents
from tests.conftest import Server, doc
from tests.tasks_app.dashboard.test_browser import browser, shoot  # noqa: F401  (browser: a fixture)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def live_server_proc(transactional_db, server_tmp):
    """A server of each test's own, not the session's: a server process caches ContentType ids, which every
    transactional test's flush renumbers, so after another test's admin save the admin's change log would name a
    stale one (a django_admin_log foreign key error, a 500), depending on the order the tests ran in."""
    server = Server(server_tmp)
    yield server
    server.stop()


@pytest.fixture
def editor(browser, live_server_proc, django_user_model):  # noqa: F811
    """A signed-in superuser's page."""
    django_user_model.objects.create_superuser("ada", "ada@example.com", "pw-ada-12345")
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{live_server_proc.url}/admin/login/?next=/admin/")
    page.fill("#id_username", "ada")
    page.fill("#id_password", "pw-ada-12345")
    page.click("input[type=submit]")
    expect(page).to_have_url(f"{live_server_proc.url}/admin/")
    yield page
    context.close()


def node(page, key: str):
    return page.locator(f'#dag-preview svg.dag g.node[data-key="{key}"]')


def row_field(page, row: int, name: str):
    return page.locator(f'[name="tasks-{row}-{name}"]')


def test_the_dag_picture_follows_the_form_as_it_is_edited(editor, live_server_proc, artifacts_dir):
    page = editor
    workflow = documents.import_document(
        doc({"key": "plan"}, {"key": "build", "deps": ["plan"]}, {"key": "test", "deps": ["build"]}, name="nightly")
    )
    page.goto(f"{live_server_proc.url}/admin/tasks_app/workflow/{workflow.pk}/change/")
    expect(page.locator("#dag-preview svg.dag g.node")).to_have_count(3)
    expect(page.locator("#dag-preview .dag-summary")).to_have_text("3 tasks, 2 dependencies")
    loaded_at = page.evaluate("performance.timeOrigin")

    # Type a new row into the blank one: its node appears, linked to its dependency, as it is typed.
    row_field(page, 3, "key").fill("deploy")
    expect(node(page, "deploy")).to_have_count(1)
    row_field(page, 3, "deps_keys").fill("test")
    expect(page.locator('#dag-preview path.edge[data-from="test"][data-to="deploy"]')).to_have_count(1)
    expect(page.locator("#dag-preview .dag-summary")).to_have_text("4 tasks, 3 dependencies")

    # The deps field suggests the workflow's keys as they stand in the form: not its own, not those it lists.
    row_field(page, 0, "deps_keys").focus()
    options = page.locator("#workflow-keys option").evaluate_all("els => els.map(e => e.value)")
    assert options == ["build", "test", "deploy"]

    # A cycle is named in order above the picture, before anyone presses save.
    row_field(page, 0, "deps_keys").fill("deploy")
    expect(page.locator("#dag-preview .dag-problem")).to_have_text(
        "dependency cycle: plan -> build -> test -> deploy -> plan"
    )
    shoot(page, artifacts_dir, "admin-workflow-cycle")
    row_field(page, 0, "deps_keys").fill("")
    expect(page.locator("#dag-preview .dag-problem")).to_have_count(0)

    # Marking a row for deletion takes it out of the picture.
    row_field(page, 1, "DELETE").check()
    expect(node(page, "build")).to_have_count(0)
    row_field(page, 1, "DELETE").uncheck()
    expect(node(page, "build")).to_have_count(1)
    assert page.evaluate("performance.timeOrigin") == loaded_at  # all of it without a reload
    shoot(page, artifacts_dir, "admin-workflow-preview")

    # Saving checks each row too: the new row is a shell task (the default) without a command.
    page.click("input[name=_continue]")
    expect(page.locator(".errorlist")).to_contain_text("a shell task needs a command")
    row_field(page, 3, "executor").select_option("simulated")
    page.click("input[name=_continue]")
    expect(page.locator("ul.messagelist")).to_contain_text("was changed successfully")
    expect(node(page, "deploy")).to_have_count(1)
    saved = documents.workflow_to_document(Workflow.objects.get(name="nightly"))
    assert [(t["key"], t.get("deps", [])) for t in saved["tasks"]] == [
        ("plan", []),
        ("build", ["plan"]),
        ("test", ["build"]),
        ("deploy", ["test"]),
    ]


def test_a_new_workflow_is_drawn_from_its_first_row(editor, live_server_proc):
    page = editor
    page.goto(f"{live_server_proc.url}/admin/tasks_app/workflow/add/")
    expect(page.locator("#dag-preview")).to_contain_text("No tasks yet")
    row_field(page, 0, "key").fill("<img src=x onerror=alert(1)>")
    expect(page.locator("#dag-preview svg.dag g.node")).to_have_count(1)
    expect(page.locator("#dag-preview img")).to_have_count(0)  # the key is text, never markup
    page.click("#tasks-group .add-row a")
    row_field(page, 1, "key").fill("second")
    expect(page.locator("#dag-preview svg.dag g.node")).to_have_count(2)


def test_a_single_tasks_page_suggests_its_workflows_keys(editor, live_server_proc):
    page = editor
    workflow = documents.import_document(
        doc({"key": "plan"}, {"key": "build", "deps": ["plan"]}, {"key": "test", "deps": ["build"]}, name="nightly")
    )
    task = workflow.tasks.get(key="test")
    page.goto(f"{live_server_proc.url}/admin/tasks_app/workflowtask/{task.pk}/change/")
    deps = page.locator('[name="deps_keys"]')
    expect(deps).to_have_value("build")
    deps.fill("build, ")
    options = page.locator("#workflow-keys option").evaluate_all("els => els.map(e => e.value)")
    assert options == ["build, plan"]  # not its own key, not one it lists; after what is typed


def test_the_editor_fits_a_1440_px_screen_and_the_json_fields_are_checked_as_typed(editor, live_server_proc,
                                                                                    artifacts_dir):  # fmt: skip
    page = editor
    workflow = documents.import_document(
        doc(
            {"key": "plan", "executor": "claude", "prompt": "Plan it.", "params": {"model": "sonnet"}},
            {"key": "build", "deps": ["plan"], "executor": "shell", "command": "make build"},
            name="wide",
            params={"who": "world"},
            defaults={"max_attempts": 2},
        )  # fmt: skip
    )
    page.set_viewport_size({"width": 1440, "height": 900})
    page.goto(f"{live_server_proc.url}/admin/tasks_app/workflow/{workflow.pk}/change/")
    expect(page.locator("#dag-preview svg.dag g.node")).to_have_count(2)
    width = page.evaluate("document.scrollingElement.scrollWidth")
    shoot(page, artifacts_dir, "workflow-editor-1440")
    assert width <= 1440, f"the editor is {width} px wide at 1440"
    # JSON fields are shown indented and say at once when what is typed is not a JSON object.
    params = page.locator('[name="params"]')
    assert '"who": "world"' in params.input_value()
    params.fill('{"who": ')
    expect(page.locator("#id_params + .json-problem, .json-problem").first).to_contain_text("not valid JSON")
    params.fill('{"who": "you"}')
    expect(page.locator(".json-problem:visible")).to_have_count(0)
    # The preview's legend is a template's: no run states.
    legend = page.locator("#dag-preview .legend").inner_text() if page.locator("#dag-preview .legend").count() else ""
    assert "running" not in legend and "succeeded" not in legend
