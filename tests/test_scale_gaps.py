"""Scale-out edges closed: a budget seed that meets a frozen PostgreSQL answers 503 within a
bound; request ends held through a Redis outage longer than their lease still count; requests
the local fallback admitted count in a concurrency limit once Redis answers again. Each test
starts the real PostgreSQL or Redis it needs."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.limits_redis import SEED_WAIT_SECONDS, SharedGate
from gateway.limits_state import key_name
from gateway.settings import ModelConfig, OpenAIConfig, Target
from gateway.state import GATE_KEY, KEYS_KEY
from tests.conftest import NEVER_HANG, MakeSettings, app_of, create_key, free_port, start_gateway
from tests.fakes import FakeOpenAI
from tests.test_accounting import ADMIN, new_key, patch
from tests.test_attack_scale import all_seen, hold_four, post
from tests.test_limits_redis import known, two_gateways


@pytest.fixture
def own_pg() -> Iterator[Any]:
    """A PostgreSQL server of this test's own (it gets frozen)."""
    from tests.pg import own_server

    with own_server() as server:
        yield server


async def test_a_budget_seed_that_meets_a_frozen_postgresql_answers_503_within_a_bound(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_url: str,
    own_pg: Any,
) -> None:
    """PostgreSQL is frozen (SIGSTOP: connections open, no answer) when a budget's spending
    must be seeded into Redis. The request must get 503 `database_busy` within a few seconds,
    not wait out the 30 s query timeout; a key limited to one request at a time keeps serving
    meanwhile (its ends reach Redis: a seed under way must not hold them back); and once
    PostgreSQL answers, the budgeted key works again."""
    _, gw, _ = await two_gateways(
        aiohttp_server,
        aiohttp_client,
        make_settings,
        redis_url=redis_url,
        database=own_pg.admin_url,
        usage_flush_seconds=0.02,
    )
    budgeted = await create_key(gw, budget_tokens=10_000, budget_period="day")
    single = await create_key(gw, max_concurrency=1)
    loop = asyncio.get_running_loop()
    own_pg.pause()
    try:
        for _ in range(2):  # the second waits for the seed under way: bounded too
            started = loop.time()
            async with gw.post(
                "/v1/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                headers={"Authorization": f"Bearer {budgeted}"},
            ) as resp:
                body = await resp.json()
                assert resp.status == 503, body
                assert body["error"]["code"] == "database_busy"
                assert body["error"]["type"] and set(body["error"]) >= {"message", "param"}
                assert resp.headers["Retry-After"] == "1"
            assert loop.time() - started < SEED_WAIT_SECONDS + 1.5
        for _ in range(3):  # each ends, freeing the one slot for the next
            assert (await post(gw, single))[0] == 200
        gate = app_of(gw)[GATE_KEY]
        assert isinstance(gate, SharedGate) and gate.up  # PostgreSQL is not Redis
    finally:
        own_pg.resume()
    code, body = await post(gw, budgeted)
    assert code == 200, body


class CutProxy:
    """A TCP proxy in front of Redis whose link can be cut (a network partition): while cut,
    what a client sends is swallowed and nothing is answered, and the connections open then
    are dropped when it heals. Unlike a frozen Redis, nothing sent meanwhile ever runs. While
    muted, what is sent runs in Redis and its answers are lost."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.cut = False
        self.mute = False
        self._cut_writers: list[asyncio.StreamWriter] = []

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, up: bool
    ) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                if not (self.cut if up else self.mute):
                    writer.write(data)
                    await writer.drain()
        writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut:  # accepted, never answered
            self._cut_writers.append(writer)
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(
            self._pipe(reader, up_writer, up=True), self._pipe(up_reader, writer, up=False)
        )

    def heal(self) -> None:
        self.cut = self.mute = False
        for writer in self._cut_writers:
            writer.close()
        self._cut_writers.clear()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[CutProxy]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        async with server:
            yield self


async def partitioned_pair(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_url: str,
    proxy: CutProxy,
    **server: Any,
) -> tuple[FakeOpenAI, TestClient[Any, Any], TestClient[Any, Any]]:
    """Two replicas on one database and one Redis: A reaches Redis through `proxy` (which
    can cut it off), B directly."""
    fake = FakeOpenAI()
    await fake.start(aiohttp_server)
    fake.always(content="two words")  # 8 prompt tokens + 2: every request uses 10
    build = functools.partial(
        make_settings,
        providers=(OpenAIConfig(name="up", base_url=fake.base_url),),
        models=(ModelConfig(name="m", targets=(Target(provider="up", model="g"),)),),
        **server,
    )
    a = await start_gateway(aiohttp_client, build(redis_url=proxy.url))
    b = await start_gateway(aiohttp_client, build(redis_url=redis_url))
    return fake, a, b


async def redis_time(gate: SharedGate) -> float:
    seconds, micros = await gate.redis.time()
    return seconds + micros / 1e6


@pytest.mark.parametrize("meanwhile", ["purged", "idle", "answered"])
async def test_ends_held_through_an_outage_longer_than_their_lease_still_count(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_url: str,
    meanwhile: str,
) -> None:
    """Replica A loses Redis (a partition: its ends never reach it) while four requests of a
    budgeted key end; the outage outlasts their holds' lease. Meanwhile another replica's
    request purges the lapsed holds ("purged"), or nothing touches the key for longer than
    the holds' hash lived ("idle"). When A reaches Redis again, what the four used must
    count in the key's spending, once (it was dropped: their holds were gone). And ends
    that Redis ran, their answers lost ("answered"), must not count again when they are
    sent again after the lease (their holds went with their first run, not with a lease)."""
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    async with CutProxy(redis_port).running() as proxy:
        fake, a, b = await partitioned_pair(
            aiohttp_server, aiohttp_client, make_settings, redis_url, proxy
        )
        gate_a, gate_b = app_of(a)[GATE_KEY], app_of(b)[GATE_KEY]
        assert isinstance(gate_a, SharedGate) and isinstance(gate_b, SharedGate)
        gate_a.lease = 0.5  # (30 s in production)
        secret = await create_key(a, budget_tokens=10_000, budget_period="total")
        await known(b, secret)
        assert (await post(a, secret))[0] == 200  # seeds the spending, and counts 10
        release, tasks = hold_four(a, secret, fake)
        await all_seen(fake, 5)  # each holds its budget, in Redis
        key = app_of(a)[KEYS_KEY].lookup(secret)
        assert key is not None
        leases = await gate_b.redis.zrange(key_name(key, "lease"), 0, -1, withscores=True)
        lapsed = max(score for _, score in leases)
        if meanwhile == "answered":
            proxy.mute = True
        else:
            proxy.cut = True
        release.set()
        fake.always(content="two words")
        assert [code for code, _ in await asyncio.gather(*tasks)] == [200] * 4
        async with asyncio.timeout(NEVER_HANG):
            while gate_a._ender is not None and not gate_a._ender.done():  # they time out
                await asyncio.wait([gate_a._ender])
        assert not gate_a.up and len(gate_a._unsent) == 4
        extra = 0
        # The leases end on Redis's clock: nothing here can signal it. "idle" waits out
        # the holds' hash too, which lived two leases (ceil'd to whole seconds) past its
        # last touch.
        until = lapsed + 2 * 1 + 0.2 if meanwhile == "idle" else lapsed
        async with asyncio.timeout(NEVER_HANG):
            while await redis_time(gate_b) <= until:  # noqa: ASYNC110 (Redis's clock)
                await asyncio.sleep(0.05)
        if meanwhile != "idle":
            assert (await post(b, secret))[0] == 200  # its charge purges the lapsed holds
            extra = 10
        if meanwhile == "answered":  # they ran: counted once already
            ran = await gate_b.spending(key)
            assert ran is not None and ran.tokens == 60
        proxy.heal()
        async with asyncio.timeout(NEVER_HANG):
            assert gate_a._probe is not None
            await gate_a._probe  # A reaches Redis again, and sends the ends again
            while gate_a._ender is not None and not gate_a._ender.done():
                await asyncio.wait([gate_a._ender])
        spend = await gate_b.spending(key)
        assert spend is not None
        assert (spend.tokens, spend.held_tokens) == (50 + extra, 0)


@pytest.mark.parametrize("given", ["before", "during"])
async def test_requests_the_local_fallback_admitted_count_in_a_concurrency_limit_after(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    redis_url: str,
    given: str,
) -> None:
    """Replica A loses Redis (`redis_failure = "local"`) and admits two requests of a key on
    its own. The key has a concurrency limit of 2 from the start ("before"), or is given it
    on A while they run ("during"). Once A reaches Redis again, the two must count in the
    key's requests in flight, on every replica: B refuses a third (it admitted it), and
    admits again once they end."""
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    async with CutProxy(redis_port).running() as proxy:
        fake, a, b = await partitioned_pair(
            aiohttp_server,
            aiohttp_client,
            make_settings,
            redis_url,
            proxy,
            redis_failure="local",
            admin_key=ADMIN,
        )
        gate_a = app_of(a)[GATE_KEY]
        assert isinstance(gate_a, SharedGate)
        limit = {"max_concurrency": 2} if given == "before" else {"rpm": 1000}
        secret, key_id = await new_key(a, **limit)
        await known(b, secret)
        proxy.cut = True
        release = asyncio.Event()
        fake.script(hold=release, times=2)
        running = []
        for _ in range(2):  # admitted by A's fallback (the first after its call timed out)
            fake.request_seen.clear()
            running.append(asyncio.create_task(post(a, secret)))
            await fake.request_seen.wait()
        assert not gate_a.up and gate_a.fallbacks == 2
        if given == "during":
            await patch(a, key_id, max_concurrency=2)
            await known(b, secret)
        proxy.heal()
        async with asyncio.timeout(NEVER_HANG):
            assert gate_a._probe is not None
            await gate_a._probe  # A reaches Redis again
            await gate_a.link.wait([gate_a.link.send("PING")])  # what it sent is answered
        code, body = await post(b, secret)
        assert code == 429, body
        release.set()
        assert [code for code, _ in await asyncio.gather(*running)] == [200, 200]
        async with asyncio.timeout(NEVER_HANG):
            while gate_a._ender is not None and not gate_a._ender.done():
                await asyncio.wait([gate_a._ender])
        assert [(await post(b, secret))[0] for _ in range(2)] == [200, 200]
