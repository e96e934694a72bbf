"""How a Gemini or Anthropic stream the client cuts is charged, and one it reads to the end.

A cut stream is charged what the upstream reported so far (Gemini's running `usageMetadata`;
Anthropic's `message_start` input and cache counts, with its output the larger of the count so
far and the streamed characters at four a token), marked estimated; a stream cut before any
count keeps the pipeline's estimate; a whole stream is charged its final usage, not estimated.
The upstream is a raw TCP server that writes its bytes and then holds the connection.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient

from gateway.settings import ModelConfig, Target
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    create_key,
    provider_config,
    start_gateway,
)
from tests.raw_upstream import (
    STREAM_HEAD as HEAD,
    RawUpstream as Upstream,
    auth,
    charged,
    cut_after,
    sse as event,
)

BASE = {"anthropic": "", "gemini": ""}
PROMPT = "hello there " * 100  # 1,200 characters: ~300 tokens by the gateway's estimate


Build = Callable[[str, bytes], Awaitable[tuple[TestClient[Any, Any], str, Upstream]]]


@pytest.fixture
async def build(aiohttp_client: AiohttpClient, make_settings: MakeSettings) -> AsyncIterator[Build]:
    servers: list[asyncio.Server] = []

    async def make(kind: str, reply: bytes) -> tuple[TestClient[Any, Any], str, Upstream]:
        up = Upstream(reply)
        server = await asyncio.start_server(up.serve, "127.0.0.1", 0)
        servers.append(server)
        up.port = server.sockets[0].getsockname()[1]
        cfg = provider_config(
            kind, name="up", base_url=f"http://127.0.0.1:{up.port}", api_keys=("sk-up-0123456789",)
        )
        model = ModelConfig(name="m", targets=(Target(provider="up", model="m-1"),))
        gw = await start_gateway(aiohttp_client, make_settings(providers=(cfg,), models=(model,)))
        return gw, await create_key(gw, budget_tokens=100_000), up

    yield make
    for server in servers:
        server.close()


def request(path: str) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": PROMPT}]}
    if path == "/v1/messages":
        body["max_tokens"] = 1_000
    return body | {"stream": True}


async def read(gw: TestClient[Any, Any], secret: str, path: str, until: bytes | None) -> None:
    """Stream the request; hang up once `until` arrived (None: read to the end)."""
    if until is not None:
        await cut_after(gw, secret, path, request(path), until)
        return
    async with asyncio.timeout(NEVER_HANG):
        resp = await gw.post(path, json=request(path), headers=auth(secret))
        assert resp.status == 200, await resp.text()
        await resp.read()


def counts(row: dict[str, Any]) -> tuple[int, ...]:
    names = ("status", "estimated", "prompt_tokens", "completion_tokens")
    return tuple(row[n] for n in (*names, "cache_read_tokens", "cache_write_tokens"))


# --- Anthropic -----------------------------------------------------------------------------

START = {
    "type": "message_start",
    "message": {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m-1",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {
            "input_tokens": 900,
            "output_tokens": 1,
            "cache_read_input_tokens": 40,
            "cache_creation_input_tokens": 60,
        },
    },
}
BLOCK = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}


def delta(text: str) -> bytes:
    payload = {"type": "content_block_delta", "index": 0}
    payload["delta"] = {"type": "text_delta", "text": text}  # type: ignore[assignment]
    return event(payload, "content_block_delta")


ANTHROPIC_BEGUN = (
    HEAD
    + event(START, "message_start")
    + event(BLOCK, "content_block_start")
    + delta("alpha " * 100)  # 600 characters: 150 tokens at four a token
    + delta("omega " * 100)
)
PATHS = ["/v1/chat/completions", "/v1/messages"]


@pytest.mark.parametrize("path", PATHS)
async def test_a_cut_anthropic_stream_is_charged_message_starts_counts_and_its_streamed_text(
    build: Build, path: str
) -> None:
    gw, secret, up = await build("anthropic", ANTHROPIC_BEGUN)
    await read(gw, secret, path, b"omega omega")
    await asyncio.wait_for(up.closed.wait(), NEVER_HANG)
    row, spent = await charged(gw, secret)
    # Input, cache reads and writes as message_start said; output estimated: 1,200 characters.
    assert counts(row) == (499, 1, 1_000, 300, 40, 60), row
    assert spent == 1_000 + 300


@pytest.mark.parametrize("path", PATHS)
async def test_a_cut_anthropic_stream_keeps_a_larger_reported_output_count(
    build: Build, path: str
) -> None:
    start = json.loads(json.dumps(START))
    start["message"]["usage"]["output_tokens"] = 700  # more than its 300 estimated
    reply = HEAD + event(start, "message_start") + event(BLOCK, "content_block_start")
    gw, secret, up = await build("anthropic", reply + delta("alpha " * 200) + delta("omega"))
    await read(gw, secret, path, b"omega")
    await asyncio.wait_for(up.closed.wait(), NEVER_HANG)
    row, _ = await charged(gw, secret)
    assert counts(row) == (499, 1, 1_000, 700, 40, 60), row


@pytest.mark.parametrize("path", PATHS)
async def test_a_whole_anthropic_stream_is_charged_its_final_usage(build: Build, path: str) -> None:
    end = {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn", "stop_sequence": None},
        "usage": {"output_tokens": 7},
    }
    reply = (
        ANTHROPIC_BEGUN
        + event({"type": "content_block_stop", "index": 0}, "content_block_stop")
        + event(end, "message_delta")
        + event({"type": "message_stop"}, "message_stop")
    )
    gw, secret, _ = await build("anthropic", reply)
    await read(gw, secret, path, None)
    row, spent = await charged(gw, secret)
    assert counts(row) == (200, 0, 1_000, 7, 40, 60), row
    assert spent == 1_007


@pytest.mark.parametrize("path", PATHS)
async def test_an_anthropic_stream_cut_before_message_start_keeps_the_estimate(
    build: Build, path: str
) -> None:
    """Nothing reached the client (the answer is held until its content): it gives up."""
    gw, secret, up = await build("anthropic", HEAD + event({"type": "ping"}, "ping"))
    headers = {"Authorization": f"Bearer {secret}"}
    task = asyncio.create_task(gw.post(path, json=request(path), headers=headers))
    await asyncio.wait_for(up.seen.wait(), NEVER_HANG)
    task.cancel()
    await asyncio.wait_for(up.closed.wait(), NEVER_HANG)
    row, _ = await charged(gw, secret)
    assert (row["status"], row["estimated"], row["completion_tokens"]) == (499, 1, 0), row
    assert 300 <= row["prompt_tokens"] < 900, row  # the prompt's estimate, not a count
    assert (row["cache_read_tokens"], row["cache_write_tokens"]) == (0, 0)


# --- Gemini --------------------------------------------------------------------------------


def gemini_chunk(text: str, usage: dict[str, int] | None) -> bytes:
    chunk: dict[str, Any] = {
        "candidates": [{"content": {"role": "model", "parts": [{"text": text}]}}],
        "modelVersion": "m-1",
        "responseId": "r1",
    }
    if usage is not None:
        chunk["usageMetadata"] = usage
    return event(chunk)


async def test_a_cut_gemini_stream_is_charged_its_last_running_count_as_estimated(
    build: Build,
) -> None:
    first = {"promptTokenCount": 900, "candidatesTokenCount": 40, "totalTokenCount": 940}
    last = {"promptTokenCount": 900, "candidatesTokenCount": 90, "totalTokenCount": 990}
    reply = HEAD + gemini_chunk("first ", first) + gemini_chunk("second ", last)
    gw, secret, up = await build("gemini", reply)
    await read(gw, secret, "/v1/chat/completions", b"second")
    await asyncio.wait_for(up.closed.wait(), NEVER_HANG)
    row, spent = await charged(gw, secret)
    assert counts(row) == (499, 1, 900, 90, 0, 0), row
    assert spent == 990


async def test_a_cut_gemini_stream_without_usage_keeps_the_estimate(build: Build) -> None:
    reply = HEAD + gemini_chunk("first ", None) + gemini_chunk("second ", None)
    gw, secret, up = await build("gemini", reply)
    await read(gw, secret, "/v1/chat/completions", b"second")
    await asyncio.wait_for(up.closed.wait(), NEVER_HANG)
    row, _ = await charged(gw, secret)
    assert (row["status"], row["estimated"], row["completion_tokens"]) == (499, 1, 2), row
    assert 300 <= row["prompt_tokens"] < 900, row
