"""The workflow editor's forms: a workflow's own fields, one form per task row (dependencies edited by key), and
the formset that validates the DAG the rows make as a whole before anything is saved.

Every check ends in THE validator (`tasks_app.dag.parse_document`), so the admin refuses exactly what the API
and the import refuse; the forms only decide which field each refusal is shown on.
"""

from __future__ import annotations

import json
import re

from django import forms
from django.core.exceptions import ValidationError
from django.db.models import CharField, Value
from django.db.models.functions import Cast, Concat

from ..dag import NAME_RE, DagError, parse_document, parse_task, topological_order
from ..models import Workflow, WorkflowTask
from . import documents

DEPS_SPLIT = re.compile(r"[\s,]+")


def _error_field(form: forms.Form, field: str | None) -> str | None:
    """The form field a DagError's `field` points at (None for the form as a whole)."""
    if field is None:
        return None
    field = {"deps": "deps_keys"}.get(field, field.split(".")[0])
    return field if field in form.fields else None


class JSONObjectWidget(forms.Textarea):
    """A JSON object, shown indented (one key a line) rather than as Django's one-line dump, and checked as
    it is typed (static/js/workflow_editor.js: "not valid JSON" beside the field). `compact` keeps it on one
    line, for the task rows."""

    def __init__(self, attrs=None, compact: bool = False):
        super().__init__({"spellcheck": "false", "data-json-object": "", **(attrs or {})})
        self.compact = compact

    def format_value(self, value):
        if isinstance(value, str) and value and not self.compact:
            try:
                value = json.dumps(json.loads(value), indent=2, ensure_ascii=False)
            except ValueError:
                pass  # what the person typed, as typed: its error is shown beside it
        return super().format_value(value)


# The document's workspace fields and the editor's fields for them.
WORKSPACE_FORM_FIELDS = {"repo": "workspace_repo", "base": "workspace_base", "branch_prefix": "workspace_branch_prefix"}


def workspace_field_of(detail: str) -> str:
    """The editor's field a workspace refusal is about (`workspace.base must be ...` is about the base)."""
    for part, field in WORKSPACE_FORM_FIELDS.items():
        if detail.startswith(f"workspace.{part} "):
            return field
    return "workspace_repo"


class WorkflowForm(forms.ModelForm):
    """The workflow's own fields. `opened_version` is the workflow's `updated_at` when the page was opened: a
    save over someone else's newer save is refused rather than silently undoing it (every path that changes a
    workflow saves its row, so `updated_at` moves with each change).

    The document's `workspace` is edited as three fields (an empty repository: no workspace) and stored as the
    document would give it, empty fields left out. `check_stored_tasks` (set by the admin when the page does
    not edit the tasks in place) checks the parameters against the saved tasks' templates; otherwise the task
    rows' formset checks them against the parameters as posted."""

    opened_version = forms.CharField(required=False, widget=forms.HiddenInput)
    workspace_repo = forms.CharField(
        label="Repository",
        required=False,
        max_length=2000,
        widget=forms.TextInput(attrs={"size": 80, "spellcheck": "false", "placeholder": "ssh://git@host/team/app.git"}),
        help_text="the git repository runs work on, as the agents' own git fetches it and pushes to it;"
        " empty: tasks run in an empty directory",
    )
    workspace_base = forms.CharField(
        label="Base",
        required=False,
        max_length=255,
        widget=forms.TextInput(attrs={"size": 40, "spellcheck": "false", "placeholder": "HEAD"}),
        help_text="branch, tag or full commit sha, resolved to a commit when a run starts;"
        " empty: the repository's HEAD",
    )
    workspace_branch_prefix = forms.CharField(
        label="Branch prefix",
        required=False,
        max_length=64,
        widget=forms.TextInput(attrs={"size": 20, "spellcheck": "false", "placeholder": "cp/"}),
        help_text="task branches are PREFIX + the run id's first 8 hex + / + the task key; empty: cp/",
    )
    check_stored_tasks = False

    class Meta:
        model = Workflow
        fields = ["name", "description", "max_parallel", "priority", "max_cost_usd", "defaults",
                  *WORKSPACE_FORM_FIELDS.values(), "params"]  # fmt: skip
        widgets = {
            "description": forms.Textarea(attrs={"rows": 3, "cols": 80}),
            "params": JSONObjectWidget(attrs={"rows": 4, "cols": 80}),
            "defaults": JSONObjectWidget(attrs={"rows": 4, "cols": 80}),
        }
        labels = {"params": "Parameters", "max_cost_usd": "Budget (USD)"}
        help_texts = {
            "params": 'run parameters, a JSON object such as {"feature": "login"}: ${params.feature} in a prompt or'
            " command; a start may override them",
            "max_cost_usd": "each run's budget: at this cost the run pauses and its live attempts are stopped;"
            " empty: none",
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk:
            self.initial["opened_version"] = self.instance.updated_at.isoformat()
        for part, field in WORKSPACE_FORM_FIELDS.items():
            self.initial.setdefault(field, (self.instance.workspace or {}).get(part, ""))

    def clean_defaults(self):
        return self.cleaned_data.get("defaults") or {}

    def clean_params(self):
        return self.cleaned_data.get("params") or {}

    def workspace_of(self, data) -> dict | None:
        """The workspace as a document gives it: the fields filled in, or None without a repository."""
        parts = {part: data.get(field) for part, field in WORKSPACE_FORM_FIELDS.items() if data.get(field)}
        if not parts:
            return None
        if "repo" not in parts:
            self.add_error("workspace_repo", "a base or a branch prefix needs a repository")
        return parts

    def clean_opened_version(self):
        """Lock the workflow's row (the admin saves in one transaction, so two saves of one workflow take
        turns) and compare its version with the page's."""
        opened = self.cleaned_data.get("opened_version")
        if not self.instance.pk or not opened:
            return opened
        current = Workflow.objects.select_for_update().filter(pk=self.instance.pk).values_list("updated_at")
        current = current.first()
        if current is not None and current[0].isoformat() != opened:
            # On the form as a whole: the field is hidden, and so would be an error shown next to it.
            self.add_error(
                None,
                f"Someone changed this workflow at {current[0]:%Y-%m-%d %H:%M:%S} UTC, after you opened this page."
                " Open it again to see their changes, then make yours.",
            )
        return opened

    def clean(self):
        data = super().clean()
        if self.errors:
            return data
        workspace = self.workspace_of(data)
        if self.errors:
            return data
        probe = {
            "name": data.get("name") or "x",
            "defaults": data.get("defaults"),
            "params": data.get("params"),
            "tasks": [{"key": "probe", "executor": "simulated"}],
        }
        for name in ("max_parallel", "priority", "max_cost_usd"):
            if data.get(name) is not None:
                probe[name] = data[name]
        if workspace is not None:
            probe["workspace"] = workspace
        try:
            parse_document(probe)
        except DagError as exc:
            for problem in exc.problems:
                field = problem.field
                field = workspace_field_of(problem.detail) if field == "workspace" else _error_field(self, field)
                self.add_error(field, problem.detail)
            return data
        if self.check_stored_tasks and self.instance.pk:
            stored = documents.workflow_to_document(self.instance)
            try:  # the saved tasks' templates, with the parameters as posted
                parse_document({**stored, "params": probe["params"]})
            except DagError as exc:
                self.add_error("params" if exc.keys else None, exc.detail)
        self.instance.workspace = workspace
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
            "params": JSONObjectWidget(attrs={"rows": 1, "cols": 14}, compact=True),
            "estimate_s": forms.NumberInput(attrs={"style": "width: 6em"}),
            "priority": forms.NumberInput(attrs={"style": "width: 5em"}),
            "max_attempts": forms.NumberInput(attrs={"style": "width: 4em"}),
            "timeout_s": forms.NumberInput(attrs={"style": "width: 6em"}),
            "retry_delay_s": forms.NumberInput(attrs={"style": "width: 5em"}),
        }

    def __init__(self, *args, deps_by_task=None, **kwargs):
        super().__init__(*args, **kwargs)
        if "requires" in self.fields:  # a read-only page has no fields
            self.fields["requires"].help_text = "labels, comma-separated"
        if self.instance.pk and deps_by_task is not None:
            self.initial["deps_keys"] = ", ".join(deps_by_task.get(self.instance.pk, ()))

    def clean_deps_keys(self):
        keys = [k for k in DEPS_SPLIT.split(self.cleaned_data.get("deps_keys") or "") if k]
        bad = [k for k in keys if not NAME_RE.fullmatch(k)]
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
            try:  # the task's own fields, through THE validator; its deps and templates are the formset's business
                parse_task(self.task_entry(with_deps=False))
            except DagError as exc:
                for problem in exc.problems:
                    self.add_error(_error_field(self, problem.field), problem.detail)
        return data

    def task_entry(self, with_deps: bool = True) -> dict:
        """This row as a DAG document's task (fields left empty are left out: they take the defaults)."""
        data = self.cleaned_data
        entry = {"key": data.get("key")}
        if with_deps:
            entry["deps"] = data.get("deps_keys") or []
        for name in documents.TASK_VALUE_FIELDS:
            if data.get(name) not in (None, ""):
                entry[name] = data[name]
        return entry


class RowIdField(forms.ModelChoiceField):
    """A row's hidden id, found among the rows the formset loaded in one query: Django's own field would
    fetch each row again by id, 300 queries to save a 300-task workflow."""

    def __init__(self, formset: WorkflowTaskFormSet, field: forms.ModelChoiceField):
        super().__init__(field.queryset, initial=field.initial, required=False, widget=field.widget)
        self.formset = formset

    def to_python(self, value):
        if value in self.empty_values:
            return None
        try:
            row = self.formset._existing_object(self.formset.model._meta.pk.to_python(value))
        except ValidationError:
            row = None
        if row is None:
            raise ValidationError(self.error_messages["invalid_choice"], code="invalid_choice")
        return row


def _rows_by_key(rows: list[WorkflowTaskForm]) -> dict[str, WorkflowTaskForm]:
    """The rows by their key (as cleaned, else as typed); a key given twice is an error on its second row."""
    by_key: dict[str, WorkflowTaskForm] = {}
    for form in rows:
        key = form.cleaned_data.get("key") or form.data.get(form.add_prefix("key"), "").strip()
        if not key:
            continue
        if key in by_key:
            form.add_error("key", f"duplicate key {key!r}: another task of this workflow has it")
        else:
            by_key[key] = form
    return by_key


def _dependency_graph(by_key: dict[str, WorkflowTaskForm]) -> dict[str, list[str]]:
    """Each row's deps by its key, an unknown or repeated dep an error on its row (a row whose deps field
    was refused is left out)."""
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
    return graph


class WorkflowTaskFormSet(forms.BaseInlineFormSet):
    """The workflow's tasks; `clean` validates the DAG they make as a whole."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.deps_by_task: dict[int, list[str]] = {}
        if self.instance.pk:
            links = (
                documents.DepLink.objects.filter(from_workflowtask__workflow=self.instance)
                .order_by("id")
                .values_list("from_workflowtask_id", "to_workflowtask__key")
            )
            for task_id, key in links:
                self.deps_by_task.setdefault(task_id, []).append(key)

    def get_form_kwargs(self, index):
        return {**super().get_form_kwargs(index), "deps_by_task": self.deps_by_task}

    def add_fields(self, form, index):
        super().add_fields(form, index)
        name = self._pk_field.name
        form.fields[name] = RowIdField(self, form.fields[name])

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
        by_key = _rows_by_key(rows)
        graph = _dependency_graph(by_key)
        if len(graph) == len(by_key) and not any(f.errors.get("deps_keys") or f.errors.get("key") for f in rows):
            try:
                topological_order(graph)
            except DagError as exc:
                problems.append(exc.detail)
                for key in dict.fromkeys(exc.keys):
                    by_key[key].add_error("deps_keys", f"{key} is on the {exc.detail}")
        if rows and not problems and not any(form.errors for form in rows):
            self._check_document(rows, by_key, problems)
        if problems:
            raise ValidationError(problems)

    def _check_document(self, rows: list[WorkflowTaskForm], by_key: dict, problems: list[str]) -> None:
        """The catch-all: whatever else THE validator refuses, it refuses here too, templates included
        (against the parameters as the workflow's form posted them: it is cleaned first). The error goes on
        the row and field it names, else into `problems`."""
        try:
            tasks = [form.task_entry() for form in rows]
            parse_document({"name": "workflow", "params": self.instance.params or {}, "tasks": tasks})
        except DagError as exc:
            for problem in exc.problems:
                form = by_key.get(problem.keys[0]) if problem.keys else None
                if form is not None and _error_field(form, problem.field):
                    form.add_error(_error_field(form, problem.field), problem.detail)
                else:
                    problems.append(problem.detail)

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
        documents.DepLink.objects.filter(from_workflowtask__workflow=self.instance).delete()
        documents.DepLink.objects.bulk_create(
            [
                documents.DepLink(from_workflowtask_id=form.instance.pk, to_workflowtask_id=ids[dep])
                for form in rows
                for dep in form.cleaned_data["deps_keys"]
            ],
            batch_size=5000,
        )


class SingleTaskForm(WorkflowTaskForm):
    """One task of a workflow on a page of its own (how tasks of workflows too big to edit inline are edited).
    `clean` checks the whole DAG the workflow would have after the save: the workflow's other tasks are read
    from the database under a lock on the workflow's row, so two such saves take turns."""

    class Meta(WorkflowTaskForm.Meta):
        fields = ["workflow", *WorkflowTaskForm.Meta.fields]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.instance.pk and "workflow" in self.fields:
            self.fields["workflow"].disabled = True
            self.initial["deps_keys"] = ", ".join(
                documents.DepLink.objects.filter(from_workflowtask=self.instance)
                .order_by("id")
                .values_list("to_workflowtask__key", flat=True)
            )

    def clean(self):
        data = super().clean()
        workflow = data.get("workflow")
        if self.errors or workflow is None:
            return data
        Workflow.objects.select_for_update().filter(pk=workflow.pk).first()
        document = documents.workflow_to_document(workflow)
        entry = self.task_entry()
        old_key = self.instance.key if self.instance.pk else None
        tasks = []
        for task in document["tasks"]:
            if task["key"] == old_key:
                tasks.append(entry)
                continue
            if old_key and old_key in task.get("deps", ()):  # a rename: the links follow the task
                task["deps"] = [entry["key"] if d == old_key else d for d in task["deps"]]
            tasks.append(task)
        if old_key is None:
            tasks.append(entry)
        try:
            parse_document({**document, "tasks": tasks})
        except DagError as exc:
            for problem in exc.problems:
                mine = problem.keys and problem.keys[0] == entry["key"]
                self.add_error(_error_field(self, problem.field) if mine else None, problem.detail)
        return data

    def save_dependencies(self, task: WorkflowTask) -> None:
        """After the task's row is saved: its dependency links, by key, among its workflow's tasks."""
        keys = self.cleaned_data["deps_keys"]
        ids = dict(WorkflowTask.objects.filter(workflow=task.workflow, key__in=keys).values_list("key", "id"))
        documents.DepLink.objects.filter(from_workflowtask=task).delete()
        documents.DepLink.objects.bulk_create(
            [documents.DepLink(from_workflowtask_id=task.pk, to_workflowtask_id=ids[k]) for k in keys]
        )
