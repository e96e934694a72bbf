"""Attack h131: aa0c249 (`gateway/stored.py`: an item id two keys' own responses both showed is
no one's; `handlers/messages.py:_name_files`: a typed view of where files go, else a
plain-object walk of the same fields), attacked from outside with one ordinary key.

Alice wants what bob's answers showed: his Responses items (`rs_bob`, `msg_bob`...) and the
file his code wrote (`file_bob_payroll`, tests/test_attack_h129). Upstreams are in-process raw
sockets (`Scripted`, tests/test_attack_h126). FINDING tests fail on aa0c249; HELD tests pin
what was tried and held.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import pytest

from gateway.handlers import messages as messages_handler
from tests import test_attack_h105
from tests.conftest import create_key
from tests.test_attack_h105 import Build
from tests.test_attack_h126 import (
    Scripted,
    bobs_answer,
    first_bob,
    gateway,
    post as respond,
    refused,
)
from tests.test_attack_h128 import ask, not_found, post
from tests.test_attack_h129 import BOBS_FILE, bob_ran_code
from tests.test_attack_h130 import claude_upstream, responses_upstream

build = test_attack_h105.build  # (the fixture, by its name)

Json = dict[str, Any]


# --- the file scan: both reads fail ------------------------------------------------------------


# FINDING (medium: the file bob's code wrote, on an upstream whose JSON parser takes it):
# `_name_files` reads the messages through the typed view, else as plain objects, and when
# both fail it names nothing ("Anthropic refuses it"). Each fails on its own, on a request
# the gateway itself takes and relays verbatim: the view on any block whose `content` is an
# object (every `web_fetch_tool_result` / `*code_execution_tool_result` a server-tool
# conversation sends back), the plain read on a number past a double (`1e999` in a tool call's
# `input`: msgspec "Number out of range"; Python's `json` reads it as `inf`, as do proxies and
# Anthropic-compatible servers built on it). Alice's request with both, and a document whose
# source is bob's file: 200, relayed with `file_bob_payroll` in it. Expected: 404
# `not_found_error`, nothing upstream. Cause: the fallback gives up instead of refusing (or
# scanning the bytes for a known id); the typed view could take an object `content` too.
async def test_an_unreadable_number_does_not_hide_bobs_file(build: Build) -> None:
    gw, up, alice = await bob_ran_code(build)
    sent = len(up.bodies)
    fetched = {"type": "web_fetch_tool_result_error", "error_code": "url_not_accessible"}
    turns = [
        {"role": "user", "content": "Fetch the report, then total it."},
        {
            "role": "assistant",
            "content": [
                {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_fetch"}
                | {"input": {"url": "https://example.com/report"}},
                {"type": "web_fetch_tool_result", "tool_use_id": "srvtoolu_1"}
                | {"content": fetched},
                {"type": "tool_use", "id": "toolu_1", "name": "total", "input": {"x": 1e999}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "inf"},
                {"type": "document", "source": BOBS_FILE},
            ],
        },
    ]
    raw = json.dumps(ask(messages=turns)).replace("Infinity", "1e999").encode()
    assert b"1e999" in raw and json.loads(raw)  # (Python's json takes it)
    not_found(*await post(gw, alice, raw))
    assert len(up.bodies) == sent, up.bodies[-1]["messages"][-1]


# --- the file scan: its cost -----------------------------------------------------------------


def blocks(shape: str) -> bytes:
    """A 2 MB request of many small content blocks that spells `file_id"` (a `\\u` escape)."""
    one = b'{"type":"text","text":""},'
    head = b""
    if shape.endswith("+fetched"):  # (an object `content`: the view fails, the walk runs)
        head = b'{"type":"web_fetch_tool_result","tool_use_id":"s","content":{"type":'
        head += b'"web_fetch_tool_result_error","error_code":"url_not_accessible"}},'
    many = one * (2_000_000 // len(one))
    content = b"[" + head + many + b'{"type":"text","text":"caf\\u00e9"}]'
    return b'{"model":"m","max_tokens":8,"messages":[{"role":"user","content":' + content + b"}]}"


# FINDING (medium: any key stalls the event loop for every key; h130's bar, 20 ms for 2 MB):
# aa0c249 skips tool inputs in C, but the view still makes a Python object per content block
# and `_files_in` walks each one in Python (a generator, a tuple path, three fields), and the
# fallback builds a dict per block and walks it again. A 2 MB request of small blocks, which
# the gateway reads whole before Anthropic ever sees it, costs in `_stored` ~35 ms (text
# blocks, ~0.5 s at the default 32 MB `max_body_bytes`), ~65-70 ms after one
# `web_fetch_tool_result` (~1 s at 32 MB); `_name_files` alone on 30 MB of `{}` blocks ~4.4 s
# typed, ~7 s via the fallback (the gateway refuses those before the scan). Expected:
# ≤ 20 ms for 2 MB. Cause: per-block Python work; a block without `file_id`/`source`/
# `content` need not become an object at all (e.g. skip it by a byte search per message, or
# decode `file_id`-bearing paths only).
@pytest.mark.filterwarnings("ignore:Sending a large body:ResourceWarning")  # (the relay's)
@pytest.mark.parametrize("shape", ["text", "text+fetched"])
async def test_the_file_scan_of_2_mb_of_small_blocks_is_cheap(
    build: Build, shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await build("anthropic", claude_upstream(), "claude-sonnet-4-5")
    ana = await create_key(gw, name="ana")
    hello = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    assert (await post(gw, ana, hello))[0] == 200  # (its message id remembered)
    spent: list[float] = []
    scan = messages_handler._stored

    def timed(*args: Any) -> Any:
        started = time.thread_time()
        try:
            return scan(*args)
        finally:
            spent.append(time.thread_time() - started)

    monkeypatch.setattr(messages_handler, "_stored", timed)
    headers = {"Authorization": f"Bearer {ana}", "Content-Type": "application/json"}
    async with gw.post("/v1/messages", data=io.BytesIO(blocks(shape)), headers=headers) as resp:
        await resp.read()
    assert spent, "the scan did not run"
    assert sum(spent) < 0.020, f"{sum(spent) * 1e3:.0f} ms looking for files in 2 MB"


# --- rule 1: contested item ids ----------------------------------------------------------------


# HELD: on an upstream with unique ids, alice cannot make bob's items shown in her own answer
# without naming them: bob's reasoning item sent back by value (its `id`), an MCP approval
# answering his item, an `item_reference` are each 404 and nothing goes upstream; her own
# fresh answers leave his items his, and bob still sends them back.
async def test_alice_cannot_contest_bobs_items_on_unique_ids(build: Build) -> None:
    up = Scripted(first_bob(bobs_answer()))
    gw, bob, alice = await gateway(build, up)
    assert (await respond(gw, bob, {"model": "m", "input": "pay"}))[0] == 200
    sent = len(up.bodies)
    by_value = {"type": "reasoning", "id": "rs_bob", "summary": []}
    approval = {"type": "mcp_approval_response", "approval_request_id": "msg_bob"}
    for item, param in [
        (by_value, "input[0].id"),
        (approval | {"approve": True}, "input[0].approval_request_id"),
        ({"type": "item_reference", "id": "ci_bob"}, "input[0].id"),
    ]:
        turn = {"model": "m", "input": [item, {"role": "user", "content": "go"}]}
        refused(*await respond(gw, alice, turn), param)
    assert len(up.bodies) == sent
    for number in range(2):  # (her own answers: `msg_a<n>` in fresh responses)
        assert (await respond(gw, alice, {"model": "m", "input": f"hi {number}"}))[0] == 200
    turn = {"model": "m", "input": [by_value, {"role": "user", "content": "go"}]}
    refused(*await respond(gw, alice, turn), "input[0].id")
    mine = {"model": "m", "input": [{"type": "item_reference", "id": "rs_bob"}]}
    assert (await respond(gw, bob, mine))[0] == 200


# HELD (rule 1 as documented, and its regressions): an upstream numbering each response's
# items anew (`msg_1` in every one, response ids unique). Bob's `msg_1` is refused to alice
# until her own response shows `msg_1`; then it is no one's, relayed for both. Bob's response
# id is not contested with it: continuing `resp_0` is still 404 for alice, 200 for bob, and
# bob's own multi-turn flow keeps working.
async def test_a_contested_item_id_leaves_the_response_its_keys(build: Build) -> None:
    up = responses_upstream(numbered=False)
    gw, bob, alice = await gateway(build, up)
    status, first = await respond(gw, bob, {"model": "m", "input": "I am Bob."})
    assert status == 200 and first["id"] == "resp_0", first
    reference = {"model": "m", "input": [{"type": "item_reference", "id": "msg_1"}]}
    refused(*await respond(gw, alice, reference), "input[0].id")
    assert (await respond(gw, alice, {"model": "m", "input": "I am Alice."}))[0] == 200
    assert (await respond(gw, alice, reference))[0] == 200
    assert (await respond(gw, bob, reference))[0] == 200
    again = {"model": "m", "input": "My name?", "previous_response_id": "resp_0"}
    refused(*await respond(gw, alice, again), "previous_response_id")
    status, second = await respond(gw, bob, again)
    assert status == 200 and second["previous_response_id"] == "resp_0", second
    onwards = again | {"previous_response_id": second["id"]}
    assert (await respond(gw, bob, onwards))[0] == 200
    refused(*await respond(gw, alice, onwards), "previous_response_id")
