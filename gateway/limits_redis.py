"""Rate limits, concurrency and budgets shared by every replica through Redis.

`SharedGate` is a `Gate` whose request steps run as Lua scripts in Redis (`limits_lua.py`),
registered once and run with EVALSHA, so replicas share one count with the semantics and
headers of the in-memory gate. What it inherits is the per-replica fallback: while Redis is
unreachable, requests are refused with a 503 (`redis_failure = "refuse"`) or go through the
in-memory limits of this replica (`"local"`). A circuit keeps a dead Redis from costing every
request a timeout: after one failure, requests take the fallback at once, and a probe pings
Redis every second until it answers. Both transitions are logged once.

A request's slot and budget hold carry a lease that this replica renews while the request runs;
a crashed replica's requests give theirs back when their lease ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from gateway import limits_lua
from gateway.admission import Gate, Ticket
from gateway.budgets import Amount, BudgetBook, Spend, over_budget, period_start
from gateway.database import Database
from gateway.errors import LimitsUnavailable
from gateway.ratelimit import duration, no_requests, no_slot, no_tokens, too_large
from gateway.records import KeyRecord
from gateway.redis_link import Arg, RedisLink
from gateway.settings import ServerSettings

__all__ = ["SharedGate", "open_gate"]

log = structlog.get_logger(__name__)

# How long a request's slot and hold outlive a replica that stopped renewing them.
LEASE_SECONDS = 30.0
_PROBE_SECONDS = 1.0
POOL_SIZE = 16
_POOL_WAIT_SECONDS = 5.0
_PERIOD_SECONDS = {"day": 86400, "week": 7 * 86400, "month": 31 * 86400}
_FAILURES = (RedisError, OSError, TimeoutError)


@dataclass(slots=True)
class _Seen:
    """A key's bucket levels as the last script returned them (for its response headers)."""

    rpm: float | None = None
    tpm: float | None = None
    at: float = 0.0


class SharedGate(Gate):
    """The gate of a replica among several: Redis holds the counts, memory the fallback."""

    def __init__(
        self,
        store: Database,
        redis: Redis,
        *,
        failure: str = "refuse",
        lease: float = LEASE_SECONDS,
    ) -> None:
        super().__init__(store)
        self.redis = redis
        self.link = RedisLink(redis)  # the request path's scripts
        self.failure = failure
        self.lease = lease
        self.up = True
        self.fallbacks = 0  # requests that met a Redis outage (refused or limited locally)
        self._enter = redis.register_script(limits_lua.ENTER)
        self._charge = redis.register_script(limits_lua.CHARGE)
        self._finish = redis.register_script(limits_lua.FINISH)
        self._seed = redis.register_script(limits_lua.SEED)
        self._renew = redis.register_script(limits_lua.RENEW)
        self._ids = itertools.count()
        self._replica = secrets.token_hex(4)
        self._leases: dict[str, Ticket] = {}
        self._seen: dict[str, _Seen] = {}
        self._ending: list[Ticket] = []  # requests that ended, for `_end_all` to send
        self._ender: asyncio.Task[None] | None = None
        self._probe: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._reload: asyncio.Task[None] | None = None
        self._keys: dict[str, KeyRecord] = {}
        self._flush: Callable[[], Awaitable[None]] | None = None

    # -- the request path ----------------------------------------------------------------

    async def admit(self, key: KeyRecord) -> Ticket | None:
        if not (key.has_limits or key.has_budget):
            return None
        if key.has_budget:
            self._keys[key.id] = key  # a fallback must know its spending
        if not self.up:
            return self._fallback_enter(key)
        ticket = Ticket(key=key, limited=key.has_limits, budgeted=key.has_budget, shared=True)
        ticket.lease = f"{self._replica}:{next(self._ids)}"
        if key.rpm is not None or key.max_concurrency is not None:
            try:
                answer = await self.link.script(
                    self._enter.sha,
                    limits_lua.ENTER,
                    [_k(key, "rpm"), _k(key, "lease"), _k(key, "held")],
                    [key.rpm or 0, key.max_concurrency or 0, ticket.lease, self.lease],
                )
            except _FAILURES as exc:
                self._went_down(exc)
                return self._fallback_enter(key)
            verdict = answer[0].decode()
            if verdict == "slots":
                raise no_slot(key)
            if verdict == "rate":
                self._saw(key, rpm=float(answer[2]))
                raise no_requests(key, float(answer[1]))
            self._saw(key, rpm=float(answer[1]))
        self._leases[ticket.lease] = ticket
        return ticket

    async def hold(self, ticket: Ticket, likely: Amount, most: Amount) -> None:
        if not ticket.shared:
            return await self._charge_locally(ticket, likely, most)
        key = ticket.key
        if key.tpm is not None and likely[0] > key.tpm:
            raise too_large(key, likely[0])
        if key.tpm is None and not key.has_budget:
            ticket.tokens, ticket.usd, ticket.charged = most[0], most[1], True
            return None
        try:
            answer = await self._run_charge(ticket, likely, most)
            if answer[0] == b"seed":
                await self._seed_spend(key)
                answer = await self._run_charge(ticket, likely, most)
        except _FAILURES as exc:
            self._went_down(exc)
            if self.failure != "local":
                raise self._refusal() from None
            ticket.local_charge = True
            return await self._charge_locally(ticket, likely, most)
        verdict = answer[0].decode()
        if verdict == "budget":
            refusal = over_budget(key, likely, int(float(answer[1])), float(answer[2]))
            raise refusal if refusal is not None else LimitsUnavailable("Budget check failed.")
        if verdict == "tokens":
            self._saw(key, tpm=float(answer[2]))
            raise no_tokens(key, float(answer[1]))
        if verdict != "ok":
            raise LimitsUnavailable("The shared budget could not be read; try again.")
        self._saw(key, tpm=float(answer[1]))
        ticket.tokens, ticket.usd, ticket.charged = most[0], most[1], True
        return None

    def settle(self, ticket: Ticket, tokens: int, usd: float) -> None:
        """Note what the request used; it reaches Redis with its `leave` (one round trip).
        The headers this answer gets show the unused tokens given back already."""
        if not ticket.shared or ticket.local_charge:
            super().settle(ticket, tokens, usd)
        elif ticket.charged:
            ticket.used = (tokens, usd)
            key = ticket.key
            seen = self._seen.get(key.id)
            if key.tpm is not None and seen is not None and seen.tpm is not None:
                level = _refilled(seen.tpm, key.tpm, time.monotonic() - seen.at)
                self._saw(key, tpm=min(float(key.tpm), level + ticket.tokens - tokens))

    async def spending(self, key: KeyRecord) -> Spend | None:
        """The key's shared spending this period (this replica's ended requests counted)."""
        return (await self.spendings([key]))[0]

    async def spendings(self, keys: Sequence[KeyRecord]) -> list[Spend | None]:
        """`spending` of every key, read in one pipeline (periods not in Redis yet are seeded
        from the usage table first, then read again)."""
        if not self.up:
            return [self.spent(key) for key in keys]
        if self._ender is not None:
            await asyncio.shield(self._ender)
        now = time.time()
        budgeted = [(key, period_start(key.budget_period, now)) for key in keys if key.has_budget]
        try:
            read = await self._read_spending(budgeted)
            unseeded = [i for i, (spent, _) in enumerate(read) if spent[0] is None]
            for i in unseeded:
                await self._seed_spend(budgeted[i][0])
            again = await self._read_spending([budgeted[i] for i in unseeded])
            for i, fresh in zip(unseeded, again, strict=True):
                read[i] = fresh
        except _FAILURES as exc:
            self._went_down(exc)
            return [self.spent(key) for key in keys]
        found = {
            key.id: Spend(
                start=start,
                tokens=int(tokens or 0),
                usd=float(usd or 0),
                held_tokens=int(held_t or 0),
                held_usd=max(0.0, float(held_u or 0)),
            )
            for (key, start), ((tokens, usd), (held_t, held_u)) in zip(budgeted, read, strict=True)
        }
        return [found.get(key.id) for key in keys]

    async def _read_spending(
        self, keys: Sequence[tuple[KeyRecord, float]]
    ) -> list[tuple[list[Any], list[Any]]]:
        """(spent t and u, held #t and #u) of each (key, period start)."""
        if not keys:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, start in keys:
                _ = pipe.hmget(_spent_key(key, start), ["t", "u"])  # queued; sent by execute()
                _ = pipe.hmget(_k(key, "held"), ["#t", "#u"])
            replies = await pipe.execute()
        return [(replies[i], replies[i + 1]) for i in range(0, len(replies), 2)]

    def leave(self, ticket: Ticket) -> None:
        if not ticket.shared:
            super().leave(ticket)
            return
        if ticket.lease is not None:
            self._leases.pop(ticket.lease, None)
        if ticket.used is None and ticket.charged:  # it ended without settling: nothing used
            ticket.used = (0, 0.0)
        self._ending.append(ticket)
        if self._ender is None or self._ender.done():
            self._ender = asyncio.create_task(self._end_all())

    def headers(self, key: KeyRecord) -> dict[str, str]:
        seen = self._seen.get(key.id) if self.up else None
        if seen is None:
            return super().headers(key)
        elapsed = time.monotonic() - seen.at
        headers: dict[str, str] = {}
        for name, cap, level in (("requests", key.rpm, seen.rpm), ("tokens", key.tpm, seen.tpm)):
            if cap is None:
                continue
            now = cap if level is None else _refilled(level, cap, elapsed)
            headers[f"x-ratelimit-limit-{name}"] = str(cap)
            headers[f"x-ratelimit-remaining-{name}"] = str(max(0, math.floor(now)))
            headers[f"x-ratelimit-reset-{name}"] = duration(max(0.0, (cap - now) * 60 / cap))
        return headers

    # -- keys (re)loaded -----------------------------------------------------------------

    async def sync(
        self, keys: Iterable[KeyRecord], flush: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Load the fallback's spending as the in-memory gate does, and drop the shared
        spending of keys whose budget went or changed period (it is seeded again)."""
        keys = list(keys)
        if flush is not None:
            self._flush = flush
        stale = []
        for key in keys:
            old = self._keys.get(key.id)
            if old is not None and (old.has_budget, old.budget_period) != (
                key.has_budget,
                key.budget_period,
            ):
                stale.append(key)
            self._keys[key.id] = key
        await super().sync(keys, flush)
        if stale and self.up:
            names = [_spent_key(k, start) for k in stale for start in _starts(time.time())]
            try:
                await self.redis.delete(*names)
            except _FAILURES as exc:
                self._went_down(exc)

    def start(self) -> None:
        self._renewer = asyncio.create_task(self.renew_forever(), name="redis-lease-renewal")

    async def close(self) -> None:
        """Let the requests' last steps reach Redis (bounded), then stop the background tasks."""
        if self._ender is not None:
            await asyncio.wait([self._ender], timeout=2.0)
        for task in (self._probe, self._renewer, self._reload):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self.link.close()
        await self.redis.aclose(close_connection_pool=True)

    async def renew_forever(self) -> None:
        """Renew the leases of this replica's requests in flight, a third of a lease apart."""
        while True:
            await asyncio.sleep(self.lease / 3)
            if self.up and self._leases:
                await self.renew()

    async def renew(self) -> None:
        by_key: dict[str, list[str]] = {}
        records: dict[str, KeyRecord] = {}
        for lease, ticket in self._leases.items():
            by_key.setdefault(ticket.key.id, []).append(lease)
            records[ticket.key.id] = ticket.key
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                for key_id, leases in by_key.items():
                    key = records[key_id]
                    await self._renew(
                        keys=[_k(key, "lease"), _k(key, "held")],
                        args=[self.lease, *leases],
                        client=pipe,
                    )
                await pipe.execute()
        except _FAILURES as exc:
            self._went_down(exc)

    # -- internals -----------------------------------------------------------------------

    async def _run_charge(self, ticket: Ticket, likely: Amount, most: Amount) -> list[bytes]:
        key = ticket.key
        start = period_start(key.budget_period, time.time())
        answer: list[bytes] = await self.link.script(
            self._charge.sha,
            limits_lua.CHARGE,
            [
                _k(key, "rpm"),
                _k(key, "tpm"),
                _k(key, "lease"),
                _k(key, "held"),
                _spent_key(key, start),
            ],
            [
                key.rpm or 0,
                key.tpm or 0,
                likely[0],
                most[0],
                "" if key.budget_tokens is None else key.budget_tokens,
                "" if key.budget_usd is None else repr(key.budget_usd),
                repr(likely[1]),
                repr(most[1]),
                ticket.lease or "",
                self.lease,
            ],
        )
        if key.has_budget and ticket.lease is not None:
            self._leases[ticket.lease] = ticket
        return answer

    async def _seed_spend(self, key: KeyRecord) -> None:
        """The period's spending is not in Redis yet (a new period, a Redis restart): seed it
        from the usage table, with this replica's finished requests written first."""
        if self._flush is not None:
            with contextlib.suppress(Exception):
                await self._flush()
        now = time.time()
        start = period_start(key.budget_period, now)
        tokens, usd = await self._store.spend_since(key.id, start)
        length = _PERIOD_SECONDS.get(key.budget_period or "total", 0)
        ttl = int(start + length - now) + 86400 if length else 0
        await self._seed(keys=[_spent_key(key, start)], args=[tokens, repr(usd), ttl])

    async def _end_all(self) -> None:
        """Send the end of every request that ended meanwhile, together: under load, many
        requests share one round trip."""
        while self._ending:
            batch, self._ending = self._ending, []
            now = time.time()
            calls: list[tuple[list[str], list[Arg]]] = []
            for ticket in batch:
                key = ticket.key
                used = ticket.used or (0, 0.0)
                spent = _spent_key(key, period_start(key.budget_period, now))
                calls.append(
                    (
                        [_k(key, "tpm"), _k(key, "lease"), _k(key, "held"), spent],
                        [
                            ticket.lease or "",
                            key.tpm or 0,
                            ticket.tokens,
                            used[0],
                            repr(used[1]),
                            "1" if ticket.used is not None else "0",
                        ],
                    )
                )
            try:
                await self.link.scripts(self._finish.sha, limits_lua.FINISH, calls)
            except _FAILURES as exc:  # their leases end on their own
                self._went_down(exc)

    def _saw(self, key: KeyRecord, *, rpm: float | None = None, tpm: float | None = None) -> None:
        seen = self._seen.get(key.id)
        if seen is None:
            seen = self._seen[key.id] = _Seen()
        now = time.monotonic()
        # Carry the other bucket's level forward to now, so both read from one instant.
        elapsed = now - seen.at
        if rpm is not None and rpm >= 0:
            seen.rpm = rpm
        elif seen.rpm is not None and key.rpm is not None:
            seen.rpm = min(float(key.rpm), seen.rpm + elapsed * key.rpm / 60)
        if tpm is not None and tpm > -1:
            seen.tpm = tpm
        elif seen.tpm is not None and key.tpm is not None:
            seen.tpm = min(float(key.tpm), seen.tpm + elapsed * key.tpm / 60)
        seen.at = now

    async def _charge_locally(self, ticket: Ticket, likely: Amount, most: Amount) -> None:
        if self._reload is not None:  # the fallback's budgets are being read afresh
            await asyncio.shield(self._reload)
        self.charge(ticket, likely, most)

    async def _reload_budgets(self) -> None:
        """What the fallback needs: what every replica spent (the usage table), not what
        this one knew when Redis went away."""
        self.budgets = BudgetBook(self._wall)
        with contextlib.suppress(Exception):
            await Gate.sync(self, list(self._keys.values()), self._flush)

    def _fallback_enter(self, key: KeyRecord) -> Ticket | None:
        self.fallbacks += 1
        if self.failure != "local":
            raise self._refusal()
        return self.enter(key)

    def _refusal(self) -> LimitsUnavailable:
        return LimitsUnavailable(
            "The gateway cannot reach its shared rate limits (Redis); try again shortly.",
            retry_after=_PROBE_SECONDS,
        )

    def _went_down(self, exc: BaseException) -> None:
        if not self.up:
            return
        self.up = False
        log.warning(
            "redis_unreachable", error=f"{type(exc).__name__}: {exc}", fallback=self.failure
        )
        if self.failure == "local":
            self._reload = asyncio.create_task(self._reload_budgets())
        self._probe = asyncio.create_task(self._wait_for_redis())

    async def _wait_for_redis(self) -> None:
        while True:
            await asyncio.sleep(_PROBE_SECONDS)
            try:
                await self.redis.ping()
            except _FAILURES:
                continue
            self.up = True
            self._seen.clear()
            log.warning("redis_reachable", fallbacks=self.fallbacks)
            return


def _refilled(level: float, cap: int, elapsed: float) -> float:
    return min(float(cap), level + elapsed * cap / 60)


def _k(key: KeyRecord, name: str) -> str:
    return f"tk:{{{key.id}}}:{name}"


def _spent_key(key: KeyRecord, start: float) -> str:
    return f"tk:{{{key.id}}}:spent:{int(start)}"


def _starts(now: float) -> list[float]:
    return [period_start(p, now) for p in ("total", "day", "week", "month")]


def open_gate(server: ServerSettings, store: Database) -> Gate:
    """The one place the limits backend is chosen: Redis when `redis_url` is set."""
    if server.redis_url is None:
        return Gate(store)
    timeout = server.redis_timeout_seconds
    # A few connections, shared: a burst waits its turn for one (a script takes well under a
    # millisecond) rather than opening hundreds at once, which would time out on a busy box.
    pool = BlockingConnectionPool.from_url(
        server.redis_url,
        max_connections=POOL_SIZE,
        timeout=_POOL_WAIT_SECONDS,  # waiting for a busy pool is load, not an outage
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry_on_timeout=False,
    )
    return SharedGate(store, Redis(connection_pool=pool), failure=server.redis_failure)
