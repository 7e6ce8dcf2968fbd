"""Hosts we provision agents on over SSH, and the operations (deploy, stop, ...) run against them.

Secrets: a host's private key is either a path on the control plane's machine or the key encrypted with
`CP_HOST_KEY_SECRET` (see host_secrets.py); never stored in clear. The host key is pinned: operations refuse a
host whose key the operator has not confirmed, and refuse loudly a host that presents a different key.
"""

from __future__ import annotations

import uuid

from django.contrib.postgres.fields import ArrayField
from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator, RegexValidator
from django.db import models
from django.db.models import Q

from .install_dir import remote_dir_problem
from .keys import fingerprint

# The protocol's name rule; a prefix leaves room for "-NN".
NAME_VALIDATOR = RegexValidator(r"^[A-Za-z0-9._-]{1,64}\Z", "1-64 of letters, digits, '.', '_' and '-'")
PREFIX_VALIDATOR = RegexValidator(r"^[A-Za-z0-9._-]{1,58}\Z", "1-58 of letters, digits, '.', '_' and '-'")
# No "..", no shell metacharacters: the folder is removed again by `uninstall`.
REMOTE_DIR_VALIDATOR = RegexValidator(
    r"^(?!.*(^|/)\.\.(/|$))(/?[A-Za-z0-9._-]+)(/[A-Za-z0-9._-]+)*/?\Z",
    "a relative (to the remote home) or absolute path of letters, digits, '.', '_', '-' and '/', without '..'",
)


def validate_remote_dir(value: str) -> None:
    """Not the login's home (".") nor a folder holding homes: uninstall works through the folder."""
    if problem := remote_dir_problem(value):
        raise ValidationError(problem, code="remote_dir")


REMOTE_PYTHON_VALIDATOR = RegexValidator(r"^[A-Za-z0-9._/+-]{1,255}\Z", "a program name or absolute path")


class Host(models.Model):
    name = models.CharField(max_length=64, unique=True, validators=[NAME_VALIDATOR])
    address = models.CharField(max_length=255, help_text="DNS name or IP address")
    port = models.PositiveIntegerField(default=22, validators=[MinValueValidator(1), MaxValueValidator(65535)])
    user = models.CharField(max_length=64, validators=[NAME_VALIDATOR])
    key_path = models.CharField(
        max_length=1024, blank=True, help_text="private key file on the control plane's machine (or store one below)"
    )
    # The private key encrypted with CP_HOST_KEY_SECRET (Fernet); empty when key_path is used.
    key_encrypted = models.TextField(blank=True, editable=False)
    # The pinned host key (OpenSSH public key line) and who confirmed its fingerprint, when.
    host_key = models.TextField(blank=True)
    host_key_confirmed_by = models.CharField(max_length=150, blank=True)
    host_key_confirmed_at = models.DateTimeField(null=True, blank=True)
    # What the host presented at the last scan or refused connection, awaiting (or contradicting) the pin.
    offered_host_key = models.TextField(blank=True, editable=False)
    offered_at = models.DateTimeField(null=True, blank=True, editable=False)
    remote_python = models.CharField(max_length=255, default="python3", validators=[REMOTE_PYTHON_VALIDATOR])
    remote_dir = models.CharField(
        max_length=255, default="cp-agent", validators=[REMOTE_DIR_VALIDATOR, validate_remote_dir]
    )
    server_url = models.CharField(
        max_length=255, blank=True, help_text="how the agents reach the control plane (default: CP_PUBLIC_URL)"
    )
    ca_bundle = models.TextField(
        blank=True, help_text="PEM CA certificate(s) the agents verify the server with (copied, passed as --ca-file)"
    )
    agent_count = models.PositiveSmallIntegerField(default=1, validators=[MaxValueValidator(64)])
    agent_labels = ArrayField(models.CharField(max_length=64, validators=[NAME_VALIDATOR]), default=list, blank=True)
    agent_executors = ArrayField(models.CharField(max_length=32), default=list, blank=True)
    agent_capacity = models.PositiveSmallIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(64)]
    )
    name_prefix = models.CharField(
        max_length=58, blank=True, validators=[PREFIX_VALIDATOR], help_text="agents are PREFIX-1 … (default: the name)"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=Q(port__gte=1, port__lte=65535), name="host_port_range"),
            models.CheckConstraint(condition=Q(agent_capacity__gte=1, agent_capacity__lte=64), name="host_capacity"),
            models.CheckConstraint(condition=Q(agent_count__lte=64), name="host_agent_count"),
        ]

    def __str__(self):
        return self.name

    @property
    def agent_names(self) -> list[str]:
        prefix = self.name_prefix or self.name
        return [f"{prefix}-{i}" for i in range(1, self.agent_count + 1)]

    @property
    def host_key_fingerprint(self) -> str:
        return fingerprint(self.host_key)

    @property
    def offered_fingerprint(self) -> str:
        return fingerprint(self.offered_host_key)

    @property
    def host_key_changed(self) -> bool:
        """The host last presented a key other than the pinned one: someone must look before we connect."""
        return bool(self.host_key and self.offered_host_key and self.offered_host_key != self.host_key)


class HostOperationKind(models.TextChoices):
    SCAN = "scan"  # fetch the host key for the operator to confirm; no login
    DEPLOY = "deploy"
    STOP = "stop"
    RESTART = "restart"
    UPGRADE = "upgrade"
    STATUS = "status"
    UNINSTALL = "uninstall"


class HostOperationState(models.TextChoices):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class HostOperation(models.Model):
    """One operation on one host: a django-q2 job runs a batch of them (one per host) in parallel."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    batch = models.UUIDField(db_index=True)
    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="operations")
    kind = models.CharField(max_length=16, choices=HostOperationKind.choices)
    state = models.CharField(max_length=16, choices=HostOperationState.choices, default=HostOperationState.QUEUED)
    progress = models.FloatField(default=0.0)
    message = models.CharField(max_length=1000, blank=True)
    output = models.TextField(blank=True)
    # Per-agent status (alive, pid, last log lines) from status/deploy.
    result = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    requested_by = models.CharField(max_length=150, blank=True)
    q_task_id = models.CharField(max_length=64, blank=True)
    # The enrollment token this operation wrote to the host: agents enrolled with it are this host's.
    enrollment_token = models.OneToOneField(
        "EnrollmentToken", null=True, blank=True, on_delete=models.SET_NULL, related_name="host_operation"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.CheckConstraint(condition=Q(state__in=HostOperationState.values), name="hostop_state_valid"),
            models.CheckConstraint(condition=Q(kind__in=HostOperationKind.values), name="hostop_kind_valid"),
        ]

    def __str__(self):
        return f"{self.kind} {self.host_id} ({self.state})"

    @property
    def finished(self) -> bool:
        return self.state in (HostOperationState.SUCCEEDED, HostOperationState.FAILED)
