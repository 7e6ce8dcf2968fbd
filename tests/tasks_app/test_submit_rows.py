"""A submit writes its tasks and dependencies with COPY (queries.copy_insert): each row as the ORM would
have written it, defaults and all."""

from __future__ import annotations

from tasks_app import actions
from tasks_app.dag import parse_document
from tasks_app.models import Task, TaskDependency
from tasks_app.states import TaskState


def submitted(document: dict):
    return actions.submit_run(parse_document(document), document, actor="test")


def test_a_copied_task_row_holds_its_fields_and_the_models_defaults(db):
    run = submitted({"name": "rows", "tasks": [
        {"key": "a", "command": "make", "requires": ["gpu"], "params": {"x": [1, {"y": None}]}, "priority": 3},
        {"key": "b", "deps": ["a"], "executor": "claude", "prompt": "go", "estimate_s": 12.5, "max_attempts": 1},
    ]})  # fmt: skip
    a, b = Task.objects.filter(run=run).order_by("key")
    assert (a.state, b.state) == (TaskState.READY, TaskState.BLOCKED)
    assert a.requires == ["gpu"] and a.params == {"x": [1, {"y": None}]} and a.priority == 3
    assert a.command == "make" and a.prompt is None and b.prompt == "go" and b.command is None
    assert b.estimate_s == 12.5 and b.max_attempts == 1 and (b.timeout_s, b.retry_delay_s) == (1800, 10)
    # Defaults the document does not set: the model's own, and created_at from the database.
    assert (a.title, a.message, a.output, a.progress, a.attempts_used, a.attempt_base) == ("a", "", "", 0, 0, 0)
    assert a.head_commits == [] and a.created_at is not None and a.ready_at is None
    assert Task.objects.filter(pk=a.pk, commit__isnull=True).exists()  # SQL NULL, not JSON null
    assert b.params == {} and b.depth == 1
    assert list(TaskDependency.objects.filter(task=b).values_list("depends_on_id", flat=True)) == [a.id]
