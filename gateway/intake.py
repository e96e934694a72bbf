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

A compressed body (`Content-Encoding: gzip` or `deflate`) is inflated here, not by aiohttp
(`server` turns its `auto_decompress` off): aiohttp inflates all a socket read holds at once,
and once `request.read()` raised its buffer to `max_body_bytes`, up to that much a step, so a
bomb of a few hundred kB took many times the limit before the limit was checked. Here each
piece read is inflated in steps of 256 kB, to at most what the limit has left plus one byte:
a body over the limit costs the limit and a step, and is a 413. Other codings (`br`, `zstd`,
several at once) are a 415: the gateway inflates only what it can bound.
"""

from __future__ import annotations

import asyncio
import zlib
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
        if hdrs.CONTENT_ENCODING in request.headers:  # (rare: the common case skips it)
            timeout = request[SNAPSHOT_KEY].settings.server.client_body_timeout
            async with asyncio.timeout(timeout):
                return await _inflated(request)
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
        raise _too_large(request) from None
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


# zlib's window bits: gzip's header, zlib's (RFC 1950 "deflate"), or none (a raw deflate
# stream, which clients send as "deflate" too; aiohttp accepts both).
_WBITS = {"gzip": 31, "x-gzip": 31, "deflate": 15}
# The most inflated at a time: zlib builds a step's output in blocks and then copies them into
# one, so a step costs twice its size for a moment.
_STEP = 256 * 1024


def _too_large(request: web.Request) -> PayloadTooLarge:
    limit = request[SNAPSHOT_KEY].settings.server.max_body_bytes
    return PayloadTooLarge(f"Request body is too large (at most {limit} bytes).")


async def _inflated(request: web.Request) -> bytes:
    """The body of a request with a `Content-Encoding`, inflated in bounded steps.

    Raises:
        PayloadTooLarge: inflated, it is larger than `max_body_bytes`.
        InvalidRequest: a coding the gateway does not inflate (415), or a body not in it.
    """
    coding = request.headers[hdrs.CONTENT_ENCODING].strip().lower()
    if coding in ("", "identity"):
        return await request.read()
    wbits = _WBITS.get(coding)
    if wbits is None:
        error = InvalidRequest(
            f"Content-Encoding {coding[:40]!r} is not supported: send the body as it is, or "
            "compressed with gzip or deflate.",
            code="unsupported_content_encoding",
            status=415,
        )
        error.closes = True  # its body is not read
        raise error
    room = request[SNAPSHOT_KEY].settings.server.max_body_bytes + 1  # one byte past: too large
    inflate = None
    out: list[bytes] = []  # pieces, not a bytearray: no over-allocation as it grows
    content = request.content
    while piece := await content.readany():
        try:
            while piece:
                if inflate is None or inflate.eof:  # the first member, or the next one
                    if inflate is None and wbits == 15 and piece[0] & 0xF != 8:
                        wbits = -15  # no zlib header: a raw deflate stream
                    inflate = zlib.decompressobj(wbits)
                data = inflate.decompress(piece, min(room, _STEP))
                room -= len(data)
                if not room:
                    out.clear()
                    raise _too_large(request)
                out.append(data)
                piece = inflate.unconsumed_tail or (inflate.unused_data if inflate.eof else b"")
        except zlib.error:
            raise _not_in_coding() from None
    if inflate is not None and not inflate.eof:
        raise _not_in_coding()
    body = request._read_bytes = b"".join(out)  # what the handler's `request.read()` returns
    return body


def _not_in_coding() -> InvalidRequest:
    error = InvalidRequest(
        "The request body could not be read: its Content-Encoding does not match it.",
        code="malformed_body",
    )
    error.closes = True
    return error


def check_length(request: web.Request, snapshot: Snapshot) -> None:
    """Refuse a body its `Content-Length` says is too large before any of it is read.

    Raises:
        PayloadTooLarge: it is over `max_body_bytes`.
    """
    limit = snapshot.settings.server.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise PayloadTooLarge(f"Request body is too large (at most {limit} bytes).")
