"""What AI attempts cost, shown to people (issue 10, items 4-6 and 9): the overview's run costs and spend
panel, the run page's cost, budget bar and budget banner and its resume form's new budget, the task page's
per-attempt model, tokens, cost and session (and the attempts that did not count), the agents page's costs
and usage-limit holds, and `status` and `monitor`. Attempts get their usage through the ORM, as the server
stores it (tasks_app.actions writes usage, cost_usd and session_id from progress and completion)."""

import io
from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone

from agents_app.models import Agent
from tasks_app import actions
from tasks_app.models import Attempt, Run, Task
from tests.conftest import doc

pytestmark = pytest.mark.django_db
XSS = "<script>alert(1)</script>"
BUDGET_REASON = "budget_exceeded: the run's cost $0.0600 reached max_cost_usd $0.05"


def usage(model="claude-sonnet-4-5", cost=0.0, estimated=False, **tokens) -> dict:
    counts = {k: tokens.get(k, 0) for k in ("input_tokens", "output_tokens", "cache_read_tokens",
                                            "cache_write_tokens", "reasoning_tokens")}  # fmt: skip
    return {"model": model, **counts, "cost_usd": cost, "cost_estimated": estimated}


def spend(agent, *, cost, session="", finish="succeeded", error="", **fields) -> Attempt:
    """The agent claims a task and its attempt spends `cost` (usage set through the ORM), then ends."""
    (got,) = actions.claim_ready_tasks(agent, 1)
    attempt_id = got["attempt_id"]
    Attempt.objects.filter(pk=attempt_id).update(
        usage=usage(cost=cost, **fields), cost_usd=cost, session_id=session
    )  # fmt: skip
    if finish:
        hold = timezone.now() + timedelta(hours=1) if finish == "rate_limited" else None
        code = 0 if finish == "succeeded" else 1
        actions.complete_attempt(agent, attempt_id, finish, {}, error, code, hold_until=hold)
    return Attempt.objects.get(pk=attempt_id)


def post(client, url, data=None):
    client.get("/")  # sets the CSRF cookie
    token = client.cookies["csrftoken"].value
    return client.post(url, data or {}, HTTP_X_CSRFTOKEN=token, HTTP_HX_REQUEST="true")


def paused_for_budget(run, spent_by, cost=0.06, budget=0.05):
    """The run spent `cost` and the server paused it for its `budget` (as enforce_budgets leaves it)."""
    spend(spent_by, cost=cost)
    Run.objects.filter(pk=run.pk).update(state="paused", pause_reason=BUDGET_REASON, max_cost_usd=budget)


# --- The overview ------------------------------------------------------------------------------------------


def test_the_overview_shows_each_runs_cost_and_a_spend_panel(viewer, submit, make_agent):
    dear = submit(doc({"key": "a"}, {"key": "b"}, name="dear-run"))
    agent = make_agent("ai-1", labels=[])
    spend(agent, cost=1.25, input_tokens=1000)
    spend(agent, cost=0.5)
    cheap = submit(doc({"key": "c"}, name="free-run"))
    page = viewer.get("/").content.decode()
    row = page[page.index(f'data-run="{dear.id}"') :]
    row = row[: row.index("</tr>")]
    assert "$1.75" in row  # both attempts of the run
    free = page[page.index(f'data-run="{cheap.id}"') :]
    assert "$" not in free[: free.index("</tr>")]  # a run that cost nothing shows no cost
    # The spend panel: today's cost, a bar per day of the last 14 (server-side SVG, no script), the dearest
    # workflows (a run without a workflow counts under its name).
    panel = page[page.index('id="panel-spend"') :]
    panel = panel[: panel.index("</section>")]
    assert 'data-testid="spend-today">$1.75<' in panel
    assert panel.count('<g class="day') == 14 and '<g class="day today">' in panel
    assert panel.count('class="bar-day"') == 1  # only today cost anything
    assert "<script" not in panel and "style=" not in panel
    assert "dear-run" in panel and "free-run" not in panel


def test_the_spend_panel_says_when_nothing_was_spent(viewer):
    page = viewer.get("/").content.decode()
    assert 'id="panel-spend"' in page and "No AI cost in the last 14 days." in page


# --- The run page ------------------------------------------------------------------------------------------


def test_the_run_page_shows_cost_tokens_and_the_budget_bar(viewer, submit, make_agent):
    run = submit(doc({"key": "plan"}, {"key": "build"}, name="budgeted", max_cost_usd=2.0))
    agent = make_agent("ai-1", labels=[])
    cheap = spend(agent, cost=0.5, session="sess-cheap", input_tokens=12000, output_tokens=3400, cache_read_tokens=800)
    dear = spend(agent, cost=1.0, estimated=True, input_tokens=100, output_tokens=50)
    page = viewer.get(f"/runs/{run.id}/").content.decode()
    panel = page[page.index('id="panel-run-cost"') :]
    panel = panel[: panel.index("</section>")]
    assert 'data-testid="run-cost">$1.50<' in panel
    assert "estimated" in panel  # one of the figures is priced from the price table
    assert "of $2.00 budget" in panel
    assert '<meter class="budget"' in panel and 'value="0.7500"' in panel and "75%" in panel
    assert 'data-testid="tokens-in">12,100<' in panel and 'data-testid="tokens-out">3,450<' in panel
    # Per task, dearest first, with its model and latest session.
    assert panel.index(f">{dear.task.key}<") < panel.index(f">{cheap.task.key}<")
    assert "claude-sonnet-4-5" in panel and "sess-cheap" in panel
    assert "budget-banner" not in page


def test_a_run_without_ai_usage_or_budget_shows_no_cost_panel(viewer, submit):
    run = submit(doc({"key": "a"}))
    page = viewer.get(f"/runs/{run.id}/").content.decode()
    assert '<section id="panel-run-cost" hidden' in page


def test_a_run_paused_for_its_budget_says_why_and_that_resuming_needs_a_higher_one(
    viewer, operator_client, submit, make_agent
):
    run = submit(doc({"key": "a"}, {"key": "b"}, name="over"))
    paused_for_budget(run, make_agent("ai-1", labels=[]))
    page = viewer.get(f"/runs/{run.id}/").content.decode()
    banner = page[page.index('data-testid="budget-banner"') :]
    banner = banner[: banner.index("</div>")]
    assert "The run&#x27;s cost $0.0600 reached max_cost_usd $0.05." in banner
    assert "Resuming needs a higher budget" in banner
    assert "budget reached" in page  # the bar says so too
    # The operator's resume form takes a new budget.
    operator_page = operator_client.get(f"/runs/{run.id}/").content.decode()
    assert f'hx-post="/runs/{run.id}/resume/"' in operator_page
    assert '<input type="number" name="max_cost_usd"' in operator_page
    # A run paused by an operator (no reason) has no banner.
    Run.objects.filter(pk=run.pk).update(pause_reason="")
    assert "budget-banner" not in viewer.get(f"/runs/{run.id}/").content.decode()


def test_resuming_through_the_form_with_a_higher_budget_works_and_a_too_low_one_is_refused(
    operator_client, submit, make_agent
):
    run = submit(doc({"key": "a"}, {"key": "b"}))
    paused_for_budget(run, make_agent("ai-1", labels=[]))
    url = f"/runs/{run.id}/resume/"
    # Without a new budget, or with one the run has already spent: refused in words, not a 500.
    for data in ({}, {"max_cost_usd": "0.05"}, {"max_cost_usd": "0.06"}):
        refused = post(operator_client, url, data)
        assert refused.status_code == 409, data
        text = refused.content.decode()
        assert 'class="flash error"' in text and "Not resumed" in text and "higher max_cost_usd" in text
        run.refresh_from_db()
        assert run.state == "paused" and run.max_cost_usd == 0.05  # the refused budget is not kept
    # Not a number: refused, nothing changes.
    for bad in ("lots", "-1", "0", "nan", "1e99"):
        refused = post(operator_client, url, {"max_cost_usd": bad})
        assert refused.status_code == 409 and "must be an amount in USD" in refused.content.decode(), bad
    run.refresh_from_db()
    assert run.state == "paused" and run.max_cost_usd == 0.05
    # A higher budget: resumed, the budget raised, the banner gone.
    done = post(operator_client, url, {"max_cost_usd": "0.50"})
    assert done.status_code == 200 and "now running" in done.content.decode() and "$0.5" in done.content.decode()
    run.refresh_from_db()
    assert run.state == "running" and run.max_cost_usd == 0.5 and run.pause_reason == ""
    assert "budget-banner" not in operator_client.get(f"/runs/{run.id}/").content.decode()


def test_a_plain_resume_still_works_for_a_run_paused_by_hand(operator_client, submit):
    run = submit(doc({"key": "a"}))
    assert post(operator_client, f"/runs/{run.id}/pause/").status_code == 200
    assert post(operator_client, f"/runs/{run.id}/resume/", {"max_cost_usd": ""}).status_code == 200
    run.refresh_from_db()
    assert run.state == "running" and run.max_cost_usd is None


def test_the_live_push_renders_the_cost_panels(submit, make_agent, django_user_model):
    from tasks_app.dashboard.pages import render_panels

    run = submit(doc({"key": "a"}, name="pushed", max_cost_usd=1.0))
    spend(make_agent("ai-1", labels=[]), cost=0.25, finish=None)  # still running: its usage so far
    user = django_user_model.objects.create_user("walt", password="pw-walt-12345")
    pushed = render_panels("run", str(run.id), user, only={"panel-run-cost"})
    assert list(pushed) == ["panel-run-cost"]
    assert 'hx-swap-oob="true"' in pushed["panel-run-cost"] and "$0.25" in pushed["panel-run-cost"]
    overview = render_panels("overview", None, user, only={"panel-spend", "panel-runs"})
    assert 'data-testid="spend-today">$0.25<' in overview["panel-spend"] and "$0.25" in overview["panel-runs"]


# --- The task page -----------------------------------------------------------------------------------------


def test_the_task_page_shows_each_attempts_model_tokens_cost_session_and_what_did_not_count(viewer, submit, make_agent):
    run = submit(doc({"key": "write", "max_attempts": 3, "retry_delay_s": 0}))
    spend(make_agent("ai-1", labels=[]), cost=0.02, session="s-one", input_tokens=5000, output_tokens=10,
          finish="rate_limited", error="rate_limited: usage limit, resets 15:00")  # fmt: skip
    second = spend(make_agent("ai-2", labels=[]), cost=0.0042, session="s-two", estimated=True, input_tokens=15000,
                   output_tokens=2500, cache_read_tokens=40000, cache_write_tokens=1200, finish="failed",
                   error="tests failed")  # fmt: skip
    task = Task.objects.get(run=run)
    page = viewer.get(f"/tasks/{task.id}/").content.decode()
    panel = page[page.index('id="panel-attempts"') :]
    panel = panel[: panel.index("</section>")]
    assert "claude-sonnet-4-5" in panel
    assert "15,000 in · 2,500 out · cache 40,000 read, 1,200 written" in panel
    assert '<b data-testid="attempt-cost">$0.0042</b> <span class="estimated"' in panel
    assert 'data-testid="session">s-two<' in panel and 'data-testid="session">s-one<' in panel
    # The rate-limited attempt is labelled as not counted; the one whose own work failed is not.
    rows = {n: panel[panel.index(f'data-attempt="{n}"') :].split("</tr>", 1)[0] for n in (1, 2)}
    assert second.number == 2
    assert "returned: not counted" in rows[1] and "returned: not counted" not in rows[2]
    assert 'data-testid="task-cost">$0.02 <span class="estimated">estimated<' in page  # its attempts in all


@pytest.mark.parametrize("error", ["not_logged_in: claude auth status: not logged in", BUDGET_REASON])
def test_attempts_returned_for_a_lost_login_or_a_budget_are_labelled_too(viewer, submit, make_agent, error):
    run = submit(doc({"key": "a"}))
    attempt = spend(make_agent("ai-1", labels=[]), cost=0.01, finish=None)
    Attempt.objects.filter(pk=attempt.pk).update(state="canceled", error=error)
    page = viewer.get(f"/tasks/{Task.objects.get(run=run).id}/").content.decode()
    assert "returned: not counted" in page


def test_agent_sent_model_names_and_sessions_are_escaped(viewer, submit, make_agent):
    run = submit(doc({"key": "a"}))
    spend(make_agent("ai-1", labels=[]), cost=0.5, model=XSS, session=XSS)
    task = Task.objects.get(run=run)
    for url in ("/", f"/runs/{run.id}/", f"/tasks/{task.id}/", "/agents/"):
        body = viewer.get(url).content.decode()
        assert XSS not in body, url
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in viewer.get(f"/tasks/{task.id}/").content.decode()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in viewer.get(f"/runs/{run.id}/").content.decode()


# --- The agents page ---------------------------------------------------------------------------------------


def test_the_agents_page_shows_costs_and_usage_limit_holds_still_in_force(viewer, submit, make_agent):
    submit(doc({"key": "a"}, {"key": "b"}))
    busy = make_agent("ai-1", labels=[])
    make_agent("ai-2", labels=[])
    spend(busy, cost=0.4)
    now = timezone.now()
    until = now + timedelta(hours=2)
    Agent.objects.filter(pk=busy["id"]).update(
        executor_holds={
            "claude": {"until": until.isoformat(), "reason": f"usage limit {XSS}"},
            "codex": {"until": (now - timedelta(hours=1)).isoformat(), "reason": "over"},
        }
    )
    page = viewer.get("/agents/").content.decode()
    row = page[page.index('data-agent="ai-1"') :].split("</tr>", 1)[0]
    shown = f"{until:%H:%M}" if until.date() == now.date() else f"{until:%Y-%m-%d %H:%M}"  # after 22:00, tomorrow
    assert f"claude: rate-limited until {shown} UTC" in row
    assert "codex: rate-limited" not in page  # that hold has ended
    assert "$0.40 / $0.40" in row  # today / in all
    other = page[page.index('data-agent="ai-2"') :].split("</tr>", 1)[0]
    assert "rate-limited" not in other and "$" not in other
    assert XSS not in page and "usage limit &lt;script&gt;" in row


def test_the_agents_page_says_why_an_executor_is_not_usable(viewer, make_agent):
    agent = make_agent("ai-1", labels=[])
    Agent.objects.filter(pk=agent["id"]).update(
        preflight={"claude": {"usable": False, "detail": "not_logged_in: run claude /login"},
                   "shell": {"usable": True, "detail": "", "version": ""}}
    )  # fmt: skip
    page = viewer.get("/agents/").content.decode()
    assert "claude: not_logged_in: run claude /login" in page


# --- status and monitor ------------------------------------------------------------------------------------


def test_status_prints_the_runs_cost_budget_and_a_cost_per_task(submit, make_agent):
    run = submit(doc({"key": "plan"}, {"key": "build"}, name="st", max_cost_usd=5.0))
    spent = spend(make_agent("ai-1", labels=[]), cost=0.75, input_tokens=2000, output_tokens=300)
    Run.objects.filter(pk=run.pk).update(state="paused", pause_reason=BUDGET_REASON)
    out = io.StringIO()
    call_command("status", str(run.id), stdout=out)
    text = out.getvalue()
    assert "cost $0.75 of $5.00 budget (15%)  tokens 2,000 in, 300 out" in text
    assert f"paused: {BUDGET_REASON}" in text
    lines = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    other = ({"plan", "build"} - {spent.task.key}).pop()
    assert "$0.75" in lines[spent.task.key] and "$0.75" not in lines[other]


def test_status_of_a_run_without_cost_prints_no_cost(submit):
    run = submit(doc({"key": "plan"}))
    out = io.StringIO()
    call_command("status", str(run.id), stdout=out)
    assert "cost" not in out.getvalue() and "$" not in out.getvalue()


def monitor_frame(*args, width) -> str:
    buf = io.StringIO()
    call_command("monitor", *args, "--once", "--width", str(width), stdout=buf)
    return buf.getvalue()


def test_monitor_shows_the_runs_cost_and_drops_the_cost_columns_first_at_80_columns(submit, make_agent):
    run = submit(doc({"key": "plan"}, {"key": "build"}, {"key": "ship", "deps": ["plan"]}, name="mon",
                     max_cost_usd=2.0))  # fmt: skip
    agent = make_agent("ai-1", labels=[])
    spend(agent, cost=0.5)
    other = make_agent("ai-2", labels=[])
    running = spend(other, cost=0.25, finish=None)  # running, with its usage so far
    actions.record_progress(other, running.id, 0.5, "compiling module 3 of 6", None)
    wide = monitor_frame(str(run.id), width=160)
    assert "cost $0.75 of $2.00 budget (38%)" in wide
    summary = wide[wide.index("Task summary") : wide.index("Agents")]
    active = wide[wide.index("Active tasks") : wide.index("Recently completed")]
    done = wide[wide.index("Recently completed") : wide.index("Next tasks")]
    assert "Cost" in summary and "$0.75" in summary
    assert "Cost" in active and "$0.25" in active
    assert "Cost" in done and "$0.50" in done
    # At 80 columns a cost column is the first to go from a table that would not fit at its natural width;
    # a table with room keeps it, and the header still says what the run cost.
    narrow = monitor_frame(str(run.id), width=80)
    assert "cost $0.75 of $2.00 budget (38%)" in narrow
    assert all(len(line) <= 80 for line in narrow.splitlines())
    summary = narrow[narrow.index("Task summary") : narrow.index("Agents")]
    active = narrow[narrow.index("Active tasks") : narrow.index("Recently completed")]
    done = narrow[narrow.index("Recently completed") : narrow.index("Next tasks")]
    assert "Cost" not in summary and "$0.75" not in summary
    assert "Cost" not in active and "Elapsed" in active and "compiling module 3 of 6" in active
    assert "Cost" in done and "$0.50" in done
    everything = monitor_frame(width=160)  # without a run id: the runs' costs in the summary
    assert "$0.75" in everything[everything.index("Task summary") : everything.index("Agents")]


def test_monitor_without_any_cost_has_no_cost_column(submit, make_agent):
    run = submit(doc({"key": "plan"}, name="free"))
    actions.claim_ready_tasks(make_agent("ai-1", labels=[]), 1)
    out = monitor_frame(str(run.id), width=160)
    assert "Cost" not in out and "cost $" not in out
