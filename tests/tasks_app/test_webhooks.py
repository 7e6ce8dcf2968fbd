"""Webhooks: the audit trail's transitions that matter (a run's end, a task failing for good, an approval or an
input awaited, a budget reached, an agent lost) are POSTed as JSON to the webhooks that want them, with a
Slack-style `text`, dashboard links and an HMAC signature; deliveries are retried with backoff on 5xx and
silence, final on other 4xx, never held up by a slow endpoint, and never sent twice for one event. Against a
real HTTP receiver on a loopback port."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.db import connections, transaction
from django.db.models import F
from django.db.models.functions import Now
from django.urls import reverse
from django.utils import timezone

from tasks_app import actions, jobs, webhooks
from tasks_app.models import Event, Task, Webhook, WebhookCursor, WebhookDelivery
from tests.conftest import doc

pytestmark = pytest.mark.django_db
SECRET = "correct horse battery staple"


class Receiver:
    """A webhook endpoint on a loopback port. It records every POST (its signature checked against `secret`)
    and answers with `answers` in turn (the last one repeating), after sleeping `delay` seconds."""

    def __init__(self, secret: str = SECRET):
        self.secret = secret
        self.requests: list[dict] = []
        self.answers = [200]
        self.delay = 0.0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                expected = "sha256=" + hmac.new(receiver.secret.encode(), raw, hashlib.sha256).hexdigest()
                receiver.requests.append({
                    "path": self.path, "headers": self.headers, "raw": raw, "json": json.loads(raw),  # any case
                    "signed": hmac.compare_digest(self.headers.get("X-CP-Signature", ""), expected),
                })  # fmt: skip
                status = receiver.answers[min(len(receiver.requests), len(receiver.answers)) - 1]
                time.sleep(receiver.delay)
                try:
                    self.send_response(status)
                    if status in (301, 302):
                        self.send_header("Location", "https://elsewhere.example/hook")
                    self.send_header("Content-Length", "10")
                    self.end_headers()
                    self.wfile.write(b"no thanks!" if status >= 300 else b"thank you!")
                except OSError:
                    pass  # the sender gave up waiting

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/cp"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self) -> list[str]:
        return [r["json"]["event"] for r in self.requests]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def hook(receiver):
    """`hook(events, **fields)`: a webhook to the receiver, signed with SECRET unless told otherwise."""

    def make(events, name=None, url=None, **fields):
        fields.setdefault("secret", SECRET)
        return Webhook.objects.create(name=name or "-".join(events), url=url or receiver.url, events=list(events),
                                      **fields)  # fmt: skip

    return make


@pytest.fixture(autouse=True)
def public_url(settings):
    settings.CP_PUBLIC_URL = "https://cp.example.com/"


def succeed_run(make_agent, submit, name="nightly", keys=("plan", "build")):
    """A run of simulated tasks (a chain), each done by an agent: the run succeeds."""
    agent = make_agent(f"ccg-{name}", labels=[])
    tasks = [{"key": k, **({"deps": [keys[i - 1]]} if i else {})} for i, k in enumerate(keys)]
    run = submit(doc(*tasks, name=name))
    for _ in keys:
        [got] = actions.claim_ready_tasks(agent, 1)
        actions.complete_attempt(agent, got["attempt_id"], "succeeded", {"ok": True}, "", 0)
    run.refresh_from_db()
    assert run.state == "succeeded"
    return run


def fail_attempt(agent, error="compiler exploded", exit_code=2):
    [got] = actions.claim_ready_tasks(agent, 1)
    return actions.complete_attempt(agent, got["attempt_id"], "failed", None, error, exit_code)


def wait_of(delivery) -> float:
    """Seconds from the database's now to the delivery's next try."""
    d = WebhookDelivery.objects.annotate(wait=F("next_try_at") - Now()).get(pk=delivery.pk)
    return d.wait.total_seconds()


def make_due(delivery) -> None:
    WebhookDelivery.objects.filter(pk=delivery.pk).update(next_try_at=Now() - timedelta(seconds=1))


# --- What notifies, and what the body says ---------------------------------------------------------------


def test_a_run_that_succeeds_sends_one_signed_run_succeeded_with_slack_text_and_links(
    receiver, hook, make_agent, submit
):
    webhook = hook(["run_succeeded", "run_failed", "task_failed"])
    run = succeed_run(make_agent, submit, "nightly")

    stats = webhooks.dispatch_now()

    assert stats["delivered"] == 1
    [req] = receiver.requests
    [delivery] = WebhookDelivery.objects.filter(webhook=webhook)
    assert req["path"] == "/hooks/cp"
    assert req["signed"], req["headers"]
    assert req["headers"]["Content-Type"] == "application/json"
    assert req["headers"]["X-CP-Event"] == "run_succeeded"
    assert req["headers"]["X-CP-Delivery"] == str(delivery.pk)
    body = req["json"]
    run_url = f"https://cp.example.com/runs/{run.id}/"
    # Slack, Mattermost and Teams show `text` as it is: one line with the run's name and a plain link.
    assert body["text"] == f"✅ The run “nightly” succeeded (2 tasks). {run_url}"
    assert body["event"] == "run_succeeded"
    assert body["url"] == run_url
    assert body["run"] == {"id": str(run.id), "name": "nightly", "url": run_url, "tasks": {"succeeded": 2}}
    assert body["task"] is None and body["agent"] is None
    assert body["event_id"] == Event.objects.get(run=run, kind="run", to_state="succeeded").id
    # The log keeps exactly the body sent.
    assert delivery.body == body and webhooks.encode(delivery.body) == req["raw"]
    assert (delivery.state, delivery.attempts, delivery.status_code, delivery.error) == ("delivered", 1, 200, "")
    assert delivery.delivered_at is not None and delivery.next_try_at is None


def test_without_a_public_url_links_are_paths_and_the_text_has_none(settings, receiver, hook, make_agent, submit):
    settings.CP_PUBLIC_URL = ""
    hook(["run_succeeded"])
    run = succeed_run(make_agent, submit, "local")
    webhooks.dispatch_now()
    [req] = receiver.requests
    assert req["json"]["url"] == f"/runs/{run.id}/"
    assert req["json"]["text"] == "✅ The run “local” succeeded (2 tasks)."


def test_a_webhook_without_a_secret_sends_unsigned(receiver, hook, make_agent, submit):
    hook(["run_succeeded"], secret="")
    succeed_run(make_agent, submit)
    webhooks.dispatch_now()
    [req] = receiver.requests
    assert "X-CP-Signature" not in req["headers"]


def test_a_task_failing_for_good_sends_task_failed_and_a_retried_one_does_not(receiver, hook, make_agent, submit):
    hook(["task_failed"])
    agent = make_agent("ccg-1", labels=[])
    run = submit(
        doc({"key": "build", "max_attempts": 2, "retry_delay_s": 0}, {"key": "ship", "deps": ["build"]}, name="release")
    )

    assert fail_attempt(agent, "flaky network") == "ready"  # one attempt left: not failed yet
    webhooks.dispatch_now()
    assert receiver.requests == []

    assert fail_attempt(agent, "compiler exploded\nat line 3") == "failed"
    webhooks.dispatch_now()
    [req] = receiver.requests  # task_failed only: the run's failure is not wanted, the skipped ship is none
    build = Task.objects.get(run=run, key="build")
    task_url = f"https://cp.example.com/tasks/{build.id}/"
    body = req["json"]
    assert body["event"] == "task_failed"
    assert body["task"] == {"id": str(build.id), "key": "build", "title": "build", "url": task_url,
                            "error": "compiler exploded at line 3", "attempt": 2}  # fmt: skip
    assert body["run"]["name"] == "release" and body["url"] == task_url
    assert body["text"] == (
        f"❌ The task build of the run “release” failed after 2 attempts: compiler exploded at line 3. {task_url}"
    )


def test_a_failed_run_lists_its_failed_tasks(receiver, hook, make_agent, submit):
    hook(["run_failed"])
    agent = make_agent("ccg-1", labels=[])
    submit(doc({"key": "lint", "max_attempts": 1}, {"key": "ship", "deps": ["lint"]}, name="r&d <1>"))
    fail_attempt(agent)
    webhooks.dispatch_now()
    [req] = receiver.requests
    assert req["json"]["run"]["tasks"] == {"failed": 1, "skipped": 1}
    # Slack's escapes for &, < and >.
    assert req["json"]["text"].startswith("❌ The run “r&amp;d &lt;1&gt;” failed: 1 of 2 tasks failed: lint. ")


def test_a_webhook_hears_only_the_events_it_wants_and_only_while_enabled(receiver, hook, make_agent, submit):
    hook(["agent_lost"], name="agents only")
    hook(["run_succeeded"], name="switched off", enabled=False)
    succeed_run(make_agent, submit)
    stats = webhooks.dispatch_now()
    assert stats["queued"] == 0
    assert receiver.requests == []
    assert WebhookDelivery.objects.count() == 0


def test_an_agent_going_silent_sends_agent_lost(receiver, hook, make_agent):
    from agents_app.models import Agent

    hook(["agent_lost"])
    agent = make_agent("ccg-7", labels=[])
    Agent.objects.filter(pk=agent["id"]).update(last_seen_at=timezone.now() - timedelta(hours=1), hostname="gpu-box")
    assert actions.sweep(force=True)["agents_offline"] == 1

    webhooks.dispatch_now()
    [req] = receiver.requests
    body = req["json"]
    assert body["event"] == "agent_lost"
    assert body["agent"] == {"id": str(agent["id"]), "name": "ccg-7", "hostname": "gpu-box"}
    assert body["url"] == "https://cp.example.com/agents/"
    assert body["detail"] == {"reason": "silent"}
    assert body["text"].startswith("🔌 The agent ccg-7 (gpu-box) is offline (silent)")


def test_a_run_paused_by_its_budget_sends_budget_reached_and_an_operators_pause_does_not(
    receiver, hook, make_agent, submit
):
    hook(["budget_reached"])
    agent = make_agent("ccg-1", labels=[])
    by_hand = submit(doc({"key": "a"}, name="paused by hand"))
    actions.pause_run(by_hand.id, "user:olivia")
    run = submit(doc({"key": "a"}, name="budgeted", max_cost_usd=0.05))
    [got] = actions.claim_ready_tasks(agent, 1)
    actions.record_progress(agent, got["attempt_id"], 0.5, "thinking", None, usage={"cost_usd": 0.06})
    run.refresh_from_db()
    assert run.state == "paused"

    webhooks.dispatch_now()
    [req] = receiver.requests
    assert req["json"]["event"] == "budget_reached" and req["json"]["run"]["name"] == "budgeted"
    assert req["json"]["text"].startswith(
        "💸 The run “budgeted” is paused: budget_exceeded: the run's cost $0.0600 reached max_cost_usd $0.05."
    )


def test_an_approval_task_awaiting_sends_approval_needed(receiver, hook, submit):
    hook(["approval_needed"])
    run = submit(doc({"key": "go", "executor": "approval", "title": "Ship it?"}, name="deploy"))
    webhooks.dispatch_now()
    [req] = receiver.requests
    go = Task.objects.get(run=run, key="go")
    assert req["json"]["event"] == "approval_needed"
    assert req["json"]["text"] == (
        f"✋ The task go (Ship it?) of the run “deploy” awaits approval. https://cp.example.com/tasks/{go.id}/"
    )


def test_a_canceled_run_sends_run_canceled_naming_who(receiver, hook, submit):
    hook(["run_canceled"])
    run = submit(doc({"key": "a"}, name="oops"))
    actions.cancel_run(run.id, "user:olivia")
    webhooks.dispatch_now()
    [req] = receiver.requests
    assert req["json"]["text"].startswith("⏹️ The run “oops” was canceled by user:olivia.")


@pytest.mark.parametrize(
    ("kind", "frm", "to", "detail", "expected"),
    [
        ("run", "running", "succeeded", {}, "run_succeeded"),
        ("run", "running", "failed", {}, "run_failed"),
        ("run", "paused", "canceled", {}, "run_canceled"),
        ("run", "running", "paused", {"reason": "budget_exceeded: the run's cost …"}, "budget_reached"),
        ("run", "", "paused", {"reason": "budget_exceeded: today's cost reached the daily cap …"}, "budget_reached"),
        ("run", "running", "paused", {}, None),  # an operator's pause
        ("run", "", "running", {"tasks": 3}, None),
        ("task", "running", "failed", {"attempt": 3}, "task_failed"),
        ("task", "running", "ready", {"attempt": 1}, None),  # failed with tries left
        ("task", "blocked", "skipped", {}, None),
        ("task", "blocked", "awaiting_approval", {}, "approval_needed"),
        ("task", "", "awaiting_approval", {}, "approval_needed"),
        ("input", "", "pending", {"question": "may I run rm?"}, "input_needed"),
        ("input", "pending", "answered", {}, None),
        ("agent", "online", "offline", {"reason": "silent"}, "agent_lost"),
        ("agent", "", "online", {}, None),
        ("attempt", "running", "failed", {}, None),
    ],
)
def test_which_audit_trail_events_notify(kind, frm, to, detail, expected):
    assert webhooks.webhook_event(kind, to, detail) == expected


def test_an_agents_question_sends_input_needed(receiver, hook, make_agent, submit):
    hook(["input_needed"])
    agent = make_agent("cg-1", labels=[])
    run = submit(doc({"key": "edit", "executor": "claude", "prompt": "tidy up"}, name="refactor"))
    [got] = actions.claim_ready_tasks(agent, 1)
    request_id = actions.create_input_request(
        agent, got["attempt_id"], kind="permission", tool="Bash", tool_input={"command": "rm -rf build"},
        question="", timeout_s=600,
    )  # fmt: skip
    webhooks.dispatch_now()
    [req] = receiver.requests
    task = Task.objects.get(run=run)
    body = req["json"]
    assert body["event"] == "input_needed"
    assert body["input"] == {"id": request_id, "kind": "permission", "tool": "Bash",
                             "input": {"command": "rm -rf build"}, "question": ""}  # fmt: skip
    assert body["agent"]["name"] == "cg-1" and body["task"]["key"] == "edit"
    assert body["text"] == (
        "💬 The task edit of the run “refactor” needs input: may it use Bash (rm -rf build)? "
        f"https://cp.example.com/tasks/{task.id}/"
    )


def test_a_webhook_made_later_hears_nothing_of_what_came_before(receiver, hook, make_agent, submit):
    succeed_run(make_agent, submit, "before")
    Event.objects.filter(kind="run").update(created_at=F("created_at") - timedelta(minutes=2))
    hook(["run_succeeded"])
    succeed_run(make_agent, submit, "after")
    webhooks.dispatch_now()
    assert [r["json"]["run"]["name"] for r in receiver.requests] == ["after"]


# --- Retries, final answers, timeouts ----------------------------------------------------------------------


def test_a_500_is_retried_with_backoff_then_delivered_counting_its_attempts(receiver, hook, make_agent, submit):
    receiver.answers = [500, 503, 200]
    webhook = hook(["run_succeeded"])
    succeed_run(make_agent, submit)

    webhooks.dispatch_now()
    [delivery] = WebhookDelivery.objects.filter(webhook=webhook)
    assert (delivery.state, delivery.attempts, delivery.status_code) == ("pending", 1, 500)
    assert delivery.error == "HTTP 500: no thanks!"
    assert 9 <= wait_of(delivery) <= 10.5  # CP_WEBHOOK_RETRY_DELAYS_S: 10 s, then 60, 300, 1800

    webhooks.dispatch_now()  # not due yet
    assert len(receiver.requests) == 1

    make_due(delivery)
    webhooks.dispatch_now()
    delivery.refresh_from_db()
    assert (delivery.state, delivery.attempts, delivery.status_code) == ("pending", 2, 503)
    assert 59 <= wait_of(delivery) <= 60.5

    make_due(delivery)
    webhooks.dispatch_now()
    delivery.refresh_from_db()
    assert (delivery.state, delivery.attempts, delivery.status_code, delivery.error) == ("delivered", 3, 200, "")
    # Every try is the same delivery, the same bytes, the same signature.
    assert {r["headers"]["X-CP-Delivery"] for r in receiver.requests} == {str(delivery.pk)}
    assert len({r["raw"] for r in receiver.requests}) == 1 and all(r["signed"] for r in receiver.requests)


def test_after_its_last_try_a_delivery_fails(settings, receiver, hook, make_agent, submit):
    settings.CP_WEBHOOK_RETRY_DELAYS_S = [0.0, 0.0]  # three tries, each due at once
    receiver.answers = [502]
    webhook = hook(["run_succeeded"])
    succeed_run(make_agent, submit)
    for _ in range(5):
        webhooks.dispatch_now()
    [delivery] = WebhookDelivery.objects.filter(webhook=webhook)
    assert len(receiver.requests) == 3
    assert (delivery.state, delivery.attempts, delivery.next_try_at) == ("failed", 3, None)
    assert delivery.error == "HTTP 502: no thanks! (gave up after 3 tries)"


@pytest.mark.parametrize(
    ("status", "final"),
    [(404, True), (400, True), (401, True), (410, True), (301, True), (408, False), (429, False), (500, False)],
)
def test_which_answers_are_final(receiver, hook, make_agent, submit, status, final):
    receiver.answers = [status]
    webhook = hook(["run_succeeded"])
    succeed_run(make_agent, submit)
    webhooks.dispatch_now()
    [delivery] = WebhookDelivery.objects.filter(webhook=webhook)
    assert delivery.status_code == status and delivery.attempts == 1
    assert delivery.state == ("failed" if final else "pending")
    make_due(delivery)
    webhooks.dispatch_now()
    assert len(receiver.requests) == (1 if final else 2)


def test_a_404_is_final_and_says_so(receiver, hook, make_agent, submit):
    receiver.answers = [404]
    webhook = hook(["run_succeeded"])
    succeed_run(make_agent, submit)
    webhooks.dispatch_now()
    [delivery] = WebhookDelivery.objects.filter(webhook=webhook)
    assert (delivery.state, delivery.attempts, delivery.error) == ("failed", 1, "HTTP 404: no thanks!")
    assert delivery.next_try_at is None


def test_a_redirect_is_not_followed(receiver, hook, make_agent, submit):
    receiver.answers = [302]
    webhook = hook(["run_succeeded"])
    succeed_run(make_agent, submit)
    webhooks.dispatch_now()
    [delivery] = WebhookDelivery.objects.filter(webhook=webhook)
    assert delivery.state == "failed" and len(receiver.requests) == 1
    assert "redirected to https://elsewhere.example/hook" in delivery.error


def test_an_unreachable_endpoint_is_retried(hook, make_agent, submit):
    from control_plane.launch import free_port

    webhook = hook(["run_succeeded"], url=f"http://127.0.0.1:{free_port()}/nobody")
    succeed_run(make_agent, submit)
    webhooks.dispatch_now()
    [delivery] = WebhookDelivery.objects.filter(webhook=webhook)
    assert (delivery.state, delivery.attempts, delivery.status_code) == ("pending", 1, None)
    assert "Connection refused" in delivery.error


def test_slow_receivers_do_not_hold_the_dispatch_past_the_timeout(settings, receiver, hook, make_agent, submit):
    settings.CP_WEBHOOK_TIMEOUT_S = 1.0
    fast = Receiver()
    try:
        receiver.delay = 4.0
        slow = [hook(["run_succeeded"], name=f"slow-{i}") for i in range(3)]
        quick = hook(["run_succeeded"], name="quick", url=fast.url)
        succeed_run(make_agent, submit)

        started = time.monotonic()
        stats = webhooks.dispatch_now()
        took = time.monotonic() - started

        assert took < 2.5, took  # one timeout for all three, not one each
        assert stats["delivered"] == 1 and stats["retrying"] == 3
        assert WebhookDelivery.objects.get(webhook=quick).state == "delivered"
        for d in WebhookDelivery.objects.filter(webhook__in=slow):
            assert (d.state, d.attempts, d.status_code, d.error) == ("pending", 1, None, "no answer within 1 s")
            assert wait_of(d) > 5
    finally:
        fast.close()


# --- The cursor ----------------------------------------------------------------------------------------


def test_a_second_dispatch_sends_nothing_new(receiver, hook, make_agent, submit):
    hook(["run_succeeded"])
    succeed_run(make_agent, submit)
    assert webhooks.dispatch_now()["queued"] == 1
    again = webhooks.dispatch_now()
    assert again["queued"] == 0 and again["sent"] == 0
    assert len(receiver.requests) == 1
    assert WebhookDelivery.objects.count() == 1


@pytest.mark.alone  # the cursor settles on pg_current_snapshot()'s xmin, which is the cluster's
@pytest.mark.django_db(transaction=True)
def test_the_cursor_settles_past_what_was_read_and_picks_up_what_follows(receiver, hook, make_agent, submit):
    hook(["run_succeeded"])
    succeed_run(make_agent, submit, "first")
    webhooks.dispatch_now()
    webhooks.dispatch_now()  # the transactions that wrote the events have ended: the cursor moves past them
    last = Event.objects.order_by("-id").first().id
    assert WebhookCursor.objects.get().last_event_id == last
    succeed_run(make_agent, submit, "second")
    webhooks.dispatch_now()
    assert [r["json"]["run"]["name"] for r in receiver.requests] == ["first", "second"]
    assert WebhookDelivery.objects.count() == 2


@pytest.mark.alone  # the cursor settles on pg_current_snapshot()'s xmin, which is the cluster's
@pytest.mark.django_db(transaction=True)
def test_an_event_committed_after_a_later_one_is_still_notified(receiver, hook, submit):
    """Event ids are drawn before commit: a transaction still open holds a lower id than one committed since.
    The cursor does not move past it while it may still commit."""
    hook(["run_canceled"])
    slow_run, quick_run = submit(doc({"key": "a"}, name="slow")), submit(doc({"key": "a"}, name="quick"))
    drawn, commit = threading.Event(), threading.Event()

    def slow_writer():
        try:
            with transaction.atomic():
                Event.objects.create(run=slow_run, kind="run", from_state="running", to_state="canceled",
                                     actor="user:slow")  # fmt: skip
                drawn.set()
                commit.wait(10)
        finally:
            connections.close_all()

    writer = threading.Thread(target=slow_writer)
    writer.start()
    assert drawn.wait(10)
    quick = Event.objects.create(run=quick_run, kind="run", from_state="running", to_state="canceled", actor="user:q")
    for _ in range(3):
        webhooks.dispatch_now()
    assert [r["json"]["run"]["name"] for r in receiver.requests] == ["quick"]
    assert WebhookCursor.objects.get().last_event_id < quick.id  # not past the open transaction's id

    commit.set()
    writer.join(10)
    webhooks.dispatch_now()
    assert [r["json"]["run"]["name"] for r in receiver.requests] == ["quick", "slow"]
    webhooks.dispatch_now()
    webhooks.dispatch_now()
    assert WebhookCursor.objects.get().last_event_id == quick.id
    assert len(receiver.requests) == 2


@pytest.mark.django_db(transaction=True)
def test_a_stuck_endpoint_never_delays_the_scheduler(settings, receiver, hook, make_agent, submit):
    """While a dispatch waits on an endpoint, claims and completions go on at their usual speed: the sends
    hold no lock and no transaction open."""
    settings.CP_WEBHOOK_TIMEOUT_S = 5.0
    receiver.delay = 4.0
    hook(["run_succeeded"])
    succeed_run(make_agent, submit, "first")

    def dispatch():
        try:
            webhooks.dispatch_now()
        finally:
            connections.close_all()

    sender = threading.Thread(target=dispatch)
    sender.start()
    time.sleep(0.5)
    assert len(receiver.requests) == 1 and sender.is_alive()  # the endpoint is still thinking
    started = time.monotonic()
    succeed_run(make_agent, submit, "second")
    assert time.monotonic() - started < 1.5
    assert sender.is_alive()
    sender.join(10)
    assert WebhookDelivery.objects.get(body__run__name="first").state == "delivered"


# --- The q cluster's job ------------------------------------------------------------------------------


def test_the_job_is_scheduled_every_minute_by_migrate():
    from django_q.models import Schedule

    schedule = Schedule.objects.get(name=jobs.WEBHOOKS_SCHEDULE)
    assert (schedule.func, schedule.schedule_type, schedule.minutes, schedule.repeats) == (
        "tasks_app.jobs.webhooks_job", Schedule.MINUTES, 1, -1,
    )  # fmt: skip


def test_the_job_sends_and_without_webhooks_makes_one_pass(settings, receiver, hook, make_agent, submit):
    settings.CP_WEBHOOK_WINDOW_S = 30.0
    started = time.monotonic()
    assert jobs.webhooks_job()["passes"] == 1  # nothing enabled: no polling
    assert time.monotonic() - started < 2

    settings.CP_WEBHOOK_WINDOW_S, settings.CP_WEBHOOK_POLL_S = 0.6, 0.2
    hook(["run_succeeded"])
    succeed_run(make_agent, submit)
    result = jobs.webhooks_job()
    assert result["delivered"] == 1 and result["passes"] >= 2
    assert len(receiver.requests) == 1


def test_one_job_polls_at_a_time(settings, hook):
    settings.CP_WEBHOOK_WINDOW_S = 30.0
    hook(["run_succeeded"])
    WebhookCursor.objects.update_or_create(pk=1, defaults={"polling_until": timezone.now() + timedelta(minutes=1)})
    assert jobs.webhooks_job()["skipped"] == "another job is polling"


def test_old_finished_deliveries_are_pruned(hook):
    webhook = hook(["run_succeeded"])
    for state in ("delivered", "failed", "pending"):
        WebhookDelivery.objects.create(webhook=webhook, event="run_succeeded", body={}, state=state)
    WebhookDelivery.objects.update(created_at=Now() - timedelta(days=31))
    WebhookDelivery.objects.create(webhook=webhook, event="run_succeeded", body={}, state="delivered")
    assert webhooks.prune() == 2
    assert sorted(WebhookDelivery.objects.values_list("state", flat=True)) == ["delivered", "pending"]


# --- The admin -----------------------------------------------------------------------------------------


@pytest.fixture
def admin_client(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("ada", "ada@example.com", "pw-ada-12345"))
    return client


def add_form(**fields):
    data = {"name": "team chat", "url": "https://hooks.example.com/T1/B2/x", "events": ["run_failed", "agent_lost"],
            "enabled": "on", "new_secret": "s3cret"}  # fmt: skip
    data.update(fields)
    return {k: v for k, v in data.items() if v is not None}


def test_the_admin_pages_of_webhooks_and_deliveries_render(admin_client, receiver, hook, make_agent, submit):
    webhook = hook(["run_succeeded"])
    succeed_run(make_agent, submit)
    webhooks.dispatch_now()
    delivery = WebhookDelivery.objects.get()
    pages = {
        reverse("admin:tasks_app_webhook_changelist"): ["run succeeded", "1 delivered, 0 pending, 0 failed"],
        reverse("admin:tasks_app_webhook_add"): ["agent lost", "Remove the secret"],
        reverse("admin:tasks_app_webhook_change", args=[webhook.pk]): [receiver.url, "Signature"],
        reverse("admin:tasks_app_webhookdelivery_changelist"): ["run_succeeded", "delivered"],
        reverse("admin:tasks_app_webhookdelivery_changelist") + "?state=failed": ["0 webhook deliveries"],
        reverse("admin:tasks_app_webhookdelivery_change", args=[delivery.pk]): ["succeeded (2 tasks)"],
    }
    for url, texts in pages.items():
        response = admin_client.get(url)
        assert response.status_code == 200, url
        page = response.content.decode()
        for text in texts:
            assert text in page, (url, text)
        assert SECRET not in page, url  # the secret is never shown


@pytest.mark.parametrize(
    "url",
    ["ftp://files.example.com/hook", "javascript:alert(1)", "http://", "https://user:pw@hooks.example.com/x",
     "https://hooks.example.com:99999/x", "not a url"],
)  # fmt: skip
def test_the_admin_refuses_urls_it_cannot_post_to(admin_client, url):
    response = admin_client.post(reverse("admin:tasks_app_webhook_add"), add_form(url=url))
    assert response.status_code == 200
    assert response.context["adminform"].form.errors.get("url"), url
    assert not Webhook.objects.exists()


def test_the_admin_adds_a_webhook_and_keeps_its_secret_unless_told(admin_client):
    response = admin_client.post(reverse("admin:tasks_app_webhook_add"), add_form())
    assert response.status_code == 302, response.content.decode()[:2000]
    webhook = Webhook.objects.get()
    assert (webhook.url, webhook.events, webhook.secret, webhook.enabled) == (
        "https://hooks.example.com/T1/B2/x", ["run_failed", "agent_lost"], "s3cret", True,
    )  # fmt: skip
    change = reverse("admin:tasks_app_webhook_change", args=[webhook.pk])
    admin_client.post(change, add_form(new_secret="", events=["task_failed"]))
    webhook.refresh_from_db()
    assert (webhook.events, webhook.secret) == (["task_failed"], "s3cret")
    admin_client.post(change, add_form(new_secret="", clear_secret="on"))
    webhook.refresh_from_db()
    assert webhook.secret == ""
    response = admin_client.post(reverse("admin:tasks_app_webhook_add"), add_form(name="none", events=[]))
    assert response.context["adminform"].form.errors.get("events")


def test_the_admin_sends_a_test_notification(admin_client, receiver, hook):
    webhook = hook(["run_failed"])
    response = admin_client.post(
        reverse("admin:tasks_app_webhook_changelist"),
        {"action": "send_test", "_selected_action": [webhook.pk]},
        follow=True,
    )
    assert "the test was delivered (HTTP 200)" in response.content.decode()
    [req] = receiver.requests
    assert req["signed"] and req["json"]["event"] == "test" and req["headers"]["X-CP-Event"] == "test"
    receiver.answers = [200, 404]
    response = admin_client.post(
        reverse("admin:tasks_app_webhook_changelist"), {"action": "send_test", "_selected_action": [webhook.pk]},
        follow=True,
    )  # fmt: skip
    assert "the test failed: HTTP 404: no thanks!" in response.content.decode()


def test_the_admin_sends_a_failed_delivery_again(admin_client, receiver, hook, make_agent, submit):
    receiver.answers = [404, 200]
    webhook = hook(["run_succeeded"])
    succeed_run(make_agent, submit)
    webhooks.dispatch_now()
    delivery = WebhookDelivery.objects.get(webhook=webhook)
    assert delivery.state == "failed"
    admin_client.post(
        reverse("admin:tasks_app_webhookdelivery_changelist"),
        {"action": "send_again", "_selected_action": [delivery.pk]},
    )
    webhooks.dispatch_now()
    delivery.refresh_from_db()
    assert (delivery.state, delivery.attempts, delivery.status_code) == ("delivered", 2, 200)
