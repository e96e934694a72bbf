"""JSON Schema → Gemini `Schema`, the OpenAPI 3.0 subset of `responseSchema` and tool `parameters`.

Clients send standard JSON Schema; Gemini rejects unknown keys, type lists and `$ref` with a 400,
so this module rewrites what it can and raises `UnsupportedSchema` for what it cannot.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["UnsupportedSchema", "to_gemini_schema"]

_MAX_DEPTH = 32
# Inlining `$ref`s can multiply a small schema exponentially; clients are untrusted, so cap it.
_MAX_NODES = 10_000
_COMMON_KEYS = ("title", "description", "default", "example")
# Per Gemini type: the keywords that apply to it, and the formats Gemini documents for it.
_BY_TYPE: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "STRING": (("minLength", "maxLength", "pattern"), ("enum", "date-time")),
    "NUMBER": (("minimum", "maximum"), ("float", "double")),
    "INTEGER": (("minimum", "maximum"), ("int32", "int64")),
    "BOOLEAN": ((), ()),
    "ARRAY": (("minItems", "maxItems"), ()),
    "OBJECT": (("minProperties", "maxProperties"), ()),
}
_REF = re.compile(r"#/(\$defs|definitions)/([^/]+)")

_Path = tuple[str, ...]


class UnsupportedSchema(ValueError):
    """The schema has no Gemini equivalent; the message says where (a `#/...` pointer) and why."""


def to_gemini_schema(schema: object) -> dict[str, Any]:
    """Convert a decoded JSON Schema into a Gemini `Schema` dict.

    Local `$ref`s are inlined, then every node is rewritten: uppercase `type`, type lists and
    `{"type": "null"}` alternatives become `nullable`, `oneOf` becomes `anyOf`, enums become
    strings, objects get `propertyOrdering`, and keys Gemini does not know are dropped.

    A schema silent about its type (`{}`, `true`, `{"description": ...}`) is OBJECT at the top
    (parameters and JSON replies are objects) and STRING when nested (Gemini has no "any" type).

    Raises:
        UnsupportedSchema: `false`, recursive or non-local `$ref`s, nesting past 32 levels, a
            schema that only allows null, `allOf` over non-objects, malformed keywords.
    """
    root = _schema_dict(schema, ())
    defs = {section: _mapping(root, section, ()) for section in ("$defs", "definitions")}
    return _convert(_Inliner(defs).inline(root, (), frozenset()), ())


class _Inliner:
    """Replaces every `$ref` reachable through a schema position with its definition."""

    def __init__(self, defs: dict[str, dict[str, Any]]) -> None:
        self.defs = defs
        self.budget = _MAX_NODES

    def inline(self, raw: object, path: _Path, stack: frozenset[str]) -> dict[str, Any]:
        """Copy `raw` with refs resolved; `stack` holds the refs being expanded above it."""
        where = _where(path)
        if len(path) > _MAX_DEPTH:
            raise UnsupportedSchema(f"{where}: nested deeper than {_MAX_DEPTH} levels")
        self.budget -= 1
        if self.budget < 0:
            raise UnsupportedSchema(f"schema has over {_MAX_NODES} nodes once $refs are inlined")
        node = _schema_dict(raw, path)
        while "$ref" in node:
            ref = node["$ref"]
            match = _REF.fullmatch(ref) if isinstance(ref, str) else None
            if match is None:
                raise UnsupportedSchema(f"{where}: $ref {ref!r} is not a local '#/$defs/...' one")
            section, name = match[1], match[2].replace("~1", "/").replace("~0", "~")
            if name not in self.defs[section]:
                raise UnsupportedSchema(f"{where}: $ref {ref!r} names no definition")
            if ref in stack:
                raise UnsupportedSchema(f"{where}: recursive definition {name!r} is unsupported")
            stack |= {ref}
            # Keys beside a `$ref` (pydantic puts the field's description there) win.
            siblings = {k: v for k, v in node.items() if k != "$ref"}
            node = {**_schema_dict(self.defs[section][name], path), **siblings}
        out = dict(node)
        if "properties" in out:
            out["properties"] = {
                name: self.inline(sub, (*path, f"properties/{name}"), stack)
                for name, sub in _mapping(node, "properties", path).items()
            }
        if "items" in out:
            out["items"] = self.inline(out["items"], (*path, "items"), stack)
        for key in ("anyOf", "oneOf", "allOf"):
            if key in out:
                members = out[key]
                if not isinstance(members, list):
                    raise UnsupportedSchema(f"{where}: {key} must be an array")
                out[key] = [
                    self.inline(m, (*path, f"{key}/{i}"), stack) for i, m in enumerate(members)
                ]
        return out


def _convert(node: dict[str, Any], path: _Path) -> dict[str, Any]:
    """Rewrite one ref-free node (and its children) into Gemini's form."""
    if "allOf" in node:
        return _convert(_merge_all_of(node, path), path)
    if "anyOf" in node or "oneOf" in node:
        return _union(node, path)
    types = node.get("type")
    nullable = node.get("nullable") is True
    enum: list[str] | None = None
    if "const" in node or "enum" in node:
        values = [node["const"]] if "const" in node else node["enum"]
        if not isinstance(values, list):
            raise UnsupportedSchema(f"{_where(path)}: enum must be an array")
        nullable = nullable or None in values or (isinstance(types, list) and "null" in types)
        # Gemini enums are strings; non-strings keep their JSON spelling (true, 1.5, ...).
        strings = (v if isinstance(v, str) else json.dumps(v) for v in values if v is not None)
        enum = list(dict.fromkeys(strings))
        if not enum:
            raise UnsupportedSchema(f"{_where(path)}: enum has no non-null value")
        gemini_type = "STRING"
    elif isinstance(types, list):
        # A type list is an anyOf of one node per type; `_union` folds "null" into nullable.
        # Duplicates go first: each branch copies the node's children, so `["object"] * 8`
        # nested a few levels deep would multiply the work exponentially.
        unique = list({str(t).lower(): t for t in types}.values())
        branch = {k: v for k, v in node.items() if k not in ("type", "title", "description")}
        return _union({**node, "anyOf": [{**branch, "type": t} for t in unique]}, path)
    else:
        gemini_type = _gemini_type(types, node, path)

    out: dict[str, Any] = {"type": gemini_type}
    if nullable:
        out["nullable"] = True
    keys, formats = _BY_TYPE[gemini_type]
    out.update((k, node[k]) for k in (*_COMMON_KEYS, *keys) if k in node)
    if node.get("format") in formats:
        out["format"] = node["format"]
    if enum is not None:
        out["enum"] = enum
    if gemini_type == "ARRAY":
        out["items"] = _convert(node.get("items", {}), (*path, "items"))
    elif gemini_type == "OBJECT":
        properties = {
            name: _convert(sub, (*path, f"properties/{name}"))
            for name, sub in node.get("properties", {}).items()
        }
        if properties:  # Some Gemini versions reject an empty property map.
            out["properties"] = properties
        if len(properties) > 1:  # Otherwise Gemini orders the reply's keys alphabetically.
            out["propertyOrdering"] = list(properties)
        required = [r for r in _names(node.get("required")) if r in properties]
        if required:
            out["required"] = list(dict.fromkeys(required))
    return out


def _union(node: dict[str, Any], path: _Path) -> dict[str, Any]:
    """anyOf/oneOf: null members become `nullable`; a lone survivor replaces the union."""
    if "anyOf" in node and "oneOf" in node:
        raise UnsupportedSchema(f"{_where(path)}: anyOf together with oneOf cannot be expressed")
    members: list[dict[str, Any]] = node["anyOf"] if "anyOf" in node else node["oneOf"]
    rest = [m for m in members if m.get("type") not in ("null", ["null"])]
    if not rest:
        raise UnsupportedSchema(f"{_where(path)}: a schema that only allows null has no type")
    outer: dict[str, Any] = {k: node[k] for k in _COMMON_KEYS if k in node}
    if len(rest) == 1:  # allOf of one member is "that member, with the outer keys winning".
        out = _convert({"allOf": rest, **outer}, path)
    else:  # Beside anyOf Gemini takes only nullable, title and description.
        out = {"anyOf": [_convert(m, (*path, f"anyOf/{i}")) for i, m in enumerate(rest)]}
        out.update((k, v) for k, v in outer.items() if k in ("title", "description"))
    if len(rest) < len(members) or node.get("nullable") is True:
        out["nullable"] = True
    return out


def _merge_all_of(node: dict[str, Any], path: _Path) -> dict[str, Any]:
    """Fold allOf into its parent: one member of any kind, or several objects."""
    members: list[dict[str, Any]] = node["allOf"]
    objects = all(m.get("type") == "object" or "properties" in m for m in members)
    if len(members) > 1 and not objects:
        raise UnsupportedSchema(f"{_where(path)}: allOf can only combine object schemas")
    merged = {k: v for k, v in node.items() if k != "allOf"}
    properties: dict[str, Any] = {}
    required: list[str] = []
    for source in (*members, merged):
        properties.update(source.get("properties", {}))
        required += _names(source.get("required"))
    for member in members:  # The parent's own keys win, then earlier members.
        for key, value in member.items():
            merged.setdefault(key, value)
    if properties:
        merged["properties"] = properties
    if required:
        merged["required"] = required
    return merged


def _gemini_type(name: object, node: dict[str, Any], path: _Path) -> str:
    if name is None:
        if "properties" in node:
            return "OBJECT"
        if "items" in node:
            return "ARRAY"
        return "STRING" if path else "OBJECT"
    if isinstance(name, str) and name.upper() in _BY_TYPE:
        return name.upper()
    raise UnsupportedSchema(f"{_where(path)}: type {name!r} cannot be expressed for Gemini")


def _schema_dict(value: object, path: _Path) -> dict[str, Any]:
    if value is True:
        return {}
    if isinstance(value, dict):
        return value
    got = "false (which matches nothing)" if value is False else f"a {type(value).__name__}"
    raise UnsupportedSchema(f"{_where(path)}: expected a schema object, got {got}")


def _mapping(node: dict[str, Any], key: str, path: _Path) -> dict[str, Any]:
    value = node.get(key, {})
    if not isinstance(value, dict):
        raise UnsupportedSchema(f"{_where(path)}: {key} must be an object")
    return value


def _names(value: object) -> list[str]:
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []


def _where(path: _Path) -> str:
    return "#" + "".join(f"/{segment}" for segment in path)
