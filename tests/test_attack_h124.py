"""Attack h124: a regression sweep of ordinary SDK traffic after the day's budget changes
(33e570c..HEAD: Responses built-in tool fees, OpenAI processing tiers and Anthropic fast mode
charged at the tier the answer says, out-of-credit accounts taken out of rotation, Anthropic
`fallbacks` and the advisor tool refused to restricted keys, `usage.iterations` charged).

Clients are the real `openai` and `anthropic` SDKs and raw HTTP; upstreams are in-process TCP
servers answering as the real APIs do (`Scripted` of h110). Routes: gpt-4o-mini and gpt-5-mini
(OpenAI, chat and a `responses_api` upstream), claude-sonnet-4-5 (Messages pass-through and
chat translated), gemini-2.5-flash (Gemini, translated). Prices are the bundled genai-prices
list's; each test's cost is worked out from its rates by hand, exact to 1e-9 relative.

Failing tests assert what should happen; their comment says what is wrong and how badly.
Passing tests marked `# SOUND:` pin what was checked and held.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anthropic
import openai
import pytest
from aiohttp.test_utils import TestClient

from gateway.state import USAGE_KEY
from tests.conftest import NEVER_HANG, app_of, create_key, openai_client, router_of, usage_rows
from tests.raw_upstream import STREAM_HEAD, sse
from tests.test_attack_h105 import (
    Build,
    build,
    message_item,
    mtok,
    post,
    response_body,
    row_and_spend,
    whole,
)
from tests.test_attack_h107 import SONNET, ending, message, start, stream, text_block
from tests.test_attack_h110 import Scripted

__all__ = ["build"]  # (the fixture, imported for pytest)

# genai-prices (input, output, cached input) USD a million tokens.
RATES = {
    "gpt-4o-mini": (0.15, 0.6, 0.075),
    "gpt-5-mini": (0.25, 2.0, 0.025),
    "gemini-2.5-flash": (0.3, 2.5, 0.03),
}
FLEX = {"gpt-5-mini": (0.125, 1.0, 0.0125)}  # (the list's flex rates; gpt-4o-mini has none)
SONNET_IN, SONNET_OUT, SONNET_READ, SONNET_WRITE = 3.0, 15.0, 0.3, 3.75
SEARCH_CALL = 0.01  # (the list's web search price a call for these models)


async def rows_of(gw: TestClient[Any, Any], count: int) -> list[dict[str, Any]]:
    """The usage rows, once `count` were recorded (any key, budgeted or not)."""
    async with asyncio.timeout(NEVER_HANG):
        await app_of(gw)[USAGE_KEY].wait_recorded(count)
    return await usage_rows(gw)


def relative(got: float, want: float) -> None:
    assert abs(got - want) <= 1e-9 * want, (got, want)


def exact(row: dict[str, Any], cost: float) -> None:
    assert not row["estimated"], row
    assert row["status"] == 200, row
    relative(row["cost_usd"], cost)


def cost_of(rates: tuple[float, float, float], prompt: int, out: int, cached: int = 0) -> float:
    rate_in, rate_out, rate_cached = rates
    return mtok(prompt - cached, rate_in) + mtok(cached, rate_cached) + mtok(out, rate_out)


# --- OpenAI chat completions, each ordinary tier, function tools forced ----------------------

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
            "strict": True,
        },
    }
]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}


def usage(prompt: int, out: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": out,
        "total_tokens": prompt + out,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def tool_answer(use: dict[str, Any], tier: str) -> bytes:
    msg = {"role": "assistant", "content": None, "tool_calls": [CALL], "refusal": None}
    return whole(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "up",
            "choices": [{"index": 0, "message": msg, "finish_reason": "tool_calls"}],
            "usage": use,
            "service_tier": tier,
            "system_fingerprint": "fp_1",
        }
    )


def tool_stream(use: dict[str, Any], tier: str) -> bytes:
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "up"}
    base |= {"service_tier": tier, "system_fingerprint": "fp_1"}
    first_call = CALL | {"index": 0, "function": {"name": "get_weather", "arguments": ""}}
    first = {
        "index": 0,
        "delta": {"role": "assistant", "content": None, "tool_calls": [first_call]},
        "finish_reason": None,
    }
    args = {"index": 0, "function": {"arguments": '{"city":"Paris"}'}}
    more = {"index": 0, "delta": {"tool_calls": [args]}, "finish_reason": None}
    done = {"index": 0, "delta": {}, "finish_reason": "tool_calls"}
    chunks = [
        base | {"choices": [first], "usage": None},
        base | {"choices": [more], "usage": None},
        base | {"choices": [done], "usage": None},
        base | {"choices": [], "usage": use},
    ]
    return STREAM_HEAD + b"".join(sse(c) for c in chunks) + b"data: [DONE]\n\n"


# SOUND: SDK chat on gpt-4o-mini and gpt-5-mini (a reasoning model: reasoning tokens within
# the completion count) on a $1 USD key, with `tools` and `tool_choice: "required"`, each
# ordinary `service_tier` (none, "auto", "default", "flex" where the model takes it), whole
# and streamed with `include_usage`: relayed as sent, answered 200, rows exact, each charged
# the list's text cost at the tier the answer says ("default" at the standard rates; gpt-5-mini
# answering "flex" at the list's flex rates, what OpenAI bills; 33e570c charged it the
# standard rates, twice the bill: the day's fix, the only case that differs); every hold
# released. Nothing of the day's tier pricing touches the ordinary tiers.
@pytest.mark.parametrize(
    ("model", "tier"),
    [
        ("gpt-4o-mini", None),
        ("gpt-4o-mini", "auto"),
        ("gpt-4o-mini", "default"),
        ("gpt-5-mini", None),
        ("gpt-5-mini", "auto"),
        ("gpt-5-mini", "default"),
        ("gpt-5-mini", "flex"),
    ],
)
async def test_sdk_chat_tiers_and_forced_tools(build: Build, model: str, tier: str | None) -> None:
    served = "flex" if tier == "flex" else "default"
    reasoning = 192 if model == "gpt-5-mini" else 0
    use = usage(2_300, 260, cached=2_048, reasoning=reasoning)
    up = Scripted(tool_answer(use, served), tool_stream(use, served))
    gw = await build("openai", up, model)
    secret = await create_key(gw, budget_usd=1.0)
    extra: dict[str, Any] = {} if tier is None else {"service_tier": tier}
    messages: Any = [
        {"role": "system", "content": "Use the tools."},
        {"role": "user", "content": "Weather in Paris?"},
    ]
    async with openai_client(gw, secret) as sdk:
        got = await sdk.chat.completions.create(
            model="m",
            messages=messages,
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice="required",
            max_completion_tokens=2_000,
            **extra,
        )
        assert got.choices[0].message.tool_calls, got
        assert got.service_tier == served
        chunks = [
            c
            async for c in await sdk.chat.completions.create(
                model="m",
                messages=messages,
                tools=TOOLS,  # type: ignore[arg-type]
                tool_choice="required",
                stream=True,
                stream_options={"include_usage": True},
                **extra,
            )
        ]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 260
    for body in up.bodies:
        assert body.get("service_tier") == tier and body["tool_choice"] == "required", body
    rates = (FLEX if served == "flex" else RATES)[model]
    cost = cost_of(rates, 2_300, 260, cached=2_048)
    _, spend = await row_and_spend(gw, secret, rows=2)
    for row in await usage_rows(gw):
        exact(row, cost)
    relative(spend.usd, 2 * cost)
    assert spend.held_usd == 0.0, spend


# SOUND: a key with only a token budget, and one with no budget, may send every tier OpenAI
# has (priority included: nothing is priced for them) and are charged their tokens; nothing
# of today's tier pricing refuses them. The usage rows keep the cost (priority rates, as the
# answer says so) for the operator's reports (33e570c recorded standard rates: the fix).
@pytest.mark.parametrize("budget", [{"budget_tokens": 100_000}, {}])
async def test_unpriced_keys_take_every_tier(build: Build, budget: dict[str, Any]) -> None:
    use = usage(400, 30)
    up = Scripted(tool_answer(use, "priority"))
    gw = await build("openai", up, "gpt-4o-mini")
    secret = await create_key(gw, **budget)
    for tier in ("priority", "flex", "scale", "auto"):
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "service_tier": tier}
        status, answer = await post(gw, secret, "/v1/chat/completions", body)
        assert status == 200, (tier, answer)
    for row in await rows_of(gw, 4):
        exact(row, cost_of((0.25, 1.0, 0.125), 400, 30))


# --- gemini-2.5-flash (translated) -----------------------------------------------------------


def gemini_whole(prompt: int, out: int, thoughts: int = 0) -> bytes:
    meta = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": out,
        "totalTokenCount": prompt + out + thoughts,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
    }
    if thoughts:
        meta["thoughtsTokenCount"] = thoughts
    part = {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}
    return whole(
        {
            "candidates": [
                {
                    "content": {"role": "model", "parts": [part]},
                    "finishReason": "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": meta,
            "modelVersion": "gemini-2.5-flash",
            "responseId": "r1",
        }
    )


def gemini_events(prompt: int, out: int, thoughts: int = 0) -> bytes:
    meta = {"promptTokenCount": prompt, "candidatesTokenCount": out}
    meta["totalTokenCount"] = prompt + out + thoughts
    if thoughts:
        meta["thoughtsTokenCount"] = thoughts
    head = {"content": {"role": "model", "parts": [{"text": "Hel"}]}, "index": 0}
    tail = {"content": {"role": "model", "parts": [{"text": "lo"}]}, "index": 0}
    tail["finishReason"] = "STOP"
    return (
        STREAM_HEAD
        + sse({"candidates": [head], "modelVersion": "gemini-2.5-flash"})
        + sse({"candidates": [tail], "usageMetadata": meta, "modelVersion": "gemini-2.5-flash"})
    )


# SOUND: SDK chat to gemini-2.5-flash (the Gemini translation) on a $1 USD key with each
# ordinary `service_tier` (dropped by the translation, as before) and `tool_choice:
# "required"` with function tools, whole and streamed: 200, rows exact, charged the list's
# text cost (thinking tokens at the output rate).
@pytest.mark.parametrize("tier", [None, "auto", "default", "flex"])
async def test_sdk_chat_gemini(build: Build, tier: str | None) -> None:
    up = Scripted(gemini_whole(900, 40, thoughts=120), gemini_events(900, 12, thoughts=60))
    gw = await build("gemini", up, "gemini-2.5-flash")
    secret = await create_key(gw, budget_usd=1.0)
    extra: dict[str, Any] = {} if tier is None else {"service_tier": tier}
    async with openai_client(gw, secret) as sdk:
        got = await sdk.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice="required",
            max_completion_tokens=4_000,
            **extra,
        )
        assert got.choices[0].message.tool_calls, got
        events = await sdk.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
            **extra,
        )
        last = [c async for c in events][-1]
        assert last.usage is not None, last
    assert "service_tier" not in json.dumps(up.bodies)
    await row_and_spend(gw, secret, rows=2)
    rows = await usage_rows(gw)
    exact(rows[0], cost_of(RATES["gemini-2.5-flash"], 900, 160))
    exact(rows[1], cost_of(RATES["gemini-2.5-flash"], 900, 72))


# --- claude-sonnet-4-5 --------------------------------------------------------------------------


# SOUND: SDK chat to claude-sonnet-4-5 through the Anthropic translation, with `service_tier`
# "auto" or "default" (OpenAI's words) and forced function tools, whole and streamed, on a
# $1 USD key: 200, no `speed` or tier priced, charged the list's text cost exactly.
@pytest.mark.parametrize("tier", [None, "auto", "default"])
async def test_sdk_chat_to_claude(build: Build, tier: str | None) -> None:
    tool = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "P"}}
    use = {"input_tokens": 700, "output_tokens": 55, "service_tier": "standard"}
    first = {"input_tokens": 700, "output_tokens": 1, "service_tier": "standard"}
    up = Scripted(
        message(use, [tool]),
        stream(start(first), *text_block(0, "Hi"), *ending({"output_tokens": 55})),
    )
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=1.0)
    extra: dict[str, Any] = {} if tier is None else {"service_tier": tier}
    async with openai_client(gw, secret) as sdk:
        await sdk.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "Weather?"}],
            tools=TOOLS,  # type: ignore[arg-type]
            tool_choice="required",
            max_completion_tokens=1_000,
            **extra,
        )
        events = await sdk.chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            max_completion_tokens=1_000,
            stream=True,
            stream_options={"include_usage": True},
            **extra,
        )
        assert [c async for c in events][-1].usage is not None
    assert all("speed" not in b for b in up.bodies)
    await row_and_spend(gw, secret, rows=2)
    for row in await usage_rows(gw):
        exact(row, mtok(700, SONNET_IN) + mtok(55, SONNET_OUT))


def claude_request(*, streamed: bool) -> dict[str, Any]:
    """A Messages request with a cache-marked system prompt, a tool, adaptive thinking."""
    mark = {"type": "ephemeral"}
    return {
        "model": "m",
        "max_tokens": 16_000,
        "thinking": {"type": "enabled", "budget_tokens": 4_000},
        "system": [{"type": "text", "text": "Rules. " * 2_000, "cache_control": mark}],
        "tools": [
            {
                "name": "get_weather",
                "description": "The weather.",
                "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
                "cache_control": mark,
            }
        ],
        "tool_choice": {"type": "auto"},
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        **({"stream": True} if streamed else {}),
    }


CLAUDE_USAGE = {
    "input_tokens": 12,
    "cache_creation_input_tokens": 2_100,
    "cache_read_input_tokens": 6_000,
    "cache_creation": {"ephemeral_5m_input_tokens": 2_100, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 300,
    "service_tier": "standard",
}
CLAUDE_BILL = (
    mtok(12, SONNET_IN)
    + mtok(2_100, SONNET_WRITE)
    + mtok(6_000, SONNET_READ)
    + mtok(300, SONNET_OUT)
)


def thinking_reply(use: dict[str, Any]) -> bytes:
    blocks = [
        {"type": "thinking", "thinking": "Look it up.", "signature": "sig"},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
    ]
    return message(use, blocks)


def thinking_stream(use: dict[str, Any]) -> bytes:
    think = {"type": "thinking", "thinking": "", "signature": ""}
    think_delta = {"index": 0, "delta": {"type": "thinking_delta", "thinking": "x"}}
    sign_delta = {"index": 0, "delta": {"type": "signature_delta", "signature": "s"}}
    events = [
        ("content_block_start", {"index": 0, "content_block": think}),
        ("content_block_delta", think_delta),
        ("content_block_delta", sign_delta),
        ("content_block_stop", {"index": 0}),
    ]
    first = use | {"output_tokens": 1}
    last = {k: v for k, v in use.items() if k != "service_tier" and k != "cache_creation"}
    return stream(start(first), *events, *text_block(1, "Sunny."), *ending(last))


# SOUND: the anthropic SDK's Messages (cache-marked system and tool, thinking, a tool
# answered, `usage.service_tier` "standard"), whole and streamed, on a $1 USD key, a
# token-only key, a key without budgets and one with a model list (no `fallbacks`, no advisor:
# nothing refused): 200 each, relayed as sent, rows exact, charged exactly what Anthropic
# bills (5-minute writes, reads, output).
@pytest.mark.parametrize(
    "budget", [{"budget_usd": 1.0}, {"budget_tokens": 200_000}, {}, {"models": ("m",)}]
)
async def test_anthropic_sdk_messages(build: Build, budget: dict[str, Any]) -> None:
    up = Scripted(thinking_reply(CLAUDE_USAGE), thinking_stream(CLAUDE_USAGE))
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, **budget)
    client = anthropic.AsyncAnthropic(api_key=secret, base_url=str(gw.make_url("")), max_retries=0)
    try:
        got = await client.messages.create(**claude_request(streamed=False))
        assert got.content[1].type == "tool_use", got
        async with client.messages.stream(**claude_request(streamed=False)) as events:
            final = await events.get_final_message()
        assert final.usage.output_tokens == 300, final
    finally:
        await client.close()
    assert up.bodies[0]["thinking"] == {"type": "enabled", "budget_tokens": 4_000}
    for row in await rows_of(gw, 2):
        exact(row, CLAUDE_BILL)
        assert row["cache_read_tokens"] == 6_000 and row["cache_write_tokens"] == 2_100, row


# SOUND: an answer whose `usage.iterations` lists only the answer's own step (a "message"
# entry, which Anthropic's compaction-era answers carry, repeating the top-level counts) is
# charged once, not twice; and Messages with `service_tier: "auto"` or "standard_only" and a
# `speed` of "standard" are not refused to a USD key.
@pytest.mark.parametrize(
    "extra",
    [{}, {"service_tier": "auto"}, {"service_tier": "standard_only"}, {"speed": "standard"}],
)
async def test_iterations_of_the_answer_only_are_charged_once(
    build: Build, extra: dict[str, Any]
) -> None:
    step = {"type": "message", "input_tokens": 12, "output_tokens": 300}
    step |= {"cache_read_input_tokens": 6_000, "cache_creation_input_tokens": 2_100}
    up = Scripted(thinking_reply(CLAUDE_USAGE | {"iterations": [step]}))
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=1.0)
    status, answer = await post(gw, secret, "/v1/messages", claude_request(streamed=False) | extra)
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    exact(row, CLAUDE_BILL)


# --- Responses ---------------------------------------------------------------------------------

RESPONSES_TOOLS: list[dict[str, Any]] = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": False,
    },
    {"type": "web_search"},
]


def responses_usage(prompt: int, out: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + out,
    }


SEARCH_ITEM = {
    "type": "web_search_call",
    "id": "ws_1",
    "status": "completed",
    "action": {"type": "search", "query": "weather paris"},
}
FUNCTION_ITEM = {
    "type": "function_call",
    "id": "fc_1",
    "call_id": "call_1",
    "name": "get_weather",
    "arguments": '{"city":"Paris"}',
    "status": "completed",
}


def tool_response(rid: str, use: dict[str, Any], tier: str = "default") -> bytes:
    body = response_body(use, [SEARCH_ITEM, FUNCTION_ITEM]) | {"id": rid, "service_tier": tier}
    body |= {"store": True, "tools": RESPONSES_TOOLS, "tool_choice": "required"}
    return whole(body)


def tool_response_events(rid: str, use: dict[str, Any], tier: str = "default") -> bytes:
    base = response_body(None, []) | {"id": rid, "status": "in_progress"}  # type: ignore[arg-type]
    done = response_body(use, [SEARCH_ITEM, FUNCTION_ITEM]) | {"id": rid}
    done["service_tier"] = tier
    searching = SEARCH_ITEM | {"status": "in_progress"}
    events = [
        ("response.created", {"response": base}),
        ("response.output_item.added", {"output_index": 0, "item": searching}),
        ("response.web_search_call.in_progress", {"output_index": 0, "item_id": "ws_1"}),
        ("response.web_search_call.searching", {"output_index": 0, "item_id": "ws_1"}),
        ("response.web_search_call.completed", {"output_index": 0, "item_id": "ws_1"}),
        ("response.output_item.done", {"output_index": 0, "item": SEARCH_ITEM}),
        ("response.output_item.added", {"output_index": 1, "item": FUNCTION_ITEM}),
        ("response.output_item.done", {"output_index": 1, "item": FUNCTION_ITEM}),
        ("response.completed", {"response": done}),
    ]
    return STREAM_HEAD + b"".join(
        sse({"type": kind, "sequence_number": i, **fields}, kind)
        for i, (kind, fields) in enumerate(events)
    )


# SOUND: the SDK's Responses create and stream on a `responses_api` upstream (gpt-5-mini and
# gpt-4o-mini) with a function tool and `web_search`, `tool_choice: "required"`, then a
# `previous_response_id` turn: 200 each, relayed as sent, rows exact, each charged its text
# cost plus one web search call (the one the answer shows) at the list's price; holds released.
@pytest.mark.parametrize("model", ["gpt-4o-mini", "gpt-5-mini"])
async def test_sdk_responses_with_function_and_web_search(build: Build, model: str) -> None:
    use = responses_usage(3_000, 150, cached=1_024, reasoning=64)
    up = Scripted(
        tool_response("resp_1", use),
        tool_response_events("resp_2", use),
        whole(
            response_body(use, [message_item("Sunny.")])
            | {"id": "resp_3", "service_tier": "default"}
        ),
    )
    gw = await build("openai", up, model, fields={"responses_api": True})
    secret = await create_key(gw, budget_usd=1.0)
    tools: Any = RESPONSES_TOOLS
    async with openai_client(gw, secret) as sdk:
        first = await sdk.responses.create(
            model="m", input="Weather in Paris?", tools=tools, tool_choice="required"
        )
        assert first.id == "resp_1"
        async with sdk.responses.stream(
            model="m", input="Again.", tools=tools, tool_choice="required"
        ) as events:
            final = await events.get_final_response()
        assert final.id == "resp_2"
        out: Any = [{"type": "function_call_output", "call_id": "call_1", "output": "Sunny"}]
        third = await sdk.responses.create(
            model="m", input=out, previous_response_id=first.id, tools=tools
        )
        assert third.id == "resp_3"
    assert [b.get("tool_choice") for b in up.bodies] == ["required", "required", None]
    text = cost_of(RATES[model], 3_000, 150, cached=1_024)
    _, spend = await row_and_spend(gw, secret, rows=3)
    rows = await usage_rows(gw)
    exact(rows[0], text + SEARCH_CALL)
    exact(rows[1], text + SEARCH_CALL)
    exact(rows[2], text)
    relative(spend.usd, 3 * text + 2 * SEARCH_CALL)
    assert spend.held_usd == 0.0, spend


# SOUND: Responses through the chat translation (gpt-4o-mini, no `responses_api`) with a
# function tool forced, `service_tier` "auto" or "flex", whole and streamed: 200 each,
# charged the text cost, rows exact.
@pytest.mark.parametrize("tier", ["auto", "flex"])
async def test_sdk_responses_translated(build: Build, tier: str) -> None:
    use = usage(800, 40)
    up = Scripted(tool_answer(use, "default"), tool_stream(use, "default"))
    gw = await build("openai", up, "gpt-4o-mini")
    secret = await create_key(gw, budget_usd=1.0)
    tools: Any = RESPONSES_TOOLS[:1]
    async with openai_client(gw, secret) as sdk:
        got = await sdk.responses.create(
            model="m", input="Weather?", tools=tools, tool_choice="required", service_tier=tier
        )
        assert got.output[0].type == "function_call", got
        async with sdk.responses.stream(
            model="m", input="Weather?", tools=tools, tool_choice="required", service_tier=tier
        ) as events:
            await events.get_final_response()
    await row_and_spend(gw, secret, rows=2)
    for row in await usage_rows(gw):
        exact(row, cost_of(RATES["gpt-4o-mini"], 800, 40))


# SOUND: a Responses stream of a plain answer (h110's events) on gpt-5-mini whose request
# says `service_tier: "flex"` and whose terminal response says "flex" is charged the list's
# flex rates; one that says "default" the standard ones (33e570c: standard for both).
@pytest.mark.parametrize("served", ["flex", "default"])
async def test_responses_stream_charged_at_the_tier_answered(build: Build, served: str) -> None:
    use = responses_usage(1_000, 100)
    up = Scripted(tool_response_events("resp_f", use, served))
    gw = await build("openai", up, "gpt-5-mini", fields={"responses_api": True})
    secret = await create_key(gw, budget_usd=1.0)
    tools: Any = RESPONSES_TOOLS
    async with (
        openai_client(gw, secret) as sdk,
        sdk.responses.stream(model="m", input="hi", tools=tools, service_tier="flex") as events,
    ):
        await events.get_final_response()
    row, _ = await row_and_spend(gw, secret)
    rates = FLEX["gpt-5-mini"] if served == "flex" else RATES["gpt-5-mini"]
    exact(row, cost_of(rates, 1_000, 100) + SEARCH_CALL)


# --- upstream errors and breakers ----------------------------------------------------------------


def http(status: str, payload: Any, headers: str = "") -> bytes:
    body = json.dumps(payload).encode()
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{headers}"
    return head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body


OPENAI_400 = http(
    "400 Bad Request",
    {
        "error": {
            "message": "Unrecognized request argument supplied: reasoning_effortt",
            "type": "invalid_request_error",
            "param": "reasoning_effortt",
            "code": None,
        }
    },
)
ANTHROPIC_400 = http(
    "400 Bad Request",
    {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "tools.0.custom.input_schema: Field required",
        },
    },
)
# (A 400 that quotes the client's own text, the credit phrase among it.)
ANTHROPIC_400_QUOTING = http(
    "400 Bad Request",
    {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "messages.0.content.0.text: 'Your credit balance is too low to access "
            "the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.' "
            "is not a valid cache_control",
        },
    },
)
GEMINI_400 = http(
    "400 Bad Request",
    {
        "error": {
            "code": 400,
            "message": 'Invalid JSON payload received. Unknown name "foo": Cannot find field.',
            "status": "INVALID_ARGUMENT",
        }
    },
)
CHAT = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}


def state(gw: TestClient[Any, Any]) -> str:
    return router_of(gw).breakers.state(("up0", 0))


# SOUND: an upstream 400 that is the client's own (a bad field) reaches the client as a 400
# with the upstream's message, on OpenAI chat, Anthropic Messages (a message quoting the
# credit phrase among the client's own words included) and Gemini chat; every key kind; the
# account's breaker stays closed and the next request is answered.
@pytest.mark.parametrize(
    ("kind", "model", "path", "reply", "said"),
    [
        ("openai", "gpt-4o-mini", "/v1/chat/completions", OPENAI_400, "reasoning_effortt"),
        ("anthropic", SONNET, "/v1/messages", ANTHROPIC_400, "input_schema: Field required"),
        ("anthropic", SONNET, "/v1/messages", ANTHROPIC_400_QUOTING, "not a valid cache_control"),
        ("gemini", "gemini-2.5-flash", "/v1/chat/completions", GEMINI_400, 'Unknown name "foo"'),
    ],
)
@pytest.mark.parametrize("budget", [{"budget_usd": 1.0}, {"budget_tokens": 1_000}, {}])
async def test_client_400_relayed(
    build: Build,
    kind: str,
    model: str,
    path: str,
    reply: bytes,
    said: str,
    budget: dict[str, Any],
) -> None:
    ok = message({"input_tokens": 5, "output_tokens": 2}) if kind == "anthropic" else None
    if kind == "openai":
        ok = tool_answer(usage(5, 2), "default")
    if kind == "gemini":
        ok = gemini_whole(5, 2)
    up = Scripted(reply, reply, ok or b"")
    gw = await build(kind, up, model)
    secret = await create_key(gw, **budget)
    for _ in range(2):
        status, answer = await post(gw, secret, path, CHAT)
        assert status == 400, answer
        text = json.dumps(answer)
        assert said.replace('"', '\\"') in text, answer
    assert state(gw) == "closed"
    status, answer = await post(gw, secret, path, CHAT)
    assert status == 200, answer


# SOUND: ordinary upstream 429s (with retry-after) and 5xx (a 500, Anthropic's 529) take the
# account out as before: a 429 with retry-after for its pause ("open"), a single 500 or 529 not
# at all below the failure threshold ("closed"), three 500s for the cooldown ("open"); none is
# "disabled", and the client gets a 429 or a 5xx that is no out-of-credit 503.
@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini"])
async def test_breakers_for_ordinary_429_and_5xx(build: Build, kind: str) -> None:
    model = {"openai": "gpt-4o-mini", "anthropic": SONNET, "gemini": "gemini-2.5-flash"}[kind]
    path = "/v1/messages" if kind == "anthropic" else "/v1/chat/completions"
    limited = http(
        "429 Too Many Requests",
        {"error": {"message": "Rate limit reached for requests", "type": "requests"}},
        "retry-after: 20\r\n",
    )
    failed = http("500 Internal Server Error", {"error": {"message": "boom", "type": "server"}})
    overloaded = http(
        "529 Overloaded", {"type": "error", "error": {"type": "overloaded_error", "message": "x"}}
    )
    secret_budget = {"budget_usd": 1.0}

    up = Scripted(failed)
    gw = await build(kind, up, model)
    secret = await create_key(gw, **secret_budget)
    status, answer = await post(gw, secret, path, CHAT)
    assert status in (502, 503, 529), answer  # (529: Anthropic's own word for an overload)
    assert answer["error"].get("code") != "upstream_quota_exhausted", answer
    assert state(gw) == "closed"
    for _ in range(2):
        await post(gw, secret, path, CHAT)
    assert state(gw) == "open"

    up2 = Scripted(limited)
    gw2 = await build(kind, up2, model)
    secret2 = await create_key(gw2, **secret_budget)
    status, answer = await post(gw2, secret2, path, CHAT)
    assert status == 429, answer
    assert state(gw2) == "open"

    if kind == "anthropic":
        up3 = Scripted(overloaded)
        gw3 = await build(kind, up3, model)
        secret3 = await create_key(gw3, **secret_budget)
        status, answer = await post(gw3, secret3, path, CHAT)
        assert status in (502, 503, 529), answer
        assert state(gw3) == "closed"


# --- keys without USD budgets: nothing new refused --------------------------------------------


# SOUND: a token-only key and a key without budgets are not refused Responses built-in tools
# (image generation at any quality, code interpreter, file search) or Anthropic's `speed`;
# the upstream answers and the tokens are charged.
@pytest.mark.parametrize("budget", [{"budget_tokens": 500_000}, {}])
async def test_unbudgeted_keys_keep_built_in_tools(build: Build, budget: dict[str, Any]) -> None:
    use = responses_usage(100, 10)
    up = Scripted(whole(response_body(use, [message_item("ok")]) | {"id": "resp_x"}))
    gw = await build("openai", up, "gpt-4o-mini", fields={"responses_api": True})
    secret = await create_key(gw, **budget)
    body = {
        "model": "m",
        "input": "Draw.",
        "tools": [
            {"type": "image_generation", "quality": "high"},
            {"type": "code_interpreter", "container": {"type": "auto"}},
            {"type": "file_search", "vector_store_ids": ["vs_1"]},
        ],
    }
    status, answer = await post(gw, secret, "/v1/responses", body)
    assert status == 200, answer


# SOUND: a Responses request whose only tool is a web search, forced (`tool_choice` "required"
# or the tool's own type), whole and streamed, is charged the text cost and the one search
# its answer shows, not a second "forced" one; rows exact.
@pytest.mark.parametrize("choice", ["required", {"type": "web_search_preview"}])
async def test_forced_web_search_charged_once(build: Build, choice: Any) -> None:
    use = responses_usage(1_500, 90)
    only = [SEARCH_ITEM, message_item("Sunny.")]
    body = response_body(use, only) | {"id": "resp_w", "service_tier": "default"}
    up = Scripted(whole(body), tool_response_events("resp_w2", use))
    gw = await build("openai", up, "gpt-4o-mini", fields={"responses_api": True})
    secret = await create_key(gw, budget_usd=1.0)
    tools: Any = [{"type": "web_search_preview"}]
    async with openai_client(gw, secret) as sdk:
        await sdk.responses.create(model="m", input="Weather?", tools=tools, tool_choice=choice)
        async with sdk.responses.stream(
            model="m", input="Weather?", tools=tools, tool_choice=choice
        ) as events:
            await events.get_final_response()
    _, spend = await row_and_spend(gw, secret, rows=2)
    for row in await usage_rows(gw):
        exact(row, cost_of(RATES["gpt-4o-mini"], 1_500, 90) + SEARCH_CALL)
    assert spend.held_usd == 0.0, spend


RESPONSES_400 = http(
    "400 Bad Request",
    {
        "error": {
            "message": "Unsupported parameter: 'temperature' is not supported with this model.",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": "unsupported_parameter",
        }
    },
)


# SOUND: the client's own 400 from a Responses pass-through (OpenAI's "Unsupported parameter")
# and from Anthropic behind the chat translation reach the SDK as a 400 `BadRequestError`
# with the upstream's message; the breaker stays closed.
@pytest.mark.parametrize(
    ("kind", "model", "fields", "reply", "said"),
    [
        ("openai", "gpt-5-mini", {"responses_api": True}, RESPONSES_400, "'temperature'"),
        ("anthropic", SONNET, {}, ANTHROPIC_400, "input_schema: Field required"),
    ],
)
async def test_client_400_reaches_the_sdk(
    build: Build, kind: str, model: str, fields: dict[str, Any], reply: bytes, said: str
) -> None:
    up = Scripted(reply)
    gw = await build(kind, up, model, fields=fields)
    secret = await create_key(gw, budget_usd=1.0)
    async with openai_client(gw, secret) as sdk:
        with pytest.raises(openai.BadRequestError) as caught:
            if kind == "openai":
                await sdk.responses.create(model="m", input="hi", temperature=0.2)
            else:
                await sdk.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=100
                )
    assert caught.value.status_code == 400
    assert said in str(caught.value), caught.value
    assert state(gw) == "closed"


# WRONG (low; USD budgets, Responses image tool): a Responses request that declares OpenAI's
# `image_generation` tool without `max_tool_calls` (as ChatGPT-style apps declare it on every
# turn) is held as ten images at the most each can bill (10 x 6,240 tokens x $40/Mtok =
# $2.50), so every key with less than $2.50 left is now refused it (a 200 at 33e570c, when the
# image was not charged: the refusal itself follows from the day's deliberate change). What
# is wrong is the refusal's advice: "this request may use up to 4107 tokens ($2.4985). Lower
# max_tokens or wait for the next period." Lowering max_tokens frees $0.0009 of the $2.50;
# the 4,107 "tokens" are not what is held. A user follows the advice and is refused again
# (and the 429 `insufficient_quota` makes the SDK retry twice first). The same text predates
# today for web searches ($0.10 held), where it rarely matters; image calls make it the
# common case. Right: when the hold is mostly built-in tool calls, say so and point at
# `max_tool_calls` (with it at 1 the same $1 key is admitted).
async def test_image_tool_refusal_points_at_max_tool_calls(build: Build) -> None:
    use = responses_usage(100, 10)
    up = Scripted(whole(response_body(use, [message_item("ok")]) | {"id": "resp_i"}))
    gw = await build("openai", up, "gpt-4o-mini", fields={"responses_api": True})
    secret = await create_key(gw, budget_usd=1.0)
    body = {"model": "m", "input": "Draw a cat.", "tools": [{"type": "image_generation"}]}
    status, answer = await post(gw, secret, "/v1/responses", body | {"max_tool_calls": 1})
    assert status == 200, answer
    status, answer = await post(gw, secret, "/v1/responses", body)
    if status == 200:
        return
    said = answer["error"]["message"]
    assert "max_tool_calls" in said or "tool" in said.lower(), said


def legacy(use: dict[str, Any], tier: str) -> bytes:
    return whole(
        {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": "gpt-3.5-turbo-instruct",
            "choices": [{"text": " ok", "index": 0, "logprobs": None, "finish_reason": "stop"}],
            "usage": use,
            "service_tier": tier,
        }
    )


def legacy_events(use: dict[str, Any]) -> bytes:
    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "x"}
    text = chunk | {"choices": [{"text": " ok", "index": 0, "finish_reason": None}]}
    end = chunk | {"choices": [{"text": "", "index": 0, "finish_reason": "stop"}]}
    last = chunk | {"choices": [], "usage": use}
    return STREAM_HEAD + sse(text) + sse(end) + sse(last) + b"data: [DONE]\n\n"


# SOUND: legacy completions (gpt-3.5-turbo-instruct, $1.50 / $2) with `service_tier` "auto"
# or "default" (a field the gateway now reads), whole and streamed with `include_usage`, on
# a USD key: relayed as sent, 200, charged the text cost exactly.
@pytest.mark.parametrize("tier", ["auto", "default"])
async def test_legacy_completions_with_a_tier(build: Build, tier: str) -> None:
    use = {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}
    up = Scripted(legacy(use, "default"), legacy_events(use))
    gw = await build("openai", up, "gpt-3.5-turbo-instruct")
    secret = await create_key(gw, budget_usd=1.0)
    async with openai_client(gw, secret) as sdk:
        await sdk.completions.create(
            model="m", prompt="Say ok.", max_tokens=16, extra_body={"service_tier": tier}
        )
        events = await sdk.completions.create(
            model="m",
            prompt="Say ok.",
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"service_tier": tier},
        )
        assert [c async for c in events][-1].usage is not None
    assert [b["service_tier"] for b in up.bodies] == [tier, tier]
    await row_and_spend(gw, secret, rows=2)
    for row in await usage_rows(gw):
        exact(row, mtok(12, 1.5) + mtok(5, 2.0))
