"""Agents and the three kinds of token (enrollment, agent, API). Tokens are stored only as SHA-256 hashes."""

import uuid

from django.conf import settings
from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models import Q

from tasks_app import states

# Hosts and SSH provisioning have a package of their own; imported here so that Django finds their models.
from .hosts.models import Host, HostOperation  # noqa: F401


class AgentStatus(models.TextChoices):
    """The column's choices, from the state machine (tasks_app.states.AgentStatus, where the transitions are);
    a test checks that no status is left out."""

    ONLINE = states.AgentStatus.ONLINE
    OFFLINE = states.AgentStatus.OFFLINE
    RETIRED = states.AgentStatus.RETIRED


class Agent(models.Model):
    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=64)
    labels = ArrayField(models.CharField(max_length=64), default=list, blank=True)
    # Only the executors that passed the agent's last pre-flight: the scheduler offers tasks by this column.
    executors = ArrayField(models.CharField(max_length=32), default=list, blank=True)
    executor_versions = models.JSONField(default=dict, blank=True)
    # The last pre-flight of every executor the agent was configured with, usable or not, for people:
    # {name: {"usable": bool, "detail": str, "version": str | None}}.
    preflight = models.JSONField(default=dict, blank=True)
    preflight_at = models.DateTimeField(null=True, blank=True)
    # Executors held back on this agent until a time: a provider refused for quota or rate (a usage limit)
    # and said when it resets. {executor: {"until": ISO-8601, "reason": str}}; the claim skips them until then.
    executor_holds = models.JSONField(default=dict, blank=True)
    # An operator asked for a new pre-flight; the next heartbeat answer carries the command.
    preflight_requested = models.BooleanField(default=False)
    capacity = models.PositiveSmallIntegerField(default=1)
    hostname = models.CharField(max_length=255, blank=True)
    version = models.CharField(max_length=64, blank=True)
    status = models.CharField(max_length=16, choices=AgentStatus.choices, default=AgentStatus.ONLINE)
    # What the agent itself last said it was doing (idle / busy / draining).
    reported_status = models.CharField(max_length=16, blank=True)
    enabled = models.BooleanField(default=True)
    draining = models.BooleanField(default=False)
    shutdown_requested = models.BooleanField(default=False)
    token_hash = models.CharField(max_length=64, unique=True)
    enrollment_token = models.ForeignKey(
        "EnrollmentToken", null=True, blank=True, on_delete=models.SET_NULL, related_name="agents"
    )
    registered_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    retired_at = models.DateTimeField(null=True, blank=True)
    # Set with retired_at when an operator revoked the token, so the agent is told why it is refused.
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            # One live identity per name; retired identities keep their history.
            models.UniqueConstraint(fields=["name"], condition=Q(retired_at__isnull=True), name="agent_name_live_uniq"),
            models.CheckConstraint(condition=Q(capacity__gte=1, capacity__lte=64), name="agent_capacity_range"),
            models.CheckConstraint(condition=Q(status__in=AgentStatus.values), name="agent_status_valid"),
        ]
        indexes = [
            # The silent-agent sweep: online agents by last contact.
            models.Index(fields=["last_seen_at"], condition=Q(status="online"), name="agent_online_seen_idx"),
        ]

    def __str__(self):
        return self.name

    @property
    def is_online(self) -> bool:
        return self.status == AgentStatus.ONLINE


class TokenBase(models.Model):
    token_hash = models.CharField(max_length=64, unique=True)
    # The first characters of the token, so people can tell tokens apart without the secret.
    prefix = models.CharField(max_length=16)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True


class EnrollmentToken(TokenBase):
    note = models.CharField(max_length=200, blank=True)
    expires_at = models.DateTimeField(null=True, blank=True)
    max_uses = models.PositiveIntegerField(null=True, blank=True)
    uses = models.PositiveIntegerField(default=0)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.prefix}… ({self.note or 'enrollment'})"


class ApiToken(TokenBase):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    note = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self):
        return f"{self.prefix}… ({self.user})"
