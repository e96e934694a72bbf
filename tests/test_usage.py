"""UsageRecorder: batching by size and time, explicit flush, lossless stop, surviving failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import msgspec
import pytest
from structlog.testing import capture_logs

from gateway.records import UsageRecord, mint_uid
from gateway.store import Store, open_store
from gateway.usage import UsageRecorder
from tests.conftest import NEVER_HANG


class SpyStore:
    """Wraps a real Store: records each batch, can fail on demand, and signals every write."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.batches: list[int] = []
        self.failures = 0  # how many upcoming inserts raise
        self.attempts = 0
        self.written = asyncio.Event()
        self.attempted = asyncio.Event()
        self.lost_commits = 0  # how many upcoming inserts commit, then raise
        self.fresh: list[bool] = []  # what the recorder said of each batch

    async def insert_usage(self, rows: Sequence[UsageRecord], *, fresh: bool = False) -> None:
        self.attempts += 1
        self.attempted.set()
        self.fresh.append(fresh)
        if self.failures:
            self.failures -= 1
            raise OSError("disk on fire")
        await self.store.insert_usage(rows, fresh=fresh)
        if self.lost_commits:
            self.lost_commits -= 1
            raise OSError("the commit's answer was lost")
        self.batches.append(len(rows))
        self.written.set()

    async def count(self) -> int:
        rows = await self.store.db.execute_fetchall("SELECT COUNT(*) FROM usage")
        return int(next(iter(rows))[0])


@pytest.fixture
async def spy(tmp_path: Path) -> AsyncIterator[SpyStore]:
    async with open_store(str(tmp_path / "keys.db")) as store:
        yield SpyStore(store)


def row(i: int) -> UsageRecord:
    return UsageRecord(
        ts=1.0 + i,
        request_id=f"req-{i}",
        key_id="key_a",
        model="demo",
        provider="demo",
        upstream_model="demo",
        endpoint="/v1/chat/completions",
        stream=False,
        status=200,
        total_tokens=i,
    )


async def wait(event: asyncio.Event) -> None:
    async with asyncio.timeout(NEVER_HANG):
        await event.wait()
    event.clear()


async def test_record_is_synchronous_and_flush_writes_everything(spy: SpyStore) -> None:
    recorder = UsageRecorder(spy, flush_seconds=60, batch_size=4)
    for i in range(10):
        recorder.record(row(i))
    assert recorder.pending == 10
    await recorder.flush()
    assert recorder.pending == 0
    assert spy.batches == [4, 4, 2]  # chunks of batch_size
    assert await spy.count() == 10
    await recorder.flush()  # nothing queued: no write
    assert spy.attempts == 3


async def test_full_batch_is_written_without_waiting_for_the_timer(spy: SpyStore) -> None:
    recorder = UsageRecorder(spy, flush_seconds=3600, batch_size=3)
    await recorder.start()
    try:
        for i in range(3):
            recorder.record(row(i))
        await wait(spy.written)
        assert spy.batches == [3]
    finally:
        await recorder.stop()


async def test_partial_batch_is_written_after_flush_seconds(spy: SpyStore) -> None:
    recorder = UsageRecorder(spy, flush_seconds=0.01, batch_size=1000)
    await recorder.start()
    try:
        recorder.record(row(1))
        recorder.record(row(2))
        await wait(spy.written)
        assert spy.batches == [2]
        recorder.record(row(3))  # the task goes back to waiting for rows, then writes again
        await wait(spy.written)
        assert await spy.count() == 3
    finally:
        await recorder.stop()


async def test_stop_drains_every_row(spy: SpyStore) -> None:
    recorder = UsageRecorder(spy, flush_seconds=3600, batch_size=1000)
    await recorder.start()
    for i in range(250):
        recorder.record(row(i))
    await recorder.stop()
    assert recorder.pending == 0
    assert await spy.count() == 250
    await recorder.stop()  # a second stop is harmless


async def test_stop_during_a_write_loses_and_duplicates_nothing(spy: SpyStore) -> None:
    recorder = UsageRecorder(spy, flush_seconds=0, batch_size=5)
    await recorder.start()
    for i in range(5):
        recorder.record(row(i))
    await wait(spy.attempted)  # the task is inside insert_usage now
    for i in range(5, 8):
        recorder.record(row(i))
    await recorder.stop()
    ids = await spy.store.db.execute_fetchall("SELECT request_id FROM usage ORDER BY id")
    assert [r[0] for r in ids] == [f"req-{i}" for i in range(8)]


async def test_flush_failure_keeps_rows_for_retry(spy: SpyStore) -> None:
    recorder = UsageRecorder(spy, flush_seconds=60, batch_size=10)
    recorder.record(row(1))
    spy.failures = 1
    with pytest.raises(OSError, match="disk on fire"):
        await recorder.flush()
    assert recorder.pending == 1
    await recorder.flush()
    assert recorder.pending == 0 and await spy.count() == 1


async def test_task_survives_insert_failure_and_retries(spy: SpyStore) -> None:
    recorder = UsageRecorder(spy, flush_seconds=0.001, batch_size=2)
    spy.failures = 2
    await recorder.start()
    try:
        with capture_logs() as logs:
            recorder.record(row(1))
            recorder.record(row(2))
            await wait(spy.written)  # written after two failed attempts, with no new rows
        assert spy.attempts == 3 and spy.batches == [2]
        failed = [e for e in logs if e["event"] == "usage_write_failed"]
        assert [e["failures"] for e in failed] == [1, 2]
        assert all(e["log_level"] == "error" and e["rows"] == 2 for e in failed)
        recorder.record(row(3))  # the task is still alive
        recorder.record(row(4))
        await wait(spy.written)
        assert await spy.count() == 4
    finally:
        await recorder.stop()


async def test_retained_rows_are_bounded(spy: SpyStore) -> None:
    recorder = UsageRecorder(spy, flush_seconds=60, batch_size=2, max_retained=3)
    for i in range(5):
        recorder.record(row(i))
    spy.failures = 1
    with capture_logs() as logs, pytest.raises(OSError):
        await recorder.flush()
    assert recorder.pending == 3
    assert {"event": "usage_rows_dropped", "rows": 2, "retained": 3, "log_level": "error"} in logs
    await recorder.flush()
    ids = await spy.store.db.execute_fetchall("SELECT request_id FROM usage ORDER BY id")
    assert [r[0] for r in ids] == ["req-2", "req-3", "req-4"]  # the oldest were dropped


async def test_stop_logs_rows_it_cannot_write(spy: SpyStore) -> None:
    recorder = UsageRecorder(spy, flush_seconds=3600, batch_size=10)
    await recorder.start()
    recorder.record(row(1))
    spy.failures = 1
    with capture_logs() as logs:
        await recorder.stop()  # does not raise: shutdown must go on
    assert [e["rows"] for e in logs if e["event"] == "usage_rows_lost"] == [1]
    assert recorder.lost == 1  # `gateway serve` then exits 3


async def test_a_batch_is_fresh_only_until_it_was_tried(spy: SpyStore) -> None:
    # Rows the store never saw skip its look for rows already written; a batch whose write
    # failed may have committed (the answer lost), so its retry is checked, and no row is
    # written or rolled up twice.
    recorder = UsageRecorder(spy, flush_seconds=60, batch_size=3)
    rows = [msgspec.structs.replace(row(i), uid=mint_uid()) for i in range(5)]
    for r in rows[:4]:
        recorder.record(r)
    spy.lost_commits = 1
    with pytest.raises(OSError, match="lost"):
        await recorder.flush()  # the first 3 rows committed, answer lost
    recorder.record(rows[4])
    await recorder.flush()  # the 3 again (checked), then 2 never tried
    await recorder.flush()
    assert spy.fresh == [True, False, True]
    assert recorder.pending == 0
    ids = await spy.store.db.execute_fetchall("SELECT request_id FROM usage ORDER BY id")
    assert [r[0] for r in ids] == [f"req-{i}" for i in range(5)]
    rolled = await spy.store.db.execute_fetchall("SELECT SUM(requests) FROM usage_daily")
    assert [tuple(r) for r in rolled] == [(5,)]
