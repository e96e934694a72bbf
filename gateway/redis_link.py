"""One multiplexed connection to Redis for the scripts on the request path.

A call through redis-py costs this process about 150 µs of CPU (a pool checkout, a timeout
per read, command objects), against about 25 µs for the round trip itself; a limited request
makes three. `RedisLink` keeps one connection open, packs commands and parses replies with
hiredis (the C parser redis-py uses when it is installed), writes every command made in one
event-loop turn in one write (under load many requests share a round trip) and hands the
replies back in order. It raises redis-py's exceptions, so callers treat both alike: a failed
connection fails every command waiting on it, a command not answered within the timeout
closes the connection (its reply would come late, or never), and the next call connects
again. Other commands (reads for the admin API, the lease renewal, the probe) stay with
redis-py.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis.asyncio import Redis, SSLConnection, UnixDomainSocketConnection
from redis.exceptions import (
    ConnectionError as RedisConnectionError,
    NoScriptError,
    RedisError,
    ResponseError,
)

__all__ = ["Arg", "RedisLink"]

Arg = str | bytes | int | float


class RedisLink:
    """Commands over one connection, pipelined per loop turn; the replies in order."""

    def __init__(self, redis: Redis, scripts: Sequence[str] = ()) -> None:
        """Args:
        scripts: Lua sources loaded on every new connection before any command goes on it:
            a Redis that starts empty (or restarted) would otherwise answer their first
            EVALSHA with NOSCRIPT, and the reload's round trips let a later command overtake
            it (a request's end that gives tokens back, passed by the next request's hold).
        """
        pool = redis.connection_pool
        self._kwargs: dict[str, Any] = dict(pool.connection_kwargs)
        self._class = pool.connection_class
        self.timeout: float | None = self._kwargs.get("socket_timeout")
        self._connect_timeout = self._kwargs.get("socket_connect_timeout") or self.timeout
        self._scripts = tuple(scripts)
        self._connection: _Connection | None = None  # ready: AUTH and SELECT went first
        self._connecting: asyncio.Task[None] | None = None
        self._out: list[bytes] = []  # this turn's commands, not written yet
        self._pending: list[asyncio.Future[Any]] = []  # their replies
        self._scheduled = False
        self._closed = False

    # -- calls ---------------------------------------------------------------------------

    def send(self, *command: Arg) -> asyncio.Future[Any]:
        """Queue a command for this turn's write; its reply (an error reply as a value)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            future.set_exception(RedisConnectionError("The Redis link is closed."))
            return future
        self._out.append(_pack(command))
        self._pending.append(future)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return future

    async def script(self, sha: str, source: str, keys: list[str], args: list[Arg]) -> Any:
        """EVALSHA `sha`; a Redis that forgot the script (restarted, flushed) gets it again."""
        replies = await self.scripts(sha, source, [(keys, args)])
        return replies[0]

    async def scripts(
        self, sha: str, source: str, calls: list[tuple[list[str], list[Arg]]]
    ) -> list[Any]:
        """EVALSHA `sha` once per (keys, args), sent together; their replies in order."""
        futures = [self.send("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls]
        replies = await self.wait(futures)
        if any(isinstance(r, ResponseError) and _no_script(r) for r in replies):
            await self.wait([self.send("SCRIPT", "LOAD", source)])
            futures = [self.send("EVALSHA", sha, len(keys), *keys, *args) for keys, args in calls]
            replies = await self.wait(futures)
        for reply in replies:
            if isinstance(reply, ResponseError):
                raise NoScriptError(str(reply)) if _no_script(reply) else reply
        return replies

    async def wait(self, futures: list[asyncio.Future[Any]]) -> list[Any]:
        """The replies of `futures`; raises TimeoutError (and closes the connection) when one
        takes longer than the socket timeout."""
        try:
            async with asyncio.timeout(self.timeout):
                return [await future for future in futures]
        except TimeoutError:
            if all(f.done() and not f.cancelled() for f in futures):
                return [f.result() for f in futures]  # late by this loop's own lag only
            if self._connection is not None:  # its replies would come late, or never
                self._connection.fail(TimeoutError("Redis did not answer in time."))
            raise
        finally:
            for future in futures:  # the others failed alike: their errors are seen
                if future.done() and not future.cancelled():
                    future.exception()

    def drop(self) -> None:
        """End the connection (its replies are not Redis's, or out of step); the next call
        opens another."""
        if self._connection is not None:
            self._connection.fail(RedisConnectionError("Bad reply from Redis."))

    def close(self) -> None:
        self._closed = True
        if self._connection is not None:
            self._connection.fail(RedisConnectionError("The Redis link is closed."))
        self._fail_pending(RedisConnectionError("The Redis link is closed."))

    # -- the connection ------------------------------------------------------------------

    def _flush(self) -> None:
        self._scheduled = False
        if not self._out:
            return
        connection = self._connection
        if connection is not None and connection.transport is not None:
            connection.waiting.extend(self._pending)
            connection.transport.write(b"".join(self._out))
            self._out, self._pending = [], []
        elif self._connecting is None:
            self._connection = None
            self._connecting = asyncio.create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        kw = self._kwargs
        connection = _Connection(self)
        try:
            async with asyncio.timeout(self._connect_timeout):
                if issubclass(self._class, UnixDomainSocketConnection):
                    await loop.create_unix_connection(lambda: connection, kw["path"])
                else:
                    context: ssl.SSLContext | None = None
                    if issubclass(self._class, SSLConnection):
                        context = self._class(**kw).ssl_context.get()
                    host, port = kw.get("host", "localhost"), kw.get("port", 6379)
                    await loop.create_connection(lambda: connection, host, port, ssl=context)
                await connection.handshake(kw, self._scripts)
        except (RedisError, OSError, TimeoutError) as exc:
            error = exc if isinstance(exc, RedisError) else RedisConnectionError(str(exc))
            connection.fail(error)
            self._fail_pending(error)
        else:
            if not self._closed:
                self._connection = connection
        finally:
            self._connecting = None
        self._flush()

    def _fail_pending(self, error: BaseException) -> None:
        pending, self._out, self._pending = self._pending, [], []
        for future in pending:
            if not future.done():
                future.set_exception(error)

    def _lost(self, connection: _Connection) -> None:
        if self._connection is connection:
            self._connection = None


class _Connection(asyncio.Protocol):
    """One connection of a link: its replies go to the commands written on it, in order."""

    def __init__(self, link: RedisLink) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()

    async def handshake(self, kw: dict[str, Any], scripts: Sequence[str]) -> None:
        """AUTH and SELECT as the URL asks, and SCRIPT LOAD of `scripts`, before any command
        of the link's."""
        first: list[tuple[Arg, ...]] = []
        if kw.get("password"):
            user = kw.get("username")
            first.append(("AUTH", user, kw["password"]) if user else ("AUTH", kw["password"]))
        if kw.get("db"):
            first.append(("SELECT", kw["db"]))
        first.extend(("SCRIPT", "LOAD", source) for source in scripts)
        if not first or self.transport is None:
            return
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in first]
        self.waiting.extend(futures)
        self.transport.write(b"".join(_pack(c) for c in first))
        for reply in [await f for f in futures]:
            if isinstance(reply, ResponseError):
                raise reply

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                future = self.waiting.popleft()
                if not future.done():
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # not Redis, or out of step
            self.fail(RedisConnectionError(f"Bad reply from Redis: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(RedisConnectionError("Redis closed the connection."))

    def fail(self, error: BaseException) -> None:
        """End the connection; every command waiting on it fails with `error`."""
        self.link._lost(self)
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.abort()
        waiting, self.waiting = self.waiting, collections.deque()
        for future in waiting:
            if not future.done():
                future.set_exception(error)


def _no_script(reply: ResponseError) -> bool:
    return str(reply).startswith("NOSCRIPT")


def _pack(command: tuple[Arg, ...]) -> bytes:
    # hiredis's stub types its argument as a one-item tuple; it takes any number.
    packed: bytes = hiredis.pack_command(command)  # type: ignore[arg-type]
    return packed
