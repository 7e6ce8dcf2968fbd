"""`manage.py submit FILE|WORKFLOW --repo URL --base REF --param NAME=VALUE`: the overrides apply to the document
before it is validated, the base is resolved against a real bare repository over file://, and every refusal is
one sentence and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from tasks_app.models import Run
from tasks_app.workflows import documents
from tests import conftest
from tests.conftest import doc

pytestmark = pytest.mark.django_db
MANAGE = Path(__file__).resolve().parents[2] / "manage.py"


def submit(*args) -> Run:
    out = StringIO()
    call_command("submit", *args, stdout=out)
    return Run.objects.get(pk=out.getvalue().strip())


def document_file(tmp_path, document: dict) -> str:
    path = tmp_path / "dag.json"
    path.write_text(json.dumps(document))
    return str(path)


def feature_doc(**extra) -> dict:
    return doc(
        {"key": "plan", "prompt": "Plan ${params.feature}"}, name="feature", params={"feature": "login"}, **extra
    )


def test_a_file_is_submitted_on_the_repository_and_base_given(tmp_path, origin):
    url, shas = origin
    path = document_file(tmp_path, feature_doc())
    run = submit(path, "--repo", url, "--base", "v1", "--param", "feature=signup", "--param", "n=3")
    assert (run.repo, run.base_ref, run.base_commit) == (url, "v1", shas["first"])
    assert run.params == {"feature": "signup", "n": "3"}  # a value is a string, as typed
    assert run.document["workspace"] == {"repo": url, "base": "v1"}
    run = submit(path, "--repo", url)
    assert (run.base_ref, run.base_commit, run.params) == ("HEAD", shas["second"], {"feature": "login"})


def test_a_workflow_is_submitted_with_its_base_and_params_overridden(origin):
    url, shas = origin
    documents.import_document(feature_doc(workspace={"repo": url, "base": "main"}))
    run = submit("feature")
    assert (run.base_commit, run.params, run.workflow.name) == (shas["second"], {"feature": "login"}, "feature")
    run = submit("feature", "--base", "light", "--param", "feature=search")
    assert (run.repo, run.base_commit, run.params) == (url, shas["first"], {"feature": "search"})
    assert documents.workflow_to_document(run.workflow)["workspace"] == {"repo": url, "base": "main"}


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--base", "nope"], "has no branch or tag 'nope'"),
        (["--base", "abc1234"], "give a full commit sha"),
        (["--repo", "file:///nowhere/missing.git"], "cannot be reached"),
        (["--repo=-uhttp://evil"], "workspace.repo must be a git URL"),
        (["--param", "feature"], "--param: a parameter is NAME=VALUE, not 'feature'"),
        (["--param", "bad name=1"], "--param: parameter name 'bad name'"),
        (["--param", "n=1", "--param", "n=2"], "--param: parameter 'n' is given twice"),
    ],
)
def test_a_refused_start_is_one_sentence_and_nothing_is_started(tmp_path, origin, args, says):
    url, _ = origin
    path = document_file(tmp_path, feature_doc(workspace={"repo": url}))
    documents.import_document(feature_doc(workspace={"repo": url}))
    for target in (path, "feature"):
        with pytest.raises(CommandError) as refused:
            submit(target, *args)
        assert says in str(refused.value), target
    assert not Run.objects.exists()


def test_a_base_without_a_workspace_or_a_repository_is_refused(tmp_path):
    path = document_file(tmp_path, doc({"key": "a"}, name="plain"))
    with pytest.raises(CommandError) as refused:
        submit(path, "--base", "main")
    assert str(refused.value) == (
        f"{path} not started: a base was given, but the document has no workspace and no repository was given"
        " (add --repo URL)"
    )
    documents.import_document(doc({"key": "a"}, name="plain"))
    with pytest.raises(CommandError, match="workflow 'plain' not started: a base was given.*add --repo URL"):
        submit("plain", "--base", "main")
    assert not Run.objects.exists()


def test_a_template_naming_an_unknown_parameter_is_refused_naming_the_task(tmp_path):
    document = doc({"key": "plan", "prompt": "Plan ${params.feature} for ${params.ghost}"}, name="f")
    path = document_file(tmp_path, {**document, "params": {"feature": "x"}})
    with pytest.raises(CommandError) as refused:
        submit(path)
    assert (
        str(refused.value)
        == f"{path} not started: task 'plan': prompt: ${{params.ghost}} names no parameter of the run"
    )
    assert submit(path, "--param", "ghost=boo").params == {"feature": "x", "ghost": "boo"}


def test_the_command_exits_non_zero_with_a_sentence_and_no_traceback(tmp_path):
    path = document_file(tmp_path, doc({"key": "a"}, name="plain"))
    env = {**os.environ, "DATABASE_URL": conftest.test_database_url()}
    for args, says in (
        (["--repo", f"file://{tmp_path}/missing.git"], "cannot be reached"),
        (["--base", "main"], "add --repo URL"),
        (["--param", "oops"], "NAME=VALUE"),
    ):
        proc = subprocess.run(
            [sys.executable, str(MANAGE), "submit", path, *args], capture_output=True, text=True, env=env, timeout=120
        )
        assert proc.returncode == 1, proc.stderr
        assert proc.stderr.startswith("CommandError: ") and says in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and not proc.stdout
