"""Attack h129: what Anthropic stores for one key of a `/v1/messages` pass-through (59c8ecb: its
messages' ids, its code's output files, its container), named by another key; and the
`anthropic` SDK's message threads through the gateway.

Alice holds one ordinary key and wants the file bob's code wrote (`file_bob_payroll`, shown in
his `bash_code_execution_tool_result`). 59c8ecb refuses it as a top-level block's `file_id` or
`source.file_id`; Anthropic resolves a file source wherever a request may hold one. Upstreams
are in-process raw sockets (`Scripted`, tests/test_attack_h126). FINDING tests fail on
59c8ecb; HELD tests pin what was tried and held.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests import test_attack_h105
from tests.conftest import NEVER_HANG, create_key
from tests.raw_upstream import STREAM_HEAD
from tests.test_attack_h105 import Build, completion, whole
from tests.test_attack_h107 import SONNET
from tests.test_attack_h126 import Scripted
from tests.test_attack_h128 import BOBS_RUN, answering, ask, claude, events, not_found, post, sdk

build = test_attack_h105.build  # (the fixture, by its name)

Json = dict[str, Any]
SHOWN = {"id": "container_bob", "expires_at": "2026-12-07T15:00:00Z"}
BOBS_FILE = {"type": "file", "file_id": "file_bob_payroll"}


async def bob_ran_code(build: Build) -> tuple[Any, Scripted, str]:
    """A gateway whose first answer (bob's) shows his container and the file his code wrote;
    alice's key."""
    up = answering(claude(0, BOBS_RUN, container=SHOWN))
    gw = await build("anthropic", up, SONNET)
    bob, alice = await create_key(gw, name="bob"), await create_key(gw, name="alice")
    status, body = await post(gw, bob, ask())
    assert status == 200, body
    # (59c8ecb: the file as a top-level block's source is his)
    top = [{"type": "document", "source": BOBS_FILE}]
    not_found(*await post(gw, alice, ask(messages=[{"role": "user", "content": top}])))
    return gw, up, alice


def tool_turns(result: list[Json]) -> list[Json]:
    """A client tool call and its result, as every tool loop sends them back."""
    call = {"type": "tool_use", "id": "toolu_1", "name": "open_report", "input": {}}
    returned = {"type": "tool_result", "tool_use_id": "toolu_1", "content": result}
    return [
        {"role": "user", "content": "Summarise the report."},
        {"role": "assistant", "content": [call]},
        {"role": "user", "content": [returned]},
    ]


# FINDING (high: the file bob's code wrote, which 59c8ecb means to keep his): anthropic-python
# 2.17 `BetaToolResultBlockParam.content` takes `BetaRequestDocumentBlockParam` and
# `BetaImageBlockParam`, whose `source` may be a `BetaFileDocumentSourceParam` /
# `BetaFileImageSourceParam` (`{"type": "file", "file_id"}`): a client tool that returns a file
# for the model to read, the usual way to hand it a Files API file from a tool. A document's
# own `source` may be `BetaContentBlockSourceParam` (`{"type": "content", "content": [...]}`),
# whose blocks include an image with a file source. Alice names bob's `file_bob_payroll` in
# each: relayed (200), and Anthropic reads bob's payroll to her. Expected: 404
# `not_found_error`, nothing upstream, as for the same source one level up. Cause:
# `handlers/messages.py:_stored` reads only `messages[i].content[j]` (`_Turn`/`_Block`:
# `file_id` and `source.file_id` of a top-level block), never a block's nested `content`.
@pytest.mark.parametrize(
    "messages",
    [
        tool_turns([{"type": "document", "source": BOBS_FILE}]),
        tool_turns([{"type": "image", "source": BOBS_FILE}]),
        [
            {
                "role": "user",
                "content": [
                    {"type": "document", "title": "Scan"}
                    | {
                        "source": {
                            "type": "content",
                            "content": [{"type": "image", "source": BOBS_FILE}],
                        }
                    },
                    {"type": "text", "text": "Read the scan."},
                ],
            }
        ],
    ],
    ids=["tool_result_document", "tool_result_image", "document_content_image"],
)
async def test_bobs_file_nested_in_a_block_is_not_found_for_alice(
    build: Build, messages: list[Json]
) -> None:
    gw, up, alice = await bob_ran_code(build)
    status, body = await post(gw, alice, ask(messages=messages))
    not_found(status, body)
    assert len(up.bodies) == 1  # nothing of alice's went upstream


# FINDING (high: the same file, by the exact spelling 59c8ecb checks): a `search_result` block
# (`BetaSearchResultBlockParam`: `source` is a *string*, the result's URL; RAG apps send them as
# top-level user content) in the same request makes the gateway read no block's file at all:
# bob's `file_bob_payroll` as a top-level document source, refused alone, is relayed (200)
# beside it. Expected: 404 `not_found_error`, nothing upstream. Cause: `handlers/messages.py:
# _stored` decodes every message at once into `_Block(source: _Source | None)`; a string source
# fails the whole decode, which `contextlib.suppress(*_DECODE)` swallows ("what Anthropic
# refuses is not looked at"), but Anthropic does not refuse it.
async def test_a_search_result_block_does_not_hide_bobs_file(build: Build) -> None:
    gw, up, alice = await bob_ran_code(build)
    found = {"type": "search_result", "source": "https://wiki.example/pay", "title": "Pay"}
    found |= {"content": [{"type": "text", "text": "Payroll runs monthly."}]}
    content = [found, {"type": "document", "source": BOBS_FILE}, {"type": "text", "text": "Sum it"}]
    status, body = await post(gw, alice, ask(messages=[{"role": "user", "content": content}]))
    not_found(status, body)
    assert len(up.bodies) == 1


# --- the SDK's threads --------------------------------------------------------------------------


def turn_reply(number: int, body: Json, **fields: Any) -> bytes:
    """`msg_<number>`, whole or streamed as the request asks."""
    if not body.get("stream"):
        return whole(claude(number, **fields))
    start = claude(number, content=[], stop_reason=None)
    return STREAM_HEAD + events(
        ("message_start", {"message": start}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "ok"}}),
        ("content_block_stop", {"index": 0}),
        ("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}}),
        ("message_stop", {}),
    )


# FINDING (medium: the SDK's threaded tool runner stops on every paused server tool): a thread
# whose reply stops with `pause_turn` (a long web search or code run: `BetaStopReason`) is
# resumed by a `continue` that sends nothing new: `ThreadState.create_arguments` ("With nothing
# staged after a `pause_turn` reply that is nothing: the server holds the unfinished turn and
# resumes it from an empty `messages`"); the tool runner does so itself (`_beta_runner.py`
# `_STOP_REASON_STEPS`: `"pause_turn": "resume"`, threaded by default). Through the gateway,
# `thread.send()` after bob's paused reply gets a 400 ("Invalid request body at 'messages':
# Expected `array` of length >= 1") and the turn is never resumed. Expected: relayed (200),
# the upstream given `messages: []` with the thread. Cause: `messages/schema.py:MessagesRequest.
# messages` has `min_length=1`, which a thread `continue` (59c8ecb passes threads through and
# holds them) does not need.
async def test_the_sdk_thread_resumes_a_paused_turn(build: Build) -> None:
    def reply(number: int, body: Json) -> bytes:
        return turn_reply(number, body, stop_reason="pause_turn" if number == 0 else "end_turn")

    up = Scripted(reply)
    gw = await build("anthropic", up, SONNET)
    client = sdk(gw, await create_key(gw))
    try:
        thread = client.beta.messages.thread(model="m", max_tokens=64)
        paused = await thread.send({"role": "user", "content": "Search the news."})
        assert paused.stop_reason == "pause_turn"
        resumed = await thread.send()
    finally:
        await client.close()
    assert resumed.id == "msg_1"
    assert up.bodies[1]["thread"] == {"type": "continue", "previous_message_id": "msg_0"}
    assert up.bodies[1]["messages"] == []


# FINDING (low: a plain request refused): `thread` is `Optional[BetaMessageThreadParam]`
# (`message_create_params.py`): `null` asks for no thread, and `client.beta.messages.create(...,
# thread=None)` sends it so. On a translated route 59c8ecb refuses it as a thread (400
# `thread_unsupported_request`); the request is no thread, so no SDK thread recovers from it.
# Expected: relayed as without the field (200). Cause: `messages/request.py:to_chat` refuses
# `req.thread is not UNSET` (a `Raw` `null` too).
async def test_a_null_thread_on_a_translated_route_is_no_thread(build: Build) -> None:
    usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    gw = await build("openai", Scripted(lambda n, _: completion(usage)), "gpt-4o")
    client = sdk(gw, await create_key(gw))
    try:
        got = await client.beta.messages.create(
            model="m", max_tokens=64, messages=[{"role": "user", "content": "hi"}], thread=None
        )
    finally:
        await client.close()
    assert got.content[0].type == "text"


# --- held ---------------------------------------------------------------------------------------


# HELD: the owner's SDK thread end to end (create, continue, a streamed continue, a continue
# after the stream), each `continue` naming the reply before it; the other key naming the
# thread's newest message gets a 404 whose `error.details.error_code` is `thread_not_found`
# (raw, streamed, on the token count), and nothing goes upstream.
async def test_the_owners_sdk_thread_and_a_stranger(build: Build) -> None:
    up = Scripted(turn_reply)
    gw = await build("anthropic", up, SONNET)
    bob, alice = await create_key(gw, name="bob"), await create_key(gw, name="alice")
    client = sdk(gw, bob)
    try:
        thread = client.beta.messages.thread(model="m", max_tokens=64, system="Be brief.")
        assert (await thread.send({"role": "user", "content": "one"})).id == "msg_0"
        assert (await thread.send({"role": "user", "content": "two"})).id == "msg_1"
        async with thread.stream({"role": "user", "content": "three"}) as stream:
            assert (await stream.get_final_message()).id == "msg_2"
        assert (await thread.send({"role": "user", "content": "four"})).id == "msg_3"
    finally:
        await client.close()
    assert [body["thread"] for body in up.bodies] == [{"type": "create"}] + [
        {"type": "continue", "previous_message_id": f"msg_{n}"} for n in range(3)
    ]
    assert "system" not in up.bodies[3] and up.bodies[3]["messages"][-1]["content"] == "four"
    thread_of_bob = {"type": "continue", "previous_message_id": "msg_3"}
    for fields, path in (
        ({}, "/v1/messages"),
        ({"stream": True}, "/v1/messages"),
        ({}, "/v1/messages/count_tokens"),
    ):
        status, body = await post(gw, alice, ask(thread=thread_of_bob, **fields), path)
        not_found(status, body)
        assert body["error"]["details"] == {"error_code": "thread_not_found"}, body
    assert len(up.bodies) == 4


# HELD: a thread continued is held at the size its message had here (12,000 tokens, more than
# the 10,000 an unknown one is held at): a 20,000-token key that spent 12,000 cannot continue
# it (429), while the same new turn alone passes; a thread continued from a stranger's
# message is refused before admission is asked. Spellings of `thread` (escaped key, escaped
# id) naming bob's are refused; a `continue` without an id, or a non-string one, is relayed.
async def test_a_known_thread_is_held_at_its_size_and_spellings(build: Build) -> None:
    big = {"input_tokens": 11_000, "output_tokens": 1_000}
    up = Scripted(lambda n, _: whole(claude(n, usage=big) if n == 0 else claude(n)))
    gw = await build("anthropic", up, SONNET)
    bob = await create_key(gw, name="bob")
    alice = await create_key(gw, name="alice", budget_tokens=20_000)
    async with asyncio.timeout(NEVER_HANG):
        status, body = await post(gw, alice, ask(thread={"type": "create"}))
        assert status == 200 and body["id"] == "msg_0", body
        held = ask(max_tokens=16, thread={"type": "continue", "previous_message_id": "msg_0"})
        status, body = await post(gw, alice, held)
        assert status == 429 and "budget" in body["error"]["message"], body
        status, body = await post(gw, alice, ask(max_tokens=16))
        assert status == 200, body
        head = b'{"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "go"}], '
        for spelled in (
            b'"\\u0074hread": {"type": "continue", "previous_message_id": "msg_0"}}',
            b'"thread": {"type": "continue", "previous_message_id": "msg_\\u0030"}}',
            b'"diagnostics": {"previous_message_id": "msg_\\u0030"}}',
        ):
            not_found(*await post(gw, bob, head + spelled))
        for thread in ({"type": "continue"}, {"type": "continue", "previous_message_id": 7}):
            status, body = await post(gw, bob, ask(thread=thread))
            assert status == 200, (thread, body)
    assert len(up.bodies) == 4
    assert up.bodies[-1]["thread"] == {"type": "continue", "previous_message_id": 7}


# HELD: the SDK recovers from `thread_not_found` as 59c8ecb means it to. Alice's thread
# continues from a message id known here as bob's (an upstream that answered her thread with
# the id of his message); the gateway's 404 has her SDK send the whole conversation again
# under a new thread (`ThreadState.recovers_from`), relayed (200).
async def test_the_sdk_thread_recovers_from_thread_not_found(build: Build) -> None:
    up = Scripted(lambda n, _: whole(claude(0 if n < 2 else n)))
    gw = await build("anthropic", up, SONNET)
    bob, alice = await create_key(gw, name="bob"), await create_key(gw, name="alice")
    assert (await post(gw, bob, ask()))[0] == 200
    client = sdk(gw, alice)
    try:
        thread = client.beta.messages.thread(model="m", max_tokens=64)
        assert (await thread.send({"role": "user", "content": "My name is Alice."})).id == "msg_0"
        again = await thread.send({"role": "user", "content": "What is my name?"})
    finally:
        await client.close()
    assert again.id == "msg_2" and len(up.bodies) == 3
    assert up.bodies[2]["thread"] == {"type": "create"}
    said = [message["content"] for message in up.bodies[2]["messages"]]
    assert said[0] == "My name is Alice." and said[-1] == "What is my name?", said
