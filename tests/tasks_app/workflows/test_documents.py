"""Workflows as DAG documents: export then import gives back the same workflow field for field (a property
over random DAGs), imports validate through THE validator and are bulk, runs snapshot their document, every
change is audited, and the management commands speak the same documents."""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import pytest
import yaml
from django.core.management import call_command
from django.core.management.base import CommandError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tasks_app.dag import BRANCH_PREFIX_RE, PARAM_NAME_RE, REF_RE, DagError, params_from_pairs, with_overrides
from tasks_app.models import Event, Run, Workflow, WorkflowTask
from tasks_app.workflows import documents
from tests.conftest import doc

pytestmark = pytest.mark.django_db
EXAMPLE = Path(__file__).resolve().parents[3] / "docs" / "examples" / "webapp_framework.yaml"
TASK_FIELDS = ("title", "requires", "executor", "command", "prompt", "params", "estimate_s", "priority",
               "max_attempts", "timeout_s", "retry_delay_s", "position")  # fmt: skip


def snapshot(workflow: Workflow) -> dict:
    """Everything a workflow holds but its name and ids: fields, tasks in order, each task's deps in order."""
    workflow.refresh_from_db()
    deps: dict[int, list[str]] = {}
    for task_id, key in (
        documents.DepLink.objects.filter(from_workflowtask__workflow=workflow)
        .order_by("id")
        .values_list("from_workflowtask_id", "to_workflowtask__key")
    ):
        deps.setdefault(task_id, []).append(key)
    return {
        "description": workflow.description,
        "max_parallel": workflow.max_parallel,
        "priority": workflow.priority,
        "defaults": workflow.defaults,
        "workspace": workflow.workspace,
        "params": workflow.params,
        "tasks": [
            {"key": t.key, "deps": deps.get(t.id, []), **{f: getattr(t, f) for f in TASK_FIELDS}}
            for t in WorkflowTask.objects.filter(workflow=workflow).order_by("position", "id")
        ],
    }


def chain_document(n: int, name: str) -> dict:
    """n tasks, each depending on the one before it and on the one at half its index: a deep, wide DAG."""
    return doc(
        *[
            {
                "key": f"t{i}",
                "title": f"Task {i}",
                "deps": list(dict.fromkeys([f"t{i - 1}", f"t{i // 2}"])) if i else [],
            }
            for i in range(n)
        ],
        name=name,
    )


def workflow_events(change: str | None = None):
    events = Event.objects.filter(kind="workflow").order_by("id")
    return [e for e in events if change is None or e.detail["change"] == change]


# --- The round trip, over random DAGs ---------------------------------------------------------------------

KEYS = st.text(alphabet=string.ascii_letters + string.digits + "._-", min_size=1, max_size=64)
TEXT = st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"), max_size=40)
SOME_TEXT = TEXT.filter(bool)
JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**9), 10**9),
    st.floats(-1e9, 1e9, allow_nan=False),  # jsonb turns big integral floats into ints
    TEXT,
)
PARAMS = st.dictionaries(TEXT, st.one_of(JSON_SCALARS, st.lists(JSON_SCALARS, max_size=3)), max_size=3)
# claude and codex params are checked against what the agent daemon reads (dag.AI_PARAMS); these both take.
AI_TASK_PARAMS = st.fixed_dictionaries(
    {}, optional={"model": SOME_TEXT, "budget_usd": st.floats(0.01, 100), "expect_changes": st.booleans()}
)
# A workspace as a document may give it: any git URL without spaces (not an option), any ref, a prefix.
URL_CHARS = st.characters(exclude_categories=("Cs", "Cc", "Zs", "Zl", "Zp"))
URL_TEXT = st.text(URL_CHARS, min_size=1, max_size=60).filter(
    lambda url: not url.startswith("-") and not any(c.isspace() for c in url)
)
WORKSPACES = st.fixed_dictionaries(
    {"repo": st.one_of(URL_TEXT, st.sampled_from(["ssh://git@host/team/app.git", "file:///srv/git/app.git"]))},
    optional={
        "base": st.one_of(st.text(URL_CHARS, min_size=1, max_size=40).filter(REF_RE.fullmatch), st.just("a" * 40)),
        "branch_prefix": st.text(alphabet=string.ascii_letters + "._/-", max_size=12).filter(
            BRANCH_PREFIX_RE.fullmatch
        ),
    },
)
RUN_PARAMS = st.dictionaries(st.from_regex(PARAM_NAME_RE, fullmatch=True), JSON_SCALARS, max_size=4)


def maybe(strategy):
    return st.one_of(st.none(), strategy)


@st.composite
def dags(draw):
    """A DAG document: random keys, deps only to earlier keys, every optional field sometimes there."""
    keys = draw(st.lists(KEYS, min_size=1, max_size=12, unique=True))
    tasks = []
    for i, key in enumerate(keys):
        executor = draw(st.sampled_from(["shell", "claude", "codex", "simulated"]))
        fields = {
            "title": maybe(TEXT.map(lambda t: t[:200])),
            "deps": maybe(st.lists(st.sampled_from(keys[:i]), unique=True, max_size=4) if i else st.just([])),
            "requires": maybe(st.lists(KEYS, max_size=3)),
            "command": SOME_TEXT if executor == "shell" else maybe(TEXT),
            "prompt": SOME_TEXT if executor in ("claude", "codex") else maybe(TEXT),
            "params": maybe(AI_TASK_PARAMS if executor in ("claude", "codex") else PARAMS),
            "estimate_s": maybe(st.one_of(st.integers(0, 10**6), st.floats(0, 1e7, allow_nan=False))),
            "priority": maybe(st.integers(-1_000_000, 1_000_000)),
            "max_attempts": maybe(st.integers(1, 100)),
            "timeout_s": maybe(st.integers(1, 7 * 86400)),
            "retry_delay_s": maybe(st.integers(0, 86400)),
        }
        task = {"key": key, "executor": executor}
        for name, strategy in fields.items():
            value = draw(strategy)
            if value is not None:
                task[name] = value
        tasks.append(task)
    document = {"name": "source", "tasks": tasks}
    for name, strategy in {
        "description": TEXT,
        "max_parallel": st.integers(1, 100_000),
        "priority": st.integers(-1_000_000, 1_000_000).filter(bool),
        "defaults": st.fixed_dictionaries(
            {},
            optional={
                "max_attempts": st.integers(1, 50),
                "timeout_s": st.integers(1, 9999),
                "retry_delay_s": st.integers(0, 99),
            },
        ),
        "workspace": WORKSPACES,
        "params": RUN_PARAMS,
    }.items():
        if draw(st.booleans()):
            document[name] = draw(strategy)
    if document.get("params") and draw(st.booleans()):
        # A template naming one of the run's parameters: it travels with the document, validated each way.
        name = draw(st.sampled_from(sorted(document["params"])))
        task = draw(st.sampled_from(tasks))
        task["prompt"] = (task.get("prompt") or "") + f"${{params.{name}}}"
    return document


def expected_snapshot(document: dict) -> dict:
    """What importing `document` must store: each field as the document gives it, absent ones at their empty."""
    return {
        "description": document.get("description", ""),
        "max_parallel": document.get("max_parallel"),
        "priority": document.get("priority", 0),
        "defaults": document.get("defaults", {}),
        "workspace": document.get("workspace"),
        "params": document.get("params", {}),
        "tasks": [
            {
                "key": t["key"],
                "deps": t.get("deps", []),
                "title": t.get("title", ""),
                "requires": t.get("requires", []),
                "executor": t["executor"],
                "command": t.get("command"),
                "prompt": t.get("prompt"),
                "params": t.get("params", {}),
                "estimate_s": t.get("estimate_s"),
                "priority": t.get("priority", 0),
                "max_attempts": t.get("max_attempts"),
                "timeout_s": t.get("timeout_s"),
                "retry_delay_s": t.get("retry_delay_s"),
                "position": i,
            }
            for i, t in enumerate(document["tasks"])
        ],
    }


@given(document=dags())
@settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
def test_export_then_import_gives_back_the_same_workflow(document):
    source = documents.import_document(document, replace=True)
    assert snapshot(source) == expected_snapshot(document)
    exported = documents.workflow_to_document(source)
    for fmt in documents.FORMATS:
        text = documents.dump_document(exported, fmt)
        again = documents.load_document_text(text)
        assert again == exported, fmt
        again["name"] = f"copy-{fmt}"
        copy = documents.import_document(again, replace=True)
        assert snapshot(copy) == snapshot(source), fmt
        assert documents.workflow_to_document(copy) == {**exported, "name": f"copy-{fmt}"}


def test_the_example_document_imports_and_exports_unchanged():
    document = yaml.safe_load(EXAMPLE.read_text())
    workflow = documents.import_document(document)
    assert workflow.tasks.count() == 15
    assert documents.workflow_to_document(workflow) == document


# --- Import ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tasks", "culprit"),
    [
        ([{"key": "a", "deps": ["c"]}, {"key": "b", "deps": ["a"]}, {"key": "c", "deps": ["b"]}], "dependency cycle"),
        ([{"key": "a", "deps": ["ghost"]}], "ghost"),
        ([{"key": "a"}, {"key": "a"}], "duplicate task key 'a'"),
        ([{"key": "bad key"}], "bad key"),
        ([{"key": "a", "executor": "shell"}], "needs a command"),
        ([{"key": "a", "executor": "claude"}], "needs a prompt"),
        ([{"key": "a", "requires": ["no spaces"]}], "no spaces"),
    ],
)
def test_an_invalid_document_is_refused_and_nothing_is_stored(tasks, culprit):
    with pytest.raises(DagError) as refused:
        documents.import_document(doc(*tasks, name="broken"))
    assert culprit in refused.value.detail
    assert not Workflow.objects.exists()
    assert not WorkflowTask.objects.exists()


def test_an_import_does_not_overwrite_a_workflow_unless_asked(submit):
    first = documents.import_document(doc({"key": "a"}, name="nightly"))
    run = documents.start_run(first, actor="test")
    with pytest.raises(documents.WorkflowExists):
        documents.import_document(doc({"key": "b"}, name="nightly"))
    assert [t.key for t in first.tasks.all()] == ["a"]

    replaced = documents.import_document(doc({"key": "b"}, {"key": "c", "deps": ["b"]}, name="nightly"), replace=True)
    assert replaced.pk == first.pk
    assert [t.key for t in replaced.tasks.order_by("position")] == ["b", "c"]
    run.refresh_from_db()
    assert run.workflow_id == first.pk
    assert [e.detail for e in workflow_events("imported")] == [
        {"workflow": "nightly", "change": "imported", "tasks": 1, "replaced": False},
        {"workflow": "nightly", "change": "imported", "tasks": 2, "replaced": True},
    ]


def test_a_2000_task_import_takes_a_bounded_number_of_queries(django_assert_max_num_queries):
    tasks = [
        {"key": f"t{i}", "deps": list(dict.fromkeys([f"t{i - 1}", f"t{i // 2}"])) if i else []} for i in range(2000)
    ]
    with django_assert_max_num_queries(12):
        workflow = documents.import_document(doc(*tasks, name="big"))
    assert workflow.tasks.count() == 2000
    assert documents.DepLink.objects.count() == sum(len(t["deps"]) for t in tasks)
    with django_assert_max_num_queries(4):
        exported = documents.workflow_to_document(workflow)
    assert exported["tasks"][-1]["deps"] == ["t1998", "t999"]


def test_duplicate_copies_tasks_and_deps_under_a_free_name():
    source = documents.import_document(doc({"key": "a"}, {"key": "b", "deps": ["a"]}, name="nightly"))
    first = documents.duplicate_workflow(source, actor="user:olivia")
    second = documents.duplicate_workflow(source, actor="user:olivia")
    assert (first.name, second.name) == ("nightly (copy)", "nightly (copy 2)")
    assert snapshot(first) == snapshot(source)
    assert workflow_events("created")[0].detail == {
        "workflow": "nightly (copy)",
        "change": "created",
        "copied_from": "nightly",
    }


# --- Runs of workflows -------------------------------------------------------------------------------------


def test_a_run_keeps_its_document_when_the_workflow_is_edited_afterwards():
    workflow = documents.import_document(
        doc({"key": "a", "title": "first"}, {"key": "b", "deps": ["a"]}, name="nightly", max_parallel=2)
    )
    run = documents.start_run(workflow, actor="user:olivia", priority=5, max_parallel=3)
    document_before = json.loads(json.dumps(run.document))
    tasks_before = list(run.tasks.order_by("key").values_list("key", "title", "priority"))

    workflow.tasks.filter(key="a").update(title="renamed", priority=9)
    WorkflowTask.objects.create(workflow=workflow, key="c", executor="simulated", position=2)
    documents.import_document(doc({"key": "z"}, name="nightly"), replace=True)

    run.refresh_from_db()
    assert run.document == document_before
    assert list(run.tasks.order_by("key").values_list("key", "title", "priority")) == tasks_before
    assert (run.workflow_id, run.priority, run.max_parallel, run.name) == (workflow.pk, 5, 3, "nightly")
    assert tasks_before == [("a", "first", 5), ("b", "b", 5)]
    assert workflow_events("run started")[0].detail == {
        "workflow": "nightly",
        "change": "run started",
        "run": str(run.id),
    }
    assert Event.objects.get(run=run, kind="run").actor == "user:olivia"


def test_a_workflows_budget_round_trips_and_becomes_its_runs_max_cost_usd():
    document = doc({"key": "a"}, name="capped", max_cost_usd=12.5)
    workflow = documents.import_document(document)
    assert workflow.max_cost_usd == 12.5
    assert documents.workflow_to_document(workflow)["max_cost_usd"] == 12.5
    run = documents.start_run(workflow, actor="test")
    assert run.max_cost_usd == 12.5
    with pytest.raises(DagError, match="max_cost_usd must be a number > 0"):
        documents.import_document(doc({"key": "a"}, name="bad", max_cost_usd=0))


def test_a_workflow_without_tasks_cannot_start():
    workflow = Workflow.objects.create(name="empty")
    with pytest.raises(DagError):
        documents.start_run(workflow, actor="test")
    assert not Run.objects.exists()


# --- Starting with overrides: another repository, base or parameters -----------------------------------------


def test_overrides_replace_the_workspace_and_add_to_the_params_of_a_copy():
    document = doc({"key": "a"}, workspace={"repo": "file:///a.git", "branch_prefix": "x/"}, params={"n": 1})
    before = json.loads(json.dumps(document))
    assert with_overrides(document) is document
    changed = with_overrides(document, repo="file:///b.git", base="v1", params={"n": "2", "new": ""})
    assert changed["workspace"] == {"repo": "file:///b.git", "branch_prefix": "x/", "base": "v1"}
    assert changed["params"] == {"n": "2", "new": ""}
    assert document == before  # pure: the document given is left as it was
    assert with_overrides(doc({"key": "a"}), repo="file:///c.git")["workspace"] == {"repo": "file:///c.git"}
    assert with_overrides(doc({"key": "a"}), params={"p": "v"})["params"] == {"p": "v"}
    with pytest.raises(DagError, match="a base was given, but the document has no workspace"):
        with_overrides(doc({"key": "a"}), base="main")
    with pytest.raises(DagError, match="params must be an object"):
        with_overrides(doc({"key": "a"}, params=[1]), params={"p": "v"})


def test_name_value_pairs_are_parameters_whose_values_are_kept_as_typed():
    pairs = ["n=3", "version=1.10", "flag=no", "mode=0755", "eq=a=b", "empty=", " spaced =x"]
    assert params_from_pairs(pairs) == {
        "n": "3", "version": "1.10", "flag": "no", "mode": "0755", "eq": "a=b", "empty": "", "spaced": "x",
    }  # fmt: skip
    for pairs, says in (
        (["novalue"], "a parameter is NAME=VALUE, not 'novalue'"),
        (["=x"], "a parameter is NAME=VALUE"),
        (["a b=1"], "parameter name 'a b'"),
        (["n=1", "n=2"], "parameter 'n' is given twice"),
    ):
        with pytest.raises(DagError, match=re.escape(says)):
            params_from_pairs(pairs)


def feature_workflow(url: str, **workspace) -> Workflow:
    return documents.import_document(
        doc(
            {"key": "plan", "prompt": "Plan ${params.feature} (${params.n})"},
            {"key": "build", "deps": ["plan"], "command": "echo ${deps.plan.output}"},
            name="feature",
            workspace={"repo": url, **workspace},
            params={"feature": "login", "n": 3},
        )
    )


def test_a_start_overrides_the_workflows_base_and_params_for_that_run_only(origin):
    url, shas = origin
    workflow = feature_workflow(url, base="light")
    stored = documents.workflow_to_document(workflow)
    run = documents.start_run(workflow, actor="user:olivia")
    assert (run.repo, run.base_ref, run.base_commit, run.params) == (url, "light", shas["first"], stored["params"])

    run = documents.start_run(workflow, actor="user:olivia", base="main", params={"feature": "signup", "extra": "x"})
    assert (run.repo, run.base_ref, run.base_commit) == (url, "main", shas["second"])
    assert run.params == {"feature": "signup", "n": 3, "extra": "x"}
    assert run.document["workspace"] == {"repo": url, "base": "main"}
    assert run.document["params"] == run.params
    assert documents.workflow_to_document(workflow) == stored  # the workflow keeps its own
    assert workflow_events("run started")[-1].detail["overrides"] == {
        "base": "main",
        "params": {"feature": "signup", "extra": "x"},
    }
    assert "overrides" not in workflow_events("run started")[0].detail


def test_a_start_gives_a_workflow_without_a_workspace_a_repository(origin):
    url, shas = origin
    workflow = documents.import_document(doc({"key": "a"}, name="plain"))
    run = documents.start_run(workflow, actor="test", repo=url, base="v1")
    assert (run.repo, run.base_ref, run.base_commit, run.branch_prefix) == (url, "v1", shas["first"], "cp/")
    assert documents.workflow_to_document(workflow) == doc({"key": "a"}, name="plain")


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"base": "nope"}, "has no branch or tag 'nope'"),
        ({"repo": "file:///nowhere/missing.git"}, "cannot be reached"),
        ({"repo": "-oProxyCommand=x"}, "workspace.repo must be a git URL"),
        ({"params": {"bad name": "x"}}, "parameter name 'bad name'"),
    ],
)
def test_a_start_that_cannot_reach_its_base_starts_nothing(origin, overrides, says):
    workflow = feature_workflow(origin[0])
    with pytest.raises(DagError, match=says):
        documents.start_run(workflow, actor="test", **overrides)
    assert not Run.objects.exists() and not workflow_events("run started")


def test_a_start_needs_every_parameter_its_templates_name():
    workflow = documents.import_document(doc({"key": "a", "prompt": "x"}, name="w"))
    workflow.tasks.update(prompt="Do ${params.ghost}")  # as an older version of the workflow might hold it
    with pytest.raises(DagError, match=re.escape("task 'a': prompt: ${params.ghost} names no parameter of the run")):
        documents.start_run(workflow, actor="test")
    assert documents.start_run(workflow, actor="test", params={"ghost": "boo"}).params == {"ghost": "boo"}
    with pytest.raises(DagError, match="a base was given, but the document has no workspace"):
        documents.start_run(workflow, actor="test", base="main")
    assert Run.objects.count() == 1


# --- Management commands ----------------------------------------------------------------------------------


def run_command(*args) -> str:
    from io import StringIO

    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_import_and_export_commands_round_trip_through_files(tmp_path):
    assert "15 tasks" in run_command("import_workflow", str(EXAMPLE))
    with pytest.raises(CommandError, match="--replace"):
        run_command("import_workflow", str(EXAMPLE))
    run_command("import_workflow", str(EXAMPLE), "--replace")

    as_yaml = yaml.safe_load(run_command("export_workflow", "webapp_framework"))
    assert as_yaml == yaml.safe_load(EXAMPLE.read_text())
    target = tmp_path / "wf.json"
    run_command("export_workflow", "webapp_framework", "-o", str(target))
    assert json.loads(target.read_text()) == as_yaml
    run_command("export_workflow", "webapp_framework", "--format", "json", "-o", str(tmp_path / "wf.txt"))
    assert json.loads((tmp_path / "wf.txt").read_text()) == as_yaml
    assert [e.actor for e in workflow_events("imported")] == ["cli:import_workflow"] * 2

    with pytest.raises(CommandError, match="no workflow named 'nope'"):
        run_command("export_workflow", "nope")


def test_import_command_names_the_cycle(tmp_path):
    path = tmp_path / "cycle.json"
    path.write_text(json.dumps(doc({"key": "a", "deps": ["b"]}, {"key": "b", "deps": ["a"]}, name="c")))
    with pytest.raises(CommandError, match="dependency cycle: (a -> b -> a|b -> a -> b)"):
        run_command("import_workflow", str(path))


def test_submit_takes_a_workflow_name_as_well_as_a_file(tmp_path):
    documents.import_document(doc({"key": "a"}, {"key": "b", "deps": ["a"]}, name="nightly"))
    run_id = run_command("submit", "nightly", "--priority", "3").strip()
    run = Run.objects.get(pk=run_id)
    assert (run.name, run.workflow.name, run.priority) == ("nightly", "nightly", 3)
    assert workflow_events("run started")[0].actor == "cli:submit"

    path = tmp_path / "doc.json"
    path.write_text(json.dumps(doc({"key": "x"}, name="from-file")))
    run = Run.objects.get(pk=run_command("submit", str(path)).strip())
    assert (run.name, run.workflow) == ("from-file", None)

    with pytest.raises(CommandError, match="neither a DAG document file nor the name of a workflow"):
        run_command("submit", "nothing-of-that-name")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        (b"\xff\xfe junk", "not UTF-8 text"),
        (b"name: [unclosed", "neither valid JSON nor valid YAML"),
        (b"- a list", "the document must be a JSON object"),
    ],
)
def test_import_command_refuses_a_bad_file_with_a_clear_message(tmp_path, content, message):
    path = tmp_path / "wf.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CommandError, match=message):
        run_command("import_workflow", str(path))
    assert not Workflow.objects.exists()


def test_a_2000_task_file_imports_with_the_command_in_under_5_seconds(tmp_path):
    import time

    path = tmp_path / "big.yaml"
    path.write_text(documents.dump_document(chain_document(2000, "big"), "yaml"))
    started = time.perf_counter()
    assert "2000 tasks" in run_command("import_workflow", str(path))
    elapsed = time.perf_counter() - started
    assert elapsed < 5, f"the import took {elapsed:.2f} s"
    assert Workflow.objects.get(name="big").tasks.count() == 2000


def test_submit_by_name_applies_overrides_and_refuses_an_invalid_workflow():
    documents.import_document(doc({"key": "a"}, name="nightly", max_parallel=2, priority=4))
    run = Run.objects.get(pk=run_command("submit", "nightly").strip())
    assert (run.max_parallel, run.priority) == (2, 4)
    run = Run.objects.get(pk=run_command("submit", "nightly", "--max-parallel", "9", "--priority", "-1").strip())
    assert (run.max_parallel, run.priority) == (9, -1)
    Workflow.objects.create(name="draft")
    with pytest.raises(CommandError, match="workflow 'draft' not started: tasks must be a non-empty list"):
        run_command("submit", "draft")
