"""Attack h152: c1099fd (stored-id writes: the task ticks at `usage_flush_seconds`; while
writes fail the whole journal is handed over at most every `retry_seconds`, and at the ticks
between a cheap question, `stored_files()`, notices the database is back and the write is
tried at once; a failed hourly forget is logged on its own).

Held: the window after a long outage (the tick after the database is back writes, whatever
the backoff); a real SQLite file locked by another connection (reads answer, writes busy):
the write is tried every tick, as before the backoff, never less, `failing` clears at the
first write that succeeds; a question that hangs does not hold a clean stop, which writes
everything; one log line per failing tick, the question's answer changes nothing
(`files`, the files question's own log lines); `/readyz` during the backoff; the loop's CPU
with a 100,000-id journal and a database down.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from gateway.state import STORED_KEY, STORED_SHARE_KEY
from gateway.store import Store
from gateway.stored import StoredResponses
from gateway.stored_share import MOST_RETRY_SECONDS, StoredShare
from tests.conftest import app_of
from tests.test_attack_h151 import CountingSink, cancel_task

# --- helpers -------------------------------------------------------------------------------


class ProbedSink(CountingSink):
    """`CountingSink` whose cheap questions are counted; `files` is what it answers."""

    def __init__(self) -> None:
        super().__init__()
        self.probes = 0
        self.files = False

    async def stored_files(self) -> bool:
        self.probes += 1
        await super().stored_files()
        return self.files


def fake_clock(share: StoredShare) -> list[float]:
    now = [1000.0]
    share._clock = lambda: now[0]
    return now


async def ticks(share: StoredShare, now: list[float], count: int, flush: float) -> int:
    """`count` of the task's ticks, `flush` apart on the fake clock; how many failed."""
    failed = 0
    for _ in range(count):
        now[0] += flush
        try:
            await share.tick()
        except Exception:
            failed += 1
    return failed


# --- held ----------------------------------------------------------------------------------


# HELD: the window after a long outage. The database refuses writes and questions until the
# backoff is at its longest (8 s); it comes back mid-backoff and bob's new response is shown:
# the very next tick (`usage_flush_seconds` later) asks, gets an answer and writes the whole
# journal, outage's ids and the new one; `failing` clears, the backoff is reset (the next
# failure waits `usage_flush_seconds` again, not 8 s).
async def test_the_tick_after_the_database_is_back_writes_whatever_the_backoff() -> None:
    known = StoredResponses()
    sink = ProbedSink()
    flush = 0.5
    share = StoredShare(sink, known, flush_seconds=flush)
    now = fake_clock(share)
    known.remember("resp_outage", "key_bob", None)
    failed = await ticks(share, now, 40, flush)  # (20 s of outage)
    assert failed == 40 and share.failing
    assert share._retry_at - now[0] > flush, "mid-backoff"
    assert sink.tries <= 8 < sink.probes, (sink.tries, sink.probes)
    sink.down = False
    known.remember("resp_new", "key_bob", None)
    tries = sink.tries
    assert await ticks(share, now, 1, flush) == 0
    assert sink.tries == tries + 1 and not share.failing and share.pending == 0
    assert sorted(row[0] for row in sink.rows) == ["resp_new", "resp_outage"]
    # A new outage starts from the pace again.
    sink.down = True
    known.remember("resp_later", "key_bob", None)
    await ticks(share, now, 1, flush)
    assert share._retry_at == pytest.approx(now[0] + flush)


# HELD (not worse than before the backoff): a real SQLite file whose write lock another
# connection holds (`BEGIN EXCLUSIVE`, a backup or the CLI): in WAL mode reads still answer,
# so the question answers at every tick and the whole journal is tried every tick (as
# before 7d83683: each try waits `busy_timeout` and is `StoreBusy`), never skipped: no tick
# without a try, `failing` stays on while it fails and clears at the first write once the
# lock is gone, which writes every id. (Note: docs/keys.md's "so while writes fail the
# tries back off" does not hold for a database that answers reads but refuses writes: a
# locked or full SQLite file, a read-only PostgreSQL, a failing constraint.)
async def test_a_locked_sqlite_file_gets_a_try_every_tick_and_recovers(tmp_path: Path) -> None:
    path = str(tmp_path / "locked.db")
    store = await Store.open(path, busy_timeout=0.02)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        known = StoredResponses()
        flush = 0.5
        share = StoredShare(store, known, flush_seconds=flush)
        now = fake_clock(share)
        tries = [0]
        keep = store.keep_stored

        async def counted(rows: Any) -> Any:
            tries[0] += 1
            return await keep(rows)

        store.keep_stored = counted  # type: ignore[method-assign]
        known.remember("resp_locked", "key_bob", None)
        other.execute("BEGIN EXCLUSIVE")
        assert await store.stored_files() is False  # (reads answer beside the lock)
        failed = await ticks(share, now, 8, flush)
        assert failed == 8 and share.failing and share.pending == 1
        assert tries[0] == 8, tries
        other.execute("ROLLBACK")
        assert await ticks(share, now, 1, flush) == 0
        assert not share.failing and share.pending == 0 and tries[0] == 9
        async with store.db.execute("SELECT id, owner FROM stored_ids") as cur:
            assert [tuple(r) for r in await cur.fetchall()] == [("resp_locked", "key_bob")]
    finally:
        other.close()
        await store.close()


# HELD: a question that hangs (a hung network) while the write backs off holds no lock: a
# clean stop cancels it at once and writes everything (the database taking writes again),
# as a stop did between two tries before.
async def test_a_hung_question_does_not_hold_a_clean_stop() -> None:
    known = StoredResponses()
    sink = ProbedSink()
    share = StoredShare(sink, known, flush_seconds=0.01)
    now = fake_clock(share)
    known.remember("resp_outage", "key_bob", None)
    await ticks(share, now, 1, 0.01)
    assert share.failing
    share._retry_at = now[0] + 3600.0  # (well inside the backoff)
    asking = asyncio.Event()
    hang = asyncio.Event()

    async def hung() -> bool:
        asking.set()
        await hang.wait()
        return False

    sink.stored_files = hung  # type: ignore[method-assign]
    await share.start()
    try:
        await asyncio.wait_for(asking.wait(), 10)
    except BaseException:
        await cancel_task(share)
        raise
    sink.down = False
    known.remember("resp_new", "key_alice", None)
    started = time.monotonic()
    await asyncio.wait_for(share.stop(), 5)
    assert time.monotonic() - started < 2.5
    assert sorted(row[0] for row in sink.rows) == ["resp_new", "resp_outage"]
    assert share.pending == 0 and not share.failing


# HELD: the log volume and the question's side effects. While the database is down the task
# logs one `stored_ids_write_failed` a tick, as before (the class only, what is held), and
# nothing else; the question's answer (a file there) changes neither `files` nor the files
# question's state, and logs none of its lines.
async def test_one_line_a_tick_and_the_question_has_no_side_effects() -> None:
    known = StoredResponses()
    sink = ProbedSink()
    sink.files = True
    share = StoredShare(sink, known, flush_seconds=0.01)
    now = fake_clock(share)
    known.remember("resp_outage", "key_bob", None)
    enough = asyncio.Event()
    real_sleep = asyncio.sleep
    slept = [0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds
        slept[0] += 1
        if slept[0] > 30:
            enough.set()
        await real_sleep(0)

    with capture_logs() as logs, pytest.MonkeyPatch.context() as patch:
        patch.setattr("gateway.flushing.asyncio.sleep", sleep)
        share._task = asyncio.create_task(share._run())
        try:
            await asyncio.wait_for(enough.wait(), 10)
        finally:
            await cancel_task(share)
    events = [line["event"] for line in logs]
    assert set(events) == {"stored_ids_write_failed"}, set(events)
    assert slept[0] - 1 <= len(events) <= slept[0], (len(events), slept[0])
    assert all(line["held"] == 1 for line in logs)
    assert sink.probes > sink.tries  # (the questions ran)
    assert known.files is False and share._files_failing is False


# HELD: `/readyz` during the backoff: 503, `"stored_ids":"failing"` and what is held, with
# `"database":"ok"` (the ping answers); the tick after the database takes writes again is
# 200 and nothing pending.
async def test_readyz_during_the_backoff(gateway: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    app = app_of(gateway)
    share = app[STORED_SHARE_KEY]
    await cancel_task(share)
    now = fake_clock(share)
    store = share._store
    down = [True]

    def failing(real: Any) -> Any:
        async def call(*args: Any) -> Any:
            if down[0]:
                raise ConnectionRefusedError
            return await real(*args)

        return call

    monkeypatch.setattr(store, "keep_stored", failing(store.keep_stored))
    monkeypatch.setattr(store, "stored_files", failing(store.stored_files))
    app[STORED_KEY].remember("resp_ready", "key_bob", None)
    await ticks(share, now, 20, 0.05)
    assert share.failing and share._retry_at > now[0]
    resp = await gateway.get("/readyz")
    body = await resp.json()
    assert resp.status == 503, body
    assert body["stored_ids"] == "failing" and body["stored_ids_pending"] == 1, body
    assert body["database"] == "ok", body
    down[0] = False
    assert await ticks(share, now, 1, 0.05) == 0
    resp = await gateway.get("/readyz")
    body = await resp.json()
    assert body["stored_ids"] == "ok" and body["stored_ids_pending"] == 0, body


# HELD: the loop's CPU with a full journal (100,000 ids) and the database down (writes and
# questions refused): over 1.5 s of ticks (a fake clock; a real window made too few tries
# under coverage in CI to compare) at `usage_flush_seconds` 0.05 the journal is handed over a
# handful of times (0.05, 0.1, 0.2, 0.4, 0.8 apart), the other ticks ask the cheap question;
# several times less CPU than the same task handing it over every tick (`retry_seconds` patched
# to 0: every tick past the backoff: the behaviour before the backoff).
async def test_the_loops_cpu_is_bounded_with_the_database_down() -> None:
    count = 100_000
    flush = 0.05
    results: dict[str, tuple[float, int, int]] = {}
    for mode in ("every tick", "backing off"):
        known = StoredResponses()
        sink = ProbedSink()
        share = StoredShare(sink, known, flush_seconds=flush)
        if mode == "every tick":
            share.retry_seconds = lambda failures: 0.0  # type: ignore[method-assign]
        known.journal = OrderedDict((f"resp_{n:06d}", ("key_a", -1, False)) for n in range(count))
        now = [1000.0]
        share._clock = lambda clock=now: clock[0]  # type: ignore[misc]
        started = time.thread_time()
        assert await ticks(share, now, 30, flush) == 30  # (1.5 s of ticks, on the fake clock)
        cpu = time.thread_time() - started
        assert share.pending == count and share.failing
        results[mode] = (cpu, sink.tries, sink.probes)
    (before, before_tries, _), (after, after_tries, probes) = (
        results["every tick"],
        results["backing off"],
    )
    assert after_tries == 5 and before_tries == 30, results  # (0.05, 0.1, 0.2, 0.4, 0.8 apart)
    assert probes >= 1, results
    assert after < 0.6 * before, results
    assert MOST_RETRY_SECONDS == 8.0
