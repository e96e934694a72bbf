"""The Responses API, `/v1/messages` and the Anthropic and Gemini translations attacked from
outside by a hostile upstream (`test_attack_upstream`'s raw-socket rig), read by the real SDKs:
`openai` (`chat.completions`, `responses.stream`) and `anthropic` (`messages.stream`). Whatever
the upstream sends, the client gets a message its SDK builds or an API error it raises, never
a corrupted answer or a crash inside the SDK.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import openai_client, usage_rows
from tests.test_attack_upstream import (
    ANTHROPIC_START,
    Build,
    build,
    named_events,
    sends,
    sse,
    until_close,
    whole,
)
from tests.test_attack_upstream2 import OUT_OF_ORDER, messages_stream
from tests.test_messages import anthropic_client

__all__ = ["build"]  # the fixture, used here by name

TOOLS: Any = [
    {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
    for name in ("f", "g")
]
RESPONSES_TOOLS: Any = [{"type": "function", **tool["function"]} for tool in TOOLS]
HI: Any = [{"role": "user", "content": "hi"}]


def tool_block(index: int, call_id: str, name: str, arguments: str) -> list[dict[str, Any]]:
    block = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
    delta = {"type": "input_json_delta", "partial_json": arguments}
    return [
        {"type": "content_block_start", "index": index, "content_block": block},
        {"type": "content_block_delta", "index": index, "delta": delta},
        {"type": "content_block_stop", "index": index},
    ]


# A second `message_start` between two tool calls: the translator began a new chunk writer,
# whose tool-call slots counted from 0 again, so the second call went out at the first one's
# index and the client merged the two (id "toolu_1toolu_2", name "fg", arguments "{..}{..}").
TWO_STARTS = [
    ANTHROPIC_START,
    *tool_block(0, "toolu_1", "f", '{"a": 1}'),
    ANTHROPIC_START,
    *tool_block(1, "toolu_2", "g", '{"b": 2}'),
    {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 2}},
    {"type": "message_stop"},
]
TRANSLATED_OUT_OF_ORDER = {**OUT_OF_ORDER, "message-start-between-tool-calls": TWO_STARTS}


class ErrorEvent(Exception):
    """The `error` event a Responses stream ended with (the SDK yields it, raising nothing)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


async def chat_stream(rig: Any) -> Any:
    async with (
        openai_client(rig.gateway, rig.key) as client,
        client.chat.completions.stream(model="m", messages=HI, tools=TOOLS) as stream,
    ):
        async for _ in stream:
            pass
        return await stream.get_final_completion()


async def responses_stream(rig: Any) -> Any:
    """The final response of a `responses.stream(...)`; a stream that ends with the Responses
    API's `error` event raises it (`ErrorEvent`)."""
    async with (
        openai_client(rig.gateway, rig.key) as client,
        client.responses.stream(model="m", input="hi", tools=RESPONSES_TOOLS) as stream,
    ):
        async for event in stream:
            if event.type == "error":
                raise ErrorEvent(event.message)
        return await stream.get_final_response()


@pytest.mark.parametrize("order", list(TRANSLATED_OUT_OF_ORDER))
@pytest.mark.parametrize("read", [chat_stream, responses_stream], ids=["chat", "responses"])
async def test_translated_anthropic_events_out_of_order_are_an_error(
    build: Build, order: str, read: Any
) -> None:
    # `/v1/messages` refused these already; translated to chat or Responses they were taken:
    # text for a block never started, blocks at any index, and a second `message_start` that
    # merged two tool calls into one the client would have run.
    rig = await build("anthropic", sends(until_close(named_events(TRANSLATED_OUT_OF_ORDER[order]))))
    with pytest.raises((openai.APIError, ErrorEvent)) as caught:
        await read(rig)
    message = caught.value.message
    assert "out of order" in message or "before 'message_start'" in message
    [row] = await usage_rows(rig.gateway)
    assert row["status"] >= 500


@pytest.mark.parametrize("read", [chat_stream, responses_stream], ids=["chat", "responses"])
async def test_translated_anthropic_tool_calls_in_order_stay_apart(build: Build, read: Any) -> None:
    events = [ANTHROPIC_START, *tool_block(0, "toolu_1", "f", '{"a": 1}')]
    events += [*tool_block(1, "toolu_2", "g", '{"b": 2}'), *TWO_STARTS[-2:]]
    rig = await build("anthropic", sends(until_close(named_events(events))))
    answer = await read(rig)
    if read is chat_stream:
        calls = answer.choices[0].message.tool_calls
        got = [(c.id, c.function.name, c.function.arguments) for c in calls]
    else:
        got = [(o.call_id, o.name, o.arguments) for o in answer.output]
    assert got == [("toolu_1", "f", '{"a": 1}'), ("toolu_2", "g", '{"b": 2}')]


# --- /v1/messages: events whose fields the SDK cannot build a message from ----------------------

TEXT_START = {
    "type": "content_block_start",
    "index": 0,
    "content_block": {"type": "text", "text": ""},
}
THINKING_START = {
    "type": "content_block_start",
    "index": 0,
    "content_block": {"type": "thinking", "thinking": "", "signature": ""},
}
TOOL_START = {
    "type": "content_block_start",
    "index": 0,
    "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}},
}
STOP = {"type": "content_block_stop", "index": 0}
END = [
    {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}},
    {"type": "message_stop"},
]
MESSAGE = ANTHROPIC_START["message"]


def delta(value: Any) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": 0, "delta": value}


def with_start(message: Any) -> list[dict[str, Any]]:
    return [{"type": "message_start", "message": message}, TEXT_START, STOP, *END]


def text_start(block: Any) -> list[dict[str, Any]]:
    return [ANTHROPIC_START, {**TEXT_START, "content_block": block}, STOP, *END]


def message_delta(**fields: Any) -> list[dict[str, Any]]:
    return [ANTHROPIC_START, TEXT_START, STOP, {"type": "message_delta", **fields}, END[1]]


# Each crashed the `anthropic` SDK's accumulator (TypeError, AttributeError) instead of raising
# an API error: the relay checked the events' order, not what they held.
MISSHAPEN: dict[str, list[dict[str, Any]]] = {
    "text-null": [ANTHROPIC_START, TEXT_START, delta({"type": "text_delta", "text": None}), *END],
    "text-number": [ANTHROPIC_START, TEXT_START, delta({"type": "text_delta", "text": 5}), *END],
    "text-missing": [ANTHROPIC_START, TEXT_START, delta({"type": "text_delta"}), *END],
    "delta-null": [ANTHROPIC_START, TEXT_START, delta(None), *END],
    "json-null": [
        ANTHROPIC_START,
        TOOL_START,
        delta({"type": "input_json_delta", "partial_json": None}),
        *END,
    ],
    "thinking-null": [
        ANTHROPIC_START,
        THINKING_START,
        delta({"type": "thinking_delta", "thinking": None}),
        *END,
    ],
    "block-null": text_start(None),
    "block-text-null": text_start({"type": "text", "text": None}),
    "block-thinking-missing": text_start({"type": "thinking", "signature": ""}),
    "message-null": with_start(None),
    "message-content-missing": with_start({k: v for k, v in MESSAGE.items() if k != "content"}),
    "message-usage-missing": with_start({k: v for k, v in MESSAGE.items() if k != "usage"}),
    "message-delta-usage-missing": message_delta(delta={"stop_reason": "end_turn"}),
    "message-delta-usage-null": message_delta(delta={"stop_reason": "end_turn"}, usage=None),
    "message-delta-delta-missing": message_delta(usage={"output_tokens": 2}),
}


@pytest.mark.parametrize("shape", list(MISSHAPEN))
async def test_messages_events_the_sdk_cannot_read_are_an_error(build: Build, shape: str) -> None:
    rig = await build("anthropic", sends(until_close(named_events(MISSHAPEN[shape]))))
    with pytest.raises(anthropic.APIError) as caught:
        await messages_stream(rig)
    assert "malformed" in caught.value.message
    [row] = await usage_rows(rig.gateway)
    assert row["status"] >= 500


async def test_messages_events_with_fields_added_later_are_relayed(build: Build) -> None:
    # What the check leaves alone: delta and block types it does not know, extra fields,
    # a null signature or citation (the SDK stores those as they are).
    events = [
        {**ANTHROPIC_START, "extra": {"x": 1}},
        {**TEXT_START, "content_block": {"type": "text", "text": "", "new_field": [1]}},
        delta({"type": "text_delta", "text": "hi", "more": None}),
        delta({"type": "some_delta_added_later", "value": 5}),
        delta({"type": "citations_delta", "citation": None}),
        STOP,
        {**THINKING_START, "index": 1},
        {**delta({"type": "signature_delta", "signature": "sig"}), "index": 1},
        {**STOP, "index": 1},
        {**TEXT_START, "index": 2, "content_block": {"type": "block_added_later"}},
        {**STOP, "index": 2},
        *END,
    ]
    rig = await build("anthropic", sends(until_close(named_events(events))))
    message = await messages_stream(rig)
    assert [block.type for block in message.content] == ["text", "thinking", "block_added_later"]
    assert message.content[0].text == "hi"  # type: ignore[union-attr]
    assert message.usage.output_tokens == 2


# --- Usage no one can believe, in a chat stream translated for the Messages API ------------------


def chat_chunk(**fields: Any) -> bytes:
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m-1"}
    return json.dumps({**base, **fields}).encode()


@pytest.mark.parametrize("count", [-3, 2**41, 1.5, "7"])
async def test_messages_translated_stream_with_unreadable_usage_is_relayed(
    build: Build, count: Any
) -> None:
    # The usage row is estimated, as on every other path; the Messages translator decoded the
    # usage chunk with the counts typed and ended a complete answer with "malformed".
    text = {"index": 0, "delta": {"role": "assistant", "content": "hello"}, "finish_reason": None}
    stop = {"index": 0, "delta": {}, "finish_reason": "stop"}
    usage = {"prompt_tokens": count, "completion_tokens": 2, "total_tokens": 5}
    body = sse(
        chat_chunk(choices=[text]),
        chat_chunk(choices=[stop]),
        chat_chunk(choices=[], usage=usage),
        b"[DONE]",
    )
    rig = await build("openai", sends(until_close(body)))
    message = await messages_stream(rig)
    assert [block.text for block in message.content if block.type == "text"] == ["hello"]
    assert message.stop_reason == "end_turn"
    [row] = await usage_rows(rig.gateway)
    assert row["status"] == 200 and row["estimated"] == 1


def chat_completion(count: Any) -> bytes:
    message = {"role": "assistant", "content": "hello"}
    body = {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "m-1",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": count, "completion_tokens": 2, "total_tokens": 5},
    }
    return json.dumps(body).encode()


@pytest.mark.parametrize("count", [-3, 2**41, 1.5, "7"])
@pytest.mark.parametrize("api", ["responses", "messages"])
async def test_translated_answer_with_unreadable_usage_is_relayed(
    build: Build, api: str, count: Any
) -> None:
    # A whole chat completion translated to a response or a message was a 502 "malformed
    # completion" for a count no one believes; chat clients got the answer (relayed as it is)
    # and an estimated row, as the docs promise for every path.
    rig = await build("openai", sends(whole(chat_completion(count))))
    if api == "responses":
        async with openai_client(rig.gateway, rig.key) as client:
            response = await client.responses.create(model="m", input="hi")
        assert response.output_text == "hello"
        assert response.usage is None
    else:
        async with anthropic_client(rig.gateway, rig.key) as client:
            message = await client.messages.create(model="m", max_tokens=10, messages=HI)
        assert [block.text for block in message.content if block.type == "text"] == ["hello"]
        assert message.usage.input_tokens >= 0 and message.usage.output_tokens >= 0
    [row] = await usage_rows(rig.gateway)
    assert row["status"] == 200 and row["estimated"] == 1


# --- /v1/messages: a whole answer that is not a message the SDK's users can read ----------------


def anthropic_message(**fields: Any) -> bytes:
    content = [{"type": "text", "text": "hello"}]
    body = {**MESSAGE, "content": content, "stop_reason": "end_turn", **fields}
    return json.dumps({k: v for k, v in body.items() if v != "absent"}).encode()


# Each was relayed as a 200 that the SDK hands over unchecked (it does not validate), so the
# first `block.text` or `message.usage.input_tokens` of the client's code crashed.
NOT_A_MESSAGE = {
    "content-null": {"content": None},
    "content-absent": {"content": "absent"},
    "content-a-string": {"content": "hello"},
    "block-null": {"content": [None]},
    "text-null": {"content": [{"type": "text", "text": None}]},
    "text-absent": {"content": [{"type": "text"}]},
    "usage-null": {"usage": None},
    "usage-absent": {"usage": "absent"},
}


@pytest.mark.parametrize("shape", list(NOT_A_MESSAGE))
async def test_messages_answer_that_is_not_a_message_is_a_502(build: Build, shape: str) -> None:
    rig = await build("anthropic", sends(whole(anthropic_message(**NOT_A_MESSAGE[shape]))))
    async with anthropic_client(rig.gateway, rig.key) as client:
        with pytest.raises(anthropic.InternalServerError) as caught:
            await client.messages.create(model="m", max_tokens=10, messages=HI)
    assert caught.value.status_code == 500  # a gateway 502, in Anthropic's terms
    assert "not a message" in caught.value.message
    [row] = await usage_rows(rig.gateway)
    assert row["status"] == 500


async def test_messages_answer_with_blocks_added_later_is_relayed(build: Build) -> None:
    content = [
        {"type": "text", "text": "hello", "citations": None},
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}},
        {"type": "block_added_later", "data": [1]},
    ]
    rig = await build("anthropic", sends(whole(anthropic_message(content=content))))
    async with anthropic_client(rig.gateway, rig.key) as client:
        message = await client.messages.create(model="m", max_tokens=10, messages=HI)
    assert [block.type for block in message.content] == [
        "text",
        "server_tool_use",
        "block_added_later",
    ]
    assert message.usage.input_tokens == 1


# --- /v1/responses passed through: events out of the order the SDK builds its response in -------

RESPONSE_ID = "resp_1"
RESPONSE_USAGE = {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}
ITEM: Any = {"type": "message", "id": "msg_1", "status": "in_progress", "role": "assistant"}
ITEM["content"] = []
TEXT_PART = {"type": "output_text", "text": "", "annotations": []}
ITEM_DONE = {**ITEM, "status": "completed", "content": [{**TEXT_PART, "text": "hi"}]}
CALL = {"type": "function_call", "id": "fc_1", "call_id": "c1", "name": "f", "arguments": ""}


def response(status: str = "in_progress", rid: str = RESPONSE_ID, **fields: Any) -> Any:
    return {
        "id": rid,
        "object": "response",
        "created_at": 1,
        "status": status,
        "model": "m-1",
        "output": [],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        **fields,
    }


def text_delta(value: Any = "hi", output_index: int = 0, content_index: int = 0) -> Any:
    return {
        "type": "response.output_text.delta",
        "output_index": output_index,
        "content_index": content_index,
        "item_id": "msg_1",
        "delta": value,
    }


CREATED = {"type": "response.created", "response": response()}
ADDED = {"type": "response.output_item.added", "output_index": 0, "item": ITEM}
PART_ADDED = {
    "type": "response.content_part.added",
    "output_index": 0,
    "content_index": 0,
    "item_id": "msg_1",
    "part": TEXT_PART,
}
TEXT_DONE = {
    "type": "response.output_text.done",
    "output_index": 0,
    "content_index": 0,
    "item_id": "msg_1",
    "text": "hi",
}
ITEM_DONE_EVENT = {"type": "response.output_item.done", "output_index": 0, "item": ITEM_DONE}
COMPLETED = {
    "type": "response.completed",
    "response": response("completed", output=[ITEM_DONE], usage=RESPONSE_USAGE),
}
WHOLE = [CREATED, ADDED, PART_ADDED, text_delta(), TEXT_DONE, ITEM_DONE_EVENT, COMPLETED]


def without(event: Any) -> list[Any]:
    return [e for e in WHOLE if e is not event]


def replaced(event: Any, *by: Any) -> list[Any]:
    return [x for e in WHOLE for x in (by if e is event else (e,))]


# Each crashed `responses.stream()` inside the SDK (RuntimeError, IndexError, TypeError,
# AssertionError) instead of ending with an error it reports: the relay checked nothing of it.
RESPONSES_OUT_OF_ORDER: dict[str, list[Any]] = {
    "no-created": without(CREATED),
    "delta-before-its-item": [CREATED, text_delta(), *WHOLE[1:]],
    "delta-for-another-item": replaced(WHOLE[3], text_delta(output_index=3)),
    "delta-before-its-part": without(PART_ADDED),
    "delta-null": replaced(WHOLE[3], text_delta(None)),
    "delta-a-number": replaced(WHOLE[3], text_delta(5)),
    "item-added-twice": replaced(ADDED, ADDED, ADDED),
    "part-null": replaced(PART_ADDED, {**PART_ADDED, "part": None}),
    "arguments-for-a-message": replaced(
        WHOLE[3],
        {
            "type": "response.function_call_arguments.delta",
            "output_index": 0,
            "item_id": "msg_1",
            "delta": "{}",
        },
    ),
    "item-done-another-item": replaced(
        ITEM_DONE_EVENT, {**ITEM_DONE_EVENT, "item": {**ITEM_DONE, "id": "msg_2"}}
    ),
    "completed-another-response": replaced(
        COMPLETED, {**COMPLETED, "response": {**COMPLETED["response"], "id": "resp_2"}}
    ),
    "completed-null": replaced(COMPLETED, {**COMPLETED, "response": None}),
    "completed-with-an-item-unfinished": [
        *WHOLE[:-1],
        {**ADDED, "output_index": 1, "item": {**CALL, "status": "in_progress"}},
        COMPLETED,
    ],
    "call-arguments-null": [
        CREATED,
        {**ADDED, "item": {**CALL, "arguments": None}},
        {
            "type": "response.function_call_arguments.delta",
            "output_index": 0,
            "item_id": "fc_1",
            "delta": "{}",
        },
    ],
}


async def passed_through_stream(rig: Any) -> Any:
    async with (
        openai_client(rig.gateway, rig.key) as client,
        client.responses.stream(model="m", input="hi") as stream,
    ):
        async for event in stream:
            if event.type == "error":
                raise ErrorEvent(event.message)
        return await stream.get_final_response()


@pytest.mark.parametrize("order", list(RESPONSES_OUT_OF_ORDER))
async def test_responses_passed_through_out_of_order_is_an_error(build: Build, order: str) -> None:
    rig = await build("responses", sends(until_close(named_events(RESPONSES_OUT_OF_ORDER[order]))))
    with pytest.raises((openai.APIError, ErrorEvent)) as caught:
        await passed_through_stream(rig)
    assert "out of order" in caught.value.message
    [row] = await usage_rows(rig.gateway)
    assert row["status"] >= 500


async def test_responses_passed_through_in_order_is_relayed(build: Build) -> None:
    # What the check leaves alone: events it does not know (with or without an item), an
    # item added as null (the SDK skips it), a second lifecycle event of the same response.
    events = [
        CREATED,
        {"type": "response.in_progress", "response": response()},
        {"type": "response.something_new", "value": 1},
        {**ADDED, "output_index": 1, "item": None},
        ADDED,
        {"type": "response.web_search_call.searching", "output_index": 0, "item_id": "msg_1"},
        *WHOLE[2:],
    ]
    rig = await build("responses", sends(until_close(named_events(events))))
    answer = await passed_through_stream(rig)
    assert answer.output_text == "hi"
    assert answer.usage is not None and answer.usage.output_tokens == 4


# --- Gemini: content for a candidate after its finishReason ---------------------------------


def gemini_chunk(text: str, finish: str | None = None, prompt: int = 3) -> bytes:
    candidate: Any = {"content": {"role": "model", "parts": [{"text": text}]}, "index": 0}
    if finish is not None:
        candidate["finishReason"] = finish
    usage = {"promptTokenCount": prompt, "candidatesTokenCount": 2, "totalTokenCount": prompt + 2}
    return json.dumps({"candidates": [candidate], "usageMetadata": usage}).encode()


AFTER_FINISH = sse(gemini_chunk("hello", "STOP"), gemini_chunk(" late", None, 4))


async def test_gemini_content_after_finish_is_not_relayed_to_chat(build: Build) -> None:
    # A chat stream had a `content` delta after its choice's `finish_reason` (and a Messages
    # stream a second text block, a Responses stream a second message item): what a candidate
    # says after it finished is not part of its answer.
    rig = await build("gemini", sends(until_close(AFTER_FINISH)))
    async with openai_client(rig.gateway, rig.key) as client:
        chunks = await client.chat.completions.create(model="m", messages=HI, stream=True)
        seen: list[tuple[str | None, str | None]] = []
        async for chunk in chunks:
            seen += [(c.delta.content, c.finish_reason) for c in chunk.choices]
    assert seen[-1] == (None, "stop")
    assert "".join(text or "" for text, _ in seen) == "hello"
    [row] = await usage_rows(rig.gateway)
    assert row["status"] == 200


async def test_gemini_content_after_finish_is_not_relayed_to_responses(build: Build) -> None:
    rig = await build("gemini", sends(until_close(AFTER_FINISH)))
    answer = await responses_stream(rig)
    assert answer.output_text == "hello"
    assert [item.type for item in answer.output] == ["message"]


async def test_gemini_content_after_finish_is_not_relayed_to_messages(build: Build) -> None:
    rig = await build("gemini", sends(until_close(AFTER_FINISH)))
    message = await messages_stream(rig)
    assert [block.text for block in message.content if block.type == "text"] == ["hello"]


# --- An answer without any choice, translated for the Responses and Messages APIs ---------------

NO_CHOICE = {"id": "c", "created": 1, "model": "m-1", "choices": []}
NO_CHOICE_USAGE = {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}
# A whole answer, and streams that end ([DONE]) without a choice ever appearing: one chunk with
# `choices: []` (as Azure's first chunk, its content filter results), or two and a usage chunk.
NO_CHOICE_ANSWER = whole(
    json.dumps({**NO_CHOICE, "object": "chat.completion", "usage": NO_CHOICE_USAGE}).encode()
)
NO_CHOICE_STREAMS = {
    "one-empty-chunk": sse(chat_chunk(choices=[]), b"[DONE]"),
    "empty-chunks-and-usage": sse(
        *[chat_chunk(choices=[])] * 2, chat_chunk(choices=[], usage=NO_CHOICE_USAGE), b"[DONE]"
    ),
}


async def test_an_answer_without_choices_is_a_502_translated_and_relayed_to_chat(
    build: Build,
) -> None:
    # `/v1/messages` answered an empty message (200, no content, `end_turn`), as if the model
    # had said nothing, where `/v1/responses` answered a 502: no choice is no answer. Chat
    # clients still get the body as the upstream sent it.
    rig = await build("openai", sends(NO_CHOICE_ANSWER))
    async with openai_client(rig.gateway, rig.key) as client:
        with pytest.raises(openai.APIStatusError) as failed:
            await client.responses.create(model="m", input="hi")
        assert failed.value.status_code == 502
        assert failed.value.body == {
            "message": "The upstream provider returned a completion without choices.",
            "type": "upstream_error",
            "param": None,
            "code": "upstream_error",
        }
        completion = await client.chat.completions.create(model="m", messages=HI)
        assert completion.choices == []
    async with anthropic_client(rig.gateway, rig.key) as client:
        with pytest.raises(anthropic.InternalServerError) as caught:
            await client.messages.create(model="m", max_tokens=10, messages=HI)
    assert caught.value.status_code == 500  # the gateway's 502, in Anthropic's terms
    assert caught.value.body == {
        "type": "error",
        "error": {
            "type": "api_error",
            "message": "The upstream provider returned a completion without choices.",
        },
        "request_id": caught.value.response.headers["x-request-id"],
    }
    assert [row["status"] for row in await usage_rows(rig.gateway)] == [502, 200, 500]


@pytest.mark.parametrize("stream", list(NO_CHOICE_STREAMS))
async def test_a_stream_without_choices_ends_with_an_error_translated_and_relayed_to_chat(
    build: Build, stream: str
) -> None:
    # Translated, it was an empty message (`message_start` ... `end_turn`) or an empty
    # `response.completed`: a success with nothing in it. The start goes out with the first
    # chunk (headers and pings must not wait for a model that thinks after a choiceless
    # chunk, as Azure's content filter results), so the end is the stream's error event.
    rig = await build("openai", sends(until_close(NO_CHOICE_STREAMS[stream])))
    async with openai_client(rig.gateway, rig.key) as client:
        with pytest.raises(ErrorEvent) as failed:
            await responses_stream(rig)
        assert failed.value.message == "The upstream provider ended the stream without any choice."
        chunks = await client.chat.completions.create(model="m", messages=HI, stream=True)
        relayed = [chunk.choices async for chunk in chunks]  # as the upstream sent them
        assert relayed == [[]] * (1 if stream == "one-empty-chunk" else 2)
    with pytest.raises(anthropic.APIStatusError) as caught:
        await messages_stream(rig)
    assert caught.value.body == {
        "type": "error",
        "error": {
            "type": "api_error",
            "message": "The upstream provider ended the stream without any choice.",
        },
    }
    assert [row["status"] for row in await usage_rows(rig.gateway)] == [502, 200, 500]
