"""Admission: a key's rate limits and budget, checked together before a request goes upstream.

`Gate.admit()` charges the rate limits and holds budget for one request and returns a
`Ticket`; `Gate.settle()` gives back what the request did not use. Keys without limits or
budget pass through without any of this work. `Gate.sync()` reads the spending of budgeted
keys from the usage table when the key cache (re)loads, before those keys serve requests.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import structlog

from gateway.budgets import BudgetBook, Spend, period_start
from gateway.errors import GatewayError
from gateway.ratelimit import Limiter
from gateway.records import KeyRecord
from gateway.store import Store

__all__ = ["Gate", "Ticket"]

log = structlog.get_logger(__name__)

Clock = Callable[[], float]


@dataclass(slots=True)
class Ticket:
    """What one admitted request holds until it ends."""

    key: KeyRecord
    tokens: int
    usd: float
    limited: bool
    budgeted: bool


class Gate:
    """Rate limits and budgets of every key; memory only on the request path."""

    def __init__(
        self, store: Store, *, monotonic: Clock = time.monotonic, wall: Clock = time.time
    ) -> None:
        self._store = store
        self._wall = wall
        self.limiter = Limiter(monotonic)
        self.budgets = BudgetBook(wall)

    async def sync(
        self, keys: Iterable[KeyRecord], flush: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """Load the period spending of budgeted keys not known yet (or whose period changed)."""
        keys = list(keys)
        for key in keys:
            if not key.has_budget:
                self.budgets.forget(key)  # a budget given again later starts from the table
        todo = [k for k in keys if self.budgets.needs_load(k)]
        if not todo:
            return
        if flush is not None:
            try:
                await flush()  # rows of requests already finished must be counted
            except Exception:  # the keys must still load; the rows stay queued for later
                log.exception("usage_flush_failed_before_budget_load")
        for key in todo:
            start = period_start(key.budget_period, self._wall())
            tokens, usd = await self._store.spend_since(key.id, start)
            self.budgets.load(key, start, tokens, usd)

    def admit(self, key: KeyRecord, tokens: int, usd: float) -> Ticket | None:
        """Charge one request that may use `tokens` (costing `usd`) to the key.

        Raises:
            RateLimited: a rate or concurrency limit has no room.
            QuotaExceeded: the budget has not enough left.
        """
        limited = key.has_limits
        budgeted = key.has_budget
        if not (limited or budgeted):
            return None
        if budgeted:
            self.budgets.reserve(key, tokens, usd)
        if limited:
            try:
                self.limiter.admit(key, tokens)
            except GatewayError:
                if budgeted:
                    self.budgets.settle(key, (tokens, usd), (0, 0.0))  # it never ran
                raise
        return Ticket(key=key, tokens=tokens, usd=usd, limited=limited, budgeted=budgeted)

    def settle(self, ticket: Ticket, tokens: int, usd: float) -> None:
        """The admitted request ended having used `tokens` costing `usd`."""
        if ticket.limited:
            self.limiter.release(ticket.key, ticket.tokens, tokens)
        if ticket.budgeted:
            self.budgets.settle(ticket.key, (ticket.tokens, ticket.usd), (tokens, usd))

    def headers(self, key: KeyRecord) -> dict[str, str]:
        return self.limiter.headers(key) if key.rpm is not None or key.tpm is not None else {}

    def spent(self, key: KeyRecord) -> Spend | None:
        return self.budgets.spent(key) if key.has_budget else None
