"""The request path's Redis connection (`gateway.redis_link`) against a real redis-server and
against servers that misbehave: a frozen Redis, one that is gone, one that is not Redis."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError, ResponseError

from gateway.redis_link import RedisLink
from tests.conftest import NEVER_HANG, free_port
from tests.redis_server import RedisServer

SCRIPT = "return {KEYS[1], ARGV[1]}"


def link_to(url: str, timeout: float = 5.0) -> RedisLink:
    return RedisLink(Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout))


async def test_many_calls_in_one_turn_share_a_connection_and_keep_their_order(
    redis_url: str,
) -> None:
    link = link_to(redis_url)
    admin = Redis.from_url(redis_url)
    try:
        sha = await admin.script_load(SCRIPT)
        replies = await asyncio.gather(
            *(link.script(sha, SCRIPT, [f"k{i}"], [i]) for i in range(200))
        )
        assert replies == [[f"k{i}".encode(), str(i).encode()] for i in range(200)]
    finally:
        link.close()
        await admin.aclose()


async def test_a_script_redis_forgot_is_loaded_again(redis_url: str) -> None:
    admin = Redis.from_url(redis_url)
    link = link_to(redis_url)
    try:
        source = "return 'fresh " + str(time.time()) + "'"
        sha = await admin.script_load(source)
        await admin.script_flush()
        assert await link.script(sha, source, [], []) == b"fresh " + source[14:-1].encode()
        with pytest.raises(ResponseError, match="boom"):
            await link.script(await admin.script_load("error('boom')"), "", [], [])
    finally:
        link.close()
        await admin.aclose()


async def test_its_scripts_are_loaded_before_its_first_command(redis_url: str) -> None:
    """A Redis that starts empty (or restarted) has them before any EVALSHA goes out, so no
    call meets NOSCRIPT and its reload (whose round trips let later commands overtake it)."""
    admin = Redis.from_url(redis_url)
    source = "return 'preloaded " + str(time.time()) + "'"
    sha = hashlib.sha1(source.encode()).hexdigest()  # noqa: S324 (Redis names scripts so)
    link = RedisLink(Redis.from_url(redis_url, socket_timeout=5.0), [source])
    try:
        await admin.script_flush()
        assert await admin.script_exists(sha) == [False]
        assert await link.wait([link.send("SCRIPT", "EXISTS", sha)]) == [[1]]  # its first
    finally:
        link.close()
        await admin.aclose()


async def test_password_and_database_from_the_url(redis_server: RedisServer) -> None:
    admin = Redis.from_url(redis_server.url)
    await admin.config_set("requirepass", "s3cret")
    link = link_to(f"redis://:s3cret@127.0.0.1:{redis_server.port}/3")
    wrong = link_to(f"redis://:wrong@127.0.0.1:{redis_server.port}/3")
    try:
        await link.wait([link.send("SET", "where", "here")])
        checker = Redis.from_url(f"redis://:s3cret@127.0.0.1:{redis_server.port}/3")
        assert await checker.get("where") == b"here"
        await checker.aclose()
        with pytest.raises(ResponseError):
            await wrong.wait([wrong.send("PING")])
    finally:
        link.close()
        wrong.close()
        await admin.aclose()


async def test_a_frozen_redis_times_out_and_the_next_call_connects_again(
    redis_server: RedisServer,
) -> None:
    link = link_to(redis_server.url, timeout=0.3)
    assert redis_server.process is not None
    pid = redis_server.process.pid
    try:
        assert await link.wait([link.send("PING")]) == [b"PONG"]
        os.kill(pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await link.wait([link.send("PING"), link.send("PING")])
        assert time.monotonic() - started < 2
        os.kill(pid, signal.SIGCONT)
        async with asyncio.timeout(NEVER_HANG):
            assert await link.wait([link.send("PING")]) == [b"PONG"]
    finally:
        os.kill(pid, signal.SIGCONT)
        link.close()


async def test_redis_gone_fails_at_once_and_a_closed_link_refuses(
    redis_server: RedisServer,
) -> None:
    link = link_to(redis_server.url)
    assert await link.wait([link.send("PING")]) == [b"PONG"]
    redis_server.stop()
    with pytest.raises(RedisConnectionError):
        await link.wait([link.send("PING")])  # the connection it had is closed
    with pytest.raises(RedisConnectionError):
        await link.wait([link.send("PING")])  # and no new one opens
    link.close()
    with pytest.raises(RedisConnectionError):
        await link.wait([link.send("PING")])


@pytest.fixture
async def not_redis() -> AsyncIterator[int]:
    """A server that answers every connection with an HTTP response."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100)
        writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        await writer.drain()
        writer.close()

    port = free_port()
    server = await asyncio.start_server(answer, "127.0.0.1", port)
    async with server:
        yield port


async def test_a_server_that_is_not_redis_fails_the_calls(not_redis: int) -> None:
    link = link_to(f"redis://127.0.0.1:{not_redis}/0")
    try:
        with pytest.raises(RedisConnectionError):
            await link.wait([link.send("PING"), link.send("PING")])
    finally:
        link.close()


async def test_a_caller_that_gives_up_does_not_shift_the_replies_of_others(
    redis_url: str,
) -> None:
    """A request cancelled while its command is on the wire (its client hung up): the reply
    that comes for it is dropped, and the next caller gets its own."""
    link = link_to(redis_url)
    try:
        gone = asyncio.create_task(link.wait([link.send("ECHO", "for the cancelled one")]))
        await asyncio.sleep(0)  # it is waiting
        gone.cancel()
        assert await link.wait([link.send("ECHO", "mine")]) == [b"mine"]
        assert gone.cancelled()
    finally:
        link.close()
