"""The key cache's refreshes while the database is down: it serves from its last good load,
and says so without a traceback every second (each worker polls once a second)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway import keys
from gateway.errors import StoreBusy
from gateway.keys import KeyCache
from gateway.store import open_store


@pytest.mark.parametrize("log_every", [60.0, 0.0], ids=["within-a-minute", "minute-passed"])
async def test_a_database_down_is_logged_once_then_a_line_a_minute_then_its_return(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_every: float
) -> None:
    monkeypatch.setattr(keys, "_FAILURE_LOG_SECONDS", log_every)
    async with open_store(str(tmp_path / "keys.db")) as store:
        cache = KeyCache(store, 0.01)
        await cache.load()
        down, polls = True, 0
        failed_five, answered = asyncio.Event(), asyncio.Event()
        real = store.data_version

        async def data_version() -> int:
            nonlocal polls
            if down:
                polls += 1
                if polls == 5:
                    failed_five.set()
                raise StoreBusy("The database is unavailable (OSError); try again shortly.")
            version = await real()
            answered.set()  # (the cache logs its return before the test runs again)
            return version

        monkeypatch.setattr(store, "data_version", data_version)
        with capture_logs() as logs:
            task = asyncio.create_task(cache.run())
            try:
                async with asyncio.timeout(10):
                    await failed_five.wait()
                    down = False
                    await answered.wait()
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
    events = [e["event"] for e in logs]
    assert events.count("key_cache_refresh_failed") == 1  # with its traceback, once
    failing = [e for e in logs if e["event"] == "key_cache_refresh_failing"]
    if log_every:
        assert failing == []
    else:  # a minute passed at each: a line each, without a traceback
        assert len(failing) >= 4 and all("exc_info" not in e for e in failing)
        assert failing[0]["error"].startswith("StoreBusy: The database is unavailable")
    (back,) = [e for e in logs if e["event"] == "key_cache_refresh_recovered"]
    assert back["failures"] >= 5
