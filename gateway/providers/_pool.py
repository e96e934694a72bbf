"""Connections to one upstream: no silent queue.

aiohttp's connector queues a request that finds its pool full, without a bound, a log line or
a count: with real generations of a minute, the 101st stream to a provider used to wait a
minute for nothing the operator could see. So the connector has no limit of its own; by
default nothing limits the connections to a provider (an upstream that cannot take more says
so with a 429 or 503, which routing handles). When an operator sets `max_connections`, this
gate holds a request that finds them all in use for at most `pool_timeout` seconds; the wait
is logged and counted in `UpstreamStats`, and past the bound the request fails with a 503
`upstream_pool_full` (another route may answer it). Once the server's shutdown grace period is
over (`shut()`), a request that waited for a slot, or comes later, is refused with a 503 instead
of opening an upstream request the shutdown would cut a moment later.
"""

from __future__ import annotations

import asyncio
import time
from types import TracebackType

import msgspec
import structlog

from gateway.errors import GatewayStopping, UpstreamPoolFull

__all__ = ["PoolGate", "UpstreamStats"]

log = structlog.get_logger("gateway.upstream")


class UpstreamStats(msgspec.Struct, kw_only=True):
    """What one provider's upstream client has been doing, for `GET /admin/stats` (and any
    other reader: the fields are plain counters since the provider was built)."""

    max_connections: int | None
    in_use: int = 0  # connections open or being opened (a stream's, until its body ends)
    waiting: int = 0  # requests waiting for one now
    waited: int = 0  # requests that had to wait
    wait_seconds: float = 0.0  # their waits, summed
    pool_timeouts: int = 0  # requests refused after pool_timeout
    stream_timeouts: int = 0  # streams the watchdog ended (first byte or read timeout)


class PoolGate:
    """`async with gate:` around each upstream request: a connection slot while it runs (or
    `enter()` and `leave()`, for a stream whose connection is still open after it ends)."""

    __slots__ = ("_free", "_name", "_shut", "_timeout", "stats")

    def __init__(self, name: str, limit: int | None, timeout: float) -> None:
        self._name = name
        self._timeout = timeout
        self._free = asyncio.Semaphore(limit) if limit is not None else None
        self.stats = UpstreamStats(max_connections=limit)
        self._shut = False

    async def enter(self) -> None:
        """Take a slot (waiting for one, on the record, when all are in use).

        Raises:
            UpstreamPoolFull: none was freed within `pool_timeout`.
            GatewayStopping: the server is stopping (`shut()`).
        """
        if self._shut:
            raise GatewayStopping()
        free = self._free
        if free is not None:
            if free.locked():
                await self._wait(free)
                if self._shut:  # freed by the shutdown ending the streams that held it
                    free.release()
                    raise GatewayStopping()
            else:
                await free.acquire()  # a slot is free: returns at once
        self.stats.in_use += 1

    def shut(self) -> None:
        """Refuse every request that waits for a slot, or asks for one, from now on: the
        server is stopping (its shutdown grace period is over)."""
        self._shut = True

    __aenter__ = enter

    def leave(self) -> None:
        """Give the slot back: for a stream whose connection outlives its request (its body
        still ending after `[DONE]`), when that connection goes back to the pool or closes."""
        self.stats.in_use -= 1
        if self._free is not None:
            self._free.release()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.leave()

    async def _wait(self, free: asyncio.Semaphore) -> None:
        """Wait for a slot, at most `pool_timeout`, on the record.

        Raises:
            UpstreamPoolFull: none was freed in time (a 503).
        """
        stats = self.stats
        stats.waiting += 1
        stats.waited += 1
        start = time.monotonic()
        try:
            async with asyncio.timeout(self._timeout):
                await free.acquire()
        except TimeoutError:
            stats.pool_timeouts += 1
            log.warning(
                "upstream_pool_full",
                provider=self._name,
                max_connections=stats.max_connections,
                waited_s=round(time.monotonic() - start, 3),
            )
            raise UpstreamPoolFull(
                f"All {stats.max_connections} connections to the upstream provider "
                f"'{self._name}' stayed in use for {self._timeout:g} s (its max_connections "
                "and pool_timeout); retry later."
            ) from None
        finally:
            stats.waiting -= 1
            stats.wait_seconds += time.monotonic() - start
        log.info(
            "upstream_pool_wait",
            provider=self._name,
            max_connections=stats.max_connections,
            waited_s=round(time.monotonic() - start, 3),
        )
