"""Per-key rate limits in memory: requests per minute, tokens per minute, requests in flight.

Each limit is a token bucket that refills continuously (capacity = the per-minute limit), the
model OpenAI's own `x-ratelimit-*` headers describe. A request takes a concurrency slot and one
request token before its body is read (`enter`), then its tokens once the body shows what it
may use (`take`: prompt estimate + output limit); when it ends, the difference to what it
really used is given back or taken (`give_back`) and its slot freed (`leave`). Every
read-modify-write here is free of `await`, so it is atomic on the event loop and a burst
cannot slip past a limit.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from gateway.errors import RateLimited
from gateway.records import KeyRecord

__all__ = [
    "Limiter",
    "TokenBucket",
    "duration",
    "no_requests",
    "no_slot",
    "no_tokens",
    "too_large",
]

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
    # The buckets of limits the key no longer has, kept for when they come back (`_sized`).
    laid_by: tuple[TokenBucket | None, TokenBucket | None] | None = None


def duration(seconds: float) -> str:
    """A reset time the way OpenAI writes it: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def no_slot(key: KeyRecord) -> RateLimited:
    return RateLimited(
        f"Too many requests in flight for this API key (limit {key.max_concurrency}).",
        retry_after=1.0,
        reason="concurrency",
    )


def no_requests(key: KeyRecord, wait: float) -> RateLimited:
    return RateLimited(
        f"Rate limit reached for this API key on requests per minute (limit "
        f"{key.rpm}). Please try again in {duration(wait)}.",
        retry_after=wait,
        reason="requests_per_minute",
    )


def no_tokens(key: KeyRecord, wait: float) -> RateLimited:
    return RateLimited(
        f"Rate limit reached for this API key on tokens per minute (limit "
        f"{key.tpm}). Please try again in {duration(wait)}.",
        retry_after=wait,
        reason="tokens_per_minute",
    )


def too_large(key: KeyRecord, likely: int) -> RateLimited:
    """A request that could never fit the key's tokens per minute: retrying will not help."""
    err = RateLimited(
        f"Request too large for this API key's limit of {key.tpm} tokens per "
        f"minute: it may use up to {likely} tokens (prompt plus max_tokens). "
        "Lower max_tokens or send less.",
        reason="tokens_per_minute",
    )
    err.should_retry = False
    return err


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
        if not (_fits(state.requests, key.rpm) and _fits(state.tokens, key.tpm)):
            _follow(state, key, now)
        return state

    def enter(self, key: KeyRecord) -> None:
        """Charge one request to the key's request rate and take a slot of its concurrency,
        before its body is read, or refuse without charging.

        Raises:
            RateLimited: no slot, or no request left this minute; `retry_after` says when.
        """
        now = self._clock()
        state = self._state(key, now)
        if key.max_concurrency is not None and state.active >= key.max_concurrency:
            raise no_slot(key)
        requests = state.requests
        if requests is not None:
            requests.refill(now)
            wait = requests.wait(1)
            if wait > 0:
                raise no_requests(key, wait)
            requests.level -= 1
        state.active += 1

    def take(self, key: KeyRecord, likely: int, most: int) -> None:
        """Charge an entered request's tokens to the key's tokens per minute: it is refused
        unless its `likely` tokens are there, and holds its `most` until it ends.

        Raises:
            RateLimited: the tokens are not there; `retry_after` says when they will be.
        """
        state = self._keys.get(key.id)
        if state is None:
            return
        now = self._clock()
        # (`key` is as the admin API left it while the body arrived: `Gate.charge`.)
        if not _fits(state.tokens, key.tpm):
            _follow(state, key, now)
        budget = state.tokens
        if budget is None:
            return
        if likely > budget.capacity:
            raise too_large(key, likely)
        budget.refill(now)
        wait = budget.wait(likely)
        if wait > 0:
            raise no_tokens(key, wait)
        budget.level -= most

    def refund(self, key: KeyRecord) -> None:
        """Give back the request an entered request took: it was refused and never ran."""
        state = self._keys.get(key.id)
        if state is not None and state.requests is not None:
            state.requests.refill(self._clock())
            state.requests.level = min(state.requests.capacity, state.requests.level + 1)

    def give_back(self, key: KeyRecord, held: int, used: int) -> None:
        """A request that held `held` tokens ended having used `used`."""
        state = self._keys.get(key.id)
        if state is not None and state.tokens is not None:
            state.tokens.refill(self._clock())
            state.tokens.level = min(state.tokens.capacity, state.tokens.level + held - used)

    def seat(self, key: KeyRecord) -> None:
        """A request of the key already running takes a slot of its concurrency (it entered
        before the limit was given: `Gate.adopt`); `leave` frees it."""
        self._state(key, self._clock()).active += 1

    def in_flight(self, key: KeyRecord) -> int:
        """Requests of the key that entered and have not left."""
        state = self._keys.get(key.id)
        return state.active if state is not None else 0

    def leave(self, key: KeyRecord) -> None:
        """An entered request ended: its concurrency slot is free."""
        state = self._keys.get(key.id)
        if state is not None:
            state.active = max(0, state.active - 1)

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


def _fits(bucket: TokenBucket | None, limit: int | None) -> bool:
    """Whether the bucket is the one the limit needs as it is (None for no limit)."""
    return limit is None if bucket is None else bucket.capacity == limit


def _follow(state: _KeyState, key: KeyRecord, now: float) -> None:
    """Give the key's state the buckets of its limits as they are now. A limit removed lays
    its bucket by, and one given again takes it back, refilled for the time passed at the
    rate it had: removing a limit and giving it again is as if it had stayed (only the
    requests served meanwhile were not charged), so it cannot give a minute's spending back
    for free."""
    requests, tokens = state.laid_by or (None, None)
    state.requests, requests = _sized(state.requests, requests, key.rpm, now)
    state.tokens, tokens = _sized(state.tokens, tokens, key.tpm, now)
    state.laid_by = None if requests is None and tokens is None else (requests, tokens)


def _sized(
    bucket: TokenBucket | None, laid_by: TokenBucket | None, limit: int | None, now: float
) -> tuple[TokenBucket | None, TokenBucket | None]:
    """The bucket for `limit` and the one laid by, from those the key had."""
    if limit is None:
        return None, bucket or laid_by
    if bucket is None:
        if laid_by is None:
            return TokenBucket(limit, now), None
        bucket = laid_by
    if bucket.capacity != limit:
        bucket.refill(now)
        bucket.resize(limit)
    return bucket, None
