"""The admin: runs, tasks, attempts, events and artifacts are browsable but read-only, since their state
changes belong to `tasks_app.actions`; prices and webhooks are edited here. Workflows (DAG templates) have
their own admin, `tasks_app.workflows.admin`, registered by the import below.

Every list page selects its related rows in the same query (list_select_related, subquery counts), so its
query count does not grow with the rows shown.
"""

from __future__ import annotations

import json

from django.contrib import admin, messages
from django.db.models import Count, IntegerField, OuterRef, Q, Subquery
from django.db.models.functions import Coalesce, Now
from django.urls import reverse
from django.utils.html import format_html

from . import costs, webhooks
from .models import WEBHOOK_EVENTS, Artifact, Attempt, Event, ModelPrice, Run, Task, Webhook, WebhookDelivery
from .workflows.admin import count_of  # and, importing it, the workflow admin's registrations

# --- Runs and their parts: read-only --------------------------------------------------------------------


class ReadOnlyAdmin(admin.ModelAdmin):
    """Browsable, never edited here: state changes go through the state machine (`tasks_app.actions`)."""

    show_full_result_count = False

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False


def pretty_json(value, limit: int = 200_000):
    text = json.dumps(value, indent=2, ensure_ascii=False)
    if len(text) > limit:
        text = text[:limit] + f"\n… ({len(text) - limit} more characters)"
    return format_html('<pre style="white-space: pre-wrap; margin: 0">{}</pre>', text)


def short(text: str, limit: int = 80) -> str:
    text = text or ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


@admin.register(Run)
class RunAdmin(ReadOnlyAdmin):
    list_display = ["name", "state", "task_count", "priority", "max_parallel", "workflow", "created_by",
                    "created_at", "finished_at", "dashboard"]  # fmt: skip
    list_filter = ["state", "created_at"]
    search_fields = ["name", "=id", "workflow__name"]
    list_select_related = ["workflow", "created_by"]
    exclude = ["document"]
    readonly_fields = ["document_json"]

    def get_queryset(self, request):
        return super().get_queryset(request).annotate(n_tasks=count_of(Task, "run"))

    @admin.display(description="tasks", ordering="n_tasks")
    def task_count(self, obj):
        return obj.n_tasks

    @admin.display(description="")
    def dashboard(self, obj):
        return format_html('<a href="{}">dashboard</a>', reverse("run", args=[obj.pk]))

    @admin.display(description="document")
    def document_json(self, obj):
        return pretty_json(obj.document)


@admin.register(Task)
class TaskAdmin(ReadOnlyAdmin):
    list_display = ["key", "run", "state", "executor", "attempts_used", "max_attempts", "progress", "depth",
                    "priority", "started_at", "finished_at"]  # fmt: skip
    list_filter = ["state", "executor"]
    search_fields = ["key", "title", "run__name", "=run__id"]
    list_select_related = ["run"]
    ordering = ["-created_at"]


@admin.register(Attempt)
class AttemptAdmin(ReadOnlyAdmin):
    list_display = ["short_id", "task_key", "run", "agent", "number", "state", "progress", "exit_code", "cost",
                    "assigned_at", "finished_at"]  # fmt: skip
    list_filter = ["state", "assigned_at"]
    search_fields = ["task__key", "agent__name", "run__name", "=id"]
    list_select_related = ["task", "run", "agent"]
    ordering = ["-assigned_at"]

    @admin.display(description="attempt")
    def short_id(self, obj):
        return str(obj.pk)[:8]

    @admin.display(description="task", ordering="task__key")
    def task_key(self, obj):
        return obj.task.key

    @admin.display(description="cost", ordering="cost_usd")
    def cost(self, obj):
        return costs.money(obj.cost_usd) + (" (estimated)" if (obj.usage or {}).get("cost_estimated") else "")


@admin.register(ModelPrice)
class ModelPriceAdmin(admin.ModelAdmin):
    """The price table agents estimate costs by (tasks_app.costs); an edit reaches new assignments within
    CP_PRICE_TABLE_TTL_S on every server process."""

    list_display = ["__str__", "input_per_mtok", "output_per_mtok", "cache_read_per_mtok", "cache_write_per_mtok",
                    "as_of"]  # fmt: skip
    list_editable = ["input_per_mtok", "output_per_mtok", "cache_read_per_mtok", "cache_write_per_mtok", "as_of"]
    search_fields = ["model_prefix"]

    def save_model(self, request, obj, form, change):
        super().save_model(request, obj, form, change)
        costs.forget_prices()


class EventKindFilter(admin.SimpleListFilter):
    """Fixed choices: a DISTINCT over the whole audit trail would cost more than the page."""

    title = "kind"
    parameter_name = "kind"

    def lookups(self, request, model_admin):
        return [(k, k) for k in ("run", "task", "attempt", "agent", "workflow", "token")]

    def queryset(self, request, queryset):
        return queryset.filter(kind=self.value()) if self.value() else queryset


@admin.register(Event)
class EventAdmin(ReadOnlyAdmin):
    list_display = ["id", "created_at", "kind", "from_state", "to_state", "actor", "run", "task", "agent",
                    "detail_short"]  # fmt: skip
    list_filter = [EventKindFilter, "created_at"]
    search_fields = ["actor", "run__name", "task__key", "agent__name", "detail__workflow"]
    list_select_related = ["run", "task", "agent"]
    ordering = ["-id"]

    @admin.display(description="detail")
    def detail_short(self, obj):
        return short(json.dumps(obj.detail, ensure_ascii=False)) if obj.detail else ""


@admin.register(Artifact)
class ArtifactAdmin(ReadOnlyAdmin):
    list_display = ["name", "task", "size", "content_type", "sha256_short", "created_at", "download"]
    search_fields = ["name", "sha256", "task__key"]
    list_select_related = ["task"]
    exclude = ["content"]
    readonly_fields = ["download"]
    ordering = ["-created_at"]

    def get_queryset(self, request):
        return super().get_queryset(request).defer("content")

    @admin.display(description="sha256")
    def sha256_short(self, obj):
        return obj.sha256[:12]

    @admin.display(description="")
    def download(self, obj):
        return format_html('<a href="/api/v1/artifacts/{}">download</a>', obj.pk)


# --- Webhooks (tasks_app.webhooks) ------------------------------------------------------------------------


def deliveries_in(state: str):
    rows = (
        WebhookDelivery.objects.filter(webhook=OuterRef("pk"), state=state).order_by().values("webhook")
        .annotate(n=Count("*")).values("n")
    )  # fmt: skip
    return Coalesce(Subquery(rows, output_field=IntegerField()), 0)


@admin.register(Webhook)
class WebhookAdmin(admin.ModelAdmin):
    """Where notifications go (sent by the q cluster, tasks_app.webhooks). The secret is written, never shown."""

    form = webhooks.WebhookForm
    list_display = ["name", "url", "event_list", "enabled", "signed", "deliveries", "created_at"]
    list_filter = ["enabled"]
    search_fields = ["name", "url"]
    actions = ["send_test"]
    readonly_fields = ["signed", "created_at"]

    def get_fieldsets(self, request, obj=None):
        if obj is not None and not self.has_change_permission(request, obj):
            return [(None, {"fields": ["name", "url", "events", "enabled", "signed", "created_at"]})]
        return [
            (None, {"fields": ["name", "url", "events", "enabled"] + (["created_at"] if obj else [])}),
            ("Signature", {"fields": (["signed"] if obj else []) + ["new_secret", "clear_secret"]}),
        ]

    def get_queryset(self, request):
        return (
            super().get_queryset(request)
            .annotate(n_delivered=deliveries_in("delivered"), n_pending=deliveries_in("pending"),
                      n_failed=deliveries_in("failed"))
        )  # fmt: skip

    @admin.display(description="events")
    def event_list(self, obj):
        return ", ".join(e.replace("_", " ") for e in obj.events)

    @admin.display(description="signed", boolean=True)
    def signed(self, obj):
        return bool(obj.secret)

    @admin.display(description="deliveries")
    def deliveries(self, obj):
        url = reverse("admin:tasks_app_webhookdelivery_changelist") + f"?webhook__id__exact={obj.pk}"
        return format_html(
            '<a href="{}">{} delivered, {} pending, {} failed</a>', url, obj.n_delivered, obj.n_pending, obj.n_failed
        )

    @admin.action(description="Send a test notification now", permissions=["change"])
    def send_test(self, request, queryset):
        for hook in queryset[:10]:
            d = webhooks.send_test(hook)
            said = f"HTTP {d.status_code}" if d.status_code else "no answer"
            if d.state == WebhookDelivery.DELIVERED:
                self.message_user(request, f"{hook.name}: the test was delivered ({said}).", messages.SUCCESS)
            else:
                self.message_user(request, f"{hook.name}: the test failed: {d.error or said}.", messages.ERROR)


class DeliveryEventFilter(admin.SimpleListFilter):
    """Fixed choices: no DISTINCT over the log."""

    title = "event"
    parameter_name = "event"

    def lookups(self, request, model_admin):
        return [(e, e.replace("_", " ")) for e in (*WEBHOOK_EVENTS, "test")]

    def queryset(self, request, queryset):
        return queryset.filter(event=self.value()) if self.value() else queryset


@admin.register(WebhookDelivery)
class WebhookDeliveryAdmin(ReadOnlyAdmin):
    """The log of notifications: what was sent, how often, and what the endpoint answered."""

    list_display = ["id", "created_at", "webhook", "event", "state", "attempts", "status_code", "error_short",
                    "next_try_at", "delivered_at"]  # fmt: skip
    list_filter = ["state", DeliveryEventFilter, "webhook"]
    search_fields = ["=id", "=event_id", "webhook__name", "error"]
    list_select_related = ["webhook"]
    exclude = ["body"]
    readonly_fields = ["body_json"]
    actions = ["send_again"]

    def has_resend_permission(self, request):
        return request.user.has_perm("tasks_app.change_webhook")

    @admin.display(description="error")
    def error_short(self, obj):
        return short(obj.error)

    @admin.display(description="body")
    def body_json(self, obj):
        return pretty_json(obj.body)

    @admin.action(description="Send again (one more try, as soon as the q cluster's next pass)", permissions=["resend"])
    def send_again(self, request, queryset):
        n = queryset.filter(~Q(state=WebhookDelivery.PENDING)).update(state=WebhookDelivery.PENDING, next_try_at=Now())
        self.message_user(request, f"{n} deliveries will be sent again.", messages.SUCCESS)
