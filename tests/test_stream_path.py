"""The plumbing of a stream between the upstream client and the client's response: the
iterator `pipeline.stream` hands back, and the event stream response."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any, cast

import pytest

from gateway import pipeline
from gateway.errors import UpstreamUnavailable
from gateway.sse import _EventStream
from gateway.sse_pings import StreamPings


async def _batches(closed: list[bool]) -> AsyncGenerator[list[bytes], None]:
    try:
        yield [b"2"]
        yield [b"3"]
    finally:
        closed.append(True)


async def test_the_stream_hands_on_the_first_route_s_batches_and_closes_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    closed: list[bool] = []
    events = _batches(closed)

    async def answered(ex: Any, attempt: Any, *, stream: bool) -> tuple[Any, list[bytes]]:
        assert stream  # its account is told how the stream went at its end
        return events, [b"1"]

    monkeypatch.setattr(pipeline, "try_routes", answered)
    stream = pipeline.Stream(cast(Any, None), lambda route: cast(Any, None))
    assert [batch async for batch in stream] == [[b"1"], [b"2"], [b"3"]]
    assert closed == [True]
    await stream.aclose()  # (again: nothing happens)


async def test_a_stream_whose_routes_failed_ends_without_trying_them_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tries: list[int] = []

    async def failed(ex: Any, attempt: Any, *, stream: bool) -> tuple[Any, list[bytes]]:
        tries.append(1)
        raise UpstreamUnavailable("down")

    monkeypatch.setattr(pipeline, "try_routes", failed)
    stream = pipeline.Stream(cast(Any, None), lambda route: cast(Any, None))
    with pytest.raises(UpstreamUnavailable):
        await anext(stream)
    with pytest.raises(StopAsyncIteration):
        await anext(stream)
    await stream.aclose()
    assert tries == [1]


async def test_an_event_stream_is_never_compressed() -> None:
    response = _EventStream(StreamPings(1.0))
    with pytest.raises(NotImplementedError):
        response.enable_compression()
    assert response.headers["Content-Type"] == "text/event-stream"
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Accel-Buffering"] == "no"
