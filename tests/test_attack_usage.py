"""A hostile or broken upstream's usage: counts no request could have used are bounded by
what the request can use (its bytes and media for the prompt, its output limit for the
completion), logged, and marked estimated in the usage row, so one answer cannot drain a
key's budget. Real counts, images and reasoning included, are kept as reported."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.state import USAGE_KEY
from gateway.usage_bounds import OUTPUT_FLOOR
from tests.conftest import app_of, create_key, sse_events, usage_rows
from tests.test_attack_upstream import HI, Answer, Build, build, chunk, sse, whole

__all__ = ["build"]  # the fixture, used by name

CHAT = "/v1/chat/completions"
HUGE = 2**39  # each count at most 2**40 is read; what a hostile upstream may claim


def usage(prompt: int, completion: int, **details: Any) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        **details,
    }


def answering(counts: dict[str, Any], stream: bool) -> Answer:
    """An OpenAI upstream whose every answer ("ok") reports `counts` as its usage."""
    if stream:
        final = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m-1"}
        body = sse(
            chunk("ok"),
            json.dumps(
                final | {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            ).encode(),
            json.dumps(final | {"choices": [], "usage": counts}).encode(),
            b"[DONE]",
        )
        data = whole(body, "text/event-stream")
    else:
        answer = {
            "id": "c",
            "object": "chat.completion",
            "created": 1,
            "model": "m-1",
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
                for i in range(2)
            ],
            "usage": counts,
        }
        data = whole(json.dumps(answer).encode())

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    return answer


async def ask(rig: Any, secret: str, body: dict[str, Any]) -> dict[str, Any]:
    """One request that must be answered; the usage the client was sent."""
    async with rig.gateway.post(
        CHAT, json={"model": "m", **body}, headers={"Authorization": f"Bearer {secret}"}
    ) as resp:
        assert resp.status == 200, await resp.text()
        if body.get("stream"):
            got: dict[str, Any] = sse_events(await resp.read())[-1]["usage"]
        else:
            got = (await resp.json())["usage"]
    return got


STREAMED = {"stream": True, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_absurd_chat_usage_cannot_drain_a_budget(build: Build, stream: bool) -> None:
    counts = usage(HUGE, HUGE, prompt_tokens_details={"cached_tokens": HUGE})
    rig = await build("openai", answering(counts, stream))
    secret = await create_key(rig.gateway, budget_tokens=1_000_000)
    body = {"messages": HI, "max_tokens": 2_000, **(STREAMED if stream else {})}
    with capture_logs() as logs:
        sent = await ask(rig, secret, body)
        await app_of(rig.gateway)[USAGE_KEY].wait_recorded(1)
    assert sent["prompt_tokens"] == HUGE  # the answer is relayed as it came
    [row] = await usage_rows(rig.gateway)
    assert row["completion_tokens"] == 2_000  # the request's max_tokens
    assert 0 < row["prompt_tokens"] < 10_000  # its bytes, and what an upstream adds
    assert row["cache_read_tokens"] <= row["prompt_tokens"]
    assert row["estimated"] == 1
    [warning] = [e for e in logs if e["event"] == "upstream_usage_implausible"]
    assert warning["log_level"] == "warning"
    assert warning["prompt_tokens"] == HUGE and warning["completion_tokens"] == HUGE
    assert "hi" not in json.dumps(warning, default=str).replace("chunk", "")
    # The key's budget counted the bounded usage: it still answers.
    await ask(rig, secret, body)


async def test_real_usage_of_images_reasoning_and_choices_is_kept(build: Build) -> None:
    """An image by URL costs far more tokens than its bytes; reasoning counts within the
    output limit; `n` choices each use up to the limit: none of it is changed."""
    counts = usage(1_105, 2 * 300, completion_tokens_details={"reasoning_tokens": 500})
    rig = await build("openai", answering(counts, False))
    image = {"type": "image_url", "image_url": {"url": "https://x.test/a.png", "detail": "high"}}
    body = {
        "messages": [{"role": "user", "content": [image]}],
        "max_completion_tokens": 300,
        "n": 2,
    }
    with capture_logs() as logs:
        await ask(rig, rig.key, body)
        await app_of(rig.gateway)[USAGE_KEY].wait_recorded(1)
    [row] = await usage_rows(rig.gateway)
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (1_105, 600, 0)
    assert not [e for e in logs if e["event"] == "upstream_usage_implausible"]


async def test_usage_without_an_output_limit_is_bounded_only_by_the_prompt(build: Build) -> None:
    rig = await build("openai", answering(usage(5, 100_000), False))
    await ask(rig, rig.key, {"messages": HI})
    await app_of(rig.gateway)[USAGE_KEY].wait_recorded(1)
    [row] = await usage_rows(rig.gateway)
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (5, 100_000, 0)


async def test_a_small_output_limit_is_charged_at_most_the_floor(build: Build) -> None:
    """Completion tokens up to `OUTPUT_FLOOR` are never doubted (one comparison per answer);
    past it, a request with a smaller limit is charged the floor."""
    rig = await build("openai", answering(usage(5, HUGE), False))
    await ask(rig, rig.key, {"messages": HI, "max_tokens": 10})
    await ask(rig, rig.key, {"messages": HI, "max_tokens": 20, "n": 100})
    await app_of(rig.gateway)[USAGE_KEY].wait_recorded(2)
    rows = await usage_rows(rig.gateway)
    assert [(r["completion_tokens"], r["estimated"]) for r in rows] == [
        (OUTPUT_FLOOR, 1),
        (2_000, 1),
    ]


async def test_chunks_without_usage_are_charged_within_the_output_limit(build: Build) -> None:
    """A stream that never reports usage is charged a token a chunk (estimated); thousands
    of chunks, empty ones too, are charged no more than reported usage could be."""
    head = b'{"id":"c","object":"chat.completion.chunk","created":1,"model":"m-1","choices":'
    final = head + b'[{"index":0,"delta":{},"finish_reason":"stop"}]}'
    empty = head + b"[]}"
    data = whole(sse(*[chunk("ok")] * 3, *[empty] * 5_000, final, b"[DONE]"), "text/event-stream")

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(data)
        await writer.drain()

    rig = await build("openai", answer)
    secret = await create_key(rig.gateway, budget_tokens=1_000_000)
    async with rig.gateway.post(
        CHAT,
        json={"model": "m", "messages": HI, "stream": True, "max_tokens": 10},
        headers={"Authorization": f"Bearer {secret}"},
    ) as resp:
        assert resp.status == 200
        await resp.read()
    await app_of(rig.gateway)[USAGE_KEY].wait_recorded(1)
    [row] = await usage_rows(rig.gateway)
    assert (row["completion_tokens"], row["estimated"]) == (OUTPUT_FLOOR, 1)
