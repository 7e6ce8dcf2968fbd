"""The terminal monitor (`manage.py monitor`) on real PostgreSQL: one frame with every section, the finished
run's metrics, agent text shown literally (never as rich markup), bad run ids, and the live loop's ending."""

import io
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from tasks_app import actions
from tasks_app.management.commands import monitor
from tasks_app.models import Attempt
from tests.conftest import doc

pytestmark = pytest.mark.django_db

SECTIONS = ("Run monitor", "Task summary", "Agents", "Active tasks", "Recently completed", "Next tasks")


def claim(agent):
    (assignment,) = actions.claim_ready_tasks(agent, 1)
    return assignment


def finish(agent, assignment, outcome="succeeded"):
    return actions.complete_attempt(agent, assignment["attempt_id"], outcome, {}, "", 0)


def frame(*args, width=160) -> str:
    buf = io.StringIO()
    call_command("monitor", *args, "--once", "--width", str(width), stdout=buf)
    return buf.getvalue()


@pytest.fixture
def busy_run(make_agent, submit):
    """plan succeeded (alice), build running at 50% (bob), docs and lint ready, ship blocked on build."""
    run = submit(
        doc(
            {"key": "plan", "title": "Plan the work", "priority": 10},
            {"key": "build", "title": "Build it", "priority": 5},
            {"key": "docs", "title": "Write the docs", "priority": 3},
            {"key": "lint", "title": "Lint", "priority": 1},
            {"key": "ship", "title": "Ship", "deps": ["build"]},
            name="level6-demo",
        )
    )
    alice = make_agent("alice", labels=["ccg"])
    bob = make_agent("bob", labels=["cg"])
    finish(alice, claim(alice))
    building = claim(bob)
    actions.record_progress(bob, building["attempt_id"], 0.5, "compiling module 3 of 6", None)
    return run


def test_one_frame_shows_every_section_of_a_running_run(busy_run):
    out = frame(str(busy_run.id))
    for heading in SECTIONS:
        assert heading in out
    assert "level6-demo" in out
    assert "running" in out
    # The active task: its key, its agent, its progress message and its bar at 50%.
    active = out[out.index("Active tasks") : out.index("Recently completed")]
    assert "build" in active and "bob" in active
    assert "compiling module 3 of 6" in active
    assert "50%" in active
    # Recently completed: plan, by alice, succeeded.
    completed = out[out.index("Recently completed") : out.index("Next tasks")]
    assert "plan" in completed and "alice" in completed and "succeeded" in completed
    # The queue in the scheduler's order: docs (priority 3) before lint; ship (blocked) and build are not in it.
    queue = out[out.index("Next tasks") :]
    assert queue.index("docs") < queue.index("lint")
    assert "ship" not in queue and "build" not in queue
    # The agents table: each agent with its status word; bob holds build.
    agents = out[out.index("Agents") : out.index("Active tasks")]
    bob_line = next(line for line in agents.splitlines() if "bob" in line)
    assert "busy" in bob_line and "build" in bob_line and "cg" in bob_line
    alice_line = next(line for line in agents.splitlines() if "alice" in line)
    assert "idle" in alice_line
    # Counts by state in the header; no metrics while the run is still going.
    assert "succeeded 1" in out and "ready 2" in out and "blocked 1" in out
    assert "speed-up" not in out


def test_without_a_run_id_the_frame_shows_the_newest_runs(busy_run, submit):
    submit(doc({"key": "other"}, name="second-run"))
    out = frame()
    assert "Control plane monitor" in out
    assert "level6-demo" in out and "second-run" in out
    assert "2 active run(s)" in out
    assert "compiling module 3 of 6" in out
    assert "Next tasks" in out and "other" in out


def test_a_finished_run_shows_its_metrics(make_agent, submit):
    run = submit(doc({"key": "left"}, {"key": "right"}, name="pair"))
    one, two = make_agent("one", labels=[]), make_agent("two", labels=[])
    first, second = claim(one), claim(two)
    finish(one, first)
    finish(two, second)
    # Inside the test's transaction now() never moves: give the attempts real times, 10 s each side by side.
    start = timezone.now() - timedelta(seconds=30)
    Attempt.objects.filter(run=run).update(
        assigned_at=start, started_at=start, finished_at=start + timedelta(seconds=10)
    )
    out = frame(str(run.id))
    assert "succeeded" in out
    assert "makespan" in out and "10.0 s" in out
    assert "sum of task times" in out and "20.0 s" in out
    assert "speed-up" in out and "2.00× over one agent" in out


def test_agent_text_is_shown_literally_never_as_markup(make_agent, submit):
    run = submit(
        doc(
            {"key": "evil", "title": "[bold red]x[/]"},
            {"key": "next", "title": "[link=http://e]y[/]"},
            name="[red]r[/]",
        )
    )
    mallory = make_agent("mallory", labels=[])
    evil = claim(mallory)
    actions.record_progress(mallory, evil["attempt_id"], 0.25, "[blink]boo[/blink] [/]", None)
    out = frame(str(run.id), width=120)
    assert "[bold red]x[/]" in out
    assert "[link=http://e]y[/]" in out
    assert "[red]r[/]" in out
    assert "[blink]boo[/blink] [/]" in out


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("c024f69f-8aad-4587-977c-bc1e5b92f0d5", "no run with id"),
        ("not-a-uuid", "malformed run id"),
        ("123", "malformed run id"),
    ],
)
def test_an_unknown_or_malformed_run_id_is_a_command_error(db, bad, message):
    with pytest.raises(CommandError, match=message):
        call_command("monitor", bad, "--once", stdout=io.StringIO())


def test_following_a_run_stops_when_it_ends_and_prints_the_final_frame(make_agent, submit, monkeypatch):
    run = submit(doc({"key": "only", "title": "The only task"}, name="follow-me"))
    agent = make_agent("solo", labels=[])
    assignment = claim(agent)
    sleeps = []

    def fake_sleep(seconds):
        # Each refresh waits here; the second one sees the task finish, which ends the run.
        sleeps.append(seconds)
        if len(sleeps) == 2:
            finish(agent, assignment)

    monkeypatch.setattr(monitor.time, "sleep", fake_sleep)
    buf = io.StringIO()
    call_command("monitor", str(run.id), "--interval", "0.25", "--width", "160", stdout=buf)
    out = buf.getvalue()
    assert sleeps == [0.25, 0.25]
    assert "follow-me" in out and "succeeded" in out
    assert "speed-up" in out
    # The live frames were transient: the final frame is printed once.
    assert out.count("Task summary") == 1


def test_without_a_run_id_ctrl_c_ends_the_loop_with_the_final_frame(busy_run, monkeypatch):
    def interrupted(_seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(monitor.time, "sleep", interrupted)
    buf = io.StringIO()
    call_command("monitor", "--width", "160", stdout=buf)
    out = buf.getvalue()
    assert "level6-demo" in out and "Next tasks" in out
    assert "speed-up" not in out


def test_bad_options_are_command_errors(busy_run):
    with pytest.raises(CommandError, match="--interval"):
        call_command("monitor", "--interval", "0", stdout=io.StringIO())
    with pytest.raises(CommandError, match="--width"):
        call_command("monitor", "--once", "--width", "10", stdout=io.StringIO())
