"""Attack on the accounting changes (helper-94): failed, cut and timed-out attempts.

Each failing test is a way the new accounting rules charge a key other than the documented
(or reasonable) amount; the comment above it says what is wrong and what should happen. The
passing tests pin properties verified here that no other test covers. Upstreams are raw TCP
servers (`tests.test_cut_stream_usage.Upstream`): they write their bytes, then hold the
connection until the gateway closes it, so every wait is on an event.
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
from gateway.state import GATE_KEY, KEYS_KEY, USAGE_KEY
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
from tests.test_cut_stream_usage import HEAD, START, Upstream, event, gemini_chunk

PROMPT = "hello there " * 100  # 1,200 characters: ~300 tokens by the gateway's estimate
BASE = {"openai": "/v1", "anthropic": "", "gemini": ""}

Build = Callable[..., Awaitable[tuple[TestClient[Any, Any], str]]]


@pytest.fixture
async def build(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> AsyncIterator[Build]:
    servers: list[asyncio.Server] = []

    async def make(
        kind: str,
        up: Upstream | None,
        *,
        port: int | None = None,
        model: dict[str, Any] | None = None,
        routing: RoutingSettings | None = None,
        key: dict[str, Any] | None = None,
        **provider: Any,
    ) -> tuple[TestClient[Any, Any], str]:
        if up is not None:
            server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
            servers.append(server)
            port = up.port = server.sockets[0].getsockname()[1]
        cfg = provider_config(
            kind,
            name="up",
            base_url=f"http://127.0.0.1:{port}{BASE[kind]}",
            api_keys=("sk-up-0123456789abcdefghij",),
            **provider,
        )
        m = ModelConfig(name="m", targets=(Target(provider="up", model="m-1"),), **(model or {}))
        routing = routing or RoutingSettings(max_attempts=1)
        settings = make_settings(providers=(cfg,), models=(m,), routing=routing)
        gw = await start_gateway(aiohttp_client, settings)
        return gw, await create_key(gw, **(key or {"budget_tokens": 100_000}))

    yield make
    for server in servers:
        server.close()


async def charged(gw: TestClient[Any, Any], secret: str) -> tuple[dict[str, Any], int | None]:
    """The one usage row (once written) and the tokens the key's budget counts as spent
    (None: the key has no budget)."""
    app = app_of(gw)
    async with asyncio.timeout(NEVER_HANG):
        await app[USAGE_KEY].wait_recorded(1)
    (row,) = await usage_rows(gw)
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"], row
    record = app[KEYS_KEY].lookup(secret)
    assert record is not None
    spend = await app[GATE_KEY].spending(record)
    return row, None if spend is None else spend.tokens


def block_start(index: int, block: dict[str, Any]) -> bytes:
    return event(
        {"type": "content_block_start", "index": index, "content_block": block},
        "content_block_start",
    )


def text_delta(index: int, text: str) -> bytes:
    payload = {"type": "content_block_delta", "index": index}
    payload["delta"] = {"type": "text_delta", "text": text}  # type: ignore[assignment]
    return event(payload, "content_block_delta")


def block_stop(index: int) -> bytes:
    return event({"type": "content_block_stop", "index": index}, "content_block_stop")


# --- (b) a reasoning model on Anthropic, cut after message_start -----------------------------

# Thinking the upstream bills but does not stream as text: a redacted block (Claude 4's
# summarized thinking is the same in kind: its summary is far shorter than what is billed).
REDACTED_THEN_TEXT = (
    HEAD
    + event(START, "message_start")
    + block_start(0, {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a" * 40})
    + block_stop(0)
    + block_start(1, {"type": "text", "text": ""})
    + text_delta(1, "Hi")
)


# WRONG (regression of 552bbad by 740c158): a reasoning model's stream cut before its usage came
# is to be charged the output limit it was sent with (operations.md, "Client hang-ups": "its
# hidden reasoning is counted nowhere else, and came before the visible answer"). On Anthropic
# (chat translation and /v1/messages alike) the cut now goes to `UsageTally.cut` as soon as
# message_start arrived, which charges max(message_start's output count, streamed characters
# / 4): thinking that is billed but not streamed as text (a redacted_thinking block; Claude 4's
# summarized thinking, far shorter than what is billed) counts nothing. A budgeted client asks a
# reasoning model to think hard and hangs up at the first visible token: charged 1 output token
# instead of 3,000 (at 552bbad this test passes). Reasonable: for `reasoning = true`, the
# larger of the tally's estimate and `call.output_ceiling()`, as the usage-less path does.
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_cut_reasoning_stream_on_anthropic_is_charged_its_output_limit(
    build: Build, path: str
) -> None:
    up = Upstream(REDACTED_THEN_TEXT)
    gw, secret = await build("anthropic", up, model={"reasoning": True})
    body: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 3_000,
        "stream": True,
    }
    if path == "/v1/messages":
        body["thinking"] = {"type": "enabled", "budget_tokens": 2_000}
    await cut_after(gw, secret, path, body, b"Hi")
    await asyncio.wait_for(up.closed.wait(), NEVER_HANG)
    row, spent = await charged(gw, secret)
    assert spent == row["total_tokens"], (row, spent)  # the budget counts the row
    assert row["completion_tokens"] >= 3_000, row


# --- (a)/(c) timeouts before the request went upstream ------------------------------------------


blackhole = raw_upstream.blackhole  # the fixture


CHAT = {"model": "m", "messages": [{"role": "user", "content": PROMPT}]}


# WRONG: operations.md ("Timeouts", "Failed attempts"): "A connection that never opened
# (connect_timeout) ... cost[s] nothing"; only "a timeout after the request went upstream" is
# charged the prompt's estimate. But the stream watchdog is opened before `session.post` (it
# covers the connect), and a non-streaming call's aiohttp `total` (min(total_timeout,
# read_timeout)) covers it too: when either is shorter than connect_timeout and the host does
# not answer SYNs (down, firewalled), the timeout is `unanswered` and every attempt charges the
# prompt's estimate (307 tokens here, times max_attempts), though no byte of it left. Reasonable:
# unanswered only once the connection is open and the request written (e.g. after
# `session.post` returned for streams; `ConnectionTimeoutError` or a flag set by a trace's
# on_request_chunk_sent / on_connection_create_end for unary calls).
@pytest.mark.parametrize("stream", [True, False])
async def test_a_connection_that_never_opened_is_not_charged(
    build: Build, blackhole: raw_upstream.Blackhole, stream: bool
) -> None:
    # The connect is still under way (connect_timeout: 5 s) when the first-byte watchdog
    # (streams) or aiohttp's total timer (non-streaming: min(total_timeout, read_timeout))
    # fires: no byte of the prompt went upstream.
    gw, secret = await build(
        "openai",
        None,
        port=blackhole.port,
        connect_timeout=5.0,
        first_byte_timeout=0.2,
        read_timeout=0.2,
    )
    async with asyncio.timeout(NEVER_HANG):
        resp = await gw.post(
            "/v1/chat/completions", json=CHAT | {"stream": stream}, headers=auth(secret)
        )
        assert resp.status == 504, await resp.text()
    row, spent = await charged(gw, secret)
    assert spent == row["total_tokens"], (row, spent)  # the budget counts the row
    assert (row["prompt_tokens"], row["estimated"], spent) == (0, 0, 0), row


# WRONG, the same for the routing deadline: `attempt_each` counts every attempt the deadline
# cut as unanswered (`ex.unanswered += 1` on `scope.expired()`), whether the request was
# written upstream or was still connecting (or waiting for a pool slot, `max_connections`).
async def test_a_deadline_passed_while_connecting_is_not_charged(
    build: Build, blackhole: raw_upstream.Blackhole
) -> None:
    gw, secret = await build(
        "openai",
        None,
        port=blackhole.port,
        connect_timeout=5.0,
        routing=RoutingSettings(max_attempts=1, deadline=0.2),
    )
    async with asyncio.timeout(NEVER_HANG):
        resp = await gw.post(
            "/v1/chat/completions", json=CHAT | {"stream": True}, headers=auth(secret)
        )
        assert resp.status == 504, await resp.text()
    row, spent = await charged(gw, secret)
    assert spent == row["total_tokens"], (row, spent)  # the budget counts the row
    assert (row["prompt_tokens"], row["estimated"], spent) == (0, 0, 0), row


ABSURD = json.loads(json.dumps(START))
ABSURD["message"]["usage"] = {
    "input_tokens": 10**9,
    "output_tokens": 10**9,
    "cache_read_input_tokens": 10**9,
    "cache_creation_input_tokens": 10**9,
}


# SOUND: a hostile Anthropic upstream's absurd message_start counts (10**9 each) followed by a
# cut are bounded like a whole answer's (prompt by the body, output by max_tokens/OUTPUT_FLOOR).
# (On /v1/messages the prompt has no bound, as documented for whole answers in providers.md:
# 3e9 tokens are charged there; not new with the cut rule.)
async def test_absurd_message_start_counts_then_a_cut_are_bounded(build: Build) -> None:
    path = "/v1/chat/completions"
    reply = HEAD + event(ABSURD, "message_start") + block_start(0, {"type": "text", "text": ""})
    up = Upstream(reply + text_delta(0, "Hi"))
    gw, secret = await build("anthropic", up)
    body = CHAT | {"max_tokens": 1_000, "stream": True}
    await cut_after(gw, secret, path, body, b"Hi")
    row, spent = await charged(gw, secret)
    assert spent == row["total_tokens"], (row, spent)  # the budget counts the row
    assert spent < 20_000, row


# SOUND: the same for a Gemini running usageMetadata.
async def test_absurd_gemini_running_usage_then_a_cut_is_bounded(build: Build) -> None:
    usage = {
        "promptTokenCount": 10**9,
        "candidatesTokenCount": 10**9,
        "totalTokenCount": 2 * 10**9,
        "cachedContentTokenCount": 10**9,
        "thoughtsTokenCount": 10**9,
    }
    up = Upstream(HEAD + gemini_chunk("Hi ", usage))
    gw, secret = await build("gemini", up)
    body = CHAT | {"max_tokens": 1_000, "stream": True}
    await cut_after(gw, secret, "/v1/chat/completions", body, b"Hi")
    row, spent = await charged(gw, secret)
    assert spent == row["total_tokens"], (row, spent)  # the budget counts the row
    assert spent < 20_000, row


# WRONG (low): `GeminiStream.cut` charges the last `usageMetadata` seen, however many chunks came
# after it. An upstream that sends the count only on its first chunk (promptTokenCount alone,
# as Gemini-format proxies and older API versions do) and then streams 61 chunks (~2,400
# characters, ~600 tokens) is charged 0 output tokens when the client cuts; at ae6dc03 it was
# charged a token a chunk (61). keys.md: a cut stream "is charged for what was generated".
# Reasonable: as for Anthropic, the larger of the reported output and the chunks (or streamed
# characters / 4) since the answer began.
async def test_a_cut_gemini_stream_charges_at_least_the_chunks_after_its_last_count(
    build: Build,
) -> None:
    first = {"promptTokenCount": 900, "totalTokenCount": 900}
    reply = HEAD + gemini_chunk("start ", first)
    reply += b"".join(gemini_chunk("word " * 40, None) for _ in range(60)) + gemini_chunk(
        "LAST", None
    )
    up = Upstream(reply)
    gw, secret = await build("gemini", up)
    body = CHAT | {"max_tokens": 4_000, "stream": True}
    await cut_after(gw, secret, "/v1/chat/completions", body, b"LAST")
    row, spent = await charged(gw, secret)
    assert spent == row["total_tokens"], (row, spent)  # the budget counts the row
    assert row["completion_tokens"] >= 60, row


REASONING_BODY = CHAT | {"max_tokens": 3_000, "stream": True}


# WRONG (design gap): a reasoning model thinking past first_byte_timeout is billed for that
# thinking; if the client hangs up at that moment, the request is charged the output limit
# (pipeline._account's reasoning rule: 3,000), but when the gateway gives up on it instead
# (504, `unanswered`) only the prompt's estimate: a budgeted client that makes a reasoning
# model think long (hard prompt, reasoning_effort high) burns the upstream's output at prompt
# price, times max_attempts. Reasonable: a reasoning attempt given up on is charged as the
# client hang-up is (its output ceiling on top of the prompt estimate).
@pytest.mark.parametrize("ending", ["client_hangs_up", "gateway_gives_up"])
async def test_a_thinking_attempt_ended_before_its_first_byte_is_charged_alike(
    build: Build, ending: str
) -> None:
    up = Upstream(b"")  # takes the prompt, thinks, says nothing
    gw, secret = await build(
        "openai", up, model={"reasoning": True}, first_byte_timeout=0.3, read_timeout=0.3
    )
    task = asyncio.create_task(
        gw.post("/v1/chat/completions", json=REASONING_BODY, headers=auth(secret))
    )
    await asyncio.wait_for(up.seen.wait(), NEVER_HANG)
    if ending == "client_hangs_up":
        task.cancel()
    else:
        resp = await asyncio.wait_for(task, NEVER_HANG)
        assert resp.status == 504
    await asyncio.wait_for(up.closed.wait(), NEVER_HANG)
    row, spent = await charged(gw, secret)
    assert spent == row["total_tokens"], (row, spent)  # the budget counts the row
    assert row["completion_tokens"] == 3_000, row


def whole(payload: Any) -> bytes:
    body = json.dumps(payload).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
        len(body),
        body,
    )


COMPLETION = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1,
    "model": "m-1",
    "choices": [{"index": 0, "text": "x", "finish_reason": "length", "logprobs": None}],
    "usage": {"prompt_tokens": 10, "completion_tokens": 10**6, "total_tokens": 10**6 + 10},
}


# SOUND: /v1/completions for a key with a budget or tpm and `max_tokens: null` gets
# default_max_tokens upstream; a hostile usage count is bounded by that limit times best_of.
@pytest.mark.parametrize("key", [{"budget_tokens": 100_000}, {"tpm": 100_000}])
async def test_completions_with_best_of_and_a_null_limit_get_the_default_times_best_of(
    build: Build, key: dict[str, Any]
) -> None:
    up = Upstream(whole(COMPLETION))
    gw, secret = await build("openai", up, key=key, default_max_tokens=1_000)
    body = {"model": "m", "prompt": "say", "max_tokens": None, "best_of": 3, "n": 2}
    async with asyncio.timeout(NEVER_HANG):
        resp = await gw.post("/v1/completions", json=body, headers=auth(secret))
        assert resp.status == 200, await resp.text()
    (sent,) = up.bodies
    assert (sent["max_tokens"], sent["best_of"], sent["n"]) == (1_000, 3, 2), sent
    row, _ = await charged(gw, secret)
    # The hostile count is bounded by the limit sent times best_of.
    assert row["completion_tokens"] == 3_000, row
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"]


WHOLE_STREAM = (
    HEAD
    + event(START, "message_start")
    + block_start(0, {"type": "text", "text": ""})
    + text_delta(0, "Hi")
    + block_stop(0)
    + event(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": 7},
        },
        "message_delta",
    )
    + event({"type": "message_stop"}, "message_stop")
)


# SOUND: request-id on every /v1/messages answer (stream, 401, 400, upstream error).
@pytest.mark.parametrize("case", ["stream", "unauthenticated", "invalid", "upstream_error"])
async def test_every_messages_answer_carries_request_id(build: Build, case: str) -> None:
    reply = WHOLE_STREAM
    if case == "upstream_error":
        reply = (
            HEAD
            + event(START, "message_start")
            + event(
                {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
                "error",
            )
        )
    up = Upstream(reply)
    gw, secret = await build("anthropic", up)
    body: dict[str, Any] = CHAT | {"max_tokens": 100, "stream": True}
    headers = auth(secret)
    if case == "unauthenticated":
        headers = auth("sk-nope")
    elif case == "invalid":
        body = {"model": "m", "messages": "no"}
    async with asyncio.timeout(NEVER_HANG):
        resp = await gw.post("/v1/messages", json=body, headers=headers)
        await resp.read()
    assert resp.headers.get("request-id") == resp.headers["X-Request-ID"], resp.headers


ZERO_START = json.loads(json.dumps(START))
ZERO_START["message"]["usage"] = {"input_tokens": 0, "output_tokens": 0}


# WRONG (low-medium, regression of 740c158): `UsageTally.cut` trusts message_start's input count
# even when it is 0. Anthropic-compatible upstreams (and proxies) that report input only in
# message_delta send `input_tokens: 0` there; a client that cuts before message_delta pays 0
# prompt tokens for any prompt (a 100k-token prompt included), where ae6dc03 charged the
# prompt's estimate. Reasonable: the prompt never below the gateway's estimate (or fall back to
# the estimate when message_start reports no input).
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_cut_stream_whose_message_start_counts_no_input_is_charged_the_prompt(
    build: Build, path: str
) -> None:
    reply = HEAD + event(ZERO_START, "message_start") + block_start(0, {"type": "text", "text": ""})
    up = Upstream(reply + text_delta(0, "Hi"))
    gw, secret = await build("anthropic", up)
    await cut_after(gw, secret, path, CHAT | {"max_tokens": 1_000, "stream": True}, b"Hi")
    row, spent = await charged(gw, secret)
    assert spent == row["total_tokens"], (row, spent)  # the budget counts the row
    assert row["prompt_tokens"] >= 300, row


# SOUND: attempts given up on are priced too: the row's cost and the key's USD spend count
# both attempts' prompt estimates, nothing stays held, total = prompt + completion.
async def test_attempts_given_up_on_are_priced_into_the_usd_budget(build: Build) -> None:
    up = Upstream(b"")  # takes the prompt, never answers
    gw, secret = await build(
        "openai",
        up,
        model={"input_price_per_mtok": 1_000.0, "output_price_per_mtok": 1_000.0},
        routing=RoutingSettings(max_attempts=2, backoff_initial=0.0),
        key={"budget_usd": 100.0},
        first_byte_timeout=0.2,
    )
    async with asyncio.timeout(NEVER_HANG):
        resp = await gw.post(
            "/v1/chat/completions", json=CHAT | {"stream": True}, headers=auth(secret)
        )
        assert resp.status == 504, await resp.text()
    row, _ = await charged(gw, secret)
    app = app_of(gw)
    record = app[KEYS_KEY].lookup(secret)
    assert record is not None
    spend = await app[GATE_KEY].spending(record)
    assert spend is not None
    assert (row["status"], row["estimated"], row["completion_tokens"]) == (504, 1, 0), row
    assert 2 * 300 <= row["prompt_tokens"] <= 2 * 320, row
    assert row["cost_usd"] == pytest.approx(row["prompt_tokens"] * 1e-3)
    assert spend.usd == pytest.approx(row["cost_usd"]) and spend.held_usd == 0
