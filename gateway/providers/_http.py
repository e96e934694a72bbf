"""The one HTTP client every provider reaches its upstream through, with one set of rules.

Upstreams are untrusted, so the rules are those of a reverse proxy (nginx and Envoy never
follow an upstream's redirect and bound every buffer):

- A redirect is never followed: a `3xx` is an `UpstreamBadResponse` (502, naming the status,
  never the `Location`), and nothing is sent to the host it names.
- A whole answer is read up to the provider's `max_response_bytes`, one stream event up to
  its `max_event_bytes`, counted after decompression (aiohttp inflates in bounded steps as
  the body is read, so a compressed body is never inflated past the limit). Past a limit the
  connection is closed, not returned to the pool. Error bodies are read up to 64 KiB. What
  all of a provider's requests hold at once is bounded too (`max_buffered_bytes`).
- What it hands back (answers, error bodies, events) is valid UTF-8: invalid bytes are read
  as U+FFFD, as the SSE standard reads a stream, so no later decode of an upstream's text
  can fail. Nor does it hold the key it sent, raw or JSON-escaped (`_secrets`): an upstream
  (or a proxy before it) that quotes the key in an error message or an answer would
  otherwise hand it to the client.
- Every request carries the gateway's `x-request-id`.
- A stream that the upstream ended (`[DONE]`, a terminal event: `done()`) before the end of
  its chunked body arrived keeps its connection for the pool, released when that end comes;
  one whose body never ends is closed after `LINGER_SECONDS`, and nothing waits for it.
- Client-side failures (refused, reset, timed out) become `UpstreamConnectionError` or
  `UpstreamTimeout`, and an answer that is not valid HTTP (a broken head or chunk, a body its
  Content-Encoding does not decode, a 101) an `UpstreamBadResponse`, before a byte of the
  answer is used.

A provider supplies what differs as a `Dialect`: the headers that carry an account's key,
fixed headers (an API version), how error answers are classified, and how a stream is split
into events. URLs and body codecs stay with the provider.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import aiohttp
import msgspec

from gateway.background import mark_seen
from gateway.errors import (
    UpstreamBadResponse,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.providers._answers import answer_error
from gateway.providers._errors import DECODE_ERRORS, error_from_status, upstream_failure
from gateway.providers._pool import PoolGate
from gateway.providers._secrets import Secret, StreamRedactor, clean, redact
from gateway.providers._sse import EventTooLarge, Framed, FrameDecoder, SSEDecoder, utf8
from gateway.providers._watchdog import Watch, Watchdog
from gateway.settings import UpstreamConfig

__all__ = [
    "Attempt",
    "Dialect",
    "Relay",
    "StreamDone",
    "UpstreamClient",
    "bearer",
    "done",
    "key_header",
]

T = TypeVar("T")

# Enough for any error envelope; the rest of a larger error body is not read.
ERROR_BODY_BYTES = 64 * 1024

# How long a stream's connection is kept, once the stream is done, for the rest of its body
# (a healthy upstream's follows at once): then it can be reused, not closed (`_linger`).
LINGER_SECONDS = 1.0

Classifier = Callable[[str, int, bytes, Mapping[str, str]], UpstreamError]


class Relay(Protocol):
    """What a provider makes of each batch of a stream it reads (`UpstreamClient.stream`)."""

    def each(self, batch: list[bytes]) -> tuple[list[bytes], bool, UpstreamError | None]:
        """(the batch for the client, whether the stream is done, an error to end it with)."""
        ...

    def end(self) -> None:
        """The upstream ended the stream without a batch saying it was done.

        Raises:
            UpstreamError: the stream must not look complete.
        """
        ...


class Attempt(Protocol):
    """What the client needs of the call it makes (a `ChatCall` is one)."""

    api_key: str | None
    request_id: str
    first_byte_at: float | None


def bearer(api_key: str) -> dict[str, str]:
    """`Authorization: Bearer <key>` (OpenAI and compatible servers)."""
    return {"authorization": f"Bearer {api_key}"}


def key_header(name: str) -> Callable[[str], dict[str, str]]:
    """The key in a header of its own (`x-api-key`, `x-goog-api-key`, Azure's `api-key`)."""
    return lambda api_key: {name: api_key}


@dataclass(frozen=True, slots=True)
class Dialect:
    """What one upstream API does differently from the others, for the one client."""

    auth: Callable[[str], Mapping[str, str]]
    headers: Mapping[str, str] = field(default_factory=dict)
    classify: Classifier = error_from_status
    frames: Callable[[int], FrameDecoder] = SSEDecoder


def _unary_timeout(cfg: UpstreamConfig) -> aiohttp.ClientTimeout:
    # A non-streaming answer's headers only come once it is generated, so the first-byte bound
    # (a stream's) does not apply; the longest silence does. A per-read timer would only add
    # work per read, so both bounds are one `total`.
    return aiohttp.ClientTimeout(
        total=min(cfg.total_timeout, cfg.read_timeout), sock_connect=cfg.connect_timeout
    )


def _stream_timeout(cfg: UpstreamConfig) -> aiohttp.ClientTimeout:
    # No total: a long, healthy generation must never be cut. No sock_read either: aiohttp
    # would arm a timer per read; the client's watchdog bounds each silence instead.
    return aiohttp.ClientTimeout(total=None, sock_connect=cfg.connect_timeout)


class UpstreamClient:
    """One provider's calls: a JSON POST answered whole, or an event stream opened.

    Failures are raised as `UpstreamError`s before any byte of the answer is used, so the
    caller can still answer with a status (or try another route).
    """

    def __init__(
        self, config: UpstreamConfig, session: aiohttp.ClientSession, dialect: Dialect
    ) -> None:
        self.config = config
        self._session = session
        self._dialect = dialect
        self._unary_timeout = _unary_timeout(config)
        self._stream_timeout = _stream_timeout(config)
        self._base = {"content-type": "application/json", **dialect.headers, **config.headers}
        self._by_account: dict[str | None, dict[str, str]] = {}
        self._secrets: dict[str | None, Secret | None] = {}
        self._free = config.max_buffered_bytes  # of what all its requests may hold at once
        first = config.first_byte_timeout or config.read_timeout
        self.watchdog = Watchdog(first, config.read_timeout)
        self.pool = PoolGate(config.name, config.max_connections, config.pool_timeout)
        self.stats = self.pool.stats

    def headers(self, attempt: Attempt, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The headers of one request: its account's (built once per account), its id, and
        `extra` ones the request carries on (e.g. the client's `anthropic-beta`)."""
        account = self._by_account.get(attempt.api_key)
        if account is None:
            account = dict(self._base)
            if attempt.api_key:
                account.update(self._dialect.auth(attempt.api_key))
            self._by_account[attempt.api_key] = account
        if extra:
            account = {**account, **extra}
        return {**account, "x-request-id": attempt.request_id} if attempt.request_id else account

    def redact(self, data: bytes, attempt: Attempt) -> bytes:
        """`data` with the key `attempt` sent redacted: an answer made from the upstream's
        (a translation joins text the upstream sent apart, so the key may be whole only there)."""
        return redact(data, self._secret(attempt))

    def _secret(self, attempt: Attempt) -> Secret | None:
        """The key `attempt` sends, to be redacted from what comes back (made once a key)."""
        try:
            return self._secrets[attempt.api_key]
        except KeyError:
            secret = self._secrets[attempt.api_key] = Secret.of(attempt.api_key)
            return secret

    def decode(self, decoder: msgspec.json.Decoder[T], data: bytes, what: str) -> T:
        """An upstream answer (`what` the API promises) as `decoder`'s type.

        Raises:
            UpstreamError: it is not: the error it carries, or a bad response
                (`_answers.answer_error`).
        """
        try:
            return decoder.decode(data)
        except DECODE_ERRORS:
            raise answer_error(self.config.name, data, what) from None

    async def post(
        self,
        url: str,
        body: bytes,
        attempt: Attempt,
        extra: Mapping[str, str] | None = None,
        *,
        limit: int | None = None,
    ) -> bytes:
        """POST `body` and return the upstream's whole 2xx answer (`extra`: more headers), of
        at most `limit` bytes (default: the provider's `max_response_bytes`).

        Raises:
            UpstreamError: an error status, a redirect, an answer over the size limit, or a
                failure to reach the upstream.
        """
        try:
            async with (
                self.pool,
                self._session.post(
                    url,
                    data=body,
                    headers=self.headers(attempt, extra),
                    timeout=self._unary_timeout,
                    allow_redirects=False,
                ) as resp,
            ):
                if not 200 <= resp.status < 300:
                    raise await self._failure(resp, attempt)
                data = await self._read(resp, limit or self.config.max_response_bytes)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise upstream_failure(self.config.name, exc) from exc
        # Only an answer counts: a refused call must not be charged as if it ran.
        attempt.first_byte_at = attempt.first_byte_at or time.monotonic()
        return redact(utf8(data), self._secret(attempt))

    async def stream(
        self,
        url: str,
        body: bytes,
        attempt: Attempt,
        extra: Mapping[str, str] | None = None,
        *,
        passthrough: bool = False,
        relay: Relay | None = None,
    ) -> AsyncGenerator[list[bytes], None]:
        """POST `body` and yield the payloads of the upstream's events, batched by read.

        A batch holds every event one network read completed, so a burst of events costs one
        client write, and nothing waits for more input than has arrived. With `passthrough`,
        a read that is whole, canonical events (`_sse.canonical`), valid UTF-8 without the
        key comes as one `Framed` batch of its bytes, for a caller that relays them as SSE.
        With `relay`, what is yielded is what `relay.each` makes of each batch, in this one
        generator (a provider's generator around it would be resumed for every batch too).

        Raises:
            UpstreamError: before the first batch as for `post`; after it, a failure of the
                connection, an event over the size limit, or what `relay` raises or returns.
        """
        await self.pool.enter()
        lingering = False  # the slot went with the connection to `_linger`
        try:
            watch = self.watchdog.open()
            try:
                resp = await self._session.post(
                    url,
                    data=body,
                    headers=self.headers(attempt, extra),
                    timeout=self._stream_timeout,
                    allow_redirects=False,
                )
                ended = False  # the upstream said the stream is done (its `[DONE]`)
                try:
                    if not 200 <= resp.status < 300:
                        raise await self._failure(resp, attempt)
                    frames = self._dialect.frames(self.config.max_event_bytes)
                    secret = self._secret(attempt)
                    redactor: StreamRedactor | None = None  # made once a key's start is seen
                    held = 0
                    content: Any = resp.content
                    buffer: Any = ()  # no `_take` unless aiohttp's reader is the one known
                    if FAST_READS:
                        content._protocol = _ResumeWhenPaused(content._protocol)
                        buffer = content._buffer
                    try:
                        # `readany()` itself, not `iter_any()`'s iterator: its `__anext__` is
                        # one coroutine more per read; several chunks at once in one piece.
                        while piece := (
                            _take(content)
                            if len(buffer) > 1
                            and content._exception is None
                            and not content._buffer_offset
                            else await content.readany()
                        ):
                            if (
                                passthrough
                                and frames.passes(piece)
                                and (
                                    secret is None
                                    or (
                                        (redactor is None or not redactor.held)
                                        and secret.absent(piece)
                                    )
                                )
                                and (piece.isascii() or utf8(piece) is piece)
                            ):
                                batch: list[bytes] = Framed((piece,))  # nothing to repair
                            else:
                                batch = frames.feed(piece)
                                if frames.held != held:
                                    self._hold(resp, frames.held - held)
                                    held = frames.held
                                if secret is not None and (
                                    redactor is not None or not clean(batch, secret)
                                ):
                                    redactor = redactor or StreamRedactor(secret)
                                    batch = redactor.batch(batch)
                            if not batch:
                                if not watch.first:
                                    watch.last = time.monotonic()  # pings keep a stream open
                                continue
                            if watch.first:
                                attempt.first_byte_at = attempt.first_byte_at or time.monotonic()
                                watch.first, watch.limit = False, self.config.read_timeout
                            if relay is None:
                                watch.reading = False  # the client's pace is not the upstream's
                                try:
                                    yield batch
                                except StreamDone:  # the caller saw the upstream's last event
                                    ended = True
                                    return
                                watch.reading, watch.last = True, time.monotonic()
                                continue
                            out, done, error = relay.each(batch)
                            # (before the yield: the client's end may close this generator there)
                            ended = done and error is None
                            if out:  # events before an error event still reach the client
                                watch.reading = False
                                yield out
                                watch.reading = True
                            # The upstream answered, whether or not the client gets any of it
                            # (Azure's prompt filter results, a stripped usage chunk).
                            watch.last = time.monotonic()
                            if error is not None:
                                raise error
                            if done:
                                return
                        tail = frames.end()
                        if secret is not None and (tail or redactor is not None):
                            redactor = redactor or StreamRedactor(secret)
                            tail = [*redactor.batch(tail), *redactor.flush()]
                    except EventTooLarge:
                        resp.close()  # drop the connection: the rest of the event is not read
                        raise self._too_large("a stream event", "max_event_bytes") from None
                    finally:
                        frames.clear()  # a traceback may keep this frame, and so the decoder
                        self._free += held
                    if tail:
                        # The upstream has ended: the wait for the client to take the last
                        # event is the client's pace, not the upstream's silence.
                        watch.reading = False
                        if relay is None:
                            yield tail
                        else:
                            out, done, error = relay.each(tail)
                            if out:
                                yield out
                            if error is not None:
                                raise error
                            if done:
                                return
                finally:
                    if ended and not resp.content.is_eof():
                        _linger(resp, self.pool.leave)
                        lingering = True
                    else:
                        # (what `async with` on the response does)
                        resp.release()
                        await resp.wait_for_close()
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise upstream_failure(self.config.name, exc) from exc
            except asyncio.CancelledError:
                if not watch.timed_out():
                    raise
                raise self._silent(watch) from None
            finally:
                self.watchdog.close(watch)
        finally:
            if not lingering:
                self.pool.leave()
        if relay is not None:
            relay.end()

    def _silent(self, watch: Watch) -> UpstreamError:
        self.stats.stream_timeouts += 1
        if watch.first:
            timeout = UpstreamTimeout(
                f"The upstream provider '{self.config.name}' sent nothing within "
                f"{self.watchdog.first_byte_timeout:g} s."
            )
            timeout.unanswered = True
            return timeout
        return upstream_failure(self.config.name, TimeoutError())  # as aiohttp's timeout was

    async def _failure(self, resp: aiohttp.ClientResponse, attempt: Attempt) -> UpstreamError:
        if resp.status < 400:
            resp.close()  # its body and Location are not the client's business
            if resp.status < 300:  # 101: a protocol switch nobody asked for
                return UpstreamBadResponse(
                    f"The upstream provider '{self.config.name}' answered HTTP {resp.status}, "
                    "not a final answer."
                )
            return UpstreamBadResponse(
                f"The upstream provider '{self.config.name}' answered HTTP {resp.status} "
                "(a redirect); the gateway never follows upstream redirects."
            )
        body = await self._read(resp, ERROR_BODY_BYTES, truncate=True)
        body = redact(utf8(body), self._secret(attempt))
        return self._dialect.classify(self.config.name, resp.status, body, resp.headers)

    async def _read(
        self, resp: aiohttp.ClientResponse, limit: int, *, truncate: bool = False
    ) -> bytes:
        """The body of `resp`, at most `limit` bytes after decompression.

        Raises:
            UpstreamBadResponse: the body is larger (unless `truncate`: then its start).
        """
        declared = resp.content_length
        if declared is not None and declared > limit and not truncate:
            resp.close()
            raise self._too_large("an answer", "max_response_bytes", limit)
        content = resp.content
        if content.is_eof() and content.total_bytes <= limit:
            # All here already, within the limit (a small answer comes with its head): taken
            # as it is, without an async iterator and its StopAsyncIteration per answer
            # (about 17,000 instructions of a JSON request). `total_bytes` counts after
            # decompression; anything larger is read, and cut, piece by piece below.
            data = content.read_nowait()
            self._hold(resp, len(data))  # (and given back at once: it is read)
            self._free += len(data)
            return data
        pieces: list[bytes] = []
        size = 0
        try:
            async for piece in resp.content.iter_any():
                if size + len(piece) > limit:
                    resp.close()
                    if truncate:
                        pieces.append(piece[: limit - size])
                        break
                    raise self._too_large("an answer", "max_response_bytes", limit)
                self._hold(resp, len(piece))
                size += len(piece)
                pieces.append(piece)
        except BaseException:
            pieces.clear()  # the traceback keeps this frame: free the bytes, not just the count
            raise
        finally:
            self._free += size
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _hold(self, resp: aiohttp.ClientResponse, more: int) -> None:
        """Count `more` bytes of answers in memory (fewer, when negative) against the
        provider's `max_buffered_bytes`.

        Raises:
            UpstreamUnavailable: they would not fit; the connection is dropped.
        """
        if more > self._free:
            resp.close()
            raise UpstreamUnavailable(
                f"The gateway holds as much of the upstream provider '{self.config.name}''s "
                "answers as it may at once (the provider's max_buffered_bytes); retry later.",
                code="upstream_buffers_full",
            )
        self._free -= more

    def _too_large(self, what: str, setting: str, limit: int | None = None) -> UpstreamBadResponse:
        configured = getattr(self.config, setting)
        if limit is None or limit == configured:
            bound = f"the provider's {setting}"
        else:  # (the largest embeddings answer the request can get: `answer_limit`)
            bound = f"the most the request can be answered, over the provider's {setting}"
        return UpstreamBadResponse(
            f"The upstream provider '{self.config.name}' sent {what} larger than "
            f"{limit or configured} bytes ({bound})."
        )


def _reader_known() -> bool:
    """Whether aiohttp's body reader and connection are the ones `_take` and
    `_ResumeWhenPaused` were written against: aiohttp 3.14, with the private fields they use
    (tests/test_stream_reuse.py checks `_take` against `readany()` on a real reader). Any other
    aiohttp reads through its own `readany()`: slower, never wrong."""
    reader = set(getattr(aiohttp.streams.StreamReader, "__slots__", ()))
    connection = set(getattr(aiohttp.base_protocol.BaseProtocol, "__slots__", ()))
    return (
        aiohttp.__version__.startswith("3.14.")
        and {
            "_protocol", "_buffer", "_buffer_offset", "_exception", "_size", "_cursor",
            "_http_chunk_splits", "_low_water", "_low_water_chunks",
        } <= reader
        and {"_reading_paused", "_buffer_paused"} <= connection
    )  # fmt: skip


FAST_READS = _reader_known()


def _take(content: Any) -> bytes:
    """`readany()` of a body reader that holds several HTTP chunks, whole (none partly read):
    the same bytes, in one piece, and the reader left as `readany()` leaves it. aiohttp's
    takes the chunks one by one, with its bookkeeping for each (OpenAI sends an event a chunk:
    about 22 a stream), then joins them."""
    buffer = content._buffer
    data = b"".join(buffer)
    buffer.clear()
    size = len(data)
    content._size -= size
    cursor = content._cursor = content._cursor + size
    splits = content._http_chunk_splits
    if splits:
        # What `readany()` pops one by one, the offsets before the cursor: all of them but
        # the buffer's end, which only the last can be (they increase, and none is past it).
        last = splits[-1]
        splits.clear()
        if last == cursor:
            splits.append(last)
    if content._size < content._low_water and (
        splits is None or len(splits) < content._low_water_chunks
    ):
        content._protocol.resume_reading()
    return data


class _ResumeWhenPaused:
    """A stream's connection as its body's reader sees it: `resume_reading()` only when
    reading is paused.

    aiohttp's reader calls the connection's `resume_reading()` for every HTTP chunk it hands
    out, paused or not, and each call parses an empty input again: a stream whose events come
    one a chunk (OpenAI's) costs about 22 such calls per read, some 100,000 instructions a
    20-event stream. Pausing (flow control, decompression in bounded steps) sets the
    protocol's flags, so a resume is passed on whenever one can do anything."""

    __slots__ = ("_protocol",)

    def __init__(self, protocol: Any) -> None:
        self._protocol = protocol

    def resume_reading(self, resume_parser: bool = True) -> None:
        protocol = self._protocol
        if protocol._reading_paused or protocol._buffer_paused:
            protocol.resume_reading(resume_parser)

    def pause_reading(self) -> None:
        self._protocol.pause_reading()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._protocol, name)


class StreamDone(Exception):
    """Thrown into `UpstreamClient.stream` (`done()`) by a caller that read the upstream's last
    event in what it yielded: the stream ends there, as one whose relay said it was done."""


async def done(events: AsyncGenerator[list[bytes], None]) -> None:
    """End `events` (an `UpstreamClient.stream` without a relay) after the upstream's last
    event: unlike `aclose()`, its connection goes back to the pool once its body has ended,
    instead of being closed (`_linger`)."""
    with contextlib.suppress(StopAsyncIteration, StreamDone):
        await events.athrow(StreamDone())


def _linger(resp: aiohttp.ClientResponse, leave: Callable[[], None]) -> None:
    """Let the connection of a stream that said it was done (`[DONE]`) before its body's end
    (the chunked terminator) arrived go back to the pool when that end comes: aiohttp releases
    it itself at the end of the body. Nothing waits for it; an upstream that never ends the body
    has it closed after `LINGER_SECONDS`. (Released now, it would be closed: a connection whose
    body is unfinished is never reused.) Until then the connection is still open to the
    upstream, so it keeps its `max_connections` slot: `leave` frees it, once, at whichever end
    comes first, or as soon as the connection is lost meanwhile (reset, closed, or bytes that
    are no HTTP: aiohttp then calls no end-of-body callback)."""
    protocol = resp.connection.protocol if resp.connection is not None else None
    closed = protocol.closed if protocol is not None else None
    if closed is None:  # lost before it lingered (or detached): nothing is open any more
        resp.close()
        leave()
        return
    left = False

    def gone(close: bool) -> None:
        nonlocal left
        if left:
            return
        left = True
        if close:
            resp.close()  # (lost already: this releases it from the connector)
        handle.cancel()
        closed.remove_done_callback(lost)
        # Whoever else looks at it, its error (a reset, later) must not go unretrieved; once
        # only, however many streams on this connection lingered.
        closed.remove_done_callback(mark_seen)
        closed.add_done_callback(mark_seen)
        leave()

    def lost(future: asyncio.Future[None]) -> None:
        mark_seen(future)
        gone(True)

    handle = asyncio.get_running_loop().call_later(LINGER_SECONDS, gone, True)
    closed.add_done_callback(lost)
    resp.content.on_eof(functools.partial(gone, False))
