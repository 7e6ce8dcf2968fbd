"""The API's reference page (/docs/api/): the OpenAPI description (control_plane/openapi.py) rendered on the
server as plain HTML: no script, no third-party renderer, the Content-Security-Policy unchanged."""

from __future__ import annotations

import json
import re
from typing import Any

from django.contrib.auth.decorators import login_required
from django.shortcuts import render
from django.utils.html import escape
from django.utils.safestring import SafeString, mark_safe

from control_plane import openapi

TAG_ORDER = ("runs", "tasks", "agents", "fleet", "service")
MAX_DEPTH = 4  # nested objects listed as `usage.model`; deeper ones are named, not expanded


def inline(text: str) -> SafeString:
    """A description's `code` as <code>, everything else escaped."""
    return mark_safe(re.sub(r"`([^`]+)`", r"<code>\1</code>", escape(text)))  # escaped first: safe


def describe(schema: dict) -> str:
    """A JSON Schema in a few words: `integer, 1–64`, `string ≤ 64, one of idle, busy`."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        kinds = [describe(s) for s in schema["anyOf"] if s.get("type") != "null"]
        return " | ".join(kinds) + (" or null" if len(kinds) < len(schema["anyOf"]) else "")
    kind = schema.get("type", "any")
    words = " or ".join(kind) if isinstance(kind, list) else kind
    if kind == "array" and "items" in schema:
        words = f"list of {describe(schema['items'])}"
    rules = []
    if "minimum" in schema or "maximum" in schema:
        rules.append(f"{schema.get('minimum', '…')}–{schema.get('maximum', '…')}")
    if "exclusiveMinimum" in schema:
        rules.append(f"> {schema['exclusiveMinimum']}")
    if "maxLength" in schema:
        rules.append(f"≤ {schema['maxLength']} chars")
    if "maxItems" in schema:
        rules.append(f"≤ {schema['maxItems']} items")
    if "enum" in schema:
        rules.append("one of " + ", ".join("null" if v is None else str(v) for v in schema["enum"]))
    if "pattern" in schema:
        rules.append(f"matches {schema['pattern']}")
    if "format" in schema:
        rules.append(schema["format"])
    if "default" in schema:
        rules.append(f"default {json.dumps(schema['default'])}")
    return ", ".join([words, *rules]) if words != "any" or rules else "any JSON"


def fields(schema: dict, prefix: str = "", depth: int = 0) -> list[dict[str, Any]]:
    """An object schema's properties as rows, nested objects and lists of objects flattened below."""
    schema = _object_of(schema)
    if schema is None:
        return []
    required = set(schema.get("required", ()))
    rows = []
    for name, sub in schema.get("properties", {}).items():
        rows.append({"name": prefix + name, "kind": describe(sub), "required": name in required,
                     "doc": inline(sub.get("description", ""))})  # fmt: skip
        if depth < MAX_DEPTH:
            items = sub.get("items")
            if items is not None and _object_of(items):
                rows += fields(items, f"{prefix}{name}[].", depth + 1)
            elif _object_of(sub):
                rows += fields(sub, f"{prefix}{name}.", depth + 1)
    return rows


def _object_of(schema: dict) -> dict | None:
    for candidate in [schema, *schema.get("anyOf", ())]:
        if candidate.get("properties"):
            return candidate
    return None


def operations(doc: dict) -> list[dict]:
    out = []
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            body = op.get("requestBody", {}).get("content", {})
            media, body_schema = next(iter(body.items()), (None, {"schema": {}}))
            answers = []
            for status, answer in op["responses"].items():
                if "$ref" in answer:
                    answer = doc["components"]["responses"][status]
                    answers.append({"status": status, "doc": inline(answer["description"]), "fields": []})
                    continue
                content = next(iter(answer["content"].values()))
                answers.append({"status": status, "doc": answer["description"], "fields": fields(content["schema"])})
            out.append({
                "id": op["operationId"], "method": method.upper(), "path": path, "tag": op["tags"][0],
                "summary": inline(op["summary"]), "description": inline(op.get("description", "")),
                "auth": ", ".join(k for s in op["security"] for k in s) or "none",
                "parameters": [{"name": p["name"], "in": p["in"], "kind": describe(p["schema"]),
                                "doc": inline(p.get("description", ""))} for p in op["parameters"]],
                "media": ", ".join(body) if body else "", "body": fields(body_schema["schema"]),
                "answers": answers,
            })  # fmt: skip
    return out


@login_required
def api_page(request):
    doc = openapi.document()
    ops = operations(doc)
    tags = sorted({op["tag"] for op in ops}, key=lambda t: TAG_ORDER.index(t) if t in TAG_ORDER else len(TAG_ORDER))
    sections = [{"tag": tag, "operations": [op for op in ops if op["tag"] == tag]} for tag in tags]
    info = {**doc["info"], "description": inline(doc["info"]["description"])}
    schemes = {name: inline(scheme["description"]) for name, scheme in doc["components"]["securitySchemes"].items()}
    errors = {status: inline(error["description"]) for status, error in doc["components"]["responses"].items()}
    context = {"page": "api", "info": info, "sections": sections, "schemes": schemes, "errors": errors}
    return render(request, "api/reference.html", context)
