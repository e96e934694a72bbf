"""What an upstream stores for one key, named by another key through the Responses
pass-through (`gateway.stored`): the ids an answer shows of a response, its output items,
their code interpreter containers and its conversation are that key's; another key that names
one gets a 404 and nothing goes upstream. Ids not known here are still relayed.

The upstreams are raw sockets (tests/raw_upstream) answering the same bytes to every request,
as one upstream account answers every key of the gateway.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from gateway.state import STORED_KEY, USAGE_KEY
from gateway.stored import MOST_IDS_AN_ANSWER, UNKNOWN_CONVERSATION, StoredResponses
from tests import test_attack_h105
from tests.conftest import NEVER_HANG, app_of, create_key
from tests.raw_upstream import STREAM_HEAD, RawUpstream, auth, cut_after
from tests.test_attack_h105 import (
    Build,
    message_item,
    post,
    response_body,
    responses_event,
    whole,
)
from tests.test_attack_h107 import message, start, stream as anthropic_events, text_block

build = test_attack_h105.build  # (the fixture, by its name)

USAGE = {"input_tokens": 10, "output_tokens": 10, "total_tokens": 20}


def answer(**fields: Any) -> bytes:
    """A whole `response` with a message, a reasoning item and a code interpreter call."""
    output = [
        {"type": "reasoning", "id": "rs_bob", "summary": []},
        {"type": "code_interpreter_call", "id": "ci_bob", "status": "completed"}
        | {"container_id": "cntr_bob", "code": "print(1)", "outputs": None},
        message_item("ok"),
    ]
    return whole(response_body(USAGE, output) | fields)


async def two_keys(build: Build, upstream: RawUpstream) -> tuple[Any, str, str]:
    gw = await build("openai", upstream, "gpt-5", fields={"responses_api": True})
    return gw, await create_key(gw), await create_key(gw)


def refused(status: int, body: dict[str, Any], param: str) -> None:
    assert status == 404, body
    assert body["error"]["type"] == "not_found_error", body
    assert body["error"]["param"] == param, body


async def test_every_id_of_an_answer_is_its_keys(build: Build) -> None:
    up = RawUpstream(answer(conversation={"id": "conv_bob"}), hold=False)
    gw, bob, alice = await two_keys(build, up)
    status, first = await post(gw, bob, "/v1/responses", {"model": "m", "input": "secret"})
    assert status == 200, first
    sent = len(up.bodies)
    base = {"model": "m", "input": "Repeat."}
    attempts = [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_bob"}, "conversation"),
        ({"conversation": {"id": "conv_bob"}}, "conversation"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].id"),
        # An item sent back by its id alone: OpenAI reads a stored reasoning item by its id.
        (
            {
                "input": [
                    {"role": "user", "content": "hi"},
                    {"type": "reasoning", "id": "rs_bob", "summary": []},
                ]
            },
            "input[1].id",
        ),
        (
            {
                "tools": [
                    {"type": "web_search"},
                    {"type": "code_interpreter", "container": "cntr_bob"},
                ]
            },
            "tools[1].container",
        ),
        (
            {"input": [{"type": "mcp_approval_response", "approval_request_id": "rs_bob"}]},
            "input[0].approval_request_id",
        ),
    ]
    for fields, param in attempts:
        status, body = await post(gw, alice, "/v1/responses", base | fields)
        refused(status, body, param)
        assert "secret" not in str(body)
    assert len(up.bodies) == sent  # nothing went upstream
    # Bob names his own, and alice ids nobody's here (made elsewhere): relayed.
    for secret, fields in (
        (bob, {"conversation": "conv_bob", "input": [{"type": "item_reference", "id": "msg_1"}]}),
        (bob, {"tools": [{"type": "code_interpreter", "container": "cntr_bob"}]}),
        (alice, {"input": [{"type": "item_reference", "id": "msg_elsewhere"}]}),
        (alice, {"tools": [{"type": "code_interpreter", "container": {"type": "auto"}}]}),
    ):
        status, body = await post(gw, secret, "/v1/responses", base | fields)
        assert status == 200, body
    assert len(up.bodies) == sent + 4


async def test_an_answer_without_usage_is_its_keys_and_held_as_unknown(build: Build) -> None:
    # As a `background` response is answered: queued, without usage.
    up = RawUpstream(answer(status="queued", usage=None, background=True), hold=False)
    gw, bob, alice = await two_keys(build, up)
    status, first = await post(gw, bob, "/v1/responses", {"model": "m", "input": "secret"})
    assert status == 200, first
    body = {"model": "m", "input": "Go on.", "previous_response_id": "resp_1"}
    status, answered = await post(gw, alice, "/v1/responses", body)
    refused(status, answered, "previous_response_id")
    stored = app_of(gw)[STORED_KEY]
    owner = stored._known["resp_1"][0]
    assert stored.prompt("resp_1", owner) is UNKNOWN_CONVERSATION  # its size is not known


async def test_a_stream_cut_after_its_first_event_is_its_keys(build: Build) -> None:
    response = {"id": "resp_cut", "object": "response", "status": "in_progress", "output": []}
    response |= {"conversation": {"id": "conv_cut"}}
    item = {"type": "message", "id": "msg_cut", "role": "assistant", "status": "in_progress"}
    events = [
        responses_event("response.created", response=response),
        responses_event("response.output_item.added", output_index=0, item=item | {"content": []}),
        responses_event("response.output_text.delta", output_index=0, delta="hel"),
    ]
    up = RawUpstream(STREAM_HEAD + b"".join(events))
    gw, bob, alice = await two_keys(build, up)
    body = {"model": "m", "input": "secret", "stream": True}
    await cut_after(gw, bob, "/v1/responses", body, b"output_text.delta")
    async with asyncio.timeout(NEVER_HANG):
        await up.closed.wait()
    async with asyncio.timeout(NEVER_HANG):  # its row: it ended, what it stored is remembered
        await app_of(gw)[USAGE_KEY].wait_recorded(1)
    stored = app_of(gw)[STORED_KEY]
    assert "resp_cut" in stored._known
    assert {"msg_cut", "conv_cut"} <= stored._known.keys()
    for fields, param in (
        ({"previous_response_id": "resp_cut"}, "previous_response_id"),
        ({"input": [{"type": "item_reference", "id": "msg_cut"}]}, "input[0].id"),
        ({"conversation": "conv_cut"}, "conversation"),
    ):
        status, answered = await post(gw, alice, "/v1/responses", {"model": "m"} | fields)
        refused(status, answered, param)


async def test_an_answer_of_many_items_takes_a_bounded_number_of_ids(build: Build) -> None:
    items = [message_item("x") | {"id": f"msg_{n}"} for n in range(MOST_IDS_AN_ANSWER + 50)]
    up = RawUpstream(whole(response_body(USAGE, items)), hold=False)
    gw, bob, alice = await two_keys(build, up)
    status, first = await post(gw, bob, "/v1/responses", {"model": "m", "input": "hi"})
    assert status == 200, first
    known = app_of(gw)[STORED_KEY]._known
    assert len(known) == 1 + MOST_IDS_AN_ANSWER  # the response, and the first items' ids
    assert "msg_0" in known and f"msg_{MOST_IDS_AN_ANSWER}" not in known
    # The others are the database's (here still in the journal, not yet written): another
    # key's request naming one is refused all the same, bob's own is relayed.
    sent = len(up.bodies)
    late = f"msg_{MOST_IDS_AN_ANSWER + 49}"
    naming = {"model": "m", "input": [{"type": "item_reference", "id": late}]}
    refused(*await post(gw, alice, "/v1/responses", naming), "input[0].id")
    assert len(up.bodies) == sent
    status, again = await post(gw, bob, "/v1/responses", naming)
    assert status == 200, again


def test_an_id_keeps_its_first_key_and_a_response_its_size() -> None:
    stored = StoredResponses(most=4)
    stored.remember("resp_a", "bob", 30)
    stored.own(["resp_a", "msg_a"], "bob")  # (seen again as an item: its size stays)
    stored.own(["msg_a"], "alice")  # (an upstream answering alice with bob's id)
    assert stored.prompt("resp_a", "bob").likely == 30
    assert stored.others("msg_a", "alice") and not stored.others("msg_a", "bob")
    assert not stored.others("msg_unknown", "alice")
    # Past `most`, the key adding ids forgets its own oldest once its share is the average
    # (2 of 4 here), and a key below it takes one from the largest share.
    stored.own(["x1", "x2", "x3"], "carol")
    assert len(stored) == 4
    assert stored.others("resp_a", "alice") and stored.others("msg_a", "alice")
    assert not stored.others("x1", "alice") and stored.others("x3", "alice")
    stored.own(["y1"], "dave")
    assert len(stored) == 4 and not stored.others("resp_a", "alice")  # (bob's oldest, of 2)
    stored.own(["msg_" + "y" * 300], "bob")  # too long to remember
    assert not stored.others("msg_" + "y" * 300, "alice")


@pytest.mark.parametrize("conversation", ["conv_bob", {"id": "conv_bob"}])
async def test_a_request_in_a_conversation_is_held_as_unknown(
    build: Build, conversation: Any
) -> None:
    up = RawUpstream(answer(), hold=False)
    gw = await build("openai", up, "gpt-5", fields={"responses_api": True})
    secret = await create_key(gw, budget_tokens=9_000)  # less than an unknown conversation
    body = {"model": "m", "input": "hi", "max_output_tokens": 10, "conversation": conversation}
    status, answered = await post(gw, secret, "/v1/responses", body)
    assert status == 429, answered


def test_a_full_map_of_many_keys_forgets_from_the_largest_share_at_once() -> None:
    # 10,000 keys of two ids each fill the map. A busy key adding 30 keeps no more than the
    # average share, forgetting its own oldest; then 5,000 new keys add one each, below the
    # average: each forgets one id of a key holding the most (two), found at once (a look
    # over every key for each took seconds), and none forgets the fresh id of the key before.
    stored = StoredResponses(most=20_000)
    for key in range(10_000):
        stored.own([f"a{key}", f"b{key}"], f"key{key}")
    stored.own([f"c{n}" for n in range(30)], "busy")
    assert sum(stored.others(f"c{n}", "x") for n in range(30)) == 2
    started = time.perf_counter()
    for key in range(5_000):
        stored.own([f"new{key}"], f"new{key}")
    assert time.perf_counter() - started < 2.0
    assert len(stored) == 20_000
    assert all(stored.others(f"new{key}", "x") for key in range(5_000))
    assert all(stored.others(f"b{key}", "x") for key in range(10_000))  # (each its oldest)


# --- Anthropic's code execution containers, on the `/v1/messages` pass-through ----------------

ANTHROPIC_USAGE = {"input_tokens": 10, "output_tokens": 5}


def anthropic_answer(container: str | None) -> bytes:
    return (
        message(ANTHROPIC_USAGE)
        if container is None
        else whole(
            json.loads(message(ANTHROPIC_USAGE).split(b"\r\n\r\n", 1)[1])
            | {"container": {"id": container, "expires_at": "2026-12-07T15:00:00Z"}}
        )
    )


def anthropic_stream(container: str) -> bytes:
    delta = {"stop_reason": "end_turn", "stop_sequence": None}
    delta |= {"container": {"id": container, "expires_at": "2026-12-07T15:00:00Z"}}
    return anthropic_events(
        start(ANTHROPIC_USAGE),
        *text_block(0, "ran"),
        ("message_delta", {"delta": delta, "usage": {"output_tokens": 5}}),
        ("message_stop", {}),
    )


def ask(container: Any = None, *, stream: bool = False) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "m", "max_tokens": 64, "stream": stream}
    body["messages"] = [{"role": "user", "content": "ls"}]
    return body if container is None else body | {"container": container}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_an_anthropic_container_is_its_keys(build: Build, stream: bool) -> None:
    shown = anthropic_stream("container_bob") if stream else anthropic_answer("container_bob")
    up = RawUpstream(shown, hold=False)
    gw = await build("anthropic", up, "claude-sonnet-4-5")
    bob, alice = await create_key(gw), await create_key(gw)
    resp = await gw.post("/v1/messages", json=ask(stream=stream), headers=auth(bob))
    assert resp.status == 200, await resp.text()
    await resp.read()
    async with asyncio.timeout(NEVER_HANG):  # (remembered as the request ends)
        await app_of(gw)[USAGE_KEY].wait_recorded(1)
    sent = len(up.bodies)
    for container in ("container_bob", {"id": "container_bob", "skills": []}):
        status, body = await post(gw, alice, "/v1/messages", ask(container))
        assert status == 404, body
        assert body["type"] == "error" and body["error"]["type"] == "not_found_error", body
        status, body = await post(gw, alice, "/v1/messages/count_tokens", ask(container))
        assert status == 404, body
    assert len(up.bodies) == sent  # nothing went upstream
    resp = await gw.post(
        "/v1/messages", json=ask("container_bob", stream=stream), headers=auth(bob)
    )
    assert resp.status == 200, await resp.text()  # bob's own: relayed
    await resp.read()


async def test_naming_an_unknown_anthropic_container_does_not_claim_it(build: Build) -> None:
    up = RawUpstream(anthropic_answer("container_made_elsewhere"), hold=False)
    gw = await build("anthropic", up, "claude-sonnet-4-5")
    alice, bob = await create_key(gw), await create_key(gw)
    status, body = await post(gw, alice, "/v1/messages", ask("container_made_elsewhere"))
    assert status == 200, body  # (not known here: relayed, as documented)
    status, body = await post(gw, bob, "/v1/messages", ask("container_made_elsewhere"))
    assert status == 200, body


async def test_a_key_continues_its_own_thread_held_at_its_size(build: Build) -> None:
    # Bob's first message (5 + 10 tokens) is his; continuing it is held at that size, which a
    # 9,000-token budget takes (an unknown one, held as a file by id, it would not: h128), and
    # the thread is relayed. Alice continuing it gets the code the SDK's threads recover from.
    up = RawUpstream(anthropic_answer(None), hold=False)
    gw = await build("anthropic", up, "claude-sonnet-4-5")
    bob, alice = await create_key(gw, budget_tokens=9_000), await create_key(gw)
    status, first = await post(gw, bob, "/v1/messages", ask() | {"thread": {"type": "create"}})
    assert status == 200, first
    async with asyncio.timeout(NEVER_HANG):
        await app_of(gw)[USAGE_KEY].wait_recorded(1)
    thread = {"type": "continue", "previous_message_id": first["id"]}
    status, body = await post(gw, bob, "/v1/messages", ask() | {"thread": thread})
    assert status == 200, body
    assert up.bodies[-1]["thread"] == thread
    status, body = await post(gw, alice, "/v1/messages", ask() | {"thread": thread})
    assert status == 404, body
    assert body["error"]["details"] == {"error_code": "thread_not_found"}, body


def test_an_item_id_two_keys_own_responses_showed_is_no_ones() -> None:
    # An upstream that numbers each response's items anew shows `rs_1` in every response: the
    # id then names no one item, and no key is refused its own (h130). An answer that is
    # another key's response again (an echo) takes nothing.
    stored = StoredResponses()
    assert stored.remember("resp_a", "ana", 10)
    stored.own(["rs_1", "cntr_a"], "ana", contest=True)
    assert not stored.remember("resp_a", "ben", 10)  # (an echo of ana's response)
    stored.own(["rs_1"], "ben", contest=False)
    assert stored.others("rs_1", "ben")
    assert stored.remember("resp_b", "ben", 10)
    stored.own(["rs_1"], "ben", contest=True)
    assert not stored.others("rs_1", "ben") and not stored.others("rs_1", "ana")
    assert stored.use("rs_1", "carl") is None  # (relayed, as an id not known here)
    stored.own(["rs_1"], "ana", contest=True)  # (no one's stays no one's)
    assert not stored.others("rs_1", "ben")
    assert stored.others("resp_a", "ben") and stored.others("cntr_a", "ben")
