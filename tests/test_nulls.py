"""`null` means "not sent" for every field OpenAI's spec marks nullable, on every provider type
(issue #12): clients that send every field explicitly (`"audio": null`, `"prediction": null`,
an assistant message dumped from the SDK with `"function_call": null`...) must not get a 400.

The fields are read from the spec's own `CreateChatCompletionRequest` schema (the copy in
tests/openapi/), so a field the spec makes nullable later is tested without a change here.
Each is sent as `null` to each provider type with the real `openai` client, and what reaches
the upstream must be what leaving the field out sends (an OpenAI-compatible upstream gets the
`null` forwarded, which it accepts, and nothing else changes).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from jsonschema import Draft202012Validator

from gateway.settings import ModelConfig, Target
from tests.conftest import (
    MakeSettings,
    create_key,
    fake_provider,
    openai_client,
    start_fakes,
    start_gateway,
)
from tests.spec import schemas
from tests.test_contract import UPSTREAM_MODELS

KINDS = ("openai", "azure", "anthropic", "gemini", "demo")
MESSAGES = [
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hi there"},
    {"role": "user", "content": "how are you?"},
]


def _properties(schema: dict[str, Any]) -> dict[str, Any]:
    """The properties of an object schema, through `allOf` and `$ref`s."""
    if "$ref" in schema:
        return _properties(schemas()["$defs"][schema["$ref"].rsplit("/", 1)[1]])
    found = dict(schema.get("properties", {}))
    for part in schema.get("allOf", []):
        found.update(_properties(part))
    return found


def _takes_null(schema: dict[str, Any]) -> bool:
    return Draft202012Validator({**schemas(), **schema}).is_valid(None)


@functools.cache
def nullable(name: str) -> tuple[str, ...]:
    """The fields of the spec's schema `name` that accept `null`."""
    props = _properties({"$ref": f"#/$defs/{name}"})
    return tuple(sorted(field for field, schema in props.items() if _takes_null(schema)))


def test_the_spec_gives_what_clients_send() -> None:
    """A guard on the generator: the fields the issue names are among those generated."""
    assert {"audio", "prediction", "stream_options", "max_tokens"} <= set(
        nullable("CreateChatCompletionRequest")
    )
    assert {"audio", "function_call", "refusal"} <= set(
        nullable("ChatCompletionRequestAssistantMessage")
    )


def _strip_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nulls(v) for v in value]
    return value


class Rig:
    def __init__(self, kind: str, fake: Any, client: openai.AsyncOpenAI) -> None:
        self.kind, self.fake, self.client = kind, fake, client

    async def sent(self, **body: Any) -> Any:
        """What the upstream received for `body` (the demo: what the client got back)."""
        raw = await self.client.chat.completions.with_raw_response.create(model="m", **body)
        if self.fake is None:
            reply = raw.http_response.json()
            return {k: v for k, v in reply.items() if k not in ("id", "created")}
        received = self.fake.requests[-1].json
        # An OpenAI-compatible upstream gets the client's null as sent, which OpenAI takes.
        return _strip_nulls(received) if self.kind in ("openai", "azure") else received


MakeRig = Callable[[str], Awaitable[Rig]]


@pytest.fixture
async def make_rig(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> AsyncIterator[MakeRig]:
    clients: list[openai.AsyncOpenAI] = []

    async def make(kind: str) -> Rig:
        fake, providers, target = None, (), Target(provider="demo", model="demo")
        if kind != "demo":
            fake = (await start_fakes(aiohttp_server, kind))[kind]
            providers = (fake_provider(kind, fake, name="up"),)
            target = Target(provider="up", model=UPSTREAM_MODELS[kind])
        model = ModelConfig(name="m", targets=(target,))
        gw = await start_gateway(
            aiohttp_client, make_settings(providers=providers, models=(model,))
        )
        clients.append(openai_client(gw, await create_key(gw)))
        return Rig(kind, fake, clients[-1])

    yield make
    for client in clients:
        await client.close()


@pytest.fixture(params=KINDS)
async def rig(request: pytest.FixtureRequest, make_rig: MakeRig) -> Rig:
    return await make_rig(request.param)


async def test_every_nullable_request_field_takes_null(rig: Rig) -> None:
    baseline = await rig.sent(messages=MESSAGES)
    # The spec does not mark the legacy `functions`/`function_call` nullable; clients send
    # them as null all the same (OpenAI takes it).
    fields = (*nullable("CreateChatCompletionRequest"), "functions", "function_call")
    refused = {}
    for field in fields:
        try:
            got = await rig.sent(messages=MESSAGES, extra_body={field: None})
        except openai.APIStatusError as exc:
            refused[field] = exc.message
            continue
        assert got == baseline, f"{field}: null is not the same as leaving it out"
    assert refused == {}
    # All of them at once, as a client that sends every field explicitly does.
    assert await rig.sent(messages=MESSAGES, extra_body=dict.fromkeys(fields)) == baseline


async def test_every_nullable_assistant_message_field_takes_null(rig: Rig) -> None:
    baseline = await rig.sent(messages=MESSAGES)
    for field in nullable("ChatCompletionRequestAssistantMessage"):
        if field == "content":
            continue  # null content says "no text", which is not the baseline's turn
        turn = {**MESSAGES[1], field: None}
        got = await rig.sent(messages=[MESSAGES[0], turn, MESSAGES[2]])
        assert got == baseline, f"messages[1].{field}: null is not the same as leaving it out"


async def test_an_sdk_dumped_message_goes_back_as_it_is(rig: Rig) -> None:
    """`message.model_dump()` (no exclude_none) has `tool_calls`, `function_call`, `audio`
    and `annotations` as null: what many clients append to the conversation."""
    first = await rig.client.chat.completions.create(model="m", messages=MESSAGES[:1])
    dumped = first.choices[0].message.model_dump()
    assert dumped["tool_calls"] is None and dumped["function_call"] is None
    reply = await rig.client.chat.completions.create(
        model="m",
        messages=[MESSAGES[0], dumped, MESSAGES[2]],  # type: ignore[list-item]
    )
    assert reply.choices[0].message.content
