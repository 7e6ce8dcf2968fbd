"""The API declared once: each endpoint's body and query fields both check its requests (a 400 naming the
field) and are its OpenAPI 3.1 description (control_plane/openapi.py), so the two cannot drift apart.

A field is a small object: `parse` applies the same rule `schema` describes. An endpoint is a view registered
with `endpoint(...)`: its method and route, who may call it, its body, its query parameters, its answers and
the error statuses it gives. The URLs under /api/v1/ are built from this registry (`url_patterns`), so every
route is described and every description is routed."""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from django.http import JsonResponse
from django.urls import path

from control_plane.http_api import ApiError, api_view, json_body

API_PREFIX = "api/v1/"
JSON_LIMIT = 64 * 1024  # most bodies are small; an endpoint with larger ones says so

Bound = int | float | Callable[[], int | float]


def _resolve(bound: Any) -> Any:
    # Some bounds are settings (CP_MAX_WAIT_S): read when a request is checked or the schema is built.
    return bound() if callable(bound) else bound


class Field:
    """One named field. Absent and null are alike: the default, or a 400 when the field is required."""

    json_type: str = ""
    what: str = ""
    python_types: tuple[type, ...] = ()

    def __init__(self, name: str, *, required: bool = False, default: Any = None, doc: str = ""):
        self.name, self.required, self.default, self.doc = name, required, default, doc

    def parse(self, data: dict, prefix: str = "") -> Any:
        value = data.get(self.name)
        if value is None:
            if self.required:
                raise ApiError(400, "bad_request", f"'{prefix}{self.name}' is required")
            return self.default
        if isinstance(value, bool) and bool not in self.python_types or not isinstance(value, self.python_types):
            raise self.refusal(prefix, f"must be {self.what}")
        return self.check(value, prefix)

    def check(self, value: Any, prefix: str) -> Any:
        return value

    def refusal(self, prefix: str, says: str) -> ApiError:
        return ApiError(400, "bad_request", f"'{prefix}{self.name}' {says}")

    def schema(self) -> dict:
        out = {"type": self.json_type if self.required else [self.json_type, "null"], **self.constraints()}
        if self.doc:
            out["description"] = self.doc
        if self.default is not None:
            out["default"] = self.default
        return out

    def constraints(self) -> dict:
        return {}


class Int(Field):
    """A whole number; JSON does not tell 3 from 3.0, so neither does this (as JSON Schema's integer)."""

    json_type, what, python_types = "integer", "an integer", (int, float)

    def __init__(self, name: str, lo: Bound, hi: Bound, **kw: Any):
        super().__init__(name, **kw)
        self.lo, self.hi = lo, hi

    def check(self, value: Any, prefix: str) -> Any:
        if self.json_type == "integer" and isinstance(value, float):
            if not value.is_integer():
                raise self.refusal(prefix, f"must be {self.what}")
            value = int(value)
        lo, hi = _resolve(self.lo), _resolve(self.hi)
        if not lo <= value <= hi:
            raise self.refusal(prefix, f"must be from {lo} to {hi}")
        return value

    def constraints(self) -> dict:
        return {"minimum": _resolve(self.lo), "maximum": _resolve(self.hi)}


class Number(Int):
    json_type, what, python_types = "number", "a number", (int, float)


class Bool(Field):
    json_type, what, python_types = "boolean", "true or false", (bool,)

    def __init__(self, name: str, default: bool = False, **kw: Any):
        super().__init__(name, default=default, **kw)


class Str(Field):
    """A string of at most `max_len` characters; `choices` an enumeration; `pattern` (matched whole) or
    `convert` (raising ValueError) a shape, refused as "must be `shape`"."""

    json_type, what, python_types = "string", "a string", (str,)

    def __init__(
        self,
        name: str,
        max_len: Bound,
        *,
        choices: Iterable[str] | None = None,
        pattern: re.Pattern | None = None,
        convert: Callable[[str], Any] | None = None,
        shape: str = "",
        format: str = "",
        **kw: Any,
    ):
        super().__init__(name, **kw)
        self.max_len, self.choices = max_len, tuple(choices) if choices is not None else None
        self.pattern, self.convert, self.shape, self.format = pattern, convert, shape, format

    def check(self, value: Any, prefix: str) -> Any:
        max_len = _resolve(self.max_len)
        if len(value) > max_len:
            raise self.refusal(prefix, f"may be at most {max_len} characters")
        if self.choices is not None and value not in self.choices:
            raise self.refusal(prefix, f"must be one of {', '.join(self.choices)}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise self.refusal(prefix, f"must be {self.shape}")
        if self.convert is not None:
            try:
                return self.convert(value)
            except ValueError:
                raise self.refusal(prefix, f"must be {self.shape}") from None
        return value

    def constraints(self) -> dict:
        out: dict[str, Any] = {"maxLength": _resolve(self.max_len)}
        if self.choices is not None:
            out["enum"] = list(self.choices) + ([] if self.required else [None])
        if self.pattern is not None:
            out["pattern"] = f"^(?:{self.pattern.pattern})$"
        if self.format:
            out["format"] = self.format
        return out


class StrList(Field):
    json_type, what, python_types = "array", "a list of strings", (list,)

    def __init__(self, name: str, max_items: int, pattern: re.Pattern | None = None, default: list | None = None,
                 **kw: Any):  # fmt: skip
        super().__init__(name, default=default if default is not None else [], **kw)
        self.max_items, self.pattern = max_items, pattern

    def parse(self, data: dict, prefix: str = "") -> Any:
        value = super().parse(data, prefix)
        return list(value)  # never the shared default itself

    def check(self, value: Any, prefix: str) -> Any:
        if len(value) > self.max_items:
            raise self.refusal(prefix, f"may hold at most {self.max_items} items")
        for item in value:
            if not isinstance(item, str) or (self.pattern is not None and not self.pattern.fullmatch(item)):
                raise self.refusal(prefix, f"holds an invalid entry: {item!r}")
        return value

    def constraints(self) -> dict:
        items: dict[str, Any] = {"type": "string"}
        if self.pattern is not None:
            items["pattern"] = f"^(?:{self.pattern.pattern})$"
        return {"maxItems": self.max_items, "items": items}


class Obj(Field):
    """A JSON object: free-form, or checked by a `Body` of its own (its fields named `name.field`)."""

    json_type, what, python_types = "object", "an object", (dict,)

    def __init__(self, name: str, body: Body | None = None, **kw: Any):
        super().__init__(name, **kw)
        self.body = body

    def check(self, value: Any, prefix: str) -> Any:
        return self.body.parse(value, f"{prefix}{self.name}.") if self.body is not None else value

    def schema(self) -> dict:
        if self.body is None:
            return super().schema()
        inner = self.body.schema()
        out = inner if self.required else {"anyOf": [inner, {"type": "null"}]}
        return {**out, "description": self.doc} if self.doc else out


class StrMap(Field):
    """An object of strings (names to text values)."""

    json_type, what, python_types = "object", "an object of strings", (dict,)

    def check(self, value: Any, prefix: str) -> Any:
        if not all(isinstance(v, str) for v in value.values()):
            raise self.refusal(prefix, f"must be {self.what}")
        return value

    def constraints(self) -> dict:
        return {"additionalProperties": {"type": "string"}}


class ObjList(Field):
    """A list of objects, each checked by `body`."""

    json_type, what, python_types = "array", "a list", (list,)

    def __init__(self, name: str, body: Body, max_items: int, **kw: Any):
        super().__init__(name, **kw)
        self.body, self.max_items = body, max_items

    def check(self, value: Any, prefix: str) -> Any:
        if len(value) > self.max_items:
            raise self.refusal(prefix, f"may hold at most {self.max_items} items")
        out = []
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                raise ApiError(400, "bad_request", f"'{prefix}{self.name}[{i}]' must be an object")
            out.append(self.body.parse(item, f"{prefix}{self.name}[{i}]."))
        return out

    def constraints(self) -> dict:
        return {"maxItems": self.max_items, "items": self.body.schema()}


class Body:
    """A JSON object's declared fields. `parse` gives each field's checked value (or default) by name; fields
    it does not declare are ignored, as PROTOCOL.md's "old agents still work" needs."""

    def __init__(self, *fields: Field, doc: str = ""):
        self.fields, self.doc = fields, doc

    def parse(self, data: dict, prefix: str = "") -> dict[str, Any]:
        return {f.name: f.parse(data, prefix) for f in self.fields}

    def schema(self) -> dict:
        out: dict[str, Any] = {"type": "object", "properties": {f.name: f.schema() for f in self.fields}}
        required = [f.name for f in self.fields if f.required]
        if required:
            out["required"] = required
        if self.doc:
            out["description"] = self.doc
        return out


# Query parameters: text, so a number is checked as digits first.
class Query:
    def __init__(self, name: str, doc: str = "", *, repeat: bool = False):
        self.name, self.doc, self.repeat = name, doc, repeat

    def parse(self, query) -> Any:
        if self.repeat:
            return query.getlist(self.name)
        return self.check(query.get(self.name) or None)

    def check(self, text: str | None) -> Any:
        return text

    def schema(self) -> dict:
        return {"type": "array", "items": {"type": "string"}} if self.repeat else {"type": "string"}

    def parameter(self) -> dict:
        out = {"name": self.name, "in": "query", "required": False, "schema": self.schema()}
        if self.doc:
            out["description"] = self.doc
        if self.repeat:
            out["explode"] = True
        return out


class QueryInt(Query):
    def __init__(self, name: str, lo: int, hi: int | None, default: int | None = None, doc: str = ""):
        super().__init__(name, doc)
        self.lo, self.hi, self.default = lo, hi, default

    def check(self, text: str | None) -> Any:
        if text is None:
            return self.default
        if not text.isascii() or not text.isdigit() or not self.lo <= int(text) <= (self.hi or int(text)):
            upto = f"from {self.lo} to {self.hi}" if self.hi is not None else f"a whole number >= {self.lo}"
            raise ApiError(400, "bad_request", f"'{self.name}' must be {upto}")
        return int(text)

    def schema(self) -> dict:
        out: dict[str, Any] = {"type": "integer", "minimum": self.lo}
        if self.hi is not None:
            out["maximum"] = self.hi
        if self.default is not None:
            out["default"] = self.default
        return out


class QueryChoice(Query):
    def __init__(self, name: str, choices: Iterable[str], doc: str = ""):
        super().__init__(name, doc)
        self.choices = tuple(choices)

    def check(self, text: str | None) -> Any:
        if text is not None and text not in self.choices:
            raise ApiError(400, "bad_request", f"'{self.name}' must be one of {', '.join(self.choices)}")
        return text

    def schema(self) -> dict:
        return {"type": "string", "enum": list(self.choices)}


# Who may call an endpoint: OpenAPI security schemes, all bearer tokens (PROTOCOL.md "Tokens").
ENROLLMENT, AGENT, USER, PUBLIC = "enrollmentToken", "agentToken", "apiToken", None


@dataclass
class Endpoint:
    method: str
    route: str  # Django's route below /api/v1/: "runs/<str:run_id>/cancel"
    view: Callable
    auth: str | None
    summary: str
    tag: str
    answers: dict[int, dict]  # status → JSON Schema of the answer (a non-JSON answer: {"content": type})
    errors: tuple[int, ...]
    body: Body | None = None
    body_kind: str = "json"  # json, multipart, document (JSON or YAML)
    body_schema: dict | None = None  # where the body is checked by its own code (a DAG document)
    query: tuple[Query, ...] = ()
    name: str = field(default="")


REGISTRY: list[Endpoint] = []


def endpoint(
    method: str,
    route: str,
    *,
    auth: str | None,
    tag: str,
    answers: dict[int, dict],
    errors: Iterable[int] = (),
    body: Body | None = None,
    limit: int | Callable[[], int] | None = JSON_LIMIT,
    body_kind: str = "json",
    body_schema: dict | None = None,
    query: Iterable[Query] = (),
):
    """Register an async view. A JSON `body` reaches it checked, as the keyword `body`; `query` parameters as
    `query` (a dict by name). A view that reads its own body (a document, an upload) gives `limit=None`."""
    query = tuple(query)

    def register(view: Callable) -> Callable:
        @functools.wraps(view)
        async def checked(request, **kwargs):
            if body is not None:
                kwargs["body"] = body.parse(json_body(request, _resolve(limit)))
            elif limit is not None:
                json_body(request, _resolve(limit))  # a body it ignores must still be JSON
            if query:
                kwargs["query"] = {q.name: q.parse(request.GET) for q in query}
            return await view(request, **kwargs)

        wrapped = api_view(checked)
        summary = (view.__doc__ or "").strip()
        REGISTRY.append(
            Endpoint(method, route, wrapped, auth, summary, tag, answers, tuple(errors), body, body_kind,
                     body_schema, query, name=view.__name__)
        )  # fmt: skip
        return wrapped

    return register


def url_patterns() -> list:
    """One URL per route, dispatching by method (a method not declared: 405 in PROTOCOL.md's shape)."""
    by_route: dict[str, dict[str, Callable]] = {}
    for e in REGISTRY:
        by_route.setdefault(e.route, {})[e.method] = e.view
    return [path(API_PREFIX + route, _dispatch(methods)) for route, methods in by_route.items()]


def _dispatch(methods: dict[str, Callable]) -> Callable:
    allowed = " or ".join(sorted(methods))

    async def view(request, **kwargs):
        handler = methods.get(request.method)
        if handler is None:
            response = JsonResponse({"error": "method_not_allowed", "detail": f"use {allowed}"}, status=405)
            response["Allow"] = ", ".join(sorted(methods))
            return response
        return await handler(request, **kwargs)

    view.csrf_exempt = True  # token-authenticated, never cookie-authenticated
    view.__name__ = "api_" + "_".join(sorted(m.__name__ for m in methods.values()))
    return view


# JSON Schema shorthands for the answers.
STR = {"type": "string"}
INT = {"type": "integer"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}
UUID = {"type": "string", "format": "uuid"}
TIME = {"type": "string", "format": "date-time"}
OBJECT = {"type": "object"}


def nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def array(items: dict) -> dict:
    return {"type": "array", "items": items}


def obj(required: dict | None = None, optional: dict | None = None, doc: str = "") -> dict:
    """An object with these properties (`required` always present); others may be added in later versions."""
    props = {**(required or {}), **(optional or {})}
    out: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        out["required"] = list(required)
    if doc:
        out["description"] = doc
    return out


def enum(*values: Any) -> dict:
    return {"enum": list(values)}
