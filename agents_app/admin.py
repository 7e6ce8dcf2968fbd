"""Agents and tokens in the admin.

Agents are read-only except their `enabled` and `draining` switches, which go through
`registry.set_agent_flags` so every flip is in the audit trail. A token made here is shown once, in a message
after saving, and only its hash is stored; tokens are revoked by an action, never deleted.

A new token is shown on the add form's own response page, never in a message: messages travel in a cookie
that is signed, not encrypted. Only a superuser makes an API token for someone else; any other user with the
add permission makes their own (the form has no user field, and a posted one is ignored).
"""

from __future__ import annotations

from datetime import timedelta

from django import forms
from django.contrib import admin
from django.db import transaction
from django.db.models import Count, IntegerField, OuterRef, Subquery
from django.db.models.functions import Coalesce
from django.template.response import TemplateResponse
from django.utils import timezone

from control_plane.web import actor_of
from tasks_app.models import Attempt, Event
from tasks_app.states import AttemptState

from . import registry
from .hosts import admin as hosts_admin  # noqa: F401 - registers the hosts' admin pages
from .models import Agent, AgentStatus, ApiToken, EnrollmentToken

AGENT_FLAGS = ("enabled", "draining")


class AgentStatusFilter(admin.SimpleListFilter):
    title = "status"
    parameter_name = "status"

    def lookups(self, request, model_admin):
        return [(status, status) for status in AgentStatus.values]

    def queryset(self, request, queryset):
        return queryset.filter(status=self.value()) if self.value() else queryset


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin):
    list_display = ["name", "status", "reported_status", "enabled", "draining", "live_attempts", "capacity",
                    "labels_text", "executors_text", "hostname", "version", "last_seen_at"]  # fmt: skip
    list_filter = [AgentStatusFilter, "enabled", "draining"]
    search_fields = ["name", "hostname"]
    exclude = ["token_hash"]
    actions = ["enable", "disable", "drain", "undrain"]
    show_full_result_count = False

    def get_queryset(self, request):
        live = (
            Attempt.objects.filter(agent=OuterRef("pk"), state__in=AttemptState.LIVE)
            .order_by()
            .values("agent")
            .annotate(n=Count("*"))
            .values("n")
        )
        return super().get_queryset(request).annotate(n_live=Coalesce(Subquery(live, output_field=IntegerField()), 0))

    @admin.display(description="live attempts", ordering="n_live")
    def live_attempts(self, obj):
        return obj.n_live

    @admin.display(description="labels")
    def labels_text(self, obj):
        return ", ".join(obj.labels)

    @admin.display(description="executors")
    def executors_text(self, obj):
        return ", ".join(obj.executors)

    def has_add_permission(self, request):
        return False  # agents register themselves with an enrollment token

    def has_delete_permission(self, request, obj=None):
        return False  # a re-registration retires an agent; its history stays

    def get_readonly_fields(self, request, obj=None):
        fields = [f.name for f in self.opts.concrete_fields if f.name != "token_hash"]
        if obj is not None and obj.retired_at is None:
            fields = [f for f in fields if f not in AGENT_FLAGS]
        return fields

    def save_model(self, request, obj, form, change):
        """Only the switches change, and only through the registry (audited, and the fleet is told)."""
        flags = {name: form.cleaned_data[name] for name in AGENT_FLAGS if name in form.changed_data}
        if flags:
            registry.set_agent_flags(obj.pk, actor_of(request), **flags)

    def _flip(self, request, queryset, **flags):
        done = 0
        for agent in queryset.filter(retired_at__isnull=True):
            registry.set_agent_flags(agent.pk, actor_of(request), **flags)
            done += 1
        self.message_user(request, f"{done} agent(s) updated.")

    @admin.action(description="Enable the selected agents", permissions=["change"])
    def enable(self, request, queryset):
        self._flip(request, queryset, enabled=True)

    @admin.action(description="Disable the selected agents", permissions=["change"])
    def disable(self, request, queryset):
        self._flip(request, queryset, enabled=False)

    @admin.action(description="Drain the selected agents (finish work, take no more)", permissions=["change"])
    def drain(self, request, queryset):
        self._flip(request, queryset, draining=True)

    @admin.action(description="Stop draining the selected agents", permissions=["change"])
    def undrain(self, request, queryset):
        self._flip(request, queryset, draining=False)


# --- Tokens ---------------------------------------------------------------------------------------------


class RevokedFilter(admin.SimpleListFilter):
    title = "revoked"
    parameter_name = "revoked"

    def lookups(self, request, model_admin):
        return [("no", "active"), ("yes", "revoked")]

    def queryset(self, request, queryset):
        if self.value() in ("yes", "no"):
            return queryset.filter(revoked_at__isnull=self.value() == "no")
        return queryset


class TokenAdmin(admin.ModelAdmin):
    """Tokens are made by the registry (which stores the hash) and shown once; they are revoked, not edited.
    Each subclass says how to make its kind: `create_token(request, cleaned_data) -> (token, record)`."""

    add_fields: list[str] = []
    list_filter = [RevokedFilter, "created_at"]
    actions = ["revoke"]
    editable_fields = ("note",)

    def get_fields(self, request, obj=None):
        if obj is None:
            return self.add_fields
        return [f.name for f in self.opts.concrete_fields if f.name not in ("id", "token_hash")]

    def get_readonly_fields(self, request, obj=None):
        if obj is None:
            return []
        return [f for f in self.get_fields(request, obj) if f not in self.editable_fields]

    def get_form(self, request, obj=None, change=False, **kwargs):
        if obj is None:
            kwargs["form"] = self.add_form
        return super().get_form(request, obj, change=change, **kwargs)

    def has_delete_permission(self, request, obj=None):
        return False  # revoke instead: the record says who used it and when

    def save_model(self, request, obj, form, change):
        if change:
            super().save_model(request, obj, form, change)
            return
        token, record = self.create_token(request, form.cleaned_data)
        # The admin goes on with `obj` (log entry, redirect): make it the record the registry made.
        for field in self.opts.concrete_fields:
            setattr(obj, field.attname, getattr(record, field.attname))
        obj._state.adding = False
        Event.objects.create(
            kind="token",
            actor=actor_of(request),
            to_state="active",
            detail={"token": record.prefix, "model": self.opts.model_name},
        )
        request.new_token = token  # for response_add, which shows it on its own page

    def response_add(self, request, obj, post_url_continue=None):
        token = getattr(request, "new_token", None)
        if token is None:
            return super().response_add(request, obj, post_url_continue)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "record": obj,
            "token": token,
            "has_view_permission": self.has_view_permission(request),
        }
        response = TemplateResponse(request, "admin/agents_app/token_created.html", context)
        response["Cache-Control"] = "no-store"  # the secret stays out of every cache, the browser's too
        return response

    @admin.display(description="status")
    def state(self, obj):
        now = timezone.now()
        if obj.revoked_at:
            return "revoked"
        if getattr(obj, "expires_at", None) and obj.expires_at <= now:
            return "expired"
        if getattr(obj, "max_uses", None) is not None and obj.uses >= obj.max_uses:
            return "used up"
        return "active"

    @admin.action(description="Revoke the selected tokens", permissions=["change"])
    def revoke(self, request, queryset):
        with transaction.atomic():
            chosen = list(queryset.filter(revoked_at__isnull=True).values_list("pk", "prefix"))
            self.model.objects.filter(pk__in=[pk for pk, _ in chosen]).update(revoked_at=timezone.now())
            Event.objects.bulk_create(
                Event(
                    kind="token",
                    actor=actor_of(request),
                    from_state="active",
                    to_state="revoked",
                    detail={"token": prefix, "model": self.opts.model_name},
                )
                for _pk, prefix in chosen
            )
        self.message_user(request, f"{len(chosen)} token(s) revoked.")


LIFETIMES = [
    ("", "never expires"),
    ("3600", "1 hour"),
    ("86400", "24 hours"),
    ("604800", "7 days"),
    ("2592000", "30 days"),
]


class EnrollmentTokenAddForm(forms.ModelForm):
    max_uses = forms.IntegerField(
        required=False, min_value=1, label="Uses", help_text="how many agents may register with it; empty: no limit"
    )
    expires = forms.TypedChoiceField(
        choices=LIFETIMES, required=False, coerce=int, empty_value=None, label="Expires after"
    )

    class Meta:
        model = EnrollmentToken
        fields = ["note", "max_uses"]


@admin.register(EnrollmentToken)
class EnrollmentTokenAdmin(TokenAdmin):
    add_form = EnrollmentTokenAddForm
    add_fields = ["note", "max_uses", "expires"]
    list_display = ["prefix", "note", "state", "uses", "max_uses", "expires_at", "created_by", "created_at",
                    "last_used_at", "revoked_at"]  # fmt: skip
    search_fields = ["note", "prefix"]
    list_select_related = ["created_by"]

    def create_token(self, request, data):
        expires = timedelta(seconds=data["expires"]) if data.get("expires") else None
        return registry.create_enrollment_token(
            note=data.get("note") or "", uses=data.get("max_uses"), expires=expires, user=request.user
        )


class ApiTokenAddForm(forms.ModelForm):
    class Meta:
        model = ApiToken
        fields = ["user", "note"]


@admin.register(ApiToken)
class ApiTokenAdmin(TokenAdmin):
    add_form = ApiTokenAddForm
    add_fields = ["user", "note"]
    list_display = ["prefix", "user", "note", "state", "created_at", "last_used_at", "revoked_at"]
    search_fields = ["note", "prefix", "user__username"]
    list_select_related = ["user"]
    autocomplete_fields = ["user"]

    def get_fields(self, request, obj=None):
        if obj is None and not request.user.is_superuser:
            return ["note"]  # the token is the requester's own: no user to pick, and a posted one is ignored
        return super().get_fields(request, obj)

    def create_token(self, request, data):
        owner = data["user"] if request.user.is_superuser else request.user
        return registry.create_api_token(owner, note=data.get("note") or "")
