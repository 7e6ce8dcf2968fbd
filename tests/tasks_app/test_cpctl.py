"""cpctl, the client CLI, as a CI job runs it: a subprocess speaking to a real server process with an API
token, real agent daemons running the tasks. Exit codes: 0 succeeded, 1 failed, 2 usage, 3 canceled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks_app.models import Workflow
from tasks_app.workflows import documents
from tests.conftest import doc, http, ok, wait_for

CPCTL = Path(__file__).resolve().parents[2] / "tasks_app" / "cpctl.py"
pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def cpctl(live_server_proc, operator, tmp_path):
    """Run cpctl with the operator's token; (exit code, stdout, stderr)."""
    _user, token = operator

    base_env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CP_URL": live_server_proc.url, "CP_TOKEN": token}

    def run(*args, env=None, timeout=120):
        done = subprocess.run([sys.executable, str(CPCTL), *args], env={**base_env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout, cwd=tmp_path)  # fmt: skip
        return done.returncode, done.stdout, done.stderr

    run.env = base_env
    return run


@pytest.fixture
def shell_agent(fleet):
    fleet("cli-1", ["cli"], executors=["shell"])


def shell(key: str, command: str, **extra) -> dict:
    return {"key": key, "executor": "shell", "command": command, "requires": ["cli"], "max_attempts": 1, **extra}


def write(tmp_path, document: dict, name="dag.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(document))
    return str(path)


def test_submit_wait_exits_with_the_runs_outcome(cpctl, shell_agent, tmp_path):
    good = write(tmp_path, doc(shell("a", "echo built"), shell("b", "echo tested", deps=["a"]), name="good"))
    code, out, err = cpctl("submit", good, "--wait")
    assert code == 0, err
    assert out.splitlines()[-1].endswith("succeeded  2 succeeded")

    bad = write(tmp_path, doc(shell("a", "echo oops; exit 3"), shell("b", "true", deps=["a"]), name="bad"), "b.json")
    code, out, err = cpctl("submit", bad, "--wait")
    assert code == 1, (out, err)
    assert "a: failed" in out

    run_id = out.splitlines()[0]
    code, out, _ = cpctl("status", run_id)
    assert code == 1 and "failed" in out.splitlines()[0]
    code, out, _ = cpctl("--json", "status", run_id)
    assert code == 1 and json.loads(out)["state"] == "failed"


def test_a_canceled_run_exits_3(cpctl, shell_agent, tmp_path):
    slow = write(tmp_path, doc(shell("nap", "sleep 60"), name="slow"))
    code, run_id, err = cpctl("submit", slow)
    assert code == 0, err
    run_id = run_id.strip()
    assert cpctl("cancel", run_id)[0] == 0
    code, out, _ = cpctl("status", run_id, "--watch", "--interval", "0.2")
    assert code == 3 and "canceled" in out


def test_a_yaml_document_with_overrides_and_a_workflow_by_name(cpctl, shell_agent, tmp_path):
    (tmp_path / "dag.yaml").write_text(
        "name: yaml-run\nparams: {who: nobody}\ntasks:\n"
        "  - {key: hello, executor: shell, requires: [cli], command: 'echo hello ${params.who}'}\n"
    )
    code, out, err = cpctl("submit", str(tmp_path / "dag.yaml"), "--param", "who=world", "--wait")
    assert code == 0, err
    run_id = out.splitlines()[0]
    status = json.loads(cpctl("--json", "status", run_id)[1])
    assert status["params"] == {"who": "world"}
    code, log, _ = cpctl("logs", status["tasks"][0]["id"])
    assert code == 0 and "hello world" in log

    documents.import_document(doc(shell("w", "echo from the workflow"), name="nightly"), actor="test")
    code, out, err = cpctl("submit", "nightly", "--wait")
    assert code == 0, err
    code, out, _ = cpctl("--json", "runs", "--workflow", "nightly")
    assert [r["name"] for r in json.loads(out)] == ["nightly"]
    assert Workflow.objects.get(name="nightly").runs.count() == 1
    code, _, err = cpctl("submit", "no-such-workflow")
    assert code == 1 and "neither" not in err and "no workflow named 'no-such-workflow'" in err


def test_runs_lists_and_filters(cpctl, submit):
    first = submit(doc({"key": "x"}, name="alpha"))
    submit(doc({"key": "y"}, name="beta"))
    code, out, _ = cpctl("runs")
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:3] == ["RUN", "STATE", "DONE"]
    assert [line.split()[-1] for line in lines[1:]] == ["beta", "alpha"]
    code, out, _ = cpctl("--json", "runs", "--state", "running", "--limit", "1")
    assert [r["name"] for r in json.loads(out)] == ["beta"]
    code, out, _ = cpctl("--json", "runs", "--state", "canceled")
    assert json.loads(out) == []
    assert str(first.id) in cpctl("runs")[1]


def test_logs_of_every_attempt_and_following_one(cpctl, shell_agent, live_server_proc, operator, tmp_path):
    _user, token = operator
    mark = tmp_path / "second"  # the first attempt fails, the retry finds this and succeeds
    document = doc(shell("flaky", f"echo attempt; test -f {mark} || (touch {mark}; exit 1)"), name="flaky")
    run_id = ok(http("POST", f"{live_server_proc.url}/api/v1/runs", document, token=token), 201)["run_id"]
    task_id = ok(http("GET", f"{live_server_proc.url}/api/v1/runs/{run_id}", token=token))["tasks"][0]["id"]
    code, out, _ = cpctl("logs", task_id, "-f")
    assert code == 0 and "attempt" in out
    assert cpctl("retry", task_id)[0] == 0
    assert cpctl("status", run_id, "--watch", "--interval", "0.2")[0] in (0, 1)
    detail = ok(http("GET", f"{live_server_proc.url}/api/v1/tasks/{task_id}", token=token))
    assert [a["number"] for a in detail["attempts"]] == [1, 2]
    for number in (1, 2):
        code, out, _ = cpctl("logs", task_id, "--attempt", str(number))
        assert code == 0 and "attempt" in out
    code, _, err = cpctl("logs", task_id, "--attempt", "7")
    assert code == 1 and "no attempt 7" in err


def test_artifacts_listed_and_downloaded(cpctl, shell_agent, tmp_path):
    made = write(tmp_path, doc(shell("report", "echo 'all green' > $CP_OUT_DIR/report.txt"), name="arts"))
    code, out, err = cpctl("submit", made, "--wait")
    assert code == 0, err
    run_id = out.splitlines()[0]
    code, out, _ = cpctl("artifacts", run_id)
    assert code == 0 and "report.txt" in out and "report" in out
    code, _, err = cpctl("artifacts", run_id, "--get", "report.txt", "-o", str(tmp_path / "got.txt"))
    assert code == 0, err
    assert (tmp_path / "got.txt").read_text() == "all green\n"
    task_id = json.loads(cpctl("--json", "status", run_id)[1])["tasks"][0]["id"]
    code, out, _ = cpctl("--json", "artifacts", task_id)
    assert [a["name"] for a in json.loads(out)] == ["report.txt"]
    assert cpctl("artifacts", run_id, "--get", "nope.txt")[0] == 1


def test_agents_and_approvals(cpctl, shell_agent, submit):
    wait_for(lambda: "cli-1" in cpctl("agents")[1], 30, what="the agent to be listed")
    code, out, _ = cpctl("--json", "agents")
    [agent] = [a for a in json.loads(out) if a["name"] == "cli-1"]
    assert agent["labels"] == ["cli"] and "shell" in agent["executors"] and agent["status"] in ("idle", "busy")

    run = submit(doc({"key": "gate", "executor": "approval"}, name="gated"))
    gate = run.tasks.get(key="gate")
    code, out, err = cpctl("approve", str(gate.id), "-m", "looks right")
    assert code == 0 and "succeeded" in out, err
    code, _, err = cpctl("reject", str(gate.id))
    assert code == 1 and "409" in err


def test_usage_errors_a_dropped_connection_and_a_closed_pipe_print_no_traceback(cpctl, submit, tmp_path):
    code, _, err = cpctl("status")
    assert code == 2 and "usage" in err
    code, _, err = cpctl("runs", env={"CP_URL": "http://127.0.0.1:9"})
    assert code == 1 and "cannot reach http://127.0.0.1:9" in err and "Traceback" not in err
    code, _, err = cpctl("runs", env={"CP_TOKEN": "not-a-token"})
    assert code == 1 and "401" in err and "Traceback" not in err
    code, _, err = cpctl("status", "4f0e1a2b-0000-0000-0000-000000000000")
    assert code == 1 and "404 not_found" in err

    for i in range(30):
        submit(doc({"key": "x"}, name=f"many-{i}"))
    piped = subprocess.run(
        f"{sys.executable} {CPCTL} runs --limit 30 | head -n 1; exit ${{PIPESTATUS[0]}}", shell=True,
        executable="/bin/bash", capture_output=True, text=True, env=cpctl.env, cwd=tmp_path, timeout=60,
    )  # fmt: skip
    assert piped.returncode == 0 and piped.stdout.startswith("RUN") and piped.stderr == "", piped


def test_the_config_file_must_be_private(cpctl, live_server_proc, operator, tmp_path):
    _user, token = operator
    config = tmp_path / "cpctl.json"
    config.write_text(json.dumps({"url": live_server_proc.url, "token": token}))
    config.chmod(0o644)
    env = {"CP_URL": "", "CP_TOKEN": "", "CPCTL_CONFIG": str(config)}
    code, _, err = cpctl("runs", env=env)
    assert code == 2 and "chmod 600" in err
    config.chmod(0o600)
    code, out, err = cpctl("runs", env=env)
    assert code == 0 and out.startswith("RUN"), err
    code, _, err = cpctl("runs", env={"CP_URL": "", "CP_TOKEN": "", "CPCTL_CONFIG": str(tmp_path / "none")})
    assert code == 2 and "no server" in err


def test_retry_failed_an_edited_retry_and_a_rerun(cpctl, shell_agent, tmp_path):
    broken = write(tmp_path, doc(shell("t", "echo tset; exit 1"), shell("u", "exit 1"), name="typo"))
    code, out, _ = cpctl("submit", broken, "--wait")
    assert code == 1
    run_id = out.splitlines()[0]
    tasks = {t["key"]: t["id"] for t in json.loads(cpctl("--json", "status", run_id)[1])["tasks"]}
    code, out, err = cpctl("retry", tasks["t"], "--command", "echo test")
    assert code == 0 and "ready" in out, err
    code, out, err = cpctl("retry", run_id, "--failed")
    assert code == 0 and "1 task(s) retried" in out, err  # u; t is no longer failed
    code, _, _ = cpctl("status", run_id, "--watch", "--interval", "0.2")
    assert code == 1  # u fails again
    assert "test" in cpctl("logs", tasks["t"])[1]
    code, _, err = cpctl("retry", run_id, "--failed", "--command", "x")
    assert code == 2 and "one task at a time" in err

    code, out, err = cpctl("rerun", run_id)
    assert code == 0, err
    rerun_id = out.strip()
    assert rerun_id != run_id
    code, _, _ = cpctl("status", rerun_id, "--watch", "--interval", "0.2")
    assert code == 1  # the same document: its typo again (the edit was that run's retry, not the document)


def test_a_watch_waits_out_a_server_restart(operator, server_tmp, tmp_path, submit):
    from control_plane import launch
    from tasks_app.actions import cancel_run
    from tests.conftest import FAST_TIMINGS, test_database_url

    _user, token = operator
    run = submit(doc({"key": "x"}, name="restarted"))
    port = launch.free_port()
    env = {"DATABASE_URL": test_database_url(), **FAST_TIMINGS}
    server = launch.start_server(port, env=env, log=server_tmp / f"restart-{port}.log")
    watch = subprocess.Popen(
        [sys.executable, str(CPCTL), "status", str(run.id), "--watch", "--interval", "0.2"],
        env={"PATH": os.environ["PATH"], "HOME": str(tmp_path), "CP_URL": f"http://127.0.0.1:{port}",
             "CP_TOKEN": token}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_for(lambda: watch.poll() is None and server.poll() is None, 5, what="the watch")
        launch.stop(server)  # the connection drops; the watch says so once and keeps trying
        server = launch.start_server(port, env=env, log=server_tmp / f"restart-{port}.log")
        cancel_run(run.id, "test")
        out, err = watch.communicate(timeout=60)
    finally:
        watch.kill()
        launch.stop(server)
    assert watch.returncode == 3, (out, err)
    assert "cannot reach" in err and err.count("retrying") == 1 and "Traceback" not in err
    assert "canceled" in out.splitlines()[-1]


def test_submit_warns_of_a_task_no_agent_can_run(cpctl, shell_agent, tmp_path):
    wait_for(lambda: "cli-1" in cpctl("agents")[1], 30, what="the agent to be online")
    needy = write(tmp_path, doc(shell("train", "true", requires=["cli", "gpu"]), name="needy"))
    code, out, err = cpctl("submit", needy)
    assert code == 0 and len(out.split()) == 1  # stdout stays the run id alone
    assert "cpctl: warning: 1 task (train): no agent can run this" in err and "gpu" in err
