"""Attack on the two latest commits (helper-112): Gemini's modality details read leniently and a
prompt's `audio_tokens` counting its cached part (0f7f662), and server-tool searches held only
on the routes that run such tools (`Call.searches_on`, 3662b7f).

Each failing test asserts what should happen; the comment above it says what is wrong,
expected vs actual, severity. Passing tests marked `# SOUND:` pin what was checked and held.
Upstreams are in-process raw TCP servers (tests/raw_upstream); fixtures and helpers are
helper-105's, -107's and -111's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient

from gateway.prices import Price, Rates, Usage
from gateway.settings import ModelConfig, RoutingSettings, Target
from tests import test_attack_h105
from tests.conftest import MakeSettings, create_key, provider_config, start_gateway
from tests.raw_upstream import RawUpstream
from tests.test_attack_h105 import (
    BASE,
    Build,
    completion,
    gemini_answer,
    message_item,
    mtok,
    post,
    response_body,
    row_and_spend,
    whole,
)
from tests.test_attack_h107 import message, search_request
from tests.test_attack_h111 import (
    AUDIO,
    AUDIO_CHAT,
    RESPONSE_USAGE,
    gemini_cost,
    text_cost,
    usage_of,
)

build = test_attack_h105.build  # (the fixture, by its name)

ASK = {"model": "m", "input": "News?", "max_output_tokens": 20}
SEARCH = {"tools": [{"type": "web_search"}]}


@pytest.fixture
async def two_routes(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> AsyncIterator[Any]:
    """A gateway whose model "m" has two routes: `kinds` (provider type, fields, upstream
    model) in order, each over its own raw upstream."""
    servers: list[asyncio.Server] = []

    async def make(*routes: tuple[str, dict[str, Any], str, RawUpstream]) -> Any:
        providers, targets = [], []
        for i, (kind, fields, model, up) in enumerate(routes):
            server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
            servers.append(server)
            port = up.port = server.sockets[0].getsockname()[1]
            providers.append(
                provider_config(
                    kind,
                    name=f"up{i}",
                    base_url=f"http://127.0.0.1:{port}{BASE[kind]}",
                    api_keys=("sk-up-0123456789abcdefghij",),
                    **fields,
                )
            )
            targets.append(Target(provider=f"up{i}", model=model))
        settings = make_settings(
            providers=tuple(providers),
            models=(ModelConfig(name="m", targets=tuple(targets)),),
            routing=RoutingSettings(max_attempts=1, backoff_initial=0.0),
        )
        return await start_gateway(aiohttp_client, settings)

    yield make
    for server in servers:
        server.close()


def responses_up() -> RawUpstream:
    return RawUpstream(whole(response_body(RESPONSE_USAGE, [message_item("ok")])), hold=False)


def chat_up() -> RawUpstream:
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    return RawUpstream(completion(usage), hold=False)


# --- 3662b7f: searches held on the routes that run them ---------------------------------------


# SOUND: a model with a pass-through route and a translated one holds the searches (on the
# pass-through, the costliest), whichever route is listed first: $0.05 refuses 10 searches
# (429, nothing upstream), admits 1, which goes to the pass-through only.
@pytest.mark.parametrize("passthrough_first", [True, False])
async def test_mixed_routes_hold_the_searches(two_routes: Any, passthrough_first: bool) -> None:
    native, chat = responses_up(), chat_up()
    routes = [
        ("openai", {"responses_api": True}, "gpt-5-mini", native),
        ("openai", {"responses_api": False}, "gpt-5-mini", chat),
    ]
    gw = await two_routes(*(routes if passthrough_first else routes[::-1]))
    secret = await create_key(gw, budget_usd=0.05)
    status, answer = await post(gw, secret, "/v1/responses", ASK | SEARCH)
    assert status == 429, answer
    assert native.bodies == [] and chat.bodies == []
    body = ASK | SEARCH | {"max_tool_calls": 1}
    status, answer = await post(gw, secret, "/v1/responses", body)
    assert status == 200, answer
    assert len(native.bodies) == 1 and chat.bodies == []


# SOUND: a plain Responses request (no search tool) to the same mixed model on a near-empty
# budget is admitted: nothing is held for searches it cannot make.
async def test_mixed_routes_plain_request_is_not_held_searches(two_routes: Any) -> None:
    gw = await two_routes(
        ("openai", {"responses_api": True}, "gpt-5-mini", responses_up()),
        ("openai", {"responses_api": False}, "gpt-5-mini", chat_up()),
    )
    secret = await create_key(gw, budget_usd=0.001)
    status, answer = await post(gw, secret, "/v1/responses", ASK)
    assert status == 200, answer


# SOUND: Messages with a web_search server tool to a model with no Messages pass-through
# (OpenAI, Gemini) on a budget under one search is refused with the translation's 400 (not a
# 429 quota error), as a key without budget is; nothing goes upstream.
@pytest.mark.parametrize(
    ("kind", "model"), [("openai", "gpt-4o-mini"), ("gemini", "gemini-2.5-flash")]
)
async def test_messages_search_to_translated_model_is_400(
    build: Build, kind: str, model: str
) -> None:
    up = chat_up()
    gw = await build(kind, up, model)
    free = await create_key(gw)
    status, expected = await post(gw, free, "/v1/messages", search_request())
    assert status == 400, expected
    secret = await create_key(gw, budget_usd=0.001)
    status, answer = await post(gw, secret, "/v1/messages", search_request())
    assert status == 400, answer
    assert answer["error"] == expected["error"]
    assert up.bodies == []


# SOUND: to an Anthropic model the same request is still held its 20 searches ($0.20):
# a $0.05 budget is refused 429, nothing goes upstream.
async def test_messages_search_to_anthropic_is_still_held(build: Build) -> None:
    usage = {"input_tokens": 10, "output_tokens": 5}
    up = RawUpstream(message(usage), hold=False)
    gw = await build("anthropic", up, "claude-sonnet-4-5")
    secret = await create_key(gw, budget_usd=0.05)
    status, answer = await post(gw, secret, "/v1/messages", search_request())
    assert status == 429, answer
    assert up.bodies == []


# SOUND: Messages to a model with an Anthropic route and an OpenAI one holds the searches on
# the Anthropic route (429 on $0.05), whichever comes first.
@pytest.mark.parametrize("anthropic_first", [True, False])
async def test_messages_mixed_routes_hold_the_searches(
    two_routes: Any, anthropic_first: bool
) -> None:
    usage = {"input_tokens": 10, "output_tokens": 5}
    native, chat = RawUpstream(message(usage), hold=False), chat_up()
    routes = [
        ("anthropic", {}, "claude-sonnet-4-5", native),
        ("openai", {}, "gpt-4o-mini", chat),
    ]
    gw = await two_routes(*(routes if anthropic_first else routes[::-1]))
    secret = await create_key(gw, budget_usd=0.05)
    status, answer = await post(gw, secret, "/v1/messages", search_request())
    assert status == 429, answer
    assert native.bodies == [] and chat.bodies == []


# SOUND: `max_tool_calls` of exactly 1,000 beside a web search passes a key without budget;
# 1,001 and `true` are 400s naming `max_tool_calls`, never 500s.
async def test_max_tool_calls_bound(build: Build) -> None:
    up = responses_up()
    gw = await build("openai", up, "gpt-5-mini", fields={"responses_api": True})
    free = await create_key(gw)
    status, answer = await post(gw, free, "/v1/responses", ASK | SEARCH | {"max_tool_calls": 1000})
    assert status == 200, answer
    for most in (1001, True):
        body = ASK | SEARCH | {"max_tool_calls": most}
        status, answer = await post(gw, free, "/v1/responses", body)
        assert status == 400, answer
        assert "max_tool_calls" in (answer["error"].get("param") or ""), answer


# --- 0f7f662: Gemini's modality details read leniently ------------------------------------------


def _prompt_details(entries: list[Any]) -> dict[str, Any]:
    usage = usage_of(AUDIO, AUDIO)
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": 10}, *entries]
    return usage


# SOUND: odd prompt-detail entries (lists, strings, None, numbers, bools as counts, huge ints,
# float counts, strings as counts, nested lists, duplicate AUDIO entries) answer 200 with the
# usage read (not estimated), and cost between the text cost of the counts and the costliest
# reading (every prompt token as uncached audio).
@pytest.mark.parametrize(
    "entries",
    [
        [[1, 2]],
        ["AUDIO"],
        [None],
        [5],
        [True],
        [{"modality": "AUDIO", "tokenCount": True}],
        [{"modality": "AUDIO", "tokenCount": 10**30}],
        [{"modality": "AUDIO", "tokenCount": -(10**30)}],
        [{"modality": "AUDIO", "tokenCount": 1.5}],
        [{"modality": "AUDIO", "tokenCount": "100000"}],
        [{"modality": "AUDIO", "tokenCount": None}],
        [{"modality": ["AUDIO"], "tokenCount": 100_000}],
        [{"modality": "AUDIO", "tokenCount": 100_000}] * 3,
        [{"modality": "AUDIO", "tokenCount": 2**40}] * 100,
        [[[[[{"modality": "AUDIO", "tokenCount": 5}]]]]],
    ],
)
async def test_odd_modality_entries(build: Build, entries: list[Any]) -> None:
    reply = gemini_answer(_prompt_details(entries), [{"text": "ok"}])
    status, answer, row = await gemini_cost(build, reply)
    assert status == 200, answer
    assert not row["estimated"], row
    floor = text_cost(100_010, 100_000, 10)
    ceiling = mtok(100_010, 1.00) + mtok(10, 2.50)
    assert floor * 0.999 <= row["cost_usd"] <= ceiling * 1.001, (row["cost_usd"], floor)


# SOUND: the details themselves of any type (a string, a number, a bool, an object, null) on
# each of the three fields answer 200 with the counts read.
@pytest.mark.parametrize("field", ["promptTokensDetails", "candidatesTokensDetails"])
@pytest.mark.parametrize("value", ["AUDIO", 5, True, {"modality": "AUDIO"}, None, 10**40])
async def test_odd_details_types(build: Build, field: str, value: Any) -> None:
    usage = usage_of(AUDIO, AUDIO)
    usage[field] = value
    status, answer, row = await gemini_cost(build, gemini_answer(usage, [{"text": "ok"}]))
    assert status == 200, answer
    assert not row["estimated"], row
    assert row["cost_usd"] >= text_cost(100_010, 100_000, 10) * 0.999


# WRONG (low, USD budgets): the details are "read leniently: an odd entry costs that entry,
# not the counts beside it" (wire.py), but a number past float range anywhere in them (here
# `"tokenCount": 1e400`, equally any other key of an entry) still makes msgspec's decode of
# the `object` fields fail ("Number out of range"), and `read_usage` drops every count: the
# row is estimated at the request's own estimate ($0.0000274: 8 prompt tokens, this one-line
# text prompt) where the reported counts' text cost alone is $0.0030 (100,010 tokens, 100,000
# cached). Expected: the entry ignored (as `10**30` is), the other counts kept, not estimated.
# Actual: estimated, ~110x under. Realistic: low (Google never sends it; a broken proxy
# might), but it is exactly the class of input the commit claims to tolerate.
async def test_out_of_float_range_entry_keeps_the_counts(build: Build) -> None:
    usage = usage_of(AUDIO, AUDIO)
    usage["promptTokensDetails"] = [
        {"modality": "TEXT", "tokenCount": 10},
        {"modality": "AUDIO", "tokenCount": 100_000},
        {"modality": "VIDEO", "tokenCount": "@BIG@"},
    ]
    reply = gemini_answer(usage, [{"text": "ok"}]).replace(b'"@BIG@"', b"1e400")
    body = reply.split(b"\r\n\r\n", 1)[1]
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d" % len(body)
    # (A prompt of the size reported: a tiny one would have its 100,010 tokens lowered to the
    # prompt bound, the request's bytes and slack, as any implausible count is.)
    audio = {
        "type": "input_audio",
        "input_audio": {"data": "SUQz" + "A" * 400_000, "format": "mp3"},
    }
    chat = {
        "model": "m",
        "max_tokens": 10,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, audio]}],
    }
    status, answer, row = await gemini_cost(build, head + b"\r\n\r\n" + body, chat)
    assert status == 200, answer
    assert row["cost_usd"] >= text_cost(100_010, 100_000, 10) * 0.999, (row["cost_usd"], row)
    assert not row["estimated"], row


# --- 0f7f662: audio_tokens count the cached part (OpenAI-compatible upstreams) ----------------


# WRONG (low, USD budgets): an OpenAI-compatible upstream reporting `audio_tokens` below
# `cached_audio_tokens` (the only consistent reading: `audio_tokens` is the uncached audio,
# which is exactly what this gateway itself reported for Gemini before 0f7f662, so a
# Token Kiosk chained behind an older one sends it) has its uncached audio priced at the text
# rate: `_media` now takes `audio_input - cached_audio` = max(50,000 - 100,000, 0) = 0. Before
# 0f7f662 the 50,000 were priced at the audio rate. gpt-realtime-mini here: 50,000 uncached
# prompt tokens are charged $0.60/Mtok (text) instead of $10/Mtok (audio): $0.060 charged in
# all where the upstream's bill under its only consistent reading is $0.530 (~9x under).
# Expected: the larger reading (uncached audio = `audio_tokens` when it is below
# the cached audio). Actual: no audio charge. Realistic: low (no first-party upstream sends
# `cached_audio_tokens`), but a regression for the one that does.
async def test_openai_audio_below_cached_audio_is_not_free(build: Build) -> None:
    usage = {
        "prompt_tokens": 150_010,
        "completion_tokens": 10,
        "total_tokens": 150_020,
        "prompt_tokens_details": {
            "cached_tokens": 100_000,
            "audio_tokens": 50_000,
            "cached_audio_tokens": 100_000,
        },
    }
    up = RawUpstream(completion(usage), hold=False)
    gw = await build("openai", up, "gpt-realtime-mini")
    secret = await create_key(gw, budget_usd=50.0)
    status, answer = await post(gw, secret, "/v1/chat/completions", AUDIO_CHAT)
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    # gpt-realtime-mini: text in $0.60, audio in $10, cached audio $0.30, output $2.40
    floor = mtok(50_000, 10.0) + mtok(100_000, 0.30) + mtok(10, 0.60) + mtok(10, 2.40)
    assert row["cost_usd"] >= floor * 0.999, (row["cost_usd"], floor)


# SOUND (unit): whatever the audio counts, the cost never falls below the text cost of the
# tokens (audio rates above text rates), and cached audio past the cached tokens or audio past
# the uncached ones is capped.
@pytest.mark.parametrize(
    ("audio", "cached_audio"),
    [(0, 100), (50, 100), (100, 100), (10**12, 0), (0, 10**12), (10**12, 10**12), (100, 0)],
)
def test_cost_never_below_text(audio: int, cached_audio: int) -> None:
    rates = Rates(
        input=1.0,
        output=2.0,
        cached_input=0.1,
        cached_audio_input=0.3,
        cache_write=1.0,
        reasoning=2.0,
        audio_input=10.0,
        audio_output=20.0,
    )
    price = Price(rates)
    usage = Usage(200, 10, 100, 0, audio_input=audio, cached_audio=cached_audio)
    text = price.cost(Usage(200, 10, 100, 0))
    most = price.cost(Usage(200, 10, 100, 0, audio_input=200, cached_audio=100))
    assert text <= price.cost(usage) <= most * 1.000001
