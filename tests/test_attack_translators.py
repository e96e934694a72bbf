"""The Anthropic and Gemini translations (chat and the Responses API, JSON and streamed)
attacked from outside by a hostile upstream on a raw socket (`test_attack_upstream`'s rig):
usage counts that would give a key its budget back or wedge the usage writer, and events out
of order or of the wrong shape. The client always gets an answer its SDK parses or an
OpenAI-shaped error, and the gateway keeps serving and accounting."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import openai
import pytest
from structlog.testing import capture_logs

from gateway.state import GATE_KEY, KEYS_KEY
from tests.conftest import app_of, create_key, openai_client, usage_rows
from tests.test_attack_upstream import (
    ANTHROPIC_START,
    ANTHROPIC_TEXT_START,
    HI,
    Build,
    MiB,
    Rig,
    anthropic_text,
    build,
    chunk,
    http,
    named_events,
    peak_growth,
    sends,
    sse,
    until_close,
    whole,
)

__all__ = ["build"]  # the fixture, used here by name

# --- Usage counts no upstream can mean --------------------------------------------------------

BAD_COUNTS = {
    "negative": -100_000,
    "past-bound": 2**40 + 1,  # a thousand of 2**53 overflow a Redis counter
    "past-sqlite": 2**63,
    "huge": 10**30,
    "float": 1.5,
    "str": "7",
}


def anthropic_answer(output_tokens: Any, stream: bool) -> bytes:
    usage = {"input_tokens": 5, "output_tokens": output_tokens}
    if not stream:
        message = {**ANTHROPIC_START["message"], "content": [{"type": "text", "text": "hi"}]}
        return whole(json.dumps({**message, "stop_reason": "end_turn", "usage": usage}).encode())
    end = {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage}
    events = [ANTHROPIC_START, ANTHROPIC_TEXT_START, anthropic_text("hi"), end]
    return until_close(named_events([*events, {"type": "message_stop"}]))


def gemini_answer(candidates_tokens: Any, stream: bool) -> bytes:
    answer = {
        "candidates": [{"content": {"role": "model", "parts": [{"text": "hi"}]}}],
        "usageMetadata": {"promptTokenCount": 5, "candidatesTokenCount": candidates_tokens},
    }
    answer["candidates"][0]["finishReason"] = "STOP"
    data = json.dumps(answer).encode()
    return until_close(sse(data)) if stream else whole(data)


ANSWERS = {"anthropic": anthropic_answer, "gemini": gemini_answer}


async def spent_tokens(rig: Rig) -> int:
    app = app_of(rig.gateway)
    record = app[KEYS_KEY].lookup(rig.key)
    assert record is not None
    spend = await app[GATE_KEY].spending(record)
    assert spend is not None
    return spend.tokens


async def text_of(rig: Rig, api: str, stream: bool) -> str:
    """The answer's text as the SDK reads it, from chat completions or the Responses API."""
    if api == "chat":
        result = await rig.sdk(stream=stream)
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in result if c.choices)
        return str(result.choices[0].message.content)
    rig.kind = "responses"  # (only chooses the SDK call: the upstream stays translated)
    try:
        result = await rig.sdk(stream=stream)
    finally:
        rig.kind = "translated"
    if stream:
        return "".join(e.delta for e in result if e.type == "response.output_text.delta")
    return str(result.output_text)


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("count", list(BAD_COUNTS))
@pytest.mark.parametrize("kind", list(ANSWERS))
async def test_a_usage_count_no_upstream_can_mean_is_estimated_not_believed(
    build: Build, kind: str, count: str, stream: bool, api: str
) -> None:
    # A negative count was believed: the key's budget went down (it got tokens back), and
    # the row said so. A count past SQLite's integers made every write of the usage batch
    # fail (`usage_write_failed`), so no row of any client was written after it. A float or
    # string one made a good answer a 502. Now: the answer is relayed, the row estimated.
    answer = ANSWERS[kind](BAD_COUNTS[count], stream)
    rig = await build(kind, sends(answer))
    rig.key = await create_key(rig.gateway, budget_tokens=1_000_000)
    with capture_logs() as logs:
        assert await text_of(rig, api, stream) == "hi"
        [row] = await usage_rows(rig.gateway)
    assert "upstream_usage_unreadable" in [e["event"] for e in logs]
    assert not [e for e in logs if e["log_level"] == "error"], logs
    assert (row["status"], row["estimated"]) == (200, 1)
    assert 0 < row["prompt_tokens"] < 1000 and 0 <= row["completion_tokens"] < 1000
    assert await spent_tokens(rig) == row["prompt_tokens"] + row["completion_tokens"]


@pytest.mark.parametrize("kind", list(ANSWERS))
async def test_a_stream_with_unreadable_usage_sends_no_usage_chunk(build: Build, kind: str) -> None:
    # The client asked for usage; made-up numbers are not usage, so it gets none (the SDK
    # reads a stream without its usage chunk), rather than a negative total.
    rig = await build(kind, sends(ANSWERS[kind](-5, True)))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    status, out = await rig.post(
        "/v1/chat/completions", {**body, "stream_options": {"include_usage": True}}
    )
    assert status == 200 and out.endswith(b"data: [DONE]\n\n"), out
    # (A count is written ":-5"; an id may hold "-5".)
    assert b'"usage":{' not in out and b":-5" not in out


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("kind", list(ANSWERS))
async def test_good_usage_is_still_believed(build: Build, kind: str, stream: bool) -> None:
    rig = await build(kind, sends(ANSWERS[kind](7, stream)))
    assert await text_of(rig, "chat", stream) == "hi"
    [row] = await usage_rows(rig.gateway)
    assert (row["prompt_tokens"], row["completion_tokens"], row["estimated"]) == (5, 7, 0)


# --- The Responses API holds the whole answer it streams ---------------------------------------

PIECE = "x" * 65536


def endless_text(kind: str) -> bytes:
    """One event of text in the shape `kind` streams it."""
    if kind == "anthropic":
        return named_events([anthropic_text(PIECE)])
    if kind == "gemini":
        part = {"candidates": [{"content": {"role": "model", "parts": [{"text": PIECE}]}}]}
        return sse(json.dumps(part).encode())
    return sse(chunk(PIECE))


def streams_text(kind: str, pieces: int) -> Any:
    """A stream of `pieces` events of 64 KiB of text, each written when the last is taken."""

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(http("200 OK", {"Content-Type": "text/event-stream", "Connection": "close"}))
        if kind == "anthropic":
            writer.write(named_events([ANTHROPIC_START, ANTHROPIC_TEXT_START]))
        event = endless_text(kind)
        for _ in range(pieces):
            writer.write(event)
            await writer.drain()
        writer.close()

    return answer


@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini"])
async def test_a_responses_stream_holds_no_more_of_the_answer_than_max_response_bytes(
    build: Build, kind: str
) -> None:
    # `output_text.done` and `response.completed` repeat the whole text, so the gateway keeps
    # it as it streams: an upstream that never stopped made it keep all of it (three copies
    # at the end), past every limit a whole answer has.
    rig = await build(kind, streams_text(kind, 128), max_response_bytes=MiB)
    rig.kind = "responses"  # (the SDK's call: the upstream stays a chat one)
    events, growth = await peak_growth(rig.sdk(stream=True))
    assert events[-1].type == "error", [e.type for e in events[-3:]]
    assert "max_response_bytes" in events[-1].message
    # Without the bound: the 8 MiB answer in the SDK's events, in the gateway's parts, and
    # three times more at the end. With it, 3.5 to 7.5 MiB was seen (read-ahead included).
    assert growth < 12 * MiB, f"{growth / MiB:.1f} MiB"


# --- Anthropic's JSON mode holds a wrapped answer until its block ends -------------------------

ARRAY_FORMAT: Any = {
    "type": "json_schema",
    "json_schema": {"name": "list", "schema": {"type": "array", "items": {"type": "string"}}},
}
JSON_TOOL_START = {
    "type": "content_block_start",
    "index": 0,
    "content_block": {"type": "tool_use", "id": "toolu_1", "name": "json_tool_call", "input": {}},
}


def json_piece(partial: str) -> dict[str, Any]:
    delta = {"type": "input_json_delta", "partial_json": partial}
    return {"type": "content_block_delta", "index": 0, "delta": delta}


def streams_json(pieces: int) -> Any:
    """The forced JSON tool's block, opened and never closed: `pieces` deltas of 64 KiB of
    partial JSON, each written when the last is taken."""

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(http("200 OK", {"Content-Type": "text/event-stream", "Connection": "close"}))
        writer.write(named_events([ANTHROPIC_START, JSON_TOOL_START]))
        event = named_events([json_piece(PIECE)])
        for _ in range(pieces):
            writer.write(event)
            await writer.drain()
        writer.close()

    return answer


async def json_mode(rig: Rig) -> tuple[list[str], openai.APIError | None]:
    """A streamed chat request for a JSON array, through the SDK: its content deltas, and the
    error that ended it, an HTTP status before any chunk or an error event after (None: it
    ended normally)."""
    seen: list[str] = []
    async with openai_client(rig.gateway, rig.key) as client:
        try:
            stream = await client.chat.completions.create(
                model="m", messages=HI, stream=True, response_format=ARRAY_FORMAT
            )
            async for chunk_ in stream:
                seen.extend(c.delta.content for c in chunk_.choices if c.delta.content)
        except openai.APIError as exc:
            return seen, exc
    return seen, None


async def test_a_wrapped_json_answer_holds_no_more_than_max_response_bytes(build: Build) -> None:
    # A schema that is not an object is wrapped (`{"values": ...}`), so its answer can only be
    # unwrapped whole: the pieces were held until the block ended. An upstream that never
    # ended it made the gateway hold all it sent (the stream ended only when it hung up).
    rig = await build("anthropic", streams_json(512), max_response_bytes=MiB)
    (seen, error), growth = await peak_growth(json_mode(rig))
    assert seen == [] and error is not None
    assert "max_response_bytes" in error.message, error.message
    # Without the bound, 35 MiB was seen: the 32 MiB sent, all held. With it, 4.5 MiB (1 MiB
    # held, the rest read-ahead).
    assert growth < 8 * MiB, f"{growth / MiB:.1f} MiB"


async def test_a_wrapped_json_answer_within_the_limit_is_unwrapped(build: Build) -> None:
    pieces = [json_piece(p) for p in ['{"val', 'ues": ["a", ', '"b"]}']]
    end = {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {}}
    events = [ANTHROPIC_START, JSON_TOOL_START, *pieces, {"type": "content_block_stop", "index": 0}]
    body = named_events([*events, end, {"type": "message_stop"}])
    rig = await build("anthropic", sends(until_close(body)), max_response_bytes=MiB)
    seen, error = await json_mode(rig)
    assert (seen, error) == (['["a","b"]'], None)
