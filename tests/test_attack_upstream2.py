"""What the earlier upstream attacks left alone, attacked by a hostile upstream on a raw socket
(`test_attack_upstream`'s rig): the vectors of `/v1/embeddings` (OpenAI-compatible pass-through
and Gemini's `batchEmbedContents`), the order of the events `/v1/messages` relays, the choices
and usage of Gemini's answers, and what a stream holds before its first content. The client
gets an answer its SDK (`openai`, or `anthropic` on `/v1/messages`) parses or an
OpenAI-shaped error, and the gateway keeps serving and accounting.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import struct
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import openai_client, usage_rows
from tests.test_attack_upstream import (
    ANTHROPIC_START,
    ANTHROPIC_TEXT_START,
    HI,
    Build,
    MiB,
    anthropic_text,
    build,
    http,
    named_events,
    peak_growth,
    sends,
    until_close,
    whole,
)
from tests.test_messages import anthropic_client

__all__ = ["build"]  # the fixture, used here by name

INPUTS = ["a", "b", "c"]


def b64(*values: float) -> str:
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode()


def openai_vectors(vectors: list[Any]) -> bytes:
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    usage = {"prompt_tokens": 3, "total_tokens": 3}
    body = {"object": "list", "data": data, "model": "m-1", "usage": usage}
    return whole(json.dumps(body).replace('"INF"', "1e999").encode())


def gemini_vectors(vectors: list[Any]) -> bytes:
    body = {"embeddings": [{"values": v} for v in vectors]}
    return whole(json.dumps(body).replace('"INF"', "1e999").encode())


# --- Embeddings: vectors that do not answer the inputs -----------------------------------------

BAD_VECTORS: dict[str, list[Any]] = {
    "fewer": [[0.1, 0.2], [0.3, 0.4]],
    "more": [[0.1, 0.2]] * 4,
    "mixed-lengths": [[0.1, 0.2], [0.3], [0.5, 0.6]],
    "empty": [[], [], []],
    "inf": [[0.1, "INF"], [0.3, 0.4], [0.5, 0.6]],
    "past-float32": [[0.1, 1e39], [0.3, 0.4], [0.5, 0.6]],
    "string-number": [[0.1, "x"], [0.3, 0.4], [0.5, 0.6]],
    "null-number": [[0.1, None], [0.3, 0.4], [0.5, 0.6]],
    "not-base64": ["a!b", b64(1, 2), b64(1, 2)],
    "base64-nan": [b64(math.nan, 1), b64(1, 2), b64(1, 2)],
    "base64-odd-bytes": [base64.b64encode(b"abcde").decode(), b64(1), b64(1)],
    "base64-mixed-lengths": [b64(1, 2), b64(1), b64(1, 2)],
}
GEMINI_BAD = ["fewer", "more", "mixed-lengths", "empty", "inf", "past-float32", "null-number"]


@pytest.mark.parametrize("encoding", ["float", "base64"])
@pytest.mark.parametrize(
    ("kind", "bad"),
    [("openai", bad) for bad in BAD_VECTORS] + [("gemini", bad) for bad in GEMINI_BAD],
)
async def test_vectors_that_do_not_answer_the_inputs_are_a_502(
    build: Build, kind: str, bad: str, encoding: Any
) -> None:
    # Relayed as they were (pass-through) or re-encoded (Gemini), a missing or extra vector
    # paired every later input with another's vector, and vectors of mixed lengths, with
    # `1e999` (inf to every JSON reader), strings or nulls reached the client as a 200.
    answer = (openai_vectors if kind == "openai" else gemini_vectors)(BAD_VECTORS[bad])
    rig = await build(kind, sends(answer))
    async with openai_client(rig.gateway, rig.key) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.embeddings.create(model="m", input=INPUTS, encoding_format=encoding)
    assert caught.value.status_code == 502
    assert caught.value.body["code"] == "upstream_bad_response"  # type: ignore[index]
    [row] = await usage_rows(rig.gateway)
    assert row["status"] == 502 and row["prompt_tokens"] >= 0


async def test_indexes_that_are_not_the_inputs_are_a_502(build: Build) -> None:
    body = json.loads(openai_vectors([[0.1], [0.2], [0.3]]).split(b"\r\n\r\n", 1)[1])
    body["data"][2]["index"] = 0  # two vectors for the first input, none for the last
    rig = await build("openai", sends(whole(json.dumps(body).encode())))
    status, out = await rig.post("/v1/embeddings", {"model": "m", "input": INPUTS})
    assert status == 502 and b"indexes" in out, out


@pytest.mark.parametrize("asked", ["float", "base64", None])
@pytest.mark.parametrize("sent", ["float", "base64"])
async def test_vectors_reach_the_client_in_the_encoding_it_asked_for(
    build: Build, sent: str, asked: str | None
) -> None:
    # An upstream that ignores `encoding_format` answered base64 strings to a client that asked
    # for floats (the SDK handed them on as strings), or floats to one that asked for base64.
    values = [[0.5, -1.25], [2.0, 0.0], [1.0, 3.5]]
    vectors: list[Any] = values if sent == "float" else [b64(*v) for v in values]
    rig = await build("openai", sends(openai_vectors(vectors)))
    body: dict[str, Any] = {"model": "m", "input": INPUTS}
    if asked is not None:
        body["encoding_format"] = asked
    status, out = await rig.post("/v1/embeddings", body)
    assert status == 200, out
    data = json.loads(out)["data"]
    if asked == "base64":
        assert [item["embedding"] for item in data] == [b64(*v) for v in values]
    else:
        assert [item["embedding"] for item in data] == values
    assert json.loads(out)["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    async with openai_client(rig.gateway, rig.key) as client:  # (the SDK asks for base64)
        answer = await client.embeddings.create(model="m", input=INPUTS)
    assert [item.embedding for item in answer.data] == values


async def test_a_good_answer_is_relayed_byte_for_byte(build: Build) -> None:
    answer = openai_vectors([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]])
    rig = await build("openai", sends(answer))
    status, out = await rig.post("/v1/embeddings", {"model": "m", "input": INPUTS})
    assert status == 200 and out == answer.split(b"\r\n\r\n", 1)[1]


# --- /v1/messages: events out of the order the Messages API promises ---------------------------

BLOCK_STOP = {"type": "content_block_stop", "index": 0}
MESSAGE_END = [
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}},
    {"type": "message_stop"},
]
TEXT_AT_5 = {**anthropic_text("x"), "index": 5}
OUT_OF_ORDER: dict[str, list[dict[str, Any]]] = {
    "delta-before-message-start": [anthropic_text("hi"), ANTHROPIC_START, *MESSAGE_END],
    "block-never-started": [ANTHROPIC_START, anthropic_text("hi"), *MESSAGE_END],
    "delta-for-another-block": [
        ANTHROPIC_START,
        ANTHROPIC_TEXT_START,
        anthropic_text("hi"),
        TEXT_AT_5,
        *MESSAGE_END,
    ],
    "block-started-at-5": [
        ANTHROPIC_START,
        {**ANTHROPIC_TEXT_START, "index": 5},
        TEXT_AT_5,
        *MESSAGE_END,
    ],
    "stop-of-a-block-never-started": [
        ANTHROPIC_START,
        ANTHROPIC_TEXT_START,
        anthropic_text("hi"),
        {**BLOCK_STOP, "index": 1},
        *MESSAGE_END,
    ],
    "message-start-twice": [
        ANTHROPIC_START,
        ANTHROPIC_TEXT_START,
        anthropic_text("hi"),
        ANTHROPIC_START,
        *MESSAGE_END,
    ],
}


async def messages_stream(rig: Any) -> Any:
    """The final message of a streamed `/v1/messages` request, as the `anthropic` SDK builds it."""
    async with anthropic_client(rig.gateway, rig.key) as client:
        messages: Any = [{"role": "user", "content": "hi"}]
        async with client.messages.stream(model="m", max_tokens=10, messages=messages) as stream:
            async for _ in stream:
                pass
            return await stream.get_final_message()


@pytest.mark.parametrize("order", list(OUT_OF_ORDER))
async def test_messages_events_out_of_order_are_an_error_the_sdk_raises(
    build: Build, order: str
) -> None:
    # Relayed as they came, they crashed the SDK's accumulator (IndexError for a block it
    # never saw started, RuntimeError for an event before `message_start`) instead of raising
    # an `anthropic.APIError` a client handles; a second `message_start` was taken silently.
    rig = await build("anthropic", sends(until_close(named_events(OUT_OF_ORDER[order]))))
    with pytest.raises(anthropic.APIError) as caught:
        await messages_stream(rig)
    assert "out of order" in caught.value.message
    [row] = await usage_rows(rig.gateway)
    assert row["status"] >= 500 and row["prompt_tokens"] >= 0


async def test_messages_pings_and_unknown_events_keep_their_place(build: Build) -> None:
    ping = {"type": "ping"}
    later = {"type": "some_event_added_later", "index": 9}
    events = [
        ping,
        ANTHROPIC_START,
        *[ping] * 1000,
        later,
        ANTHROPIC_TEXT_START,
        anthropic_text("hi"),
        BLOCK_STOP,
        *MESSAGE_END,
    ]
    rig = await build("anthropic", sends(until_close(named_events(events))))
    message = await messages_stream(rig)
    assert [block.text for block in message.content if block.type == "text"] == ["hi"]


# --- Gemini: more candidates than the client asked for ------------------------------------------


def candidate(text: str, index: int) -> dict[str, Any]:
    content = {"role": "model", "parts": [{"text": text}]}
    return {"content": content, "finishReason": "STOP", "index": index}


GEMINI_USAGE = {"promptTokenCount": 3, "candidatesTokenCount": 2}


@pytest.mark.parametrize("n", [None, 2])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_candidates_past_n_are_dropped(build: Build, stream: bool, n: int | None) -> None:
    # With n = 1 (or none) the client got a second choice, or a stream of chunks for indexes
    # it never asked for (each kept open in the translator: a million indexes, a million).
    cands = [candidate("first", 0), candidate("second", 1), candidate("stray", 7)]
    cands += [candidate("negative", -1), candidate("again", 0)]
    data = json.dumps({"candidates": cands, "usageMetadata": GEMINI_USAGE}).encode()
    answer = until_close(b"data: %b\n\n" % data) if stream else whole(data)
    rig = await build("gemini", sends(answer))
    messages: Any = [{"role": "user", "content": "hi"}]
    extra = {} if n is None else {"n": n}
    async with openai_client(rig.gateway, rig.key) as client:
        if stream:
            chunks = await client.chat.completions.create(
                model="m", messages=messages, stream=True, **extra
            )
            texts: dict[int, str] = {}
            async for chunk in chunks:
                for choice in chunk.choices:
                    texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
        else:
            completion = await client.chat.completions.create(model="m", messages=messages, **extra)
            texts = {c.index: c.message.content or "" for c in completion.choices}
    assert texts == ({0: "first"} if n is None else {0: "first", 1: "second"})


# --- Gemini: an answer without usage ----------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_an_answer_without_usage_is_estimated_not_free(build: Build, stream: bool) -> None:
    # Without `usageMetadata` the usage was all zeros and believed: the row said 0 tokens,
    # not estimated, and the key's budget never went down, however long the prompt.
    data = json.dumps({"candidates": [candidate("hi", 0)]}).encode()
    rig = await build(
        "gemini", sends(until_close(b"data: %b\n\n" % data) if stream else whole(data))
    )
    messages: Any = [{"role": "user", "content": "a long prompt " * 100}]
    status, _ = await rig.post(
        "/v1/chat/completions", {"model": "m", "messages": messages, "stream": stream}
    )
    [row] = await usage_rows(rig.gateway)
    assert (status, row["status"], row["estimated"]) == (200, 200, 1)
    assert row["prompt_tokens"] > 100


# --- What a stream holds before its first content -------------------------------------------


def repeats(head: bytes, event: bytes, times: int) -> Any:
    """A stream of `head`, then `event` `times` times (in writes of 1,000, each written when
    the last is taken), never anything with content."""

    async def answer(request: bytes, writer: asyncio.StreamWriter) -> None:
        writer.write(http("200 OK", {"Content-Type": "text/event-stream", "Connection": "close"}))
        writer.write(head)
        for _ in range(times // 1000):
            writer.write(event * 1000)
            await writer.drain()
        writer.close()

    return answer


BLOCKED = b'data: {"promptFeedback": {"blockReason": "SAFETY"}}\n\n'


async def test_a_repeated_prompt_block_holds_no_more_than_max_response_bytes(
    build: Build,
) -> None:
    # A translated stream holds its chunks until the answer has content (so an error first is
    # still an HTTP status). Each repeat of Gemini's prompt block made one more finish chunk,
    # all held: 40,000 repeats (2 MiB sent) made 40,000 chunks for one answer.
    rig = await build("gemini", repeats(b"", BLOCKED, 40_000), max_response_bytes=MiB // 4)
    body = {"model": "m", "messages": HI, "stream": True}
    (status, out), growth = await peak_growth(rig.post("/v1/chat/completions", body))
    assert status == 502, out[:300]
    assert json.loads(out)["error"]["message"].find("max_response_bytes") > 0
    assert growth < 4 * MiB, f"{growth / MiB:.1f} MiB"


async def test_a_ping_flood_before_content_holds_no_more_than_max_response_bytes(
    build: Build,
) -> None:
    # `/v1/messages` holds the events before the first content (an overload error right after
    # `message_start` is then still an HTTP status): pings after `message_start` were all held.
    ping = named_events([{"type": "ping"}])
    head = named_events([ANTHROPIC_START])
    rig = await build("anthropic", repeats(head, ping, 40_000), max_response_bytes=MiB // 4)
    with pytest.raises(anthropic.APIError) as caught:
        await messages_stream(rig)
    assert "max_response_bytes" in caught.value.message, caught.value.message


# --- Gemini: function call args that are not an object ---------------------------------------


def function_call(args: Any) -> bytes:
    part = {"functionCall": {"name": "f", "args": args}}
    cand = {"content": {"role": "model", "parts": [part]}, "finishReason": "STOP", "index": 0}
    return json.dumps({"candidates": [cand], "usageMetadata": GEMINI_USAGE}).encode()


async def tool_call_answer(rig: Any, stream: bool) -> str:
    """The arguments of the answer's tool call, as the SDK reads them."""
    async with openai_client(rig.gateway, rig.key) as client:
        if not stream:
            completion = await client.chat.completions.create(model="m", messages=HI)
            [call] = completion.choices[0].message.tool_calls or []
            return str(call.function.arguments)
        chunks = await client.chat.completions.create(model="m", messages=HI, stream=True)
        parts = [
            c.function.arguments or ""
            async for chunk in chunks
            for choice in chunk.choices
            for c in choice.delta.tool_calls or []
            if c.function is not None
        ]
        return "".join(parts)


def answers(data: bytes, stream: bool) -> Any:
    return sends(until_close(b"data: %b\n\n" % data) if stream else whole(data))


@pytest.mark.parametrize("args", [[1, 2], "x", 5, True], ids=["list", "string", "number", "bool"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_function_call_args_not_an_object_are_an_upstream_error(
    build: Build, stream: bool, args: Any
) -> None:
    # Relayed as the arguments' text ("[1, 2]"): a client's json.loads gave arguments no
    # function takes, and the call sent back in the history was refused by Gemini.
    rig = await build("gemini", answers(function_call(args), stream))
    with pytest.raises(openai.APIError) as caught:
        await tool_call_answer(rig, stream)
    assert "not an object" in caught.value.message


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
async def test_function_call_args_null_are_no_arguments(build: Build, stream: bool) -> None:
    rig = await build("gemini", answers(function_call(None), stream))
    assert await tool_call_answer(rig, stream) == "{}"
    rig = await build("gemini", answers(function_call({"a": 1}), stream))
    assert json.loads(await tool_call_answer(rig, stream)) == {"a": 1}


# --- Answers whose items are not what their kind holds ----------------------------------------

NOT_ITEMS = {"numbers": [1, 2], "strings": ["a"], "nulls": [None], "empty-objects": [{}]}


@pytest.mark.parametrize("items", list(NOT_ITEMS))
async def test_a_text_completion_whose_choices_hold_no_text_is_a_502(
    build: Build, items: str
) -> None:
    # Only `choices` being a list was checked: `[1, 2]` reached the client as a completion.
    body = {"id": "c", "object": "text_completion", "model": "m-1", "choices": NOT_ITEMS[items]}
    rig = await build("openai", sends(whole(json.dumps(body).encode())))
    status, out = await rig.post("/v1/completions", {"model": "m", "prompt": "hi"})
    assert status == 502, out
    assert json.loads(out)["error"]["code"] == "upstream_bad_response"


@pytest.mark.parametrize("items", ["numbers", "strings", "nulls"])
async def test_a_response_whose_output_holds_no_items_is_a_502(build: Build, items: str) -> None:
    body = {"id": "r", "object": "response", "status": "completed", "output": NOT_ITEMS[items]}
    rig = await build("responses", sends(whole(json.dumps(body).encode())))
    status, out = await rig.post("/v1/responses", {"model": "m", "input": "hi"})
    assert status == 502, out
    assert json.loads(out)["error"]["code"] == "upstream_bad_response"
