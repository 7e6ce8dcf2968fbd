"""Trust on first use, made explicit: a host key is pinned only by an operator who saw its fingerprint."""

from __future__ import annotations

from django.db import transaction
from django.utils import timezone

from tasks_app.errors import ActionError, NotFound

from .keys import UnusableKey, fingerprint, normalize_host_key
from .models import Host


def confirm_offered_key(host_id: int, seen_fingerprint: str, actor: str) -> Host:
    """Pin the key the host last presented. `seen_fingerprint` is the one the operator was shown: if the host
    presented another key since, nothing is pinned (the operator confirmed something else)."""
    with transaction.atomic():
        host = Host.objects.select_for_update().filter(pk=host_id).first()
        if host is None:
            raise NotFound("no such host")
        if not host.offered_host_key:
            raise ActionError(f"{host.name} has presented no key yet: scan it first", "no_offered_key")
        if fingerprint(host.offered_host_key) != seen_fingerprint.strip():
            raise ActionError(
                f"{host.name} now presents {host.offered_fingerprint}, not the {seen_fingerprint} you confirmed",
                "fingerprint_mismatch",
            )
        return _pin(host, host.offered_host_key, actor)


def pin_host_key(host: Host, key_line: str, actor: str) -> Host:
    """Pin a key the operator supplied (e.g. from the host's /etc/ssh/ssh_host_ed25519_key.pub)."""
    try:
        canonical = normalize_host_key(key_line)
    except UnusableKey as exc:
        raise ActionError(str(exc), "bad_host_key") from None
    return _pin(host, canonical, actor)


def _pin(host: Host, key_line: str, actor: str) -> Host:
    host.host_key = key_line
    host.host_key_confirmed_by = actor
    host.host_key_confirmed_at = timezone.now()
    host.save(update_fields=["host_key", "host_key_confirmed_by", "host_key_confirmed_at", "updated_at"])
    return host
