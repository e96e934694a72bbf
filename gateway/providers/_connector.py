"""The connection pool of an upstream: a connection that spoke while idle is never reused.

Once an answer is read whole, its keep-alive connection waits in aiohttp's pool for the next
request. Anything the upstream writes on it meanwhile was asked for by nobody: a second
answer, the excess of a body longer than its Content-Length, a `408` before it hangs up.
aiohttp parses such bytes into the connection's queue of answers as they come, and the next
request to reuse the connection took the first one queued as its answer, whoever's request
that was: one client's answer could reach another. aiohttp checks a connection when it goes
back to the pool (nothing queued, no body unfinished), and on reuse only that it is still
open (`ResponseHandler.is_connected()`). The gateway's connections (`_Connection`) count as
open only while their queue is empty too, so the pool closes one that queued an answer while
idle, and the request gets a new connection instead (as it does for one the upstream closed).

Bytes that are no HTTP make aiohttp's parser close the connection itself. Half a head (too
few bytes to parse) queues nothing, and needs not: aiohttp reads the next answer with a new
parser, so they are dropped unread. Bytes that come after a request is sent are its
upstream's answer to it, as on any connection.

The check is one more test of a deque where aiohttp already tests the connection on reuse:
no call, no syscall, no timer. aiohttp has no public way to choose the connection class, so
`FreshConnector` replaces the factory its `__init__` sets (`_factory`, unchanged since aiohttp
3.0) only when that is the `functools.partial(ResponseHandler, loop=...)` it was written
against, making connections whose queue is the `_buffer` deque `_Connection` tests; otherwise
its connections are aiohttp's own (`fresh` is False, and tests/test_idle_bytes.py fails on
such an aiohttp rather than the gap reopening unseen).
"""

from __future__ import annotations

import collections
import functools
from typing import Any, cast

import aiohttp
import structlog
from aiohttp.client_proto import ResponseHandler

__all__ = ["FreshConnector", "upstream_connector"]

log = structlog.get_logger("gateway.upstream")


class _Connection(ResponseHandler):
    """aiohttp's client connection, open only while no answer waits in its queue unasked."""

    def is_connected(self) -> bool:
        # aiohttp's test, and the queue's: a request that reuses a connection has not been
        # sent yet, so nothing queued can be its answer. (aiohttp asks this of a connection
        # only while it is idle, and closes one that is not: logged once.)
        transport = self.transport
        if transport is None or transport.is_closing():
            return False
        if self._buffer:
            peer = transport.get_extra_info("peername")
            log.warning("upstream_idle_bytes", peer=str(peer[:2]) if peer else None)
            return False
        return True


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


def upstream_connector() -> FreshConnector:
    """The connector of one upstream's session. No limit: aiohttp would queue silently; the
    upstream client's `PoolGate` bounds."""
    return FreshConnector(limit=0, ttl_dns_cache=300)
