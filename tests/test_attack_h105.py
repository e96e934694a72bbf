"""Attack on what upstreams bill beyond tokens at the text rates (helper-105).

Request fields of `POST /v1/chat/completions` and `POST /v1/responses` that make the upstream
bill the operator more than the gateway's admission hold and its charge know about: audio and
image tokens (priced far above text), priority processing, built-in tools billed per call,
and prompts stored upstream (`previous_response_id`). Keys with USD budgets, prices from the
bundled `genai-prices` list (the gateway's default price source) unless a test says otherwise.

Each failing test asserts what should happen; the comment above it works out the overspend
and how realistic it is. Passing tests marked `# SOUND:` pin properties checked here.
Upstreams are in-process raw TCP servers (tests/raw_upstream).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient

from gateway.settings import ModelConfig, RoutingSettings, Target
from gateway.state import GATE_KEY, KEYS_KEY, STORED_KEY, USAGE_KEY
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    app_of,
    create_key,
    provider_config,
    start_gateway,
    usage_rows,
)
from tests.raw_upstream import RawUpstream, auth, read_request

BASE = {"openai": "/v1", "anthropic": "", "gemini": ""}

Build = Callable[..., Awaitable[TestClient[Any, Any]]]


@pytest.fixture
async def build(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> AsyncIterator[Build]:
    """A gateway with one provider `up0` of `kind` over `upstream` (anything with `serve`),
    and one model "m" routed to it as `upstream_model` (so the price list prices it)."""
    servers: list[asyncio.Server] = []

    async def make(
        kind: str,
        upstream: Any,
        upstream_model: str,
        *,
        fields: dict[str, Any] | None = None,
        model: dict[str, Any] | None = None,
    ) -> TestClient[Any, Any]:
        server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        servers.append(server)
        port = upstream.port = server.sockets[0].getsockname()[1]
        cfg = provider_config(
            kind,
            name="up0",
            base_url=f"http://127.0.0.1:{port}{BASE[kind]}",
            api_keys=("sk-up-0123456789abcdefghij",),
            **(fields or {}),
        )
        m = ModelConfig(
            name="m", targets=(Target(provider="up0", model=upstream_model),), **(model or {})
        )
        settings = make_settings(
            providers=(cfg,),
            models=(m,),
            routing=RoutingSettings(max_attempts=1, backoff_initial=0.0),
        )
        return await start_gateway(aiohttp_client, settings)

    yield make
    for server in servers:
        server.close()


def whole(payload: Any) -> bytes:
    body = json.dumps(payload).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return head % len(body) + body


async def post(
    gw: TestClient[Any, Any], secret: str, path: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    resp = await gw.post(path, json=body, headers=auth(secret))
    return resp.status, await resp.json()


async def row_and_spend(gw: TestClient[Any, Any], secret: str, rows: int = 1) -> tuple[Any, Any]:
    """The last usage row (once `rows` were recorded) and the key's spending."""
    app = app_of(gw)
    async with asyncio.timeout(NEVER_HANG):
        await app[USAGE_KEY].wait_recorded(rows)
    row = (await usage_rows(gw))[-1]
    record = app[KEYS_KEY].lookup(secret)
    assert record is not None
    spend = await app[GATE_KEY].spending(record)
    assert spend is not None
    return row, spend


def completion(usage: dict[str, Any], message: dict[str, Any] | None = None) -> bytes:
    return whole(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 1,
            "model": "up",
            "choices": [
                {
                    "index": 0,
                    "message": message or {"role": "assistant", "content": "hi"},
                    "finish_reason": "stop",
                }
            ],
            "usage": usage,
        }
    )


def mtok(tokens: int, usd_per_mtok: float) -> float:
    return tokens * usd_per_mtok / 1_000_000


# --- audio tokens (OpenAI gpt-audio, chat completions pass-through) --------------------------

# genai-prices (what the gateway prices `gpt-audio` by): $2.50 / $10 per Mtok of text in / out,
# $32 / $64 per Mtok of audio in / out. OpenAI's own price page says the same.
AUDIO_IN, AUDIO_OUT, TEXT_IN, TEXT_OUT = 32.0, 64.0, 2.5, 10.0


# WRONG (high, USD budgets): audio output tokens are charged at the text output price.
# `modalities: ["text", "audio"]` to `gpt-audio` (a chat completions model; the request
# passes through untouched) answers with `completion_tokens_details.audio_tokens`, which
# OpenAI bills at $64/Mtok, 6.4x the $10 text rate; `Price.cost` has no audio rate at all
# (`Rates` has input/output/cached/cache-write/reasoning; genai-prices' `output_audio_mtok`
# is dropped in `prices._rates`, and there is no `audio_*_price_per_mtok` config field either).
# Here: 4,000 completion tokens of which 3,900 audio (about three minutes of speech at
# OpenAI's ~20 output audio tokens a second) and 20 prompt tokens. OpenAI bills
# 100 x $10 + 3,900 x $64 = $0.2506 (+ $0.00005 prompt); the key is charged 4,000 x $10 =
# $0.04, a 6.3x undercharge. The admission hold is priced the same way (output limit at $10),
# so a $0.05 budget admits the request and is overspent by $0.20 by one answer, and every
# further answer keeps the ratio: a $100 budget lets the key spend ~$630 of audio.
# Realistic: this is the documented way to get spoken answers from Chat Completions; the
# usage shape is OpenAI's (`audio_tokens` inside `completion_tokens`).
# Right: price `audio_tokens` at the model's audio rates (genai-prices has them:
# `input_audio_mtok`, `output_audio_mtok`), for the charge and for the hold (a request asking
# for audio output holds its output limit at the audio rate).
async def test_audio_output_tokens_priced_at_audio_rate(build: Build) -> None:
    usage = {
        "prompt_tokens": 20,
        "completion_tokens": 4_000,
        "total_tokens": 4_020,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 3_900,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }
    message = {
        "role": "assistant",
        "content": None,
        "audio": {"id": "audio_1", "data": "UklGRg==", "expires_at": 1, "transcript": "hi"},
    }
    up = RawUpstream(completion(usage, message), hold=False)
    gw = await build("openai", up, "gpt-audio")
    secret = await create_key(gw, budget_usd=5.0)
    body = {
        "model": "m",
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "wav"},
        "max_completion_tokens": 4_000,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
    }
    status, _ = await post(gw, secret, "/v1/chat/completions", body)
    assert status == 200
    assert up.bodies[0]["modalities"] == ["text", "audio"]  # it reached OpenAI as sent
    row, spend = await row_and_spend(gw, secret)
    billed = mtok(20, TEXT_IN) + mtok(100, TEXT_OUT) + mtok(3_900, AUDIO_OUT)
    assert row["cost_usd"] >= billed * 0.999, (row["cost_usd"], billed)
    assert spend.usd >= billed * 0.999


# WRONG (high, USD budgets): audio input is charged at the text input price. An `input_audio`
# part to `gpt-audio` is billed at $32/Mtok (`prompt_tokens_details.audio_tokens`), 12.8x the
# $2.50 text rate. Admission sizes the audio (32 tokens a second) but prices it at $2.50 too,
# and the charge ignores `audio_tokens`. Here 60,000 audio tokens (about 100 minutes of speech
# at OpenAI's ~10 input audio tokens a second, a few MB of compressed audio; the test sends
# fewer bytes, enough for the prompt bound to believe the count): OpenAI bills
# 60,000 x $32 = $1.92 (+ the text), the key is charged 60,000 x $2.50 = $0.15.
# Realistic: speech-in is the model's purpose; `audio_tokens` is OpenAI's usage field.
async def test_audio_input_tokens_priced_at_audio_rate(build: Build) -> None:
    usage = {
        "prompt_tokens": 60_020,
        "completion_tokens": 10,
        "total_tokens": 60_030,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 60_000},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }
    up = RawUpstream(completion(usage), hold=False)
    gw = await build("openai", up, "gpt-audio")
    secret = await create_key(gw, budget_usd=5.0)
    # 100 kB of compressed audio (the gateway reads ~25 s at 4 kB/s likely); the upstream's
    # count is within the prompt bound (the body's bytes + slack), so it is believed.
    audio = "SUQz" + "A" * 100_000
    body = {
        "model": "m",
        "max_completion_tokens": 10,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Transcribe."},
                    {"type": "input_audio", "input_audio": {"data": audio, "format": "mp3"}},
                ],
            }
        ],
    }
    status, _ = await post(gw, secret, "/v1/chat/completions", body)
    assert status == 200
    row, _ = await row_and_spend(gw, secret)
    assert row["prompt_tokens"] == 60_020, row  # the count itself is believed
    billed = mtok(20, TEXT_IN) + mtok(60_000, AUDIO_IN) + mtok(10, TEXT_OUT)
    assert row["cost_usd"] >= billed * 0.999, (row["cost_usd"], billed)


# --- image output (Gemini image models, translated) -------------------------------------------

# genai-prices for gemini-2.5-flash-image: $0.30 in, $2.50 text out, $30/Mtok image out (1,290
# tokens an image: Google's $0.039 an image).
IMAGE_OUT = 30.0


def gemini_answer(usage: dict[str, Any], parts: list[dict[str, Any]]) -> bytes:
    return whole(
        {
            "candidates": [
                {
                    "content": {"role": "model", "parts": parts},
                    "finishReason": "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": usage,
            "modelVersion": "gemini-2.5-flash-image",
            "responseId": "r1",
        }
    )


# WRONG (high, USD budgets): images a Gemini image model generates are charged at the text
# output price. The gateway documents and translates `modalities: ["image", "text"]` for
# `gemini-2.5-flash-image` (providers.md); Gemini reports the image as output tokens
# (`candidatesTokensDetails: [{"modality": "IMAGE", "tokenCount": 1290}]`) billed at $30/Mtok,
# but `openai_usage` keeps only `candidatesTokenCount` and `Price.cost` prices it at the
# $2.50 text rate: $0.0032 charged for a $0.0387 image, 12x less (the price list the gateway
# uses has `output_image_mtok = 30` for this very model). With `n` (candidateCount) or many
# requests the ratio holds: a $10 budget buys ~$120 of images. Admission prices the output
# limit at $2.50 too.
# Realistic: Google bills exactly this (its price page: $0.039 per 1024x1024 image).
# Right: read the modality details and price IMAGE output tokens at the image rate.
async def test_gemini_image_output_priced_at_image_rate(build: Build) -> None:
    usage = {
        "promptTokenCount": 10,
        "candidatesTokenCount": 1_300,
        "totalTokenCount": 1_310,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 10}],
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
    assert answer["choices"][0]["message"]["images"]  # the image reached the client
    row, _ = await row_and_spend(gw, secret)
    billed = mtok(10, 0.30) + mtok(10, 2.50) + mtok(1_290, IMAGE_OUT)
    assert row["cost_usd"] >= billed * 0.999, (row["cost_usd"], billed)


# WRONG (medium, USD budgets): audio input to Gemini is charged at the text input price.
# gemini-2.5-flash bills audio input at $1.00/Mtok against $0.30 for text (genai-prices:
# `input_audio_mtok = 1`); Gemini reports it in `promptTokensDetails` (modality AUDIO), which
# the gateway drops. 3.3x under on the audio part: 100,000 audio tokens (~53 minutes at
# Gemini's 32 tokens a second) bill $0.10 and are charged $0.03.
# Realistic: the gateway translates `input_audio` to Gemini `inlineData` (providers.md table).
async def test_gemini_audio_input_priced_at_audio_rate(build: Build) -> None:
    usage = {
        "promptTokenCount": 100_010,
        "candidatesTokenCount": 10,
        "totalTokenCount": 100_020,
        "promptTokensDetails": [
            {"modality": "TEXT", "tokenCount": 10},
            {"modality": "AUDIO", "tokenCount": 100_000},
        ],
    }
    up = RawUpstream(gemini_answer(usage, [{"text": "ok"}]), hold=False)
    gw = await build("gemini", up, "gemini-2.5-flash")
    secret = await create_key(gw, budget_usd=5.0)
    audio = "SUQz" + "A" * 400_000  # 300 kB of MP3: 100,000 tokens is within the prompt bound
    body = {
        "model": "m",
        "max_tokens": 10,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Summarise."},
                    {"type": "input_audio", "input_audio": {"data": audio, "format": "mp3"}},
                ],
            }
        ],
    }
    status, answer = await post(gw, secret, "/v1/chat/completions", body)
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    assert row["prompt_tokens"] == 100_010, row
    billed = mtok(10, 0.30) + mtok(100_000, 1.00) + mtok(10, 2.50)
    assert row["cost_usd"] >= billed * 0.999, (row["cost_usd"], billed)


# --- priority processing (OpenAI `service_tier`) ----------------------------------------------


# WRONG (medium, USD budgets): `service_tier: "priority"` is passed through to OpenAI (chat as
# sent; Responses translated "the same", providers.md) and billed at the priority rates,
# about twice the standard ones (gpt-5: $2.50 / $0.25 cached / $20 per Mtok against $1.25 /
# $0.125 / $10; gpt-4o $4.25 / $17 against $2.50 / $10). The answer says so
# (`"service_tier": "priority"`), but the gateway prices every request at the standard rates,
# for the hold and the charge: a key spends twice its USD budget by setting one field.
# Realistic where the operator's OpenAI organisation has priority processing (OpenAI bills it
# per request, pay as you go); nothing lets the operator refuse or price the field.
# Right: charge what the answer's `service_tier` costs (or refuse `priority` to keys with a
# USD budget when no priority price is known). `flex` (half price) overcharges: safe.
async def test_priority_service_tier_charged_at_priority_rates(build: Build) -> None:
    usage = {
        "prompt_tokens": 10_000,
        "completion_tokens": 2_000,
        "total_tokens": 12_000,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    reply = json.loads(completion(usage).split(b"\r\n\r\n", 1)[1])
    reply["service_tier"] = "priority"
    up = RawUpstream(whole(reply), hold=False)
    gw = await build("openai", up, "gpt-5")
    secret = await create_key(gw, budget_usd=5.0)
    body = {
        "model": "m",
        "service_tier": "priority",
        "max_completion_tokens": 2_000,
        "messages": [{"role": "user", "content": "x " * 20_000}],
    }
    # The remedy taken: the price list's priority rates (gpt-5: $2.50 / $20), held and
    # charged for the request that asks for them, chat and Responses alike.
    asked = RESPONSES | {"max_output_tokens": 2_000, "input": "x " * 20_000}
    for i, (path, request) in enumerate((("/v1/chat/completions", body), ("/v1/responses", asked))):
        status, answer = await post(gw, secret, path, request)
        assert status == 200, answer
        assert up.bodies[i]["service_tier"] == "priority"
        row, _ = await row_and_spend(gw, secret, rows=i + 1)
        assert row["cost_usd"] == pytest.approx(mtok(10_000, 2.50) + mtok(2_000, 20.0)), row
    # A model priced in the config has no priority rates: a USD key is refused the field,
    # and nothing goes upstream.
    fixed = await build(
        "openai", up, "gpt-5", model={"input_price_per_mtok": 1.0, "output_price_per_mtok": 2.0}
    )
    secret = await create_key(fixed, budget_usd=5.0)
    for path, request in (("/v1/chat/completions", body), ("/v1/responses", RESPONSES)):
        status, answer = await post(fixed, secret, path, request)
        assert status == 400, answer
        assert answer["error"]["param"] == "service_tier", answer
    assert len(up.bodies) == 2


RESPONSES = {"model": "m", "input": "hi", "service_tier": "priority", "max_output_tokens": 10}


# --- built-in tools billed per call -----------------------------------------------------------


# WRONG (high, USD budgets, cheap models): web search is billed per call on top of tokens, and
# the gateway charges tokens only. A chat request with `web_search_options` to a search model
# (gpt-4o-mini-search-preview searches on every request) costs at least $10 per 1,000 calls
# (genai-prices, the gateway's own price list, has `$10/web searches K` for it; OpenAI's page
# has listed $25-30 for the search-preview models) while its tokens cost almost nothing:
# 30 prompt + 100 completion tokens are $0.0000645 at $0.15/$0.60. The key is charged that;
# the operator pays >= $0.01. A $1 budget buys ~15,000 such requests, ~$150+ of searches:
# 150x the budget. Documented only as "no prompt bound" for `web_search_options`
# (providers.md); nothing says the per-call fee is not charged.
# Right: charge the search fee per request that searched (chat search models search once a
# request; genai-prices has the rate), and hold it at admission.
async def test_chat_web_search_fee_is_charged(build: Build) -> None:
    usage = {
        "prompt_tokens": 30,
        "completion_tokens": 100,
        "total_tokens": 130,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    message = {
        "role": "assistant",
        "content": "According to the news...",
        "annotations": [
            {
                "type": "url_citation",
                "url_citation": {
                    "end_index": 5,
                    "start_index": 0,
                    "title": "t",
                    "url": "https://x",
                },
            }
        ],
    }
    up = RawUpstream(completion(usage, message), hold=False)
    gw = await build("openai", up, "gpt-4o-mini-search-preview")
    secret = await create_key(gw, budget_usd=1.0)
    body = {
        "model": "m",
        "web_search_options": {},
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "What happened today?"}],
    }
    status, answer = await post(gw, secret, "/v1/chat/completions", body)
    assert status == 200, answer
    assert up.bodies[0]["web_search_options"] == {}
    row, _ = await row_and_spend(gw, secret)
    billed = 0.010 + mtok(30, 0.15) + mtok(100, 0.60)
    assert row["cost_usd"] >= billed * 0.999, (row["cost_usd"], billed)


def response_body(usage: dict[str, Any], output: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "status": "completed",
        "model": "up-model",
        "output": output,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "metadata": {},
        "parallel_tool_calls": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "tool_choice": "auto",
        "tools": [],
        "usage": usage,
    }


def message_item(text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "id": "msg_1",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }


# WRONG (high, USD budgets): Responses built-in tools passed through to a `responses_api`
# upstream are billed per call, and the gateway charges tokens only. OpenAI bills
# `web_search` at $10 per 1,000 calls (genai-prices: `$10/web searches K` for gpt-5-mini;
# `file_search` $2.50 per 1,000, `code_interpreter` $0.03 a container, `image_generation` its
# image tokens at gpt-image-1's $40/Mtok, none of them in `usage`). One response may search
# many times (reasoning models search repeatedly; `max_tool_calls` unset means no limit): each
# `web_search_call` item of `output` is a billed call the gateway could count. Here 8 searches
# and 5,000 + 500 tokens on gpt-5-mini: OpenAI bills $0.08 + $0.00225 = $0.08225, the key is
# charged $0.00225, 36x less; a $1 budget lets the key spend ~$36.
# Realistic: built-in tools are the reason to mark an upstream `responses_api`, and the gateway
# routes requests with them only there (providers.md "Pass-through").
# Right: count the upstream's tool calls in the answer (`web_search_call`, `file_search_call`,
# `code_interpreter_call`, `image_generation_call` items) at their prices, and hold for them.
async def test_responses_web_search_calls_are_charged(build: Build) -> None:
    usage = {
        "input_tokens": 5_000,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 500,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 5_500,
    }
    searches = [
        {
            "type": "web_search_call",
            "id": f"ws_{i}",
            "status": "completed",
            "action": {"type": "search", "query": f"q{i}"},
        }
        for i in range(8)
    ]
    up = RawUpstream(whole(response_body(usage, [*searches, message_item("Found.")])), hold=False)
    gw = await build("openai", up, "gpt-5-mini", fields={"responses_api": True})
    secret = await create_key(gw, budget_usd=1.0)
    body = {
        "model": "m",
        "input": "Research the news of the day.",
        "tools": [{"type": "web_search"}],
        "max_output_tokens": 500,
    }
    status, answer = await post(gw, secret, "/v1/responses", body)
    assert status == 200, answer
    assert up.paths == ["/v1/responses"]
    row, _ = await row_and_spend(gw, secret)
    billed = 8 * 0.010 + mtok(5_000, 0.25) + mtok(500, 2.0)
    assert row["cost_usd"] >= billed * 0.999, (row["cost_usd"], billed)


# --- prompts stored upstream (`previous_response_id`) -----------------------------------------


class Gathering:
    """A Responses upstream that answers nothing until `release` is set, then each request
    with `reply`; `arrived` counts the requests taken, `changed` is set at each."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.arrived = 0
        self.changed = asyncio.Event()
        self.release = asyncio.Event()
        self.bodies: list[dict[str, Any]] = []
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _, body = await read_request(reader)
            self.bodies.append(json.loads(body))
            self.arrived += 1
            self.changed.set()
            await self.release.wait()
            writer.write(self.reply)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


# WRONG (medium, token and USD budgets): a request passed through with `previous_response_id`
# (or `conversation`) is billed by the upstream for the whole stored conversation as input,
# which the gateway cannot see, and admission holds nothing for it: only the new input's few
# tokens and the output limit. So any number of such requests in flight together are admitted
# on a nearly empty budget, and each is then charged its real (unbounded) input. Here a
# 50,000-token budget, five concurrent requests continuing a 40,000-token conversation: all
# five are admitted, the key spends 200,000+ tokens, 150,000 past its budget. keys.md promises
# overspend of at most one request's actual usage "however many requests arrive at once",
# excepting what upstreams bill by "what the gateway cannot see, a file sent by id", which at
# least holds 10,000 tokens (100,000 at most) per file: a stored conversation holds 0, and
# can be as large as the model's context (400k tokens on gpt-5: $0.50 a request at $1.25/Mtok,
# times the requests a client keeps in flight).
# Realistic: this is how the Responses API is used for multi-turn chat (OpenAI stores
# responses by default); a client with `--max-concurrency` unset sends as many as it likes.
# Right: hold a stated size for an unseen stored prompt (as for a file by id: e.g. the
# model's context window at most), so in-flight requests cannot together pass the budget.
async def test_previous_response_id_requests_in_flight_hold_their_stored_prompt(
    build: Build,
) -> None:
    usage = {
        "input_tokens": 40_010,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 10,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 40_020,
    }
    up = Gathering(whole(response_body(usage, [message_item("ok")])))
    gw = await build("openai", up, "gpt-5", fields={"responses_api": True})
    secret = await create_key(gw, budget_tokens=100_000)
    # The conversation so far went through the gateway (the remedy taken: its size is known
    # from its answer's usage; one it never saw is held as a file sent by id, next test).
    up.release.set()
    first = {"model": "m", "input": "x " * 100, "max_output_tokens": 10}
    status, answer = await post(gw, secret, "/v1/responses", first)
    assert status == 200, answer
    up.release.clear()
    up.arrived = 0
    body = {
        "model": "m",
        "previous_response_id": answer["id"],
        "input": "And then?",
        "max_output_tokens": 10,
    }
    tasks = [asyncio.create_task(post(gw, secret, "/v1/responses", body)) for _ in range(5)]
    async with asyncio.timeout(NEVER_HANG):
        # Until each request is either at the upstream (admitted) or answered (refused).
        while up.arrived + sum(t.done() for t in tasks) < len(tasks):
            up.changed.clear()
            waiter = asyncio.create_task(up.changed.wait())
            await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        up.release.set()
        results = await asyncio.gather(*tasks)
    statuses = sorted(status for status, _ in results)
    # (a request refused at admission makes no usage row)
    _, spend = await row_and_spend(gw, secret, rows=1 + statuses.count(200))
    one_request = 40_020
    assert spend.tokens <= 100_000 + one_request, (statuses, spend.tokens)
    assert statuses.count(429) >= 3, statuses


# A conversation the gateway never saw (made before a restart, or elsewhere) is held as a file
# sent by id: 10,000 tokens likely. And one known to be another key's is not found for this
# key (its conversation is that key's data), and goes nowhere.
async def test_unknown_and_other_keys_stored_conversations(build: Build) -> None:
    usage = {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 10,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 20,
    }
    up = RawUpstream(whole(response_body(usage, [message_item("ok")])), hold=False)
    gw = await build("openai", up, "gpt-5", fields={"responses_api": True})
    small = await create_key(gw, budget_tokens=9_000)
    body = {"model": "m", "previous_response_id": "resp_never_seen", "input": "And then?"}
    status, answer = await post(gw, small, "/v1/responses", body | {"max_output_tokens": 10})
    assert status == 429, answer  # 10,000 held for the unseen conversation
    owner = await create_key(gw, budget_tokens=1_000_000)
    other = await create_key(gw, budget_tokens=1_000_000)
    status, answer = await post(gw, owner, "/v1/responses", {"model": "m", "input": "hi"})
    assert status == 200, answer
    sent = len(up.bodies)
    body["previous_response_id"] = answer["id"]
    status, refused = await post(gw, other, "/v1/responses", body)
    assert status == 404, refused
    assert refused["error"]["param"] == "previous_response_id", refused
    assert len(up.bodies) == sent  # nothing went upstream
    status, answer = await post(gw, owner, "/v1/responses", body)
    assert status == 200, answer


# WRONG (high, USD budgets): the admission hold prices a request asking for audio output at
# the text rate too, so a budget that cannot pay for the answer admits it. A $0.05 budget and
# `max_completion_tokens: 4000` with `modalities: ["text", "audio"]` to gpt-audio: the hold is
# 4,000 x $10/Mtok = $0.04 (+ prompt), it fits; the answer may cost 4,000 x $64/Mtok = $0.256,
# five times the whole budget, in one request. Right: hold the output limit at the audio rate
# when audio output is asked for (then this request does not fit: 429 insufficient_quota).
async def test_audio_output_request_the_budget_cannot_pay_is_refused(build: Build) -> None:
    up = RawUpstream(completion({"prompt_tokens": 20, "completion_tokens": 1}), hold=False)
    gw = await build("openai", up, "gpt-audio")
    secret = await create_key(gw, budget_usd=0.05)
    body = {
        "model": "m",
        "modalities": ["text", "audio"],
        "audio": {"voice": "alloy", "format": "wav"},
        "max_completion_tokens": 4_000,
        "messages": [{"role": "user", "content": "Tell me a long story."}],
    }
    status, answer = await post(gw, secret, "/v1/chat/completions", body)
    assert status == 429, (status, answer, up.bodies)


# SOUND: a Responses request passed through without `max_output_tokens`, from a key with a
# budget, to a model without `max_tokens`, reaches the upstream with the provider's
# `default_max_tokens` as its `max_output_tokens` (the limit admission held), and an answer
# past it is charged no more than that limit (the completion bound).
async def test_responses_pass_through_gets_the_held_output_limit(build: Build) -> None:
    usage = {
        "input_tokens": 10,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 50_000,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 50_010,
    }
    up = RawUpstream(whole(response_body(usage, [message_item("ok")])), hold=False)
    gw = await build("openai", up, "gpt-5", fields={"responses_api": True})
    secret = await create_key(gw, budget_tokens=1_000_000)
    status, answer = await post(gw, secret, "/v1/responses", {"model": "m", "input": "hi"})
    assert status == 200, answer
    assert up.bodies[0]["max_output_tokens"] == 4_096
    row, spend = await row_and_spend(gw, secret)
    assert row["completion_tokens"] == 4_096, row
    assert spend.tokens == row["total_tokens"]


# SOUND: cached input and reasoning output of a Responses pass-through answer are priced as
# the price list says (gpt-5: $1.25 input, $0.125 cached, $10 output and reasoning per Mtok),
# and the USD budget counts the same cost as the row.
async def test_responses_cached_and_reasoning_tokens_are_priced(build: Build) -> None:
    usage = {
        "input_tokens": 10_000,
        "input_tokens_details": {"cached_tokens": 8_000},
        "output_tokens": 2_000,
        "output_tokens_details": {"reasoning_tokens": 1_500},
        "total_tokens": 12_000,
    }
    up = RawUpstream(whole(response_body(usage, [message_item("ok")])), hold=False)
    gw = await build("openai", up, "gpt-5", fields={"responses_api": True})
    secret = await create_key(gw, budget_usd=5.0)
    body = {"model": "m", "input": "x " * 20_000, "max_output_tokens": 2_000}
    status, answer = await post(gw, secret, "/v1/responses", body)
    assert status == 200, answer
    row, spend = await row_and_spend(gw, secret)
    expected = mtok(2_000, 1.25) + mtok(8_000, 0.125) + mtok(2_000, 10.0)
    assert abs(row["cost_usd"] - expected) < 1e-9, (row["cost_usd"], expected)
    assert abs(spend.usd - expected) < 1e-9


# SOUND: duplicate JSON keys are read alike by admission and by what goes upstream: the
# pass-through re-encodes the body from its decoded fields (the last duplicate wins in both,
# as in Python's json and Go's encoding/json upstreams), so a small `max_tokens` first and a
# huge one last is held, and sent, as the huge one (refused here by a 20,000-token budget),
# and the reverse is sent as the small one it was held as.
async def test_duplicate_max_tokens_keys_are_held_as_sent(build: Build) -> None:
    up = RawUpstream(completion({"prompt_tokens": 20, "completion_tokens": 5}), hold=False)
    gw = await build("openai", up, "gpt-4o")
    secret = await create_key(gw, budget_tokens=20_000)
    head = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
    big_last = head + b'"max_tokens": 10, "max_tokens": 50000}'
    resp = await gw.post("/v1/chat/completions", data=big_last, headers=auth(secret))
    assert resp.status == 429, await resp.text()
    assert up.bodies == []
    small_last = head + b'"max_tokens": 50000, "max_tokens": 10}'
    resp = await gw.post("/v1/chat/completions", data=small_last, headers=auth(secret))
    assert resp.status == 200, await resp.text()
    assert up.bodies[0]["max_tokens"] == 10


# Anthropic message answer (non-streaming), for the tier check below.
def anthropic_answer(inp: int, out: int) -> bytes:
    return whole(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": [{"type": "text", "text": "ok"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": inp,
                "output_tokens": out,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }
    )


# SOUND: a prompt past Anthropic's 200k-token tier (Sonnet 4.5 with the 1M context) is
# priced at the tier's rates for input and output ($6 / $22.50 per Mtok, not $3 / $15).
async def test_anthropic_long_context_tier_is_priced(build: Build) -> None:
    up = RawUpstream(anthropic_answer(250_000, 1_000), hold=False)
    gw = await build("anthropic", up, "claude-sonnet-4-5")
    secret = await create_key(gw, budget_usd=50.0)
    body = {
        "model": "m",
        "max_tokens": 1_000,
        "messages": [{"role": "user", "content": "x" * 260_000}],
    }
    status, answer = await post(gw, secret, "/v1/chat/completions", body)
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    assert row["prompt_tokens"] == 250_000, row
    expected = mtok(250_000, 6.0) + mtok(1_000, 22.5)
    assert abs(row["cost_usd"] - expected) < 1e-9, (row["cost_usd"], expected)


def responses_event(kind: str, **fields: Any) -> bytes:
    payload = {"type": kind, **fields}
    return b"event: " + kind.encode() + b"\ndata: " + json.dumps(payload).encode() + b"\n\n"


# Streamed, each search is a `response.web_search_call.completed` event: counted as the events
# pass (a stream cut after them still had them billed), once each (the terminal event's
# `output` lists the same calls and is not counted again).
async def test_streamed_responses_web_search_calls_are_charged(build: Build) -> None:
    usage = {
        "input_tokens": 5_000,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 500,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 5_500,
    }
    response = {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}
    events = [responses_event("response.created", response=response)]
    items = []
    for i in range(3):
        item = {"type": "web_search_call", "id": f"ws_{i}", "status": "in_progress"}
        events += [
            responses_event("response.output_item.added", output_index=i, item=item),
            responses_event(
                "response.web_search_call.completed", output_index=i, item_id=item["id"]
            ),
            responses_event(
                "response.output_item.done", output_index=i, item=item | {"status": "completed"}
            ),
        ]
        items.append(item | {"status": "completed"})
    done = response | {"status": "completed", "output": items, "usage": usage}
    events.append(responses_event("response.completed", response=done))
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"
    up = RawUpstream(head + b"".join(events), hold=False)
    gw = await build("openai", up, "gpt-5-mini", fields={"responses_api": True})
    secret = await create_key(gw, budget_usd=1.0)
    body = {
        "model": "m",
        "input": "Research the news of the day.",
        "tools": [{"type": "web_search"}],
        "max_output_tokens": 500,
        "stream": True,
    }
    resp = await gw.post("/v1/responses", json=body, headers=auth(secret))
    text = await resp.text()
    assert resp.status == 200 and "response.completed" in text, text[-300:]
    row, _ = await row_and_spend(gw, secret)
    billed = 3 * 0.010 + mtok(5_000, 0.25) + mtok(500, 2.0)
    assert row["cost_usd"] == pytest.approx(billed), (row["cost_usd"], billed)
    # The streamed response is stored upstream: a request continuing it holds its size.
    stored = app_of(gw)[STORED_KEY].prompt("resp_1", row["key_id"])
    assert (stored.likely, stored.most) == (5_500, 5_500)


# A Responses request with a built-in `web_search` tool holds its searches at admission: its
# `max_tool_calls`, else 10. On gpt-5-mini ($0.01 a search) a $0.05 budget is refused the
# request without a limit (10 searches held: $0.10) and admitted with `max_tool_calls: 2`;
# nothing of the refused one goes upstream. The tool's type may be spelled with an escape.
async def test_responses_web_search_tool_holds_its_searches(build: Build) -> None:
    usage = {
        "input_tokens": 50,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": 20,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 70,
    }
    up = RawUpstream(whole(response_body(usage, [message_item("ok")])), hold=False)
    gw = await build("openai", up, "gpt-5-mini", fields={"responses_api": True})
    secret = await create_key(gw, budget_usd=0.05)
    body = {"model": "m", "input": "News?", "max_output_tokens": 20}
    for tool in (b'{"type": "web_search"}', b'{"type": "web\\u005fsearch_preview"}'):
        raw = b'{"model": "m", "input": "News?", "max_output_tokens": 20, "tools": [%b]}' % tool
        headers = {**auth(secret), "Content-Type": "application/json"}
        async with gw.post("/v1/responses", data=raw, headers=headers) as resp:
            assert resp.status == 429, await resp.text()
    assert up.bodies == []
    limited = body | {"tools": [{"type": "web_search"}], "max_tool_calls": 2}
    status, answer = await post(gw, secret, "/v1/responses", limited)
    assert status == 200, answer
