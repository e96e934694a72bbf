"""Attack on helper-105's remedies (helper-106): audio, image and web-search prices, the
admission hold of `ChatCall.held`, `service_tier: "priority"` refused to USD keys, Gemini's
modality counts, and the stored-response map (`gateway.stored`) for `previous_response_id`.

Each failing test asserts what should happen; the comment above it says what is wrong,
expected vs actual, severity and realism. Passing tests marked `# SOUND:` pin what was checked
and held. Upstreams are in-process raw TCP servers (tests/raw_upstream); the fixtures and
helpers are helper-105's (tests/test_attack_h105).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway.errors import NotFound
from gateway.pipeline import _counts
from gateway.prices import Price, Rates, Usage
from gateway.providers.base import ChatCall
from gateway.schemas.chat import ChatCompletionRequest
from gateway.schemas.common import (
    CompletionTokensDetails,
    PromptTokensDetails,
    Usage as OpenAIUsage,
)
from gateway.settings import ModelConfig, Target
from gateway.state import STORED_KEY
from gateway.stored import UNKNOWN_CONVERSATION, StoredResponses
from gateway.trace import RequestTrace
from tests import test_attack_h105
from tests.conftest import NEVER_HANG, app_of, create_key
from tests.raw_upstream import RawUpstream, auth
from tests.test_attack_h105 import (
    Build,
    Gathering,
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
    "input_tokens": 10,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 10,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 20,
}


async def all_admitted_or_refused(up: Gathering, tasks: list[asyncio.Task[Any]]) -> None:
    """Until each request is either at the upstream (admitted) or answered (refused)."""
    async with asyncio.timeout(NEVER_HANG):
        while up.arrived + sum(t.done() for t in tasks) < len(tasks):
            up.changed.clear()
            waiter = asyncio.create_task(up.changed.wait())
            await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()


# --- web searches the price list has no price for ---------------------------------------------


# WRONG (high, USD budgets): chat web searches on `gpt-4o-search-preview` (and
# `gpt-5-search-api`) are charged $0. The remedy charges `web_search_options` one search at
# `Rates.web_search`, which comes from genai-prices' `web_searches_kcount`, but the price list
# has no search price for these two models (only `gpt-4o-mini-search-preview` resolves to a
# price with one: `$10/web searches K`), so `_rates` makes it 0.0. These are exactly the chat
# models that take `web_search_options`; OpenAI bills each request's search (at least $10 per
# 1,000 calls, $25-30 listed for the search-preview models) on top of tokens. Expected: cost
# >= $0.010 + tokens, or a 400 as for `service_tier: "priority"` (a fee the prices do not
# have, refused to USD keys). Actual: $0.001075 (tokens only), 200: ~10-25x under, unbounded
# over many requests (a $1 budget buys ~900 requests, $9-23 of searches).
# Realistic: `gpt-4o-search-preview` is OpenAI's flagship chat search model.
async def test_search_model_without_a_search_price_is_not_charged_nothing(build: Build) -> None:
    usage = {"prompt_tokens": 30, "completion_tokens": 100, "total_tokens": 130}
    up = RawUpstream(completion(usage), hold=False)
    gw = await build("openai", up, "gpt-4o-search-preview")
    secret = await create_key(gw, budget_usd=1.0)
    body = {
        "model": "m",
        "web_search_options": {},
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "What happened today?"}],
    }
    status, answer = await post(gw, secret, "/v1/chat/completions", body)
    if status == 400:  # refused as a fee the gateway cannot price: also right
        assert answer["error"]["param"] == "web_search_options", answer
        return
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    billed = 0.010 + mtok(30, 2.5) + mtok(100, 10.0)
    assert row["cost_usd"] >= billed * 0.999, (row["cost_usd"], billed)


# WRONG (high, USD budgets): Anthropic's web search server tool on `/v1/messages` is not
# charged. A `web_search_20250305` tool is refused by the translation, so the request passes
# through natively to an Anthropic upstream, which bills $10 per 1,000 searches (genai-prices
# has `$10/web searches K` for claude-sonnet-4-5, so `Rates.web_search` is known) and reports
# them in `usage.server_tool_use.web_search_requests`. `AnthropicUsage` does not read it and
# nothing sets `call.web_searches`. Here `max_uses: 10`, ten searches, 50 + 200 tokens:
# Expected >= $0.10 + $0.00315. Actual: $0.00315 (tokens), ~33x under. The hold has no
# search either. Realistic: Anthropic's documented web search tool, Claude Code and agent
# frameworks use it through `/v1/messages`; helper-105's remedy covered OpenAI's searches only.
async def test_anthropic_messages_web_search_requests_are_charged(build: Build) -> None:
    answer = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [
            {
                "type": "server_tool_use",
                "id": "srvtoolu_1",
                "name": "web_search",
                "input": {"query": "news"},
            },
            {"type": "web_search_tool_result", "tool_use_id": "srvtoolu_1", "content": []},
            {"type": "text", "text": "Here is the news."},
        ],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 50,
            "output_tokens": 200,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "server_tool_use": {"web_search_requests": 10},
        },
    }
    up = RawUpstream(whole(answer), hold=False)
    gw = await build("anthropic", up, "claude-sonnet-4-5")
    secret = await create_key(gw, budget_usd=5.0)
    body = {
        "model": "m",
        "max_tokens": 200,
        "tools": [{"type": "web_search_20250305", "name": "web_search", "max_uses": 10}],
        "messages": [{"role": "user", "content": "What happened today?"}],
    }
    status, got = await post(gw, secret, "/v1/messages", body)
    assert status == 200, got
    assert up.bodies[0]["tools"][0]["type"] == "web_search_20250305"  # passed through
    row, _ = await row_and_spend(gw, secret)
    billed = 10 * 0.010 + mtok(50, 3.0) + mtok(200, 15.0)
    assert row["cost_usd"] >= billed * 0.999, (row["cost_usd"], billed)


# --- the admission hold (`ChatCall.held`) -----------------------------------------------------


def _audio_chat(escaped: bool) -> bytes:
    body = {
        "model": "m",
        "max_completion_tokens": 10,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Transcribe."},
                    {
                        "type": "input_audio",
                        "input_audio": {"data": "SUQz" + "A" * 200_000, "format": "mp3"},
                    },
                ],
            }
        ],
    }
    raw = json.dumps(body).encode()
    return raw.replace(b'"input_audio"', b'"input\\u005faudio"') if escaped else raw


# WRONG (medium, USD budgets): `ChatCall.held` finds audio input by searching the body's bytes
# for `"input_audio"`; the same JSON with the name spelled `"input\u005faudio"` (valid JSON,
# what msgspec and OpenAI decode to the same `input_audio` part) is held at the text rate.
# gpt-audio: $32/Mtok audio in against $2.50 text, so the hold is 12.8x smaller ($0.0031 for
# $0.0389 here). A $0.01 budget refuses the plain request (429) and admits the escaped one
# (200), whose audio OpenAI bills at $32/Mtok all the same: a client that
# escapes one character gets admission priced 12.8x under, and with requests in flight
# together the overspend bound ("one request's actual usage") no longer holds (each in-flight
# audio request holds 1/12.8 of what it can cost). The charge afterwards is right (usage).
# Expected: both refused. Actual: escaped admitted. Realistic: deliberate, one-line trick.
# Right: look at the decoded request (`prompt_size` already sees the part as `input_audio`).
async def test_escaped_input_audio_is_held_at_the_audio_rate(build: Build) -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 1, "total_tokens": 11}
    up = RawUpstream(completion(usage), hold=False)
    gw = await build("openai", up, "gpt-audio")
    # The prompt's audio is sized at 1,211 tokens likely (its MP3's length): held at $0.0031 at
    # the text rate, $0.0389 at the audio rate. A budget between the two:
    budget = 0.01
    plain = await create_key(gw, budget_usd=budget)
    resp = await gw.post("/v1/chat/completions", data=_audio_chat(False), headers=auth(plain))
    assert resp.status == 429, await resp.text()  # held at the audio rate: refused
    escaped = await create_key(gw, budget_usd=budget)
    resp = await gw.post("/v1/chat/completions", data=_audio_chat(True), headers=auth(escaped))
    assert resp.status == 429, await resp.text()


# WRONG (medium, USD budgets): `gemini-2.5-flash-image` answers with images whether or not the
# request sets `modalities` (Google's docs: "the model defaults to returning text and image
# responses"), but `ChatCall.held` prices the output limit at the image rate only when
# `modalities` names "image": without it, 1,300 output tokens are held at $2.50/Mtok
# ($0.00325), while an image costs 1,290 x $30/Mtok ($0.0387, 12x). Five such requests in
# flight on a $0.02 budget are all admitted and spend $0.19: 9.7x the budget, far past keys.md's
# bound (budget + one request's usage, $0.059). Expected: spend <= $0.059. Actual: $0.194,
# all five admitted. Realistic: "draw a cat" without `modalities` to an image model is the usual
# call; concurrency is any client's choice. Right: hold output at the image rate on a model
# whose price has an image rate above its output rate.
async def test_gemini_image_model_without_modalities_holds_the_image_rate(build: Build) -> None:
    usage = {
        "promptTokenCount": 10,
        "candidatesTokenCount": 1_300,
        "totalTokenCount": 1_310,
        "candidatesTokensDetails": [
            {"modality": "TEXT", "tokenCount": 10},
            {"modality": "IMAGE", "tokenCount": 1_290},
        ],
    }
    parts = [{"text": "Here."}, {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}]
    up = Gathering(gemini_answer(usage, parts))
    gw = await build("gemini", up, "gemini-2.5-flash-image")
    # (A budget one such request fits in: with $0.02 every one is refused, held at $0.039.)
    secret = await create_key(gw, budget_usd=0.05)
    body = {"model": "m", "max_tokens": 1_300, "messages": [{"role": "user", "content": "A cat."}]}
    tasks = [asyncio.create_task(post(gw, secret, "/v1/chat/completions", body)) for _ in range(5)]
    await all_admitted_or_refused(up, tasks)
    up.release.set()
    async with asyncio.timeout(NEVER_HANG):
        results = await asyncio.gather(*tasks)
    admitted = [s for s, _ in results].count(200)
    _, spend = await row_and_spend(gw, secret, rows=admitted)
    one_request = mtok(10, 0.30) + mtok(10, 2.50) + mtok(1_290, 30.0)
    assert spend.usd <= 0.05 + one_request, (admitted, spend.usd)
    assert admitted == 1, results


# WRONG (medium, token and USD budgets): an `item_reference` input item on the Responses
# pass-through holds nothing. It names an item the upstream stores (a message of an earlier
# response, any size) and bills again as input, exactly like `previous_response_id`, which the
# remedy now holds (its known size, else 10,000 likely / 100,000 most); the translation
# refuses the item (so the pass-through serves it) and the estimate counts it as 0 tokens.
# Five requests in flight, each referencing a 40,000-token stored item, on a 50,000-token
# budget: all admitted, 200,000+ tokens spent. Expected: spend <= budget + one request
# (90,020), >= 3 refused. Actual: all 5 admitted. Realistic: `item_reference` is OpenAI's
# documented way to reuse stored items without resending them; a client that learned of the
# `previous_response_id` hold switches to it. (Also: another key's item ids are not checked
# as previous response ids now are.) Right: hold an item reference as a file by id.
# (Fixed: each reference is held as a file sent by id, 10,000 likely and 100,000 while in
# flight, so the first request admitted holds what the others would need.)
async def test_item_reference_requests_in_flight_hold_their_stored_items(build: Build) -> None:
    usage = {
        "input_tokens": 40_010,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 10,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 40_020,
    }
    up = Gathering(whole(response_body(usage, [message_item("ok")])))
    gw = await build("openai", up, "gpt-5", fields={"responses_api": True})
    secret = await create_key(gw, budget_tokens=50_000)
    body = {
        "model": "m",
        "input": [
            {"type": "item_reference", "id": "msg_0123456789abcdef"},
            {"role": "user", "content": "And then?"},
        ],
        "max_output_tokens": 10,
    }
    tasks = [asyncio.create_task(post(gw, secret, "/v1/responses", body)) for _ in range(5)]
    await all_admitted_or_refused(up, tasks)
    up.release.set()
    async with asyncio.timeout(NEVER_HANG):
        results = await asyncio.gather(*tasks)
    statuses = sorted(s for s, _ in results)
    assert up.bodies[0]["input"][0]["type"] == "item_reference"  # it passed through
    _, spend = await row_and_spend(gw, secret, rows=statuses.count(200))
    assert spend.tokens <= 50_000 + 40_020, (statuses, spend.tokens)


# --- prices of the details ----------------------------------------------------------------------


# WRONG (low-medium, USD budgets): Gemini's cached audio is charged at the text cache rate.
# gemini-2.5-flash bills cache reads of audio at $0.10/Mtok (genai-prices:
# `input_audio_cache_mtok`), text cache reads at $0.03; `Price.cost` prices every cached token at
# `cached_input` and caps audio input at the uncached part (`min(audio_input, uncached)`), so a
# prompt whose audio was read from the cache (Gemini 2.5's implicit caching: asking several
# questions about one recording) is charged 3.3x under on it. 100,000 cached audio tokens +
# 10 text: Expected >= $0.01 (audio cache reads) + $0.000028. Actual: $0.003 + ...
# Realistic: implicit caching is on by default for 2.5 models and reported in
# `cacheTokensDetails` (modality AUDIO), which the gateway does not read.
async def test_gemini_cached_audio_priced_at_the_audio_cache_rate(build: Build) -> None:
    usage = {
        "promptTokenCount": 100_010,
        "candidatesTokenCount": 10,
        "cachedContentTokenCount": 100_000,
        "totalTokenCount": 100_020,
        "promptTokensDetails": [
            {"modality": "TEXT", "tokenCount": 10},
            {"modality": "AUDIO", "tokenCount": 100_000},
        ],
        "cacheTokensDetails": [{"modality": "AUDIO", "tokenCount": 100_000}],
    }
    up = RawUpstream(gemini_answer(usage, [{"text": "ok"}]), hold=False)
    gw = await build("gemini", up, "gemini-2.5-flash")
    secret = await create_key(gw, budget_usd=5.0)
    body = {
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
    status, answer = await post(gw, secret, "/v1/chat/completions", body)
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    billed = mtok(100_000, 0.10) + mtok(10, 0.30) + mtok(10, 2.50)
    assert row["cost_usd"] >= billed * 0.999, (row["cost_usd"], billed)


MODEL = ModelConfig(name="m", targets=(Target(provider="up0", model="gpt-audio"),))
GPT_AUDIO = Price(Rates(2.5, 10.0, 1.25, 2.5, 10.0, 32.0, 64.0, 10.0, 0.01))


def _usage(prompt: int, completion: int, given: Any, done: Any) -> OpenAIUsage:
    return OpenAIUsage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=prompt + completion,
        prompt_tokens_details=PromptTokensDetails(audio_tokens=given),
        completion_tokens_details=CompletionTokensDetails(audio_tokens=done, image_tokens=done),
    )


def _trace(prompt: int, completion: int) -> RequestTrace:
    trace = RequestTrace(request_id="r", started=0.0, ts=0.0)
    trace.prompt_tokens, trace.completion_tokens = prompt, completion
    return trace


# SOUND: hostile details cannot push the charge below the text cost nor past the all-audio
# cost: negative, null, bool and huge audio/image counts, details larger than the totals, and
# audio plus image out summing past the completion are each counted within their part
# (`_count`, the `min`s of `_media`).
@pytest.mark.parametrize("detail", [-5, None, True, 10**15, 2_000, 0])
def test_hostile_usage_details_stay_within_the_text_and_media_costs(detail: Any) -> None:
    usage = _usage(1_000, 1_000, detail, detail)
    counts = _counts(_trace(1_000, 1_000), usage)
    cost = GPT_AUDIO.cost(counts)
    text = GPT_AUDIO.cost(Usage(1_000, 1_000))
    most = mtok(1_000, 32.0) + mtok(1_000, 64.0)
    assert text * 0.999 <= cost <= most * 1.001, (detail, counts, cost)


# SOUND: a configured audio price of 0 charges audio tokens nothing (the operator's statement,
# as a 0 input price is), and an audio rate below the text rate lowers the cost legitimately;
# neither comes from a client. Only the upstream's usage (what the operator is billed) moves it.
def test_configured_zero_audio_price_is_the_operators_choice() -> None:
    free_audio = Price(Rates(2.5, 10.0, 1.25, 2.5, 10.0, 0.0, 0.0, 0.0, 0.0))
    cost = free_audio.cost(Usage(1_000, 1_000, audio_input=1_000, audio_output=1_000))
    assert cost == 0.0


# SOUND: the common chat path is unchanged: a request without audio, images or searches holds
# plain text counts, and a usage without details counts none.
def test_plain_requests_hold_and_count_text_only() -> None:
    req = ChatCompletionRequest(model="m", messages=[])
    call = ChatCall(request=req, body=b'{"model":"m","messages":[]}', model=MODEL)
    # (Output is held at the image rate, the text rate of every model but image models.)
    assert call.held(100, 200) == Usage(100, 200, image_output=200)
    assert not call.asked_tier
    plain = OpenAIUsage(prompt_tokens=100, completion_tokens=200, total_tokens=300)
    assert _counts(_trace(100, 200), plain) == Usage(100, 200)


# SOUND: a message whose text mentions "input_audio" (escaped quotes in JSON) does not make the
# request held at the audio rate; a real `input_audio` part does.
def test_input_audio_mentioned_in_text_is_not_audio() -> None:
    body = json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": 'say "input_audio"'}]}
    )
    req = ChatCompletionRequest(model="m", messages=[])
    call = ChatCall(request=req, body=body.encode(), model=MODEL)
    assert call.held(100, 200) == Usage(100, 200, image_output=200)


# --- modalities and service_tier as a hostile client sends them ---------------------------------


# SOUND: `modalities` as a string is a 400 (the schema's list), and Gemini refuses modalities
# it does not translate ("AUDIO", upper case), so nothing is generated unheld; an upper-case
# "IMAGE" is refused too rather than translated to an unheld image answer.
@pytest.mark.parametrize("modalities", ["audio", ["AUDIO"], ["IMAGE"]])
async def test_odd_modalities_are_refused(build: Build, modalities: Any) -> None:
    up = RawUpstream(gemini_answer({"promptTokenCount": 1}, [{"text": "ok"}]), hold=False)
    gw = await build("gemini", up, "gemini-2.5-flash-image")
    secret = await create_key(gw, budget_usd=1.0)
    body = {
        "model": "m",
        "modalities": modalities,
        "max_tokens": 10,
        "messages": [{"role": "user", "content": "A cat."}],
    }
    status, answer = await post(gw, secret, "/v1/chat/completions", body)
    assert status == 400, answer
    assert up.bodies == []


# SOUND: priority through `/v1/responses` is held and charged at the priority rates whether
# the request is translated to a chat upstream or passed through (`to_chat` copies
# `service_tier`). Spellings OpenAI does not accept ("PRIORITY", " priority") go upstream
# unrefused; OpenAI answers them 400 (an enum), so they are not billed (not provable offline:
# noted, not tested).
@pytest.mark.parametrize("responses_api", [False, True])
async def test_priority_via_responses_is_charged_at_its_rates(
    build: Build, responses_api: bool
) -> None:
    usage = {"prompt_tokens": 1_000, "completion_tokens": 100}
    if responses_api:
        reply = response_body(
            {"input_tokens": 1_000, "output_tokens": 100, "total_tokens": 1_100},
            [message_item("hi")],
        )
        up = RawUpstream(whole(reply), hold=False)
    else:
        up = RawUpstream(completion(usage), hold=False)
    gw = await build("openai", up, "gpt-5", fields={"responses_api": responses_api})
    secret = await create_key(gw, budget_usd=1.0)
    body = {"model": "m", "input": "hi", "service_tier": "priority", "max_output_tokens": 16}
    status, answer = await post(gw, secret, "/v1/responses", body)
    assert status == 200, answer
    assert up.bodies[0]["service_tier"] == "priority"
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(mtok(1_000, 2.5) + mtok(100, 20.0))


# SOUND: the openai SDK parses the gateway's answers whose usage now carries
# `prompt_tokens_details.audio_tokens` and `completion_tokens_details.audio_tokens` /
# `image_tokens` (Gemini's modality counts), and keeps the extra `image_tokens` field.
async def test_openai_sdk_parses_modality_usage(build: Build) -> None:
    from openai.types.chat import ChatCompletion

    usage = {
        "promptTokenCount": 20,
        "candidatesTokenCount": 1_300,
        "totalTokenCount": 1_320,
        "promptTokensDetails": [
            {"modality": "TEXT", "tokenCount": 10},
            {"modality": "AUDIO", "tokenCount": 10},
        ],
        "candidatesTokensDetails": [
            {"modality": "TEXT", "tokenCount": 10},
            {"modality": "IMAGE", "tokenCount": 1_290},
        ],
    }
    parts = [{"text": "Here."}, {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}]
    up = RawUpstream(gemini_answer(usage, parts), hold=False)
    gw = await build("gemini", up, "gemini-2.5-flash-image")
    secret = await create_key(gw, budget_usd=5.0)
    body = {
        "model": "m",
        "modalities": ["image", "text"],
        "max_tokens": 2_000,
        "messages": [{"role": "user", "content": "Draw a cat."}],
    }
    status, answer = await post(gw, secret, "/v1/chat/completions", body)
    assert status == 200, answer
    parsed = ChatCompletion.model_validate(answer)
    assert parsed.usage is not None
    assert parsed.usage.prompt_tokens_details is not None
    assert parsed.usage.prompt_tokens_details.audio_tokens == 10
    assert parsed.usage.completion_tokens_details is not None
    assert parsed.usage.completion_tokens_details.audio_tokens is None
    assert answer["usage"]["completion_tokens_details"]["image_tokens"] == 1_290


# --- the stored-response map (`gateway.stored`) -------------------------------------------------


# WRONG (low, hostile or careless upstream): a response id answered to a second key takes the
# id over. `StoredResponses.remember` pops and re-adds it under the later key, so the first
# key's own conversation becomes "another key's" (404 on its own `previous_response_id`) and
# the second key is let continue it. An upstream that reuses ids (a self-hosted Responses
# server with a fixed or counter id after its restart; a hostile one) thus moves a
# conversation's ownership from key A to key B. Expected: the first owner keeps it (A 200,
# B 404). Actual: A 404. Realism: low for OpenAI itself (unique ids).
async def test_a_response_id_answered_again_does_not_change_owner(build: Build) -> None:
    up = RawUpstream(whole(response_body(RESPONSE_USAGE, [message_item("ok")])), hold=False)
    gw = await build("openai", up, "gpt-5", fields={"responses_api": True})
    a = await create_key(gw, budget_tokens=1_000_000)
    b = await create_key(gw, budget_tokens=1_000_000)
    for secret in (a, b):
        status, answer = await post(gw, secret, "/v1/responses", {"model": "m", "input": "hi"})
        assert status == 200 and answer["id"] == "resp_1", answer
    body = {"model": "m", "previous_response_id": "resp_1", "input": "And then?"}
    status, answer = await post(gw, a, "/v1/responses", body)
    assert status == 200, answer


# WRONG (low, memory, hostile upstream): the map remembers a response's id at any length. The
# cap is 100,000 entries ("about 150 bytes each"), but the id comes from the upstream's answer
# (up to `max_response_bytes`, 64 MiB), so a hostile or broken upstream answering 1 MiB ids
# makes the map hold ~100 GiB at its cap. OpenAI ids are ~50 characters. Expected: an id
# longer than a sane bound (say 1,000 characters) is not remembered (or is held as unknown).
# Actual: remembered whole.
async def test_huge_upstream_response_ids_are_not_remembered(build: Build) -> None:
    huge = "resp_" + "x" * 1_000_000
    payload = response_body(RESPONSE_USAGE, [message_item("ok")]) | {"id": huge}
    up = RawUpstream(whole(payload), hold=False)
    gw = await build("openai", up, "gpt-5", fields={"responses_api": True})
    secret = await create_key(gw, budget_tokens=1_000_000)
    status, answer = await post(gw, secret, "/v1/responses", {"model": "m", "input": "hi"})
    assert status == 200, answer
    known = app_of(gw)[STORED_KEY]._known
    assert all(len(k) <= 1_000 for k in known), [len(k) for k in known]


# SOUND: the map is bounded (the oldest forgotten first, one seen again goes last), an unknown
# id is held as a file by id, and another key's id is a 404 whose message quotes at most 100
# characters of a client's long id.
def test_stored_map_is_bounded_and_checks_owners() -> None:
    stored = StoredResponses(most=3)
    for i in range(5):
        stored.remember(f"resp_{i}", "a", 10 + i)
    assert len(stored._known) == 3
    assert stored.prompt("resp_0", "a") is UNKNOWN_CONVERSATION
    assert (stored.prompt("resp_4", "a").likely, stored.prompt("resp_4", "a").most) == (14, 14)
    # (ids past 256 characters are not remembered: test_huge_upstream_response_ids_...)
    stored.remember("resp_long_" + "y" * 240, "a", 1)
    with pytest.raises(NotFound) as exc:
        stored.prompt("resp_long_" + "y" * 240, "b")
    assert len(str(exc.value)) < 400


# SOUND: `previous_response_id` empty is no continuation (the request goes as a fresh one); a
# non-string is a 400 before anything is sent; a very long unknown one is held as unknown (a
# 9,000-token budget refuses it, 429) without going upstream.
async def test_odd_previous_response_ids(build: Build) -> None:
    up = RawUpstream(whole(response_body(RESPONSE_USAGE, [message_item("ok")])), hold=False)
    gw = await build("openai", up, "gpt-5", fields={"responses_api": True})
    secret = await create_key(gw, budget_tokens=9_000)
    base = {"model": "m", "input": "hi", "max_output_tokens": 16}
    status, answer = await post(gw, secret, "/v1/responses", base | {"previous_response_id": ""})
    assert status == 200, answer
    sent = len(up.bodies)
    status, answer = await post(gw, secret, "/v1/responses", base | {"previous_response_id": 5})
    assert status == 400, answer
    long_id = {"previous_response_id": "resp_" + "z" * 100_000}
    status, answer = await post(gw, secret, "/v1/responses", base | long_id)
    assert status == 429, answer
    assert len(up.bodies) == sent


# SOUND: a stream cut before its terminal event is remembered without a size (a continuation
# is held as unknown, 10,000 likely) but as its key's (another key's continuation is a 404:
# test_attack_h125), and one that ended is remembered with its usage. (By reading
# `_remember`: a `store: false` answer is remembered too; harmless: the upstream refuses to
# continue it, and a continuation holds its real size.)
async def test_cut_stream_is_remembered_without_its_size(build: Build) -> None:
    from tests.raw_upstream import STREAM_HEAD, cut_after
    from tests.test_attack_h105 import responses_event

    response = {"id": "resp_cut", "object": "response", "status": "in_progress", "output": []}
    events = [
        responses_event("response.created", response=response),
        responses_event("response.output_text.delta", output_index=0, delta="hel"),
    ]
    up = RawUpstream(STREAM_HEAD + b"".join(events))
    gw = await build("openai", up, "gpt-5", fields={"responses_api": True})
    secret = await create_key(gw, budget_tokens=1_000_000)
    body = {"model": "m", "input": "hi", "max_output_tokens": 100, "stream": True}
    await cut_after(gw, secret, "/v1/responses", body, b"output_text.delta")
    async with asyncio.timeout(NEVER_HANG):
        await up.closed.wait()
    await row_and_spend(gw, secret)
    stored = app_of(gw)[STORED_KEY]
    owner = stored._known["resp_cut"][0]
    assert stored.prompt("resp_cut", owner) is UNKNOWN_CONVERSATION
    with pytest.raises(NotFound):
        stored.prompt("resp_cut", "another key")


# An `item_reference` input item is held as a file sent by id: 10,000 tokens likely, so a
# 9,000-token budget refuses a request with one, and nothing goes upstream; one with a
# reference spelled with an escape is held the same.
async def test_item_reference_holds_a_file_by_ids_size(build: Build) -> None:
    up = RawUpstream(whole(response_body(RESPONSE_USAGE, [message_item("ok")])), hold=False)
    gw = await build("openai", up, "gpt-5", fields={"responses_api": True})
    secret = await create_key(gw, budget_tokens=9_000)
    plain = {"model": "m", "input": "And then?", "max_output_tokens": 10}
    status, answer = await post(gw, secret, "/v1/responses", plain)
    assert status == 200, answer
    sent = len(up.bodies)
    for kind in ("item_reference", "item_\\u0072eference"):
        raw = (
            b'{"model": "m", "max_output_tokens": 10, "input": [{"type": "%s", "id": "msg_1"},'
            b' {"role": "user", "content": "And then?"}]}' % kind.encode()
        )
        headers = {**auth(secret), "Content-Type": "application/json"}
        async with gw.post("/v1/responses", data=raw, headers=headers) as resp:
            assert resp.status == 429, await resp.text()
    assert len(up.bodies) == sent
