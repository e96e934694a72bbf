"""Attack on 8e2a967's accounting (helper-98): `UsageTally.counts`, `pipeline.unreported`.

Each failing test is a way the accounting charges a key other than the documented (or
reasonable) amount; the comment above it says what is wrong and what should happen. The
passing tests pin properties verified here that no other test covers. The harness is
test_attack_accounting3's `build` (a gateway over raw TCP upstreams) and tests/raw_upstream.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway.state import USAGE_KEY
from tests import test_attack_accounting3
from tests.conftest import NEVER_HANG, app_of, create_key, usage_rows
from tests.raw_upstream import STREAM_HEAD, RawUpstream, sse
from tests.test_attack_accounting3 import (
    CHAT,
    ESTIMATE,
    PRICES,
    Build,
    auth,
    block_start,
    block_stop,
    charged,
    cut_after,
    start_with,
    text_delta,
    whole,
)

build = test_attack_accounting3.build  # the fixture: a gateway over raw TCP upstreams

LONG = "word " * 800  # 4,000 characters: 1,000 tokens at four characters a token
STOP = sse({"type": "message_stop"}, "message_stop")


async def post(gw: Any, secret: str, path: str, body: dict[str, Any]) -> bytes:
    async with asyncio.timeout(NEVER_HANG):
        resp = await gw.post(path, json=body, headers=auth(secret))
        data = await resp.read()
        assert resp.status == 200, data
        return data


def closing(usage: dict[str, Any] | None) -> bytes:
    """A closing `message_delta` (stop_reason end_turn) with `usage` (None: no usage key)."""
    payload: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
    }
    if usage is not None:
        payload["usage"] = usage
    return sse(payload, "message_delta")


def anthropic_stream(start: dict[str, Any], delta: bytes | None, text: str = LONG) -> bytes:
    out = (
        STREAM_HEAD
        + start_with(start)
        + block_start(0, {"type": "text", "text": ""})
        + text_delta(0, text)
        + block_stop(0)
    )
    if delta is not None:
        out += delta
    return out + STOP


def usage_chunks(data: bytes) -> list[dict[str, Any]]:
    found = []
    for line in data.split(b"\n"):
        if line.startswith(b"data: {"):
            payload = json.loads(line[6:])
            if payload.get("usage"):
                found.append(payload["usage"])
    return found


def stream_body(path: str) -> dict[str, Any]:
    body = CHAT | {"max_tokens": 3_000, "stream": True}
    if path == "/v1/chat/completions":
        body["stream_options"] = {"include_usage": True}
    return body


# --- (a) a stream whose closing count is missing: message_start's placeholder taken as final -


# WRONG: real Anthropic's `message_start` carries `output_tokens: 1` (a placeholder; see
# tests/fake_anthropic.py), the real count coming in the closing `message_delta`. 8e2a967 made
# `UsageTally.counts()` refuse a usage *lacking* input or output, but the tally merges
# message_start into it, so a stream whose closing count never came (a `message_delta` whose
# usage is `{}`, or no `message_delta` at all before `message_stop`) still has both counts:
# it is charged message_start's placeholder, 1 output token for 4,000 characters of text, with
# `estimated = 0` (and on chat the usage chunk tells the client 1 token). The same
# `usage: {}` the last fix called "no report" for a whole answer passes when streamed.
# (/v1/messages refuses a `message_delta` with no usage key as malformed: that case is sound.)
# Right: only the closing message_delta's output count is a final count (`UsageTally.final`
# with an output_tokens of its own); without it the row is estimated and the output is at
# least the streamed characters at four a token, as a cut stream's is.
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
@pytest.mark.parametrize("shape", ["empty_usage", "no_delta"])
async def test_a_stream_without_its_closing_count_is_not_charged_the_placeholder(
    build: Build, path: str, shape: str
) -> None:
    delta = closing({}) if shape == "empty_usage" else None
    reply = anthropic_stream({"input_tokens": 90, "output_tokens": 1}, delta)
    gw = await build([("anthropic", RawUpstream(reply, hold=False), {})])
    secret = await create_key(gw, budget_tokens=100_000)
    await post(gw, secret, path, stream_body(path))
    row, _ = await charged(gw, secret)
    assert row["estimated"] == 1, row
    assert row["completion_tokens"] >= 1_000, row


# WRONG, the same on the chat translation when the closing `message_delta` has no usage key at
# all (the pass-through refuses that event; the translation accepts it): charged 1 output
# token, exact.
async def test_a_translated_stream_whose_closing_delta_has_no_usage_is_estimated(
    build: Build,
) -> None:
    reply = anthropic_stream({"input_tokens": 90, "output_tokens": 1}, closing(None))
    gw = await build([("anthropic", RawUpstream(reply, hold=False), {})])
    secret = await create_key(gw, budget_tokens=100_000)
    await post(gw, secret, "/v1/chat/completions", stream_body("/v1/chat/completions"))
    row, _ = await charged(gw, secret)
    assert row["estimated"] == 1, row
    assert row["completion_tokens"] >= 1_000, row


# WRONG: `UsageTally.cut` takes the tally as final when the closing `message_delta` came
# (`final`) without checking that it held an output count: a stream whose message_start has
# `input_tokens` only and whose closing message_delta has `usage: {}`, cut by the client right
# after it (before message_stop), is charged 0 completion tokens with `estimated = 0`
# (`openai_usage` turns the missing count into 0, and `_at_least_estimated` never runs) for
# 4,000 characters streamed. Completed, the same stream is estimated (counts() is None): the
# client gets it cheaper by hanging up at the finish. Right: a closing delta without an
# output count is not final; the cut is estimated, output at least the streamed characters
# at four a token.
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_a_stream_cut_after_a_countless_closing_delta_is_not_charged_zero(
    build: Build, path: str
) -> None:
    reply = anthropic_stream({"input_tokens": 90}, closing({}))[: -len(STOP)]
    gw = await build([("anthropic", RawUpstream(reply), {})])  # held open: no message_stop
    secret = await create_key(gw, budget_tokens=100_000)
    marker = b'"finish_reason":"stop"' if path == "/v1/chat/completions" else b"end_turn"
    await cut_after(gw, secret, path, CHAT | {"max_tokens": 3_000, "stream": True}, marker)
    row, _ = await charged(gw, secret)
    assert row["estimated"] == 1, row
    assert row["completion_tokens"] >= 1_000, row


# --- (b) what was verified sound ------------------------------------------------------------


# SOUND: honest Anthropic streams whose counts come split as real upstreams split them
# (message_start with input only, no output_tokens; message_start with no counts and a
# message_delta carrying input and output, as the newer API's cumulative delta does; cache
# reads and writes) are charged exactly, unestimated, on chat (with the usage chunk the client
# asked for, equal to the row) and on the /v1/messages pass-through; cost at the prices.
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
@pytest.mark.parametrize(
    "start",
    [
        {"input_tokens": 90},
        {},
        {
            "input_tokens": 90,
            "cache_read_input_tokens": 50,
            "cache_creation_input_tokens": 20,
            "output_tokens": 1,
        },
    ],
)
async def test_an_honest_split_usage_is_charged_exactly(
    build: Build, path: str, start: dict[str, Any]
) -> None:
    delta_usage: dict[str, Any] = {"output_tokens": 700}
    if "input_tokens" not in start:
        delta_usage["input_tokens"] = 90
    reply = anthropic_stream(start, closing(delta_usage), "Hi")
    gw = await build([("anthropic", RawUpstream(reply, hold=False), {})], model=PRICES)
    secret = await create_key(gw, budget_tokens=100_000)
    data = await post(gw, secret, path, stream_body(path))
    row, _ = await charged(gw, secret)
    cached = start.get("cache_read_input_tokens", 0)
    written = start.get("cache_creation_input_tokens", 0)
    prompt = 90 + cached + written
    got = (row["prompt_tokens"], row["completion_tokens"], row["estimated"])
    assert got == (prompt, 700, 0), row
    assert (row["cache_read_tokens"], row["cache_write_tokens"]) == (cached, written), row
    if path == "/v1/chat/completions":
        (usage,) = usage_chunks(data)
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (prompt, 700), usage


def choices_answer(n: int) -> dict[str, Any]:
    return {
        "id": "c1",
        "object": "chat.completion",
        "created": 1,
        "model": "m-1",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": LONG},
                "finish_reason": "stop",
            }
            for i in range(n)
        ],
    }


# SOUND: `unreported` with n=3 is bounded by the limit times the choices (each choice's
# 1,000 tokens counted, not capped at one max_tokens), and the row is consistent: estimated,
# total = prompt + completion, spend equals the row, cost at the configured prices.
async def test_an_answer_without_usage_with_n_is_charged_every_choice(build: Build) -> None:
    up = RawUpstream(whole(choices_answer(3)), hold=False)
    gw = await build([("openai", up, {})], model=PRICES)
    secret = await create_key(gw, budget_tokens=100_000)
    await post(gw, secret, "/v1/chat/completions", CHAT | {"max_tokens": 2_000, "n": 3})
    row, _ = await charged(gw, secret)
    assert row["estimated"] == 1, row
    assert 3_000 <= row["completion_tokens"] <= 6_000, row
    cost = (row["prompt_tokens"] * 1.0 + row["completion_tokens"] * 10.0) / 1e6
    assert row["cost_usd"] == pytest.approx(cost), row


# SOUND: with a key without limits and no max_tokens (`output_sent` is UNBOUNDED), an answer
# without usage is charged its bytes at four a token, not an unbounded count.
async def test_an_unbounded_answer_without_usage_is_charged_its_bytes(build: Build) -> None:
    gw = await build([("openai", RawUpstream(whole(choices_answer(1)), hold=False), {})])
    secret = await create_key(gw)
    await post(gw, secret, "/v1/chat/completions", CHAT)
    async with asyncio.timeout(NEVER_HANG):
        await app_of(gw)[USAGE_KEY].wait_recorded(1)
    (row,) = await usage_rows(gw)
    assert row["estimated"] == 1 and 1_000 <= row["completion_tokens"] < 1_200, row
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"], row


GEMINI_NO_USAGE = {
    "candidates": [
        {"content": {"role": "model", "parts": [{"text": LONG}]}, "finishReason": "STOP"}
    ],
    "modelVersion": "m-1",
    "responseId": "r1",
}
ANTHROPIC_CACHE_ONLY = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "m-1",
    "content": [{"type": "text", "text": LONG}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"cache_read_input_tokens": 5},
}


# SOUND: the Responses translation over Gemini, Anthropic (a usage with a cache count only:
# no report) and OpenAI, answers without usage: estimated, output its bytes at four a token
# within max_output_tokens, the prompt its estimate.
@pytest.mark.parametrize("kind", ["gemini", "anthropic", "openai"])
async def test_a_translated_response_without_usage_is_estimated(build: Build, kind: str) -> None:
    answers = {
        "gemini": GEMINI_NO_USAGE,
        "anthropic": ANTHROPIC_CACHE_ONLY,
        "openai": choices_answer(1),
    }
    gw = await build([(kind, RawUpstream(whole(answers[kind]), hold=False), {})])
    secret = await create_key(gw, budget_tokens=100_000)
    body = {"model": "m", "input": "hello there " * 100, "max_output_tokens": 3_000}
    await post(gw, secret, "/v1/responses", body)
    row, _ = await charged(gw, secret)
    assert row["estimated"] == 1 and 1_000 <= row["completion_tokens"] <= 3_000, row
    assert row["prompt_tokens"] >= ESTIMATE - 10, row
