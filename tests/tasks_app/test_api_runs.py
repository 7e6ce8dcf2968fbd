"""PROTOCOL.md's run endpoints (API token; the user's permissions apply), artifact downloads and the health
check, spoken over real HTTP to a real uvicorn process on the test database."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from django.utils import timezone

from tests.conftest import assert_error, doc, http, ok

# PROTOCOL.md's fields, and `waiting` (an addition: why a ready task is not assigned yet).
TASK_FIELDS = {"id", "key", "state", "attempt", "progress", "agent", "started_at", "finished_at", "waiting", "commit",
               "cost_usd", "session_id", "usage", "awaiting"}  # fmt: skip
TASK_STATES = {
    "blocked",
    "ready",
    "assigned",
    "running",
    "awaiting_approval",
    "succeeded",
    "failed",
    "canceled",
    "skipped",
}


# --- helpers ------------------------------------------------------------------------------------------


class Client:
    """HTTP calls with one bearer token against the live server."""

    def __init__(self, url: str, token: str | None):
        self.url, self.token = url, token

    def get(self, path: str):
        return http("GET", self.url + path, token=self.token)

    def post(self, path: str, body=None, **kwargs):
        return http("POST", self.url + path, body, token=self.token, **kwargs)

    def submit(self, document: dict) -> str:
        return ok(self.post("/api/v1/runs", document), 201)["run_id"]

    def run(self, run_id: str) -> dict:
        return ok(self.get(f"/api/v1/runs/{run_id}"))

    def states(self, run_id: str) -> dict[str, str]:
        return {t["key"]: t["state"] for t in self.run(run_id)["tasks"]}


@pytest.fixture
def server(live_server_proc, transactional_db) -> str:
    return live_server_proc.url


@pytest.fixture
def api(server, django_user_model) -> Client:
    """The operator: a superuser with an API token (and no password: hashing one costs a third of a second)."""
    from agents_app.registry import create_api_token

    user = django_user_model.objects.create_superuser("olivia", "olivia@example.com", None)
    token, _ = create_api_token(user)
    return Client(server, token)


@pytest.fixture
def plain_user(server, django_user_model) -> Client:
    """A non-staff user without any permission, with a valid API token."""
    from agents_app.registry import create_api_token

    user = django_user_model.objects.create_user("pat", "pat@example.com", None)
    token, _ = create_api_token(user)
    return Client(server, token)


@pytest.fixture
def agent(server, enrollment_token) -> Client:
    """A registered agent (simulated and shell executors, capacity 4)."""
    body = {"name": "worker-1", "executors": ["simulated", "shell"], "capacity": 4}
    answer = ok(http("POST", f"{server}/api/v1/agents/register", body, token=enrollment_token), 201)
    return Client(server, answer["token"])


def claim_all(agent: Client) -> dict[str, dict]:
    """Claim what the agent may take now: {task key: assignment}."""
    assignments = ok(agent.post("/api/v1/agents/claim", {"capacity": 4, "wait_s": 0}))["assignments"]
    return {a["task"]["key"]: a for a in assignments}


def finish(agent: Client, assignment: dict, outcome: str = "succeeded") -> str:
    body = ok(agent.post(f"/api/v1/attempts/{assignment['attempt_id']}/complete", {"outcome": outcome}))
    return body["task_state"]


# --- submitting ---------------------------------------------------------------------------------------


def test_submit_answers_201_with_run_id_and_task_count(api):
    from tasks_app.models import Run

    document = doc({"key": "plan"}, {"key": "core-1", "deps": ["plan"]}, {"key": "core-2", "deps": ["plan"]},
                   {"key": "lint", "deps": ["core-1", "core-2"], "executor": "shell", "command": "make lint"},
                   name="webapp", max_parallel=2)  # fmt: skip
    body = ok(api.post("/api/v1/runs", document), 201)
    assert set(body) == {"run_id", "tasks", "warnings"} and body["tasks"] == 4
    run = Run.objects.get(pk=body["run_id"])
    assert (run.name, run.state, run.max_parallel, run.created_by.username) == ("webapp", "running", 2, "olivia")
    assert api.states(body["run_id"]) == {"plan": "ready", "core-1": "blocked", "core-2": "blocked",
                                          "lint": "blocked"}  # fmt: skip


def test_submit_of_a_cycle_is_422_naming_the_cycle_in_order(api):
    from tasks_app.models import Run

    two = doc({"key": "a", "deps": ["b"]}, {"key": "b", "deps": ["a"]})
    assert "a -> b -> a" in assert_error(api.post("/api/v1/runs", two), 422)
    # c runs before a, a before b, b before c; "start" is upstream of the cycle but not on it.
    three = doc({"key": "start"}, {"key": "a", "deps": ["c", "start"]}, {"key": "b", "deps": ["a"]},
                {"key": "c", "deps": ["b"]})  # fmt: skip
    detail = assert_error(api.post("/api/v1/runs", three), 422)
    assert "a -> b -> c -> a" in detail and "start" not in detail
    self_loop = doc({"key": "me", "deps": ["me"]})
    assert "me -> me" in assert_error(api.post("/api/v1/runs", self_loop), 422)
    assert not Run.objects.exists()


def test_submit_with_an_unknown_dependency_is_422_naming_it(api):
    detail = assert_error(api.post("/api/v1/runs", doc({"key": "a"}, {"key": "b", "deps": ["a", "ghost"]})), 422)
    assert "'b'" in detail and "ghost" in detail


def test_submit_with_a_duplicate_key_is_422_naming_it(api):
    detail = assert_error(api.post("/api/v1/runs", doc({"key": "twice"}, {"key": "other"}, {"key": "twice"})), 422)
    assert "twice" in detail


def test_submit_with_a_bad_field_is_422_naming_the_task(api):
    from tasks_app.models import Run

    cases = [
        (doc({"key": "perl-job", "executor": "perl"}), "perl-job"),
        (doc({"key": "no-cmd", "executor": "shell"}), "no-cmd"),
        (doc({"key": "no-prompt", "executor": "codex"}), "no-prompt"),
        (doc({"key": "bad key!"}), "bad key!"),
        (doc({"key": "k\n"}), "k\\n"),  # `$` would match before the newline; keys are matched whole
        (doc({"key": "x", "requires": ["gpu\n"]}), "gpu"),
        (doc({"key": "x", "max_attempts": 0}), "max_attempts"),
        (doc({"key": "x", "colour": "red"}), "colour"),
        (doc({"key": "x", "params": [1]}), "params"),
        ({"name": "t", "tasks": []}, "tasks"),
        ({"tasks": [{"key": "x", "executor": "simulated"}]}, "name"),
        (doc({"key": "x"}, max_parallel=0), "max_parallel"),
    ]
    for document, named in cases:
        detail = assert_error(api.post("/api/v1/runs", document), 422, case=document)
        assert named in detail, (document, detail)
    assert not Run.objects.exists()


def test_submit_of_malformed_json_or_a_non_object_is_400(api):
    assert_error(api.post("/api/v1/runs", raw=b'{"name": "t", "tasks": ['), 400, "malformed_json")
    assert_error(api.post("/api/v1/runs", [doc({"key": "a"})]), 400, "bad_request")


def test_a_document_with_text_postgresql_cannot_hold_is_stored_not_a_500(api):
    from tasks_app.models import Task

    document = doc({"key": "a", "title": "t\ud800", "executor": "codex", "prompt": "do\x00it"})
    run_id = api.submit(document)
    assert Task.objects.values_list("title", "prompt").get(run_id=run_id) == ("t\ufffd", "do\ufffdit")


def test_a_document_with_nan_is_400(api):
    raw = b'{"name": "x", "tasks": [{"key": "a", "executor": "simulated", "params": {"d": NaN}}]}'
    assert_error(api.post("/api/v1/runs", raw=raw), 400, "malformed_json")


def test_submit_without_a_valid_api_token_is_401(server, api, agent, enrollment_token):
    from agents_app.models import ApiToken
    from tasks_app.models import Run

    document = doc({"key": "a"})
    assert_error(Client(server, None).post("/api/v1/runs", document), 401)
    assert_error(Client(server, "cpu_no-such-token").post("/api/v1/runs", document), 401)
    assert_error(agent.post("/api/v1/runs", document), 401)  # an agent token is not an API token
    assert_error(Client(server, enrollment_token).post("/api/v1/runs", document), 401)
    ApiToken.objects.filter(user__username="olivia").update(revoked_at=timezone.now())
    assert_error(api.post("/api/v1/runs", document), 401)
    assert not Run.objects.exists()


def test_a_user_without_permissions_is_403(api, plain_user):
    from tasks_app.models import Run, Task

    run_id = api.submit(doc({"key": "a"}))
    task_id = str(Task.objects.get(run_id=run_id).id)
    assert_error(plain_user.post("/api/v1/runs", doc({"key": "b"})), 403, "forbidden")
    assert_error(plain_user.get(f"/api/v1/runs/{run_id}"), 403, "forbidden")
    for action in ("cancel", "pause", "resume"):
        assert_error(plain_user.post(f"/api/v1/runs/{run_id}/{action}"), 403, "forbidden", action)
    assert_error(plain_user.post(f"/api/v1/tasks/{task_id}/retry"), 403, "forbidden")
    assert Run.objects.count() == 1 and Run.objects.get().state == "running"


def test_a_user_granted_the_permissions_may_submit_and_read(server, plain_user, django_user_model):
    from django.contrib.auth.models import Permission

    user = django_user_model.objects.get(username="pat")
    user.user_permissions.add(*Permission.objects.filter(codename__in=["add_run", "view_run"]))
    run_id = plain_user.submit(doc({"key": "a"}))
    assert plain_user.run(run_id)["state"] == "running"
    assert_error(plain_user.post(f"/api/v1/runs/{run_id}/cancel"), 403, "forbidden")  # no change_run


def test_an_inactive_users_token_is_refused(api, plain_user, django_user_model):
    django_user_model.objects.filter(username="pat").update(is_active=False)
    assert_error(plain_user.post("/api/v1/runs", doc({"key": "a"})), 403)


# --- reading ------------------------------------------------------------------------------------------


def test_get_run_answers_its_tasks_and_counts(api, agent):
    run_id = api.submit(doc({"key": "a"}, {"key": "b"}, {"key": "c", "deps": ["a", "b"]}, name="shape"))
    claimed = claim_all(agent)
    assert set(claimed) == {"a", "b"}
    ok(agent.post(f"/api/v1/attempts/{claimed['b']['attempt_id']}/progress", {"progress": 0.5}))
    assert finish(agent, claimed["a"]) == "succeeded"

    body = api.run(run_id)
    assert {"run_id", "name", "state", "tasks", "counts"} <= set(body)
    assert (body["run_id"], body["name"], body["state"]) == (run_id, "shape", "running")
    tasks = {t["key"]: t for t in body["tasks"]}
    assert set(tasks) == {"a", "b", "c"}
    for task in tasks.values():
        assert set(task) == TASK_FIELDS, task
        uuid.UUID(task["id"])
    a, b, c = tasks["a"], tasks["b"], tasks["c"]
    assert (a["state"], a["attempt"], a["progress"], a["agent"]) == ("succeeded", 1, 1, "worker-1")
    assert a["started_at"] and a["finished_at"]
    assert (b["state"], b["attempt"], b["progress"], b["agent"]) == ("running", 1, 0.5, "worker-1")
    assert b["started_at"] and b["finished_at"] is None
    assert (c["state"], c["attempt"], c["progress"], c["agent"]) == ("blocked", 0, 0, None)
    assert (c["started_at"], c["finished_at"]) == (None, None)
    assert set(body["counts"]) <= TASK_STATES
    nonzero = {state: n for state, n in body["counts"].items() if n}
    assert nonzero == {"succeeded": 1, "running": 1, "blocked": 1}


def test_runs_are_listed_newest_first_with_their_counts(api, plain_user):
    first = api.submit(doc({"key": "a"}, {"key": "b", "deps": ["a"]}, name="first"))
    second = api.submit(doc({"key": "x"}, name="second"))
    ok(api.post(f"/api/v1/runs/{first}/cancel"))
    listed = ok(api.get("/api/v1/runs"))["runs"]
    assert [r["run_id"] for r in listed[:2]] == [second, first]
    newest = listed[0]
    assert (newest["name"], newest["state"], newest["tasks"], newest["counts"]["ready"]) == ("second", "running", 1, 1)
    assert [r["run_id"] for r in ok(api.get("/api/v1/runs?state=canceled"))["runs"]] == [first]
    assert len(ok(api.get("/api/v1/runs?limit=1"))["runs"]) == 1
    for bad in ("state=lost", "limit=0", "limit=501", "limit=x"):
        assert_error(api.get(f"/api/v1/runs?{bad}"), 400, "bad_request", bad)
    assert_error(plain_user.get("/api/v1/runs"), 403)


def test_an_unknown_run_is_404(api):
    for run_id in (str(uuid.uuid4()), "not-a-uuid"):
        assert_error(api.get(f"/api/v1/runs/{run_id}"), 404, "not_found", run_id)
        for action in ("cancel", "pause", "resume"):
            assert_error(api.post(f"/api/v1/runs/{run_id}/{action}"), 404, "not_found", (run_id, action))
        assert_error(api.post(f"/api/v1/tasks/{run_id}/retry"), 404, "not_found", run_id)


def test_run_endpoints_refuse_other_methods_with_405(api):
    run_id = api.submit(doc({"key": "a"}))
    assert_error(http("PUT", f"{api.url}/api/v1/runs", {}, token=api.token), 405, "method_not_allowed")
    assert_error(api.post(f"/api/v1/runs/{run_id}"), 405, "method_not_allowed")
    for action in ("cancel", "pause", "resume"):
        assert_error(api.get(f"/api/v1/runs/{run_id}/{action}"), 405, "method_not_allowed", action)


# --- operating ----------------------------------------------------------------------------------------


def test_pause_resume_and_cancel_answer_the_new_state(api):
    run_id = api.submit(doc({"key": "a"}, {"key": "b", "deps": ["a"]}))
    assert ok(api.post(f"/api/v1/runs/{run_id}/pause")) == {"run_id": run_id, "state": "paused"}
    assert api.run(run_id)["state"] == "paused"
    assert ok(api.post(f"/api/v1/runs/{run_id}/resume")) == {"run_id": run_id, "state": "running"}
    assert api.run(run_id)["state"] == "running"
    assert ok(api.post(f"/api/v1/runs/{run_id}/cancel")) == {"run_id": run_id, "state": "canceled"}
    body = api.run(run_id)
    assert body["state"] == "canceled"
    assert {t["key"]: t["state"] for t in body["tasks"]} == {"a": "canceled", "b": "canceled"}


def test_a_paused_run_assigns_nothing_until_resumed(api, agent):
    run_id = api.submit(doc({"key": "a"}))
    ok(api.post(f"/api/v1/runs/{run_id}/pause"))
    assert claim_all(agent) == {}
    ok(api.post(f"/api/v1/runs/{run_id}/resume"))
    assert set(claim_all(agent)) == {"a"}


def test_canceling_a_run_cancels_its_live_attempts(api, agent):
    run_id = api.submit(doc({"key": "a"}))
    attempt = claim_all(agent)["a"]["attempt_id"]
    ok(api.post(f"/api/v1/runs/{run_id}/cancel"))
    commands = ok(agent.post("/api/v1/agents/heartbeat", {"attempts": [attempt]}))["commands"]
    assert commands == [{"type": "cancel", "attempt_id": attempt}]
    assert_error(agent.post(f"/api/v1/attempts/{attempt}/complete", {"outcome": "succeeded"}), 409)
    assert api.states(run_id) == {"a": "canceled"}


def test_resume_of_a_running_run_is_409(api):
    run_id = api.submit(doc({"key": "a"}))
    assert_error(api.post(f"/api/v1/runs/{run_id}/resume"), 409, "invalid_state")
    assert api.run(run_id)["state"] == "running"


def test_pause_or_cancel_of_a_canceled_run_is_409(api):
    run_id = api.submit(doc({"key": "a"}))
    ok(api.post(f"/api/v1/runs/{run_id}/cancel"))
    for action in ("pause", "cancel"):
        assert_error(api.post(f"/api/v1/runs/{run_id}/{action}"), 409, "invalid_state", action)
    assert api.run(run_id)["state"] == "canceled"


def test_resume_of_a_finished_run_is_409(api, agent):
    """Resume undoes a pause and nothing else: a canceled or failed run is reopened only by retrying a task.
    (A resumed canceled run would be "running" with nothing left to run, for ever.)"""
    canceled = api.submit(doc({"key": "a"}))
    ok(api.post(f"/api/v1/runs/{canceled}/cancel"))
    failed = api.submit(doc({"key": "b", "max_attempts": 1}))
    finish(agent, claim_all(agent)["b"], "failed")
    for run_id, state in ((canceled, "canceled"), (failed, "failed")):
        assert_error(api.post(f"/api/v1/runs/{run_id}/resume"), 409, "invalid_state", state)
        assert api.run(run_id)["state"] == state


def test_pause_of_a_succeeded_run_is_409(api, agent):
    run_id = api.submit(doc({"key": "a"}))
    finish(agent, claim_all(agent)["a"])
    assert api.run(run_id)["state"] == "succeeded"
    assert_error(api.post(f"/api/v1/runs/{run_id}/pause"), 409, "invalid_state")


def test_retry_of_a_failed_task_makes_its_skipped_downstream_blocked_again(api, agent):
    from tasks_app.models import Event

    run_id = api.submit(
        doc(
            {"key": "a", "max_attempts": 1}, {"key": "b", "deps": ["a"]}, {"key": "c", "deps": ["b"]}, {"key": "side"}
        )  # fmt: skip
    )
    claimed = claim_all(agent)
    assert finish(agent, claimed["side"]) == "succeeded"
    assert finish(agent, claimed["a"], "failed") == "failed"
    body = api.run(run_id)
    assert body["state"] == "failed"
    assert api.states(run_id) == {"a": "failed", "b": "skipped", "c": "skipped", "side": "succeeded"}

    task_a = next(t["id"] for t in body["tasks"] if t["key"] == "a")
    assert ok(api.post(f"/api/v1/tasks/{task_a}/retry")) == {"task_id": task_a, "state": "ready"}
    assert api.run(run_id)["state"] == "running"
    assert api.states(run_id) == {"a": "ready", "b": "blocked", "c": "blocked", "side": "succeeded"}
    assert Event.objects.filter(task_id=task_a, to_state="ready", actor="user:olivia").exists()

    # The retried task gets a fresh attempt budget and the run finishes normally.
    again = claim_all(agent)
    assert set(again) == {"a"} and again["a"]["task"]["attempt"] == 2
    finish(agent, again["a"])
    finish(agent, claim_all(agent)["b"])
    finish(agent, claim_all(agent)["c"])
    assert api.run(run_id)["state"] == "succeeded"


def test_retry_of_a_canceled_task_is_allowed(api):
    run_id = api.submit(doc({"key": "a"}))
    ok(api.post(f"/api/v1/runs/{run_id}/cancel"))
    task_id = api.run(run_id)["tasks"][0]["id"]
    assert ok(api.post(f"/api/v1/tasks/{task_id}/retry"))["state"] == "ready"


def test_retry_of_a_succeeded_or_pending_task_is_409(api, agent):
    run_id = api.submit(doc({"key": "a"}, {"key": "b", "deps": ["a"]}, {"key": "c"}))
    claimed = claim_all(agent)
    finish(agent, claimed["a"])
    ids = {t["key"]: t["id"] for t in api.run(run_id)["tasks"]}
    for key, state in (("a", "succeeded"), ("b", "ready"), ("c", "assigned")):
        assert_error(api.post(f"/api/v1/tasks/{ids[key]}/retry"), 409, "invalid_state", key)
        assert api.states(run_id)[key] == state


# --- artifacts and health -----------------------------------------------------------------------------


def test_an_artifact_downloads_with_its_bytes(api, agent, plain_user):
    api.submit(doc({"key": "a"}))
    attempt = claim_all(agent)["a"]["attempt_id"]
    content = bytes(range(256)) * 40 + b"\x00end"
    boundary = uuid.uuid4().hex
    raw = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="out.bin"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        + content
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    uploaded = ok(agent.post(f"/api/v1/attempts/{attempt}/artifacts", raw=raw, headers=headers), 201)

    status, payload = api.get(f"/api/v1/artifacts/{uploaded['artifact_id']}")
    assert status == 200
    assert payload == content and hashlib.sha256(payload).hexdigest() == uploaded["sha256"]

    assert_error(plain_user.get(f"/api/v1/artifacts/{uploaded['artifact_id']}"), 403, "forbidden")
    assert_error(Client(api.url, None).get(f"/api/v1/artifacts/{uploaded['artifact_id']}"), 401)
    assert_error(agent.get(f"/api/v1/artifacts/{uploaded['artifact_id']}"), 401)
    assert_error(api.get(f"/api/v1/artifacts/{uuid.uuid4()}"), 404, "not_found")
    assert_error(api.get("/api/v1/artifacts/nope"), 404, "not_found")


def test_health_answers_ok(server):
    assert ok(http("GET", f"{server}/api/v1/health")) == {"status": "ok"}


def test_an_unknown_api_path_is_404_json(api):
    for path in ("/api/v1/runs/x/y/z", "/api/v1/tasks", f"/api/v1/tasks/{uuid.uuid4()}"):
        assert_error(api.get(path), 404, "not_found", path)


# --- additions for cpctl: YAML and workflow starts, task details, logs by attempt, the fleet -------------


def test_a_yaml_document_and_the_starts_overrides(api):
    yaml_doc = b"name: y\nparams: {who: a}\ntasks:\n  - {key: one, executor: shell, command: 'echo ${params.who}'}\n"
    status, body = http("POST", f"{api.url}/api/v1/runs?param=who=b", raw=yaml_doc, token=api.token,
                        headers={"Content-Type": "application/yaml"})  # fmt: skip
    assert status == 201, body
    assert api.run(body["run_id"])["params"] == {"who": "b"}
    bad = http("POST", f"{api.url}/api/v1/runs", raw=b"name: [unclosed", token=api.token,
               headers={"Content-Type": "application/yaml"})  # fmt: skip
    assert "neither valid JSON nor valid YAML" in assert_error(bad, 422)
    nul = http("POST", f"{api.url}/api/v1/runs", raw=b"name: a\x00b\n", token=api.token,
               headers={"Content-Type": "application/yaml"})  # fmt: skip
    assert_error(nul, 400, "bad_request")
    assert "NAME=VALUE" in assert_error(api.post("/api/v1/runs?param=novalue", doc({"key": "a"})), 422)


def test_a_workflow_starts_by_name_with_params(api):
    from tasks_app.workflows import documents

    documents.import_document(doc({"key": "a"}, name="nightly", params={"who": "x"}), actor="test")
    started = ok(api.post("/api/v1/workflows/nightly/runs", {"params": {"who": "y"}, "priority": 5}), 201)
    assert started["tasks"] == 1 and api.run(started["run_id"])["params"] == {"who": "y"}
    assert_error(api.post("/api/v1/workflows/nope/runs", {}), 404, "not_found")
    assert "'params' must be" in assert_error(api.post("/api/v1/workflows/nightly/runs", {"params": {"n": 1}}), 400)
    listed = ok(api.get("/api/v1/runs?workflow=nightly"))["runs"]
    assert [r["run_id"] for r in listed] == [started["run_id"]]
    assert_error(api.get("/api/v1/runs?workflow=nope"), 404, "not_found")


def test_a_tasks_detail_and_its_log_by_attempt_and_offset(api, agent):
    run_id = api.submit(doc({"key": "a", "max_attempts": 2, "retry_delay_s": 0}))
    task_id = api.run(run_id)["tasks"][0]["id"]
    assert "no attempts yet" in assert_error(api.get(f"/api/v1/tasks/{task_id}/log"), 404, "not_found")
    first = claim_all(agent)["a"]
    ok(agent.post(f"/api/v1/attempts/{first['attempt_id']}/progress", {"progress": 0.5, "log": "one\ntwo\n"}))
    page = ok(api.get(f"/api/v1/tasks/{task_id}/log?offset=4"))
    assert page == {"task_id": task_id, "attempt": 1, "attempts": 1, "state": "running", "done": False,
                    "offset": 4, "next_offset": 8, "log": "two\n"}  # fmt: skip
    finish(agent, first, "failed")
    second = claim_all(agent)["a"]
    ok(agent.post(f"/api/v1/attempts/{second['attempt_id']}/progress", {"progress": 0.1, "log": "again\n"}))
    finish(agent, second)
    assert ok(api.get(f"/api/v1/tasks/{task_id}/log"))["log"] == "again\n"
    old = ok(api.get(f"/api/v1/tasks/{task_id}/log?attempt=1&offset=999"))
    assert (old["attempt"], old["state"], old["done"], old["log"], old["offset"]) == (1, "failed", True, "", 8)
    assert_error(api.get(f"/api/v1/tasks/{task_id}/log?attempt=9"), 404, "not_found")
    assert_error(api.get(f"/api/v1/tasks/{task_id}/log?offset=-1"), 400, "bad_request")
    detail = ok(api.get(f"/api/v1/tasks/{task_id}"))
    assert [(a["number"], a["state"], a["log_chars"]) for a in detail["attempts"]] == [
        (1, "failed", 8),
        (2, "succeeded", 6),
    ]
    assert detail["key"] == "a" and detail["run_id"] == run_id and detail["artifacts"] == []
    assert_error(api.get(f"/api/v1/tasks/{uuid.uuid4()}"), 404, "not_found")


def test_the_run_answer_lists_artifacts_and_the_fleet_needs_its_permission(api, agent, plain_user):
    run_id = api.submit(doc({"key": "a"}))
    attempt = claim_all(agent)["a"]["attempt_id"]
    boundary = uuid.uuid4().hex
    raw = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="r.txt"\r\n'
           f"Content-Type: text/plain\r\n\r\nok\r\n--{boundary}--\r\n").encode()  # fmt: skip
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    uploaded = ok(agent.post(f"/api/v1/attempts/{attempt}/artifacts", raw=raw, headers=headers), 201)
    [listed] = api.run(run_id)["artifacts"]
    assert listed["id"] == uploaded["artifact_id"] and (listed["name"], listed["task"], listed["attempt"]) == (
        "r.txt", "a", 1)  # fmt: skip
    [worker] = ok(api.get("/api/v1/agents"))["agents"]
    assert worker["name"] == "worker-1" and worker["tasks"] == ["a"] and worker["status"] == "busy"
    assert_error(plain_user.get("/api/v1/agents"), 403, "forbidden")


# --- reruns and retries as a team works with them ------------------------------------------------------


def test_a_rerun_is_a_new_linked_run_of_the_same_document(api, agent):
    from tasks_app.models import Event, Run

    old = api.submit(doc({"key": "a"}, {"key": "b", "deps": ["a"]}, name="again", params={"who": "x"}))
    again = ok(api.post(f"/api/v1/runs/{old}/rerun"), 201)
    assert again["rerun_of"] == old and again["tasks"] == 2 and again["run_id"] != old
    new = Run.objects.get(pk=again["run_id"])
    assert new.rerun_of_id == uuid.UUID(old) and new.document == Run.objects.get(pk=old).document
    assert api.states(again["run_id"]) == {"a": "ready", "b": "blocked"}
    assert Event.objects.filter(run_id=old, kind="rerun", detail__rerun=again["run_id"]).exists()
    assert_error(api.post(f"/api/v1/runs/{uuid.uuid4()}/rerun"), 404, "not_found")


def test_retry_failed_retries_every_failed_task_of_the_run(api, agent):
    run_id = api.submit(doc({"key": "a", "max_attempts": 1}, {"key": "b", "max_attempts": 1},
                            {"key": "c", "deps": ["a"]}, {"key": "d"}))  # fmt: skip
    claimed = claim_all(agent)
    finish(agent, claimed["a"], "failed")
    finish(agent, claimed["b"], "failed")
    finish(agent, claimed["d"])
    assert api.states(run_id) == {"a": "failed", "b": "failed", "c": "skipped", "d": "succeeded"}
    answer = ok(api.post(f"/api/v1/runs/{run_id}/retry-failed"))
    ids = {t["key"]: t["id"] for t in api.run(run_id)["tasks"]}
    assert sorted(answer["retried"]) == sorted([ids["a"], ids["b"]]) and answer["state"] == "running"
    assert api.states(run_id) == {"a": "ready", "b": "ready", "c": "blocked", "d": "succeeded"}
    assert ok(api.post(f"/api/v1/runs/{run_id}/retry-failed"))["retried"] == []


def test_a_retry_may_change_the_command_prompt_or_params_and_the_trail_keeps_both(api, agent):
    from tasks_app.models import Event, Task

    run_id = api.submit(doc({"key": "s", "executor": "shell", "command": "make tset", "max_attempts": 1}))
    finish(agent, claim_all(agent)["s"], "failed")
    task_id = api.run(run_id)["tasks"][0]["id"]
    answer = ok(api.post(f"/api/v1/tasks/{task_id}/retry", {"command": "make test"}))
    assert answer["state"] == "ready" and Task.objects.get(pk=task_id).command == "make test"
    retry = Event.objects.filter(task_id=task_id, detail__retry=True).get()
    assert retry.detail["edited"] == {"command": {"from": "make tset", "to": "make test"}}
    assert retry.actor == "user:olivia"
    again = claim_all(agent)["s"]
    assert again["task"]["command"] == "make test"
    finish(agent, again, "failed")
    refused = api.post(f"/api/v1/tasks/{task_id}/retry", {"command": ""})
    assert "needs a command" in assert_error(refused, 422)
    assert "may change only" in assert_error(api.post(f"/api/v1/tasks/{task_id}/retry", {"key": "x"}), 422)
    bad_template = api.post(f"/api/v1/tasks/{task_id}/retry", {"command": "echo ${params.nope}"})
    assert "params.nope" in assert_error(bad_template, 422)
    assert Task.objects.get(pk=task_id).command == "make test" and api.states(run_id) == {"s": "failed"}


def test_figures_after_a_retry_count_each_tasks_final_attempt(api, agent):
    from datetime import timedelta

    from tasks_app.dashboard.reports import run_metrics
    from tasks_app.models import Attempt

    run_id = api.submit(doc({"key": "a", "max_attempts": 1}))
    finish(agent, claim_all(agent)["a"], "failed")
    task_id = api.run(run_id)["tasks"][0]["id"]
    # The run stood failed for ten minutes before someone retried it.
    first = Attempt.objects.get(task_id=task_id, number=1)
    Attempt.objects.filter(pk=first.pk).update(assigned_at=first.assigned_at - timedelta(minutes=10),
                                               started_at=first.started_at - timedelta(minutes=10))  # fmt: skip
    ok(api.post(f"/api/v1/tasks/{task_id}/retry"))
    second = claim_all(agent)["a"]
    ok(agent.post(f"/api/v1/attempts/{second['attempt_id']}/progress", {"progress": 0.5}))
    finish(agent, second)
    metrics = run_metrics(run_id)
    assert metrics["makespan_s"] < 60 and metrics["final_attempts_only"] is True
    assert 0 < metrics["speedup"] <= 1.0


def test_a_bad_document_is_refused_with_every_problem_and_refusals_are_spelled_right(api):
    document = {
        "name": "bad",
        "tasks": [
            {"key": "a", "executor": "shell"},
            {"key": "b", "executor": "simulated", "deps": ["aa"], "max_attempts": 0},
        ],
    }
    detail = assert_error(api.post("/api/v1/runs", document), 422)
    assert detail.startswith("3 problems: ") and "task 'a'" in detail and "task 'b': max_attempts" in detail
    assert "did you mean 'a'?" in detail
    run_id = api.submit(doc({"key": "x"}))
    ok(api.post(f"/api/v1/runs/{run_id}/cancel"))
    assert "it cannot be canceled" in assert_error(api.post(f"/api/v1/runs/{run_id}/cancel"), 409)
