"""The key cache's refreshes (and PostgreSQL's key listener) while the database is down: keys
are served from the last good load, and the log says so once, then once a minute, then once
more when it is back, rather than every second in each worker."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from gateway import logs as gateway_logs
from gateway.errors import StoreBusy
from gateway.keys import KeyCache
from gateway.pg_listen import KeyListener
from gateway.store import open_store


@pytest.mark.parametrize("log_every", [60.0, 0.0], ids=["within-a-minute", "minute-passed"])
async def test_a_database_down_is_logged_once_then_a_line_a_minute_then_its_return(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, log_every: float
) -> None:
    monkeypatch.setattr(gateway_logs, "FAILURE_REPEAT_SECONDS", log_every)
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


async def test_the_key_listener_says_once_that_postgresql_is_away_and_once_that_it_is_back(
    pg_url: str,
) -> None:
    listener = KeyListener("postgresql://kiosk@127.0.0.1:1/kiosk", connect_timeout=2.0)
    listener.callbacks.append(lambda: None)
    with capture_logs() as logs:
        for _ in range(5):  # a poll a second, each retrying
            await listener.ensure()
        listener._url = pg_url  # back (as after a restart)
        await listener.ensure()
    await listener.close()
    away = [e for e in logs if e["event"] == "key_listener_unavailable"]
    assert len(away) == 1 and away[0]["failures"] == 1
    (back,) = [e for e in logs if e["event"] == "key_listener_recovered"]
    assert back["failures"] == 5
