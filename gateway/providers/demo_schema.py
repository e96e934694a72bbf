"""A deterministic value that satisfies a JSON Schema, for the demo model's JSON and tool calls.

It honours JSON Schema as clients generate it (pydantic, zod, the OpenAI SDK's strict
schemas): `$ref` to `$defs`/`definitions` (recursion bounded), `anyOf`/`oneOf` (the first
branch that is not `null`), `allOf`, `const`, `enum`, type lists and nullable types, nested
objects (every property, required or not) and arrays (`minItems`, `maxItems`, `items`,
`prefixItems`), string `format`s and lengths, and numeric bounds. Strings are the user's
text where no format says otherwise, so the answer still echoes the request.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["sample"]

# Values for string formats (JSON Schema's, and pydantic's names for the same).
FORMATS = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00Z",
    "duration": "P1D",
    "email": "demo@example.com",
    "idn-email": "demo@example.com",
    "hostname": "example.com",
    "idn-hostname": "example.com",
    "ipv4": "192.0.2.1",
    "ipv6": "2001:db8::1",
    "uri": "https://example.com/",
    "iri": "https://example.com/",
    "uri-reference": "https://example.com/",
    "url": "https://example.com/",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "regex": ".*",
    "json-pointer": "/",
    "binary": "",
    "byte": "",
    "password": "demo",
}
# Far deeper than any schema a client writes; recursion is cut at the first repeated `$ref`.
MAX_DEPTH = 64
# Bounds on the work a hostile schema can ask for (`minItems: 1e9`, nested arrays): values
# made in all, items of one array, characters of one string. Past them the answer is smaller
# than the schema asks, never slow.
MAX_VALUES = 10_000
MAX_ITEMS = 64
MAX_LENGTH = 4096

Path = tuple[str, ...]  # the `$ref`s followed to reach a schema


class _Sampler:
    def __init__(self, root: dict[str, Any], text: str) -> None:
        self.root = root
        self.text = text
        self.budget = MAX_VALUES

    def ref(self, pointer: str) -> dict[str, Any]:
        """A local `$ref` (`#`, `#/$defs/X`, `#/definitions/X`, any JSON pointer)."""
        if not pointer.startswith("#"):
            return {}  # a remote schema: nothing to read it from
        node: Any = self.root
        for part in filter(None, pointer[1:].split("/")):
            key = part.replace("~1", "/").replace("~0", "~")
            node = node.get(key) if isinstance(node, dict) else None
        return node if isinstance(node, dict) else {}

    def loops(self, schema: Any, path: Path) -> bool:
        """Whether `schema` (through `$ref`s and unions) only leads back where it came from."""
        if not isinstance(schema, dict):
            return False
        ref = schema.get("$ref")
        if isinstance(ref, str):
            return ref in path
        return False

    def value(self, schema: Any, path: Path = (), depth: int = 0) -> Any:
        if schema is True or not isinstance(schema, dict):
            return self.text
        self.budget -= 1
        if depth > MAX_DEPTH or self.budget < 0:
            return None
        if "const" in schema:
            return schema["const"]
        enum = schema.get("enum")
        if isinstance(enum, list) and enum:
            return next((v for v in enum if v is not None), enum[0])
        ref = schema.get("$ref")
        if isinstance(ref, str):
            if ref in path:
                return None  # a recursive schema: the caller makes do without it
            siblings = {k: v for k, v in schema.items() if k != "$ref"}
            return self.value({**self.ref(ref), **siblings}, (*path, ref), depth + 1)
        for key in ("anyOf", "oneOf"):
            branches = schema.get(key)
            if isinstance(branches, list) and branches:
                return self.value(self.branch(branches, path), path, depth + 1)
        parts = schema.get("allOf")
        if isinstance(parts, list) and parts:
            merged = _merge([self._resolved(p) for p in parts if isinstance(p, dict)])
            rest = {k: v for k, v in schema.items() if k != "allOf"}
            return self.value(_merge([merged, rest]), path, depth + 1)
        return self.typed(schema, _kind(schema), path, depth)

    def branch(self, branches: list[Any], path: Path) -> Any:
        """The union branch to fill: the first that is neither `null` nor a loop back (the
        `null` one when nothing else is left, so recursion ends)."""
        for b in branches:
            if not _is_null(b) and not self.loops(b, path):
                return b
        return next((b for b in branches if _is_null(b)), branches[0])

    def _resolved(self, schema: dict[str, Any]) -> dict[str, Any]:
        ref = schema.get("$ref")
        return {**self.ref(ref), **schema} if isinstance(ref, str) else schema

    def typed(self, schema: dict[str, Any], kind: str, path: Path, depth: int) -> Any:
        if kind == "object":
            props = schema.get("properties")
            if not isinstance(props, dict):
                return {}
            required = schema.get("required") or ()
            return {
                str(name): self.value(sub, path, depth + 1)
                for name, sub in props.items()
                if name in required or not self.loops(sub, path)
            }
        if kind == "array":
            return self.array(schema, path, depth)
        if kind in ("integer", "number"):
            return _number(schema, kind)
        if kind == "boolean":
            return True
        if kind == "null":
            return None
        return self.string(schema)

    def array(self, schema: dict[str, Any], path: Path, depth: int) -> list[Any]:
        prefix = schema.get("prefixItems")
        head = [self.value(s, path, depth + 1) for s in prefix] if isinstance(prefix, list) else []
        items = schema.get("items", {})
        low = schema.get("minItems", 1)
        count = max(len(head), low if isinstance(low, int) else 1)
        high = schema.get("maxItems")
        if isinstance(high, int):
            count = min(count, high)
        count = max(0, min(count, MAX_ITEMS, self.budget))
        if items is False or self.loops(items, path):
            return head[:count]  # a tree's leaves: no children
        rest = [self.value(items, path, depth + 1) for _ in range(count - len(head))]
        return head[:count] + rest

    def string(self, schema: dict[str, Any]) -> str:
        text = FORMATS.get(str(schema.get("format")), self.text)[:MAX_LENGTH]
        low, high = schema.get("minLength"), schema.get("maxLength")
        if isinstance(high, int) and len(text) > high:
            text = text[:high]
        if isinstance(low, int) and len(text) < low:
            text = text + "x" * (min(low, MAX_LENGTH) - len(text))
        return text


def _is_null(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "null"


def _merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """`allOf` as one schema: properties and required lists joined, other keys layered."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key == "properties" and isinstance(value, dict):
                out["properties"] = {**out.get("properties", {}), **value}
            elif key == "required" and isinstance(value, list):
                out["required"] = [*out.get("required", []), *value]
            else:
                out[key] = value
    return out


def _kind(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if isinstance(kind, str):
        return kind
    if "properties" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    return "string"


def _number(schema: dict[str, Any], kind: str) -> int | float:
    value: float = 1
    low = schema.get("minimum")
    high = schema.get("maximum")
    ex_low, ex_high = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if isinstance(ex_low, int | float) and not isinstance(ex_low, bool):
        value = max(value, ex_low + (1 if kind == "integer" else 0.5))
    if isinstance(low, int | float) and not isinstance(low, bool):
        value = max(value, low)
    if isinstance(ex_high, int | float) and not isinstance(ex_high, bool):
        value = min(value, ex_high - (1 if kind == "integer" else 0.5))
    if isinstance(high, int | float) and not isinstance(high, bool):
        value = min(value, high)
    step = schema.get("multipleOf")
    if isinstance(step, int | float) and not isinstance(step, bool) and step > 0:
        value = math.ceil(value / step) * step
    return math.ceil(value) if kind == "integer" else float(value)


def sample(schema: Any, text: str) -> Any:
    """A value that satisfies `schema`; strings without a format are `text`."""
    root = schema if isinstance(schema, dict) else {}
    return _Sampler(root, text).value(schema)
