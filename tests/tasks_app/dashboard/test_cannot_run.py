"""A task no agent can run is said so where people look (tasks_app.dashboard.waiting.no_agent_runs): its
waiting reason on the queue and task page, the run's ETA (unknown, not "in 0.0s"), and the submit answer's
warnings. "Can run" counts agents that take work (enabled, not draining, not retired); online now, and
whether an offline one could."""

import json

import pytest
from django.core.management import call_command

from agents_app.models import Agent, AgentStatus
from agents_app.registry import create_api_token
from tasks_app.dashboard import panels, waiting
from tasks_app.models import Task
from tests.conftest import doc

pytestmark = pytest.mark.django_db


def why(run, key):
    task = Task.objects.get(run=run, key=key)
    return waiting.reasons_of([task]).get(task.id)


def test_a_label_no_agent_has_is_flagged_on_the_run_page_the_task_page_and_the_overview(submit, make_agent, viewer):
    make_agent("cpu-1", labels=["linux"])
    run = submit(doc({"key": "train", "requires": ["gpu", "linux"]}))
    assert why(run, "train") == "no agent can run this: needs gpu"
    assert why(run, "train").cannot
    task = Task.objects.get(run=run)
    for url in (f"/runs/{run.id}/", f"/tasks/{task.id}/", "/"):
        page = viewer.get(url).content.decode()
        assert 'class="waiting cannot" data-testid="waiting">' in page.replace("Not assigned yet: ", ""), url
        assert "no agent can run this: needs gpu" in page, url


def test_an_executor_no_agent_has_is_named(submit, make_agent):
    make_agent("shells", labels=[], executors=["shell", "simulated"])
    run = submit(doc({"key": "impl", "executor": "codex", "prompt": "go"}))
    assert why(run, "impl") == "no agent has the codex executor"


def test_an_offline_agent_that_could_run_it_is_said_and_not_flagged(submit, make_agent):
    make_agent("cpu-1", labels=[])
    gpu = make_agent("gpu-1", labels=["gpu"])
    Agent.objects.filter(pk=gpu["id"]).update(status=AgentStatus.OFFLINE)
    run = submit(doc({"key": "train", "requires": ["gpu"]}))
    assert why(run, "train") == "no online agent has label gpu (an offline agent could run it)"
    assert not why(run, "train").cannot


def test_a_disabled_or_retired_agent_does_not_count(submit, make_agent):
    make_agent("cpu-1", labels=[])
    off, gone = make_agent("gpu-1", labels=["gpu"]), make_agent("gpu-2", labels=["gpu"])
    Agent.objects.filter(pk=off["id"]).update(enabled=False, status=AgentStatus.OFFLINE)
    Agent.objects.filter(pk=gone["id"]).update(retired_at="2026-01-01T00:00Z")
    run = submit(doc({"key": "train", "requires": ["gpu"]}))
    assert why(run, "train") == "no agent can run this: needs gpu"


def test_the_eta_is_unknown_while_a_waiting_task_has_no_online_agent(submit, make_agent, viewer):
    make_agent("cpu-1", labels=[])
    run = submit(doc({"key": "build", "estimate_s": 60}, {"key": "train", "deps": ["build"], "requires": ["gpu"]}))
    (summary,) = panels.run_summaries([run.id])
    assert summary["eta"] is None
    assert summary["eta_unknown"] == "no agent can run this online: needs gpu"
    for url in (f"/runs/{run.id}/", "/"):
        page = viewer.get(url).content.decode()
        assert 'data-testid="eta-unknown"' in page and "needs gpu" in page, url
        assert "ETA in" not in page and "in 0.0s" not in page, url
    make_agent("gpu-1", labels=["gpu"])
    (summary,) = panels.run_summaries([run.id])
    assert summary["eta_unknown"] == "" and summary["eta"] is not None


@pytest.mark.django_db(transaction=True)  # the API answers from another thread
def test_the_submit_answer_warns_of_what_no_online_agent_can_run(make_agent, django_user_model, client):
    make_agent("cpu-1", labels=[], executors=["shell", "simulated"])
    gpu = make_agent("gpu-1", labels=["gpu"], executors=["simulated"])
    Agent.objects.filter(pk=gpu["id"]).update(status=AgentStatus.OFFLINE)
    token, _ = create_api_token(django_user_model.objects.create_superuser("sam", "s@example.com", "pw-sam-12345"))
    document = doc(
        {"key": "plain"}, {"key": "train", "requires": ["gpu"]}, {"key": "tune", "requires": ["gpu"]},
        {"key": "write", "executor": "claude", "prompt": "hi"}, {"key": "huge", "requires": ["tpu"]},
    )  # fmt: skip
    answer = client.post("/api/v1/runs", json.dumps(document), content_type="application/json",
                         HTTP_AUTHORIZATION=f"Bearer {token}")  # fmt: skip
    assert answer.status_code == 201, answer.content
    assert sorted(answer.json()["warnings"]) == [
        "1 task (huge): no agent can run this: needs tpu",
        "1 task (write): no agent has the claude executor",
        "2 tasks (train, tune): no agent can run this online: needs gpu (an offline agent could run it)",
    ]
    fine = client.post("/api/v1/runs", json.dumps(doc({"key": "plain"})), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {token}")  # fmt: skip
    assert fine.json()["warnings"] == []


def test_the_submit_command_prints_warnings_to_stderr(make_agent, tmp_path, capsys):
    make_agent("cpu-1", labels=[])
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps(doc({"key": "train", "requires": ["gpu"]})))
    call_command("submit", str(path))
    out, err = capsys.readouterr()
    assert out.strip() == str(Task.objects.get(key="train").run_id)
    assert err.strip() == "warning: 1 task (train): no agent can run this: needs gpu"
