"""The admin: workflows (DAG templates) are edited here, with their tasks inline and the whole DAG validated
on save; runs, tasks, attempts, events and artifacts are browsable but read-only, since their state changes
belong to `tasks_app.actions`.

Every list page selects its related rows in the same query (list_select_related, subquery counts), so its
query count does not grow with the rows shown.
"""

from __future__ import annotations

import json
import re

from django import forms
from django.contrib import admin
from django.core.exceptions import ValidationError
from django.db.models import CharField, Count, IntegerField, OuterRef, Subquery, Value
from django.db.models.functions import Cast, Coalesce, Concat
from django.urls import path, reverse
from django.utils.html import format_html

from . import admin_views, workflows
from .dag import NAME_RE, DagError, parse_document, topological_order
from .models import Artifact, Attempt, Event, Run, Task, Workflow, WorkflowTask

# Above this many tasks the change page leaves the tasks out (rendering thousands of rows of inputs is
# slow, and so is posting them): such workflows are edited as documents, exported and imported again.
INLINE_MAX_TASKS = 300
DEPS_SPLIT = re.compile(r"[\s,]+")


def count_of(model, fk: str):
    """A subquery counting `model` rows whose `fk` is the outer row: one query for the whole list page."""
    rows = model.objects.filter(**{fk: OuterRef("pk")}).order_by().values(fk).annotate(n=Count("*")).values("n")
    return Coalesce(Subquery(rows, output_field=IntegerField()), 0)


def actor_of(request) -> str:
    return f"user:{request.user.get_username()}"


# --- Workflow forms ---------------------------------------------------------------------------------------


def _error_field(form: forms.Form, field: str | None) -> str | None:
    """The form field a DagError's `field` points at (None for the form as a whole)."""
    if field is None:
        return None
    field = {"deps": "deps_keys"}.get(field, field.split(".")[0])
    return field if field in form.fields else None


class WorkflowForm(forms.ModelForm):
    class Meta:
        model = Workflow
        fields = ["name", "description", "max_parallel", "defaults"]
        widgets = {"description": forms.Textarea(attrs={"rows": 3, "cols": 80})}

    def clean_defaults(self):
        return self.cleaned_data.get("defaults") or {}

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        probe = {
            "name": data.get("name") or "x",
            "defaults": data.get("defaults"),
            "tasks": [{"key": "probe", "executor": "simulated"}],
        }
        if data.get("max_parallel") is not None:
            probe["max_parallel"] = data["max_parallel"]
        try:
            parse_document(probe)
        except DagError as exc:
            self.add_error(_error_field(self, exc.field), exc.detail)
        return data


class WorkflowTaskForm(forms.ModelForm):
    """One task row. `deps_keys` edits the dependencies by key (comma-separated); the formset checks them
    against the whole workflow and stores them as the `deps` links."""

    deps_keys = forms.CharField(
        label="Deps",
        required=False,
        help_text="keys, comma-separated",
        widget=forms.TextInput(
            attrs={"class": "deps-input", "list": "workflow-keys", "size": 18, "autocomplete": "off"}
        ),
    )

    class Meta:
        model = WorkflowTask
        fields = [
            "key", "title", "deps_keys", "requires", "executor", "command", "prompt", "params", "estimate_s",
            "priority", "max_attempts", "timeout_s", "retry_delay_s",
        ]  # fmt: skip
        widgets = {
            "key": forms.TextInput(attrs={"size": 12, "class": "task-key"}),
            "title": forms.TextInput(attrs={"size": 18}),
            "command": forms.Textarea(attrs={"rows": 1, "cols": 22}),
            "prompt": forms.Textarea(attrs={"rows": 1, "cols": 22}),
            "params": forms.Textarea(attrs={"rows": 1, "cols": 14}),
            "estimate_s": forms.NumberInput(attrs={"style": "width: 6em"}),
            "priority": forms.NumberInput(attrs={"style": "width: 5em"}),
            "max_attempts": forms.NumberInput(attrs={"style": "width: 4em"}),
            "timeout_s": forms.NumberInput(attrs={"style": "width: 6em"}),
            "retry_delay_s": forms.NumberInput(attrs={"style": "width: 5em"}),
        }

    def __init__(self, *args, deps_by_task=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fields["requires"].help_text = "labels, comma-separated"
        if self.instance.pk and deps_by_task is not None:
            self.initial["deps_keys"] = ", ".join(deps_by_task.get(self.instance.pk, ()))

    def clean_deps_keys(self):
        keys = [k for k in DEPS_SPLIT.split(self.cleaned_data.get("deps_keys") or "") if k]
        bad = [k for k in keys if not NAME_RE.match(k)]
        if bad:
            raise ValidationError(f"not a task key: {', '.join(bad)}")
        return keys

    def clean_params(self):
        return self.cleaned_data.get("params") or {}

    def clean(self):
        data = super().clean()
        for name in ("command", "prompt"):
            if data.get(name) == "":
                data[name] = None
        if data.get("key") is not None:
            try:  # the task's own fields, through THE validator; its deps are the formset's business
                parse_document({"name": "task", "tasks": [self.task_entry(with_deps=False)]})
            except DagError as exc:
                self.add_error(_error_field(self, exc.field), exc.detail)
        return data

    def task_entry(self, with_deps: bool = True) -> dict:
        """This row as a DAG document's task (fields left empty are left out: they take the defaults)."""
        data = self.cleaned_data
        entry = {"key": data.get("key")}
        if with_deps:
            entry["deps"] = data.get("deps_keys") or []
        for name in workflows.TASK_VALUE_FIELDS:
            if data.get(name) not in (None, ""):
                entry[name] = data[name]
        return entry


class WorkflowTaskFormSet(forms.BaseInlineFormSet):
    """The workflow's tasks; `clean` validates the DAG they make as a whole."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.deps_by_task: dict[int, list[str]] = {}
        if self.instance.pk:
            links = (
                workflows.DepLink.objects.filter(from_workflowtask__workflow=self.instance)
                .order_by("id")
                .values_list("from_workflowtask_id", "to_workflowtask__key")
            )
            for task_id, key in links:
                self.deps_by_task.setdefault(task_id, []).append(key)

    def get_form_kwargs(self, index):
        return {**super().get_form_kwargs(index), "deps_by_task": self.deps_by_task}

    def validate_unique(self):
        """Duplicate keys are reported by `clean`, on the offending row, in this module's words."""

    def kept_forms(self) -> list[WorkflowTaskForm]:
        """The rows that will be tasks after saving (not deleted, not blank extra rows)."""
        kept = []
        for form in self.forms:
            if self.can_delete and self._should_delete_form(form):
                continue
            if form in self.extra_forms and not form.has_changed():
                continue
            kept.append(form)
        return kept

    def clean(self):
        super().clean()
        rows = self.kept_forms()
        problems: list[str] = []
        by_key: dict[str, WorkflowTaskForm] = {}
        for form in rows:
            key = form.cleaned_data.get("key") or form.data.get(form.add_prefix("key"), "").strip()
            if not key:
                continue
            if key in by_key:
                form.add_error("key", f"duplicate key {key!r}: another task of this workflow has it")
            else:
                by_key[key] = form
        graph: dict[str, list[str]] = {}
        for key, form in by_key.items():
            deps = form.cleaned_data.get("deps_keys")
            if deps is None:  # the field itself was refused
                continue
            unknown = [d for d in deps if d not in by_key]
            twice = sorted({d for d in deps if deps.count(d) > 1})
            if unknown:
                form.add_error("deps_keys", f"unknown key(s): {', '.join(unknown)}")
            if twice:
                form.add_error("deps_keys", f"listed twice: {', '.join(twice)}")
            graph[key] = deps
        if len(graph) == len(by_key) and not any(f.errors.get("deps_keys") or f.errors.get("key") for f in rows):
            try:
                topological_order(graph)
            except DagError as exc:
                problems.append(exc.detail)
                for key in dict.fromkeys(exc.keys):
                    by_key[key].add_error("deps_keys", f"{key} is on the {exc.detail}")
        if rows and not problems and not any(form.errors for form in rows):
            # The catch-all: whatever else THE validator refuses, it refuses here too.
            try:
                parse_document({"name": "workflow", "tasks": [form.task_entry() for form in rows]})
            except DagError as exc:
                form = by_key.get(exc.keys[0]) if exc.keys else None
                if form is not None and _error_field(form, exc.field):
                    form.add_error(_error_field(form, exc.field), exc.detail)
                else:
                    problems.append(exc.detail)
        if problems:
            raise ValidationError(problems)

    def free_keys(self) -> None:
        """Before `save()`: move the keys of renamed and deleted rows out of the way, so that rows may swap
        keys, or take a deleted row's key, without tripping the (workflow, key) constraint midway."""
        moving = [
            form.instance.pk
            for form in self.initial_forms
            if form.instance.pk and ("key" in form.changed_data or (self.can_delete and self._should_delete_form(form)))
        ]
        if moving:
            WorkflowTask.objects.filter(pk__in=moving).update(key=Concat(Value("~moving-"), Cast("id", CharField())))

    def save_dependencies(self) -> None:
        """After `save()`: store every row's position and its deps as links (two or three queries)."""
        rows = [f for f in self.kept_forms() if f.instance.pk]
        ids = {f.instance.key: f.instance.pk for f in rows}
        moved = []
        for position, form in enumerate(rows):
            if form.instance.position != position:
                form.instance.position = position
                moved.append(form.instance)
        if moved:
            WorkflowTask.objects.bulk_update(moved, ["position"], batch_size=1000)
        workflows.DepLink.objects.filter(from_workflowtask__workflow=self.instance).delete()
        workflows.DepLink.objects.bulk_create(
            [
                workflows.DepLink(from_workflowtask_id=form.instance.pk, to_workflowtask_id=ids[dep])
                for form in rows
                for dep in form.cleaned_data["deps_keys"]
            ],
            batch_size=5000,
        )


class WorkflowTaskInline(admin.TabularInline):
    model = WorkflowTask
    form = WorkflowTaskForm
    formset = WorkflowTaskFormSet
    fields = WorkflowTaskForm.Meta.fields
    extra = 1

    def get_queryset(self, request):
        return super().get_queryset(request).order_by("position", "id")


# --- Workflows --------------------------------------------------------------------------------------------


@admin.register(Workflow)
class WorkflowAdmin(admin.ModelAdmin):
    form = WorkflowForm
    inlines = [WorkflowTaskInline]
    list_display = ["name", "task_count", "run_count", "max_parallel", "updated_at"]
    search_fields = ["name", "description"]
    list_filter = ["updated_at"]
    actions = ["start_run", "duplicate", "export_yaml", "export_json"]
    change_list_template = "admin/tasks_app/workflow/change_list.html"
    change_form_template = "admin/tasks_app/workflow/change_form.html"

    def get_queryset(self, request):
        qs = super().get_queryset(request)
        return qs.annotate(n_tasks=count_of(WorkflowTask, "workflow"), n_runs=count_of(Run, "workflow"))

    @admin.display(description="tasks", ordering="n_tasks")
    def task_count(self, obj):
        return obj.n_tasks

    @admin.display(description="runs", ordering="n_runs")
    def run_count(self, obj):
        return obj.n_runs

    def get_urls(self):
        view = self.admin_site.admin_view
        return [
            path("import/", view(self.import_view), name="tasks_app_workflow_import"),
            path("<path:object_id>/preview/", view(self.preview_view), name="tasks_app_workflow_preview"),
            path("<path:object_id>/export/", view(self.export_view), name="tasks_app_workflow_export"),
            *super().get_urls(),
        ]

    def import_view(self, request):
        return admin_views.import_workflow(self, request)

    def preview_view(self, request, object_id):
        return admin_views.preview_workflow(self, request, object_id)

    def export_view(self, request, object_id):
        return admin_views.export_workflow(self, request, object_id)

    # -- editing: big workflows are edited as documents; every change is audited --

    def _task_count(self, request, obj) -> int:
        cache = request.__dict__.setdefault("_workflow_task_counts", {})
        if obj.pk not in cache:
            cache[obj.pk] = obj.tasks.count()
        return cache[obj.pk]

    def get_inline_instances(self, request, obj=None):
        if obj is not None and self._task_count(request, obj) > INLINE_MAX_TASKS:
            return []
        return super().get_inline_instances(request, obj)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = dict(extra_context or {}, inline_max_tasks=INLINE_MAX_TASKS)
        obj = self.get_object(request, object_id)
        if obj is not None and self._task_count(request, obj) > INLINE_MAX_TASKS:
            extra_context["tasks_not_inline"] = self._task_count(request, obj)
        return super().change_view(request, object_id, form_url, extra_context)

    def save_formset(self, request, form, formset, change):
        if isinstance(formset, WorkflowTaskFormSet):
            formset.free_keys()
            formset.save()
            formset.save_dependencies()
        else:
            formset.save()

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        detail = {}
        for formset in formsets:
            if isinstance(formset, WorkflowTaskFormSet):
                detail["tasks"] = {
                    "added": len(formset.new_objects),
                    "changed": len(formset.changed_objects),
                    "deleted": len(formset.deleted_objects),
                }
        if change and "name" in form.changed_data:
            detail["renamed_from"] = form.initial.get("name")
        if change:
            detail["fields"] = form.changed_data
        workflows.record_workflow_change(
            form.instance.name, "changed" if change else "created", actor_of(request), **detail
        )

    def delete_model(self, request, obj):
        name = obj.name
        super().delete_model(request, obj)
        workflows.record_workflow_change(name, "deleted", actor_of(request))

    def delete_queryset(self, request, queryset):
        names = list(queryset.values_list("name", flat=True))
        super().delete_queryset(request, queryset)
        for name in names:
            workflows.record_workflow_change(name, "deleted", actor_of(request))

    # -- actions --

    def has_start_run_permission(self, request):
        return request.user.has_perm("tasks_app.add_run")

    @admin.action(description="Start a run of the selected workflows…", permissions=["start_run"])
    def start_run(self, request, queryset):
        return admin_views.start_runs(self, request, queryset)

    @admin.action(description="Duplicate the selected workflows", permissions=["add"])
    def duplicate(self, request, queryset):
        for workflow in queryset:
            copy = workflows.duplicate_workflow(workflow, actor_of(request))
            url = reverse("admin:tasks_app_workflow_change", args=[copy.pk])
            self.message_user(request, format_html('Copied {} to <a href="{}">{}</a>.', workflow.name, url, copy.name))

    @admin.action(description="Export the selected workflows as YAML", permissions=["view"])
    def export_yaml(self, request, queryset):
        return admin_views.export_download(queryset, "yaml")

    @admin.action(description="Export the selected workflows as JSON", permissions=["view"])
    def export_json(self, request, queryset):
        return admin_views.export_download(queryset, "json")


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
    list_display = ["short_id", "task_key", "run", "agent", "number", "state", "progress", "exit_code",
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
