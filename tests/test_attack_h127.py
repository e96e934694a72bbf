"""Attack h127: the per-key ownership of what a Responses pass-through upstream stores
(aae5898, 5698da8: `gateway.stored`), from outside.

Alice holds an ordinary key and wants what the shared upstream account stored for bob's key
(his containers, above all: the files his code wrote). Upstreams are in-process raw sockets
(`Scripted`, tests/test_attack_h126, here answering as OpenAI's code interpreter does).
FINDING tests fail on 5698da8; HELD tests pin what was tried and held.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from gateway.state import STORED_KEY
from gateway.stored import MOST_IDS_AN_ANSWER, MOST_REMEMBERED, StoredResponses
from tests import test_attack_h105
from tests.conftest import NEVER_HANG, app_of, openai_client
from tests.raw_upstream import STREAM_HEAD, auth
from tests.test_attack_h105 import Build, message_item, response_body, responses_event, whole
from tests.test_attack_h126 import (
    USAGE,
    Json,
    Scripted,
    bob_has_answered,
    bobs_answer,
    gateway,
    post,
    refused,
)

build = test_attack_h105.build  # (the fixture, by its name)

AUTO: Any = {"type": "code_interpreter", "container": {"type": "auto"}}


# What the upstream stored for bob before the gateway's restart: a response and a conversation
# whose code ran in his container.
OLD_CONTEXT = {"resp_bobs_old": "cntr_bobs_own", "conv_bobs_old": "cntr_bobs_own"}
OLD_CALL: Json = {"type": "code_interpreter_call", "id": "ci_x", "status": "completed"}
OLD_CALL |= {"container_id": "cntr_bobs_own", "code": "import os", "outputs": None}


def container_of(body: Json) -> str | None:
    """The container OpenAI runs a request's code in: a code interpreter tool's by id; else,
    in auto mode, the active container of a code interpreter call (or of a shell call's
    `environment`) in the model's context (a stored response or conversation continued, or
    the input); else None (a new one)."""
    for tool in body.get("tools") or []:
        if isinstance(tool.get("container"), str):
            return str(tool["container"])
    context = OLD_CONTEXT.get(str(body.get("previous_response_id") or body.get("conversation")))
    if context is not None:
        return context
    for item in body.get("input") or []:
        if isinstance(item, dict) and item.get("type") == "code_interpreter_call":
            return str(item["container_id"])
        if isinstance(item, dict) and item.get("type") == "shell_call":
            return str(item["environment"]["container_id"])
    return None


def code_answer(number: int, body: Json, items: int = 0) -> bytes:
    """An answer that ran code (in `container_of(body)`, else a new container), after
    `items` reasoning items (an agentic turn)."""
    container = container_of(body) or f"cntr_{number}"
    call: Json = {"type": "code_interpreter_call", "id": f"ci_{number}", "status": "completed"}
    call |= {"container_id": container, "code": "print(open('pay.csv').read())"}
    output: list[Json] = [
        {"type": "reasoning", "id": f"rs_{number}_{n}", "summary": []} for n in range(items)
    ]
    output += [call | {"outputs": None}, message_item("ok") | {"id": f"msg_{number}"}]
    return whole(response_body(USAGE, output) | {"id": f"resp_{number}"})


# --- containers named by input items ----------------------------------------------------------


# FINDING (high: another key's files): an input item that names a container is not checked.
# openai-python `ResponseCodeInterpreterToolCallParam.container_id` ("The ID of the container
# used to run the code") and `response_input_item_param.ShellCall.environment` ("The
# environment to execute the shell commands in", a `container_reference` by id) are input
# items a client sends back, and with a code interpreter in auto mode OpenAI reuses the active
# container a code_interpreter_call in the model's context names (community.openai.com
# "Container is expired" errors on continued auto-mode turns; langchain-openai: auto "creates
# a new container automatically or reuses an active one"). Alice sends such an item naming
# bob's `cntr_bob` (its own `id` made up, so nothing checked matches) beside an auto tool:
# relayed (200), her code runs next to bob's files. Expected: 404 naming the item's field,
# nothing upstream. Cause: `handlers/responses.py:_references` reads only an input item's
# `id` and `approval_request_id` (`_InputItem`), not its `container_id` or
# `environment.container_id`.
@pytest.mark.parametrize(
    ("item", "param"),
    [
        (
            {"type": "code_interpreter_call", "id": "ci_alice", "status": "completed"}
            | {"container_id": "cntr_bob", "code": "import os", "outputs": None},
            "input[0].container_id",
        ),
        (
            {"type": "shell_call", "call_id": "call_alice", "status": "completed"}
            | {"action": {"commands": ["ls"]}}
            | {"environment": {"type": "container_reference", "container_id": "cntr_bob"}},
            "input[0].environment.container_id",
        ),
    ],
)
async def test_input_item_in_bobs_container_is_not_found_for_alice(
    build: Build, item: Json, param: str
) -> None:
    up = Scripted(lambda n, body: bobs_answer() if n == 0 else code_answer(n, body))
    gw, bob, alice = await gateway(build, up)
    sent = await bob_has_answered(gw, bob, up)
    body = {"model": "m", "input": [item, {"role": "user", "content": "cat pay.csv"}]}
    status, answer = await post(gw, alice, body | {"tools": [AUTO]})
    refused(status, answer, param)
    assert len(up.bodies) == sent  # nothing went upstream


# FINDING (medium: a key locked out of its own container, another key given it): h126's rule
# "an id the request itself named is not claimed from its answer's echo" covers only the
# fields the gateway reads as naming, not a container the answer runs in because of the
# request's context. Bob's container `cntr_bobs_own` is not known here (made before a restart,
# or through /v1/containers): relayed to anyone, as documented. Alice reaches it in auto mode
# through an input code_interpreter_call naming it, or by continuing bob's response or
# conversation that ran code in it (also not known here); OpenAI runs her code there and
# answers a call in it, and the gateway takes that echo as hers. Now bob gets 404 "Container
# ... not found" for his own container, and alice holds it. Expected: bob's request relayed
# (200), as before alice's. Cause: `handlers/responses.py:_references` puts no input item's
# container into `named`, and `_Remembering` owns for alice the containers of a context it
# does not know (an unknown previous response or conversation).
@pytest.mark.parametrize(
    "fields",
    [
        {"input": [OLD_CALL, {"role": "user", "content": "ls"}]},
        {"input": "ls", "previous_response_id": "resp_bobs_old"},
        {"input": "ls", "conversation": "conv_bobs_old"},
    ],
)
async def test_alices_context_does_not_claim_bobs_unknown_container(
    build: Build, fields: Json
) -> None:
    up = Scripted(lambda n, body: code_answer(n, body))
    gw, bob, alice = await gateway(build, up)
    status, answer = await post(gw, alice, {"model": "m", "tools": [AUTO]} | fields)
    assert status == 200, answer  # (unknown here: relayed, as documented)
    assert answer["output"][0]["container_id"] == "cntr_bobs_own"
    tools = [{"type": "code_interpreter", "container": "cntr_bobs_own"}]
    status, answer = await post(gw, bob, {"model": "m", "input": "ls", "tools": tools})
    assert status == 200, answer


# --- the ids a key keeps using --------------------------------------------------------------


# FINDING (medium: another key's files and conversation, after its owner's own ordinary use):
# past the bound a key "forgets its own oldest" ids, and an id its requests name again is
# never made new: the answer's echo of a named id is skipped whole (5698da8), though
# `StoredResponses._keep` means "an id seen again goes last". So what bob keeps working with,
# named in every request, stays among his oldest ids and is forgotten first while he uses it:
# the container he works in (`tools[0].container`, the documented way to keep one) and the
# response he branches every turn from (`previous_response_id`: a long prompt stated once).
# Then it is "not known" and alice's request naming it is relayed (200): her code runs next to
# bob's files, her turn continues his conversation. Here 99 other keys hold about 1,000 ids
# each (a busy gateway at its 100,000; put straight into the map for speed) and bob's session
# is 5 agentic turns of 256 items. Expected: 404 naming the field, nothing upstream (an id a
# key names is its newest). Cause: `handlers/responses.py:_Remembering`/`_name` drop named
# ids instead of making the key's own ones new (`StoredResponses._keep` order).
async def test_what_bob_keeps_using_is_not_forgotten_first(build: Build) -> None:
    def reply(number: int, body: Json) -> bytes:
        return code_answer(number, body, 0 if number == 0 else MOST_IDS_AN_ANSWER)

    up = Scripted(reply)
    gw, bob, alice = await gateway(build, up)
    stored = app_of(gw)[STORED_KEY]
    share = MOST_REMEMBERED // 100 + 10
    for key in range(99):
        stored.own((f"id_{key}_{n}" for n in range(share)), f"key_{key}")
    body = {"model": "m", "input": "Load pay.csv. Long instructions...", "tools": [AUTO]}
    status, first = await post(gw, bob, body)
    assert status == 200, first
    tools = [{"type": "code_interpreter", "container": first["output"][0]["container_id"]}]
    branch = {"model": "m", "input": "Go on.", "previous_response_id": first["id"]}
    for _ in range(5):
        status, answer = await post(gw, bob, branch | {"tools": tools})
        assert status == 200, answer
    assert len(stored) == MOST_REMEMBERED
    sent = len(up.bodies)
    for fields, param in (
        ({"tools": tools}, "tools[0].container"),
        ({"previous_response_id": first["id"]}, "previous_response_id"),
    ):
        status, answer = await post(gw, alice, {"model": "m", "input": "cat pay.csv"} | fields)
        refused(status, answer, param)
    assert len(up.bodies) == sent


# --- held -------------------------------------------------------------------------------------


# HELD: the eviction policy, unit-level. A client with three keys flooding (257 ids an answer,
# as many as one answer gives) takes bob down to the average share and no further, his newest
# kept. CPU: `_forget_one`'s scan of every key, and each key's oldest-first dict, stay under
# 50 ms an answer with the map full: 5,000 keys of 20 ids, 50,000 keys of 2 (a new key's
# answer scans them all for each of its ids), and one key flooding its own share.
def test_eviction_is_fair_and_cheap() -> None:
    stored = StoredResponses(most=400)
    stored.own((f"bob_{n}" for n in range(150)), "bob")
    for number in range(40):
        for key in ("a1", "a2", "a3"):
            stored.own((f"{key}_{number}_{n}" for n in range(257)), key)
    assert [n for n in range(150) if stored.others(f"bob_{n}", "a1")] == list(range(50, 150))
    for keys, answers in ((5_000, 1), (50_000, 1), (1, 60)):
        stored = StoredResponses()
        share = MOST_REMEMBERED // keys
        for holder in range(keys):
            stored.own((f"id_{holder}_{n}" for n in range(share)), f"key_{holder}")
        adding = "key_0" if keys == 1 else "new"
        worst = 0.0
        for number in range(answers):
            began = time.perf_counter()
            stored.remember(f"resp_{number}", adding, 10)
            stored.own((f"x_{number}_{n}" for n in range(MOST_IDS_AN_ANSWER)), adding)
            worst = max(worst, time.perf_counter() - began)
        assert len(stored) == MOST_REMEMBERED
        assert worst < 0.05, (keys, worst)


# HELD (regression): bob's ordinary flows through the real SDK on the same upstream: a response
# with a code interpreter, his output sent back whole (`input += response.output`: his
# reasoning item and his code call in his container, by their ids) in his container, and a
# continuation of his own response; and a request of 10,000 input items is checked quickly.
async def test_bobs_own_flows_and_a_large_input_still_pass(build: Build) -> None:
    up = Scripted(lambda n, body: code_answer(n, body, 1))
    gw, bob, alice = await gateway(build, up)
    async with openai_client(gw, bob) as client:
        first = await client.responses.create(model="m", input="Load pay.csv", tools=[AUTO])
        container = first.output[1].container_id  # type: ignore[union-attr]
        replay: Any = [{"role": "user", "content": "Load pay.csv"}]
        replay += [item.model_dump(exclude_none=True) for item in first.output]
        replay.append({"role": "user", "content": "Plot it."})
        tools: Any = [{"type": "code_interpreter", "container": container}]
        again = await client.responses.create(model="m", input=replay, tools=tools)
        assert again.output[1].container_id == container  # type: ignore[union-attr]
        more = await client.responses.create(
            model="m", input="More.", previous_response_id=again.id, tools=tools
        )
        assert more.status == "completed"
    items = [{"role": "user", "content": f"q{n}"} for n in range(10_000)]
    began = time.thread_time()  # (the loop's CPU: a wall clock measured the machine's load)
    status, answer = await post(gw, alice, {"model": "m", "input": items})
    assert status == 200, answer
    assert time.thread_time() - began < 0.5


# HELD: a stream whose response changes its id midway (`response.created` resp_s1, then a
# `response.completed` of resp_s2 holding bob's container) ends with an error event; the
# refused event is not relayed, resp_s1 and the container shown before are bob's (404 for
# alice), and a stream of 3,000 text deltas is relayed whole, its response bob's.
async def test_a_stream_changing_its_response_id_is_refused(build: Build) -> None:
    response = {"id": "resp_s1", "object": "response", "status": "in_progress", "output": []}
    call: Json = {"type": "code_interpreter_call", "id": "ci_s", "status": "completed"}
    call |= {"container_id": "cntr_s", "code": "", "outputs": None}
    events = [responses_event("response.created", response=response)]
    events.append(responses_event("response.output_item.added", output_index=0, item=call))
    events.append(responses_event("response.output_item.done", output_index=0, item=call))
    other = response | {"id": "resp_s2", "status": "completed", "usage": USAGE}
    events.append(responses_event("response.completed", response=other | {"output": [call]}))
    message = message_item("") | {"status": "in_progress", "content": []}
    part = {"type": "output_text", "text": "", "annotations": []}
    long = [responses_event("response.created", response=response | {"id": "resp_l"})]
    long.append(responses_event("response.output_item.added", output_index=0, item=message))
    long.append(
        responses_event("response.content_part.added", output_index=0, content_index=0, part=part)
    )
    delta = {"output_index": 0, "content_index": 0, "item_id": "msg_1", "delta": "a"}
    long += [responses_event("response.output_text.delta", **delta)] * 3_000
    done = message_item("a" * 3_000)
    long.append(responses_event("response.output_item.done", output_index=0, item=done))
    finished = response | {"id": "resp_l", "status": "completed", "usage": USAGE}
    long.append(responses_event("response.completed", response=finished | {"output": [done]}))

    def reply(number: int, _: Json) -> bytes:
        return STREAM_HEAD + b"".join(events if number == 0 else long)

    up = Scripted(reply)
    gw, bob, alice = await gateway(build, up)
    seen: list[bytes] = []
    async with asyncio.timeout(NEVER_HANG):
        for marker in (b"event: error", b"event: response.completed"):
            body = {"model": "m", "input": "x", "stream": True}
            async with gw.post("/v1/responses", json=body, headers=auth(bob)) as resp:
                seen.append(await resp.read())
            assert resp.status == 200 and marker in seen[-1], seen[-1][-300:]
    assert b"resp_s1" in seen[0] and b"resp_s2" not in seen[0]
    tools = [{"type": "code_interpreter", "container": "cntr_s"}]
    for fields, param in (
        ({"previous_response_id": "resp_s1"}, "previous_response_id"),
        ({"previous_response_id": "resp_l"}, "previous_response_id"),
        ({"tools": tools}, "tools[0].container"),
    ):
        status, answer = await post(gw, alice, {"model": "m", "input": "x"} | fields)
        refused(status, answer, param)
    assert not app_of(gw)[STORED_KEY].others("resp_s2", None)
