"""Tool-call ids stay within every upstream's limits, whoever minted them (issue #12).

A tool loop moves between Gemini, Anthropic and OpenAI targets with the real `openai` client.
The fakes check ids as their APIs do: the OpenAI fake refuses an id over 40 characters (a
Responses `call_id` over 64) with OpenAI's own 400, Anthropic's refuses ids outside
`[A-Za-z0-9_-]` and results that answer no call, and Gemini's refuses a Gemini 3 call replayed
without its thought signature (Google's placeholder aside).
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer

from gateway.providers._call_ids import short_input_ids, shorten
from gateway.providers.openai import _may_hold_call_ids
from gateway.settings import ModelConfig, RoutingSettings, Target
from tests.conftest import (
    MakeSettings,
    create_key,
    fake_provider,
    openai_client,
    start_fakes,
    start_gateway,
)
from tests.fakes import FakeOpenAI

TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    },
}
ASK = {"role": "user", "content": "find x"}


class Loop:
    def __init__(self, client: openai.AsyncOpenAI, fakes: dict[str, Any]) -> None:
        self.client, self.fakes = client, fakes
        self.messages: list[Any] = [ASK]

    async def turn(self, model: str, result: str) -> str:
        """One model turn that calls the tool, and the tool's result; the call's id."""
        reply = await self.client.chat.completions.create(
            model=model, messages=self.messages, tools=[TOOL], tool_choice="required"
        )
        message = reply.choices[0].message
        [call] = message.tool_calls or []
        self.messages.append(message.model_dump(exclude_none=True))
        self.messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
        return call.id


@pytest.fixture
async def loop(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> Any:
    fakes = await start_fakes(aiohttp_server, "openai", "anthropic", "gemini")
    providers = tuple(fake_provider(kind, fake) for kind, fake in fakes.items())
    providers += (fake_provider("openai", fakes["openai"], name="oai-r", responses_api=True),)
    models = (
        ModelConfig(name="g", targets=(Target(provider="gemini", model="gemini-3-pro-preview"),)),
        ModelConfig(name="c", targets=(Target(provider="anthropic", model="claude-sonnet-4-5"),)),
        ModelConfig(name="o", targets=(Target(provider="openai", model="gpt-4o-mini"),)),
        ModelConfig(name="r", targets=(Target(provider="oai-r", model="gpt-4o-mini"),)),
        ModelConfig(  # Anthropic first, OpenAI when it fails
            name="fo",
            targets=(
                Target(provider="anthropic", model="claude-sonnet-4-5"),
                Target(provider="openai", model="gpt-4o-mini", priority=1),
            ),
        ),
    )
    fast = RoutingSettings(backoff_initial=0.001, backoff_max=0.001)
    settings = make_settings(providers=providers, models=models, routing=fast)
    gw = await start_gateway(aiohttp_client, settings)
    async with openai_client(gw, await create_key(gw)) as client:
        yield Loop(client, fakes)


def _openai_ids(fake: FakeOpenAI) -> list[tuple[str, str]]:
    """(call id, id its result answers) of every tool exchange in the last chat request."""
    messages = fake.chat_requests[-1].json["messages"]
    calls = [c["id"] for m in messages for c in m.get("tool_calls") or []]
    results = [m["tool_call_id"] for m in messages if m["role"] == "tool"]
    return list(zip(calls, results, strict=True))


async def test_a_tool_loop_moves_between_gemini_anthropic_and_openai(loop: Loop) -> None:
    gemini_id = await loop.turn("g", "x is 1")
    assert len(gemini_id) > 40 and "__thought__" in gemini_id  # the signature rides along
    openai_id = await loop.turn("o", "x is 2")  # was OpenAI's 400: the id is 80+ characters
    pairs = _openai_ids(loop.fakes["openai"])
    assert all(len(call) <= 40 and call == result for call, result in pairs)
    assert pairs[0][0] == shorten(gemini_id)  # stable: the same id, the same short one
    await loop.turn("c", "x is 3")
    await loop.turn("g", "x is 4")  # back on Gemini: its own call keeps its real signature
    gemini = loop.fakes["gemini"].generate_requests[-1].json
    signatures = [p.get("thoughtSignature") for c in gemini["contents"] for p in c["parts"]]
    assert gemini_id.split("__thought__")[1] in signatures
    await loop.turn("o", "x is 5")  # and OpenAI again, with every id of the loop
    assert len(_openai_ids(loop.fakes["openai"])) == 4
    assert openai_id == "call_fake1" or len(openai_id) <= 40


async def test_a_long_prompt_has_its_ids_shortened_too(loop: Loop) -> None:
    # A body past 4 KB is not scanned for the keys (0.8 ns a byte: 94 us for 118 KB) but
    # walked as decoded messages: its ids are shortened all the same.
    loop.messages[0] = {"role": "user", "content": "find x in this: " + "words\n" * 2_000}
    gemini_id = await loop.turn("g", "x is 1")
    await loop.turn("o", "x is 2")
    pairs = _openai_ids(loop.fakes["openai"])
    assert pairs[0] == (shorten(gemini_id), shorten(gemini_id))
    assert len(json.dumps(loop.fakes["openai"].chat_requests[-1].json)) > 4096


async def test_failover_to_openai_mid_loop_shortens_the_ids(loop: Loop) -> None:
    await loop.turn("g", "x is 1")
    loop.fakes["anthropic"].script(status=529)
    reply = await loop.client.chat.completions.create(
        model="fo", messages=loop.messages, tools=[TOOL]
    )
    assert reply.model == "gpt-4o-mini"  # the fallback answered
    assert all(len(call) <= 40 for call, _ in _openai_ids(loop.fakes["openai"]))


async def test_a_responses_call_id_from_gemini_passes_through_to_openai(loop: Loop) -> None:
    first = await loop.client.responses.create(
        model="g",
        input="find x",
        tools=[
            {"type": "function", "name": "lookup", "parameters": TOOL["function"]["parameters"]}
        ],  # type: ignore[index]
        tool_choice="required",
    )
    [call] = [item for item in first.output if item.type == "function_call"]
    assert len(call.call_id) > 64
    reply = await loop.client.responses.create(
        model="r",  # passed through to an upstream that serves /v1/responses
        input=[
            {"role": "user", "content": "find x"},
            call.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"type": "function_call_output", "call_id": call.call_id, "output": "x is 1"},
        ],
    )
    assert reply.status == "completed"
    sent = loop.fakes["openai"].responses_requests[-1].json["input"]
    assert sent[1]["call_id"] == sent[2]["call_id"] == shorten(call.call_id, 64)


def test_short_ids_unit() -> None:
    assert shorten("call_abc") == "call_abc"  # ids that fit are left alone
    long = "call_" + "a" * 60
    assert shorten(long) == shorten(long) and len(shorten(long)) == 29
    assert shorten(long) != shorten(long + "b")
    assert short_input_ids(b'"just text"') is None  # type: ignore[arg-type]


def test_only_a_body_that_cannot_hold_a_call_id_skips_the_walk() -> None:
    # The OpenAI provider looks for long ids only in bodies that may hold one: the bytes
    # of either key, or an escape that could spell it (`tool\u005fcall_id`), or no
    # client body at all (a translated request).
    assert not _may_hold_call_ids(b'{"model":"o","messages":[{"role":"user","content":"hi"}]}')
    assert _may_hold_call_ids(b'{"messages":[{"role":"tool","tool_call_id":"x"}]}')
    assert _may_hold_call_ids(b'{"messages":[{"role":"assistant","tool_calls":[]}]}')
    assert _may_hold_call_ids(b'{"messages":[{"role":"tool","tool\\u005fcall_id":"x"}]}')
    assert _may_hold_call_ids(None)
    assert _may_hold_call_ids(b'{"messages":[{"role":"user","content":"%b"}]}' % (b"x" * 4096))
