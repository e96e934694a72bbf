"""Server-sent events to the client.

A stream has the headers proxies need (no-cache, X-Accel-Buffering: no, as aiohttp-sse
sends them), is never compressed, is pinged with `: ping` comments during long silences
(`sse_pings`), and stalled peers are dropped (`gateway.server`). Payloads that are already
JSON bytes are framed here directly so relayed upstream chunks are never decoded to `str`
and back. `relay()` is the one loop that moves a stream's batches to
the client and ends it, cleanly or with an error event.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion11
from aiohttp.web import ContentCoding
from aiohttp_sse import EventSourceResponse

from gateway.errors import Fault, GatewayError, GatewayStopping, drop_tracebacks, fault_of
from gateway.middleware import answer_headers
from gateway.providers._sse import DONE_EVENT, Framed, Last, data_event
from gateway.schemas.codec import encode
from gateway.sse_pings import StreamPings
from gateway.state import PINGS_KEY, SHUTTING_DOWN_KEY, STREAMS_KEY
from gateway.trace import CLIENT_CLOSED, TRACE_KEY

__all__ = ["DONE", "SSEStream", "data_frames", "relay"]

log = structlog.get_logger(__name__)

DONE = DONE_EVENT


def data_frames(payloads: list[bytes]) -> bytes:
    """Payloads as `data:` events (OpenAI chat streams); a `Framed` batch is events already."""
    if type(payloads) is Framed or type(payloads) is Last:
        return payloads[0] if len(payloads) == 1 else b"".join(payloads)
    if len(payloads) == 1:
        return data_event(payloads[0])
    return b"".join([data_event(p) for p in payloads])


def _error_frame(exc: GatewayError) -> bytes:
    return data_event(encode(exc.body()))


class _EventStream(EventSourceResponse):
    """aiohttp-sse's response (its headers: proxies must neither cache, buffer nor compress
    it; chunked encoding) with three changes for many streams at once:

    - its headers go out with its first event in one write (as `web.Response`'s do with its
      body) instead of a write of their own: `relay()` starts a stream only once its first
      batch is there, so nothing is sent later for it;
    - no ping task of its own: the app's `StreamPings` pings every silent stream from one
      task;
    - the kernel's TCP user timeout that drops a stalled peer is set once per connection
      (`gateway.server`), not set and restored around every stream."""

    _send_headers_immediately = False

    def __init__(self, pings: StreamPings) -> None:
        super().__init__(sep="\n", allow_all_methods=True)
        self._pings = pings

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if self.prepared:
            return await super().prepare(request)
        if request.version == HttpVersion11:
            self.enable_chunked_encoding()
        else:
            # HTTP/1.0 has no chunks (aiohttp refuses them): the body ends with the connection,
            # which must then close, though the client asked to keep it alive (aiohttp would
            # keep it open, and the client wait for the end of a body that has ended).
            self.force_close()
            self.headers[hdrs.CONNECTION] = "close"
        writer = await web.StreamResponse.prepare(self, request)  # not aiohttp-sse's: no task
        if writer is not None:
            self._pings.add(self, writer)
        return writer

    def enable_compression(
        self, force: bool | ContentCoding | None = None, strategy: int | None = None
    ) -> None:
        raise NotImplementedError("an event stream is never compressed")

    def stop_streaming(self) -> None:
        self._pings.discard(self)


class SSEStream:
    """One client event stream: `start()` with its first events, then framed events written
    with its `writer` (one write a batch: one syscall), `error()`, `end()` or `close()`.

    Once its end is written (`end()`), nothing more is: that write may still wait for a
    slow client when a shutdown or a hang-up interrupts it, but its bytes, the chunked
    terminator last, are already queued, and anything after them would reach the client as
    the start of the next response on the connection."""

    __slots__ = ("_pings", "_request", "_streams", "_task", "ended", "response", "writer")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        app = request.app  # (a property that walks the match info: read once)
        self._pings = app[PINGS_KEY]
        self.response = _EventStream(self._pings)
        self._streams = app[STREAMS_KEY]
        self.writer: AbstractStreamWriter | None = None
        self._task: asyncio.Task[Any] | None = None
        self.ended = False

    async def start(self, first: bytes, *, last: bool = False) -> None:
        """Send the headers with the stream's first events, in one write (with `last`, the
        whole stream: `first` holds its end too, and the response ends with it)."""
        request = self._request
        trace = request[TRACE_KEY]
        response = self.response
        answer_headers(request, trace, response, request.app[SHUTTING_DOWN_KEY])
        writer = self.writer = await response.prepare(request)
        # (the pings' loop: `current_task()` without one asks for it, a getpid() system call)
        task = self._task = self._pings.current_task()
        if task is not None:
            self._streams.add(task)
        if last:
            await self.end(first)
        elif writer is not None:
            await writer.write(first)  # (the response's own `write()` is one frame more)

    async def error(
        self, exc: GatewayError, frame: Callable[[GatewayError], bytes] = _error_frame
    ) -> None:
        """Report a failure after the 200 went out: an error event, then the end of the stream."""
        if self.response.prepared and not self.ended:  # before: the client already hung up
            await self.response.write(frame(exc))

    async def end(self, last: bytes) -> None:
        """Write the stream's `last` events and finish the response, in one write.

        Raises:
            ConnectionError: the client hung up.
        """
        self.response.stop_streaming()
        self.ended = True
        await self.response.write_eof(last)

    async def close(self) -> None:
        """Stop pings and finish the HTTP response; safe after a client disconnect."""
        if not self.response.prepared or self.ended:
            return
        self.response.stop_streaming()
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.response.write_eof()

    def forget(self) -> None:
        """No longer count the stream as open (for shutdown and the open-streams gauge)."""
        if self._task is not None:
            self._streams.discard(self._task)


async def relay(
    request: web.Request,
    events: AsyncIterator[list[bytes]],
    *,
    frame: Callable[[list[bytes]], bytes] = data_frames,
    error_frame: Callable[[GatewayError], bytes] = _error_frame,
    end: bytes = DONE,
    status_of: Callable[[GatewayError], int] = lambda exc: exc.status,
) -> web.StreamResponse:
    """Stream `events` to the client; the 200 goes out only once the first batch is there.

    A failure before the first batch propagates (the caller answers with its status); after
    it, the stream ends with an error event and the trace records the status. The trace also
    records whether the upstream finished the stream or broke it (`upstream_ok`, for its
    account's breaker): a client hanging up, a shutdown or a bug of ours is neither.

    Args:
        frame: turns one batch into the bytes of its SSE events.
        error_frame: the SSE event of a failure.
        end: written after the last batch (chat streams: `data: [DONE]`).
        status_of: the status a failure stands for, for the usage row (the route's error
            shape may use other statuses than the gateway's own).
    """
    trace = request[TRACE_KEY]
    trace.upstream_ok = None  # (not what an earlier relay of the request, a failed way, said)
    try:
        first = await anext(aiter(events))
    except GatewayError as exc:
        # Before any byte went out, but perhaps after the attempt's first batch (a converter
        # between the two may have had nothing to send yet): its account is still told.
        if _blames_account(exc):
            trace.upstream_ok = False
        raise
    sse = SSEStream(request)
    try:
        if type(first) is Last:  # the whole stream came at once: one write for all of it
            trace.upstream_ok = True
            await sse.start(frame(first) + end, last=True)
            return sse.response
        await sse.start(frame(first))
        writer = sse.writer
        last = end
        if writer is not None:
            # The payload writer's own `write()`: the response's adds a frame to every batch
            # (its checks hold here: the response is prepared and not ended).
            async for batch in events:
                if type(batch) is Last:  # the upstream is done: the end goes with it
                    last = frame(batch) + end
                    break
                await writer.write(frame(batch))
            trace.upstream_ok = True  # (even if the client hangs up before it has the end)
        await sse.end(last)
    except GatewayError as exc:
        trace.status = status_of(exc)
        if _blames_account(exc):
            trace.upstream_ok = False
        drop_tracebacks(exc)
        await _try(sse.error(exc, error_frame))
    except ConnectionError:
        trace.status = CLIENT_CLOSED  # the client hung up; the upstream is closed by its owner
    except asyncio.CancelledError:
        if not request.app[SHUTTING_DOWN_KEY].is_set():
            raise
        if sse.ended:  # only the wait for a slow client to take the end was cut short
            trace.status = sse.response.status
        else:
            shutdown = GatewayStopping()
            trace.status = status_of(shutdown)
            await _try(sse.error(shutdown, error_frame))
        raise
    except Exception as exc:
        # The 200 is out: a bug must still end the stream with an error the SDK raises.
        log.exception("stream_failed")
        drop_tracebacks(exc)
        failure = GatewayError("The gateway failed while streaming the response.")
        trace.status = status_of(failure)
        await _try(sse.error(failure, error_frame))
    finally:
        sse.forget()
        if not sse.ended:
            await sse.close()
    return sse.response


def _blames_account(exc: GatewayError) -> bool:
    """Whether a stream's failure is its account's (`errors.fault_of`, the rule failover
    applies before the first byte): refused credentials too, as a failure of the account
    (the key opened the stream; only before the first byte do they disable it)."""
    return fault_of(exc) in (Fault.UPSTREAM, Fault.CREDENTIALS)


async def _try(aw: Awaitable[None]) -> None:
    with contextlib.suppress(ConnectionError):
        await aw
