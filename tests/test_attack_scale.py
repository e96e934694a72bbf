"""The scale-out mode attacked from outside: a Redis that answers garbage, goes slow, restarts
or comes back; a PostgreSQL whose listening connection is killed; replicas sharing a key's
limits under load. Each test starts the real PostgreSQL or Redis it needs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import hiredis
import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient
from redis.asyncio import Redis

from gateway.admission import Ticket
from gateway.database import opened_database
from gateway.limits_redis import SharedGate
from tests.conftest import NEVER_HANG, MakeSettings, create_key, free_port
from tests.redis_server import RedisServer
from tests.test_limits_redis import BODY, CHAT, auth, two_gateways


class GarbageRedis:
    """A TCP server that parses each RESP command and answers it with `reply`: well-formed
    RESP of the wrong shape for what was asked (a proxy or another service on Redis's port)."""

    def __init__(self, reply: bytes) -> None:
        self.reply = reply
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.commands = 0
        self.connected = asyncio.Event()  # a connection came (the circuit's probe's)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connected.set()
        parser = hiredis.Reader()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                parser.feed(data)
                while parser.gets() is not False:
                    self.commands += 1
                    writer.write(self.reply)
                await writer.drain()
        writer.close()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[GarbageRedis]:
        server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        async with server:
            yield self


async def post(gw: TestClient[Any, Any], secret: str) -> tuple[int, dict[str, Any]]:
    async with gw.post(CHAT, json=BODY, headers=auth(secret)) as resp:
        return resp.status, await resp.json()


@pytest.mark.parametrize(
    "reply",
    [b"+OK\r\n", b":1\r\n", b"*0\r\n", b"*1\r\n$2\r\nok\r\n", b"*2\r\n$4\r\nrate\r\n$1\r\nx\r\n"],
    ids=["status", "integer", "empty-array", "short-ok", "bad-number"],
)
@pytest.mark.parametrize("fields", [{"rpm": 100}, {"tpm": 10_000}, {"budget_tokens": 10**6}])
async def test_a_redis_answering_garbage_is_an_outage_not_a_crash(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    reply: bytes,
    fields: dict[str, Any],
) -> None:
    async with GarbageRedis(reply).running() as garbage:
        _, gw, _ = await two_gateways(
            aiohttp_server, aiohttp_client, make_settings, redis_url=garbage.url
        )
        secret = await create_key(gw, **fields)
        for _ in range(3):
            code, body = await post(gw, secret)
            assert code == 503, body
            assert body["error"]["code"] == "limits_unavailable"
        async with gw.get("/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["limits"] == "redis down: refuse"


async def test_after_a_server_speaking_garbage_the_real_redis_is_found_again(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
    tmp_path: Path,
) -> None:
    """Redis's port answered by something else for a while (+OK to everything), then Redis
    again: the circuit's probe met replies it could not parse, and must go on probing; and
    while the impostor answers, a probe's +OK to PING is not Redis coming back."""
    garbage = GarbageRedis(b"+OK\r\n")
    async with garbage.running():
        _, gw, _ = await two_gateways(
            aiohttp_server, aiohttp_client, make_settings, redis_url=garbage.url
        )
        secret = await create_key(gw, rpm=100)
        assert (await post(gw, secret))[0] == 503
        garbage.connected.clear()
        async with asyncio.timeout(NEVER_HANG):
            await garbage.connected.wait()  # the probe
            garbage.connected.clear()
            await garbage.connected.wait()  # and the next one, a second later
        async with gw.get("/readyz") as resp:
            assert (await resp.json())["limits"] == "redis down: refuse"
    redis = RedisServer(tmp_path, garbage.port).start()
    try:
        async with asyncio.timeout(NEVER_HANG):
            while (await post(gw, secret))[0] != 200:  # noqa: ASYNC110 (the probe's clock)
                await asyncio.sleep(0.1)
        async with gw.get("/readyz") as resp:
            assert (await resp.json())["limits"] == "redis"
    finally:
        redis.stop()


async def test_a_lease_renewal_answered_with_garbage_opens_the_circuit(tmp_path: Path) -> None:
    """The renewal loop meets an impostor on Redis's port: that is an outage (the circuit
    opens), not an exception that ends the loop, after which every lease of this replica's
    requests would lapse while they run (their slots free for others) until a restart."""
    async with (
        GarbageRedis(b"+OK\r\n").running() as garbage,
        opened_database(str(tmp_path / "keys.db")) as store,
    ):
        key, _ = await store.create_key(name="k", max_concurrency=1)
        gate = SharedGate(store, Redis.from_url(garbage.url))
        try:
            ticket = Ticket(key=key, limited=True, budgeted=False, shared=True, lease="r:1")
            gate._leases["r:1"] = ticket
            await gate.renew()
            assert not gate.up
        finally:
            await gate.close()
