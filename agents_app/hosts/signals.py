"""What deleting a host takes with it: the enrollment tokens its deploys wrote there. Left live, whoever
keeps that machine's agent.env could go on enrolling agents after the host was removed from the fleet.
(Agents already enrolled keep their own tokens: revoke them on the agents page.)"""

from __future__ import annotations

from django.db.models.signals import pre_delete
from django.utils import timezone

from ..models import EnrollmentToken
from .models import Host


def revoke_host_tokens(sender, instance: Host, **kwargs) -> None:
    EnrollmentToken.objects.filter(host_operation__host=instance, revoked_at__isnull=True).update(
        revoked_at=timezone.now()
    )


def connect() -> None:
    pre_delete.connect(revoke_host_tokens, sender=Host, dispatch_uid="revoke_host_tokens")
