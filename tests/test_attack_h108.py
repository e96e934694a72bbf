"""Attack on helper-106's and helper-107's remedies (helper-108): `ChatCall.held` (output at
the image rate, `_sends_audio`, `held_searches`, `held_writes`), `/v1/messages`'
`_searches_at_most` and `_cache_writes`, `UNKNOWN_SEARCH_PRICE`, the 1-hour cache-write rate,
`UsageTally.billed` (Anthropic's `cache_creation` and `server_tool_use`, web search blocks
on a pass-through stream) and `item_reference` holds.

Each failing test asserts what should happen; the comment above it says what is wrong,
expected vs actual, severity and realism. Passing tests marked `# SOUND:` pin what was checked
and held. Upstreams are in-process raw TCP servers (tests/raw_upstream); the fixtures and
helpers are helper-105's and helper-107's.

Also checked, not a test: the hot path (`tests.bench_instructions --mode json --side gateway
--without-usage-writes`) is 908,346 instructions a request at c3d352a against 908,815 at
299d5af, before these commits: no regression.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from gateway.handlers.messages import _cache_writes, _searches_at_most
from gateway.messages.schema import MessagesRequest
from gateway.prices import load_database
from gateway.providers.base import ChatCall
from gateway.schemas.chat import ChatCompletionRequest
from gateway.settings import ModelConfig, Target
from gateway.usage_bounds import UNCAPPED_SEARCHES
from tests.conftest import create_key
from tests.raw_upstream import RawUpstream, auth
from tests.test_attack_h105 import (
    Build,
    build,
    completion,
    gemini_answer,
    message_item,
    mtok,
    post,
    response_body,
    row_and_spend,
    whole,
)
from tests.test_attack_h106 import RESPONSE_USAGE
from tests.test_attack_h107 import (
    IN,
    OUT,
    SEARCH,
    SONNET,
    cached_request,
    ending as closing_events,
    message,
    one_hour_usage,
    search_blocks,
    search_request,
    start,
    stream,
    text_block,
)

__all__ = ["build"]  # (the fixture, imported for pytest)

JSON = {"Content-Type": "application/json"}


async def post_raw(gw: Any, secret: str, path: str, raw: bytes) -> tuple[int, str]:
    async with gw.post(path, data=raw, headers={**auth(secret), **JSON}) as resp:
        return resp.status, await resp.text()


# --- Anthropic usage shapes: a bad detail now loses the whole count ---------------------------

# A 70,000-token prompt (50,000 of it written to the cache) and 100 output tokens on Sonnet
# 4.5: Anthropic bills $0.06 + $0.1875 + $0.0015 = $0.249.
GOOD_COUNTS = {
    "input_tokens": 20_000,
    "output_tokens": 100,
    "cache_creation_input_tokens": 50_000,
    "cache_read_input_tokens": 0,
}
GOOD_BILL = mtok(20_000, IN) + mtok(50_000, 3.75) + mtok(100, OUT)
PLAIN_MESSAGES = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}


# WRONG (medium, token and USD budgets; a regression of c3d352a): one unreadable detail in an
# Anthropic usage now throws away the whole usage. `AnthropicUsage` gained `cache_creation`
# and `server_tool_use` as typed structs read with the counts (`USAGE_DECODER`), so a detail
# of another shape (`"cache_creation": 0`, a count as a string or a float) fails the decode,
# `UsageTally.readable` turns False, and the row is the pipeline's estimate, made from the
# request: 8 prompt tokens, $0.00125-0.00137, where the upstream reported (and bills) 70,000
# tokens, $0.249: 180-200x under. Before c3d352a (checked at 299d5af) these details were
# unknown fields, ignored, and the row was exact at $0.249. Expected: exact row, cost >=
# $0.249. Actual: estimated, ~$0.0013. Realism: Anthropic itself sends well-formed details;
# Anthropic-compatible upstreams (proxies, other vendors' `/v1/messages` endpoints, which the
# `anthropic` provider type is pointed at) vary in them, and the counts they got right are
# what a budget rests on. The harm scales with the prompt, which the estimate does not see
# (the cached system prompt of an agent, the stored context of a long session).
# Right: read `cache_creation` and `server_tool_use` apart (as `msgspec.Raw`, decoded
# leniently), so a bad detail costs only that detail (5-minute price for the writes, the
# search blocks seen), not the token counts.
@pytest.mark.parametrize(
    "detail",
    [
        {"cache_creation": 0},
        {"cache_creation": {"ephemeral_1h_input_tokens": "0"}},
        {"server_tool_use": {"web_search_requests": 1.0}},
    ],
    ids=["cache_creation-number", "ttl-count-string", "searches-float"],
)
async def test_bad_usage_detail_keeps_the_token_counts(build: Build, detail: Any) -> None:
    up = RawUpstream(message(GOOD_COUNTS | detail), hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    status, answer = await post(gw, secret, "/v1/messages", PLAIN_MESSAGES)
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    assert not row["estimated"], row
    assert row["prompt_tokens"] == 70_000, row
    assert row["cost_usd"] >= GOOD_BILL * 0.999, (row["cost_usd"], GOOD_BILL)


# WRONG (same cause, streamed; exact at 299d5af): a `message_delta` whose `server_tool_use`
# count is a string is now unreadable, so the stream's closing output count is lost with it:
# the row, exact before c3d352a, is estimated from `message_start`'s counts and the streamed
# characters (output 4 tokens, not 2,000: $0.030 under on the output alone). Expected:
# exact, 2,000 output tokens. Actual: estimated, output from the streamed text. Realism as
# above.
async def test_bad_closing_search_count_keeps_the_output_count(build: Build) -> None:
    events = stream(
        start({"input_tokens": 40, "output_tokens": 1}),
        *text_block(0, "Clause 7 says..."),
        *closing_events({"output_tokens": 2_000, "server_tool_use": {"web_search_requests": "0"}}),
    )
    up = RawUpstream(events, hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    body = PLAIN_MESSAGES | {"stream": True, "max_tokens": 2_000}
    resp = await gw.post("/v1/messages", json=body, headers=auth(secret))
    assert resp.status == 200, await resp.text()
    assert b"message_stop" in await resp.read()
    row, _ = await row_and_spend(gw, secret)
    assert not row["estimated"], row
    assert row["completion_tokens"] == 2_000, row


# WRONG (low, USD budgets): a whole (non-stream) answer's web searches are charged only from
# `usage.server_tool_use.web_search_requests`; its `server_tool_use` blocks named
# `web_search` are not counted (only a pass-through stream counts them), so an answer whose
# usage lacks the count, or whose usage is unreadable (above), charges none of the searches
# it shows. Here five searches in the content, counts without `server_tool_use`: Expected
# >= $0.071 (5 x $0.01 + tokens). Actual: $0.021. Realism: low with Anthropic (it reports the
# count); an Anthropic-compatible upstream that runs the tool and omits the count, or one
# whose usage fails to decode, is charged nothing for the searches. Right: count the blocks
# of a whole answer as the stream's are counted (`_MessageView.content` already has
# `_BlockView.name`), and take the larger of that and the count.
async def test_whole_answer_search_blocks_are_charged(build: Build) -> None:
    usage = {"input_tokens": 6_000, "output_tokens": 200}
    up = RawUpstream(message(usage, search_blocks(5)), hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    status, answer = await post(gw, secret, "/v1/messages", search_request())
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    billed = mtok(6_000, IN) + mtok(200, OUT) + 5 * SEARCH
    assert row["cost_usd"] >= billed * 0.999, (row["cost_usd"], billed)


# SOUND: the documented odd shapes are read: `cache_creation: null`, `server_tool_use: {}`,
# `server_tool_use: null` and a null count leave an exact row at the token counts' price.
@pytest.mark.parametrize(
    "detail",
    [
        {"cache_creation": None, "server_tool_use": {}},
        {"server_tool_use": None, "cache_creation": {}},
        {"server_tool_use": {"web_search_requests": None}},
    ],
)
async def test_null_and_empty_usage_details_are_exact(build: Build, detail: Any) -> None:
    up = RawUpstream(message(GOOD_COUNTS | detail), hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    status, answer = await post(gw, secret, "/v1/messages", PLAIN_MESSAGES)
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    assert not row["estimated"], row
    assert abs(row["cost_usd"] - GOOD_BILL) < 1e-9, (row["cost_usd"], GOOD_BILL)


# SOUND: a stream that shows three `web_search` blocks and reports three searches in its
# `message_delta` is charged three (the larger of the two, not their sum), and a
# `server_tool_use` block of another server tool (`web_fetch`, no per-call fee) is no search.
async def test_searches_seen_and_reported_are_not_counted_twice(build: Build) -> None:
    events = [start({"input_tokens": 40, "output_tokens": 1})]
    blocks = search_blocks(3)[:-1]
    fetch = {"type": "server_tool_use", "id": "srvtoolu_f", "name": "web_fetch", "input": {}}
    for index, block in enumerate([*blocks, fetch]):
        events += [
            ("content_block_start", {"index": index, "content_block": block}),
            ("content_block_stop", {"index": index}),
        ]
    events += text_block(len(blocks) + 1, "Found.")
    usage = {
        "input_tokens": 6_000,
        "output_tokens": 200,
        "server_tool_use": {"web_search_requests": 3},
    }
    events += closing_events(usage)
    up = RawUpstream(stream(*events), hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    resp = await gw.post("/v1/messages", json=search_request(stream=True), headers=auth(secret))
    assert resp.status == 200, await resp.text()
    assert b"message_stop" in await resp.read()
    row, _ = await row_and_spend(gw, secret)
    billed = mtok(6_000, IN) + mtok(200, OUT) + 3 * SEARCH
    assert not row["estimated"], row
    assert abs(row["cost_usd"] - billed) < 1e-9, (row["cost_usd"], billed)


# --- the search hold (`_searches_at_most`) ----------------------------------------------------


def _tools(*tools: dict[str, Any]) -> MessagesRequest:
    body = {**PLAIN_MESSAGES, "tools": list(tools)}
    return msgspec.json.decode(json.dumps(body).encode(), type=MessagesRequest)


# SOUND: `max_uses` is held when a non-negative int; a string, negative, bool, float or missing
# one is held as `UNCAPPED_SEARCHES` (10; Anthropic refuses the malformed ones anyway); future
# type names (`web_search_20260101`) count; two search tools add up; client tools and other
# server tools (`web_fetch_*`, no per-call fee) hold none.
def test_search_hold_reads_max_uses() -> None:
    def search(**fields: Any) -> dict[str, Any]:
        return {"type": "web_search_20250305", "name": "web_search", **fields}

    assert _searches_at_most(_tools(search(max_uses=3))) == 3
    assert _searches_at_most(_tools(search(max_uses=0))) == 0
    for odd in ("20", -5, True, 2.0, None):
        assert _searches_at_most(_tools(search(max_uses=odd))) == UNCAPPED_SEARCHES, odd
    assert _searches_at_most(_tools(search())) == UNCAPPED_SEARCHES
    future = {"type": "web_search_20260101", "name": "web_search", "max_uses": 7}
    assert _searches_at_most(_tools(future)) == 7
    assert _searches_at_most(_tools(search(max_uses=2), search(max_uses=4))) == 6
    client = {"name": "web_search", "input_schema": {"type": "object"}}
    fetch = {"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 5}
    assert _searches_at_most(_tools(client, fetch)) == 0


# WRONG (low, availability): a `max_uses` past a float's range (an integer literal of 310+
# digits, valid JSON that msgspec decodes to a Python int) makes admission's pricing raise
# `OverflowError: int too large to convert to float` (`usage.web_searches * r.web_search` in
# `prices._media`): a 500 with a traceback logged, for any key, on every such request.
# Expected: refused as a request (400 on `max_uses`, or 429: the budget cannot hold it).
# Actual: 500. Realism: only a deliberate client; it costs the operator log noise and a 500
# count in the metrics, not money. Right: cap the held searches (`min(uses, 2**40)`, like
# `Count`) or refuse a `max_uses` out of range.
async def test_huge_max_uses_is_no_server_error(build: Build) -> None:
    up = RawUpstream(message({"input_tokens": 40, "output_tokens": 20}), hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    raw = json.dumps(search_request()).encode()
    raw = raw.replace(b'"max_uses": 20', b'"max_uses": 1' + b"0" * 400)
    status, text = await post_raw(gw, secret, "/v1/messages", raw)
    assert status in (400, 429), (status, text)
    assert up.bodies == []


# SOUND: a future tool version is held: `web_search_20260101` with `max_uses: 20` is refused
# to a $0.02 budget (20 x $0.01 held), nothing reaches the upstream.
async def test_future_search_tool_type_is_held(build: Build) -> None:
    up = RawUpstream(message({"input_tokens": 40, "output_tokens": 200}), hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=0.02)
    body = search_request()
    body["tools"] = [{"type": "web_search_20260101", "name": "web_search", "max_uses": 20}]
    status, answer = await post(gw, secret, "/v1/messages", body)
    assert status == 429, (status, answer)
    assert up.bodies == []


# WRONG (low-medium, USD budgets: an overcharge of ordinary users): a model with prices in
# its config (`input_price_per_mtok` / `output_price_per_mtok`, the documented way to price a
# model) and no `web_search_price_per_call` has its searches priced at
# `UNKNOWN_SEARCH_PRICE`, $0.03, never the price list's: `_config_price` does not look at the
# list. docs/configuration.md says the default is "the price list's, else 0.03", and the
# list has Anthropic's $10 a thousand for Claude models. Ten searches on claude-sonnet-4-5
# configured at $3/$15: Anthropic bills $0.10 + tokens, the key is charged $0.30 + tokens, 3x
# on the searches; admission holds 10 x $0.03 = $0.30 for each search tool without
# `max_uses`, so a key with $0.25 left is refused a request that can cost it $0.10.
# (settings.py's comment still says a search defaults to 0.) Realism: configuring a model's
# token prices (a negotiated rate, a new model the list lacks) is common; searches are not
# what the operator meant to reprice. Right: take the list's search price for the upstream
# model when the config names none (as docs say), and $0.03 only when neither has one.
async def test_config_priced_model_keeps_the_lists_search_price(build: Build) -> None:
    usage = {
        "input_tokens": 6_000,
        "output_tokens": 200,
        "server_tool_use": {"web_search_requests": 10},
    }
    up = RawUpstream(message(usage, search_blocks(10)), hold=False)
    prices = {"input_price_per_mtok": IN, "output_price_per_mtok": OUT}
    gw = await build("anthropic", up, SONNET, model=prices)
    secret = await create_key(gw, budget_usd=50.0)
    status, answer = await post(gw, secret, "/v1/messages", search_request())
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    billed = mtok(6_000, IN) + mtok(200, OUT) + 10 * SEARCH
    assert row["cost_usd"] <= billed * 1.001, (row["cost_usd"], billed)


# --- the cache-write hold (`_cache_writes`) ---------------------------------------------------


# WRONG (medium, USD budgets; a regression of c3d352a: at 299d5af both requests are refused):
# a `/v1/messages` request whose body spells `cache_control`
# anywhere is held at the cache-write rate instead of the input rate, and on a route whose
# cache-write price is BELOW its input price that shrinks the hold. genai-prices has such
# prices for OpenRouter's Gemini models (gemini-3-flash-preview: $0.50/Mtok in, $0.083
# cache writes; likewise gemini-2.5-flash-lite, 3.1-pro...) and MiniMax's highspeed models
# ($0.60 in, $0.375 writes). Routed to OpenRouter (`pricing: openrouter`), the Messages
# request is translated to chat (its `cache_control` marks dropped), and the whole prompt is
# billed at $0.50, but held at $0.083: 6x under. Here a ~10,000-token prompt: a $0.003
# budget refuses it plain (held ~$0.0053) and admits it with one `cache_control` mark (held
# ~$0.0011), after which the key is charged the $0.005 billed. The mark can sit anywhere,
# even inside the user's text. With requests in flight the overspend passes keys.md's bound
# (each holds a sixth of its cost). Expected: both refused. Actual: the marked one admitted.
# Realism: a one-word change any client can make; Claude Code marks its prompts by itself,
# and OpenRouter's Gemini models behind an Anthropic-speaking gateway are a common setup.
# Right: hold the prompt at max(input, cache-write) (and the 1-hour rate likewise).
async def test_cache_marked_prompt_is_not_held_below_the_input_rate(build: Build) -> None:
    usage = {"prompt_tokens": 10_000, "completion_tokens": 10, "total_tokens": 10_010}
    up = RawUpstream(completion(usage), hold=False)
    upstream_model = "google/gemini-3-flash-preview"
    gw = await build("openai", up, upstream_model, fields={"pricing": "openrouter"})
    text = "Clause text. " * 3_000
    plain = {
        "model": "m",
        "max_tokens": 10,
        "system": [{"type": "text", "text": text}],
        "messages": [{"role": "user", "content": "Summarise clause 7."}],
    }
    marked = json.loads(json.dumps(plain))
    marked["system"][0]["cache_control"] = {"type": "ephemeral"}
    first = await create_key(gw, budget_usd=0.003)
    status, answer = await post(gw, first, "/v1/messages", plain)
    assert status == 429, (status, answer)  # held at $0.50/Mtok: refused
    second = await create_key(gw, budget_usd=0.003)
    status, answer = await post(gw, second, "/v1/messages", marked)
    assert status == 429, (status, answer)
    assert up.bodies == []


# WRONG (low, USD budgets; documented in `_cache_writes`' docstring and docs/configuration.md
# "as spelled, unescaped"): `_cache_writes` looks for `cache_control` and `"1h"` in the
# body's bytes, so `"cache_\u0063ontrol"` (valid JSON: Anthropic decodes it as
# `cache_control`) holds the prompt as plain input, and `"ttl": "\u0031h"` holds an hour's
# write at the 5-minute rate. `_sends_audio` and `_references` (same commits) look at the
# decoded request when the body holds `\u`; this one does not. Here the h107 prompt (~6,500
# tokens) on Sonnet: held at $6/Mtok it is ~$0.040, refused to a $0.03 budget; the escaped
# `ttl` holds ~$0.026 (5-minute rate) and is admitted, and Anthropic bills ~$0.039. Expected:
# both refused. Actual: escaped admitted. Realism: deliberate only; the excess is the write
# premium (0.75x-1x input) on one request, beyond the bound only with many in flight.
# Right: when the body holds `\u`, read the `cache_control` marks from the decoded request.
async def test_escaped_ttl_is_held_at_the_hour_rate(build: Build) -> None:
    up = RawUpstream(message(one_hour_usage()), hold=False)
    gw = await build("anthropic", up, SONNET)
    raw = json.dumps(cached_request("1h")).encode()
    first = await create_key(gw, budget_usd=0.03)
    status, text = await post_raw(gw, first, "/v1/messages", raw)
    assert status == 429, (status, text)  # the plain "1h": held at $6/Mtok
    second = await create_key(gw, budget_usd=0.03)
    escaped = raw.replace(b'"1h"', b'"\\u0031h"')
    status, text = await post_raw(gw, second, "/v1/messages", escaped)
    assert status == 429, (status, text)
    assert up.bodies == []


# SOUND: a `cache_control` mark anywhere in the body's bytes (a tool definition, a message
# block, the system) holds the prompt at the write rate; `"1h"` the hour's. (Whole body:
# over-holds a 5-minute mark when "1h" appears elsewhere, which only errs on the safe side.)
def test_cache_marks_found_anywhere() -> None:
    tool = {"name": "t", "input_schema": {}, "cache_control": {"type": "ephemeral"}}
    assert _cache_writes(json.dumps({**PLAIN_MESSAGES, "tools": [tool]}).encode()) == "5m"
    assert _cache_writes(json.dumps(cached_request("1h")).encode()) == "1h"
    assert _cache_writes(json.dumps(cached_request(None)).encode()) == "5m"
    assert _cache_writes(json.dumps(PLAIN_MESSAGES).encode()) == ""


# --- ordinary requests: the same hold and charge as before --------------------------------------


# SOUND: the hold of a plain chat request (no modalities, audio, searches or cache marks),
# priced by the bundled list, is the text cost for gpt-4o, claude-sonnet-4-5 and
# gemini-2.5-flash: output "at the image rate" costs the output rate where the model has no
# image rate, and no model in the list has an image rate below its output rate (checked over
# the whole snapshot). A search priced at $0.03 is charged only when one is counted.
def test_plain_requests_hold_the_text_cost() -> None:
    lookup, _, _ = load_database()
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":100}'
    req = msgspec.json.decode(body, type=ChatCompletionRequest)
    model = ModelConfig(name="m", targets=(Target(provider="p", model="x"),))
    call = ChatCall(request=req, body=body, model=model)
    for source, name, inp, out in (
        ("openai", "gpt-4o", 2.5, 10.0),
        ("anthropic", SONNET, 3.0, 15.0),
        ("google", "gemini-2.5-flash", 0.30, 2.50),
    ):
        price = lookup(source, name)
        assert price is not None, name
        held = price.cost(call.held(1_000, 100))
        assert abs(held - (mtok(1_000, inp) + mtok(100, out))) < 1e-12, (name, held)


# SOUND: plain requests are charged as before (genai-prices' text rates, exact rows): a chat
# completion on gpt-4o, a `/v1/messages` pass-through on claude-sonnet-4-5 and a chat
# request to gemini-2.5-flash.
async def test_plain_requests_are_charged_the_text_cost(build: Build) -> None:
    chat = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    usage = {"prompt_tokens": 1_000, "completion_tokens": 100, "total_tokens": 1_100}
    gemini_usage = {
        "promptTokenCount": 1_000,
        "candidatesTokenCount": 100,
        "totalTokenCount": 1_100,
    }
    cases = (
        ("openai", "gpt-4o", completion(usage), "/v1/chat/completions", chat, 2.5, 10.0),
        (
            "anthropic",
            SONNET,
            message({"input_tokens": 1_000, "output_tokens": 100}),
            "/v1/messages",
            PLAIN_MESSAGES,
            3.0,
            15.0,
        ),
        (
            "gemini",
            "gemini-2.5-flash",
            gemini_answer(gemini_usage, [{"text": "hi"}]),
            "/v1/chat/completions",
            chat,
            0.30,
            2.50,
        ),
    )
    for kind, name, answer, path, body, inp, out in cases:
        up = RawUpstream(answer, hold=False)
        gw = await build(kind, up, name)
        secret = await create_key(gw, budget_usd=5.0)
        status, got = await post(gw, secret, path, body)
        assert status == 200, (name, got)
        row, _ = await row_and_spend(gw, secret)
        expected = mtok(1_000, inp) + mtok(100, out)
        assert not row["estimated"], row
        assert abs(row["cost_usd"] - expected) < 1e-12, (name, row["cost_usd"], expected)


# --- item references ----------------------------------------------------------------------------


# SOUND: an item reference without `type` (the OpenAI SDK's `ItemReference` has `type`
# optional: `{"id": "msg_..."}`) is not a way around the reference hold: the gateway reads
# an untyped item as a message, and refuses it (400, no role) before anything is sent; a
# `type: null` one likewise.
@pytest.mark.parametrize("item", [{"id": "msg_1"}, {"type": None, "id": "msg_1"}])
async def test_untyped_item_reference_is_refused(build: Build, item: dict[str, Any]) -> None:
    up = RawUpstream(whole(response_body(RESPONSE_USAGE, [message_item("ok")])), hold=False)
    gw = await build("openai", up, "gpt-5", fields={"responses_api": True})
    secret = await create_key(gw, budget_tokens=9_000)
    body = {
        "model": "m",
        "max_output_tokens": 10,
        "input": [item, {"role": "user", "content": "And?"}],
    }
    status, answer = await post(gw, secret, "/v1/responses", body)
    assert status == 400, (status, answer)
    assert up.bodies == []
