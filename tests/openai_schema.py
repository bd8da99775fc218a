"""Validate our responses against OpenAI's published OpenAPI spec (../shared/openai).

The spec is OpenAPI 3.0 (`nullable: true`); it is converted to JSON Schema (`anyOf [..., null]`)
once per test session.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC = Path(__file__).resolve().parents[2] / "shared" / "openai" / "openapi.yaml"


def _convert(node: Any) -> Any:
    if isinstance(node, list):
        return [_convert(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _convert(v) for k, v in node.items() if k not in {"nullable", "x-oaiMeta", "example", "examples"}}
    if node.get("nullable"):
        return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def _components() -> dict[str, Any]:
    if not SPEC.exists():
        raise FileNotFoundError(f"OpenAI's spec is expected at {SPEC} (../shared beside the checkout)")
    with open(SPEC) as f:
        spec = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    return _convert({"components": spec["components"]})


@functools.cache
def _registry() -> Registry:
    return Registry().with_resource(
        "urn:openai", Resource.from_contents(_components(), default_specification=DRAFT202012)
    )


def validate(instance: Any, schema_name: str) -> None:
    """Raise jsonschema.ValidationError unless `instance` is a valid OpenAI `schema_name`."""
    registry = _registry()
    schema = {"$ref": f"urn:openai#/components/schemas/{schema_name}"}
    jsonschema.Draft202012Validator(schema, registry=registry).validate(instance)
