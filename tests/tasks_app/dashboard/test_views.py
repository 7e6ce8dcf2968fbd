"""The dashboard's pages and actions through Django's test client: login, permissions, CSRF, escaping,
and query counts that do not grow with the size of a run."""

import json
import re

import pytest

from tasks_app import actions
from tasks_app.models import Event, Task
from tests.conftest import doc

pytestmark = pytest.mark.django_db
XSS = "<script>alert(1)</script>"


def csrf_post(client, url):
    client.get("/")  # sets the CSRF cookie
    token = client.cookies["csrftoken"].value
    return client.post(url, HTTP_X_CSRFTOKEN=token, HTTP_HX_REQUEST="true")


def big_run(submit, n):
    tasks = [{"key": f"t{i}", "deps": [f"t{i - 1}"] if i % 10 else []} for i in range(n)]
    return submit(doc(*tasks, name=f"run-{n}"))


@pytest.mark.parametrize("url", ["/", "/agents/", "/runs/00000000-0000-0000-0000-000000000000/"])
def test_every_page_needs_login(client, url):
    response = client.get(url)
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/")


def test_login_page_renders(client):
    assert client.get("/accounts/login/").status_code == 200


def test_pages_render_for_a_viewer(viewer, submit, make_agent):
    run = submit(doc({"key": "a"}, {"key": "b", "deps": ["a"]}))
    agent = make_agent("ccg-1", labels=[])
    got = actions.claim_ready_tasks(agent, 1)[0]
    actions.record_progress(agent, got["attempt_id"], 0.4, "halfway there", "line one\n")
    task = Task.objects.get(run=run, key="a")
    for url in ("/", "/agents/", f"/runs/{run.id}/", f"/tasks/{task.id}/"):
        response = viewer.get(url)
        assert response.status_code == 200, url
    page = viewer.get(f"/runs/{run.id}/").content.decode()
    assert "halfway there" in page and "ccg-1" in page and '<canvas class="dag-canvas"' in page
    picture = dag_data(page)
    assert picture["keys"] == ["a", "b"] and picture["e"] == [0, 1]  # the graph as data: b depends on a
    states = [picture["states"][i] for i in picture["s"]]
    assert states == ["running", "blocked"] and picture["p"] == {"0": 0.4}
    task_page = viewer.get(f"/tasks/{task.id}/").content.decode()
    assert "line one" in task_page


def dag_data(page: str) -> dict:
    """The DAG picture's data island on a run page."""
    island = re.search(r'<script id="dag-data" type="application/json">(.*?)</script>', page, re.S)
    assert island, "the run page carries its DAG as data"
    return json.loads(island[1])


def test_a_node_links_to_its_task_page_by_key(viewer, submit):
    run = submit(doc({"key": "a"}, {"key": "b", "deps": ["a"]}))
    href = dag_data(viewer.get(f"/runs/{run.id}/").content.decode())["href"]
    response = viewer.get(href.replace("{key}", "b"))
    assert response.status_code == 302 and response["Location"] == f"/tasks/{Task.objects.get(run=run, key='b').id}/"
    assert viewer.get(href.replace("{key}", "nope")).status_code == 404


def test_unknown_run_or_task_is_404(viewer):
    assert viewer.get("/runs/00000000-0000-0000-0000-000000000000/").status_code == 404
    assert viewer.get("/tasks/00000000-0000-0000-0000-000000000000/").status_code == 404


def test_everything_agents_send_is_escaped(viewer, submit, make_agent):
    run = submit(doc({"key": "x", "title": XSS}))
    agent = make_agent("evil", labels=[])
    got = actions.claim_ready_tasks(agent, 1)[0]
    actions.record_progress(agent, got["attempt_id"], 0.1, XSS, XSS)
    actions.complete_attempt(agent, got["attempt_id"], "failed", {"out": XSS}, XSS, 1)
    task = Task.objects.get(run=run)
    for url in ("/", f"/runs/{run.id}/", f"/tasks/{task.id}/", "/agents/"):
        body = viewer.get(url).content.decode()
        assert XSS not in body, url
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in viewer.get(f"/tasks/{task.id}/").content.decode()


def _queries(fn) -> int:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as ctx:
        fn()
    return len(ctx.captured_queries)


def test_run_page_and_its_live_pushes_read_as_many_queries_at_1000_tasks_as_at_10(
    viewer, submit, make_agent, django_user_model
):
    from tasks_app.dashboard.pages import render_panels

    # The large run first: the claims below take its roots (the older run's go first), so both runs keep
    # ready tasks in their queues.
    large, small = big_run(submit, 1000), big_run(submit, 10)
    for i in range(6):  # live and finished attempts, so every panel has rows to show
        agent = make_agent(f"a{i}", labels=[])
        got = actions.claim_ready_tasks(agent, 1)[0]
        if i % 2:
            actions.complete_attempt(agent, got["attempt_id"], "succeeded", {}, "", 0)
    user = django_user_model.objects.get(username="vera")
    user.has_perm("tasks_app.operate_run")  # permissions are read once per connection, then cached
    counts = {}
    for run in (small, large):
        rid, shown = str(run.id), {}

        def connect(rid=rid, shown=shown):
            render_panels("run", rid, user, shown_states=shown)

        def states_push(rid=rid, shown=shown):
            render_panels("run", rid, user, only={"dag-states"}, shown_states=shown)

        def page(rid=rid):
            assert viewer.get(f"/runs/{rid}/").status_code == 200

        counts[run.id] = (_queries(page), _queries(connect), _queries(states_push))
    assert counts[small.id] == counts[large.id], counts
    on_load, on_connect, states_only = counts[large.id]
    assert on_load <= 25 and on_connect <= 20 and states_only <= 6, counts


def test_a_live_push_carries_only_the_states_that_changed(submit, make_agent, django_user_model):
    from tasks_app.dashboard.pages import render_panels

    run = big_run(submit, 30)
    user = django_user_model.objects.create_user("walt", password="pw-walt-12345")
    shown: dict = {}
    first = render_panels("run", str(run.id), user, shown_states=shown)["dag-states"]
    assert len(shown) == 30 and first.count('"blocked"') + first.count('"ready"') == 30
    assert "dag-states" not in render_panels("run", str(run.id), user, shown_states=shown)  # nothing changed
    agent = make_agent("solo", labels=[])
    got = actions.claim_ready_tasks(agent, 1)[0]
    changed = render_panels("run", str(run.id), user, shown_states=shown)["dag-states"]
    assert f'"{got["task"]["key"]}": ["assigned", 0.0]' in changed
    assert changed.count('"blocked"') + changed.count('"ready"') == 0  # the 29 others are not sent again


def test_a_10000_task_run_page_is_under_500_kb_and_reads_as_many_queries_as_a_10_task_one(viewer, submit, make_agent):
    """Speed, item 4: the page carries the DAG as compact data (no markup per task), the Gantt chart its
    last GANTT_MAX_BARS attempts, every list a bounded number of rows; the queries do not grow either."""
    from tasks_app.dashboard.pages import GANTT_MAX_BARS

    large, small = big_run(submit, 10_000), big_run(submit, 10)
    agent = make_agent("wide", labels=[], capacity=64)
    for _ in range(5):  # 320 finished attempts: more than the chart draws
        for got in actions.claim_ready_tasks(agent, 64):
            actions.complete_attempt(agent, got["attempt_id"], "succeeded", {}, "", 0)
    actions.claim_ready_tasks(agent, 5)
    sizes, counts = {}, {}
    for run in (small, large):
        for attempt in ("cold", "cached"):  # the first load lays the graph out, the next ones reuse it
            body = []
            counts[run.id, attempt] = _queries(lambda run=run, body=body: body.append(viewer.get(f"/runs/{run.id}/")))
            assert body[0].status_code == 200
            sizes[run.id] = len(body[0].content)
    assert counts[small.id, "cold"] == counts[large.id, "cold"] <= 25, counts
    assert counts[small.id, "cached"] == counts[large.id, "cached"] < counts[large.id, "cold"], counts
    assert sizes[large.id] <= 500_000, sizes
    page = viewer.get(f"/runs/{large.id}/").content.decode()
    picture = dag_data(page)
    assert len(picture["keys"]) == 10_000 and len(picture["e"]) == 2 * 9_000 and "titles" not in picture
    assert page.count('class="bar att-') == GANTT_MAX_BARS
    assert f"of {5 * 64 + 5} attempts" in page and f'href="/runs/{large.id}/timeline/"' in page
    timeline = viewer.get(f"/runs/{large.id}/timeline/").content.decode()
    assert timeline.count('class="bar att-') == 5 * 64 + 5  # "show all": every attempt


@pytest.mark.parametrize("page", ["/", "/agents/"])
def test_overview_and_agents_query_counts_do_not_grow_with_runs_or_fleet(viewer, submit, make_agent, page):
    big_run(submit, 10)
    actions.claim_ready_tasks(make_agent("a0", labels=[]), 1)
    before = _queries(lambda: viewer.get(page))
    big_run(submit, 1000)
    for _ in range(4):
        big_run(submit, 20)
    for i in range(1, 9):
        actions.claim_ready_tasks(make_agent(f"a{i}", labels=[]), 1)
    after = _queries(lambda: viewer.get(page))
    assert before == after <= 20, (before, after)


def test_task_page_query_count_is_bounded(viewer, submit, make_agent, django_assert_max_num_queries):
    run = submit(doc({"key": "a", "max_attempts": 5, "retry_delay_s": 0}))
    agent = make_agent("solo", labels=[])
    for _ in range(4):
        got = actions.claim_ready_tasks(agent, 1)[0]
        actions.complete_attempt(agent, got["attempt_id"], "failed", {}, "boom", 1)
    task = Task.objects.get(run=run)
    with django_assert_max_num_queries(20):
        assert viewer.get(f"/tasks/{task.id}/").status_code == 200


def test_viewer_may_not_operate(viewer, submit):
    run = submit(doc({"key": "a"}))
    response = viewer.post(f"/runs/{run.id}/cancel/")
    assert response.status_code == 403
    run.refresh_from_db()
    assert run.state == "running"


def test_operator_actions_need_the_csrf_token(operator_client, submit):
    run = submit(doc({"key": "a"}))
    assert operator_client.post(f"/runs/{run.id}/pause/").status_code == 403
    run.refresh_from_db()
    assert run.state == "running"


def test_operator_pauses_resumes_and_cancels_and_the_trail_names_them(operator_client, submit):
    run = submit(doc({"key": "a"}))
    for op, state in (("pause", "paused"), ("resume", "running"), ("cancel", "canceled")):
        response = csrf_post(operator_client, f"/runs/{run.id}/{op}/")
        assert response.status_code == 200, op
        run.refresh_from_db()
        assert run.state == state
    assert Event.objects.filter(run=run, kind="run", actor="user:otto").count() == 3
    refused = csrf_post(operator_client, f"/runs/{run.id}/resume/")
    assert refused.status_code == 409 and b"cannot be resumed" in refused.content


def test_operator_retries_a_failed_task(operator_client, submit, make_agent):
    run = submit(doc({"key": "a", "max_attempts": 1}))
    agent = make_agent("solo", labels=[])
    got = actions.claim_ready_tasks(agent, 1)[0]
    actions.complete_attempt(agent, got["attempt_id"], "failed", {}, "boom", 1)
    task = Task.objects.get(run=run)
    assert csrf_post(operator_client, f"/tasks/{task.id}/retry/").status_code == 200
    task.refresh_from_db()
    assert task.state == "ready"


def test_operator_drains_disables_and_enables_an_agent(operator_client, make_agent):
    from agents_app.models import Agent

    agent = make_agent("cg-1", labels=[])
    for op, field, value in (("drain", "draining", True), ("disable", "enabled", False), ("enable", "enabled", True)):
        assert csrf_post(operator_client, f"/agents/{agent['id']}/{op}/").status_code == 200
        assert getattr(Agent.objects.get(pk=agent["id"]), field) is value
    assert Event.objects.filter(agent_id=agent["id"], actor="user:otto").count() == 3
