"""The workflow admin's own pages: import a DAG document, start runs (the action's intermediate page), export,
and the DAG picture of the change page. Thin views: `tasks_app.workflows.documents` and `tasks_app.workflows.preview` do
the work."""

from __future__ import annotations

import io
import re
import zipfile

from django import forms
from django.contrib import messages
from django.contrib.admin import helpers
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.http import Http404, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html

from control_plane.web import actor_of

from ..dag import DagError, params_from_pairs
from ..models import Workflow
from . import documents, preview

IMPORT_MAX_BYTES = 16 * 1024 * 1024


def _context(model_admin, request, **extra) -> dict:
    return {**model_admin.admin_site.each_context(request), "opts": model_admin.opts, **extra}


def _filename(name: str, fmt: str) -> str:
    return (re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "workflow") + "." + fmt


# --- Import ----------------------------------------------------------------------------------------------


class ImportForm(forms.Form):
    file = forms.FileField(required=False, label="Document file", help_text="a .yaml, .yml or .json DAG document")
    text = forms.CharField(
        required=False,
        label="or paste it",
        widget=forms.Textarea(attrs={"rows": 18, "cols": 100, "spellcheck": "false"}),
    )
    replace = forms.BooleanField(
        required=False,
        label="Replace the workflow of the same name if there is one",
        help_text="its tasks are replaced by the document's; its runs stay as they were",
    )

    def clean(self):
        data = super().clean()
        upload, text = data.get("file"), data.get("text")
        if bool(upload) == bool(text and text.strip()):
            raise ValidationError("Upload a file or paste a document (one of the two).")
        if upload:
            if upload.size > IMPORT_MAX_BYTES:
                raise ValidationError(f"The file is larger than {IMPORT_MAX_BYTES // (1024 * 1024)} MiB.")
            try:
                text = upload.read().decode("utf-8")
            except UnicodeDecodeError:
                raise ValidationError("The file is not UTF-8 text.") from None
        try:
            data["document"] = documents.load_document_text(text)
        except DagError as exc:
            raise ValidationError(exc.detail) from None
        return data


def import_workflow(model_admin, request):
    """Create a workflow from an uploaded or pasted document, or replace the one of the same name."""
    if not model_admin.has_add_permission(request):
        raise PermissionDenied
    form = ImportForm(*(request.POST, request.FILES) if request.method == "POST" else ())
    if request.method == "POST" and form.is_valid():
        replace = form.cleaned_data["replace"]
        if replace and not model_admin.has_change_permission(request):
            form.add_error("replace", "You may create workflows but not change them.")
        else:
            try:
                workflow = documents.import_document(form.cleaned_data["document"], replace, actor=actor_of(request))
            except DagError as exc:
                form.add_error(None, f"Not a valid DAG document: {exc.detail}")
            except documents.WorkflowExists as exc:
                form.add_error("replace", f"{str(exc)[0].upper()}{str(exc)[1:]}.")
            else:
                n = workflow.tasks.count()
                messages.success(request, f"Imported the workflow {workflow.name!r} ({n} tasks).")
                return HttpResponseRedirect(reverse("admin:tasks_app_workflow_change", args=[workflow.pk]))
    context = _context(model_admin, request, form=form, title="Import a workflow")
    return TemplateResponse(request, "admin/tasks_app/workflow/import.html", context)


# --- Export ----------------------------------------------------------------------------------------------


def _download(content: bytes | str, filename: str, content_type: str) -> HttpResponse:
    response = HttpResponse(content, content_type=content_type)
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response


CONTENT_TYPES = {"yaml": "application/yaml; charset=utf-8", "json": "application/json; charset=utf-8"}


def export_download(queryset, fmt: str) -> HttpResponse:
    """One workflow as a document file; several as a zip of them."""
    chosen = list(queryset)
    if len(chosen) == 1:
        text = documents.dump_document(documents.workflow_to_document(chosen[0]), fmt)
        return _download(text, _filename(chosen[0].name, fmt), CONTENT_TYPES[fmt])
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for workflow in chosen:
            text = documents.dump_document(documents.workflow_to_document(workflow), fmt)
            archive.writestr(_filename(workflow.name, fmt), text)
    return _download(buffer.getvalue(), f"workflows-{fmt}.zip", "application/zip")


def export_workflow(model_admin, request, object_id):
    workflow = model_admin.get_object(request, object_id)
    if workflow is None:
        raise Http404("no such workflow")
    if not model_admin.has_view_or_change_permission(request, workflow):
        raise PermissionDenied
    fmt = request.GET.get("format", "yaml")
    if fmt not in documents.FORMATS:
        fmt = "yaml"
    return export_download(Workflow.objects.filter(pk=workflow.pk), fmt)


# --- Start a run -----------------------------------------------------------------------------------------


class StartRunForm(forms.Form):
    max_parallel = forms.IntegerField(
        required=False, min_value=1, max_value=100_000, help_text="live attempts at once; empty: the workflow's own"
    )
    priority = forms.IntegerField(
        required=False,
        min_value=-1_000_000,
        max_value=1_000_000,
        help_text="added to every task's; empty: the workflow's own",
    )
    repo = forms.CharField(
        label="Repository",
        required=False,
        max_length=2000,
        widget=forms.TextInput(attrs={"size": 80, "spellcheck": "false"}),
        help_text="the git repository the run works on; empty: the workflow's own",
    )
    base = forms.CharField(
        label="Base",
        required=False,
        max_length=255,
        widget=forms.TextInput(attrs={"size": 40, "spellcheck": "false"}),
        help_text="branch, tag or full commit sha to start from; empty: the workflow's own (or the repository's HEAD)",
    )
    params = forms.CharField(
        label="Parameters",
        required=False,
        widget=forms.Textarea(attrs={"rows": 4, "cols": 80, "spellcheck": "false", "placeholder": "feature=signup"}),
        help_text="one NAME=VALUE a line, overriding or adding to the workflow's parameters (a value is text);"
        " empty: the workflow's own",
    )

    def clean_repo(self):
        return self.cleaned_data.get("repo") or None

    def clean_base(self):
        return self.cleaned_data.get("base") or None

    def clean_params(self):
        lines = [line for line in (self.cleaned_data.get("params") or "").splitlines() if line.strip()]
        try:
            return params_from_pairs(lines)
        except DagError as exc:
            raise ValidationError(exc.detail) from None

    def add_refusal(self, workflow: Workflow, exc: DagError) -> None:
        """A start refused, on the field that can mend it (a repository that cannot be reached, a base it
        does not have, a parameter the templates need), else on the form."""
        field = None
        if exc.field == "params" or "names no parameter" in exc.detail:
            field = "params"
        elif exc.field == "workspace":
            about_base = exc.detail.startswith("workspace.base") or "has no branch or tag" in exc.detail
            field = "base" if about_base or "a base was given" in exc.detail else "repo"
        self.add_error(field, f"{workflow.name}: {exc.detail}")


def start_runs(model_admin, request, queryset):
    """The "start a run" action: ask for overrides, then start one run of each selected workflow. All or
    nothing: when one cannot start (not a valid DAG, its repository unreachable, no such base, a bad
    parameter), none is, and the form says why."""
    form = StartRunForm(request.POST if "apply" in request.POST else None)
    chosen = list(queryset)
    if "apply" in request.POST and form.is_valid():
        overrides = {name: form.cleaned_data[name] for name in ("priority", "max_parallel", "repo", "base", "params")}
        started = []
        with transaction.atomic():
            for workflow in chosen:
                try:
                    with transaction.atomic():
                        started.append(
                            documents.start_run(workflow, actor=actor_of(request), user=request.user, **overrides)
                        )
                except DagError as exc:
                    form.add_refusal(workflow, exc)
            if form.errors:
                transaction.set_rollback(True)
        if not form.errors:
            for workflow, run in zip(chosen, started, strict=True):
                url = reverse("run", args=[run.pk])
                message = format_html(
                    'Started <a href="{}">a run of {}</a> ({} tasks).', url, workflow.name, run.tasks.count()
                )
                messages.success(request, message)
            return None
    context = _context(
        model_admin,
        request,
        form=form,
        workflows=chosen,
        title="Start a run",
        action_checkbox_name=helpers.ACTION_CHECKBOX_NAME,
    )
    return TemplateResponse(request, "admin/tasks_app/workflow/start_run.html", context)


def start_one_run(model_admin, request, object_id):
    """The change page's "Start a run…": the action's page for this one workflow, back to the change page
    (whose messages link to the run) once started."""
    if not model_admin.has_start_run_permission(request):
        raise PermissionDenied
    workflow = model_admin.get_object(request, object_id)
    if workflow is None:
        raise Http404("no such workflow")
    response = start_runs(model_admin, request, Workflow.objects.filter(pk=workflow.pk))
    if response is None:
        return HttpResponseRedirect(reverse("admin:tasks_app_workflow_change", args=[workflow.pk]))
    return response


# --- The DAG picture of the change page ------------------------------------------------------------------


def preview_workflow(model_admin, request, object_id=None):
    """GET (with an object id): the saved workflow's DAG. POST: the DAG of the change form's task rows as
    posted, for the live preview while someone edits (the add page has no object id yet)."""
    if request.method not in ("GET", "POST"):
        return HttpResponseNotAllowed(["GET", "POST"])
    if request.method == "POST":
        if not (model_admin.has_add_permission(request) or model_admin.has_change_permission(request)):
            raise PermissionDenied
        return HttpResponse(preview.picture(preview.rows_of_form(request.POST)))
    if object_id is None:
        raise Http404("no such workflow")
    workflow = model_admin.get_object(request, object_id)
    if workflow is None:
        raise Http404("no such workflow")
    if not model_admin.has_view_or_change_permission(request, workflow):
        raise PermissionDenied
    return HttpResponse(preview.picture(preview.rows_of_workflow(workflow)))
