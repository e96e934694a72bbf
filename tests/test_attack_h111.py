"""Attack on helper-110's last two commits (helper-111): a Responses request's built-in
`web_search` tool held at admission (`handlers.responses._searches_at_most`, 5fe9d4d), and
Gemini's cached audio (`cacheTokensDetails`) priced at the cached audio rate and shown as
`prompt_tokens_details.cached_audio_tokens` (4da09fb).

Each failing test asserts what should happen; the comment above it says what is wrong,
expected vs actual, severity and realism. Passing tests marked `# SOUND:` pin what was checked
and held. Upstreams are in-process raw TCP servers (tests/raw_upstream); the fixtures and
helpers are helper-105's (tests/test_attack_h105).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.pipeline import _counts
from gateway.prices import Usage
from gateway.providers.gemini.response import openai_usage
from gateway.providers.gemini.wire import USAGE_DECODER
from gateway.trace import RequestTrace
from tests import test_attack_h105
from tests.conftest import create_key
from tests.raw_upstream import STREAM_HEAD, RawUpstream, auth, sse
from tests.test_attack_h105 import (
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

build = test_attack_h105.build  # (the fixture, by its name)

RESPONSE_USAGE = {
    "input_tokens": 50,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 20,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 70,
}
ASK = {"model": "m", "input": "News?", "max_output_tokens": 20}


async def responses_gateway(build: Build, *, responses_api: bool = True) -> tuple[Any, RawUpstream]:
    up = RawUpstream(whole(response_body(RESPONSE_USAGE, [message_item("ok")])), hold=False)
    gw = await build("openai", up, "gpt-5-mini", fields={"responses_api": responses_api})
    return gw, up


# --- 5fe9d4d: web search tools held at admission ------------------------------------------------


# SOUND: `max_tool_calls` past any budget (up to and past 64 bits, up to 2**1023) is a 429
# (budget), never a 500, and nothing goes upstream; a key without a budget is not held (its
# request with a huge `max_tool_calls` passes through as sent).
@pytest.mark.parametrize("most", [2**31, 2**63 - 1, 2**63, 2**64, 10**30, 2**1023])
async def test_huge_max_tool_calls(build: Build, most: int) -> None:
    gw, up = await responses_gateway(build)
    budget = await create_key(gw, budget_usd=1_000.0)
    free = await create_key(gw)
    raw = b'{"model": "m", "input": "q", "max_output_tokens": 20, "max_tool_calls": %d, ' % most
    raw += b'"tools": [{"type": "web_search"}]}'
    headers = {"Content-Type": "application/json"}
    async with gw.post("/v1/responses", data=raw, headers=auth(budget) | headers) as resp:
        text = await resp.text()
        assert resp.status in (400, 429), text
    assert up.bodies == []
    async with gw.post("/v1/responses", data=raw, headers=auth(free) | headers) as resp:
        text = await resp.text()
        assert resp.status in (200, 400), text
        if resp.status == 200:
            assert up.bodies[-1]["max_tool_calls"] == most


# SOUND: what is not a built-in web search tool holds no search: a function tool named
# `web_search`, a type that is no string, an unknown built-in tool; a tokens budget is not
# touched by searches. A $0.005 budget (under one search at $0.01) is admitted for each.
# (`file_search` and `code_interpreter` hold their own fees since: tests/test_tool_fees.py.)
@pytest.mark.parametrize(
    "tool",
    [
        {"type": "function", "name": "web_search", "parameters": {"type": "object"}},
        {"type": "function", "name": "web_search_preview", "parameters": {}},
        {"type": "mcp", "server_label": "x", "server_url": "https://example.com/mcp"},
    ],
)
async def test_tools_that_do_not_search_hold_none(build: Build, tool: dict[str, Any]) -> None:
    gw, up = await responses_gateway(build)
    secret = await create_key(gw, budget_usd=0.005)
    status, answer = await post(gw, secret, "/v1/responses", ASK | {"tools": [tool]})
    assert status == 200, answer
    assert len(up.bodies) == 1


# SOUND: odd tool shapes are refused (400) or ignored, never a 500.
@pytest.mark.parametrize(
    "tool",
    [
        b'{"type": 5}',
        b'{"type": ["web_search"]}',
        b'{"type": null}',
        b'{"type": {"web_search": 1}}',
        b'"web_search"',
        b"[]",
        b"5",
        b'{"type": "web_search", "type": "function"}',
        b'{"type": "WEB_SEARCH"}',
        b'{"type": "\\ud800web_search"}',
        b'{"type": "web_search\\u0000"}',
    ],
)
async def test_odd_tool_shapes_are_never_500(build: Build, tool: bytes) -> None:
    gw, _ = await responses_gateway(build)
    for secret in (await create_key(gw, budget_usd=0.05), await create_key(gw)):
        raw = b'{"model": "m", "input": "q", "max_output_tokens": 20, "tools": [%b]}' % tool
        headers = auth(secret) | {"Content-Type": "application/json"}
        async with gw.post("/v1/responses", data=raw, headers=headers) as resp:
            assert resp.status < 500, (resp.status, await resp.text())


# SOUND: a tokens budget is not held searches: a 1,000-token key is admitted a web search
# request without `max_tool_calls`, and charged its tokens.
async def test_tokens_budget_key_is_not_held_searches(build: Build) -> None:
    gw, _ = await responses_gateway(build)
    secret = await create_key(gw, budget_tokens=1_000)
    body = ASK | {"tools": [{"type": "web_search"}]}
    status, answer = await post(gw, secret, "/v1/responses", body)
    assert status == 200, answer
    _, spend = await row_and_spend(gw, secret)
    assert spend.tokens == 70


# SOUND: `max_tool_calls` holds exactly its searches: $0.05 admits 4 ($0.04 + tokens), refuses
# 5 ($0.05 + tokens); with several web search tools the hold is still `max_tool_calls`.
async def test_max_tool_calls_holds_its_searches(build: Build) -> None:
    gw, _ = await responses_gateway(build)
    secret = await create_key(gw, budget_usd=0.05)
    tools = [{"type": "web_search"}, {"type": "web_search_preview"}]
    status, answer = await post(
        gw, secret, "/v1/responses", ASK | {"tools": tools, "max_tool_calls": 5}
    )
    assert status == 429, answer
    status, answer = await post(
        gw, secret, "/v1/responses", ASK | {"tools": tools, "max_tool_calls": 4}
    )
    assert status == 200, answer


# WRONG (medium, any key with a budget or tokens per minute): a `max_tool_calls` of 2**1024 or
# more answers 500. `_searches_at_most` returns it as is (the schema has `ge=1` and no upper
# bound, and msgspec decodes any integer into a Python int) and `pipeline._charge` multiplies it
# by the search price: `int * float` raises OverflowError ("int too large to convert to float")
# inside admission, an unhandled 500 "The gateway failed to process the request" with a stack
# trace in the log. Any key that admission holds for (USD budget, tokens budget, tokens per
# minute) hits it; a key without limits is relayed. Expected: 400 (`param: "max_tool_calls"`)
# or a 429 refusal like 10**30's. Actual: 500.
# Realistic: client input only (a 310-digit number), so a hostile or fuzzing client: it turns
# a client error into a server error (alerts, 5xx error budgets, retries by SDKs that retry
# 500s: the openai SDK retries 500 twice). Messages' `max_uses` has a bound (1,000); this has
# none.
@pytest.mark.parametrize(
    "limits",
    [{"budget_usd": 1_000.0}, {"budget_tokens": 1_000_000}, {"tpm": 1_000_000}],
    ids=["usd", "tokens", "tpm"],
)
async def test_max_tool_calls_past_float_range_is_no_500(
    build: Build, limits: dict[str, Any]
) -> None:
    gw, up = await responses_gateway(build)
    secret = await create_key(gw, **limits)
    raw = b'{"model": "m", "input": "q", "max_output_tokens": 20, "max_tool_calls": %d, ' % (
        10**400
    )
    raw += b'"tools": [{"type": "web_search"}]}'
    headers = auth(secret) | {"Content-Type": "application/json"}
    async with gw.post("/v1/responses", data=raw, headers=headers) as resp:
        text = await resp.text()
        assert resp.status in (400, 429), (resp.status, text)
    assert up.bodies == []


# WRONG (low, USD budgets): on a model with no pass-through (`responses_api`) route, a request
# with a `web_search` tool can never be served (`Translation.refusal`: 400 `tools[0]`, "built-in
# tools need an upstream that runs them"), yet admission holds its 10 searches first: a key
# with less than $0.10 left is answered 429 `insufficient_quota` ("Lower max_tokens or wait for
# the next period") instead of the 400 every other key gets. Expected: 400, `param: "tools[0]"`
# (the request is unsupported whatever the budget). Actual: 429, a quota error whose advice
# (lower max_tokens, wait) cannot help; clients treat `insufficient_quota` as "top up the
# budget". The hold is priced on routes that cannot make a search (the docstring of
# `_searches_at_most` says "on a pass-through upstream").
# Realistic: a client sending the same Responses request with `web_search` to a model routed
# to Chat-only upstreams (a common setup) from a key near its budget's end.
async def test_translated_route_refuses_web_search_with_400_not_quota(build: Build) -> None:
    gw, up = await responses_gateway(build, responses_api=False)
    free = await create_key(gw)
    status, answer = await post(
        gw, free, "/v1/responses", ASK | {"tools": [{"type": "web_search"}]}
    )
    assert (status, answer["error"]["param"]) == (400, "tools[0]"), answer
    secret = await create_key(gw, budget_usd=0.05)
    status, answer = await post(
        gw, secret, "/v1/responses", ASK | {"tools": [{"type": "web_search"}]}
    )
    assert (status, answer["error"]["param"]) == (400, "tools[0]"), answer
    assert up.bodies == []


# --- 4da09fb: Gemini's cached audio -------------------------------------------------------------

# gemini-2.5-flash in the price list: text in $0.30, audio in $1.00, cache reads $0.03 (text)
# and $0.10 (audio), output $2.50.
FLASH = {"input": 0.30, "audio": 1.00, "cached": 0.03, "cached_audio": 0.10, "output": 2.50}
AUDIO_CHAT = {
    "model": "m",
    "max_tokens": 10,
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "And the second speaker?"},
                {
                    "type": "input_audio",
                    "input_audio": {"data": "SUQz" + "A" * 400_000, "format": "mp3"},
                },
            ],
        }
    ],
}
# What Google bills the usual answer (`usage_of` with all 100,000 audio tokens cached).
BILLED = mtok(100_000, FLASH["cached_audio"]) + mtok(10, FLASH["input"]) + mtok(10, FLASH["output"])


def text_cost(prompt: int, cached: int, completion: int) -> float:
    return (
        mtok(prompt - cached, FLASH["input"])
        + mtok(cached, FLASH["cached"])
        + mtok(completion, FLASH["output"])
    )


def usage_of(prompt_audio: Any, cache: Any, cached: int = 100_000) -> dict[str, Any]:
    """100,000 audio tokens and 10 of text, `cached` of them read from the cache."""
    usage: dict[str, Any] = {
        "promptTokenCount": 100_010,
        "candidatesTokenCount": 10,
        "cachedContentTokenCount": cached,
        "totalTokenCount": 100_020,
    }
    if prompt_audio is not None:
        usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": 10}, *prompt_audio]
    if cache is not None:
        usage["cacheTokensDetails"] = cache
    return usage


AUDIO = [{"modality": "AUDIO", "tokenCount": 100_000}]


async def gemini_cost(build: Build, reply: bytes, body: dict[str, Any] = AUDIO_CHAT) -> Any:
    """The status, the answer (JSON, or the stream's bytes) and the usage row."""
    up = RawUpstream(reply, hold=False)
    gw = await build("gemini", up, "gemini-2.5-flash")
    secret = await create_key(gw, budget_usd=50.0)
    async with gw.post("/v1/chat/completions", json=body, headers=auth(secret)) as resp:
        answer = await resp.json() if not body.get("stream") else await resp.read()
        status = resp.status
    row, _ = await row_and_spend(gw, secret)
    return status, answer, row


# SOUND: odd cache details (cached audio above the prompt's audio or above
# `cachedContentTokenCount`, counts up to 2**40 and many of them, other modalities, lower case,
# an entry without fields, empty) answer 200 and cost between the prompt's text cost and its
# costliest reading (every prompt token as uncached audio); the plain case is Google's bill.
@pytest.mark.parametrize(
    ("prompt_audio", "cache", "cached"),
    [
        (AUDIO, AUDIO, 100_000),
        ([{"modality": "AUDIO", "tokenCount": 50_000}], AUDIO, 100_000),
        (AUDIO, AUDIO, 10),
        (AUDIO, [{"modality": "AUDIO", "tokenCount": 2**40}], 100_000),
        (AUDIO, [{"modality": "AUDIO", "tokenCount": 2**40}] * 50, 100_000),
        (AUDIO, [{"modality": "TEXT", "tokenCount": 100_000}], 100_000),
        (AUDIO, [{}], 100_000),
        (AUDIO, [], 100_000),
        ([{"modality": "audio", "tokenCount": 100_000}], AUDIO, 100_000),
        ([], AUDIO, 100_000),
        (AUDIO, AUDIO, 0),
    ],
)
async def test_odd_cache_details_cost_between_text_and_audio(
    build: Build, prompt_audio: Any, cache: Any, cached: int
) -> None:
    reply = gemini_answer(usage_of(prompt_audio, cache, cached), [{"text": "ok"}])
    status, answer, row = await gemini_cost(build, reply)
    assert status == 200, answer
    assert not row["estimated"]
    floor = text_cost(100_010, cached, 10)
    ceiling = mtok(100_010, FLASH["audio"]) + mtok(10, FLASH["output"])
    assert floor * 0.999 <= row["cost_usd"] <= ceiling * 1.001, (row["cost_usd"], floor, ceiling)
    if (prompt_audio, cache, cached) == (AUDIO, AUDIO, 100_000):
        assert row["cost_usd"] == pytest.approx(BILLED)


# WRONG (low, USD budgets): a `cacheTokensDetails` the gateway cannot read now costs the whole
# usage. The field was ignored before 4da09fb; it is now a typed field of `GeminiUsage`
# (`list[GeminiModalityCount]`, `Count` 0..2**40), decoded with the rest, so one entry out of
# type (a null list, a fractional or string count, a count past 2**40, a negative one) makes
# `read_usage` drop every count: the row is estimated at $0.00075 (the request's own estimate)
# where Google bills $0.0100 (and the text cost alone of the reported counts is $0.0030) - 4x
# to 13x under - and the client gets no usage. Expected: the other counts kept (the odd detail
# ignored, as `_count` does for OpenAI details), >= $0.0030. Actual: $0.00075, estimated.
# Realistic: low for Google itself (well-formed counts); a proxy or Vertex-compatible server
# serialising an empty list as null, or counts as strings (proto3 JSON int64), would hit it.
@pytest.mark.parametrize(
    "cache",
    [None, [{"modality": "AUDIO", "tokenCount": 1.5}], [{"modality": "AUDIO", "tokenCount": -5}]],
    ids=["null", "fraction", "negative"],
)
async def test_unreadable_cache_details_keep_the_other_counts(build: Build, cache: Any) -> None:
    usage = usage_of(AUDIO, [])
    usage["cacheTokensDetails"] = cache
    status, answer, row = await gemini_cost(build, gemini_answer(usage, [{"text": "ok"}]))
    assert status == 200, answer
    floor = text_cost(100_010, 100_000, 10)
    assert row["cost_usd"] >= floor * 0.999, (row["cost_usd"], floor, answer.get("usage"))


# WRONG (low, USD budgets): cache details are read only when `promptTokensDetails` or
# `candidatesTokensDetails` is present (`if usage.prompt_tokens_details or
# usage.candidates_tokens_details`): a usage with `cacheTokensDetails` (AUDIO 100,000) and no
# other details prices the cached audio at the text cache rate. Expected: $0.0100 (Google's
# bill, as with the prompt details). Actual: $0.0030 (3.3x under on the cached audio).
# Realistic: low; Gemini sends `promptTokensDetails` whenever it sends `cacheTokensDetails`.
async def test_cache_details_without_prompt_details_are_priced(build: Build) -> None:
    reply = gemini_answer(usage_of(None, AUDIO), [{"text": "ok"}])
    status, answer, row = await gemini_cost(build, reply)
    assert status == 200, answer
    assert row["cost_usd"] >= BILLED * 0.999, (row["cost_usd"], BILLED)


# WRONG (low, display): the usage shown to the client now reports `prompt_tokens_details.
# audio_tokens` as the *uncached* audio only (prompt AUDIO - cached AUDIO): a prompt of 100,000
# audio tokens all read from the cache shows no `audio_tokens` at all (100,000 -> unset). In
# OpenAI's usage (which the gateway's answers follow, and which it reads from OpenAI upstreams)
# `audio_tokens` is the audio in the prompt, cached or not, as `prompt_tokens` holds
# `cached_tokens`. Expected: `audio_tokens` 100,000 (and `cached_audio_tokens` 100,000 of it).
# Actual: no `audio_tokens`. A client costing its own usage (LiteLLM-style, audio tokens at
# the audio rate) or a dashboard counting audio sees the audio vanish once it is cached, and
# the same field means different things for Gemini and OpenAI models behind one gateway.
# Realistic: every cached-audio Gemini answer.
async def test_client_audio_tokens_count_the_cached_audio(build: Build) -> None:
    reply = gemini_answer(usage_of(AUDIO, AUDIO), [{"text": "ok"}])
    status, answer, _ = await gemini_cost(build, reply)
    assert status == 200, answer
    details = answer["usage"]["prompt_tokens_details"]
    assert details.get("cached_audio_tokens") == 100_000, details
    assert details.get("audio_tokens") == 100_000, details


# SOUND: the openai SDK parses a usage with `cached_audio_tokens` (kept as an extra field).
async def test_openai_sdk_parses_cached_audio_tokens(build: Build) -> None:
    from openai.types.chat import ChatCompletion

    reply = gemini_answer(usage_of(AUDIO, AUDIO), [{"text": "ok"}])
    status, answer, _ = await gemini_cost(build, reply)
    assert status == 200, answer
    parsed = ChatCompletion.model_validate(answer)
    assert parsed.usage is not None and parsed.usage.prompt_tokens_details is not None
    assert parsed.usage.prompt_tokens_details.cached_tokens == 100_000
    extra = parsed.usage.prompt_tokens_details.model_extra or {}
    assert extra.get("cached_audio_tokens") == 100_000


def gemini_chunk(text: str, usage: dict[str, Any] | None, finish: str | None = None) -> bytes:
    candidate: dict[str, Any] = {
        "content": {"role": "model", "parts": [{"text": text}]},
        "index": 0,
    }
    if finish:
        candidate["finishReason"] = finish
    payload: dict[str, Any] = {"candidates": [candidate], "modelVersion": "gemini-2.5-flash"}
    if usage is not None:
        payload["usageMetadata"] = usage
    return sse(payload)


# SOUND: a stream whose every chunk carries the usage so far (Gemini's) is charged the last
# one's cached audio at the cached audio rate, and the usage chunk shows it; a stream cut
# after a chunk with counts is charged at least the text cost of those counts.
async def test_streams_price_the_cached_audio(build: Build) -> None:
    first = usage_of(AUDIO, AUDIO) | {"candidatesTokenCount": 1, "totalTokenCount": 100_011}
    final = usage_of(AUDIO, AUDIO)
    body = AUDIO_CHAT | {"stream": True, "stream_options": {"include_usage": True}}
    reply = STREAM_HEAD + gemini_chunk("o", first) + gemini_chunk("k", final, "STOP")
    status, got, row = await gemini_cost(build, reply, body)
    assert status == 200
    assert b'"cached_audio_tokens":100000' in got, got
    assert row["cost_usd"] == pytest.approx(BILLED)
    cut = STREAM_HEAD + gemini_chunk("o", first) + gemini_chunk("k more", None)
    status, got, row = await gemini_cost(build, cut, body)
    assert status == 200
    assert row["estimated"]
    assert row["cost_usd"] >= text_cost(100_010, 100_000, 1) * 0.999, row["cost_usd"]


# SOUND (unit): the counts priced: uncached audio = prompt AUDIO - cached AUDIO (never below
# 0), the cached audio as reported, and `_counts` takes them both, a bad one as 0.
def test_gemini_counts_split_cached_audio() -> None:
    cache = [{"modality": "AUDIO", "tokenCount": 100_000}]
    raw = json.dumps(usage_of([{"modality": "AUDIO", "tokenCount": 60_000}], cache)).encode()
    usage = openai_usage(USAGE_DECODER.decode(raw))
    trace = RequestTrace(request_id="r", started=0.0, ts=0.0)
    trace.prompt_tokens, trace.completion_tokens = 100_010, 10
    counts = _counts(trace, usage)
    # (The prompt's audio counts the cached part, as OpenAI's `audio_tokens` does: see
    # test_client_audio_tokens_count_the_cached_audio; the uncached part is priced apart.)
    assert (counts.audio_input, counts.cached_audio) == (100_000, 100_000), counts
    raw = json.dumps(usage_of(AUDIO, [{"modality": "AUDIO", "tokenCount": 40_000}])).encode()
    counts = _counts(trace, openai_usage(USAGE_DECODER.decode(raw)))
    assert (counts.audio_input, counts.cached_audio) == (100_000, 40_000), counts
    assert isinstance(counts, Usage)


# SOUND: an OpenAI-compatible upstream's `prompt_tokens_details.cached_audio_tokens` of any
# shape answers 200; counts are kept within the cached tokens (a count past them is priced as
# the cached tokens at most). A value out of type costs the row its exactness, as an odd
# `audio_tokens` always did (noted, not a finding: no such upstream field is known).
@pytest.mark.parametrize("extra", ["x", 1.5, -5, 2**40, 2**70, None, [1], 100_000])
async def test_openai_upstream_cached_audio_tokens_of_any_shape(build: Build, extra: Any) -> None:
    usage = {
        "prompt_tokens": 100_010,
        "completion_tokens": 10,
        "total_tokens": 100_020,
        "prompt_tokens_details": {
            "cached_tokens": 100_000,
            "audio_tokens": 100_000,
            "cached_audio_tokens": extra,
        },
    }
    up = RawUpstream(completion(usage), hold=False)
    gw = await build("openai", up, "gpt-realtime-mini")
    secret = await create_key(gw, budget_usd=50.0)
    status, answer = await post(gw, secret, "/v1/chat/completions", AUDIO_CHAT)
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    # gpt-realtime-mini: cached audio $0.30 a million, at most all 100,000 cached tokens
    ceiling = mtok(100_000, 0.30) + mtok(10, 10.0) + mtok(10, 2.4)
    assert row["cost_usd"] <= ceiling * 1.001, row["cost_usd"]
