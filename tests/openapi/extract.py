"""Regenerate tests/openapi/chat_schemas.json from OpenAI's official OpenAPI spec.

Not run by the tests; needs PyYAML. Usage:

    python tests/openapi/extract.py path/to/openai-openapi.yaml [out.json]

Takes the schemas the gateway's tests validate against, plus every schema they reach through
``$ref``, and writes them as one standalone JSON Schema (draft 2020-12) document with a
``$defs`` layout, so ``jsonschema`` resolves everything offline. OpenAPI-isms are converted on
the way: ``nullable: true`` becomes a ``"null"`` type (or ``anyOf [..., null]`` around a
``$ref``/composition), ``x-*`` vendor keys are dropped (they carry megabytes of docs),
``discriminator`` is dropped (it is not JSON Schema; the branches still discriminate by their
``type`` enums), and draft 2019-09 ``$recursiveRef: "#"`` becomes a plain ``$ref`` to its own
definition.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

ROOTS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "ListModelsResponse",
    "Model",
    "ErrorResponse",
    # Responses API, for serving /v1/responses later.
    "Response",
    "ResponseStreamEvent",
    # Embeddings and legacy completions (#15).
    "CreateEmbeddingResponse",
    "CreateCompletionResponse",
    # The request, for the test that sends each of its nullable fields as null.
    "CreateChatCompletionRequest",
)
REF_PREFIX = "#/components/schemas/"
DROPPED_KEYS = {"discriminator", "nullable", "$recursiveAnchor"}
DRAFT = "https://json-schema.org/draft/2020-12/schema"


class _Loader(yaml.CSafeLoader if hasattr(yaml, "CSafeLoader") else yaml.SafeLoader):  # type: ignore[misc]
    """SafeLoader that keeps dates as strings, as a JSON parser would."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def refs_in(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                if not value.startswith(REF_PREFIX):
                    raise ValueError(f"unexpected $ref {value!r}")
                found.add(value[len(REF_PREFIX) :])
            elif not key.startswith("x-"):
                found |= refs_in(value)
    elif isinstance(node, list):
        for item in node:
            found |= refs_in(item)
    return found


def closure(schemas: dict[str, Any], roots: tuple[str, ...]) -> list[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(refs_in(schemas[name]) - seen)
    return sorted(seen)


def convert(node: Any, name: str) -> Any:
    """OpenAPI 3.x schema ``name`` -> JSON Schema 2020-12 (recursively)."""
    if isinstance(node, list):
        return [convert(item, name) for item in node]
    if not isinstance(node, dict):
        return node
    out = {
        key: convert(value, name)
        for key, value in node.items()
        if not key.startswith("x-") and key not in DROPPED_KEYS
    }
    if "$ref" in out:
        out["$ref"] = "#/$defs/" + out["$ref"][len(REF_PREFIX) :]
    if out.pop("$recursiveRef", None) == "#":  # draft 2019-09 self-recursion
        out["$ref"] = f"#/$defs/{name}"
    if node.get("nullable") is True:
        out = nullable(out)
    return out


def nullable(schema: dict[str, Any]) -> dict[str, Any]:
    kind = schema.get("type")
    if isinstance(kind, str) and not any(k in schema for k in ("$ref", "anyOf", "oneOf", "allOf")):
        schema["type"] = [kind, "null"]
        if "enum" in schema and None not in schema["enum"]:
            schema["enum"] = [*schema["enum"], None]
        return schema
    if isinstance(kind, list):
        if "null" not in kind:
            schema["type"] = [*kind, "null"]
        if "enum" in schema and None not in schema["enum"]:
            schema["enum"] = [*schema["enum"], None]
        return schema
    # $ref or composition: wrap, keeping the annotations outside.
    notes = {k: schema.pop(k) for k in ("description", "title", "default") if k in schema}
    return {**notes, "anyOf": [schema, {"type": "null"}]}


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print(__doc__, file=sys.stderr)
        return 2
    source = Path(argv[1])
    target = Path(argv[2]) if len(argv) == 3 else Path(__file__).with_name("chat_schemas.json")
    spec = yaml.load(source.read_text(encoding="utf-8"), Loader=_Loader)  # noqa: S506 - safe loader
    schemas = spec["components"]["schemas"]
    names = closure(schemas, ROOTS)
    document = {
        "$schema": DRAFT,
        "$comment": (
            f"Extracted by tests/openapi/extract.py from OpenAI's openapi.yaml "
            f"(openapi {spec['openapi']}, info.version {spec['info']['version']}); do not edit."
        ),
        "roots": list(ROOTS),
        "$defs": {name: convert(schemas[name], name) for name in names},
    }
    text = json.dumps(document, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    target.write_text(text, encoding="utf-8")
    print(f"{target}: {len(names)} schemas, {len(text.encode())} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
