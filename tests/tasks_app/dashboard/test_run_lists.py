"""Runs as a team works with them, on the dashboard (issue 14, items 2 and 5): Rerun and Retry failed on the
run page, a retry with changes on the task page, a run's task list, the runs page (filtered, searched,
paginated) and a workflow's run history, and figures that count succeeded tasks only."""

from __future__ import annotations

import time

import pytest

from tasks_app import actions
from tasks_app.dashboard import panels
from tasks_app.dashboard.dagsvg import layout, natural_key
from tasks_app.models import Event, Run, Task
from tests.conftest import doc

pytestmark = pytest.mark.django_db


def hx_post(client, url, data=None):
    client.get("/")  # sets the CSRF cookie
    token = client.cookies["csrftoken"].value
    return client.post(url, data or {}, HTTP_X_CSRFTOKEN=token, HTTP_HX_REQUEST="true")


def finish(agent, outcome: str, n: int = 1) -> list[str]:
    """Claim `n` tasks for the agent and end each with `outcome`; their task ids."""
    ids = []
    for got in actions.claim_ready_tasks(agent, n):
        actions.complete_attempt(agent, got["attempt_id"], outcome, {}, "boom" if outcome == "failed" else "", 1)
        ids.append(got["task"]["id"])
    return ids


@pytest.fixture
def failed_run(submit, make_agent):
    """Five tasks: a and b succeed, c fails, d (after c) is skipped, e fails: the run ends failed."""
    run = submit(doc({"key": "a"}, {"key": "b"}, {"key": "c", "max_attempts": 1}, {"key": "d", "deps": ["c"]},
                     {"key": "e", "max_attempts": 1}, name="nightly-7"))  # fmt: skip
    agent = make_agent("w1", labels=[], capacity=5)
    by_key = dict(Task.objects.filter(run=run).values_list("id", "key"))
    outcomes = {"a": "succeeded", "b": "succeeded", "c": "failed", "e": "failed"}
    for got in actions.claim_ready_tasks(agent, 5):
        key = by_key[got["task"]["id"]] if got["task"]["id"] in by_key else got["task"]["key"]
        actions.complete_attempt(agent, got["attempt_id"], outcomes[key], {}, "boom", 1)
    run.refresh_from_db()
    assert run.state == "failed", run.state
    return run


# --- Honest figures (item 5) ----------------------------------------------------------------------------


def test_a_failed_runs_progress_counts_only_what_succeeded(failed_run):
    summary = panels.run_summaries([failed_run.id])[0]
    assert summary["fraction"] == pytest.approx(2 / 5)  # not 1.0: failed and skipped tasks are not progress
    shares = {s["state"]: s["share"] for s in summary["segments"]}
    assert shares == {"succeeded": 40.0, "failed": 40.0, "skipped": 20.0}


def test_live_progress_counts_toward_the_fraction(submit, make_agent):
    run = submit(doc({"key": "a"}, {"key": "b"}))
    agent = make_agent("w1", labels=[])
    got = actions.claim_ready_tasks(agent, 1)[0]
    actions.record_progress(agent, got["attempt_id"], 0.5, "half", "")
    summary = panels.run_summaries([run.id])[0]
    assert summary["fraction"] == pytest.approx(0.25)
    assert [s["state"] for s in summary["segments"]] == ["progress"]


def test_a_failed_runs_bar_shows_its_states_not_a_full_bar(viewer, failed_run):
    for url in ("/", f"/runs/{failed_run.id}/"):
        page = viewer.get(url).content.decode()
        assert 'aria-valuenow="40"' in page and 'aria-valuenow="100"' not in page, url
        assert "seg-succeeded" in page and "seg-failed" in page and "seg-skipped" in page, url
        assert "40% succeeded, 2 failed, 1 skipped" in page, url
    assert "2/5 done" in viewer.get("/").content.decode()  # "done" is what succeeded


@pytest.mark.django_db(transaction=True)  # the API reads in a thread of its own: the run must be committed
def test_the_api_lists_a_failed_runs_progress_as_its_succeeded_share(client, failed_run, django_user_model):
    from django.contrib.auth.models import Permission

    from agents_app.registry import create_api_token

    user = django_user_model.objects.create_user("ada", password="pw-ada-12345")
    user.user_permissions.add(Permission.objects.get(codename="view_run"))
    token, _ = create_api_token(user)
    answer = client.get("/api/v1/runs", HTTP_AUTHORIZATION=f"Bearer {token}")
    assert answer.status_code == 200, answer.content
    (listed,) = answer.json()["runs"]
    assert (listed["state"], listed["progress"]) == ("failed", 0.4)


def test_dag_nodes_start_in_natural_key_order():
    assert sorted(["impl-10", "impl-2", "impl-1", "a"], key=natural_key) == ["a", "impl-1", "impl-2", "impl-10"]
    nodes = [{"id": k, "key": k, "state": "ready", "depth": 0} for k in ("impl-10", "impl-1", "impl-2")]
    lay = layout(nodes, [])
    assert lay.columns == [["impl-1", "impl-2", "impl-10"]]
    assert sorted(lay.pos, key=lambda n: lay.pos[n][1]) == ["impl-1", "impl-2", "impl-10"]  # top to bottom


# --- Rerun and Retry failed on the run page, a retry with changes on the task page (item 1) ---------------


def test_the_run_page_offers_rerun_and_retry_failed_with_the_count(operator_client, viewer, failed_run):
    page = operator_client.get(f"/runs/{failed_run.id}/").content.decode()
    assert "Retry failed (2)" in page and 'data-testid="rerun"' in page
    watching = viewer.get(f"/runs/{failed_run.id}/").content.decode()
    assert "Retry failed" not in watching and 'data-testid="rerun"' not in watching


def test_retry_failed_is_not_offered_when_nothing_failed(operator_client, submit):
    run = submit(doc({"key": "a"}))
    page = operator_client.get(f"/runs/{run.id}/").content.decode()
    assert "Retry failed" not in page and 'data-testid="rerun"' in page


def test_rerun_opens_the_new_runs_page(operator_client, failed_run):
    answer = hx_post(operator_client, f"/runs/{failed_run.id}/rerun/")
    new = Run.objects.get(rerun_of=failed_run)
    assert answer.status_code == 204 and answer["HX-Redirect"] == f"/runs/{new.id}/"
    page = operator_client.get(f"/runs/{new.id}/").content.decode()
    assert "Rerun started" in page and f'href="/runs/{failed_run.id}/"' in page  # the link back
    token = operator_client.cookies["csrftoken"].value
    plain = operator_client.post(f"/runs/{failed_run.id}/rerun/", HTTP_X_CSRFTOKEN=token)
    assert plain.status_code == 302 and plain["Location"].startswith("/runs/")
    assert Run.objects.filter(rerun_of=failed_run).count() == 2


def test_a_viewer_may_not_rerun_or_retry(viewer, failed_run):
    assert hx_post(viewer, f"/runs/{failed_run.id}/rerun/").status_code == 403
    assert hx_post(viewer, f"/runs/{failed_run.id}/retry-failed/").status_code == 403
    assert not Run.objects.filter(rerun_of=failed_run).exists()


def test_retry_failed_requeues_every_failed_task(operator_client, failed_run):
    answer = hx_post(operator_client, f"/runs/{failed_run.id}/retry-failed/")
    assert answer.status_code == 200 and "2 tasks queued again" in answer.content.decode()
    states = dict(Task.objects.filter(run=failed_run).values_list("key", "state"))
    assert states == {"a": "succeeded", "b": "succeeded", "c": "ready", "d": "blocked", "e": "ready"}
    assert "Nothing had failed" in hx_post(operator_client, f"/runs/{failed_run.id}/retry-failed/").content.decode()


def test_a_failed_tasks_page_offers_a_retry_with_changes(operator_client, submit, make_agent):
    run = submit(doc({"key": "s", "executor": "shell", "command": "exit 1", "max_attempts": 1}))
    finish(make_agent("w1", labels=[], executors=("shell",)), "failed")
    task = Task.objects.get(run=run)
    page = operator_client.get(f"/tasks/{task.id}/").content.decode()
    assert 'name="command"' in page and "exit 1" in page and 'name="params"' in page and 'name="prompt"' not in page
    answer = hx_post(operator_client, f"/tasks/{task.id}/retry/", {"command": "echo fixed", "params": '{"n": 2}'})
    assert answer.status_code == 200 and "with your changes" in answer.content.decode()
    task.refresh_from_db()
    assert (task.state, task.command, task.params) == ("ready", "echo fixed", {"n": 2})
    edited = Event.objects.filter(task=task, to_state="ready").latest("id").detail["edited"]
    assert edited["command"] == {"from": "exit 1", "to": "echo fixed"}


def test_a_retry_with_bad_params_is_refused_naming_the_field(operator_client, submit, make_agent):
    run = submit(doc({"key": "s", "executor": "shell", "command": "exit 1", "max_attempts": 1}))
    finish(make_agent("w1", labels=[], executors=("shell",)), "failed")
    task = Task.objects.get(run=run)
    for bad in ('{"n": ', "[1, 2]"):
        answer = hx_post(operator_client, f"/tasks/{task.id}/retry/", {"params": bad})
        assert answer.status_code == 422 and "params" in answer.content.decode(), bad
    answer = hx_post(operator_client, f"/tasks/{task.id}/retry/", {"command": ""})
    assert answer.status_code == 422 and "command" in answer.content.decode()
    task.refresh_from_db()
    assert (task.state, task.command) == ("failed", "exit 1")  # nothing retried, nothing changed


# --- A run's task list (item 2) --------------------------------------------------------------------------


def test_the_task_list_filters_by_state_searches_by_key_and_sorts_naturally(viewer, submit, make_agent):
    keys = ["impl-10", "impl-2", "impl-1", "docs"]
    run = submit(doc(*({"key": k, "max_attempts": 1} for k in keys)))
    agent = make_agent("w7", labels=[], capacity=4)
    for got in actions.claim_ready_tasks(agent, 4):
        key = Task.objects.get(pk=got["task"]["id"]).key
        outcome = "failed" if key in ("impl-10", "docs") else "succeeded"
        actions.complete_attempt(agent, got["attempt_id"], outcome, {}, "", 1)
    page = viewer.get(f"/runs/{run.id}/tasks/").content.decode()
    shown = [k for k in ("docs", "impl-1<", "impl-2<", "impl-10<")]
    assert [page.index(k) for k in shown] == sorted(page.index(k) for k in shown)  # impl-2 before impl-10
    assert "w7" in page and "1 of 1" in page
    failed = viewer.get(f"/runs/{run.id}/tasks/?state=failed").content.decode()
    assert "impl-10<" in failed and "docs<" in failed and "impl-2<" not in failed
    searched = viewer.get(f"/runs/{run.id}/tasks/?q=IMPL-1").content.decode()
    assert "impl-1<" in searched and "impl-10<" in searched and "impl-2<" not in searched
    assert "No task matches" in viewer.get(f"/runs/{run.id}/tasks/?q=zzz").content.decode()
    assert viewer.get("/runs/00000000-0000-0000-0000-000000000000/tasks/").status_code == 404


def test_the_run_page_links_to_its_task_list(viewer, submit):
    run = submit(doc({"key": "a"}))
    assert f'href="/runs/{run.id}/tasks/"' in viewer.get(f"/runs/{run.id}/").content.decode()


def test_the_task_list_reads_as_many_queries_at_1000_tasks_as_at_10(viewer, submit, make_agent):
    from tests.tasks_app.dashboard.test_views import _queries, big_run

    small, large = big_run(submit, 10), big_run(submit, 1000)
    for i in range(4):
        finish(make_agent(f"a{i}", labels=[]), "succeeded")
    counts = {}
    for run in (small, large):
        counts[run.id] = _queries(lambda run=run: viewer.get(f"/runs/{run.id}/tasks/"))
    assert counts[small.id] == counts[large.id] <= 12, counts
    started = time.monotonic()
    assert viewer.get(f"/runs/{large.id}/tasks/").status_code == 200
    assert time.monotonic() - started < 2.0


# --- The runs page and a workflow's run history (items 3 and 4) -------------------------------------------


def test_the_runs_page_filters_searches_and_pages_past_50(viewer, submit, failed_run):
    for i in range(55):
        submit(doc({"key": "a"}, name=f"batch-{i:02d}"))
    first = viewer.get("/runs/").content.decode()
    assert "batch-54" in first and "batch-05" in first and "batch-04" not in first  # the newest 50
    assert 'rel="next"' in first and 'rel="prev"' not in first
    second = viewer.get("/runs/?page=2").content.decode()
    assert "batch-04" in second and "batch-00" in second and "nightly-7" in second and "batch-54" not in second
    assert 'rel="prev"' in second and 'rel="next"' not in second
    failed = viewer.get("/runs/?state=failed").content.decode()
    assert "nightly-7" in failed and "batch-" not in failed
    searched = viewer.get("/runs/?q=BATCH-1").content.decode()
    assert "batch-10" in searched and "batch-19" in searched and "batch-20" not in searched
    assert "No run matches" in viewer.get("/runs/?q=nothing-like-it").content.decode()
    assert viewer.get("/runs/?state=bogus&page=x").status_code == 200  # unknown values: no filter, page 1
    assert 'href="/runs/"' in viewer.get("/").content.decode()  # the overview links to it


def test_a_workflows_run_history_lists_its_runs_only(viewer, submit):
    from tasks_app.workflows import documents

    workflow = documents.import_document(doc({"key": "a"}, name="nightly build"), actor="test")
    mine = documents.start_run(workflow, actor="test")
    other = submit(doc({"key": "a"}, name="adhoc"))
    page = viewer.get("/workflows/nightly build/runs/").content.decode()
    assert f"/runs/{mine.id}/" in page and f"/runs/{other.id}/" not in page
    assert "Runs of workflow nightly build" in page
    run_page = viewer.get(f"/runs/{mine.id}/").content.decode()
    assert 'href="/workflows/nightly%20build/runs/"' in run_page
    assert "/workflows/" not in viewer.get(f"/runs/{other.id}/").content.decode()
    assert viewer.get("/workflows/nope/runs/").status_code == 404
    slashed = documents.import_document(doc({"key": "a"}, name="team/nightly"), actor="test")
    theirs = documents.start_run(slashed, actor="test")
    assert 'href="/workflows/team%2Fnightly/runs/"' in viewer.get(f"/runs/{theirs.id}/").content.decode()
    assert f"/runs/{theirs.id}/" in viewer.get("/workflows/team%2Fnightly/runs/").content.decode()


def test_the_runs_pages_live_push_keeps_its_filters_and_page(viewer, submit, django_user_model):
    from django.http import QueryDict

    from tasks_app.dashboard.pages import render_panels

    for i in range(55):
        submit(doc({"key": "a"}, name=f"batch-{i:02d}"))
    submit(doc({"key": "a"}, name="other"))
    page = viewer.get("/runs/?q=batch&page=2").content.decode()
    assert 'ws-connect="/ws/runs/?q=batch&amp;page=2"' in page  # the socket is told which page this is
    user = django_user_model.objects.get(username="vera")
    pushed = render_panels("runs", None, user, query=QueryDict("q=batch&page=2"))["panel-runs"]
    assert "batch-04" in pushed and "batch-54" not in pushed and "other" not in pushed
    assert 'hx-swap-oob="true"' in pushed
    history = viewer.get("/workflows/nope/runs/")
    assert history.status_code == 404


def test_the_admins_workflow_page_links_to_its_runs(client, django_user_model):
    from tasks_app.workflows import documents

    workflow = documents.import_document(doc({"key": "a"}, name="nightly build"), actor="test")
    client.force_login(django_user_model.objects.create_superuser("root", password="pw-root-12345"))
    page = client.get(f"/admin/tasks_app/workflow/{workflow.pk}/change/").content.decode()
    assert 'href="/workflows/nightly%20build/runs/"' in page


def test_the_task_lists_live_push_keeps_its_filter(viewer, submit, make_agent, django_user_model):
    from django.http import QueryDict

    from tasks_app.dashboard.pages import render_panels

    run = submit(doc({"key": "impl-1", "max_attempts": 1}, {"key": "impl-10"}, {"key": "impl-2", "deps": ["impl-1"]},
                     {"key": "docs"}))  # fmt: skip
    page = viewer.get(f"/runs/{run.id}/tasks/?state=ready&q=impl").content.decode()
    assert f'ws-connect="/ws/run-tasks/{run.id}/?state=ready&amp;q=impl"' in page
    user = django_user_model.objects.get(username="vera")
    pushed = render_panels("run-tasks", str(run.id), user, query=QueryDict("state=ready&q=impl"))["panel-run-tasks"]
    assert ">impl-1<" in pushed and ">impl-10<" in pushed and ">impl-2<" not in pushed and ">docs<" not in pushed
    impl_1 = Task.objects.get(run=run, key="impl-1")
    Task.objects.filter(run=run).exclude(pk=impl_1.pk).update(priority=-1)  # impl-1 is claimed first
    finish(make_agent("w1", labels=[]), "failed")
    assert Task.objects.get(pk=impl_1.pk).state == "failed"
    pushed = render_panels("run-tasks", str(run.id), user, query=QueryDict("state=ready&q=impl"))["panel-run-tasks"]
    assert ">impl-1<" not in pushed and ">impl-10<" in pushed


def test_a_simulated_tasks_retry_form_offers_params_only(operator_client, submit, make_agent):
    run = submit(doc({"key": "sim", "max_attempts": 1}))
    finish(make_agent("w1", labels=[]), "failed")
    page = operator_client.get(f"/tasks/{Task.objects.get(run=run).id}/").content.decode()
    assert 'name="params"' in page and 'name="command"' not in page and "None" not in page
