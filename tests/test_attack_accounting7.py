"""Attack on 439baa9's accounting (helper-99): `UsageTally.delta`, `closed`, `content`, `final`.

Real-shaped Anthropic streams (as the API sends them, per the `anthropic` SDK's event types:
message_start with a placeholder output count and cache fields, thinking with its
signature_delta, redacted_thinking, a server tool's use and result, text with citations_delta,
tool_use with input_json_delta, pings between, ONE closing message_delta, message_stop) through
/v1/chat/completions and /v1/messages, and the edges of the new "final count" rule. Each
failing test is a way a key is charged other than it should be; the comment above it says
what is wrong and what should happen. Passing tests pin properties verified here that no other
test covers. Harness: test_attack_accounting3's `build` and tests/raw_upstream.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests import test_attack_accounting3
from tests.conftest import create_key
from tests.raw_upstream import STREAM_HEAD, RawUpstream, sse
from tests.test_attack_accounting3 import CHAT, Build, auth, charged

build = test_attack_accounting3.build  # the fixture: a gateway over raw TCP upstreams

PATHS = ["/v1/chat/completions", "/v1/messages"]
PING = sse({"type": "ping"}, "ping")
STOP = sse({"type": "message_stop"}, "message_stop")
THOUGHT = "Let me think about this. " * 40  # 1,000 characters
ANSWER = "The answer is forty-two. " * 160  # 4,000 characters: 1,000 tokens at four a token

# As the API sends it: input and cache counts, and a placeholder output count of 1.
START_USAGE = {
    "input_tokens": 472,
    "cache_creation_input_tokens": 100,
    "cache_read_input_tokens": 200,
    "cache_creation": {"ephemeral_5m_input_tokens": 100, "ephemeral_1h_input_tokens": 0},
    "output_tokens": 1,
    "server_tool_use": None,
    "service_tier": "standard",
}
# The closing count, with the cumulative input and cache counts the API repeats now.
DELTA_USAGE = {
    "input_tokens": 472,
    "cache_creation_input_tokens": 100,
    "cache_read_input_tokens": 200,
    "output_tokens": 1_384,
    "server_tool_use": {"web_search_requests": 1},
}
PROMPT = 472 + 100 + 200


def ev(payload: dict[str, Any]) -> bytes:
    return sse(payload, payload["type"])


def start(usage: dict[str, Any] = START_USAGE) -> bytes:
    message = {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "m-1",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": usage,
    }
    return ev({"type": "message_start", "message": message})


def bstart(index: int, block: dict[str, Any]) -> bytes:
    return ev({"type": "content_block_start", "index": index, "content_block": block})


def bdelta(index: int, delta: dict[str, Any]) -> bytes:
    return ev({"type": "content_block_delta", "index": index, "delta": delta})


def bstop(index: int) -> bytes:
    return ev({"type": "content_block_stop", "index": index})


def closing(usage: dict[str, Any] | None = DELTA_USAGE, reason: str = "tool_use") -> bytes:
    payload: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": reason, "stop_sequence": None},
    }
    if usage is not None:
        payload["usage"] = usage
    return ev(payload)


CITATION = {
    "type": "web_search_result_location",
    "url": "https://example.com/",
    "title": "Example",
    "encrypted_index": "Eo8BCioIAhgBIiQ0",
    "cited_text": "forty-two",
}

# Every block type the SDK's stream events carry, pings between, up to the last block's stop.
BLOCKS = (
    PING
    + bstart(0, {"type": "thinking", "thinking": "", "signature": ""})
    + bdelta(0, {"type": "thinking_delta", "thinking": THOUGHT})
    + PING
    + bdelta(0, {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA"})
    + bstop(0)
    + bstart(1, {"type": "redacted_thinking", "data": "EmwKAhgBEgy3va3pzix/LafPsn4a"})
    + bstop(1)
    + bstart(2, {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}})
    + bdelta(2, {"type": "input_json_delta", "partial_json": '{"query": "answer"}'})
    + bstop(2)
    + bstart(
        3,
        {
            "type": "web_search_tool_result",
            "tool_use_id": "srvtoolu_1",
            "content": [
                {
                    "type": "web_search_result",
                    "url": "https://example.com/",
                    "title": "Example",
                    "encrypted_content": "EqgfCioIARgBIiQ3",
                    "page_age": None,
                }
            ],
        },
    )
    + bstop(3)
    + bstart(4, {"type": "text", "text": "", "citations": None})
    + bdelta(4, {"type": "citations_delta", "citation": CITATION})
    + bdelta(4, {"type": "text_delta", "text": ANSWER})
    + PING
    + bstop(4)
    + bstart(5, {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {}})
    + bdelta(5, {"type": "input_json_delta", "partial_json": ""})
    + bdelta(5, {"type": "input_json_delta", "partial_json": '{"q": "x"}'})
    + bstop(5)
)


def stream(tail: bytes) -> bytes:
    return STREAM_HEAD + start() + BLOCKS + tail


REAL = stream(closing() + PING + STOP)


def stream_body(path: str) -> dict[str, Any]:
    body = CHAT | {"max_tokens": 3_000, "stream": True}
    if path == "/v1/chat/completions":
        body["stream_options"] = {"include_usage": True}
    return body


async def post(gw: Any, secret: str, path: str, body: dict[str, Any]) -> bytes:
    resp = await gw.post(path, json=body, headers=auth(secret))
    data = await resp.read()
    assert resp.status == 200, data
    return data


def usage_chunks(data: bytes) -> list[dict[str, Any]]:
    found = []
    for line in data.split(b"\n"):
        if line.startswith(b"data: {"):
            payload = json.loads(line[6:])
            if payload.get("usage"):
                found.append(payload["usage"])
    return found


async def run(build: Build, path: str, reply: bytes, **model: Any) -> tuple[dict[str, Any], bytes]:
    gw = await build([("anthropic", RawUpstream(reply, hold=False), {})], model=model or None)
    secret = await create_key(gw, budget_tokens=1_000_000)
    data = await post(gw, secret, path, stream_body(path))
    row, _ = await charged(gw, secret)
    return row, data


# --- regressions: a real stream is charged exactly what it reported --------------------------


# SOUND: a real-shaped stream (every block type, signature and citations deltas, pings between
# and after the closing delta, the closing usage repeating the input and cache counts and
# carrying server_tool_use) is charged its counts exactly, on both paths, and the chat client
# that asked for usage gets it in its usage chunk.
@pytest.mark.parametrize("path", PATHS)
async def test_a_real_stream_is_charged_exactly_its_closing_count(build: Build, path: str) -> None:
    row, data = await run(build, path, REAL)
    assert row["estimated"] == 0, row
    assert (row["prompt_tokens"], row["completion_tokens"]) == (PROMPT, 1_384), row
    assert (row["cache_read_tokens"], row["cache_write_tokens"]) == (200, 100), row
    if path == "/v1/chat/completions":
        (usage,) = usage_chunks(data)
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (PROMPT, 1_384), usage
    else:
        assert data.count(b"event: message_delta") == 1, data[-400:]


# SOUND: a reasoning model's whole real stream is charged its count, not its output limit.
@pytest.mark.parametrize("path", PATHS)
async def test_a_real_reasoning_stream_is_charged_its_count_not_its_limit(
    build: Build, path: str
) -> None:
    row, _ = await run(build, path, REAL, reasoning=True)
    assert row["estimated"] == 0, row
    assert row["completion_tokens"] == 1_384, row


# SOUND: the last block's content_block_stop coming after the closing delta (an order the SDK
# accepts) is no content: the count stays final.
@pytest.mark.parametrize("path", PATHS)
async def test_a_block_stop_after_the_closing_delta_keeps_the_count_final(
    build: Build, path: str
) -> None:
    body = BLOCKS.removesuffix(bstop(5))
    reply = STREAM_HEAD + start() + body + closing() + bstop(5) + PING + STOP
    row, _ = await run(build, path, reply)
    assert row["estimated"] == 0, row
    assert row["completion_tokens"] == 1_384, row


# SOUND: a second closing delta with its own count is the count (final, exact); one without a
# count reopens it (estimated, at least what streamed).
@pytest.mark.parametrize("path", PATHS)
async def test_two_closing_deltas(build: Build, path: str) -> None:
    reply = stream(closing() + closing({"output_tokens": 1_500}) + STOP)
    row, _ = await run(build, path, reply)
    assert (row["estimated"], row["completion_tokens"]) == (0, 1_500), row


@pytest.mark.parametrize("path", PATHS)
async def test_a_countless_second_closing_delta_reopens_the_count(build: Build, path: str) -> None:
    reply = stream(closing() + closing({}) + STOP)
    row, _ = await run(build, path, reply)
    assert row["estimated"] == 1, row
    assert row["completion_tokens"] >= 1_384, row


# --- findings ---------------------------------------------------------------------------------

STREAMED = (len(THOUGHT) + len(ANSWER) + len('{"query": "answer"}') + len('{"q": "x"}') + 3) // 4


# WRONG (medium): a closing message_delta whose count is unreadable (a negative or float
# output_tokens: "unreadable upstream usage") sets `UsageTally.readable = False`, and then
# `UsageTally.cut` returns early, leaving the pipeline's estimate: the prompt at four characters
# a token (307, though message_start reported 772 readably) and one output token a chunk (5 on
# chat, 7 on /v1/messages) for 5,000+ characters of thinking, text and tool JSON. The same
# stream whose closing usage is `{}` or `{"output_tokens": null}` is charged 772 + 1,258: a
# malformed count makes a stream ~6x cheaper than a missing one. Right: an unreadable closing
# count is no report, as `usage: {}` is; the row is estimated from message_start's readable
# counts and, for output, the streamed characters at four a token (as for a cut stream).
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("count", [-1, 1.5])
async def test_an_unreadable_closing_count_is_not_cheaper_than_a_missing_one(
    build: Build, path: str, count: float
) -> None:
    row, _ = await run(build, path, stream(closing({"output_tokens": count}) + STOP))
    assert row["estimated"] == 1, row
    assert row["prompt_tokens"] >= PROMPT, row
    assert row["completion_tokens"] >= STREAMED, row


# SOUND (the baseline the test above compares with): a closing count of null is no report.
@pytest.mark.parametrize("path", PATHS)
async def test_a_null_closing_count_is_charged_the_streamed_characters(
    build: Build, path: str
) -> None:
    row, _ = await run(build, path, stream(closing({"output_tokens": None}) + STOP))
    assert row["estimated"] == 1, row
    assert (row["prompt_tokens"], row["completion_tokens"]) == (PROMPT, STREAMED), row


# WRONG (low; a judgment call): a closing message_delta of `output_tokens: 0` after 5,000+
# characters of streamed output is charged 0 output tokens, marked exact, and the chat client
# is told 0. A count of 0 for an answer that demonstrably streamed content is as implausible as
# `usage: {}` (which 8e2a967 made "no report"), and a cut stream's count so far is already
# floored at the streamed characters at four a token. Right: a final output count below what
# streamed (at least: 0 with content streamed) is taken as no report, estimated with that floor
# (or the final count floored at it and logged as `upstream_usage_implausible`).
@pytest.mark.parametrize("path", PATHS)
async def test_a_zero_closing_count_after_content_is_not_charged_zero(
    build: Build, path: str
) -> None:
    row, _ = await run(build, path, stream(closing({"output_tokens": 0}) + STOP))
    assert row["completion_tokens"] >= STREAMED, row
