"""The gateway's error tree and the one table that maps it to OpenAI-shaped HTTP errors.

Handlers, providers and the store raise these; only `middleware.gateway` turns them
into responses, so status codes and error types live here and nowhere else::

    GatewayError                      500 server_error
    ├── InvalidRequest                400 invalid_request_error
    │   ├── PayloadTooLarge           413 invalid_request_error / request_too_large
    │   └── RequestTimeout            408 invalid_request_error / request_timeout
    ├── AuthenticationFailed          401 authentication_error / invalid_api_key
    ├── PermissionDenied              403 permission_error / model_not_allowed
    ├── NotFound                      404 not_found_error / model_not_found
    ├── RateLimited                   429 rate_limit_exceeded (carries retry_after)
    ├── QuotaExceeded                 429 insufficient_quota
    ├── StoreBusy                     503 server_error / database_busy (carries retry_after)
    ├── LimitsUnavailable             503 server_error / limits_unavailable (Redis is down)
    └── UpstreamError                 502 upstream_error  (the provider failed us)
        ├── UpstreamBadRequest        4xx invalid_request_error (the upstream blamed the request)
        ├── UpstreamRateLimited       429 rate_limit_exceeded (retryable, carries retry_after)
        ├── UpstreamUnavailable       503 upstream_error (retryable: 5xx, overloaded)
        │   ├── UpstreamPoolFull      503 upstream_pool_full (the gateway's max_connections)
        │   └── GatewayStopping       503 upstream_error (the server is stopping; not retried)
        ├── UpstreamTimeout           504 upstream_error (retryable)
        ├── UpstreamConnectionError   502 upstream_error (retryable: refused, reset, DNS)
        ├── UpstreamBadResponse       502 upstream_error (retryable: a redirect, too large,
        │                                 a status that blames no request, e.g. 405, 410)
        ├── UpstreamAuthError         502 upstream_error (our credentials refused; not retryable)
        └── UpstreamOutOfCredit       503 upstream_quota_exhausted (our account's credit is
                                          spent: a 402, `insufficient_quota`; not retryable)
"""

from __future__ import annotations

import enum

import msgspec

__all__ = [
    "AuthenticationFailed",
    "ErrorBody",
    "ErrorEnvelope",
    "Fault",
    "GatewayError",
    "GatewayStopping",
    "InvalidRequest",
    "LimitsUnavailable",
    "NotFound",
    "PayloadTooLarge",
    "PermissionDenied",
    "QuotaExceeded",
    "RateLimited",
    "RequestTimeout",
    "StoreBusy",
    "UpstreamAuthError",
    "UpstreamBadRequest",
    "UpstreamBadResponse",
    "UpstreamConnectionError",
    "UpstreamError",
    "UpstreamOutOfCredit",
    "UpstreamPoolFull",
    "UpstreamRateLimited",
    "UpstreamTimeout",
    "UpstreamUnavailable",
    "drop_tracebacks",
    "fault_of",
]


class ErrorBody(msgspec.Struct):
    """The inner object of every error; all four keys are always present."""

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


class GatewayError(Exception):
    """Base of every error a client can see. Subclasses set the class attributes."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    retryable: bool = False
    # Sent as `x-should-retry`, which the OpenAI and Anthropic SDKs obey over their own rules
    # (e.g. they retry every 429 unless told not to).
    should_retry: bool | None = None
    # The answer closes the connection: the request's body was not (wholly) read.
    closes: bool = False
    # Why the gateway refused a key's request (its limits or budget), for the metrics.
    reason: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if reason is not None:
            self.reason = reason
        self.retry_after = retry_after

    def body(self) -> ErrorEnvelope:
        return ErrorEnvelope(ErrorBody(self.message, self.type, self.param, self.code))


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    status = 413
    code = "request_too_large"
    closes = True


class RequestTimeout(InvalidRequest):
    """The client took too long to send its request head or body."""

    status = 408
    code = "request_timeout"
    closes = True


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFound(GatewayError):
    status = 404
    type = "not_found_error"
    code = "model_not_found"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"
    # Which of the key's limits refused it: concurrency, requests_per_minute or
    # tokens_per_minute.
    reason: str | None = "rate_limit"


class QuotaExceeded(GatewayError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"
    should_retry = False  # retrying cannot help until the budget period turns
    reason: str | None = "budget"


class StoreBusy(GatewayError):
    """The database is locked by another writer (a backup, the CLI): try again shortly."""

    status = 503
    code = "database_busy"


class LimitsUnavailable(GatewayError):
    """The shared limits (Redis) cannot be reached and `redis_failure = "refuse"`."""

    status = 503
    code = "limits_unavailable"
    reason: str | None = "limits_unavailable"  # counted with the refusals (metrics)


class UpstreamError(GatewayError):
    """The upstream provider failed; never the client's fault unless a subclass says so."""

    status = 502
    type = "upstream_error"
    code: str | None = "upstream_error"


class UpstreamBadRequest(UpstreamError):
    """The upstream rejected the request itself (4xx): relayed with the upstream's message."""

    status = 400
    type = "invalid_request_error"
    code = None


class UpstreamRateLimited(UpstreamError):
    status = 429
    type = "rate_limit_exceeded"
    code = "rate_limit_exceeded"
    retryable = True


class UpstreamUnavailable(UpstreamError):
    status = 503
    retryable = True


class UpstreamPoolFull(UpstreamUnavailable):
    """All of a provider's `max_connections` stayed in use for `pool_timeout`: the gateway's
    own bound, so another route may answer, but the upstream account did not fail (its
    breaker is not told)."""

    code = "upstream_pool_full"


class GatewayStopping(UpstreamUnavailable):
    """The server is stopping: no upstream request is opened any more, and a stream still
    open is ended with this. Not retried (every provider's connections are refused alike),
    and no verdict on the account it did not reach."""

    retryable = False

    def __init__(self) -> None:
        super().__init__("The gateway is shutting down.")


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"
    retryable = True
    # The gateway gave up waiting for an answer to a request it had sent (not a connection
    # that never opened, nor an upstream's own 408 or 504): the upstream may bill the prompt.
    unanswered = False


class UpstreamConnectionError(UpstreamError):
    status = 502
    code = "upstream_connection_error"
    retryable = True


class UpstreamBadResponse(UpstreamError):
    """The upstream answered with what the gateway never relays: a redirect (never followed),
    a body or stream event larger than the provider's limits, or a status that blames no
    request (405, 410, 421, ...: the target cannot serve, another may)."""

    status = 502
    code = "upstream_bad_response"
    retryable = True


class UpstreamAuthError(UpstreamError):
    """Our credentials for the upstream were refused: a gateway fault, never the client's 401,
    and one that retrying cannot fix until the operator does."""

    status = 502
    code = "upstream_auth_failed"
    should_retry = False


class UpstreamOutOfCredit(UpstreamError):
    """The upstream account's credit or quota is spent (an HTTP 402, OpenAI's
    `insufficient_quota`): the operator's problem, not the client's quota, and one retrying
    cannot fix until the account is topped up; another account may still answer."""

    status = 503
    code = "upstream_quota_exhausted"
    should_retry = False

    def __init__(self, message: str, *, whole_account: bool = True, counts: bool = False) -> None:
        super().__init__(message)
        # False: only this request costs more than the credit left (OpenRouter's 402 for an
        # output limit): another account may answer it, and this one still serves others.
        self.whole_account = whole_account
        self.retryable = not whole_account  # (then another account is tried at once)
        # With `whole_account` False: the account may be spent all the same (OpenRouter's
        # "can only afford 0"), so it counts as a failure that takes it out for `cooldown`
        # (`Fault.UPSTREAM`, `failover.attempt_each`), not for `auth_cooldown` as a spent one.
        self.counts = counts


class Fault(enum.Enum):
    """Whose fault a failure is, for the breaker of the upstream account it happened on."""

    UPSTREAM = "upstream"  # the account's: counted as a failure
    CREDENTIALS = "credentials"  # our key for it was refused: the operator must fix it
    REQUEST = "request"  # the request's own: the upstream answered, which clears a probe
    NONE = "none"  # the gateway's own refusal (a full pool, shutdown) or bug: no verdict


def fault_of(exc: GatewayError) -> Fault:
    """Whose fault a failure is: the one rule for failover before an answer's first byte
    (`failover.attempt_each`) and for a stream that breaks after it (`sse.relay`).

    Every `UpstreamError` is the upstream's unless a subclass says otherwise: a plain one (an
    error event that blames no request, a malformed answer or event) too, since the gateway
    built the request and the upstream did not answer it as its API promises.
    """
    if not isinstance(exc, UpstreamError) or isinstance(exc, (UpstreamPoolFull, GatewayStopping)):
        return Fault.NONE
    if isinstance(exc, UpstreamBadRequest):
        return Fault.REQUEST
    if isinstance(exc, UpstreamAuthError):
        return Fault.CREDENTIALS
    if isinstance(exc, UpstreamOutOfCredit):  # (unusable until the operator acts; or, where
        # only this request costs more than is left, no verdict on the account)
        if exc.whole_account:
            return Fault.CREDENTIALS
        return Fault.UPSTREAM if exc.counts else Fault.NONE
    return Fault.UPSTREAM


def drop_tracebacks(exc: BaseException | None) -> None:
    """Forget the tracebacks of an error that is dealt with (answered, or written as the last
    event of a stream), and of the errors it came from. A traceback holds the frames it
    passed, and a frame what its locals hold: the error itself (a local it was raised from, a
    reader that keeps its error, an object that carries it), so each such request would stay
    in a cycle, its Request and body with it, until the garbage collector's next full pass."""
    for _ in range(8):  # (a chain of causes is short; a cyclic one must not loop)
        if exc is None:
            return
        exc.__traceback__ = None
        exc = exc.__cause__ or exc.__context__
