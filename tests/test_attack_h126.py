"""Attack h126: the per-key ownership of what a Responses pass-through upstream stores
(aae5898, `gateway.stored`), from outside.

Alice holds one ordinary key and wants what the shared upstream account stored for bob's key:
his responses, output items, code containers, conversations. The upstream resolves any of
them by id for any request of the account, so the gateway must refuse (404, nothing sent
upstream) every field that names one of bob's ids. Upstreams are in-process raw sockets
(`Scripted`, answering each request as the test says) and `Stateful` (tests/test_attack_h125:
an upstream that stores and resolves like OpenAI). FINDING tests fail on aae5898; HELD tests
pin what was tried and held.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import openai
import pytest

from gateway.state import STORED_KEY
from gateway.stored import MOST_IDS_AN_ANSWER, MOST_REMEMBERED
from tests import test_attack_h105, test_attack_h125
from tests.conftest import NEVER_HANG, app_of, create_key
from tests.raw_upstream import STREAM_HEAD, auth, read_request
from tests.test_attack_h105 import Build, message_item, response_body, responses_event, whole
from tests.test_attack_h125 import BOB_SECRET, Kiosk

build = test_attack_h105.build  # (the fixtures, by their names)
kiosk = test_attack_h125.kiosk

USAGE = {"input_tokens": 10, "output_tokens": 10, "total_tokens": 20}
Json = dict[str, Any]


class Scripted:
    """A raw upstream answering its n-th request with `reply(n, body)` and closing; with
    `held` (rest, release) the first answer's `rest` is written only once `release` is set."""

    def __init__(self, reply: Callable[[int, Json], bytes]) -> None:
        self.reply = reply
        self.bodies: list[Json] = []
        self.port = 0
        self.held: tuple[bytes, asyncio.Event] | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _, raw = await read_request(reader)
            number = len(self.bodies)
            self.bodies.append(json.loads(raw))
            writer.write(self.reply(number, self.bodies[-1]))
            await writer.drain()
            if number == 0 and self.held is not None:
                rest, release = self.held
                await release.wait()
                writer.write(rest)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def bobs_answer(**fields: Any) -> bytes:
    """Bob's whole answer: a reasoning item, a code interpreter call in his container, a
    message; in his conversation."""
    output = [
        {"type": "reasoning", "id": "rs_bob", "summary": []},
        {"type": "code_interpreter_call", "id": "ci_bob", "status": "completed"}
        | {"container_id": "cntr_bob", "code": "open('pay.csv','w')", "outputs": None},
        message_item("ok") | {"id": "msg_bob"},
    ]
    body = response_body(USAGE, output) | {"id": "resp_bob", "conversation": {"id": "conv_bob"}}
    return whole(body | fields)


def alices_answer(number: int) -> bytes:
    return whole(response_body(USAGE, [message_item("hi") | {"id": f"msg_a{number}"}]))


def first_bob(first: bytes) -> Callable[[int, Json], bytes]:
    """The first request (bob's) gets `first`, every later one an answer of its own."""
    return lambda number, _: first if number == 0 else alices_answer(number)


async def gateway(build: Build, up: Any) -> tuple[Any, str, str]:
    gw = await build("openai", up, "gpt-5", fields={"responses_api": True})
    return gw, await create_key(gw, name="bob"), await create_key(gw, name="alice")


async def post_raw(gw: Any, secret: str, body: bytes) -> tuple[int, Json]:
    headers = auth(secret) | {"Content-Type": "application/json"}
    async with gw.post("/v1/responses", data=body, headers=headers) as resp:
        return resp.status, await resp.json()


async def post(gw: Any, secret: str, body: Json) -> tuple[int, Json]:
    return await post_raw(gw, secret, json.dumps(body).encode())


def refused(status: int, body: Json, param: str) -> None:
    """The 404 OpenAI answers for a stored object it does not have, naming `param`."""
    assert status == 404, body
    assert body["error"]["type"] == "not_found_error", body
    assert str(body["error"]["param"]).startswith(param), body


async def bob_has_answered(gw: Any, bob: str, up: Scripted) -> int:
    status, answer = await post(gw, bob, {"model": "m", "input": f"Pay: {BOB_SECRET}"})
    assert status == 200, answer
    return len(up.bodies)


# --- containers named another way ----------------------------------------------------------


# FINDING (high: another key's files, as h125's container finding): OpenAI's hosted `shell`
# tool runs in a container named by id, `{"type": "shell", "environment": {"type":
# "container_reference", "container_id": ...}}` (openai-python `FunctionShellToolParam`,
# "References a container created with the /v1/containers endpoint"; a code interpreter's
# container is one of those). Bob's `cntr_bob` is known as his (his answer's
# code_interpreter_call), yet alice's shell tool naming it is relayed: 200, and upstream her
# commands run in bob's container, next to his files. Expected: 404 naming the tool
# (`tools[0]...`), nothing upstream. Cause: `handlers/responses.py:_refuse_other_containers`
# reads only a `code_interpreter` tool's `container`.
async def test_shell_tool_in_bobs_container_is_not_found_for_alice(build: Build) -> None:
    up = Scripted(first_bob(bobs_answer()))
    gw, bob, alice = await gateway(build, up)
    sent = await bob_has_answered(gw, bob, up)
    environment = {"type": "container_reference", "container_id": "cntr_bob"}
    tools = [{"type": "shell", "environment": environment}]
    body = {"model": "m", "input": "cat pay.csv", "tools": tools}
    status, answer = await post(gw, alice, body)
    refused(status, answer, "tools[0]")
    assert len(up.bodies) == sent  # nothing went upstream


# FINDING (high: another key's files): the container of bob's hosted shell is not taken as
# his. OpenAI answers a `shell` tool with `container_auto` with `shell_call` items whose
# `environment` is `{"type": "container_reference", "container_id": "cntr_..."}` (the container
# it made, holding what bob's commands wrote; openai-python `ResponseFunctionShellToolCall`).
# Only an item's top-level `container_id` is read, so `cntr_shell_bob` stays unknown and
# alice's code interpreter in it is relayed (200). Expected: 404 `tools[0].container`, nothing
# upstream. Cause: `providers/openai_responses.py:_read_answer` (and `_event_type`) read
# `item.container_id` only, not `item.environment.container_id`.
async def test_bobs_hosted_shell_container_is_not_found_for_alice(build: Build) -> None:
    environment = {"type": "container_reference", "container_id": "cntr_shell_bob"}
    call = {"type": "shell_call", "id": "sh_bob", "call_id": "call_1", "status": "completed"}
    call |= {"action": {"commands": ["echo pay > pay.txt"]}, "environment": environment}
    answer = whole(response_body(USAGE, [call, message_item("done") | {"id": "msg_bob"}]))
    up = Scripted(first_bob(answer))
    gw, bob, alice = await gateway(build, up)
    sent = await bob_has_answered(gw, bob, up)
    tools = [{"type": "code_interpreter", "container": "cntr_shell_bob"}]
    status, answer = await post(gw, alice, {"model": "m", "input": "cat pay.txt", "tools": tools})
    refused(status, answer, "tools[0].container")
    assert len(up.bodies) == sent


# --- a conversation beside a previous response -----------------------------------------------


# FINDING (medium: another key's conversation, on an upstream that takes both fields): with a
# `previous_response_id` (alice's own, or one unknown here) the request's `conversation` is
# not checked at all, so bob's `conv_bob` goes upstream for alice (200). OpenAI refuses the
# pair itself today, but whether another key's conversation reaches the account should not
# rest on that: an OpenAI-compatible upstream (or a later OpenAI) that reads `conversation`
# hands alice bob's. Expected: 404 `conversation`, nothing upstream. Cause:
# `handlers/responses.py:_stored_prompt`: `elif present(req.conversation)` after the
# previous response.
async def test_bobs_conversation_beside_a_previous_response_is_not_found(build: Build) -> None:
    up = Scripted(first_bob(bobs_answer()))
    gw, bob, alice = await gateway(build, up)
    sent = await bob_has_answered(gw, bob, up)
    status, mine = await post(gw, alice, {"model": "m", "input": "hi"})
    assert status == 200, mine
    sent += 1
    for previous in (mine["id"], "resp_made_elsewhere"):
        body = {"model": "m", "input": "Repeat.", "previous_response_id": previous}
        status, answer = await post(gw, alice, body | {"conversation": "conv_bob"})
        refused(status, answer, "conversation")
    assert len(up.bodies) == sent


# --- a stream still running ---------------------------------------------------------------


# FINDING (medium: another key's files, for as long as bob's stream runs): the ids a stream
# shows are remembered only when it ends (`_remember` in `_pass_through`'s `finally`), not as
# its events pass. Bob's code interpreter container is made, and its id sent to bob, at the
# `output_item.added` of its call; a reasoning model then works on for minutes. Meanwhile
# alice's tool naming `cntr_live` (and her continuation of `resp_live`) is relayed (200).
# Expected: 404 as soon as bob has been shown the id (docs/keys.md: ids are "read ... from a
# stream's events as they pass"), nothing upstream. Cause: `handlers/responses.py:
# _pass_through` calls `_remember(ex)` after the relay; `ResponsesRelay._event_type` only
# collects into `call.stored_ids`.
async def test_ids_of_bobs_running_stream_are_his_at_once(build: Build) -> None:
    response = {"id": "resp_live", "object": "response", "status": "in_progress", "output": []}
    call = {"type": "code_interpreter_call", "id": "ci_live", "status": "in_progress"}
    call |= {"container_id": "cntr_live", "code": "", "outputs": None}
    first = STREAM_HEAD + responses_event("response.created", response=response)
    first += responses_event("response.output_item.added", output_index=0, item=call)
    done = call | {"status": "completed"}
    finished = response | {"status": "completed", "output": [done], "usage": USAGE}
    rest = responses_event("response.output_item.done", output_index=0, item=done)
    rest += responses_event("response.completed", response=finished)
    up = Scripted(first_bob(first))
    release = asyncio.Event()
    up.held = (rest, release)
    gw, bob, alice = await gateway(build, up)
    async with asyncio.timeout(NEVER_HANG):
        stream = await gw.post(
            "/v1/responses",
            json={"model": "m", "input": BOB_SECRET, "stream": True},
            headers=auth(bob),
        )
        seen = b""
        while b"cntr_live" not in seen:  # bob has been shown his container
            piece = await stream.content.readany()
            assert piece, seen
            seen += piece
        tools = [{"type": "code_interpreter", "container": "cntr_live"}]
        attempts = [
            ({"tools": tools}, "tools[0].container"),
            ({"previous_response_id": "resp_live"}, "previous_response_id"),
        ]
        answers = [await post(gw, alice, {"model": "m", "input": "ls"} | f) for f, _ in attempts]
        release.set()
        assert b"response.completed" in seen + await stream.content.read()
    for (status, answer), (_, param) in zip(answers, attempts, strict=True):
        refused(status, answer, param)
    assert len(up.bodies) == 1  # bob's stream only


# --- pushing bob's ids out --------------------------------------------------------------------


# FINDING (medium: any key's stored data, after cheap traffic of one other key): the map is
# one first-in-first-out list for every key, so one key's answers push out every other key's
# ids, after which they are "not known" and relayed. 390 answers of alice's of 256 items each
# (a request asking for many parallel tool calls, or none: 50,000 one-line answers do it too,
# two ids each) and bob's response, items and container are relayed to her (200). Expected:
# one key's traffic does not forget another key's ids (a share per key, its own oldest
# forgotten first), so bob's stay refused: 404, nothing upstream. Cause:
# `stored.py:StoredResponses._keep` evicts the globally oldest id.
async def test_alice_cannot_push_bobs_ids_out(build: Build) -> None:
    def reply(number: int, _: Json) -> bytes:
        if number == 0:
            return bobs_answer()
        items = [{"type": "reasoning", "id": f"rs_{number}_{n}"} for n in range(256)]
        return whole(response_body(USAGE, items) | {"id": f"resp_{number}"})

    up = Scripted(reply)
    gw, bob, alice = await gateway(build, up)
    await bob_has_answered(gw, bob, up)
    flood = -(-MOST_REMEMBERED // (1 + MOST_IDS_AN_ANSWER))
    queue = iter(range(flood))

    async def worker() -> None:
        for _ in queue:
            status, answer = await post(gw, alice, {"model": "m", "input": "hi", "store": False})
            assert status == 200, answer

    async with asyncio.timeout(NEVER_HANG):
        await asyncio.gather(*(worker() for _ in range(8)))
    sent = len(up.bodies)
    tools = [{"type": "code_interpreter", "container": "cntr_bob"}]
    for fields, param in (
        ({"previous_response_id": "resp_bob"}, "previous_response_id"),
        ({"input": [{"type": "item_reference", "id": "msg_bob"}]}, "input[0].id"),
        ({"tools": tools}, "tools[0].container"),
    ):
        status, answer = await post(gw, alice, {"model": "m", "input": "Repeat."} | fields)
        refused(status, answer, param)
    assert len(up.bodies) == sent


# --- claiming an id by naming it --------------------------------------------------------------


# FINDING (low-medium: a key locked out of its own conversation or container): an id not known
# here (made before a restart, outside the gateway, or pushed out: previous test) becomes the
# key's whose answer echoes it, and the upstream echoes what the request named: a response's
# `conversation`, a code interpreter call's `container_id`. Alice names bob's conversation and
# container first (relayed, as documented for unknown ids) and they are recorded as hers: bob,
# whose they are, now gets 404 "Conversation ... not found" / "Container ... not found" for
# his own, while alice keeps them. Expected: an id the request itself named is not claimed by
# its answer's echo (it is no more alice's than before), so bob's requests are still relayed
# (200). Cause: `providers/openai_responses.py:_read_answer` / `_stored` take every id of the
# answer; `handlers/responses.py:_remember` owns them for the key.
async def test_naming_an_unknown_id_first_does_not_lock_its_owner_out(build: Build) -> None:
    def echo(number: int, body: Json) -> bytes:
        output: list[Json] = [message_item("ok") | {"id": f"msg_{number}"}]
        for tool in body.get("tools") or []:
            call = {"type": "code_interpreter_call", "id": f"ci_{number}", "outputs": None}
            output.insert(0, call | {"container_id": tool["container"], "code": "ls"})
        fields = {"id": f"resp_{number}", "conversation": {"id": body.get("conversation")}}
        return whole(response_body(USAGE, output) | fields)

    up = Scripted(echo)
    gw, bob, alice = await gateway(build, up)
    tools = [{"type": "code_interpreter", "container": "cntr_bobs_own"}]
    body = {"model": "m", "input": "ls", "conversation": "conv_bobs_own", "tools": tools}
    status, answer = await post(gw, alice, body)
    assert status == 200, answer  # (unknown here: relayed, as documented)
    status, answer = await post(gw, bob, body)
    assert status == 200, answer
    assert len(up.bodies) == 2


# --- held --------------------------------------------------------------------------------------


# HELD: spellings of bob's ids the gateway reads as the upstream will (msgspec: escapes
# decoded, the last of duplicate keys, as Python's json): an escaped "id" key or id, an
# item_reference with the id twice (bob's last), a message with no type sent back by id, an
# escaped tool type,
# a conversation object with more fields, a duplicate top-level `previous_response_id`;
# each a 404 naming the field, nothing upstream.
@pytest.mark.parametrize(
    ("body", "param"),
    [
        (rb'{"input": [{"type": "item_reference", "\u0069d": "msg_bob"}]}', "input[0].id"),
        (rb'{"input": [{"type": "item_reference", "id": "msg_\u0062ob"}]}', "input[0].id"),
        (rb'{"input": [{"type": "item_reference", "id": "x", "id": "msg_bob"}]}', "input[0].id"),
        (rb'{"input": [{"role": "user", "content": "x", "id": "msg_bob"}]}', "input[0].id"),
        (
            rb'{"tools": [{"type": "code_\u0069nterpreter", "container": "cntr_bob"}]}',
            "tools[0].container",
        ),
        (rb'{"conversation": {"id": "conv_bob", "metadata": {"a": 1}}}', "conversation"),
        (
            rb'{"previous_response_id": "resp_x", "previous_response_id": "resp_bob"}',
            "previous_response_id",
        ),
    ],
)
async def test_spellings_of_bobs_ids_are_refused(build: Build, body: bytes, param: str) -> None:
    up = Scripted(first_bob(bobs_answer()))
    gw, bob, alice = await gateway(build, up)
    sent = await bob_has_answered(gw, bob, up)
    status, answer = await post_raw(gw, alice, b'{"model": "m", ' + body[1:])
    refused(status, answer, param)
    assert len(up.bodies) == sent


# HELD: what a stream shows only in `response.in_progress` or `output_item.done`, and the
# response of a stream that fails with an error event after `response.created`, are bob's
# once it ended; an answer that echoes bob's known ids to alice takes nothing from bob; a
# whole answer of 10,000 items and a request of 10,000 items with ids pass (bounded work).
async def test_stream_ids_echoes_and_bounds(build: Build) -> None:
    response = {"id": "resp_s", "object": "response", "status": "in_progress", "output": []}
    item = {"type": "function_call", "id": "fc_s", "call_id": "call_s", "name": "f"}
    in_conversation = response | {"conversation": {"id": "conv_s"}}
    events = responses_event("response.created", response=response)
    events += responses_event("response.in_progress", response=in_conversation)
    added = item | {"arguments": "", "id": None, "status": "in_progress"}  # (id once done)
    events += responses_event("response.output_item.added", output_index=0, item=added)
    done = item | {"arguments": "{}", "status": "completed"}
    events += responses_event("response.output_item.done", output_index=0, item=done)
    events += responses_event("error", message="overloaded", code="server_error")
    many = [{"type": "reasoning", "id": f"rs_{n}", "summary": []} for n in range(10_000)]

    def reply(number: int, _: Json) -> bytes:
        if number == 0:
            return STREAM_HEAD + events
        if number in (1, 2):  # bob's answer, then alice's echoing bob's ids: they stay his
            return bobs_answer()
        return whole(response_body(USAGE, many) | {"id": f"resp_{number}"})

    up = Scripted(reply)
    gw, bob, alice = await gateway(build, up)
    async with gw.post(
        "/v1/responses", json={"model": "m", "input": "x", "stream": True}, headers=auth(bob)
    ) as resp:
        assert resp.status == 200 and b"event: error" in await resp.read()
    status, _ = await post(gw, bob, {"model": "m", "input": "x"})
    assert status == 200
    for fields, param in (
        ({"previous_response_id": "resp_s"}, "previous_response_id"),
        ({"conversation": {"id": "conv_s"}}, "conversation"),
        ({"input": [{"type": "item_reference", "id": "fc_s"}]}, "input[0].id"),
    ):
        status, answer = await post(gw, alice, {"model": "m"} | fields)
        refused(status, answer, param)
    status, _ = await post(gw, alice, {"model": "m", "input": "x"})  # bob's ids echoed
    assert status == 200
    status, answer = await post(gw, alice, {"model": "m", "previous_response_id": "resp_bob"})
    refused(status, answer, "previous_response_id")
    status, _ = await post(gw, alice, {"model": "m", "input": "x"})  # 10,000 items answered
    assert status == 200 and len(app_of(gw)[STORED_KEY]) < 2 * 256 + 10
    items = [{"type": "item_reference", "id": f"rs_x{n}"} for n in range(10_000)]
    status, _ = await post(gw, alice, {"model": "m", "input": items})
    assert status == 200


# HELD (regression): bob's ordinary SDK use on an upstream that stores like OpenAI: a
# response with a code interpreter, and a streamed one; bob continues his own response,
# references his own item and reuses his own container (200, his secret comes back); alice
# gets 404 for each of them, with nothing upstream.
async def test_bobs_own_stored_state_still_works_with_the_sdk(kiosk: Kiosk) -> None:
    auto: Any = [{"type": "code_interpreter", "container": {"type": "auto"}}]
    async with kiosk.sdk(kiosk.bob) as bob, kiosk.sdk(kiosk.alice) as alice:
        first = await bob.responses.create(model="stateful", input=BOB_SECRET, tools=auto)
        container = first.output[0].container_id  # type: ignore[union-attr]
        async with bob.responses.stream(
            model="stateful", input="more", previous_response_id=first.id
        ) as events:
            streamed = await events.get_final_response()
        tools: Any = [{"type": "code_interpreter", "container": container}]
        for answer in (first, streamed):
            item = answer.output[-1].id  # type: ignore[union-attr]
            again = await bob.responses.create(
                model="stateful",
                previous_response_id=answer.id,
                input=[{"type": "item_reference", "id": item}],  # type: ignore[list-item]
                tools=tools,
            )
            assert BOB_SECRET in again.output_text
            sent = len(kiosk.stateful.bodies)
            for fields in (
                {"previous_response_id": answer.id, "input": "x"},
                {"input": [{"type": "item_reference", "id": item}]},
                {"input": "x", "tools": tools},
            ):
                with pytest.raises(openai.NotFoundError):
                    await alice.responses.create(model="stateful", **fields)
            assert len(kiosk.stateful.bodies) == sent
