"""The live /openapi.json is a valid OpenAPI 3.1 document whose every $ref resolves."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from openapi_spec_validator import validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from referencing.exceptions import Unresolvable

from .servers import RunningServer, stub_settings


@pytest.fixture(scope="module")
def document(server_factory: Any) -> dict[str, Any]:
    srv: RunningServer = server_factory(stub_settings())
    doc: dict[str, Any] = srv.client.get("/openapi.json").json()
    return doc


def refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref" and isinstance(v, str):
                yield v
            else:
                yield from refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from refs(v)


def test_the_document_validates_as_openapi_3_1(document: dict[str, Any]) -> None:
    assert document["openapi"].startswith("3.1")
    validate(document)  # raises on any schema error or unresolvable $ref


def test_every_ref_resolves_and_every_component_is_used(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    used = {ref.removeprefix("#/components/schemas/") for ref in refs(document)}
    assert all(ref.startswith("#/components/schemas/") for ref in refs(document))
    assert used - set(schemas) == set(), "refs to missing components"
    assert set(schemas) - used == set(), "components no route names"
    assert "PngInfoResponse" in schemas and "ImageBase64" in schemas and "PartialImageEvent" in schemas


def test_the_sdapi_routes_are_documented_under_their_own_tag(document: dict[str, Any]) -> None:
    txt2img = document["paths"]["/sdapi/v1/txt2img"]["post"]
    assert txt2img["tags"] == ["sdapi"]
    assert txt2img["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/SdTxt2ImgRequest")
    models = document["paths"]["/sdapi/v1/sd-models"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert models == {"type": "array", "items": {"$ref": "#/components/schemas/SdModel"}}


def test_the_validator_catches_a_missing_component(document: dict[str, Any]) -> None:
    """The check above could fail: drop one component and the validator says so."""
    broken = {**document, "components": {**document["components"], "schemas": dict(document["components"]["schemas"])}}
    del broken["components"]["schemas"]["PngInfoResponse"]
    with pytest.raises((OpenAPIValidationError, Unresolvable)):
        validate(broken)
