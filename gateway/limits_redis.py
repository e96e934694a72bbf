"""Rate limits, concurrency and budgets shared by every replica through Redis.

`SharedGate` is a `Gate` whose request steps run as Lua scripts in Redis (`limits_lua.py`),
registered once and run with EVALSHA, so replicas share one count with the semantics and
headers of the in-memory gate. The request path's scripts go over one multiplexed connection
(`redis_link.py`); the levels they return make the response headers (`limits_levels.py`). What
it inherits is the per-replica fallback while Redis is unreachable (`limits_fallback.py`).

A request's slot and budget hold carry a lease that this replica renews while the request runs;
a crashed replica's requests give theirs back when their lease ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import secrets
import time
from collections.abc import Iterable, Sequence
from typing import Any

import structlog
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from gateway import limits_lua
from gateway.admission import Gate, Ticket, UsageLog, still
from gateway.background import mark_seen
from gateway.budgets import Amount, Spend, over_budget, period_start
from gateway.database import Database
from gateway.errors import LimitsUnavailable, StoreBusy
from gateway.limits_fallback import FAILURES as _FAILURES, FallbackGate
from gateway.limits_levels import Levels
from gateway.limits_state import (
    key_name,
    key_names,
    period_starts,
    read_spending,
    renew_leases,
    seed_spending,
    spent_name,
)
from gateway.ratelimit import no_requests, no_slot, no_tokens, too_large
from gateway.records import KeyRecord
from gateway.redis_link import Arg, RedisLink
from gateway.settings import ServerSettings

__all__ = ["LEASE_SECONDS", "SEED_WAIT_SECONDS", "SharedGate", "open_gate"]

log = structlog.get_logger(__name__)

# How long a request's slot and hold outlive a replica that stopped renewing them.
LEASE_SECONDS = 30.0
POOL_SIZE = 16
_POOL_WAIT_SECONDS = 5.0
_CHARGE_VERDICTS = (b"ok", b"budget", b"tokens")
_MAX_UNSENT = 100_000  # ends kept through an outage to send again
# How long a request waits for its budget's spending to be seeded from the usage table before
# it gets a 503 `database_busy` (a frozen database would hold it for the 30 s query timeout).
SEED_WAIT_SECONDS = 2.0
# How long Redis's return waits for this replica's usage rows to be written (`reconcile`).
RECONCILE_FLUSH_SECONDS = 2.0
_RECONCILE_RETRY_SECONDS = 1.0  # between tries to write those rows once Redis answers


class BadReply(RedisError):
    """Redis answered a script with what no script returns: not Redis, or out of step."""


class Unwritten(Exception):
    """This replica's usage rows could not be written in time (`SharedGate.reconcile`)."""


# A reply of the wrong shape fails its parse with one of these: an outage too, not a 500.
_NOT_ANSWERED = (*_FAILURES, AttributeError, IndexError, KeyError, TypeError, ValueError)


class SharedGate(FallbackGate):
    """The gate of a replica among several: Redis holds the counts, memory the fallback."""

    def __init__(
        self,
        store: Database,
        redis: Redis,
        *,
        failure: str = "refuse",
        lease: float = LEASE_SECONDS,
        seed_wait: float = SEED_WAIT_SECONDS,
    ) -> None:
        super().__init__(store, redis, failure=failure)
        # The request path's scripts, loaded on each of the link's connections.
        self.link = RedisLink(
            redis, (limits_lua.ENTER, limits_lua.CHARGE, limits_lua.FINISH, limits_lua.ADOPT)
        )
        self.lease = lease
        self.seed_wait = seed_wait
        self.levels = Levels()
        self._enter = redis.register_script(limits_lua.ENTER)
        self._charge = redis.register_script(limits_lua.CHARGE)
        self._finish = redis.register_script(limits_lua.FINISH)
        self._seed_script = redis.register_script(limits_lua.SEED)
        self._renew = redis.register_script(limits_lua.RENEW)
        self._adopt = redis.register_script(limits_lua.ADOPT)
        self._read = redis.register_script(limits_lua.READ)
        self._ids = itertools.count()
        self._replica = secrets.token_hex(4)
        self._leases: dict[str, Ticket] = {}
        self._adopting: list[asyncio.Future[Any]] = []  # `_seat`'s replies, for `sync`
        # Keys with a concurrency limit (as last synced), and the lease under which `_seat`
        # put each request in Redis's leases: for `came_back`, which puts them in again.
        self._capped: dict[str, KeyRecord] = {}
        self._seats: dict[asyncio.Task[Any], str] = {}
        self._ending: list[Ticket] = []  # requests that ended, for `_end_all` to send
        # Ends Redis did not answer (an outage), sent again once it does (`came_back`), and
        # those being sent again.
        self._unsent: list[Ticket] = []
        self._again: list[Ticket] = []
        # Spendings (Redis key names) that miss what this replica spent while Redis was away
        # (its fallback's requests), or are stale (a budget that went or changed meanwhile):
        # dropped before requests go through Redis again, so they are seeded afresh from the
        # usage table (`reconcile`).
        self._stale: set[str] = set()
        self._late: asyncio.Task[None] | None = None
        self._flushing: asyncio.Task[None] | None = None  # (`_flushed`)
        self._unwritten_said = False  # (`_flushed`: logged once until Redis is back)
        # Held while ends are sent (until Redis answers) and while a spending is seeded: a
        # seed knows which ends reached Redis before it and which will after (`_seed_spend`).
        self._finishing = asyncio.Lock()
        self._seeds: dict[str, asyncio.Task[None]] = {}  # by spending (Redis key) name
        self._ender: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None

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
                    key_names(key, "rpm", "lease", "held", "lapsed"),
                    [key.rpm or 0, key.max_concurrency or 0, ticket.lease, self.lease],
                )
                verdict = answer[0]
                if verdict == b"ok":
                    wait, rpm = 0.0, float(answer[1])
                elif verdict == b"rate":
                    wait, rpm = float(answer[1]), float(answer[2])
                elif verdict == b"slots":
                    raise no_slot(key)  # (a refusal: not caught below)
                else:
                    raise BadReply(f"unexpected reply {answer!r:.100}")
            except _NOT_ANSWERED as exc:
                self._went_down(self._bad(exc))
                return self._fallback_enter(key)
            self.levels.saw(key, rpm=rpm)
            if wait:
                raise no_requests(key, wait)
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
            verdict = answer[0]
            if verdict not in _CHARGE_VERDICTS:
                raise BadReply(f"unexpected reply {answer!r:.100}")
            first, second = float(answer[1]), float(answer[-1])
        except _NOT_ANSWERED as exc:
            self._went_down(self._bad(exc))
            if self.failure != "local":
                raise self._refusal() from None
            ticket.local_charge = True
            return await self._charge_locally(ticket, likely, most)
        if verdict == b"budget":
            refusal = over_budget(key, likely, int(first), second)
            raise refusal if refusal is not None else LimitsUnavailable("Budget check failed.")
        if verdict == b"tokens":
            self.levels.saw(key, tpm=second)
            raise no_tokens(key, first)
        self.levels.saw(key, tpm=first)
        ticket.tokens, ticket.usd, ticket.charged = most[0], most[1], True
        return None

    def give_back(self, ticket: Ticket, tokens: int, usd: float) -> None:
        """Note what the request used; it reaches Redis with its `leave` (one round trip).
        The headers this answer gets show the unused tokens given back already."""
        if not ticket.shared or ticket.local_charge:
            super().give_back(ticket, tokens, usd)
        elif ticket.charged:
            ticket.used = (tokens, usd)
            self.levels.give_back(ticket.key, ticket.tokens - tokens)

    def tally(self, ticket: Ticket) -> None:
        """(A request charged in Redis is counted there by its `leave`; its row is queued
        now, which a seed's read must know: `_seed_spend`.)"""
        if not ticket.shared or ticket.local_charge:
            used = ticket.to_count
            super().tally(ticket)
            if used is not None:
                self._count_later(ticket.key.id, used)
        else:
            ticket.row = True

    def count(self, key_id: str, tokens: int, usd: float) -> None:
        """Count a request without a ticket in its key's shared spending, if the key has a
        budget now (FINISH, with the next requests that end: no round trip of its own)."""
        key = self._keys.get(key_id)
        if key is None or not key.has_budget or not self.up:
            super().count(key_id, tokens, usd)  # the fallback's book, when it has the key
            self._count_later(key_id, (tokens, usd))
            return
        self._send_spent(key, (tokens, usd))

    def _send_spent(self, key: KeyRecord, used: Amount) -> None:
        """Add what a request used to the key's shared spending with the next ends sent: a
        FINISH that holds and frees nothing (no lease, no tokens per minute). Its row is
        queued in the same step (`pipeline._settle`, then `middleware._finish`), so a seed
        meanwhile takes it off what it read (`_seed`)."""
        self._ending.append(Ticket(key=key, limited=False, budgeted=True, used=used, row=True))
        self._end_soon()

    def _count_later(self, key_id: str, used: Amount) -> None:
        """What a request the fallback admitted (or counted) used, for the shared spending:
        sent now if Redis answers again already (a request that outlived the outage); else
        its key's spending this period is marked to be seeded again (`reconcile`), from the
        usage table that has its row by then."""
        key = self._keys.get(key_id)
        if key is None or not key.has_budget:
            return
        if self.up:
            self._send_spent(key, used)
        else:
            self._stale.add(spent_name(key, period_start(key.budget_period, time.time())))

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
            read = await read_spending(self.redis, self._read, budgeted)
            unseeded = [i for i, spend in enumerate(read) if spend is None]
            for i in unseeded:
                await self._seed_spend(budgeted[i][0])
            again = await read_spending(self.redis, self._read, [budgeted[i] for i in unseeded])
            for i, fresh in zip(unseeded, again, strict=True):
                read[i] = fresh
        except _NOT_ANSWERED as exc:
            self._went_down(self._bad(exc))
            return [self.spent(key) for key in keys]
        found = {key.id: spend for (key, _), spend in zip(budgeted, read, strict=True)}
        return [found.get(key.id) for key in keys]

    def leave(self, ticket: Ticket) -> None:
        if not ticket.shared:
            super().leave(ticket)
            return
        if ticket.lease is not None:
            self._leases.pop(ticket.lease, None)
        if ticket.used is None and ticket.charged:  # it ended without settling: nothing used
            ticket.used = (0, 0.0)
        self._ending.append(ticket)
        self._end_soon()

    def headers(self, key: KeyRecord) -> dict[str, str]:
        shown = self.levels.headers(key) if self.up else None
        return super().headers(key) if shown is None else shown

    # -- keys (re)loaded -----------------------------------------------------------------

    async def sync(self, keys: Iterable[KeyRecord], usage: UsageLog | None = None) -> None:
        """Load the fallback's spending as the in-memory gate does, and drop the shared
        spending of keys whose budget went or changed period (it is seeded again)."""
        keys = list(keys)
        if usage is not None:
            self._usage = usage
        stale = []
        for key in keys:
            old = self._keys.get(key.id)
            if old is not None and (old.has_budget, old.budget_period) != (
                key.has_budget,
                key.budget_period,
            ):
                stale.append(key)
            self._keys[key.id] = key
            if key.max_concurrency is not None:
                self._capped[key.id] = key
            else:
                self._capped.pop(key.id, None)
        await super().sync(keys, usage)
        if stale:
            names = [spent_name(k, start) for k in stale for start in period_starts(time.time())]
            if not self.up:  # (dropped when Redis answers again: `reconcile`)
                self._stale.update(names)
            else:
                try:
                    await self.redis.delete(*names)
                except _NOT_ANSWERED as exc:
                    self._stale.update(names)
                    self._went_down(self._bad(exc))
        # The leases of requests adopted are in Redis when the keys go in place (the other
        # replicas count them from then on), and those that came in meanwhile adopted too.
        while True:
            self.adopt(keys)
            sent, self._adopting = self._adopting, []
            if not sent:
                break
            await asyncio.wait(sent)  # (failures: `_adopted_reply`)

    def _seat(
        self, key: KeyRecord, requests: list[tuple[asyncio.Task[Any], Ticket | None]]
    ) -> None:
        """Put the key's requests running in its leases (Redis's count of its requests in
        flight), each once: under the lease it has (a request that entered under another
        limit), or one of its own, renewed until it ends (a request that holds nothing).
        Sent on the link at once, without a wait: the key goes in place right after, and a
        request's end, sent later on the link, reaches Redis after its lease."""
        if not self.up:
            super()._seat(key, requests)  # (in Redis too once it answers: `came_back`)
            return
        leases = []
        seats = self._seats
        for task, ticket in requests:
            lease = seats.get(task)
            if lease is not None:  # seated before: the same lease (ADOPT adds it if missing)
                leases.append(lease)
                continue
            if ticket is not None and ticket.shared and ticket.lease is not None:
                lease = ticket.lease  # (its end takes it out of the leases)
            else:
                seat = Ticket(key=key, limited=False, budgeted=False, shared=True)
                lease = seat.lease = f"{self._replica}:{next(self._ids)}"
                self._leases[lease] = seat
                task.add_done_callback(functools.partial(self._leave_seat, seat))
            seats[task] = lease
            task.add_done_callback(self._unseated)
            leases.append(lease)
        if not leases:
            return
        reply = self.link.send(
            "EVALSHA", self._adopt.sha, 1, key_name(key, "lease"), self.lease, *leases
        )
        reply.add_done_callback(self._adopted_reply)
        self._adopting.append(reply)

    def _leave_seat(self, seat: Ticket, task: asyncio.Task[Any]) -> None:
        self.leave(seat)

    def _unseated(self, task: asyncio.Task[Any]) -> None:
        self._seats.pop(task, None)

    def _adopted_reply(self, reply: asyncio.Future[Any]) -> None:
        if reply.cancelled():
            return
        error = reply.exception()
        if isinstance(error, _NOT_ANSWERED):
            self._went_down(self._bad(error))
        elif isinstance(error, Exception) or isinstance(reply.result(), Exception):
            log.warning("redis_adopt_failed", error=str(error or reply.result()))

    def start(self) -> None:
        self._renewer = asyncio.create_task(self.renew_forever(), name="redis-lease-renewal")

    async def close(self) -> None:
        """Let the requests' last steps reach Redis (bounded), then stop the background tasks.
        Spendings still to drop (`reconcile`) are dropped by no one after this: said."""
        if self._ender is not None:
            await asyncio.wait([self._ender], timeout=2.0)
        if self._stale:
            log.warning("redis_spending_left_stale", keys=len(self._stale))
        seeds = list(self._seeds.values())
        for seed in seeds:  # (one waiting for a database that does not answer)
            seed.cancel()
        if seeds:
            await asyncio.wait(seeds, timeout=2.0)
        if self._flushing is not None:  # (its failure, a database's, is the writer's)
            self._flushing.cancel()
            await asyncio.wait([self._flushing])
        for task in (self._renewer, self._late):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.stop_probe()
        self.link.close()
        await self.redis.aclose(close_connection_pool=True)

    async def renew_forever(self) -> None:
        """Renew the leases of this replica's requests in flight, a third of a lease apart."""
        while True:
            await asyncio.sleep(self.lease / 3)
            if self.up and self._leases:
                await self.renew()

    async def renew(self) -> None:
        try:
            await renew_leases(self.redis, self._renew, self.lease, self._leases)
        except _NOT_ANSWERED as exc:
            self._went_down(self._bad(exc))

    def _bad(self, exc: BaseException) -> BaseException:
        """The error to log for `exc`; a reply of the wrong shape (a server that is not Redis,
        or replies out of step) also ends the link's connection: the next call opens another."""
        if isinstance(exc, _FAILURES) and not isinstance(exc, BadReply):
            return exc
        self.link.drop()
        return exc if isinstance(exc, BadReply) else BadReply(f"{type(exc).__name__}: {exc}")

    async def reconcile(self) -> None:
        """Before requests go through Redis again: drop the spendings that miss what this
        replica's fallback admitted, or are stale (`_stale`), once this replica's rows are
        written, so that whichever replica seeds them next reads it all from the usage
        table. Not added to the counters instead: a Redis that restarted empty may have had
        them seeded already, from a table with those rows.

        The ends Redis did not answer go first: sent after the drop, one would count on top
        of a seed that read its row. Names marked while this runs (a fallback request that
        ends meanwhile) stay marked, for `_reconcile_late`.

        Raises:
            RedisError: Redis does not take the ends or the deletion (the probe goes on).
            Unwritten: this replica's rows are not written within `RECONCILE_FLUSH_SECONDS`
                (the database slow or down): dropped now, a seed would miss them for good,
                and kept, the counters would miss them while requests go through Redis. The
                probe goes on, and so does the fallback, which counts them.
        """
        if not self._stale:
            return
        names, self._stale = self._stale, set()
        try:
            await self._flushed()
            await self._send_unsent()
            await self.redis.delete(*names)
        except _NOT_ANSWERED as exc:
            self._stale |= names
            self._bad(exc)
            raise
        except BaseException:
            self._stale |= names
            raise

    async def _flushed(self) -> None:
        """This replica's usage rows are written (within `RECONCILE_FLUSH_SECONDS`). One
        flush at a time: a try that timed out leaves its flush running, and the next try
        waits for that one (not another queued behind it on the writer's lock).

        Raises:
            Unwritten: they are not.
        """
        if self._usage is None:
            return
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.create_task(self._usage.flush())
            self._flushing.add_done_callback(mark_seen)
        try:
            await asyncio.wait_for(asyncio.shield(self._flushing), RECONCILE_FLUSH_SECONDS)
        except Exception as exc:  # (a database down or slow: tried again)
            error = f"{type(exc).__name__}: {exc}"
            if not self._unwritten_said:  # (once until the circuit closes: said, not spammed)
                self._unwritten_said = True
                log.warning("redis_reachable_rows_unwritten", error=error, fallback=self.failure)
            raise Unwritten(error) from exc

    async def _send_unsent(self) -> None:
        """Send the ends Redis did not answer, now (and wait for those on their way).

        Raises:
            RedisError: some are still not taken.
        """
        self._send_again()
        if self._ender is not None and not self._ender.done():
            await asyncio.shield(self._ender)
        if self._unsent:
            raise RedisError("Redis did not take the ends of requests sent again")

    async def _reconcile_late(self) -> None:
        """`reconcile` again, until no name is marked: those of fallback requests that
        ended while it ran (their rows written first: tried again every second)."""
        while self._stale:
            try:
                await self.reconcile()
            except _NOT_ANSWERED as exc:
                self._went_down(exc)
                return
            except Unwritten:
                pass
            if self._stale:
                await asyncio.sleep(_RECONCILE_RETRY_SECONDS)

    def came_back(self) -> None:
        self._unwritten_said = False
        self.levels.clear()  # what scripts said before the outage is stale
        self._reseat()
        if self._stale and (self._late is None or self._late.done()):  # (`_reconcile_late`)
            self._late = asyncio.create_task(self._reconcile_late())
        self._send_again()  # (ends Redis did not answer)

    # -- internals -----------------------------------------------------------------------

    def _reseat(self) -> None:
        """Redis answers again: the requests running of keys with a concurrency limit go in
        its leases, if they are not there: those the fallback admitted, those adopted while
        it was away (seated in this replica's memory only), and those whose lease lapsed
        meanwhile (their lease again: ADOPT adds only what is missing). Sent before any
        request's step that follows (the link keeps the order)."""
        running = self.running
        if running is None or not self._capped:
            return
        for key_id, requests in running(self._capped).items():
            self._seat(self._capped[key_id], requests)

    async def _run_charge(self, ticket: Ticket, likely: Amount, most: Amount) -> list[bytes]:
        key = ticket.key
        start = period_start(key.budget_period, time.time())
        answer: list[bytes] = await self.link.script(
            self._charge.sha,
            limits_lua.CHARGE,
            [
                *key_names(key, "rpm", "tpm", "lease", "held"),
                spent_name(key, start),
                key_name(key, "lapsed"),
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
        """Seed the key's spending this period from the usage table (`_seed`), waiting at
        most `seed_wait` seconds: a database that does not answer (frozen, overloaded) costs
        the request a 503 `database_busy`, not the 30 s query timeout. The seed goes on in
        the background, shared by the key's next requests, and is done once the database
        answers.

        Raises:
            StoreBusy: the database did not answer within `seed_wait` (or is down).
        """
        start = period_start(key.budget_period, time.time())
        name = spent_name(key, start)
        task = self._seeds.get(name)
        if task is None:
            task = self._seeds[name] = asyncio.create_task(self._seed(key, start, name))
            task.add_done_callback(functools.partial(self._seeded, name))
        done, _ = await asyncio.wait([task], timeout=self.seed_wait)
        if not done:
            raise StoreBusy(
                "The database did not answer in time to read the key's budget spending;"
                " try again shortly.",
                retry_after=1.0,
            )
        task.result()

    def _seeded(self, name: str, task: asyncio.Task[None]) -> None:
        if self._seeds.get(name) is task:
            del self._seeds[name]
        mark_seen(task)  # (its waiters got it; a seed nobody waits for any more: dropped)

    async def _seed(self, key: KeyRecord, start: float, name: str) -> None:
        """`_seed_spend`'s work: each of this replica's requests that ended counted once.

        The table is read while the usage writer writes nothing (`UsageRecorder.still`), so
        the read sees exactly the rows written before the block; then, with no end being
        sent (`_finishing`, held only from there to the SEED script, so a slow read never
        holds back the ends of other keys), in one step: every end sent so far found no
        counter (dropped) and its request's row is in what was read or still queued (added);
        the ends still to be sent will count in the counter, so the rows of those (read or
        queued) are taken off."""
        async with still(self._usage) as unwritten:
            tokens, usd = await self._store.spend_since(key.id, start)
            async with self._finishing:
                now = time.time()
                keys = self._keys
                late_tokens, late_usd = unwritten(key.id, start)
                to_come = [
                    t.used
                    for t in self._ending
                    if t.row
                    and t.used is not None
                    and _counted_in(t, keys.get(t.key.id), now) == name
                ]
                tokens += late_tokens - sum(used[0] for used in to_come)
                usd += late_usd - sum(used[1] for used in to_come)
                await seed_spending(self._seed_script, key, start, max(0, tokens), max(0.0, usd))

    def _end_soon(self) -> None:
        """Have the ends waiting (`_ending`, `_again`) sent: by the task under way, if any."""
        if self._ender is None or self._ender.done():
            self._ender = asyncio.create_task(self._end_all())

    def _send_again(self) -> None:
        """Send again the ends Redis did not answer (counted if not counted yet)."""
        if self._unsent:
            self._again, self._unsent = self._again + self._unsent, []
            self._end_soon()

    async def _end_all(self) -> None:
        """Send the end of every request that ended meanwhile, together: under load, many
        requests share one round trip."""
        while self._ending or self._again:
            async with self._finishing:
                batch, self._ending = self._ending, []
                again, self._again = self._again, []
                now = time.time()
                keys = self._keys
                calls = [_finish_call(ticket, keys.get(ticket.key.id), now) for ticket in batch]
                if again:
                    calls += [_finish_call(t, keys.get(t.key.id), now, again=True) for t in again]
                try:
                    await self.link.scripts(self._finish.sha, limits_lua.FINISH, calls)
                except _FAILURES as exc:  # sent again when Redis answers (or their leases end)
                    self._went_down(exc)
                    unsent = self._unsent
                    unsent += again
                    unsent += batch
                    if len(unsent) > _MAX_UNSENT:  # the oldest: their holds go with their leases
                        del unsent[: len(unsent) - _MAX_UNSENT]


def _finish_call(
    ticket: Ticket, current: KeyRecord | None, now: float, *, again: bool = False
) -> tuple[list[str], list[Arg]]:
    """FINISH's keys and arguments for a request that ended (see `limits_lua.FINISH`).

    What it used counts in the period of the key's `current` record (its budget may have
    been given or changed while it ran; the spending of a period seeded meanwhile was read
    from the usage table before this request's row was in it)."""
    key = ticket.key
    used = ticket.used or (0, 0.0)
    spent = _counted_in(ticket, current, now)
    charged = "1" if ticket.used is not None else "0"
    tpm = (key.tpm or 0) if ticket.limited else 0
    args: list[Arg] = [ticket.lease or "", tpm, ticket.tokens, used[0], repr(used[1])]
    keys = [*key_names(key, "tpm", "lease", "held"), spent, key_name(key, "lapsed")]
    return keys, [*args, charged, int(again)]


def _counted_in(ticket: Ticket, current: KeyRecord | None, now: float) -> str:
    """The spending (Redis key) a request that ends now counts in (`_finish_call`)."""
    return spent_name(ticket.key, period_start((current or ticket.key).budget_period, now))


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
