"""A brake on guessing the admin key: wrong keys are counted per client address.

After `LIMIT` wrong admin keys from one address within `WINDOW` seconds, every admin request
from that address is refused (429, `Retry-After`) for `LOCKOUT` seconds, right key or wrong:
a guesser learns nothing while it waits. Other addresses are never slowed, so an attacker
cannot lock the operator out from elsewhere. A request without an `Authorization` header
guessed nothing and is not counted (a scraper left without the key locks nobody out).

The table is bounded: at most `MAX_ADDRESSES` addresses are remembered, the one whose last
wrong key is oldest forgotten first, so a flood from many addresses costs a fixed amount of
memory (an attacker with that many addresses can guess that many times `LIMIT` keys a
window: the key's length, at least 16 characters, is what makes guessing hopeless). Only the
admin routes (the admin API and a non-public `/metrics`) consult it: a virtual key's request
never does. The address is the connection's peer: behind a reverse proxy, every client is the
proxy, and a guesser locks the proxy's address out of the admin API for `LOCKOUT` seconds.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

__all__ = ["AdminBrake"]

LIMIT = 10
WINDOW = 60.0
LOCKOUT = 300.0
MAX_ADDRESSES = 10_000


class _Count:
    __slots__ = ("failures", "locked_until", "since")

    def __init__(self, now: float) -> None:
        self.failures = 0
        self.since = now  # the start of the current window
        self.locked_until = 0.0


class AdminBrake:
    """Wrong admin keys per address, and the addresses locked out for sending too many."""

    def __init__(
        self,
        limit: int = LIMIT,
        window: float = WINDOW,
        lockout: float = LOCKOUT,
        max_addresses: int = MAX_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit, self.window, self.lockout = limit, window, lockout
        self.max_addresses = max_addresses
        self._clock = clock
        self._counts: OrderedDict[str, _Count] = OrderedDict()

    def __len__(self) -> int:
        return len(self._counts)

    def locked_for(self, address: str) -> float:
        """Seconds `address` is still locked out for (0: it is not)."""
        count = self._counts.get(address)
        if count is None:
            return 0.0
        return max(0.0, count.locked_until - self._clock())

    def failed(self, address: str) -> bool:
        """`address` sent a wrong admin key: counted; whether that locked it out."""
        now = self._clock()
        count = self._counts.get(address)
        if count is None:
            if len(self._counts) >= self.max_addresses:
                self._counts.popitem(last=False)
            count = self._counts[address] = _Count(now)
        else:
            self._counts.move_to_end(address)
            if now - count.since >= self.window:
                count.failures, count.since = 0, now
        count.failures += 1
        if count.failures < self.limit:
            return False
        count.locked_until = now + self.lockout
        count.failures, count.since = 0, now
        return True

    def passed(self, address: str) -> None:
        """`address` sent the right key: its wrong ones are forgotten."""
        if self._counts:
            self._counts.pop(address, None)
