"""The workflow editor's DAG picture: a saved workflow, or the change form's task rows as they stand while
someone edits them, drawn by the dashboard's renderer (`tasks_app.dashboard.dagsvg`).

The rows being edited may not be a valid DAG yet (a dependency on a key not typed yet, two rows with one key,
a cycle): the picture draws what it can and says, in a sentence above it, what saving would refuse.
"""

from __future__ import annotations

import re

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString, mark_safe

from ..dag import DagError, topological_order
from ..dashboard.dagsvg import render_svg
from ..models import Workflow
from . import documents

# The picture of a posted form reads at most this many rows (the inline edits at most a few hundred).
PREVIEW_MAX_ROWS = 5000
DEPS_SPLIT = re.compile(r"[\s,]+")


class Row:
    """One task as the picture needs it."""

    __slots__ = ("key", "title", "deps", "estimate_s")

    def __init__(self, key: str, title: str, deps: list[str], estimate_s=None):
        self.key, self.title, self.deps, self.estimate_s = key, title, deps, estimate_s


def rows_of_workflow(workflow: Workflow) -> list[Row]:
    """The saved workflow's tasks in their order (two queries)."""
    document = documents.workflow_to_document(workflow)
    return [Row(t["key"], t.get("title") or "", t.get("deps", []), t.get("estimate_s")) for t in document["tasks"]]


def rows_of_form(data, prefix: str = "tasks") -> list[Row]:
    """The task rows of a posted change form, in their order: rows marked for deletion and rows without a key
    are left out. Never raises on odd input: a picture of half-typed rows is the point."""
    try:
        total = max(0, min(int(data.get(f"{prefix}-TOTAL_FORMS", 0)), PREVIEW_MAX_ROWS))
    except (TypeError, ValueError):
        total = 0
    rows = []
    for i in range(total):
        field = f"{prefix}-{i}-"
        key = (data.get(field + "key") or "").strip()
        if not key or data.get(field + "DELETE"):
            continue
        deps = [k for k in DEPS_SPLIT.split(data.get(field + "deps_keys") or "") if k]
        try:
            estimate = float(data.get(field + "estimate_s") or "")
        except ValueError:
            estimate = None
        rows.append(Row(key, (data.get(field + "title") or "").strip(), deps, estimate))
    return rows


def problems_of(rows: list[Row]) -> list[str]:
    """What saving these rows would refuse about the DAG's shape, in the editor's words (field-level problems,
    such as a shell task without a command, are left to the form)."""
    problems = []
    keys: dict[str, Row] = {}
    twice = []
    for row in rows:
        if row.key in keys:
            twice.append(row.key)
        keys.setdefault(row.key, row)
    if twice:
        problems.append(f"duplicate key(s): {', '.join(dict.fromkeys(twice))}")
    unknown = [d for row in keys.values() for d in row.deps if d not in keys]
    if unknown:
        problems.append(f"unknown dependency key(s): {', '.join(dict.fromkeys(unknown))}")
    graph = {k: [d for d in dict.fromkeys(row.deps) if d in keys] for k, row in keys.items()}
    try:
        topological_order(graph)
    except DagError as exc:
        problems.append(exc.detail)
    return problems


def picture(rows: list[Row]) -> SafeString:
    """HTML: a sentence per problem, then the SVG (every text in it escaped by the renderer)."""
    if not rows:
        return format_html('<p class="help dag-preview-empty">{}</p>', "No tasks yet: add a row to see the DAG.")
    first: dict[str, Row] = {}
    for row in rows:
        first.setdefault(row.key, row)
    nodes = [
        # The editor has no states: roots are drawn "ready", the rest "blocked", as a new run would start.
        {"id": k, "key": k, "title": r.title, "estimate_s": r.estimate_s, "state": "blocked" if r.deps else "ready"}
        for k, r in first.items()
    ]
    edges = [(d, k) for k, r in first.items() for d in r.deps if d in first]
    notes = format_html_join("", '<p class="errornote dag-problem">{}</p>', ((p,) for p in problems_of(rows)))
    summary = format_html('<p class="help dag-summary">{}, {}</p>', _count(len(nodes), "task", "tasks"),
                          _count(len(edges), "dependency", "dependencies"))  # fmt: skip
    # render_svg escapes every text it writes; href=None: a node of a template links to no task page.
    return notes + summary + mark_safe(render_svg(nodes, edges, href=None, legend=False))


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"
