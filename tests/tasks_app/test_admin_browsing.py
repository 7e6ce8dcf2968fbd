"""Runs, tasks, attempts, events and artifacts in the admin: browsable with their list columns, filters and
search, never edited (state changes go through tasks_app.actions), and each list page costs the same few
queries however many rows it shows."""

from __future__ import annotations

import hashlib

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from tasks_app import actions
from tasks_app.models import Artifact, Attempt, Event, Run, Task
from tests.conftest import doc

pytestmark = pytest.mark.django_db
MODELS = ("run", "task", "attempt", "event", "artifact")


@pytest.fixture
def ada(client, django_user_model):
    user = django_user_model.objects.create_superuser("ada", "ada@example.com", "pw-ada-12345")
    client.force_login(user)
    return user


@pytest.fixture
def busy(make_agent, submit):
    """`busy(n)`: n runs of a 3-task chain; in each, an agent has done the first task (with an artifact) and
    holds the second."""

    def make(n: int, name: str = "nightly"):
        runs = []
        for i in range(n):
            agent = make_agent(name=f"ccg-{name}-{i}", capacity=1)
            run = submit(doc({"key": "plan"}, {"key": "build", "deps": ["plan"]}, {"key": "ship", "deps": ["build"]},
                             name=f"{name}-{i}"))  # fmt: skip
            [first] = actions.claim_ready_tasks(agent, 1)
            actions.add_artifact(
                agent, first["attempt_id"], name="out/plan.md", content=b"# plan", content_type="text/markdown",
                sha256=hashlib.sha256(b"# plan").hexdigest(),
            )  # fmt: skip
            actions.complete_attempt(agent, first["attempt_id"], "succeeded", {"ok": True}, "", 0)
            actions.claim_ready_tasks(agent, 1)
            runs.append(run)
        return runs

    return make


def changelist(model: str) -> str:
    return reverse(f"admin:tasks_app_{model}_changelist")


@pytest.mark.parametrize(
    ("model", "query", "shows", "hides"),
    [
        ("run", "", ["nightly-0", "nightly-1", "running"], []),
        ("run", "?q=nightly-1", ["nightly-1"], ["nightly-0"]),
        ("run", "?state__exact=succeeded", [], ["nightly-0"]),
        ("task", "?q=build", [">build</a></th>"], [">plan</a></th>", ">ship</a></th>"]),
        ("task", "?state__exact=succeeded", [">plan</a></th>"], [">build</a></th>"]),
        ("task", "?executor__exact=simulated&state__exact=blocked", [">ship</a></th>"], [">plan</a></th>"]),
        ("attempt", "?state__exact=succeeded", ["plan"], [">build<"]),
        ("attempt", "?q=ccg-nightly", ["plan", "build"], []),
        ("event", "?kind=run", ['"field-to_state">running<'], ['"field-kind">attempt<']),
        ("event", "?q=ccg-nightly", ["ccg-nightly"], []),
        ("artifact", "?q=plan.md", ["out/plan.md", "download"], []),
    ],
)
def test_list_pages_show_filter_and_search(client, ada, busy, model, query, shows, hides):
    busy(2)
    response = client.get(changelist(model) + query)
    assert response.status_code == 200
    page = response.content.decode()
    for text in shows:
        assert text in page, text
    for text in hides:
        assert text not in page, text


@pytest.mark.parametrize("model", MODELS)
def test_any_search_answers_a_page_not_a_500(client, ada, busy, model):
    busy(1)
    for search in ("not-a-uuid", "%", "\x00", "' OR 1=1 --", "x" * 5000):
        assert client.get(changelist(model), {"q": search}).status_code == 200, search


@pytest.mark.parametrize("model", MODELS)
def test_each_list_page_takes_the_same_queries_however_many_rows(
    client, ada, busy, model, django_assert_max_num_queries
):
    busy(1, "few")
    with django_assert_max_num_queries(8) as few:
        assert client.get(changelist(model)).status_code == 200
    busy(25, "many")
    with django_assert_max_num_queries(len(few.captured_queries)) as many:
        assert client.get(changelist(model)).status_code == 200
    assert len(many.captured_queries) == len(few.captured_queries)


def test_runs_and_their_parts_are_read_only(client, ada, busy):
    [run] = busy(1)
    task = run.tasks.get(key="build")
    attempt = Attempt.objects.get(task=task)
    event = Event.objects.filter(run=run).first()
    artifact = Artifact.objects.get()
    for model, obj in (("run", run), ("task", task), ("attempt", attempt), ("event", event), ("artifact", artifact)):
        change = reverse(f"admin:tasks_app_{model}_change", args=[obj.pk])
        page = client.get(change)
        assert page.status_code == 200, model  # a view page...
        assert b'type="submit"' not in page.content.split(b'id="content-main"')[1], model  # ...with no save
        assert client.post(change, {"state": "succeeded"}).status_code == 403, model
        assert client.get(reverse(f"admin:tasks_app_{model}_add")).status_code == 403, model
        assert client.post(reverse(f"admin:tasks_app_{model}_delete", args=[obj.pk])).status_code == 403, model
        actions_ = client.get(changelist(model)).context["action_form"]
        assert actions_ is None or "delete_selected" not in dict(actions_.fields["action"].choices), model
    run.refresh_from_db()
    task.refresh_from_db()
    assert (run.state, task.state) == ("running", "assigned")
    assert Artifact.objects.count() == 1


def test_a_run_page_shows_its_document_and_links_to_the_dashboard(client, ada, busy):
    [run] = busy(1)
    page = client.get(reverse("admin:tasks_app_run_change", args=[run.pk])).content.decode()
    assert "&quot;key&quot;: &quot;plan&quot;" in page
    changelist_page = client.get(changelist("run")).content.decode()
    assert f'href="/runs/{run.pk}/"' in changelist_page


def test_staff_see_only_what_their_permissions_allow(client, django_user_model, busy):
    busy(1)
    viewer = django_user_model.objects.create_user("vic", password="pw-vic-12345", is_staff=True)
    viewer.user_permissions.add(Permission.objects.get(codename="view_run"))
    client.force_login(viewer)
    assert client.get(changelist("run")).status_code == 200
    assert client.get(changelist("attempt")).status_code == 403
    client.force_login(django_user_model.objects.create_user("nora", password="pw-nora-12345"))
    assert client.get(changelist("run")).status_code == 302


def test_the_run_list_counts_tasks_in_the_same_query(client, ada, busy):
    busy(3)
    response = client.get(changelist("run"))
    rows = response.context["cl"].result_list
    assert [r.n_tasks for r in rows] == [3, 3, 3]
    assert Run.objects.count() == 3 and Task.objects.count() == 9
