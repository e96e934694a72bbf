"""Attack on helper-108's remedies (helper-109, d06a3f2): `/v1/messages`' `_cache_writes` /
`_marked` (a body with an escaped ASCII character decoded as JSON and walked for
`cache_control`), `_searches_at_most` (`MOST_SEARCHES`), `pipeline._held_cost`,
`PriceBook.search_price`, `AnthropicUsage.detail`, and a whole answer's search blocks
(`passthrough._is_search`).

Each failing test asserts what should happen; the comment above it says what is wrong,
expected vs actual, severity and realism. Passing tests marked `# SOUND:` pin what was checked
and held. Upstreams are in-process raw TCP servers (tests/raw_upstream); the fixtures and
helpers are helper-105's, -107's and -108's.
"""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import msgspec
import pytest

from gateway.handlers.messages import _cache_writes, _searches_at_most
from gateway.messages.schema import MessagesRequest
from gateway.pipeline import _held_cost
from gateway.prices import load_database
from gateway.providers.base import ChatCall
from gateway.schemas.chat import ChatCompletionRequest
from gateway.schemas.codec import decode_body
from gateway.settings import ModelConfig, Target
from tests.conftest import create_key
from tests.raw_upstream import RawUpstream, auth
from tests.test_attack_h105 import Build, build, completion, mtok, post, row_and_spend, whole
from tests.test_attack_h107 import (
    IN,
    OUT,
    SEARCH,
    SONNET,
    ending,
    message,
    search_blocks,
    search_request,
    start,
    stream,
    text_block,
)
from tests.test_attack_h108 import GOOD_BILL, GOOD_COUNTS, PLAIN_MESSAGES, post_raw

__all__ = ["build"]  # (the fixture, imported for pytest)


# --- `_cache_writes` decoding an escaped body ---------------------------------------------------


def nested(depth: int, *, escaped: bool, count: bool = False) -> bytes:
    """A Messages body whose assistant `tool_use` block has an `input` `depth` arrays deep
    (the tool's name spelled `\\u0041` when `escaped`)."""
    name = b'"\\u0041"' if escaped else b'"A"'
    limit = b"" if count else b'"max_tokens":5,'
    return (
        b'{"model":"m",' + limit + b'"messages":[{"role":"user","content":"hi"},'
        b'{"role":"assistant","content":[{"type":"tool_use","id":"t1","name":'
        + name
        + b',"input":'
        + b"[" * depth
        + b"]" * depth
        + b"}]},"
        b'{"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"ok"}]}]}'
    )


# WRONG (low, availability: "never a 500 on client input"): `_cache_writes` decodes an
# escaped body with `msgspec.json.decode` and does not catch `RecursionError`. The body was
# decoded once before (`decode_body`, which maps RecursionError to a 400), but
# `_cache_writes` runs a few frames deeper (`open_exchange` -> `messages_call`), where fewer
# levels of nesting are left: a body nested just under `decode_body`'s limit passes it and
# fails here. Here nesting depths 900-999 in a `tool_use` block's `input`, with one `\u0041`
# in the body: two depths (941, 942 in this test rig; wherever the stack puts them in a
# deployment, a client finds them by trying a hundred) answer 500 with an `unhandled_error`
# traceback logged (`RecursionError: maximum recursion depth exceeded while deserializing
# an object`), on `/v1/messages` and on `/v1/messages/count_tokens` (which needs no budget).
# The same bodies without the escape answer 200 or 400. Expected: 200 or 400, never 500.
# Actual: 500. Realism: deliberate only; log noise and 500s in the metrics, not money.
# (`raw_object`'s docstring names this very hazard; `_cache_writes` was not given the same
# care.) Right: catch `RecursionError` (and `msgspec.DecodeError`) in `_cache_writes` and
# hold the body as "1h" (the safe side), or refuse it as `decode_body` does.
@pytest.mark.parametrize("path", ["/v1/messages", "/v1/messages/count_tokens"])
async def test_escaped_deep_body_is_no_server_error(build: Build, path: str) -> None:
    count = path.endswith("count_tokens")
    answer = (
        whole({"input_tokens": 12}) if count else message({"input_tokens": 4, "output_tokens": 2})
    )
    up = RawUpstream(answer, hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    errors = []
    for depth in range(900, 1000):
        body = nested(depth, escaped=True, count=count)
        status, text = await post_raw(gw, secret, path, body)
        if status >= 500:
            errors.append((depth, status, text[:80]))
    assert errors == [], errors


# SOUND: without the escape the same bodies are never a 500 (the deep ones are 400s, the rest
# relayed): the 500 above is `_cache_writes`' alone.
async def test_unescaped_deep_body_is_no_server_error(build: Build) -> None:
    up = RawUpstream(message({"input_tokens": 40, "output_tokens": 20}), hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    for depth in range(900, 1000):
        status, text = await post_raw(gw, secret, "/v1/messages", nested(depth, escaped=False))
        assert status in (200, 400), (depth, status, text)


def wide(items: int, *, escaped: bool) -> bytes:
    """A Messages body with a `tool_use` input of `items` empty objects (3 bytes each)."""
    text = b'"\\u0041"' if escaped else b'"A"'
    return (
        b'{"model":"m","messages":[{"role":"user","content":' + text + b"},"
        b'{"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"n","input":{"a":['
        + b",".join([b"{}"] * items)
        + b"]}}]},"
        b'{"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"ok"}]}]}'
    )


def peak_bytes(work: Any) -> int:
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# WRONG (medium, availability of the whole gateway to any key, even one without budget):
# one `\u0020`-`\u007F` escape anywhere in a Messages body makes `_cache_writes` decode the
# WHOLE body into Python objects (`msgspec.json.decode`, untyped) and walk every one of them
# in Python (`_marked`), where the request's own decode keeps the blocks' `input`, `content`
# and `source` as raw bytes. A body of empty objects (`{}`, 3 bytes, each a 64-byte dict plus
# an 8-byte list slot) costs ~27 bytes of memory a body byte and a Python loop step each: at
# the default `max_body_bytes` (32 MiB), ~810 MB peak and ~3.4 s of event-loop CPU for one
# request (measured: 30 MB body, 3.43 s to answer against 0.31 s for the same body without
# the escape; `tracemalloc` peak 809 MB for `_cache_writes` alone). The event loop serves
# nothing else meanwhile (every key's streams stall), and a handful of such requests in
# parallel takes a small host out of memory. `/v1/messages/count_tokens` runs the same
# `_begin` and holds no budget (h107: a $0.000001 key is served), so any key that may use an
# Anthropic-routed model can send them at its request rate. This test: a 3 MB body of
# `{}`; `_cache_writes` peaks at ~80 MB where the body's own decode (`decode_body`) peaks at
# under 1 MB. Expected: a cache-mark scan within a small multiple of the body (say < 4x).
# Actual: ~27x, and a Python step per value. Realism: deliberate (one escape is the whole
# trick); the limits that exist (body size, request rate) bound it only per request.
# Right: find the marks without building the body: e.g. decode with a typed struct that
# keeps everything but `cache_control` raw (msgspec skips raw values in C), or decode the
# escaped body and scan its re-encoded bytes, or only unescape what the byte search needs
# (`cache_control` and `"1h"` spelled with escapes: a regex over the body's bytes).
def test_escaped_body_scan_is_not_a_memory_amplifier() -> None:
    body = wide(1_000_000, escaped=True)
    assert _cache_writes(wide(10, escaped=False)) == ""  # (no escape: two byte searches)
    request_decode = peak_bytes(lambda: decode_body(body, MessagesRequest))
    scan = peak_bytes(lambda: _cache_writes(body))
    assert request_decode < len(body), request_decode
    assert scan < 4 * len(body), (scan, len(body), scan / len(body))


# SOUND: escapes no longer hide the marks or `max_uses`: `cache_\u0063ontrol` and
# `"\u0031h"` are read as Anthropic reads them, so is an escaped key `max\u005fuses` (msgspec
# unescapes struct keys); a `cache_control` that is not an object (string, list: Anthropic
# refuses those) holds nothing extra; a ttl other than "1h" holds the 5-minute rate; a
# `\\u0063` (an escaped backslash, not an escape) is decoded harmlessly.
def test_escapes_no_longer_hide_marks_or_max_uses() -> None:
    def body(mark: str) -> bytes:
        return (
            b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"text",'
            b'"text":"hi",' + mark.encode() + b"}]}]}"
        )

    assert _cache_writes(body('"cache_\\u0063ontrol":{"type":"ephemeral"}')) == "5m"
    assert _cache_writes(body('"cache_control":{"type":"ephemeral","ttl":"\\u0031h"}')) == "1h"
    assert _cache_writes(body('"cache_\\u0063ontrol":{"type":"ephemeral","ttl":"1h"}')) == "1h"
    assert _cache_writes(body('"cache_control":{"type":"ephemeral","ttl":"\\u0035m"}')) == "5m"
    assert _cache_writes(body('"cache_\\u0063ontrol":"ephemeral"')) == ""
    assert _cache_writes(body('"cache_\\u0063ontrol":[{"ttl":"1h"}]')) == ""
    assert _cache_writes(body('"x":"\\\\u0063"')) == ""
    raw = (
        b'{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"hi"}],'
        b'"tools":[{"t\\u0079pe":"web_search_20250305","name":"web_search","max\\u005fuses":7}]}'
    )
    assert _searches_at_most(msgspec.json.decode(raw, type=MessagesRequest)) == 7


# SOUND: an escaped `max_uses` past 1,000 is refused as the plain one is (400, nothing sent).
async def test_escaped_huge_max_uses_is_refused(build: Build) -> None:
    up = RawUpstream(message({"input_tokens": 40, "output_tokens": 20}), hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    raw = json.dumps(search_request()).encode()
    raw = raw.replace(b'"max_uses": 20', b'"max\\u005fuses": 1' + b"0" * 400)
    status, text = await post_raw(gw, secret, "/v1/messages", raw)
    assert status == 400, (status, text)
    assert up.bodies == []


# --- web searches: blocks counted, prices searched ----------------------------------------------

SEARCH_USAGE = {"input_tokens": 6_000, "output_tokens": 200}


def refused_search(index: int) -> list[dict[str, Any]]:
    """A search Claude attempted past `max_uses`: its `server_tool_use` block, and a result
    that is Anthropic's `max_uses_exceeded` error (no search ran; not billed)."""
    return [
        {
            "type": "server_tool_use",
            "id": f"srvtoolu_x{index}",
            "name": "web_search",
            "input": {"query": "clause 7 ruling, once more"},
        },
        {
            "type": "web_search_tool_result",
            "tool_use_id": f"srvtoolu_x{index}",
            "content": {"type": "web_search_tool_result_error", "error_code": "max_uses_exceeded"},
        },
    ]


# WRONG (low-medium, USD budgets: an overcharge of ordinary requests; the whole-answer half
# is new in d06a3f2 (passes at d06a3f2^), the streamed half came with c3d352a): web searches
# are charged as max(the usage's `server_tool_use.web_search_requests`, the `server_tool_use`
# blocks named `web_search`). But a block is an attempt, not a billed search: when Claude tries more
# searches than `max_uses` allows, each extra attempt is a `server_tool_use` block whose
# `web_search_tool_result` is an error (`max_uses_exceeded`; likewise `too_many_requests`,
# `unavailable`...), and Anthropic bills no search that errored; its usage count says how
# many it bills. Here `max_uses: 2`, two searches that ran and two refused attempts: the
# usage says 2 (billed $0.02 + tokens), the key is charged 4 ($0.04 + tokens). Expected: the
# reported count when there is one (2 searches). Actual: 4. Realism: common: `max_uses` is
# the documented cost control, and a model that wants more searches than allowed keeps
# trying (the error result is how Anthropic tells it to stop); every such attempt costs the
# key $0.01 more than the operator pays. Right: take the blocks only when the usage has no
# readable count (a cut stream, an upstream that omits it), or count only blocks whose result
# is not an error.
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "stream"])
async def test_refused_search_attempts_are_not_charged(build: Build, streamed: bool) -> None:
    usage = {**SEARCH_USAGE, "server_tool_use": {"web_search_requests": 2}}
    ran = search_blocks(2)
    content = [*ran[:-1], *refused_search(0), *refused_search(1), ran[-1]]
    if streamed:
        events = [start({"input_tokens": 6_000, "output_tokens": 1})]
        for index, block in enumerate(content[:-1]):
            events += [
                ("content_block_start", {"index": index, "content_block": block}),
                ("content_block_stop", {"index": index}),
            ]
        events += text_block(len(content) - 1, "Found.")
        events += ending(usage)
        answer = stream(*events)
    else:
        answer = message(usage, content)
    up = RawUpstream(answer, hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    body = search_request(stream=streamed)
    body["tools"] = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 2}]
    resp = await gw.post("/v1/messages", json=body, headers=auth(secret))
    assert resp.status == 200, await resp.text()
    await resp.read()
    row, _ = await row_and_spend(gw, secret)
    billed = mtok(6_000, IN) + mtok(200, OUT) + 2 * SEARCH
    assert not row["estimated"], row
    assert row["cost_usd"] <= billed * 1.001, (row["cost_usd"], billed)


# SOUND: a whole answer whose usage has no token counts (`usage: {}`: estimated row) still
# has its five search blocks charged ($0.05 on top of the estimate); one whose count and
# blocks agree (3 and 3) is charged 3, exactly, not 6.
async def test_whole_answer_searches_without_counts_and_not_twice(build: Build) -> None:
    up = RawUpstream(message({}, search_blocks(5)), hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    status, answer = await post(gw, secret, "/v1/messages", search_request())
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    assert row["estimated"], row
    assert row["cost_usd"] >= 5 * SEARCH, row
    usage = {**SEARCH_USAGE, "server_tool_use": {"web_search_requests": 3}}
    up = RawUpstream(message(usage, search_blocks(3)), hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    status, answer = await post(gw, secret, "/v1/messages", search_request())
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    billed = mtok(6_000, IN) + mtok(200, OUT) + 3 * SEARCH
    assert not row["estimated"], row
    assert abs(row["cost_usd"] - billed) < 1e-9, (row["cost_usd"], billed)


CONFIG_PRICES = {"input_price_per_mtok": IN, "output_price_per_mtok": OUT}


async def ten_searches(build: Build, **setup: Any) -> float:
    """The cost charged for ten reported searches (and 6,000 + 200 tokens) on Sonnet."""
    usage = {**SEARCH_USAGE, "server_tool_use": {"web_search_requests": 10}}
    up = RawUpstream(message(usage, search_blocks(10)), hold=False)
    gw = await build("anthropic", up, SONNET, **setup)
    secret = await create_key(gw, budget_usd=50.0)
    status, answer = await post(gw, secret, "/v1/messages", search_request())
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    assert not row["estimated"], row
    return float(row["cost_usd"])


TOKENS = mtok(6_000, IN) + mtok(200, OUT)


# WRONG (low, USD budgets; a regression of d06a3f2: at d06a3f2^ these searches cost $0.03
# each): a model priced in its config (tokens at $3/$15) on a provider with
# `pricing = "free"` now has its web searches priced at $0: `search_price` asks `_listed`,
# which answers the provider's `FREE` price (whose `Rates.web_search` defaults to 0.0) as if
# it were the price list's. The operator who priced the model in its config asked for its
# use to be charged; `pricing = "free"` says the price list has nothing to say about this
# provider (a self-hosted or flat-fee account), not that its searches are free (the config
# docs: "a web search defaults to the price list's for the upstream model, else $0.03").
# Ten searches: expected >= $0.10 + tokens (list's $0.01, or the $0.03 fallback), actual
# tokens only. Realism: low: an Anthropic-compatible provider marked free whose models are
# config-priced for chargeback (a flat-fee or credits account) and which runs web searches.
# Right: in `search_price`, treat a `FREE` listing as no listing (UNKNOWN_SEARCH_PRICE), or
# give `FREE` a search rate only for providers that are actually free (demo).
async def test_config_priced_model_on_free_provider_charges_searches(build: Build) -> None:
    cost = await ten_searches(build, model=CONFIG_PRICES, fields={"pricing": "free"})
    assert cost >= TOKENS + 10 * SEARCH * 0.999, (cost, TOKENS)


# SOUND: the search price's other sources: the list's $0.01 for a config-priced model on the
# default pricing; $0.03 on `pricing = "none"` (no list); the config's own
# `web_search_price_per_call` (0: free; 0.5: $0.50 each) wins over both; an unpriced model
# on a free provider charges nothing.
async def test_search_price_sources(build: Build) -> None:
    cost = await ten_searches(build, model=CONFIG_PRICES)
    assert abs(cost - (TOKENS + 10 * SEARCH)) < 1e-9, cost
    cost = await ten_searches(build, model=CONFIG_PRICES, fields={"pricing": "none"})
    assert abs(cost - (TOKENS + 10 * 0.03)) < 1e-9, cost
    zero = CONFIG_PRICES | {"web_search_price_per_call": 0.0}
    cost = await ten_searches(build, model=zero, fields={"pricing": "none"})
    assert abs(cost - TOKENS) < 1e-9, cost
    dear = CONFIG_PRICES | {"web_search_price_per_call": 0.5}
    cost = await ten_searches(build, model=dear)
    assert abs(cost - (TOKENS + 10 * 0.5)) < 1e-9, cost
    assert await ten_searches(build, fields={"pricing": "free"}) == 0.0


# --- usage details and holds ------------------------------------------------------------------


# SOUND: odd detail counts (past 2**40, negative, a bool, a float, an object) cost only that
# detail: the row is exact at the token counts (cache writes at the 5-minute rate), no
# searches charged.
@pytest.mark.parametrize(
    "detail",
    [
        {"cache_creation": {"ephemeral_1h_input_tokens": 2**41}},
        {"cache_creation": {"ephemeral_1h_input_tokens": -5}},
        {"cache_creation": {"ephemeral_1h_input_tokens": True}},
        {"server_tool_use": {"web_search_requests": 2**41}},
        {"server_tool_use": {"web_search_requests": -1}},
        {"server_tool_use": {"web_search_requests": {"n": 1}}},
        {"server_tool_use": [1, 2]},
        {"cache_creation": "1h"},
    ],
)
async def test_odd_detail_counts_cost_only_the_detail(build: Build, detail: Any) -> None:
    up = RawUpstream(message(GOOD_COUNTS | detail), hold=False)
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_usd=50.0)
    status, answer = await post(gw, secret, "/v1/messages", PLAIN_MESSAGES)
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    assert not row["estimated"], row
    assert abs(row["cost_usd"] - GOOD_BILL) < 1e-9, (row["cost_usd"], GOOD_BILL)


# SOUND: `_held_cost` of a plain request (no cache marks, audio, searches) is exactly the text
# cost it was before (`price.cost(held)`), for list prices of OpenAI, Anthropic, Google and
# OpenRouter models: the floor only ever raises a hold whose kinds are priced below text.
def test_plain_hold_is_the_text_cost() -> None:
    lookup, _, _ = load_database()
    body = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_tokens":100}'
    req = msgspec.json.decode(body, type=ChatCompletionRequest)
    model = ModelConfig(name="m", targets=(Target(provider="p", model="x"),))
    call = ChatCall(request=req, body=body, model=model)
    held = call.held(12_345, 678)
    for source, name in (
        ("openai", "gpt-4o"),
        ("openai", "gpt-4o-mini"),
        ("anthropic", SONNET),
        ("google", "gemini-2.5-flash"),
        ("openrouter", "google/gemini-3-flash-preview"),
    ):
        price = lookup(source, name)
        assert price is not None, name
        assert _held_cost(price, held) == price.cost(held), name


# SOUND: the admission hold admits a plain chat request it admitted before: gpt-4o, a
# ~10-token prompt and `max_tokens` 1,000 hold ~$0.01; a $0.0101 budget admits it (and is
# charged the exact text cost), a $0.0099 one refuses it, as at d06a3f2^.
async def test_plain_chat_small_budget_boundary(build: Build) -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 20, "total_tokens": 30}
    chat = {"model": "m", "max_tokens": 1_000, "messages": [{"role": "user", "content": "hi"}]}
    up = RawUpstream(completion(usage), hold=False)
    gw = await build("openai", up, "gpt-4o")
    low = await create_key(gw, budget_usd=0.0099)
    status, answer = await post(gw, low, "/v1/chat/completions", chat)
    assert status == 429, (status, answer)
    high = await create_key(gw, budget_usd=0.0101)
    status, answer = await post(gw, high, "/v1/chat/completions", chat)
    assert status == 200, (status, answer)
    row, _ = await row_and_spend(gw, high)
    assert abs(row["cost_usd"] - (mtok(10, 2.5) + mtok(20, 10.0))) < 1e-12, row
