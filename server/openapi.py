"""The OpenAPI 3.1 document, derived from the route table and the msgspec wire
types (one ``schema_components`` call), never written by hand."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from starlette.routing import Route

from .schemas import WIRE_TYPES, ErrorResponse
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
    multipart: bool = False  # the body may also come as multipart/form-data
    admin: bool = False
    statuses: tuple[int, ...] = (400, 404)
    extra: dict[str, Any] = field(default_factory=dict)


def route(path: str, endpoint: Callable[..., Any], methods: list[str], doc: Doc, **kw: Any) -> Route:
    r = Route(path, endpoint, methods=methods, **kw)
    r.doc = doc  # type: ignore[attr-defined]
    return r


def _ref(t: type) -> dict[str, str]:
    return {"$ref": REF.format(name=t.__name__)}


def build_document(routes: list[Any], extra_types: tuple[type, ...] = ()) -> dict[str, Any]:
    types = tuple(dict.fromkeys(WIRE_TYPES + extra_types))
    _, components = msgspec.json.schema_components(types, ref_template=REF)
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        doc: Doc | None = getattr(r, "doc", None)
        if doc is None:
            continue
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
                ok = {"content": {doc.content: {"schema": _ref(doc.response)}}}
            elif doc.content == "application/json":
                ok = {"content": {"application/json": {"schema": {"type": "object"}}}}
            else:
                ok = {"content": {doc.content: {"schema": {"type": "string", "format": "binary"}}}}
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
