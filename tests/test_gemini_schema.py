"""JSON Schema → Gemini Schema conversion: every rule, every refusal, and realistic client schemas.

Each converted output goes through `assert_gemini_schema`, a small validator of what Gemini's
`Schema` proto accepts, so a rule that leaks a JSON Schema keyword fails every test that hits it.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from gateway.providers.gemini import schema
from gateway.providers.gemini.schema import UnsupportedSchema, to_gemini_schema
from tests.conftest import calls_in

ALLOWED_KEYS = frozenset(
    {
        "type", "format", "title", "description", "nullable", "enum", "items", "properties",
        "required", "minItems", "maxItems", "minLength", "maxLength", "pattern", "minimum",
        "maximum", "minProperties", "maxProperties", "anyOf", "propertyOrdering", "default",
        "example",
    }
)  # fmt: skip
GEMINI_TYPES = frozenset({"STRING", "NUMBER", "INTEGER", "BOOLEAN", "ARRAY", "OBJECT"})


def assert_gemini_schema(schema: object, where: str = "#") -> None:
    """Assert `schema` uses only what Gemini's Schema proto accepts, recursively."""
    assert isinstance(schema, dict), where
    assert set(schema) <= ALLOWED_KEYS, (where, set(schema) - ALLOWED_KEYS)
    if "anyOf" in schema:
        assert set(schema) <= {"anyOf", "nullable", "title", "description"}, where
        assert isinstance(schema["anyOf"], list) and len(schema["anyOf"]) >= 2, where
        for i, member in enumerate(schema["anyOf"]):
            assert_gemini_schema(member, f"{where}/anyOf/{i}")
    else:
        kind = schema.get("type")
        assert isinstance(kind, str) and kind in GEMINI_TYPES, (where, kind)
    if "nullable" in schema:
        assert schema["nullable"] is True, where
    if "enum" in schema:
        assert schema["type"] == "STRING", where
        assert schema["enum"] and all(isinstance(v, str) for v in schema["enum"]), where
    if "items" in schema:
        assert schema["type"] == "ARRAY", where
        assert_gemini_schema(schema["items"], f"{where}/items")
    elif schema.get("type") == "ARRAY":
        raise AssertionError(f"{where}: ARRAY without items")
    properties = schema.get("properties", {})
    if "properties" in schema:
        assert schema["type"] == "OBJECT" and properties, where
        for name, sub in properties.items():
            assert_gemini_schema(sub, f"{where}/properties/{name}")
    if len(properties) > 1:
        assert schema.get("propertyOrdering") == list(properties), where
    else:
        assert "propertyOrdering" not in schema, where
    if "required" in schema:
        assert schema["required"] and set(schema["required"]) <= set(properties), where


def convert(schema: object) -> dict[str, Any]:
    """Convert, validate the output, and check the input was left untouched."""
    before = copy.deepcopy(schema)
    out = to_gemini_schema(schema)
    assert schema == before
    assert_gemini_schema(out)
    return out


def refuse(schema: object, *fragments: str) -> str:
    """Assert the conversion refuses `schema` with a message holding every fragment."""
    with pytest.raises(UnsupportedSchema) as info:
        to_gemini_schema(schema)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"x": schema}}
    return schema


# --- the validator itself ---------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"type": "string"},
        {"type": ["STRING"]},
        {"type": "STRING", "additionalProperties": False},
        {"type": "STRING", "enum": [1]},
        {"type": "ARRAY"},
        {"type": "OBJECT", "properties": {}},
        {"type": "OBJECT", "properties": {"a": {"type": "STRING"}, "b": {"type": "STRING"}}},
        {"type": "OBJECT", "properties": {"a": {"type": "STRING"}}, "required": ["b"]},
        {"anyOf": [{"type": "STRING"}, {"type": "INTEGER"}], "default": "x"},
        {"type": "STRING", "nullable": False},
    ],
)
def test_validator_rejects_what_gemini_rejects(bad: dict[str, Any]) -> None:
    with pytest.raises(AssertionError):
        assert_gemini_schema(bad)


# --- types ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("json_type", "gemini_type"),
    [
        ("string", "STRING"),
        ("number", "NUMBER"),
        ("integer", "INTEGER"),
        ("boolean", "BOOLEAN"),
        ("STRING", "STRING"),  # already Gemini-style: accepted as is
    ],
)
def test_scalar_types_become_uppercase(json_type: str, gemini_type: str) -> None:
    assert convert({"type": "object", "properties": {"v": {"type": json_type}}}) == {
        "type": "OBJECT",
        "properties": {"v": {"type": gemini_type}},
    }


def test_unknown_type_is_refused_with_its_location() -> None:
    schema = {"type": "object", "properties": {"when": {"type": "date"}}}
    refuse(schema, "#/properties/when", "'date'")
    refuse({"type": 3}, "#: type 3")


def test_null_alone_is_refused() -> None:
    refuse({"type": "object", "properties": {"n": {"type": "null"}}}, "#/properties/n", "'null'")
    refuse({"type": ["null"]}, "only allows null")
    refuse({"type": []}, "only allows null")


# --- dropped keys ---------------------------------------------------------------------

NOISE = {
    "additionalProperties": False,
    "$schema": "http://json-schema.org/draft-07/schema#",
    "$id": "https://example.com/s",
    "strict": True,
    "examples": ["x"],
    "$comment": "c",
    "exclusiveMinimum": 0,
    "exclusiveMaximum": 9,
    "propertyNames": {"pattern": "^[a-z]+$"},
    "patternProperties": {"^x": {"type": "string"}},
    "unevaluatedProperties": False,
    "not": {"type": "null"},
    "if": {}, "then": {}, "else": {},
    "prefixItems": [{"type": "string"}],
    "uniqueItems": True,
    "contentEncoding": "base64",
}  # fmt: skip


def test_unknown_keys_are_dropped_at_every_level() -> None:
    schema = {
        **NOISE,
        "type": "object",
        "properties": {
            "list": {**NOISE, "type": "array", "items": {**NOISE, "type": "string"}},
            "either": {
                **NOISE,
                "anyOf": [{**NOISE, "type": "integer"}, {**NOISE, "type": "string"}],
            },
            "inner": {**NOISE, "type": "object", "properties": {"x": {**NOISE, "type": "number"}}},
        },
    }
    assert convert(schema) == {
        "type": "OBJECT",
        "properties": {
            "list": {"type": "ARRAY", "items": {"type": "STRING"}},
            "either": {"anyOf": [{"type": "INTEGER"}, {"type": "STRING"}]},
            "inner": {"type": "OBJECT", "properties": {"x": {"type": "NUMBER"}}},
        },
        "propertyOrdering": ["list", "either", "inner"],
    }


def test_property_names_are_never_filtered() -> None:
    schema = {
        "type": "object",
        "properties": {
            "type": {"type": "string"},
            "additionalProperties": {"type": "boolean"},
            "$ref": {"type": "integer"},
            "properties": {"type": "object", "properties": {"anyOf": {"type": "number"}}},
        },
        "required": ["type", "$ref"],
        "additionalProperties": False,
    }
    out = convert(schema)
    assert out["propertyOrdering"] == ["type", "additionalProperties", "$ref", "properties"]
    assert out["properties"]["$ref"] == {"type": "INTEGER"}
    assert out["properties"]["properties"]["properties"] == {"anyOf": {"type": "NUMBER"}}
    assert out["required"] == ["type", "$ref"]


def test_kept_keywords_depend_on_the_type() -> None:
    common = {"title": "T", "description": "D", "default": 1, "example": 2}
    limits = {
        "minLength": 1, "maxLength": 9, "pattern": "^a", "minimum": 0, "maximum": 5,
        "minItems": 1, "maxItems": 3, "minProperties": 1, "maxProperties": 4,
    }  # fmt: skip
    props = {t: {"type": t, **common, **limits} for t in ("string", "integer", "number")}
    props |= {t: {"type": t, **limits} for t in ("boolean", "array", "object")}
    out = convert({"type": "object", "properties": props})["properties"]
    assert out["string"] == {
        "type": "STRING", **common, "minLength": 1, "maxLength": 9, "pattern": "^a"
    }  # fmt: skip
    assert out["integer"] == {"type": "INTEGER", **common, "minimum": 0, "maximum": 5}
    assert out["number"] == {"type": "NUMBER", **common, "minimum": 0, "maximum": 5}
    assert out["boolean"] == {"type": "BOOLEAN"}
    assert out["array"] == {
        "type": "ARRAY",
        "minItems": 1,
        "maxItems": 3,
        "items": {"type": "STRING"},
    }
    assert out["object"] == {"type": "OBJECT", "minProperties": 1, "maxProperties": 4}


@pytest.mark.parametrize(
    ("json_type", "fmt", "kept"),
    [
        ("string", "date-time", True),
        ("string", "enum", True),
        ("integer", "int32", True),
        ("integer", "int64", True),
        ("number", "float", True),
        ("number", "double", True),
        ("string", "email", False),
        ("string", "uri", False),
        ("string", "date", False),
        ("string", "uuid", False),
        ("integer", "date-time", False),  # a Gemini format, but not for this type
        ("number", "int32", False),
        ("string", ["date-time"], False),
    ],
)
def test_only_gemini_formats_survive(json_type: str, fmt: object, kept: bool) -> None:
    out = convert({"type": "object", "properties": {"v": {"type": json_type, "format": fmt}}})
    assert ("format" in out["properties"]["v"]) is kept


# --- empty and boolean schemas, inferred types -----------------------------------------


@pytest.mark.parametrize("schema", [{}, True, {"$schema": "x", "additionalProperties": True}])
def test_empty_top_level_schema_is_an_object(schema: object) -> None:
    assert convert(schema) == {"type": "OBJECT"}


def test_empty_nested_schema_is_a_string_keeping_its_description() -> None:
    schema = {
        "type": "object",
        "properties": {"any": {}, "anything": {"description": "free-form"}, "yes": True},
    }
    assert convert(schema)["properties"] == {
        "any": {"type": "STRING"},
        "anything": {"type": "STRING", "description": "free-form"},
        "yes": {"type": "STRING"},
    }


def test_top_level_description_alone_is_an_object() -> None:
    assert convert({"description": "args"}) == {"type": "OBJECT", "description": "args"}


@pytest.mark.parametrize("schema", [None, "string", 3, ["string"], False])
def test_non_schema_input_is_refused(schema: object) -> None:
    refuse(schema, "#: expected a schema object")


def test_false_schema_is_refused_wherever_it_is() -> None:
    message = refuse({"type": "object", "properties": {"never": False}}, "#/properties/never")
    assert "false (which matches nothing)" in message
    refuse({"type": "array", "items": False}, "#/items", "false")


def test_types_are_inferred_from_properties_and_items() -> None:
    schema = {"properties": {"tags": {"items": {"type": "string"}}, "n": {"type": "integer"}}}
    assert convert(schema) == {
        "type": "OBJECT",
        "properties": {
            "tags": {"type": "ARRAY", "items": {"type": "STRING"}},
            "n": {"type": "INTEGER"},
        },
        "propertyOrdering": ["tags", "n"],
    }


@pytest.mark.parametrize("items", [{}, True, {"description": "one"}, None])
def test_array_items_default_to_string(items: object) -> None:
    schema: dict[str, Any] = (
        {"type": "array"} if items is None else {"type": "array", "items": items}
    )
    out = convert({"type": "object", "properties": {"a": schema}})["properties"]["a"]
    assert out["items"]["type"] == "STRING"
    assert out["items"].get("description") == (
        items.get("description") if isinstance(items, dict) else None
    )


def test_tuple_items_are_refused() -> None:
    refuse({"type": "array", "items": [{"type": "string"}]}, "#/items", "got a list")


# --- objects --------------------------------------------------------------------------


def test_empty_properties_are_dropped_but_the_object_stays() -> None:
    schema = {
        "type": "object",
        "properties": {},
        "required": ["ghost"],
        "additionalProperties": False,
    }
    assert convert(schema) == {"type": "OBJECT"}
    assert convert({"properties": {}}) == {"type": "OBJECT"}


def test_property_ordering_follows_the_input_for_two_or_more_properties() -> None:
    one = convert({"type": "object", "properties": {"z": {"type": "string"}}})
    assert "propertyOrdering" not in one
    many = {"type": "object", "properties": {k: {"type": "string"} for k in "zyxab"}}
    assert convert(many)["propertyOrdering"] == ["z", "y", "x", "a", "b"]


@pytest.mark.parametrize(
    ("required", "expected"),
    [
        (["a", "ghost", "b"], ["a", "b"]),
        (["b", "a", "b"], ["b", "a"]),
        (["ghost"], None),
        ([], None),
        ([1, None, "a"], ["a"]),
        (True, None),  # draft-3 style: not a list, ignored
        ("a", None),
    ],
)
def test_required_keeps_only_existing_names(required: object, expected: list[str] | None) -> None:
    schema = {"type": "object", "properties": {"a": {}, "b": {}}, "required": required}
    assert convert(schema).get("required") == expected


def test_malformed_containers_are_refused() -> None:
    refuse({"type": "object", "properties": ["a"]}, "#: properties must be an object")
    refuse({"anyOf": {"type": "string"}}, "#: anyOf must be an array")
    refuse({"type": "object", "properties": {"a": {"oneOf": None}}}, "#/properties/a: oneOf")
    refuse({"allOf": "x"}, "allOf must be an array")
    refuse({"type": "object", "$defs": []}, "$defs must be an object")
    refuse({"type": "object", "definitions": None}, "definitions must be an object")


# --- enum and const -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "string", "enum": ["a", "b"]}, {"type": "STRING", "enum": ["a", "b"]}),
        ({"type": "integer", "enum": [1, 2, 3]}, {"type": "STRING", "enum": ["1", "2", "3"]}),
        ({"enum": [1.5, True, "x"]}, {"type": "STRING", "enum": ["1.5", "true", "x"]}),
        ({"enum": ["", "a"]}, {"type": "STRING", "enum": ["", "a"]}),
        ({"enum": [1, "1", 1]}, {"type": "STRING", "enum": ["1"]}),
        ({"enum": ["a", None]}, {"type": "STRING", "nullable": True, "enum": ["a"]}),
        ({"const": "fixed"}, {"type": "STRING", "enum": ["fixed"]}),
        ({"type": "integer", "const": 7}, {"type": "STRING", "enum": ["7"]}),
        ({"const": ""}, {"type": "STRING", "enum": [""]}),
        ({"const": "a", "enum": ["b", "c"]}, {"type": "STRING", "enum": ["a"]}),
        (
            {"type": ["integer", "null"], "enum": [1, 2]},
            {"type": "STRING", "nullable": True, "enum": ["1", "2"]},
        ),
        (
            {
                "type": "integer",
                "enum": [1, 2],
                "minimum": 1,
                "format": "int32",
                "description": "d",
            },
            {"type": "STRING", "description": "d", "enum": ["1", "2"]},
        ),
        (
            {"type": "string", "format": "enum", "enum": ["a"]},
            {"type": "STRING", "format": "enum", "enum": ["a"]},
        ),
    ],
)
def test_enums_become_string_enums(schema: dict[str, Any], expected: dict[str, Any]) -> None:
    assert convert({"type": "object", "properties": {"v": schema}})["properties"]["v"] == expected


@pytest.mark.parametrize("schema", [{"enum": [None]}, {"const": None}, {"enum": []}])
def test_enums_without_a_non_null_value_are_refused(schema: dict[str, Any]) -> None:
    refuse(
        {"type": "object", "properties": {"v": schema}},
        "#/properties/v: enum has no non-null value",
    )


def test_enum_that_is_not_a_list_is_refused() -> None:
    refuse({"type": "string", "enum": "a"}, "#: enum must be an array")


# --- unions ---------------------------------------------------------------------------


def prop(schema: object) -> dict[str, Any]:
    """Convert `schema` as the property of an object and return what it became."""
    out: dict[str, Any] = convert({"type": "object", "properties": {"p": schema}})
    return out["properties"]["p"]  # type: ignore[no-any-return]


def test_nullable_type_list() -> None:
    assert prop({"type": ["string", "null"], "description": "d", "maxLength": 3}) == {
        "type": "STRING", "nullable": True, "description": "d", "maxLength": 3
    }  # fmt: skip
    assert prop({"type": ["null", "integer"]}) == {"type": "INTEGER", "nullable": True}
    assert prop({"type": ["array", "null"], "items": {"type": "integer"}}) == {
        "type": "ARRAY", "nullable": True, "items": {"type": "INTEGER"}
    }  # fmt: skip
    assert prop({"type": ["string"]}) == {"type": "STRING"}


def test_multi_type_list_becomes_any_of_with_keywords_split_by_type() -> None:
    schema = {"type": ["string", "integer", "null"], "title": "T", "minLength": 1, "minimum": 0}
    assert prop(schema) == {
        "anyOf": [{"type": "STRING", "minLength": 1}, {"type": "INTEGER", "minimum": 0}],
        "title": "T",
        "nullable": True,
    }


def test_any_of_with_null_unwraps_a_single_member_and_merges_outer_metadata() -> None:
    schema = {
        "anyOf": [{"type": "string", "description": "inner", "maxLength": 5}, {"type": "null"}],
        "description": "outer",
        "title": "Nick",
        "default": None,
    }
    assert prop(schema) == {
        "type": "STRING",
        "nullable": True,
        "title": "Nick",
        "description": "outer",
        "default": None,
        "maxLength": 5,
    }


def test_one_of_with_null_and_several_members_keeps_any_of_plus_nullable() -> None:
    schema = {
        "oneOf": [{"type": "string"}, {"type": "null"}, {"type": "object", "properties": {}}],
        "description": "d",
        "type": "object",
        "default": "x",
    }
    assert prop(schema) == {
        "anyOf": [{"type": "STRING"}, {"type": "OBJECT"}],
        "description": "d",
        "nullable": True,
    }


def test_one_of_without_null_becomes_any_of() -> None:
    assert prop({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}) == {
        "anyOf": [{"type": "INTEGER"}, {"type": "BOOLEAN"}]
    }


def test_any_of_with_an_existing_nullable_flag_is_kept() -> None:
    schema = {"anyOf": [{"type": "integer"}, {"type": "string"}], "nullable": True}
    assert prop(schema)["nullable"] is True
    assert prop({"anyOf": [{"type": "integer"}], "nullable": False}) == {"type": "INTEGER"}


def test_single_member_unions_at_the_top_keep_the_top_level_default() -> None:
    assert convert({"anyOf": [{}, {"type": "null"}]}) == {"type": "OBJECT", "nullable": True}
    assert prop({"anyOf": [{}, {"type": "null"}]}) == {"type": "STRING", "nullable": True}


def test_null_only_unions_are_refused() -> None:
    refuse({"anyOf": [{"type": "null"}]}, "#: a schema that only allows null")
    refuse({"type": "object", "properties": {"p": {"oneOf": []}}}, "#/properties/p")


def test_any_of_and_one_of_together_are_refused() -> None:
    refuse({"anyOf": [{"type": "string"}], "oneOf": [{"type": "integer"}]}, "anyOf together")


# --- allOf ----------------------------------------------------------------------------


def test_all_of_with_one_member_merges_it_and_the_outer_keys_win() -> None:
    schema = {
        "allOf": [{"type": "string", "description": "inner", "maxLength": 2}],
        "description": "outer",
    }
    assert prop(schema) == {"type": "STRING", "description": "outer", "maxLength": 2}


def test_all_of_with_several_objects_merges_properties_and_required() -> None:
    schema = {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
            {"properties": {"b": {"type": "integer"}}, "required": ["b", "a"]},
            {"type": "object"},
        ],
        "properties": {"c": {"type": "boolean"}},
        "required": ["c"],
        "title": "Merged",
    }
    assert prop(schema) == {
        "type": "OBJECT",
        "title": "Merged",
        "properties": {"a": {"type": "STRING"}, "b": {"type": "INTEGER"}, "c": {"type": "BOOLEAN"}},
        "propertyOrdering": ["a", "b", "c"],
        "required": ["a", "b", "c"],
    }


def test_all_of_members_can_nest_all_of_and_unions() -> None:
    schema = {"allOf": [{"allOf": [{"anyOf": [{"type": "integer"}, {"type": "null"}]}]}]}
    assert prop(schema) == {"type": "INTEGER", "nullable": True}
    assert prop({"allOf": [], "type": "string"}) == {"type": "STRING"}


def test_all_of_over_non_objects_is_refused() -> None:
    schema = {"allOf": [{"type": "string"}, {"maxLength": 3}]}
    refuse({"type": "object", "properties": {"p": schema}}, "#/properties/p", "allOf can only")


# --- $defs and $ref -------------------------------------------------------------------


def test_refs_to_defs_and_definitions_are_inlined() -> None:
    schema = {
        "type": "object",
        "properties": {
            "a": {"$ref": "#/$defs/Name"},
            "b": {"$ref": "#/definitions/Count"},
            "c": {"type": "array", "items": {"$ref": "#/$defs/Name"}},
        },
        "$defs": {"Name": {"type": "string", "minLength": 1}},
        "definitions": {"Count": {"type": "integer"}},
    }
    assert convert(schema)["properties"] == {
        "a": {"type": "STRING", "minLength": 1},
        "b": {"type": "INTEGER"},
        "c": {"type": "ARRAY", "items": {"type": "STRING", "minLength": 1}},
    }


def test_keys_beside_a_ref_override_the_definition() -> None:
    schema = {
        "properties": {"a": {"$ref": "#/$defs/A", "description": "field"}},
        "$defs": {"A": {"type": "string", "description": "class"}},
    }
    assert convert(schema)["properties"]["a"] == {"type": "STRING", "description": "field"}


def test_ref_chains_escaped_names_and_boolean_definitions() -> None:
    schema = {
        "properties": {
            "alias": {"$ref": "#/$defs/Alias"},
            "slash": {"$ref": "#/$defs/a~1b~0c"},
            "anything": {"$ref": "#/$defs/Any"},
        },
        "$defs": {
            "Alias": {"$ref": "#/$defs/Target"},
            "Target": {"type": "boolean"},
            "a/b~c": {"type": "number"},
            "Any": True,
        },
    }
    assert convert(schema)["properties"] == {
        "alias": {"type": "BOOLEAN"},
        "slash": {"type": "NUMBER"},
        "anything": {"type": "STRING"},
    }


def test_a_definition_used_in_many_places_is_not_a_cycle() -> None:
    point = {"type": "object", "properties": {"x": {"type": "number"}}}
    schema = {
        "type": "object",
        "properties": {"from": {"$ref": "#/$defs/P"}, "to": {"$ref": "#/$defs/P"}},
        "$defs": {"P": point, "Line": {"properties": {"p": {"$ref": "#/$defs/P"}}}},
    }
    out = convert(schema)
    assert out["properties"]["from"] == out["properties"]["to"] == convert(point)


def test_sibling_all_of_members_may_share_definitions() -> None:
    schema = {
        "allOf": [{"$ref": "#/$defs/Base"}, {"$ref": "#/$defs/Child"}],
        "$defs": {
            "Base": {"type": "object", "properties": {"id": {"type": "string"}}},
            "Child": {"type": "object", "properties": {"parent": {"$ref": "#/$defs/Base"}}},
        },
    }
    assert convert(schema)["properties"]["parent"] == {
        "type": "OBJECT",
        "properties": {"id": {"type": "STRING"}},
    }


@pytest.mark.parametrize(
    ("defs", "start"),
    [
        ({"Node": {"properties": {"next": {"$ref": "#/$defs/Node"}}}}, "Node"),
        ({"Node": {"type": "array", "items": {"$ref": "#/$defs/Node"}}}, "Node"),
        ({"Node": {"anyOf": [{"$ref": "#/$defs/Node"}, {"type": "null"}]}}, "Node"),
        ({"Node": {"allOf": [{"$ref": "#/$defs/Node"}]}}, "Node"),
        ({"Node": {"$ref": "#/$defs/Node"}}, "Node"),
        (
            {
                "A": {"properties": {"b": {"$ref": "#/$defs/B"}}},
                "B": {"properties": {"a": {"$ref": "#/$defs/A"}}},
            },
            "A",
        ),
    ],
)
def test_recursive_definitions_are_refused_by_name(defs: dict[str, Any], start: str) -> None:
    schema = {"type": "object", "properties": {"root": {"$ref": f"#/$defs/{start}"}}, "$defs": defs}
    message = refuse(schema, "recursive definition")
    assert any(repr(name) in message for name in defs), message


def test_recursion_through_a_pydantic_tree_is_refused() -> None:
    tree = {
        "$defs": {
            "TreeNode": {
                "properties": {
                    "value": {"title": "Value", "type": "integer"},
                    "children": {
                        "items": {"$ref": "#/$defs/TreeNode"},
                        "title": "Children",
                        "type": "array",
                    },
                },
                "required": ["value"],
                "title": "TreeNode",
                "type": "object",
            }
        },
        "$ref": "#/$defs/TreeNode",
    }
    refuse(tree, "#/properties/children/items", "'TreeNode'")


def test_an_unused_recursive_definition_is_harmless() -> None:
    schema = {"type": "object", "$defs": {"Loop": {"$ref": "#/$defs/Loop"}}}
    assert convert(schema) == {"type": "OBJECT"}


@pytest.mark.parametrize(
    ("ref", "fragment"),
    [
        ("#", "not a local"),
        ("#/components/schemas/X", "not a local"),
        ("https://example.com/schema.json", "not a local"),
        ("#/$defs/A/properties/b", "not a local"),
        (7, "not a local"),
        ("#/$defs/Missing", "names no definition"),
        ("#/definitions/A", "names no definition"),  # A lives in $defs, not definitions
    ],
)
def test_bad_refs_are_refused(ref: object, fragment: str) -> None:
    schema = {"properties": {"x": {"$ref": ref}}, "$defs": {"A": {"type": "string"}}}
    refuse(schema, "#/properties/x", fragment)


def test_a_definition_that_is_not_a_schema_is_refused() -> None:
    refuse({"properties": {"x": {"$ref": "#/$defs/A"}}, "$defs": {"A": 3}}, "got a int")


# --- limits ---------------------------------------------------------------------------


def test_nesting_up_to_the_limit_is_accepted() -> None:
    out = convert(nested(32))
    for _ in range(32):
        out = out["properties"]["x"]
    assert out == {"type": "STRING"}


def test_nesting_beyond_the_limit_is_refused() -> None:
    refuse(nested(33), "nested deeper than 32 levels")


def test_deep_nesting_through_refs_is_refused() -> None:
    defs = {f"D{i}": {"type": "array", "items": {"$ref": f"#/$defs/D{i + 1}"}} for i in range(40)}
    defs["D40"] = {"type": "string"}
    refuse({"type": "object", "properties": {"a": {"$ref": "#/$defs/D0"}}, "$defs": defs}, "deeper")


def test_exponential_ref_expansion_is_refused() -> None:
    defs: dict[str, Any] = {"L0": {"type": "string"}}
    for i in range(1, 20):  # each level doubles: 2**20 nodes once inlined
        below = {"$ref": f"#/$defs/L{i - 1}"}
        defs[f"L{i}"] = {"type": "object", "properties": {"a": below, "b": below}}
    refuse({"$ref": "#/$defs/L19", "$defs": defs}, "nodes once $refs are inlined")


# --- realistic client schemas -----------------------------------------------------------

# OpenAI strict structured output: every property required, optional ones as type unions.
OPENAI_STRICT = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "Full name"},
        "age": {"type": ["integer", "null"]},
        "email": {"type": ["string", "null"], "format": "email"},
        "role": {"type": "string", "enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {
            "type": ["object", "null"],
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "email", "role", "tags", "address"],
    "additionalProperties": False,
}

# What pydantic v2 emits for:
#   class Status(str, Enum): ACTIVE = "active"; INACTIVE = "inactive"
#   class Address(BaseModel): street: str; city: str; zip_code: str | None = None
#   class User(BaseModel):
#       """A registered user."""
#       name: str = Field(description="Display name"); age: int | None = None
#       status: Status = Status.ACTIVE; addresses: list[Address] = []
#       primary: Address | None = Field(None, description="Where to send mail")
#       priority: Literal[1, 2, 3] = 1; meta: dict[str, Any] = {}
PYDANTIC_V2_USER = {
    "$defs": {
        "Address": {
            "properties": {
                "street": {"title": "Street", "type": "string"},
                "city": {"title": "City", "type": "string"},
                "zip_code": {
                    "anyOf": [{"type": "string"}, {"type": "null"}],
                    "default": None,
                    "title": "Zip Code",
                },
            },
            "required": ["street", "city"],
            "title": "Address",
            "type": "object",
        },
        "Status": {"enum": ["active", "inactive"], "title": "Status", "type": "string"},
    },
    "description": "A registered user.",
    "properties": {
        "name": {"description": "Display name", "title": "Name", "type": "string"},
        "age": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None, "title": "Age"},
        "status": {"$ref": "#/$defs/Status", "default": "active"},
        "addresses": {
            "default": [],
            "items": {"$ref": "#/$defs/Address"},
            "title": "Addresses",
            "type": "array",
        },
        "primary": {
            "anyOf": [{"$ref": "#/$defs/Address"}, {"type": "null"}],
            "default": None,
            "description": "Where to send mail",
        },
        "priority": {"default": 1, "enum": [1, 2, 3], "title": "Priority", "type": "integer"},
        "meta": {"additionalProperties": True, "default": {}, "title": "Meta", "type": "object"},
    },
    "required": ["name"],
    "title": "User",
    "type": "object",
}

# pydantic v1 / older tools: `definitions` and field-level `allOf: [{$ref}]` wrappers.
PYDANTIC_V1_ORDER = {
    "title": "Order",
    "type": "object",
    "properties": {
        "id": {"title": "Id", "type": "integer"},
        "item": {
            "title": "Item",
            "description": "What was bought",
            "allOf": [{"$ref": "#/definitions/Item"}],
        },
        "kind": {"const": "order", "title": "Kind"},
        "quantity": {"title": "Quantity", "exclusiveMinimum": 0, "type": "integer"},
    },
    "required": ["id", "item", "kind"],
    "definitions": {
        "Item": {
            "title": "Item",
            "type": "object",
            "properties": {
                "sku": {"title": "Sku", "type": "string"},
                "price": {"title": "Price", "type": "number"},
            },
            "required": ["sku", "price"],
        }
    },
}

# A typical function-calling `parameters` block with integer enums and a const discriminator.
TOOL_PARAMETERS = {
    "type": "object",
    "properties": {
        "action": {"const": "set_volume"},
        "level": {"type": "integer", "enum": [0, 25, 50, 75, 100], "description": "Percent"},
        "ramp": {"type": "number", "minimum": 0, "exclusiveMaximum": 10},
        "target": {
            "oneOf": [
                {
                    "type": "object",
                    "properties": {"room": {"type": "string"}},
                    "required": ["room"],
                },
                {"type": "object", "properties": {"device_id": {"type": "string"}}},
            ]
        },
    },
    "required": ["action", "level"],
    "additionalProperties": False,
    "$schema": "http://json-schema.org/draft-07/schema#",
}

REALISTIC = {
    "openai_strict": OPENAI_STRICT,
    "pydantic_v2_user": PYDANTIC_V2_USER,
    "pydantic_v1_order": PYDANTIC_V1_ORDER,
    "tool_parameters": TOOL_PARAMETERS,
}


@pytest.mark.parametrize("name", REALISTIC)
def test_realistic_schemas_convert_to_valid_gemini(name: str) -> None:
    convert(REALISTIC[name])


@pytest.mark.parametrize("name", REALISTIC)
def test_realistic_schemas_survive_a_json_round_trip_and_are_deterministic(name: str) -> None:
    schema = json.loads(json.dumps(REALISTIC[name]))
    assert convert(schema) == convert(REALISTIC[name])


def test_openai_strict_schema() -> None:
    assert convert(OPENAI_STRICT) == {
        "type": "OBJECT",
        "properties": {
            "name": {"type": "STRING", "description": "Full name"},
            "age": {"type": "INTEGER", "nullable": True},
            "email": {"type": "STRING", "nullable": True},
            "role": {"type": "STRING", "enum": ["admin", "user"]},
            "tags": {"type": "ARRAY", "items": {"type": "STRING"}},
            "address": {
                "type": "OBJECT",
                "nullable": True,
                "properties": {"city": {"type": "STRING"}, "zip": {"type": "STRING"}},
                "propertyOrdering": ["city", "zip"],
                "required": ["city", "zip"],
            },
        },
        "propertyOrdering": ["name", "age", "email", "role", "tags", "address"],
        "required": ["name", "age", "email", "role", "tags", "address"],
    }


def test_pydantic_v2_schema() -> None:
    address = {
        "type": "OBJECT",
        "title": "Address",
        "properties": {
            "street": {"type": "STRING", "title": "Street"},
            "city": {"type": "STRING", "title": "City"},
            "zip_code": {"type": "STRING", "nullable": True, "title": "Zip Code", "default": None},
        },
        "propertyOrdering": ["street", "city", "zip_code"],
        "required": ["street", "city"],
    }
    assert convert(PYDANTIC_V2_USER) == {
        "type": "OBJECT",
        "title": "User",
        "description": "A registered user.",
        "properties": {
            "name": {"type": "STRING", "title": "Name", "description": "Display name"},
            "age": {"type": "INTEGER", "nullable": True, "title": "Age", "default": None},
            "status": {
                "type": "STRING",
                "title": "Status",
                "default": "active",
                "enum": ["active", "inactive"],
            },
            "addresses": {"type": "ARRAY", "title": "Addresses", "default": [], "items": address},
            "primary": {
                **address,
                "nullable": True,
                "description": "Where to send mail",
                "default": None,
            },
            "priority": {
                "type": "STRING",
                "title": "Priority",
                "default": 1,
                "enum": ["1", "2", "3"],
            },
            "meta": {"type": "OBJECT", "title": "Meta", "default": {}},
        },
        "propertyOrdering": ["name", "age", "status", "addresses", "primary", "priority", "meta"],
        "required": ["name"],
    }


def test_pydantic_v1_schema() -> None:
    out = convert(PYDANTIC_V1_ORDER)
    assert out["properties"]["item"] == {
        "type": "OBJECT",
        "title": "Item",
        "description": "What was bought",
        "properties": {
            "sku": {"type": "STRING", "title": "Sku"},
            "price": {"type": "NUMBER", "title": "Price"},
        },
        "propertyOrdering": ["sku", "price"],
        "required": ["sku", "price"],
    }
    assert out["properties"]["kind"] == {"type": "STRING", "title": "Kind", "enum": ["order"]}
    assert out["properties"]["quantity"] == {"type": "INTEGER", "title": "Quantity"}
    assert out["required"] == ["id", "item", "kind"]


def test_tool_parameters_schema() -> None:
    assert convert(TOOL_PARAMETERS) == {
        "type": "OBJECT",
        "properties": {
            "action": {"type": "STRING", "enum": ["set_volume"]},
            "level": {
                "type": "STRING",
                "description": "Percent",
                "enum": ["0", "25", "50", "75", "100"],
            },
            "ramp": {"type": "NUMBER", "minimum": 0},
            "target": {
                "anyOf": [
                    {
                        "type": "OBJECT",
                        "properties": {"room": {"type": "STRING"}},
                        "required": ["room"],
                    },
                    {"type": "OBJECT", "properties": {"device_id": {"type": "STRING"}}},
                ]
            },
        },
        "propertyOrdering": ["action", "level", "ramp", "target"],
        "required": ["action", "level"],
    }


def test_unsupported_schema_is_a_value_error() -> None:
    assert issubclass(UnsupportedSchema, ValueError)


def test_duplicate_type_lists_do_not_multiply_the_work() -> None:
    """A tiny hostile schema must not tie up the event loop (each level used to multiply it)."""
    wide: dict[str, Any] = {"type": "string"}
    for _ in range(30):  # shared children: 2**30 nodes once expanded
        wide = {"type": ["object", "OBJECT"], "properties": {"a": wide, "b": wide}}
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(12):  # duplicate types: used to cost 8**12 conversions
        deep = {"type": ["object"] * 8, "properties": {"a": deep}}
    with calls_in(schema) as calls, pytest.raises(UnsupportedSchema, match="nodes"):
        to_gemini_schema(wide)
    assert calls["inline"] <= 10_001  # stopped by the 10,000-node cap, before any conversion
    assert calls["_convert"] == 0
    with calls_in(schema) as calls:
        assert to_gemini_schema(deep)["type"] == "OBJECT"
    assert calls["_convert"] <= 4 * 12  # a few conversions per level, not 8 per level
