"""Workflows as DAG documents (PROTOCOL.md): export, import, duplicate, start a run, and their audit events.

A workflow stores each task field as the document gave it (None = "use the defaults"), so exporting a workflow
and importing the document gives back the same workflow field for field. Every change writes an Event of kind
"workflow" (its run/task/attempt/agent are null; the workflow's name is in `detail`).
"""

from __future__ import annotations

import json
from collections import defaultdict

import yaml
from django.db import transaction

from .. import actions
from ..dag import DagError, parse_document, with_overrides
from ..models import Event, Run, Workflow, WorkflowTask

DepLink = WorkflowTask.deps.through
# The task fields a document may carry besides key and deps, in the order an exported document lists them.
TASK_VALUE_FIELDS = (
    "title", "requires", "executor", "command", "prompt", "params", "estimate_s", "priority", "max_attempts",
    "timeout_s", "retry_delay_s",
)  # fmt: skip
FORMATS = ("yaml", "json")

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_BaseDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class WorkflowExists(Exception):
    """An import named an existing workflow without asking to replace it."""

    def __init__(self, name: str):
        super().__init__(f"a workflow named {name!r} exists (import with replace to overwrite it)")
        self.name = name


def record_workflow_change(name: str, change: str, actor: str, **detail) -> None:
    """The audit trail's line for one workflow change (created|changed|deleted|imported|run started)."""
    Event.objects.create(kind="workflow", actor=actor, detail={"workflow": name, "change": change, **detail})


# --- Documents ------------------------------------------------------------------------------------------


def workflow_to_document(workflow: Workflow) -> dict:
    """The workflow as a DAG document: tasks in their stored order, each dependency list in its stored order,
    fields left at their defaults omitted. Two queries however many tasks there are."""
    deps: dict[int, list[str]] = defaultdict(list)
    links = (
        DepLink.objects.filter(from_workflowtask__workflow=workflow)
        .order_by("id")
        .values_list("from_workflowtask_id", "to_workflowtask__key")
    )
    for task_id, dep_key in links:
        deps[task_id].append(dep_key)
    tasks = [_task_entry(t, deps[t.id]) for t in workflow.tasks.order_by("position", "id")]
    document: dict = {"name": workflow.name}
    if workflow.description:
        document["description"] = workflow.description
    if workflow.max_parallel is not None:
        document["max_parallel"] = workflow.max_parallel
    if workflow.priority:
        document["priority"] = workflow.priority
    if workflow.defaults:
        document["defaults"] = dict(workflow.defaults)
    if workflow.workspace is not None:
        document["workspace"] = dict(workflow.workspace)
    if workflow.params:
        document["params"] = dict(workflow.params)
    if workflow.max_cost_usd is not None:
        document["max_cost_usd"] = workflow.max_cost_usd
    document["tasks"] = tasks
    return document


def _task_entry(task: WorkflowTask, deps: list[str]) -> dict:
    entry: dict = {"key": task.key}
    if task.title:
        entry["title"] = task.title
    if deps:
        entry["deps"] = deps
    if task.requires:
        entry["requires"] = list(task.requires)
    entry["executor"] = task.executor
    for name in ("command", "prompt"):
        if getattr(task, name) is not None:
            entry[name] = getattr(task, name)
    if task.params:
        entry["params"] = task.params
    if task.estimate_s is not None:
        estimate = task.estimate_s
        entry["estimate_s"] = int(estimate) if estimate.is_integer() and abs(estimate) < 2**53 else estimate
    if task.priority:
        entry["priority"] = task.priority
    for name in ("max_attempts", "timeout_s", "retry_delay_s"):
        if getattr(task, name) is not None:
            entry[name] = getattr(task, name)
    return entry


class _Dumper(_BaseDumper):
    """Multi-line strings (prompts, scripts) as YAML literal blocks, so exported files read well in git."""


def _represent_str(dumper, value: str):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_document(document: dict, fmt: str = "yaml") -> str:
    if fmt == "json":
        return json.dumps(document, indent=2, ensure_ascii=False) + "\n"
    if fmt == "yaml":
        return yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)
    raise ValueError(f"unknown format {fmt!r}: use yaml or json")


def load_document_text(text: str) -> dict:
    """A document from JSON or YAML text (JSON first: it is faster, and YAML would take it anyway)."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise DagError(f"neither valid JSON nor valid YAML: {exc}") from None


# --- Writing workflows ----------------------------------------------------------------------------------


def import_document(document, replace: bool = False, actor: str = "system") -> Workflow:
    """Create a workflow from a DAG document, or with `replace` overwrite the one of the same name (its runs
    stay linked to it). Validates through `parse_document` first (DagError); WorkflowExists when the name is
    taken and `replace` is false. Tasks and dependency links are inserted in bulk."""
    parse_document(document)
    description = document.get("description") or ""
    if not isinstance(description, str):
        raise DagError("description must be a string", field="description")
    with transaction.atomic():
        existing = Workflow.objects.select_for_update().filter(name=document["name"]).first()
        if existing is not None and not replace:
            raise WorkflowExists(document["name"])
        workflow = _write(document, existing)
        record_workflow_change(
            workflow.name, "imported", actor, tasks=len(document["tasks"]), replaced=existing is not None
        )
    return workflow


def duplicate_workflow(workflow: Workflow, actor: str) -> Workflow:
    """A copy of the workflow under a free name ("<name> (copy)", "<name> (copy 2)", ...)."""
    document = workflow_to_document(workflow)
    with transaction.atomic():
        document["name"] = _free_name(workflow.name)
        copy = _write(document, None)
        record_workflow_change(copy.name, "created", actor, copied_from=workflow.name)
    return copy


def _free_name(name: str) -> str:
    taken = set(Workflow.objects.filter(name__startswith=name[:100]).values_list("name", flat=True))
    n = 1
    while True:
        suffix = " (copy)" if n == 1 else f" (copy {n})"
        candidate = name[: 128 - len(suffix)] + suffix
        if candidate not in taken:
            return candidate
        n += 1


def _write(document: dict, workflow: Workflow | None) -> Workflow:
    """Store a (validated) document as `workflow`'s tasks, or as a new workflow when it is None."""
    fields = {
        "description": document.get("description") or "",
        "max_parallel": document.get("max_parallel"),
        "priority": document.get("priority", 0),
        "defaults": dict(document.get("defaults") or {}),
        "workspace": document.get("workspace"),
        "params": dict(document.get("params") or {}),
        "max_cost_usd": document.get("max_cost_usd"),
    }
    if workflow is None:
        workflow = Workflow.objects.create(name=document["name"], **fields)
    else:
        for name, value in fields.items():
            setattr(workflow, name, value)
        workflow.save()
        DepLink.objects.filter(from_workflowtask__workflow=workflow).delete()
        WorkflowTask.objects.filter(workflow=workflow).delete()
    tasks = [
        WorkflowTask(
            workflow=workflow,
            position=position,
            key=raw["key"],
            title=raw.get("title") or "",
            requires=list(raw.get("requires") or []),
            executor=raw.get("executor", "shell"),
            command=raw.get("command"),
            prompt=raw.get("prompt"),
            params=raw.get("params") or {},
            estimate_s=raw.get("estimate_s"),
            priority=raw.get("priority", 0),
            max_attempts=raw.get("max_attempts"),
            timeout_s=raw.get("timeout_s"),
            retry_delay_s=raw.get("retry_delay_s"),
        )
        for position, raw in enumerate(document["tasks"])
    ]
    WorkflowTask.objects.bulk_create(tasks, batch_size=1000)
    ids = {t.key: t.id for t in tasks}
    DepLink.objects.bulk_create(
        [
            DepLink(from_workflowtask_id=ids[raw["key"]], to_workflowtask_id=ids[dep])
            for raw in document["tasks"]
            for dep in raw.get("deps") or ()
        ],
        batch_size=5000,
    )
    return workflow


def start_run(
    workflow: Workflow,
    *,
    actor: str,
    user=None,
    priority: int | None = None,
    max_parallel: int | None = None,
    repo: str | None = None,
    base: str | None = None,
    params: dict | None = None,
) -> Run:
    """Start a run of the workflow, with the start's overrides (`dag.with_overrides`: repository, base, run
    parameters) applied to its document. The run keeps its own copy of that document and its own tasks, so
    later edits of the workflow never reach it. DagError when the document is not a valid DAG, or its
    repository cannot be reached or has no such base (nothing is started then)."""
    overrides = {k: v for k, v in {"repo": repo, "base": base, "params": params}.items() if v not in (None, {})}
    with transaction.atomic():
        document = with_overrides(workflow_to_document(workflow), repo=repo, base=base, params=params)
        dag = parse_document(document)
        run = actions.submit_run(
            dag, document, actor=actor, user=user, workflow=workflow, priority=priority, max_parallel=max_parallel
        )
        detail = {"run": str(run.id), **({"overrides": overrides} if overrides else {})}
        record_workflow_change(workflow.name, "run started", actor, **detail)
    return run


def rerun(run_id, *, actor: str, user=None) -> Run:
    """A new run of the same document as `run_id` (its own copy, the start's overrides included), of the same
    workflow, priority and parallelism, linked to it (`rerun_of`; the old run's trail says so)."""
    old = Run.objects.filter(pk=run_id).first()
    if old is None:
        raise actions.NotFound("no run with that id")
    with transaction.atomic():
        run = actions.submit_run(
            parse_document(old.document), old.document, actor=actor, user=user, workflow=old.workflow,
            priority=old.priority, max_parallel=old.max_parallel, rerun_of=old,
        )  # fmt: skip
        if old.workflow is not None:
            record_workflow_change(old.workflow.name, "run started", actor, run=str(run.id), rerun_of=str(old.id))
    return run
