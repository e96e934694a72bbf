"""Key changes pushed by PostgreSQL: one connection that LISTENs on the channel the `keys`
trigger NOTIFYs (`gateway.migrations`), re-opened by whoever calls `ensure()` after a loss."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

import asyncpg
import structlog

from gateway.logs import FailureStreak

__all__ = ["CHANNEL", "KeyListener"]

log = structlog.get_logger(__name__)

CHANNEL = "kiosk_keys"


class KeyListener:
    """Calls every callback (on the loop) when any connection changes the keys."""

    def __init__(self, url: str, connect_timeout: float) -> None:
        self._url = url
        self._timeout = connect_timeout
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()  # one listening connection, even for racing polls
        self.callbacks: list[Callable[[], None]] = []
        self._failures = FailureStreak()  # connections failed in a row

    def _notified(self, *_: object) -> None:
        for callback in self.callbacks:
            callback()

    async def ensure(self) -> None:
        """Open the listening connection unless it is open (or nobody listens). A failure is
        logged and left to the next call: the caller's poll is the safety net meanwhile."""
        async with self._lock:
            if not self.callbacks or (self._conn is not None and not self._conn.is_closed()):
                return
            try:
                conn = await asyncpg.connect(self._url, timeout=self._timeout)
                await conn.add_listener(CHANNEL, self._notified)
            except Exception as exc:
                if self._failures.failed():  # (each poll retries: once, then a line a minute)
                    log.warning(
                        "key_listener_unavailable",
                        error=type(exc).__name__,
                        failures=self._failures.failures,
                    )
                return
            ended = self._failures.ended()
            if ended:
                log.info("key_listener_recovered", failures=ended)
            self._conn = conn
            self._notified()  # changes may have landed while nobody listened

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=self._timeout)
            self._conn = None
