"""Attack h134: what an upstream stores for one key, shared through the database (04a7ce2,
`gateway.stored_share`), attacked across two gateways on one database.

Each test runs two gateways in this process on one database (SQLite, then PostgreSQL: the
`start` fixture of tests/test_stored_share), as two workers or replicas are; upstreams are
in-process raw sockets (`Scripted`). FINDING tests fail on 04a7ce2; HELD tests pin what was
tried and held.
"""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import openai
import pytest
import structlog

from gateway import stored_share
from gateway.cli_db import copy_db
from gateway.database import opened_database
from gateway.errors import StoreBusy
from gateway.state import STORE_KEY, STORED_KEY, STORED_SHARE_KEY
from gateway.stored import LONGEST_ID
from gateway.stored_share import KEEP_DAYS, LOOKUP_AT_ONCE
from tests import test_stored_share
from tests.conftest import app_of, create_key, openai_client
from tests.raw_upstream import auth
from tests.test_attack_h105 import post as post_json, whole
from tests.test_attack_h107 import SONNET
from tests.test_attack_h126 import Scripted
from tests.test_attack_h128 import BOBS_RUN, ask, claude, not_found, post as post_messages
from tests.test_stored_ids import answer, refused
from tests.test_stored_share import Gateway, Start, count_lookups, knows_keys

start = test_stored_share.start  # (the fixture, by its name)

Json = dict[str, Any]


async def bob_and_alice(
    start: Start, up: Scripted, kind: str = "openai"
) -> tuple[Gateway, Gateway, str, str]:
    model = "gpt-5" if kind == "openai" else SONNET
    first = await start(kind, up, model)
    second = await start(kind, up, model)
    bob, alice = await create_key(first), await create_key(first)
    await knows_keys(second)
    return first, second, bob, alice


def gate_lookups(gw: Gateway, monkeypatch: pytest.MonkeyPatch, together: int) -> list[list[str]]:
    """`gw`'s database lookups held until `together` of them are under way (then each runs
    for real); the ids each asked for."""
    store = app_of(gw)[STORE_KEY]
    real = store.stored_owners
    asked: list[list[str]] = []
    all_in = asyncio.Event()

    async def gated(ids: Any) -> Any:
        asked.append(list(ids))
        if len(asked) >= together:
            all_in.set()
        await asyncio.wait_for(all_in.wait(), 5)
        return await real(ids)

    monkeypatch.setattr(store, "stored_owners", gated)
    return asked


# FINDING (high: another key's whole stored conversation, by sending two requests at once):
# `StoredShare.resolve` answers whether a row was *adopted* (`StoredResponses.adopt` counts only
# ids not known here yet), and the handlers read the request's names again only then. Two
# requests on a process that never knew bob's `resp_1` (alice's twice, or alice's and bob's own
# continuation) both look it up; the first adopts it and is refused, the second finds the same
# row, adopts nothing (it is known now), is not read again and is relayed: the upstream
# continues bob's conversation for alice. Expected: both 404, nothing upstream. Fix: re-read
# when the lookup *found* a row (return `bool(found)`), or re-read whenever `unresolved` was
# looked up (the ids are in memory either way by then).
async def test_two_requests_at_once_naming_another_keys_id_are_both_refused(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Scripted(lambda n, _: answer())
    first, second, bob, alice = await bob_and_alice(start, up)
    status, body = await post_json(first, bob, "/v1/responses", {"model": "m", "input": "secret"})
    assert status == 200, body
    await app_of(first)[STORED_SHARE_KEY].flush()
    gate_lookups(second, monkeypatch, together=2)
    body = {"model": "m", "input": "Repeat.", "previous_response_id": "resp_1"}
    answers = await asyncio.gather(
        post_json(second, alice, "/v1/responses", body),
        post_json(second, alice, "/v1/responses", body),
    )
    assert len(up.bodies) == 1, [a[0] for a in answers]  # relayed: bob's conversation
    for answered in answers:
        refused(*answered, "previous_response_id")


# FINDING (high on PostgreSQL: another key's stored data; SQLite held): a lookup fails open
# (`stored_ids_lookup_failed`, relayed), and it looks every id a request names up in one
# query. PostgreSQL's text cannot hold a NUL (`\u0000`, which JSON and msgspec take), so a
# request that names, next to bob's `resp_1`, any id holding one (an input item's `id`) fails
# the whole query (`UntranslatableCharacterError`) and bob's id is relayed: alice continues
# bob's conversation on any replica that has not seen it. `_share` keeps such ids out of the
# journal, not out of the lookup. Expected: 404. Fix: never look up what the database cannot
# hold (not ASCII, a NUL, longer than LONGEST_ID: no row can match), and fail *closed* (503)
# when a lookup that matters fails, or at least look each id up on its own.
async def test_a_nul_in_one_named_id_does_not_relay_another_named_id(
    start: Start,
) -> None:
    up = Scripted(lambda n, _: answer())
    first, second, bob, alice = await bob_and_alice(start, up)
    status, body = await post_json(first, bob, "/v1/responses", {"model": "m", "input": "secret"})
    assert status == 200, body
    await app_of(first)[STORED_SHARE_KEY].flush()
    body = {
        "model": "m",
        "input": [{"type": "message", "role": "user", "content": "Repeat.", "id": "m\u0000"}],
        "previous_response_id": "resp_1",
    }
    refused(*await post_json(second, alice, "/v1/responses", body), "previous_response_id")
    assert len(up.bodies) == 1


# FINDING (high on PostgreSQL): the same on the Messages API, with nothing Anthropic checks: a
# tool_use block's `input` is the client's own JSON, and `{"file_id": "\u0000"}` in it is a
# file candidate (`_name_files`' regular expression reads the whole body) looked up with bob's
# thread `msg_0`: the query fails, and alice's request continuing bob's thread is relayed.
async def test_a_nul_file_id_in_a_tool_input_does_not_relay_another_keys_thread(
    start: Start,
) -> None:
    up = Scripted(lambda n, _: whole(claude(n, BOBS_RUN if n == 0 else None)))
    first, second, bob, alice = await bob_and_alice(start, up, "anthropic")
    assert (await post_messages(first, bob, ask()))[0] == 200
    await app_of(first)[STORED_SHARE_KEY].flush()
    # (Files are searched for from then on.)
    assert await app_of(second)[STORED_SHARE_KEY].files_seen()
    turns = [
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "f"}
                | {"input": {"file_id": "\u0000"}}
            ],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1"} | {"content": "done"}],
        },
    ]
    thread = {"type": "continue", "previous_message_id": "msg_0"}
    not_found(*await post_messages(second, alice, ask(messages=turns, thread=thread)))
    assert len(up.bodies) == 1


# FINDING (medium: a cost any key imposes, before anything checks it): a request names any
# number of ids not known here, and each is looked up, `LOOKUP_AT_ONCE` a query, one query
# after another, before the model, the key's access to it, its rate limits or its budget are
# checked. 10,000 Responses input items (the most the schema takes) each naming 4 ids make
# 157 queries (~0.2 s) for a request refused as `model_not_found`; on the Messages API, once
# a file was ever shown, every `"file_id": "..."` anywhere in the body is one (a tool_use
# input is free-form): a 31 MB body of 1.25 M of them made 4,883 queries (3.5 s SQLite, 5.3 s
# PostgreSQL) for a request then refused. Ids no row can match (longer than LONGEST_ID, not
# ASCII, with a NUL) are looked up too. Nothing is cached as absent, so each repeat costs the
# same; on SQLite the one connection serves every other key's lookups and the usage writes
# in turn. Expected: a bounded number of queries per request (here at most 4). Fix: look up
# only what a row can hold, at most a few hundred ids a request (more is not a real request:
# refuse it, 400), and after the model/permission checks.
async def test_a_request_naming_thousands_of_unknown_ids_makes_few_queries(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    gw = await start("openai", Scripted(lambda n, _: answer()), "gpt-5")
    alice = await create_key(gw)
    asked = count_lookups(gw, monkeypatch)
    items = [
        {"type": "function_call", "id": f"fc_{i}", "call_id": "c", "name": "f"}
        | {"arguments": "{}", "approval_request_id": f"ap_{i}", "container_id": f"cn_{i}"}
        | {"environment": {"container_id": f"en_{i}"}}
        for i in range(10_000)
    ]
    data = json.dumps({"model": "nope", "input": items}).encode()
    headers = auth(alice) | {"Content-Type": "application/json"}
    async with gw.post("/v1/responses", data=io.BytesIO(data), headers=headers) as resp:
        status, body = resp.status, await resp.json()
    assert status == 404 and body["error"]["code"] == "model_not_found", body
    assert len(asked) <= 4, f"{len(asked)} queries, {sum(map(len, asked))} ids"


# FINDING (medium: another key's conversation or files, 30 days after they were made, however
# often they were used since): an id's row is written when it is learned, when its size
# changes and when it is contested; a key *using* it (`StoredResponses.use`, the refresh that
# keeps it in memory) writes nothing, and the hourly forgetting deletes rows by when they were
# last written. OpenAI's conversations are not subject to the 30-day TTL of responses, and
# Anthropic's Files API files (what code execution wrote) stay until deleted: bob makes
# `conv_bob` and keeps using it daily; 30 days after he made it, its row is gone, and every
# process that has not held it since (another worker, a replica, the gateway after a restart)
# relays alice's request naming it. Expected: refused. Fix: journal a use (at most once a day
# an id: write `seen` when a known id is used and its row is older than a day), or keep
# conversations and files until they are deleted upstream.
async def test_a_conversation_its_key_keeps_using_is_not_forgotten(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Scripted(lambda n, _: answer(conversation={"id": "conv_bob"}))
    first, second, bob, alice = await bob_and_alice(start, up)
    clock = Clock()
    monkeypatch.setattr(stored_share, "time", clock)
    clock.days = -29.0  # bob made it 29 days ago
    status, body = await post_json(first, bob, "/v1/responses", {"model": "m", "input": "secret"})
    assert status == 200, body
    await app_of(first)[STORED_SHARE_KEY].flush()
    clock.days = 0.0  # today he goes on with it, as every day
    body = {"model": "m", "input": "And today?", "conversation": "conv_bob"}
    assert (await post_json(first, bob, "/v1/responses", body))[0] == 200
    await app_of(first)[STORED_SHARE_KEY].flush()
    # Two days later, the hourly forgetting.
    await app_of(first)[STORE_KEY].forget_stored(time.time() + (2 - KEEP_DAYS) * 86400.0)
    sent = len(up.bodies)
    status, body = await post_json(second, alice, "/v1/responses", body)
    assert len(up.bodies) == sent, "relayed: bob's conversation"
    refused(status, body, "conversation")


class Clock:
    """`stored_share`'s `time`, `days` off."""

    days = 0.0

    def time(self) -> float:
        return time.time() + self.days * 86400.0

    def monotonic(self) -> float:
        return time.monotonic()


# FINDING (low-medium: another key's files for `usage_flush_seconds` after each start):
# `StoredResponses.files`, which turns on the search of Messages requests for file ids, is set
# from the database only by the share task's first tick, one `usage_flush_seconds` after the
# start (and never while its own writes fail: `_tick` checks after `flush`, which raises). A
# worker just (re)started, or a replica that never saw a file, does not look for files at all
# meanwhile, so no file id is looked up and bob's file, which the database holds, is relayed
# to alice (with `usage_flush_seconds = 60`, a minute after every restart). Expected: 404.
# Fix: read `stored_files()` in `StoredShare.start()` (and check it in `_tick` before the
# flush, or whatever the flush does).
async def test_a_gateway_started_again_refuses_another_keys_file_at_once(start: Start) -> None:
    up = Scripted(lambda n, _: whole(claude(n, BOBS_RUN if n == 0 else None)))
    first = await start("anthropic", up, SONNET)
    bob, alice = await create_key(first), await create_key(first)
    assert (await post_messages(first, bob, ask()))[0] == 200
    await first.close()  # (a clean stop: its journal is written)
    again = await start("anthropic", up, SONNET, usage_flush_seconds=60.0)
    upload = {"type": "container_upload", "file_id": "file_bob_payroll"}
    not_found(
        *await post_messages(again, alice, ask(messages=[{"role": "user", "content": [upload]}]))
    )
    assert len(up.bodies) == 1


# FINDING (low: a false 404 for a key's own item, with an upstream that numbers each
# response's items anew): in one process, an item id that two keys' own responses showed is
# no one's (contested: `StoredResponses.own(contest=True)`, relayed for both), which the
# upsert's owner "*" is for. Across processes the contest is never seen: bob's response on
# the first shows `rs_bob`, alice's own on the second shows it too; each process keeps its
# own key as the owner, the database the first writer, and alice is refused her own item on
# the first process (and on any process that reads it from the database). Expected: relayed,
# as on one process. Fix: an owner's write of an id whose row is another key's, from an answer
# that is the writer's own response, contests it (journal the `contest` flag with the row and
# let the upsert set "*" when it is set and the owners differ).
@pytest.mark.xfail(
    strict=True,
    reason="documented limit (docs/keys.md, Stored ids across processes: a contest stays in "
    "one process): an item id two keys' own responses showed through different processes is "
    "the first writer's key's; needs an upstream that reuses item ids",
)
async def test_an_item_two_keys_own_responses_showed_on_two_processes_is_no_ones(
    start: Start,
) -> None:
    up = Scripted(lambda n, _: answer(id=f"resp_{n}"))
    first, second, bob, alice = await bob_and_alice(start, up)
    status, body = await post_json(first, bob, "/v1/responses", {"model": "m", "input": "hi"})
    assert status == 200, body
    # (Bob's written first, as its process's tick would: which key's write comes first decides
    # the owner every process holds once the other reads its write back.)
    await app_of(first)[STORED_SHARE_KEY].flush()
    status, body = await post_json(second, alice, "/v1/responses", {"model": "m", "input": "hi"})
    assert status == 200, body
    for gw in (first, second):
        await app_of(gw)[STORED_SHARE_KEY].flush()
    reasoning = {"type": "reasoning", "id": "rs_bob", "summary": []}
    body = {"model": "m", "input": [{"role": "user", "content": "go on"}, reasoning]}
    status, answered = await post_json(first, alice, "/v1/responses", body)
    assert status == 200, answered


# FINDING (medium: the ownership of everything learned before is lost by a documented
# migration): `gateway copy-db` (a SQLite file into PostgreSQL, to run replicas) copies keys,
# usage and refusal counts, not `stored_ids`. Gateways started on the copy know no id: every
# id bob's answers showed before the move is relayed for alice (a 30-day window of
# previous_response_id, conversations, files). Expected: the copy holds bob's rows. Fix: copy
# `stored_ids` in `import_rows` (and count it in `is_empty`'s `COPIED_TABLES`).
async def test_copy_db_carries_whose_each_stored_id_is(database: str, tmp_path: Path) -> None:
    source = str(tmp_path / "old.db")
    async with opened_database(source) as db:
        await db.keep_stored([("resp_bob", "key_bob", 20, 0, time.time())])
    assert await copy_db(source, database) == 0
    async with opened_database(database) as db:
        found = await db.stored_owners(["resp_bob"])
        assert [row[:3] for row in found] == [("resp_bob", "key_bob", 20)]


# --- what held ---------------------------------------------------------------------------------


# HELD: a hostile upstream's ids do not poison the batch: ids of every printable and control
# ASCII character (quotes, backslashes, `%`, `?`, `$1`, SQL), exactly LONGEST_ID long, are
# written; a non-ASCII one, one with a NUL and one over LONGEST_ID stay out of the journal; the
# batch is written at once and another process refuses alice what was written.
async def test_a_hostile_upstreams_ids_do_not_poison_the_batch(start: Start) -> None:
    odd = ["'; DROP TABLE stored_ids; --", 'q"\\%_?$1', "".join(map(chr, range(1, 128)))]
    longest = ("x" * LONGEST_ID, "y" * (LONGEST_ID + 1), "\u00e9t\u00e9", "a\x00b")
    items = [{"type": "reasoning", "id": found, "summary": []} for found in (*odd, *longest)]
    up = Scripted(lambda n, _: answer(output=items))
    first, second, bob, alice = await bob_and_alice(start, up)
    status, body = await post_json(first, bob, "/v1/responses", {"model": "m", "input": "hi"})
    assert status == 200, body
    share = app_of(first)[STORED_SHARE_KEY]
    await share.flush()
    assert share.pending == 0 and not share.failing
    found = await app_of(first)[STORE_KEY].stored_owners([*odd, *longest[:2]])
    assert {row[0] for row in found} == {*odd, "x" * LONGEST_ID}
    for stored_id in (*odd, "x" * LONGEST_ID):
        reference = {"type": "item_reference", "id": stored_id}
        status, body = await post_json(
            second, alice, "/v1/responses", {"model": "m", "input": [reference]}
        )
        refused(status, body, "input[0].id")
    assert len(up.bodies) == 1


# HELD (SQLite): another connection holding the write lock (`BEGIN IMMEDIATE`, as the CLI or
# a backup does) neither stops lookups (WAL: reads go on) nor loses a write: the batch is kept
# while it fails and written once the lock is free, at the latest by the clean stop, which
# waits for it (`flush_when_free`).
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_a_locked_sqlite_database_delays_writes_and_loses_nothing(
    start: Start, database: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Scripted(lambda n, _: answer(id=f"resp_{n}"))
    first, second, bob, alice = await bob_and_alice(start, up)
    assert (await post_json(first, bob, "/v1/responses", {"model": "m", "input": "hi"}))[0] == 200
    await app_of(first)[STORED_SHARE_KEY].flush()
    other = sqlite3.connect(database, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    try:
        body = {"model": "m", "input": "go on", "previous_response_id": "resp_0"}
        refused(*await post_json(second, alice, "/v1/responses", body), "previous_response_id")
        assert (await post_json(first, bob, "/v1/responses", {"model": "m", "input": "hi"}))[
            0
        ] == 200
        share = app_of(first)[STORED_SHARE_KEY]
        with pytest.raises(StoreBusy):
            await share.flush()
        assert share.pending and share.failing
        store = app_of(first)[STORE_KEY]
        real = store.keep_stored
        tried = asyncio.Event()

        async def noted(rows: Any) -> None:
            try:
                await real(rows)
            finally:
                tried.set()

        monkeypatch.setattr(store, "keep_stored", noted)
        stopping = asyncio.create_task(first.close())
        await asyncio.wait_for(tried.wait(), 5)  # (the stop's first write: busy)
    finally:
        other.execute("COMMIT")
        other.close()
    await asyncio.wait_for(stopping, 10)
    body["previous_response_id"] = "resp_1"  # (bob's, learned while the lock was held)
    refused(*await post_json(second, alice, "/v1/responses", body), "previous_response_id")


# HELD: two replicas writing batches of the same ids at once, with different owners, neither
# deadlock nor fail (rows in id order); one owner wins each id, the same for both.
async def test_two_processes_writing_the_same_ids_at_once(start: Start) -> None:
    up = Scripted(lambda n, _: answer())
    first, second, _, _ = await bob_and_alice(start, up)
    ids = [f"item_{n:04d}" for n in range(2000)]
    for _ in range(3):
        app_of(first)[STORED_KEY].own(ids, "key_a")
        app_of(second)[STORED_KEY].own(list(reversed(ids)), "key_b")
        await asyncio.gather(
            app_of(first)[STORED_SHARE_KEY].flush(), app_of(second)[STORED_SHARE_KEY].flush()
        )
    rows = await app_of(first)[STORE_KEY].stored_owners(ids[:LOOKUP_AT_ONCE])
    assert len(rows) == LOOKUP_AT_ONCE and {row[1] for row in rows} <= {"key_a", "key_b"}


# HELD: the openai SDK across two gateways: bob's `previous_response_id` continuation on the
# gateway that never saw it is his (200, held at its size), alice's is `NotFoundError`, and an
# id two keys' answers contested (no one's in the database) goes through for each key.
async def test_the_openai_sdk_continues_on_another_gateway(start: Start) -> None:
    up = Scripted(lambda n, _: answer(id=f"resp_{n}"))
    first, second, bob, alice = await bob_and_alice(start, up)
    async with openai_client(first, bob) as client:
        made = await client.responses.create(model="m", input="secret")
    await app_of(first)[STORED_SHARE_KEY].flush()
    async with openai_client(second, bob) as client:
        again = await client.responses.create(
            model="m", input="go on", previous_response_id=made.id
        )
    assert again.id == "resp_1"
    async with openai_client(second, alice) as client:
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(model="m", input="go on", previous_response_id=made.id)
    await app_of(first)[STORE_KEY].keep_stored([("rs_shared", "*", -1, 0, time.time())])
    reasoning: Any = {"type": "reasoning", "id": "rs_shared", "summary": []}
    for secret in (bob, alice):
        async with openai_client(second, secret) as client:
            await client.responses.create(
                model="m", input=[{"role": "user", "content": "hi"}, reasoning]
            )
    assert len(up.bodies) == 4


# HELD: bob's own thread and his own file, on a process that learned them from the database
# only, go through (no false 404), while alice's are refused there.
async def test_a_keys_own_thread_and_file_go_through_on_another_process(start: Start) -> None:
    up = Scripted(lambda n, _: whole(claude(n, BOBS_RUN if n == 0 else None)))
    first, second, bob, alice = await bob_and_alice(start, up, "anthropic")
    assert (await post_messages(first, bob, ask()))[0] == 200
    await app_of(first)[STORED_SHARE_KEY].flush()
    await app_of(second)[STORED_SHARE_KEY].tick()
    upload = {"type": "container_upload", "file_id": "file_bob_payroll"}
    thread = {"type": "continue", "previous_message_id": "msg_0"}
    body = ask(messages=[{"role": "user", "content": [upload]}], thread=thread)
    not_found(*await post_messages(second, alice, body))
    status, answered = await post_messages(second, bob, body)
    assert status == 200, answered
    assert len(up.bodies) == 2


# HELD: the shipped sample database (no stored_ids table) is migrated when opened, and takes
# rows at once.
async def test_the_sample_database_is_migrated(tmp_path: Path) -> None:
    sample = tmp_path / "keys.db"
    shutil.copy(Path(__file__).parent.parent / "keys.db.sample", sample)
    async with opened_database(str(sample)) as db:
        await db.keep_stored([("resp_1", "key_a", 3, 1, time.time())])
        found = await db.stored_owners(["resp_1"])
        assert [row[:3] for row in found] == [("resp_1", "key_a", 3)]
        assert await db.stored_files()


# HELD: a database down at a clean stop loses the batch (logged, with how many ids), and the
# stop neither hangs nor raises.
async def test_a_database_down_at_the_stop_is_logged(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Scripted(lambda n, _: answer())
    gw = await start("openai", up, "gpt-5", usage_flush_seconds=3600.0)
    bob = await create_key(gw)
    assert (await post_json(gw, bob, "/v1/responses", {"model": "m", "input": "hi"}))[0] == 200

    async def down(rows: Any) -> None:
        raise ConnectionRefusedError

    monkeypatch.setattr(app_of(gw)[STORE_KEY], "keep_stored", down)
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(gw.close(), 5)
    lost = [line for line in logs if line["event"] == "stored_ids_lost_at_stop"]
    assert len(lost) == 1 and lost[0]["held"] > 0, logs
