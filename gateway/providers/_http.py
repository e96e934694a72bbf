"""HTTP plumbing shared by providers: timeouts, SSE parsing, and upstream status → error.

Upstream failures are classified by HTTP status and typed parsing of the error body, never
by matching message text.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import TypeVar

import aiohttp
import msgspec
import structlog

from gateway.errors import (
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from gateway.settings import ProviderConfig

T = TypeVar("T")

log = structlog.get_logger(__name__)

__all__ = [
    "UpstreamClient",
    "error_from_status",
    "iter_sse_batches",
    "parse_retry_after",
    "read_usage",
    "stream_error",
    "stream_timeout",
    "unary_timeout",
    "upstream_detail",
    "upstream_failure",
]


def unary_timeout(cfg: ProviderConfig) -> aiohttp.ClientTimeout:
    # A non-streaming answer's headers only come once it is generated, so the first-byte bound
    # (a stream's) does not apply; the longest silence does. A per-read timer would only add
    # work per read, so both bounds are one `total`.
    return aiohttp.ClientTimeout(
        total=min(cfg.total_timeout, cfg.read_timeout), sock_connect=cfg.connect_timeout
    )


def stream_timeout(cfg: ProviderConfig) -> aiohttp.ClientTimeout:
    # No total: a long, healthy generation must never be cut; sock_read bounds each silence.
    return aiohttp.ClientTimeout(
        total=None, sock_connect=cfg.connect_timeout, sock_read=cfg.read_timeout
    )


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `retry-after` header (delta-seconds or HTTP-date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _ErrorDetail(msgspec.Struct, rename={"retry_delay": "retryDelay"}):
    reason: str | None = None  # Google's typed error reason, e.g. API_KEY_INVALID
    retry_delay: str | None = None  # Google's RetryInfo, e.g. "33s"


class _OpenAIErrorBody(msgspec.Struct):
    message: str | None = None
    type: str | None = None
    param: str | None = None
    code: str | int | None = None
    details: list[_ErrorDetail] = []


class _OpenAIErrorEnvelope(msgspec.Struct):
    error: _OpenAIErrorBody | str | None = None
    message: str | None = None


# Google's OpenAI-compatible endpoint wraps its error envelope in a one-element list.
_ERROR_DECODER: msgspec.json.Decoder[_OpenAIErrorEnvelope | list[_OpenAIErrorEnvelope]] = (
    msgspec.json.Decoder(_OpenAIErrorEnvelope | list[_OpenAIErrorEnvelope])
)

# Google answers a bad API key with HTTP 400; the typed reason says it is ours, not the client's.
_CREDENTIAL_REASONS = frozenset({"API_KEY_INVALID", "API_KEY_SERVICE_BLOCKED"})


def _envelope(body: bytes) -> _OpenAIErrorEnvelope | None:
    try:
        env = _ERROR_DECODER.decode(body)
    except msgspec.MsgspecError:
        return None
    if isinstance(env, list):
        return env[0] if env else None
    return env


def upstream_detail(body: bytes) -> _OpenAIErrorBody:
    env = _envelope(body)
    if env is None:
        return _OpenAIErrorBody()
    if isinstance(env.error, _OpenAIErrorBody):
        return env.error
    return _OpenAIErrorBody(message=env.error or env.message)


def stream_error(provider: str, data: bytes) -> UpstreamError | None:
    """The error an upstream `{"error": ...}` stream event reports; None for other events."""
    env = _envelope(data)
    if env is None or env.error is None:
        return None
    code = env.error.code if isinstance(env.error, _OpenAIErrorBody) else None
    if isinstance(code, int) and code >= 400:  # Google's envelope names the HTTP status
        return error_from_status(provider, code, data)
    message = (
        env.error.message if isinstance(env.error, _OpenAIErrorBody) else env.error or env.message
    )
    return UpstreamError(
        f"The upstream provider '{provider}' failed mid-stream: {message or 'unknown error'}"
    )


def error_from_status(
    provider: str, status: int, body: bytes, retry_after: str | None = None
) -> UpstreamError:
    """Map an upstream error response to the error the client sees.

    Client-caused 4xx keep the upstream's message, param and code; our own credential
    problems and upstream faults become gateway errors that never blame the client.
    """
    detail = upstream_detail(body)
    code = str(detail.code) if detail.code is not None else None
    message = detail.message or f"upstream returned HTTP {status}"
    reasons = {d.reason for d in detail.details}
    if status in (401, 403) or reasons & _CREDENTIAL_REASONS:
        return UpstreamAuthError(
            f"The upstream provider '{provider}' rejected the gateway's credentials "
            f"(HTTP {status}). This is a gateway configuration problem."
        )
    if status == 429:
        if code == "insufficient_quota" or detail.type == "insufficient_quota":
            # The upstream account is out of credit: our problem, not the client's quota.
            return UpstreamUnavailable(
                f"The upstream provider '{provider}' account has exhausted its quota.",
                code="upstream_quota_exhausted",
            )
        # The upstream's own text names the operator's account (e.g. an org id): not relayed.
        delays = [d.retry_delay.removesuffix("s") for d in detail.details if d.retry_delay]
        return UpstreamRateLimited(
            f"The upstream provider '{provider}' is rate limiting requests; retry later.",
            retry_after=parse_retry_after(retry_after or (delays[0] if delays else None)),
        )
    if status in (400, 404, 409, 413, 422):
        mapped = {404: 404, 413: 413}.get(status, 400)
        err_type = "not_found_error" if mapped == 404 else "invalid_request_error"
        err = UpstreamBadRequest(message, param=detail.param, code=code, status=mapped)
        err.type = err_type
        return err
    if status in (408, 504):
        return UpstreamTimeout(f"The upstream provider '{provider}' timed out (HTTP {status}).")
    if status >= 500 or status == 529:
        return UpstreamUnavailable(
            f"The upstream provider '{provider}' failed (HTTP {status}): {message}",
            retry_after=parse_retry_after(retry_after),
        )
    return UpstreamError(f"The upstream provider '{provider}' answered HTTP {status}: {message}")


def read_usage(provider: str, decoder: msgspec.json.Decoder[T], body: bytes, what: str) -> T | None:
    """The usage view of a whole upstream answer (`what`: "completion", "response"...).

    A usage object we cannot read must not cost the client a good answer: None then (the
    usage row is estimated), with a warning.

    Raises:
        UpstreamError: the answer is not JSON at all.
    """
    try:
        return decoder.decode(body)
    except msgspec.ValidationError:
        log.warning("upstream_usage_unreadable", provider=provider)
        return None
    except msgspec.DecodeError:
        raise UpstreamError(
            f"The upstream provider '{provider}' returned a malformed {what}."
        ) from None


def upstream_failure(provider: str, exc: BaseException) -> UpstreamError:
    """Map a client-side exception (timeout, refused, reset) to an UpstreamError."""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return UpstreamTimeout(f"The upstream provider '{provider}' did not answer in time.")
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return UpstreamConnectionError(
            f"The upstream provider '{provider}' closed the connection mid-response."
        )
    return UpstreamConnectionError(f"Could not reach the upstream provider '{provider}'.")


async def iter_sse_batches(resp: aiohttp.ClientResponse) -> AsyncIterator[list[bytes]]:
    """Yield the `data` of the SSE events of `resp`, batched by network read.

    Each batch holds every event completed by one read, so a burst of events costs one
    client write instead of one per event, and nothing waits for more input. One linear
    pass per read (no re-scanning, no per-event copies of the buffer); our own buffer
    instead of `resp.content` line iteration, which raises `LineTooLong` on the large
    single-line events that big tool calls or images produce. Comments (`: ping`) and
    `event:`/`id:` fields are skipped; CR and CRLF line ends are accepted.
    """
    buf = b""
    async for piece in resp.content.iter_any():
        buf = buf + piece if buf else piece
        if b"\r" in buf:
            # A trailing CR may be the first half of a CRLF split across reads.
            keep = b"\r" if buf.endswith(b"\r") else b""
            buf = buf[: len(buf) - len(keep)].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        else:
            keep = b""
        batch: list[bytes] = []
        start = 0
        while (end := buf.find(b"\n\n", start)) >= 0:
            data = _event_data(buf[start:end])
            if data is not None:
                batch.append(data)
            start = end + 2
        buf = buf[start:] + keep if start else buf + keep
        if batch:
            yield batch
    if buf.strip():
        data = _event_data(buf.replace(b"\r", b"\n"))
        if data is not None:
            yield [data]


def _event_data(event: bytes) -> bytes | None:
    if event.startswith(b"data: ") and b"\n" not in event:
        return event[6:]  # the common case: one data line
    lines = [
        line[5:].removeprefix(b" ") for line in event.split(b"\n") if line.startswith(b"data:")
    ]
    return b"\n".join(lines) if lines else None


class UpstreamClient:
    """One provider's HTTP calls: a JSON POST answered whole, or an SSE stream opened.

    Statuses of 400 and above become the mapped `UpstreamError`; client-side failures
    (refused, reset, timed out) become `UpstreamConnectionError`/`UpstreamTimeout`. Both are
    raised before a single byte of the answer is used, so the handler can still pick a status.
    """

    def __init__(
        self,
        config: ProviderConfig,
        session: aiohttp.ClientSession,
        *,
        auth_header: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.config = config
        self._session = session
        self._unary_timeout = unary_timeout(config)
        self._stream_timeout = stream_timeout(config)
        self._auth_header = auth_header
        self._base = {"content-type": "application/json", **(headers or {}), **config.headers}
        self._by_account: dict[str | None, dict[str, str]] = {}

    def headers(self, api_key: str | None) -> dict[str, str]:
        """The headers of every request to one upstream account (built once per account)."""
        found = self._by_account.get(api_key)
        if found is None:
            found = dict(self._base)
            if api_key:
                found[self._auth_header] = api_key
            self._by_account[api_key] = found
        return found

    def decode(self, decoder: msgspec.json.Decoder[T], data: bytes) -> T:
        """An upstream answer as `decoder`'s type.

        Raises:
            UpstreamError: the answer is not what the upstream's API promises.
        """
        try:
            return decoder.decode(data)
        except (msgspec.MsgspecError, RecursionError):
            raise UpstreamError(
                f"The upstream provider '{self.config.name}' returned a malformed answer."
            ) from None

    def failed(self, resp: aiohttp.ClientResponse, body: bytes) -> UpstreamError:
        return error_from_status(
            self.config.name, resp.status, body, resp.headers.get("retry-after")
        )

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> bytes:
        """POST `body` and return the upstream's whole 2xx answer."""
        try:
            async with self._session.post(
                url, data=body, headers=headers, timeout=self._unary_timeout
            ) as resp:
                data = await resp.read()
                if resp.status >= 400:
                    raise self.failed(resp, data)
                return data
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise upstream_failure(self.config.name, exc) from exc

    async def stream(
        self, url: str, body: bytes, headers: Mapping[str, str]
    ) -> AsyncGenerator[list[bytes], None]:
        """POST `body` and yield the `data` of the upstream's SSE events, batched by read."""
        try:
            async with self._session.post(
                url, data=body, headers=headers, timeout=self._stream_timeout
            ) as resp:
                if resp.status >= 400:
                    raise self.failed(resp, await resp.read())
                async for batch in iter_sse_batches(resp):
                    yield batch
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise upstream_failure(self.config.name, exc) from exc
