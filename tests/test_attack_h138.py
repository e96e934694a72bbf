"""Attack h138: the shared stored ids after 6fb7292 (`codec.may_spell` reads escapes of the
word's own letters only; `_FILE_ID` reads a value's plain runs possessively; the files
question shared by the requests in flight, failing open; a 2 s deadline on each lookup).

Gateways in this process on one database (SQLite, then PostgreSQL); upstreams are in-process
raw sockets (`Scripted`); a hanging network is an in-process TCP proxy that stops passing
bytes. FINDING tests fail on ab89878; HELD tests pin what was tried and held.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import msgspec
import pytest
import structlog
from aiohttp.pytest_plugin import AiohttpClient

from gateway import stored_share
from gateway.handlers import messages as messages_handler
from gateway.providers.base import _sends_audio
from gateway.schemas.chat import ChatCompletionRequest
from gateway.schemas.codec import decode_body, may_spell
from gateway.settings import ModelConfig, RoutingSettings, Target
from gateway.state import STORE_KEY, STORED_KEY, STORED_SHARE_KEY
from gateway.stored import LONGEST_ID, Naming, StoredResponses
from gateway.stored_share import StoredShare
from tests import test_attack_h135
from tests.conftest import MakeSettings, app_of, create_key, provider_config, start_gateway
from tests.test_attack_h105 import BASE, post as post_json, whole
from tests.test_attack_h107 import SONNET
from tests.test_attack_h126 import Scripted
from tests.test_attack_h128 import ask, claude, post as post_messages
from tests.test_attack_h135 import PASSES, Open, flush, two
from tests.test_attack_h137 import UPLOADED, bobs_code_run, forget, responses
from tests.test_stored_share import Gateway

open_gw = test_attack_h135.open_gw  # (the fixture, by its name)

Json = dict[str, Any]


# --- a network that stops passing bytes --------------------------------------------------------


class Freezer:
    """A TCP proxy to `127.0.0.1:port`. `freeze()` stops it passing bytes either way and
    holds new connections unanswered (a partition, a failover, a stuck middlebox: the
    sockets stay open, nothing comes back); `thaw()` passes what it held and goes on."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.port = 0
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    async def close(self) -> None:
        self.thaw()
        if self.server is not None:
            self.server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.flowing.wait()
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            writer.close()
            return
        for task in (
            asyncio.ensure_future(self._pipe(reader, up_writer)),
            asyncio.ensure_future(self._pipe(up_reader, writer)),
        ):
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        try:
            while data := await source.read(65536):
                await self.flowing.wait()
                sink.write(data)
                await sink.drain()
        except ConnectionError:
            pass
        finally:
            sink.close()


Proxied = Callable[..., Awaitable[tuple[Gateway, Freezer]]]


@pytest.fixture
async def proxied(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, pg_url: str
) -> AsyncIterator[Proxied]:
    """A gateway on a fresh PostgreSQL database reached through a `Freezer`; its model "m"
    goes to `upstream` (a pass-through OpenAI Responses upstream, or Anthropic)."""
    freezers: list[Freezer] = []
    servers: list[asyncio.Server] = []
    gateways: list[Gateway] = []

    async def make(
        kind: str, upstream: Scripted, model: str, **server: Any
    ) -> tuple[Gateway, Freezer]:
        head, _, rest = pg_url.rpartition(":")
        port, _, name = rest.partition("/")
        freezer = Freezer(int(port))
        await freezer.start()
        freezers.append(freezer)
        listening = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
        servers.append(listening)
        upstream.port = listening.sockets[0].getsockname()[1]
        fields = PASSES if kind == "openai" else {}
        cfg = provider_config(
            kind,
            name="up0",
            base_url=f"http://127.0.0.1:{upstream.port}{BASE[kind]}",
            api_keys=("sk-up-0123456789abcdefghij",),
            **fields,
        )
        settings = make_settings(
            providers=(cfg,),
            models=(ModelConfig(name="m", targets=(Target(provider="up0", model=model),)),),
            routing=RoutingSettings(max_attempts=1, backoff_initial=0.0),
            database=f"{head}:{freezer.port}/{name}",
            **server,
        )
        gateways.append(await start_gateway(aiohttp_client, settings))
        return gateways[-1], freezer

    yield make
    for freezer in freezers:
        freezer.thaw()
    for gw in gateways:
        await gw.close()
    for freezer in freezers:
        await freezer.close()
    for listening in servers:
        listening.close()


# FINDING (low: the h137 fix holds for fakes only; on PostgreSQL a hung network still holds
# every such request ~30 s): `StoredShare.resolve` (and `_ask_for_files`) bound the query by
# `asyncio.timeout(LOOKUP_SECONDS)`, which cancels `pool.fetch` once. asyncpg then sends a
# CancelRequest on a new connection and `PoolAcquireContext.__aexit__` -> `Pool.release`
# (shielded) waits for that cancellation (`_wait_for_cancellation`, bounded only by
# `command_timeout`, 30 s) inside the request's task, which is not cancelled again: the
# deadline fired at 2 s but the request goes on waiting. Where the database's network hangs
# (a partition, a failover with the old address black-holed, a stuck proxy), every request
# naming an id its process never knew (any continuation on another worker or replica, any
# Responses tool loop after a restart) and, on a process that knows no file, every Messages
# request with a `file_id` member waits ~30 s instead of 2, as before 6fb7292. The test's
# control request, naming nothing, is answered at once through the same frozen network.
# Expected: the request relayed within about LOOKUP_SECONDS. Fix: run the query as its own
# task and wait for it with `asyncio.wait({task}, timeout=LOOKUP_SECONDS)` (or
# `asyncio.wait_for(asyncio.shield(task), ...)`), leaving a late one to finish (and its
# connection to be released or terminated) in the background, held in a set and its result
# retrieved; or terminate the connection on timeout instead of waiting for the cancel.
async def test_a_hung_postgres_network_does_not_hold_the_lookup_past_its_deadline(
    proxied: Proxied, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stored_share, "LOOKUP_SECONDS", 0.5)
    up = Scripted(responses)
    # (No periodic write while frozen: the lookup gets the pool's idle connection.)
    gw, freezer = await proxied("openai", up, "gpt-5", usage_flush_seconds=60.0)
    bob = await create_key(gw)
    body = {"model": "m", "input": "go on", "previous_response_id": "resp_made_elsewhere"}
    plain = {"model": "m", "input": "hi"}
    assert (await post_json(gw, bob, "/v1/responses", body))[0] == 200  # (looked up, idle)
    freezer.freeze()
    sent = asyncio.ensure_future(post_json(gw, bob, "/v1/responses", body))
    started = time.monotonic()
    try:
        done, _ = await asyncio.wait({sent}, timeout=0.5 + 2.5)
        waited = time.monotonic() - started
        # Control: a request that names nothing stored needs no database on its way.
        control = asyncio.ensure_future(post_json(gw, bob, "/v1/responses", plain))
        answered_at_once, _ = await asyncio.wait({control}, timeout=2.5)
    finally:
        freezer.thaw()
    assert answered_at_once and control.result()[0] == 200, "the control needs the database"
    status, answered = await sent
    assert status == 503 and answered["error"]["code"] == "database_busy", (
        answered
    )  # (refused, to try again)
    assert done, f"a 0.5 s lookup deadline, and the request waited over {waited:.1f} s"


# HELD: a lookup that hits its deadline on PostgreSQL while the server answers (its query
# waiting on a lock) is cancelled cleanly: the request is relayed (the documented fail-open)
# within about LOOKUP_SECONDS, and the pool's connections are fine afterwards: the next
# lookups on the same process find bob's response and refuse it to alice, and bob's own
# continuation goes through.
async def test_a_timed_out_postgres_lookup_leaves_the_pool_healthy(
    proxied: Proxied, monkeypatch: pytest.MonkeyPatch, pg_url: str
) -> None:
    monkeypatch.setattr(stored_share, "LOOKUP_SECONDS", 0.5)
    up = Scripted(responses)
    gw, _ = await proxied("openai", up, "gpt-5")
    bob, alice = await create_key(gw), await create_key(gw)
    assert (await post_json(gw, bob, "/v1/responses", {"model": "m", "input": "hi"}))[0] == 200
    await flush(gw)
    body = {"model": "m", "input": "go on", "previous_response_id": "resp_0"}
    locker = await asyncpg.connect(pg_url)
    try:
        forget(gw)
        async with locker.transaction():
            await locker.execute("LOCK TABLE stored_ids IN ACCESS EXCLUSIVE MODE")
            started = time.monotonic()
            with structlog.testing.capture_logs() as logs:
                status, answered = await post_json(gw, alice, "/v1/responses", body)
            took = time.monotonic() - started
        # (The lookup failed: refused, to try again; never relayed unchecked.)
        assert status == 503 and answered["error"]["code"] == "database_busy", answered
        assert took < 0.5 + 1.5, f"{took:.1f} s"
        assert any(line["event"] == "stored_ids_lookup_failed" for line in logs)
        for _ in range(10):  # (more lookups than the pool has connections)
            forget(gw)
            status, answered = await post_json(gw, alice, "/v1/responses", body)
            assert status == 404, answered
        forget(gw)
        assert (await post_json(gw, bob, "/v1/responses", body))[0] == 200
    finally:
        await locker.close()


# --- the files question ------------------------------------------------------------------------


def hangs_until_cancelled(calls: list[str], name: str) -> Callable[..., Awaitable[Any]]:
    """A store method that never answers (the deadline cancels it), counting its calls."""

    async def hanging(*_: Any) -> Any:
        calls.append(name)
        await asyncio.Event().wait()

    return hanging


# FINDING (low: twice the documented wait, at every request of the outage): on a process
# that knows of no file (most, and every one just started), a Messages request with a
# `file_id` member (a Files API document: every turn of such a conversation) waits
# LOOKUP_SECONDS for the files question, which then answers "yes" (search anyway), and then
# LOOKUP_SECONDS more for the lookup of the file it names: 4 s a request while the database
# hangs, where docs/keys.md says a lookup "that fails, or takes 2 s" is relayed. And the
# question's failure is not remembered: every request (every batch in flight) waits out a
# new one whose answer, if it fails, is known in advance ("yes"). Expected: such a request
# waits about LOOKUP_SECONDS in all. Fix: while the last question failed, answer yes at once
# and ask again in the background (or at most every flush_seconds); or give the lookup only
# what is left of one deadline shared by both.
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_a_hanging_database_holds_a_file_request_one_deadline_not_two(
    open_gw: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(stored_share, "LOOKUP_SECONDS", 0.5)
    up = Scripted(lambda n, _: whole(claude(n)))
    gw = await open_gw(("anthropic", up, SONNET, {}), usage_flush_seconds=60.0)
    bob = await create_key(gw)
    store = app_of(gw)[STORE_KEY]
    calls: list[str] = []
    monkeypatch.setattr(store, "stored_files", hangs_until_cancelled(calls, "files"))
    monkeypatch.setattr(store, "stored_owners", hangs_until_cancelled(calls, "owners"))
    body = ask(messages=[{"role": "user", "content": [UPLOADED, {"type": "text", "text": "a"}]}])
    for _ in range(2):
        started = time.monotonic()
        status, answered = await post_messages(gw, bob, body)
        took = time.monotonic() - started
        assert status == 529, answered  # (the lookup failed: refused, to try again)
        assert took < 0.5 + 0.3, f"{took:.2f} s with a 0.5 s deadline ({calls})"


# FINDING (very low: the outage's one log line names a bystander): the shared files question
# runs in a task made by `asyncio.ensure_future` in the first asking request, so it carries a
# copy of that request's context: structlog's `request_id` and `key_id` (set per request by
# the middleware). `stored_files_lookup_failed`, the one line an outage of the whole process
# gets, is logged as if one key's request had caused it, and a search of the logs by that
# key (or request id) finds it; a search for the outage by another request's id does not.
# Expected: the question's own lines carry no request's fields. Fix: start it with an empty
# context (`asyncio.get_running_loop().create_task(coro, context=contextvars.Context())`),
# or unbind `request_id`/`key_id` inside `_ask_for_files`.
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_the_files_question_logs_without_the_first_askers_request(
    open_gw: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Scripted(lambda n, _: whole(claude(n)))
    gw = await open_gw(("anthropic", up, SONNET, {}), usage_flush_seconds=60.0)
    bob = await create_key(gw)
    seen: list[dict[str, Any]] = []

    async def failing() -> bool:
        seen.append(structlog.contextvars.get_contextvars())
        raise ConnectionRefusedError

    monkeypatch.setattr(app_of(gw)[STORE_KEY], "stored_files", failing)
    body = ask(messages=[{"role": "user", "content": [UPLOADED]}])
    assert (await post_messages(gw, bob, body))[0] == 200
    assert len(seen) == 1
    assert "key_id" not in seen[0] and "request_id" not in seen[0], seen[0]


# HELD: the first asker of the files question hanging up (its handler cancelled, as
# `handler_cancellation` does) does not cancel the question: the request waiting beside it
# gets the answer (searched, looked up, 200), one question was asked, and none is left in
# flight; the next request asks anew.
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_the_first_asker_hanging_up_leaves_the_question_to_the_others(
    open_gw: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Scripted(lambda n, _: whole(claude(n)))
    gw = await open_gw(("anthropic", up, SONNET, {}), usage_flush_seconds=60.0)
    bob = await create_key(gw)
    app = app_of(gw)
    share = app[STORED_SHARE_KEY]
    store = app[STORE_KEY]
    real = store.stored_files
    release, asked_twice, hung_up = asyncio.Event(), asyncio.Event(), asyncio.Event()
    asked: list[int] = []
    waiting: list[int] = []

    async def held() -> bool:
        asked.append(1)
        await release.wait()
        return await real()

    original = share.files_seen

    async def files_seen() -> bool:
        waiting.append(1)
        if len(waiting) == 2:
            asked_twice.set()
        try:
            return await original()
        except asyncio.CancelledError:
            hung_up.set()
            raise

    monkeypatch.setattr(store, "stored_files", held)
    monkeypatch.setattr(share, "files_seen", files_seen)
    body = ask(messages=[{"role": "user", "content": [UPLOADED]}])
    first = asyncio.ensure_future(post_messages(gw, bob, body))
    second = asyncio.ensure_future(post_messages(gw, bob, body))
    async with asyncio.timeout(10):
        await asked_twice.wait()
        first.cancel()  # (the client hangs up)
        with contextlib.suppress(asyncio.CancelledError):
            await first
        await hung_up.wait()
    release.set()
    status, answered = await second
    assert status == 200, answered
    assert len(asked) == 1 and share._files_asking is None
    assert (await post_messages(gw, bob, body))[0] == 200
    assert len(asked) == 2


class Sink:
    """A `StoredSink` whose files question waits for `release`."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.asking = asyncio.Event()
        self.asked = 0

    async def stored_files(self) -> bool:
        self.asked += 1
        self.asking.set()
        await self.release.wait()
        return True

    async def stored_owners(self, ids: Sequence[str]) -> list[Any]:
        return []

    async def keep_stored(self, rows: Any) -> None:
        return None

    async def forget_stored(self, before: float) -> None:
        return None


# HELD: every asker of the files question cancelled leaves the question running to its end
# (no task left pending, its answer kept: the search turns on), a question timed out answers
# yes and retrieves its own error (nothing unretrieved), and a cancelled asker's question is
# not cancelled by the asker's own cancellation.
async def test_a_files_question_all_of_whose_askers_left_ends_cleanly(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sink, known = Sink(), StoredResponses()
    share = StoredShare(sink, known, flush_seconds=60.0)
    askers = [asyncio.ensure_future(share.files_seen()) for _ in range(3)]
    async with asyncio.timeout(5):
        await sink.asking.wait()
    question = share._files_asking
    assert question is not None and sink.asked == 1
    for asker in askers:
        asker.cancel()
    await asyncio.gather(*askers, return_exceptions=True)
    assert not question.done()
    sink.release.set()
    assert await question is True
    assert known.files and share._files_asking is None
    assert await share.files_seen() is True and sink.asked == 1  # (known: asks nothing)

    monkeypatch.setattr(stored_share, "LOOKUP_SECONDS", 0.05)
    sink, known = Sink(), StoredResponses()
    share = StoredShare(sink, known, flush_seconds=60.0)
    with structlog.testing.capture_logs() as logs:
        answers = await asyncio.gather(share.files_seen(), share.files_seen())
    assert list(answers) == [True, True] and sink.asked == 1 and not known.files
    assert [line["event"] for line in logs] == ["stored_files_lookup_failed"]
    pending = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    assert not [task for task in pending if "_ask_for_files" in repr(task)], pending


# --- the file_id search ------------------------------------------------------------------------


def members(values: Sequence[bytes]) -> bytes:
    """A valid Messages request whose tool call's input holds a `file_id` member a value."""
    listed = b",".join(b'{"file_id":"%s"}' % value for value in values)
    call = b'{"type": "tool_use", "id": "t", "name": "f", "input": {"a": [%s]}}' % listed
    return (
        b'{"model": "m", "max_tokens": 8, "messages": [{"role": "assistant", "content": [%s]}]}'
        % call
    )


# FINDING (low: about a second of a worker's event loop per request, from any key with a
# Messages model, once files are searched for): h137 made near misses cheap, but members the
# search does match cost about 65 ms a megabyte: `_name_files` builds a tuple per match
# (`findall`), decodes each value, asks `known.others` and `named.name` each, and keeps
# every naming in `named.unresolved` (a million entries for one id named a million times),
# and `_begin` reads the request twice when the lookup found something (`_stored` again).
# A 16 MB tool input of `{"file_id":"x"}` holds the loop for about a second (its decode
# takes 20 ms); 32 MB (`max_body_bytes`) two. Any process that saw one file an upstream's
# code wrote searches every such request, and since 6fb7292 so does every process while
# the files question fails. Expected: near the documented 2 ms a megabyte (here at most 15,
# h137's bound). Fix: collect the distinct values (`set(findall)` or a dict of the raw
# value bytes) before decoding and naming, and stop at `MOST_LOOKED_UP` distinct ones (the
# request is refused with `too_many_stored_ids` past that anyway).
def test_the_file_id_search_of_many_short_members_costs_about_what_its_docs_say() -> None:
    body = members([b"x"] * 1_000_000)
    assert 15_000_000 < len(body) < 17_000_000
    named, known = Naming(), StoredResponses()
    known.files = True
    started = time.thread_time()
    assert messages_handler._FILE_ID.search(body) is not None  # (look_up's question)
    messages_handler._name_files(named, known, "key_alice", body)
    took = time.thread_time() - started
    assert named.unresolved
    assert took < 16 * 0.015 * 2, f"{took:.2f} s for a 16 MB body"


_OLD_FILE_ID = re.compile(
    rb'"((?:f|\\u0066)(?:i|\\u0069)(?:l|\\u006[cC])(?:e|\\u0065)(?:_|\\u005[fF])'
    rb'(?:i|\\u0069)(?:d|\\u0064))"\s*:\s*("(?:[^"\\]|\\.){0,%d}")' % (6 * LONGEST_ID)
)


# HELD: the possessive value pattern finds every value the old one (before 6fb7292) found,
# the same string (random values of up to and past 1,536 units, escapes of every kind, with
# and without their closing quote); and bodies shaped against it (many escapes, runs of
# exactly the limit, a run one too long after 1,536 escapes, whitespace before the colon)
# cost it a few ms a megabyte, never a scan per character.
def test_the_possessive_file_id_pattern_misses_nothing_and_stays_linear() -> None:
    pattern = messages_handler._FILE_ID
    most = 6 * LONGEST_ID
    units = ["a", "x", "\\n", '\\"', "\\\\", "\\u0066", "\\/", "\\uD83D\\uDE00", "\u00e9"]
    rng = random.Random(138)
    for _ in range(4000):
        size = rng.choice([0, 1, 2, 7, 300, most - 1, most, most + 1, 2 * most])
        value = "".join(rng.choice(units) for _ in range(size))
        ending = rng.choice(['"}', "", "x", "\\"])
        body = ('{"a": {"file_id" : "' + value + ending).encode()
        old = _OLD_FILE_ID.search(body)
        new = pattern.search(body)
        if old is not None:
            assert new is not None and new.group(2) == old.group(2), body[:120]
    run = b"x" * most
    shapes = {
        "escapes": [(b"\\n" + run) * most + b"\\nx"] * 6,
        "long tail": [(b"\\n" + run) * most + run + b"x"] * 6,
        "near misses": [run + b"x"] * 10_000,
        "escapes only": [b"\\n" * (most * most // 2)] * 6,
    }
    for name, values in shapes.items():
        body = members(values)
        started = time.thread_time()
        assert pattern.findall(body) == [], name
        took = time.thread_time() - started
        assert took < len(body) / 1e6 * 0.04, f"{name}: {took:.2f} s for {len(body)} bytes"
    spaces = b'{"a": [%s]}' % b",".join([b'{"file_id"' + b" " * 1000 + b":1}"] * 16_000)
    started = time.thread_time()
    assert pattern.findall(spaces) == []
    assert time.thread_time() - started < 16 * 0.04


# --- may_spell ---------------------------------------------------------------------------------


def spellings(word: str) -> list[str]:
    """`word` with each of its letters (but `"`) as a `\\u` escape, alone and all at once,
    in lower and upper case hex."""
    found = []
    for upper in (False, True):
        escape = [f"\\u{ord(c):04X}" if upper else f"\\u{ord(c):04x}" for c in word]
        for at, char in enumerate(word):
            if char != '"':
                found.append(word[:at] + escape[at] + word[at + 1 :])
        found.append("".join(e if c != '"' else c for c, e in zip(word, escape, strict=True)))
    return found


# HELD: `may_spell` says yes to every JSON spelling msgspec reads as the word (each letter
# escaped alone or all, either hex case: `file_id"`, `id"`, `audio`); the spellings it says
# no to are either not JSON to msgspec (`\U0066`, `\x66`: the whole body is refused), or
# read as other characters (a surrogate pair, a fullwidth letter, `\/` is `/`), which no
# upstream parser of JSON folds to ASCII. Past the gate: an `input_audio` part typed with
# escapes is still found (`_sends_audio`, which prices audio input).
def test_may_spell_agrees_with_msgspec() -> None:
    for word in ('file_id"', 'id"', "audio"):
        bare = word.rstrip('"')
        for spelled in spellings(word):
            key = spelled if spelled.endswith('"') else spelled + '"'
            body = ('{"a": [{"' + key + ': "v", "t": "' + spelled.rstrip('"') + '"}]}').encode()
            decoded = msgspec.json.decode(body)["a"][0]
            assert bare in decoded or decoded["t"] == bare, spelled
            assert may_spell(body, word.encode()), spelled
    for odd in ("\\U0066ile_id", "\\x66ile_id"):
        with pytest.raises(msgspec.DecodeError):
            msgspec.json.decode(('{"' + odd + '": 1}').encode())
    for other in ("\\ud800\\udc66ile_id", "\\uff46ile_id", "\\/ile_id"):
        body = ('{"' + other + '": 1}').encode()
        assert "file_id" not in msgspec.json.decode(body) and not may_spell(body, b'file_id"')
    body = (
        b'{"model": "m", "messages": [{"role": "user", "content": [{"type": '
        b'"input_\\u0061udio", "input_\\u0061udio": {"data": "AAAA", "format": "wav"}}]}]}'
    )
    req = decode_body(body, ChatCompletionRequest)
    assert "audio" not in body.decode() and _sends_audio(body, req)


async def post_raw(gw: Gateway, secret: str, path: str, body: bytes) -> tuple[int, Json]:
    headers = {"Authorization": f"Bearer {secret}", "Content-Type": "application/json"}
    async with gw.post(path, data=body, headers=headers) as resp:
        return resp.status, await resp.json()


# HELD: through the gateway, on a process that learns bob's ids from the database: alice's
# Responses item reference whose `id` key is spelled with an escape of its own letter, and
# her Messages `container_upload` of bob's file whose key is spelled so, are refused (404,
# nothing upstream); an ordinary body holding an SDK's `\u001b` and no `file_id` asks the
# database nothing.
async def test_escaped_keys_of_stored_ids_are_refused_on_another_process(
    open_gw: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Scripted(responses)
    first, second, bob, alice = await two(open_gw, ("openai", up, "gpt-5", PASSES))
    assert (await post_json(first, bob, "/v1/responses", {"model": "m", "input": "hi"}))[0] == 200
    await flush(first)
    forget(second)
    body = (
        b'{"model": "m", "input": [{"type": "item_reference", "i\\u0064": "rs_bob"}, '
        b'{"role": "user", "content": "\\u001b[0m"}]}'
    )
    status, answered = await post_raw(second, alice, "/v1/responses", body)
    assert status == 404 and answered["error"]["param"] == "input[0].id", answered
    assert len(up.bodies) == 1

    claude_up = Scripted(bobs_code_run)
    first, second, bob, alice = await two(open_gw, ("anthropic", claude_up, SONNET, {}))
    assert (await post_messages(first, bob, ask()))[0] == 200
    await flush(first)
    forget(second)
    app_of(second)[STORED_KEY].files = False  # (a process that knows of no file)
    escaped = (
        b'{"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": [{"type":'
        b' "container_upload", "fil\\u0065_id": "file_bob_payroll"}]}]}'
    )
    status, answered = await post_messages(second, alice, escaped)
    assert status == 404, answered
    assert len(claude_up.bodies) == 1
    asked: list[str] = []
    store = app_of(second)[STORE_KEY]
    real = store.stored_files

    async def counted() -> bool:
        asked.append("files")
        return await real()

    monkeypatch.setattr(store, "stored_files", counted)
    app_of(second)[STORED_KEY].files = False
    ordinary = ask(messages=[{"role": "user", "content": "\u001b[0m colours"}])
    assert (await post_messages(second, alice, ordinary))[0] == 200
    assert asked == [] and "\\u001b" in json.dumps(ordinary)
