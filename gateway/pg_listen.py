"""Key changes pushed by PostgreSQL: one connection that LISTENs on the channel the `keys`
trigger NOTIFYs (`gateway.migrations`), re-opened by whoever calls `ensure()` after a loss."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import asyncpg
import structlog

__all__ = ["CHANNEL", "KeyListener"]

log = structlog.get_logger(__name__)

CHANNEL = "kiosk_keys"
# While the listening connection keeps failing, how often the log says so again.
FAILURE_LOG_SECONDS = 60.0


class KeyListener:
    """Calls every callback (on the loop) when any connection changes the keys."""

    def __init__(self, url: str, connect_timeout: float) -> None:
        self._url = url
        self._timeout = connect_timeout
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()  # one listening connection, even for racing polls
        self.callbacks: list[Callable[[], None]] = []
        self.failures = 0  # connections failed in a row
        self._failure_logged = 0.0

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
                # Once, then a line a minute: each poll (a second, in each worker) retries.
                self.failures += 1
                now = time.monotonic()
                if self.failures == 1 or now - self._failure_logged >= FAILURE_LOG_SECONDS:
                    log.warning(
                        "key_listener_unavailable",
                        error=type(exc).__name__,
                        failures=self.failures,
                    )
                    self._failure_logged = now
                return
            if self.failures:
                log.info("key_listener_recovered", failures=self.failures)
                self.failures = 0
            self._conn = conn
            self._notified()  # changes may have landed while nobody listened

    async def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close(timeout=self._timeout)
            self._conn = None
