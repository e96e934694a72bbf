"""What happens before a request's body is read: size, admission, and a timeout on the body.

`middleware.gateway` runs it after authentication. A `Content-Length` over `max_body_bytes`
is answered 413 at once (`check_length`). A model request (a POST with a key) then takes a
slot of its key's concurrency and a request of its request rate (`Gate.enter`), so a client
past its limits is refused before one byte of its body is buffered; its tokens and budget are
charged once the body shows what it may use (`pipeline.begin`). `read_body()` reads a body within
`client_body_timeout` (408 after it) and turns a body the parser rejects (bad chunking, a
`Content-Encoding` it is not in) into a 400; the body is then cached on the request, so a
handler's own `request.read()` returns it at once. A client that sent `Expect: 100-continue`
is told to continue only then (`expect_later`), so a refused one never sends its body.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from aiohttp import hdrs, http_exceptions, web
from aiohttp.http import HttpVersion11
from aiohttp.web_protocol import RequestPayloadError

from gateway.errors import InvalidRequest, PayloadTooLarge, RequestTimeout
from gateway.state import SNAPSHOT_KEY

if TYPE_CHECKING:
    from gateway.snapshot import Snapshot

__all__ = ["check_length", "expect_later", "read_body"]


async def expect_later(request: web.Request) -> None:
    """Every route's `Expect` handler: aiohttp's default answers `100-continue` before any
    middleware has run (and an unknown expectation with a plain-text 417); `read_body`
    answers it instead, once the request is admitted."""


async def _continue(request: web.Request) -> None:
    expect = request.headers[hdrs.EXPECT]
    if request.version != HttpVersion11:
        return
    if expect.lower() != "100-continue":
        raise InvalidRequest(
            "The Expect header can only be 100-continue.", code="expectation_failed", status=417
        )
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the response proper has not begun


async def read_body(request: web.Request) -> bytes:
    """The request's whole body, read within the server's `client_body_timeout`.

    Raises:
        RequestTimeout: the body did not arrive in time (408; the connection is closed).
        PayloadTooLarge: it is larger than `max_body_bytes`.
        InvalidRequest: the parser could not read it (bad chunking or content encoding).
    """
    if hdrs.EXPECT in request.headers:  # (rare: no coroutine made for it otherwise)
        await _continue(request)
    timeout = 0.0
    try:
        if request.content.is_eof():
            # Already here whole (a small body comes with its head): nothing to wait for, so
            # no timer to arm and cancel (asyncio.timeout costs ~11 us a request).
            return await request.read()
        timeout = request[SNAPSHOT_KEY].settings.server.client_body_timeout
        async with asyncio.timeout(timeout):
            return await request.read()
    except TimeoutError:
        raise RequestTimeout(
            f"The request body did not arrive within {timeout:g} s.", code="request_timeout"
        ) from None
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge("Request body is too large.") from None
    except (RequestPayloadError, http_exceptions.HttpProcessingError) as exc:
        # Never the error's text: it quotes the raw bytes.
        cause = exc.__cause__ or exc
        what = (
            "its Content-Encoding does not match it"
            if isinstance(cause, http_exceptions.ContentEncodingError)
            or "ncod" in type(cause).__name__
            else "it is not valid HTTP framing"
        )
        error = InvalidRequest(
            f"The request body could not be read: {what}.", code="malformed_body"
        )
        error.closes = True
        raise error from None


def check_length(request: web.Request, snapshot: Snapshot) -> None:
    """Refuse a body its `Content-Length` says is too large before any of it is read.

    Raises:
        PayloadTooLarge: it is over `max_body_bytes`.
    """
    limit = snapshot.settings.server.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"Request body is too large (at most {limit} bytes).")
