"""Attack h132: 87c6a69 (`handlers/messages.py:_stored`: the file scan runs only once some
answer showed a file its code wrote, `StoredResponses.files`, and the body may spell
`file_id"`; a typed view with a quick skip of empty blocks, else `_raw_files` block by block
with fields left raw; a 400 if the messages cannot be read), attacked from outside.

Alice holds one ordinary key and wants the file bob's code wrote (`file_bob_payroll`).
Upstreams are in-process raw sockets (`Scripted`, tests/test_attack_h126). FINDING tests fail
on 87c6a69; HELD tests pin what was tried and held.
"""

from __future__ import annotations

import io
import json
import time
from typing import Any

import pytest

from gateway.handlers import messages as messages_handler
from gateway.state import STORED_KEY
from tests import test_attack_h105
from tests.conftest import app_of, create_key
from tests.raw_upstream import STREAM_HEAD
from tests.test_attack_h105 import Build, whole
from tests.test_attack_h107 import SONNET
from tests.test_attack_h126 import Scripted
from tests.test_attack_h128 import ask, claude, events, not_found, post
from tests.test_attack_h129 import bob_ran_code

build = test_attack_h105.build  # (the fixture, by its name)

Json = dict[str, Any]
BOB = "file_bob_payroll"
FILE = {"type": "file", "file_id": BOB}


def counting(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The CPU time of each `_name_files` call (the scan), in seconds: the event loop's own,
    which other tests beside it on the machine do not change (a wall clock did)."""
    spent: list[float] = []
    scan = messages_handler._name_files

    def timed(*args: Any) -> Any:
        started = time.thread_time()
        try:
            return scan(*args)
        finally:
            spent.append(time.thread_time() - started)

    monkeypatch.setattr(messages_handler, "_name_files", timed)
    return spent


# --- the file scan: its cost at 10 MB --------------------------------------------------------


def ten_mb(shape: str) -> bytes:
    """A 10 MB request of many small content blocks that may spell `file_id"` (a `\\u` escape
    of one of its letters, which turns the search on)."""
    one = {
        "text": b'{"type":"text","text":"a"},',
        "tool_results": b'{"type":"tool_result","tool_use_id":"t","content":'
        b'[{"type":"text","text":"a"}]},',
    }[shape.split("+")[0]]
    head = b""
    if shape.endswith("+fetched"):  # (an object `content`: the view fails, the raw walk runs)
        head = b'{"type":"web_fetch_tool_result","tool_use_id":"s","content":{"type":'
        head += b'"web_fetch_tool_result_error","error_code":"url_not_accessible"}},'
    many = one * (10_000_000 // len(one))
    content = b"[" + head + many + b'{"type":"text","text":"caf\\u0065"}]'
    return b'{"model":"m","max_tokens":8,"messages":[{"role":"user","content":' + content + b"}]}"


# FINDING (medium: any key stalls the event loop for every key, once any answer showed a
# file): 87c6a69's docs/endpoints.md prices the scan at "about 5 ms a megabyte of blocks at
# worst, 12 for shapes the view does not take". Once bob's code wrote a file (`files` set), a
# 10 MB request (the gateway reads up to 32 MB whole) costs in `_name_files`: ~180 ms of
# `tool_result` blocks each holding a text block (typed view: every block with `content`
# becomes a struct, its list walked in Python; Claude Code's tool loops are this shape), and
# ~500 ms of one-character text blocks after a single `web_fetch_tool_result` (the raw walk:
# a `_RawBlock` decode, three `memoryview`s and two recursive calls per block), ~3.9 s for
# `{}` blocks that way. Expected: within the documented cost (with 50% slack: 75 ms typed,
# 180 ms raw for 10 MB). Cause: per-block Python work; fix by a byte search for known ids /
# `file_id"` per message before decoding it, or taking an object `content` in the view.
@pytest.mark.filterwarnings("ignore:Sending a large body:ResourceWarning")  # (the relay's)
@pytest.mark.parametrize(("shape", "bar"), [("tool_results", 0.075), ("text+fetched", 0.180)])
async def test_the_file_scan_of_10_mb_costs_what_its_docs_say(
    build: Build, shape: str, bar: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw, _, alice = await bob_ran_code(build)
    spent = counting(monkeypatch)
    headers = {"Authorization": f"Bearer {alice}", "Content-Type": "application/json"}
    async with gw.post("/v1/messages", data=io.BytesIO(ten_mb(shape)), headers=headers) as resp:
        await resp.read()
    assert resp.status == 200
    assert spent, "the scan did not run"
    assert sum(spent) < bar, f"{sum(spent) * 1e3:.0f} ms looking for files in 10 MB ({shape})"


# --- held ------------------------------------------------------------------------------------


def streamed_run(kind: str, result: str, output: str) -> bytes:
    """Bob's stream: a code execution result of `kind` (its `content` a `result` holding one
    `output` naming his file), shown in a `content_block_start`."""
    block = {"type": kind, "tool_use_id": "srvtoolu_1"} | {
        "content": {"type": result, "content": [{"type": output, "file_id": BOB}]}
        | {"stdout": "", "stderr": "", "return_code": 0}
        | ({"encrypted_stdout": "x"} if result.startswith("encrypted") else {})
    }
    use = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "code_execution", "input": {}}
    delta = {"stop_reason": "end_turn", "stop_sequence": None}
    return STREAM_HEAD + events(
        ("message_start", {"message": claude(0, content=[], stop_reason=None)}),
        ("content_block_start", {"index": 0, "content_block": use}),
        ("content_block_stop", {"index": 0}),
        ("content_block_start", {"index": 1, "content_block": block}),
        ("content_block_stop", {"index": 1}),
        ("message_delta", {"delta": delta, "usage": {"output_tokens": 5}}),
        ("message_stop", {}),
    )


def fetched(source: Json) -> Json:
    """A `web_fetch_tool_result` (an object `content`: the view fails) holding a document."""
    document = {"type": "document", "source": source}
    inner = {"type": "web_fetch_result", "url": "https://example.com/r", "content": document}
    return {"type": "web_fetch_tool_result", "tool_use_id": "srvtoolu_9", "content": inner}


HIDDEN: list[Json] = [
    fetched(FILE),  # raw walk: content.content.source.file_id
    fetched({"type": "content", "content": [{"type": "image", "source": FILE}]}),
    {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "container_upload"} | FILE]},
    {
        "type": "document",
        "source": {"type": "content", "content": [{"type": "image"} | {"source": FILE}]},
    },
]


# HELD: every code execution result of anthropic-python 2.17 that carries a `file_id`
# (`CodeExecutionResultBlock`, `EncryptedCodeExecutionResultBlock` ("in place of
# `code_execution_result` when the code called the web search tool"),
# `BashCodeExecutionResultBlock`), shown only in a stream's `content_block_start`, sets
# `files` and makes the file bob's: alice naming it in a web fetch's document (raw walk), in
# a content source's image, in a tool result's `container_upload`, with the key spaced
# before its colon or escaped, is 404 and nothing goes upstream.
@pytest.mark.parametrize(
    ("kind", "result", "output"),
    [
        ("code_execution_tool_result", "code_execution_result", "code_execution_output"),
        ("code_execution_tool_result", "encrypted_code_execution_result", "code_execution_output"),
        (
            "bash_code_execution_tool_result",
            "bash_code_execution_result",
            "bash_code_execution_output",
        ),
    ],
)
async def test_a_file_shown_only_in_a_stream_is_bobs_in_every_spelling(
    build: Build, kind: str, result: str, output: str
) -> None:
    run = streamed_run(kind, result, output)
    up = Scripted(lambda n, _: run if n == 0 else whole(claude(n)))
    gw = await build("anthropic", up, SONNET)
    bob, alice = await create_key(gw, name="bob"), await create_key(gw, name="alice")
    assert app_of(gw)[STORED_KEY].files is False
    async with gw.post("/v1/messages", json=ask(stream=True), headers=_auth(bob)) as resp:
        assert resp.status == 200 and BOB.encode() in await resp.read()
    assert app_of(gw)[STORED_KEY].files is True
    for block in HIDDEN:
        raw = json.dumps(ask(messages=[{"role": "user", "content": [block]}]))
        for spelled in (raw, raw.replace('"file_id":', '"file_id"  \n :'), _escaped(raw)):
            for path in ("/v1/messages", "/v1/messages/count_tokens"):
                not_found(*await post(gw, alice, spelled.encode(), path))
    assert len(up.bodies) == 1
    mine = [{"type": "text", "text": "caf\u00e9"}, {"type": "document", "source": FILE}]
    assert (await post(gw, bob, ask(messages=[{"role": "user", "content": mine}])))[0] == 200


def _escaped(raw: str) -> str:
    return raw.replace('"file_id"', '"file\\u005fid"').replace(BOB, "file_\\u0062ob_payroll")


def _auth(secret: str) -> Json:
    return {"Authorization": f"Bearer {secret}"}


# HELD (the gate's regressions): before any answer showed a file, Claude Code-like traffic
# (a tool loop whose results are escaped text, a document by data, an image by data) is not
# scanned at all and passes; after bob's run, the same traffic from alice is scanned and
# passes, a legit shape never gets "messages could not be read"; her naming bob's file is 404.
async def test_claude_code_traffic_before_and_after_a_file_was_shown(
    build: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    spent = counting(monkeypatch)
    pixel = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}
    turns = [
        {"role": "user", "content": "Fix the bug in caf\u00e9.py \u2014 please"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "Look \u2026", "signature": "sig"},
                {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"x": "\u00e9"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "is_error": False}
                | {"content": [{"type": "text", "text": "print('\u00e9')\n" * 2_000}]},
                {"type": "image", "source": pixel},
                {"type": "document", "source": {"type": "text", "media_type": "text/plain"}}
                | {"title": 'file_id"', "context": "x"},
            ],
        },
    ]
    # (An escaped letter of `file_id`, as a client may write any: what turns the search on.)
    body = json.dumps(ask(messages=turns)).encode().replace(b"Fix the", b"Fix th\\u0065")
    assert b"\\u" in body
    up0 = Scripted(lambda n, _: whole(claude(n)))
    gw0 = await build("anthropic", up0, SONNET)
    carol = await create_key(gw0, name="carol")
    assert (await post(gw0, carol, body))[0] == 200
    assert not spent  # (no file shown yet: nothing looked for)
    gw, up, alice = await bob_ran_code(build)
    spent.clear()
    status, answer = await post(gw, alice, body)
    assert status == 200, answer
    assert spent  # (scanned now)
    assert up.bodies[-1]["messages"] == turns
    turns[2]["content"].append(fetched(FILE))
    not_found(*await post(gw, alice, json.dumps(ask(messages=turns)).encode()))
