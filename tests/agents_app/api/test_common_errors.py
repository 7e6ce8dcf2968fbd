"""What every agent endpoint shares: malformed bodies, text PostgreSQL cannot hold, methods, unknown paths."""

from __future__ import annotations

import uuid

from tests.agents_app.api.common import AGENT_POST_PATHS
from tests.conftest import assert_error, http, ok


def test_malformed_json_is_400(server, enroll, enrollment_token):
    agent = enroll()
    url = f"{server}/api/v1/agents/register"
    assert_error(http("POST", url, raw=b'{"name": ', token=enrollment_token), 400, "malformed_json")
    assert_error(http("POST", url, raw=b"\xff\xfe", token=enrollment_token), 400, "malformed_json")
    for path in ("/api/v1/agents/claim", "/api/v1/agents/heartbeat", f"/api/v1/attempts/{uuid.uuid4()}/progress",
                 f"/api/v1/attempts/{uuid.uuid4()}/complete"):  # fmt: skip
        assert_error(agent.post(path, raw=b"{not json"), 400, "malformed_json")


def test_a_json_body_that_is_not_an_object_is_400(server, enroll, enrollment_token):
    agent = enroll()
    assert_error(http("POST", f"{server}/api/v1/agents/register", [1, 2], token=enrollment_token), 400)
    for path in ("/api/v1/agents/claim", "/api/v1/agents/heartbeat", f"/api/v1/attempts/{uuid.uuid4()}/progress",
                 f"/api/v1/attempts/{uuid.uuid4()}/complete"):  # fmt: skip
        assert_error(agent.post(path, ["x"]), 400, "bad_request")
        assert_error(agent.post(path, "a string"), 400, "bad_request")


def test_text_postgresql_cannot_hold_is_replaced_not_a_500(server, enroll, run_of, enrollment_token):
    from agents_app.models import Agent as AgentModel
    from tasks_app.models import Attempt

    body = {"name": "odd-host", "hostname": "h\x00st", "version": "1.\ud800"}
    ok(http("POST", f"{server}/api/v1/agents/register", body, token=enrollment_token), 201)
    assert AgentModel.objects.values_list("hostname", "version").get(name="odd-host") == ("h\ufffdst", "1.\ufffd")
    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()["attempt_id"]
    ok(agent.progress(attempt, {"message": "a\x00b", "log": "raw\x00output \udcff\n"}))
    result = {"k\x00": ["v\ud800", {"deep": "\x00"}], "emoji": "\U0001f600"}
    ok(agent.complete(attempt, result=result, error="e\x00"))
    stored = Attempt.objects.get(pk=attempt)
    assert (stored.message, stored.log, stored.error) == ("a\ufffdb", "raw\ufffdoutput \ufffd\n", "e\ufffd")
    assert stored.result == {"k\ufffd": ["v\ufffd", {"deep": "\ufffd"}], "emoji": "\U0001f600"}


def test_nan_infinity_and_absurd_nesting_are_400_not_a_500(server, enroll, run_of):
    run_of({"key": "a"})
    agent = enroll()
    attempt = agent.claim_one()["attempt_id"]
    path = f"/api/v1/attempts/{attempt}/complete"
    for raw in (b'{"outcome": "succeeded", "result": {"x": NaN}}', b'{"outcome": "failed", "exit_code": Infinity}',
                b'{"outcome": "succeeded", "result": {"x": ' + b"[" * 20000 + b"]" * 20000 + b"}}"):  # fmt: skip
        assert_error(agent.post(path, raw=raw), 400, "malformed_json", raw[:50])
    nested = b'{"outcome": "succeeded", "result": {"x": ' + b"[" * 200 + b'"\\u0000"' + b"]" * 200 + b"}}"
    assert ok(agent.post(path, raw=nested)) == {"task_state": "succeeded"}


def test_other_methods_on_a_post_endpoint_are_405_json(server):
    for path in AGENT_POST_PATHS:
        for method in ("GET", "PUT", "DELETE"):
            assert_error(http(method, server + path), 405, "method_not_allowed", f"{method} {path}")


def test_an_unknown_api_path_is_404_json(server):
    for method, path in (("GET", "/api/v1/nope"), ("POST", "/api/v1/agents/nope"), ("GET", "/api/"),
                         ("POST", "/api/v2/agents/claim"), ("GET", f"/api/v1/attempts/{uuid.uuid4()}/nope"),
                         ("GET", "/api/v1/agents/claim/"), ("POST", "/api/v1/agents/claim/")):  # fmt: skip
        answer = http(method, server + path, {} if method == "POST" else None)
        assert_error(answer, 404, "not_found", f"{method} {path}")


def test_a_host_header_this_server_does_not_serve_is_400_json_under_api_and_html_elsewhere(server, enroll):
    """Django refuses a Host outside ALLOWED_HOSTS before any view; schemathesis found it answered its HTML page
    under /api/ too. The agents' lean handler and the run API both answer in PROTOCOL.md's shape."""
    agent = enroll()
    evil = {"Host": "evil.example"}
    for path, token in (("/api/v1/agents/claim", agent.token), ("/api/v1/runs", None)):
        detail = assert_error(http("POST", server + path, {}, token=token, headers=evil), 400, "bad_request", path)
        assert detail == "the Host header names no host this server answers to"
    status, page = http("GET", server + "/runs/", headers=evil)
    assert status == 400 and b"<html" in page.lower() and b"ALLOWED_HOSTS" not in page
    assert ok(agent.post("/api/v1/agents/claim", {"wait_s": 0})) == {"assignments": []}  # the right Host still
