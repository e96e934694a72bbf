"""The demo model honours JSON Schema as clients generate it (issue #12).

The SDK's `parse()` turns pydantic models (nested, optional, literal, enum, union, recursive)
into strict JSON schemas with `$ref`/`$defs` and `anyOf`, and parses the answer back into the
model; it fails unless the demo's JSON satisfies the schema. Hand-written schemas of the kinds
zod and others emit are checked with a JSON Schema validator, formats included.
"""

from __future__ import annotations

import datetime
import enum
import json
import uuid
from typing import Annotated, Any, Literal

import openai
import pydantic
import pytest
from jsonschema import Draft202012Validator, FormatChecker

from gateway.providers.demo_schema import sample

HELLO = [{"role": "user", "content": "Describe someone."}]


class Address(pydantic.BaseModel):
    street: str
    city: str
    postcode: str | None = None


class Cat(pydantic.BaseModel):
    kind: Literal["cat"]
    lives: int = pydantic.Field(ge=1, le=9)


class Dog(pydantic.BaseModel):
    kind: Literal["dog"]
    good: bool


class Role(enum.Enum):
    ADMIN = "admin"
    USER = "user"


class Person(pydantic.BaseModel):
    name: str
    age: int = pydantic.Field(ge=18, le=130)
    height_m: float = pydantic.Field(gt=0.5, lt=2.5)
    born: datetime.date
    seen_at: datetime.datetime
    id: uuid.UUID
    nickname: str | None
    role: Role
    status: Literal["active", "retired"]
    address: Address
    previous: list[Address]
    pet: Cat | Dog
    favourite: Annotated[Cat | Dog, pydantic.Field(discriminator="kind")]
    tags: list[str] = pydantic.Field(min_length=2)


class Node(pydantic.BaseModel):
    value: int
    children: list[Node]
    parent: Node | None


async def test_parse_fills_nested_optional_literal_and_union_models(
    oai: openai.AsyncOpenAI,
) -> None:
    reply = await oai.chat.completions.parse(model="demo", messages=HELLO, response_format=Person)
    person = reply.choices[0].message.parsed
    assert isinstance(person, Person)
    assert 18 <= person.age <= 130 and person.status == "active"
    assert isinstance(person.address, Address) and len(person.tags) == 2
    assert isinstance(person.pet, Cat | Dog) and isinstance(person.favourite, Cat | Dog)
    assert person.name == "Describe someone."  # strings still echo the request


async def test_parse_fills_a_recursive_model(oai: openai.AsyncOpenAI) -> None:
    reply = await oai.chat.completions.parse(model="demo", messages=HELLO, response_format=Node)
    node = reply.choices[0].message.parsed
    assert isinstance(node, Node)
    # The recursion stops at the first repeated $ref: one level below the root at most.
    assert all(child.children == [] and child.parent is None for child in node.children)
    assert node.parent is None or node.parent.parent is None


async def test_the_stream_helper_parses_too(oai: openai.AsyncOpenAI) -> None:
    async with oai.chat.completions.stream(
        model="demo", messages=HELLO, response_format=Person
    ) as stream:
        final = await stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, Person)


async def test_tool_arguments_parse_into_the_tools_model(oai: openai.AsyncOpenAI) -> None:
    reply = await oai.chat.completions.parse(
        model="demo", messages=HELLO, tools=[openai.pydantic_function_tool(Person)]
    )
    [call] = reply.choices[0].message.tool_calls or []
    assert isinstance(call.function.parsed_arguments, Person)


async def test_responses_parse_on_demo(oai: openai.AsyncOpenAI) -> None:
    reply = await oai.responses.parse(model="demo", input="Describe someone.", text_format=Person)
    assert isinstance(reply.output_parsed, Person)


SCHEMAS: dict[str, dict[str, Any]] = {
    "zod object with defs": {
        "type": "object",
        "properties": {
            "user": {"$ref": "#/definitions/User"},
            "admins": {"type": "array", "items": {"$ref": "#/definitions/User"}, "minItems": 1},
        },
        "required": ["user", "admins"],
        "additionalProperties": False,
        "definitions": {
            "User": {
                "type": "object",
                "properties": {
                    "email": {"type": "string", "format": "email"},
                    "site": {"type": "string", "format": "uri"},
                    "ip": {"type": "string", "format": "ipv4"},
                    "code": {"type": "string", "minLength": 30, "maxLength": 40},
                },
                "required": ["email", "site", "ip", "code"],
                "additionalProperties": False,
            }
        },
    },
    "const, enums and type lists": {
        "type": "object",
        "properties": {
            "v": {"const": 2},
            "unit": {"enum": [None, "cm", "in"]},
            "maybe": {"type": ["null", "integer"], "minimum": 5, "multipleOf": 5},
            "either": {"oneOf": [{"type": "null"}, {"type": "boolean"}]},
            "pair": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "number"}]},
            "none": {"type": "array", "maxItems": 0},
        },
        "required": ["v", "unit", "maybe", "either", "pair", "none"],
    },
    "allOf": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"properties": {"b": {"type": "string", "format": "date-time"}}, "required": ["b"]},
        ]
    },
    "bounds": {
        "type": "object",
        "properties": {
            "small": {"type": "number", "exclusiveMaximum": 0},
            "big": {"type": "integer", "minimum": 1000},
            "odd": {"type": "number", "exclusiveMinimum": 1, "maximum": 1.2},
        },
        "required": ["small", "big", "odd"],
    },
    "recursive root": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
        },
        "required": ["name", "next"],
    },
}


@pytest.mark.parametrize("name", SCHEMAS)
async def test_json_schema_answers_validate(oai: openai.AsyncOpenAI, name: str) -> None:
    schema = SCHEMAS[name]
    reply = await oai.chat.completions.create(
        model="demo",
        messages=HELLO,
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
    )
    value = json.loads(reply.choices[0].message.content or "")
    Draft202012Validator(schema, format_checker=FormatChecker()).validate(value)


def test_remote_refs_and_odd_schemas_never_fail() -> None:
    assert sample({"$ref": "https://example.com/schema.json"}, "t") == "t"
    assert sample({"$ref": "#/$defs/missing"}, "t") == "t"
    assert sample(True, "t") == "t"
    assert sample({"type": "array", "items": False, "minItems": 3}, "t") == []
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(200):
        deep = {"type": "object", "properties": {"x": deep}, "required": ["x"]}
    sample(deep, "t")  # bounded, not a RecursionError


def test_a_hostile_schema_costs_bounded_work() -> None:
    """A client's schema must not make the gateway build a huge answer."""
    assert len(sample({"type": "array", "minItems": 10**9}, "t")) == 64
    assert len(sample({"type": "string", "minLength": 10**9}, "t")) == 4096
    wide: dict[str, Any] = {"type": "integer"}
    for _ in range(8):  # 64**8 values if each array were filled
        wide = {"type": "array", "items": wide, "minItems": 64}
    flat = str(sample(wide, "t"))
    assert flat.count("1") <= 10_000
