"""Workflows (DAG templates), runs, tasks, dependencies, attempts, artifacts and the audit trail.

State fields are written only by `tasks_app.actions` (and the named SQL in `tasks_app.queries`).
"""

import uuid

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.core.validators import URLValidator
from django.db import models
from django.db.models import F, Q
from django.db.models.functions import Now

from .queries import CLAIM_ORDER
from .states import AttemptState, RunState, TaskState


def _choices(values):
    return [(v, v) for v in values]


def claim_order_expressions() -> list:
    """queries.CLAIM_ORDER as Django expressions: the queue's order_by, and task_ready_order_idx's fields (a
    plain ascending column is a bare F(), as the index's migration has it)."""
    directions = {
        "DESC": lambda column: F(column).desc(),
        "ASC NULLS FIRST": lambda column: F(column).asc(nulls_first=True),
        "ASC": F,
    }
    return [directions[direction](column) for column, direction in CLAIM_ORDER]


# `approval` tasks are held by the server until an operator decides (states.APPROVAL_EXECUTOR).
EXECUTORS = ("shell", "claude", "codex", "simulated", "approval")
# Executors of tasks the server adds itself: `git` merges a workspace run's sinks into its result branch.
SYSTEM_EXECUTORS = ("git",)
# What an agent may offer: every executor but a person's approval, and the server's own. The daemon's list
# (cp_agent.KNOWN_EXECUTORS) is the same; tests/agents_app/test_executor_names.py ties the two.
AGENT_EXECUTORS = tuple(name for name in (*EXECUTORS, *SYSTEM_EXECUTORS) if name != "approval")


class Workflow(models.Model):
    """An editable DAG template; starting it snapshots its document into a Run."""

    name = models.CharField(max_length=128, unique=True)
    description = models.TextField(blank=True)
    max_parallel = models.PositiveIntegerField(null=True, blank=True)
    # The document's top-level priority: its runs' priority unless the start overrides it.
    priority = models.IntegerField(default=0)
    defaults = models.JSONField(default=dict, blank=True)
    # The document's `workspace` ({repo, base, branch_prefix} as it gave them; null: none) and `params`.
    workspace = models.JSONField(null=True, blank=True, default=None)
    params = models.JSONField(default=dict, blank=True)
    # The document's `max_cost_usd`: its runs' budget in US dollars (null: none).
    max_cost_usd = models.FloatField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class WorkflowTask(models.Model):
    workflow = models.ForeignKey(Workflow, on_delete=models.CASCADE, related_name="tasks")
    key = models.CharField(max_length=64)
    title = models.CharField(max_length=200, blank=True)
    deps = models.ManyToManyField("self", symmetrical=False, related_name="dependents", blank=True)
    requires = ArrayField(models.CharField(max_length=64), default=list, blank=True)
    executor = models.CharField(max_length=16, choices=_choices(EXECUTORS), default="shell")
    command = models.TextField(blank=True, null=True)
    prompt = models.TextField(blank=True, null=True)
    params = models.JSONField(default=dict, blank=True)
    estimate_s = models.FloatField(null=True, blank=True)
    priority = models.IntegerField(default=0)
    max_attempts = models.PositiveIntegerField(null=True, blank=True)
    timeout_s = models.PositiveIntegerField(null=True, blank=True)
    retry_delay_s = models.PositiveIntegerField(null=True, blank=True)
    position = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["workflow", "position", "id"]
        constraints = [models.UniqueConstraint(fields=["workflow", "key"], name="workflowtask_key_uniq")]

    def __str__(self):
        return self.key


class Run(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=128)
    workflow = models.ForeignKey(Workflow, null=True, blank=True, on_delete=models.SET_NULL, related_name="runs")
    # The DAG document as submitted: later edits of the workflow never reach a started run.
    document = models.JSONField()
    state = models.CharField(max_length=16, choices=_choices(RunState.ALL), default=RunState.RUNNING)
    priority = models.IntegerField(default=0)
    max_parallel = models.PositiveIntegerField(null=True, blank=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    created_at = models.DateTimeField(db_default=Now())
    finished_at = models.DateTimeField(null=True, blank=True)
    # The workspace (PROTOCOL.md v1.1), empty without one: the repository, the base as given and the commit it
    # resolved to at submit (pinned for the whole run), the prefix of its branches, and its result.
    repo = models.TextField(blank=True, default="")
    base_ref = models.CharField(max_length=255, blank=True, default="")
    base_commit = models.CharField(max_length=64, blank=True, default="")
    branch_prefix = models.CharField(max_length=64, blank=True, default="")
    result_branch = models.CharField(max_length=400, blank=True, default="")
    result_commit = models.CharField(max_length=64, blank=True, default="")
    # Run parameters, for `${params.NAME}` in prompts and commands.
    params = models.JSONField(default=dict, blank=True)
    # The run's budget (PROTOCOL.md v1.1 `max_cost_usd`; null: none), and why the server paused it, when it did
    # (a budget reached): the run page says so, and resuming clears it.
    max_cost_usd = models.FloatField(null=True, blank=True)
    pause_reason = models.CharField(max_length=300, blank=True, default="")
    # A rerun: a new run of the same document as this one (tasks_app.workflows.documents.rerun).
    rerun_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="reruns")

    class Meta:
        ordering = ["-created_at"]
        # Viewers watch; operators also cancel/pause/resume runs, retry tasks and drain/disable agents.
        permissions = [("operate_run", "Can operate runs, tasks and agents from the dashboard")]
        constraints = [models.CheckConstraint(condition=Q(state__in=RunState.ALL), name="run_state_valid")]
        indexes = [models.Index(fields=["state"], name="run_state_idx")]

    def __str__(self):
        return f"{self.name} ({self.state})"


class Task(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="tasks")
    key = models.CharField(max_length=64)
    title = models.CharField(max_length=200, blank=True)
    state = models.CharField(max_length=24, choices=_choices(TaskState.ALL), default=TaskState.BLOCKED)
    priority = models.IntegerField(default=0)
    requires = ArrayField(models.CharField(max_length=64), default=list, blank=True)
    executor = models.CharField(max_length=16, choices=_choices(EXECUTORS + SYSTEM_EXECUTORS))
    command = models.TextField(null=True, blank=True)
    prompt = models.TextField(null=True, blank=True)
    params = models.JSONField(default=dict, blank=True)
    estimate_s = models.FloatField(null=True, blank=True)
    # Longest path of estimates from this task to the end of the DAG, itself included.
    critical_path_s = models.FloatField(default=0)
    # Dependency depth: the seed's "wave".
    depth = models.PositiveIntegerField(default=0)
    max_attempts = models.PositiveIntegerField(default=3)
    timeout_s = models.PositiveIntegerField(default=1800)
    retry_delay_s = models.PositiveIntegerField(default=10)
    attempts_used = models.PositiveIntegerField(default=0)
    # Attempts used before the latest operator retry; they no longer count against max_attempts.
    attempt_base = models.PositiveIntegerField(default=0)
    # A ready task is not offered before this moment (retry delay).
    ready_at = models.DateTimeField(null=True, blank=True)
    progress = models.FloatField(default=0)
    message = models.CharField(max_length=1000, blank=True)
    created_at = models.DateTimeField(db_default=Now())
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # What its succeeded attempt handed down the DAG: its final text output (`${deps.KEY.output}`), its
    # commit (null when it changed nothing) with the diffstat, and the commits its dependents merge for it:
    # its own, or when it changed nothing, those it was given (empty: the base).
    output = models.TextField(blank=True, default="")
    commit = models.JSONField(null=True, blank=True)
    head_commits = ArrayField(models.CharField(max_length=64), default=list, blank=True)

    class Meta:
        ordering = ["run", "depth", "key"]
        constraints = [
            models.UniqueConstraint(fields=["run", "key"], name="task_key_uniq"),
            models.CheckConstraint(condition=Q(state__in=TaskState.ALL), name="task_state_valid"),
            models.CheckConstraint(condition=Q(progress__gte=0, progress__lte=1), name="task_progress_range"),
            models.CheckConstraint(condition=Q(max_attempts__gte=1), name="task_max_attempts_min"),
        ]
        indexes = [
            # The claim query: ready tasks in exactly the scheduler's order (queries.CLAIM_ORDER, CANDIDATES),
            # so a claim reads the first few entries instead of sorting the whole backlog.
            models.Index(
                *claim_order_expressions(),
                name="task_ready_order_idx",
                condition=Q(state="ready"),
            ),
            models.Index(fields=["run", "state"], name="task_run_state_idx"),
        ]

    def __str__(self):
        return self.key


class TaskDependency(models.Model):
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="upstream_links")
    depends_on = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="downstream_links")

    class Meta:
        constraints = [models.UniqueConstraint(fields=["task", "depends_on"], name="taskdep_uniq")]
        indexes = [models.Index(fields=["depends_on"], name="taskdep_upstream_idx")]

    def __str__(self):
        return f"{self.task_id} after {self.depends_on_id}"


class Attempt(models.Model):
    """One try of a task by one agent; its id is the fencing token every agent call carries."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    task = models.ForeignKey(
        Task, on_delete=models.CASCADE, related_name="attempts", db_index=False
    )  # see attempt_number_uniq
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="attempts")
    agent = models.ForeignKey("agents_app.Agent", null=True, on_delete=models.SET_NULL, related_name="attempts")
    number = models.PositiveIntegerField()
    state = models.CharField(max_length=16, choices=_choices(AttemptState.ALL), default=AttemptState.ASSIGNED)
    lease_expires_at = models.DateTimeField()
    progress = models.FloatField(default=0)
    message = models.CharField(max_length=1000, blank=True)
    log = models.TextField(blank=True)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True)
    exit_code = models.IntegerField(null=True, blank=True)
    assigned_at = models.DateTimeField(db_default=Now())
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    # The assignment's workspace (repo, base_commit, merge, branch) and what the agent reported committing.
    workspace = models.JSONField(null=True, blank=True)
    commit = models.JSONField(null=True, blank=True)
    # What the AI CLI spent (PROTOCOL.md v1.1 `usage`, cumulative, from progress and completion): tokens by
    # kind, the model, and its cost (the CLI's own figure, or priced from the price table: cost_estimated).
    # cost_usd is kept apart from the rest for the sums (per task, run, agent, day).
    usage = models.JSONField(null=True, blank=True)
    # Database defaults: the claim's raw INSERT (queries.ASSIGN) names only the columns it sets.
    cost_usd = models.FloatField(db_default=0)
    session_id = models.CharField(max_length=128, blank=True, db_default="")
    # The server asked the agent to stop this attempt (a budget reached): its ending then returns the task to
    # ready without using up an attempt, whatever the agent reports.
    cancel_reason = models.CharField(max_length=300, blank=True, db_default="")

    class Meta:
        ordering = ["task", "number"]
        constraints = [
            models.UniqueConstraint(fields=["task", "number"], name="attempt_number_uniq"),
            # Never two live attempts of one task, and never two successes: the database guarantees it.
            models.UniqueConstraint(
                fields=["task"], condition=Q(state__in=AttemptState.LIVE), name="attempt_one_live_per_task"
            ),
            models.UniqueConstraint(fields=["task"], condition=Q(state="succeeded"), name="attempt_one_success"),
            models.CheckConstraint(condition=Q(state__in=AttemptState.ALL), name="attempt_state_valid"),
            models.CheckConstraint(condition=Q(progress__gte=0, progress__lte=1), name="attempt_progress_range"),
        ]
        indexes = [
            models.Index(fields=["run"], condition=Q(state__in=AttemptState.LIVE), name="attempt_live_run_idx"),
            models.Index(fields=["agent"], condition=Q(state__in=AttemptState.LIVE), name="attempt_live_agent_idx"),
            models.Index(
                fields=["lease_expires_at"], condition=Q(state__in=AttemptState.LIVE), name="attempt_live_lease_idx"
            ),
            # The daily cost (queries.COST_TODAY): only attempts that cost something are in it, so the no-op
            # attempts of the scheduler's hot path never touch it.
            models.Index(fields=["assigned_at"], condition=Q(cost_usd__gt=0), name="attempt_costly_day_idx"),
        ]

    def __str__(self):
        return f"{self.task_id}#{self.number}"


class ModelPrice(models.Model):
    """What a model's tokens cost, per million, for CLIs that report tokens but no cost (codex): the agent
    prices usage by the longest matching `model_prefix` (the assignment carries the table) and marks the cost
    estimated. Seeded with the daemon's DEFAULT_PRICES; edit it in the admin when providers change prices."""

    model_prefix = models.CharField(
        max_length=128, unique=True, blank=True, help_text="matches models starting with this ('' matches any)"
    )
    input_per_mtok = models.FloatField()
    output_per_mtok = models.FloatField()
    cache_read_per_mtok = models.FloatField(default=0)
    cache_write_per_mtok = models.FloatField(default=0)
    as_of = models.DateField(help_text="when these prices were published")

    class Meta:
        ordering = ["model_prefix"]
        constraints = [
            models.CheckConstraint(
                condition=Q(
                    input_per_mtok__gte=0,
                    output_per_mtok__gte=0,
                    cache_read_per_mtok__gte=0,
                    cache_write_per_mtok__gte=0,
                ),
                name="modelprice_nonnegative",
            )  # fmt: skip
        ]

    def __str__(self):
        return self.model_prefix or "(any model)"


class Artifact(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    attempt = models.ForeignKey(Attempt, on_delete=models.CASCADE, related_name="artifacts")
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="artifacts")
    name = models.CharField(max_length=512)
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    content_type = models.CharField(max_length=128, default="application/octet-stream")
    # Kept in PostgreSQL with everything else: one backup, and every server process can serve it.
    content = models.BinaryField()
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        ordering = ["task", "name"]

    def __str__(self):
        return self.name


class InputRequest(models.Model):
    """An agent waiting for a person (PROTOCOL.md v1.1, input requests): Claude Code asked permission for a
    tool call its task was not given. Pending while its attempt is live and nobody has answered; the task
    shows as awaiting input. Written by tasks_app.actions."""

    PENDING, ANSWERED, EXPIRED = "pending", "answered", "expired"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    attempt = models.ForeignKey(Attempt, on_delete=models.CASCADE, related_name="input_requests")
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="input_requests")
    run = models.ForeignKey(Run, on_delete=models.CASCADE, related_name="input_requests")
    kind = models.CharField(max_length=32, default="permission")
    tool = models.CharField(max_length=200, blank=True)
    input = models.JSONField(default=dict, blank=True)
    question = models.TextField(blank=True)
    state = models.CharField(max_length=16, default=PENDING)
    # {"behavior": "allow" | "deny", "message": str}
    answer = models.JSONField(null=True, blank=True)
    answered_by = models.CharField(max_length=150, blank=True)
    created_at = models.DateTimeField(db_default=Now())
    # Unanswered by then, the server answers deny itself (the agent's params.input_timeout_s).
    expires_at = models.DateTimeField()
    answered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(state__in=("pending", "answered", "expired")), name="input_state_valid")
        ]
        indexes = [models.Index(fields=["created_at"], condition=Q(state="pending"), name="input_pending_idx")]

    def __str__(self):
        return f"{self.kind} {self.tool} ({self.state})"


class Event(models.Model):
    """The audit trail: every state change, who or what made it, from what to what, when."""

    # References without database constraints: the trail is append-only and written from rows the writer has
    # locked, and each event saved four foreign-key checks on the scheduler's hot path (three events a task).
    # Deletes still cascade through the ORM. No single-column indexes for run and task: event_run_idx and
    # event_task_idx lead with them.
    run = models.ForeignKey(
        Run, null=True, blank=True, on_delete=models.CASCADE, related_name="events", db_index=False,
        db_constraint=False,
    )  # fmt: skip
    task = models.ForeignKey(
        Task, null=True, blank=True, on_delete=models.CASCADE, related_name="events", db_index=False,
        db_constraint=False,
    )  # fmt: skip
    attempt = models.ForeignKey(
        Attempt, null=True, blank=True, on_delete=models.CASCADE, related_name="events", db_constraint=False
    )
    agent = models.ForeignKey(
        "agents_app.Agent", null=True, blank=True, on_delete=models.SET_NULL, related_name="events",
        db_constraint=False,
    )  # fmt: skip
    kind = models.CharField(max_length=32)
    from_state = models.CharField(max_length=32, blank=True)
    to_state = models.CharField(max_length=32, blank=True)
    actor = models.CharField(max_length=128)
    detail = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(fields=["run", "id"], name="event_run_idx"),
            models.Index(fields=["task", "id"], name="event_task_idx"),
        ]

    def __str__(self):
        return f"{self.kind} {self.from_state}->{self.to_state} by {self.actor}"


class SweepClock(models.Model):
    """One row: when a server process last swept, and the moment before which nothing may expire.

    After downtime of every server process, agents could not reach us; expiring their leases at once would
    blame them for our outage, so a server that starts after such a gap pushes `expiry_not_before` one lease
    length ahead.
    """

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    server_alive_at = models.DateTimeField(null=True)
    expiry_not_before = models.DateTimeField(null=True)

    def __str__(self):
        return f"alive {self.server_alive_at}, expiry from {self.expiry_not_before}"


# --- Webhooks (tasks_app.webhooks) ------------------------------------------------------------------------

# What a webhook may be told about, each the mapping of an audit-trail Event (tasks_app.webhooks.EVENT_RULES).
WEBHOOK_EVENTS = (
    "run_succeeded", "run_failed", "run_canceled", "task_failed", "approval_needed", "input_needed",
    "budget_reached", "agent_lost",
)  # fmt: skip
DELIVERY_STATES = ("pending", "delivered", "failed")


class Webhook(models.Model):
    """A URL told about the events it wants, by a JSON POST (a Slack-compatible `text` and structured fields),
    signed with its secret when it has one. Edited in the admin; sent by the q cluster (tasks_app.webhooks)."""

    name = models.CharField(max_length=128, unique=True)
    url = models.URLField(
        max_length=2000, validators=[URLValidator(schemes=["http", "https"])], help_text="http:// or https:// only"
    )
    events = ArrayField(models.CharField(max_length=32, choices=_choices(WEBHOOK_EVENTS)), default=list)
    # Signs each body (X-CP-Signature: sha256=HMAC-SHA256 of the raw body); empty: unsigned.
    secret = models.CharField(max_length=256, blank=True)
    enabled = models.BooleanField(default=True)
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        ordering = ["name"]

    def __str__(self):
        return self.name


class WebhookDelivery(models.Model):
    """One notification of one webhook: the body sent (the same bytes on every try), its tries and their
    outcome. `pending` until a 2xx (`delivered`) or a final refusal or the last try (`failed`)."""

    PENDING, DELIVERED, FAILED = DELIVERY_STATES

    webhook = models.ForeignKey(Webhook, on_delete=models.CASCADE, related_name="deliveries")
    # WEBHOOK_EVENTS, or "test" for the admin's test notification.
    event = models.CharField(max_length=32)
    # The audit-trail Event it tells of (null: a test). No foreign key: the log outlives a deleted run's trail.
    event_id = models.BigIntegerField(null=True, blank=True)
    body = models.JSONField()
    state = models.CharField(max_length=16, choices=_choices(DELIVERY_STATES), default=PENDING)
    attempts = models.PositiveIntegerField(default=0)
    # The last try's answer: its HTTP status (null: none came), and what went wrong, if anything.
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    # When a pending delivery is (next) due; a try in flight holds it a while ahead (tasks_app.webhooks.LEASE_S).
    next_try_at = models.DateTimeField(null=True, blank=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        ordering = ["-id"]
        verbose_name_plural = "webhook deliveries"
        constraints = [
            # One delivery per webhook and event, however often the scan reads the event (see WebhookCursor).
            models.UniqueConstraint(fields=["event_id", "webhook"], name="webhookdelivery_once"),
            models.CheckConstraint(condition=Q(state__in=DELIVERY_STATES), name="webhookdelivery_state_valid"),
        ]
        indexes = [
            models.Index(fields=["next_try_at"], condition=Q(state="pending"), name="webhookdelivery_due_idx"),
        ]

    def __str__(self):
        return f"{self.event} to {self.webhook_id} ({self.state})"


class WebhookCursor(models.Model):
    """One row: how far the webhooks' scan has read the audit trail (tasks_app.webhooks.scan), taken with
    SELECT ... FOR UPDATE by each scan, so two q clusters never scan at once.

    Event ids are drawn before their transaction commits, so a commit can make an id below one already read
    visible later. `last_event_id` moves only past ids that can no longer appear: the scan notes the highest
    id it read with the snapshot's xmax (`pending_*`), and settles on it once every transaction that could
    still have been writing below it has ended (the snapshot's xmin has passed that xmax); until then the
    scan reads those ids again, and the unique delivery per webhook and event keeps it from notifying twice.
    """

    id = models.PositiveSmallIntegerField(primary_key=True, default=1)
    last_event_id = models.BigIntegerField(default=0)
    pending_event_id = models.BigIntegerField(null=True, blank=True)
    pending_xmax = models.BigIntegerField(null=True, blank=True)
    pending_at = models.DateTimeField(null=True, blank=True)
    # A q job polling for its window (tasks_app.webhooks.run_job) holds this: one poller at a time.
    polling_until = models.DateTimeField(null=True, blank=True)

    def __str__(self):
        return f"events read to {self.last_event_id}"


class AuthFailure(models.Model):
    """Failed authentications of one kind (`scope`: the API's per address, the login form's per address and
    per user name) for one `key` in one minute-long window, counted by every server process alike
    (control_plane.rate_limit). Unlogged (migration 0014): a crash that loses the counts only forgives a
    minute's failures, and the counting writes no WAL."""

    scope = models.CharField(max_length=16)
    key = models.CharField(max_length=200)
    window_start = models.DateTimeField()
    count = models.PositiveIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["scope", "key", "window_start"], name="authfailure_window_uniq"),
        ]
        indexes = [models.Index(fields=["window_start"], name="authfailure_window_idx")]

    def __str__(self):
        return f"{self.count} failed {self.scope} for {self.key} from {self.window_start}"
