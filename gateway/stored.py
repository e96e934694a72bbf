"""What an upstream stores for a key (the Responses API's `store`, on by default) that passed
through this gateway: whose key's it is, and how large a prompt a request continuing a stored
response (`previous_response_id`) sends again.

An upstream resolves what it stored by id for every request of its account, and every key of
a model's pass-through shares that account. So a response, an output item (an
`item_reference`, or an item sent back by its id), a code interpreter container or a
conversation whose id came back in one key's answer is that key's data: for another key it is
not found (404), and nothing goes upstream. What one process learns is shared through the
database (`gateway.stored_share`) with every worker and replica on it, and kept across
restarts; an id the database does not hold either (made outside the gateway, or forgotten) is
relayed, as documented.

The prompt a continuation sends is billed by the upstream but never seen here: the stored
conversation, which is the earlier response's input and output. Admission holds its size for a
response known here with its usage (`prompt`), and a stated size for one not known (or known
without usage: a `background` one), as for a file sent by id.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable

from gateway.errors import InvalidRequest, NotFound
from gateway.media import FILE_BY_ID, Estimate

__all__ = [
    "LONGEST_ID",
    "MOST_IDS_AN_ANSWER",
    "MOST_LOOKED_UP",
    "MOST_REMEMBERED",
    "MOST_SHARED_AN_ANSWER",
    "SHARED_CONTESTED",
    "UNKNOWN_CONVERSATION",
    "Naming",
    "SharedId",
    "Shown",
    "StoredResponses",
    "refusal",
    "shareable",
    "too_many",
]

# What a stored conversation not known here is held as: as a file sent by id (a few turns
# likely, a long conversation at most).
UNKNOWN_CONVERSATION = FILE_BY_ID
# Ids remembered at once, of every kind (about 200 bytes each); past it the oldest of the key
# with the largest share are forgotten, and relayed (a response held as unknown) if named
# again.
MOST_REMEMBERED = 100_000
# The longest id remembered (OpenAI's are about 50 characters): a longer one, from a hostile
# upstream, would make the map cost its length each; it is not remembered.
LONGEST_ID = 256
# The most ids of one answer remembered in memory besides its response's (its output items,
# containers, conversation): an answer of thousands of items must not push every other key's
# ids out. The ones after those, up to `MOST_SHARED_AN_ANSWER` in all, go to the database
# first (`Shown.spilled`), where every process's lookup finds them (this process's decides
# them by what it wrote while the database is down, `StoredResponses.written`).
MOST_IDS_AN_ANSWER = 256
MOST_SHARED_AN_ANSWER = 10_000
# The most ids not known here one request may name (as many as a Responses request's input
# items): a 10 MB body of file ids must not cost the database hundreds of queries.
MOST_LOOKED_UP = 10_000

_UNSIZED = -1  # a response known without its usage: held as unknown when continued
# An id's owner in the database: a key's id, "" for requests without a key, or this for an
# id two keys' own answers showed (`_CONTESTED`).
SHARED_CONTESTED = "*"
# An id's (owner, tokens, whether a file an upstream's code wrote) as the database holds it.
SharedId = tuple[str, int, bool]
# The owner of an id two keys' own answers showed: no one's (`StoredResponses.own`). No key
# id can be it (theirs are `key_` and hex).
_CONTESTED = "\x00contested"


def _key_of(owner: str) -> str | None:
    """The key memory holds an id as, for a database row's `owner` (`_share` maps the other
    way): no one's for "*", no key for ""."""
    return _CONTESTED if owner == SHARED_CONTESTED else owner or None


def shareable(stored_id: str) -> bool:
    """Whether the database may hold `stored_id`: ASCII without a NUL (PostgreSQL's text
    cannot hold one; no real upstream sends either), at most `LONGEST_ID` long. Another id is
    this process's only, and never looked up (its lookup would fail every id beside it)."""
    return stored_id.isascii() and "\x00" not in stored_id and len(stored_id) <= LONGEST_ID


def too_many(count: int) -> InvalidRequest:
    """The 400 for a request naming more than `MOST_LOOKED_UP` ids not known here: each must
    be looked at (one left out could be another key's), and that many is no real request."""
    return InvalidRequest(
        f"The request names {count} ids of stored responses, items, containers or files "
        f"that this gateway has not seen; at most {MOST_LOOKED_UP} are accepted in one "
        "request.",
        code="too_many_stored_ids",
    )


def refusal(stored_id: str, param: str, kind: str, code: str | None) -> NotFound:
    """The 404 for a request naming `stored_id`, another key's, as its `param`."""
    return NotFound(
        f"{kind} with id '{stored_id[:100]}' not found.",
        param=param,
        code=code or f"{kind.lower()}_not_found",
    )


class Naming:
    """The ids of what the upstream stores that a request names, and whether one of them is
    not known here: its answer may echo them, or show what their context holds, which the
    request's key does not get as its own (`handlers.responses`, `handlers.messages`)."""

    __slots__ = ("ids", "unknown", "unresolved")

    def __init__(self) -> None:
        self.ids: set[str] = set()
        self.unknown = False
        # The ids named that this process has never known, each with how its refusal names
        # it (`refusal`): the database may know them (`StoredShare.resolve`).
        self.unresolved: list[tuple[str, str, str, str | None]] = []

    def name(
        self,
        known: StoredResponses,
        key_id: str | None,
        stored_id: object,
        param: str,
        kind: str = "Conversation",
        code: str | None = None,
    ) -> None:
        """Add `stored_id` (if an id) to what the request names (`StoredResponses.use`: the
        key's own goes last).

        Raises:
            NotFound: naming `param`, if `stored_id` is known to be another key's: what the
                upstream stored for that key, which it would resolve for this one.
        """
        if type(stored_id) is not str:
            return
        others = known.use(stored_id, key_id)
        if others:
            raise refusal(stored_id, param, kind, code)
        if others is None:
            self.unknown = True
            if stored_id not in known and shareable(stored_id):
                self.unresolved.append((stored_id, param, kind, code))
        self.ids.add(stored_id)


class Shown:
    """The ids an answer showed of what the upstream stores for its request (besides its
    response's): those made for it (its output items) and those it may share with other
    requests (`contexts`: a container, a conversation), at most `MOST_IDS_AN_ANSWER` in all,
    in the order shown; then, up to `MOST_SHARED_AN_ANSWER` in all, the others that the
    database can hold (`spilled`: each an id and whether it is a context, taken away as they
    are remembered there, `passthrough.Remembering`: a stream of thousands holds none)."""

    __slots__ = ("_marks", "contexts", "items", "spilled")

    def __init__(self) -> None:
        self.items: list[str] = []
        self.contexts: list[str] = []
        self.spilled: list[tuple[str, bool]] = []
        # The hash of each id taken (with whether it is a context), so an id is taken once
        # (a stream shows each item twice: added, done) at the cost of one look, however
        # many an answer repeats; numbers, not the ids.
        self._marks: set[int] = set()

    def add(self, found: object, *, context: bool = False) -> None:
        """Keep `found` if it is an id (an id too long to remember is not kept either: a
        hostile upstream's megabyte ids would be held until the request ends)."""
        if type(found) is not str or not 0 < len(found) <= LONGEST_ID:
            return
        marks = self._marks
        if len(marks) >= MOST_SHARED_AN_ANSWER:
            return  # (past every cap: an answer of millions of items costs little each)
        mark = hash(found) * 2 + context
        if mark in marks:
            return
        marks.add(mark)
        if len(marks) <= MOST_IDS_AN_ANSWER:
            (self.contexts if context else self.items).append(found)
        else:
            self.spilled.append((found, context))


class StoredResponses:
    """Id -> (its key's id, the tokens of a response's input and output, or `_UNSIZED`).

    Past `most` ids, one is forgotten from the key with the largest share (the key adding
    one, when its share is at least the average): each key's oldest first, so one key's
    traffic (a flood of answers of many items) forgets its own ids, not another key's. The
    keys are kept by their number of ids, so the largest share is found at once, however
    many keys there are."""

    __slots__ = (
        "_by_count",
        "_by_key",
        "_known",
        "_most",
        "_top",
        "_wrote",
        "files",
        "journal",
        "today",
        "unshared",
        "unspilled",
        "writing",
    )

    def __init__(self, most: int = MOST_REMEMBERED) -> None:
        # Whether a file an upstream's code wrote was ever remembered (here, or by another
        # process on the database): until then, requests are not searched for files they
        # name (`handlers.messages`).
        self.files = False
        # What to write to the database (`StoredShare`): id -> (owner, tokens, a file), at
        # most `most` of them; None: nothing is shared (no database).
        self.journal: dict[str, SharedId] | None = None
        # The journal's batch being written (`StoredShare.flush`), not in the database yet.
        self.writing: dict[str, SharedId] = {}
        self.unshared = 0  # ids dropped from a full journal (the database was failing)
        self.unspilled = 0  # ids past an answer's first not journaled (`share`)
        # Today, in days since the epoch (`StoredShare`'s clock): an id a key uses or shows
        # again is journaled once a day, so the database keeps what is in use (`KEEP_DAYS`).
        self.today: Callable[[], int] = lambda: 0
        # id -> (its key's id, a response's tokens, the `day` it was last journaled)
        self._known: dict[str, tuple[str | None, int, int]] = {}
        # Each key's ids, oldest first, and the keys holding N ids. (Ordered dicts: a plain
        # dict's first item is found past every one deleted before it, so forgetting the
        # oldest, one at a time, would cost the square of their number.)
        self._by_key: dict[str | None, OrderedDict[str, None]] = {}
        self._by_count: dict[int, OrderedDict[str | None, None]] = {}
        self._top = 0  # the most ids a key holds
        self._most = most
        # What this process wrote of ids memory does not hold (`written`), oldest first,
        # each with the day it was written.
        self._wrote: OrderedDict[str, tuple[SharedId, int]] = OrderedDict()

    def remember(self, response_id: str, key_id: str | None, tokens: int | None) -> bool:
        """A response relayed for `key_id`, whose prompt and output took `tokens` (None: not
        known, or not yet: a `background` answer, a stream under way); whether it is that
        key's. An id already known keeps its first key: an upstream that answers another key
        with it (the same id again) neither takes the conversation from its key nor gives it
        away."""
        return self._keep(response_id, key_id, _UNSIZED if tokens is None else tokens)

    def own(
        self, ids: Iterable[str], key_id: str | None, *, contest: bool = False, files: bool = False
    ) -> None:
        """Ids other than a response's that an answer to `key_id` held (output items,
        containers, a conversation): another key's request that names one is refused.

        With `contest` (the answer is a response of this key's own), an id another key's
        answer showed too is no one's from then on, and relayed for every key: an upstream
        that numbers each response's items anew (`rs_1` in every one) resolves no item by
        its id alone, and such ids must not lock a key out of its own items. (Without it,
        an answer that is another key's response again, an echo, takes nothing.) `files`:
        the ids are files the upstream's code wrote."""
        for stored_id in ids:
            self._keep(stored_id, key_id, _UNSIZED, contest=contest, file=files)

    def share(
        self, ids: Iterable[str], key_id: str | None, *, contest: bool = False, files: bool = False
    ) -> None:
        """`own`, for ids past an answer's first `MOST_IDS_AN_ANSWER` (`Shown.spilled`): one
        known here is kept as `own` keeps it; another goes to the database first (the journal),
        where a lookup finds it, so an answer of thousands of items forgets nothing here (once
        written, `written` holds what it wrote). One held here keeps its first key, as memory
        does (contested as `own` contests; shown again by its key on a later day, written
        again). Not while half the journal's bound waits to be written (the database failing,
        or a flood of such answers): they must not push out what other answers showed
        (`unspilled`)."""
        known = self._known
        journal = self.journal
        if journal is None:
            return
        today = self.today()
        for stored_id in ids:
            if stored_id in known or not shareable(stored_id):  # (the latter: memory only)
                self._keep(stored_id, key_id, _UNSIZED, contest=contest, file=files)
                continue
            held = self.held(stored_id)
            file = files
            if held is not None:
                owner = _key_of(held[0])
                file = files or held[2]
                if contest and owner not in (key_id, _CONTESTED):
                    self._share(stored_id, _CONTESTED, _UNSIZED, file)
                    continue
                if owner != key_id or self.written_day(stored_id) in (None, today):
                    continue  # (its first key's; or to be written, or written today)
                # (Shown again by its key on a later day: written again, so the database
                # keeps what is in use, as memory's ids are; within the same bound as a new
                # one, else tried again when shown next.)
            if len(journal) + len(self.writing) < self._most // 2:
                self._share(stored_id, key_id, _UNSIZED, file)
            else:
                self.unspilled += 1

    def written(self, batch: dict[str, SharedId], kept: dict[str, SharedId]) -> None:
        """A journal batch now in the database (`StoredShare.flush`), which `kept` what it
        names of each id (its first owner stays, with that owner's size; one it does not
        name: as written): what it holds of the ids memory does not hold (past an answer's
        first `MOST_IDS_AN_ANSWER`, or forgotten here meanwhile) stays held (`held`), at
        most `most // 2` of them (the oldest let go), so the process that showed them
        decides them itself while the database is down, as a lookup would, and contests them
        as memory does. Never in memory: an answer of thousands of items must not forget its
        key's other ids (the lookup that adopts them is a request's)."""
        known = self._known
        journal = self.journal or {}
        wrote = self._wrote
        today = self.today()
        for stored_id, row in batch.items():
            if stored_id in known:
                wrote.pop(stored_id, None)
            elif stored_id not in journal:  # (else noted again since: that batch decides it)
                wrote[stored_id] = (kept.get(stored_id, row), today)
                wrote.move_to_end(stored_id)  # (its newest state goes last)
        while len(wrote) > self._most // 2:
            wrote.popitem(last=False)

    def adopt(self, rows: Iterable[tuple[str, str, int, int, float]]) -> None:
        """Ids another process (or this one before a restart) wrote to the database
        (`StoredShare.resolve`): (id, owner, tokens, a file, unix time written). One known
        here already keeps what is known; one written today is not written again today."""
        for stored_id, owner, tokens, file, seen in rows:
            self.files = self.files or file == 1
            if stored_id not in self._known:
                self._keep(stored_id, _key_of(owner), tokens, share=False, day=int(seen // 86400.0))

    def __contains__(self, stored_id: str) -> bool:
        return stored_id in self._known

    @property
    def most(self) -> int:
        """The most ids remembered, and held for the database while it fails."""
        return self._most

    def _keep(
        self,
        stored_id: str,
        key_id: str | None,
        tokens: int,
        *,
        contest: bool = False,
        file: bool = False,
        share: bool = True,
        day: int = -1,
    ) -> bool:
        if len(stored_id) > LONGEST_ID:
            return False
        known = self._known
        found = known.get(stored_id)
        if found is not None and found[0] == _CONTESTED:
            return False
        if found is not None and found[0] != key_id:
            if contest:
                self._drop(stored_id, found[0])
                self._keep(stored_id, _CONTESTED, _UNSIZED)
            return False
        if found is not None:
            day = found[2]
            if tokens == _UNSIZED:
                tokens = found[1]  # (a response's usage came with an earlier answer: kept)
            journaled = False
            if share and self.journal is not None:
                today = self.today()
                if tokens != found[1] or day != today:
                    journaled = True
                    day = today
            known[stored_id] = (key_id, tokens, day)
            self._by_key[key_id].move_to_end(stored_id)  # (an id seen again goes last)
            if journaled:  # (last: a full journal may move an id it drops into memory,
                # which may forget this one from a full map)
                self._share(stored_id, key_id, tokens, file)
            return True
        held = self.held(stored_id) if share and key_id != _CONTESTED else None
        if held is not None and (owner := _key_of(held[0])) != key_id:
            # (Held to write, forgotten here: it keeps its first key, or no one's; a contest
            # wins over what is held.)
            if contest and owner != _CONTESTED:
                self._share(stored_id, _CONTESTED, _UNSIZED, file)
            return False
        if len(known) >= self._most:
            self._forget_one(key_id)
        # (One the database gave keeps the day it was written: used on a later day, its row
        # is written again.)
        known[stored_id] = (key_id, tokens, self.today() if share else day)
        ids = self._by_key.get(key_id)
        if ids is None:
            ids = self._by_key[key_id] = OrderedDict()
        self._recount(key_id, len(ids), len(ids) + 1)
        ids[stored_id] = None
        if share:
            self._share(stored_id, key_id, tokens, file)
        return True

    def _share(self, stored_id: str, key_id: str | None, tokens: int, file: bool) -> None:
        """Put what is now known of `stored_id` in the journal the database gets. An id no
        upstream of a real API sends (not ASCII, or with a NUL, which PostgreSQL's text
        cannot hold) stays this process's: it must not fail a batch."""
        journal = self.journal
        if journal is None or not shareable(stored_id):
            return
        owner = SHARED_CONTESTED if key_id == _CONTESTED else key_id or ""
        if stored_id in journal:
            file = file or journal.pop(stored_id)[2]  # (its newest state goes last)
        journal[stored_id] = (owner, tokens, file)
        self._bound_journal(journal)

    def take_back(self, batch: dict[str, SharedId]) -> None:
        """A journal batch the database did not take (`StoredShare.flush`), put back before
        what was noted since (which is newer), within the bound."""
        newer = self.journal or {}
        batch.update(newer)
        for stored_id in newer:  # (their newest state goes last)
            batch[stored_id] = batch.pop(stored_id)
        self.journal = batch
        self._bound_journal(batch)

    def _bound_journal(self, journal: dict[str, SharedId]) -> None:
        """At most `most` ids held for the database: the oldest dropped (`unshared`). One
        memory does not hold (past its answer's first ids, `share`) goes to memory: this
        process still refuses it."""
        while len(journal) > self._most:
            stored_id = next(iter(journal))
            owner, tokens, _ = journal.pop(stored_id)
            self.unshared += 1
            if stored_id not in self._known:
                self._keep(stored_id, _key_of(owner), tokens, share=False)

    def _drop(self, stored_id: str, key_id: str | None) -> None:
        """Forget `stored_id`, which is `key_id`'s."""
        ids = self._by_key[key_id]
        self._recount(key_id, len(ids), len(ids) - 1)
        del ids[stored_id]
        del self._known[stored_id]
        if not ids:
            del self._by_key[key_id]

    def _forget_one(self, adding: str | None) -> None:
        """Forget the oldest id of the key adding one if its share is at least the average,
        else of the key with the largest share."""
        by_key = self._by_key
        own = by_key.get(adding)
        if own and len(own) * len(by_key) >= len(self._known):
            victim = adding
        else:
            victim = next(iter(self._by_count[self._top]))
        self._drop(next(iter(by_key[victim])), victim)

    def _recount(self, key_id: str | None, was: int, now: int) -> None:
        """Move `key_id` from the keys holding `was` ids to those holding `now`."""
        by_count = self._by_count
        if was:
            keys = by_count[was]
            del keys[key_id]
            if not keys:
                del by_count[was]
        if now:
            holding = by_count.get(now)
            if holding is None:
                holding = by_count[now] = OrderedDict()
            holding[key_id] = None
        if now > self._top:
            self._top = now
        while self._top and self._top not in by_count:
            self._top -= 1

    def __len__(self) -> int:
        return len(self._known)

    def others(self, stored_id: str, key_id: str | None) -> bool:
        """Whether `stored_id` is known to be another key's than `key_id` (in memory, or
        held to be written)."""
        found = self._known.get(stored_id)
        if found is not None:
            return found[0] != key_id and found[0] != _CONTESTED
        held = self.held(stored_id)
        return held is not None and _key_of(held[0]) not in (key_id, _CONTESTED)

    def written_day(self, stored_id: str) -> int | None:
        """The day `stored_id` was written, if it is held only by what was written of it
        (`written`; not in the journal or the batch being written)."""
        wrote = self._wrote.get(stored_id)
        if wrote is None or stored_id in (self.journal or {}) or stored_id in self.writing:
            return None
        return wrote[1]

    def held(self, stored_id: str) -> SharedId | None:
        """What this process holds of `stored_id` outside memory, newest first: the journal,
        the batch being written, or what it wrote of an id memory does not hold (`written`)."""
        found = (self.journal or {}).get(stored_id) or self.writing.get(stored_id)
        if found is None and (wrote := self._wrote.get(stored_id)) is not None:
            return wrote[0]
        return found

    def use(self, stored_id: str, key_id: str | None) -> bool | None:
        """`stored_id` named by a request of `key_id`: True if it is another key's, False if
        it is this key's (it goes last: what a key keeps using is forgotten last), None if
        it is not known here."""
        found = self._known.get(stored_id)
        if found is None or found[0] == _CONTESTED:
            return None
        if found[0] != key_id:
            return True
        self._keep(stored_id, key_id, _UNSIZED)
        return False

    def prompt(self, response_id: str, key_id: str | None) -> Estimate:
        """What continuing `response_id` sends upstream again, for `key_id`.

        Raises:
            NotFound: the response is known to be another key's.
        """
        found = self._known.get(response_id)
        if found is None or found[0] == _CONTESTED:
            return UNKNOWN_CONVERSATION
        owner, tokens, _ = found
        if owner != key_id:
            raise NotFound(
                f"Previous response with id '{response_id[:100]}' not found.",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        if tokens == _UNSIZED:
            return UNKNOWN_CONVERSATION
        return Estimate(tokens, tokens)
