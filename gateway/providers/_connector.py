"""The connection pool of an upstream: a connection that spoke while idle is never reused.

Once an answer is read whole, its keep-alive connection waits in aiohttp's pool for the next
request. Anything the upstream writes on it meanwhile was asked for by nobody: a second
answer, the excess of a body longer than its Content-Length, a `408` before it hangs up.
aiohttp parsed such bytes into the connection's queue of answers as they came, and the next
request to reuse the connection took the first one queued as its answer, whoever's request
that was: one client's answer could reach another. Nor did anything bound that queue: an
answer without a body (a `204`: 27 bytes) is a parsed message of some 400, so an upstream
writing them on an idle connection grew the gateway's memory at wire speed until the
connection was reused or aiohttp's keep-alive (15 s) ended it.

So a connection the gateway puts back in the pool (`_Connection.should_close`, which aiohttp
asks exactly then) gets a parser of its own while it idles (`_Idle`): the first byte that is
not a line end (a stray CRLF after an answer is harmless) closes it, logged as
`upstream_idle_bytes`, and nothing is parsed or kept. The request that reuses a connection
gives it a new parser first. What the upstream sent in the same segment as the end of its
answer is parsed with that answer, after the connection went back to the pool (aiohttp puts
it back from inside its parser, when the body ends): such an answer waits in the queue, and
the connection counts as open only while its queue is empty (`_Connection.is_connected`,
aiohttp's test on reuse), so the pool closes it and the request gets a new connection
instead (as it does for one the upstream closed). Bytes that come after a request is taken
from the pool are its upstream's answer to it, as on any connection.

Both checks are a test or a store where aiohttp already looks at the connection (and a call of
aiohttp's own `should_close`): no syscall, no timer. aiohttp has no public way to choose the
connection class, so `FreshConnector` replaces the factory its `__init__` sets (`_factory`,
unchanged since aiohttp 3.0) only when that is the `functools.partial(ResponseHandler,
loop=...)` it was written against, making connections whose queue is the `_buffer` deque
`_Connection` tests; otherwise its connections are aiohttp's own (`fresh` is False, and
tests/test_idle_bytes.py fails on such an aiohttp rather than the gap reopening unseen).
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import functools
from typing import Any, cast

import aiohttp
import structlog
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.connector import Connection
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.tracing import Trace

__all__ = ["HANDED", "FreshConnector", "upstream_connector"]

log = structlog.get_logger("gateway.upstream")


def _idle_bytes(transport: asyncio.BaseTransport) -> None:
    peer = transport.get_extra_info("peername")
    log.warning("upstream_idle_bytes", peer=str(peer[:2]) if peer else None)


class _Idle:
    """The parser of a connection idle in the pool: what the upstream writes on it is no answer
    to anything; any byte but a line end closes the connection (aiohttp's protocol closes it
    when its parser raises), and nothing is kept."""

    __slots__ = ("_transport",)

    def __init__(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport

    def feed_data(self, data: bytes) -> tuple[tuple[()], bool, bytes]:
        if data.strip(b"\r\n"):  # (`b""`: a resume of reading, no bytes)
            _idle_bytes(self._transport)
            raise HttpProcessingError(message="bytes on an idle connection")
        return (), False, b""

    def feed_eof(self) -> None:
        return None

    def pause_reading(self) -> None:
        return None


class _Connection(ResponseHandler):
    """aiohttp's client connection, closed by any byte the upstream writes while it idles in
    the pool, and open only while no answer waits in its queue unasked."""

    __slots__ = ("_idle",)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._idle = _Idle(transport)  # once a connection, not once a request

    @property
    def should_close(self) -> bool:
        # aiohttp's own test (called, not copied, so a release that adds a term keeps it),
        # asked only when the connection is released: False puts it in the pool, where it
        # reads with `_Idle`.
        if super().should_close:
            return True
        idle: Any = self._idle
        self._parser = idle
        return False

    def is_connected(self) -> bool:
        # aiohttp's own test (called, not copied), and the queue's: a request that reuses a
        # connection has not been sent yet, so nothing queued can be its answer. (aiohttp
        # asks this of a connection only while it is idle, and closes one that is not:
        # logged once.)
        transport = self.transport
        if transport is None or not super().is_connected():
            return False
        if self._buffer:
            _idle_bytes(transport)
            return False
        return True


# How many upstream connections the running task has been handed (a count in its context): an
# attempt that got one sent its request, and its upstream may bill it; one still waiting for a
# connection (connecting, or for a `max_connections` slot) when it timed out did not
# (`failover.attempt_each`).
HANDED: contextvars.ContextVar[int] = contextvars.ContextVar("upstream_handed", default=0)


class FreshConnector(aiohttp.TCPConnector):
    """aiohttp's connector, but an idle connection the upstream wrote an answer on is
    closed, not reused."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        factory = getattr(self, "_factory", None)
        self.fresh = (
            isinstance(factory, functools.partial)
            and factory.func is ResponseHandler
            and not factory.args
            and set(factory.keywords) == {"loop"}
            and isinstance(getattr(factory(), "_buffer", None), collections.deque)
        )
        if self.fresh:
            connection = functools.partial(_Connection, loop=self._loop)
            self._factory = cast("functools.partial[ResponseHandler]", connection)

    async def connect(
        self,
        req: ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 - aiohttp's own signature
    ) -> Connection:
        conn = await super().connect(req, traces, timeout)
        HANDED.set(HANDED.get() + 1)  # (awaited in the request's task: its context)
        return conn


def upstream_connector() -> FreshConnector:
    """The connector of one upstream's session. No limit: aiohttp would queue silently; the
    upstream client's `PoolGate` bounds."""
    return FreshConnector(limit=0, ttl_dns_cache=300)
