"""Attack h137: the shared stored ids (`gateway.stored_share`) after fd26745 (`relays` as
`native_first` decides; another key's id refused from the rows found; files asked about only
when a `file_id` member is there, and a database down asked at most every flush_seconds).

Two gateways in this process on one database (SQLite, then PostgreSQL), as workers or
replicas are; upstreams are in-process raw sockets (`Scripted`). FINDING tests fail on
fd26745; HELD tests pin what was tried and held.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from typing import Any

import pytest
import structlog

from gateway.handlers import messages as messages_handler
from gateway.state import STORE_KEY, STORED_KEY, STORED_SHARE_KEY
from gateway.stored import Naming, StoredResponses
from tests import test_attack_h135
from tests.conftest import app_of, create_key
from tests.test_attack_h105 import message_item, post as post_json, response_body, whole
from tests.test_attack_h107 import SONNET
from tests.test_attack_h126 import Scripted
from tests.test_attack_h128 import BOBS_RUN, ask, claude, not_found, post as post_messages
from tests.test_attack_h135 import (
    PASSES,
    TRANSLATED,
    Open,
    Route,
    chat_answer,
    count_lookups,
    flush,
    two,
)
from tests.test_stored_share import Gateway

open_gw = test_attack_h135.open_gw  # (the fixture, by its name)

Json = dict[str, Any]

UPLOADED: Json = {"type": "document", "source": {"type": "file", "file_id": "file_011_alice"}}
BOBS_UPLOAD: Json = {"type": "container_upload", "file_id": "file_bob_payroll"}


def bobs_code_run(n: int, body: Json) -> bytes:
    """Bob's first message runs code that writes `file_bob_payroll` in `container_bob`."""
    if n == 0:
        return whole(claude(0, BOBS_RUN, container={"id": "container_bob"}))
    return whole(claude(n))


def responses(n: int, body: Json) -> bytes:
    """Bob's first response (`resp_0`: `rs_bob`, `ci_bob` in `cntr_bob`, `msg_bob`), then
    answers of their own (`resp_n`, `msg_n`)."""
    usage = {"input_tokens": 3, "output_tokens": 2}
    if n == 0:
        output: list[Json] = [
            {"type": "reasoning", "id": "rs_bob", "summary": []},
            {"type": "code_interpreter_call", "id": "ci_bob", "status": "completed"}
            | {"container_id": "cntr_bob", "code": "print(1)", "outputs": None},
            message_item("ok") | {"id": "msg_bob"},
        ]
        return whole(response_body(usage, output) | {"id": "resp_0"})
    return whole(
        response_body(usage, [message_item("ok") | {"id": f"msg_{n}"}]) | {"id": f"resp_{n}"}
    )


def forget(gw: Gateway) -> None:
    """The gateway's memory of stored ids emptied (as a process started anew), its journal,
    clock and file search kept: what it is asked next is looked up in the database."""
    known = app_of(gw)[STORED_KEY]
    journal, today, files = known.journal, known.today, known.files
    StoredResponses.__init__(known, known.most)
    known.journal, known.today, known.files = journal, today, files


def without_request_id(body: Json) -> Json:
    return {name: value for name, value in body.items() if name != "request_id"}


class Watched:
    """`handlers.messages._FILE_ID`, counting its searches: `arrived` is set at the
    `expected`-th (each request that may name a file searches once before it asks)."""

    def __init__(self, real: re.Pattern[bytes], expected: int) -> None:
        self.real = real
        self.expected = expected
        self.searched = 0
        self.arrived = asyncio.Event()

    def search(self, body: bytes) -> re.Match[bytes] | None:
        self.searched += 1
        if self.searched >= self.expected:
            self.arrived.set()
        return self.real.search(body)

    def findall(self, body: bytes) -> list[Any]:
        return self.real.findall(body)


# FINDING (low: a regression of the h136 fix, "asked at most every flush_seconds and logged
# once"): `files_seen` reads `_files_failed` before its query and sets it only after the
# query failed, so every request that arrives while the database hangs (up to the pool's
# 5 s connect / 30 s command timeout on PostgreSQL) asks again, waits for its own failure
# and logs its own `stored_files_lookup_failed`: at 100 Messages requests a second that
# send a Files API document, 3,000 queries waiting on the pool and 3,000 warnings for one
# outage. Expected: one question in flight (the others wait for its answer, or take the
# last one) and one warning. Fix: share the question in flight (an `asyncio.Future` held
# by `StoredShare`), and log when the state flips from answering to failing (decided
# after the await, not from what was read before it).
async def test_requests_during_a_hanging_files_question_ask_once_and_log_once(
    open_gw: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Scripted(lambda n, _: whole(claude(n)))
    gw = await open_gw(("anthropic", up, SONNET, {}))
    bob = await create_key(gw)
    release = asyncio.Event()
    asked = 0

    async def hanging() -> bool:
        nonlocal asked
        asked += 1
        await release.wait()
        raise ConnectionRefusedError

    monkeypatch.setattr(app_of(gw)[STORE_KEY], "stored_files", hanging)
    watched = Watched(messages_handler._FILE_ID, 3)
    monkeypatch.setattr(messages_handler, "_FILE_ID", watched)
    body = ask(messages=[{"role": "user", "content": [UPLOADED, {"type": "text", "text": "sum"}]}])
    with structlog.testing.capture_logs() as logs:
        sent = [asyncio.create_task(post_messages(gw, bob, body)) for _ in range(3)]
        try:
            await asyncio.wait_for(watched.arrived.wait(), 10)
        finally:
            release.set()
        answers = await asyncio.gather(*sent)
    assert [status for status, _ in answers] == [200] * 3, answers
    failed = [line for line in logs if line["event"] == "stored_files_lookup_failed"]
    assert (asked, len(failed)) == (1, 1), f"{asked} questions, {len(failed)} warnings"


# FINDING (low: another key's files, for `usage_flush_seconds` after one failed query,
# while the database answers): after one failed files question (a PostgreSQL restart fails
# each pooled connection once; a pool timeout under load), `files_seen` answers False
# without asking for `flush_seconds`, so requests on a process that knew of no file are not
# searched for files at all, though the database is back and answers the same requests'
# other lookups: alice's `container_upload` of bob's file is relayed to Anthropic, which
# hands her what bob's code wrote. docs/keys.md promises the fail-open only while "a lookup
# fails"; here nothing fails. (0.5 s by default, but `usage_flush_seconds` has no upper
# bound: a deployment that batches usage every 10 s has a 10 s window.) Expected: 404,
# nothing upstream. Fix: while the question fails, search the request for files anyway
# (as if one was seen: `files_seen` answering "maybe", `_stored` re-read), so the id is
# looked up; the lookup fails open by itself if the database is still down.
async def test_one_failed_files_question_does_not_stop_the_search_while_the_database_answers(
    open_gw: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Scripted(bobs_code_run)
    route: Route = ("anthropic", up, SONNET, {})
    first, second, bob, alice = await two(open_gw, route, usage_flush_seconds=5.0)
    assert (await post_messages(first, bob, ask()))[0] == 200
    await flush(first)
    store = app_of(second)[STORE_KEY]
    real = store.stored_files
    failures = [ConnectionResetError()]

    async def once_down() -> bool:
        if failures:
            raise failures.pop()
        return await real()

    monkeypatch.setattr(store, "stored_files", once_down)
    asked = count_lookups(second, monkeypatch)
    own = ask(messages=[{"role": "user", "content": [UPLOADED, {"type": "text", "text": "a"}]}])
    status, answered = await post_messages(second, alice, own)
    assert status == 200, answered  # (the question failed: relayed, as documented)
    assert not failures
    # The database answers again: a thread of alice's own is looked up there...
    thread = {"type": "continue", "previous_message_id": answered["id"]}
    await flush(second)
    forget(second)
    status, answered = await post_messages(second, alice, ask(messages=[], thread=thread))
    assert status == 200 and asked, answered
    # ...but bob's file, named the same moment, is not looked for.
    status, answered = await post_messages(
        second, alice, ask(messages=[{"role": "user", "content": [BOBS_UPLOAD]}])
    )
    not_found(status, answered)
    assert len(up.bodies) == 3


# FINDING (low: an availability cost the docs rule out, "requests are served while the
# database is down"): the lookup has no deadline of its own. While the database hangs
# (a network partition, a PostgreSQL failover, a pool whose connections are all stuck),
# every request naming an id its process never knew (every continuation reaching another
# worker or replica than the one that answered it, every Responses tool loop after a
# restart) waits for the pool: on PostgreSQL up to 5 s to connect and 30 s a command (more
# once the pool's connections are all waiting, since `pool.fetch` waits for one without a
# timeout), then is relayed anyway, as after any failed lookup; the next one waits again.
# Expected: a lookup that does not answer within a second or two is a failed lookup (relayed,
# `stored_ids_lookup_failed`). Fix: `asyncio.timeout(...)` around `stored_owners` (and
# `stored_files`) in `StoredShare`, shorter than a client's patience.
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_a_hanging_lookup_does_not_hold_the_request(
    open_gw: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Scripted(responses)
    gw = await open_gw(("openai", up, "gpt-5", PASSES))
    bob = await create_key(gw)
    release = asyncio.Event()

    async def hanging(ids: Any) -> Any:
        await release.wait()
        raise TimeoutError  # (asyncpg's command timeout, 30 s later)

    monkeypatch.setattr(app_of(gw)[STORE_KEY], "stored_owners", hanging)
    body = {"model": "m", "input": "go on", "previous_response_id": "resp_made_elsewhere"}
    sent = asyncio.create_task(post_json(gw, bob, "/v1/responses", body))
    started = time.monotonic()
    try:
        done, _ = await asyncio.wait({sent}, timeout=2.5)
    finally:
        release.set()
    status, answered = await sent
    assert status == 503 and answered["error"]["code"] == "database_busy", (
        answered
    )  # (refused, to try again)
    assert done, f"the request waited {time.monotonic() - started:.1f} s for the database"


# FINDING (very low: an error that depends on which process answers): `resolve` raises for
# the first row the database returns (SQLite and PostgreSQL return them in id order here),
# while the process that knows the ids refuses the first one the request names. A request
# naming two of bob's ids gets `previous_response_not_found` (param `previous_response_id`)
# from the gateway that answered bob, and `container_not_found` (param
# `tools[0].container`) from any other. A client telling "my conversation is gone" from
# other 404s by its `code` or `param` (as the anthropic SDK's threads do with
# `thread_not_found`) sees a different answer per replica. Expected: the same 404 either
# way. Fix: in `resolve`, go over `named.unresolved` in order and refuse the first whose
# row is another key's.
async def test_a_request_naming_two_foreign_ids_gets_the_same_404_on_every_process(
    open_gw: Open,
) -> None:
    up = Scripted(responses)
    first, second, bob, alice = await two(open_gw, ("openai", up, "gpt-5", PASSES))
    assert (await post_json(first, bob, "/v1/responses", {"model": "m", "input": "hi"}))[0] == 200
    await flush(first)
    body: Json = {"model": "m", "input": "Repeat.", "previous_response_id": "resp_0"}
    body["tools"] = [{"type": "code_interpreter", "container": "cntr_bob"}]
    status, remembered = await post_json(first, alice, "/v1/responses", body)
    assert status == 404 and remembered["error"]["param"] == "previous_response_id", remembered
    status, looked_up = await post_json(second, alice, "/v1/responses", body)
    assert status == 404, looked_up
    assert looked_up["error"] == remembered["error"]
    assert len(up.bodies) == 1


def near_misses(size: int) -> bytes:
    """A valid Messages request of about `size` bytes whose tool call's input holds
    `"file_id"` members whose values are too long to be an id."""
    member = b'{"file_id": "' + b"x" * 2000 + b'"}'
    members = b",".join([member] * (size // len(member)))
    call = b'{"type": "tool_use", "id": "t", "name": "f", "input": {"a": [%s]}}' % members
    return (
        b'{"model": "m", "max_tokens": 8, "messages": [{"role": "assistant", "content": [%s]}]}'
        % call
    )


# FINDING (low: about a second of a worker's event loop per request, from any key with a
# Messages model): the `file_id` search (`_FILE_ID`, "about 2 ms a megabyte" says
# `_name_files`) costs about 36 ms a megabyte on a body of near misses, `"file_id"`
# members whose values are longer than any id: each is read up to 1,536 characters, then
# backtracked as far. fd26745 runs that search (`look_up`: `_FILE_ID.search(body)`) on every
# relayed Messages request that spells `file_id"`, on processes that never saw a file (most
# deployments), before admission; a 32 MB request (`max_body_bytes`) holds the worker's
# loop, every stream on it included, for over a second (its decode takes 20 ms). Expected:
# near the documented 2 ms a megabyte (here at most 15). Fix: find the key with
# `bytes.find(b'"file_id"')` (and the regular expression only where the body escapes
# ASCII, `_ASCII_ESCAPE`), and read each value with a possessive `{0,N}+` (or by msgspec
# from the hit), so a near miss costs its length once, not twice with backtracking.
def test_the_file_id_search_of_a_huge_body_costs_about_what_its_docs_say() -> None:
    body = near_misses(16_000_000)
    named, known = Naming(), StoredResponses()
    known.files = True
    # (This thread's CPU time: the search's cost, not a loaded machine's wall clock.)
    started = time.thread_time()
    assert messages_handler._FILE_ID.search(body) is None  # (look_up's question)
    messages_handler._name_files(named, known, "key_alice", body)  # (the search itself)
    took = time.thread_time() - started
    assert named.ids == set()
    assert took < 2 * 0.25, f"{took:.2f} s for 2 searches of 16 MB"


# --- what held ---------------------------------------------------------------------------------


# HELD: a refusal decided from the database's rows is the same 404 as the one from memory,
# for each thing named alone: on /v1/messages Anthropic's shape (a thread's with
# `details.error_code: thread_not_found`, which the anthropic SDK's threads read), its token
# count too; on /v1/responses OpenAI's, with the param and code (stream and background
# alike); an id named twice is refused as its first naming; nothing goes upstream.
async def test_refusals_from_the_database_are_shaped_as_from_memory(open_gw: Open) -> None:
    claude_up = Scripted(bobs_code_run)
    openai_up = Scripted(responses)
    first, second, bob, alice = await two(open_gw, ("anthropic", claude_up, SONNET, {}))
    assert (await post_messages(first, bob, ask(thread={"type": "create"})))[0] == 200
    await flush(first)
    thread = {"type": "continue", "previous_message_id": "msg_0"}
    counted = ask(messages=[], thread=thread)
    del counted["max_tokens"]
    escaped = (
        b'{"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": [{"type":'
        b' "container_upload", "file\\u005Fid": "\\u0066ile_bob_payroll"}]}]}'
    )
    cases: list[tuple[Json | bytes, str]] = [
        (ask(messages=[], thread=thread), "/v1/messages"),
        (ask(messages=[], thread=thread, stream=True), "/v1/messages"),
        (ask(diagnostics={"previous_message_id": "msg_0"}), "/v1/messages"),
        (ask(container={"id": "container_bob"}), "/v1/messages"),
        (ask(messages=[{"role": "user", "content": [BOBS_UPLOAD]}]), "/v1/messages"),
        (escaped, "/v1/messages"),
        (counted, "/v1/messages/count_tokens"),
    ]
    for body, path in cases:
        remembered = await post_messages(first, alice, body, path)
        forget(second)
        looked_up = await post_messages(second, alice, body, path)
        not_found(*looked_up)
        assert without_request_id(looked_up[1]) == without_request_id(remembered[1]), body
    error = (await post_messages(second, alice, cases[0][0]))[1]["error"]
    assert error["details"] == {"error_code": "thread_not_found"}, error
    assert len(claude_up.bodies) == 1

    first, second, bob, alice = await two(open_gw, ("openai", openai_up, "gpt-5", PASSES))
    assert (await post_json(first, bob, "/v1/responses", {"model": "m", "input": "hi"}))[0] == 200
    await flush(first)
    reference = {"type": "item_reference", "id": "rs_bob"}
    for fields, param in (
        ({"previous_response_id": "resp_0"}, "previous_response_id"),
        ({"previous_response_id": "resp_0", "stream": True}, "previous_response_id"),
        ({"previous_response_id": "resp_0", "background": True}, "previous_response_id"),
        ({"input": [reference, reference]}, "input[0].id"),
        ({"input": [message_item("ok") | {"id": "msg_bob"}]}, "input[0].id"),
        ({"tools": [{"type": "code_interpreter", "container": "cntr_bob"}]}, "tools[0].container"),
        ({"input": [{"type": "reasoning", "id": "rs_x", "summary": []}, reference]}, "input[1].id"),
    ):
        body = {"model": "m", "input": "Repeat."} | fields
        remembered = await post_json(first, alice, "/v1/responses", body)
        forget(second)
        looked_up = await post_json(second, alice, "/v1/responses", body)
        assert looked_up == remembered, body
        assert looked_up[0] == 404 and looked_up[1]["error"]["param"] == param, looked_up
    assert len(openai_up.bodies) == 1


# HELD: the key's own ids, learned from the database, go through however often and wherever
# one request names them (a previous response, its items referenced twice, its container,
# the conversation's message sent back with its id), and a thread of bob's continues on a
# process that learned it from the database; the rows' owner is bob's key id, stable for
# the key's life (the gateway has no rotation that would change it).
async def test_a_keys_own_ids_named_twice_go_through_from_the_database(open_gw: Open) -> None:
    up = Scripted(responses)
    first, second, bob, _ = await two(open_gw, ("openai", up, "gpt-5", PASSES))
    assert (await post_json(first, bob, "/v1/responses", {"model": "m", "input": "hi"}))[0] == 200
    await flush(first)
    reference = {"type": "item_reference", "id": "rs_bob"}
    body: Json = {"model": "m", "previous_response_id": "resp_0"}
    body["input"] = [reference, message_item("ok") | {"id": "msg_bob"}, reference]
    body["tools"] = [{"type": "code_interpreter", "container": "cntr_bob"}]
    status, answered = await post_json(second, bob, "/v1/responses", body)
    assert status == 200, answered
    assert up.bodies[-1]["previous_response_id"] == "resp_0"

    claude_up = Scripted(bobs_code_run)
    first, second, bob, _ = await two(open_gw, ("anthropic", claude_up, SONNET, {}))
    assert (await post_messages(first, bob, ask(thread={"type": "create"})))[0] == 200
    await flush(first)
    thread = {"type": "continue", "previous_message_id": "msg_0"}
    mine = ask(messages=[{"role": "user", "content": [BOBS_UPLOAD]}], thread=thread)
    mine |= {"container": "container_bob", "diagnostics": {"previous_message_id": "msg_0"}}
    status, answered = await post_messages(second, bob, mine)
    assert status == 200, answered
    assert len(claude_up.bodies) == 2


def failing_over(n: int, body: Json) -> bytes:
    """Bob's answer first; then a 500 (retryable: the request falls over)."""
    if n == 0:
        return responses(0, body)
    error = b'{"error": {"message": "overloaded", "type": "server_error"}}'
    head = b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
    return head + b"Content-Length: %d\r\n\r\n" % len(error) + error


# HELD: where `relays` says no, nothing stored goes upstream; where the request may be
# relayed, the lookup ran first. A model whose first route passes Responses through and
# falls over to a chat upstream: alice's request naming bob's message item by its id (no
# refusal forces the native route) is looked up and refused on another process before the
# native attempt; bob's own request whose native attempt fails reaches the chat upstream
# without any id. The reverse (translated first, pass-through after): alice's request
# naming bob's item is translated, no lookup, and neither upstream gets the id.
async def test_relays_and_native_first_agree_across_a_fallback(
    open_gw: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes, chat = Scripted(failing_over), Scripted(chat_answer)
    routes = (("openai", passes, "gpt-5", PASSES), ("openai", chat, "gpt-5", TRANSLATED))
    first, second, bob, alice = await two(open_gw, *routes)
    assert (await post_json(first, bob, "/v1/responses", {"model": "m", "input": "hi"}))[0] == 200
    await flush(first)
    sent_back = {"model": "m", "input": [message_item("ok") | {"id": "msg_bob"}]}
    refused = await post_json(second, alice, "/v1/responses", sent_back)
    assert refused[0] == 404 and refused[1]["error"]["param"] == "input[0].id", refused
    assert len(passes.bodies) == 1 and chat.bodies == []
    status, answered = await post_json(second, bob, "/v1/responses", sent_back)
    assert status == 200, answered
    assert len(passes.bodies) >= 2 and len(chat.bodies) == 1  # (the native one retried)
    assert "msg_bob" not in json.dumps(chat.bodies)

    chat2, passes2 = Scripted(chat_answer), Scripted(responses)
    routes = (("openai", chat2, "gpt-5", TRANSLATED), ("openai", passes2, "gpt-5", PASSES))
    gw = await open_gw(*routes)
    carol = await create_key(gw)
    asked = count_lookups(gw, monkeypatch)
    status, answered = await post_json(gw, carol, "/v1/responses", sent_back)
    assert status == 200, answered
    assert asked == [] and passes2.bodies == [] and "msg_bob" not in json.dumps(chat2.bodies)


# HELD: the files question's outage is logged once and its end once, for requests one after
# another: three requests while it fails are searched for files (a failed question answers
# yes; while it fails, at once, the question asked again meanwhile) and warn once, and the
# first answer after it logs `stored_files_lookup_recovered`.
async def test_a_files_outage_logs_once_and_its_recovery_once(
    open_gw: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Scripted(lambda n, _: whole(claude(n)))
    gw = await open_gw(("anthropic", up, SONNET, {}), usage_flush_seconds=60.0)
    bob = await create_key(gw)
    store = app_of(gw)[STORE_KEY]
    real = store.stored_files
    down = [True]
    asked = [0]

    async def flaky() -> bool:
        asked[0] += 1
        if down[0]:
            raise ConnectionRefusedError
        return await real()

    monkeypatch.setattr(store, "stored_files", flaky)
    body = ask(messages=[{"role": "user", "content": [UPLOADED]}])
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            assert (await post_messages(gw, bob, body))[0] == 200
        share = app_of(gw)[STORED_SHARE_KEY]
        if share._files_asking is not None:  # (the question asked meanwhile, still failing)
            await share._files_asking
        down[0] = False
        for _ in range(2):
            assert (await post_messages(gw, bob, body))[0] == 200
            if share._files_asking is not None:  # (asked meanwhile: its answer awaited)
                await share._files_asking
    events = [line["event"] for line in logs if line["event"].startswith("stored_files")]
    assert events == ["stored_files_lookup_failed", "stored_files_lookup_recovered"], events
    assert asked[0] >= 3


# HELD: the search for a `file_id` member reads every spelling of its key (each character
# as itself or a `\u` escape, hex in either case) and of its value, wherever it is.
def test_the_file_id_search_reads_every_spelling() -> None:
    pattern = messages_handler._FILE_ID
    spellings = [("f", "0066"), ("i", "0069"), ("l", "006C"), ("e", "0065"), ("_", "005f")]
    spellings += [("i", "0069"), ("d", "0064")]
    for mask in range(1 << len(spellings)):
        key = "".join(
            f"\\u{code}" if mask >> at & 1 else plain for at, (plain, code) in enumerate(spellings)
        )
        found = pattern.search(b'{"a": [{"%s" :\n "\\u0066ile_bob"}]}' % key.encode())
        assert found is not None and json.loads(found.group(2)) == "file_bob", key
