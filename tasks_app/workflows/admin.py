"""The workflow admin: workflows (DAG templates) edited with their tasks inline and the whole DAG validated
on save, started, duplicated, exported and imported (the pages of `admin_views`).

Every list page selects its related rows in the same query (subquery counts), so its query count does not
grow with the rows shown.
"""

from __future__ import annotations

from django.contrib import admin
from django.contrib.postgres.aggregates import ArrayAgg
from django.db.models import Count, IntegerField, Max, OuterRef, Subquery
from django.db.models.functions import Coalesce
from django.urls import path, reverse
from django.utils import timezone
from django.utils.html import format_html

from control_plane.web import actor_of

from ..models import Run, Workflow, WorkflowTask
from . import admin_views, documents
from .forms import SingleTaskForm, WorkflowForm, WorkflowTaskForm, WorkflowTaskFormSet

# Above this many tasks the change page leaves the tasks out (rendering thousands of rows of inputs is
# slow, and so is posting them): such workflows are edited as documents, exported and imported again.
INLINE_MAX_TASKS = 300


def count_of(model, fk: str):
    """A subquery counting `model` rows whose `fk` is the outer row: one query for the whole list page."""
    rows = model.objects.filter(**{fk: OuterRef("pk")}).order_by().values(fk).annotate(n=Count("*")).values("n")
    return Coalesce(Subquery(rows, output_field=IntegerField()), 0)


class WorkflowTaskInline(admin.TabularInline):
    """A workflow's tasks are part of the workflow: editing them takes the workflow's permissions (`change`,
    or `add` on the add page), not a second set for the task model that nobody would think to grant."""

    model = WorkflowTask
    form = WorkflowTaskForm
    formset = WorkflowTaskFormSet
    fields = WorkflowTaskForm.Meta.fields
    extra = 1

    def get_queryset(self, request):
        return super().get_queryset(request).order_by("position", "id")

    def _may_edit(self, request, workflow) -> bool:
        return request.user.has_perm("tasks_app.add_workflow" if workflow is None else "tasks_app.change_workflow")

    def has_add_permission(self, request, obj):
        return self._may_edit(request, obj)

    def has_change_permission(self, request, obj=None):
        return self._may_edit(request, obj)

    def has_delete_permission(self, request, obj=None):
        return self._may_edit(request, obj)

    def has_view_permission(self, request, obj=None):
        return request.user.has_perm("tasks_app.view_workflow") or self._may_edit(request, obj)


# --- Workflows --------------------------------------------------------------------------------------------


@admin.register(Workflow)
class WorkflowAdmin(admin.ModelAdmin):
    form = WorkflowForm
    inlines = [WorkflowTaskInline]
    list_display = ["name", "task_count", "run_count", "max_parallel", "priority", "updated_at"]
    search_fields = ["name", "description"]
    list_filter = ["updated_at"]
    actions = ["start_run", "duplicate", "export_yaml", "export_json"]
    change_list_template = "admin/tasks_app/workflow/change_list.html"
    change_form_template = "admin/tasks_app/workflow/change_form.html"
    fieldsets = [
        (
            None,
            {
                "fields": [
                    "name",
                    "description",
                    "max_parallel",
                    "priority",
                    "max_cost_usd",
                    "defaults",
                    "opened_version",
                ]
            },
        ),  # fmt: skip
        (
            "Workspace and parameters",
            {
                "fields": ["workspace_repo", "workspace_base", "workspace_branch_prefix", "params"],
                "description": "Each task of a run works in a git worktree of this repository, with its"
                " dependencies' commits merged in, and pushes its own branch; a run that succeeds leaves every"
                " task's work on PREFIX + run id + /result. A start may give another repository, base or"
                " parameters.",
            },
        ),
    ]

    class Media:
        # The dashboard's DAG styles and pan & zoom, and the editor's key suggestions and live preview.
        css = {"all": ["css/dag.css", "css/workflow_editor.css"]}
        js = ["js/dag.js", "js/workflow_editor.js"]

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
            path("preview/", view(self.preview_view), name="tasks_app_workflow_preview_form"),
            path("<path:object_id>/preview/", view(self.preview_view), name="tasks_app_workflow_preview"),
            path("<path:object_id>/export/", view(self.export_view), name="tasks_app_workflow_export"),
            path("<path:object_id>/start/", view(self.start_view), name="tasks_app_workflow_start"),
            *super().get_urls(),
        ]

    def import_view(self, request):
        return admin_views.import_workflow(self, request)

    def preview_view(self, request, object_id=None):
        return admin_views.preview_workflow(self, request, object_id)

    def export_view(self, request, object_id):
        return admin_views.export_workflow(self, request, object_id)

    def start_view(self, request, object_id):
        return admin_views.start_one_run(self, request, object_id)

    # -- editing: big workflows are edited as documents; every change is audited --

    def _task_count(self, request, obj) -> int:
        cache = request.__dict__.setdefault("_workflow_task_counts", {})
        if obj.pk not in cache:
            cache[obj.pk] = obj.tasks.count()
        return cache[obj.pk]

    def get_form(self, request, obj=None, change=False, **kwargs):
        form = super().get_form(request, obj, change=change, **kwargs)
        # Without the task rows on the page, nothing else checks the parameters against the tasks' templates.
        form.check_stored_tasks = obj is not None and self._task_count(request, obj) > INLINE_MAX_TASKS
        return form

    # The workspace's fields as a read-only page shows them (a viewer's).
    @admin.display(description="repository")
    def workspace_repo(self, obj):
        return (obj.workspace or {}).get("repo", "")

    @admin.display(description="base")
    def workspace_base(self, obj):
        return (obj.workspace or {}).get("base", "")

    @admin.display(description="branch prefix")
    def workspace_branch_prefix(self, obj):
        return (obj.workspace or {}).get("branch_prefix", "")

    def get_inline_instances(self, request, obj=None):
        if obj is not None and self._task_count(request, obj) > INLINE_MAX_TASKS:
            return []
        return super().get_inline_instances(request, obj)

    def change_view(self, request, object_id, form_url="", extra_context=None):
        extra_context = dict(
            extra_context or {}, inline_max_tasks=INLINE_MAX_TASKS, can_start_run=self.has_start_run_permission(request)
        )
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
        documents.record_workflow_change(
            form.instance.name, "changed" if change else "created", actor_of(request), **detail
        )

    def delete_model(self, request, obj):
        name = obj.name
        super().delete_model(request, obj)
        documents.record_workflow_change(name, "deleted", actor_of(request))

    def delete_queryset(self, request, queryset):
        names = list(queryset.values_list("name", flat=True))
        super().delete_queryset(request, queryset)
        for name in names:
            documents.record_workflow_change(name, "deleted", actor_of(request))

    # -- actions --

    def has_start_run_permission(self, request):
        return request.user.has_perm("tasks_app.add_run")

    @admin.action(description="Start a run of the selected workflows…", permissions=["start_run"])
    def start_run(self, request, queryset):
        return admin_views.start_runs(self, request, queryset)

    @admin.action(description="Duplicate the selected workflows", permissions=["add"])
    def duplicate(self, request, queryset):
        for workflow in queryset:
            copy = documents.duplicate_workflow(workflow, actor_of(request))
            url = reverse("admin:tasks_app_workflow_change", args=[copy.pk])
            self.message_user(request, format_html('Copied {} to <a href="{}">{}</a>.', workflow.name, url, copy.name))

    @admin.action(description="Export the selected workflows as YAML", permissions=["view"])
    def export_yaml(self, request, queryset):
        return admin_views.export_download(queryset, "yaml")

    @admin.action(description="Export the selected workflows as JSON", permissions=["view"])
    def export_json(self, request, queryset):
        return admin_views.export_download(queryset, "json")


@admin.register(WorkflowTask)
class WorkflowTaskAdmin(admin.ModelAdmin):
    """Tasks one at a time: how a workflow too big to edit inline is edited in the admin (its change page
    links here, filtered on it). Each save checks the whole DAG, moves the workflow's version (an editor's
    open page of it goes stale) and is audited. Permissions are the workflow's, as for the inline."""

    form = SingleTaskForm
    list_display = ["key", "workflow", "title", "executor", "deps_text", "requires_text", "priority", "estimate_s"]
    list_filter = ["executor", "workflow"]
    search_fields = ["key", "title", "workflow__name"]
    list_select_related = ["workflow"]
    ordering = ["workflow__name", "position", "id"]
    show_full_result_count = False
    change_form_template = "admin/tasks_app/workflowtask/change_form.html"

    class Media:
        js = ["js/workflow_editor.js"]

    def get_queryset(self, request):
        keys = (
            documents.DepLink.objects.filter(from_workflowtask=OuterRef("pk"))
            .order_by()
            .values("from_workflowtask")
            .annotate(keys=ArrayAgg("to_workflowtask__key", order_by="id"))
            .values("keys")
        )
        return super().get_queryset(request).annotate(dep_keys=Subquery(keys))

    @admin.display(description="deps")
    def deps_text(self, obj):
        return ", ".join(obj.dep_keys or ())

    @admin.display(description="deps")
    def deps_keys(self, obj):
        """The form's deps field, as a read-only page shows it (a viewer's)."""
        links = documents.DepLink.objects.filter(from_workflowtask=obj).order_by("id")
        return ", ".join(links.values_list("to_workflowtask__key", flat=True))

    @admin.display(description="requires")
    def requires_text(self, obj):
        return ", ".join(obj.requires)

    def _may_edit(self, request) -> bool:
        return request.user.has_perm("tasks_app.change_workflow")

    def has_add_permission(self, request):
        return self._may_edit(request)

    def has_change_permission(self, request, obj=None):
        return self._may_edit(request)

    def has_delete_permission(self, request, obj=None):
        return self._may_edit(request)

    def has_view_permission(self, request, obj=None):
        return request.user.has_perm("tasks_app.view_workflow") or self._may_edit(request)

    def render_change_form(self, request, context, add=False, change=False, form_url="", obj=None):
        workflow = obj.workflow if obj is not None else None
        keys = list(workflow.tasks.values_list("key", flat=True)) if workflow is not None else []
        return super().render_change_form(request, {**context, "workflow_keys": keys}, add, change, form_url, obj)

    def save_model(self, request, obj, form, change):
        if not change:
            last = WorkflowTask.objects.filter(workflow=obj.workflow).aggregate(n=Max("position"))["n"]
            obj.position = 0 if last is None else last + 1
        super().save_model(request, obj, form, change)
        form.save_dependencies(obj)
        self._workflow_changed(request, obj.workflow, task=obj.key, task_change="changed" if change else "added")

    def delete_model(self, request, obj):
        super().delete_model(request, obj)
        self._workflow_changed(request, obj.workflow, task=obj.key, task_change="deleted")

    def delete_queryset(self, request, queryset):
        chosen = list(queryset.select_related("workflow"))
        super().delete_queryset(request, queryset)
        for task in chosen:
            self._workflow_changed(request, task.workflow, task=task.key, task_change="deleted")

    def _workflow_changed(self, request, workflow, **detail):
        Workflow.objects.filter(pk=workflow.pk).update(updated_at=timezone.now())
        documents.record_workflow_change(workflow.name, "changed", actor_of(request), **detail)
