"""The OpenAPI description (control_plane/openapi.py) from the endpoint registry (control_plane/api_spec.py):
every route described, every description routed, and each body field refusing exactly what its schema
refuses: the description is the checking code's, not a copy written beside it."""

from __future__ import annotations

import re

import jsonschema_rs
import pytest
import schemathesis
from django.urls import get_resolver

from control_plane import api_spec, openapi
from control_plane import urls as _urls  # noqa: F401  (the API modules declare their endpoints on import)
from control_plane.api_spec import Body, Bool, Int, Number, Obj, ObjList, Str, StrList, StrMap
from control_plane.http_api import ApiError


def api_routes() -> set[str]:
    """The /api/v1/ routes Django resolves, in OpenAPI's spelling."""
    out = set()
    for pattern in get_resolver().url_patterns:
        route = str(pattern.pattern)
        if route.startswith(api_spec.API_PREFIX):
            out.add(openapi.openapi_path(route.removeprefix(api_spec.API_PREFIX)))
    return out


def test_every_api_route_is_described_and_every_description_is_routed():
    described = set(openapi.document()["paths"])
    assert api_routes() == described
    assert {"/agents/claim", "/runs", "/runs/{run_id}", "/tasks/{task_id}/log", "/openapi.json"} <= described


def test_every_operation_names_its_token_answers_and_errors():
    doc = openapi.document()
    schemes = set(doc["components"]["securitySchemes"])
    public = {("get", "/health"), ("get", "/openapi.json")}
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            assert op["summary"] and op["operationId"], (method, path)
            assert any(s.startswith("2") for s in op["responses"]), (method, path)
            if (method, path) in public:
                assert op["security"] == []
                continue
            (scheme,) = (name for s in op["security"] for name in s)
            assert scheme in schemes
            assert {"401", "429", "503"} <= set(op["responses"]), (method, path)
            if "requestBody" in op:
                assert "400" in op["responses"] or "413" in op["responses"], (method, path)


def test_schemathesis_loads_every_operation_of_the_description():
    doc = openapi.document()
    schema = schemathesis.openapi.from_dict(doc)
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert labels == {f"{m.upper()} {p}" for p, methods in doc["paths"].items() for m in methods}


def test_the_dag_documents_schema_describes_every_field_the_parser_knows():
    from tasks_app import dag

    schema = dag.document_schema()
    assert set(schema["properties"]) == dag.DOC_FIELDS
    assert set(schema["properties"]["tasks"]["items"]["properties"]) == dag.TASK_FIELDS
    assert schema["properties"]["tasks"]["items"]["properties"]["executor"]["enum"] == list(dag.EXECUTORS)
    claude = schema["properties"]["tasks"]["items"]["properties"]["params"]["properties"]
    assert claude["permission_mode"]["enum"] == ["acceptEdits", "default", "plan", "dontAsk", "bypassPermissions"]
    valid = {"name": "d", "tasks": [{"key": "a", "command": "true"}, {"key": "b", "executor": "claude", "prompt": "x"}]}
    dag.parse_document(valid)
    assert jsonschema_rs.validator_for(schema).is_valid(valid)
    for bad in ({"name": "d", "tasks": [{"key": "a"}]},  # a shell task without a command
                {"name": "d", "tasks": [{"key": "a", "executor": "codex", "command": "x"}]},  # no prompt
                {"name": "d", "tasks": [{"key": "a b", "command": "x"}]},
                {"name": "d", "tasks": [{"key": "a", "command": "x", "max_attempts": 0}]},
                {"name": "d", "tasks": [{"key": "a", "command": "x"}], "colour": "red"}):  # fmt: skip
        with pytest.raises(dag.DagError):
            dag.parse_document(bad)
        assert not jsonschema_rs.validator_for(schema).is_valid(bad), bad


# Each field's edge values: the bounds, just past them, other types, null.
def candidates(field) -> list:
    common = [None, True, 0, 1.5, "text", [], {}, ["a"]]
    if isinstance(field, Int):
        lo, hi = api_spec._resolve(field.lo), api_spec._resolve(field.hi)
        return common + [lo, hi, lo - 1, hi + 1, (lo + hi) / 2 + 0.5, int(lo + hi) // 2]
    if isinstance(field, Str):
        n = api_spec._resolve(field.max_len)
        sample = ["", "a", "x" * n, "x" * (n + 1), "bad name", "ok-name", "a" * 40, "0" * 64]
        return common + sample + list(field.choices or ()) + ["d3b07384-d113-4ec6-a1f5-2a7d3e0f2c11"]
    if isinstance(field, StrList):
        return common + [["ok"], ["bad name"], [1], ["a"] * (field.max_items + 1), ["a"] * field.max_items]
    if isinstance(field, StrMap):
        return common + [{"a": "b"}, {"a": 1}]
    if isinstance(field, Obj) and field.body is not None:
        return common + [{f.name: v} for f in field.body.fields for v in candidates(f)]
    if isinstance(field, ObjList):
        return common + [[{}], [1], [{f.name: v} for f in field.body.fields for v in candidates(f)][:3]]
    return common


def valid_value(field):
    """A value the field accepts, for the required fields beside the one under test."""
    for value in candidates(field):
        if value is None:
            continue
        try:
            field.parse({field.name: value})
            return value
        except ApiError:
            pass
    raise AssertionError(f"no accepted candidate for {field.name}")


def bodies() -> list[tuple[str, Body]]:
    return [(f"{e.method} {e.route}", e.body) for e in api_spec.REGISTRY if e.body is not None]


@pytest.mark.parametrize(("label", "body"), bodies(), ids=[label for label, _ in bodies()])
def test_a_body_refuses_exactly_what_its_schema_refuses(label, body):
    schema = body.schema()
    validator = jsonschema_rs.validator_for(schema, validate_formats=True)
    required = {f.name: valid_value(f) for f in body.fields if f.required}
    tried = 0
    for field in body.fields:
        for value in candidates(field):
            data = {**required, field.name: value}
            try:
                body.parse(data)
                accepted = True
            except ApiError as exc:
                assert exc.status == 400 and exc.code == "bad_request"
                assert re.search(rf"'{re.escape(field.name)}|'\w+\.", exc.detail), exc.detail  # it names the field
                accepted = False
            assert accepted == validator.is_valid(data), f"{label} {field.name}={value!r:.80}: parse says {accepted}"
            tried += 1
    assert tried >= 8 * len(body.fields)


def test_a_refusal_names_the_nested_field():
    body = Body(Obj("usage", Body(Int("input_tokens", 0, 10, default=0))), Bool("first"), Number("n", 0, 1))
    with pytest.raises(ApiError, match=r"'usage.input_tokens' must be from 0 to 10"):
        body.parse({"usage": {"input_tokens": 11}})
    files = Body(ObjList("files", Body(Str("path", 10, required=True)), 5))
    with pytest.raises(ApiError, match=r"'files\[1\].path' is required"):
        files.parse({"files": [{"path": "a"}, {}]})
    assert body.parse({}) == {"usage": None, "first": False, "n": None}


def test_a_method_not_declared_is_405_naming_the_allowed_ones(client):
    answer = client.put("/api/v1/runs")
    assert answer.status_code == 405
    assert answer.json() == {"error": "method_not_allowed", "detail": "use GET or POST"}
    assert answer["Allow"] == "GET, POST"


def test_the_description_is_served_without_a_token(client):
    answer = client.get("/api/v1/openapi.json")
    assert answer.status_code == 200
    assert answer.json()["openapi"] == "3.1.0"
    assert answer.json()["paths"] == openapi.document()["paths"]


def test_the_reference_page_needs_a_login_and_shows_every_operation(client, django_user_model):
    assert client.get("/docs/api/").status_code == 302
    user = django_user_model.objects.create_user("vera", password=None)
    client.force_login(user)
    page = client.get("/docs/api/").content.decode()
    for path, methods in openapi.document()["paths"].items():
        for op in methods.values():
            assert f'id="{op["operationId"]}"' in page, path
    assert "<script" not in page.split("<body", 1)[1]  # rendered on the server
    assert "usage.input_tokens" in page  # nested body fields are listed
