"""The connection pool of an upstream: a connection that spoke while idle is never reused.

Once an answer is read whole, its keep-alive connection waits in aiohttp's pool for the next
request. Anything the upstream writes on it meanwhile was asked for by nobody: a second
answer, the excess of a body longer than its Content-Length, a `408` before it hangs up.
aiohttp parses such bytes into the connection's queue as they come, and the next request to
reuse the connection took them as its answer, whoever's request that was: one client's
answer could reach another. aiohttp checks a connection when it goes back to the pool
(`ResponseHandler.should_close`: nothing queued, no body unfinished, no parse error), and on
reuse only that it is still open. `FreshConnector` asks `should_close` again on reuse and
closes a connection that now says yes, so the request gets a new connection instead.

Half a head (bytes too few to parse) is not seen by that check, and needs not be: aiohttp
starts the next request with a new parser, so they are dropped unread. Bytes that come after
the request is sent are its upstream's answer to it, as on any connection.

The check costs one property read per reused connection: no syscall, no timer. It overrides
a private method (`TCPConnector._get`, as of aiohttp 3.10); `KNOWN` says whether the
installed aiohttp has it as this was written against, and otherwise upstreams get aiohttp's
plain connector (tests/test_idle_bytes.py fails on such an aiohttp, not silently).
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

import aiohttp
import structlog
from aiohttp.client_proto import ResponseHandler

if TYPE_CHECKING:
    from aiohttp.client_reqrep import ConnectionKey
    from aiohttp.connector import Connection
    from aiohttp.tracing import Trace

__all__ = ["KNOWN", "FreshConnector", "upstream_connector"]

log = structlog.get_logger("gateway.upstream")


def _known() -> bool:
    get = getattr(aiohttp.TCPConnector, "_get", None)
    return (
        get is not None
        and inspect.iscoroutinefunction(get)
        and list(inspect.signature(get).parameters) == ["self", "key", "traces"]
        and isinstance(inspect.getattr_static(ResponseHandler, "should_close", None), property)
    )


KNOWN = _known()


class FreshConnector(aiohttp.TCPConnector):
    """aiohttp's connector, but an idle connection the upstream wrote on is closed, not
    reused."""

    async def _get(self, key: ConnectionKey, traces: list[Trace]) -> Connection | None:
        while (conn := await super()._get(key, traces)) is not None:
            protocol = conn.protocol
            if protocol is None or not protocol.should_close:
                return conn
            conn.close()
            log.warning("upstream_idle_bytes", host=key.host, port=key.port)
        return None


def upstream_connector() -> aiohttp.TCPConnector:
    """The connector of one upstream's session. No limit: aiohttp would queue silently; the
    upstream client's `PoolGate` bounds."""
    if KNOWN:
        return FreshConnector(limit=0, ttl_dns_cache=300)
    return aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)  # pragma: no cover
