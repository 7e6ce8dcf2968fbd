"""Webhooks: what happens to runs, tasks and agents, POSTed as JSON to the URLs set up in the admin.

They follow the audit trail, so the scheduler knows nothing of them: every transition already writes its
`Event` rows (tasks_app.actions). A django-q2 job (tasks_app.jobs.webhooks_job, scheduled every minute) scans
the events after a cursor (WebhookCursor), maps those that matter to webhook events (EVENT_RULES), creates a
WebhookDelivery for each enabled webhook that wants one, and sends the due deliveries, retrying with backoff.
Nothing here runs in a server process or holds a lock a transition waits for: the scan reads the trail with
plain MVCC reads and locks only its own rows, and HTTP never happens inside a transaction. A slow or failing
endpoint delays its own notifications, nothing else.

The body is JSON: a Slack-compatible `text` (one line, plain URLs, Slack's &<> escapes), which Slack,
Mattermost and Teams incoming webhooks show as is, and structured fields (event, run, task, agent, links:
absolute with CP_PUBLIC_URL). Headers: X-CP-Event, X-CP-Delivery (the delivery's id, the same on every try)
and, with a secret, X-CP-Signature: sha256=<hex HMAC-SHA256 of the raw body keyed by the secret>. Delivery is
at least once: a receiver that must not act twice dedupes on X-CP-Delivery.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import timedelta
from urllib.parse import urlsplit

from django import db, forms
from django.conf import settings
from django.db import connection, transaction
from django.db.models import Count, F, Q
from django.db.models.functions import Now
from django.urls import reverse

from .models import WEBHOOK_EVENTS, Attempt, Event, InputRequest, Run, Task, Webhook, WebhookCursor, WebhookDelivery

log = logging.getLogger(__name__)

# Audit-trail events (kind, to_state) that notify, and as what. A run's pause notifies only when a budget
# paused it (detail.reason "budget_exceeded: …"): by `system:budget`, or at submit under the daily cap.
# Approval and input requests: a task entering awaiting_approval, an `input` event entering pending.
EVENT_RULES = {
    ("run", "succeeded"): "run_succeeded",
    ("run", "failed"): "run_failed",
    ("run", "canceled"): "run_canceled",
    ("run", "paused"): "budget_reached",
    ("task", "failed"): "task_failed",  # for good: a failed attempt with tries left takes the task to ready
    ("task", "awaiting_approval"): "approval_needed",
    ("input", "pending"): "input_needed",
    ("agent", "offline"): "agent_lost",  # the sweeper's online -> offline (detail.reason "silent")
}
assert set(EVENT_RULES.values()) == set(WEBHOOK_EVENTS)

# Events read per scan: a backlog (the q cluster was down) is worked through in batches.
SCAN_BATCH = 2000
# A transaction that wrote events and stayed open this long no longer holds the cursor back (see
# WebhookCursor); none of tasks_app.actions' lasts more than a moment.
SETTLE_MAX_S = 600
# A webhook hears of events from this long before it was made on (an event's time is its transaction's
# start), not of older ones: a cursor left behind (the q cluster was down) never floods a new webhook.
CREATED_GRACE = timedelta(minutes=1)
# A try whose outcome was never recorded (its job died) is due again this long after it began.
LEASE_EXTRA_S = 60
USER_AGENT = "agent-control-plane-webhooks/1"


def webhook_event(kind: str, to_state: str, detail) -> str | None:
    """The webhook event an audit-trail event is, if any."""
    name = EVENT_RULES.get((kind, to_state))
    if name == "budget_reached" and not str((detail or {}).get("reason", "")).startswith("budget_exceeded"):
        return None
    return name


def _rules_filter() -> Q:
    by_kind: dict[str, list[str]] = {}
    for kind, to_state in EVENT_RULES:
        by_kind.setdefault(kind, []).append(to_state)
    query = Q(pk__in=[])
    for kind, states in by_kind.items():
        query |= Q(kind=kind, to_state__in=states)
    return query


# --- Scanning the audit trail --------------------------------------------------------------------------


def scan() -> dict:
    """Read the audit trail after the cursor and queue a delivery for every enabled webhook that wants an
    event it finds (not older than the webhook, see CREATED_GRACE). Returns what it did; {"skipped": True}
    while another process scans."""
    with transaction.atomic():
        cursor = _lock_cursor()
        if cursor is None:
            return {"skipped": True}
        with connection.cursor() as cur:
            # One snapshot: the highest event id now, and which transactions had ended (xmin) or not begun
            # (xmax). Those ending later than xmin may yet make ids below the highest visible.
            cur.execute(
                "SELECT (SELECT max(id) FROM tasks_app_event), pg_snapshot_xmin(s)::text::bigint,"
                " pg_snapshot_xmax(s)::text::bigint, now() FROM pg_current_snapshot() AS s"
            )
            top, xmin, xmax, now = cur.fetchone()
        top = top or 0
        hooks = list(Webhook.objects.filter(enabled=True))
        rows: list[Event] = []
        if hooks and top > cursor.last_event_id:
            rows = list(
                Event.objects.filter(_rules_filter(), id__gt=cursor.last_event_id, id__lte=top).order_by("id")[
                    :SCAN_BATCH
                ]
            )
        read_to = rows[-1].id if len(rows) == SCAN_BATCH else top
        queued = _queue(rows, hooks)
        _advance(cursor, read_to, xmin, xmax, now)
        cursor.save()
    return {"events": len(rows), "queued": queued, "read_to": read_to, "cursor": cursor.last_event_id}


def _lock_cursor() -> WebhookCursor | None:
    """The cursor row, locked (SELECT … FOR UPDATE SKIP LOCKED: a second scanner skips its pass rather than
    queue behind the first); None when another process holds it."""
    locked = WebhookCursor.objects.select_for_update(skip_locked=True).filter(pk=1)
    cursor = locked.first()
    if cursor is None and not WebhookCursor.objects.filter(pk=1).exists():
        WebhookCursor.objects.bulk_create([WebhookCursor(pk=1)], ignore_conflicts=True)
        cursor = locked.first()
    return cursor


def _advance(cursor: WebhookCursor, read_to: int, xmin: int, xmax: int, now) -> None:
    """Move the cursor past what can no longer change (see WebhookCursor). `read_to`: every event up to it
    visible now has been read; `xmin`, `xmax`: of the snapshot that saw the highest id, taken before that read.

    A transaction that drew an id up to `read_to` had an xid below `xmax` (all of tasks_app.actions' write
    before or while they insert events), so once `xmin` passes it, every such transaction has ended and its
    events, if it committed, were visible to this read."""
    if cursor.pending_xmax is not None:
        ended = xmin >= cursor.pending_xmax
        if ended or cursor.pending_at < now - timedelta(seconds=SETTLE_MAX_S):
            if not ended:
                log.warning(
                    "webhooks: a transaction open for over %d s held back the audit trail's scan; reading on past"
                    " event %d (an event it writes below that is not notified)", SETTLE_MAX_S, cursor.pending_event_id
                )  # fmt: skip
            cursor.last_event_id = max(cursor.last_event_id, min(cursor.pending_event_id, read_to))
            cursor.pending_event_id = cursor.pending_xmax = cursor.pending_at = None
    if cursor.pending_xmax is None and read_to > cursor.last_event_id:
        cursor.pending_event_id, cursor.pending_xmax, cursor.pending_at = read_to, xmax, now


def _queue(rows: list[Event], hooks: list[Webhook]) -> int:
    """Deliveries for the events read (those not queued by an earlier read of the same ids)."""
    wanted = [(e, name) for e in rows if (name := webhook_event(e.kind, e.to_state, e.detail))]
    pairs = [
        (e, name, h) for e, name in wanted for h in hooks
        if name in h.events and e.created_at >= h.created_at - CREATED_GRACE
    ]  # fmt: skip
    if not pairs:
        return 0
    done = set(
        WebhookDelivery.objects.filter(event_id__in={e.id for e, _, _ in pairs}).values_list("event_id", "webhook_id")
    )
    pairs = [(e, name, h) for e, name, h in pairs if (e.id, h.id) not in done]
    bodies = build_bodies([(e, name) for e, name, _ in pairs])
    WebhookDelivery.objects.bulk_create(
        [
            WebhookDelivery(webhook=h, event=name, event_id=e.id, body=bodies[e.id], next_try_at=Now())
            for e, name, h in pairs
        ],
        ignore_conflicts=True,  # the cursor's lock already keeps scans apart: a backstop
    )
    return len(pairs)


# --- Bodies --------------------------------------------------------------------------------------------


def link(path: str) -> str:
    """A dashboard page's address: absolute with CP_PUBLIC_URL, else the bare path."""
    base = (settings.CP_PUBLIC_URL or "").rstrip("/")
    return f"{base}{path}" if base else path


def _esc(text) -> str:
    """Slack's three escapes (Mattermost and Teams show them as the characters)."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _clip(text: str, limit: int = 300) -> str:
    text = " ".join((text or "").split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def build_bodies(events: list[tuple[Event, str]]) -> dict[int, dict]:
    """{event id: the body that tells of it} for (event, webhook event) pairs; a few queries for them all."""
    from agents_app.models import Agent

    events = list({e.id: (e, name) for e, name in events}.values())
    runs = Run.objects.only("id", "name", "state").in_bulk({e.run_id for e, _ in events if e.run_id})
    tasks = Task.objects.only("id", "key", "title", "state", "run_id", "max_attempts").in_bulk(
        {e.task_id for e, _ in events if e.task_id}
    )
    attempts = Attempt.objects.only("id", "number", "error", "exit_code").in_bulk(
        {e.attempt_id for e, _ in events if e.attempt_id}
    )
    agents = Agent.objects.only("id", "name", "hostname").in_bulk({e.agent_id for e, _ in events if e.agent_id})
    asked = InputRequest.objects.only("id", "kind", "tool", "input", "question").in_bulk(
        {(e.detail or {}).get("request") for e, name in events if name == "input_needed"} - {None}
    )
    finished = {e.run_id for e, name in events if name.startswith("run_") and e.run_id}
    counts: dict = {}
    for row in Task.objects.filter(run_id__in=finished).values("run_id", "state").annotate(n=Count("id")):
        counts.setdefault(row["run_id"], {})[row["state"]] = row["n"]
    return {
        e.id: _body(e, name, runs.get(e.run_id), tasks.get(e.task_id), attempts.get(e.attempt_id),
                    agents.get(e.agent_id), counts.get(e.run_id), asked.get(_uuid((e.detail or {}).get("request"))))
        for e, name in events
    }  # fmt: skip


def _uuid(value):
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def _body(event: Event, name: str, run, task, attempt, agent, counts, request=None) -> dict:
    detail = event.detail or {}
    run_part = task_part = agent_part = input_part = None
    url = ""
    if run is not None:
        url = link(reverse("run", args=[run.pk]))
        run_part = {"id": str(run.pk), "name": run.name, "url": url}
        if counts is not None:
            run_part["tasks"] = counts
    if task is not None:
        url = link(reverse("task", args=[task.pk]))
        task_part = {"id": str(task.pk), "key": task.key, "title": task.title, "url": url}
        if name == "task_failed":
            task_part["error"] = _task_error(detail, attempt)
            task_part["attempt"] = detail.get("attempt") or (attempt.number if attempt else None)
    if agent is not None:
        url = url or link(reverse("agents"))
        agent_part = {"id": str(agent.pk), "name": agent.name, "hostname": agent.hostname}
    if request is not None:
        input_part = {"id": str(request.pk), "kind": request.kind, "tool": request.tool, "input": request.input,
                      "question": request.question}  # fmt: skip
    text = _text(event, name, run, task, agent, counts, task_part, input_part)
    if url.startswith(("http://", "https://")):
        text = f"{text} {url}"
    return {
        "text": text,
        "event": name,
        "event_id": event.id,
        "occurred_at": event.created_at.isoformat(),
        "actor": event.actor,
        "url": url,
        "run": run_part,
        "task": task_part,
        "agent": agent_part,
        **({"input": input_part} if name == "input_needed" else {}),
        "detail": detail,
    }


def _task_error(detail: dict, attempt) -> str:
    if detail.get("decision") == "rejected":
        return _clip(detail.get("message") or "rejected")
    if attempt is None:
        return ""
    if attempt.error:
        return _clip(attempt.error)
    return f"exit code {attempt.exit_code}" if attempt.exit_code not in (None, 0) else ""


def _text(event: Event, name: str, run, task, agent, counts, task_part, input_part=None) -> str:
    detail = event.detail or {}
    run_name = f"run “{_esc(run.name)}”" if run is not None else "a run"
    task_name = f"task {_esc(task.key)}" if task is not None else "a task"
    counts = counts or {}
    total = sum(counts.values())
    if name == "run_succeeded":
        return f"✅ The {run_name} succeeded ({total} task{'s' if total != 1 else ''})."
    if name == "run_failed":
        failed = counts.get("failed", 0)
        keys = []
        if run is not None and failed:
            keys = list(Task.objects.filter(run_id=run.pk, state="failed").order_by("depth", "key")[:5]
                        .values_list("key", flat=True))  # fmt: skip
        which = f": {', '.join(_esc(k) for k in keys)}{'…' if failed > len(keys) else ''}" if keys else ""
        return f"❌ The {run_name} failed: {failed} of {total} tasks failed{which}."
    if name == "run_canceled":
        return f"⏹️ The {run_name} was canceled by {_esc(event.actor)}."
    if name == "budget_reached":
        return f"💸 The {run_name} is paused: {_esc(_clip(str(detail.get('reason', ''))))}."
    if name == "task_failed":
        return _task_failed_text(event, detail, task_name, run_name, task_part)
    if name == "approval_needed":
        title = f" ({_esc(task.title)})" if task is not None and task.title not in ("", task.key) else ""
        return f"✋ The {task_name}{title} of the {run_name} awaits approval."
    if name == "input_needed":
        of = f"The {task_name} of the {run_name}" if task is not None else f"The {run_name}"
        return _input_needed_text(of, input_part)
    if name == "agent_lost":
        who = f"{_esc(agent.name)}{f' ({_esc(agent.hostname)})' if agent.hostname else ''}" if agent else "An agent"
        why = detail.get("reason") or "offline"
        return f"🔌 The agent {who} is offline ({_esc(why)}): its live attempts are lost and their tasks offered again."
    return f"{name}: {_esc(event.kind)} {_esc(event.from_state)} → {_esc(event.to_state)}"


def _task_failed_text(event: Event, detail: dict, task_name: str, run_name: str, task_part) -> str:
    if detail.get("decision") == "rejected":
        why = f": {_esc(task_part['error'])}" if task_part and task_part["error"] != "rejected" else ""
        return f"❌ The {task_name} of the {run_name} was rejected by {_esc(detail.get('by') or event.actor)}{why}."
    tries = task_part.get("attempt") if task_part else None
    after = f" after {tries} attempt{'s' if tries != 1 else ''}" if tries else ""
    why = f": {_esc(task_part['error'])}" if task_part and task_part["error"] else ""
    return f"❌ The {task_name} of the {run_name} failed{after}{why}."


def _input_needed_text(of: str, input_part) -> str:
    """`of` ("The task x of the run “y”") needs input: the question asked, or the tool it may use."""
    asked = (input_part or {}).get("question") or ""
    if not asked and (input_part or {}).get("tool"):
        asked = f"may it use {input_part['tool']}{_shown_input(input_part['input'])}?"
    asked = _clip(str(asked))
    if not asked:
        return f"💬 {of} needs input."
    return f"💬 {of} needs input: {_esc(asked)}{'' if asked.endswith(('?', '.', '!')) else '.'}"


def _shown_input(tool_input) -> str:
    """A tool call's input in a few words: its command, path or URL when it has one."""
    if not isinstance(tool_input, dict):
        return ""
    for key in ("command", "file_path", "path", "url", "pattern"):
        if isinstance(tool_input.get(key), str) and tool_input[key]:
            return f" ({_clip(tool_input[key], 120)})"
    return ""


# --- Sending -------------------------------------------------------------------------------------------


def sign(secret: str, body: bytes) -> str:
    """The X-CP-Signature value of `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def encode(body: dict) -> bytes:
    """The bytes sent: the same on every try (jsonb keeps no key order; sorted keys make it not matter)."""
    return json.dumps(body, ensure_ascii=False, sort_keys=True, separators=(",", ":")).encode()


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A 3xx is the answer (urllib would replay a POST as a body-less GET): a webhook's URL is its final one."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


@dataclass
class Outcome:
    status: int | None  # None: no HTTP answer
    error: str = ""
    retry_after: float | None = None


def post(url: str, body: bytes, headers: dict, timeout: float) -> Outcome:
    """POST `body` to `url`: the HTTP status, or why there was none. Never raises."""
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            response.read(4096)
            return Outcome(response.status)
    except urllib.error.HTTPError as err:
        said = ""
        try:
            said = _clip(err.read(1000).decode("utf-8", "replace"), 200)
        except (OSError, http.client.HTTPException):
            pass
        if 300 <= err.code < 400:
            said = f"redirected to {err.headers.get('Location', '?')}: webhooks follow no redirects, use that URL"
        return Outcome(err.code, f"HTTP {err.code}" + (f": {said}" if said else ""), _retry_after(err.headers))
    except urllib.error.URLError as err:
        reason = err.reason
        if isinstance(reason, TimeoutError):
            return Outcome(None, f"no answer within {timeout:g} s")
        said = f"{type(reason).__name__}: {reason}" if isinstance(reason, OSError) else str(reason)
        return Outcome(None, _clip(said))
    except TimeoutError:
        return Outcome(None, f"no answer within {timeout:g} s")
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return Outcome(None, _clip(f"{type(exc).__name__}: {exc}"))


def _retry_after(headers) -> float | None:
    try:
        return max(0.0, float((headers or {}).get("Retry-After", "")))
    except (TypeError, ValueError):
        return None  # absent, or an HTTP date: our own backoff then


def _claim_due(limit: int, ids=None) -> list[WebhookDelivery]:
    """Due pending deliveries of enabled webhooks (or the given ones, whatever their webhook), each taken for
    one try: its attempt counted and its next try pushed past the try's end, in one short transaction, so no
    other process sends it meanwhile and a try that never reports is made again."""
    lease = timedelta(seconds=settings.CP_WEBHOOK_TIMEOUT_S + LEASE_EXTRA_S)
    with transaction.atomic():
        due = WebhookDelivery.objects.select_for_update(skip_locked=True, of=("self",)).select_related("webhook")
        if ids is None:
            due = due.filter(state=WebhookDelivery.PENDING, next_try_at__lte=Now(), webhook__enabled=True)
        else:
            due = due.filter(state=WebhookDelivery.PENDING, id__in=ids)
        taken = list(due.order_by("next_try_at", "id")[:limit])
        if taken:
            WebhookDelivery.objects.filter(id__in=[d.id for d in taken]).update(
                attempts=F("attempts") + 1, next_try_at=Now() + lease
            )
        for d in taken:
            d.attempts += 1
    return taken


def _send_all(deliveries: list[WebhookDelivery]) -> list[Outcome]:
    """Try each delivery once, all at once.

    One thread per delivery of the batch (CP_WEBHOOK_BATCH at most), rather than sequential tries or a
    django-q2 task each: a pass lasts one timeout at worst however many endpoints hang, and the sends stay in
    the one job, where per-delivery tasks would multiply queue and result rows and take the cluster's few
    workers from host operations. The threads only do HTTP, outside any transaction; the database work is the
    caller's. urllib's timeout bounds each socket operation; the join bounds the whole try, so an endpoint
    that answers a byte at a time cannot hold the pass either (its thread is a daemon, left to time out).
    """
    timeout = settings.CP_WEBHOOK_TIMEOUT_S
    outcomes: list[Outcome | None] = [None] * len(deliveries)

    def attempt(i: int, d: WebhookDelivery) -> None:
        data = encode(d.body)
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "X-CP-Event": d.event,
                   "X-CP-Delivery": str(d.id)}  # fmt: skip
        if d.webhook.secret:
            headers["X-CP-Signature"] = sign(d.webhook.secret, data)
        outcomes[i] = post(d.webhook.url, data, headers, timeout)

    threads = [threading.Thread(target=attempt, args=(i, d), daemon=True, name=f"webhook-{d.id}")
               for i, d in enumerate(deliveries)]  # fmt: skip
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout + 1.0
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [o or Outcome(None, f"no answer within {timeout:g} s") for o in outcomes]


def _record(d: WebhookDelivery, outcome: Outcome) -> str:
    """Store a try's outcome; returns the delivery's new state. A 2xx delivers it; a 3xx or a 4xx other than
    408 and 429 fails it for good; anything else (5xx, 408, 429, no answer) is tried again after the next
    wait of CP_WEBHOOK_RETRY_DELAYS_S (longer when a Retry-After asks it, up to the longest), until the last."""
    status = outcome.status
    delays = list(settings.CP_WEBHOOK_RETRY_DELAYS_S)
    fields: dict = {"status_code": status, "error": outcome.error}
    if status is not None and 200 <= status < 300:
        fields.update(state=WebhookDelivery.DELIVERED, delivered_at=Now(), next_try_at=None, error="")
    elif (
        (status is not None and 300 <= status < 500 and status not in (408, 429))
        or d.attempts > len(delays)
        or d.event == "test"  # the admin's test is tried once, while the admin waits
    ):
        final = (status is not None and status < 500 and status not in (408, 429)) or d.event == "test"
        gave_up = "" if final else f" (gave up after {d.attempts} tries)"
        fields.update(state=WebhookDelivery.FAILED, next_try_at=None, error=outcome.error + gave_up)
        log.warning("webhook %s: %s %s failed: %s%s", d.webhook.name, d.event, d.id, outcome.error, gave_up)
    else:
        wait = delays[d.attempts - 1]
        if outcome.retry_after is not None:
            wait = max(wait, min(outcome.retry_after, max(delays)))
        fields.update(next_try_at=Now() + timedelta(seconds=wait))
        log.info("webhook %s: %s %s, try %d: %s; again in %g s", d.webhook.name, d.event, d.id, d.attempts,
                 outcome.error, wait)  # fmt: skip
    # Only the try that took it: a try that outlived its lease must not overwrite a newer one's outcome.
    WebhookDelivery.objects.filter(id=d.id, attempts=d.attempts, state=WebhookDelivery.PENDING).update(**fields)
    return fields.get("state", WebhookDelivery.PENDING)


def send_due(limit: int | None = None, ids=None) -> dict:
    """Send (a batch of) the due deliveries, one try each: {"sent": n, "delivered": n, "failed": n,
    "retrying": n}."""
    taken = _claim_due(limit or settings.CP_WEBHOOK_BATCH, ids)
    stats = {"sent": len(taken), "delivered": 0, "failed": 0, "retrying": 0}
    if not taken:
        return stats
    for d, outcome in zip(taken, _send_all(taken), strict=True):
        state = _record(d, outcome)
        stats["retrying" if state == WebhookDelivery.PENDING else state] += 1
    return stats


def send_test(webhook: Webhook) -> WebhookDelivery:
    """Send a test notification to `webhook` now (enabled or not) and return its delivery, tried once."""
    body = {
        "text": f"👋 A test notification from the agent control plane to the webhook “{_esc(webhook.name)}”.",
        "event": "test", "event_id": None, "url": link("/"), "run": None, "task": None, "agent": None,
        "actor": "", "detail": {}, "occurred_at": None,
    }  # fmt: skip
    # Never due for the q cluster's passes (no next try): this request sends it.
    delivery = WebhookDelivery.objects.create(webhook=webhook, event="test", body=body, next_try_at=None)
    send_due(1, ids=[delivery.id])
    delivery.refresh_from_db()
    return delivery


# --- The job -------------------------------------------------------------------------------------------


def dispatch_now() -> dict:
    """One pass: scan the audit trail, then send what is due (one batch)."""
    scanned = scan()
    return {**scanned, **send_due()}


def _active() -> bool:
    return Webhook.objects.filter(enabled=True).exists()


def _hold_polling(seconds: float) -> bool:
    """Take the poller's turn (WebhookCursor.polling_until) for `seconds`; False while another job has it."""
    WebhookCursor.objects.bulk_create([WebhookCursor(pk=1)], ignore_conflicts=True)
    until = Now() + timedelta(seconds=seconds)
    return bool(
        WebhookCursor.objects.filter(Q(polling_until__isnull=True) | Q(polling_until__lt=Now()), pk=1).update(
            polling_until=until
        )
    )


def prune() -> int:
    """Delete finished deliveries older than CP_WEBHOOK_KEEP_DAYS (a bounded batch per call)."""
    days = settings.CP_WEBHOOK_KEEP_DAYS
    if days <= 0:
        return 0
    old = WebhookDelivery.objects.filter(created_at__lt=Now() - timedelta(days=days)).exclude(
        state=WebhookDelivery.PENDING
    )
    ids = list(old.order_by("id").values_list("id", flat=True)[:10_000])
    return WebhookDelivery.objects.filter(id__in=ids).delete()[0] if ids else 0


def run_job() -> dict:
    """The q cluster's job (every minute). While a webhook is enabled it keeps passing for CP_WEBHOOK_WINDOW_S,
    a pass every CP_WEBHOOK_POLL_S (at once after a full batch), so notifications and short retries go out
    within seconds although django-q2 schedules by the minute; one job polls at a time. Without any, one pass
    keeps the cursor at the end of the trail, so a webhook made later hears only of what follows. A database
    outage ends the job quietly: the next one tries again."""
    window, poll = settings.CP_WEBHOOK_WINDOW_S, max(0.1, settings.CP_WEBHOOK_POLL_S)
    totals: dict = {"passes": 0, "queued": 0, "sent": 0, "delivered": 0, "failed": 0, "retrying": 0}
    try:
        totals["pruned"] = prune()
        polling = window > 0 and _active()
        if polling and not _hold_polling(window + LEASE_EXTRA_S):
            return {**totals, "skipped": "another job is polling"}
        deadline = time.monotonic() + window
        try:
            while True:
                stats = dispatch_now()
                totals["passes"] += 1
                for key in ("queued", "sent", "delivered", "failed", "retrying"):
                    totals[key] += stats.get(key, 0)
                if not polling or time.monotonic() + poll > deadline or not _active():
                    break
                busy = stats.get("events") == SCAN_BATCH or stats["sent"] == settings.CP_WEBHOOK_BATCH
                if not busy:
                    time.sleep(poll)
        finally:
            if polling:
                WebhookCursor.objects.filter(pk=1).update(polling_until=None)
    except db.Error as exc:
        from control_plane.db_outage import describe, is_unavailable

        if not is_unavailable(exc):
            raise
        log.warning("webhooks: the database is unreachable (%s); the next run tries again", describe(exc))
        totals["outage"] = True
    return totals


# --- The admin's form ----------------------------------------------------------------------------------


def check_url(url: str) -> str:
    """`url` if a webhook may POST to it, else forms.ValidationError saying why."""
    url = (url or "").strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range
    except ValueError as exc:
        raise forms.ValidationError(f"Not a valid URL: {exc}.") from exc
    if parts.scheme not in ("http", "https"):
        raise forms.ValidationError("Only http:// and https:// URLs can receive webhooks.")
    if not parts.hostname:
        raise forms.ValidationError("The URL needs a host name.")
    if parts.username is not None or parts.password is not None:
        raise forms.ValidationError("No user name or password in the URL: sign with the secret instead.")
    if any(c.isspace() for c in url):
        raise forms.ValidationError("The URL must not contain spaces.")
    return url


class WebhookForm(forms.ModelForm):
    """The admin's webhook form: events as checkboxes, a URL it can POST to, and a secret that is written but
    never shown (left empty, the current one stays)."""

    url = forms.URLField(
        max_length=2000, assume_scheme="https", label="URL",
        help_text="http:// or https:// (Slack, Mattermost and Teams incoming webhooks work as they are)",
    )  # fmt: skip
    events = forms.MultipleChoiceField(
        choices=[(e, e.replace("_", " ")) for e in WEBHOOK_EVENTS], widget=forms.CheckboxSelectMultiple,
        help_text="what it is told about",
    )  # fmt: skip
    new_secret = forms.CharField(
        required=False, label="Secret", max_length=256, widget=forms.PasswordInput(render_value=False),
        help_text="signs each body (X-CP-Signature: sha256=HMAC-SHA256 of the raw body); empty keeps the current one",
    )  # fmt: skip
    clear_secret = forms.BooleanField(required=False, label="Remove the secret", help_text="send unsigned")

    class Meta:
        model = Webhook
        fields = ["name", "url", "events", "enabled"]

    def clean_url(self):
        return check_url(self.cleaned_data["url"])

    def save(self, commit=True):
        webhook = super().save(commit=False)
        if self.cleaned_data.get("new_secret"):
            webhook.secret = self.cleaned_data["new_secret"]
        elif self.cleaned_data.get("clear_secret"):
            webhook.secret = ""
        if commit:
            webhook.save()
        return webhook
