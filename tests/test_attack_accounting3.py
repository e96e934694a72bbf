"""Attack on 90ba8ae's accounting (helper-95): HANDED, the cut-stream floors, the reasoning rule.

Each failing test is a way the accounting charges a key other than the documented (or
reasonable) amount; the comment above it says what is wrong and what should happen. The
passing tests pin properties verified here that no other test covers. Upstreams are raw TCP
servers (`tests.test_cut_stream_usage.Upstream`): they write their bytes, then hold the
connection until the gateway closes it. Where no event marks the state a test needs (a request
waiting for a pool slot or a connection), the upstream client's own counters are polled.
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
from gateway.state import GATE_KEY, KEYS_KEY, LIVE_KEY, USAGE_KEY
from tests import raw_upstream
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    app_of,
    create_key,
    provider_config,
    start_gateway,
    usage_rows,
)
from tests.raw_upstream import auth, cut_after
from tests.test_cut_stream_usage import HEAD, START, Upstream, event

PROMPT = "hello there " * 100  # 1,200 characters
ESTIMATE = 307  # the gateway's estimate of PROMPT as one user message (300 + 4 + 3)
BASE = {"openai": "/v1", "anthropic": "", "gemini": ""}
CHAT = {"model": "m", "messages": [{"role": "user", "content": PROMPT}]}

Build = Callable[..., Awaitable[TestClient[Any, Any]]]


class KeepAlive:
    """Answers each request on a connection in turn with the next of `replies` (None: take the
    request and say nothing), keeping the connection open: a pooled connection is reused."""

    def __init__(self, replies: list[bytes | None]) -> None:
        self.replies = replies
        self.connections = 0
        self.requests = 0
        self.silent = asyncio.Event()  # a request was taken and left unanswered
        self.port = 0

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.decode("latin-1").split("\r\n"):
                    name, _, value = line.partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                reply = self.replies[self.requests]
                self.requests += 1
                if reply is None:
                    self.silent.set()
                    await reader.read()
                    return
                writer.write(reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


blackhole = raw_upstream.blackhole  # the fixture


@pytest.fixture
async def build(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> AsyncIterator[Build]:
    """A gateway with one provider per `(kind, upstream or port, fields)` in `ups`, named
    up0, up1, ..., and one model "m" routed to them in that order (or `models`: each name
    routed to the providers of its list, in order)."""
    servers: list[asyncio.Server] = []

    async def make(
        ups: list[tuple[str, Any, dict[str, Any]]],
        *,
        model: dict[str, Any] | None = None,
        routing: RoutingSettings | None = None,
        models: dict[str, list[int]] | None = None,
    ) -> TestClient[Any, Any]:
        cfgs = []
        for i, (kind, up, fields) in enumerate(ups):
            if isinstance(up, int):
                port = up
            else:
                server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
                servers.append(server)
                port = up.port = server.sockets[0].getsockname()[1]
            cfgs.append(
                provider_config(
                    kind,
                    name=f"up{i}",
                    base_url=f"http://127.0.0.1:{port}{BASE[kind]}",
                    api_keys=("sk-up-0123456789abcdefghij",),
                    **fields,
                )
            )
        models = models or {"m": list(range(len(cfgs)))}
        ms = tuple(
            ModelConfig(
                name=name,
                targets=tuple(
                    Target(provider=cfgs[i].name, model="m-1", priority=p)
                    for p, i in enumerate(order)
                ),
                **(model or {}),
            )
            for name, order in models.items()
        )
        routing = routing or RoutingSettings(max_attempts=len(cfgs), backoff_initial=0.0)
        settings = make_settings(providers=tuple(cfgs), models=ms, routing=routing)
        return await start_gateway(aiohttp_client, settings)

    yield make
    for server in servers:
        server.close()


async def until(check: Callable[[], bool]) -> None:
    """Wait until `check()` holds (for states no event marks: a pool wait, a connect)."""
    async with asyncio.timeout(NEVER_HANG):
        while not check():  # noqa: ASYNC110 - no event marks a pool wait or a connect
            await asyncio.sleep(0.005)


def stats(gw: TestClient[Any, Any], name: str = "up0") -> Any:
    provider: Any = app_of(gw)[LIVE_KEY].current.providers[name]
    return provider.stats


async def spent(gw: TestClient[Any, Any], secret: str) -> int:
    app = app_of(gw)
    record = app[KEYS_KEY].lookup(secret)
    assert record is not None
    spend = await app[GATE_KEY].spending(record)
    assert spend is not None
    return int(spend.tokens)


async def charged(
    gw: TestClient[Any, Any], secret: str, rows: int = 1
) -> tuple[dict[str, Any], int]:
    """The last of `rows` usage rows (once written) and the key's spent tokens; checks the row
    is consistent (total = prompt + completion) and the budget counts it."""
    app = app_of(gw)
    async with asyncio.timeout(NEVER_HANG):
        await app[USAGE_KEY].wait_recorded(rows)
    row = (await usage_rows(gw))[-1]
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"], row
    tokens = await spent(gw, secret)
    assert tokens == row["total_tokens"], (row, tokens)
    return row, tokens


def block_start(index: int, block: dict[str, Any]) -> bytes:
    return event(
        {"type": "content_block_start", "index": index, "content_block": block},
        "content_block_start",
    )


def text_delta(index: int, text: str) -> bytes:
    payload: dict[str, Any] = {"type": "content_block_delta", "index": index}
    payload["delta"] = {"type": "text_delta", "text": text}
    return event(payload, "content_block_delta")


def block_stop(index: int) -> bytes:
    return event({"type": "content_block_stop", "index": index}, "content_block_stop")


def message_delta(output: int) -> bytes:
    payload = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": output},
    }
    return event(payload, "message_delta")


def whole(payload: Any) -> bytes:
    body = json.dumps(payload).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
        len(body),
        body,
    )


def start_with(usage: dict[str, int]) -> bytes:
    start = json.loads(json.dumps(START))
    start["message"]["usage"] = usage
    return event(start, "message_start")


ANSWER = {
    "id": "c1",
    "object": "chat.completion",
    "created": 1,
    "model": "m-1",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12},
}


# --- (a) a client that hangs up before anything went upstream -------------------------------


# WRONG: operations.md ("Timeouts", "Failed attempts"): "An attempt that timed out still waiting
# for its connection (connecting, or for a max_connections slot: no request was sent) ... cost[s]
# nothing". 90ba8ae applies that (HANDED) to timeouts only: a client that hangs up while its
# request waits for a `max_connections` slot (pool_timeout not yet up) or for the connection to
# open is `hung_up` in `pipeline.finish` ("the upstream already has the prompt") and charged
# the prompt's estimate (307 here), and on a reasoning model the whole output limit on top
# (3,000 here): nothing was sent. A full pool is exactly when clients give up, so every one
# of them is charged. Right: a hang-up before any connection was handed to the request
# (`HANDED` unchanged since its attempt began, or no attempt begun) costs nothing, as the
# same wait ended by a timeout does; the row keeps status 499.
@pytest.mark.parametrize("reasoning", [False, True])
async def test_a_client_hanging_up_while_waiting_for_a_pool_slot_is_not_charged(
    build: Build, reasoning: bool
) -> None:
    up = Upstream(b"")  # takes the prompt, says nothing: holds the one slot
    gw = await build(
        [("openai", up, {"max_connections": 1, "pool_timeout": 60.0, "read_timeout": 60.0})],
        model={"reasoning": reasoning},
    )
    holder = await create_key(gw)  # no budget
    waiter = await create_key(gw, budget_tokens=100_000)
    body = CHAT | {"max_tokens": 3_000, "stream": True}
    first = asyncio.create_task(gw.post("/v1/chat/completions", json=body, headers=auth(holder)))
    await asyncio.wait_for(up.seen.wait(), NEVER_HANG)
    second = asyncio.create_task(gw.post("/v1/chat/completions", json=body, headers=auth(waiter)))
    await until(lambda: stats(gw).waiting == 1)
    second.cancel()
    row, tokens = await charged(gw, waiter)  # the first row: the holder's stream is still open
    first.cancel()
    assert row["status"] == 499, row
    assert (row["prompt_tokens"], row["completion_tokens"], tokens) == (0, 0, 0), row


# WRONG, the same for a client hanging up while the connection is still opening (a host that
# drops SYNs; connect_timeout 30 s): charged the prompt's estimate (and on a reasoning model its
# output limit), though no byte went upstream.
@pytest.mark.parametrize("reasoning", [False, True])
async def test_a_client_hanging_up_while_connecting_is_not_charged(
    build: Build, blackhole: raw_upstream.Blackhole, reasoning: bool
) -> None:
    gw = await build(
        [("openai", blackhole.port, {"connect_timeout": 30.0, "read_timeout": 30.0})],
        model={"reasoning": reasoning},
    )
    secret = await create_key(gw, budget_tokens=100_000)
    body = CHAT | {"max_tokens": 3_000, "stream": True}
    task = asyncio.create_task(gw.post("/v1/chat/completions", json=body, headers=auth(secret)))
    await until(lambda: stats(gw).in_use == 1)  # its slot taken: connecting
    task.cancel()
    row, tokens = await charged(gw, secret)
    assert row["status"] == 499, row
    assert (row["prompt_tokens"], row["completion_tokens"], tokens) == (0, 0, 0), row


# SOUND: HANDED counts a pooled keep-alive connection reused (aiohttp's `_get` path, no new
# connection): a request that reuses one, whose upstream then says nothing, is charged its
# prompt's estimate when the first-byte timeout gives up on it.
async def test_a_timeout_on_a_reused_keep_alive_connection_is_charged(build: Build) -> None:
    up = KeepAlive([whole(ANSWER), None])
    gw = await build([("openai", up, {"read_timeout": 0.3, "total_timeout": 0.3})])
    secret = await create_key(gw, budget_tokens=100_000)
    async with asyncio.timeout(NEVER_HANG):
        resp = await gw.post("/v1/chat/completions", json=CHAT, headers=auth(secret))
        assert resp.status == 200, await resp.text()
        await app_of(gw)[USAGE_KEY].wait_recorded(1)
        resp = await gw.post("/v1/chat/completions", json=CHAT, headers=auth(secret))
        assert resp.status == 504, await resp.text()
        await app_of(gw)[USAGE_KEY].wait_recorded(2)
    assert up.connections == 1  # the second request went on the first's connection
    row = (await usage_rows(gw))[-1]
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (ESTIMATE, 0, 1)
    assert await spent(gw, secret) == 12 + ESTIMATE


# SOUND: HANDED across failover between providers (each its own session and connector), and
# its count is per request: two requests at once on one loop, one whose first provider never
# opens a connection (blackholed) and one whose first provider took the prompt and said nothing,
# both then answered by a third provider. Only the second is charged the prompt's estimate.
async def test_handed_is_per_request_and_per_attempt_across_providers(
    build: Build, blackhole: raw_upstream.Blackhole
) -> None:
    silent = Upstream(b"")
    good = KeepAlive([whole(ANSWER), whole(ANSWER)])
    quick = {"connect_timeout": 5.0, "read_timeout": 0.3, "total_timeout": 0.3}
    gw = await build(
        [("openai", blackhole.port, quick), ("openai", silent, quick), ("openai", good, {})],
        models={"a": [0, 2], "b": [1, 2]},
        routing=RoutingSettings(max_attempts=2, backoff_initial=0.0),
    )
    never_sent = await create_key(gw, budget_tokens=100_000)
    was_sent = await create_key(gw, budget_tokens=100_000)

    async def ask(model: str, secret: str) -> None:
        body = CHAT | {"model": model}
        resp = await gw.post("/v1/chat/completions", json=body, headers=auth(secret))
        assert resp.status == 200, await resp.text()

    async with asyncio.timeout(NEVER_HANG):
        await asyncio.gather(ask("a", never_sent), ask("b", was_sent))
        await app_of(gw)[USAGE_KEY].wait_recorded(2)
    assert silent.seen.is_set()
    assert await spent(gw, never_sent) == 12
    assert await spent(gw, was_sent) == 12 + ESTIMATE


# --- (b) the floors of a cut stream's counts ------------------------------------------------


# WRONG: operations.md: a cut stream's counts are "never below the gateway's own estimate".
# `_at_least_estimated` compares `trace.prompt_tokens + trace.cache_read_tokens` with the
# estimate, but `trace.prompt_tokens` already includes the cache reads (`RequestTrace`: "of
# prompt_tokens"; `openai_usage` adds them): the reads are counted twice, so an Anthropic
# message_start of input 0 (the upstream that reports input only at the end, the case the
# floor is for) with 200 cache reads keeps a prompt of 200 against an estimate of 307, and
# with 100 reads the floor lifts it to 207 (307 - 100), not 307. Right: compare the prompt
# (reads included) with the estimate, and raise the prompt to the estimate.
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
@pytest.mark.parametrize("reads", [100, 200])
async def test_a_cut_stream_with_cache_reads_is_not_charged_below_the_estimate(
    build: Build, path: str, reads: int
) -> None:
    reply = HEAD + start_with(
        {"input_tokens": 0, "output_tokens": 1, "cache_read_input_tokens": reads}
    )
    up = Upstream(reply + block_start(0, {"type": "text", "text": ""}) + text_delta(0, "Hi"))
    gw = await build([("anthropic", up, {})])
    secret = await create_key(gw, budget_tokens=100_000)
    await cut_after(gw, secret, path, CHAT | {"max_tokens": 1_000, "stream": True}, b"Hi")
    row, _ = await charged(gw, secret)
    assert row["cache_read_tokens"] == reads, row
    assert row["prompt_tokens"] >= ESTIMATE, row


# SOUND: the floor does not double-count a mostly cached prompt whose honest counts cover the
# estimate (input 10 + 280 read + 20 written): the row keeps the upstream's counts exactly.
async def test_a_cut_stream_with_honest_cached_counts_keeps_them(build: Build) -> None:
    usage = {
        "input_tokens": 10,
        "output_tokens": 1,
        "cache_read_input_tokens": 280,
        "cache_creation_input_tokens": 20,
    }
    reply = HEAD + start_with(usage) + block_start(0, {"type": "text", "text": ""})
    up = Upstream(reply + text_delta(0, "Hi"))
    gw = await build([("anthropic", up, {})])
    secret = await create_key(gw, budget_tokens=100_000)
    body = CHAT | {"max_tokens": 1_000, "stream": True}
    await cut_after(gw, secret, "/v1/chat/completions", body, b"Hi")
    row, _ = await charged(gw, secret)
    got = (row["prompt_tokens"], row["cache_read_tokens"], row["cache_write_tokens"])
    assert got == (310, 280, 20), row
    assert row["estimated"] == 1


# --- (c) the reasoning rule -----------------------------------------------------------------


# WRONG: operations.md: "A reasoning model's request cut before its final usage came is
# charged at least the output limit". On Anthropic the final count is message_delta's usage
# (`output_tokens` counts the thinking too); a stream cut after it and before message_stop (the
# client hangs up as the finish chunk arrives, or the upstream drops the connection there)
# goes to `UsageTally.cut`, is `usage_estimated`, and `_reasoning_charged` lifts its output
# from the reported 7 to the limit, 3,000. Right: once message_delta's count is in, it is
# the final usage: charged as reported (a whole stream's count), not the limit. (On
# /v1/messages, the pass-through, the same cut is charged 7: that case passes.)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_reasoning_stream_cut_after_its_final_count_is_charged_that_count(
    build: Build, path: str
) -> None:
    reply = (
        HEAD
        + start_with({"input_tokens": 900, "output_tokens": 1})
        + block_start(0, {"type": "text", "text": ""})
        + text_delta(0, "Hi")
        + block_stop(0)
        + message_delta(7)
    )
    up = Upstream(reply)  # no message_stop: held open
    gw = await build([("anthropic", up, {})], model={"reasoning": True})
    secret = await create_key(gw, budget_tokens=100_000)
    body: dict[str, Any] = CHAT | {"max_tokens": 3_000, "stream": True}
    marker = b'"finish_reason":"stop"' if path == "/v1/chat/completions" else b"end_turn"
    await cut_after(gw, secret, path, body, marker)
    row, _ = await charged(gw, secret)
    assert (row["prompt_tokens"], row["completion_tokens"]) == (900, 7), row


REDACTED_THEN_TEXT = (
    HEAD
    + start_with({"input_tokens": 900, "output_tokens": 1})
    + block_start(0, {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a" * 40})
    + block_stop(0)
    + block_start(1, {"type": "text", "text": ""})
    + text_delta(1, "Hi")
)


# WRONG: the reasoning rule charges "the output limit it was sent with (what admission held)",
# but uses `Call.output_ceiling()`, which leaves out the thinking budget the Anthropic
# provider adds on top (`thinking_on_top`: a reasoning model with a configured max_tokens and
# a `reasoning_effort`, no limit of the request's own). Here max_tokens goes upstream as
# 1,000 + 4,096 (effort "high") and admission held that, but the cut stream is charged 1,000:
# the upstream may bill up to 5,096 of thinking and answer. Right: the limit as sent (the
# ceiling plus `output_on_top`, as `usage_bounds.completion_bound` counts it).
async def test_a_cut_reasoning_stream_is_charged_the_limit_it_was_sent_with(
    build: Build,
) -> None:
    up = Upstream(REDACTED_THEN_TEXT)
    gw = await build([("anthropic", up, {})], model={"reasoning": True, "max_tokens": 1_000})
    secret = await create_key(gw, budget_tokens=100_000)
    body = CHAT | {"reasoning_effort": "high", "stream": True}
    await cut_after(gw, secret, "/v1/chat/completions", body, b"Hi")
    (sent,) = up.bodies
    assert sent["max_tokens"] == 1_000 + 4_096, sent
    row, _ = await charged(gw, secret)
    assert row["completion_tokens"] >= sent["max_tokens"], row


PRICES = {
    "input_price_per_mtok": 1.0,
    "output_price_per_mtok": 10.0,
    "reasoning_price_per_mtok": 10.0,
}


# SOUND: a reasoning stream cut before its usage with n=2 is charged the limit times the
# choices, and the row is consistent: total = prompt + completion, estimated, the budget's
# spend equals the row, and cost_usd is the counts at the configured prices.
async def test_a_cut_reasoning_stream_with_n_is_charged_the_limit_times_n_consistently(
    build: Build,
) -> None:
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m-1",
        "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
    }
    up = Upstream(HEAD + event(chunk))
    gw = await build([("openai", up, {})], model={"reasoning": True, **PRICES})
    secret = await create_key(gw, budget_tokens=100_000)
    body = CHAT | {"max_tokens": 1_000, "n": 2, "stream": True}
    await cut_after(gw, secret, "/v1/chat/completions", body, b"Hi")
    row, _ = await charged(gw, secret)
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (
        ESTIMATE,
        2_000,
        1,
    ), row
    assert row["cost_usd"] == pytest.approx((ESTIMATE * 1.0 + 2_000 * 10.0) / 1e6), row


# SOUND: with no output limit at all (a key without budget or tokens per minute, no max_tokens:
# UNBOUNDED), a cut reasoning stream is charged its chunks, not an unbounded count.
async def test_a_cut_reasoning_stream_without_any_limit_is_charged_its_chunks(
    build: Build,
) -> None:
    chunk = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m-1",
        "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
    }
    up = Upstream(HEAD + event(chunk))
    gw = await build([("openai", up, {})], model={"reasoning": True})
    secret = await create_key(gw)  # no budget, no tpm: nothing caps the output
    app = app_of(gw)
    await cut_after(gw, secret, "/v1/chat/completions", CHAT | {"n": 2, "stream": True}, b"Hi")
    async with asyncio.timeout(NEVER_HANG):
        await app[USAGE_KEY].wait_recorded(1)
    (row,) = await usage_rows(gw)
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (ESTIMATE, 1, 1)
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]


# --- (d) regressions: whole answers are charged exactly what the upstream reported ----------

OPENAI_STREAM = (
    HEAD
    + event(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m-1",
            "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}],
        }
    )
    + event(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m-1",
            "choices": [],
            "usage": {"prompt_tokens": 90, "completion_tokens": 700, "total_tokens": 790},
        }
    )
    + b"data: [DONE]\n\n"
)
ANTHROPIC_STREAM = (
    HEAD
    + start_with({"input_tokens": 90, "output_tokens": 1})
    + block_start(0, {"type": "text", "text": ""})
    + text_delta(0, "Hi")
    + block_stop(0)
    + message_delta(700)
    + event({"type": "message_stop"}, "message_stop")
)
GEMINI_DONE: dict[str, Any] = {
    "candidates": [
        {"content": {"role": "model", "parts": [{"text": "Hi"}]}, "finishReason": "STOP"}
    ],
    "usageMetadata": {"promptTokenCount": 90, "candidatesTokenCount": 700, "totalTokenCount": 790},
    "modelVersion": "m-1",
    "responseId": "r1",
}
GEMINI_STREAM = HEAD + event(GEMINI_DONE)
WHOLE_STREAMS = {"openai": OPENAI_STREAM, "anthropic": ANTHROPIC_STREAM, "gemini": GEMINI_STREAM}


# SOUND: a whole stream of a reasoning model, on each provider, whose honest counts are far
# below the prompt estimate (90 < 307) is charged exactly what the upstream reported, not
# estimated: neither floor nor the reasoning rule applies to a completed stream.
@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini"])
async def test_a_whole_reasoning_stream_is_charged_exactly_its_usage(
    build: Build, kind: str
) -> None:
    up = Upstream(WHOLE_STREAMS[kind], hold=False)
    gw = await build([(kind, up, {})], model={"reasoning": True})
    secret = await create_key(gw, budget_tokens=100_000)
    body = CHAT | {"max_tokens": 3_000, "stream": True}
    async with asyncio.timeout(NEVER_HANG):
        resp = await gw.post("/v1/chat/completions", json=body, headers=auth(secret))
        assert resp.status == 200, await resp.text()
        await resp.read()
    row, _ = await charged(gw, secret)
    got = (row["status"], row["prompt_tokens"], row["completion_tokens"], row["estimated"])
    assert got == (200, 90, 700, 0), row
