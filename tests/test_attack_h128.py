"""Attack h128: what Anthropic stores for one key of a `/v1/messages` pass-through, named by
another key (e3e17b5: the code execution container is the key's whose answer showed it).

Every key of the model shares one Anthropic account, and Anthropic resolves by id, for any
request of the account, more than a container: a message thread (`thread.previous_message_id`,
which the SDK's `client.beta.messages.thread()` and its tool runner send on every turn), a
request's prompt fingerprint (`diagnostics.previous_message_id`) and the Files API files a
key's code wrote (`bash_code_execution_output.file_id`, named back by `container_upload` or a
`file` source). Alice holds one ordinary key and wants what bob's answers showed. Upstreams
are in-process raw sockets (`Scripted`, tests/test_attack_h126). FINDING tests fail on
ee53bcd; HELD tests pin what was tried and held.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import anthropic
import pytest

from gateway.state import STORED_KEY, USAGE_KEY
from tests import test_attack_h105
from tests.conftest import NEVER_HANG, app_of, create_key
from tests.raw_upstream import STREAM_HEAD, auth, sse
from tests.test_attack_h105 import Build, completion, whole
from tests.test_attack_h107 import SONNET
from tests.test_attack_h124 import claude_request, thinking_reply, thinking_stream
from tests.test_attack_h126 import Scripted

build = test_attack_h105.build  # (the fixture, by its name)

Json = dict[str, Any]
USAGE = {"input_tokens": 10, "output_tokens": 5}
THREADS = {"anthropic-beta": "message-threads-2026-08-12"}
SECRET = "Payroll: Dana 9,120 EUR"


def claude(number: int, content: list[Json] | None = None, **fields: Any) -> Json:
    """A whole Anthropic `message`, `msg_<number>`."""
    return {
        "id": f"msg_{number}",
        "type": "message",
        "role": "assistant",
        "model": SONNET,
        "content": content or [{"type": "text", "text": "ok"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": USAGE,
    } | fields


def answering(first: Json) -> Scripted:
    """An upstream answering the first request (bob's) `first`, every later one its own."""
    return Scripted(lambda n, _: whole(first if n == 0 else claude(n)))


def ask(**fields: Any) -> Json:
    return {
        "model": "m",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "go"}],
    } | fields


async def post(gw: Any, secret: str, body: Json | bytes, path: str = "/v1/messages") -> Any:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = auth(secret) | THREADS | {"Content-Type": "application/json"}
    async with gw.post(path, data=data, headers=headers) as resp:
        return resp.status, await resp.json()


def not_found(status: int, body: Json) -> None:
    assert status == 404, body
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error", body


async def anthropic_gateway(build: Build, up: Any) -> tuple[Any, str, str]:
    gw = await build("anthropic", up, SONNET)
    return gw, await create_key(gw, name="bob"), await create_key(gw, name="alice")


def sdk(gw: Any, secret: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(api_key=secret, base_url=str(gw.make_url("")), max_retries=0)


# --- message threads: Anthropic's previous_response_id ------------------------------------------


# FINDING (high: another key's whole conversation): anthropic-python 2.17 `BetaMessageThreadParam`
# ("Server-held conversation state ... `{"type": "create"}` asks the server to hold this
# conversation's state under the response's `id`; `{"type": "continue", "previous_message_id":
# ...}` resumes from a previous response so only the new turn's messages are sent"), and
# `system`/`tools` are taken from the thread on a continue (`CREATE_ONLY_FIELDS`). The SDK's
# `client.beta.messages.thread()` sends it, and so does its tool runner unless told not to
# (`BaseMessageThread._for_tool_runner`: `threading = thread is not False`). Bob's thread (his
# system prompt holds a secret) answers `msg_0`; alice's request continuing `msg_0` is relayed
# (200): Anthropic resumes bob's conversation, system prompt and all, for her. The same id in
# `diagnostics.previous_message_id` (`BetaDiagnosticsParam`: the server compares "that
# request's prompt fingerprint" with this one and answers `cache_miss_reason`,
# `system_changed` / `tools_changed` / `messages_changed` with the tokens missed) is an oracle
# on bob's prompt (low). Expected: 404 `not_found_error`, nothing upstream, as
# `previous_response_id` on the Responses pass-through (`gateway.stored`). Cause:
# `handlers/messages.py:_container` is the only id a Messages request is checked for, and
# `providers/anthropic/passthrough.py` remembers no message id (only `_show_container`).
@pytest.mark.parametrize(
    "fields",
    [
        {"thread": {"type": "continue", "previous_message_id": "msg_0"}},
        {"diagnostics": {"previous_message_id": "msg_0"}},
    ],
    ids=["thread", "diagnostics"],
)
async def test_bobs_message_thread_is_not_found_for_alice(build: Build, fields: Json) -> None:
    up = answering(claude(0))
    gw, bob, alice = await anthropic_gateway(build, up)
    client = sdk(gw, bob)
    try:
        thread = client.beta.messages.thread(model="m", max_tokens=64, system=SECRET)
        reply = await thread.send({"role": "user", "content": "Remember the payroll."})
    finally:
        await client.close()
    assert reply.id == "msg_0" and up.bodies[0]["thread"] == {"type": "create"}
    status, body = await post(gw, alice, ask(**fields))
    not_found(status, body)
    assert len(up.bodies) == 1  # nothing went upstream


# FINDING (medium: a key's budget and tokens per minute passed): a thread continued sends only
# the new turn, but Anthropic bills the conversation it holds as the prompt again (as OpenAI a
# stored `conversation`). On the Responses pass-through a continuation not known here is held
# as a file sent by id (`stored.UNKNOWN_CONVERSATION`, docs/keys.md "What admission counts";
# tests/test_stored_ids `test_a_request_in_a_conversation_is_held_as_unknown`: 429 on a
# 9,000-token key). A `thread` continue on a 9,000-token key is held as its few new words: 200,
# and Anthropic bills the whole thread. Expected: 429 as there. Cause: `handlers/messages.py:
# _begin` holds the translated request's estimate only (no `thread` read).
async def test_a_continued_thread_is_held_as_a_stored_conversation(build: Build) -> None:
    up = answering(claude(0))
    gw = await build("anthropic", up, SONNET)
    secret = await create_key(gw, budget_tokens=9_000)
    thread = {"type": "continue", "previous_message_id": "msg_made_elsewhere"}
    status, body = await post(gw, secret, ask(max_tokens=10, thread=thread))
    assert status == 429, body


# FINDING (high for users of the SDK's threads: their conversation silently cut to its last
# turn): on a model routed to a translated (OpenAI) upstream, `thread` is neither refused nor
# honoured: MessagesRequest drops it as an unknown field. The SDK's second turn sends only
# "What is my name?" (`ThreadState.create_arguments`: a continue sends only what the server
# lacks), and the upstream is asked that alone, without the first turn. Expected: the thread
# refused as `container` and `mcp_servers` are (400; with `error.details.error_code`
# "thread_unsupported_request" the SDK's `continue_unthreaded` replays the whole history,
# `ThreadState.recovers_from`), or the upstream given the whole conversation. Cause:
# `messages/request.py:to_chat` refuses `mcp_servers` and `container`, not `thread`.
async def test_a_thread_on_a_translated_route_keeps_its_first_turn(build: Build) -> None:
    chat_usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    up = Scripted(lambda n, _: completion(chat_usage))
    gw = await build("openai", up, "gpt-4o")
    client = sdk(gw, await create_key(gw))
    thread = client.beta.messages.thread(
        model="m", max_tokens=64, unsupported_request_behavior="continue_unthreaded"
    )
    try:
        await thread.send({"role": "user", "content": "My name is Bob."})
        await thread.send({"role": "user", "content": "What is my name?"})
    except anthropic.BadRequestError as refused:
        assert refused.status_code == 400  # refused, as `container` is: a clear answer
        return
    finally:
        await client.close()
    assert "My name is Bob." in json.dumps(up.bodies[-1]), up.bodies[-1]


# --- files bob's code wrote --------------------------------------------------------------------

BOBS_FILE: Json = {"type": "bash_code_execution_output", "file_id": "file_bob_payroll"}
RAN = {"type": "bash_code_execution_result", "stdout": "", "stderr": "", "return_code": 0}
BOBS_RUN: list[Json] = [
    {"type": "server_tool_use", "id": "srvtoolu_1", "name": "bash_code_execution"}
    | {"input": {"command": "python payroll.py > payroll.xlsx"}},
    {"type": "bash_code_execution_tool_result", "tool_use_id": "srvtoolu_1"}
    | {"content": RAN | {"content": [BOBS_FILE]}},
    {"type": "text", "text": "Saved payroll.xlsx."},
]


# FINDING (high: the files bob's code wrote, which e3e17b5 means to keep his): Anthropic's
# code execution answers each file the code wrote as a Files API file
# (`BetaBashCodeExecutionOutputBlock.file_id`, `BetaCodeExecutionOutputBlock.file_id`), which
# any request of the account names back: a `container_upload` block
# (`BetaContainerUploadBlockParam`: "available in the container's input directory"), or a
# document or image `file` source (`BetaFileDocumentSourceParam`, `BetaFileImageSourceParam`).
# Bob's answer (his container `container_bob`, already refused to alice) shows
# `file_bob_payroll`; alice names it in each of those ways: relayed (200), her code reads bob's
# payroll, or the model reads it to her. Expected: 404 `not_found_error`, nothing upstream.
# Cause: `providers/anthropic/passthrough.py:_show_container` is all an answer is read for
# (no block's `file_id`), and `handlers/messages.py` checks only `container`.
@pytest.mark.parametrize(
    "block",
    [
        {"type": "container_upload", "file_id": "file_bob_payroll"},
        {"type": "document", "source": {"type": "file", "file_id": "file_bob_payroll"}},
        {"type": "image", "source": {"type": "file", "file_id": "file_bob_payroll"}},
    ],
    ids=["container_upload", "document", "image"],
)
async def test_a_file_bobs_code_wrote_is_not_found_for_alice(build: Build, block: Json) -> None:
    shown = {"id": "container_bob", "expires_at": "2026-12-07T15:00:00Z"}
    up = answering(claude(0, BOBS_RUN, container=shown))
    gw, bob, alice = await anthropic_gateway(build, up)
    status, body = await post(gw, bob, ask())
    assert status == 200, body
    status, body = await post(gw, alice, ask(container="container_bob"))
    not_found(status, body)  # (e3e17b5: his container is his)
    content = [block, {"type": "text", "text": "Print this file."}]
    status, body = await post(gw, alice, ask(messages=[{"role": "user", "content": content}]))
    not_found(status, body)
    assert len(up.bodies) == 1  # nothing went upstream


# --- a stream still running ----------------------------------------------------------------------


def events(*pairs: tuple[str, Json]) -> bytes:
    return b"".join(sse({"type": kind} | fields, kind) for kind, fields in pairs)


# FINDING (low: a window as long as bob's stream): docs/endpoints.md says a container "whose id
# came back in one key's answer (`container.id` of a message, or of a stream's
# `message_start` ...) is that key's", and the Responses pass-through takes ids "from a
# stream's events as they pass (... a stream still running ...)" (h126). Bob's stream shows
# `container_bob` in its `message_start` (a `BetaMessage`, whose `container` the SDK keeps)
# and his client has it; while his code runs, alice names it: relayed (200), into his
# container. Expected: 404 while it runs, as after it. Cause: `handlers/messages.py:_relayed`
# remembers only in its `finally` (`_remember` at the end of the request). How real: the SDK
# types document the container on `message_delta` (`BetaRawMessageDeltaEvent.delta.container`,
# the stream's last event but one); when Anthropic shows it only there the window is the
# time to `message_stop`, and this is low.
async def test_a_container_shown_at_message_start_is_bobs_while_his_stream_runs(
    build: Build,
) -> None:
    shown = {"id": "container_bob", "expires_at": "2026-12-07T15:00:00Z"}
    first = events(
        ("message_start", {"message": claude(0, content=[], container=shown, stop_reason=None)}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "run"}}),
    )
    rest = events(
        ("content_block_stop", {"index": 0}),
        ("message_delta", {"delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 5}}),
        ("message_stop", {}),
    )
    up = Scripted(lambda n, _: STREAM_HEAD + first if n == 0 else whole(claude(n)))
    release = asyncio.Event()
    up.held = (rest, release)
    gw, bob, alice = await anthropic_gateway(build, up)
    async with asyncio.timeout(NEVER_HANG):
        resp = await gw.post("/v1/messages", json=ask(stream=True), headers=auth(bob))
        got = b""
        while b"container_bob" not in got:
            piece = await resp.content.readany()
            assert piece, got
            got += piece
        try:
            status, body = await post(gw, alice, ask(container="container_bob"))
        finally:
            release.set()
            await resp.read()
    not_found(status, body)
    assert len(up.bodies) == 1


# --- held ------------------------------------------------------------------------------------


# HELD: spellings of `container` naming bob's (an escaped key or id, an object with skills, a
# key given twice, the last bob's) are refused, on the token count too; what names no
# container (null, "", a number, skills only) is relayed; and the container in the
# `message_delta` of a stream that then breaks with an `error` event is still bob's.
async def test_container_spellings_and_a_broken_stream(build: Build) -> None:
    delta = {"stop_reason": "end_turn", "container": {"id": "container_bob"}}
    broken = events(
        ("message_start", {"message": claude(0, content=[], stop_reason=None)}),
        ("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}}),
        ("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": "ran"}}),
        ("content_block_stop", {"index": 0}),
        ("message_delta", {"delta": delta, "usage": {"output_tokens": 5}}),
        ("error", {"error": {"type": "overloaded_error", "message": "Overloaded"}}),
    )
    up = Scripted(lambda n, _: STREAM_HEAD + broken if n == 0 else whole(claude(n)))
    gw, bob, alice = await anthropic_gateway(build, up)
    resp = await gw.post("/v1/messages", json=ask(stream=True), headers=auth(bob))
    assert b"overloaded_error" in await resp.read()
    async with asyncio.timeout(NEVER_HANG):
        await app_of(gw)[USAGE_KEY].wait_recorded(1)
    head = b'{"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "go"}], '
    for spelled in (
        b'"\\u0063ontainer": "container_bob"}',
        b'"container": "container_\\u0062ob"}',
        b'"container": {"skills": [], "id": "container_bob"}}',
        b'"container": null, "container": "container_bob"}',
    ):
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            not_found(*await post(gw, alice, head + spelled, path))
    assert len(up.bodies) == 1
    for value in (None, "", 7, {"skills": [{"type": "anthropic", "skill_id": "xlsx"}]}):
        status, body = await post(gw, alice, ask(container=value))
        assert status == 200, (value, body)


# HELD: Claude Code-like traffic (thinking, a tool, cache marks; whole and streamed, through
# the SDK) and the token count pass as before, and nothing but its messages' ids (a thread
# or diagnostics may name them) is remembered of answers without a container; on a translated
# route, `container` is still a 400 naming it.
async def test_claude_code_traffic_and_translated_container(build: Build) -> None:

    replies = [thinking_reply(USAGE), whole(claude(1)), whole({"input_tokens": 42})]
    up = Scripted(lambda n, _: thinking_stream(USAGE) if n == 3 else replies[n % 3])
    gw = await build("anthropic", up, SONNET)
    client = sdk(gw, await create_key(gw))
    try:
        got = await client.messages.create(**claude_request(streamed=False))
        assert got.content[1].type == "tool_use", got
        answer = await client.messages.create(**ask())
        assert answer.id == "msg_1", answer
        counted = await client.messages.count_tokens(model="m", messages=ask()["messages"])
        assert counted.input_tokens == 42
        async with client.messages.stream(**claude_request(streamed=False)) as stream:
            final = await stream.get_final_message()
        assert final.content[-1].type == "text", final
    finally:
        await client.close()
    assert all(found.startswith("msg_") for found in app_of(gw)[STORED_KEY]._known)
    translated = await build("openai", Scripted(lambda n, _: b""), "gpt-4o")
    status, body = await post(translated, await create_key(translated), ask(container="c_1"))
    assert status == 400 and "container" in body["error"]["message"], body
