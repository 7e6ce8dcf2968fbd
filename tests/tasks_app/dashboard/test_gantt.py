"""The timeline picture, as a specification: a row per agent, bars as long as the attempts, estimates as
outlines, live attempts up to now, escaped text, an empty state, 1,000 attempts."""

import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta

import pytest

from tasks_app.dashboard.gantt import fmt_duration, render_gantt_svg

NS = {"s": "http://www.w3.org/2000/svg"}
T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)


def attempt(i, agent, start_s, end_s=None, state="succeeded", estimate=None, key=None, title="", assigned_s=None):
    start = T0 + timedelta(seconds=start_s)
    return {
        "id": i,
        "state": state,
        "agent__name": agent,
        "task__key": key or f"task-{i}",
        "task__title": title,
        "task__estimate_s": estimate,
        "assigned_at": T0 + timedelta(seconds=start_s if assigned_s is None else assigned_s),
        "started_at": start,
        "finished_at": None if end_s is None else T0 + timedelta(seconds=end_s),
        "elapsed_s": 0.0,
    }


def bars(svg):
    root = ET.fromstring(svg)
    return {g.get("data-id"): g for g in root.iter(f"{{{NS['s']}}}g") if "bar" in (g.get("class") or "").split()}


def width(g, cls):
    return float(g.find(f"s:rect[@class='{cls}']", NS).get("width"))


def test_one_row_per_agent_sorted_by_name():
    svg = render_gantt_svg(
        [attempt(1, "zed", 0, 10), attempt(2, "amy", 0, 5), attempt(3, "zed", 10, 20), attempt(4, "bob", 3, 9)]
    )
    rows = ET.fromstring(svg).findall("s:g[@class='row']", NS)
    assert [r.get("data-agent") for r in rows] == ["amy", "bob", "zed"]
    assert {g.get("data-id") for g in rows[2].findall("s:g", NS)} == {"1", "3"}


def test_bar_widths_are_proportional_to_durations():
    got = bars(render_gantt_svg([attempt(1, "a", 0, 10), attempt(2, "a", 10, 40), attempt(3, "b", 5, 15)]))
    per_second = width(got["1"], "act") / 10
    assert per_second > 0
    assert width(got["2"], "act") == pytest.approx(30 * per_second, abs=0.2)
    assert width(got["3"], "act") == pytest.approx(10 * per_second, abs=0.2)
    x = {i: float(g.find("s:rect[@class='act']", NS).get("x")) for i, g in got.items()}
    assert x["2"] - x["1"] == pytest.approx(10 * per_second, abs=0.2)


def test_estimates_are_drawn_as_outlines_from_the_same_start():
    got = bars(render_gantt_svg([attempt(1, "a", 0, 10, estimate=20), attempt(2, "a", 10, 40)]))
    act, est = (got["1"].find(f"s:rect[@class='{c}']", NS) for c in ("act", "est"))
    assert est.get("x") == act.get("x")
    assert float(est.get("width")) == pytest.approx(2 * float(act.get("width")), abs=0.2)
    assert got["2"].find("s:rect[@class='est']", NS) is None, "no estimate, no outline"
    assert "actual 10s vs estimate 20s (50%)" in got["1"].find("s:title", NS).text


def test_live_attempts_extend_to_now_and_a_now_line_is_drawn():
    now = T0 + timedelta(seconds=60)
    got = bars(render_gantt_svg([attempt(1, "a", 0, 30), attempt(2, "b", 20, None, state="running")], now=now))
    assert width(got["2"], "act") == pytest.approx(40 / 30 * width(got["1"], "act"), abs=0.2)
    assert "att-running" in got["2"].get("class").split()
    line = ET.fromstring(render_gantt_svg([attempt(2, "b", 20, None, state="running")], now=now)).find(
        "s:line[@class='now']", NS
    )
    assert line is not None


def test_attempt_states_become_colour_classes():
    states = ["succeeded", "failed", "lost", "canceled", "running", "assigned"]
    now = T0 + timedelta(seconds=100)
    got = bars(render_gantt_svg([attempt(i, "a", i * 10, i * 10 + 5, state=s) for i, s in enumerate(states)], now))
    assert {g.get("class") for g in got.values()} == {f"bar att-{s}" for s in states}


def test_concurrent_attempts_of_one_agent_get_separate_lanes():
    got = bars(render_gantt_svg([attempt(1, "a", 0, 10), attempt(2, "a", 5, 15), attempt(3, "a", 12, 20)]))
    y = {i: float(g.find("s:rect[@class='act']", NS).get("y")) for i, g in got.items()}
    assert y["1"] != y["2"] and y["3"] == y["1"]


def test_text_is_escaped():
    evil = "<script>alert(1)</script>"
    svg = render_gantt_svg([attempt(1, evil, 0, 100, key=evil, title=evil)])
    assert "<script" not in svg and "&lt;script&gt;" in svg
    ET.fromstring(svg)


def test_no_attempts_renders_a_small_placeholder():
    root = ET.fromstring(render_gantt_svg([]))
    assert "gantt-empty" in root.get("class") and root.find("s:text", NS).text == "No attempts yet"


def test_the_time_axis_has_readable_ticks():
    root = ET.fromstring(render_gantt_svg([attempt(1, "a", 0, 600)]))
    ticks = [t.text for t in root.findall(".//s:text[@class='tick']", NS)]
    assert ticks[0] == "0s" and "5m" in ticks and "10m" in ticks


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(2.5, "2.5s"), (45, "45s"), (180, "3m"), (200, "3m20s"), (3600, "1h"), (3900, "1h05m")],
)
def test_durations_are_formatted_for_people(seconds, text):
    assert fmt_duration(seconds) == text


def test_a_thousand_attempts_render_as_well_formed_svg():
    attempts = [attempt(i, f"agent-{i % 25:02d}", i * 3, i * 3 + 70, estimate=60) for i in range(1000)]
    root = ET.fromstring(render_gantt_svg(attempts))
    assert len(root.findall("s:g[@class='row']", NS)) == 25
    assert len(bars(ET.tostring(root, encoding="unicode"))) == 1000
