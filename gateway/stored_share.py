"""What an upstream stores for each key (`gateway.stored`), shared through the database by
every worker and replica on it, and kept across restarts.

A process remembers in memory which key's answer showed each id. Alone, that leaves the
refusal of another key's id to the process that saw the answer: with `--workers`, replicas or
after a restart, another key's request naming it was relayed, and the upstream (one account
for every key) gave it that key's stored data. Now:

- What a process learns goes into a journal (`StoredResponses.journal`) that a background task
  writes every `usage_flush_seconds`, off the request path, in one statement per batch. The
  first key that showed an id keeps it (as in memory); an id two keys' own responses showed is
  no one's.
- A request that names an id its process has never known, and is relayed as it is, looks it
  up in the database once the key may use the model (one query per `LOOKUP_AT_ONCE` ids, only
  then); what it finds is remembered here, and the request is refused if the id is another
  key's. A process that knows an id asks nothing.
- An id is kept `KEEP_DAYS` after it was last written (shown, used again on a later day, its
  size learned, contested), then forgotten and relayed if named again, as the upstreams keep
  a stored response for 30 days.

An id shown by one process in the last `usage_flush_seconds` is not yet in the database: named
by another key on another process meanwhile, it is relayed. A lookup that fails or is late
(`LOOKUP_SECONDS`) is logged and refused with a 503 to try again, never relayed unchecked (a
key flooding the database must not make another key's lookups late: one key's lookups run
`MOST_PER_KEY` at once, late ones included, the others waiting; a request naming only ids
this process holds outside memory, to write or written by it, is decided by those while the
database is down); failed writes are kept and written when the database is back (tried again
backing off, up to `MOST_RETRY_SECONDS` apart), at most as many ids as memory holds (past it
the oldest are dropped, and logged). docs/keys.md, "Stored ids across processes", is the
reference.
"""

from __future__ import annotations

import asyncio
import contextvars
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol, TypeVar

import structlog

from gateway.background import mark_seen
from gateway.errors import StoreBusy
from gateway.flushing import Flushing
from gateway.stored import (
    MOST_LOOKED_UP,
    SHARED_CONTESTED,
    Naming,
    StoredResponses,
    refusal,
    too_many,
)

__all__ = [
    "EXPORT_STORED",
    "FILES_SQL",
    "FORGET_SQL",
    "KEEP_DAYS",
    "LOOKUP_AT_ONCE",
    "LOOKUP_SECONDS",
    "MOST_LOOKED_UP",
    "MOST_RETRY_SECONDS",
    "SELECT_STORED",
    "StoredRow",
    "StoredShare",
    "StoredSink",
    "upsert_sql",
]

log = structlog.get_logger(__name__)

T = TypeVar("T")

KEEP_DAYS = 30
# Ids looked up in one query (a request names a few; a file search at most its candidates).
LOOKUP_AT_ONCE = 1000
# The longest a request waits for the database's answers (past it: a 503 to retry, logged).
LOOKUP_SECONDS = 2.0
# Lookups left running past their deadline, at most: past it a lookup of a key that has
# late ones of its own fails at once (the database hangs; every request would leave one
# more). A key with none still starts one: a few keys' late lookups must not refuse others'.
MOST_LATE = 64
# One key's lookups running at once, late ones included (more wait their turn, within their
# deadline): lookups run before admission, so a key's rate limit does not bound them, and a
# key flooding the database must take its own turns, not other keys'. As many as a busy key
# continuing its users' conversations on a worker that never saw them asks at once.
MOST_PER_KEY = 16
# The longest wait between two tries of a failing write: each try hands the database the
# whole journal (up to 100,000 ids: about 45 ms of the loop to sort and put back), so the
# tries back off, doubling from `usage_flush_seconds`, while it fails; at the ticks between,
# a cheap question notices when the database is back, and the write is tried at once.
MOST_RETRY_SECONDS = 8.0
# How often the task forgets what is older than KEEP_DAYS.
_FORGET_EVERY_SECONDS = 3600.0

# (id, owner, tokens, a file (0/1), unix time written)
StoredRow = tuple[str, str, int, int, float]


def upsert_sql(marks: tuple[str, str, str, str, str]) -> str:
    """The write of one id, in a backend's placeholders: the first owner stays; an owner of
    "*" (contested) wins; a response's size is set by its owner only."""
    return (  # noqa: S608 - placeholders only, the values are bound
        "INSERT INTO stored_ids (id, owner, tokens, file, seen) VALUES ({}, {}, {}, {}, {})"
        " ON CONFLICT (id) DO UPDATE SET"
        " owner = CASE WHEN excluded.owner = '*' THEN '*' ELSE stored_ids.owner END,"
        " tokens = CASE WHEN stored_ids.owner = excluded.owner AND excluded.tokens >= 0"
        " THEN excluded.tokens ELSE stored_ids.tokens END,"
        " file = CASE WHEN excluded.file = 1 THEN 1 ELSE stored_ids.file END,"
        " seen = CASE WHEN stored_ids.owner = excluded.owner THEN excluded.seen"
        " ELSE stored_ids.seen END"
    ).format(*marks)


FORGET_SQL = "DELETE FROM stored_ids WHERE seen < {}"
SELECT_STORED = "SELECT id, owner, tokens, file, seen FROM stored_ids"
EXPORT_STORED = f"{SELECT_STORED} ORDER BY id"
FILES_SQL = "SELECT 1 FROM stored_ids WHERE file = 1 LIMIT 1"


class StoredSink(Protocol):
    """The database's side (`gateway.store.Store`, `gateway.pg_store.PgStore`)."""

    async def keep_stored(self, rows: Sequence[StoredRow]) -> Sequence[StoredRow] | None:
        """Write `rows`; the rows the database kept of them (None: as written)."""

    async def stored_owners(self, ids: Sequence[str]) -> list[StoredRow]: ...
    async def forget_stored(self, before: float) -> None: ...
    async def stored_files(self) -> bool: ...


class StoredShare(Flushing):
    """Writes `known`'s journal to `store` every `flush_seconds`, and looks up the ids a
    request names that `known` has never held."""

    task_name = "stored-ids-share"
    failed_event = "stored_ids_write_failed"
    lost_event = "stored_ids_lost_at_stop"

    def __init__(self, store: StoredSink, known: StoredResponses, *, flush_seconds: float):
        super().__init__(flush_seconds=flush_seconds)
        self._store = store
        self._known = known
        known.journal = OrderedDict()  # (its oldest dropped past the bound: `_bound_journal`)
        known.today = _today
        # When the task last forgot old ids (monotonic): first a minute after the start, not
        # at once (a write at every start, beside other processes' that start with it).
        self._clock: Callable[[], float] = time.monotonic
        self._forgot = self._clock() - _FORGET_EVERY_SECONDS + 60.0
        self._files_asking: asyncio.Task[bool] | None = None  # the question in flight
        self._late: set[asyncio.Future[Any]] = set()  # lookups past their deadline, running
        # Each key's turns (`MOST_PER_KEY`), and how many of its lookups hold or want one.
        self._turns: dict[str, asyncio.Semaphore] = {}
        self._turn_users: dict[str, int] = {}
        self._late_keys: dict[str, int] = {}  # each key's late lookups
        self._files_failing = False  # the last question failed (logged once)
        self._dropped = 0  # `known.unshared` when it was last logged
        self.failing = False  # the last write failed
        self._failures = 0  # writes in a row that failed
        self._retry_at = 0.0  # the next write's earliest time while they fail (`_clock`)

    @property
    def pending(self) -> int:
        """The ids not written yet: in the journal, and in the batch being written."""
        known = self._known
        return len(known.writing) + (0 if known.journal is None else len(known.journal))

    def deadline(self) -> float:
        """When a request's questions to the database must be answered (the loop's clock):
        `LOOKUP_SECONDS` from now."""
        return asyncio.get_running_loop().time() + LOOKUP_SECONDS

    async def resolve(self, named: Naming, key_id: str | None, deadline: float) -> bool:
        """Look the ids a request of `key_id` names and this process never knew
        (`named.unresolved`) up in the database, answered by `deadline` (`deadline()`);
        whether one is now known here (the request's names are then read again).

        Raises:
            NotFound: one is another key's (decided by the rows found, not by what memory
                holds after them: adopting may forget one in a full map).
            InvalidRequest: more than `MOST_LOOKED_UP` ids (each must be looked at: one left
                out could be another key's).
            StoreBusy: the lookup failed or was late (logged): a 503 to try again.
        """
        wanted = list(dict.fromkeys(stored_id for stored_id, *_ in named.unresolved))
        if len(wanted) > MOST_LOOKED_UP:
            raise too_many(len(wanted))
        turn: _Turn | None = None
        asked: list[str] = []
        found: list[StoredRow] = []
        held: list[StoredRow] = []
        others: set[str] = set()
        try:
            try:
                turn = await self._turn(key_id or "", deadline)
                # Those another lookup adopted while this one waited are decided by memory,
                # now (adopting what the query finds may forget them from a full map).
                known = self._known
                asked = [stored_id for stored_id in wanted if stored_id not in known]
                others = {i for i in wanted if i in known and known.others(i, key_id)}
                # What this process holds outside memory, taken before the query: a batch
                # written while it runs is in what it reads or in this.
                held = self._held(asked)
                if asked:
                    found = await self._within(self._owners(asked), deadline, turn)
            except Exception as exc:
                if not asked or len(held) < len(asked):
                    # Refused, not relayed: a key that floods the database with lookups
                    # (they run before admission) must not make another key's late, and so
                    # relayed.
                    log.warning(
                        "stored_ids_lookup_failed", error=type(exc).__name__, ids=len(wanted)
                    )
                    raise StoreBusy(
                        "The ids of stored responses, items, containers or files this request "
                        "names could not be checked (the database did not answer in time); "
                        "try again shortly.",
                        retry_after=1.0,
                    ) from None
                # (Each held here to write, as the answer that showed it said: decided by that,
                # as memory would, rather than refused while the database is down.)
                found = held
            have = {row[0] for row in found}
            found += [row for row in held if row[0] not in have]
            self._known.adopt(found)
        finally:
            # (After the adoption: a lookup waiting for this turn asks nothing it found. A
            # late one's is given back when its query ends.)
            if turn is not None and not turn.late:
                turn.release()
        owners = {row[0]: row[1] for row in found}
        for stored_id, param, kind, code in named.unresolved:  # (the first named, as memory)
            owner = owners.get(stored_id)
            if owner is None:  # (not asked: another lookup adopted it; memory decided)
                if stored_id in others:
                    raise refusal(stored_id, param, kind, code)
            elif owner != SHARED_CONTESTED and (owner or None) != key_id:
                raise refusal(stored_id, param, kind, code)
        # (Known now, by this lookup or by another request's that ended while it waited.)
        return any(stored_id in self._known for stored_id in wanted)

    def _held(self, asked: list[str]) -> list[StoredRow]:
        """The rows of `asked` ids this process holds outside memory (its journal, the batch
        being written, or what it wrote, `StoredResponses.held`: ids past an answer's first
        `MOST_IDS_AN_ANSWER`, or forgotten here meanwhile)."""
        known = self._known
        now = time.time()
        rows: list[StoredRow] = []
        for stored_id in asked:
            held = known.held(stored_id)
            if held is not None:
                # (One written on an earlier day keeps that day: named again, it is written
                # again, as one the database gave.)
                day = known.written_day(stored_id)
                seen = now if day is None else day * 86400.0
                rows.append((stored_id, held[0], held[1], int(held[2]), seen))
        return rows

    async def _turn(self, key: str, deadline: float) -> _Turn:
        """One of `key`'s `MOST_PER_KEY` turns, waited for until `deadline` (TimeoutError),
        given back once its lookup ends (`_Turn.release`; by the query, when late)."""
        turns = self._turns.get(key)
        if turns is None:
            turns = self._turns[key] = asyncio.Semaphore(MOST_PER_KEY)
        self._turn_users[key] = self._turn_users.get(key, 0) + 1
        try:
            async with asyncio.timeout_at(deadline):
                await turns.acquire()
        except BaseException:
            self._leave(key)
            raise
        return _Turn(self, key, turns)

    def _leave(self, key: str) -> None:
        if not _count_down(self._turn_users, key):  # (none of its lookups holds or waits)
            del self._turns[key]

    async def _owners(self, wanted: list[str]) -> list[StoredRow]:
        found: list[StoredRow] = []
        for start in range(0, len(wanted), LOOKUP_AT_ONCE):
            found += await self._store.stored_owners(wanted[start : start + LOOKUP_AT_ONCE])
        return found

    async def _within(
        self, asking: Coroutine[Any, Any, T], deadline: float, turn: _Turn | None = None
    ) -> T:
        """`asking`'s answer by `deadline`. It runs as a task of its own, left to
        end on its own when late: a cancelled asyncpg query waits, in the task that cancels
        it, for its cancel request (up to `command_timeout`, on a hung network), which must
        not hold a request. Past `MOST_LATE` such tasks none is started for a key with late
        ones of its own (`turn`'s), nor for no key. A late one keeps `turn` until it ends.

        Raises:
            TimeoutError: late, or too many late already.
            Exception: what `asking` raised.
        """
        left = deadline - asyncio.get_running_loop().time()
        late = self._late
        if left <= 0 or (
            len(late) >= MOST_LATE and (turn is None or self._late_keys.get(turn.key))
        ):
            asking.close()
            raise TimeoutError
        task = asyncio.ensure_future(asking)
        task.add_done_callback(mark_seen)  # (a late one's failure is no one's to report)
        try:
            done, _ = await asyncio.wait({task}, timeout=left)
        finally:
            if not task.done():  # (late, or its request gone: it ends on its own, held here)
                late.add(task)
                task.add_done_callback(late.discard)
                if turn is not None:
                    turn.went_late(task)
        if not done:
            raise TimeoutError
        return task.result()

    def retry_seconds(self, failures: int) -> float:
        """The least time from a failed write to the next (`failures` in a row):
        `flush_seconds`, doubled for each, at most `MOST_RETRY_SECONDS` (never less than
        `flush_seconds`)."""
        flush = self._flush_seconds
        return max(flush, min(flush * 2.0 ** min(failures - 1, 32), MOST_RETRY_SECONDS))

    async def flush(self) -> None:
        """Write the journal; on failure it is kept (newer states of the same ids win) and it
        raises."""
        async with self._lock:
            journal = self._known.journal
            if not journal:
                return
            self._known.journal = OrderedDict()
            now = time.time()
            rows = sorted(  # in id order: two replicas' batches cannot deadlock
                (stored_id, owner, tokens, int(file), now)
                for stored_id, (owner, tokens, file) in journal.items()
            )
            self._known.writing = journal  # (found by lookups until it is in the database)
            try:
                kept = await self._store.keep_stored(rows)
            except BaseException:
                self._known.writing = {}
                self._known.take_back(journal)
                self.failing = True
                self._failures += 1
                self._retry_at = self._clock() + self.retry_seconds(self._failures)
                raise
            self._known.writing = {}
            self.failing = False
            self._failures = 0
            self._known.written(
                journal, {row[0]: (row[1], row[2], row[3] == 1) for row in kept or ()}
            )

    async def start(self) -> None:
        await self.files_seen()
        await super().start()

    async def stop(self) -> None:
        """`Flushing.stop`, and the questions still running (late, or in flight) ended."""
        await super().stop()
        running = {*self._late, *filter(None, [self._files_asking])}
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=LOOKUP_SECONDS)

    async def files_seen(self) -> bool:
        """Whether any process on the database saw a file an upstream's code wrote (here,
        `StoredResponses.files`), which turns on the search of requests for files: asked at
        the start, then by each request that names a file while none is known here
        (`handlers.messages`); a lookup that finds a file turns it on too
        (`StoredResponses.adopt`). The requests in flight share one question; one that fails
        (or takes `LOOKUP_SECONDS`) answers yes (the request is searched, what it names looked
        up), and while it fails requests get that yes at once, the question asked again
        meanwhile. The outage is logged once (`stored_files_lookup_failed`, then
        `stored_files_lookup_recovered`)."""
        if self._known.files:
            return True
        asking = self._files_asking
        if asking is None:
            # (A task of no request's: its log lines name none.)
            loop = asyncio.get_running_loop()
            asking = loop.create_task(self._ask_for_files(), context=contextvars.Context())
            self._files_asking = asking
        if self._files_failing:
            return True  # (while it fails: yes at once, the question asked again meanwhile)
        return await asyncio.shield(asking)  # (a request that ends leaves it to the others)

    async def _ask_for_files(self) -> bool:
        try:
            found = await self._within(self._store.stored_files(), self.deadline())
        except Exception as exc:
            if not self._files_failing:
                self._files_failing = True
                log.warning("stored_files_lookup_failed", error=type(exc).__name__)
            return True
        finally:
            self._files_asking = None
        if self._files_failing:
            self._files_failing = False
            log.info("stored_files_lookup_recovered")
        if found:
            self._known.files = True  # (never off: this process may have seen one meanwhile)
        return self._known.files

    async def tick(self) -> None:
        """Write the journal; forget old ids hourly. While writes fail, the whole journal is
        handed over at most every `retry_seconds` (each try sorts and puts back up to
        100,000 ids on the loop); at the ticks between, a cheap question asks whether the
        database is back, and once it answers the write is tried at once."""
        try:
            if self.failing and self._clock() < self._retry_at:
                await self._store.stored_files()  # (raises while the database is down)
            await self.flush()
        finally:
            if self._known.unshared > self._dropped:
                self._dropped = self._known.unshared
                log.error("stored_ids_dropped", dropped=self._dropped)
        now = self._clock()
        if now - self._forgot >= _FORGET_EVERY_SECONDS:
            self._forgot = now
            try:
                await self._store.forget_stored(time.time() - KEEP_DAYS * 86400.0)
            except Exception as exc:  # (tried again in an hour; the writes go on)
                log.warning("stored_ids_forget_failed", error=type(exc).__name__)


def _today() -> int:
    return int(time.time() // 86400.0)


class _Turn:
    """One of a key's turns (`StoredShare._turn`), given back once: by the lookup that took
    it, or, left late, when its query ends."""

    __slots__ = ("_given", "_share", "_turns", "key", "late")

    def __init__(self, share: StoredShare, key: str, turns: asyncio.Semaphore) -> None:
        self._share = share
        self._turns = turns
        self._given = False
        self.key = key
        self.late = False  # its query runs on past the deadline

    def release(self) -> None:
        if not self._given:
            self._given = True
            self._turns.release()
            self._share._leave(self.key)

    def went_late(self, task: asyncio.Future[Any]) -> None:
        """Its lookup's query, `task`, runs on past the deadline: counted among its key's late
        ones, and the turn given back when it ends."""
        self.late = True
        keys = self._share._late_keys
        keys[self.key] = keys.get(self.key, 0) + 1
        task.add_done_callback(self._ended_late)

    def _ended_late(self, task: asyncio.Future[Any]) -> None:
        _count_down(self._share._late_keys, self.key)
        self.release()


def _count_down(counts: dict[str, int], key: str) -> int:
    """One fewer of `key` in `counts` (gone at none); how many are left."""
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]
    return left
