"""Attack on what Anthropic bills beyond what the gateway charges or holds (helper-107).

`POST /v1/messages` passed through to an `anthropic` provider (the client's body as sent,
`cache_control`, server tools and all), and chat completions translated to Anthropic. Keys
with USD budgets; prices from the bundled `genai-prices` list (the gateway's default price
source), which has Anthropic's 1-hour cache-write price (`cache_write_1h_mtok`) and its web
search fee (`web_searches_kcount`: $10 a thousand).

Usage shapes are Anthropic's (the API reference's `Usage` / `MessageDeltaUsage`):
`input_tokens`, `output_tokens`, `cache_creation_input_tokens`, `cache_read_input_tokens`,
`cache_creation: {ephemeral_5m_input_tokens, ephemeral_1h_input_tokens}`,
`server_tool_use: {web_search_requests}`, `service_tier`.

Each failing test asserts what should happen; the comment above it works out the overspend
and how realistic it is. Passing tests marked `# SOUND:` pin properties checked here.
Upstreams are in-process raw TCP servers (tests/raw_upstream).
"""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.state import GATE_KEY, KEYS_KEY, USAGE_KEY
from tests.conftest import NEVER_HANG, app_of, create_key, usage_rows
from tests.raw_upstream import STREAM_HEAD, RawUpstream, auth, cut_after, sse
from tests.test_attack_h105 import Build, build, mtok, post, row_and_spend, whole

__all__ = ["build"]  # (the fixture, imported for pytest)

# genai-prices for claude-sonnet-4-5 (Anthropic's price page says the same): $3 / $15 per Mtok
# in / out, cache reads $0.30, 5-minute cache writes $3.75 (1.25x), 1-hour writes $6 (2x);
# past 200k prompt tokens $6 / $22.50, reads $0.60, writes $7.50 / $12. Web search $10 / 1,000.
IN, OUT, READ, WRITE_5M, WRITE_1H = 3.0, 15.0, 0.3, 3.75, 6.0
SEARCH = 0.01
SONNET = "claude-sonnet-4-5"


def message(usage: dict[str, Any], content: list[dict[str, Any]] | None = None) -> bytes:
    return whole(
        {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": SONNET,
            "content": content or [{"type": "text", "text": "ok"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": usage,
        }
    )


def stream(*events: tuple[str, dict[str, Any]]) -> bytes:
    return STREAM_HEAD + b"".join(sse({"type": kind, **fields}, kind) for kind, fields in events)


def start(usage: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    msg: dict[str, Any] = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": SONNET,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    return "message_start", {"message": msg}


def text_block(index: int, text: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("content_block_start", {"index": index, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"index": index, "delta": {"type": "text_delta", "text": text}}),
        ("content_block_stop", {"index": index}),
    ]


def ending(usage: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    delta = {"stop_reason": "end_turn", "stop_sequence": None}
    return [("message_delta", {"delta": delta, "usage": usage}), ("message_stop", {})]


CACHED_PROMPT = "You are a contract analyst. " + "Clause text. " * 2_000


def cached_request(ttl: str | None, *, stream: bool = False) -> dict[str, Any]:
    control: dict[str, Any] = {"type": "ephemeral"}
    if ttl is not None:
        control["ttl"] = ttl
    body: dict[str, Any] = {
        "model": "m",
        "max_tokens": 100,
        "system": [{"type": "text", "text": CACHED_PROMPT, "cache_control": control}],
        "messages": [{"role": "user", "content": "Summarise clause 7."}],
    }
    if stream:
        body["stream"] = True
    return body


# A 1-hour cache write of 100,000 tokens (the system prompt above stands for a long one; the
# Messages route puts no bound on the prompt count of a pass-through, `usage_bounds`).
WRITE = 100_000


def one_hour_usage() -> dict[str, Any]:
    return {
        "input_tokens": 20,
        "output_tokens": 100,
        "cache_creation_input_tokens": WRITE,
        "cache_read_input_tokens": 0,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": WRITE},
        "service_tier": "standard",
    }


ONE_HOUR_BILL = mtok(20, IN) + mtok(WRITE, WRITE_1H) + mtok(100, OUT)


# --- 1-hour prompt-cache writes ---------------------------------------------------------------


# WRONG (medium-high, USD budgets): a 1-hour cache write is charged the 5-minute write price.
# `cache_control: {"type": "ephemeral", "ttl": "1h"}` (generally available, no beta header)
# makes Anthropic bill the written tokens at 2x the input price ($6/Mtok on Sonnet 4.5, $30 on
# Opus 4.1); its usage says which were which (`cache_creation.ephemeral_1h_input_tokens`).
# The gateway reads only `cache_creation_input_tokens` (`wire.AnthropicUsage` has no
# `cache_creation`) and prices all of it at `cache_write_mtok`, the 5-minute $3.75
# (`prices.Rates` has one cache-write rate; genai-prices' `cache_write_1h_mtok` is dropped in
# `prices._rates`). Here 100,000 written tokens: Anthropic bills $0.60, the key is charged
# $0.375 (37.5 % under on the writes). Every request keeps the ratio: a key whose traffic is
# 1-hour cache writes spends 1.6x its budget ($160 billed for a $100 budget), and a client
# can make all its traffic that: a new cached prefix on every request (a changing first
# block) is a write every time. Realistic: the 1-hour TTL is the documented choice for
# agents and long sessions (Claude Code's own long-lived prompts), a field any client sets.
# Right: read `cache_creation.ephemeral_1h_input_tokens` and price those at the 1-hour rate
# (genai-prices' `cache_write_1h_mtok`, or a config `cache_write_1h_price_per_mtok`), and the
# rest of `cache_creation_input_tokens` at the 5-minute one.
async def test_one_hour_cache_write_priced_at_its_rate(build: Build) -> None:
    up = RawUpstream(message(one_hour_usage()), hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    status, answer = await post(gw, secret, "/v1/messages", cached_request("1h"))
    assert status == 200, answer
    sent = up.bodies[0]["system"][0]["cache_control"]
    assert sent == {"type": "ephemeral", "ttl": "1h"}  # reached Anthropic as sent
    row, spend = await row_and_spend(gw, secret)
    assert row["cache_write_tokens"] == WRITE
    assert row["cost_usd"] >= ONE_HOUR_BILL * 0.999, (row["cost_usd"], ONE_HOUR_BILL)
    assert spend.usd >= ONE_HOUR_BILL * 0.999


# WRONG (same bug, streamed): a stream's `message_start` carries the same `cache_creation`
# breakdown; the 1-hour writes are charged at $3.75 too. $0.375 charged for $0.60 billed.
async def test_streamed_one_hour_cache_write_priced_at_its_rate(build: Build) -> None:
    usage = one_hour_usage()
    events = stream(
        start(usage | {"output_tokens": 1}),
        *text_block(0, "Clause 7 says..."),
        *ending({"output_tokens": 100}),
    )
    up = RawUpstream(events, hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    resp = await gw.post(
        "/v1/messages", json=cached_request("1h", stream=True), headers=auth(secret)
    )
    assert resp.status == 200, await resp.text()
    assert b"message_stop" in await resp.read()
    row, spend = await row_and_spend(gw, secret)
    assert row["cost_usd"] >= ONE_HOUR_BILL * 0.999, (row["cost_usd"], ONE_HOUR_BILL)
    assert spend.usd >= ONE_HOUR_BILL * 0.999


# SOUND: a 5-minute cache write (no `ttl`, the default) is charged Anthropic's $3.75 and a
# cache read $0.30, the rest of the prompt $3: 100,000 written + 50,000 read + 20 input.
async def test_five_minute_cache_write_and_read_are_priced(build: Build) -> None:
    usage = {
        "input_tokens": 20,
        "output_tokens": 100,
        "cache_creation_input_tokens": WRITE,
        "cache_read_input_tokens": 50_000,
        "cache_creation": {"ephemeral_5m_input_tokens": WRITE, "ephemeral_1h_input_tokens": 0},
    }
    up = RawUpstream(message(usage), hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    status, answer = await post(gw, secret, "/v1/messages", cached_request(None))
    assert status == 200, answer
    row, spend = await row_and_spend(gw, secret)
    billed = mtok(20, IN) + mtok(WRITE, WRITE_5M) + mtok(50_000, READ) + mtok(100, OUT)
    assert abs(row["cost_usd"] - billed) < 1e-9, (row["cost_usd"], billed)
    assert row["prompt_tokens"] == 150_020 and row["cache_read_tokens"] == 50_000
    assert abs(spend.usd - billed) < 1e-9


# SOUND: the long-context tier is reached by the whole prompt, cache reads and writes
# included (Anthropic: "input_tokens + cache_creation_input_tokens + cache_read_input_tokens
# > 200k"), and then prices the cache reads and writes at the tier's rates too ($0.60 and
# $7.50, not $0.30 and $3.75): 20,000 input + 150,000 read + 40,000 written = 210,000.
async def test_long_context_tier_reached_by_cache_and_prices_it(build: Build) -> None:
    usage = {
        "input_tokens": 20_000,
        "output_tokens": 1_000,
        "cache_creation_input_tokens": 40_000,
        "cache_read_input_tokens": 150_000,
    }
    up = RawUpstream(message(usage), hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    status, answer = await post(gw, secret, "/v1/messages", cached_request(None))
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    billed = mtok(20_000, 6.0) + mtok(150_000, 0.6) + mtok(40_000, 7.5) + mtok(1_000, 22.5)
    assert abs(row["cost_usd"] - billed) < 1e-9, (row["cost_usd"], billed)


# SOUND: Anthropic's `message_delta` carries the cumulative usage (its `MessageDeltaUsage` has
# the input and cache counts too, e.g. when a server tool's results were read after
# `message_start`): the counts it brings replace `message_start`'s, cache writes included.
async def test_message_delta_cache_counts_are_charged(build: Build) -> None:
    events = stream(
        start({"input_tokens": 20, "output_tokens": 1, "cache_creation_input_tokens": 0}),
        *text_block(0, "Clause 7 says..."),
        *ending(
            {
                "input_tokens": 30_000,
                "output_tokens": 100,
                "cache_creation_input_tokens": WRITE,
                "cache_read_input_tokens": 0,
            }
        ),
    )
    up = RawUpstream(events, hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    resp = await gw.post(
        "/v1/messages", json=cached_request(None, stream=True), headers=auth(secret)
    )
    assert resp.status == 200, await resp.text()
    await resp.read()
    row, _ = await row_and_spend(gw, secret)
    billed = mtok(30_000, IN) + mtok(WRITE, WRITE_5M) + mtok(100, OUT)
    assert abs(row["cost_usd"] - billed) < 1e-9, (row["cost_usd"], billed)


# WRONG (low-medium, USD budgets, admission): a prompt marked for caching is held at the input
# price, though Anthropic bills what it writes at 1.25x (5-minute) or 2x (1-hour) that.
# `ChatCall.held` prices the Messages request's prompt as plain input (its `cache_control`
# is not looked at), both its likely size (what admission fits against the budget) and its
# most (len(body) tokens, what a request in flight holds). Here the system prompt is ~26,000
# characters (~6,500 tokens likely) marked `ttl: "1h"`: held at $3/Mtok it is ~$0.0195 (+
# $0.0015 output) and fits a $0.025 budget; Anthropic bills the write ~$0.039, 1.6x the
# budget, by one request. Alone that is within docs/keys.md's bound (one request's usage),
# but the bound's proof needs each request in flight to hold at least what it can use: a
# request's most is its bytes at $3/Mtok, and a dense prompt (rare CJK, emoji, random
# symbols: well over one token per two bytes) written for an hour is billed more than that
# (T x $6 > L x $3 when T > L / 2), so concurrent such requests pass a budget by more than
# one request. Realistic: cheap for a client to arrange; the per-request excess is modest.
# Right: price the prompt (at least the part up to the last `cache_control` marker) at the
# write rate its `ttl` asks for, in the likely and the most hold.
async def test_cache_marked_prompt_held_at_write_rate(build: Build) -> None:
    up = RawUpstream(message(one_hour_usage()), hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=0.025)
    status, answer = await post(gw, secret, "/v1/messages", cached_request("1h"))
    assert status == 429, (status, answer)
    assert up.bodies == []


# --- server tools: web search -----------------------------------------------------------------

SEARCH_TOOL = {"type": "web_search_20250305", "name": "web_search", "max_uses": 20}


def search_request(*, stream: bool = False, budget_tokens: int = 200) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "m",
        "max_tokens": budget_tokens,
        "tools": [SEARCH_TOOL],
        "messages": [{"role": "user", "content": "Find every 2025 ruling on clause 7."}],
    }
    if stream:
        body["stream"] = True
    return body


def search_blocks(searches: int) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for i in range(searches):
        blocks.append(
            {
                "type": "server_tool_use",
                "id": f"srvtoolu_{i}",
                "name": "web_search",
                "input": {"query": f"clause 7 ruling {i}"},
            }
        )
        blocks.append(
            {
                "type": "web_search_tool_result",
                "tool_use_id": f"srvtoolu_{i}",
                "content": [
                    {
                        "type": "web_search_result",
                        "url": f"https://example.com/{i}",
                        "title": "Ruling",
                        "encrypted_content": "EqgfCioIARgBIiQ3YTAw",
                        "page_age": None,
                    }
                ],
            }
        )
    return [*blocks, {"type": "text", "text": "Here is what I found."}]


# WRONG (medium, USD budgets; documented as not charged in configuration.md "Prices", but
# Anthropic reports the count exactly and the gateway already has the rate): Anthropic's web
# search server tool is billed $10 per 1,000 searches on top of tokens, and its usage reports
# them (`usage.server_tool_use.web_search_requests`). The pass-through never reads it
# (`AnthropicUsage` has no `server_tool_use`; `call.web_searches` stays 0), so a search costs
# the key nothing though `Rates.web_search` is $0.01 for every Claude model from genai-prices
# (the OpenAI and Responses searches are charged since 06e57e0). Here 20 searches (the
# request's `max_uses`; without `max_uses` the model may search as often as it likes within
# one turn, and `pause_turn` continuations search more): $0.20 billed, $0 charged, on a
# request whose tokens cost ~$0.02. A key with a $1 budget that asks for cheap search
# answers (short prompt, short output) gets ~500 searches ($5) for its ~$1 of tokens.
# Realistic: web search is a documented, generally available tool; Claude Code and agents use
# it constantly.
# Right: count `server_tool_use.web_search_requests` into `call.web_searches` (whole answers
# and `message_delta`), as the Responses pass-through counts `web_search_call`s.
async def test_anthropic_web_searches_are_charged(build: Build) -> None:
    usage = {
        "input_tokens": 6_000,  # (the search results are read as input)
        "output_tokens": 200,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "server_tool_use": {"web_search_requests": 20},
    }
    up = RawUpstream(message(usage, search_blocks(20)), hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    status, answer = await post(gw, secret, "/v1/messages", search_request())
    assert status == 200, answer
    assert up.bodies[0]["tools"] == [SEARCH_TOOL]  # reached Anthropic as sent
    row, spend = await row_and_spend(gw, secret)
    billed = mtok(6_000, IN) + mtok(200, OUT) + 20 * SEARCH
    assert row["cost_usd"] >= billed * 0.999, (row["cost_usd"], billed)
    assert spend.usd >= billed * 0.999


# WRONG (medium, same cause, streamed and cut): in a stream the count comes only in
# `message_delta`; each search is also a `server_tool_use` block named `web_search`, seen as
# it passes (Anthropic ran it before the block went out, and bills it). A client that hangs up
# once the results have streamed, before `message_delta`, leaves the gateway with
# `message_start`'s counts: 3 searches ($0.03) billed, none charged, even were the
# `message_delta` count read. (The Responses pass-through counts `web_search_call` events as
# they pass for this reason, h105.)
# Right: count `server_tool_use` blocks named `web_search` as they pass (and take the larger
# of that and `message_delta`'s count).
async def test_cut_stream_charges_searches_seen(build: Build) -> None:
    events = [start({"input_tokens": 40, "output_tokens": 1})]
    index = 0
    for block in search_blocks(3)[:-1]:
        events += [
            ("content_block_start", {"index": index, "content_block": block}),
            ("content_block_stop", {"index": index}),
        ]
        index += 1
    events += text_block(index, "MARK Here is what I found")[:2]
    up = RawUpstream(stream(*events), hold=True)  # the rest never comes: the client hangs up
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    await cut_after(gw, secret, "/v1/messages", search_request(stream=True), b"MARK")
    row, spend = await row_and_spend(gw, secret)
    assert row["estimated"], row
    assert row["cost_usd"] >= 3 * SEARCH, row["cost_usd"]
    assert spend.usd >= 3 * SEARCH


# WRONG (medium, USD budgets, admission): a request with Anthropic's web search tool holds no
# search at all (`ChatCall.held` counts one search only for chat's `web_search_options`; the
# Messages request's server tools are not looked at), so a key with $0.02 left is admitted
# for a request that may search `max_uses` = 20 times ($0.20 billed, 10x its budget, by one
# request; the hold was ~$0.003 of tokens). Without `max_uses` there is no bound at all.
# Realistic: as above; `max_uses` is the documented way to bound a search request.
# Right: hold `max_uses` searches (at the costliest route's `web_search` rate) for a
# `web_search_*` server tool, and refuse one without `max_uses` to a USD-budget key (or hold
# a documented default), as priority processing is refused.
async def test_web_search_tool_holds_its_searches(build: Build) -> None:
    usage = {"input_tokens": 40, "output_tokens": 200}
    up = RawUpstream(message(usage), hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=0.02)
    status, answer = await post(gw, secret, "/v1/messages", search_request())
    assert status in (400, 429), (status, answer)
    assert up.bodies == []


# SOUND: without server tools, the same key and request size are admitted (the refusal
# above would be the tool's, not the tokens'): 40 + 200 tokens fit $0.02.
async def test_plain_request_fits_the_small_budget(build: Build) -> None:
    usage = {"input_tokens": 40, "output_tokens": 200}
    up = RawUpstream(message(usage), hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=0.02)
    body = search_request()
    del body["tools"]
    status, answer = await post(gw, secret, "/v1/messages", body)
    assert status == 200, answer


# --- token counts and thinking --------------------------------------------------------------


# SOUND: `/v1/messages/count_tokens` (free at Anthropic) is relayed, holds nothing and is
# charged nothing; and it is not a way to generate: the upstream's answer is relayed only if
# it is a count.
async def test_count_tokens_is_free_and_only_a_count(build: Build) -> None:
    up = RawUpstream(whole({"input_tokens": 1234}), hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=0.000_001)
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    status, answer = await post(gw, secret, "/v1/messages/count_tokens", body)
    assert status == 200, answer
    assert answer == {"input_tokens": 1234}
    assert up.paths == ["/v1/messages/count_tokens"]
    app = app_of(gw)
    async with asyncio.timeout(NEVER_HANG):
        await app[USAGE_KEY].wait_recorded(1)
    (row,) = await usage_rows(gw)
    assert not row["cost_usd"] and not row["prompt_tokens"], row
    record = app[KEYS_KEY].lookup(secret)
    assert record is not None
    spend = await app[GATE_KEY].spending(record)
    assert spend is None or not spend.usd  # (nothing spent: no spending yet)


# SOUND: extended thinking counts within `max_tokens` on Anthropic (`budget_tokens` must be
# below it), so a pass-through request holds its `max_tokens` whatever its thinking budget:
# a 1,000-token budget refuses `max_tokens` 16,000 with `thinking.budget_tokens` 10,000 before
# anything goes upstream.
async def test_thinking_request_holds_its_output_limit(build: Build) -> None:
    up = RawUpstream(message({"input_tokens": 40, "output_tokens": 16_000}), hold=False)
    gw = await build("anthropic", up, SONNET, model={"reasoning": True})
    secret = await create_key(gw, budget_tokens=1_000)
    body = {
        "model": "m",
        "max_tokens": 16_000,
        "thinking": {"type": "enabled", "budget_tokens": 10_000},
        "messages": [{"role": "user", "content": "Prove it."}],
    }
    status, answer = await post(gw, secret, "/v1/messages", body)
    assert status == 429, (status, answer)
    assert up.bodies == []
