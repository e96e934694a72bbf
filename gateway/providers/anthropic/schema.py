"""JSON Schemas as Anthropic takes them: tool `input_schema` and structured-output schemas.

Tool schemas must describe an object. Structured output (`output_config.format`) accepts a
strict subset: every object closed (`additionalProperties: false`), a few string formats, and
`minItems` of 0 or 1 only; keywords outside it are folded into the description so the model may
still follow them (what Anthropic's own SDK does before sending a schema).
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Raw

from gateway.errors import InvalidRequest
from gateway.schemas.codec import encode

__all__ = ["object_schema", "strict_schema"]

_STRING_FORMATS = frozenset(
    {"date-time", "time", "date", "duration", "email", "hostname", "uri", "ipv4", "ipv6", "uuid"}
)
_MAX_DEPTH = 64


def _decode(raw: Raw, param: str) -> dict[str, Any]:
    try:
        value = msgspec.json.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        value = None
    if not isinstance(value, dict):
        raise InvalidRequest(
            f"Invalid value for '{param}': expected a JSON schema object.", param=param
        )
    return value


def object_schema(raw: Raw, param: str) -> tuple[Raw, bool]:
    """A schema Anthropic accepts as a tool's `input_schema`, and whether it had to be wrapped.

    An object schema passes unchanged; one that names no type becomes an object; any other
    root (an array, a string...) is wrapped as `{"values": <schema>}`, which the answer must
    unwrap again.
    """
    schema = _decode(raw, param)
    kind = schema.get("type")
    if kind == "object":
        return raw, False
    if kind is None and not {"anyOf", "oneOf", "allOf", "enum", "const", "$ref"} & schema.keys():
        return Raw(encode({"type": "object", **schema})), False
    wrapped = {"type": "object", "properties": {"values": schema}, "required": ["values"]}
    return Raw(encode(wrapped)), True


def strict_schema(raw: Raw, param: str) -> Raw:
    """The schema in the strict form Anthropic's structured output takes."""
    return Raw(encode(_strict(_decode(raw, param), param, 0)))


def _strict(node: dict[str, Any], param: str, depth: int) -> dict[str, Any]:
    if depth > _MAX_DEPTH:
        raise InvalidRequest(
            f"Invalid value for '{param}': the schema is nested too deeply.", param=param
        )
    rest = dict(node)
    out: dict[str, Any] = {}

    def sub(value: object) -> dict[str, Any]:
        return _strict(value if isinstance(value, dict) else {}, param, depth + 1)

    if isinstance(defs := rest.pop("$defs", None), dict):
        out["$defs"] = {name: sub(d) for name, d in defs.items()}
    if "$ref" in rest:
        out["$ref"] = rest.pop("$ref")
        return out
    kind = rest.pop("type", None)
    for key in ("anyOf", "oneOf", "allOf"):
        members = rest.pop(key, None)
        if isinstance(members, list):
            out["allOf" if key == "allOf" else "anyOf"] = [sub(m) for m in members]
    if isinstance(kind, list):  # ["string", "null"] is an anyOf of the two
        branches = [{"type": "null"} if k == "null" else {**rest, "type": k} for k in kind]
        out.setdefault("anyOf", [sub(b) for b in branches])
        rest = {k: v for k, v in rest.items() if k in ("description", "title")}
        kind = None
    if isinstance(enum := rest.pop("enum", None), list):
        out["enum"] = enum
    if kind is not None:
        out["type"] = kind
    for key in ("description", "title"):
        if key in rest:
            out[key] = rest.pop(key)
    if kind == "object":
        properties = rest.pop("properties", {})
        out["properties"] = (
            {k: sub(v) for k, v in properties.items()} if isinstance(properties, dict) else {}
        )
        rest.pop("additionalProperties", None)
        out["additionalProperties"] = False
        if "required" in rest:
            out["required"] = rest.pop("required")
    elif kind == "string" and rest.get("format") in _STRING_FORMATS:
        out["format"] = rest.pop("format")
    elif kind == "array":
        if "items" in rest:
            out["items"] = sub(rest.pop("items"))
        if rest.get("minItems") in (0, 1):
            out["minItems"] = rest.pop("minItems")
    if not out.keys() & {"type", "anyOf", "allOf", "enum", "$ref"}:
        out["type"] = "object" if depth == 0 else "string"
        if out["type"] == "object":
            out.setdefault("properties", {})
            out["additionalProperties"] = False
    rest.pop("$schema", None)
    rest.pop("strict", None)
    if rest:  # what strict mode cannot express becomes guidance in the description
        extra = "{" + ", ".join(f"{k}: {v}" for k, v in rest.items()) + "}"
        out["description"] = f"{out['description']}\n\n{extra}" if "description" in out else extra
    return out
