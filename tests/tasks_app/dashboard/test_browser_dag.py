"""The run page's DAG, drawn on a canvas from compact data (static/js/dag.js), in a real browser: the picture
is drawn in the states' colours, finding a task by key centres and rings its node, a click opens the task's
page, and a live push recolours a node without a reload."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from tasks_app import actions
from tasks_app.models import Task
from tests.conftest import doc
from tests.tasks_app.dashboard.test_browser import browser, login, people, shoot, submit_run  # noqa: F401 (fixtures)

pytestmark = pytest.mark.django_db(transaction=True)

# The colour the canvas shows at a point (client pixels), and the colour a state's box is filled with (the
# stylesheet's, normalised through a canvas of its own): both as [r, g, b].
PIXEL_JS = """([x, y]) => {
  const view = cpDag.views[0], c = view.canvas, r = c.getBoundingClientRect(), dpr = c.width / r.width;
  const d = view.ctx.getImageData(Math.round((x - r.left) * dpr), Math.round((y - r.top) * dpr), 1, 1).data;
  return [d[0], d[1], d[2]];
}"""
FILL_JS = """state => {
  const view = cpDag.views[0], probe = document.createElement('canvas').getContext('2d', {willReadFrequently: true});
  probe.fillStyle = view.colours[view.data.states.indexOf(state)].fill;
  probe.fillRect(0, 0, 1, 1);
  const d = probe.getImageData(0, 0, 1, 1).data;
  return [d[0], d[1], d[2]];
}"""
DRAWN_JS = "() => window.cpDag && cpDag.views.length === 1 && cpDag.views[0].painted > 0"


def box_colour(page, key: str) -> list[int]:
    """The canvas's colour inside the node's box, left of its centre's text-free right half: a quarter in from
    its right edge."""
    at = page.evaluate(
        """key => { const v = cpDag.views[0], p = v.screenOf(key);
                    return [p.x + v.data.style.nw * v.k / 4, p.y]; }""",
        key,
    )
    page.wait_for_function("() => !cpDag.views[0].frame")  # no repaint pending
    return page.evaluate(PIXEL_JS, at)


def test_a_400_task_dag_is_drawn_found_by_key_clicked_through_and_recoloured_live(
    browser,  # noqa: F811
    live_server_proc,
    people,  # noqa: F811
    make_agent,
    artifacts_dir,
):
    tasks = [{"key": f"impl-{i}", "deps": [f"impl-{i - 1}"] if i % 10 else [], "requires": ["w"]} for i in range(400)]
    run = submit_run(doc(*tasks, name="canvas-400"))
    page = login(browser, live_server_proc, people["viewer"])
    page.goto(f"{live_server_proc.url}/runs/{run.id}/")
    expect(page.locator("#live-status")).to_have_text("live", timeout=10_000)
    page.wait_for_function(DRAWN_JS, timeout=10_000)
    loaded_at = page.evaluate("performance.timeOrigin")
    assert page.evaluate("cpDag.views[0].n") == 400
    assert page.locator(".dag-wrap canvas").bounding_box()["height"] > 100

    # Find by key: the node comes to the middle of the picture, ringed, named in the form's status.
    page.fill("[data-dag-find] input[name=key]", "impl-123")
    page.press("[data-dag-find] input[name=key]", "Enter")
    expect(page.locator("[data-dag-found]")).to_have_text("found impl-123")
    centre = page.evaluate(
        "(() => { const r = cpDag.views[0].canvas.getBoundingClientRect();"
        " return [r.left + r.width / 2, r.top + r.height / 2]; })()"
    )
    at = page.evaluate("cpDag.views[0].screenOf('impl-123')")
    assert abs(at["x"] - centre[0]) < 2 and abs(at["y"] - centre[1]) < 2
    assert page.evaluate("cpDag.views[0].data.keys[cpDag.views[0].found]") == "impl-123"
    assert box_colour(page, "impl-123") == page.evaluate(FILL_JS, "blocked")  # drawn in its state's colour
    shoot(page, artifacts_dir, "run-400-tasks-found")
    page.fill("[data-dag-find] input[name=key]", "no-such-task")
    page.press("[data-dag-find] input[name=key]", "Enter")
    expect(page.locator("[data-dag-found]")).to_have_text("no task with a key like “no-such-task”")

    # A live push recolours a node: its state changes in the database, the page repaints it.
    page.evaluate(
        "window.cpDrawn = []; document.addEventListener('cp:dag-drawn', e => cpDrawn.push(...e.detail.changed))"
    )
    agent = make_agent("painter", labels=["w"])
    key = actions.claim_ready_tasks(agent, 1)[0]["task"]["key"]
    page.fill("[data-dag-find] input[name=key]", key)
    page.press("[data-dag-find] input[name=key]", "Enter")
    page.wait_for_function("key => cpDrawn.some(c => c[0] === key && c[1] === 'assigned')", arg=key, timeout=10_000)
    assert page.evaluate("key => cpDag.views[0].stateOf(key)", key) == "assigned"
    assert box_colour(page, key) == page.evaluate(FILL_JS, "assigned") != page.evaluate(FILL_JS, "ready")
    assert page.evaluate("performance.timeOrigin") == loaded_at  # no reload

    # Panning and zooming move the picture; a click on a node opens its task's page.
    page.evaluate("document.querySelector('.dag-wrap').scrollIntoView({block: 'center'})")
    page.fill("[data-dag-find] input[name=key]", "impl-123")
    page.press("[data-dag-find] input[name=key]", "Enter")
    before = page.evaluate("cpDag.views[0].screenOf('impl-123')")
    box = page.locator(".dag-wrap canvas").bounding_box()
    page.mouse.move(box["x"] + 20, box["y"] + 20)
    page.mouse.down()
    page.mouse.move(box["x"] + 80, box["y"] + 50, steps=4)
    page.mouse.up()
    after = page.evaluate("cpDag.views[0].screenOf('impl-123')")
    assert round(after["x"] - before["x"]) == 60 and round(after["y"] - before["y"]) == 30
    k = page.evaluate("cpDag.views[0].k")
    page.click("[data-dag-zoom='1.5']")
    assert page.evaluate("cpDag.views[0].k") == pytest.approx(k * 1.5)
    at = page.evaluate("cpDag.views[0].screenOf('impl-123')")
    assert page.evaluate("([x, y]) => document.elementFromPoint(x, y).tagName", [at["x"], at["y"]]) == "CANVAS"
    page.mouse.click(at["x"], at["y"])
    expect(page).to_have_url(f"{live_server_proc.url}/tasks/{Task.objects.get(run=run, key='impl-123').id}/")
