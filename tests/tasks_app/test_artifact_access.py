"""Who may download the artifacts a task page links: whoever may see the page (a signed-in viewer, who
already reads the task's log), never an anonymous visitor (issue 12, item 10)."""

import hashlib
import re

import pytest

from tasks_app import actions
from tasks_app.models import Task
from tests.conftest import doc

# The download view reads the database on its own executor thread: it must see committed rows.
pytestmark = pytest.mark.django_db(transaction=True)
CONTENT = b"built output\x00\xff"


@pytest.fixture
def task_with_artifact(submit, make_agent):
    run = submit(doc({"key": "a"}))
    agent = make_agent("arty", labels=[])
    got = actions.claim_ready_tasks(agent, 1)[0]
    actions.add_artifact(
        agent, got["attempt_id"], name="out.bin", content=CONTENT,
        sha256=hashlib.sha256(CONTENT).hexdigest(), content_type="application/octet-stream",
    )  # fmt: skip
    return Task.objects.get(run=run, key="a")


def linked_artifact(client, task) -> str:
    page = client.get(f"/tasks/{task.id}/").content.decode()
    links = re.findall(r'href="(/api/v1/artifacts/[0-9a-f-]+)"', page)
    assert len(links) == 1, page
    return links[0]


def test_a_viewer_downloads_the_artifact_the_task_page_links(viewer, task_with_artifact):
    response = viewer.get(linked_artifact(viewer, task_with_artifact))
    assert response.status_code == 200
    assert response.content == CONTENT
    assert response["Content-Disposition"] == 'attachment; filename="out.bin"'


def test_an_anonymous_visitor_still_may_not_download_it(viewer, client, task_with_artifact):
    response = client.get(linked_artifact(viewer, task_with_artifact))
    assert response.status_code == 401
    assert response["Content-Type"].startswith("application/json")
    assert CONTENT not in response.content
