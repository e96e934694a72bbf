"""Errors in the Messages API's own shape, for `/v1/messages` and its token count.

Anthropic's clients read `{"type": "error", "error": {"type", "message"}, "request_id"}` and
Anthropic's statuses, so on these routes the gateway's errors are written that way (auth
failures, limit refusals and upstream failures alike): the status stays, except that a
gateway 502 (an upstream that failed us) is Anthropic's 500 `api_error` and a 503 (overloaded,
or no account available) is its 529 `overloaded_error`. A failure after a stream began is an
`event: error` with the same body, without `request_id`.
"""

from __future__ import annotations

from gateway.errors import GatewayError
from gateway.messages.schema import ErrorDetail, ErrorOut
from gateway.responses.framing import event_frame
from gateway.schemas.codec import encode

__all__ = ["PATH_PREFIX", "anthropic_error", "anthropic_status", "error_event"]

PATH_PREFIX = "/v1/messages"

_STATUS = {502: 500, 503: 529}
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_status(exc: GatewayError) -> int:
    return _STATUS.get(exc.status, exc.status)


# Codes written as Anthropic's `error.details.error_code` too: the `anthropic` SDK's threads
# read them (a thread not found, or not supported, has it send the whole conversation again).
_DETAILED = frozenset({"thread_not_found", "thread_unsupported_request"})


def _detail(exc: GatewayError, status: int) -> ErrorDetail:
    kind = _TYPES.get(status) or ("invalid_request_error" if status < 500 else "api_error")
    if exc.code in _DETAILED:
        return ErrorDetail(type=kind, message=exc.message, details={"error_code": exc.code})
    return ErrorDetail(type=kind, message=exc.message)


def anthropic_error(exc: GatewayError, request_id: str) -> tuple[int, bytes]:
    """The status and body of an error response on a Messages route."""
    status = anthropic_status(exc)
    return status, encode(ErrorOut(error=_detail(exc, status), request_id=request_id))


def error_event(exc: GatewayError) -> bytes:
    """The `error` event that ends a Messages stream after a failure."""
    return event_frame(b"error", encode(ErrorOut(error=_detail(exc, anthropic_status(exc)))))
