"""Hosts and their operations in the admin.

A private key pasted here is checked, encrypted with CP_HOST_KEY_SECRET and never shown again. A host key
pasted here is pinned as confirmed by whoever saved it (they read it off the host themselves); the other way
is to leave it empty, scan, and confirm the fingerprint on the hosts page. Operations are started from the
list (they run as django-q2 jobs) and followed on the hosts page.
"""

from __future__ import annotations

import re

from cryptography import x509
from django import forms
from django.contrib import admin, messages
from django.contrib.postgres.forms import SimpleArrayField
from django.utils import timezone
from django.utils.html import format_html

from control_plane.web import actor_of
from tasks_app.errors import ActionError
from tasks_app.models import AGENT_EXECUTORS

from .jobs import start_operations
from .keys import UnusableKey, check_private_key, normalize_host_key
from .models import NAME_VALIDATOR, Host, HostOperation, HostOperationKind
from .secrets import SecretUnavailable, encrypt_private_key

MAX_LABELS = 32
SERVER_URL_RE = re.compile(r"https?://[^\s/?#]+(/\S*)?")


class HostForm(forms.ModelForm):
    private_key = forms.CharField(
        required=False,
        strip=False,
        widget=forms.Textarea(attrs={"rows": 4, "autocomplete": "off", "spellcheck": "false"}),
        help_text="Paste an unencrypted OpenSSH private key to store it encrypted (CP_HOST_KEY_SECRET). It is "
        "never shown again; leave empty to keep the stored key.",
    )
    forget_stored_key = forms.BooleanField(required=False, help_text="Remove the key stored in the database.")
    # Checked in clean_agent_labels, which names the bad label (the array field's own message does not).
    agent_labels = SimpleArrayField(forms.CharField(), required=False, help_text="comma-separated")

    class Meta:
        model = Host
        fields = [
            "name", "address", "port", "user", "key_path", "host_key", "remote_python", "remote_dir", "server_url",
            "ca_bundle", "agent_count", "name_prefix", "agent_labels", "agent_executors", "agent_capacity",
        ]  # fmt: skip
        widgets = {"host_key": forms.Textarea(attrs={"rows": 2}), "ca_bundle": forms.Textarea(attrs={"rows": 3})}
        help_texts = {
            "host_key": "The host's public key (e.g. its /etc/ssh/ssh_host_ed25519_key.pub) to pin it now; or leave "
            "empty, scan the host and confirm the fingerprint it presents.",
            "agent_executors": f"comma-separated, of {', '.join(AGENT_EXECUTORS)}; empty: what the host has",
        }

    def clean_private_key(self):
        text = self.cleaned_data["private_key"]
        if not text.strip():
            return ""
        try:
            check_private_key(text)
            return encrypt_private_key(text)
        except (UnusableKey, SecretUnavailable) as exc:
            raise forms.ValidationError(str(exc)) from None

    def clean_host_key(self):
        text = self.cleaned_data["host_key"].strip()
        try:
            return normalize_host_key(text) if text else ""
        except UnusableKey as exc:
            raise forms.ValidationError(str(exc)) from None

    def clean_server_url(self):
        url = self.cleaned_data["server_url"].strip()
        if url and not SERVER_URL_RE.fullmatch(url):
            raise forms.ValidationError("an http:// or https:// URL the agents reach this server at")
        return url

    def clean_ca_bundle(self):
        pem = self.cleaned_data["ca_bundle"].strip()
        if not pem:
            return ""
        try:
            x509.load_pem_x509_certificates(pem.encode())
        except ValueError:
            raise forms.ValidationError("not PEM certificates (-----BEGIN CERTIFICATE----- …)") from None
        return pem + "\n"

    def clean_agent_labels(self):
        labels = self.cleaned_data["agent_labels"]
        if len(labels) > MAX_LABELS:
            raise forms.ValidationError(f"at most {MAX_LABELS} labels (PROTOCOL.md's limit)")
        for label in labels:
            try:
                NAME_VALIDATOR(label)
            except forms.ValidationError:
                raise forms.ValidationError(f"label {label!r}: {NAME_VALIDATOR.message}") from None
        return labels

    def clean_agent_executors(self):
        executors = self.cleaned_data["agent_executors"]
        unknown = sorted(set(executors) - set(AGENT_EXECUTORS))
        if unknown:
            known = ", ".join(AGENT_EXECUTORS)
            raise forms.ValidationError(f"unknown executor(s) {', '.join(unknown)}; known: {known}")
        return executors

    def clean(self):
        data = super().clean()
        keeps_stored = bool(self.instance.key_encrypted) and not data.get("forget_stored_key")
        if not (data.get("key_path") or data.get("private_key") or keeps_stored):
            raise forms.ValidationError("Give the host a private key: a key file path, or paste a key to store.")
        return data

    def save(self, commit=True):
        host = super().save(commit=False)
        if self.cleaned_data.get("private_key"):
            host.key_encrypted = self.cleaned_data["private_key"]  # already encrypted by clean_private_key
        elif self.cleaned_data.get("forget_stored_key"):
            host.key_encrypted = ""
        if commit:
            host.save()
        return host


def _queue_action(kind: str):
    def action(modeladmin, request, queryset):
        try:
            ops = start_operations(kind, list(queryset), actor_of(request))
        except ActionError as exc:
            modeladmin.message_user(request, exc.detail, level=messages.ERROR)
            return
        modeladmin.message_user(request, f"{kind} queued for {len(ops)} host(s); follow it on /hosts/.")

    action.__name__ = f"queue_{kind}"
    return admin.action(description=f"{kind.capitalize()} the selected hosts", permissions=["change"])(action)


@admin.register(Host)
class HostAdmin(admin.ModelAdmin):
    form = HostForm
    list_display = ["name", "address", "port", "user", "agents", "pinned_fingerprint", "key_storage", "last_operation"]
    search_fields = ["name", "address"]
    readonly_fields = ["pinned_fingerprint", "host_key_confirmed_by", "host_key_confirmed_at", "presented",
                       "key_storage"]  # fmt: skip
    # One action per operation kind, built below (they differ only in the kind).
    actions = [_queue_action(kind) for kind in HostOperationKind.values]

    def save_model(self, request, obj, form, change):
        if "host_key" in form.changed_data:
            obj.host_key_confirmed_by = actor_of(request) if obj.host_key else ""
            obj.host_key_confirmed_at = timezone.now() if obj.host_key else None
        super().save_model(request, obj, form, change)

    @admin.display(description="agents")
    def agents(self, obj):
        return f"{obj.agent_count} × {obj.name_prefix or obj.name}-N"

    @admin.display(description="pinned host key")
    def pinned_fingerprint(self, obj):
        if obj.host_key_changed:
            return format_html('<strong style="color:#b00">CHANGED</strong> (pinned {})', obj.host_key_fingerprint)
        return obj.host_key_fingerprint or "not confirmed"

    @admin.display(description="presented at the last scan")
    def presented(self, obj):
        if not obj.offered_host_key:
            return "–"
        return f"{obj.offered_fingerprint} at {obj.offered_at:%Y-%m-%d %H:%M:%S %Z}"

    @admin.display(description="private key")
    def key_storage(self, obj):
        if obj.key_encrypted:
            return "stored encrypted"
        return f"file {obj.key_path}" if obj.key_path else "none"

    @admin.display(description="last operation")
    def last_operation(self, obj):
        op = obj.operations.order_by("-created_at").first()
        return f"{op.kind}: {op.state}" if op else "–"


@admin.register(HostOperation)
class HostOperationAdmin(admin.ModelAdmin):
    list_display = ["created_at", "host", "kind", "state", "progress", "message", "requested_by"]
    list_filter = ["kind", "state"]
    search_fields = ["host__name"]

    def has_add_permission(self, request):
        return False  # started from the hosts list, the hosts page or `manage.py hosts`

    def has_change_permission(self, request, obj=None):
        return False
