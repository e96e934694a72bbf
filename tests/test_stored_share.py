"""What an upstream stores for one key, refused to another key by every process on the same
database (`gateway.stored_share`): a worker or replica that never saw the answer, and a
gateway started again after a stop, on SQLite and on PostgreSQL.

Each test runs two gateways in this process on one database, as two workers or replicas are;
the upstreams are raw sockets answering every key of the account alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import structlog
from aiohttp.pytest_plugin import AiohttpClient
from aiohttp.test_utils import TestClient

from gateway.database import Database, opened_database
from gateway.errors import NotFound, StoreBusy
from gateway.keys import digest_of
from gateway.media import Estimate
from gateway.settings import ModelConfig, RoutingSettings, Target
from gateway.state import KEYS_KEY, STORE_KEY, STORED_KEY, STORED_SHARE_KEY
from gateway.stored import MOST_IDS_AN_ANSWER, Naming, StoredResponses
from gateway.stored_share import (
    KEEP_DAYS,
    MOST_LATE,
    MOST_LOOKED_UP,
    MOST_PER_KEY,
    StoredShare,
)
from tests.conftest import MakeSettings, app_of, create_key, provider_config, start_gateway
from tests.test_attack_h105 import BASE, message_item, post as post_json, response_body, whole
from tests.test_attack_h107 import SONNET
from tests.test_attack_h126 import Scripted
from tests.test_attack_h128 import BOBS_RUN, ask, claude, not_found, post as post_messages
from tests.test_stored_ids import USAGE, answer, refused

Gateway = TestClient[Any, Any]
Start = Callable[..., Awaitable[Gateway]]


@contextlib.asynccontextmanager
async def gateways(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, database: str, **defaults: Any
) -> AsyncIterator[Start]:
    """Starts gateways on `database` (each a process of one deployment) whose model "m" goes
    to `upstream` (a provider of `kind`), with `defaults` as their server settings unless the
    call names its own; stops them (and the upstreams' sockets) at the end."""
    servers: list[asyncio.Server] = []
    started: list[Gateway] = []

    async def make(kind: str, upstream: Any, model: str, **server: Any) -> Gateway:
        if not upstream.port:
            listening = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
            servers.append(listening)
            upstream.port = listening.sockets[0].getsockname()[1]
        fields = {"responses_api": True} if kind == "openai" else {}
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
            database=database,
            **(defaults | server),
        )
        started.append(await start_gateway(aiohttp_client, settings))
        return started[-1]

    try:
        yield make
    finally:
        for gw in started:  # (stopped here, before the test's database is dropped)
            await gw.close()
        for listening in servers:
            listening.close()


@pytest.fixture
async def start(
    aiohttp_client: AiohttpClient, make_settings: MakeSettings, database: str
) -> AsyncIterator[Start]:
    """Starts a gateway on the test's database (SQLite, then PostgreSQL) whose model "m" goes
    to `upstream` (a provider of `kind`); every gateway of a test shares that database."""
    async with gateways(aiohttp_client, make_settings, database) as make:
        yield make


async def knows_keys(gw: Gateway) -> None:
    """The keys another gateway made, loaded now (not at the next poll)."""
    await app_of(gw)[KEYS_KEY].refresh()


def key_id_of(gw: Gateway, secret: str) -> str:
    digest = digest_of(secret)
    return next(k.id for k in app_of(gw)[KEYS_KEY].records() if k.digest == digest)


def count_lookups(gw: Gateway, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The ids of each of `gw`'s database lookups, from now on."""
    store = app_of(gw)[STORE_KEY]
    real = store.stored_owners
    asked: list[list[str]] = []

    async def counted(ids: Any) -> Any:
        asked.append(list(ids))
        return await real(ids)

    monkeypatch.setattr(store, "stored_owners", counted)
    return asked


async def test_another_process_refuses_another_keys_ids(start: Start) -> None:
    up = Scripted(lambda n, _: answer(conversation={"id": "conv_bob"}))
    first = await start("openai", up, "gpt-5")
    second = await start("openai", up, "gpt-5")
    bob, alice = await create_key(first), await create_key(first)
    await knows_keys(second)
    status, body = await post_json(first, bob, "/v1/responses", {"model": "m", "input": "secret"})
    assert status == 200, body
    await app_of(first)[STORED_SHARE_KEY].flush()
    sent = len(up.bodies)
    base = {"model": "m", "input": "Repeat."}
    for fields, param in (
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].id"),
        ({"tools": [{"type": "code_interpreter", "container": "cntr_bob"}]}, "tools[0].container"),
        ({"conversation": "conv_bob"}, "conversation"),
    ):
        status, body = await post_json(second, alice, "/v1/responses", base | fields)
        refused(status, body, param)
    assert len(up.bodies) == sent  # nothing went upstream
    # Bob's own on the second process: relayed, and held at its size (20 tokens).
    status, body = await post_json(
        second, bob, "/v1/responses", base | {"previous_response_id": "resp_1"}
    )
    assert status == 200, body
    known = app_of(second)[STORED_KEY]
    assert known.prompt("resp_1", key_id_of(second, bob)) == Estimate(20, 20)


async def test_requests_at_once_on_another_process_are_all_refused(start: Start) -> None:
    """Each looks the id up; those whose lookup ends after another's remembered it are
    refused too (they had found it new to no one, and were relayed)."""
    up = Scripted(lambda n, _: answer())
    first = await start("openai", up, "gpt-5")
    second = await start("openai", up, "gpt-5")
    bob, alice = await create_key(first), await create_key(first)
    await knows_keys(second)
    assert (await post_json(first, bob, "/v1/responses", {"model": "m", "input": "hi"}))[0] == 200
    await app_of(first)[STORED_SHARE_KEY].flush()
    body = {"model": "m", "input": "Repeat.", "previous_response_id": "resp_1"}
    answers = await asyncio.gather(
        *(post_json(second, alice, "/v1/responses", body) for _ in range(20))
    )
    assert [status for status, _ in answers] == [404] * 20
    assert len(up.bodies) == 1


async def test_a_gateway_started_again_refuses_what_it_learned_before_its_stop(
    start: Start,
) -> None:
    up = Scripted(lambda n, _: answer())
    # Its journal is written by the stop, not by the (hour-long) interval.
    first = await start("openai", up, "gpt-5", usage_flush_seconds=3600.0)
    bob, alice = await create_key(first), await create_key(first)
    status, body = await post_json(first, bob, "/v1/responses", {"model": "m", "input": "secret"})
    assert status == 200, body
    await first.close()
    again = await start("openai", up, "gpt-5")
    body = {"model": "m", "input": "Repeat.", "previous_response_id": "resp_1"}
    refused(*await post_json(again, alice, "/v1/responses", body), "previous_response_id")
    assert len(up.bodies) == 1


async def test_another_process_refuses_a_thread_and_files_of_another_keys_code(
    start: Start,
) -> None:
    up = Scripted(lambda n, _: whole(claude(n, BOBS_RUN if n == 0 else None)))
    first = await start("anthropic", up, SONNET)
    second = await start("anthropic", up, SONNET)
    bob, alice = await create_key(first), await create_key(first)
    await knows_keys(second)
    assert (await post_messages(first, bob, ask()))[0] == 200
    await app_of(first)[STORED_SHARE_KEY].flush()
    # The second process learns from the database that files were shown (asked by the first
    # request that may name one), and searches for them from then on.
    assert not app_of(second)[STORED_KEY].files
    source = {"type": "image", "source": {"type": "file", "file_id": "file_bob_payroll"}}
    upload = {"type": "container_upload", "file_id": "file_bob_payroll"}
    thread = {"type": "continue", "previous_message_id": "msg_0"}
    for body in (
        ask(messages=[{"role": "user", "content": [source]}]),
        ask(messages=[{"role": "user", "content": [upload]}]),
        ask(messages=[], thread=thread),
    ):
        not_found(*await post_messages(second, alice, body))
    assert len(up.bodies) == 1
    assert app_of(second)[STORED_KEY].files


async def test_a_failed_lookup_is_refused_to_try_again_and_logged(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Scripted(lambda n, _: answer())
    gw = await start("openai", up, "gpt-5")
    alice = await create_key(gw)
    store = app_of(gw)[STORE_KEY]

    async def down(ids: Any) -> Any:
        raise ConnectionRefusedError

    monkeypatch.setattr(store, "stored_owners", down)
    body = {"model": "m", "input": "Go on.", "previous_response_id": "resp_elsewhere"}
    with structlog.testing.capture_logs() as logs:
        status, answered = await post_json(gw, alice, "/v1/responses", body)
    # (Not relayed unchecked: a key flooding the database must not get another's ids so.)
    assert status == 503 and answered["error"]["code"] == "database_busy", answered
    assert up.bodies == []
    failed = [line for line in logs if line["event"] == "stored_ids_lookup_failed"]
    assert failed == [
        {"event": "stored_ids_lookup_failed", "error": "ConnectionRefusedError", "ids": 1}
        | {"log_level": "warning"}
    ]


async def test_a_failing_write_makes_the_gateway_not_ready_until_it_is_written(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The other processes would relay ids they cannot read: a load balancer should know."""
    up = Scripted(lambda n, _: answer())
    gw = await start("openai", up, "gpt-5")
    bob = await create_key(gw)
    store = app_of(gw)[STORE_KEY]
    real = store.keep_stored

    async def down(rows: Any) -> None:
        raise ConnectionRefusedError

    monkeypatch.setattr(store, "keep_stored", down)
    assert (await post_json(gw, bob, "/v1/responses", {"model": "m", "input": "hi"}))[0] == 200
    with pytest.raises(ConnectionRefusedError):
        await app_of(gw)[STORED_SHARE_KEY].flush()
    async with gw.get("/readyz") as resp:
        assert resp.status == 503
        state = await resp.json()
    assert state["stored_ids"] == "failing" and state["stored_ids_pending"] >= 1
    assert state["usage"] == "ok"
    monkeypatch.setattr(store, "keep_stored", real)
    await app_of(gw)[STORED_SHARE_KEY].flush()
    async with gw.get("/readyz") as resp:
        assert resp.status == 200
        state = await resp.json()
    assert state["stored_ids"] == "ok" and state["stored_ids_pending"] == 0
    assert "resp_1" in await owners(store, "resp_1")


async def owners(db: Database, *ids: str) -> dict[str, tuple[str, int]]:
    return {row[0]: (row[1], row[2]) for row in await db.stored_owners(ids)}


async def test_the_first_owner_stays_a_contest_is_no_ones_and_old_ids_are_forgotten(
    database: str,
) -> None:
    async with opened_database(database) as db:
        now = time.time()
        await db.keep_stored([("resp_1", "key_a", -1, 0, now), ("file_1", "key_a", -1, 1, now)])
        await db.keep_stored([("resp_1", "key_a", 20, 0, now), ("file_1", "key_b", 5, 0, now)])
        # The owner's size is taken; another key's answer that shows the id takes nothing.
        assert await owners(db, "resp_1", "file_1", "nobody") == {
            "resp_1": ("key_a", 20),
            "file_1": ("key_a", -1),
        }
        assert await db.stored_files()
        await db.keep_stored([("resp_1", "*", -1, 0, now)])
        await db.keep_stored([("resp_1", "key_a", 30, 0, now)])
        assert await owners(db, "resp_1") == {"resp_1": ("*", 20)}
        old = now - KEEP_DAYS * 86400.0 - 1
        await db.keep_stored([("resp_old", "key_a", 7, 0, old)])
        await db.forget_stored(now - KEEP_DAYS * 86400.0)
        assert set(await owners(db, "resp_1", "file_1", "resp_old")) == {"resp_1", "file_1"}


async def test_a_request_naming_ids_this_process_knows_asks_the_database_nothing(
    start: Start, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Scripted(lambda n, _: answer())
    gw = await start("openai", up, "gpt-5")
    bob = await create_key(gw)
    assert (await post_json(gw, bob, "/v1/responses", {"model": "m", "input": "hi"}))[0] == 200
    asked = count_lookups(gw, monkeypatch)
    body = {"model": "m", "input": "Go on.", "previous_response_id": "resp_1"}
    assert (await post_json(gw, bob, "/v1/responses", body))[0] == 200
    assert asked == []
    body["previous_response_id"] = "resp_elsewhere"
    assert (await post_json(gw, bob, "/v1/responses", body))[0] == 200
    assert asked == [["resp_elsewhere"]]


def test_the_journal_is_bounded_and_holds_only_ids_a_database_takes() -> None:
    known = StoredResponses(most=3)
    known.journal = {}
    known.remember("resp_é", "key_a", 1)  # not ASCII: this process's only
    known.remember("resp_\x00", "key_a", 1)
    known.own(["a", "b", "c", "d"], "key_a", files=True)
    assert list(known.journal) == ["b", "c", "d"]
    assert known.journal["d"] == ("key_a", -1, True)
    assert known.unshared == 1
    known.remember("d", "key_a", 9)  # (a size learned later is written again)
    assert list(known.journal) == ["b", "c", "d"]
    assert known.journal["d"] == ("key_a", 9, True)


async def test_a_request_naming_more_unknown_ids_than_the_bound_is_refused(start: Start) -> None:
    up = Scripted(lambda n, _: whole(claude(n)))
    gw = await start("anthropic", up, SONNET)
    alice = await create_key(gw)
    app_of(gw)[STORED_KEY].files = True  # (some answer showed a file)
    many = [
        {"type": "image", "source": {"type": "file", "file_id": f"file_{n}"}}
        for n in range(MOST_LOOKED_UP + 1)
    ]
    status, body = await post_messages(gw, alice, ask(messages=[{"role": "user", "content": many}]))
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error", body
    assert f"at most {MOST_LOOKED_UP}" in body["error"]["message"], body
    assert up.bodies == []
    status, body = await post_messages(
        gw, alice, ask(messages=[{"role": "user", "content": many[:MOST_LOOKED_UP]}])
    )
    assert status == 200, body


class FlakySink:
    """A database that fails while `down`, and otherwise keeps what it is given."""

    def __init__(self) -> None:
        self.down = True
        self.rows: list[Any] = []

    async def keep_stored(self, rows: Any) -> None:
        if self.down:
            raise ConnectionRefusedError
        self.rows += rows

    async def stored_owners(self, ids: Any) -> list[tuple[str, str, int, int, float]]:
        return []

    async def forget_stored(self, before: float) -> None:
        pass

    async def stored_files(self) -> bool:
        if self.down:
            raise ConnectionRefusedError
        return False


def held_writes(sink: FlakySink) -> tuple[asyncio.Event, asyncio.Event]:
    """`sink`'s writes wait, once under way (the first event set), until the second is set:
    a batch on its way to the database."""
    writing, release = asyncio.Event(), asyncio.Event()
    keep = sink.keep_stored

    async def slow(rows: Any) -> None:
        writing.set()
        await release.wait()
        await keep(rows)

    sink.keep_stored = slow  # type: ignore[method-assign]
    return writing, release


async def test_writes_that_fail_are_kept_bounded_and_written_once_the_database_is_back() -> None:
    known = StoredResponses(most=3)
    sink = FlakySink()
    share = StoredShare(sink, known, flush_seconds=60.0)
    known.remember("resp_1", "key_a", None)
    known.remember("resp_2", "key_a", None)
    with structlog.testing.capture_logs() as logs, pytest.raises(ConnectionRefusedError):
        await share.tick()
    assert logs == []
    known.remember("resp_1", "key_a", 20)  # (its size, learned while the write failed)
    known.remember("resp_3", "key_a", None)
    known.remember("resp_4", "key_a", None)  # one more than the bound
    with structlog.testing.capture_logs() as logs, pytest.raises(ConnectionRefusedError):
        await share.tick()
    assert logs == [{"event": "stored_ids_dropped", "dropped": 1, "log_level": "error"}]
    sink.down = False
    await share.tick()
    assert [(row[0], row[1], row[2]) for row in sink.rows] == [
        ("resp_1", "key_a", 20),
        ("resp_3", "key_a", -1),
        ("resp_4", "key_a", -1),
    ]
    assert share.pending == 0


async def test_a_failed_write_goes_back_before_what_was_noted_meanwhile_within_the_bound() -> None:
    known = StoredResponses(most=3)
    sink = FlakySink()
    share = StoredShare(sink, known, flush_seconds=60.0)
    writing, release = held_writes(sink)
    known.remember("resp_1", "key_a", None)
    known.remember("resp_2", "key_a", None)
    flushing = asyncio.create_task(share.flush())
    await writing.wait()
    known.remember("resp_2", "key_a", 7)  # (newer than the batch on its way)
    known.remember("resp_3", "key_a", None)
    known.remember("resp_4", "key_a", None)
    release.set()
    with pytest.raises(ConnectionRefusedError):
        await flushing
    # resp_1 (the batch's oldest) is dropped for the bound; resp_2's newer size wins.
    assert known.journal == {
        "resp_2": ("key_a", 7, False),
        "resp_3": ("key_a", -1, False),
        "resp_4": ("key_a", -1, False),
    }
    assert list(known.journal) == ["resp_2", "resp_3", "resp_4"] and known.unshared == 1


async def test_a_failed_look_for_files_searches_the_request_and_is_logged_once() -> None:
    known = StoredResponses()
    sink = FlakySink()
    share = StoredShare(sink, known, flush_seconds=60.0)
    with structlog.testing.capture_logs() as logs:
        # (Failed: the request is searched, and what it names looked up, as with files.)
        assert await share.files_seen()
        # While it fails: yes at once, the question asked again meanwhile.
        assert await share.files_seen()
        asking = share._files_asking
        assert asking is not None
        await asking
        sink.down = False
        assert await share.files_seen()
        asking = share._files_asking
        assert asking is not None
        assert not await asking  # (the database answers: no file anywhere)
        assert not await share.files_seen()
    assert not known.files
    assert logs == [
        {"event": "stored_files_lookup_failed", "error": "ConnectionRefusedError"}
        | {"log_level": "warning"},
        {"event": "stored_files_lookup_recovered", "log_level": "info"},
    ]
    known.files = True  # (this process saw one)
    assert await share.files_seen()


class Holding(FlakySink):
    """A database that answers a lookup of `resp_bob` (key_bob's) at once, and holds every
    other lookup (`running`) until `release`."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.running: list[Any] = []

    async def stored_owners(self, ids: Any) -> list[tuple[str, str, int, int, float]]:
        if "resp_bob" in ids:
            return [("resp_bob", "key_bob", 20, 0, time.time())]
        self.running.append(ids)
        try:
            await self.release.wait()
        finally:
            self.running.remove(ids)
        return []


def naming(stored_id: str) -> Naming:
    named = Naming()
    named.unresolved.append((stored_id, "previous_response_id", "Previous response", None))
    return named


async def test_lookups_in_flight_within_their_deadline_never_make_another_fail_open() -> None:
    """Only lookups past their deadline count against `MOST_LATE`: 80 requests' lookups held
    by a busy (not hung) database, then alice naming bob's response, are all answered."""
    sink = Holding()
    share = StoredShare(sink, StoredResponses(), flush_seconds=60.0)
    held = [
        asyncio.ensure_future(share.resolve(naming(f"resp_{n}"), "key_x", share.deadline()))
        for n in range(80)
    ]
    await asyncio.sleep(0)  # (each under way, none late)
    with pytest.raises(NotFound):
        await share.resolve(naming("resp_bob"), "key_alice", share.deadline())
    sink.release.set()
    assert await asyncio.gather(*held) == [False] * 80


async def test_one_keys_flood_of_lookups_takes_its_own_turns_not_another_keys() -> None:
    """Lookups run before admission (no rate limit bounds them): 70 of key_x's on a database
    that hangs for its ids run `MOST_PER_KEY` at once, late ones included, the rest refused
    at their deadline; alice's lookup of bob's response is still asked and refused, not
    answered with a 503 because key_x's late lookups filled `MOST_LATE`."""
    sink = Holding()
    running = sink.running
    share = StoredShare(sink, StoredResponses(), flush_seconds=60.0)
    # (Long enough for each lookup to start on a loaded machine, so 16 are left late.)
    soon = asyncio.get_running_loop().time() + 0.3
    flood = [
        asyncio.ensure_future(share.resolve(naming(f"resp_{n}"), "key_x", soon))
        for n in range(MOST_LATE + 6)
    ]
    answers = await asyncio.gather(*flood, return_exceptions=True)
    assert all(isinstance(a, StoreBusy) for a in answers), answers
    assert len(running) == MOST_PER_KEY  # (late, still running: key_x's turns held)
    with pytest.raises(NotFound):
        await share.resolve(naming("resp_bob"), "key_alice", share.deadline())
    # key_x's next lookup waits for its own turns (refused at its deadline), asking nothing.
    with pytest.raises(StoreBusy):
        await share.resolve(naming("resp_more"), "key_x", asyncio.get_running_loop().time())
    assert len(running) == MOST_PER_KEY
    sink.release.set()
    await asyncio.wait(set(share._late))  # (the late lookups end, giving their turns back)
    assert running == []
    assert share._turn_users == {}
    assert await share.resolve(naming("resp_1"), "key_x", share.deadline()) is False


async def test_ids_past_an_answers_first_are_refused_by_another_process(start: Start) -> None:
    """An answer of more items than memory takes from one (`MOST_IDS_AN_ANSWER`): the rest
    go to the database, and another process refuses them to another key."""
    items = [message_item("x") | {"id": f"msg_{n}"} for n in range(MOST_IDS_AN_ANSWER + 50)]
    up = Scripted(lambda n, _: whole(response_body(USAGE, items)))
    first = await start("openai", up, "gpt-5")
    second = await start("openai", up, "gpt-5")
    bob, alice = await create_key(first), await create_key(first)
    await knows_keys(second)
    status, body = await post_json(first, bob, "/v1/responses", {"model": "m", "input": "hi"})
    assert status == 200, body
    assert f"msg_{MOST_IDS_AN_ANSWER + 49}" not in app_of(first)[STORED_KEY]
    await app_of(first)[STORED_SHARE_KEY].flush()
    sent = len(up.bodies)
    for gw in (first, second):
        for n in (0, MOST_IDS_AN_ANSWER, MOST_IDS_AN_ANSWER + 49):
            naming = {"model": "m", "input": [{"type": "item_reference", "id": f"msg_{n}"}]}
            refused(*await post_json(gw, alice, "/v1/responses", naming), "input[0].id")
    assert len(up.bodies) == sent


def test_ids_past_an_answers_first_never_push_out_what_other_answers_showed() -> None:
    """They go to the journal only while it holds less than half its bound (a database
    failing, or a flood of such answers); one known here is kept as it was."""
    known = StoredResponses(most=10)
    known.journal = {}
    known.own(["msg_a"], "key_a")
    known.share(["msg_a", *(f"msg_{n}" for n in range(20))], "key_b")
    assert known.others("msg_a", "key_b")  # (still key_a's)
    assert list(known.journal) == ["msg_a", "msg_0", "msg_1", "msg_2", "msg_3"]
    assert known.unspilled == 16 and known.unshared == 0 and len(known) == 1
    # Contested as `own` contests: key_b's own response showed key_a's item too.
    known.share(["msg_a"], "key_b", contest=True)
    assert not known.others("msg_a", "key_b") and not known.others("msg_a", "key_a")


async def test_written_ids_past_an_answers_first_stay_held_here_never_in_memory() -> None:
    """Once written, the ids past an answer's first stay held by the process that showed
    them (it decides them itself while the database is down, and contests them), at most
    half of memory's bound, the oldest let go; memory forgets nothing for them."""
    known = StoredResponses(most=10)
    sink = FlakySink()
    sink.down = False
    share = StoredShare(sink, known, flush_seconds=60.0)
    known.own(["msg_a1", "msg_a2", "msg_a3"], "key_a")
    await share.flush()
    known.share([f"msg_b{n}" for n in range(4)], "key_b")
    await share.flush()
    assert len(known) == 3 and not known.writing and not known.journal
    assert known.others("msg_b3", "key_a") and not known.others("msg_b3", "key_b")
    assert known.held("msg_b0") == ("key_b", -1, False)
    assert known.held("msg_a1") is None  # (memory holds it)
    # Contested as memory contests: key_a's own response showed key_b's item too.
    known.share(["msg_b0"], "key_a", contest=True)
    await share.flush()
    assert sink.rows[-1][:2] == ("msg_b0", "*")
    assert not known.others("msg_b0", "key_a") and not known.others("msg_b0", "key_b")
    # At most half of memory's bound (5): the oldest let go (found by a lookup).
    known.share(["msg_c0", "msg_c1"], "key_c")
    await share.flush()
    assert known.held("msg_b1") is None  # (the contest made msg_b0 newest)
    held = ("msg_b2", "msg_b3", "msg_b0", "msg_c0", "msg_c1")
    assert all(known.held(stored_id) is not None for stored_id in held)
    assert len(known) == 3


async def test_an_id_contested_while_its_batch_is_written_is_not_kept_as_the_batchs() -> None:
    """An id past an answer's first that another key's own response showed while its batch
    was written is contested in the journal: what is held of it is not the batch's older
    owner."""
    known = StoredResponses()
    sink = FlakySink()
    sink.down = False
    share = StoredShare(sink, known, flush_seconds=60.0)
    writing, release = held_writes(sink)
    known.share(["msg_x"], "key_bob")
    flushing = asyncio.create_task(share.flush())
    await writing.wait()
    known.share(["msg_x"], "key_alice", contest=True)  # (alice's own response showed it too)
    release.set()
    await flushing
    assert not known.others("msg_x", "key_alice") and not known.others("msg_x", "key_bob")
    await share.flush()
    assert sink.rows[-1][:2] == ("msg_x", "*")
    assert not known.others("msg_x", "key_alice") and not known.others("msg_x", "key_bob")


def test_forgetting_the_oldest_costs_what_remembering_does() -> None:
    """A full memory forgets an id for each new one, and a full journal (the database
    failing) drops one: each the oldest, found at once (a plain dict's first item is found
    past every one deleted before it, which made 40,000 of them cost 10 times their adding)."""
    count = 40_000

    def cost(known: StoredResponses, prefix: str) -> float:
        start = time.thread_time()
        for n in range(count):
            known.own([f"{prefix}_{n}"], "key_a")
        return time.thread_time() - start

    known = StoredResponses(most=count)
    known.journal = OrderedDict()
    adding = cost(known, "first")  # (memory and journal fill up)
    forgetting = cost(known, "second")  # (each forgets one, and drops one)
    assert len(known) == count and len(known.journal) == count
    assert known.unshared == count
    assert forgetting < 4 * adding + 0.05, (forgetting, adding)


async def test_a_failing_write_backs_off_and_is_tried_at_once_when_the_database_is_back() -> None:
    """Each try hands the database the whole journal (up to 100,000 ids, about 45 ms of the
    loop): while writes fail the next is tried twice as late each time, up to
    `MOST_RETRY_SECONDS`; at the ticks between, a cheap question asks whether the database
    is back, and once it answers the write is tried at that tick."""
    known = StoredResponses()
    sink = FlakySink()
    share = StoredShare(sink, known, flush_seconds=0.5)
    now = [1000.0]
    share._clock = lambda: now[0]
    tries: list[float] = []
    keep = sink.keep_stored

    async def counted(rows: Any) -> None:
        tries.append(now[0] - 1000.0)
        await keep(rows)

    sink.keep_stored = counted  # type: ignore[method-assign]
    known.remember("resp_1", "key_a", None)
    for _ in range(60):  # (30 s of ticks, every 0.5 s)
        now[0] += 0.5
        with contextlib.suppress(ConnectionRefusedError):
            await share.tick()
    assert tries == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 24.0], tries
    assert share.failing and share.pending == 1
    sink.down = False  # (back between two tries: written at the next tick)
    now[0] += 0.5
    await share.tick()
    assert tries[-1] == 30.5 and not share.failing and share.pending == 0
    assert [row[0] for row in sink.rows] == ["resp_1"]
    known.remember("resp_2", "key_a", None)
    now[0] += 0.5
    await share.tick()  # (the pace again)
    assert tries[-1] == 31.0 and [row[0] for row in sink.rows] == ["resp_1", "resp_2"]
