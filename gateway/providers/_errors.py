"""Upstream failures → the errors clients see, for every provider.

Classified by HTTP status, `retry-after` and typed parsing of the error body (OpenAI's
envelope, which Anthropic's and Google's errors also fit), never by matching message text.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import re
import time
from collections.abc import Mapping

import aiohttp
import msgspec
from aiohttp.http_exceptions import ContentEncodingError

from gateway.errors import (
    UpstreamAuthError,
    UpstreamBadRequest,
    UpstreamBadResponse,
    UpstreamConnectionError,
    UpstreamError,
    UpstreamOutOfCredit,
    UpstreamRateLimited,
    UpstreamTimeout,
    UpstreamUnavailable,
)

# Anthropic's whole message for an account whose credit is spent, in a 400. Only the whole
# message: a 400 about the request may repeat the client's own words (an unknown field's
# name), which must not take the operator's account out of rotation.
_CREDIT_SPENT = re.compile(
    r"\s*Your credit balance is too low to access the Anthropic API\. Please go to Plans & "
    r"Billing to upgrade or purchase credits\.\s*"
)
# OpenRouter's 402 for one request, larger than the account's credit covers ("This request
# requires more credits, or fewer max_tokens. ... can only afford N", "Prompt tokens limit
# exceeded: N > M"): the account still serves smaller requests; one that can afford nothing
# may be spent, or this prompt may leave nothing: a failure of the account, not a disabling.
_COSTS_TOO_MUCH = re.compile(r"fewer max_tokens|can only afford|Prompt tokens limit exceeded")
_AFFORDS_NOTHING = re.compile(r"can only afford 0\b")

__all__ = [
    "DECODE_ERRORS",
    "MAX_RETRY_AFTER",
    "error_from_status",
    "parse_retry_after",
    "retry_after_of",
    "stream_error",
    "upstream_detail",
    "upstream_failure",
]

# What decoding an upstream's JSON may raise: msgspec's own errors, and RecursionError for
# nesting deeper than the interpreter's recursion limit (about 1000), which msgspec does not
# wrap. Caught wherever upstream JSON is decoded, or such an answer is a gateway crash.
DECODE_ERRORS = (msgspec.MsgspecError, RecursionError)

# The longest wait an upstream may ask for that the gateway believes (a day); beyond that, or
# for a value that is not a finite number, the header is ignored.
MAX_RETRY_AFTER = 86_400.0


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `retry-after` header (delta-seconds or HTTP-date); None when absent,
    unreadable, not finite (`inf`, `nan`) or longer than `MAX_RETRY_AFTER`."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, OverflowError):
            return None
        seconds = when.timestamp() - time.time()
    if not math.isfinite(seconds) or seconds > MAX_RETRY_AFTER:
        return None
    return max(0.0, seconds)


def retry_after_of(headers: Mapping[str, str]) -> float | None:
    """The wait an upstream asks for: `retry-after-ms` (OpenAI, Azure) is the more exact."""
    ms = parse_retry_after(headers.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000
    return parse_retry_after(headers.get("retry-after"))


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
    except DECODE_ERRORS:
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
    if code == "insufficient_quota" or (
        isinstance(env.error, _OpenAIErrorBody) and env.error.type == "insufficient_quota"
    ):
        return error_from_status(provider, 429, data)  # (the account's credit: as its 429)
    message = (
        env.error.message if isinstance(env.error, _OpenAIErrorBody) else env.error or env.message
    )
    return UpstreamError(
        f"The upstream provider '{provider}' failed mid-stream: {message or 'unknown error'}"
    )


def error_from_status(
    provider: str, status: int, body: bytes, headers: Mapping[str, str] | None = None
) -> UpstreamError:
    """Map an upstream error response to the error the client sees.

    Client-caused 4xx keep the upstream's message, param and code; our own credential
    problems and upstream faults become gateway errors that never blame the client.
    """
    detail = upstream_detail(body)
    retry_after = retry_after_of(headers) if headers else None
    code = str(detail.code) if detail.code is not None else None
    message = detail.message or f"upstream returned HTTP {status}"
    reasons = {d.reason for d in detail.details}
    if status == 402:
        # OpenRouter and DeepSeek: the operator's balance is spent. Like insufficient_quota,
        # our account's problem (another account may do), and its text names the account.
        if _COSTS_TOO_MUCH.search(message):
            if _AFFORDS_NOTHING.search(message):  # (spent, or this prompt leaves nothing)
                return UpstreamOutOfCredit(
                    f"The upstream provider '{provider}' account's credit does not cover this "
                    "request (HTTP 402).",
                    whole_account=False,
                    counts=True,
                )
            return UpstreamOutOfCredit(
                f"The upstream provider '{provider}' account's credit does not cover this "
                "request's output limit (HTTP 402); a request with a lower max_tokens may fit.",
                whole_account=False,
            )
        return UpstreamOutOfCredit(
            f"The upstream provider '{provider}' account is out of credit (HTTP 402)."
        )
    if status in (401, 403) or reasons & _CREDENTIAL_REASONS:
        return UpstreamAuthError(
            f"The upstream provider '{provider}' rejected the gateway's credentials "
            f"(HTTP {status}). This is a gateway configuration problem."
        )
    if status == 429:
        if code == "insufficient_quota" or detail.type == "insufficient_quota":
            # The upstream account is out of credit: our problem, not the client's quota.
            return UpstreamOutOfCredit(
                f"The upstream provider '{provider}' account has exhausted its quota."
            )
        # The upstream's own text names the operator's account (e.g. an org id): not relayed.
        delays = [d.retry_delay.removesuffix("s") for d in detail.details if d.retry_delay]
        return UpstreamRateLimited(
            f"The upstream provider '{provider}' is rate limiting requests; retry later.",
            retry_after=retry_after
            if retry_after is not None
            else parse_retry_after(delays[0] if delays else None),
        )
    if status == 400 and _CREDIT_SPENT.fullmatch(message):
        # Anthropic's "Your credit balance is too low to access the Anthropic API": the
        # operator's account, not the request (and its text is not relayed).
        return UpstreamOutOfCredit(
            f"The upstream provider '{provider}' account is out of credit (HTTP 400)."
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
            retry_after=retry_after,
        )
    # Any other status (405, 410, 421, 451, ...) says nothing about the request: the gateway
    # built it, so a target that cannot serve it is that target's fault, and another may.
    return UpstreamBadResponse(
        f"The upstream provider '{provider}' answered HTTP {status}: {message}"
    )


def upstream_failure(provider: str, exc: BaseException) -> UpstreamError:
    """Map a client-side exception (timeout, refused, reset, an answer that is not HTTP) to
    an UpstreamError."""
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        timeout = UpstreamTimeout(f"The upstream provider '{provider}' did not answer in time.")
        timeout.unanswered = not isinstance(exc, aiohttp.ConnectionTimeoutError)
        return timeout
    if isinstance(exc, aiohttp.ClientResponseError):
        # The gateway never calls raise_for_status: this is aiohttp refusing an answer's head
        # (not HTTP, headers too large, a broken chunk, an encoding it cannot decode).
        return UpstreamBadResponse(
            f"The upstream provider '{provider}' sent an answer that is not valid HTTP."
        )
    if isinstance(exc, aiohttp.ClientPayloadError) and isinstance(
        exc.__cause__, ContentEncodingError
    ):
        return UpstreamBadResponse(
            f"The upstream provider '{provider}' sent a body its Content-Encoding does not decode."
        )
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return UpstreamConnectionError(
            f"The upstream provider '{provider}' closed the connection mid-response."
        )
    return UpstreamConnectionError(f"Could not reach the upstream provider '{provider}'.")
