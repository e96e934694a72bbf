"""The per-replica fallback of the Redis-shared limits, and the circuit that chooses it.

While Redis is unreachable, requests are refused with a 503 (`redis_failure = "refuse"`) or go
through the in-memory limits of this replica (`"local"`), whose budgets are read afresh from
the usage table (what every replica spent). A circuit keeps a dead Redis from costing every
request a timeout: after one failure, requests take the fallback at once, and a probe pings
Redis every second until it answers. Both transitions are logged once. `SharedGate`
(`limits_redis.py`) is this gate with its counts in Redis.
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from gateway.admission import Gate, Ticket, UsageLog
from gateway.budgets import Amount, BudgetBook
from gateway.database import Database
from gateway.errors import LimitsUnavailable
from gateway.records import KeyRecord

__all__ = ["FAILURES", "FallbackGate"]

log = structlog.get_logger("gateway.limits_redis")

FAILURES = (RedisError, OSError, TimeoutError)  # what counts as Redis being unreachable
_PROBE_SECONDS = 1.0


class FallbackGate(Gate):
    """A gate whose counts live elsewhere (Redis), with this replica's memory to fall back on."""

    def __init__(self, store: Database, redis: Redis, *, failure: str = "refuse") -> None:
        super().__init__(store)
        self.redis = redis
        self.failure = failure
        self.up = True
        self.fallbacks = 0  # requests that met a Redis outage (refused or limited locally)
        self._probe: asyncio.Task[None] | None = None
        self._reload: asyncio.Task[None] | None = None
        self._keys: dict[str, KeyRecord] = {}  # what the fallback must know the spending of
        self._usage: UsageLog | None = None

    async def reconcile(self) -> None:
        """Redis answers a ping again: set right in it what the outage left wrong, before
        requests go through it. Raising (Redis does not take it) keeps the probe going."""

    def came_back(self) -> None:
        """Redis answers again (a hook for what was learnt from it before)."""

    async def stop_probe(self) -> None:
        for task in (self._probe, self._reload):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _charge_locally(self, ticket: Ticket, likely: Amount, most: Amount) -> None:
        if self._reload is not None:  # the fallback's budgets are being read afresh
            await asyncio.shield(self._reload)
        self.charge(ticket, likely, most)

    async def _reload_budgets(self) -> None:
        """What the fallback needs: what every replica spent (the usage table), not what
        this one knew when Redis went away."""
        self.budgets = BudgetBook(self._wall)
        with contextlib.suppress(Exception):
            await self._sync_budgets(list(self._keys.values()), self._usage)

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
                answered = await self.redis.ping()  # True for PONG only: Redis, not any server
            except Exception:  # redis-py fails on some garbage with AttributeError: a probe
                answered = False  # that ended here would leave the circuit open until a restart
            if not answered:
                continue
            try:
                await self.reconcile()
            except Exception as exc:  # (as a ping unanswered: the outage goes on)
                log.debug("redis_reconcile_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            self.up = True
            self.came_back()
            log.warning("redis_reachable", fallbacks=self.fallbacks)
            return
