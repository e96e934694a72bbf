"""Attack h139: the shared stored ids after dbe2fe0 (`StoredShare._within`: each query a task
of its own, at most `MOST_LATE` of them; one deadline for a request's questions; the files
question asked again in the background while it fails; `_PLAIN_FILE_ID` for a body that
escapes no letter of the key; `spells_escaped` as one expression).

Gateways in this process on one database (SQLite, then PostgreSQL); upstreams are in-process
raw sockets (`Scripted`). FINDING tests fail on dbe2fe0; HELD tests pin what was tried and
held.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Sequence
from typing import Any

import pytest

from gateway.errors import NotFound, StoreBusy
from gateway.handlers import messages as messages_handler
from gateway.schemas.codec import spells_escaped
from gateway.state import STORE_KEY
from gateway.stored import Naming, StoredResponses
from gateway.stored_share import StoredShare
from tests import test_attack_h135
from tests.conftest import app_of, create_key
from tests.test_attack_h105 import post as post_json
from tests.test_attack_h126 import Scripted
from tests.test_attack_h135 import PASSES, Open, flush, two
from tests.test_attack_h137 import responses

open_gw = test_attack_h135.open_gw  # (the fixture, by its name)

Json = dict[str, Any]

BOB, ALICE = "key_bob", "key_alice"
MOST_LATE = 64  # (`stored_share.MOST_LATE`, as documented: "at most 64 at once")


class Answering:
    """A `StoredSink` that answers every lookup after `seconds` (a database that is neither
    down nor slow: well within `LOOKUP_SECONDS`), holding `rows`."""

    def __init__(self, rows: dict[str, str], seconds: float) -> None:
        self.rows = rows
        self.seconds = seconds
        self.asked: list[list[str]] = []
        self.flooded = asyncio.Event()  # (`MOST_LATE` lookups asked)

    async def stored_owners(self, ids: Sequence[str]) -> list[Any]:
        self.asked.append(list(ids))
        if len(self.asked) >= MOST_LATE:
            self.flooded.set()
        await asyncio.sleep(self.seconds)
        return [(i, self.rows[i], -1, 0, 0.0) for i in ids if i in self.rows]

    async def stored_files(self) -> bool:
        return False

    async def keep_stored(self, rows: Any) -> None:
        return None

    async def forget_stored(self, before: float) -> None:
        return None


def naming(*ids: str) -> Naming:
    named = Naming()
    named.unresolved = [(i, "previous_response_id", "Response", None) for i in ids]
    return named


# FINDING (high: another key's stored response, any time, with the database healthy, by one
# key's own traffic): `_within` adds every lookup to `_late` when it starts, not when it
# passes its deadline, and refuses to start one once `len(_late) >= MOST_LATE`. So 64
# lookups merely *in flight* (each answered well within its 2 s) make every other lookup of
# the process fail at once, unasked, and the request is relayed. Alice keeps 64 requests
# naming made-up ids in flight on a worker (a PostgreSQL round trip under ordinary load is a
# few ms; 10,000 made-up ids a request is 10 queries; the lookups run before admission, so
# requests of a key at its rpm or budget limit count too) and names bob's `resp_...` in a
# 65th: relayed, and the upstream (one account) continues bob's conversation for her.
# docs/keys.md: "a late query ends on its own, at most 64 at once"; these are not late.
# Expected: the 65th is looked up (404 for bob's id). Fix: add a task to `_late` only when
# `asyncio.wait` times out (and bound the lookups in flight, if at all, by waiting for a
# slot within the deadline rather than failing open; or fail *closed* (503) when the bound
# is reached, since a full table is something the caller can cause).
async def test_lookups_in_flight_within_their_deadline_are_not_late() -> None:
    sink = Answering({"resp_bob": BOB}, seconds=0.2)
    share = StoredShare(sink, StoredResponses(), flush_seconds=60.0)
    deadline = share.deadline()
    # (From 64 keys: one key's own lookups run `stored_share.MOST_PER_KEY` at once since.)
    flood = [
        asyncio.ensure_future(share.resolve(naming(f"resp_made_up_{n}"), f"key_{n}", deadline))
        for n in range(MOST_LATE)
    ]
    async with asyncio.timeout(5):  # (each lookup started: 64 queries in flight, none late)
        await sink.flooded.wait()
    try:
        with pytest.raises(NotFound):
            await share.resolve(naming("resp_bob"), ALICE, share.deadline())
    finally:
        await asyncio.gather(*flood)
        await share.stop()
    assert ["resp_bob"] in sink.asked


# FINDING (high, the same through the gateway): on a second process, alice's 64 Responses
# requests naming made-up `previous_response_id`s are looked up in a database answering in
# 0.3 s each (the 2 s deadline is far); while they are, her 65th request naming bob's
# `resp_0` is not looked up at all and is relayed: the upstream is asked to continue bob's
# response for alice's request. Expected: 404, nothing upstream for it. Fix: as above.
@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
async def test_a_key_filling_the_late_table_with_its_own_lookups_gets_another_keys_response(
    open_gw: Open, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = Scripted(responses)
    first, second, bob, alice = await two(open_gw, ("openai", up, "gpt-5", PASSES))
    assert (await post_json(first, bob, "/v1/responses", {"model": "m", "input": "hi"}))[0] == 200
    await flush(first)
    store = app_of(second)[STORE_KEY]
    real = store.stored_owners
    in_flight = 0
    full = asyncio.Event()

    async def answering(ids: Any) -> Any:  # (a healthy database: 0.3 s, 2 s allowed)
        nonlocal in_flight
        in_flight += 1
        if in_flight >= MOST_LATE:
            full.set()
        try:
            await asyncio.sleep(0.3)
            return await real(ids)
        finally:
            in_flight -= 1

    monkeypatch.setattr(store, "stored_owners", answering)
    # (The flood from 64 keys: one key's own lookups run `stored_share.MOST_PER_KEY` at once
    # since, its others waiting their turn.)
    flooders = [await create_key(second) for _ in range(MOST_LATE)]
    flood = [
        asyncio.ensure_future(
            post_json(
                second,
                flooders[n],
                "/v1/responses",
                {"model": "m", "input": "x", "previous_response_id": f"resp_made_up_{n}"},
            )
        )
        for n in range(MOST_LATE)
    ]
    async with asyncio.timeout(10):
        await full.wait()
    body: Json = {"model": "m", "input": "Repeat.", "previous_response_id": "resp_0"}
    status, answered = await post_json(second, alice, "/v1/responses", body)
    await asyncio.gather(*flood)
    relayed = [sent for sent in up.bodies if b'"resp_0"' in json.dumps(sent).encode()]
    assert status == 404 and not relayed, (status, answered)


# HELD: `_within` with the late table full refuses at once and leaves no coroutine
# unawaited; a lookup past its deadline is kept in `_late` and ended by `stop` (nothing left
# pending after the share stops, its late task cancelled within `LOOKUP_SECONDS`).
async def test_stop_ends_late_lookups_and_leaves_nothing_pending() -> None:
    release = asyncio.Event()

    class Hanging(Answering):
        async def stored_owners(self, ids: Sequence[str]) -> list[Any]:
            self.asked.append(list(ids))
            await release.wait()
            return []

    sink = Hanging({}, 0.0)
    share = StoredShare(sink, StoredResponses(), flush_seconds=60.0)
    loop = asyncio.get_running_loop()
    with pytest.raises(StoreBusy):  # (late: refused, to try again)
        await share.resolve(naming("resp_x"), ALICE, loop.time() + 0.05)
    assert len(share._late) == 1
    await share.stop()
    await asyncio.sleep(0)
    assert not share._late
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not [t for t in pending if "stored_owners" in repr(t) or "_owners" in repr(t)]


# --- _PLAIN_FILE_ID against _FILE_ID --------------------------------------------------------

_PIECES = [
    b'"file_id"',
    b'"file_id" ',
    b'"file_id"\t:\n',
    b": ",
    b":",
    b'"',
    b"\\",
    b'\\"',
    b"\\\\",
    b"\\u0041",
    b"\\u001b",
    b"\\/",
    b"file_",
    b"_id",
    b'"file_idx"',
    b'"xfile_id"',
    b'"a\\"file_id"',
    b'"file_bob"',
    b'"file_\\u0042"',
    b",",
    b"{",
    b"}",
    b"[",
    b"]",
    b" ",
]


# HELD: for bodies with no `\u` escape of a letter of `file_id` (so `_name_files` uses
# `_PLAIN_FILE_ID`), it finds exactly the values `_FILE_ID` finds, in random soup of key
# spellings, escaped quotes and backslashes, near-miss keys and values; and a body where
# msgspec reads a `file_id` key spelled with an escape always makes `spells_escaped` true.
def test_the_plain_file_id_search_finds_what_the_full_one_finds() -> None:
    rng = random.Random(139)
    word = b'file_id"'
    for _ in range(20000):
        body = b"".join(rng.choice(_PIECES) for _ in range(rng.randrange(1, 24)))
        if spells_escaped(body, word):
            continue
        plain = messages_handler._PLAIN_FILE_ID.findall(body)
        full = [value for _, value in messages_handler._FILE_ID.findall(body)]
        assert plain == full, body
    letters = "file_id"
    for _ in range(2000):
        key = "".join(
            f"\\u{ord(c):04{rng.choice('xX')}}" if rng.random() < 0.3 else c for c in letters
        )
        body = b'{"a": [{"' + key.encode() + b'": "file_bob"}]}'
        decoded = json.loads(body)
        if "file_id" in decoded["a"][0] and key != letters:
            assert spells_escaped(body, word), body
            assert messages_handler._FILE_ID.findall(body), body
        assert re.search(rb"file_bob", body)
