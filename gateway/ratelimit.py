"""Per-key rate limits in memory: requests per minute, tokens per minute, requests in flight.

Each limit is a token bucket that refills continuously (capacity = the per-minute limit), the
model OpenAI's own `x-ratelimit-*` headers describe. A request takes one request token and its
estimated tokens (prompt estimate + output limit) at admission; when it ends, the difference
to what it really used is given back or taken. Every read-modify-write here is free of
`await`, so it is atomic on the event loop and a burst cannot slip past a limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import RateLimited
from gateway.records import KeyRecord

__all__ = ["Limiter", "TokenBucket", "duration"]

Clock = Callable[[], float]


class TokenBucket:
    """`capacity` tokens, refilled at `capacity` per `period` seconds; the level may go negative
    when a request used more than it reserved (that debt delays the next requests)."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, capacity: int, now: float, period: float = 60.0) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / period
        self.level = float(capacity)
        self.stamp = now

    def refill(self, now: float) -> None:
        if now > self.stamp:
            self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, amount: float) -> float:
        """Seconds until `amount` tokens are there (0 if they are)."""
        return 0.0 if self.level >= amount else (amount - self.level) / self.rate

    def resize(self, capacity: int, period: float = 60.0) -> None:
        self.capacity = float(capacity)
        self.rate = capacity / period
        self.level = min(self.level, self.capacity)

    @property
    def reset(self) -> float:
        """Seconds until the bucket is full again."""
        return max(0.0, (self.capacity - self.level) / self.rate)


@dataclass(slots=True)
class _KeyState:
    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    active: int = 0


def duration(seconds: float) -> str:
    """A reset time the way OpenAI writes it: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


class Limiter:
    """The rate-limit state of every key that has limits. Pure memory, no I/O."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._keys: dict[str, _KeyState] = {}

    def _state(self, key: KeyRecord, now: float) -> _KeyState:
        state = self._keys.get(key.id)
        if state is None:
            state = self._keys[key.id] = _KeyState()
        # Limits change at run time (CLI, admin API): follow them without losing the level.
        state.requests = _sized(state.requests, key.rpm, now)
        state.tokens = _sized(state.tokens, key.tpm, now)
        return state

    def admit(self, key: KeyRecord, tokens: int) -> None:
        """Charge one request and `tokens` to the key's limits, or refuse without charging.

        Raises:
            RateLimited: a limit has no room; `retry_after` says when it will.
        """
        now = self._clock()
        state = self._state(key, now)
        if key.max_concurrency is not None and state.active >= key.max_concurrency:
            raise RateLimited(
                f"Too many requests in flight for this API key (limit {key.max_concurrency}).",
                retry_after=1.0,
            )
        requests, budget = state.requests, state.tokens
        if budget is not None and tokens > budget.capacity:
            err = RateLimited(
                f"Request too large for this API key's limit of {key.tpm} tokens per minute: "
                f"it may use up to {tokens} tokens (prompt plus max_tokens). Lower max_tokens.",
            )
            err.should_retry = False
            raise err
        wait = 0.0
        for bucket, amount in ((requests, 1), (budget, tokens)):
            if bucket is not None:
                bucket.refill(now)
                wait = max(wait, bucket.wait(amount))
        if wait > 0:
            what = "requests" if requests is not None and requests.wait(1) > 0 else "tokens"
            limit = key.rpm if what == "requests" else key.tpm
            raise RateLimited(
                f"Rate limit reached for this API key on {what} per minute (limit {limit}). "
                f"Please try again in {duration(wait)}.",
                retry_after=wait,
            )
        if requests is not None:
            requests.level -= 1
        if budget is not None:
            budget.level -= tokens
        state.active += 1

    def release(self, key: KeyRecord, reserved: int, used: int) -> None:
        """A request admitted with `reserved` tokens ended having used `used`."""
        state = self._keys.get(key.id)
        if state is None:
            return
        state.active = max(0, state.active - 1)
        if state.tokens is not None:
            state.tokens.refill(self._clock())
            state.tokens.level = min(state.tokens.capacity, state.tokens.level + reserved - used)

    def headers(self, key: KeyRecord) -> dict[str, str]:
        """The `x-ratelimit-*` headers for the key's current state (empty without rpm/tpm)."""
        now = self._clock()
        state = self._state(key, now)
        headers: dict[str, str] = {}
        for name, bucket in (("requests", state.requests), ("tokens", state.tokens)):
            if bucket is not None:
                bucket.refill(now)
                headers[f"x-ratelimit-limit-{name}"] = str(int(bucket.capacity))
                headers[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(bucket.level)))
                headers[f"x-ratelimit-reset-{name}"] = duration(bucket.reset)
        return headers


def _sized(bucket: TokenBucket | None, limit: int | None, now: float) -> TokenBucket | None:
    if limit is None:
        return None
    if bucket is None:
        return TokenBucket(limit, now)
    if bucket.capacity != limit:
        bucket.refill(now)
        bucket.resize(limit)
    return bucket
