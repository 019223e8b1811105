"""The OpenAPI 3.1 document, derived from the route table and the msgspec wire
types (one ``schema_components`` call), never written by hand.

The components are exactly the types the routes name (bodies, responses, other media
types of a response, and the error body), so every ``$ref`` resolves by construction."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.routing import Route

from .schemas import ErrorResponse
from .version import __version__

REF = "#/components/schemas/{name}"


@dataclass(frozen=True)
class Param:
    name: str
    type: str = "string"
    description: str = ""
    required: bool = False
    location: str = "query"


@dataclass
class Doc:
    summary: str
    body: type | None = None
    response: type | None = None
    params: tuple[Param, ...] = ()
    tags: tuple[str, ...] = ()
    content: str = "application/json"  # response media type
    many: bool = False  # the response is a JSON array of ``response``
    multipart: bool = False  # the body may also come as multipart/form-data
    admin: bool = False
    statuses: tuple[int, ...] = (400, 404)
    extra: dict[str, Any] = field(default_factory=dict)
    # other media types of the 200 answer: media type -> the types it may carry (one of them)
    alternatives: dict[str, tuple[type, ...]] = field(default_factory=dict)

    def types(self) -> tuple[type, ...]:
        """Every wire type this operation names."""
        named = (self.body, self.response, *(t for ts in self.alternatives.values() for t in ts))
        return tuple(t for t in named if t is not None)


def route(path: str, endpoint: Callable[..., Any], methods: list[str], doc: Doc, **kw: Any) -> Route:
    r = Route(path, endpoint, methods=methods, **kw)
    r.doc = doc  # type: ignore[attr-defined]
    return r


def _ref(t: type) -> dict[str, str]:
    return {"$ref": REF.format(name=t.__name__)}


def _one_of(types: tuple[type, ...]) -> dict[str, Any]:
    return _ref(types[0]) if len(types) == 1 else {"oneOf": [_ref(t) for t in types]}


def documented(routes: list[Any]) -> list[tuple[Any, Doc]]:
    return [(r, r.doc) for r in routes if getattr(r, "doc", None) is not None]


def build_document(routes: list[Any]) -> dict[str, Any]:
    docs = documented(routes)
    types = tuple(dict.fromkeys(t for _, doc in docs for t in (*doc.types(), ErrorResponse)))
    _, components = msgspec.json.schema_components(types, ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for r, doc in docs:
        for method in sorted(m for m in r.methods or () if m != "HEAD"):
            op: dict[str, Any] = {
                "summary": doc.summary,
                "operationId": f"{method.lower()}_{r.path.strip('/').replace('/', '_').replace('{', '').replace('}', '') or 'root'}",
                "tags": list(doc.tags),
                "parameters": [
                    {
                        "name": p.name,
                        "in": "path" if "{" + p.name + "}" in r.path else p.location,
                        "required": p.required or "{" + p.name + "}" in r.path,
                        "description": p.description,
                        "schema": {"type": p.type},
                    }
                    for p in doc.params
                ],
                "responses": {},
            }
            if doc.body is not None:
                content = {"application/json": {"schema": _ref(doc.body)}}
                if doc.multipart:
                    content["multipart/form-data"] = {"schema": {"type": "object", "description": "The same fields as form fields; images as files."}}
                op["requestBody"] = {"required": True, "content": content}
            if doc.response is not None:
                schema = {"type": "array", "items": _ref(doc.response)} if doc.many else _ref(doc.response)
                ok = {"content": {doc.content: {"schema": schema}}}
            elif doc.content == "application/json":
                ok = {"content": {"application/json": {"schema": {"type": "object"}}}}
            else:
                ok = {"content": {doc.content: {"schema": {"type": "string", "format": "binary"}}}}
            for media, alternatives in doc.alternatives.items():
                ok["content"][media] = {"schema": _one_of(alternatives)}
            op["responses"]["200"] = {"description": "OK", **ok}
            for status in doc.statuses:
                op["responses"][str(status)] = {
                    "description": "Error",
                    "content": {"application/json": {"schema": _ref(ErrorResponse)}},
                }
            if doc.admin:
                op["security"] = [{"bearer": []}]
            op.update(doc.extra)
            paths.setdefault(r.path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "easel",
            "version": __version__,
            "description": "Self-hosted image-generation job server: priority queue, forecasts, live progress.",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
