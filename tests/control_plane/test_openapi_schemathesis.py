"""Schemathesis against a live server: requests generated from /api/v1/openapi.json, valid and invalid, for
every operation, each with the token its security scheme names. No answer may be a 5xx, and every answer must
match the description: its status documented, its content type and its JSON as described."""

from __future__ import annotations

from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import Server, http, ok

pytestmark = pytest.mark.integration  # its server is its own (a module's), not a layer fixture's

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Per operation and mode. Long polls are held at most CP_MAX_WAIT_S (1 s on this server).
EXAMPLES = 25


@pytest.fixture(scope="module")
def short_poll_server(django_db_setup, django_db_blocker, server_tmp):
    with django_db_blocker.unblock():
        server = Server(server_tmp, extra_env={"CP_MAX_WAIT_S": "1"})
    yield server
    server.stop()


@pytest.fixture
def tokens(short_poll_server, transactional_db, enrollment_token, django_user_model):
    """A token for each security scheme: an enrollment token, an agent's, a superuser's API token."""
    from agents_app.registry import create_api_token

    user = django_user_model.objects.create_superuser("sam", "sam@example.com", None)
    api_token, _ = create_api_token(user)
    body = {"name": "fuzzed", "executors": ["shell", "simulated"]}
    url = short_poll_server.url
    agent = ok(http("POST", f"{url}/api/v1/agents/register", body, token=enrollment_token), 201)
    return {"enrollmentToken": enrollment_token, "agentToken": agent["token"], "apiToken": api_token}


def test_no_operation_answers_5xx_or_off_its_description(short_poll_server, tokens):
    document = ok(http("GET", f"{short_poll_server.url}/api/v1/openapi.json"))
    schema = schemathesis.openapi.from_dict(document)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == sum(len(methods) for methods in document["paths"].values()), [o.label for o in operations]
    failures, statuses = [], Counter()
    for operation in operations:
        raw = operation.definition.raw
        security = raw.get("security") or []
        scheme = next(iter(security[0]), None) if security else None
        headers = {"Authorization": f"Bearer {tokens[scheme]}"} if scheme else {}
        # Without parameters or a body there is nothing to get wrong.
        modes = [GenerationMode.POSITIVE] + (
            [GenerationMode.NEGATIVE] if raw["parameters"] or "requestBody" in raw else []
        )
        for mode in modes:
            try:
                _fuzz(operation, mode, headers, short_poll_server.url, statuses)
            except Exception as exc:  # every operation is tried; the failures are reported together
                failures.append(f"{operation.label} ({mode}): {exc}")
    assert not failures, "\n\n".join(failures)
    # The requests reached the views, not only their checks: valid ones succeeded where ids need not exist.
    for label in ("POST /agents/register", "POST /agents/claim", "POST /agents/heartbeat", "POST /runs", "GET /runs"):
        assert statuses[label, "positive", "2xx"], (label, "\n".join(map(str, sorted(statuses.items()))))
    assert statuses["POST /agents/heartbeat", "negative", "4xx"]


def _fuzz(operation, mode, headers, base_url, statuses):
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    def check(case):
        response = case.call_and_validate(base_url=f"{base_url}/api/v1", headers=headers, checks=CHECKS, timeout=30)
        statuses[operation.label, str(mode), f"{response.status_code // 100}xx"] += 1

    check()
