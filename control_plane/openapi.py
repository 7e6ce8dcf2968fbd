"""The OpenAPI 3.1 description of /api/v1/, built from the endpoint registry (control_plane/api_spec.py):
the bodies and query parameters the views check, the answers and errors they declare."""

from __future__ import annotations

import re
from typing import Any

from control_plane import api_spec
from control_plane.api_spec import Endpoint

VERSION = "1.1.0"  # PROTOCOL.md v1.1 and this project's additions (README, "API")

ERROR_MEANINGS = {
    400: "malformed JSON, a wrong type or a value out of range (`detail` names the field)",
    401: "missing or unknown token",
    403: "the token is valid but not allowed (a disabled agent, a user without the permission)",
    404: "unknown id or name",
    409: "conflict: a stale attempt, a name taken, a state that forbids it",
    413: "body or upload too large",
    422: "well-formed but invalid (a DAG document: `detail` names the task keys and fields)",
    429: "too many failed authentications from this address (`Retry-After`)",
    503: "the database is unreachable (`Retry-After`); nothing was changed",
}
ERROR = {
    "type": "object",
    "required": ["error", "detail"],
    "properties": {
        "error": {"type": "string", "description": "a stable code: bad_request, not_found, stale_attempt, …"},
        "detail": {"type": "string", "description": "a sentence for a person"},
    },
}
SECURITY = {
    api_spec.ENROLLMENT: "An enrollment token: `POST /agents/register` only.",
    api_spec.AGENT: "An agent token, returned once by register.",
    api_spec.USER: "An API token of a user; the user's permissions apply.",
}
_PARAM = re.compile(r"<(?:(\w+):)?(\w+)>")


def openapi_path(route: str) -> str:
    return "/" + _PARAM.sub(r"{\2}", route)


def document(server_url: str = "/api/v1") -> dict:
    paths: dict[str, dict] = {}
    for e in api_spec.REGISTRY:
        paths.setdefault(openapi_path(e.route), {})[e.method.lower()] = _operation(e)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Control plane API",
            "version": VERSION,
            "description": 'PROTOCOL.md v1.1 with this project\'s additions (README, "API"). Every error is '
            '`{"error": code, "detail": sentence}`.',
        },
        "servers": [{"url": server_url}],
        "paths": paths,
        "components": {
            "schemas": {"Error": ERROR},
            "responses": {
                str(status): {
                    "description": meaning,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
                }
                for status, meaning in ERROR_MEANINGS.items()
            },
            "securitySchemes": {
                name: {"type": "http", "scheme": "bearer", "description": doc} for name, doc in SECURITY.items()
            },
        },
    }


def _operation(e: Endpoint) -> dict[str, Any]:
    summary, _, description = e.summary.partition("\n")
    op: dict[str, Any] = {
        "operationId": e.name,
        "tags": [e.tag],
        "summary": summary.strip() or e.name.replace("_", " "),
        "parameters": [_path_parameter(name) for _converter, name in _PARAM.findall(e.route)]
        + [q.parameter() for q in e.query],
        "responses": {str(status): _answer(status, schema) for status, schema in e.answers.items()},
        "security": [{e.auth: []}] if e.auth else [],
    }
    if description.strip():
        op["description"] = " ".join(description.split())
    for status in sorted({*e.errors, 503} | ({400, 413} if e.body is not None else set())):
        op["responses"][str(status)] = {"$ref": f"#/components/responses/{status}"}
    if e.auth:
        for status in (401, 429):
            op["responses"][str(status)] = {"$ref": f"#/components/responses/{status}"}
    body = _request_body(e)
    if body is not None:
        op["requestBody"] = body
    return op


def _path_parameter(name: str) -> dict:
    schema: dict[str, Any] = {"type": "string", "pattern": "^[^/]+$"}
    if name.endswith("_id"):
        schema = {"type": "string", "format": "uuid"}
    return {"name": name, "in": "path", "required": True, "schema": schema}


def _answer(status: int, schema: dict) -> dict:
    if "content" in schema:  # a download: its media type, no JSON
        return {"description": schema.get("description", "the content"),
                "content": {schema["content"]: {"schema": {"type": "string", "format": "binary"}}}}  # fmt: skip
    return {
        "description": schema.get("description", "OK"),
        "content": {"application/json": {"schema": schema}},
    }


def _request_body(e: Endpoint) -> dict | None:
    if e.body_kind == "multipart":
        return {
            "required": True,
            "content": {"multipart/form-data": {"schema": e.body_schema}},
        }
    if e.body_kind == "document":
        return {
            "required": True,
            "content": {"application/json": {"schema": e.body_schema}, "application/yaml": {"schema": e.body_schema}},
        }
    if e.body is None:
        return None
    return {"required": False, "content": {"application/json": {"schema": e.body.schema()}}}
