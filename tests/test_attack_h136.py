"""Attack h136: the shared stored ids (`gateway.stored_share`) after fbfb159 (no lookup when
no route relays; an adopted id keeps its day; files asked for by requests, not by the tick).

Two gateways in this process on one database (SQLite, then PostgreSQL), as workers or
replicas are; upstreams are in-process raw sockets (`Scripted`). FINDING tests fail on
f0c01fd; HELD tests pin what was tried and held.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import structlog

from gateway.state import STORE_KEY, STORED_KEY
from gateway.stored import StoredResponses
from tests import test_attack_h135
from tests.conftest import app_of, create_key, openai_client
from tests.test_attack_h105 import post as post_json, response_body, whole
from tests.test_attack_h107 import SONNET
from tests.test_attack_h126 import Scripted
from tests.test_attack_h128 import BOBS_RUN, ask, claude, not_found, post as post_messages, sdk
from tests.test_attack_h135 import (
    FUNCTION,
    PASSES,
    TRANSLATED,
    Open,
    Route,
    bobs,
    chat_answer,
    count_lookups,
    flush,
    two,
)
from tests.test_stored_ids import refused
from tests.test_stored_share import Gateway, knows_keys

open_gw = test_attack_h135.open_gw  # (the fixture, by its name)

Json = dict[str, Any]


def count_file_queries(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many times `gw` asks its database whether files were seen, from now on."""
    store = app_of(gw)[STORE_KEY]
    real = store.stored_files
    asked = [0]

    async def counted() -> bool:
        asked[0] += 1
        return await real()

    monkeypatch.setattr(store, "stored_files", counted)
    return asked


def claudes(n: int, body: Json) -> bytes:
    return whole(claude(n))


# FINDING (low-medium: a database round trip on the path of ordinary Messages requests, and
# a wait of up to the pool's timeouts, 5 s to connect / 30 s a command, for each of them
# while the database hangs): on a gateway where no process ever saw a file Anthropic's code
# wrote (most deployments: no code execution), `look_up` asks `files_seen()` for every
# request that `may_spell(body, b'file_id"')`, and `may_spell` is true for any `\u` escape.
# The anthropic SDK itself escapes control characters (`json.dumps(ensure_ascii=False)`
# still writes `\u001b`), so a tool loop whose tool results hold terminal colours (a bash
# tool's output: Claude Code's traffic) queries the database on every turn, though nothing
# in it names a file. docs/keys.md: "a process asks the database at its start, then with
# each /v1/messages request that may name a file". Expected: no query for a request whose
# body has no `"file_id": "..."` member. Fix: ask only when `_FILE_ID.search(body)` finds a
# member (the regular expression the search uses, which reads escapes exactly), and ask at
# most once per `usage_flush_seconds` (a request arriving meanwhile uses the last answer).
async def test_ordinary_sdk_messages_do_not_ask_the_database_for_files(
    open_gw: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Scripted(claudes)
    gw = await open_gw(("anthropic", up, SONNET, {}))
    bob = await create_key(gw)
    asked = count_file_queries(gw, monkeypatch)
    tool_use = {"type": "tool_use", "id": "toolu_1", "name": "bash", "input": {"cmd": "pytest"}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1"}
    result["content"] = "\x1b[32m3 passed\x1b[0m in 0.1s"
    turns: list[Any] = [
        {"role": "user", "content": "Run the tests."},
        {"role": "assistant", "content": [tool_use]},
        {"role": "user", "content": [result]},
    ]
    tools: Any = [{"name": "bash", "input_schema": {"type": "object"}}]
    client = sdk(gw, bob)
    try:
        for _ in range(3):
            made = await client.messages.create(
                model="m", max_tokens=64, messages=turns, tools=tools
            )
            turns += [
                {"role": "assistant", "content": [b.model_dump() for b in made.content]},
                {"role": "user", "content": "And now?"},
            ]
    finally:
        await client.close()
    assert len(up.bodies) == 3
    assert b"\\u001b" in json.dumps(up.bodies[0], ensure_ascii=False).encode()
    assert asked[0] == 0, f"{asked[0]} file queries for 3 requests that name no file"


# FINDING (low: log spam and a connection attempt per request while the database is down;
# a regression of c845a94, "asked again ... without a log line per tick"): while no file is
# known here, every Messages request that may name one asks `stored_files()`, and each
# failure logs `stored_files_lookup_failed` at warning level: a Files API document sent with
# every turn (the common way to give Claude a PDF) writes one warning a request for as long
# as the database is down (and each waits for the failed connection). The docs name only
# `stored_ids_lookup_failed` for failed lookups. Expected: at most one line for the outage.
# Fix: log the first failure and the recovery only (as `failing` does for writes), and ask
# again at most once per `usage_flush_seconds` while it fails.
async def test_a_database_down_logs_the_file_question_once(
    open_gw: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Scripted(claudes)
    gw = await open_gw(("anthropic", up, SONNET, {}))
    bob = await create_key(gw)
    store = app_of(gw)[STORE_KEY]

    async def down() -> bool:
        raise ConnectionRefusedError

    monkeypatch.setattr(store, "stored_files", down)
    document = {"type": "document", "source": {"type": "file", "file_id": "file_011_upload"}}
    turns: list[Json] = [{"role": "user", "content": [document, {"type": "text", "text": "sum"}]}]
    with structlog.testing.capture_logs() as logs:
        for _ in range(4):
            status, answered = await post_messages(gw, bob, ask(messages=turns))
            assert status == 200, answered
            turns += [{"role": "assistant", "content": "ok"}, {"role": "user", "content": "more"}]
    failed = [line for line in logs if line["event"] == "stored_files_lookup_failed"]
    assert len(failed) <= 1, f"{len(failed)} warnings for 4 requests"


# FINDING (low: a database query on every turn of every conversation, growing with it, where
# the docs say none is made): fbfb159 skips the lookup when no route of the model relays
# the request (`passthrough.relays` over all routes), but `native_first` relays only when the
# router's first route is a pass-through one (or a `refusal` forces it): on a model whose
# first route is translated (a chat upstream) and whose fallback passes Responses through,
# every request is translated, the gateway mints the Responses ids itself (`fc_`, `msg_`),
# never remembers them, and the openai SDK's tool loop sends them back every turn: each is
# looked up, found nowhere, and asked again at the next turn (and past 10,000 items such a
# conversation gets a false 400 `too_many_stored_ids`). docs/keys.md: "a translated request
# sends no stored id upstream: the ids the gateway makes for its own Responses answers are
# not looked up". Expected: no lookup. Fix: `relays` as `native_first` decides: true only
# when `translation.refusal` is set or `routes[0]` has the capability (the routes
# `prepare` gets are the exchange's, in the order `native_first` takes them).
async def test_a_translated_first_route_with_a_pass_through_fallback_looks_nothing_up(
    open_gw: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat, passes = Scripted(chat_answer), Scripted(bobs)
    gw = await open_gw(("openai", chat, "gpt-5", TRANSLATED), ("openai", passes, "gpt-5", PASSES))
    bob = await create_key(gw)
    asked = count_lookups(gw, monkeypatch)
    async with openai_client(gw, bob) as client:
        items: list[Any] = [{"role": "user", "content": "go"}]
        for turn in range(3):
            made = await client.responses.create(model="m", input=items, tools=[FUNCTION])
            items += [item.model_dump(exclude_none=True) for item in made.output]
            if turn == 0:
                call_id = made.output[0].model_dump()["call_id"]
                items.append({"type": "function_call_output", "call_id": call_id, "output": "1"})
            else:
                items.append({"role": "user", "content": "and?"})
    assert len(chat.bodies) == 3 and passes.bodies == []
    assert asked == [], f"{len(asked)} lookups of {sum(map(len, asked))} ids"


def items_answer(n: int, body: Json) -> bytes:
    """Bob's answer (the first) shows `rs_a_bob`, alice's (the second) `rs_z_alice`: bob's
    id sorts first in the database."""
    item = "rs_a_bob" if n == 0 else "rs_z_alice" if n == 1 else f"rs_{n}"
    output = [{"type": "reasoning", "id": item, "summary": []}]
    usage = {"input_tokens": 3, "output_tokens": 2}
    return whole(response_body(usage, output) | {"id": f"resp_{n}"})


# FINDING (low: needs a full memory map, here of one id; the map holds 100,000): the lookup
# adopts every row found (`StoredResponses.adopt`) into a map that is full, each adoption
# forgetting the oldest id of the key with the largest share; an id adopted first (bob's)
# can be forgotten by the adoption of a later row of the same lookup (alice's own ids, made
# on another process). `resolve` then answers "one is now known" (alice's), `_stored` is
# read again, bob's id is unknown again, and alice's request is relayed with it: what bob's
# upstream stored, to alice. Expected: 404, nothing upstream. Fix: decide the refusal from
# the rows the lookup found (any row owned by another key refuses the request, whatever the
# map kept), or let `adopt` never forget an id of the batch it is adopting.
async def test_an_id_adopted_into_a_full_map_is_refused_all_the_same(open_gw: Open) -> None:
    up = Scripted(items_answer)
    first, second, bob, alice = await two(open_gw, ("openai", up, "gpt-5", PASSES))
    for secret in (bob, alice):
        status, answered = await post_json(
            first, secret, "/v1/responses", {"model": "m"} | {"input": "hi"}
        )
        assert status == 200, answered
    await flush(first)
    app_of(second)[STORED_KEY]._most = 1  # (the map full: one id)
    refs = [{"type": "item_reference", "id": i} for i in ("rs_z_alice", "rs_a_bob")]
    body = {"model": "m", "input": refs}
    refused(*await post_json(second, alice, "/v1/responses", body), "input[1].id")
    assert len(up.bodies) == 2


# --- what held ---------------------------------------------------------------------------------


# HELD: a process that never saw a file (its `files` off) asks the database when a request
# may name one, and a `file_id` spelled with escapes (`file\u005fid`, its value escaped too)
# is found: alice is refused bob's file on the second gateway, and on a gateway started
# after bob's answer was written (a restart: it asks at its start); nothing goes upstream.
async def test_an_escaped_file_id_on_a_process_that_knew_no_file_is_refused(
    open_gw: Open,
) -> None:
    up = Scripted(lambda n, _: whole(claude(n, BOBS_RUN if n == 0 else None)))
    first, second, bob, alice = await two(open_gw, ("anthropic", up, SONNET, {}))
    assert (await post_messages(first, bob, ask()))[0] == 200
    await flush(first)
    third = await open_gw(("anthropic", up, SONNET, {}))
    await knows_keys(third)
    assert not app_of(second)[STORED_KEY].files and app_of(third)[STORED_KEY].files
    raw = (
        b'{"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": [{"type":'
        b' "container_upload", "file\\u005fid": "file\\u005fbob_payroll"}]}]}'
    )
    for gw in (second, third):
        not_found(*await post_messages(gw, alice, raw))
    assert len(up.bodies) == 1
    assert app_of(second)[STORED_KEY].files


DOCUMENT: Json = {"type": "document", "source": {"type": "file", "file_id": "file_bob_payroll"}}


def bobs_thread(n: int, body: Json) -> bytes:
    """Bob's first message runs code (a file) in `container_bob`; later ones are plain."""
    if n == 0:
        return whole(claude(0, BOBS_RUN, container={"id": "container_bob"}))
    return whole(claude(n))


# HELD: a model whose first route is translated and whose fallback is Anthropic's
# pass-through: what forces the native route (a thread, a container) on the second gateway
# is looked up and refused to alice (stream and count_tokens alike); bob's own thread goes.
async def test_a_refusal_forcing_the_native_fallback_is_looked_up(open_gw: Open) -> None:
    chat = Scripted(chat_answer)
    up = Scripted(bobs_thread)
    routes: list[Route] = [("openai", chat, "gpt-5", TRANSLATED), ("anthropic", up, SONNET, {})]
    first, second, bob, alice = await two(open_gw, *routes)
    thread = {"type": "continue", "previous_message_id": "msg_0"}
    assert (await post_messages(first, bob, ask(thread={"type": "create"})))[0] == 200
    await flush(first)
    counted = ask(messages=[], thread=thread)
    del counted["max_tokens"]
    for body, path in (
        (ask(messages=[], thread=thread), "/v1/messages"),
        (ask(messages=[], thread=thread, stream=True), "/v1/messages"),
        (counted, "/v1/messages/count_tokens"),
        (ask(container="container_bob"), "/v1/messages"),
        (ask(messages=[{"role": "user", "content": [DOCUMENT]}]), "/v1/messages"),
    ):
        not_found(*await post_messages(second, alice, body, path))
    assert len(up.bodies) == 1 and chat.bodies == []
    status, answered = await post_messages(second, bob, ask(messages=[], thread=thread))
    assert status == 200, answered


# HELD: a model with no route that relays Messages (a chat upstream only) asks the database
# nothing, whatever a request spells (`file_id`, escapes), and names nothing upstream.
async def test_a_translated_only_messages_model_asks_nothing(
    open_gw: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    chat = Scripted(chat_answer)
    gw = await open_gw(("openai", chat, "gpt-5", TRANSLATED))
    bob = await create_key(gw)
    files = count_file_queries(gw, monkeypatch)
    asked = count_lookups(gw, monkeypatch)
    raw = (
        b'{"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": [{"type":'
        b' "text", "text": "caf\\u00e9 \\"file_id\\": \\"file_x\\""}]}]}'
    )
    status, answered = await post_messages(gw, bob, raw)
    assert status == 200, answered
    assert files == [0] and asked == []


# HELD: an id read from the database keeps the day it was written: used the same day it is
# not journaled again, used on a later day it is; a row marked as a file turns the search
# for files on; a contested row is no one's (relayed for both keys, as documented).
def test_adopt_keeps_the_day_and_the_file_mark() -> None:
    known = StoredResponses()
    known.journal = {}
    day = [20_000]
    known.today = lambda: day[0]
    seen = day[0] * 86400.0 + 10.0
    known.adopt(
        [
            ("rs_bob", "key_bob", -1, 0, seen),
            ("file_bob", "key_bob", -1, 1, seen),
            ("rs_both", "*", -1, 0, seen),
        ]
    )
    assert known.files
    assert known.use("rs_bob", "key_bob") is False
    assert known.journal == {}
    assert known.use("rs_both", "key_alice") is None
    assert known.use("rs_both", "key_bob") is None
    assert known.use("file_bob", "key_alice") is True
    day[0] += 1
    assert known.use("rs_bob", "key_bob") is False
    assert list(known.journal) == ["rs_bob"]


# HELD: no other endpoint names what Anthropic stores: a chat completion (or a Responses
# request, translated) on an Anthropic model that sends bob's file by its id is refused by
# the translation (only inline files), on a process that never looked anything up.
async def test_other_endpoints_cannot_name_a_file_on_an_anthropic_model(
    open_gw: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Scripted(lambda n, _: whole(claude(n, BOBS_RUN if n == 0 else None)))
    first, second, bob, alice = await two(open_gw, ("anthropic", up, SONNET, {}))
    assert (await post_messages(first, bob, ask()))[0] == 200
    await flush(first)
    asked = count_lookups(second, monkeypatch)
    part = {"type": "file", "file": {"file_id": "file_bob_payroll"}}
    chat = {"model": "m", "messages": [{"role": "user", "content": [part]}]}
    status, answered = await post_json(second, alice, "/v1/chat/completions", chat)
    assert status == 400, answered
    item = {"type": "input_file", "file_id": "file_bob_payroll"}
    body = {"model": "m", "input": [{"role": "user", "content": [item]}]}
    status, answered = await post_json(second, alice, "/v1/responses", body)
    assert status == 400, answered
    assert len(up.bodies) == 1 and asked == []
