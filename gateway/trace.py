"""The per-request trace: what a request learned on its way, for its log line and usage row.

`middleware.gateway` creates one per request under `TRACE_KEY`; authentication,
the pipeline, retries and the SSE writer fill it in; the middleware reads it when the request
ends. This module depends on nothing above it, so all of them can import it.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
from aiohttp import web

from gateway.records import KeyRecord
from gateway.state import GATE_KEY

__all__ = ["CLIENT_CLOSED", "TRACE_KEY", "RequestTrace", "add_trace_headers", "elapsed_ms"]


def elapsed_ms(start: float, end: float) -> float:
    """Milliseconds from `start` to `end` (seconds, of one clock), to the microsecond. Not
    `round(x, 3)`, which writes the float out as text and reads it back: a few thousand
    instructions a request for its three durations."""
    return int((end - start) * 1_000_000 + 0.5) / 1000


# nginx's convention for "client closed the connection before the response was complete".
CLIENT_CLOSED = 499


class RequestTrace(msgspec.Struct, kw_only=True):
    """What a handler learned about a request, for the log line and the usage row. A Struct
    rather than a dataclass: made on every request, its fields set in C (a dataclass's
    `__init__` is Python, a line per field)."""

    request_id: str
    started: float
    ts: float
    endpoint: str = ""
    metered: bool = False  # True once a model was resolved: the request gets a usage row
    key_id: str | None = None
    model_id: str | None = None
    provider: str | None = None
    upstream_model: str | None = None
    stream: bool = False
    status: int | None = None  # overrides the HTTP status (stream errors, disconnects)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_tokens: int = 0  # of prompt_tokens
    cache_write_tokens: int = 0  # of prompt_tokens
    ttft_ms: float | None = None
    estimated: bool = False
    cost_usd: float = 0.0  # by the price of the model and upstream that answered, when known
    # Extra response headers (x-gateway-provider).
    headers: dict[str, str] | None = None
    # A key with rate limits: its x-ratelimit-* headers go on every response, made once, as
    # the response goes out (so they show what this request took).
    limited: KeyRecord | None = None
    # Why the gateway refused it for its key's limits or budget (`GatewayError.reason`).
    refused: str | None = None
    # How a relayed stream's upstream did (`sse.relay`), for its account's breaker: True, it
    # finished the stream; False, it broke it; None, no verdict (the stream did not get that
    # far, or the client, a shutdown or the gateway itself ended it).
    upstream_ok: bool | None = None
    # Every upstream attempt: provider, account, upstream model, status, ms.
    attempts: list[dict[str, object]] = msgspec.field(default_factory=list)
    # What is left to account for once the answer is out (`pipeline.finish`): run first by
    # the request's accounting (`middleware`), which reads what it sets.
    settle: Callable[[], None] | None = None


TRACE_KEY: web.RequestKey[RequestTrace] = web.RequestKey("trace")


def add_trace_headers(
    request: web.Request, trace: RequestTrace, response: web.StreamResponse
) -> None:
    """The headers a request earned on its way (provider, the key's rate limits)."""
    if trace.headers:
        response.headers.update(trace.headers)
    if trace.limited is not None:
        response.headers.update(request.app[GATE_KEY].headers(trace.limited))
