"""The stream watchdog: one patrol per upstream client instead of a timer per read."""

from __future__ import annotations

import asyncio

import pytest

from gateway.providers._watchdog import MAX_PERIOD, Watch, Watchdog


async def test_the_period_is_a_quarter_of_the_shortest_timeout_and_at_most_a_second() -> None:
    assert Watchdog(2.0, 0.4).period == pytest.approx(0.1)
    assert Watchdog(300.0, 300.0).period == MAX_PERIOD


async def _reader(dog: Watchdog, seen: list[Watch], outcome: list[str]) -> None:
    with dog.watch() as watch:
        seen.append(watch)
        try:
            await asyncio.Event().wait()  # an upstream that never sends
        except asyncio.CancelledError:
            outcome.append("timeout" if watch.timed_out() else "cancelled")
            if outcome[-1] == "cancelled":
                raise


async def test_a_silent_stream_is_failed_past_its_first_byte_limit_and_only_then() -> None:
    dog = Watchdog(first_byte_timeout=5.0, read_timeout=1.0)
    seen: list[Watch] = []
    outcome: list[str] = []
    task = asyncio.create_task(_reader(dog, seen, outcome))
    await asyncio.sleep(0)
    watch = seen[0]
    dog.check(watch.last + 4.9)  # before its first event, first_byte_timeout applies
    await asyncio.sleep(0)
    assert outcome == [] and not task.done()
    dog.check(watch.last + 5.1)
    await task
    assert outcome == ["timeout"] and dog.expired == 1
    assert task.cancelling() == 0  # the cancellation was spent: the task goes on normally


async def test_a_stream_whose_client_is_slow_is_not_failed() -> None:
    dog = Watchdog(first_byte_timeout=1.0, read_timeout=1.0)
    seen: list[Watch] = []
    outcome: list[str] = []
    task = asyncio.create_task(_reader(dog, seen, outcome))
    await asyncio.sleep(0)
    seen[0].reading = False  # handed a batch to the client, which has not taken it yet
    dog.check(seen[0].last + 60)
    await asyncio.sleep(0)
    assert outcome == [] and not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert outcome == ["cancelled"]


async def test_a_hang_up_at_the_same_time_stays_a_cancellation() -> None:
    dog = Watchdog(first_byte_timeout=1.0, read_timeout=1.0)
    seen: list[Watch] = []
    outcome: list[str] = []
    task = asyncio.create_task(_reader(dog, seen, outcome))
    await asyncio.sleep(0)
    task.cancel()  # the client hung up ...
    dog.check(seen[0].last + 2)  # ... and the watchdog fired in the same loop turn
    with pytest.raises(asyncio.CancelledError):
        await task
    assert outcome == ["cancelled"]


async def test_the_patrol_fails_a_stream_by_itself_and_stops_when_none_is_open() -> None:
    dog = Watchdog(first_byte_timeout=0.1, read_timeout=0.1)
    seen: list[Watch] = []
    outcome: list[str] = []
    async with asyncio.timeout(5):
        await _reader(dog, seen, outcome)
    assert outcome == ["timeout"]
    patrol = dog._task
    assert patrol is not None
    async with asyncio.timeout(5):
        await patrol  # nothing left to watch: the patrol ends
    assert dog._task is None


def test_each_stream_is_watched_as_its_own_task_on_whichever_loop_runs_it() -> None:
    # The watchdog remembers its loop (to find a stream's task without asking for the running
    # loop); another loop, or another task of the same one, is still found as it is.
    dog = Watchdog(first_byte_timeout=1.0, read_timeout=1.0)

    async def watched() -> tuple[asyncio.Task[object] | None, asyncio.Task[object]]:
        watch = dog.open()
        try:
            return asyncio.current_task(), watch.task
        finally:
            dog.close(watch)

    async def two() -> list[tuple[asyncio.Task[object] | None, asyncio.Task[object]]]:
        return list(await asyncio.gather(watched(), watched()))

    for _ in range(2):  # a loop each
        pairs = asyncio.run(two())
        assert [task for task, _ in pairs] == [watched for _, watched in pairs]
        assert pairs[0][0] is not pairs[1][0]
