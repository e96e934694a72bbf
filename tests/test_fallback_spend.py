"""What the local fallback (`redis_failure = "local"`) admits while Redis is away reaches the
shared spending of every replica once Redis answers again: the key's counter is dropped before
requests go through Redis again (`SharedGate.reconcile`) and seeded afresh from the usage table,
which has the fallback's rows. Each test uses a real throw-away redis-server."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from redis.asyncio import Redis
from structlog.testing import capture_logs

from gateway import limits_fallback, limits_redis
from gateway.limits_redis import SharedGate
from gateway.state import GATE_KEY, KEYS_KEY, USAGE_KEY
from tests.conftest import NEVER_HANG, MakeSettings, app_of, create_key, usage_rows
from tests.redis_server import RedisServer
from tests.test_attack_scale import all_seen, hold_four, post
from tests.test_limits_redis import auth, known, two_gateways


async def frozen_then_back(gate: SharedGate) -> None:
    """Wait for the probe to find Redis answering again, and for the ends it sends then."""
    async with asyncio.timeout(NEVER_HANG):
        assert gate._probe is not None
        await gate._probe
        while gate._ender is not None and not gate._ender.done():
            await asyncio.wait([gate._ender])


async def ended(gate: SharedGate) -> None:
    async with asyncio.timeout(NEVER_HANG):
        while gate._ender is not None and not gate._ender.done():
            await asyncio.wait([gate._ender])


async def test_a_redis_restart_that_lost_its_data_counts_the_fallbacks_spending_once(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The commonest outage: Redis restarts empty (no persistence). Replica A's fallback spent
    30 meanwhile (its rows are in the usage table). Replica B reaches Redis first (A's probe
    pings once a second) and seeds the period's counter from the usage table: A's 30 are in
    it. When A's probe then found Redis, A added its 30 again (70). Any restart that loses
    Redis's data, with two replicas or more: A's counter must be seeded afresh instead."""
    _, gw, other, secret = await seeded(
        aiohttp_server, aiohttp_client, make_settings, redis_server
    )  # A spent 10 through Redis (every request uses 10)
    gate = app_of(gw)[GATE_KEY]
    assert isinstance(gate, SharedGate)
    redis_server.stop()
    assert [(await post(gw, secret))[0] for _ in range(3)] == [200] * 3  # 30, locally
    assert not gate.up and gate._stale
    assert len(await usage_rows(gw)) == 4  # A's rows are in the table
    # A's probe has not found Redis yet when B seeds (a 1 s probe interval: B is first).
    real_ping = gate.redis.ping
    may_ping = asyncio.Event()

    async def later_ping(*args: Any, **kwargs: Any) -> Any:
        await may_ping.wait()
        return await real_ping(*args, **kwargs)

    monkeypatch.setattr(gate.redis, "ping", later_ping)
    redis_server.start()
    await known(other, secret)
    key = app_of(gw)[KEYS_KEY].lookup(secret)
    assert key is not None
    b_gate = app_of(other)[GATE_KEY]
    assert isinstance(b_gate, SharedGate)
    async with asyncio.timeout(NEVER_HANG):
        while True:  # (B's pooled connection to the old server may fail once)
            spend = await b_gate.spending(key)
            if b_gate.up and spend is not None:
                break
            if b_gate._probe is not None:
                await b_gate._probe
    assert spend.tokens == 40  # seeded from the table: A's 30 are in it
    may_ping.set()
    await frozen_then_back(gate)
    await ended(gate)
    spend = await b_gate.spending(key)
    assert spend is not None and spend.tokens == 40  # (A's 30 were counted twice)


async def test_a_redis_that_takes_no_writes_yet_keeps_the_fallbacks_spending_to_count(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
) -> None:
    """Redis answers PING again but takes no writes (CLIENT PAUSE WRITE: what a failover
    does). The fallback's spending was sent as ends then, which timed out and, sent again
    later, were dropped (an end sent again counts only for a request that holds something
    in Redis): lost for every replica. Now the dropping of the counter must go through
    before the circuit closes; until it does, the probe goes on."""
    _, gw, _, secret = await seeded(
        aiohttp_server, aiohttp_client, make_settings, redis_server
    )  # A spent 10 through Redis (every request uses 10)
    gate = app_of(gw)[GATE_KEY]
    assert isinstance(gate, SharedGate)
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        assert [(await post(gw, secret))[0] for _ in range(3)] == [200] * 3  # 30, locally
        assert not gate.up and gate._stale
        await ended(gate)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    admin = Redis.from_url(redis_server.url)
    try:
        await admin.execute_command("CLIENT", "PAUSE", 1500, "WRITE")  # PING still answers
        await frozen_then_back(gate)
        await ended(gate)
    finally:
        await admin.aclose()
    assert not gate._stale
    key = app_of(gw)[KEYS_KEY].lookup(secret)
    assert key is not None
    spend = await gate.spending(key)
    assert spend is not None and spend.tokens == 40


async def test_a_budget_lifted_and_given_again_during_the_outage_is_seeded_afresh(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
) -> None:
    """While Redis is away a key's budget is lifted, 20 are spent without it, and it is given
    again: `sync` found the counter stale but could drop it only with Redis up, and nothing
    dropped it later. The in-memory gate starts a budget given again from the table (40); the
    shared counter kept its 10 from before the outage (for ever, for a total budget)."""
    _, gw, _, secret = await seeded(
        aiohttp_server, aiohttp_client, make_settings, redis_server
    )  # A spent 10 through Redis (every request uses 10)
    gate = app_of(gw)[GATE_KEY]
    keys = app_of(gw)[KEYS_KEY]
    assert isinstance(gate, SharedGate)
    budgeted = keys.lookup(secret)
    assert budgeted is not None
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        assert (await post(gw, secret))[0] == 200  # finds Redis away: 10, locally
        assert not gate.up
        free = msgspec.structs.replace(budgeted, budget_tokens=None)
        await gate.sync([free])
        keys.put(free)
        assert [(await post(gw, secret))[0] for _ in range(2)] == [200] * 2  # 20, no budget
        await gate.sync([budgeted])  # the budget is given again
        keys.put(budgeted)
        await usage_rows(gw)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    await frozen_then_back(gate)
    await ended(gate)
    spend = await gate.spending(budgeted)
    assert spend is not None and spend.tokens == 40


async def test_what_the_local_fallback_admitted_counts_in_the_shared_spending(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
) -> None:
    """With `redis_failure = "local"`, requests admitted while Redis was frozen (it comes back
    with its data) spent against this replica's book only: the shared counter, seeded before
    the outage, never learnt of them, so every replica admitted that spending again until the
    period's counter was next seeded (a day, a month, never for a total budget). Once Redis
    answers, what they used is added to it; so is what a request the fallback admitted uses
    when it ends after the outage."""
    fake, gw, other, secret = await seeded(
        aiohttp_server, aiohttp_client, make_settings, redis_server
    )  # A spent 10 through Redis (every request uses 10)
    gate = app_of(gw)[GATE_KEY]
    assert isinstance(gate, SharedGate)
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        assert [(await post(gw, secret))[0] for _ in range(3)] == [200] * 3  # 30, locally
        assert not gate.up
        release, tasks = hold_four(gw, secret, fake)  # admitted locally, end after the outage
        await all_seen(fake, 8)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    await frozen_then_back(gate)
    key = app_of(gw)[KEYS_KEY].lookup(secret)
    assert key is not None
    spend = await gate.spending(key)
    assert spend is not None and spend.tokens == 40
    release.set()
    assert [code for code, _ in await asyncio.gather(*tasks)] == [200] * 4
    async with asyncio.timeout(NEVER_HANG):
        while gate._ender is not None and not gate._ender.done():
            await asyncio.wait([gate._ender])
    await known(other, secret)
    for replica in (gw, other):  # one counter: every replica reads the same spending
        spend = await app_of(replica)[GATE_KEY].spending(key)
        assert spend is not None and (spend.tokens, spend.held_tokens) == (80, 0)


def shared(gw: Any) -> SharedGate:
    gate = app_of(gw)[GATE_KEY]
    assert isinstance(gate, SharedGate)
    return gate


def block_writes(monkeypatch: pytest.MonkeyPatch, gw: Any) -> asyncio.Event:
    """The replica's usage writer writes nothing until the event is set (as during its
    `usage_flush_seconds`, or a database that is slow or locked): its rows stay queued."""
    recorder = app_of(gw)[USAGE_KEY]
    store = recorder._store
    real = store.insert_usage
    may_write = asyncio.Event()

    async def later(*args: Any, **kwargs: Any) -> Any:
        await may_write.wait()
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, "insert_usage", later)
    return may_write


async def table_tokens(gw: Any) -> int:
    return sum(int(row["total_tokens"]) for row in await usage_rows(gw))


async def test_a_fallback_request_ending_while_reconcile_drops_is_dropped_again(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fallback request that ends while `reconcile` drops the counter marks it again, and
    `_reconcile_late` drops it once its row is written. The marks were a set the drop took
    the name out of afterwards: the request's mark went with it, its row missed the flush,
    and replica B seeded the counter without it (20, not 30)."""
    fake, gw, other, secret = await seeded_pair(
        aiohttp_server, aiohttp_client, make_settings, redis_server
    )
    gate = shared(gw)
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        assert (await post(gw, secret))[0] == 200  # finds Redis away: 10, locally
        assert not gate.up and gate._stale
        release = asyncio.Event()
        fake.always(content="two words", hold=release)
        held = asyncio.create_task(post(gw, secret))  # admitted locally, still running
        await all_seen(fake, 3)
        deleting, may_delete = asyncio.Event(), asyncio.Event()
        real_delete = gate.redis.delete

        async def slow_delete(*names: Any) -> Any:
            deleting.set()
            await may_delete.wait()
            return await real_delete(*names)

        monkeypatch.setattr(gate.redis, "delete", slow_delete)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    async with asyncio.timeout(NEVER_HANG):
        await deleting.wait()  # reconcile flushed and is dropping the counter
    may_write = block_writes(monkeypatch, gw)  # A's next rows: not written yet
    release.set()
    assert (await held)[0] == 200  # ends while the circuit is still open: marked stale
    may_delete.set()
    await frozen_then_back(gate)
    assert gate.up
    key = app_of(gw)[KEYS_KEY].lookup(secret)
    assert key is not None
    b_spend = await shared(other).spending(key)  # B seeds from the table (A's last row missing)
    assert b_spend is not None
    may_write.set()
    assert await table_tokens(gw) == 30
    await ended(gate)
    if gate._late is not None:
        await gate._late
    spend = await shared(other).spending(key)
    assert spend is not None and spend.tokens == 30, spend


async def post_small(gw: Any, secret: str) -> tuple[int, Any]:
    """A request whose estimate stays under its 10 tokens (`max_tokens` 2): a budget of 30
    admits exactly three."""
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with gw.post("/v1/chat/completions", json=body, headers=auth(secret)) as resp:
        return resp.status, await resp.json()


async def seeded(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
    budget: int = 10_000,
    send: Callable[[Any, str], Awaitable[tuple[int, Any]]] = post,
) -> tuple[Any, Any, Any, str]:
    """Replicas A and B with the local fallback, and a key with a total budget that A spent
    10 of through Redis (its spending seeded), not read by B yet: the fake upstream (10
    tokens a request), A, B and the key."""
    fake, gw, other = await two_gateways(
        aiohttp_server,
        aiohttp_client,
        make_settings,
        redis_url=redis_server.url,
        redis_failure="local",
    )
    fake.always(content="two words")
    secret = await create_key(gw, budget_tokens=budget, budget_period="total")
    assert (await send(gw, secret))[0] == 200  # seeds: 10
    return fake, gw, other, secret


async def seeded_pair(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
    budget: int = 10_000,
    send: Callable[[Any, str], Awaitable[tuple[int, Any]]] = post,
) -> tuple[Any, Any, Any, str]:
    """`seeded`, with the key known to B too."""
    fake, gw, other, secret = await seeded(
        aiohttp_server, aiohttp_client, make_settings, redis_server, budget, send
    )
    await known(other, secret)
    return fake, gw, other, secret


def watch_unwritten(monkeypatch: pytest.MonkeyPatch, gate: SharedGate) -> asyncio.Event:
    """Set when the probe's `reconcile` finds this replica's rows not written in time."""
    found = asyncio.Event()
    real = gate.reconcile

    async def watched() -> None:
        try:
            await real()
        except limits_redis.Unwritten:
            found.set()
            raise

    monkeypatch.setattr(gate, "reconcile", watched)
    return found


async def outage_with_rows_unwritten(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    budget: int = 10_000,
) -> tuple[Any, Any, str, asyncio.Event]:
    """Replica A spends 10 through Redis, 10 in its fallback (written) and 10 more whose row
    the database does not write yet; then Redis answers again. A, B, the key, and the event
    that lets A's rows be written."""
    monkeypatch.setattr(limits_redis, "RECONCILE_FLUSH_SECONDS", 0.05)
    monkeypatch.setattr(limits_fallback, "_PROBE_SECONDS", 0.2)  # (tries again sooner)
    _fake, gw, other, secret = await seeded_pair(
        aiohttp_server, aiohttp_client, make_settings, redis_server, budget=budget, send=post_small
    )
    gate = shared(gw)
    unwritten = watch_unwritten(monkeypatch, gate)
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        assert (await post_small(gw, secret))[0] == 200  # finds Redis away: 10, locally
        assert not gate.up
        assert gate._reload is not None
        await gate._reload
        assert await table_tokens(gw) == 20
        may_write = block_writes(monkeypatch, gw)  # the database is slow from here
        assert (await post_small(gw, secret))[0] == 200  # 10 more, locally: its row is queued
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    try:
        async with asyncio.timeout(NEVER_HANG):
            await unwritten.wait()  # Redis answers; A's rows are not written
    except BaseException:
        may_write.set()
        raise
    return gw, other, secret, may_write


async def test_rows_not_written_in_time_keep_the_fallback_until_they_are(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows not written within RECONCILE_FLUSH_SECONDS (a slow or locked database): the
    counter was dropped at once, and B seeded from a table without A's fallback row, which
    was written a moment later and never counted (20, not 30). The circuit stays open (the
    fallback counts them) until they are written, then the counter is dropped."""
    with capture_logs() as logs:
        gw, other, secret, may_write = await outage_with_rows_unwritten(
            aiohttp_server, aiohttp_client, make_settings, redis_server, monkeypatch
        )
    said = [x for x in logs if x["event"] == "redis_reachable_rows_unwritten"]
    assert len(said) == 1 and said[0]["fallback"] == "local"
    gate = shared(gw)
    try:
        assert not gate.up and gate._stale
        key = app_of(gw)[KEYS_KEY].lookup(secret)
        assert key is not None
        spend = await shared(other).spending(key)  # B: the counter as it was, kept
        assert spend is not None and spend.tokens == 10
    finally:
        may_write.set()
    await frozen_then_back(gate)
    assert gate.up and not gate._stale
    assert await table_tokens(gw) == 30
    spend = await shared(other).spending(key)  # seeded again, from every row
    assert spend is not None and spend.tokens == 30, spend


async def test_what_the_fallback_spent_is_enforced_while_its_rows_are_unwritten(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The circuit closed with the rows unwritten: the counter (10 of a 30 budget) missed
    the fallback's 20, and the key was admitted again, past its budget, for as long as the
    database was slow (helper-73). A's fallback goes on, and refuses it; once the rows are
    written, every replica reads 30 of 30."""
    gw, other, secret, may_write = await outage_with_rows_unwritten(
        aiohttp_server, aiohttp_client, make_settings, redis_server, monkeypatch, budget=30
    )
    gate = shared(gw)
    try:
        assert (await post_small(gw, secret))[0] == 429  # A's fallback: 30 of 30
        assert not gate.up
    finally:
        may_write.set()
    await frozen_then_back(gate)
    assert [(await post_small(replica, secret))[0] for replica in (gw, other)] == [429, 429]


def pending_flushes() -> list[asyncio.Task[Any]]:
    return [
        t
        for t in asyncio.all_tasks()
        if not t.done() and getattr(t.get_coro(), "__qualname__", "") == "UsageRecorder.flush"
    ]


async def test_a_hanging_database_gets_one_flush_at_a_time_and_a_stop_waits_for_none(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each try to write the rows was a new flush, shielded from its timeout, queued on the
    usage writer's lock behind the one stuck in the database: a new task every few seconds
    for as long as it hung, each to wait the database's timeout in turn, and a stop behind
    them all (helper-73). A try waits for the flush of the one before."""
    gw, _, _, may_write = await outage_with_rows_unwritten(
        aiohttp_server, aiohttp_client, make_settings, redis_server, monkeypatch
    )
    gate = shared(gw)
    try:
        tries, third = [0], asyncio.Event()
        real = gate._flushed

        async def counted() -> None:
            tries[0] += 1
            if tries[0] == 3:
                third.set()
            await real()

        monkeypatch.setattr(gate, "_flushed", counted)
        async with asyncio.timeout(NEVER_HANG):
            await third.wait()  # the probe tried again twice
        assert len(pending_flushes()) == 1
        async with asyncio.timeout(NEVER_HANG):
            await gate.close()  # (the gateway's stop: the flush is cancelled, not waited for)
        assert pending_flushes() == []
    finally:
        may_write.set()


async def test_ends_kept_through_the_outage_reach_redis_before_the_counter_is_dropped(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Request H, charged in Redis before the outage, ends during it: its end is kept and
    its row written. Its end is sent again before the counter is dropped (by `reconcile`).
    It was sent after (by `came_back`): it still found H's hold in Redis (Redis kept its
    data) and added H's 10 on top of any seed in between, which had H's row (40, not 30)."""
    fake, gw, other, secret = await seeded_pair(
        aiohttp_server, aiohttp_client, make_settings, redis_server
    )
    gate = shared(gw)
    release = asyncio.Event()
    fake.always(content="two words", hold=release)
    held = asyncio.create_task(post(gw, secret))  # H: holds its charge in Redis
    await all_seen(fake, 2)
    fake.always(content="two words")
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        assert (await post(gw, secret))[0] == 200  # finds Redis away: 10, locally
        assert not gate.up and gate._stale
        release.set()
        assert (await held)[0] == 200  # H ends during the outage: its end is kept
        await ended(gate)
        assert gate._unsent
        sending, may_send = asyncio.Event(), asyncio.Event()
        real_scripts = gate.link.scripts

        async def slow_scripts(*args: Any, **kwargs: Any) -> Any:
            sending.set()
            await may_send.wait()
            return await real_scripts(*args, **kwargs)

        monkeypatch.setattr(gate.link, "scripts", slow_scripts)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    async with asyncio.timeout(NEVER_HANG):
        await sending.wait()  # H's end, sent again by reconcile, on its way
    key = app_of(gw)[KEYS_KEY].lookup(secret)
    assert key is not None
    assert await shared(other).spending(key) is not None  # B reads meanwhile: not dropped yet
    may_send.set()
    await frozen_then_back(gate)
    assert not gate._unsent
    assert await table_tokens(gw) == 30
    spend = await shared(other).spending(key)
    assert spend is not None and spend.tokens == 30, spend


def fail_writes(monkeypatch: pytest.MonkeyPatch, gw: Any) -> asyncio.Event:
    """The replica's usage writes raise (a database down or locked) until the event is set."""
    recorder = app_of(gw)[USAGE_KEY]
    store = recorder._store
    real = store.insert_usage
    may_write = asyncio.Event()

    async def failing(*args: Any, **kwargs: Any) -> Any:
        if not may_write.is_set():
            raise sqlite3.OperationalError("database is locked")
        return await real(*args, **kwargs)

    monkeypatch.setattr(store, "insert_usage", failing)
    return may_write


async def test_a_stop_after_a_failed_reconcile_flush_closes_the_gate(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A database that fails the write (rather than hanging) left the probe's flush task
    done with that error, and `close()` raised it: the probe was never stopped, the link and
    Redis pool never closed (helper-74). A stop ends the gate whatever the flush did."""
    monkeypatch.setattr(limits_redis, "RECONCILE_FLUSH_SECONDS", 0.2)
    _fake, gw, _other, secret = await seeded_pair(
        aiohttp_server, aiohttp_client, make_settings, redis_server, send=post_small
    )
    gate = shared(gw)
    unwritten = watch_unwritten(monkeypatch, gate)
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        assert (await post_small(gw, secret))[0] == 200  # fallback
        assert not gate.up
        assert gate._reload is not None
        await gate._reload
        may_write = fail_writes(monkeypatch, gw)
        assert (await post_small(gw, secret))[0] == 200  # its row cannot be written
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    try:
        async with asyncio.timeout(NEVER_HANG):
            await unwritten.wait()
        assert gate._flushing is not None and gate._flushing.done()
        probe = gate._probe
        assert probe is not None
        error: BaseException | None = None
        try:
            async with asyncio.timeout(NEVER_HANG):
                await gate.close()  # what the app's cleanup calls
        except BaseException as exc:
            error = exc
        assert error is None, f"close() raised {error!r}"
        assert probe.done(), "the probe outlived the stop"
    finally:
        may_write.set()
        gate._flushing = None  # (so the app's own stop can close the gate)
        if gate._probe is not None:
            gate._probe.cancel()


async def test_a_replica_stopped_during_an_outage_says_what_it_leaves_stale(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_server: RedisServer,
) -> None:
    """A replica stopped while Redis is away takes its list of spendings to drop with it
    (documented): the other replicas count its fallback's spending only at the next seed.
    It says so as it stops, so that an operator can make that seed happen."""
    _, gw, _, secret = await seeded_pair(
        aiohttp_server, aiohttp_client, make_settings, redis_server
    )
    gate = shared(gw)
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)
    try:
        assert (await post(gw, secret))[0] == 200  # the fallback's: its key marked
        assert not gate.up and gate._stale
        with capture_logs() as logs:
            async with asyncio.timeout(NEVER_HANG):
                await gate.close()
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
    said = [x for x in logs if x["event"] == "redis_spending_left_stale"]
    assert said == [{"event": "redis_spending_left_stale", "keys": 1, "log_level": "warning"}]
