"""The live dashboard in a real browser (Debian's Chromium driven by Playwright) against a real server with
real agent processes. Every page's screenshot lands in test-artifacts/screenshots/ (git-ignored)."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import websockets
from django.test import Client
from playwright.sync_api import expect, sync_playwright

from control_plane import launch
from tasks_app.models import Event, Run, Task
from tests import conftest
from tests.conftest import doc, http

pytestmark = pytest.mark.django_db(transaction=True)
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
XSS = "<script>alert(1)</script>"
# How many of the run page's DAG nodes (drawn on a canvas by static/js/dag.js) are in a state: at least `n`
# (`exact` false) or exactly `n`.
DAG_COUNT_JS = """([state, n, exact]) => {
  const v = window.cpDag && cpDag.views[0];
  if (!v || !v.painted) return false;
  const count = v.data.keys.filter(k => v.stateOf(k) === state).length;
  return exact ? count === n : count >= n;
}"""


def expect_dag_count(page, state: str, n: int, exact: bool = True, timeout: float = 10_000) -> None:
    page.wait_for_function(DAG_COUNT_JS, arg=[state, n, exact], timeout=timeout)


@pytest.fixture(scope="module")
def browser():
    # Playwright's sync API keeps an event loop on this thread; Django would take the test's own (sync)
    # database calls for async ones. They are not: allow them.
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def people(django_user_model):
    from django.contrib.auth.models import Permission

    operator = django_user_model.objects.create_user("olga", password="pw-olga-12345")
    operator.user_permissions.add(Permission.objects.get(codename="operate_run"))
    django_user_model.objects.create_user("victor", password="pw-victor-12345")
    return {"operator": ("olga", "pw-olga-12345"), "viewer": ("victor", "pw-victor-12345")}


def login(browser, server, who, **context_args):
    context = browser.new_context(**context_args)
    page = context.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
    page.dialogs = dialogs
    page.goto(f"{server.url}/")
    expect(page).to_have_url(f"{server.url}/accounts/login/?next=/")
    page.fill("input[name=username]", who[0])
    page.fill("input[name=password]", who[1])
    page.click("button[type=submit]")
    expect(page).to_have_url(f"{server.url}/")
    return page


def shoot(page, artifacts_dir, name):
    folder = artifacts_dir / "screenshots"
    folder.mkdir(exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


def submit_run(document) -> Run:
    from tasks_app.actions import submit_run as submit
    from tasks_app.dag import parse_document

    return submit(parse_document(document), document, actor="test")


@pytest.fixture
def agents(live_server_proc, enrollment_token, tmp_path):
    procs = []

    def start(*names, labels=("w",), time_scale="1"):
        for name in names:
            procs.append(
                launch.start_agent(
                    live_server_proc.url,
                    enrollment_token,
                    name,
                    list(labels),
                    tmp_path / "agents",
                    executors=["simulated", "shell"],
                    extra=["--time-scale", time_scale],
                    log=tmp_path / f"{name}.log",
                )  # fmt: skip
            )

    yield start
    for p in procs:
        launch.stop(p)


def test_watch_a_run_progress_without_reloading(browser, live_server_proc, people, agents, artifacts_dir):
    document = doc(
        *[{"key": f"step-{i}", "deps": [f"step-{i - 1}"] if i else [], "requires": ["w"],
           "title": f"Step {i}", "params": {"duration_s": 0.6}, "estimate_s": 1} for i in range(4)],
        {"key": "side", "requires": ["w"], "params": {"duration_s": 1.2}, "estimate_s": 2},
        name="live-demo",
    )  # fmt: skip
    run = submit_run(document)
    page = login(browser, live_server_proc, people["viewer"])
    shoot(page, artifacts_dir, "overview-before")
    page.goto(f"{live_server_proc.url}/runs/{run.id}/")
    expect(page.locator("#live-status")).to_have_text("live", timeout=10_000)
    expect(page.locator("[data-testid=run-state]")).to_have_text("running")
    loaded_at = page.evaluate("performance.timeOrigin")
    # Count the nodes the websocket's pushes recolour in the DAG picture, without any reload.
    page.evaluate(
        """() => { window.cpChanges = 0;
           document.addEventListener('cp:dag-drawn', e => { window.cpChanges += e.detail.changed.length; }); }"""
    )
    agents("w-1", "w-2")
    expect_dag_count(page, "running", 1, exact=False, timeout=20_000)
    shoot(page, artifacts_dir, "run-running")
    expect(page.locator("[data-testid=run-state]")).to_have_text("succeeded", timeout=60_000)
    assert page.evaluate("performance.timeOrigin") == loaded_at  # the same document all along
    assert page.evaluate("window.cpChanges") > 5
    expect_dag_count(page, "succeeded", 5)
    expect(page.locator("[data-testid=speedup]")).to_be_visible()
    shoot(page, artifacts_dir, "run-finished")
    task = Task.objects.get(run=run, key="side")
    page.goto(f"{live_server_proc.url}/tasks/{task.id}/")
    expect(page.locator("[data-testid=task-state]")).to_have_text("succeeded")
    expect(page.locator("a[download]")).to_have_count(1)  # its result file, downloadable
    shoot(page, artifacts_dir, "task")
    page.goto(f"{live_server_proc.url}/agents/")
    expect(page.locator("tr[data-agent=w-1]")).to_be_visible()
    shoot(page, artifacts_dir, "agents")
    page.goto(f"{live_server_proc.url}/")
    shoot(page, artifacts_dir, "overview-after")
    phone = login(browser, live_server_proc, people["viewer"], viewport={"width": 390, "height": 844})
    phone.goto(f"{live_server_proc.url}/runs/{run.id}/")
    shoot(phone, artifacts_dir, "run-phone")
    wide = login(
        browser, live_server_proc, people["viewer"], viewport={"width": 1920, "height": 1080}, color_scheme="dark"
    )
    wide.goto(f"{live_server_proc.url}/runs/{run.id}/")
    shoot(wide, artifacts_dir, "run-1920-dark")


def test_operator_cancels_a_run_and_the_trail_names_them(browser, live_server_proc, people, agents):
    run = submit_run(doc({"key": "forever", "requires": ["w"], "params": {"duration_s": 120}}, name="to-cancel"))
    agents("w-9")
    page = login(browser, live_server_proc, people["operator"])
    page.goto(f"{live_server_proc.url}/runs/{run.id}/")
    expect_dag_count(page, "running", 1, timeout=20_000)
    page.get_by_role("button", name="Cancel run").click()
    expect(page.locator("[data-testid=run-state]")).to_have_text("canceled", timeout=10_000)
    assert page.dialogs and "Cancel run to-cancel?" in page.dialogs[0]
    assert Event.objects.filter(run=run, kind="run", to_state="canceled", actor="user:olga").exists()


def test_a_refused_action_tells_the_operator_why(browser, live_server_proc, people):
    """The run ended between the page's last update and the click: the server's refusal (409) shows as a
    flash, not as nothing at all (htmx drops 4xx answers unless told)."""
    from tasks_app import actions

    run = submit_run(doc({"key": "a", "requires": ["nobody"]}, name="ends-first"))
    page = login(browser, live_server_proc, people["operator"])
    page.goto(f"{live_server_proc.url}/runs/{run.id}/")
    expect(page.locator("#live-status")).to_have_text("live", timeout=10_000)
    actions.cancel_run(run.id, "user:someone-else")
    page.evaluate("(url) => htmx.ajax('POST', url, {target: '#flash', swap: 'outerHTML'})", f"/runs/{run.id}/pause/")
    expect(page.locator("#flash .flash.error")).to_contain_text("canceled", timeout=5_000)


def test_viewer_sees_no_controls_and_is_refused(browser, live_server_proc, people):
    run = submit_run(doc({"key": "a", "requires": ["nobody"]}, name="watch-only"))
    page = login(browser, live_server_proc, people["viewer"])
    page.goto(f"{live_server_proc.url}/runs/{run.id}/")
    expect(page.locator("#live-status")).to_have_text("live", timeout=10_000)
    expect(page.locator("text=Cancel run")).to_have_count(0)
    status = page.evaluate(
        """async (url) => { const token = JSON.parse(document.body.getAttribute('hx-headers'))['X-CSRFToken'];
           const r = await fetch(url, {method: 'POST', headers: {'X-CSRFToken': token}}); return r.status; }""",
        f"/runs/{run.id}/cancel/",
    )
    assert status == 403
    assert Run.objects.get(pk=run.pk).state == "running"


def test_a_task_titled_with_a_script_renders_as_text(browser, live_server_proc, people, artifacts_dir):
    run = submit_run(doc({"key": "xss", "title": XSS, "requires": ["nobody"]}, name=XSS))
    page = login(browser, live_server_proc, people["viewer"])
    for url in ("/", f"/runs/{run.id}/", f"/tasks/{Task.objects.get(run=run).id}/"):
        page.goto(f"{live_server_proc.url}{url}")
        expect(page.locator("#live-status")).to_have_text("live", timeout=10_000)
    expect(page.locator("p.title")).to_have_text(XSS)
    shoot(page, artifacts_dir, "task-xss")
    assert page.dialogs == []


def test_a_hostile_diff_renders_as_text(browser, live_server_proc, people, make_agent, artifacts_dir):
    """An agent writes the diff: a patch adding script and event-handler markup shows as text, runs nothing."""
    import hashlib

    from tasks_app import actions

    hostile = '<img src=x onerror="alert(2)"><script>alert(3)</script>'
    agent = make_agent("gitty", labels=["diffs"], executors=["simulated", "git"])
    run = submit_run(doc({"key": "evil", "requires": ["diffs"]}, workspace={"repo": "file:///r.git", "base": "c" * 40}))
    [got] = actions.claim_ready_tasks(agent, 1)
    patch = f"diff --git a/{XSS}.py b/{XSS}.py\n--- a/x\n+++ b/x\n@@ -0,0 +1 @@\n+{hostile}\n".encode()
    artifact = actions.add_artifact(agent, got["attempt_id"], name="commit.diff", content=patch,
                                    sha256=hashlib.sha256(patch).hexdigest(), content_type="text/x-diff")  # fmt: skip
    commit = {
        "sha": "d" * 40,
        "branch": "cp/x/evil",
        "files_changed": 1,
        "insertions": 1,
        "deletions": 0,
        "files": [{"path": f"{XSS}.py", "insertions": 1, "deletions": 0}],
        "diff_artifact": str(artifact.id),
    }
    actions.complete_attempt(agent, got["attempt_id"], "succeeded", {}, "", 0, commit)
    page = login(browser, live_server_proc, people["viewer"])
    for url in (f"/runs/{run.id}/", f"/tasks/{Task.objects.get(run=run, key='evil').id}/"):
        page.goto(f"{live_server_proc.url}{url}")
        expect(page.locator("#live-status")).to_have_text("live", timeout=10_000)
    expect(page.locator("pre.diff .d-add")).to_have_text("+" + hostile)
    expect(page.locator(".diff-file summary code")).to_have_text(f"{XSS}.py")
    assert page.locator("pre.diff img, pre.diff script").count() == 0
    shoot(page, artifacts_dir, "task-hostile-diff")
    assert page.dialogs == []


def _session_cookie(username, password) -> str:
    client = Client()
    assert client.login(username=username, password=password)
    return client.cookies["sessionid"].value


async def _handshake(url, headers) -> str:
    try:
        async with websockets.connect(url, additional_headers=headers, open_timeout=5) as ws:
            first = await asyncio.wait_for(ws.recv(), 5)
            return "accepted:" + first[:40]
    except websockets.exceptions.InvalidStatus as exc:
        return f"refused:{exc.response.status_code}"
    except websockets.exceptions.ConnectionClosed as exc:
        return f"closed:{exc.rcvd.code if exc.rcvd else None}"


def _handshake_in_thread(url, headers) -> str:
    # Playwright's sync API owns this thread's event loop (module-scoped browser): use a thread of our own.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _handshake(url, headers)).result()


def test_websocket_refuses_anonymous_and_foreign_origin(live_server_proc, people):
    url = f"ws://127.0.0.1:{live_server_proc.port}/ws/overview/"
    own = f"http://127.0.0.1:{live_server_proc.port}"
    session = _session_cookie(*people["viewer"])
    anonymous = _handshake_in_thread(url, {"Origin": own})
    foreign = _handshake_in_thread(url, {"Origin": "http://evil.example", "Cookie": f"sessionid={session}"})
    member = _handshake_in_thread(url, {"Origin": own, "Cookie": f"sessionid={session}"})
    assert anonymous.startswith(("refused", "closed")), anonymous
    assert foreign.startswith(("refused", "closed")), foreign
    assert member.startswith("accepted:"), member


def _collect_pushes(url, headers, opened, stop, out):
    async def main():
        async with websockets.connect(url, additional_headers=headers, open_timeout=5, max_size=None) as ws:
            await ws.recv()  # on connect: the whole page
            opened.set()
            while not stop.is_set():
                try:
                    message = await asyncio.wait_for(ws.recv(), 0.2)
                except TimeoutError:
                    continue
                out.append((time.monotonic(), message))

    asyncio.run(main())


def test_a_burst_of_hundreds_of_changes_reaches_a_page_as_a_few_updates_a_second(live_server_proc, people, make_agent):
    from django.conf import settings

    from tasks_app import actions

    run = submit_run(doc(*[{"key": f"t{i:03d}"} for i in range(100)], name="burst"))
    url = f"ws://127.0.0.1:{live_server_proc.port}/ws/run/{run.id}/"
    headers = {"Origin": live_server_proc.url, "Cookie": f"sessionid={_session_cookie(*people['viewer'])}"}
    opened, stop, pushes = threading.Event(), threading.Event(), []
    with ThreadPoolExecutor(1) as pool:
        listening = pool.submit(_collect_pushes, url, headers, opened, stop, pushes)
        try:
            assert opened.wait(10)
            agents = [make_agent(f"burst-{i}", labels=[], capacity=10) for i in range(10)]
            started = time.monotonic()
            claimed = [(agent, got) for agent in agents for got in actions.claim_ready_tasks(agent, 10)]
            for agent, got in claimed:  # 200 more transactions, each announcing its change
                actions.record_progress(agent, got["attempt_id"], 0.5, "half", None)
                actions.complete_attempt(agent, got["attempt_id"], "succeeded", {}, "", 0)
            ended = time.monotonic()
            time.sleep(1.0)  # the last changes reach the page
        finally:
            stop.set()
        listening.result(10)
    assert len(claimed) == 100
    window = ended + 1.0 - started
    assert 2 <= len(pushes) <= window / settings.CP_LIVE_MIN_INTERVAL_S + 2, (len(pushes), window)
    assert 'data-testid="run-state">succeeded<' in "".join(m for _, m in pushes[-3:])


def test_live_updates_come_from_another_server_process(browser, live_server_proc, people, server_tmp, operator):
    """The page listens on process 1; the run is submitted and canceled through process 2's API."""
    from tests.conftest import Server

    _, token = operator
    second = Server(server_tmp)
    try:
        page = login(browser, live_server_proc, people["viewer"])
        expect(page.locator("#live-status")).to_have_text("live", timeout=10_000)
        status, body = http("POST", f"{second.url}/api/v1/runs", doc({"key": "a", "requires": ["z"]}, name="from-two"),
                            token=token)  # fmt: skip
        assert status == 201
        expect(page.locator("#panel-runs")).to_contain_text("from-two", timeout=5_000)
        started = time.monotonic()
        http("POST", f"{second.url}/api/v1/runs/{body['run_id']}/cancel", token=token)
        expect(page.locator(f"tr[data-run='{body['run_id']}'] .badge")).to_have_text("canceled", timeout=5_000)
        assert time.monotonic() - started < 3
    finally:
        second.stop()


def test_a_page_resyncs_by_itself_after_a_server_restart(browser, people, server_tmp, artifacts_dir):
    """The server process is stopped and started again on the same port; meanwhile the run is canceled. The
    open page says it is reconnecting, comes back live without a reload and shows the cancellation."""
    from tasks_app import actions
    from tests.conftest import Server

    run = submit_run(doc({"key": "a", "requires": ["nobody"]}, name="through-a-restart"))
    server = Server(server_tmp)
    try:
        page = login(browser, server, people["viewer"])
        page.goto(f"{server.url}/runs/{run.id}/")
        expect(page.locator("#live-status")).to_have_text("live", timeout=10_000)
        loaded_at = page.evaluate("performance.timeOrigin")
        server.stop()
        expect(page.locator("#live-status")).to_have_text("reconnecting…", timeout=10_000)
        shoot(page, artifacts_dir, "run-reconnecting")
        actions.cancel_run(str(run.id), "test")  # while no server is there to tell anyone
        env = {"DATABASE_URL": conftest.test_database_url(), **conftest.FAST_TIMINGS}
        server.proc = launch.start_server(server.port, env=env, log=server.log)
        expect(page.locator("#live-status")).to_have_text("live", timeout=20_000)
        expect(page.locator("[data-testid=run-state]")).to_have_text("canceled", timeout=10_000)
        expect_dag_count(page, "canceled", 1)
        assert page.evaluate("performance.timeOrigin") == loaded_at  # no reload: the page resynced itself
    finally:
        server.stop()


def _page_fits(page) -> bool:
    return page.evaluate("document.scrollingElement.scrollWidth <= window.innerWidth")


def _background_luminance(page) -> float:
    rgb = page.evaluate("getComputedStyle(document.body).backgroundColor")  # "rgb(r, g, b)"
    r, g, b = (int(x) for x in rgb[rgb.index("(") + 1 : rgb.index(")")].split(",")[:3])
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255


@pytest.mark.parametrize(
    "name, viewport, scheme",
    [("phone", (390, 844), "light"), ("phone-dark", (390, 844), "dark"), ("1920", (1920, 1080), "light"),
     ("1920-dark", (1920, 1080), "dark")],
)  # fmt: skip
def test_every_page_fits_the_screen_follows_the_theme_and_names_states(
    browser, live_server_proc, people, artifacts_dir, name, viewport, scheme
):
    run = submit_run(doc({"key": "first", "requires": ["nobody"]}, {"key": "then", "deps": ["first"]}, name="fit"))
    task = Task.objects.get(run=run, key="first")
    page = login(
        browser, live_server_proc, people["operator"],
        viewport={"width": viewport[0], "height": viewport[1]}, color_scheme=scheme,
    )  # fmt: skip
    for label, url in (("overview", "/"), ("run", f"/runs/{run.id}/"), ("task", f"/tasks/{task.id}/"),
                       ("agents", "/agents/")):  # fmt: skip
        page.goto(f"{live_server_proc.url}{url}")
        expect(page.locator("#live-status")).to_have_text("live", timeout=10_000)
        assert _page_fits(page), f"{label} scrolls sideways at {viewport[0]} px"
        luminance = _background_luminance(page)
        assert (luminance < 0.3) if scheme == "dark" else (luminance > 0.7), (label, luminance)
        shoot(page, artifacts_dir, f"{label}-{name}")
    page.goto(f"{live_server_proc.url}/runs/{run.id}/")
    # The picture's box fits the screen too (panels clip: the page would not scroll, the picture be cut).
    assert page.evaluate("document.querySelector('.dag-wrap').getBoundingClientRect().right <= innerWidth")
    # State in words, not colour alone: on each node, in the legend and on the run's badge.
    page.wait_for_function("() => window.cpDag && cpDag.views[0] && cpDag.views[0].painted")
    assert page.evaluate("cpDag.views[0].labelsOf('first')") == ["first", "ready"]
    assert page.evaluate("cpDag.views[0].labelsOf('then')") == ["then", "blocked"]
    assert page.evaluate("cpDag.views[0].k * cpDag.views[0].data.style.font") >= 7  # legible: the words are drawn
    expect(page.locator(".dag-legend")).to_contain_text("succeeded")
    expect(page.locator(".dag-legend")).to_contain_text("awaiting approval")
    expect(page.locator("[data-testid=run-state]")).to_have_text("running")


def test_static_files_come_from_the_server_itself(browser, live_server_proc, people):
    """Production settings (DEBUG off): whitenoise serves our own copies of htmx, its websocket extension, the
    scripts and the styles; nothing is loaded from another origin."""
    page = login(browser, live_server_proc, people["viewer"])
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    page.goto(f"{live_server_proc.url}/")
    expect(page.locator("#live-status")).to_have_text("live", timeout=10_000)
    assets = page.evaluate(
        "[...document.querySelectorAll('script[src], link[rel=stylesheet]')].map(e => e.src || e.href)"
    )
    assert any("htmx-2.0.11.min.js" in a for a in assets) and any("htmx-ext-ws" in a for a in assets)
    for url in assets:
        assert url.startswith(f"{live_server_proc.url}/static/"), url
        response = page.request.get(url)
        assert response.status == 200, url
        assert "max-age" in response.headers.get("cache-control", ""), url  # whitenoise, not Django's view
    assert all(u.startswith(("http://127.0.0.1", "ws://127.0.0.1", "data:")) for u in requested), requested
    assert page.evaluate("typeof htmx !== 'undefined' && htmx.version") == "2.0.11"


def test_an_approval_waits_for_you_live_and_the_operator_approves_it_with_a_comment(browser, live_server_proc,
                                                                                    people):  # fmt: skip
    from tasks_app import actions

    page = login(browser, live_server_proc, people["operator"])
    expect(page.locator("#live-status")).to_have_text("live", timeout=10_000)
    expect(page.locator("[data-testid=waiting-for-you]")).to_be_hidden()
    question = f"Ship it? {XSS}"
    run = submit_run(doc({"key": "ship", "executor": "approval", "prompt": question}, name="gated"))
    # Pushed live: the panel appears without a reload, the agent-free question escaped.
    panel = page.locator("[data-testid=waiting-for-you]")
    expect(panel).to_be_visible(timeout=10_000)
    expect(panel.locator(".question")).to_have_text(question)
    panel.locator("input[name=message]").fill("reviewed the diff")
    panel.get_by_role("button", name="Approve").click()
    expect(page.locator("#flash .flash")).to_contain_text("Approved", timeout=5_000)
    expect(panel).to_be_hidden(timeout=10_000)
    event = Event.objects.get(run=run, kind="task", to_state="succeeded")
    assert (event.actor, event.detail["message"]) == ("user:olga", "reviewed the diff")
    run.refresh_from_db()
    assert run.state == "succeeded"
    # On the task page a second approval is rejected; a viewer sees the question but no buttons.
    second = submit_run(doc({"key": "again", "executor": "approval"}, name="gated-2"))
    task = Task.objects.get(run=second)
    viewer = login(browser, live_server_proc, people["viewer"])
    viewer.goto(f"{live_server_proc.url}/tasks/{task.id}/")
    expect(viewer.locator("[data-testid=task-state]")).to_have_text("awaiting_approval")
    expect(viewer.locator("[data-testid=approval] button")).to_have_count(0)
    page.goto(f"{live_server_proc.url}/tasks/{task.id}/")
    page.locator("[data-testid=approval]").get_by_role("button", name="Reject").click()
    expect(page.locator("[data-testid=task-state]")).to_have_text("failed", timeout=10_000)
    expect(viewer.locator("[data-testid=task-state]")).to_have_text("failed", timeout=10_000)  # pushed live
    assert actions.settle_run(second.id) is None  # already settled by the decision
    second.refresh_from_db()
    assert second.state == "failed"


def test_an_opted_in_browser_is_notified_of_what_comes_to_wait_for_you(browser, live_server_proc, people):
    page = login(browser, live_server_proc, people["operator"], permissions=["notifications"])
    # Record what the page shows as notifications (the real API, wrapped: headless Chromium shows none).
    page.add_init_script(
        "window.cpNotes = []; const Real = window.Notification;"
        "window.Notification = class extends Real {"
        "  constructor(title, options) { super(title, options); window.cpNotes.push([title, options.body]); } };"
    )
    already = submit_run(doc({"key": "old", "executor": "approval"}, name="before-the-page"))
    page.reload()
    expect(page.locator("#live-status")).to_have_text("live", timeout=10_000)
    expect(page.locator("#notify-optin")).to_be_hidden()  # permission already granted: nothing to opt into
    submit_run(doc({"key": "fresh", "executor": "approval"}, name="after-the-page"))
    expect(page.locator("[data-wait]")).to_have_count(2, timeout=10_000)
    page.wait_for_function("window.cpNotes.length > 0", timeout=5_000)
    assert page.evaluate("window.cpNotes") == [["Waiting for you", "fresh in after-the-page awaits your approval"]]
    assert already.state == "running"
    # A browser not asked yet offers the opt-in.
    other = login(browser, live_server_proc, people["viewer"])
    expect(other.locator("#notify-optin")).to_be_visible()
