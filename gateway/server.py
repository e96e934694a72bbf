"""The HTTP server under the app: aiohttp's protocol with the gateway's rules for bad clients.

aiohttp answers what its parser refuses (bad header bytes, oversized headers, bad chunking)
with its own text/plain 400 that echoes the offending bytes, and logs them at error level,
where a client's key can end up. `GatewayProtocol` answers them as OpenAI-shaped JSON with an
`x-request-id`, names only the kind of problem, and logs at most a few lines a minute. It also
bounds the time a client may take to send its headers (`client_header_timeout`, answered
with 408), which aiohttp does not. `GatewayRunner` is `web.AppRunner` with that protocol;
`serve()` runs an app on it until SIGINT or SIGTERM (as `web.run_app` does with its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import http_exceptions, web, web_protocol
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestPayloadError

from gateway import hangups
from gateway.errors import GatewayError, InvalidRequest, RequestTimeout
from gateway.logs import flush_lines
from gateway.middleware import SERVER_NAME, error_response, mint_request_id
from gateway.sse_pings import SEND_TIMEOUT
from gateway.state import SETTINGS_KEY

__all__ = ["GatewayProtocol", "GatewayRunner", "LogThrottle", "serve"]

log = structlog.get_logger("gateway.server")

# What a parser error is about, by its class: never its message, which quotes the raw bytes.
_PROBLEMS: tuple[tuple[type[BaseException], str], ...] = (
    (http_exceptions.LineTooLong, "a request line or header is too long"),
    (http_exceptions.BadHttpMethod, "the request method is not valid"),
    (http_exceptions.InvalidURLError, "the request target is not valid"),
    (http_exceptions.BadStatusLine, "the request line is not valid"),
    (http_exceptions.InvalidHeader, "a header is not valid"),
    (http_exceptions.TransferEncodingError, "the chunked body is not valid"),
    (http_exceptions.ContentLengthError, "the body does not match its Content-Length"),
    (http_exceptions.ContentEncodingError, "its Content-Encoding is not supported"),
    (http_exceptions.BadHttpMessage, "the request is not valid HTTP"),
)


class LogThrottle:
    """At most `limit` log lines per `period` seconds; what it held back is counted and
    reported with the next line that goes out."""

    def __init__(self, limit: int, period: float, clock: Callable[[], float] = time.monotonic):
        self._limit, self._period, self._clock = limit, period, clock
        self._window = -1.0
        self._sent = 0
        self.suppressed = 0

    def allow(self) -> bool:
        now = self._clock()
        if now - self._window >= self._period:
            self._window, self._sent = now, 0
        if self._sent >= self._limit:
            self.suppressed += 1
            return False
        self._sent += 1
        return True


def _problem(exc: BaseException | None) -> str:
    for kind, text in _PROBLEMS:
        if isinstance(exc, kind):
            return text
    return "the request is not valid HTTP"


class HeaderTimeout(Exception):
    pass


FULL_COLLECTION_EVERY = 100  # middle-generation collections (Python's default: 10)
YOUNG_COLLECTION_EVERY = 2000  # allocations (Python's default: 700)


# A client that acknowledges none of what the gateway sent for SEND_TIMEOUT is gone: the
# kernel aborts its connection (TCP_USER_TIMEOUT, Linux), as aiohttp-sse does for a stream.
_TCP_USER_TIMEOUT: int | None = getattr(socket, "TCP_USER_TIMEOUT", None)


def _abort_stalled_peers(transport: asyncio.BaseTransport) -> None:
    """Set the send timeout once per connection, not per stream: aiohttp-sse reads, sets and
    restores it around every stream, three system calls each. An idle keep-alive connection
    is not affected (nothing is unacknowledged); a stream to a peer that stopped reading,
    or a long answer it never takes, is."""
    if _TCP_USER_TIMEOUT is None:
        return
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):  # the peer may already be gone
            sock.setsockopt(socket.IPPROTO_TCP, _TCP_USER_TIMEOUT, int(SEND_TIMEOUT * 1000))


class GatewayProtocol(web_protocol.RequestHandler):
    """aiohttp's request handler with JSON errors, throttled logs and a header timeout.

    The header timer runs from the connection's start, and again from the first byte of each
    later request, until the parser has a whole request head; when it fires while the
    connection waits for that head, the client gets a 408 and the connection closes.
    """

    __slots__ = ("_awaiting_head", "_body", "_head_timer", "_header_timeout", "_throttle")

    def __init__(
        self,
        manager: web.Server,
        *,
        header_timeout: float,
        throttle: LogThrottle,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, **kwargs)
        self._header_timeout = header_timeout
        self._throttle = throttle
        self._awaiting_head = True
        self._head_timer: asyncio.TimerHandle | None = None
        # The body of the last request queued: a parser error after its head belongs to it.
        self._body: StreamReader | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        _abort_stalled_peers(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        self._disarm()
        # The last request's body holds this protocol: kept past the connection (a request
        # cancelled when its client hung up never reaches finish_response), it is a cycle.
        self._body = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        before = self._request_count
        super().data_received(data)
        if self._request_count != before:  # a request head is complete (or refused)
            self._awaiting_head = False
            self._disarm()
            info, payload = self._messages[-1]
            if not isinstance(info, web_protocol._ErrInfo):
                self._body = payload
            elif self._body is not None and not self._body.is_eof():
                self._fail_body(self._body, info)
        elif self._awaiting_head and data and self._head_timer is None:
            self._arm()  # the first bytes of a later request on a kept-alive connection

    def _fail_body(self, body: StreamReader, info: web_protocol._ErrInfo) -> None:
        """A parser error in the body of the last request (a bad chunk): aiohttp queues it as
        the next request and leaves the body waiting for more, until the body timeout (a 408).
        The body's read fails instead (a 400), and nothing more is read from this connection.
        That request may be queued, started, or between the two (its handler's task not yet
        run: a bad chunk read in the loop turn after its head's), so its body is the one kept
        when its head was queued, not the request being served."""
        self._messages.pop()
        body.set_exception(RequestPayloadError("malformed body"), info.exc)
        self._close = True

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        self._awaiting_head = not self._messages  # the next request's head is still to come
        if self._body is request.content:  # answered: what follows is no longer its body
            self._body = None
        return await super().finish_response(request, resp, start_time)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self._loop.call_later(self._header_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        waiter = self._waiter
        if not self._awaiting_head or self._messages or waiter is None or waiter.done():
            return  # a request is being served: its body has its own timeout
        # Queue an error in place of the request that never came: the connection's own
        # loop answers it (with handle_error below) and closes, reading nothing more.
        info = web_protocol._ErrInfo(status=408, exc=HeaderTimeout(), message="")
        self._messages.append((info, EMPTY_PAYLOAD))
        self._close = True
        waiter.set_result(None)

    def log_exception(self, *args: Any, **kwargs: Any) -> None:
        """aiohttp's own error logs, by their kind only: their texts quote request bytes."""
        exc = kwargs.get("exc_info")
        self._log(
            "http_protocol_error",
            error=type(exc).__name__ if isinstance(exc, BaseException) else None,
        )

    def _log(self, event: str, **fields: Any) -> None:
        if self._throttle.allow():
            suppressed, self._throttle.suppressed = self._throttle.suppressed, 0
            log.warning(event, suppressed=suppressed, **fields)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """The answer to a request aiohttp could not parse or serve, in the gateway's shape.

        Raises:
            ConnectionError: part of a response was already sent (aiohttp's contract).
        """
        error: GatewayError
        if status == 408:
            error = RequestTimeout(
                f"The request headers did not arrive within {self._header_timeout:g} s."
            )
        elif status == 400:
            error = InvalidRequest(
                f"Malformed HTTP request: {_problem(exc)}.", code="malformed_request"
            )
        else:  # a handler failed past the error middleware (it should not)
            error = GatewayError("The gateway failed to process the request.", status=status)
        request_id = mint_request_id()
        # The kind of error only: its text quotes the raw request bytes.
        self._log(
            "bad_http_request",
            request_id=request_id,
            status=error.status,
            error=type(exc).__name__ if exc is not None else None,
        )
        if request.writer.output_size > 0:
            raise ConnectionError("Response is sent already, cannot send an error response")
        resp = error_response(error)
        resp.headers["X-Request-ID"] = request_id
        resp.headers["Server"] = SERVER_NAME
        resp.force_close()
        return resp


class _GatewayServer(web.Server):
    """aiohttp's low-level server, making a `GatewayProtocol` per connection."""

    def __init__(self, base: web.Server, header_timeout: float) -> None:
        super().__init__(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,
            # A compressed request body is inflated by `intake.read_body`, in bounded steps.
            **{**base._kwargs, "auto_decompress": False},
        )
        self._header_timeout = header_timeout
        # One throttle per server: a flood over many connections shares it.
        self._throttle = LogThrottle(limit=10, period=60.0)

    def __call__(self) -> GatewayProtocol:
        return GatewayProtocol(
            self,
            loop=self._loop,
            header_timeout=self._header_timeout,
            throttle=self._throttle,
            **self._kwargs,
        )


class GatewayRunner(web.AppRunner):
    """`web.AppRunner` whose connections speak `GatewayProtocol`."""

    async def _make_server(self) -> web.Server:
        base = await super()._make_server()
        return _GatewayServer(base, self.app[SETTINGS_KEY].server.client_header_timeout)


async def _run(
    app: web.Application,
    host: str,
    port: int,
    announce: Callable[[], None],
    sock: socket.socket | None = None,
) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # An event, not aiohttp's GracefulExit: the cleanup below must run while the requests
        # in flight still run (they get the grace period), not after they were all cancelled.
        hangups.stop_on(loop, sig, stop.set)  # (also in a stream of SIGHUPs: gateway.hangups)
    runner = GatewayRunner(
        app,
        access_log=None,
        # The grace period is spent in the app's on_shutdown (see app.py); after it, what is
        # still running only gets a moment to unwind.
        shutdown_timeout=1.0,
        # A client that hangs up cancels its handler, which closes the upstream request.
        handler_cancellation=True,
        keepalive_timeout=75.0,
    )
    # One cleanup for a start that fails too (a bad price id, a database gone): the app's
    # contexts that started end, and with them the database's thread, which is not a daemon
    # (left open, the process printed its error and never exited).
    try:
        await runner.setup()
        # What start-up made (modules, settings, the price database: ~90k objects) lives as
        # long as the process: out of the collector's sight, a full collection under load
        # takes microseconds instead of ~90 ms that every open stream and request would wait
        # for.
        gc.collect()
        gc.freeze()
        # A full collection still scans every object of every open stream and request (~100
        # ms at 1,000 streams here): consider one after 100 middle-generation collections
        # instead of 10, so it comes about once a minute or two under load rather than every
        # few seconds. A request leaves no cycles (tests/test_openai_provider.py), so the
        # young generation is only what requests in flight hold: collected every 2,000
        # allocations rather than 700, short requests at concurrency 32 take a collection
        # about every 1,300 requests, not every forty (~6 us a request); the long streams'
        # chunk delays were unchanged.
        _, middle, _ = gc.get_threshold()
        gc.set_threshold(YOUNG_COLLECTION_EVERY, middle, FULL_COLLECTION_EVERY)
        backlog = app[SETTINGS_KEY].server.listen_backlog
        if sock is not None:  # a worker of `gateway serve --workers N` (see workers.py)
            await web.SockSite(runner, sock, backlog=backlog).start()
        else:
            await web.TCPSite(runner, host, port, backlog=backlog).start()
        announce()
        kind = type(loop).__module__.partition(".")[0]
        log.info(
            "serving",
            loop=kind,
            backlog=backlog,
            frozen_objects=gc.get_freeze_count(),
            gc_thresholds=gc.get_threshold(),
        )
        await stop.wait()
    finally:
        await runner.cleanup()
        flush_lines()  # the last requests' lines, buffered for a turn that may not come
        hangups.stopped(loop)


def loop_factory(use_uvloop: bool) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is wanted and installed (it has no Windows build), else
    None: asyncio's own. uvloop runs the same code with about half the CPU per event."""
    if not use_uvloop:
        return None
    try:
        import uvloop  # here: it is optional (no Windows build)
    except ImportError:  # pragma: no cover (a dependency wherever it builds)
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def serve(
    app: web.Application,
    host: str,
    port: int,
    announce: Callable[[], None],
    sock: socket.socket | None = None,
) -> None:
    """Serve `app` until SIGINT or SIGTERM; `announce()` runs once the port is bound (or,
    given a listening `sock`, once it serves on it).

    Raises:
        OSError: the address cannot be bound.
    """
    factory = loop_factory(app[SETTINGS_KEY].server.uvloop)
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_run(app, host, port, announce, sock))
