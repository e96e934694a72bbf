"""Server-sent events to the client, on top of aiohttp-sse's `EventSourceResponse`.

aiohttp-sse gives us the headers proxies need (no-cache, X-Accel-Buffering: no), never
compresses, pings with `: ping` comments during long silences, and aborts stalled peers.
Payloads that are already JSON bytes are framed here directly so relayed upstream chunks are
never decoded to `str` and back.
"""

from __future__ import annotations

import asyncio
import contextlib

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from gateway.errors import GatewayError, error_body
from gateway.middleware import TRACE_KEY
from gateway.state import STREAMS_KEY

__all__ = ["SSEStream"]

PING_SECONDS = 15.0


def _frame(payload: bytes) -> bytes:
    if b"\n" in payload:  # a multi-line payload needs a `data:` field per line
        payload = payload.replace(b"\n", b"\ndata: ")
    return b"data: %b\n\n" % payload


class SSEStream:
    """One client event stream: `start()`, then `send()` payloads, then `done()` or `error()`."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response = EventSourceResponse(
            sep="\n", allow_all_methods=True, ping_interval=PING_SECONDS
        )

    async def start(self) -> None:
        self.response.headers["X-Request-ID"] = self._request[TRACE_KEY].request_id
        await self.response.prepare(self._request)
        task = asyncio.current_task()
        if task is not None:
            self._request.app[STREAMS_KEY].add(task)

    async def send(self, payload: bytes) -> None:
        await self.response.write(_frame(payload))

    async def send_batch(self, payloads: list[bytes]) -> None:
        """Frame several events and write them with one call (one syscall, not one each)."""
        if len(payloads) == 1:
            await self.send(payloads[0])
        else:
            await self.response.write(b"".join([_frame(p) for p in payloads]))

    async def error(self, exc: GatewayError) -> None:
        """Report a failure after the 200 went out: an error event, then the end of the stream."""
        if self.response.prepared:  # before that, the client already hung up
            await self.send(error_body(exc))

    async def done(self) -> None:
        await self.response.write(b"data: [DONE]\n\n")

    async def close(self) -> None:
        """Stop pings and finish the HTTP response; safe after a client disconnect."""
        if not self.response.prepared:
            return
        self.response.stop_streaming()
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.response.write_eof()
