"""Attack on 6771994's accounting (helper-97): `pipeline.unreported`, the reasoning rule on
answers without usage, `UsageTally.delta`, `_gave_up`'s per-attempt output.

Each failing test is a way the accounting charges a key other than the documented (or
reasonable) amount; the comment above it says what is wrong and what should happen. The
passing tests pin properties verified here that no other test covers. The harness is
test_attack_accounting3's `build` (a gateway over raw TCP upstreams) and tests/raw_upstream.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from gateway.settings import RoutingSettings
from tests import test_attack_accounting3
from tests.conftest import NEVER_HANG, create_key
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
    message_delta,
    start_with,
    text_delta,
    whole,
)

build = test_attack_accounting3.build  # the fixture: a gateway over raw TCP upstreams

LONG = "word " * 800  # 4,000 characters: 1,000 tokens at four characters a token


async def post(gw: Any, secret: str, path: str, body: dict[str, Any]) -> bytes:
    async with asyncio.timeout(NEVER_HANG):
        resp = await gw.post(path, json=body, headers=auth(secret))
        data = await resp.read()
        assert resp.status == 200, data
        return data


# --- (a) whole answers without usage: the paths `pipeline.unreported` misses ----------------


# WRONG: 6771994 charges "any whole answer without usage" its bytes at four a token
# (`pipeline.unreported`), but only the chat, translated Responses and translated Messages
# handlers call it. A legacy completion (`/v1/completions`, non-streaming) from an upstream
# that reports no usage is charged the prompt's estimate and 0 completion tokens, though it
# wrote 4,000 characters of text (a completions upstream without usage is the common case for
# older vLLM/TGI-style servers). Right: `create_completion` calls `unreported` as chat does
# (output estimated from the answer's bytes, bounded as usual), the row estimated.
async def test_a_legacy_completion_without_usage_is_charged_its_output(build: Build) -> None:
    answer = {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1,
        "model": "m-1",
        "choices": [{"text": LONG, "index": 0, "logprobs": None, "finish_reason": "stop"}],
    }
    gw = await build([("openai", RawUpstream(whole(answer), hold=False), {})])
    secret = await create_key(gw, budget_tokens=100_000)
    body = {"model": "m", "prompt": "hello there " * 100, "max_tokens": 3_000}
    await post(gw, secret, "/v1/completions", body)
    row, _ = await charged(gw, secret)
    assert row["estimated"] == 1, row
    assert row["completion_tokens"] >= 1_000, row


# WRONG, the same on the Responses pass-through (`responses_api = true`): a `response` without
# `usage` is charged 0 completion tokens (`_pass_through` never calls `unreported`). Right:
# its output estimated from its bytes, as the translated Responses path now does.
async def test_a_passed_through_response_without_usage_is_charged_its_output(
    build: Build,
) -> None:
    answer = {
        "id": "resp_1",
        "object": "response",
        "created_at": 1,
        "status": "completed",
        "model": "m-1",
        "output": [
            {
                "type": "message",
                "id": "msg_1",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": LONG, "annotations": []}],
            }
        ],
    }
    up = RawUpstream(whole(answer), hold=False)
    gw = await build([("openai", up, {"responses_api": True})])
    secret = await create_key(gw, budget_tokens=100_000)
    body = {"model": "m", "input": "hello there " * 100, "max_output_tokens": 3_000}
    await post(gw, secret, "/v1/responses", body)
    assert up.paths == ["/v1/responses"], up.paths  # it was passed through
    row, _ = await charged(gw, secret)
    assert row["estimated"] == 1, row
    assert row["completion_tokens"] >= 1_000, row


ANTHROPIC_EMPTY_USAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "m-1",
    "content": [{"type": "text", "text": LONG}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {},
}


# WRONG: an Anthropic(-compatible) answer whose `usage` object holds no counts (`{}`: no
# input_tokens, no output_tokens) is taken as reported usage of 0 and 0 (`openai_usage` turns
# each missing count into 0), with `estimated = 0`: the row says "exact", the key is charged
# nothing for 4,000 characters of answer, on the /v1/messages pass-through and on chat
# (translated) alike, and `unreported` never runs (the reply's usage is not None). Right: a
# usage without `input_tokens`/`output_tokens` is no report: the row estimated, the prompt's
# estimate and the answer's bytes at four a token (as `UsageTally.cut` already refuses to
# take a `message_start` without `input_tokens` as counts).
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
async def test_an_anthropic_answer_with_an_empty_usage_is_not_charged_zero(
    build: Build, path: str
) -> None:
    gw = await build([("anthropic", RawUpstream(whole(ANTHROPIC_EMPTY_USAGE), hold=False), {})])
    secret = await create_key(gw, budget_tokens=100_000)
    await post(gw, secret, path, CHAT | {"max_tokens": 3_000})
    row, _ = await charged(gw, secret)
    assert row["estimated"] == 1, row
    assert row["prompt_tokens"] >= ESTIMATE, row
    assert row["completion_tokens"] >= 1_000, row


# --- (b) `unreported` past the limit the upstream was sent ----------------------------------

OPENAI_NO_USAGE = {
    "id": "c1",
    "object": "chat.completion",
    "created": 1,
    "model": "m-1",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi there"},
            # what an answer asked for with logprobs carries: thousands of bytes a token
            "logprobs": {
                "content": [
                    {
                        "token": "Hi",
                        "logprob": -0.1,
                        "bytes": [72, 105],
                        "top_logprobs": [
                            {"token": f"t{i}", "logprob": -1.0, "bytes": [116, 48 + i % 10]}
                            for i in range(20)
                        ],
                    }
                ]
                * 4
            },
            "finish_reason": "stop",
        }
    ],
}


# WRONG: `unreported` charges a whole answer without usage its JSON's bytes at four a token,
# bounded only by `completion_charged`, which is never below OUTPUT_FLOOR (1,024): the floor
# under which *reported* counts go unquestioned. So a request sent with max_tokens 10 whose
# answer carries logprobs (about 4 KB of JSON for 4 tokens; any upstream padding its JSON
# does the same) is charged about 1,000 completion tokens, 100 times the limit it was sent and
# held at admission: that is past "one request's actual usage" (docs/keys.md, the bound on
# overspend), and the upstream could not have billed more than 10. Right: an estimate of the
# gateway's own is never above the output limit the upstream was sent (`output_sent`, times
# the choices), the floor being for reported counts only.
async def test_an_answer_without_usage_is_not_charged_past_its_output_limit(
    build: Build,
) -> None:
    gw = await build([("openai", RawUpstream(whole(OPENAI_NO_USAGE), hold=False), {})])
    secret = await create_key(gw, budget_tokens=100_000)
    body = CHAT | {"max_tokens": 10, "logprobs": True, "top_logprobs": 20}
    await post(gw, secret, "/v1/chat/completions", body)
    row, _ = await charged(gw, secret)
    assert row["estimated"] == 1, row
    assert row["completion_tokens"] <= 10, row


# --- (c) what was verified sound ------------------------------------------------------------

EMBEDDINGS_NO_USAGE = {
    "object": "list",
    "model": "m-1",
    "data": [{"object": "embedding", "index": 0, "embedding": [0.125] * 3_000}],
}


# SOUND: an embeddings answer without usage (a 3,000-float vector, ~20 KB of JSON) is charged
# the prompt's estimate and no output: its vectors are not counted as output tokens.
async def test_an_embeddings_answer_without_usage_is_not_charged_its_vectors(
    build: Build,
) -> None:
    gw = await build([("openai", RawUpstream(whole(EMBEDDINGS_NO_USAGE), hold=False), {})])
    secret = await create_key(gw, budget_tokens=100_000)
    await post(gw, secret, "/v1/embeddings", {"model": "m", "input": "hello there " * 100})
    row, _ = await charged(gw, secret)
    assert row["completion_tokens"] == 0, row
    assert row["prompt_tokens"] < 400, row


def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    return sse(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m-1",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
    )


# SOUND: a reasoning model's completed stream (finish_reason and [DONE]) from an upstream that
# never sends a usage chunk is charged the output limit it was sent (3,000), marked estimated,
# and the row is consistent (total, spend, cost at the configured prices).
async def test_a_completed_reasoning_stream_without_usage_is_charged_its_limit(
    build: Build,
) -> None:
    reply = STREAM_HEAD + chunk({"content": "Hi"}) + chunk({}, "stop") + b"data: [DONE]\n\n"
    gw = await build(
        [("openai", RawUpstream(reply, hold=False), {})], model={"reasoning": True, **PRICES}
    )
    secret = await create_key(gw, budget_tokens=100_000)
    await post(gw, secret, "/v1/chat/completions", CHAT | {"max_tokens": 3_000, "stream": True})
    row, _ = await charged(gw, secret)
    got = (row["status"], row["prompt_tokens"], row["completion_tokens"], row["estimated"])
    assert got == (200, ESTIMATE, 3_000, 1), row
    assert row["cost_usd"] == pytest.approx((ESTIMATE * 1.0 + 3_000 * 10.0) / 1e6), row


ANTHROPIC_WHOLE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "m-1",
    "content": [{"type": "text", "text": "Hi"}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 90, "output_tokens": 700},
}


# SOUND: since the pass-through accounts at `message_stop` only, a whole /v1/messages stream
# and a non-streaming /v1/messages answer of a reasoning model are still charged exactly the
# upstream's counts, unestimated (neither the reasoning rule nor the floors touch them), and a
# stream with a second `message_delta` (no stop_reason) after the closing one keeps the
# merged, later count.
@pytest.mark.parametrize("shape", ["stream", "json", "two_deltas"])
async def test_a_whole_passed_through_message_is_charged_exactly(build: Build, shape: str) -> None:
    stream = (
        STREAM_HEAD
        + start_with({"input_tokens": 90, "output_tokens": 1})
        + block_start(0, {"type": "text", "text": ""})
        + text_delta(0, "Hi")
        + block_stop(0)
        + message_delta(600 if shape == "two_deltas" else 700)
    )
    if shape == "two_deltas":
        later = {"type": "message_delta", "delta": {"stop_reason": None}}
        stream += sse(later | {"usage": {"output_tokens": 700}}, "message_delta")
    stream += sse({"type": "message_stop"}, "message_stop")
    reply = whole(ANTHROPIC_WHOLE) if shape == "json" else stream
    gw = await build([("anthropic", RawUpstream(reply, hold=False), {})], model={"reasoning": True})
    secret = await create_key(gw, budget_tokens=100_000)
    body = CHAT | {"max_tokens": 3_000, "stream": shape != "json"}
    await post(gw, secret, "/v1/messages", body)
    row, _ = await charged(gw, secret)
    got = (row["status"], row["prompt_tokens"], row["completion_tokens"], row["estimated"])
    assert got == (200, 90, 700, 0), row


# SOUND: failover across an Anthropic and an OpenAI route, both given up on (each took the
# prompt and said nothing until the timeout): each attempt is charged the prompt's estimate
# and the output limit it was itself sent (Anthropic's 1,000 + 4,096 of thinking on top,
# OpenAI's 1,000), and the row is consistent: total = prompt + completion, estimated, the
# budget's spend equals it, cost_usd the counts at the configured prices.
async def test_attempts_given_up_on_across_providers_charge_each_its_own_limit(
    build: Build,
) -> None:
    quick = {"read_timeout": 0.3, "total_timeout": 0.3}
    anthropic, openai = RawUpstream(b""), RawUpstream(b"")
    gw = await build(
        [("anthropic", anthropic, quick), ("openai", openai, quick)],
        model={"reasoning": True, "max_tokens": 1_000, **PRICES},
        routing=RoutingSettings(max_attempts=2, backoff_initial=0.0),
    )
    secret = await create_key(gw, budget_tokens=100_000)
    async with asyncio.timeout(NEVER_HANG):
        body = CHAT | {"reasoning_effort": "high"}
        resp = await gw.post("/v1/chat/completions", json=body, headers=auth(secret))
        assert resp.status == 504, await resp.text()
    (sent_a,) = anthropic.bodies
    (sent_o,) = openai.bodies
    limits = sent_a["max_tokens"] + sent_o.get("max_completion_tokens", sent_o.get("max_tokens"))
    assert limits == 1_000 + 4_096 + 1_000, (sent_a, sent_o)
    row, _ = await charged(gw, secret)
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (
        2 * ESTIMATE,
        limits,
        1,
    ), row
    assert row["cost_usd"] == pytest.approx((2 * ESTIMATE * 1.0 + limits * 10.0) / 1e6), row


OPENAI_WHOLE = {
    "id": "c1",
    "object": "chat.completion",
    "created": 1,
    "model": "m-1",
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 90, "completion_tokens": 700, "total_tokens": 790},
}
JSON_ANSWERS = {
    "openai": OPENAI_WHOLE,
    "anthropic": ANTHROPIC_WHOLE,
    "gemini": test_attack_accounting3.GEMINI_DONE,
}


# SOUND: a whole JSON answer of a reasoning model with its usage, on each provider and on
# chat, the translated Responses API and translated /v1/messages (OpenAI), is charged exactly
# the upstream's counts (90 < the prompt's estimate), unestimated: `unreported` and the
# reasoning rule leave an answer with usage alone.
@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses", "/v1/messages"])
async def test_a_whole_json_answer_with_usage_is_charged_exactly(
    build: Build, kind: str, path: str
) -> None:
    up = RawUpstream(whole(JSON_ANSWERS[kind]), hold=False)
    gw = await build([(kind, up, {})], model={"reasoning": True})
    secret = await create_key(gw, budget_tokens=100_000)
    body: dict[str, Any] = CHAT | {"max_tokens": 3_000}
    if path == "/v1/responses":
        body = {"model": "m", "input": "hello there " * 100, "max_output_tokens": 3_000}
    await post(gw, secret, path, body)
    row, _ = await charged(gw, secret)
    got = (row["status"], row["prompt_tokens"], row["completion_tokens"], row["estimated"])
    assert got == (200, 90, 700, 0), row
