"""Admission: a key's rate limits and budget, checked together before a request goes upstream.

`Gate.enter()` takes a concurrency slot and a request of the key's rate before the body is
read and returns a `Ticket`; `Gate.charge()` holds the request's tokens and budget once the body
shows what it may use; `Gate.give_back()` gives back the tokens it did not use as it ends,
`Gate.leave()` frees its slot, and `Gate.tally()` counts what it used in its key's budget as its
usage row is queued. Keys without limits or budget pass through without any of this work, but
for `Gate.count()` as their row is queued: a budget given to a key while its request ran counts
what that request used. `Gate.sync()` reads the spending of budgeted keys from the usage table
(and the rows not written yet) when the key cache (re)loads, before those keys serve requests,
and has a concurrency limit given to a key count its requests already running (`Gate.adopt`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import Callable, Container, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import msgspec
import structlog

from gateway.budgets import Amount, BudgetBook, Spend, period_start
from gateway.database import Database
from gateway.errors import GatewayError
from gateway.ratelimit import Limiter
from gateway.records import KeyRecord
from gateway.usage import Unwritten

__all__ = ["Gate", "Running", "Ticket", "UsageLog", "follow", "still"]

log = structlog.get_logger(__name__)

Clock = Callable[[], float]


class UsageLog(Protocol):
    """Where this process's usage rows wait to be written (`usage.UsageRecorder`)."""

    async def flush(self) -> None: ...
    def still(self) -> AbstractAsyncContextManager[Unwritten]: ...


def _none_unwritten(key_id: str, since: float) -> tuple[int, float]:
    return 0, 0.0


def still(usage: UsageLog | None) -> AbstractAsyncContextManager[Unwritten]:
    """`usage.still()`, or (no usage writer) a block where no row waits to be written."""
    return contextlib.nullcontext(_none_unwritten) if usage is None else usage.still()


@dataclass(slots=True)
class Ticket:
    """What one admitted request holds until it ends: a slot and a request of the key's limits
    (from `enter`), and its hold of tokens and budget (from `charge`)."""

    key: KeyRecord
    limited: bool
    budgeted: bool
    tokens: int = 0
    usd: float = 0.0
    charged: bool = False
    # Shared limits (`limits_redis.SharedGate`): admitted through Redis, under this lease;
    # charged in memory after all (Redis went away in between); what it used, once settled.
    shared: bool = False
    lease: str | None = None
    local_charge: bool = False
    used: tuple[int, float] | None = None
    row: bool = False  # its usage row is queued (`SharedGate.tally`): for a seed's read
    # In memory: what it used, given back (`Gate.give_back`) and not counted yet (`tally`).
    to_count: tuple[int, float] | None = None


# The metered requests in flight of the keys asked for, by key id: each one's task and ticket
# (None: it holds nothing). `middleware.running_requests` reads them for `Gate.adopt`.
Running = Callable[[Container[str]], dict[str, list[tuple["asyncio.Task[Any]", Ticket | None]]]]


def follow(ticket: Ticket, current: KeyRecord) -> None:
    """Charge an entered request under its key's limits and budget as they are now (the
    admin API may have changed them while its body arrived), within what it entered with: a
    request that entered without limits (or budget) holds nothing of limits (or a budget)
    given since, which count it as it ends instead (`tally`, `count`)."""
    if current is ticket.key:
        return
    changes: dict[str, None] = {}
    if not ticket.limited:
        changes |= {"rpm": None, "tpm": None, "max_concurrency": None}
    if not ticket.budgeted or not current.has_budget:
        changes |= {"budget_tokens": None, "budget_usd": None}
    ticket.key = msgspec.structs.replace(current, **changes) if changes else current
    ticket.budgeted = ticket.key.has_budget


class Gate:
    """Rate limits and budgets of every key; memory only on the request path."""

    def __init__(
        self, store: Database, *, monotonic: Clock = time.monotonic, wall: Clock = time.time
    ) -> None:
        self._store = store
        self._wall = wall
        self.limiter = Limiter(monotonic)
        self.budgets = BudgetBook(wall)
        self.running: Running | None = None  # set by the app (none: nothing to adopt)
        self._adopted: set[asyncio.Task[Any]] = set()  # requests `adopt` has seen, running
        # `admit` is `enter` here (a shared gate's asks Redis): the request path then calls
        # `enter` at once, without a coroutine to make and await.
        self.admits_at_once = type(self).admit is Gate.admit

    async def sync(self, keys: Iterable[KeyRecord], usage: UsageLog | None = None) -> None:
        """Load the period spending of budgeted keys not known yet (or whose period changed):
        what the usage table has, plus what `usage`'s rows not written yet add. The table
        is read while `usage` writes nothing (`UsageRecorder.still`), so each request that
        ended is counted once, from the one or the other, whenever it ended.

        Then `adopt` their requests running (again once the reads are done: the key cache
        and the admin API put the keys in place right after, with no wait between)."""
        keys = list(keys)
        self.adopt(keys)
        await self._sync_budgets(keys, usage)
        self.adopt(keys)

    def adopt(self, keys: Iterable[KeyRecord]) -> None:
        """Count the requests in flight of keys with a concurrency limit that took no slot of
        it (their key had no limits when they entered, or a budget only), as if the limit had
        been there: each holds a slot until it ends. A request is adopted once, whatever
        changes of its key follow; those that took a slot as they entered hold it already."""
        running = self.running
        capped = {k.id: k for k in keys if k.max_concurrency is not None}
        if running is None or not capped:
            return
        adopted = self._adopted
        for key_id, requests in running(capped).items():
            fresh = [(task, ticket) for task, ticket in requests if task not in adopted]
            for task, _ in fresh:
                adopted.add(task)
                task.add_done_callback(adopted.discard)
            if fresh:
                self._seat(capped[key_id], fresh)

    def _seat(
        self, key: KeyRecord, requests: list[tuple[asyncio.Task[Any], Ticket | None]]
    ) -> None:
        """A slot of the key's concurrency for each of its requests running that took none."""
        for task, ticket in requests:
            if ticket is None or not ticket.limited:
                self.limiter.seat(key)
                task.add_done_callback(functools.partial(self._unseat, key))

    def _unseat(self, key: KeyRecord, task: asyncio.Task[Any]) -> None:
        self.limiter.leave(key)

    async def _sync_budgets(self, keys: list[KeyRecord], usage: UsageLog | None) -> None:
        for key in keys:
            if not key.has_budget:
                self.budgets.forget(key)  # a budget given again later starts from the table
        if not any(self.budgets.needs_load(k) for k in keys):
            return
        async with still(usage) as unwritten:
            for key in keys:
                if self.budgets.needs_load(key):  # another sync may have loaded it meanwhile
                    await self._load(key, unwritten)

    async def _load(self, key: KeyRecord, unwritten: Unwritten) -> None:
        start = period_start(key.budget_period, self._wall())
        tokens, usd = await self._store.spend_since(key.id, start)
        # A sync without a usage writer (whose `still` keeps syncs apart) may have loaded this
        # key while this one read the table, and requests settled since: loading again
        # would forget them.
        if self.budgets.needs_load(key):
            late_tokens, late_usd = unwritten(key.id, start)
            self.budgets.load(key, start, tokens + late_tokens, usd + late_usd)

    def start(self) -> None:
        """Start background work (the in-memory gate has none)."""

    async def close(self) -> None:
        """Stop background work (the in-memory gate has none)."""

    async def admit(self, key: KeyRecord) -> Ticket | None:
        """`enter`, as the request path calls it: shared gates must ask Redis."""
        return self.enter(key)

    async def hold(self, ticket: Ticket, likely: Amount, most: Amount) -> None:
        """`charge`, as the request path calls it: shared gates must ask Redis."""
        self.charge(ticket, likely, most)

    def enter(self, key: KeyRecord) -> Ticket | None:
        """Before its body is read: a request takes a slot and a request of the key's limits.

        Raises:
            RateLimited: no slot, or no request left this minute.
        """
        limited = key.has_limits
        budgeted = key.has_budget
        if not (limited or budgeted):
            return None
        if limited:
            self.limiter.enter(key)
        return Ticket(key=key, limited=limited, budgeted=budgeted)

    def charge(self, ticket: Ticket, likely: Amount, most: Amount) -> None:
        """Once its body shows what it may use: hold the request's `most` (tokens, USD) if its
        `likely` fits the key's tokens per minute and budget.

        Raises:
            RateLimited: the tokens per minute have no room.
            QuotaExceeded: the budget has not enough left.
        """
        key = ticket.key
        try:
            if ticket.budgeted:
                self.budgets.reserve(key, likely, most)
            if ticket.limited:
                try:
                    self.limiter.take(key, likely[0], most[0])
                except GatewayError:
                    if ticket.budgeted:
                        self.budgets.settle(key, most, (0, 0.0))  # it never ran
                    raise
        except GatewayError:
            if ticket.limited:
                self.limiter.refund(key)  # a refused request costs no request of the rate
            raise
        ticket.tokens, ticket.usd, ticket.charged = most[0], most[1], True

    def settle(self, ticket: Ticket, tokens: int, usd: float) -> None:
        """`give_back` and `tally` at once, for a request without a usage row to wait for."""
        self.give_back(ticket, tokens, usd)
        self.tally(ticket)

    def give_back(self, ticket: Ticket, tokens: int, usd: float) -> None:
        """The charged request ended having used `tokens` costing `usd`: the tokens per
        minute it did not use come back now (its answer's headers show them); its budget
        hold stays until `tally`."""
        if not ticket.charged:
            return
        ticket.charged = False
        ticket.to_count = (tokens, usd)
        if ticket.limited:
            self.limiter.give_back(ticket.key, ticket.tokens, tokens)

    def tally(self, ticket: Ticket) -> None:
        """Its usage row is being queued: release the request's budget hold and count what it
        used. In the same step as the row, so a budget's spending loaded meanwhile (the table
        and the rows not written yet: `sync`) has the request there or here, never both."""
        used, ticket.to_count = ticket.to_count, None
        if used is None:
            return
        if ticket.budgeted:
            self.budgets.settle(ticket.key, (ticket.tokens, ticket.usd), used)
        else:  # the key may have been given a budget since the request entered
            self.budgets.count(ticket.key.id, used)

    def count(self, key_id: str, tokens: int, usd: float) -> None:
        """A request without a ticket (its key had no limits or budget when it entered) ended
        having used `tokens` costing `usd`: counted if the key has a budget now, whose
        spending was read from the usage table before this request's row was in it."""
        self.budgets.count(key_id, (tokens, usd))

    def leave(self, ticket: Ticket) -> None:
        """The request is over (answered, refused or abandoned): its slot is free."""
        if ticket.limited:
            self.limiter.leave(ticket.key)

    def headers(self, key: KeyRecord) -> dict[str, str]:
        return self.limiter.headers(key) if key.rpm is not None or key.tpm is not None else {}

    def spent(self, key: KeyRecord) -> Spend | None:
        return self.budgets.spent(key) if key.has_budget else None

    async def spending(self, key: KeyRecord) -> Spend | None:
        """`spent`, as the admin API asks it: shared gates read Redis."""
        return self.spent(key)

    async def spendings(self, keys: Sequence[KeyRecord]) -> list[Spend | None]:
        """`spending` of each key (shared gates: one round trip for them all)."""
        return [self.spent(key) for key in keys]
